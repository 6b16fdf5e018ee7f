"""ClusterSession: a ClientSession whose requests are routed by key slot across a cluster's primaries.

    dispatch -> PRE[name]? (CLUSTER, INFO, KEYS, SCAN, DBSIZE, WAIT, MULTI/EXEC ...) -> keyless / transaction
             -> ClientSession.dispatch -> forward(): key positions -> slot(s)
                  one slot   -> a Sub on that node's channel (one channel per node per session)
                  many slots -> multikey.SPLIT[name] (subs + merge), else a CROSSSLOT error
                  no keys    -> keyless.KEYLESS[name], else any primary
    settle -> wait -> every Sub, in send order: MOVED (patch the map, resend there), ASK (ASKING +
              resend), TRYAGAIN/CLUSTERDOWN/LOADING/connection failure (back off, refresh, resend)
              until primary_wait has passed -> merges -> ClientSession.settle    (redirects.py)
    a subscribed stream -> shard channels on their slots' nodes, MONITOR on every primary (shard_pubsub.py)

Order: a session has one channel per node, so requests on one key stay in order on one connection,
and resends go out in their original order after everything before them has answered.
"""

from __future__ import annotations

from .. import resp
from .. import transaction as tx
from ..client import ClientSession
from ..errors import BackendError
from ..commands import CommandTable
from ..keyspec import key_positions
from ..mux.channel import Batch, deadline_after
from ..mux.lease import Lease
from ..outbox import TWIN
from ..slots import key_slot
from ..users import DRYRUN, dryrun
from . import keyless, multikey, namespaces, redirects, shard_pubsub, transaction
from .redirects import ASKING, Redirects, Sub

READONLY = resp.encode_request([b"READONLY"])


class ClusterSession(Redirects, ClientSession):
    """One client connection in cluster mode."""

    # plain one-key requests go out from the loop too (forward_plain); a reply that must not go out
    # as it is (a redirection, a lost connection) holds the outbox until drain()
    HOLD = redirects.HOLD

    def __init__(self, app, sock, addr):
        super().__init__(app, sock, addr)
        self.inflight: list[Sub] = []
        self.ops: list = []  # (batch, idx, subs, merge)
        self.sb = Batch(0)  # replies of the subs that make up split and fan-out requests
        self.chans: dict = {}  # node address -> this session's channel there
        self.lease_addr = None  # where the next lease opens (SSUBSCRIBE)
        self.reads = app.cfg.read_from != "primary"  # read-only commands may go to replicas
        self.rr = self.id
        self.shards = shard_pubsub.ShardPubSub(self)  # a stream's shard channels, other nodes' connections

    def reset(self) -> None:
        """ClientSession.reset, and the cluster's own session state (reset_cluster)."""
        super().reset()
        self.reset_cluster()

    def reset_cluster(self) -> None:
        """The cluster's session state as a new connection has it: no queued transaction, no bound
        slot, the first database. RESET forgets it first, before settling (transaction.forget)."""
        self.mq: list = []  # MULTI: keyless requests queued before the first key chose the node
        tx.forget_queued(self)  # RESET: its refusals and slot (ClientSession.reset declares both)
        self.ns: bytes | None = None  # emulated database: the key prefix of the selected db

    # ---- dispatch and routing ----

    def dispatch(self, i: int, args: list, raw: bytes, batch: Batch, checked: bool = False) -> None:
        name = args[0].lower()
        if self.acl is not None and self.authed and not checked:  # a proxy user's rights first (gate.py)
            if self.denied(i, name, args, batch):
                self.last_cmd = name
                return
            checked = True
        if self.ns is None and not self.reads and self.plain():
            # the common case in one place: a one-key command for the primary, whose channel this
            # session already holds (what dispatch -> forward -> route -> send would do, minus the calls)
            pos = self.app.commands.fast_key(name, len(args))
            if pos:
                slot = key_slot(args[pos])
                addr = self.app.router.topology.owner(slot)
                ch = self.chans.get(addr)
                if ch is not None and not ch.closed and ch.key == self.key():
                    self.last_cmd = name
                    sub = Sub(batch, i, raw, slot, name)
                    sub.addr = addr
                    self.inflight.append(sub)
                    ch.submit(raw, batch, i, deadline_after(self.app.cfg.command_timeout))
                    return
        if self.ns is not None:
            args, raw, err = namespaces.rewrite(self, name, args, raw, i)
            if err:
                batch.replies[i] = resp.error(err)
                return
        h = PRE.get(name)
        if h is not None and self.authed and self.stream is None and not (self.tx >= tx.QUEUED and name in IN_MULTI):
            cmd = self.app.commands.get(name)
            if cmd is not None and not cmd.arity_ok(len(args)):
                batch.replies[i] = resp.error(f"ERR wrong number of arguments for '{name.decode()}' command")
                return
            if self.user is not None and name in DRYRUN:  # a client's own user: the server's ACL first
                err = dryrun(self, args)
                if err is not None:
                    batch.replies[i] = err
                    return
            return h(self, i, args, raw, batch)
        super().dispatch(i, args, raw, batch, checked)

    # ---- plain requests from the loop (see ClientSession._intake and outbox.py) ----

    def forward_plain(self, reqs: list, wait: bool = True) -> int:
        """The leading run of plain one-key requests for nodes this session has a channel to, sent
        with the outbox as their target and a sequence number (outbox.py): a pipeline goes to every
        node at once and its replies are written in order. Returns how many were sent; the rest
        take the batch path."""
        box = self.outbox
        if self.ns is not None or self.reads or box.stuck:
            return 0
        table, key = self.app.commands, self.key()
        owners = self.app.router.topology.slot_owners
        deadline = None
        forwards = self.forwards if self.acl is not None else None  # a proxy user's limits (gate.py)
        self._track_read()
        for k, req in enumerate(reqs):
            args, raw = req
            name = args[0].lower()
            pos = table.fast_key(name, len(args))
            if not pos or (forwards is not None and not forwards(name, len(args))):
                return k
            slot = key_slot(args[pos])
            addr = owners[slot]
            ch = self.chans.get(addr)
            if ch is None or ch.closed or ch.key != key:
                return k  # the batch path opens it
            if not self._room(wait) or ch.closed:
                return k
            if deadline is None:
                deadline = deadline_after(self.app.cfg.command_timeout)
            self.last_cmd = name
            box.send(ch, req, (raw, slot, name, addr), deadline)
        return len(reqs)

    def slots_of(self, name: bytes, args: list) -> set | None:
        """The slots of a request's keys (empty: keyless); None when its keys cannot be known."""
        table = self.app.commands
        one = table.single_key(name)
        if one and one < len(args):  # the common case: one key at a fixed place
            return {key_slot(args[one])}
        pos = key_positions(table.get(name), name, args)
        if pos is None:  # the server knows; if it cannot say either, any node answers with its error
            keys = self.getkeys(args)
            return set() if keys is None else {key_slot(k) for k in keys}
        return {key_slot(args[p]) for p in pos}

    def forward(self, i: int, raw: bytes, batch: Batch, name: bytes | None = None, args=None) -> None:
        """Route by the slots of args' keys (name is read from args: after a namespace's rewrite)."""
        name = args[0].lower()
        slots = self.slots_of(name, args)
        if tx.pinned(self):
            return self.on_lease(i, raw, batch, slots)
        if self.oneshot is not None:
            self.settle()  # a blocking command in flight answers first
        if slots is None:
            batch.replies[i] = resp.error(f"ERR vproxy: cannot tell the keys of '{name.decode()}'")
        elif len(slots) == 1:
            self.route(batch, i, raw, slots.pop(), name, self.reads)
        elif slots:
            h = multikey.SPLIT.get(name)
            if h is None:
                batch.replies[i] = resp.error(multikey.crossslot(name))
            else:
                h(self, i, args, batch)
        else:
            h = keyless.KEYLESS.get(name)
            if h is None:
                self.route(batch, i, raw, -1, name)
            else:
                h(self, i, args, raw, batch)

    def route(self, batch: Batch, i: int, raw: bytes, slot: int, name: bytes, reads: bool = False) -> None:
        replica = self.replica_for(slot, name) if reads else None
        self.send(Sub(batch, i, raw, slot, name), replica, fresh=True, readonly=replica is not None)

    def replica_for(self, slot: int, name: bytes):
        """A replica of slot's shard for a read-only command (round robin), else None (the primary)."""
        cmd = self.app.commands.get(name)
        if cmd is None or "readonly" not in cmd.flags or slot < 0:
            return None
        shard = self.app.router.topology.shard_of(slot)
        if shard is None or not shard.replicas:
            return None
        self.rr += 1
        return shard.replicas[self.rr % len(shard.replicas)]

    def send(self, sub: Sub, addr=None, asking: bool | bytes = False, fresh: bool = False,
             readonly: bool = False) -> None:
        """Put a sub on the channel of `addr` (default: its slot's owner); a failure becomes its reply.

        fresh: a new sub, joining `inflight` (and, when it has no batch yet, the split batch `sb`) only
        once its channel is chosen: choosing may first settle everything before it (channel_to), and a
        sub that joined earlier would be settled (and forgotten) before it was even sent."""
        topo = self.app.router.topology
        if addr is None:
            addr = topo.owner(sub.slot) if sub.slot >= 0 else topo.primary
        ch, err = None, None
        if addr is None:
            err = f"CLUSTERDOWN vproxy: slot {sub.slot} has no owner"
        else:
            try:
                ch = self.node_lease(addr) if sub.block else self.channel_to(addr, fresh)
            except BackendError as e:
                err = str(e)
        sub.addr = addr
        if fresh:
            if sub.batch is None:
                sb = self.sb
                sub.batch, sub.idx = sb, len(sb.replies)
                sb.replies.append(None)
            self.inflight.append(sub)
        if err is not None:
            sub.batch.unsent(sub.idx, resp.error(err))
            return
        # every request gets the deadline (not just the client's): the janitor looks at the oldest one
        deadline = 0.0 if sub.block else deadline_after(self.app.cfg.command_timeout)
        if readonly and not getattr(ch, "readonly", False):
            ch.readonly = True  # a replica's connection: READONLY first, so it serves reads
            ch.submit(READONLY, None, 0, deadline)
        if asking:  # ASKING, or another request that must run right before (SCRIPT LOAD)
            ch.submit(ASKING if asking is True else asking, None, 0, deadline)
        ch.submit(sub.raw, sub.batch, sub.idx, deadline)

    def channel_to(self, addr, fresh: bool = False):
        key = self.key()
        ch = self.chans.get(addr)
        if ch is not None and not ch.closed and ch.key == key:
            return ch
        if fresh and ch is not None and self.inflight:
            self.settle()  # the old channel's requests answer (or are resent) before any newer one runs
            ch = self.chans.get(addr)
            if ch is not None and not ch.closed and ch.key == key:
                return ch
        ch = self.chans[addr] = self.app.router.pool(addr).channel(key)
        return ch

    def node_lease(self, addr):
        """The blocking command's own connection, on node addr."""
        one = self.oneshot
        if one is not None and one.channel is not None and not one.channel.closed and one.pool.addr == addr:
            return one.channel
        if one is not None:
            one.release(clean=False)
        self.oneshot = Lease(self.app.router.pool(addr), self.key())
        self.cur = self.oneshot.channel
        return self.cur

    def on_lease(self, i: int, raw: bytes, batch: Batch, slots) -> None:
        """WATCH holds a connection: keys of another slot than the watched one are refused."""
        pin = tx.slot(self)
        if slots and (len(slots) > 1 or (pin is not None and pin not in slots)):
            batch.replies[i] = resp.error(transaction.other_slot(pin))
            return
        self.submit(self.lease.channel, i, raw, batch)

    def getkeys(self, args: list) -> list | None:
        """COMMAND GETKEYS, asked of a node, for a movable-keys command vproxy has no rule for."""
        frame = self.call([(-1, [b"COMMAND", b"GETKEYS", *args])])[0]
        value = resp.decode(frame)
        return value if isinstance(value, list) else None

    # ---- leases: MULTI/WATCH, blocking commands, SSUBSCRIBE ----

    def new_lease(self, i: int, batch: Batch):
        self.settle()
        if self.closing:
            return None
        try:
            pool = self.app.router.pool(self.lease_addr) if self.lease_addr else self.app.router.primary()
            return Lease(pool, self.key())
        except BackendError as e:
            batch.replies[i] = resp.error(str(e))
            return None

    def block(self, i: int, raw: bytes, batch: Batch, dirty: bool = False, wait: bool = False,
              args: list | None = None) -> None:
        """A blocking command: its own connection on its key's node; redirections followed."""
        name = args[0].lower()
        slots = self.slots_of(name, args) if not dirty else set()
        if tx.pinned(self) or dirty or not slots:
            if tx.pinned(self):
                return self.on_lease(i, raw, batch, slots)
            return super().block(i, raw, batch, dirty, wait, args)
        if len(slots) > 1:
            batch.replies[i] = resp.error(multikey.crossslot(name))
            return
        self.settle()
        self.flush(batch, i)  # replies before it are in: the client gets them before it blocks
        sub = Sub(batch, i, raw, slots.pop(), name, block=True)
        self.inflight.append(sub)
        self.send(sub)

    def in_transaction(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        transaction.queue(self, i, name, args, raw, batch)

    def key(self) -> tuple:
        return (self.db if getattr(self.app.router.topology, "databases", 1) > 1 else 0, self.proto, self.user)

    # ---- streams: shard channels and MONITOR across nodes (shard_pubsub.py) ----

    def stream_dispatch(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        st = self.stream
        if name == b"reset":
            transaction.forget(self)  # and the stream ends, as the rest of RESET does below
        if st.kind != "sub":
            return super().stream_dispatch(i, name, args, raw, batch)
        self.shards.dispatch(st, i, name, args, raw, batch)

    def on_stream(self, frames) -> None:
        st = self.stream
        if st is None or st.kind != "sub":
            super().on_stream(frames)
            if frames is None and self.stream is None:
                self.shards.drop()  # MONITOR: the other nodes' connections end with it
            return
        self.shards.on_frames(st.lease, frames)

    def start_stream(self, i: int, kind: str, raw: bytes, batch: Batch) -> None:
        """MONITOR: every primary's commands (ShardPubSub.monitor)."""
        super().start_stream(i, kind, raw, batch)
        st = self.stream
        if kind != "monitor" or st is None:
            return
        self.shards.monitor(st, raw)

    def end_stream(self, clean: bool = False) -> None:
        super().end_stream(clean)
        self.shards.drop()

# Requests the cluster session answers before (or instead of) the standalone dispatch (app.py tells the
# command table: CommandTable.session_first, never fast keys).
PRE = {**keyless.PRE, **transaction.PRE, b"select": namespaces.select, b"ssubscribe": shard_pubsub.ssubscribe}
IN_MULTI = frozenset(PRE) - {b"exec", b"discard", b"reset", b"multi", b"select"}

if TWIN is not None:  # the compiled twin of forward_plain (vproxy/_plain.pyx, chosen in outbox.py)
    TWIN.bind(fast_key_of=CommandTable.fast_key)  # (table, name, nargs), on a miss of table.derived
    ClusterSession.forward_plain = TWIN.forward_plain_cluster
