"""The audit log: one JSON line per recorded request, written off the request path, rotated and kept.

    ClientSession.process (batch path; recorded commands never take the plain path: CommandTable.audited)
      -> Audit.begin (selected? then an Entry: time, db, command, args) -> dispatch -> Entry.target
      -> ClientSession.flush: the reply is known -> Audit.finish -> a record tuple
      -> Audit.put: a bounded deque (full: dropped and counted, a rate-limited log line)
      -> writer thread (a native thread, not a greenlet): JSON lines -> DIR/audit.jsonl, one write
         per batch; past the size or age limit: renamed audit-<UTC>.jsonl, gzipped, old ones deleted

Why a native thread and not loguru's `enqueue`: loguru's queue is unbounded (a slow disk would grow
memory), its locks are the monkey-patched gevent ones (not safe in a native thread) and its global
logger would mix audit records into the log's sinks. The deque is thread-safe (append and popleft
are atomic), so the event loop never takes a lock and never waits for the disk: the writer polls.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import os
import re
import shutil
import socket
from collections import deque
from json.encoder import encode_basestring as _js
from time import gmtime, monotonic, strftime, time

from gevent import monkey
from loguru import logger

from .config import check_classes, parse_amounts
from .keyspec import CONTAINER_KEY, MOVABLE, key_positions
from .ratelog import RateLog

ACTIVE = "audit.jsonl"
ROTATED = re.compile(r"^audit-(\d{8}T\d{6}\.\d{6}Z)\.jsonl(\.gz)?$")
_OWN_CONTAINERS = (b"proxy",)  # vproxy's own commands with subcommands (CommandTable.subcommand)
SMALL = 512  # a request up to this size is queued as it is (its keys picked out by the writer)
VALUE_MAX = 256  # audit_values: bytes kept of each argument (the rest is counted, not written)
# arguments from this position on may hold secrets (passwords): written as "(redacted)"
_REDACT = {b"auth": 1, b"migrate": 1, b"acl": 3, b"config": 3}

_sleep = monkey.get_original("time", "sleep")
_start_thread = monkey.get_original("_thread", "start_new_thread")


def key_hash(secret: bytes, key: bytes) -> str:
    """The keyed hash written instead of a key (audit_hash_keys): HMAC-SHA256, 16 hex digits."""
    return hmac.new(secret, key, hashlib.sha256).hexdigest()[:16]


def _text(b) -> str:
    return b.decode("utf-8", "backslashreplace") if isinstance(b, bytes) else str(b)


def _fmt_addr(addr) -> str:
    if not addr:
        return ""
    if isinstance(addr, str):
        return addr
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Picked:
    """What a record needs of a request's arguments (picked on the loop for big requests)."""

    __slots__ = ("argc", "keys", "sub", "values")

    def __init__(self, sub, keys, values, argc):
        self.sub, self.keys, self.values, self.argc = sub, keys, values, argc


class Entry:
    """A recorded request between dispatch and its reply."""

    __slots__ = ("args", "batch", "client", "db", "idx", "name", "size", "start", "target")

    def __init__(self, batch, idx, name, args, size, s):
        self.batch, self.idx, self.name, self.args, self.size = batch, idx, name, args, size
        self.db, self.client = s.db, (s.name, s.lib_name, s.lib_ver, audit_user(s))
        self.start = time()
        self.target = None  # where it went: an address, a cluster Sub (its address when answered), None


def audit_user(s) -> bytes | None:
    """The user a record names: the proxy user (gate.py), else the backend ACL user the client
    authenticated as (users.py), else None (vproxy's backend user)."""
    pu = getattr(s, "proxy_user", None)
    if pu is not None:
        return pu.name.encode()
    user = getattr(s, "user", None)
    return user.user if user is not None else None


class Audited:
    """Mixin of ClientSession: recorded requests (never on the plain path: CommandTable.audited) are
    noted as they are dispatched and recorded when their replies are written (flush)."""

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
                audit.finish(self, e, batch.replies[e.idx])
            elif e.batch is batch or e.batch is self.batch:
                keep.append(e)
        self.audits[:] = keep


class AuditTrack:
    """Standalone mode: an outbox's `track` (the interface of cmdstats.Track, which it wraps) that
    records the plain path's requests: each plain request as it is sent (add), its reply as it is
    written (written), in order. So recorded commands keep the plain path there; in the HA and
    cluster modes (replies held and recovered, a node per request) they take the batch path."""

    __slots__ = ("audit", "entries", "inner", "session", "table")

    def __init__(self, audit, session, inner):
        self.audit, self.session, self.inner, self.table = audit, session, inner, audit.table
        self.entries: deque = deque()  # per plain request in flight: its Entry, or None (not recorded)

    def start(self, t0: float) -> None:
        if self.inner is not None:
            self.inner.start(t0)

    def add(self, req: tuple) -> None:
        if self.inner is not None:
            self.inner.add(req)
        self._entry(req)

    def add_many(self, reqs: list, start: int, end: int) -> None:
        if self.inner is not None:
            self.inner.add_many(reqs, start, end)
        for i in range(start, end):
            self._entry(reqs[i])

    def _entry(self, req: tuple) -> None:
        args = req[0]
        name = args[0].lower()
        s = self.session
        if not self.audit.on or name not in self.table.audit_names or not self.table.audits(name, args):
            self.entries.append(None)
            return
        ch = s.cur  # the plain channel this request was just sent on
        # a tuple, not an Entry: this runs per plain request recorded
        self.entries.append((time(), name, args, len(req[1]), s.db, s.name, s.lib_name, s.lib_ver, audit_user(s),
                             ch.pool.addr if ch is not None and ch.pool is not None else None))

    def written(self, frames: list) -> None:
        if self.inner is not None:
            self.inner.written(frames)
        entries, audit, s = self.entries, self.audit, self.session
        for f in frames:
            if not entries:
                return
            e = entries.popleft()
            if e is not None:
                audit.finish_plain(s, e, f)

    def drop(self, n: int) -> list:
        for _ in range(min(n, len(self.entries))):
            self.entries.popleft()
        return self.inner.drop(n) if self.inner is not None else []


class Audit:
    """The audit log of one proxy process: selection, the queue, the writer thread's state."""

    def __init__(self, cfg, table, node: str):
        self.cfg, self.table = cfg, table
        self.dir = cfg.audit_dir
        if self.dir and getattr(cfg, "worker_index", -1) >= 0:  # workers (workers.py): a directory each
            self.dir = os.path.join(self.dir, f"worker-{cfg.worker_index}")
        self.node = node or f"{socket.gethostname()}:{cfg.listen.rpartition(':')[2]}"
        self.default_user = getattr(cfg, "backend_username", "") or "default"  # a client that did not AUTH
        self.classes = list(cfg.audit_commands)
        self.on = False
        self.max_queue = cfg.audit_queue
        self.queue: deque = deque()
        self.dropped = self.written = self.errors = 0
        self.last_error = ""
        self.secret = cfg.audit_hash_secret.encode() if cfg.audit_hash_keys else None
        self.values = cfg.audit_values
        rot = parse_amounts(cfg.audit_rotation)
        self.rotate_size, self.rotate_age = rot.get("size", 0), rot.get("seconds", 0)
        ret = parse_amounts(cfg.audit_retention)
        self.keep_seconds, self.keep_files = ret.get("seconds", 0), ret.get("files", 0)
        self.compress = cfg.audit_compress
        self.stopping = self.stopped = False
        self.started = False
        self.log = RateLog()
        self._errors_logged = 0
        self._fd = -1
        self._size = 0
        self._opened = 0.0
        self._day = (0, "")
        self._who: dict = {}  # the writer's cache: a client's part of a line
        self._specs: dict = {}  # command -> its fixed key range (first, last, step), None: ask keyspec
        self._names: dict = {}  # command -> its JSON text
        self._addrs: dict = {}  # backend address -> its JSON text

    # ---- control (PROXY AUDIT, start-up) ----

    def start(self) -> None:
        """Start recording (needs audit_dir); the writer thread starts on first use."""
        if not self.dir:
            raise ValueError("no audit directory: start vproxy with --audit-dir DIR (setting audit_dir)")
        os.makedirs(self.dir, exist_ok=True)
        if not self.started:
            self.started = True
            _start_thread(self._run, ())
        self.on = True
        self.table.select_audit(frozenset(self.classes), gate=self.cfg.mode != "standalone")
        logger.info("audit log on: {} ({})", self.path, ",".join(self.classes))

    def stop(self) -> None:
        self.on = False
        self.table.select_audit(None)
        logger.info("audit log off")

    def set_classes(self, classes: list) -> None:
        self.classes = check_classes(classes)
        if self.on:
            self.table.select_audit(frozenset(self.classes))

    @property
    def path(self) -> str:
        return os.path.join(self.dir, ACTIVE) if self.dir else ""

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for up to timeout seconds), then stop the writer."""
        self.stopping = True
        deadline = monotonic() + timeout
        import gevent

        while self.started and not self.stopped and monotonic() < deadline:
            gevent.sleep(0.01)

    def fields(self) -> dict:
        """INFO `# Proxy` lines."""
        return {"audit_enabled": int(self.on), "audit_dir": self.dir or "none",
                "audit_commands": ",".join(self.classes), "audit_records": self.written,
                "audit_queued": len(self.queue), "audit_dropped": self.dropped, "audit_write_errors": self.errors}

    # ---- the request path (ClientSession.process and flush) ----

    def begin(self, s, batch, idx: int, args: list, raw: bytes) -> Entry | None:
        name = args[0].lower()
        if not self.table.audits(name, args):
            return None
        return Entry(batch, idx, name, args, len(raw), s)

    def finish(self, s, e: Entry, reply) -> None:
        """The reply is known (None: streamed to the client): make the record and queue it. The
        keys and values are picked out in the writer thread, from the request's arguments when they
        are small (SMALL bytes); a big request's are picked out here, so the queue never holds it."""
        us = int((time() - e.start) * 1e6)
        target = e.target
        if target is not None and not isinstance(target, (tuple, str)):
            target = target.addr  # a cluster Sub: where it was last sent (after MOVED/ASK)
        if reply is None:
            outcome, err = "sent", None
        elif reply[:1] == b"-" or (reply[:1] == b"!"):
            err = _error_code(reply)
            outcome = "refused" if target is None and not reply.startswith(b"-ERR vproxy: backend") else "error"
        else:
            outcome, err = "ok", None
        args = e.args if e.size <= SMALL else self._picked(e.name, e.args)
        self.put((e.start, s.id, s.addr, *e.client, e.db, e.name, args, e.size, target,
                  max(us, 0), outcome, err))

    def refused_auth(self, s, user: bytes | None) -> None:
        """An AUTH (or HELLO AUTH) the proxy's users refused: recorded when the audit log is on, whatever
        audit_commands selects (when it selects AUTH, the request's own record says it already). The
        record names the user tried; the password is never written."""
        if not self.on or self.table.audits(b"auth", [b"auth"]):
            return
        self.put((time(), s.id, s.addr, s.name, s.lib_name, s.lib_ver, user or b"default", s.db, b"auth",
                  [b"AUTH"], 0, None, 0, "refused", "WRONGPASS"))

    def finish_plain(self, s, e: tuple, reply: bytes) -> None:
        """finish() of a plain request (AuditTrack): the reply came from its backend."""
        start, name, args, size, db, cname, lib, ver, user, target = e
        c = reply[:1]
        if c == b"-" or c == b"!":
            outcome, err = "error", _error_code(reply)
        else:
            outcome, err = "ok", None
        self.put((start, s.id, s.addr, cname, lib, ver, user, db, name, args if size <= SMALL else self._picked(name, args),
                  size, target, max(int((time() - start) * 1e6), 0), outcome, err))

    def _picked(self, name: bytes, args: list):
        """(subcommand, keys, values): what a record needs of the arguments."""
        cmd = self.table.get(name)
        spec = self._specs.get(name)
        if spec is None or spec[0] is not cmd:  # (the table learned since: a new Command)
            spec = self._specs[name] = (cmd, _simple_keys(cmd, name))
        if spec[1] is not None and not self.values:  # a fixed key range: a slice (most commands)
            first, last, step = spec[1]
            return _Picked(None, args[first:len(args) + last + 1 if last < 0 else last + 1:step], None, len(args))
        sub = self.table.subcommand(name, args)
        pos = key_positions(self.table.get(name), name, args) or ()
        keys = [args[p] for p in pos if p < len(args)]
        values = _values(name, args, pos, self.secret) if self.values else None
        return _Picked(sub, keys, values, len(args))

    def put(self, rec: tuple) -> None:
        q = self.queue
        if len(q) >= self.max_queue:
            self.dropped += 1
            self.log.log("dropped", "WARNING", f"audit: the writer is behind ({len(q)} records queued): "
                         f"records dropped, {self.dropped} so far (INFO proxy audit_dropped)")
            return
        q.append(rec)
        if self.errors != self._errors_logged:
            self._errors_logged = self.errors
            self.log.log("error", "ERROR", f"audit: cannot write {self.path}: {self.last_error} "
                         f"({self.errors} write errors; their records are lost)")

    # ---- the writer thread ----

    def _run(self) -> None:
        """Native thread: drain the queue into the file; rotate, compress, expire. Never logs (the
        loop does, from put): loguru's locks are gevent's here."""
        try:
            self._recover()
        except OSError as e:
            self._failed(e, 0)
        last_tick = 0.0
        q = self.queue
        while True:
            if not q:
                if self.stopping:
                    break
                _sleep(0.01)
                now = time()
                if now - last_tick >= 1.0:
                    last_tick = now
                    self._tick(now)
                continue
            n = min(len(q), 4096)
            recs = [q.popleft() for _ in range(n)]
            try:
                data = "".join(map(self._line, recs)).encode()
                self._write(data)
                self.written += n
            except OSError as e:
                self._failed(e, n)
                _sleep(0.1)
            except Exception as e:  # noqa: BLE001 - a bug must cost these records, not the writer thread
                self._failed(OSError(f"cannot format records: {e!r}"), n)
            if len(q) < 4096 and not self.stopping:
                _sleep(0.01)  # let records gather: fewer, bigger writes, fewer GIL hand-overs
        self._close_file()
        self.stopped = True

    def _failed(self, e: OSError, n: int) -> None:
        self.errors += 1
        self.dropped += n
        self.last_error = str(e)
        self._close_file()

    def _tick(self, now: float) -> None:
        try:
            if self._fd >= 0 and self.rotate_age and now - self._opened >= self.rotate_age:
                self._rotate()
            self._expire(now)
        except OSError as e:
            self._failed(e, 0)

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            self._open()
        view = memoryview(data)
        while view:
            k = os.write(self._fd, view)
            view = view[k:]
        self._size += len(data)
        if self.rotate_size and self._size >= self.rotate_size:
            self._rotate()

    def _open(self) -> None:
        path = self.path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)  # a FIFO blocks here: the test's slow disk
        try:
            st = os.fstat(fd)
            self._size = st.st_size
            if st.st_size:  # a crash may have cut the last line: end it, so that the next one stands alone
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
        except OSError:
            pass
        self._fd, self._opened = fd, time()

    def _close_file(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def _rotate(self) -> None:
        """audit.jsonl -> audit-<UTC now>.jsonl (then .gz); the next write opens a new audit.jsonl."""
        self._close_file()
        now = time()
        stamp = strftime("%Y%m%dT%H%M%S", gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        rotated = os.path.join(self.dir, f"audit-{stamp}.jsonl")
        os.rename(self.path, rotated)
        if self.compress:
            _gzip(rotated)
        self._expire(now)

    def _recover(self) -> None:
        """After a crash: half-done compressions are finished or undone."""
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name.endswith(".gz.tmp"):
                os.unlink(path)
        for name in os.listdir(self.dir):
            m = ROTATED.match(name)
            if m and not m.group(2):
                path = os.path.join(self.dir, name)
                if os.path.exists(path + ".gz"):
                    os.unlink(path)  # compressed already, the crash came before the unlink
                elif self.compress:
                    _gzip(path)

    def _expire(self, now: float) -> None:
        """Delete rotated files older than the retention, and beyond its count."""
        if not (self.keep_seconds or self.keep_files):
            return
        rotated = sorted(n for n in os.listdir(self.dir) if ROTATED.match(n))
        doomed = set()
        if self.keep_files and len(rotated) > self.keep_files:
            doomed.update(rotated[:len(rotated) - self.keep_files])
        if self.keep_seconds:
            for n in rotated:
                try:
                    if now - os.stat(os.path.join(self.dir, n)).st_mtime > self.keep_seconds:
                        doomed.add(n)
                except FileNotFoundError:
                    pass
        for n in doomed:
            try:
                os.unlink(os.path.join(self.dir, n))
            except FileNotFoundError:
                pass

    def _line(self, r: tuple) -> str:
        """One record as a JSON line (by hand, with the client's part cached: ~4x faster than
        json.dumps of a dict)."""
        start, cid, addr, cname, lib, ver, user, db, name, args, size, target, us, outcome, err = r
        if type(args) is _Picked:
            keys, sub, argc, values = args.keys, args.sub, args.argc, args.values
        else:
            spec = self._specs.get(name)
            if spec is not None and spec[1] is not None and not self.values and spec[0] is self.table.get(name):
                first, last, step = spec[1]  # the common case, inline: a fixed key range
                keys, sub, argc, values = args[first:len(args) + last + 1 if last < 0 else last + 1:step], None, \
                    len(args), None
            else:
                picked = self._picked(name, args)
                keys, sub, argc, values = picked.keys, picked.sub, picked.argc, picked.values
        sec = int(start)
        day = self._day
        if day[0] != sec:
            day = self._day = (sec, strftime("%Y-%m-%dT%H:%M:%S", gmtime(sec)))
        who = self._who.get((cid, cname, lib, ver, user, db))
        if who is None:
            if len(self._who) > 10000:
                self._who.clear()
            who = self._who[(cid, cname, lib, ver, user, db)] = (
                f'"node":{_js(self.node)},"client_id":{cid},"client_addr":{_js(_fmt_addr(addr))},'
                f'"client_name":{_js(_text(cname))},"lib_name":{_js(_text(lib))},"lib_ver":{_js(_text(ver))},'
                f'"user":{_js(_text(user) if user is not None else self.default_user)},"db":{db}')
        secret = self.secret
        if secret is not None:
            ks = ",".join(f'"{key_hash(secret, k)}"' for k in keys)
        elif len(keys) == 1:
            ks = _js(keys[0].decode("utf-8", "backslashreplace"))
        else:
            ks = ",".join(_js(_text(k)) for k in keys)
        cmd = self._names.get(name)
        if cmd is None:
            cmd = self._names[name] = _js(_text(name))
        backend = self._addrs.get(target)
        if backend is None:
            backend = self._addrs[target] = _js(_fmt_addr(target))
            if len(self._addrs) > 10000 or len(self._names) > 10000:  # names are the clients': bound them
                self._addrs.clear()
                self._names.clear()
        line = (f'{{"ts":"{day[1]}.{int((start - sec) * 1e6):06d}Z",{who},'
                f'"command":{cmd},"subcommand":{_js(_text(sub)) if sub else "null"},'
                f'"keys":[{ks}],"argc":{argc},"bytes":{size},"backend":{backend},'
                f'"latency_us":{us},"outcome":"{outcome}","error":{_js(err) if err else "null"}')
        if secret is None and values is None:
            return line + "}\n"
        if secret is not None:
            line += ',"keys_hashed":true'
        if values is not None:
            line += ',"args":[' + ",".join(_js(_text(v)) for v in values) + "]"
        return line + "}\n"


def _gzip(path: str) -> None:
    """path -> path.gz, crash-safe: written as .gz.tmp, renamed, then the original removed."""
    tmp = path + ".gz.tmp"
    with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.rename(tmp, path + ".gz")
    os.unlink(path)


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
            out.append(key_hash(secret, a).encode())
        elif len(a) > VALUE_MAX:
            out.append(a[:VALUE_MAX] + b"...(+%d bytes)" % (len(a) - VALUE_MAX))
        else:
            out.append(a)
    return out
