"""ClusterSession: a ClientSession whose requests are routed by key slot across a cluster's primaries.

    dispatch -> PRE[name]? (CLUSTER, INFO, KEYS, SCAN, DBSIZE, WAIT, MULTI/EXEC ...) -> fanout / txn
             -> ClientSession.dispatch -> forward(): key positions -> slot(s)
                  one slot   -> a Sub on that node's channel (one channel per node per session)
                  many slots -> split.SPLIT[name] (subs + merge), else a CROSSSLOT error
                  no keys    -> fanout.KEYLESS[name], else any primary
    settle -> wait -> every Sub, in send order: MOVED (patch the map, resend there), ASK (ASKING +
              resend), TRYAGAIN/CLUSTERDOWN/LOADING/connection failure (back off, refresh, resend)
              until primary_wait has passed -> merges -> ClientSession.settle

Order: a session has one channel per node, so requests on one key stay in order on one connection,
and resends go out in their original order after everything before them has answered.
"""

from __future__ import annotations

from time import monotonic

import gevent

from . import dbns, fanout, resp, split, txn
from .client import ClientSession
from .errors import BackendError
from .keyspec import CONTAINER_KEY, key_positions
from .mux.channel import Batch, deadline_after
from .mux.lease import Lease
from .slots import key_slot

ASKING = resp.encode_request([b"ASKING"])
READONLY = resp.encode_request([b"READONLY"])
_WAIT = (b"-TRYAGAIN", b"-CLUSTERDOWN", b"-LOADING", b"-MASTERDOWN", b"-READONLY")
_DOWN = b"-ERR vproxy: backend "
_NOT_SENT = txn.NOT_SENT  # a request that failed with one of these was never sent
_IDEMPOTENT = frozenset([b"set", b"hset", b"sadd", b"zadd", b"expire", b"pexpire", b"persist", b"mset"])


class Sub:
    """One request vproxy sends to a node: its reply lands in batch.replies[idx]."""

    __slots__ = ("batch", "block", "idx", "name", "raw", "slot")

    def __init__(self, batch, idx, raw, slot, name, block=False):
        self.batch, self.idx, self.raw, self.slot, self.name, self.block = batch, idx, raw, slot, name, block


class ClusterSession(ClientSession):
    """One client connection in cluster mode."""

    def __init__(self, app, sock, addr):
        super().__init__(app, sock, addr)
        self.inflight: list[Sub] = []
        self.ops: list = []  # (batch, idx, subs, merge)
        self.sb = Batch(0)  # replies of the subs that make up split and fan-out requests
        self.chans: dict = {}  # node address -> this session's channel there
        self.cur_args: list = []
        self.pin_slot: int | None = None  # the slot a WATCH/MULTI is bound to
        self.lease_addr = None  # where the next lease opens (SSUBSCRIBE)
        self.mq: list = []  # MULTI: keyless requests queued before the first key chose the node
        self.multi_failed = False
        self.reads = app.cfg.read_from != "primary"  # read-only commands may go to replicas
        self.rr = self.id
        self.ns: bytes | None = None  # emulated database: the key prefix of the selected db

    # ---- dispatch and routing ----

    def dispatch(self, i: int, args: list, raw: bytes, batch: Batch) -> None:
        name = args[0].lower()
        if self.ns is not None:
            args, raw, err = dbns.rewrite(self, name, args, raw, i)
            if err:
                batch.replies[i] = resp.error(err)
                return
        self.cur_args = args
        h = PRE.get(name)
        if h is not None and self.authed and self.stream is None and not (self.in_multi and name in IN_MULTI):
            cmd = self.app.commands.get(name)
            if cmd is not None and not cmd.arity_ok(len(args)):
                batch.replies[i] = resp.error(f"ERR wrong number of arguments for '{name.decode()}' command")
                return
            return h(self, i, args, raw, batch)
        super().dispatch(i, args, raw, batch)

    def slots_of(self, name: bytes, args: list) -> set | None:
        """The slots of a request's keys (empty: keyless); None when its keys cannot be known."""
        cmd = self.app.commands.get(name)
        one = _single_key(cmd, name)
        if one and one < len(args):  # the common case: one key at a fixed place
            return {key_slot(args[one])}
        pos = key_positions(cmd, name, args)
        if pos is None:  # the server knows; if it cannot say either, any node answers with its error
            keys = self.getkeys(args)
            return set() if keys is None else {key_slot(k) for k in keys}
        return {key_slot(args[p]) for p in pos}

    def forward(self, i: int, raw: bytes, batch: Batch, name: bytes | None = None, args=None) -> None:
        args = args if args is not None else self.cur_args
        name = args[0].lower()
        slots = self.slots_of(name, args)
        if self.lease is not None and not self.lease.ending:
            return self.on_lease(i, raw, batch, slots)
        if self.oneshot is not None:
            self.settle()  # a blocking command in flight answers first
        if slots is None:
            batch.replies[i] = resp.error(f"ERR vproxy: cannot tell the keys of '{name.decode()}'")
        elif len(slots) == 1:
            self.route(batch, i, raw, slots.pop(), name, self.reads)
        elif slots:
            h = split.SPLIT.get(name)
            if h is None:
                batch.replies[i] = resp.error(split.crossslot(name))
            else:
                h(self, i, args, batch)
        else:
            h = fanout.KEYLESS.get(name)
            if h is None:
                self.route(batch, i, raw, -1, name)
            else:
                h(self, i, args, raw, batch)

    def route(self, batch: Batch, i: int, raw: bytes, slot: int, name: bytes, reads: bool = False) -> None:
        sub = Sub(batch, i, raw, slot, name)
        self.inflight.append(sub)
        replica = self.replica_for(slot, name) if reads else None
        self.send(sub, replica, fresh=True, readonly=replica is not None)

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
        """Put a sub on the channel of `addr` (default: its slot's owner); a failure becomes its reply."""
        topo = self.app.router.topology
        if addr is None:
            addr = topo.owner(sub.slot) if sub.slot >= 0 else topo.primary
        if addr is None:
            sub.batch.replies[sub.idx] = resp.error(f"CLUSTERDOWN vproxy: slot {sub.slot} has no owner")
            return
        try:
            ch = self.node_lease(addr) if sub.block else self.channel_to(addr, fresh)
            if readonly and not getattr(ch, "readonly", False):
                ch.readonly = True  # a replica's connection: READONLY first, so it serves reads
                ch.submit(READONLY, None, 0, 0.0)
        except BackendError as e:
            sub.batch.replies[sub.idx] = resp.error(str(e))
            return
        if asking:  # ASKING, or another request that must run right before (SCRIPT LOAD)
            ch.submit(ASKING if asking is True else asking, None, 0, 0.0)
        ch.submit(sub.raw, sub.batch, sub.idx, 0.0 if sub.block else deadline_after(self.app.cfg.command_timeout))

    def channel_to(self, addr, fresh: bool = False):
        key = self.key()
        ch = self.chans.get(addr)
        if ch is not None and not ch.closed and ch.key == key:
            return ch
        if fresh and ch is not None and self.inflight[:-1]:
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
        if slots and (len(slots) > 1 or (self.pin_slot is not None and self.pin_slot not in slots)):
            batch.replies[i] = resp.error(txn.other_slot(self.pin_slot))
            return
        self.submit(self.lease.channel, i, raw, batch)

    def getkeys(self, args: list) -> list | None:
        """COMMAND GETKEYS, asked of a node, for a movable-keys command vproxy has no rule for."""
        frame = self.call([(-1, [b"COMMAND", b"GETKEYS", *args])])[0]
        value = resp.decode(frame)
        return value if isinstance(value, list) else None

    # ---- split and fan-out requests ----

    def op(self, batch: Batch, i: int, parts: list, merge, reads: bool = False) -> None:
        """Send parts [(slot, args)] now; at settle, batch.replies[i] = merge(their replies).

        reads: read-only parts may go to replicas (read_from); never for cursors (SCAN)."""
        self.ops.append((batch, i, self.subs(parts, reads and self.reads), merge))

    def subs(self, parts: list, reads: bool = False) -> list:
        out = []
        sb = self.sb
        for slot, args in parts:
            sub = Sub(sb, len(sb.replies), resp.encode_request(args), slot, args[0].lower())
            sb.replies.append(None)
            out.append(sub)
            self.inflight.append(sub)
            replica = self.replica_for(slot, sub.name) if reads else None
            self.send(sub, replica, fresh=True, readonly=replica is not None)
        return out

    def call(self, parts: list) -> list:
        """Run parts [(slot, args)] now, after everything before them; their final replies, in order."""
        self.settle()
        subs = self.subs(parts)
        self.finish()
        return [s.batch.replies[s.idx] for s in subs]

    # ---- settle: wait, follow redirections, retry, merge ----

    def settle(self) -> None:
        if self.inflight or self.ops:
            self.finish()
        super().settle()
        if self.lease is None and not self.in_multi:
            self.pin_slot = None

    def finish(self) -> None:
        deadline, delay, rounds = 0.0, 0.02, 0
        while True:
            self.wait_all()
            redo = [(s, f) for s in self.inflight if (f := s.batch.replies[s.idx]) is not None and f[:1] == b"-"
                    and self.retryable(s, f)]
            if not redo:
                break
            now = monotonic()
            deadline = deadline or now + max(self.app.cfg.primary_wait, 0.2)
            if now >= deadline:
                break
            rounds += 1
            if rounds > 3 or any(not f.startswith((b"-MOVED ", b"-ASK ")) for _, f in redo):
                self.refresh()
                gevent.sleep(delay)
                delay = min(delay * 2, 0.5)
            for s, f in redo:
                self.resend(s, f)
        self.inflight = []
        self.merge_ops()

    def wait_all(self) -> None:
        batch = self.batch
        if batch is not None and batch.left:
            if self.oneshot is not None or self.lease is not None:
                self._wait_watching_client(batch)
            else:
                batch.wait()
        self.sb.wait()

    def retryable(self, sub: Sub, frame: bytes) -> bool:
        if frame.startswith((b"-MOVED ", b"-ASK ")) or frame.startswith(_WAIT):
            return True
        if frame.startswith(b"-NOSCRIPT"):  # a node that never saw SCRIPT LOAD (new, promoted, flushed)
            return _script_of(sub) is not None
        if not frame.startswith(_DOWN) and b"has no owner" not in frame[:60]:
            return False
        if any(m in frame for m in _NOT_SENT):
            return True
        cmd = self.app.commands.get(sub.name)  # sent, then lost: resend only what may run twice
        return cmd is not None and ("readonly" in cmd.flags or sub.name in _IDEMPOTENT)

    def resend(self, sub: Sub, frame: bytes) -> None:
        if frame.startswith((b"-MOVED ", b"-ASK ")):
            parts = frame[1:].split()
            slot, addr = int(parts[1]), _addr(parts[2])
            if frame.startswith(b"-MOVED "):
                self.patch(slot, addr)
                return self.send(sub, addr)
            return self.send(sub, addr, asking=True)
        if frame.startswith(b"-NOSCRIPT"):
            return self.send(sub, asking=resp.encode_request([b"SCRIPT", b"LOAD", _script_of(sub)]))
        self.send(sub)

    def patch(self, slot: int, addr) -> None:
        router = self.app.router
        topo = router.topology
        if hasattr(topo, "moved") and topo.owner(slot) != addr:
            router.publish(topo.moved(slot, addr))
            self.refresh()

    def refresh(self) -> None:
        mon = self.app.monitor
        if mon is not None:
            mon.request_refresh()

    def merge_ops(self) -> None:
        ops, self.ops = self.ops, []
        if self.sb.replies:
            self.sb = Batch(0)
        for batch, i, subs, merge in ops:
            frames = [s.batch.replies[s.idx] for s in subs]
            err = next((f for f in frames if f is None or f[:1] == b"-"), None)
            if err is not None:
                batch.replies[i] = err or resp.error("ERR vproxy: a part of the request got no reply")
                continue
            try:
                batch.replies[i] = merge(frames)
            except Exception as e:  # a reply vproxy could not merge: an error, never half an answer
                batch.replies[i] = resp.error(f"ERR vproxy: cannot merge the nodes' replies ({e})")

    # ---- leases: MULTI/WATCH, blocking commands, SSUBSCRIBE ----

    def _new_lease(self, i: int, batch: Batch):
        self.settle()
        try:
            pool = self.app.router.pool(self.lease_addr) if self.lease_addr else self.app.router.primary()
            return Lease(pool, self.key())
        except BackendError as e:
            batch.replies[i] = resp.error(str(e))
            return None

    def block(self, i: int, raw: bytes, batch: Batch, dirty: bool = False, **kw) -> None:
        """A blocking command: its own connection on its key's node; redirections followed."""
        args = self.cur_args
        name = args[0].lower()
        slots = self.slots_of(name, args) if not dirty else set()
        if (self.lease is not None and not self.lease.ending) or dirty or not slots:
            if self.lease is not None and not self.lease.ending:
                return self.on_lease(i, raw, batch, slots)
            return super().block(i, raw, batch, dirty, **kw)
        if len(slots) > 1:
            batch.replies[i] = resp.error(split.crossslot(name))
            return
        self.settle()
        sub = Sub(batch, i, raw, slots.pop(), name, block=True)
        self.inflight.append(sub)
        self.send(sub)

    def in_transaction(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        txn.queue(self, i, name, args, raw, batch)

    def key(self) -> tuple[int, int]:
        return (self.db if getattr(self.app.router.topology, "databases", 1) > 1 else 0, self.proto)


def _script_of(sub: Sub) -> bytes | None:
    """The body of the script an EVALSHA names, if vproxy saw it loaded."""
    if sub.name not in (b"evalsha", b"evalsha_ro"):
        return None
    parts = sub.raw.split(b"\r\n", 5)
    return fanout.SCRIPTS.get(parts[4].lower()) if len(parts) > 5 else None


_SINGLE: dict = {}  # Command -> position of its only key (0: not a single-key command)


def _single_key(cmd, name: bytes) -> int:
    if cmd is None:
        return 0
    pos = _SINGLE.get(id(cmd))
    if pos is None or pos[0] is not cmd:
        ok = cmd.first_key > 0 and cmd.first_key == cmd.last_key and "movablekeys" not in cmd.flags \
            and name not in CONTAINER_KEY
        pos = _SINGLE[id(cmd)] = (cmd, cmd.first_key if ok else 0)
    return pos[1]


def _addr(text: bytes) -> tuple[str, int]:
    host, _, port = text.decode().rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port.split("@")[0])


# Requests the cluster session answers before (or instead of) the standalone dispatch.
PRE = {**fanout.PRE, **txn.PRE, b"select": dbns.select}
IN_MULTI = frozenset(PRE) - {b"exec", b"discard", b"reset", b"multi", b"select"}
