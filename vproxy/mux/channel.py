"""A backend connection used through a queue: batched writes, FIFO replies, errors never silence.

    clients --submit(raw, batch, idx)--> outbuf --loop callback: one send per loop iteration--> backend
    backend --reader (loop I/O callback, or greenlet when leased): ReplyFramer--> frames
            --FIFO waiters--> batch.replies[idx]; the batch's last reply wakes its client
                         \\--(stream mode) sink(frames) --> one client

A shared channel serves many clients of one (db, protocol); a leased channel serves one client.
When the connection fails or times out every waiter gets an error reply, and its batch records
whether that request was ever handed to the kernel (Batch.lost): retries read that fact.
"""

from __future__ import annotations

from collections import deque
from time import monotonic

import gevent
from gevent.event import Event
from gevent.hub import Waiter, get_hub
from loguru import logger

from .. import resp
from ..errors import BackendError, backend_timeout, backend_unavailable
from ..twins import twin
from .backend import AuthError, BackendConn, Credentials

# What Batch.lost says of a request whose connection failed: False, never sent (safe to send again);
# True, sent and the connection lost (the server may have run it); TIMED_OUT, sent and no reply
# within command_timeout (the server may have run it, and that node is stuck).
TIMED_OUT = 2


class Batch:
    """One client's replies in flight, in the client's order; filled by channels, awaited by the client.

    wait() parks the client greenlet on a gevent Waiter, switched to directly by a reader running in
    the loop, or by one loop callback otherwise. `event` (created on first use) serves waits with a
    timeout. `lost` maps the index of each request whose connection failed to whether it had been
    sent (True, or TIMED_OUT: the server may have run it) or never left vproxy (False: safe to
    send again)."""

    __slots__ = ("_event", "_waiter", "left", "lost", "rec_from", "rejected", "replies", "reqs", "t0")

    def __init__(self, n: int):
        self.replies: list = [None] * n
        self.left = 0
        self.lost: dict[int, bool] | None = None
        # statistics (the session's, cmdstats.py): the requests as read, when, which vproxy refused,
        # and how many replies are recorded already (an early flush records the first ones)
        self.reqs: list | None = None
        self.t0 = 0.0
        self.rejected: set | None = None
        self.rec_from = 0
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

    def fail(self, idx: int, frame: bytes, sent: bool) -> None:
        """The request's connection failed: its error reply, and whether it had been sent."""
        if self.lost is None:
            self.lost = {}
        self.lost[idx] = sent
        self.put(idx, frame)

    def unsent(self, idx: int, frame: bytes) -> None:
        """The request never reached a connection (no node, node down): its error, safe to retry."""
        if self.lost is None:
            self.lost = {}
        self.lost[idx] = False
        self.replies[idx] = frame

    def done(self, in_hub: bool = False) -> None:
        """Wake whoever waits: the last reply is in (in_hub: called from the loop greenlet itself)."""
        w = self._waiter
        if w is not None:
            self._waiter = None
            if in_hub:
                w.switch(None)
            else:
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
    """One backend connection with a write queue and FIFO reply matching.

    Shared channels do their I/O in the event loop itself: requests queued by any number of client
    greenlets in one loop iteration go out in one send from a loop callback, and replies are read
    by an I/O watcher's callback that wakes each waiting client directly. No greenlet of the
    channel's own sits between a client and the backend, so a round trip costs two greenlet
    switches instead of six. A send the kernel does not take whole, and the connect handshake, run
    in a short-lived greenlet. Leased channels read in a greenlet instead: their stream sink
    writes to its client and may block, which the loop itself must never do.
    """

    def __init__(self, pool, key: tuple[int, int], exclusive: bool = False):
        self.pool, self.key, self.exclusive = pool, key, exclusive
        self.conn = BackendConn(pool.addr, db=key[0], proto=key[1])
        self.waiters: deque = deque()  # (batch, idx, deadline) in send order
        self.outbuf: list[bytes] = []
        self.unsent = 0  # waiters at the tail whose request has not been handed to the kernel yet
        self.flushing = False  # a flush is scheduled, or a greenlet is draining a big send
        self.closed = False
        self.ready = False
        self.sink = None  # stream mode: callable(frames) that takes every reply
        self.reader = None  # the I/O watcher (shared) or reader greenlet (leased)
        self._loop = get_hub().loop
        self.writer = gevent.spawn(self._connect)  # then the greenlet draining a send, if any

    def __repr__(self):
        return f"<Channel {self.conn.name} db={self.key[0]} resp{self.key[1]} waiters={len(self.waiters)}>"

    def submit(self, raw: bytes, batch: Batch | None, idx: int, deadline: float) -> None:
        """Queue one request; its reply goes to batch.put(idx, ...) (batch None: reply dropped)."""
        if self.closed:
            if batch is not None:
                batch.left += 1
                batch.fail(idx, resp.error(backend_unavailable(self.conn.name, "connection closed")), False)
            return
        if batch is not None:
            batch.left += 1
        self.waiters.append((batch, idx, deadline))
        self.unsent += 1
        self.outbuf.append(raw)
        if not self.flushing and self.ready:
            self.flushing = True
            self._loop.run_callback(self._flush)

    def may_block(self) -> bool:
        """A request in flight has no deadline: a blocking command (BLPOP ... submitted without one)."""
        return any(not deadline for _, _, deadline in self.waiters)

    def kick(self) -> None:
        """What is queued (by callers that append to waiters and outbuf themselves, counting unsent)
        goes out from a loop callback, as submit() schedules it."""
        if not self.flushing and self.ready and self.outbuf:
            self.flushing = True
            self._loop.run_callback(self._flush)

    def send_raw(self, raw: bytes) -> None:
        """Queue bytes whose replies nobody waits for through FIFO (stream mode)."""
        if not self.closed:
            self.outbuf.append(raw)
            if not self.flushing and self.ready:
                self.flushing = True
                self._loop.run_callback(self._flush)

    # ---- writing ----

    def _flush(self) -> None:
        """Send everything queued in one non-blocking send; a remainder goes to a draining greenlet."""
        outbuf = self.outbuf
        if self.closed or not outbuf:
            self.flushing = False
            return
        data = b"".join(outbuf) if len(outbuf) > 1 else outbuf[0]
        outbuf.clear()
        self.unsent = 0  # from here on a failure leaves these requests' outcome unknown
        try:
            sent = self.conn.sock._sock.send(data)
        except BlockingIOError:
            sent = 0
        except (OSError, AttributeError):  # AttributeError: socket closed under us
            return self.abort(backend_unavailable(self.conn.name, "connection lost while sending"))
        if sent < len(data):
            self.writer = gevent.spawn(self._drain, data[sent:])
        else:
            self.flushing = False

    def _flush_tls(self) -> None:
        """_flush of a TLS connection: what is queued goes to a greenlet that sends it (sendall)."""
        outbuf = self.outbuf
        if self.closed or not outbuf:
            self.flushing = False
            return
        data = b"".join(outbuf)
        outbuf.clear()
        self.unsent = 0
        self.writer = gevent.spawn(self._drain, data)

    def _drain(self, rest: bytes) -> None:
        """The kernel's send buffer is full: wait until it takes the rest, and what queued since."""
        try:
            while rest:
                self.conn.sock.sendall(rest)
                rest = b"".join(self.outbuf)
                self.outbuf.clear()
                self.unsent = 0
        except (OSError, AttributeError):
            return self.abort(backend_unavailable(self.conn.name, "connection lost while sending"))
        self.flushing = False

    # ---- connecting ----

    def _connect(self) -> None:
        cfg = self.pool.cfg
        user = self.key[2] if len(self.key) > 2 else None
        try:
            if isinstance(user, Credentials):  # a client's own backend user (AUTH through vproxy)
                self.conn.connect(cfg.connect_timeout, user.user, user.password, cfg=cfg, client_user=True)
            else:
                self.conn.connect(cfg.connect_timeout, cfg.backend_username, cfg.backend_password, cfg=cfg)
        except AuthError as e:
            if isinstance(user, Credentials):  # that user's trouble (deleted, new password), not the node's:
                text = e.frame[1:-2].decode(errors="replace")  # the server's words
                self.pool.refuse(user, text)
                self.abort(text, False)
                return
            self._connect_failed(e)
            return
        except BackendError as e:
            self._connect_failed(e)
            return
        if self.closed:  # closed while the socket was being opened: abort() could not close it
            self.conn.close()
            return
        self.pool.connect_ok()
        self.ready = True
        if self.conn.tls:  # gevent's calls for TLS (tls.py): a reader greenlet, every send drained by one
            self._flush = self._flush_tls
            self.reader = gevent.spawn(self._read)
        elif self.exclusive:
            self.reader = gevent.spawn(self._read)
        else:
            self.reader = self._loop.io(self.conn.sock.fileno(), 1)
            self.reader.start(self._on_readable)
        if self.outbuf:
            self.flushing = True
            self._flush()

    def _connect_failed(self, e: BackendError) -> None:
        if not self.closed:  # closed by vproxy mid-handshake: not the backend's failure
            self.pool.connect_failed(str(e))
        self.abort(backend_unavailable(self.conn.name, str(e)))

    # ---- reading ----

    def _on_readable(self) -> None:
        """Shared channels: the loop says the socket is readable; read, frame, hand out replies."""
        try:
            data = self.conn.sock._sock.recv(262144)
            if not data:
                return self.abort(backend_unavailable(self.conn.name, "connection closed by backend"))
            frames = self.conn.framer.feed(data)
            if frames:
                self._deliver(frames, True)
        except BlockingIOError:
            pass
        except (OSError, AttributeError, BackendError, ValueError) as e:
            why = e if isinstance(e, BackendError) else "connection lost"
            self.abort(backend_unavailable(self.conn.name, str(why)))

    def _read(self) -> None:
        """Leased channels: a greenlet reads, so that a stream sink may block on its client."""
        try:
            while True:
                frames = self.conn.read_frames()
                if not frames:
                    break
                if self.sink is not None:
                    self.sink(frames)
                    continue
                self._deliver(frames, False)
                if self.closed:
                    return
        except (OSError, AttributeError, BackendError, ValueError) as e:
            why = e if isinstance(e, BackendError) else "connection lost"
            self.abort(backend_unavailable(self.conn.name, str(why)))
            return
        self.abort(backend_unavailable(self.conn.name, "connection closed by backend"))

    def _deliver(self, frames: list, in_hub: bool) -> None:
        """Match replies to waiters in FIFO order. A batch whose last reply is in wakes its client
        (from the loop directly: the client runs now, and the loop resumes here when it waits); an
        outbox (idx -1, see outbox.py) writes its client's replies once this read is handed out."""
        waiters = self.waiters
        boxes = []
        try:
            for frame in frames:
                if not waiters:
                    raise BackendError("reply with no request waiting for it")
                batch, idx, _ = waiters.popleft()
                if idx < 0:  # an outbox: in order (-1), or its reply number -2 - idx (outbox.py)
                    if idx == -1:
                        batch.pending.append(frame)
                    else:
                        batch.put(-2 - idx, frame)
                    batch.left -= 1
                    if not batch.touched:
                        batch.touched = True
                        boxes.append(batch)
                elif batch is not None:  # batch.put(idx, frame), inlined: once per reply
                    batch.replies[idx] = frame
                    batch.left -= 1
                    if not batch.left:
                        batch.done(in_hub)
                        if self.closed:  # the woken client closed this channel: the rest are answered
                            return
        finally:
            for box in boxes:
                if box.hold is None:  # one channel carries all its requests: this read is all there is
                    box.push()
                else:  # cluster/HA: other nodes' reads in this loop iteration may add replies
                    if not _touched:
                        self._loop.run_callback(_push_touched)
                    _touched.append(box)

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
        self.abort(backend_timeout(self.conn.name, self.pool.cfg.command_timeout), TIMED_OUT)

    def abort(self, msg: str, sent_fact=True) -> None:
        """Close the connection and answer every waiter with an error (idempotent), recording for
        each request whether it was ever sent (see Batch.lost): `sent_fact` for those that were."""
        if self.closed and not self.waiters:
            return
        self.closed = True
        reader, self.reader = self.reader, None
        if reader is not None and not isinstance(reader, gevent.Greenlet):
            reader.stop()
            reader.close()
        self.conn.close()
        self.pool.forget(self)
        err = resp.error(msg)
        waiters, self.waiters = self.waiters, deque()
        sent_count, self.unsent = len(waiters) - self.unsent, 0
        n = 0
        while waiters:  # emptied, not just read: a reader still holding this deque finds nobody to answer
            batch, idx, _ = waiters.popleft()
            if batch is not None:
                batch.fail(idx, err, sent_fact if n < sent_count else False)
            n += 1
        self.outbuf.clear()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink(None)  # tells the stream's owner the connection is gone
        if reader is not None and isinstance(reader, gevent.Greenlet) and reader is not gevent.getcurrent():
            reader.kill(block=False)

    def close(self) -> None:
        self.abort(backend_unavailable(self.conn.name, "connection closed by vproxy"))


# Outboxes in hold mode (numbered requests spread over several channels) whose replies came in during
# this loop iteration: pushed once, after every channel read of the iteration, so that a client whose
# pipeline went to three nodes gets one send, not three.
_touched: list = []


def _push_touched() -> None:
    boxes = _touched[:]
    _touched.clear()
    for box in boxes:
        try:
            box.push()
        except Exception:  # noqa: BLE001 - a bug: the other clients' replies still go out
            logger.exception("writing a client's replies failed")


def deadline_after(seconds: float) -> float:
    return monotonic() + seconds if seconds > 0 else 0.0


# The compiled twins of _deliver, _on_readable and _flush (vproxy/_plain.pyx) when it is built.
TWIN = twin("_plain")

if TWIN is not None:
    TWIN.bind(_touched, _push_touched, BackendError, backend_unavailable)
    Channel._deliver = TWIN.deliver
    Channel._on_readable = TWIN.channel_on_readable
    Channel._flush = TWIN.channel_flush
