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
from .gatecmds import CLIENT_OWN
from .users import backend_auth

# Requests vproxy answers itself inside a stream too (Streams._stream_own)
_OWN_IN_STREAM = frozenset([b"auth", b"hello", b"config", b"acl", b"info", b"proxy", b"client"])
SUB_KINDS = {b"subscribe": 0, b"psubscribe": 0, b"unsubscribe": 0, b"punsubscribe": 0,
             b"ssubscribe": 1, b"sunsubscribe": 1}
SUBSCRIBES = frozenset([b"subscribe", b"psubscribe", b"ssubscribe"])  # of SUB_KINDS, those that subscribe
_PATTERN_KINDS = (b"psubscribe", b"punsubscribe")
_UNSUBS = (b"unsubscribe", b"punsubscribe", b"sunsubscribe")
# The request that ends a CLIENT REPLY OFF|SKIP or CLIENT TRACKING ON stream (then the pin is released).
_STREAM_ENDS = {"reply": (b"client", b"reply", b"on"), "tracking": (b"client", b"tracking", b"off")}


class Stream:
    """A leased connection whose every reply is pushed to the client as it comes."""

    __slots__ = ("answers", "counts", "kind", "lease", "multi", "n", "patterns", "skip", "swallow", "synced",
                 "token")

    def __init__(self, lease: Lease, kind: str, token: bytes):
        self.lease, self.kind, self.token = lease, kind, token
        self.answers: dict = {}  # a marker PING's payload -> vproxy's own answer it stands in for
        self.n = 0  # markers sent
        self.multi = 0  # 1: in a MULTI (RESP3); 2: one that queued an unsubscribe
        self.counts = [0, 0]  # subscriptions: channels+patterns, shard channels
        self.patterns = 0  # of counts[0], the patterns (CLIENT LIST shows sub and psub apart)
        self.skip = False  # a CLIENT REPLY SKIP stream: it ends after the one request whose reply is skipped
        self.swallow = False  # the +OK of a CLIENT REPLY ON vproxy sent itself (not the client's)
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
        if kind == "reply":
            # what runs while replies are off or skipped leaves state vproxy cannot see (a SUBSCRIBE
            # whose confirmation never came, a MONITOR ...): that connection is never reused
            lease.dirty = True
        lease.channel.sink = self.on_stream
        lease.channel.send_raw(raw)

    def stream_dispatch(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        st = self.stream
        if not st.skip:
            return self._stream_request(st, i, name, args, raw, batch)
        # CLIENT REPLY SKIP: the server skips the next request's reply, then answers as before; the
        # stream ends once that request has gone (and its replies before it are out), unless it was
        # CLIENT REPLY itself (OFF: replies stay off, the stream goes on; SKIP: the next one again)
        reply_mode = args[2].lower() if name == b"client" and len(args) == 3 and args[1].lower() == b"reply" else None
        if reply_mode == b"off":
            st.skip = False
        self._stream_request(st, i, name, args, raw, batch)
        if reply_mode is None and self.stream is st and not st.multi:
            if st.counts != [0, 0]:  # the skipped request subscribed: the client is in a subscription now
                st.kind, st.skip = "sub", False
            elif self.sync_stream(st):
                self.end_stream(clean=True)

    def _stream_request(self, st: Stream, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        if name in (b"quit", b"reset"):
            if st.kind != "reply":  # replies still in flight (a pipelined SUBSCRIBE's) go out first
                self.sync_stream(st)
            elif name == b"reset" and not st.skip and st.lease.channel is not None and not st.lease.channel.closed:
                # REPLY OFF: the requests sent must have run before the next ones go elsewhere, and a
                # sync PING gets no reply while replies are off: ON first (its +OK is not the client's)
                st.swallow = True
                st.lease.channel.send_raw(resp.encode_request([b"CLIENT", b"REPLY", b"ON"]))
                self.sync_stream(st)
            self.end_stream()
            LOCAL[name](self, i, args, raw, batch)
            if st.kind == "reply" and (name == b"quit" or st.skip):
                batch.replies[i] = None  # as the server: QUIT's reply is off or skipped, RESET's skipped
            return
        if name in _OWN_IN_STREAM and self._stream_own(st, i, name, args, raw, batch):
            return
        if st.kind == "reply" and name in SUBSCRIBES:
            # a subscription made while replies are off or skipped: the count the server would
            # confirm is not seen, so it counts as at least 1 (the stream becomes a subscription
            # when replies are on again, and ends with an unsubscribe that the server confirms at 0)
            kind = SUB_KINDS[name]
            st.counts[kind] = max(st.counts[kind], 1)
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
        ends = _STREAM_ENDS.get(st.kind) == tuple(a.lower() for a in args)
        if ends and st.kind == "reply" and self.proto == 2 and st.counts != [0, 0]:
            ends = False  # subscribed in RESP2: the server refuses CLIENT REPLY ON, replies stay off
        if (name in _UNSUBS and st.kind == "sub") or ends:
            if self.sync_stream(st) and st.counts == [0, 0]:
                self.end_stream(clean=True)
            elif st.kind == "reply" and st.counts != [0, 0]:
                st.kind = "sub"  # replies on again, subscribed meanwhile: a subscription now

    def _stream_own(self, st: Stream, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> bool:
        """What vproxy answers itself outside a stream, it answers inside one too: AUTH and HELLO
        ... AUTH while it is the gate (the credentials are its users', never sent on), CONFIG,
        ACL (proxy users), INFO and PROXY (its secrets hidden, its own view), and the CLIENT
        subcommands about the session (gatecmds.CLIENT_OWN: vproxy's client, not the stream's
        connection). The answer takes its place among the stream's replies (answer_in_stream).
        True when answered."""
        gated = bool(self.app.cfg.password) or self.app.gate is not None
        if name == b"client":  # the session's own: its id and name, not the stream connection's
            if st.multi or len(args) < 2 or args[1].lower() not in CLIENT_OWN:
                return False  # REPLY, TRACKING ...: the stream connection's; in MULTI queued (a known gap)
        elif name in (b"auth", b"hello"):
            if not gated or (name == b"hello" and not any(a.lower() == b"auth" for a in args[2:])):
                return False  # the backend's ACL (users.py), or a protocol switch: the stream's connection's
        elif self.app.commands.lookup(name)[1] is not C.LOCAL:
            return False  # ACL without proxy users: the server's own
        ch = st.lease.channel
        if ch is None or ch.closed:
            return False
        if st.multi:  # the server queues: unless vproxy is the gate, it runs them as before
            if not gated or name in (b"info", b"proxy") or \
                    (name == b"config" and (len(args) < 3 or args[1].lower() != b"get")):
                return False
            # a request the server refuses in its own words stands in for it: EXEC then aborts
            ch.send_raw(resp.encode_request([b"auth" if name == b"hello" else name]))
            return True
        if st.kind == "sub" and self.proto == 2:  # only (un)subscribe, PING, QUIT, RESET allowed there
            if name not in (b"auth", b"hello"):
                return False  # the server refuses them (CLIENT too) in its own words; nothing vproxy must keep back
            reply = resp.error(f"ERR Can't execute '{name.decode()}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE "
                               "/ PING / QUIT / RESET are allowed in this context")
        elif name == b"hello" and len(args) > 1 and resp.string2ll(args[1]) in (2, 3) \
                and resp.string2ll(args[1]) != self.proto:
            reply = resp.error("ERR vproxy: HELLO with AUTH switching the protocol inside a subscription or MONITOR "
                               "is not supported (the credentials are vproxy's, not the server's): send AUTH on its "
                               "own, or HELLO without AUTH")
        else:
            reply = self.own_answer(name, args, raw)
        batch.replies[i] = None
        self.answer_in_stream(st, reply)
        return True

    def own_answer(self, name: bytes, args: list, raw: bytes) -> bytes:
        """A LOCAL request answered as the batch path answers it (a backend round trip included, on
        a shared connection), post-processing applied: its reply."""
        one = Batch(1)
        post, self.post = self.post, []
        try:
            LOCAL[name](self, 0, args, raw, one)
            one.wait()
            reply = one.replies[0]
            for _, fn in self.post:
                reply = fn(reply)
        finally:
            self.post = post
        return reply

    def answer_in_stream(self, st: Stream, reply: bytes) -> None:
        """vproxy's own answer, written where the server's would be: a PING with a marker goes on
        the stream's connection, and its reply (none under CLIENT REPLY OFF, or a SKIP it meets)
        is replaced by the answer (on_stream)."""
        st.n += 1
        marker = b"%s:%d" % (st.token, st.n)
        st.answers[marker] = reply
        st.lease.channel.send_raw(resp.encode_request([b"PING", marker]))

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
            if st.swallow and f == b"+OK\r\n":
                st.swallow = False
                continue
            if st.token in f and (f[:1] == b"$" or f.startswith(b"*2\r\n$4\r\npong")):
                answer = st.answers.pop(f.rsplit(b"\r\n", 2)[-2], None) if st.answers else None
                if answer is not None:  # vproxy's own answer, in its place (answer_in_stream)
                    out.append(answer)
                else:
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
