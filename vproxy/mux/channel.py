"""A backend connection used through a queue: batched writes, one reader greenlet, FIFO replies.

    clients --submit(raw, batch, idx)--> outbuf --writer greenlet: one sendall per wake--> backend
    backend --reader greenlet: ReplyFramer--> frames --FIFO waiters--> batch.put(idx, frame)
                                                  \\--(stream mode) sink(frames) --> one client

A shared channel serves many clients of one (db, protocol); a leased channel serves one client.
When the connection fails or times out every waiter gets an error reply, never silence.
"""

from __future__ import annotations

from collections import deque
from time import monotonic

import gevent
from gevent.event import Event
from gevent.hub import Waiter

from .. import resp
from ..errors import BackendError, backend_timeout, backend_unavailable
from .backend import BackendConn


class Batch:
    """One client's replies in flight, in the client's order; filled by channels, awaited by the client.

    wait() parks the client greenlet on a gevent Waiter, woken by one hub callback when the last
    reply is in: about half the cost of an Event set/wait per round trip. `event` (created on first
    use) serves waits with a timeout."""

    __slots__ = ("replies", "left", "_event", "_waiter")

    def __init__(self, n: int):
        self.replies: list = [None] * n
        self.left = 0
        self._event: Event | None = None
        self._waiter: Waiter | None = None

    @property
    def event(self) -> Event:
        """Set when the last reply is in (for waits with a timeout; clear it after waking)."""
        ev = self._event
        if ev is None:
            ev = self._event = Event()
        return ev

    def put(self, idx: int, frame: bytes) -> None:
        self.replies[idx] = frame
        self.left -= 1
        if not self.left:
            self.done()

    def done(self) -> None:
        """Wake whoever waits: the last reply is in."""
        w = self._waiter
        if w is not None:
            self._waiter = None
            w.hub.loop.run_callback(w.switch, None)
        if self._event is not None:
            self._event.set()

    def wait(self) -> None:
        while self.left > 0:
            if self._waiter is not None:  # someone else waits already: share the event
                self.event.wait()
                self.event.clear()
                continue
            w = self._waiter = Waiter()
            try:
                w.get()
            finally:
                if self._waiter is w:
                    self._waiter = None


class Channel:
    """One backend connection with a write queue and FIFO reply matching."""

    def __init__(self, pool, key: tuple[int, int], exclusive: bool = False):
        self.pool, self.key, self.exclusive = pool, key, exclusive
        self.conn = BackendConn(pool.addr, db=key[0], proto=key[1])
        self.waiters: deque = deque()  # (batch, idx, deadline) in send order
        self.outbuf: list[bytes] = []
        self.wake = Event()
        self.closed = False
        self.ready = False
        self.sink = None  # stream mode: callable(frames) that takes every reply
        self.reader = None
        self.writer = gevent.spawn(self._run)

    def __repr__(self):
        return f"<Channel {self.conn.name} db={self.key[0]} resp{self.key[1]} waiters={len(self.waiters)}>"

    def submit(self, raw: bytes, batch: Batch | None, idx: int, deadline: float) -> None:
        """Queue one request; its reply goes to batch.put(idx, ...) (batch None: reply dropped)."""
        if self.closed:
            if batch is not None:
                batch.left += 1
                batch.put(idx, resp.error(backend_unavailable(self.conn.name, "connection closed")))
            return
        if batch is not None:
            batch.left += 1
        self.waiters.append((batch, idx, deadline))
        self.outbuf.append(raw)
        self.wake.set()

    def send_raw(self, raw: bytes) -> None:
        """Queue bytes whose replies nobody waits for through FIFO (stream mode)."""
        if not self.closed:
            self.outbuf.append(raw)
            self.wake.set()

    def _run(self) -> None:
        cfg = self.pool.cfg
        try:
            self.conn.connect(cfg.connect_timeout, cfg.backend_username, cfg.backend_password)
        except BackendError as e:
            if not self.closed:  # closed by vproxy mid-handshake: not the backend's failure
                self.pool.connect_failed(str(e))
            self.abort(backend_unavailable(self.conn.name, str(e)))
            return
        if self.closed:  # closed while the socket was being opened: abort() could not close it
            self.conn.close()
            return
        self.pool.connect_ok()
        self.ready = True
        self.reader = gevent.spawn(self._read)
        outbuf, wake = self.outbuf, self.wake
        while not self.closed:
            if not outbuf:
                wake.clear()
                if not outbuf:
                    wake.wait()
                continue
            data = b"".join(outbuf) if len(outbuf) > 1 else outbuf[0]
            outbuf.clear()
            try:
                self.conn.send(data)
            except (OSError, AttributeError):  # AttributeError: socket closed under us
                self.abort(backend_unavailable(self.conn.name, "connection lost while sending"))
                return

    def _read(self) -> None:
        waiters = self.waiters
        try:
            while True:
                frames = self.conn.read_frames()
                if not frames:
                    break
                if self.sink is not None:
                    self.sink(frames)
                    continue
                for frame in frames:
                    if not waiters:
                        raise BackendError("reply with no request waiting for it")
                    batch, idx, _ = waiters.popleft()
                    if batch is not None:  # batch.put(idx, frame), inlined: once per reply
                        batch.replies[idx] = frame
                        batch.left -= 1
                        if not batch.left:
                            batch.done()
        except (OSError, AttributeError, BackendError, ValueError) as e:
            why = e if isinstance(e, BackendError) else "connection lost"
            self.abort(backend_unavailable(self.conn.name, str(why)))
            return
        self.abort(backend_unavailable(self.conn.name, "connection closed by backend"))

    def expired(self, now: float) -> bool:
        """True when the oldest request has waited past its deadline."""
        return bool(self.waiters) and 0 < self.waiters[0][2] < now

    def extend(self, deadline: float) -> None:
        """Give every request with a deadline until at least `deadline` (its server is busy, not lost)."""
        waiters = self.waiters  # rotated in place: the reader holds this deque
        for _ in range(len(waiters)):
            batch, idx, d = waiters.popleft()
            waiters.append((batch, idx, max(d, deadline) if d else 0.0))

    def timeout(self) -> None:
        self.abort(backend_timeout(self.conn.name, self.pool.cfg.command_timeout))

    def abort(self, msg: str) -> None:
        """Close the connection and answer every waiter with an error (idempotent)."""
        if self.closed and not self.waiters:
            return
        self.closed = True
        self.conn.close()
        self.pool.forget(self)
        err = resp.error(msg)
        waiters, self.waiters = self.waiters, deque()
        while waiters:  # emptied, not just read: a reader still holding this deque finds nobody to answer
            batch, idx, _ = waiters.popleft()
            if batch is not None:
                batch.put(idx, err)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink(None)  # tells the stream's owner the connection is gone
        self.wake.set()
        if self.reader is not None and self.reader is not gevent.getcurrent():
            self.reader.kill(block=False)

    def close(self) -> None:
        self.abort(backend_unavailable(self.conn.name, "connection closed by vproxy"))


def deadline_after(seconds: float) -> float:
    return monotonic() + seconds if seconds > 0 else 0.0
