"""ClientSession: one client connection's loop and the session state vproxy tracks for it.

    recv -> RequestParser -> for each request, in order:
        local handler (PING, SELECT, HELLO, CLIENT ...)      -> reply now
        shared channel of (db, protocol)                      -> reply later, FIFO
        lease (MULTI/WATCH, one blocking command)             -> reply later, FIFO, own connection
        stream (pub/sub, MONITOR, TRACKING, REPLY OFF)        -> replies pushed by the lease's reader
    -> wait for the batch -> one send of every reply, in request order

Order rule: a client's requests in flight are on one channel at a time; switching channel waits
for the earlier replies first (settle), so a later write can never overtake an earlier read.
"""

from __future__ import annotations

import socket
from itertools import count
from time import monotonic, time

import gevent
from gevent.event import Event
from gevent.hub import Waiter, get_hub
from gevent.lock import Semaphore
from loguru import logger

from . import commands as C
from . import errors as E
from . import hostport, resp
from .errors import BackendError, ProtocolError
from .local import LOCAL, db_index
from .mux import busy
from .mux.channel import Batch, deadline_after
from .mux.lease import Lease
from .cmdstats import Track
from .outbox import TWIN, Outbox
from .audit import Audited, AuditTrack
from .limits import Bucket
from .plain import STUCK, PlainPath
from . import transaction as tx
from .sockio import recv_nowait, recv_ready, send_all
from .users import DRYRUN, backend_auth, dryrun, switch

_ids = count(1)


def first_id(n: int) -> None:
    """Number the clients from n on (workers: ids unique across the processes of one supervisor)."""
    global _ids
    _ids = count(n)

_SUB_KINDS = {b"subscribe": 0, b"psubscribe": 0, b"unsubscribe": 0, b"punsubscribe": 0,
              b"ssubscribe": 1, b"sunsubscribe": 1}
_PATTERN_KINDS = (b"psubscribe", b"punsubscribe")
_WAITS = (b"wait", b"waitaof")
_WAIT_MARK = resp.encode_request([b"PUBLISH", b"__vproxy__:wait", b""])
_UNSUBS = (b"unsubscribe", b"punsubscribe", b"sunsubscribe")
# The request that ends a CLIENT REPLY OFF|SKIP or CLIENT TRACKING ON stream (then the pin is released).
_STREAM_ENDS = {"reply": (b"client", b"reply", b"on"), "tracking": (b"client", b"tracking", b"off")}
# Requests of one client in flight at once (setting max_pipeline): bounds the replies vproxy holds for one
# client (a client pipelining thousands of GETs of big values) and what it queues ahead of others on a
# shared connection.
WINDOW_BYTES = 4 << 20  # the reply bytes one window should hold: a window of big replies shrinks
WRITE_CHUNK = 256 << 10  # replies are joined into writes up to this size
# AUTH inside MULTI when vproxy checks the credentials itself (a proxy password or users): refused
AUTH_IN_MULTI = "ERR vproxy: AUTH inside MULTI is not supported when vproxy checks the passwords; AUTH before MULTI"


class Stream:
    """A leased connection whose every reply is pushed to the client as it comes."""

    __slots__ = ("counts", "kind", "lease", "multi", "patterns", "synced", "token")

    def __init__(self, lease: Lease, kind: str, token: bytes):
        self.lease, self.kind, self.token = lease, kind, token
        self.multi = 0  # 1: in a MULTI (RESP3); 2: one that queued an unsubscribe
        self.counts = [0, 0]  # subscriptions: channels+patterns, shard channels
        self.patterns = 0  # of counts[0], the patterns (CLIENT LIST shows sub and psub apart)
        self.synced = Event()


class ClientSession(PlainPath, Audited):
    """One client connection (runs in its own greenlet)."""

    HOLD: tuple | None = None  # the outbox's hold mode (outbox.py): none, replies come in order
    peer = False  # a fleet peer's question (fleet.py), not a client: CLIENT LIST leaves it out
    tls = False  # TLSClient: True

    def __init__(self, app, sock: socket.socket, addr):
        # What RESET keeps is declared here: the connection (id, socket, times), its backend user,
        # what it holds in flight, its limits and statistics. What RESET resets: reset(), below.
        self.app, self.sock, self.addr = app, sock, addr
        cfg = app.cfg
        self.id = next(_ids)
        self.created = time()
        self.last_active = monotonic()
        self.last_cmd = b"NULL"
        self.parser = resp.RequestParser(cfg.proto_max_bulk_len, max_buffer=cfg.client_query_buffer_limit)
        # Credentials of the backend user this client authenticated as (users.py); RESET switches it
        # back with users.switch, which counts each user's sessions
        self.user = None
        self.reset()  # the session state a new connection has, and RESET restores
        self.multi_select: int | None = None  # SELECT queued in MULTI: the session's db after EXEC
        self.multi_proto: int | None = None  # HELLO queued in MULTI: the session's protocol after EXEC
        self.multi_auth: tuple | None = None  # AUTH queued in MULTI (backend users): the user after EXEC
        self.post: list = []  # (idx, fn): rewrite a reply once it is in
        self.audits: list = []  # audit.Entry of the recorded requests whose replies are not written yet
        self.closing = False
        self.wlock = Semaphore()
        self.ha_sent: list | None = [] if app.router.ha else None  # HA: see _ha_recover
        self.batch: Batch | None = None
        self.early: list[bytes] = []  # bytes read while waiting on a pinned connection
        self.early_bytes = 0
        self.max_window = self.window = cfg.max_pipeline  # requests in flight at once (see process)
        # (name, nargs) -> may the plain path send it as it is (commands.CommandTable.forwards; a
        # session whose user limits what it may run narrows it: what it refuses takes the batch path)
        self.forwards = app.commands.forwards
        self.proxy_user = self.acl = None  # gate.py: the proxy user, and the same when it has limits
        self.rate_bucket = Bucket(cfg.client_rate_limit, cfg.client_rate_burst or cfg.client_rate_limit) \
            if cfg.client_rate_limit else None
        self.buckets: tuple = ()  # limits.py: the buckets each read batch takes from
        self.paid = False  # the requests handed from the loop were paid for there (see pace)
        self.plain_fn = None  # with rate buckets: the class's forward_plain, behind the buckets (set_buckets)
        # read_your_writes (router.py, HA with replica reads): until this monotonic time the session's
        # reads go to the primary, as it wrote there; the router sets it on each write
        self.ryw_until = 0.0
        # one channel: replies in order (HASession, ClusterSession: numbered, with what may hold them)
        self.outbox = Outbox(sock, hold=self.HOLD)
        if self.HOLD is not None:
            self.outbox.on_stuck = self._outbox_stuck
        if cfg.client_output_buffer_limit:
            self.outbox.limit = cfg.client_output_buffer_limit
            self.outbox.on_overflow = self.output_overflow
        if app.cmdstats.enabled:
            self.outbox.track = Track(app.cmdstats, self)
        if app.audit.on:  # the plain path records (audit.py; PROXY AUDIT ON/OFF puts it on or takes it off)
            self.outbox.track = AuditTrack(app.audit, self, self.outbox.track)
        self.intake: Waiter | None = None  # the greenlet parked in _intake
        self.reader = None  # the loop's read watcher on the client socket (see _intake)
        if app.gate is not None:  # users at the proxy: the default user, or nobody until AUTH
            app.gate.start(self)
        elif self.rate_bucket is not None:
            self.set_buckets()

    def reset(self) -> None:
        """The session state a new connection starts with: declared here for __init__, and set again
        by RESET (local.reset) once the session's leases and stream are given back. RESET then also
        switches the backend user back (users.switch) and, with proxy users, starts over (Gate.start)."""
        self.db, self.proto = 0, 2
        self.name = self.lib_name = self.lib_ver = b""
        self.no_evict = self.no_touch = False
        self.authed = not self.app.cfg.password
        self.cur = None  # channel holding this client's requests in flight
        self.lease: Lease | None = None  # MULTI / WATCH
        self.oneshot: Lease | None = None  # one blocking command
        self.stream: Stream | None = None
        self.tx = tx.IDLE  # transaction.TxState: WATCH / MULTI / a refused queued request

    @property
    def authed(self) -> bool:
        return not self.parser.auth_required

    @authed.setter
    def authed(self, value: bool) -> None:
        # the parser holds it: before AUTH it caps headers as the server does
        self.parser.auth_required = not value

    # ---- the loop ----

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
        except ProtocolError as e:
            if e.requests:
                self.process(e.requests)
            self.drain()  # their replies first
            self.write(resp.error(f"ERR Protocol error: {e}"))
        except OSError:
            pass  # the client's socket failed: nothing to tell it
        except Exception:  # a bug must cost one client, not the proxy, and must be seen
            logger.exception("client {} dropped by an unexpected error", self.id)
        finally:
            self.cleanup()

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

    # ---- limits: request rate (limits.py) and pipeline depth ----

    def set_buckets(self) -> None:
        """The rate buckets this session takes from: its own (client_rate_limit), its user's (rate=N);
        with any, the plain path's forward_plain (its class's) runs behind _forward_plain_paced."""
        user = self.proxy_user
        self.buckets = tuple(b for b in (self.rate_bucket, user.bucket if user is not None else None) if b)
        self.plain_fn = type(self).forward_plain
        if self.buckets:
            self.forward_plain = self._forward_plain_paced
        else:
            self.__dict__.pop("forward_plain", None)

    def _forward_plain_paced(self, reqs: list, wait: bool = True) -> int:
        """forward_plain behind the rate buckets: in the loop (wait False) a read batch goes on only
        when every bucket holds its tokens now; else it is handed to the greenlet, which sleeps in
        pace() while nothing more is read from the client."""
        if wait:  # the greenlet's call (process): paid in pace
            return self.plain_fn(self, reqs, wait)
        n = len(reqs)
        if not all(b.ready(n) for b in self.buckets):
            self.paid = False
            return 0
        for b in self.buckets:
            b.take(n)
        done = self.plain_fn(self, reqs, wait)
        self.paid = done < n  # the rest is handed to the greenlet: already paid for
        return done

    def pace(self, n: int) -> None:
        """Take n tokens from every bucket; sleep off a debt (the client's socket is not read meanwhile)."""
        if self.paid:
            self.paid = False
            return
        wait = max(b.take(n) for b in self.buckets)
        if wait > 0:
            app = self.app
            app.stats.rate_limited += 1
            app.limit_log.log("rate", "INFO", lambda: f"client {self.id} ({hostport.fmt(self.addr)}) slowed "
                              f"down: over its request rate ({self._rate_said()})")
            gevent.sleep(wait)

    def _rate_said(self) -> str:
        user = self.proxy_user
        parts = [f"client_rate_limit {self.app.cfg.client_rate_limit:g}/s"] if self.rate_bucket else []
        if user is not None and user.bucket is not None:
            parts.append(f"user {user.name} rate={user.rate:g}/s")
        return ", ".join(parts)

    def _pipeline_limited(self) -> None:
        """More requests than max_pipeline at once: they wait for replies (counted, logged)."""
        app = self.app
        app.stats.pipeline_limited += 1
        app.limit_log.log("pipeline", "INFO", lambda: f"client {self.id} ({hostport.fmt(self.addr)}) pipelines "
                          f"past max_pipeline ({self.max_window}): not read until its replies are written")

    def output_overflow(self, size: int) -> None:
        """The client left more reply bytes unread than client_output_buffer_limit: it is dropped."""
        app = self.app
        app.stats.output_limit_disconnects += 1
        app.limit_log.log("output", "WARNING", f"client {self.id} ({hostport.fmt(self.addr)}) disconnected: "
                          f"{size} bytes of replies unread, past client_output_buffer_limit "
                          f"({app.cfg.client_output_buffer_limit})")
        self.closing = True
        try:  # the greenlet (parked, or waiting in send) sees the end of the connection
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

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

    def wait_batch(self) -> None:
        """Wait for every reply of the current batch (watching for a hang-up while pinned)."""
        batch = self.batch
        if batch is not None and batch.left:
            if self.oneshot is not None or self.lease is not None:
                self._wait_watching_client(batch)
            else:
                batch.wait()

    def settle(self) -> None:
        """Wait for every reply in flight, then release leases whose state has ended."""
        self.wait_batch()
        batch = self.batch
        if self.ha_sent:
            self._ha_recover(batch)
        if self.oneshot is not None:
            self.oneshot.release(clean=True)
            self.oneshot = None
            self.cur = None
        if tx.ending(self):  # EXEC/DISCARD/UNWATCH's reply is in: the connection is no longer pinned
            self.lease.release(clean=True)
            self.lease = None
            self.cur = None
            tx.released(self)

    def _wait_watching_client(self, batch: Batch) -> None:
        """Wait on a pinned connection (maybe blocked for long), noticing at once if the client hangs
        up: its pinned connections are then closed, which ends a BLPOP on the server before it can
        take an element that other clients push (and ends this wait: the waiters get errors)."""
        watcher = get_hub().loop.io(self.sock.fileno(), 1)
        watcher.start(self._watch_client, watcher)
        try:
            batch.wait()
        finally:
            watcher.stop()
            watcher.close()

    def _watch_client(self, watcher) -> None:
        """Runs in the loop while a pinned request waits: read what the client sends meanwhile (kept
        for later, up to the query buffer limit), to see its hang-up even behind pipelined requests."""
        try:
            while True:
                data = recv_nowait(self.sock, 65536)
                if not data:
                    break
                self.early.append(data)
                self.early_bytes += len(data)
                if self.early_bytes > self.app.cfg.client_query_buffer_limit:
                    watcher.stop()  # stop reading (backpressure); the hang-up is seen later
                    return
        except BlockingIOError:
            return
        except OSError:
            pass
        watcher.stop()
        self.closing = True
        for lease in (self.oneshot, self.lease):
            if lease is not None and lease.channel is not None:
                lease.dirty = True
                lease.channel.close()  # answers the waiters with errors: the wait ends

    def cleanup(self) -> None:
        self.closing = True
        self.outbox.close()
        if self.reader is not None:
            self.reader.close()
        self.end_stream()
        for lease in (self.lease, self.oneshot):
            if lease is not None:
                lease.release(clean=False)
        self.lease = self.oneshot = None
        if self.user is not None:
            switch(self, None)
        self.__dict__.pop("forward_plain", None)  # a bound method of its own (set_buckets): no cycle left
        self.app.clients.pop(self.id, None)
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- dispatch ----

    def dispatch(self, i: int, args: list, raw: bytes, batch: Batch, checked: bool = False) -> None:
        """One request of the batch path. checked: the proxy user's rights were checked already."""
        name = args[0].lower()
        self.last_cmd = name
        if not self.authed and name not in (b"auth", b"hello", b"quit", b"reset"):
            return self.refuse(batch, i, E.NOAUTH)
        if self.acl is not None and not checked and self.denied(i, name, args, batch):
            return
        if self.stream is not None:
            return self.stream_dispatch(i, name, args, raw, batch)
        if self.tx >= tx.QUEUED and name not in (b"exec", b"discard", b"quit", b"reset"):
            return self.in_transaction(i, name, args, raw, batch)
        table = self.app.commands
        arity, policy = table.lookup(name)
        if not C.arity_fits(arity, len(args)):
            return self.refuse(batch, i, E.wrong_arity(name.decode(errors="replace")))
        if policy is C.BY_ARGS:
            policy = table.policy(name, args)
        if policy is C.FORWARD:
            self.forward(i, raw, batch, name, args)
        elif policy is C.LOCAL:
            if self.user is not None and name in DRYRUN:  # a client's own user: the server's ACL first
                err = dryrun(self, args)
                if err is not None:
                    batch.replies[i] = err
                    return
            LOCAL[name](self, i, args, raw, batch)
        elif policy is C.PIN:
            self.pin(i, name, raw, batch)
        elif policy is C.BLOCK:
            self.block(i, raw, batch, wait=name in _WAITS, args=args)
        elif policy is C.STREAM:
            self.start_stream(i, "monitor" if name == b"monitor" else "sub", raw, batch)
        elif policy is C.SIDE:
            self.side(i, raw, batch)
        else:
            self.refuse(batch, i, E.refused(name.decode(), C.REFUSE_WHY.get(name, "unsafe")))

    def denied(self, i: int, name: bytes, args: list, batch: Batch) -> bool:
        """The proxy user may not run this request (gate.py): refused with the server's -NOPERM."""
        err = self.acl.check(self, name, args)
        if err is None:
            return False
        self.app.stats.acl_denied += 1
        if self.tx >= tx.QUEUED and name not in (b"exec", b"discard", b"quit", b"reset"):
            self.refuse_queued(batch, i, err)
        else:
            self.refuse(batch, i, err)
        return True

    def refuse_queued(self, batch: Batch, i: int, msg: str) -> None:
        """refuse() inside MULTI: as when the server refuses a request at queue time, EXEC then
        aborts the transaction (-EXECABORT)."""
        self.refuse(batch, i, msg)
        tx.fail(self)  # cluster: cluster/transaction.exec_ answers EXECABORT
        if tx.pinned(self) and self.lease.channel is not None:
            # standalone: a request the server refuses at queue time flags its transaction (reply dropped)
            self.lease.channel.submit(b"*1\r\n$4\r\nECHO\r\n", None, 0, 0.0)

    def proxy_auth(self, name: bytes, args: list) -> bool:
        """An AUTH (or HELLO ... AUTH) whose credentials vproxy checks itself (a proxy `password` or
        `users`): never sent to a server, so it cannot be queued in a transaction."""
        if not (self.app.cfg.password or self.app.gate is not None):
            return False
        return name == b"auth" or (name == b"hello" and any(a.lower() == b"auth" for a in args[2:]))

    def refuse(self, batch: Batch, i: int, msg: str) -> None:
        """vproxy answers request i with an error without sending it anywhere (a rejected call)."""
        batch.replies[i] = resp.error(msg)
        if batch.rejected is None:
            batch.rejected = set()
        batch.rejected.add(i)

    def key(self) -> tuple:
        """Which connections may carry this client's requests: (database, protocol, backend user)."""
        return (self.db, self.proto, self.user)

    def forward(self, i: int, raw: bytes, batch: Batch, name: bytes | None = None, args=None) -> None:
        """Run on the client's lease if it holds one, else on a shared channel the router picks.

        name: the command the router routes by (None: as a write, to the primary); args: the request's
        arguments (the cluster session finds its keys in them: every caller passes them)."""
        if tx.pinned(self):
            return self.submit(self.lease.channel, i, raw, batch)
        pool = None
        try:
            pool = self.app.router.pool_for(name, args, self)
            ch, key = self.cur, self.key()
            if ch is None or ch.closed or ch.exclusive or ch.pool is not pool or ch.key != key:
                self.settle()
                if self.closing:  # the client left while a pinned request waited: nothing more runs
                    return
                ch = self.cur = pool.channel(key)
        except BackendError as e:
            batch.unsent(i, resp.error(str(e)))
            if self.ha_sent is not None and pool is not None:  # HA: not sent; retried in settle
                self.ha_sent.append((i, raw, name, args, self.key(), pool))
            return
        ch.submit(raw, batch, i, deadline_after(self.app.cfg.command_timeout))
        if self.ha_sent is not None:
            self.ha_sent.append((i, raw, name, args, ch.key, pool))

    # ---- HA (sentinel/replication modes): one more try after a failover; see router.recover ----

    def _ha_recover(self, batch: Batch) -> None:
        """Requests whose backend connection failed run again where the router says, or get its error."""
        sent, self.ha_sent = self.ha_sent, []
        lost = batch.lost
        if not lost:
            return
        failed = [(*e, lost.pop(e[0])) for e in sent if e[0] in lost]  # (..., whether it was sent)
        if not failed:
            return
        timeout = self.app.cfg.command_timeout
        for i, raw, key, target in self.app.router.recover(failed, self):
            if isinstance(target, bytes):
                batch.replies[i] = target
                continue
            try:
                target.channel(key).submit(raw, batch, i, deadline_after(timeout))
            except BackendError as e:
                batch.replies[i] = resp.error(str(e))
        self.cur = None
        batch.wait()

    # ---- end HA ----

    def submit(self, ch, i: int, raw: bytes, batch: Batch, timeout: bool = True) -> None:
        ch.submit(raw, batch, i, deadline_after(self.app.cfg.command_timeout) if timeout else 0.0)

    def new_lease(self, i: int, batch: Batch) -> Lease | None:
        self.settle()
        if self.closing:
            return None
        try:
            return Lease(self.app.router.primary(), self.key())
        except BackendError as e:
            batch.replies[i] = resp.error(str(e))
            return None

    def pin(self, i: int, name: bytes, raw: bytes, batch: Batch) -> None:
        """MULTI or WATCH: the connection stays this client's until EXEC/DISCARD/UNWATCH/RESET."""
        if not tx.pinned(self):
            lease = self.new_lease(i, batch)
            if lease is None:
                if name == b"multi":  # what the client queues behind it must not run: see in_transaction
                    tx.multi(self)
                    self.lease = None
                return
            self.lease = lease
            self.cur = lease.channel
        if name == b"multi":
            tx.multi(self)
            self.multi_select, self.multi_proto, self.multi_auth = None, None, None
        else:
            tx.watch(self)
        self.submit(self.lease.channel, i, raw, batch)

    def in_transaction(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        """Inside MULTI everything is queued by the server, wrong arity included (it aborts EXEC)."""
        if self.lease is None:  # MULTI failed: refuse until EXEC (EXECABORT) or DISCARD
            batch.replies[i] = resp.error("ERR vproxy: MULTI failed, command not queued; send EXEC or DISCARD")
            return
        if self.proxy_auth(name, args):
            return self.refuse_queued(batch, i, AUTH_IN_MULTI)
        if name in C.STATEFUL or name in _SUB_KINDS:  # a SUBSCRIBE run by EXEC: never reuse that connection
            self.lease.dirty = True
            if name == b"select" and len(args) == 2 and self.db_arg(args[1]) is not None:
                self.multi_select = self.db_arg(args[1])
            elif name == b"hello" and len(args) > 1 and args[1] in (b"2", b"3"):
                self.multi_proto = int(args[1])
            elif name == b"auth" and 2 <= len(args) <= 3 and not self.app.cfg.password and self.app.gate is None:
                self.multi_auth = (args[1] if len(args) == 3 else None, args[-1])
        self.submit(self.lease.channel, i, raw, batch)

    def db_arg(self, arg: bytes) -> int | None:
        """The database a forwarded SELECT switches to, None when the server will refuse it."""
        # a failed SELECT changes nothing; a bad db in the session would break its connects
        return db_index(arg, self.app.databases)[0]

    def block(self, i: int, raw: bytes, batch: Batch, dirty: bool = False, wait: bool = False,
              args: list | None = None) -> None:
        """A blocking command gets a connection of its own until it answers (args: the request's
        arguments; the cluster session finds the node by its keys, standalone has one server).

        WAIT/WAITAOF count acknowledgements of the writes made on *their* connection. The client's
        writes went over shared connections, so a propagated no-op (PUBLISH, which a standalone
        server replicates) first moves the leased connection's write offset past them."""
        if tx.pinned(self):
            return self.submit(self.lease.channel, i, raw, batch, timeout=False)
        ch = self.oneshot.channel if self.oneshot is not None else None
        if ch is None or ch.closed or ch.key != self.key():  # SELECT/HELLO/AUTH since: a new one
            lease = self.new_lease(i, batch)
            if lease is None:
                return
            self.oneshot = lease
            self.cur = lease.channel
            self.flush(batch, i)  # replies before it are in (settled): the client gets them before it blocks
        self.oneshot.dirty |= dirty
        if wait:
            self.oneshot.channel.submit(_WAIT_MARK, None, 0, 0.0)
        self.submit(self.oneshot.channel, i, raw, batch, timeout=False)

    def side(self, i: int, raw: bytes, batch: Batch) -> None:
        """SCRIPT/FUNCTION KILL: to the primary right now, on a connection a busy server answers
        (busy.kill), without waiting for the client's other replies."""
        try:
            addr = self.app.router.primary().addr
        except BackendError as e:
            batch.replies[i] = resp.error(str(e))
            return
        busy.kill(addr, self.app.cfg, raw, batch, i, self.user)

    # ---- streams: pub/sub, MONITOR, CLIENT TRACKING, CLIENT REPLY OFF|SKIP ----

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
        kind = _SUB_KINDS.get(v[0]) if isinstance(v, list) and len(v) == 3 else None
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


class HASession(ClientSession):
    """A client in the HA modes (sentinel, replication): its plain requests go to the pool the router
    picks (the primary, or a replica for a read), numbered, so that a connection lost in a failover
    holds the outbox and the held requests are recovered as a batch's are (plain.py)."""

    forward_plain = PlainPath.forward_plain_ha
    _unstick = PlainPath.unstick_ha

    HOLD = ()  # the outbox holds only when a connection fails (its sent fact)

    def __init__(self, app, sock: socket.socket, addr):
        super().__init__(app, sock, addr)
        self.plain_chans: dict = {}  # pool -> this session's shared channel there


if TWIN is not None:  # the compiled twin of forward_plain_ha (vproxy/_plain.pyx, chosen in outbox.py)
    HASession.forward_plain = TWIN.forward_plain_ha


class TLSClient:
    """Mixin of the session classes for TLS clients: no plain path. Its loop callbacks read and write
    the raw socket, which carries ciphertext (tls.py); the greenlet's gevent calls do TLS right."""

    tls = True

    def plain(self) -> bool:
        return False


_TLS_CLASSES: dict = {}


def tls_session(cls: type) -> type:
    """The TLS variant of a session class (ClientSession, HASession, ClusterSession)."""
    tls_cls = _TLS_CLASSES.get(cls)
    if tls_cls is None:
        tls_cls = _TLS_CLASSES[cls] = type(f"TLS{cls.__name__}", (TLSClient, cls), {})
    return tls_cls
