"""A cluster session's subscribed stream across nodes: shard channels that follow slot moves, and MONITOR.

    stream (streams.Stream): its own connection (Stream.lease) + one per other node (sconns)
    SSUBSCRIBE c      -> the connection to owner(slot c) (opened if needed); replies in request order
    SUNSUBSCRIBE      -> each channel's node; a channel being re-subscribed is forgotten locally
    slot moved away   -> the server's `sunsubscribe c` hidden; c waits for the map to name a new
    / node killed        owner (primary_wait at most), then SSUBSCRIBE there (its reply hidden too)
    own connection    -> SUBSCRIBE/PSUBSCRIBE of the stream's channels and patterns again on another
    lost                 primary (confirmations hidden); shard channels there move with them
    MONITOR           -> one more connection per other primary, their lines merged as they come

Counts in ssubscribe/sunsubscribe replies are the client's shard channels on every node, as one
server would report. The session holds one ShardPubSub (`session.shards`) and hands it its stream.
"""

from __future__ import annotations

from time import monotonic

import gevent

from .. import resp
from ..client import ClientSession
from ..errors import BackendError
from ..mux.channel import Batch
from ..mux.lease import Lease
from ..slots import key_slot
from .resubscribe import Resubscriber, dead

_MAIN_KINDS = {b"subscribe": b"subscribe", b"unsubscribe": b"subscribe",
               b"psubscribe": b"psubscribe", b"punsubscribe": b"psubscribe"}


def ssubscribe(s, i, args, raw, batch):
    """SSUBSCRIBE outside a stream: the stream starts on a connection to the channels' slot owner."""
    slots = {key_slot(c) for c in args[1:]}
    if len(slots) > 1:
        batch.replies[i] = resp.error("CROSSSLOT Keys in request don't hash to the same slot")
        return
    s.lease_addr = s.app.router.topology.owner(slots.pop())
    try:
        ClientSession.dispatch(s, i, args, raw, batch, True)
    finally:
        s.lease_addr = None


class ShardPubSub(Resubscriber):
    """The shard-channel state of one cluster session's stream, and its connections to other nodes."""

    def __init__(self, session):
        self.s = session
        self._clear()

    def _clear(self) -> None:
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

    # ---- the client's requests on a pub/sub stream ----

    def dispatch(self, st, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        """A request of a client whose stream is a subscription (st.kind == "sub")."""
        s = self.s
        self._wait_main(st)
        if name == b"ssubscribe":
            return self._ssubscribe(st, i, args, raw, batch)
        if name == b"sunsubscribe":
            return self._sunsubscribe(st, i, args, raw, batch)
        self._promote(st)
        self._switch(st, st.lease)
        ClientSession.stream_dispatch(s, i, name, args, raw, batch)
        if s.stream is None:
            self.drop()

    def _promote(self, st) -> None:
        """PING and the like go to the stream's own connection: make it one that holds subscriptions
        (after a slot move the old node's may hold none: it would answer PING as unsubscribed)."""
        if st.counts[0] or not self.sconns or st.lease.pool.addr in self.schans.values():
            return
        old = st.lease
        _, st.lease = self.sconns.popitem()
        st.lease.channel.sink = self.s.on_stream
        if dead(old):
            old.release(clean=False)
        else:
            self.sconns[old.pool.addr] = old
            old.channel.sink = lambda frames, lease=old: self.on_frames(lease, frames)

    def _ssubscribe(self, st, i: int, args: list, raw: bytes, batch: Batch) -> None:
        slots = {key_slot(c) for c in args[1:]}
        if len(slots) > 1:
            batch.replies[i] = resp.error("CROSSSLOT Keys in request don't hash to the same slot")
            return
        slot = slots.pop()
        addr = self.s.app.router.topology.owner(slot)
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
        s = self.s
        names = args[1:] or list(self.schans)
        if not names:  # none subscribed: the server's own answer (channel nil, count 0)
            self._switch(st, st.lease)
            return ClientSession.stream_dispatch(s, i, b"sunsubscribe", args, raw, batch)
        groups: dict = {}
        local = []
        topo = s.app.router.topology
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
            s.sync_stream(st, self.slast)
        if local:
            s.write(self._drop_locally(st, local))
        if st.counts == [0, 0] and not self.schans:
            s.end_stream(clean=True)

    def _switch(self, st, lease) -> None:
        """Replies come in request order: the previous connection's replies first."""
        last = self.slast or st.lease
        if last is not None and last is not lease and last.channel is not None and not last.channel.closed:
            self.s.sync_stream(st, last)
        self.slast = lease

    def _wait_main(self, st) -> None:
        """The stream's own connection was lost with only shard channels on it: wait for its successor."""
        s = self.s
        deadline = monotonic() + max(s.app.cfg.primary_wait, 1.0)
        while s.stream is st and dead(st.lease) and self.resubber is not None and monotonic() < deadline:
            gevent.sleep(0.02)

    # ---- the stream's connections ----

    def _sconn(self, st, addr):
        """The stream's connection to node addr (opened if needed)."""
        if not dead(st.lease) and st.lease.pool.addr == addr:
            return st.lease
        lease = self.sconns.get(addr)
        if lease is not None and not dead(lease):
            return lease
        lease = self._stream_lease(addr)
        if dead(st.lease) and st.counts[0] == 0:  # it becomes the stream's own connection
            old, st.lease = st.lease, lease
            old.release(clean=False)
            lease.channel.sink = self.s.on_stream
        else:
            self.sconns[addr] = lease
            lease.channel.sink = lambda frames, lease=lease: self.on_frames(lease, frames)
        return lease

    def _stream_lease(self, addr) -> Lease:
        """A connection of the stream's own on node addr (never reused afterwards); BackendError if none."""
        s = self.s
        lease = Lease(s.app.router.pool(addr), s.key())
        lease.dirty = True
        return lease

    def monitor(self, st, raw: bytes) -> None:
        """MONITOR runs on the stream's own connection and on one more per other primary; their
        lines are merged as they come (each node's in its order). A node that cannot be reached, or
        whose connection is lost, just shows nothing; the stream ends with its own connection."""
        for addr in self.s.app.router.topology.primaries:
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
        if self.s.stream is None:
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
            ClientSession.on_stream(self.s, frames)

    # ---- what the servers push ----

    def on_frames(self, lease, frames) -> None:
        """Replies and messages from one of the stream's connections (None: it was lost)."""
        s = self.s
        st = s.stream
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
            ClientSession.on_stream(s, out)

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
        return head + resp.bulk(kind) + resp.value(c, self.s.proto) + resp.integer(len(self.schans))

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
            st.lease.channel.sink = self.s.on_stream
            old.release(clean=False)
        if self.slast is lease:
            self.slast = None
        st.synced.set()  # a sync waiting on it ends
        self.s.refresh()
        self._kick()

    def _drop_locally(self, st, names: list) -> bytes:
        """Forget shard channels no server holds for the client; the sunsubscribe replies it is owed."""
        head = b">3\r\n" if self.s.proto == 3 else b"*3\r\n"
        out = []
        for c in names:
            self.schans.pop(c, None)
            self.lostfrom.pop(c, None)
            out.append(head + resp.bulk(b"sunsubscribe") + resp.bulk(c) + resp.integer(len(self.schans)))
        st.counts[1] = len(self.schans)
        return b"".join(out)

    def drop(self) -> None:
        """The stream ended: the other nodes' connections closed, the state forgotten."""
        sconns, self.sconns = self.sconns, {}
        for lease in sconns.values():
            if lease.channel is not None:
                lease.channel.sink = None
            lease.release(clean=False)
        resubber = self.resubber
        self._clear()
        if resubber is not None and resubber is not gevent.getcurrent():
            resubber.kill(block=False)
