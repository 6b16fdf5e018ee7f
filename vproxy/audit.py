"""The audit log: one JSON line per recorded request, made on the proxy, written by a child process.

    standalone plain path: AuditTrack (the outbox's track) notes each request as it is sent (add_many)
      and makes its record as its reply is written (written)
    batch path (ClientSession.process): Audit.begin (an Entry) -> dispatch -> ClientSession.flush
      -> Audit.finish (the record)
    -> Audit.put / put_many: the record's fields (auditfmt.FIELDS) join the current batch, packed
       (auditfmt.Batch: the numbers and one-key records' key in one byte string, the rest in one
       list; bounded: past audit_queue records queued or in the pipe, dropped and counted)
    -> every 10 ms (a loop timer): the batch, marshalled, in one non-blocking write on a pipe
       (full: the batch is dropped and counted; the loop never waits)
    -> the writer process (python -m vproxy.auditwriter): JSON lines, rotation, gzip, retention;
       it reports what it wrote on a second pipe, read by a loop watcher

Why a process: formatting a JSON line, writing and compressing cost ~2.5 us per record, which a
thread would take from the proxy's own core and GIL. Why not fork: the proxy runs gevent (a fork
would copy its hub and greenlets); the child is a fresh interpreter that imports the standard
library only. It ends when its pipe closes (vproxy stopped or died); if it dies first, vproxy
counts the records it had not written as dropped, logs it, and starts a new one (at most one a
second): `audit_writer_restarts` in INFO proxy.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import socket
import subprocess
import sys
from collections import deque
from time import monotonic, time

import gevent
from gevent.hub import get_hub
from loguru import logger

from . import auditfmt, hostport
from .auditfmt import cut_key, cut_keys
from .auditwriter import ACTIVE, STRIDE, Frames, frame, key_hash
from .commands import NAME_CACHE
from .config import check_classes, parse_amounts
from .keyspec import CONTAINER_KEY, MOVABLE, key_positions
from .ratelog import RateLog
from .twins import twin

_OWN_CONTAINERS = (b"proxy",)  # vproxy's own commands with subcommands (CommandTable.subcommand)
VALUE_MAX = 256  # audit_values: bytes kept of each argument (the rest is counted, not written)
# arguments from this position on may hold secrets (passwords): written as "(redacted)"
_REDACT = {b"auth": 1, b"migrate": 1, b"acl": 3, b"config": 3}
OK, ERROR, REFUSED, SENT = range(4)  # a record's outcome (auditwriter.OUTCOMES)
FLUSH_EVERY = 0.01  # seconds a record waits at most before its batch goes to the writer
FLUSH_AT = 2048  # records: a batch this big goes at once
CHUNK = 8192  # records in one frame at most (while the pipe is full, batches this big wait as frames)
PIPE_SIZE = 1 << 20  # the pipe's capacity asked for (Linux's default limit for an unprivileged process)
ATTACH_EVERY = 0.05  # seconds between tries to put the AuditTrack on clients that were busy at PROXY AUDIT ON


def who(s) -> tuple:
    """The client's part of a record: (client id, address, name, lib name, lib version, user, db)."""
    return (s.id, s.addr, s.name, s.lib_name, s.lib_ver, audit_user(s), s.db)


def audit_user(s) -> bytes | None:
    """The user a record names: the proxy user (gate.py), else the backend ACL user the client
    authenticated as (users.py), else None (vproxy's backend user)."""
    pu = getattr(s, "proxy_user", None)
    if pu is not None:
        return pu.name.encode()
    user = getattr(s, "user", None)
    return user.user if user is not None else None


class Entry:
    """A recorded request between dispatch and its reply (the batch path)."""

    __slots__ = ("args", "batch", "idx", "name", "rec", "size", "start", "target", "who")

    def __init__(self, batch, idx, name, args, size, s):
        self.batch, self.idx, self.name, self.args, self.size = batch, idx, name, args, size
        self.who = who(s)
        self.start = time()
        self.target = None  # where it went: an address, a cluster Sub (its address when answered), None
        self.rec = None

    @classmethod
    def held(cls, batch, idx: int, rec: list) -> Entry:
        """A plain request whose reply was held (HA, cluster: see AuditTrack.drop): its record, made
        when it was sent, is completed by the batch path."""
        e = cls.__new__(cls)
        e.batch, e.idx, e.rec, e.target = batch, idx, rec, rec[7]  # (rec: STRIDE fields, auditfmt.FIELDS)
        return e


class Audited:
    """Mixin of ClientSession: recorded requests on the batch path are noted as they are dispatched
    and recorded when their replies are written (flush)."""

    def _dispatch_audited(self, part: list, batch) -> None:
        """dispatch, noting each recorded request and where it went; recorded in flush."""
        audit = self.app.audit
        for i, (args, raw) in enumerate(part):
            entry = audit.begin(self, batch, i, args, raw)
            self.dispatch(i, args, raw, batch)
            if entry is not None:
                entry.target = self.audit_target(i, batch)
                self.audits.append(entry)
            if self.closing:
                break

    def audit_target(self, i: int, batch):
        """The backend address request i went to; None when vproxy answered it itself."""
        if batch.replies[i] is not None:
            return None
        st = self.stream
        ch = st.lease.channel if st is not None else self.cur
        return ch.pool.addr if ch is not None and ch.pool is not None else None

    def _audit_replies(self, batch, upto: int) -> None:
        audit, keep = self.app.audit, []
        for e in self.audits:
            if e.batch is batch and e.idx < upto:
                audit.finish(e, batch.replies[e.idx])
            elif e.batch is batch or e.batch is self.batch:
                keep.append(e)
        self.audits[:] = keep


class AuditTrack:
    """An outbox's `track` (the interface of cmdstats.Track, which it wraps) that records the plain
    path's requests: each plain request as it is sent (add_many, add: a record with its reply's
    fields still empty), its reply as it is written (written: the record completed and queued), in
    order. So recorded commands keep the plain path. In the HA and cluster modes (hold mode: a
    sequence number and a node per request, outbox.py) the node is in the outbox's `meta` of the
    request; a held reply (MOVED, a failover) leaves the plain path (drop), and its record goes with
    it to the batch that recovers it (Entry.held)."""

    __slots__ = ("audit", "entries", "inner", "kept", "now", "session", "src", "who")

    def __init__(self, audit, session, inner, inflight: int = 0):
        """inflight: plain requests already in flight (see Audit.attach): not recorded."""
        self.audit, self.session, self.inner = audit, session, inner
        self.entries: deque = deque([None] * inflight)  # per plain request in flight: its record (a list), or None
        self.who = None  # the client's part of the records of this read (None: not made yet)
        self.now = 0.0
        self.kept = None  # the last `who` made, kept while the session cannot have changed (_who)
        self.src = (None, None, None)  # what it was made with: the session's batch, proxy user, backend user

    def start(self, t0: float) -> None:
        self.who = None  # a new read: the session may have changed since (SELECT, CLIENT SETNAME ...)
        if self.inner is not None:
            self.inner.start(t0)

    def add(self, req: tuple) -> None:
        """Hold mode (Outbox.send): one request, whose node is in the outbox's meta."""
        if self.inner is not None:
            self.inner.add(req)
        self._numbered(req, self.session.outbox.next_seq - 1)

    def _numbered(self, req: tuple, seq: int) -> None:
        """A request sent with sequence number seq (hold mode): its node is in the outbox's meta."""
        args, raw = req
        audit = self.audit
        p = audit.table.audit_plans.get(args[0])
        if p is None:
            p = audit.plan(args[0])
        if p is False:
            return self.entries.append(None)
        if self.who is None:
            self.who, self.now = self._who(), time()
        target = self.session.outbox.meta_of(seq)[3]  # HA: (raw, name, key, pool); cluster: (raw, slot, name, addr)
        if not isinstance(target, (tuple, str)):
            target = target.addr
        self._note(p, args, raw, target)

    def add_many(self, reqs, start: int, end: int) -> None:
        """reqs[start:end] were just sent: standalone, on the session's channel; in hold mode (the
        compiled cluster plain path tells a run at a time) as the last end - start numbered ones."""
        if self.inner is not None:
            self.inner.add_many(reqs, start, end)
        box = self.session.outbox
        if box.hold is not None:
            base = box.next_seq - (end - start)
            for j in range(end - start):
                self._numbered(reqs[start + j], base + j)
            return
        audit = self.audit
        plans = audit.table.audit_plans
        add = self.entries.append
        target = False
        for i in range(start, end):
            args, raw = reqs[i]
            p = plans.get(args[0])
            if p is None:
                p = audit.plan(args[0])
            if p is False:
                add(None)
                continue
            if target is False:  # the first recorded one of this call: what the others share
                s = self.session
                if self.who is None:
                    self.who, self.now = self._who(), time()
                w, now = self.who, self.now
                ch = s.cur  # the plain channel these requests were just sent on
                target = ch.pool.addr if ch is not None and ch.pool is not None else None
            keys = p[1]
            if keys is not None:  # the common case, inline (0: OK)
                add([now, w, p[0], None, keys_in(args, keys), len(args), len(raw), target, None, 0.0, 0, None])
            else:
                self._note(p, args, raw, target)

    def _who(self) -> tuple:
        """who(session), the same tuple as last time while the session cannot have changed: what
        changes it (SELECT, CLIENT SETNAME, HELLO, AUTH ...) never takes the plain path, and every
        run of the batch path makes a new session.batch (a reload of the proxy users may rebind
        proxy_user, a backend re-AUTH user). One tuple for a client's records also makes them
        smaller in the hand-over (marshal writes it once a batch) and cheaper for the writer."""
        s = self.session
        src = self.src
        if self.kept is None or s.batch is not src[0] or s.proxy_user is not src[1] or s.user is not src[2]:
            self.src = (s.batch, s.proxy_user, s.user)
            self.kept = who(s)
        return self.kept

    def _note(self, p: tuple, args: list, raw: bytes, target) -> None:
        name, keys = p
        if keys is not None:
            sub, ks, values = None, keys_in(args, keys), None
        elif self.audit.table.audits(name, args):  # a container, movable keys, values: asked per request
            sub, ks, values = self.audit.pick(name, args)
        else:
            return self.entries.append(None)
        self.entries.append([self.now, self.who, name, sub, ks, len(args), len(raw), target, values, 0.0, OK, None])

    def written(self, frames: list) -> None:
        if self.inner is not None:
            self.inner.written(frames)
        entries = self.entries
        recs = None
        for f in frames:
            if not entries:
                break
            e = entries.popleft()
            if e is None:
                continue
            if recs is None:
                recs, now = [], time()
            e[9] = now
            c = f[:1]
            if c == b"-" or c == b"!":
                e[10], e[11] = ERROR, _error_code(f)
            recs += e  # (the batch is flat: STRIDE fields a record)
        if recs is not None:
            self.audit.put_many(recs)

    def drop(self, n: int) -> list:
        """n held replies leave the plain path for the session's new batch (PlainPath.held_stats):
        their records go with them, completed when the batch writes their replies."""
        s, entries = self.session, self.entries
        batch = s.batch
        for j in range(min(n, len(entries))):
            e = entries.popleft()
            if e is not None and batch is not None:
                s.audits.append(Entry.held(batch, j, e))
        return self.inner.drop(n) if self.inner is not None else []


class Audit:
    """The audit log of one proxy process: selection, records, the batch on its way to the writer
    process, and that process."""

    def __init__(self, cfg, table, node: str):
        self.cfg, self.table = cfg, table
        self.dir = cfg.audit_dir
        if self.dir and getattr(cfg, "worker_index", -1) >= 0:  # workers (workers.py): a directory each
            self.dir = os.path.join(self.dir, f"worker-{cfg.worker_index}")
        self.node = node or f"{socket.gethostname()}:{hostport.parse(cfg.listen)[1] if cfg.listen else ''}"
        self.default_user = getattr(cfg, "backend_username", "") or "default"  # a client that did not AUTH
        self.classes = list(cfg.audit_commands)
        self.on = False
        self.max_queue = cfg.audit_queue
        self.secret = cfg.audit_hash_secret.encode() if cfg.audit_hash_keys else None
        self.values = cfg.audit_values
        rot = parse_amounts(cfg.audit_rotation)
        self.rotate_size, self.rotate_age = rot.get("size", 0), rot.get("seconds", 0)
        ret = parse_amounts(cfg.audit_retention)
        self.keep_seconds, self.keep_files = ret.get("seconds", 0), ret.get("files", 0)
        self.compress = cfg.audit_compress
        self.log = RateLog()
        self.batch = Batch()  # records not yet handed to the writer process, packed (auditfmt.Batch)
        self._sealed: deque = deque()  # frames of CHUNK records made while the pipe was full: (records, frame)
        self.sealed = 0  # the records in them
        self.inflight = 0  # records handed to it that it has not reported (written or failed)
        self.dropped = 0  # records dropped here (queue or pipe full, the writer lost)
        self.restarts = 0  # writer processes started again after one died
        self.proc = None  # the writer process
        self.closing = False
        self._wfd = self._rfd = -1  # the records pipe (ours: the write end), the status pipe (the read end)
        self._rest = memoryview(b"")  # what a partial write left of a frame: the next write starts with it
        self._frames = Frames()
        self._status = (0, 0, 0, "")  # the writer's last report: (written, failed records, errors, last error)
        self._base = [0, 0, 0]  # the same, of the writers that died
        self._spawned = 0.0
        self._watcher = self._timer = None
        self._armed = False
        self._restarting = False
        self.clients: dict = {}  # the proxy's clients (App.clients): their outbox tracks
        self._waiting: list = []  # clients that get their AuditTrack once their greenlet parks (attach)

    # ---- control (PROXY AUDIT, start-up) ----

    def start(self) -> None:
        """Start recording (needs audit_dir); the writer process starts with the first start."""
        if not self.dir:
            raise ValueError("no audit directory: start vproxy with --audit-dir DIR (setting audit_dir)")
        os.makedirs(self.dir, exist_ok=True)
        if self.proc is None:
            self._spawn()
        self.on = True
        self.table.select_audit(frozenset(self.classes))
        self._attach_all()
        logger.info("audit log on: {} ({})", self.path, ",".join(self.classes))

    def stop(self) -> None:
        self.on = False
        self.table.select_audit(None)
        self._waiting = []
        for s in list(self.clients.values()):  # each plain path's track as it was (cmdstats.Track or None)
            track = s.outbox.track
            if isinstance(track, TRACKS):
                s.outbox.track = track.inner
        logger.info("audit log off")

    # ---- the plain paths' tracks (AuditTrack on each client's outbox while the log is on) ----

    def attach(self, s) -> bool:
        """Put an AuditTrack on client s's outbox (PROXY AUDIT ON); False: not now. Safe while its
        greenlet is parked in _intake: the loop sends its plain requests then, and reads the track
        afresh each time, whereas a forward_plain running in the greenlet tells the track it read
        when it began. The requests already in flight are not recorded (inflight)."""
        box = s.outbox
        if isinstance(box.track, TRACKS) or s.closing:
            return True
        if s.intake is None and not getattr(s, "tls", False):  # (TLS clients have no plain path)
            return False
        if box.hold is None:
            inflight = box.left + len(box.pending)
        else:
            inflight = box.next_seq - box.write_seq + len(box.pending) + len(box.held)
        box.track = AuditTrack(self, s, box.track, inflight)
        return True

    def _attach_all(self) -> None:
        """Every client records from now on: at once, or as soon as its greenlet parks (a timer
        tries again every ATTACH_EVERY while some have not)."""
        self._waiting = [s for s in self.clients.values() if not self.attach(s)]
        if self._waiting:
            get_hub().loop.timer(ATTACH_EVERY).start(self._attach_waiting)

    def _attach_waiting(self) -> None:
        if not self.on or not self._waiting:
            return
        self._waiting = [s for s in self._waiting if self.clients.get(s.id) is s and not self.attach(s)]
        if self._waiting:
            get_hub().loop.timer(ATTACH_EVERY).start(self._attach_waiting)

    def tracked(self) -> int:
        """Clients whose plain-path requests are recorded (an AuditTrack on their outbox)."""
        return sum(1 for s in list(self.clients.values()) if isinstance(s.outbox.track, TRACKS))

    def set_classes(self, classes: list) -> None:
        self.classes = check_classes(classes)
        if self.on:
            self.table.select_audit(frozenset(self.classes))

    @property
    def path(self) -> str:
        return os.path.join(self.dir, ACTIVE) if self.dir else ""

    @property
    def written(self) -> int:
        return self._base[0] + self._status[0]

    @property
    def errors(self) -> int:
        return self._base[2] + self._status[2]

    def fields(self) -> dict:
        """INFO `# Proxy` lines."""
        self._on_status()
        return {"audit_enabled": int(self.on), "audit_dir": self.dir or "none",
                "audit_commands": ",".join(self.classes), "audit_records": self.written,
                "audit_queued": self.queued,
                "audit_dropped": self.dropped + self._base[1] + self._status[1],
                "audit_write_errors": self.errors,
                "audit_writer_pid": self.proc.pid if self.proc is not None else 0,
                "audit_writer_restarts": self.restarts, "audit_clients": self.tracked()}

    # ---- records (the request path) ----

    def plan(self, sent: bytes):
        """What recording a request named `sent` (as the client spelled it) takes: False (never
        recorded), (name, keys) (always recorded, its keys are keys_in(args, keys): a position when
        the command has one key, else a slice) or (name, None) (recorded or not by its arguments:
        table.audits and pick per request). Cached per name until the table changes
        (CommandTable.audit_plans)."""
        name = sent.lower()
        table = self.table
        if name not in table.audit_names:
            p = False
        else:
            rng = None if self.values else _simple_keys(table.get(name), name)
            if rng is not None and table.audits(name, [name]):
                first, last, step = rng
                # one key (SET, INCR, HSET ...): the record's keys field is that key's bytes, no list to make
                p = (name, first if first == last > 0 else slice(first, None if last == -1 else last + 1, step))
            else:
                p = (name, None)
        plans = self.table.audit_plans
        if len(plans) < NAME_CACHE:  # names are the client's: bound the cache
            plans[sent] = p
        return p

    def pick(self, name: bytes, args: list) -> tuple:
        """(subcommand, keys, values): what a record needs of the arguments."""
        table = self.table
        rng = None if self.values else _simple_keys(table.get(name), name)
        if rng is not None:
            first, last, step = rng
            return None, cut_keys(args[first:len(args) + last + 1 if last < 0 else last + 1:step]), None
        sub = table.subcommand(name, args)
        pos = key_positions(table.get(name), name, args) or ()
        keys = [cut_key(args[p]) for p in pos if p < len(args)]
        return sub, keys, _values(name, args, pos, self.secret) if self.values else None

    def begin(self, s, batch, idx: int, args: list, raw: bytes) -> Entry | None:
        name = args[0].lower()
        if not self.table.audits(name, args):
            return None
        return Entry(batch, idx, name, args, len(raw), s)

    def finish(self, e: Entry, reply) -> None:
        """The reply is known (None: streamed to the client): make the record and queue it."""
        target = e.target
        if target is not None and not isinstance(target, (tuple, str)):
            target = target.addr  # a cluster Sub: where it was last sent (after MOVED/ASK)
        if reply is None:
            outcome, err = SENT, None
        elif reply[:1] == b"-" or (reply[:1] == b"!"):
            err = _error_code(reply)
            outcome = REFUSED if target is None and not reply.startswith(b"-ERR vproxy: backend") else ERROR
        else:
            outcome, err = OK, None
        if e.rec is not None:  # noted on the plain path (AuditTrack.drop)
            rec = e.rec
            rec[7], rec[9], rec[10], rec[11] = target, time(), outcome, err
            return self.put(rec)
        sub, keys, values = self.pick(e.name, e.args)
        self.put([e.start, e.who, e.name, sub, keys, len(e.args), e.size, target, values, time(), outcome, err])

    def refused_auth(self, s, user: bytes | None) -> None:
        """An AUTH (or HELLO AUTH) the proxy's users refused: recorded when the audit log is on, whatever
        audit_commands selects (when it selects AUTH, the request's own record says it already). The
        record names the user tried; the password is never written."""
        if not self.on or self.table.audits(b"auth", [b"auth"]):
            return
        now = time()
        self.put([now, (s.id, s.addr, s.name, s.lib_name, s.lib_ver, user or b"default", s.db), b"auth", None, [], 1,
                  0, None, None, now, REFUSED, "WRONGPASS"])

    @property
    def queued(self) -> int:
        """Records made and not yet written: in the pipe or the writer, in frames waiting, in the batch."""
        return self.inflight + self.sealed + self.batch.count

    def put(self, rec: list) -> None:
        """One record: its STRIDE fields (auditfmt.FIELDS)."""
        if self.queued >= self.max_queue:
            return self._drop(1, "the writer is behind")
        self.batch.add(*rec)
        if not self._armed:
            self._arm()

    def put_many(self, recs: list) -> None:
        """Records: STRIDE fields each, one after the other (one flat list)."""
        batch = self.batch
        room = self.max_queue - self.queued
        n = len(recs) // STRIDE
        if n > room:
            self._drop(n - max(room, 0), "the writer is behind")
            if room <= 0:
                return
            recs = recs[:room * STRIDE]
        batch.add_flat(recs)
        if batch.count >= FLUSH_AT:
            self.full()
        elif not self._armed:
            self._arm()

    def full(self) -> None:
        """The batch has FLUSH_AT records: it goes now, unless the pipe is full (a rest: the timer
        tries again), when at CHUNK records it waits as a frame (the writer's frames stay small)."""
        if not self._rest:
            self.flush()
        else:
            if self.batch.count >= CHUNK:
                n = self.batch.count
                self._sealed.append((n, frame(self.batch.take())))
                self.sealed += n
            if not self._armed:
                self._arm()

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        self.log.log("dropped", "WARNING", f"audit: {why} ({self.queued} records queued): "
                     f"records dropped, {self.dropped} so far (INFO proxy audit_dropped)")

    # ---- the hand-over to the writer process ----

    def _arm(self) -> None:
        """flush() in FLUSH_EVERY. A new timer each time: a libev timer started again after it
        fired keeps what was left of its delay then (about nothing), so a reused one fired every
        loop iteration or so: five times as many, smaller batches, each a wake-up of the writer."""
        self._armed = True
        self._timer = get_hub().loop.timer(FLUSH_EVERY)
        self._timer.start(self.flush)

    def flush(self) -> None:
        """The batch, in non-blocking writes on the pipe (the loop timer, or a big batch). When the
        pipe is full the records wait here (put() bounds them: audit_queue) and the timer tries again."""
        self._armed = False
        if self.proc is None:  # the writer died: a new one (from a greenlet: Popen waits), at most one a second
            if self.closing or not self.dir:
                return
            if not self._restarting and monotonic() - self._spawned >= 1.0:
                self._restarting = True
                gevent.spawn(self._restart)
            return self._arm()
        while (self._rest or self.sealed or self.batch.count) and self.proc is not None:
            if not self._rest:  # the frames waiting, then the batch, packed, as one frame
                if self._sealed:
                    n, f = self._sealed.popleft()
                    self.sealed -= n
                else:
                    n, f = self.batch.count, frame(self.batch.take())
                self._rest = memoryview(f)
                self.inflight += n
            try:
                k = os.write(self._wfd, self._rest)
            except BlockingIOError:  # the pipe is full: again in FLUSH_EVERY
                return self._arm()
            except OSError:  # the writer is gone (EPIPE): the status pipe's EOF says so too
                return self._lost()
            self._rest = self._rest[k:]

    def _restart(self) -> None:
        try:
            if self.proc is None and not self.closing:
                self._spawn()
        except OSError as e:
            logger.error("audit: cannot start the writer process: {}", e)
        finally:
            self._restarting = False

    def _spawn(self) -> None:
        """Start the writer process: the records pipe as its stdin, the status pipe as its stdout."""
        self._spawned = monotonic()
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "vproxy.auditwriter"], stdin=r1, stdout=w2,
                                         close_fds=True, env=env)
        except BaseException:
            for fd in (w1, r2):
                os.close(fd)
            raise
        finally:
            os.close(r1)
            os.close(w2)
        try:
            fcntl.fcntl(w1, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, AttributeError):  # not Linux, or a lower limit: the default size (64 KB)
            pass
        self._wfd, self._rfd = w1, r2
        self._frames = Frames()
        self._status = (0, 0, 0, "")
        os.write(w1, frame({"dir": os.path.abspath(self.dir), "node": self.node, "default_user": self.default_user,
                            "secret": self.secret, "rotate_size": self.rotate_size, "rotate_age": self.rotate_age,
                            "keep_seconds": self.keep_seconds, "keep_files": self.keep_files,
                            "compress": self.compress}))
        os.set_blocking(w1, False)
        os.set_blocking(r2, False)
        self._watcher = get_hub().loop.io(r2, 1)
        self._watcher.start(self._on_status)

    def _on_status(self) -> None:
        """The writer's reports (a loop watcher): records written free their place in the queue."""
        if self._rfd < 0:
            return
        try:
            data = os.read(self._rfd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._lost()
        last = None
        for f in self._frames.feed(data):
            last = marshal.loads(f)
        if last is None:
            return
        old = self._status
        self.inflight = max(0, self.inflight - (last[0] + last[1] - old[0] - old[1]))
        self._status = last
        if last[2] != old[2]:
            self.log.log("error", "ERROR", f"audit: cannot write {self.path}: {last[3]} "
                         f"({self.errors} write errors; their records are lost)")

    def _lost(self) -> None:
        """The writer process is gone (EOF on its status pipe): what it had not written is lost."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        self._watcher.stop()
        self._watcher = None
        for fd in (self._wfd, self._rfd):
            if fd >= 0:
                os.close(fd)
        self._wfd = self._rfd = -1
        for i in range(3):
            self._base[i] += self._status[i]
        self._status = (0, 0, 0, "")
        lost, self.inflight, self._rest = self.inflight, 0, memoryview(b"")
        self.dropped += lost
        if self.closing:
            return
        self.restarts += 1
        logger.error("audit: the writer process (pid {}) exited ({}): {} records not written; starting a new one",
                     proc.pid, proc.poll(), lost)
        self._arm()

    def close(self, timeout: float = 2.0) -> None:
        """Hand what is queued to the writer (for up to timeout seconds), close its pipe and wait
        for it to write and exit (it is killed past the timeout)."""
        from gevent.socket import wait_write

        self.closing = True
        if self._timer is not None:
            self._timer.stop()
        proc = self.proc
        if proc is None:
            return
        deadline = monotonic() + timeout
        self.inflight += self.sealed + self.batch.count
        data = b"".join([bytes(self._rest), *(f for _, f in self._sealed),
                         frame(self.batch.take()) if self.batch.count else b""])
        self._rest, self._sealed, self.sealed = memoryview(b""), deque(), 0
        while data and self.proc is not None and monotonic() < deadline:
            try:
                data = data[os.write(self._wfd, data):]
            except BlockingIOError:
                try:
                    wait_write(self._wfd, timeout=max(0.01, deadline - monotonic()))
                except Exception:  # noqa: BLE001 - the timeout: the rest is lost
                    break
            except OSError:
                break
        if self._wfd >= 0:
            os.close(self._wfd)  # EOF: the writer writes what it has and exits
            self._wfd = -1
        while proc.poll() is None and monotonic() < deadline:
            gevent.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        while self.proc is not None:  # its last report, then EOF
            self._on_status_blocking()

    def _on_status_blocking(self) -> None:
        if self._rfd >= 0:
            os.set_blocking(self._rfd, True)
        self._on_status()


def keys_in(args: list, keys):
    """A plan's keys of a request: one key's bytes (keys: its position; a record's keys field may
    be a key's bytes, auditfmt.FIELDS), or a list (keys: a slice)."""
    if type(keys) is int:
        return cut_key(args[keys]) if keys < len(args) else []
    return cut_keys(args[keys])


def _error_code(reply: bytes) -> str:
    """'-WRONGTYPE Operation against ...' -> 'WRONGTYPE'."""
    if reply[:1] == b"!":  # RESP3 blob error: !<len>\r\n<code> <text>
        reply = reply[reply.find(b"\n") + 1:]
    else:
        reply = reply[1:]
    return reply.split(b" ", 1)[0].split(b"\r", 1)[0].decode(errors="replace")


def _simple_keys(cmd, name: bytes):
    """(first, last, step) when a command's keys are a fixed range (no movable keys, no container,
    no subcommands), else None (keyspec.key_positions decides per request)."""
    if cmd is None or cmd.subs or "movablekeys" in cmd.flags or name in CONTAINER_KEY or name in MOVABLE \
            or name in _OWN_CONTAINERS:
        return None
    if cmd.first_key <= 0:
        return (1, 0, 1)  # no keys: an empty slice
    return (cmd.first_key, cmd.last_key, cmd.step or 1)


def _values(name: bytes, args: list, keys, secret: bytes | None) -> list:
    """The arguments after the name, each cut to VALUE_MAX bytes; secrets (AUTH ...) redacted; keys
    hashed when keys are (audit_hash_keys)."""
    cut = _REDACT.get(name, len(args))
    if name == b"hello":
        low = [a.lower() for a in args]
        cut = low.index(b"auth") + 2 if b"auth" in low else len(args)
    out = []
    for j, a in enumerate(args[1:], 1):
        if j >= cut:
            out.append(b"(redacted)")
        elif secret is not None and j in keys:
            out.append(key_hash(secret, cut_key(a)).encode())  # as the keys field's hash
        elif len(a) > VALUE_MAX:
            out.append(a[:VALUE_MAX] + b"...(+%d bytes)" % (len(a) - VALUE_MAX))
        else:
            out.append(a)
    return out


# ---- the compiled twin of AuditTrack (vproxy/_audit.pyx) when it is built, unless VPROXY_PURE=1 ----
PureAuditTrack = AuditTrack
Batch = auditfmt.Batch  # the packed batch (auditfmt.REC)
_twin = twin("_audit")
IMPL = "pure" if _twin is None else "compiled"
if _twin is not None:
    _twin.bind(who=who, error_code_of=_error_code, entry=Entry, ok=OK, error=ERROR, flush_at=FLUSH_AT, stride=STRIDE,
               keys_of=keys_in, packing=(auditfmt.REC, auditfmt.KLEN, auditfmt.CTX, auditfmt.KEY, auditfmt.VALUES,
                                         auditfmt.ERR), cutting=(auditfmt.KEY_MAX, cut_key, cut_keys))
    AuditTrack = _twin.AuditTrack
    Batch = _twin.Batch
TRACKS = (PureAuditTrack, AuditTrack)  # what Audit.attach and stop look for on an outbox
