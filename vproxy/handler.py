"""The contract between request handlers and the session that runs them.

A handler is `fn(session, idx, args, raw, batch)` (local.LOCAL, gate.py, cluster/keyless.py,
multikey.py, setops.py, transaction.py, namespaces.py): it puts a reply in batch.replies[idx] now,
or hands the request on with one of the operations below, whose reply the session puts there
before the batch is written. A handler uses only what these protocols declare: the session's
other methods and attributes are its own business (tests/test_handler_contract.py holds the
handler modules to that).

`Session` is what every session offers (client.ClientSession: standalone, and the HA modes'
HASession); `ClusterSession` adds the cluster session's routing (cluster/session.py). They are
typing.Protocol classes: documentation a type checker can hold code to, with no runtime cost. The
handler modules annotate their session parameter with them (`s: Session`, in cluster/:
`s: ClusterSession`), so the contract shows where it is used.
"""

from __future__ import annotations

from typing import Any, Protocol


class Session(Protocol):
    """What a handler may read, set and call on any session."""

    # ---- the connection (RESET keeps these) ----
    app: Any  # the App: settings (app.cfg), command table, router, statistics
    id: int
    addr: Any  # the client's address
    sock: Any  # the client's socket (its local address: CLIENT LIST laddr=, CLUSTER as one node)
    peer: bool  # a fleet peer's question, not a client (CLIENT LIST leaves it out)
    created: float
    last_active: float
    last_cmd: bytes
    closing: bool  # set it to end the connection once the batch is written (QUIT)
    post: list  # (idx, fn): fn rewrites request idx's reply once it is in (INFO's proxy sections)

    # ---- the session state (ClientSession.reset: what a new connection has, and RESET restores) ----
    db: int
    proto: int
    name: bytes
    lib_name: bytes
    lib_ver: bytes
    no_evict: bool
    no_touch: bool
    authed: bool
    cur: Any  # the channel holding the requests in flight (None: none)
    lease: Any  # MULTI / WATCH: mux.lease.Lease, or None
    oneshot: Any  # a blocking command's Lease, or None
    stream: Any  # streams.Stream while pub/sub, MONITOR, TRACKING or REPLY OFF runs, else None
    tx: Any  # transaction.TxState (WATCHING / QUEUED / FAILED / ENDING): read and changed only through
    #          vproxy/transaction.py (in_multi, pinned, end_pinned ...)
    pin_slot: int | None  # cluster: the slot a WATCH/MULTI is bound to (transaction.bind_slot / slot); None

    # ---- who the client is (users.py, gate.py) ----
    user: Any  # the backend user's Credentials (users.switch changes it), None: vproxy's own
    proxy_user: Any  # the proxy user (gate.bind changes it), None: nobody yet, or no users
    acl: Any  # proxy_user when its rights are limited, else None
    forwards: Any  # (name, nargs) -> may the plain path send it as it is (gate.bind sets it)

    # ---- a transaction's effects, applied after EXEC ----
    multi_select: int | None
    multi_hide: list  # places of the CONFIG GETs queued in MULTI (gatecmds.queued)
    multi_own: list  # (place, args) of the CLIENT requests answered at EXEC (gatecmds.client_own)
    multi_proto: int | None
    multi_auth: list

    def forward(self, i: int, raw: bytes, batch: Any, name: bytes | None = None, args: list | None = None) -> None:
        """Send request i (raw) to the backend that runs it: on the session's lease if it holds one,
        else where the router (or, in a cluster, its keys' slots) says. name: what the router routes
        by (None: as a write); args: the request's arguments (always pass them)."""

    def block(self, i: int, raw: bytes, batch: Any, dirty: bool = False, wait: bool = False,
              args: list | None = None) -> None:
        """Send request i on a connection of its own (a blocking command) until it answers. dirty:
        the connection is closed afterwards; wait: WAIT/WAITAOF (see ClientSession.block)."""

    def own_answer(self, name: bytes, args: list, raw: bytes) -> bytes:
        """The reply of a request vproxy answers itself (local.LOCAL), made now outside the batch
        (a stream's own answers, CLIENT requests queued in MULTI answered at EXEC)."""

    def submit(self, ch: Any, i: int, raw: bytes, batch: Any, timeout: bool = True) -> None:
        """Send request i on channel ch (the session's lease), with the command timeout unless not timeout."""

    def settle(self) -> None:
        """Wait for every reply in flight (the session's earlier requests answer first), then give
        back leases whose state has ended."""

    def refuse(self, batch: Any, i: int, msg: str) -> None:
        """Answer request i with the error msg, sent nowhere (counted as a rejected call)."""

    def refuse_queued(self, batch: Any, i: int, msg: str) -> None:
        """refuse() inside MULTI: EXEC then aborts the transaction (-EXECABORT)."""

    def proxy_auth(self, name: bytes, args: list) -> bool:
        """Whether this AUTH/HELLO carries credentials vproxy checks itself (never sent to a server)."""

    def in_transaction(self, i: int, name: bytes, args: list, raw: bytes, batch: Any) -> None:
        """Queue request i in the session's MULTI."""

    def new_lease(self, i: int, batch: Any) -> Any:
        """A connection pinned to this session (settles first); None when the session is closing or
        none could be had (then request i's reply is the error)."""

    def db_arg(self, arg: bytes) -> int | None:
        """The database a SELECT argument names, None when the server would refuse it."""

    def key(self) -> tuple:
        """Which connections may carry this session's requests: (database, protocol, backend user)."""

    def start_stream(self, i: int, kind: str, raw: bytes, batch: Any) -> None:
        """Start a stream ("sub": pub/sub, "monitor", "reply", "tracking") with request i."""

    def sync_stream(self, st: Any, lease: Any = None) -> bool:
        """Pub/sub: wait until the stream's connection has answered what was sent on it (see streams.py)."""

    def drop_leases(self) -> None:
        """Give the lease and the oneshot back dirty (RESET): their connections' state is unknown."""

    def end_stream(self, clean: bool = False) -> None:
        """End the stream, if any, and give its connection back (clean: reusable)."""

    def reset(self) -> None:
        """Set the session state (above) to a new connection's; RESET calls it once the leases and
        the stream are given back."""

    def set_buckets(self) -> None:
        """Take the rate buckets again after the proxy user changed (gate.bind)."""

    def write(self, data: bytes) -> None:
        """Write bytes to the client now (a stream's pushes), outside any batch."""


class ClusterSession(Session, Protocol):
    """What a cluster handler may use besides: requests by slot, parts merged (cluster/session.py,
    cluster/redirects.py)."""

    ns: bytes | None  # emulated database: the key prefix of the selected db, None: db 0
    mq: list  # MULTI: (name, raw) queued before a key chose the node
    lease_addr: Any  # where the next lease opens (SSUBSCRIBE), None: any primary
    chans: dict  # node address -> this session's channel there
    reads: bool  # read-only commands may go to replicas (read_from)

    def route(self, batch: Any, i: int, raw: bytes, slot: int, name: bytes, reads: bool = False) -> None:
        """Send request i to slot's node (-1: any primary); reads: to a replica when it is a read."""

    def op(self, batch: Any, i: int, parts: list, merge: Any, reads: bool = False) -> None:
        """Send parts [(slot, args)] now; once settled, batch.replies[i] = merge(their replies)."""

    def call(self, parts: list) -> list:
        """Run parts [(slot, args)] now, after everything before them; their final replies, in order."""

    def sides_everywhere(self, batch: Any, i: int, raw: bytes, merge: Any) -> None:
        """SCRIPT/FUNCTION KILL on every primary now; once settled, batch.replies[i] = merge(replies)."""

    def slots_of(self, name: bytes, args: list) -> set | None:
        """The slots of a request's keys (empty: keyless); None when its keys cannot be known."""

    def channel_to(self, addr: Any, fresh: bool = False) -> Any:
        """This session's channel to node addr (opened when it has none)."""

    def patch(self, slot: int, addr: Any) -> None:
        """A redirection said slot lives at addr: the slot map is patched and a refresh asked for."""

    def refresh(self) -> None:
        """Ask the cluster monitor for a new slot map."""

    def reset_cluster(self) -> None:
        """Set the cluster's session state (ns, pin_slot, mq, tx's FAILED) to a new connection's."""
