"""Outbox: a client's replies written from the event loop as they arrive, in order, with backpressure.

    client greenlet --submit(raw, outbox, -1)--> shared channel --reply--> outbox.take(frame)
    channel reader (in the loop), after each read --> outbox.push(): one send of what came in
    the socket full --> the rest waits in `out`, sent by a write watcher when the client reads again

The plain case of a request (a command forwarded on a shared connection, nothing to rewrite) needs
nothing of its client's greenlet once it is sent: the greenlet goes back to reading requests, and
the reply goes out from the loop. That saves a round trip through the client greenlet per request.
Anything else first waits until the outbox is idle (every reply in and written), so replies never
overtake each other; and the client greenlet stops reading while too much is unwritten or in flight.
"""

from __future__ import annotations

from gevent.hub import Waiter, get_hub, getcurrent

from .twins import twin


class Outbox:
    """The replies of one client's plain requests in flight (the `batch` a channel delivers to).

    Standalone, the requests in flight are on one channel (FIFO): replies come in order (idx -1).
    hold (cluster mode): requests go to several nodes at once, each with a sequence number (idx
    -2 - seq); replies are written in sequence order as the gaps fill. `hold` lists the error
    prefixes of replies that may not go out as they are (MOVED, ASK, TRYAGAIN ...): such a reply,
    or a failed connection, stops the writing. It and every reply after it are held, with what the
    session said of each request (`meta`), until the session has sorted them out (`stuck`;
    on_stuck() tells it; held_all() hands them over once every reply is in)."""

    __slots__ = (
        "closed",
        "held",
        "hold",
        "hub",
        "left",
        "limit",
        "meta",
        "next_seq",
        "on_overflow",
        "on_stuck",
        "out",
        "pending",
        "frames",
        "raw",
        "stuck",
        "touched",
        "track",
        "waiter",
        "watcher",
        "write_seq",
    )

    def __init__(self, sock, hold: tuple | None = None):
        self.raw = sock._sock  # the plain socket under gevent's: never blocks, never parks
        self.hold = hold
        # hold: a ring of the numbered requests not written yet, seq write_seq at index 0: each one's
        # reply (None until it is in; (error, sent fact) for a failed connection) and what the
        # session said of it
        self.frames: list = []
        self.meta: list = []
        self.next_seq = self.write_seq = 0  # hold: the next request's seq; the next one to write
        self.held: list = []  # (frame, sent fact or None, meta) from the first one held on
        self.stuck = False
        self.on_stuck = None
        self.limit = 0  # unsent reply bytes past which the client is dropped (client_output_buffer_limit)
        self.on_overflow = None  # called with the unsent size when that happens
        self.left = 0  # requests sent whose reply has not come back (channels count it up)
        self.pending: list[bytes] = []  # replies in, not yet handed to the socket
        self.out = b""  # bytes the socket did not take yet
        self.watcher = None  # write watcher while `out` waits
        self.waiter: Waiter | None = None  # the client greenlet waiting for idle()
        self.closed = False
        self.hub = get_hub()
        self.touched = False  # replies handed out by a read: push() follows (in hold mode, after the loop iteration)
        self.track = None  # cmdstats.Track while statistics are on: each request's name and read time

    def idle(self) -> bool:
        return not self.left and not self.out and not self.pending and not self.touched

    def take(self, frame: bytes) -> None:
        """A reply came (the channel calls push() once its read is handed out)."""
        self.pending.append(frame)
        self.left -= 1

    def fail(self, idx: int, frame: bytes, sent) -> None:
        """The request's connection failed: the error is its reply (as for a batch); with `hold`,
        whether it was sent goes with it (a failed connection always holds the line)."""
        if idx == -1:
            self.take(frame)
        else:
            self.put(-2 - idx, (frame, sent))
            self.left -= 1
        self.push()

    def put(self, seq: int, frame) -> None:
        """Hold mode: the reply of request seq is in (dropped when the client has left: close())."""
        pos = seq - self.write_seq
        if 0 <= pos < len(self.frames):
            self.frames[pos] = frame

    def meta_of(self, seq: int):
        """Hold mode: what the session said of request seq (not written yet)."""
        return self.meta[seq - self.write_seq]

    def push(self) -> None:
        """Write what came in: one send; what the socket does not take waits for the write watcher."""
        self.touched = False
        if self.hold is not None:
            self._sort()
        pending = self.pending
        if pending:
            if self.track is not None:
                self.track.written(pending)
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            if self.out:
                self.out += data
                if self.limit and len(self.out) > self.limit:
                    self._overflow()
            elif not self.closed:
                self._send(data)
        if self.waiter is not None and self.idle():
            self._wake()

    def _sort(self) -> None:
        """With `hold`: the replies whose turn has come go to `pending`, up to one that is held."""
        frames, meta, hold = self.frames, self.meta, self.hold
        i, n = 0, len(frames)
        newly = False
        while not self.stuck and i < n and frames[i] is not None:
            f, m = frames[i], meta[i]
            i += 1
            fact = None
            if type(f) is tuple:
                f, fact = f
            if fact is not None or (f[:1] == b"-" and f.startswith(hold)):
                self.stuck = newly = True
                self.held.append((f, fact, m))
            else:
                self.pending.append(f)
        if i:
            del frames[:i], meta[:i]
            self.write_seq += i
        if newly and self.on_stuck is not None:
            self.on_stuck()

    def send(self, ch, req: tuple, meta, deadline: float) -> None:
        """Hold mode: send request req ((args, raw) as parsed) on channel ch as the next numbered
        one, noted for the statistics (track); meta is what the session will need if its reply is held."""
        seq = self.next_seq
        self.next_seq = seq + 1
        self.meta.append(meta)
        self.frames.append(None)
        if self.track is not None:
            self.track.add(req)
        ch.submit(req[1], self, -2 - seq, deadline)

    def held_all(self) -> list:
        """Once every reply is in (left == 0): the held one and all after it, in order; the outbox
        is then empty and no longer stuck."""
        held, self.held = self.held, []
        for f, m in zip(self.frames, self.meta):
            held.append((*f, m) if type(f) is tuple else (f, None, m))
        self.frames.clear()
        self.meta.clear()
        self.write_seq = self.next_seq
        self.stuck = False
        return held

    def _send(self, data: bytes) -> None:
        try:
            n = self.raw.send(data)
        except BlockingIOError:
            n = 0
        except OSError:  # the client is gone: its greenlet sees that on its next read
            self.closed = True
            return
        if n < len(data):
            self.out = data[n:]
            if self.limit and len(self.out) > self.limit:
                return self._overflow()
            if self.watcher is None:
                self.watcher = self.hub.loop.io(self.raw.fileno(), 2)
            self.watcher.start(self._on_writable)

    def _overflow(self) -> None:
        """More unsent reply bytes than `limit`: the replies are dropped and on_overflow tells the
        session, which drops the client (as the server does past client-output-buffer-limit)."""
        size = len(self.out)
        self.close()
        if self.on_overflow is not None:
            self.on_overflow(size)

    def _on_writable(self) -> None:
        out, self.out = self.out, b""
        self.watcher.stop()
        if not self.closed:
            self._send(out)
        if self.waiter is not None and self.idle():
            self._wake()

    def _wake(self) -> None:
        w, self.waiter = self.waiter, None
        if getcurrent() is self.hub:
            w.switch(None)
        else:
            self.hub.loop.run_callback(w.switch, None)

    def wait_idle(self) -> None:
        """Park the client greenlet until every reply is in and written (or the client is gone)."""
        while not self.idle() and not self.closed:
            w = self.waiter = Waiter()
            try:
                w.get()
            finally:
                if self.waiter is w:
                    self.waiter = None

    def close(self) -> None:
        """The client left: replies still to come are dropped."""
        self.closed = True
        self.pending.clear()
        self.held.clear()
        self.frames.clear()
        self.meta.clear()
        self.out = b""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None


# ---- the compiled twin of the plain path (vproxy/_plain.pyx) when it is built, unless VPROXY_PURE=1 ----
# Its Outbox replaces the class above; plain.py and mux/channel.py take its forward_plain and
# deliver from TWIN (None: the pure-Python references run). IMPL says which.
PureOutbox = Outbox
TWIN = twin("_plain")
IMPL = "pure" if TWIN is None else "compiled"
if TWIN is not None:
    Outbox = TWIN.Outbox
