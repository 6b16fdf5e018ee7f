"""Streams: a leased connection whose every reply is pushed to the client as it comes (pub/sub,
MONITOR, CLIENT TRACKING, CLIENT REPLY OFF|SKIP). A mixin of ClientSession (client.py); the cluster
session adds its shard channels and MONITOR on every primary (cluster/shard_pubsub.py).

Leaving a subscription is detected exactly: a `PING <token>` goes behind the last unsubscribe, and
the connection is given back when the PING's reply comes with the subscription count at 0.
"""

from __future__ import annotations

from gevent.event import Event

from . import commands as C
from . import errors as E
from . import resp
from . import transaction as tx
from .local import LOCAL
from .mux.channel import Batch
from .mux.lease import Lease
from .users import backend_auth

SUB_KINDS = {b"subscribe": 0, b"psubscribe": 0, b"unsubscribe": 0, b"punsubscribe": 0,
             b"ssubscribe": 1, b"sunsubscribe": 1}
_PATTERN_KINDS = (b"psubscribe", b"punsubscribe")
_UNSUBS = (b"unsubscribe", b"punsubscribe", b"sunsubscribe")
# The request that ends a CLIENT REPLY OFF|SKIP or CLIENT TRACKING ON stream (then the pin is released).
_STREAM_ENDS = {"reply": (b"client", b"reply", b"on"), "tracking": (b"client", b"tracking", b"off")}


class Stream:
    """A leased connection whose every reply is pushed to the client as it comes."""

    __slots__ = ("counts", "kind", "lease", "multi", "patterns", "synced", "token")

    def __init__(self, lease: Lease, kind: str, token: bytes):
        self.lease, self.kind, self.token = lease, kind, token
        self.multi = 0  # 1: in a MULTI (RESP3); 2: one that queued an unsubscribe
        self.counts = [0, 0]  # subscriptions: channels+patterns, shard channels
        self.patterns = 0  # of counts[0], the patterns (CLIENT LIST shows sub and psub apart)
        self.synced = Event()



class Streams:
    """The session's stream (`self.stream`, a Stream, or None): started, fed, synced and ended."""

    def start_stream(self, i: int, kind: str, raw: bytes, batch: Batch) -> None:
        if tx.pinned(self):
            batch.replies[i] = resp.error("ERR vproxy: end the WATCH (UNWATCH) before subscribing")
            return
        lease = self.new_lease(i, batch)
        if lease is None:
            return
        self.flush(batch, i)  # replies before this one go out first: the stream writes as soon as it reads
        self.stream = Stream(lease, kind, b"vproxy-sync-%d" % self.id)
        lease.channel.sink = self.on_stream
        lease.channel.send_raw(raw)

    def stream_dispatch(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        st = self.stream
        if name in (b"quit", b"reset"):
            if st.kind != "reply":  # replies still in flight (a pipelined SUBSCRIBE's) go out first
                self.sync_stream(st)
            self.end_stream()
            return LOCAL[name](self, i, args, raw, batch)
        if name in (b"auth", b"hello") and (self.app.cfg.password or self.app.gate is not None) \
                and not (st.kind == "sub" and self.proto == 2) and self._stream_gate(st, i, name, args, raw, batch):
            return
        if name in C.STATEFUL:
            st.lease.dirty = True
            if st.kind == "sub" and self.proto == 2:
                pass  # RESP2 pub/sub: the server refuses SELECT and HELLO
            elif name == b"select" and len(args) == 2 and self.db_arg(args[1]) is not None:
                self.db = self.db_arg(args[1])
            elif name == b"hello" and len(args) > 1 and args[1] in (b"2", b"3"):
                self.proto = int(args[1])
        ch = st.lease.channel
        if ch is None or ch.closed:
            batch.replies[i] = resp.error(E.backend_unavailable("", "stream connection lost"))
            return
        ch.send_raw(raw)
        if name == b"auth" and not st.multi and (self.proto == 3 or st.kind != "sub") and 2 <= len(args) <= 3 \
                and not self.app.cfg.password and self.app.gate is None:  # the stream's connection answers
            backend_auth(self, args[1] if len(args) == 3 else None, args[-1])
        if self._stream_multi(st, name):
            return
        if (name in _UNSUBS and st.kind == "sub") or _STREAM_ENDS.get(st.kind) == tuple(a.lower() for a in args):
            if self.sync_stream(st) and st.counts == [0, 0]:
                self.end_stream(clean=True)

    def _stream_gate(self, st: Stream, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> bool:
        """AUTH (or HELLO ... AUTH) in a stream the server lets it into (RESP3 pub/sub, MONITOR,
        TRACKING, REPLY OFF) while vproxy is the gate (proxy `users` or `password`): the credentials
        are vproxy's, never sent on; answered here, in its place among the stream's replies (after
        a sync), or not at all under CLIENT REPLY OFF. True when done (a HELLO without AUTH goes on)."""
        if name == b"hello" and not any(a.lower() == b"auth" for a in args[2:]):
            return False
        if st.multi or name == b"hello":
            err = "AUTH inside MULTI" if st.multi else "HELLO with AUTH inside a subscription or MONITOR"
            batch.replies[i] = resp.error(f"ERR vproxy: {err} is not supported (the credentials are vproxy's, "
                                          "not the server's): send AUTH on its own")
        else:
            LOCAL[name](self, i, args, raw, batch)
        if st.kind == "reply":  # CLIENT REPLY OFF: the server would not answer it either
            batch.replies[i] = None
            return True
        self.sync_stream(st)  # the stream's replies before this one are written first
        self.flush(batch, i)
        self.write(batch.replies[i])
        batch.replies[i] = None
        return True

    def _stream_multi(self, st: Stream, name: bytes) -> bool:
        """A MULTI inside a RESP3 subscription: the server queues what follows, so no sync PING may
        go in (it would join the transaction); an unsubscribe in it is looked at after EXEC.
        True when the request needs nothing more now."""
        if name == b"multi" and (self.proto == 3 or st.kind != "sub"):
            st.multi = 1
        elif st.multi and name in (b"exec", b"discard"):
            unsubscribed, st.multi = st.multi == 2 and name == b"exec", 0
            if unsubscribed and self.sync_stream(st) and st.counts == [0, 0]:
                self.end_stream(clean=True)
        elif st.multi and name in _UNSUBS:
            st.multi = 2
        return bool(st.multi) or name in (b"multi", b"exec", b"discard")

    def sync_stream(self, st: Stream, lease: Lease | None = None) -> bool:
        """A PING right behind the requests comes back after every reply before it: wait for it.

        lease: the stream connection to sync (default its own; cluster shard channels have more)."""
        ch = (lease or st.lease).channel
        if ch is None or ch.closed:
            return False
        st.synced.clear()
        ch.send_raw(resp.encode_request([b"PING", st.token]))
        return st.synced.wait(timeout=max(self.app.cfg.command_timeout, 1.0))

    def on_stream(self, frames) -> None:
        """Runs in the lease's reader greenlet: forward every reply, watch the subscription count."""
        st = self.stream
        if st is None:
            return
        if frames is None:  # the backend connection is gone
            self.stream = None
            st.lease.release(clean=False)
            st.synced.set()
            self.write(resp.error(E.backend_unavailable(st.lease.pool.name, "connection lost; "
                                                        "subscriptions ended, subscribe again")))
            return
        out = []
        for f in frames:
            if st.token in f and (f[:1] == b"$" or f.startswith(b"*2\r\n$4\r\npong")):
                st.synced.set()
                continue
            if st.kind == "monitor" and st.token in f:  # MONITOR showing that PING: ours, not the client's
                continue
            if f[:4] in (b"*3\r\n", b">3\r\n") and b"subscribe" in f[:24]:
                self._count_subscriptions(st, resp.decode(f))
            elif f[:1] == b"*" and b"subscribe\r\n" in f:  # an EXEC reply holding (un)subscribe replies
                for v in resp.decode(f):
                    self._count_subscriptions(st, v)
            out.append(f)
        if out:
            self.write(b"".join(out))

    @staticmethod
    def _count_subscriptions(st: Stream, v) -> None:
        """A (un)subscribe confirmation's count is the server's: keep it (others are ignored)."""
        kind = SUB_KINDS.get(v[0]) if isinstance(v, list) and len(v) == 3 else None
        if kind is not None and isinstance(v[2], int):
            if v[0] in _PATTERN_KINDS:  # the server's count is channels+patterns: the change is the patterns'
                st.patterns += v[2] - st.counts[kind]
            st.counts[kind] = v[2]

    def end_stream(self, clean: bool = False) -> None:
        st, self.stream = self.stream, None
        if st is not None:
            ch = st.lease.channel
            if ch is not None:
                ch.sink = None
            st.lease.release(clean=clean)
