"""The plain path: a client's plain requests read, sent and answered from the event loop.

While a session holds no state a request must pass through (plain()), its greenlet parks in
_intake and the loop reads the client's socket itself (_on_readable): plain requests (forwarded
commands on the session's shared channel) are sent from there and their replies go out through
the outbox (outbox.py), so the greenlet is not woken at all. Requests that need it (local ones,
pinned state, a channel change, backpressure) are handed to it, with EOF and errors.

    client socket readable -> _on_readable (loop) -> parser -> forward_plain -> Channel.submit
    anything else -> _hand(...) -> the greenlet's run loop -> ClientSession.process (batch path)

ClusterSession overrides forward_plain (one-key requests, one node at a time) and drain (held
replies: redirections and failed connections).
"""

from __future__ import annotations

from time import monotonic

from gevent.hub import Waiter, get_hub, getcurrent

from .errors import BackendError
from .mux.channel import Batch, deadline_after
from .outbox import TWIN
from .transaction import QUEUED


STUCK = object()  # handed to a parked client greenlet: its outbox holds replies it must sort out


class PlainPath:
    """Mixin of ClientSession: the plain path (see the module docstring)."""

    def _intake(self):
        """Park until the loop hands over requests (a list), a ProtocolError, or None at EOF."""
        w = self.intake = Waiter()
        reader = self.reader
        if reader is None:
            reader = self.reader = get_hub().loop.io(self.sock.fileno(), 1)
        reader.start(self._on_readable)
        try:
            return w.get()
        finally:
            reader.stop()
            self.intake = None

    def _on_readable(self) -> None:
        """In the loop: read, parse, send the plain requests; hand the rest to the greenlet."""
        try:
            data = self.sock._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._hand(None)
        self.last_active = monotonic()
        try:
            reqs = self.parser.feed(data)
            if not reqs:
                return
            self.app.stats.commands += len(reqs)
            done = self.forward_plain(reqs, wait=False)
        except Exception as e:  # noqa: BLE001 - ProtocolError, or a bug: the greenlet says it or logs it
            return self._hand(e)
        if done < len(reqs):
            self._hand(reqs[done:] if done else reqs)

    def _outbox_stuck(self) -> None:
        """The outbox holds a reply: wake the greenlet if it is parked in _intake (else it finds
        out in drain(), where it waits anyway before it does anything else)."""
        if self.intake is None:
            return
        hub = self.outbox.hub
        if getcurrent() is hub:
            self._hand(STUCK)
        else:
            hub.loop.run_callback(lambda: self.intake is not None and self._hand(STUCK))

    def drain(self) -> None:
        """Wait until every plain request's reply is in and written (see outbox.py); held replies
        (hold mode: HA and cluster sessions) go through the batch path's recovery, then out in
        their order."""
        box = self.outbox
        while True:
            box.wait_idle()
            if not box.stuck or box.closed:
                return
            self._unstick()  # HASession: unstick_ha; ClusterSession: its own

    def unstick_ha(self) -> None:
        """HA: the held replies (a connection failed) become a batch whose failed requests the
        router sends again where it says (after a failover), as for any batch (_ha_recover)."""
        held = self.outbox.held_all()
        batch = self.batch = Batch(len(held))
        self.held_stats(batch, len(held))
        self.ha_sent = []
        for j, (frame, fact, (raw, name, key, pool)) in enumerate(held):
            batch.replies[j] = frame
            if fact is not None:
                batch.lost = batch.lost or {}
                batch.lost[j] = fact
            self.ha_sent.append((j, raw, name, None, key, pool))
        self.settle()
        self.flush(batch, len(held))

    def held_stats(self, batch: Batch, n: int) -> None:
        """The n held replies leave the plain path's statistics (outbox.track) for the batch's: the
        batch path records them when it writes them, timed from their read."""
        track = self.outbox.track
        if track is None:
            return
        dropped = track.drop(n)
        if len(dropped) == n and n:
            batch.reqs = [req for req, _ in dropped]
            batch.t0 = dropped[0][1]

    def forward_plain_ha(self, reqs: list, wait: bool = True) -> int:
        """forward_plain of the HA modes: each request on the pool the router picks (the primary, or
        a replica for a read), with a sequence number, so that a connection lost in a failover
        holds the line (outbox.py) and its requests are recovered as a batch's are."""
        box, router = self.outbox, self.app.router
        if box.stuck:
            return 0
        forwards = self.forwards
        key = self.key()
        chans = self.plain_chans
        deadline = None
        self._track_read()
        for k, req in enumerate(reqs):
            args, raw = req
            name = args[0].lower()
            if not forwards(name, len(args)):
                return k
            if router.topology.primary is None:
                return k  # a failover: the batch path waits for the new primary
            if not self._room(wait):
                return k
            try:
                pool = router.pool_for(name, args, self)
                ch = chans.get(pool)  # one channel per pool: requests to one server keep their order
                if ch is None or ch.closed or ch.key != key:
                    ch = chans[pool] = pool.channel(key)
            except BackendError:
                return k
            if deadline is None:
                deadline = deadline_after(self.app.cfg.command_timeout)
            self.last_cmd = name
            box.send(ch, req, (raw, name, key, pool), deadline)
        return len(reqs)

    def _track_read(self) -> None:
        """Statistics (cmdstats.py): the requests sent from now on (Outbox.send) were read now."""
        if self.outbox.track is not None:
            self.outbox.track.start(self.last_active)

    def _room(self, wait: bool) -> bool:
        """Backpressure: may one more plain request go out now? (At most a window in flight, and
        nothing the client has left unread.) With wait, the greenlet waits for the room."""
        box = self.outbox
        if box.left < self.window and not box.out:
            return True
        if not wait:
            return False
        self.drain()
        return not (self.closing or box.closed or box.stuck)

    def _hand(self, value) -> None:
        """Wake the greenlet parked in _intake with value (runs in the loop: switches directly)."""
        self.reader.stop()
        w, self.intake = self.intake, None
        if w is not None:
            w.switch(value)

    def plain(self) -> bool:
        """No state that a request must pass through: plain requests may take the fast path."""
        return self.authed and self.lease is None and self.oneshot is None and self.stream is None \
            and self.tx < QUEUED and not self.closing

    def forward_plain(self, reqs: list, wait: bool = True) -> int:
        """Send the leading run of plain forwarded requests on the client's shared channel; their
        replies go out through the outbox, from the loop. Returns how many requests were sent.
        wait False (in the loop, which must never block): stop where the greenlet would wait.

        Per request: one dict lookup for the name (CommandTable.plain_spec), the arity, the room,
        and two appends to the channel's queues (Channel.submit inlined: every request of the
        run shares one waiter entry); the channel's send is scheduled once per run (Channel.kick).
        vproxy/_plain.pyx is the compiled twin of this method."""
        box = self.outbox
        table = self.app.commands
        specs = table.plain_specs
        forwards = self.forwards
        default = self.acl is None  # else a proxy user's limits narrow what may go (gate.py)
        window = self.window
        ch = entry = waiters = outbuf = None
        track = box.track  # statistics (cmdstats.py): told of the requests sent, a run at a time,
        if track is not None:  # and always before this greenlet may wait (replies come meanwhile)
            track.start(self.last_active)
        told = k = 0
        name = None
        try:
            for args, raw in reqs:
                spec = specs.get(args[0]) or table.plain_spec(args[0])
                nargs = len(args)
                if default:
                    arity = spec[1]
                    if not spec[2] or (arity and (nargs != arity if arity > 0 else nargs < -arity)):
                        break
                elif not forwards(spec[0], nargs):
                    break
                if ch is None:  # the first plain request: its channel (none is opened for other requests)
                    ch = self._plain_channel(wait)  # nothing sent yet in this call: nothing to tell first
                    if ch is None:
                        break
                    entry = (box, -1, deadline_after(self.app.cfg.command_timeout))
                    waiters, outbuf = ch.waiters, ch.outbuf
                if box.left >= window or box.out:  # no room now (see _room): tell, send, then maybe wait
                    if track is not None and k > told:
                        track.add_many(reqs, told, k)
                        told = k
                    ch.kick()
                    if not self._room(wait):
                        break
                    window = self.window  # _room reads it afresh: the wait may have changed it
                if ch.closed:
                    break
                name = spec[0]
                waiters.append(entry)
                outbuf.append(raw)
                ch.unsent += 1
                box.left += 1
                k += 1
        finally:  # what was queued is sent and told, whatever happened
            if k:
                self.last_cmd = name
                ch.kick()
            if track is not None and k > told:
                track.add_many(reqs, told, k)
        return k

    def _plain_channel(self, wait: bool):
        """The shared channel plain requests go to (None: the general path answers the error, or
        must wait first)."""
        key = self.key()
        ch = self.cur
        try:
            pool = self.app.router.primary()
            if ch is None or ch.closed or ch.exclusive or ch.pool is not pool or ch.key != key:
                if not self.outbox.idle():
                    if not wait:
                        return None
                    self.drain()  # the old channel's replies first: FIFO holds per channel only
                ch = self.cur = pool.channel(key)
        except BackendError:
            return None
        return ch



if TWIN is not None:  # the compiled twins (vproxy/_plain.pyx, chosen in outbox.py)
    PlainPath._on_readable = TWIN.on_readable
    PlainPath.forward_plain = TWIN.forward_plain
