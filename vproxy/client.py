"""ClientSession: one client connection and the session state vproxy tracks for it.

    recv -> RequestParser -> for each request, in order:
        local handler (PING, SELECT, HELLO, CLIENT ...)      -> reply now
        shared channel of (db, protocol)                      -> reply later, FIFO
        lease (MULTI/WATCH, one blocking command)             -> reply later, FIFO, own connection
        stream (pub/sub, MONITOR, TRACKING, REPLY OFF)        -> replies pushed by the lease's reader
    -> wait for the batch -> one send of every reply, in request order

Order rule: a client's requests in flight are on one channel at a time; switching channel waits
for the earlier replies first (settle), so a later write can never overtake an earlier read.

The session is assembled from mixins, one job each: PlainPath (plain.py: plain requests sent and
answered from the loop), BatchPath (batchpath.py: the loop, the rest in windows, the writes),
Pinned (pinned.py: leases for MULTI/WATCH and blocking commands, settle), Streams (streams.py:
pub/sub, MONITOR, TRACKING, REPLY OFF), Paced (pacing.py: rate, pipeline and output limits),
Audited (audit.py). This module holds the session state, the dispatch and the forwarding.
"""

from __future__ import annotations

import socket
from itertools import count
from time import monotonic, time

from gevent.hub import Waiter
from gevent.lock import Semaphore

from . import commands as C
from . import errors as E
from . import resp
from .errors import BackendError
from .local import LOCAL, db_index
from .mux.channel import Batch, deadline_after
from .mux.lease import Lease
from .cmdstats import Track
from .outbox import TWIN, Outbox
from .audit import Audited, AuditTrack
from .batchpath import BatchPath
from .limits import Bucket
from .pacing import Paced
from .pinned import Pinned
from .plain import PlainPath
from .streams import Stream, Streams
from . import transaction as tx
from .users import DRYRUN, dryrun, switch

_ids = count(1)


def first_id(n: int) -> None:
    """Number the clients from n on (workers: ids unique across the processes of one supervisor)."""
    global _ids
    _ids = count(n)


_WAITS = (b"wait", b"waitaof")


class ClientSession(PlainPath, BatchPath, Pinned, Streams, Paced, Audited):
    """One client connection (runs in its own greenlet)."""

    HOLD: tuple | None = None  # the outbox's hold mode (outbox.py): none, replies come in order
    peer = False  # a fleet peer's question (fleet.py), not a client: CLIENT LIST leaves it out
    tls = False  # TLSClient: True

    def __init__(self, app, sock: socket.socket, addr):
        # What RESET keeps is declared here: the connection (id, socket, times), its backend user,
        # what it holds in flight, its limits and statistics. What RESET resets: reset(), below.
        self.app, self.sock, self.addr = app, sock, addr
        cfg = app.cfg
        self.id = next(_ids)
        self.created = time()
        self.last_active = monotonic()
        self.last_cmd = b"NULL"
        self.parser = resp.RequestParser(cfg.proto_max_bulk_len, max_buffer=cfg.client_query_buffer_limit)
        # Credentials of the backend user this client authenticated as (users.py); RESET switches it
        # back with users.switch, which counts each user's sessions
        self.user = None
        self.reset()  # the session state a new connection has, and RESET restores
        self.multi_select: int | None = None  # SELECT queued in MULTI: the session's db after EXEC
        self.multi_proto: int | None = None  # HELLO queued in MULTI: the session's protocol after EXEC
        self.multi_auth: list = []  # AUTHs queued in MULTI (backend users): applied in turn after EXEC
        self.multi_hide: list[int] = []  # places of the CONFIG GETs queued in MULTI (gatecmds.queued)
        self.multi_own: list = []  # (place, args) of the CLIENT requests vproxy answers at EXEC (gatecmds.client_own)
        self.multi_queued = 0  # requests queued in MULTI so far (standalone; cluster: len(mq))
        self.post: list = []  # (idx, fn): rewrite a reply once it is in
        self.audits: list = []  # audit.Entry of the recorded requests whose replies are not written yet
        self.closing = False
        self.wlock = Semaphore()
        self.ha_sent: list | None = [] if app.router.ha else None  # HA: see HASession._ha_recover
        self.batch: Batch | None = None
        self.early: list[bytes] = []  # bytes read while waiting on a pinned connection
        self.early_bytes = 0
        self.max_window = self.window = cfg.max_pipeline  # requests in flight at once (see process)
        # (name, nargs) -> may the plain path send it as it is (commands.CommandTable.forwards; a
        # session whose user limits what it may run narrows it: what it refuses takes the batch path)
        self.forwards = app.commands.forwards
        self.proxy_user = self.acl = None  # gate.py: the proxy user, and the same when it has limits
        self.rate_bucket = Bucket(cfg.client_rate_limit, cfg.client_rate_burst or cfg.client_rate_limit) \
            if cfg.client_rate_limit else None
        self.buckets: tuple = ()  # limits.py: the buckets each read batch takes from
        self.paid = False  # the requests handed from the loop were paid for there (see pace)
        self.plain_fn = None  # with rate buckets: the class's forward_plain, behind the buckets (set_buckets)
        # read_your_writes (router.py, HA with replica reads): until this monotonic time the session's
        # reads go to the primary, as it wrote there; the router sets it on each write
        self.ryw_until = 0.0
        # one channel: replies in order (HASession, ClusterSession: numbered, with what may hold them)
        self.outbox = Outbox(sock, hold=self.HOLD)
        if self.HOLD is not None:
            self.outbox.on_stuck = self._outbox_stuck
        if cfg.client_output_buffer_limit:
            self.outbox.limit = cfg.client_output_buffer_limit
            self.outbox.on_overflow = self.output_overflow
        if app.cmdstats.enabled:
            self.outbox.track = Track(app.cmdstats, self)
        if app.audit.on:  # the plain path records (audit.py; PROXY AUDIT ON/OFF puts it on or takes it off)
            self.outbox.track = AuditTrack(app.audit, self, self.outbox.track)
        self.intake: Waiter | None = None  # the greenlet parked in _intake
        self.reader = None  # the loop's read watcher on the client socket (see _intake)
        if app.gate is not None:  # users at the proxy: the default user, or nobody until AUTH
            app.gate.start(self)
        elif self.rate_bucket is not None:
            self.set_buckets()

    def reset(self) -> None:
        """The session state a new connection starts with: declared here for __init__, and set again
        by RESET (local.reset) once the session's leases and stream are given back. RESET then also
        switches the backend user back (users.switch) and, with proxy users, starts over (Gate.start)."""
        self.db, self.proto = 0, 2
        self.name = self.lib_name = self.lib_ver = b""
        self.no_evict = self.no_touch = False
        self.authed = not self.app.cfg.password
        self.cur = None  # channel holding this client's requests in flight
        self.lease: Lease | None = None  # MULTI / WATCH
        self.oneshot: Lease | None = None  # one blocking command
        self.stream: Stream | None = None
        self.tx = tx.IDLE  # transaction.TxState: WATCH / MULTI / a refused queued request / ending
        self.pin_slot: int | None = None  # cluster: the slot the transaction is bound to (transaction.bind_slot)

    @property
    def authed(self) -> bool:
        return not self.parser.auth_required

    @authed.setter
    def authed(self, value: bool) -> None:
        # the parser holds it: before AUTH it caps headers as the server does
        self.parser.auth_required = not value

    def cleanup(self) -> None:
        self.closing = True
        # What the client left unparsed goes now: a request cut short holds its bytes and its parsed
        # arguments (several times the query buffer's bytes in objects), and the session itself is
        # freed only by the cyclic GC (its outbox's Track refers back to it), which may not run for
        # long on a quiet proxy
        self.parser.buf, self.parser.args = bytearray(), []
        self.early, self.early_bytes = [], 0
        self.outbox.close()
        if self.reader is not None:
            self.reader.close()
        self.end_stream()
        self.drop_leases()
        if self.user is not None:
            switch(self, None)
        self.__dict__.pop("forward_plain", None)  # a bound method of its own (set_buckets): no cycle left
        self.app.clients.pop(self.id, None)
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- dispatch ----

    def dispatch(self, i: int, args: list, raw: bytes, batch: Batch, checked: bool = False) -> None:
        """One request of the batch path. checked: the proxy user's rights were checked already."""
        name = args[0].lower()
        self.last_cmd = name
        if not self.authed and name not in (b"auth", b"hello", b"quit", b"reset"):
            return self.refuse(batch, i, E.NOAUTH)
        if self.acl is not None and not checked and self.denied(i, name, args, batch):
            return
        if self.stream is not None:
            return self.stream_dispatch(i, name, args, raw, batch)
        if self.tx >= tx.QUEUED and name not in (b"exec", b"discard", b"quit", b"reset"):
            return self.in_transaction(i, name, args, raw, batch)
        table = self.app.commands
        arity, policy = table.lookup(name)
        if not C.arity_fits(arity, len(args)):
            return self.refuse(batch, i, E.wrong_arity(name.decode(errors="replace")))
        if policy is C.BY_ARGS:
            policy = table.policy(name, args)
        if policy is C.FORWARD:
            self.forward(i, raw, batch, name, args)
        elif policy is C.LOCAL:
            if self.user is not None and name in DRYRUN:  # a client's own user: the server's ACL first
                err = dryrun(self, args)
                if err is not None:
                    batch.replies[i] = err
                    return
            LOCAL[name](self, i, args, raw, batch)
        elif policy is C.PIN:
            self.pin(i, name, raw, batch)
        elif policy is C.BLOCK:
            self.block(i, raw, batch, wait=name in _WAITS, args=args)
        elif policy is C.STREAM:
            self.start_stream(i, "monitor" if name == b"monitor" else "sub", raw, batch)
        elif policy is C.SIDE:
            self.side(i, raw, batch)
        else:
            self.refuse(batch, i, E.refused(name.decode(), C.REFUSE_WHY.get(name, "unsafe")))

    def denied(self, i: int, name: bytes, args: list, batch: Batch) -> bool:
        """The proxy user may not run this request (gate.py): refused with the server's -NOPERM."""
        queued = self.tx >= tx.QUEUED and self.multi_select is not None  # it runs where the SELECT went
        err = self.acl.check(self, name, args, self.multi_select if queued else None)
        if err is None:
            return False
        self.app.stats.acl_denied += 1
        if self.tx >= tx.QUEUED and name not in (b"exec", b"discard", b"quit", b"reset"):
            self.refuse_queued(batch, i, err)
        else:
            self.refuse(batch, i, err)
        return True

    def proxy_auth(self, name: bytes, args: list) -> bool:
        """An AUTH (or HELLO ... AUTH) whose credentials vproxy checks itself (a proxy `password` or
        `users`): never sent to a server, so it cannot be queued in a transaction."""
        if not (self.app.cfg.password or self.app.gate is not None):
            return False
        return name == b"auth" or (name == b"hello" and any(a.lower() == b"auth" for a in args[2:]))

    def refuse(self, batch: Batch, i: int, msg: str) -> None:
        """vproxy answers request i with an error without sending it anywhere (a rejected call)."""
        batch.replies[i] = resp.error(msg)
        if batch.rejected is None:
            batch.rejected = set()
        batch.rejected.add(i)

    def key(self) -> tuple:
        """Which connections may carry this client's requests: (database, protocol, backend user)."""
        return (self.db, self.proto, self.user)

    def forward(self, i: int, raw: bytes, batch: Batch, name: bytes | None = None, args=None) -> None:
        """Run on the client's lease if it holds one, else on a shared channel the router picks.

        name: the command the router routes by (None: as a write, to the primary); args: the request's
        arguments (the cluster session finds its keys in them: every caller passes them)."""
        if tx.pinned(self):
            return self.submit(self.lease.channel, i, raw, batch)
        pool = None
        try:
            pool = self.app.router.pool_for(name, args, self)
            ch, key = self.cur, self.key()
            if ch is None or ch.closed or ch.exclusive or ch.pool is not pool or ch.key != key:
                self.settle()
                if self.closing:  # the client left while a pinned request waited: nothing more runs
                    return
                ch = self.cur = pool.channel(key)
        except BackendError as e:
            batch.unsent(i, resp.error(str(e)))
            if self.ha_sent is not None and pool is not None:  # HA: not sent; retried in settle
                self.ha_sent.append((i, raw, name, args, self.key(), pool))
            return
        ch.submit(raw, batch, i, deadline_after(self.app.cfg.command_timeout))
        if self.ha_sent is not None:
            self.ha_sent.append((i, raw, name, args, ch.key, pool))

    def submit(self, ch, i: int, raw: bytes, batch: Batch, timeout: bool = True) -> None:
        ch.submit(raw, batch, i, deadline_after(self.app.cfg.command_timeout) if timeout else 0.0)

    def db_arg(self, arg: bytes) -> int | None:
        """The database a forwarded SELECT switches to, None when the server will refuse it."""
        # a failed SELECT changes nothing; a bad db in the session would break its connects
        return db_index(arg, self.app.databases)[0]


class HASession(ClientSession):
    """A client in the HA modes (sentinel, replication): its plain requests go to the pool the router
    picks (the primary, or a replica for a read), numbered, so that a connection lost in a failover
    holds the outbox and the held requests are recovered as a batch's are (plain.py)."""

    forward_plain = PlainPath.forward_plain_ha
    _unstick = PlainPath.unstick_ha

    HOLD = ()  # the outbox holds only when a connection fails (its sent fact)

    def __init__(self, app, sock: socket.socket, addr):
        super().__init__(app, sock, addr)
        self.plain_chans: dict = {}  # pool -> this session's shared channel there

    # ---- one more try after a failover; see router.recover ----

    def _ha_recover(self, batch: Batch) -> None:
        """Requests whose backend connection failed run again where the router says, or get its error."""
        sent, self.ha_sent = self.ha_sent, []
        lost = batch.lost
        if not lost:
            return
        failed = [(*e, lost.pop(e[0])) for e in sent if e[0] in lost]  # (..., whether it was sent)
        if not failed:
            return
        timeout = self.app.cfg.command_timeout
        for i, raw, key, target in self.app.router.recover(failed, self):
            if isinstance(target, bytes):
                batch.replies[i] = target
                continue
            try:
                target.channel(key).submit(raw, batch, i, deadline_after(timeout))
            except BackendError as e:
                batch.replies[i] = resp.error(str(e))
        self.cur = None
        batch.wait()


if TWIN is not None:  # the compiled twin of forward_plain_ha (vproxy/_plain.pyx, chosen in outbox.py)
    HASession.forward_plain = TWIN.forward_plain_ha


class TLSClient:
    """Mixin of the session classes for TLS clients: no plain path. Its loop callbacks read and write
    the raw socket, which carries ciphertext (tls.py); the greenlet's gevent calls do TLS right."""

    tls = True

    def plain(self) -> bool:
        return False


_TLS_CLASSES: dict = {}


def tls_session(cls: type) -> type:
    """The TLS variant of a session class (ClientSession, HASession, ClusterSession)."""
    tls_cls = _TLS_CLASSES.get(cls)
    if tls_cls is None:
        tls_cls = _TLS_CLASSES[cls] = type(f"TLS{cls.__name__}", (TLSClient, cls), {})
    return tls_cls
