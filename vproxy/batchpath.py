"""The client's loop and its batch path: what the plain path (plain.py) does not send from the
event loop is dispatched here in windows, settled, and written in order. A mixin of ClientSession
(client.py), which holds the session state and the dispatch.

    run: read (the plain path's _intake, else the socket) -> process: plain requests first
    (forward_plain), then windows of at most `window` requests: dispatch each, settle, flush
    -> flush: the window's replies post-processed, recorded, written (big ones in pieces)
"""

from __future__ import annotations

from time import monotonic

from loguru import logger

from . import resp
from .errors import ProtocolError
from .mux.channel import Batch
from .plain import STUCK
from .sockio import recv_ready, send_all

# Requests of one client in flight at once (setting max_pipeline): bounds the replies vproxy holds for one
# client (a client pipelining thousands of GETs of big values) and what it queues ahead of others on a
# shared connection.
WINDOW_BYTES = 4 << 20  # the reply bytes one window should hold: a window of big replies shrinks
WRITE_CHUNK = 256 << 10  # replies are joined into writes up to this size


class BatchPath:
    """run, process, flush and the writes to the client."""

    def run(self) -> None:
        try:
            while not self.closing:
                if self.early:  # bytes read while a pinned request waited (see _watch_client)
                    data, self.early, self.early_bytes = b"".join(self.early), [], 0
                elif self.plain():
                    got = self._intake()  # the loop reads and sends plain requests itself
                    if got is None:
                        break
                    if got is STUCK:
                        self.drain()
                    elif isinstance(got, BaseException):
                        raise got
                    else:
                        self.process(got)
                    continue
                else:
                    data = recv_ready(self.sock, 65536)
                    if not data:
                        break
                self.last_active = monotonic()
                reqs = self.parser.feed(data)
                if reqs:
                    self.app.stats.commands += len(reqs)
                    self.process(reqs)
            self.drain()  # a client that half-closed still gets the replies in flight
            self._stream_out()
        except ProtocolError as e:
            if e.requests:
                self.process(e.requests)
            self.drain()  # their replies first
            self._stream_out()
            self.write(resp.error(f"ERR Protocol error: {e}"))
        except OSError:
            pass  # the client's socket failed: nothing to tell it
        except Exception:  # a bug must cost one client, not the proxy, and must be seen
            logger.exception("client {} dropped by an unexpected error", self.id)
        finally:
            self.cleanup()

    def _stream_out(self) -> None:
        """Before the connection ends: a stream's replies in flight (a SUBSCRIBE's confirmation,
        MONITOR's +OK, sent just before a malformed request or the client's half-close) are written
        first, as the server writes them before its protocol error or its close (a sync PING comes
        back behind them). Not under CLIENT REPLY OFF: the PING would get no reply."""
        st = self.stream
        if st is not None and st.kind != "reply" and not self.closing:
            self.sync_stream(st)

    def process(self, reqs: list) -> None:
        """Run requests in windows: each window's replies are written before the next one is sent,
        so what vproxy holds for one client is bounded (a window shrinks when its replies are big),
        and a client that does not read its replies stops being read (its greenlet waits in send).
        Plain requests first take the fast path (see outbox.py) while they can."""
        if self.buckets:
            self.pace(len(reqs))
        if len(reqs) > self.max_window or self.outbox.left >= self.max_window:
            self._pipeline_limited()
        if self.plain():
            done = self.forward_plain(reqs)
            if done == len(reqs):
                return
            reqs = reqs[done:]
        if not self.outbox.idle() or self.outbox.stuck:
            self.drain()  # the plain requests' replies go out first
        start, n = 0, len(reqs)
        stats = self.app.cmdstats.enabled
        while start < n:
            size = self.window
            part = reqs if not start and n <= size else reqs[start:start + size]
            start += len(part)
            batch = self.batch = Batch(len(part))
            if stats:
                batch.reqs, batch.t0 = part, self.last_active
            if self.app.audit.on:
                self._dispatch_audited(part, batch)
            else:
                for i, (args, raw) in enumerate(part):
                    self.dispatch(i, args, raw, batch)
                    if self.closing:
                        break
            self.settle()
            self.flush(batch, len(part))
            if self.closing:
                break

    def flush(self, batch: Batch, upto: int) -> None:
        """Write the replies before index upto (all in: settled), post-processed, and forget them."""
        replies = batch.replies
        if self.post:
            keep = []
            for idx, fn in self.post:
                if idx < upto:
                    replies[idx] = fn(replies[idx])
                else:
                    keep.append((idx, fn))
            self.post[:] = keep
        if batch.reqs is not None and upto > batch.rec_from:
            self.app.cmdstats.record_batch(self, batch.reqs, replies, batch.rec_from, upto, batch.t0, batch.rejected)
            batch.rec_from = upto
        if self.audits:
            self._audit_replies(batch, upto)
        if upto == len(replies):
            out = [r for r in replies if r is not None]
        else:  # an early flush (a blocking command or a stream is next): these are written now
            out = [r for r in replies[:upto] if r is not None]
            replies[:upto] = [None] * upto
        limit = self.app.cfg.client_output_buffer_limit
        if limit and sum(map(len, out)) > limit:  # what the server's buffer would hold, unsent
            return self.output_overflow(sum(map(len, out)))
        if len(out) == 1:
            return self.write(out[0])
        size = sum(map(len, out))
        if size <= WRITE_CHUNK:
            if out:
                self.write(b"".join(out))
            if self.window < self.max_window:
                self.window = min(self.max_window, self.window * 2)
            return
        self.window = max(1, min(self.max_window, len(out) * WINDOW_BYTES // size))
        if upto == len(replies):
            batch.replies = [None] * upto  # the frames live in `out` alone: each is freed once written
        self._write_chunked(out)

    def _write_chunked(self, out: list) -> None:
        """Big replies: written in pieces of about WRITE_CHUNK, never copied into one huge buffer."""
        group: list = []
        size = 0
        for i, frame in enumerate(out):
            out[i] = None  # written frames are freed as the client takes them
            group.append(frame)
            size += len(frame)
            if size >= WRITE_CHUNK:
                self.write(group[0] if len(group) == 1 else b"".join(group))
                group, size = [], 0
        if group:
            self.write(b"".join(group))

    def write(self, data: bytes) -> None:
        with self.wlock:
            try:
                send_all(self.sock, data)
            except OSError:
                self.closing = True
