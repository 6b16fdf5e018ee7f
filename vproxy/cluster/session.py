"""ClusterSession: a ClientSession whose requests are routed by key slot across a cluster's primaries.

    dispatch -> PRE[name]? (CLUSTER, INFO, KEYS, SCAN, DBSIZE, WAIT, MULTI/EXEC ...) -> keyless / transaction
             -> ClientSession.dispatch -> forward(): key positions -> slot(s)
                  one slot   -> a Sub on that node's channel (one channel per node per session)
                  many slots -> multikey.SPLIT[name] (subs + merge), else a CROSSSLOT error
                  no keys    -> keyless.KEYLESS[name], else any primary
    settle -> wait -> every Sub, in send order: MOVED (patch the map, resend there), ASK (ASKING +
              resend), TRYAGAIN/CLUSTERDOWN/LOADING/connection failure (back off, refresh, resend)
              until primary_wait has passed -> merges -> ClientSession.settle

Order: a session has one channel per node, so requests on one key stay in order on one connection,
and resends go out in their original order after everything before them has answered.
"""

from __future__ import annotations

from time import monotonic

import gevent

from .. import commands as C
from .. import errors as E
from .. import resp
from ..client import ClientSession
from ..errors import BackendError
from ..keyspec import CONTAINER_KEY, key_positions
from ..mux import busy
from ..mux.channel import TIMED_OUT, Batch, deadline_after
from ..mux.lease import Lease
from ..outbox import TWIN
from ..slots import key_slot
from ..users import DRYRUN, dryrun
from . import keyless, multikey, namespaces, transaction

ASKING = resp.encode_request([b"ASKING"])
READONLY = resp.encode_request([b"READONLY"])
_WAIT = (b"-TRYAGAIN", b"-CLUSTERDOWN", b"-LOADING", b"-MASTERDOWN", b"-READONLY")
_HOLD = (b"-MOVED ", b"-ASK ", b"-NOSCRIPT", *_WAIT)  # replies the outbox holds for finish() to sort out
_IDEMPOTENT = frozenset([b"set", b"hset", b"sadd", b"zadd", b"expire", b"pexpire", b"persist", b"mset"])


class Sub:
    """One request vproxy sends to a node: its reply lands in batch.replies[idx]."""

    __slots__ = ("addr", "batch", "block", "idx", "name", "raw", "slot")

    def __init__(self, batch, idx, raw, slot, name, block=False):
        self.batch, self.idx, self.raw, self.slot, self.name, self.block = batch, idx, raw, slot, name, block
        self.addr = None  # the node it was last sent to


class ClusterSession(ClientSession):
    """One client connection in cluster mode."""

    # plain one-key requests go out from the loop too (forward_plain); a reply that must not go out
    # as it is (a redirection, a lost connection) holds the outbox until drain()
    HOLD = _HOLD

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
        # sharded pub/sub (see "shard channels" below)
        self.schans: dict = {}  # shard channel the client is subscribed to -> node address (None: re-subscribing)
        self.sconns: dict = {}  # node address -> Lease: shard channels on another node than the stream's own
        self.resub: dict = {}  # node address -> [channel groups] whose SSUBSCRIBE vproxy sent there (replies hidden)
        self.lostfrom: dict = {}  # channel -> the node that dropped it
        self.sunsub: dict = {}  # channel -> SUNSUBSCRIBE replies the client is owed
        self.slast = None  # the stream connection the client's last request went to
        self.resubber = None  # the greenlet re-subscribing lost shard channels (and the main stream's)
        self.pubsub = {b"subscribe": set(), b"psubscribe": set()}  # the stream's own channels, patterns
        self.main_lost = None  # the node whose loss took the stream's own connection (re-subscribing)
        self.hide = 0  # subscribe/psubscribe confirmations of vproxy's re-subscription still to hide

    # ---- dispatch and routing ----

    def dispatch(self, i: int, args: list, raw: bytes, batch: Batch, checked: bool = False) -> None:
        name = args[0].lower()
        if self.acl is not None and self.authed and not checked:  # a proxy user's rights first (gate.py)
            if self.denied(i, name, args, batch):
                self.last_cmd = name
                return
            checked = True
        if self.ns is None and self.authed and not self.reads and self.lease is None and self.oneshot is None \
                and self.stream is None and not self.in_multi:
            # the common case in one place: a one-key command for the primary, whose channel this
            # session already holds (what dispatch -> forward -> route -> send would do, minus the calls)
            pos = _fast_key(self.app.commands, name, len(args))
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
        self.cur_args = args
        h = PRE.get(name)
        if h is not None and self.authed and self.stream is None and not (self.in_multi and name in IN_MULTI):
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

    def audit_target(self, i: int, batch: Batch):
        """audit.py: the Sub of request i (its node once answered, after redirections), "*" when it was
        split over several nodes, else as a standalone session says."""
        for sub in reversed(self.inflight):
            if sub.batch is batch and sub.idx == i:
                return sub
        for op in self.ops:
            if op[0] is batch and op[1] == i:
                return "*"
        return super().audit_target(i, batch)

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
            pos = _fast_key(table, name, len(args))
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

    def _unstick(self) -> None:
        box = self.outbox
        held = box.held_all()
        batch = self.batch = Batch(len(held))
        self.held_stats(batch, len(held))
        audits = {e.idx: e for e in self.audits if e.batch is batch}  # held records (audit.AuditTrack.drop)
        for j, (frame, fact, (raw, slot, name, addr)) in enumerate(held):
            batch.replies[j] = frame
            if fact is not None:
                batch.lost = batch.lost or {}
                batch.lost[j] = fact
            sub = Sub(batch, j, raw, slot, name)
            sub.addr = addr
            self.inflight.append(sub)
            if j in audits:
                audits[j].target = sub  # the node that answers in the end (after MOVED/ASK)
        self.settle()
        self.flush(batch, len(held))

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
        if slots and (len(slots) > 1 or (self.pin_slot is not None and self.pin_slot not in slots)):
            batch.replies[i] = resp.error(transaction.other_slot(self.pin_slot))
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
        subs = self.subs(parts, reads and self.reads)  # first: it may settle (and merge) what came before
        self.ops.append((batch, i, subs, merge))

    def subs(self, parts: list, reads: bool = False) -> list:
        out = []
        for slot, args in parts:
            sub = Sub(None, 0, resp.encode_request(args), slot, args[0].lower())
            replica = self.replica_for(slot, sub.name) if reads else None
            self.send(sub, replica, fresh=True, readonly=replica is not None)
            out.append(sub)
        return out

    def sides_everywhere(self, batch: Batch, i: int, raw: bytes, merge) -> None:
        """SCRIPT KILL / FUNCTION KILL on every slot-owning primary right now (busy.kill: the node
        that runs the script answers nothing on the connections it already has); at settle,
        batch.replies[i] = merge(their replies, errors included). vproxy does not know which node
        runs a script (it may not have answered anyone yet), so every node is asked."""
        subs = []
        for addr in self.app.router.topology.primaries:
            sb = self.sb
            sub = Sub(sb, len(sb.replies), raw, -1, b"kill")
            sb.replies.append(None)
            subs.append(sub)
            busy.kill(addr, self.app.cfg, raw, sb, sub.idx, self.user)
        if not subs:
            batch.replies[i] = keyless.NO_MAP
            return
        self.ops.append((batch, i, subs, merge))

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
                if not self.stuck_here(s):
                    self.resend(s, f)
        self.inflight = []
        if self.ops or self.sb.replies:
            self.merge_ops()

    def wait_all(self) -> None:
        batch = self.batch
        if batch is not None and batch.left:
            self.wait_batch()
        if self.sb.left:
            self.sb.wait()

    def retryable(self, sub: Sub, frame: bytes) -> bool:
        """May this failed sub run again? Decided from facts: a redirection, or what its batch
        recorded when the connection failed (never sent: yes; sent: only if it may run twice)."""
        lost = sub.batch.lost
        sent = lost.get(sub.idx) if lost else None
        if frame.startswith((b"-MOVED ", b"-ASK ")) or frame.startswith(_WAIT):
            return True
        if frame.startswith(b"-NOSCRIPT"):  # a node that never saw SCRIPT LOAD (new, promoted, flushed)
            return _script_of(sub) is not None
        if sent is None:  # the server's own error reply
            return False
        if not sent:
            return True
        cmd = self.app.commands.get(sub.name)  # sent, then lost: resend only what may run twice
        return cmd is not None and ("readonly" in cmd.flags or sub.name in _IDEMPOTENT)

    def stuck_here(self, sub: Sub) -> bool:
        """The sub timed out on a node that still owns its slot: that node is stuck, and sending it
        there again would only wait once more. It waits (until the deadline) for a new owner, and
        if none comes the client gets the timeout, which says what happened."""
        lost = sub.batch.lost
        if not lost or lost.get(sub.idx) != TIMED_OUT:
            return False
        topo = self.app.router.topology
        return (topo.owner(sub.slot) if sub.slot >= 0 else topo.primary) == sub.addr

    def resend(self, sub: Sub, frame: bytes) -> None:
        lost = sub.batch.lost
        if lost:
            lost.pop(sub.idx, None)  # the new attempt records its own fact
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
            err = next((f for f in frames if f is None or (f[:1] == b"-" and merge not in keyless.TAKE_ERRORS)),
                       False)
            if err is not False:
                batch.replies[i] = err or resp.error("ERR vproxy: a part of the request got no reply")
                continue
            try:
                batch.replies[i] = merge(frames)
            except Exception as e:  # a reply vproxy could not merge: an error, never half an answer
                batch.replies[i] = resp.error(f"ERR vproxy: cannot merge the nodes' replies ({e})")

    # ---- leases: MULTI/WATCH, blocking commands, SSUBSCRIBE ----

    def _new_lease(self, i: int, batch: Batch):
        self.settle()
        if self.closing:
            return None
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


    # ---- shard channels: SSUBSCRIBE follows slot moves and failovers ----
    #
    # A subscribed client's stream has one connection (Stream.lease) plus one per other node its shard
    # channels live on (sconns). When a node stops owning a slot (CLUSTER SETSLOT ... NODE, or its
    # primary became a replica) the server sends `sunsubscribe <channel> <count>` for each of that
    # slot's channels; a killed node just closes the connection. vproxy hides both, waits until the
    # slot map names another owner (primary_wait at most), and sends SSUBSCRIBE there; that reply is
    # hidden too. Counts in ssubscribe/sunsubscribe replies are the client's shard channels on every
    # node, as one server would report.

    def stream_dispatch(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        st = self.stream
        if name == b"reset":
            transaction.forget(self)  # and the stream ends, as the rest of RESET does below
        if st.kind != "sub":
            return super().stream_dispatch(i, name, args, raw, batch)
        self._wait_main(st)
        if name == b"ssubscribe":
            return self._ssubscribe(st, i, args, raw, batch)
        if name == b"sunsubscribe":
            return self._sunsubscribe(st, i, args, raw, batch)
        self._promote(st)
        self._switch(st, st.lease)
        super().stream_dispatch(i, name, args, raw, batch)
        if self.stream is None:
            self._drop_shards()

    def _promote(self, st) -> None:
        """PING and the like go to the stream's own connection: make it one that holds subscriptions
        (after a slot move the old node's may hold none: it would answer PING as unsubscribed)."""
        if st.counts[0] or not self.sconns or st.lease.pool.addr in self.schans.values():
            return
        old = st.lease
        _, st.lease = self.sconns.popitem()
        st.lease.channel.sink = self.on_stream
        if _dead(old):
            old.release(clean=False)
        else:
            self.sconns[old.pool.addr] = old
            old.channel.sink = lambda frames, lease=old: self._on_shard_frames(lease, frames)

    def _ssubscribe(self, st, i: int, args: list, raw: bytes, batch: Batch) -> None:
        slots = {key_slot(c) for c in args[1:]}
        if len(slots) > 1:
            batch.replies[i] = resp.error("CROSSSLOT Keys in request don't hash to the same slot")
            return
        slot = slots.pop()
        addr = self.app.router.topology.owner(slot)
        if addr is None:
            batch.replies[i] = resp.error(f"CLUSTERDOWN vproxy: slot {slot} has no owner")
            return
        try:
            lease = self._sconn(st, addr)
        except BackendError as e:
            batch.replies[i] = resp.error(str(e))
            return
        self._switch(st, lease)
        lease.channel.send_raw(raw)

    def _sunsubscribe(self, st, i: int, args: list, raw: bytes, batch: Batch) -> None:
        names = args[1:] or list(self.schans)
        if not names:  # none subscribed: the server's own answer (channel nil, count 0)
            self._switch(st, st.lease)
            return super().stream_dispatch(i, b"sunsubscribe", args, raw, batch)
        groups: dict = {}
        local = []
        topo = self.app.router.topology
        for c in names:
            if c in self.schans:
                addr = self.schans[c]
                if addr is None:  # being re-subscribed: nothing to undo on a server
                    local.append(c)
                    continue
            else:
                addr = topo.owner(key_slot(c)) or st.lease.pool.addr
            groups.setdefault(addr, []).append(c)
        for addr, chans in groups.items():
            try:
                lease = self._sconn(st, addr)
            except BackendError:
                local += chans
                continue
            self._switch(st, lease)
            for c in chans:
                self.sunsub[c] = self.sunsub.get(c, 0) + 1
            lease.channel.send_raw(resp.encode_request([b"SUNSUBSCRIBE", *chans]))
        if self.slast is not None:
            self._sync_stream(st, self.slast)
        if local:
            self.write(self._drop_locally(st, local))
        if st.counts == [0, 0] and not self.schans:
            self._end_stream(clean=True)

    def _switch(self, st, lease) -> None:
        """Replies come in request order: the previous connection's replies first."""
        last = self.slast or st.lease
        if last is not None and last is not lease and last.channel is not None and not last.channel.closed:
            self._sync_stream(st, last)
        self.slast = lease

    def _wait_main(self, st) -> None:
        """The stream's own connection was lost with only shard channels on it: wait for its successor."""
        deadline = monotonic() + max(self.app.cfg.primary_wait, 1.0)
        while self.stream is st and _dead(st.lease) and self.resubber is not None and monotonic() < deadline:
            gevent.sleep(0.02)

    def _sconn(self, st, addr):
        """The stream's connection to node addr (opened if needed)."""
        if not _dead(st.lease) and st.lease.pool.addr == addr:
            return st.lease
        lease = self.sconns.get(addr)
        if lease is not None and not _dead(lease):
            return lease
        lease = self._stream_lease(addr)
        if _dead(st.lease) and st.counts[0] == 0:  # it becomes the stream's own connection
            old, st.lease = st.lease, lease
            old.release(clean=False)
            lease.channel.sink = self.on_stream
        else:
            self.sconns[addr] = lease
            lease.channel.sink = lambda frames, lease=lease: self._on_shard_frames(lease, frames)
        return lease

    def _stream_lease(self, addr) -> Lease:
        """A connection of the stream's own on node addr (never reused afterwards); BackendError if none."""
        lease = Lease(self.app.router.pool(addr), self.key())
        lease.dirty = True
        return lease

    def on_stream(self, frames) -> None:
        st = self.stream
        if st is None or st.kind != "sub":
            super().on_stream(frames)
            if frames is None and self.stream is None:
                self._drop_shards()  # MONITOR: the other nodes' connections end with it
            return
        self._on_shard_frames(st.lease, frames)

    # ---- MONITOR: every primary's commands ----

    def start_stream(self, i: int, kind: str, raw: bytes, batch: Batch) -> None:
        """MONITOR runs on the stream's own connection and on one more per other primary; their
        lines are merged as they come (each node's in its order). A node that cannot be reached, or
        whose connection is lost, just shows nothing; the stream ends with its own connection."""
        super().start_stream(i, kind, raw, batch)
        st = self.stream
        if kind != "monitor" or st is None:
            return
        for addr in self.app.router.topology.primaries:
            if addr == st.lease.pool.addr or addr in self.sconns:
                continue
            try:
                lease = self._stream_lease(addr)
            except BackendError:
                continue
            self.sconns[addr] = lease
            lease.channel.sink = lambda frames, lease=lease, ack=[True]: self._on_monitor_frames(lease, frames, ack)
            lease.channel.send_raw(raw)

    def _on_monitor_frames(self, lease, frames, ack: list) -> None:
        if self.stream is None:
            return
        if frames is None:
            if self.sconns.get(lease.pool.addr) is lease:
                del self.sconns[lease.pool.addr]
            lease.release(clean=False)
            return
        if ack[0]:  # this node's +OK to MONITOR: vproxy's, the client has its one +OK already
            ack[0] = False
            frames = frames[1:]
        if frames:
            ClientSession.on_stream(self, frames)

    def _on_shard_frames(self, lease, frames) -> None:
        st = self.stream
        if st is None:
            return
        if frames is None:
            return self._conn_lost(st, lease)
        addr = lease.pool.addr
        out = []
        for f in frames:
            if f[:1] == b"-" and self.resub.get(addr) and f.startswith((b"-MOVED ", b"-ASK ", b"-TRYAGAIN", b"-CLUSTERDOWN")):
                self._resub_failed(addr, f)  # the answer to vproxy's own SSUBSCRIBE
                continue
            if f[:4] in (b"*3\r\n", b">3\r\n") and b"subscribe" in f[:24]:
                v = resp.decode(f)
                if isinstance(v, list) and len(v) == 3 and v[0] in (b"ssubscribe", b"sunsubscribe"):
                    f = self._shard_reply(addr, v[0], v[1], f[:4])
                    if f is None:
                        continue
                elif isinstance(v, list) and len(v) == 3 and v[0] in _MAIN_KINDS and lease is st.lease:
                    if self.hide and v[0] in self.pubsub:  # the answer to vproxy's re-subscription
                        self.hide -= 1
                        continue
                    kind = _MAIN_KINDS[v[0]]
                    if kind == v[0]:
                        self.pubsub[kind].add(v[1])
                    else:
                        self.pubsub[kind].discard(v[1])
            out.append(f)
        if out:
            ClientSession.on_stream(self, out)

    def _shard_reply(self, addr, kind: bytes, c, head: bytes) -> bytes | None:
        """A server's ssubscribe/sunsubscribe: the client's count, or None to hide it."""
        if kind == b"ssubscribe":
            groups = self.resub.get(addr)
            if groups and c in groups[0]:  # vproxy's re-subscription
                groups[0].remove(c)
                if not groups[0]:
                    groups.pop(0)
                return None
            self.schans[c] = addr
        elif c is not None and self.sunsub.get(c):  # the client asked
            self.sunsub[c] -= 1
            if not self.sunsub[c]:
                del self.sunsub[c]
            self.schans.pop(c, None)
            self.lostfrom.pop(c, None)
        elif c is not None:  # the server dropped it: the slot moved away
            if self.schans.get(c) == addr and not any(c in g for g in self.resub.get(addr, ())):
                self.schans[c] = None
                self.lostfrom[c] = addr
                self._kick()
            return None
        return head + resp.bulk(kind) + resp.value(c, self.proto) + resp.integer(len(self.schans))

    def _resub_failed(self, addr, frame: bytes) -> None:
        chans = self.resub[addr].pop(0)
        for c in chans:
            if self.schans.get(c) == addr:
                self.schans[c] = None
                self.lostfrom.setdefault(c, addr)
        if frame.startswith(b"-MOVED ") and chans:
            parts = frame[1:].split()
            self.patch(int(parts[1]), _addr(parts[2]))
        self._kick()

    def _conn_lost(self, st, lease) -> None:
        addr = lease.pool.addr
        if lease is st.lease and st.counts[0] > 0:  # channels and patterns there too: subscribed again
            self.main_lost, self.hide = addr, 0  # elsewhere (_resubscribe); hidden replies die with it
        for c, a in self.schans.items():
            if a == addr:
                self.schans[c] = None
                self.lostfrom[c] = addr
        self.resub.pop(addr, None)
        if lease is not st.lease:
            if self.sconns.get(addr) is lease:
                del self.sconns[addr]
            lease.release(clean=False)
        elif self.sconns:  # another node's connection becomes the stream's own
            old, (_, st.lease) = st.lease, self.sconns.popitem()
            st.lease.channel.sink = self.on_stream
            old.release(clean=False)
        if self.slast is lease:
            self.slast = None
        st.synced.set()  # a sync waiting on it ends
        self.refresh()
        self._kick()

    def _kick(self) -> None:
        if self.resubber is None and self.stream is not None:
            self.resubber = gevent.spawn(self._resubscribe)

    def _resubscribe(self) -> None:
        """Send SSUBSCRIBE for the lost channels to their slots' new owners (primary_wait at most)."""
        st = self.stream
        wait = max(self.app.cfg.primary_wait, 1.0)
        start = monotonic()
        delay = 0.02
        try:
            while self.stream is st and st is not None:
                lost = [c for c, a in self.schans.items() if a is None]
                if not lost and self.main_lost is None:
                    return
                late = monotonic() - start
                if late > 2 * wait:  # no owner to be found: the client gets the server's news after all
                    if self.main_lost is not None:
                        ClientSession.on_stream(self, None)  # "subscriptions ended, subscribe again"
                        return self._drop_shards()
                    return self._give_up(st, lost)
                topo = self.app.router.topology
                if self.main_lost is not None:
                    self._resubscribe_main(st, topo, late > wait)
                groups: dict = {}
                for c in lost:
                    addr = topo.owner(key_slot(c))
                    if addr is not None and (addr != self.lostfrom.get(c) or late > wait):
                        groups.setdefault(addr, []).append(c)
                for addr, chans in groups.items():
                    try:
                        lease = self._sconn(st, addr)
                    except BackendError:
                        continue
                    for c in chans:
                        self.schans[c] = addr
                        self.lostfrom.pop(c, None)
                    self.resub.setdefault(addr, []).append(list(chans))
                    lease.channel.send_raw(resp.encode_request([b"SSUBSCRIBE", *chans]))
                if self.main_lost is not None or any(a is None for a in self.schans.values()):
                    self.refresh()
                    gevent.sleep(delay)
                    delay = min(delay * 2, 0.2)
        finally:
            self.resubber = None
            if self.stream is st and st is not None and (self.main_lost is not None
                                                         or any(a is None for a in self.schans.values())):
                self._kick()

    def _resubscribe_main(self, st, topo, late: bool) -> None:
        """SUBSCRIBE/PSUBSCRIBE the stream's channels and patterns again, on a new connection to a
        primary (another than the lost node's, unless that one is all there is after primary_wait);
        the confirmations are hidden. Messages published in between are lost."""
        if _dead(st.lease):
            addr = next((a for a in topo.primaries if a != self.main_lost), None)
            if addr is None and late:
                addr = topo.primary
            if addr is None:
                return
            try:
                lease = self._stream_lease(addr)
            except BackendError:
                return
            old, st.lease = st.lease, lease
            lease.channel.sink = self.on_stream
            if old is not None:
                old.release(clean=False)
        raw = b""
        for kind, names in self.pubsub.items():
            if names:
                raw += resp.encode_request([kind.upper(), *names])
                self.hide += len(names)
        self.main_lost = None
        if raw:
            st.lease.channel.send_raw(raw)

    def _drop_locally(self, st, names: list) -> bytes:
        """Forget shard channels no server holds for the client; the sunsubscribe replies it is owed."""
        head = b">3\r\n" if self.proto == 3 else b"*3\r\n"
        out = []
        for c in names:
            self.schans.pop(c, None)
            self.lostfrom.pop(c, None)
            out.append(head + resp.bulk(b"sunsubscribe") + resp.bulk(c) + resp.integer(len(self.schans)))
        st.counts[1] = len(self.schans)
        return b"".join(out)

    def _give_up(self, st, lost: list) -> None:
        out = [self._drop_locally(st, lost)]
        if _dead(st.lease):
            out.append(resp.error(E.backend_unavailable(st.lease.pool.name, "connection lost; "
                                                        "subscriptions ended, subscribe again")))
        self.write(b"".join(out))

    def _drop_shards(self) -> None:
        sconns, self.sconns = self.sconns, {}
        for lease in sconns.values():
            if lease.channel is not None:
                lease.channel.sink = None
            lease.release(clean=False)
        self.schans, self.resub, self.lostfrom, self.sunsub, self.slast = {}, {}, {}, {}, None
        self.pubsub, self.main_lost, self.hide = {b"subscribe": set(), b"psubscribe": set()}, None, 0
        if self.resubber is not None and self.resubber is not gevent.getcurrent():
            self.resubber.kill(block=False)
        self.resubber = None

    def _end_stream(self, clean: bool = False) -> None:
        super()._end_stream(clean)
        self._drop_shards()


_MAIN_KINDS = {b"subscribe": b"subscribe", b"unsubscribe": b"subscribe",
               b"psubscribe": b"psubscribe", b"punsubscribe": b"psubscribe"}


def _dead(lease) -> bool:
    return lease is None or lease.channel is None or lease.channel.closed


def _script_of(sub: Sub) -> bytes | None:
    """The body of the script an EVALSHA names, if vproxy saw it loaded."""
    if sub.name not in (b"evalsha", b"evalsha_ro"):
        return None
    parts = sub.raw.split(b"\r\n", 5)
    return keyless.SCRIPTS.get(parts[4].lower()) if len(parts) > 5 else None


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


def _fast_key(table, name: bytes, nargs: int) -> int:
    """The key position of a plain one-key command (forwarded, right arity, nothing special in
    cluster mode) with nargs arguments; 0 when dispatch must take the long way."""
    spec = table.derived.get(name)
    if spec is None:
        cmd = table.get(name)
        arity, policy = table.lookup(name)
        pos = _single_key(cmd, name) if policy is C.FORWARD and name not in PRE else 0
        spec = (pos, arity)
        if cmd is not None or len(table.derived) < C.NAME_CACHE:
            table.derived[name] = spec
    pos, arity = spec
    if not pos or pos >= nargs or (nargs != arity if arity > 0 else nargs < -arity):
        return 0
    return pos


def _addr(text: bytes) -> tuple[str, int]:
    host, _, port = text.decode().rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port.split("@")[0])


# Requests the cluster session answers before (or instead of) the standalone dispatch.
PRE = {**keyless.PRE, **transaction.PRE, b"select": namespaces.select}
IN_MULTI = frozenset(PRE) - {b"exec", b"discard", b"reset", b"multi", b"select"}

if TWIN is not None:  # the compiled twin of forward_plain (vproxy/_plain.pyx, chosen in outbox.py)
    TWIN.bind(fast_key_of=_fast_key)
    ClusterSession.forward_plain = TWIN.forward_plain_cluster
