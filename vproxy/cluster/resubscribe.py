"""Shard channels a node dropped, subscribed again where their slots live now (a mixin of ShardPubSub).

    the server's `sunsubscribe c` for a slot that moved away, or a killed node's connection lost
        -> schans[c] = None, lostfrom[c] = that node; the resubscriber greenlet starts (_kick)
    resubscriber: until every channel has a node again, or 2 * primary_wait has passed
        -> refresh the slot map, SSUBSCRIBE each lost channel at its slot's owner (a new one, or the
           same after primary_wait); the confirmation is hidden, a -MOVED/-ASK/-TRYAGAIN to it
           makes the channel lost again (_resub_failed)
        -> the stream's own connection lost with channels or patterns on it: SUBSCRIBE/PSUBSCRIBE
           them again on another primary (_resubscribe_main)
    given up -> the client gets the sunsubscribe replies it is owed (and, if its own connection is
                gone, the error a lost subscription gets)
"""

from __future__ import annotations

from time import monotonic

import gevent

from .. import errors as E
from .. import hostport
from .. import resp
from ..client import ClientSession
from ..errors import BackendError
from ..slots import key_slot


def dead(lease) -> bool:
    """The lease has no connection, or a closed one."""
    return lease is None or lease.channel is None or lease.channel.closed


class Resubscriber:
    """Re-subscribing what a node dropped; ShardPubSub (shard_pubsub.py) holds the state and connections."""

    def _kick(self) -> None:
        if self.resubber is None and self.s.stream is not None:
            self.resubber = gevent.spawn(self._resubscribe)

    def _resubscribe(self) -> None:
        """Send SSUBSCRIBE for the lost channels to their slots' new owners (primary_wait at most)."""
        s = self.s
        st = s.stream
        wait = max(s.app.cfg.primary_wait, 1.0)
        start = monotonic()
        delay = 0.02
        try:
            while s.stream is st and st is not None:
                lost = [c for c, a in self.schans.items() if a is None]
                if not lost and self.main_lost is None:
                    return
                late = monotonic() - start
                if late > 2 * wait:  # no owner to be found: the client gets the server's news after all
                    if self.main_lost is not None:
                        ClientSession.on_stream(s, None)  # "subscriptions ended, subscribe again"
                        return self.drop()
                    return self._give_up(st, lost)
                topo = s.app.router.topology
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
                    s.refresh()
                    gevent.sleep(delay)
                    delay = min(delay * 2, 0.2)
        finally:
            self.resubber = None
            if s.stream is st and st is not None and (self.main_lost is not None
                                                      or any(a is None for a in self.schans.values())):
                self._kick()

    def _resubscribe_main(self, st, topo, late: bool) -> None:
        """SUBSCRIBE/PSUBSCRIBE the stream's channels and patterns again, on a new connection to a
        primary (another than the lost node's, unless that one is all there is after primary_wait);
        the confirmations are hidden. Messages published in between are lost."""
        if dead(st.lease):
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
            lease.channel.sink = self.s.on_stream
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

    def _give_up(self, st, lost: list) -> None:
        out = [self._drop_locally(st, lost)]
        if dead(st.lease):
            out.append(resp.error(E.backend_unavailable(st.lease.pool.name, "connection lost; "
                                                        "subscriptions ended, subscribe again")))
        self.s.write(b"".join(out))

    def _resub_failed(self, addr, frame: bytes) -> None:
        chans = self.resub[addr].pop(0)
        for c in chans:
            if self.schans.get(c) == addr:
                self.schans[c] = None
                self.lostfrom.setdefault(c, addr)
        if frame.startswith(b"-MOVED ") and chans:
            parts = frame[1:].split()
            self.s.patch(int(parts[1]), hostport.parse_node(parts[2]))
        self._kick()
