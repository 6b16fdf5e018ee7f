"""The audit log's writer process: record batches from vproxy -> JSON lines, rotated, compressed, expired.

    vproxy (audit.py, in the loop) --frames on a pipe (this process's stdin)--> main()
      -> _Writer.batch: marshal.loads -> one JSON line per record -> one write() per batch
      -> past the size or age limit: audit.jsonl renamed audit-<UTC>.jsonl, gzipped, old ones deleted
      -> after each batch: (written, failed records, write errors, last error) back on stdout

A frame is a 4-byte little-endian length and a marshal dump: the first one the settings (a dict),
every other one a list of records (see RECORD). The formatting, the writes and gzip cost the proxy
nothing: they run here, on another core if there is one, outside the proxy's GIL. EOF on stdin
(vproxy closed the pipe, or died) ends this process once what came is written; SIGINT and SIGTERM
are ignored for that reason (a Ctrl-C or a stop of the process group must not lose the records
that are on their way). Only the standard library: it starts in a fraction of a second.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import marshal
import os
import queue
import re
import select
import shutil
import signal
import struct
import sys
import threading
from json.encoder import encode_basestring as _js
from time import gmtime, strftime, time

from . import hostport

ACTIVE = "audit.jsonl"
ROTATED = re.compile(r"^audit-(\d{8}T\d{6}\.\d{6}Z)\.jsonl(\.gz)?$")
HEADER = struct.Struct("<I")
# A record, as audit.py sends it (a list; marshal keeps it compact):
#   [start (epoch s), who, name, subcommand or None, keys, argc, size, target, end (epoch s),
#    outcome (OUTCOMES index), error code or None, values or None]
#   who = (client id, address, client name, lib name, lib version, user or None, db)
OUTCOMES = ("ok", "error", "refused", "sent")
_STOP = object()  # the housekeeper's last chore


def key_hash(secret: bytes, key: bytes) -> str:
    """The keyed hash written instead of a key (audit_hash_keys): HMAC-SHA256, 16 hex digits."""
    return hmac.new(secret, key, hashlib.sha256).hexdigest()[:16]


def _text(b) -> str:
    return b.decode("utf-8", "backslashreplace") if isinstance(b, bytes) else str(b)


def gzip_file(path: str) -> None:
    """path -> path.gz, crash-safe: written as .gz.tmp, renamed, then the original removed."""
    tmp = path + ".gz.tmp"
    with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.rename(tmp, path + ".gz")
    os.unlink(path)


class Writer:
    """The files of one audit directory: lines appended, rotated, compressed, expired."""

    def __init__(self, cfg: dict):
        self.dir, self.node, self.default_user = cfg["dir"], cfg["node"], cfg["default_user"]
        self.secret = cfg["secret"]
        self.rotate_size, self.rotate_age = cfg["rotate_size"], cfg["rotate_age"]
        self.keep_seconds, self.keep_files = cfg["keep_seconds"], cfg["keep_files"]
        self.compress = cfg["compress"]
        self.written = self.failed = self.errors = 0
        self.last_error = ""
        self._fd = -1
        self._size = 0
        self._opened = 0.0
        self._day = (0, "")
        self._who: dict = {}  # a client's part of a line
        self._names: dict = {}  # command -> its JSON text
        self._addrs: dict = {}  # backend address -> its JSON text
        self._last = (None, None, None, None, None)  # the last record's (who, name, target, sub, _mid)
        self._chores = self._housekeeper = None  # rotated files to compress, expiry (later)

    @property
    def path(self) -> str:
        return os.path.join(self.dir, ACTIVE)

    def batch(self, recs: list) -> None:
        """Write one batch of records (one write); a failure costs the batch, counted."""
        try:
            data = self.lines(recs).encode()
            self.write(data)
            self.written += len(recs)
        except OSError as e:
            self.fail(e, len(recs))
        except Exception as e:  # noqa: BLE001 - a bug must cost these records, not the writer
            self.fail(OSError(f"cannot format records: {e!r}"), len(recs))

    def fail(self, e: OSError, n: int) -> None:
        self.errors += 1
        self.failed += n
        self.last_error = str(e)
        self.close()

    def tick(self, now: float) -> None:
        """Once a second: rotation by age, retention."""
        try:
            if self._fd >= 0 and self.rotate_age and now - self._opened >= self.rotate_age:
                self.rotate()
            self.later(None)
        except OSError as e:
            self.fail(e, 0)

    def later(self, path: str | None) -> None:
        """Hand a rotated file (to compress, then expire the old ones) or None (expire only) to the
        housekeeper thread: gzip takes seconds on a big file, and meanwhile the records must go on
        being read from the pipe (zlib lets go of the GIL while it compresses)."""
        if self._chores is None:
            self._chores = queue.SimpleQueue()
            self._housekeeper = threading.Thread(target=self._housekeep, name="audit-housekeeper", daemon=True)
            self._housekeeper.start()
        self._chores.put(path)

    def _housekeep(self) -> None:
        while True:
            path = self._chores.get()
            if path is _STOP:
                return
            try:
                if path is not None and self.compress:
                    gzip_file(path)
                self.expire(time())
            except OSError as e:
                self.errors += 1
                self.last_error = str(e)

    def finish(self) -> None:
        """At EOF: the file closed, the housekeeper's chores done."""
        self.close()
        if self._housekeeper is not None:
            self._chores.put(_STOP)
            self._housekeeper.join()

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self.open()
        view = memoryview(data)
        while view:
            k = os.write(self._fd, view)
            view = view[k:]
        self._size += len(data)
        if self.rotate_size and self._size >= self.rotate_size:
            self.rotate()

    def open(self) -> None:
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

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def rotate(self) -> None:
        """audit.jsonl -> audit-<UTC now>.jsonl (then .gz); the next write opens a new audit.jsonl."""
        self.close()
        now = time()
        stamp = strftime("%Y%m%dT%H%M%S", gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        rotated = os.path.join(self.dir, f"audit-{stamp}.jsonl")
        os.rename(self.path, rotated)
        self.later(rotated)

    def recover(self) -> None:
        """After a crash: half-done compressions are finished or undone."""
        for name in os.listdir(self.dir):
            if name.endswith(".gz.tmp"):
                os.unlink(os.path.join(self.dir, name))
        for name in os.listdir(self.dir):
            m = ROTATED.match(name)
            if m and not m.group(2):
                path = os.path.join(self.dir, name)
                if os.path.exists(path + ".gz"):
                    os.unlink(path)  # compressed already, the crash came before the unlink
                elif self.compress:
                    gzip_file(path)

    def expire(self, now: float) -> None:
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

    def lines(self, recs: list) -> str:
        """The JSON lines of a batch: line() with the common case inline (one key, no values, no
        hashed keys: the loop's own locals; ~30% less than line() per record)."""
        if self.secret is not None:
            return "".join(map(self.line, recs))
        out = []
        add = out.append
        line = self.line
        day_sec, day = self._day
        last = self._last
        mid = last[4]
        for r in recs:
            start, who, name, sub, keys, argc, size, target, end, outcome, err, values = r
            if values is not None or len(keys) != 1:
                self._day, self._last = (day_sec, day), last
                add(line(r))
                day_sec, day = self._day
                last = self._last
                mid = last[4]
                continue
            sec = int(start)
            if day_sec != sec:
                day_sec, day = sec, strftime("%Y-%m-%dT%H:%M:%S", gmtime(sec))
            if who is not last[0] or name is not last[1] or target is not last[2] or sub is not last[3]:
                mid = self._mid(who, name, target, sub)
                last = (who, name, target, sub, mid)
            us = int((end - start) * 1e6)
            add(f'{{"ts":"{day}.{int((start - sec) * 1e6):06d}Z",{mid[0]}"keys":['
                f'{_js(keys[0].decode("utf-8", "backslashreplace"))}],"argc":{argc},"bytes":{size},{mid[1]}'
                f'"latency_us":{us if us > 0 else 0},"outcome":"{OUTCOMES[outcome]}",'
                f'"error":{_js(err) if err else "null"}}}\n')
        self._day, self._last = (day_sec, day), last
        return "".join(out)

    def line(self, r) -> str:
        """One record as a JSON line, by hand (~4x faster than json.dumps of a dict). What the
        records of one read share (the client, the command, the backend: one object each in the
        batch, as the proxy made them) is formatted once for them all (`_mid`)."""
        start, who, name, sub, keys, argc, size, target, end, outcome, err, values = r
        sec = int(start)
        day = self._day
        if day[0] != sec:
            day = self._day = (sec, strftime("%Y-%m-%dT%H:%M:%S", gmtime(sec)))
        last = self._last
        if who is not last[0] or name is not last[1] or target is not last[2] or sub is not last[3]:
            last = self._last = (who, name, target, sub, self._mid(who, name, target, sub))
        secret = self.secret
        if secret is not None:
            ks = ",".join(f'"{key_hash(secret, k)}"' for k in keys)
        elif len(keys) == 1:
            ks = _js(keys[0].decode("utf-8", "backslashreplace"))
        else:
            ks = ",".join(_js(_text(k)) for k in keys)
        us = int((end - start) * 1e6)
        line = (f'{{"ts":"{day[1]}.{int((start - sec) * 1e6):06d}Z",{last[4][0]}"keys":[{ks}],"argc":{argc},'
                f'"bytes":{size},{last[4][1]}"latency_us":{us if us > 0 else 0},"outcome":"{OUTCOMES[outcome]}",'
                f'"error":{_js(err) if err else "null"}')
        if secret is None and values is None:
            return line + "}\n"
        if secret is not None:
            line += ',"keys_hashed":true'
        if values is not None:
            line += ',"args":[' + ",".join(_js(_text(v)) for v in values) + "]"
        return line + "}\n"

    def _mid(self, who, name, target, sub) -> tuple:
        """The parts of a line from the client's fields to the subcommand, and the backend's."""
        w = self._who.get(who)
        if w is None:
            if len(self._who) > 10000:
                self._who.clear()
            cid, addr, cname, lib, ver, user, db = who
            w = self._who[who] = (
                f'"node":{_js(self.node)},"client_id":{cid},"client_addr":{_js(hostport.show(addr))},'
                f'"client_name":{_js(_text(cname))},"lib_name":{_js(_text(lib))},"lib_ver":{_js(_text(ver))},'
                f'"user":{_js(_text(user) if user is not None else self.default_user)},"db":{db}')
        cmd = self._names.get(name)
        if cmd is None:
            cmd = self._names[name] = _js(_text(name))
        backend = self._addrs.get(target)
        if backend is None:
            backend = self._addrs[target] = _js(hostport.show(target))
            if len(self._addrs) > 10000 or len(self._names) > 10000:  # names are the clients': bound them
                self._addrs.clear()
                self._names.clear()
        return (f'{w},"command":{cmd},"subcommand":{_js(_text(sub)) if sub else "null"},',
                f'"backend":{backend},')


class Frames:
    """Length-prefixed frames out of a byte stream."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list:
        buf = self.buf
        buf += data
        out, pos = [], 0
        while len(buf) - pos >= 4:
            (n,) = HEADER.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return out


def frame(obj) -> bytes:
    data = marshal.dumps(obj)
    return HEADER.pack(len(data)) + data


def main() -> int:
    """Read frames from stdin until EOF; report to stdout after each read's batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    frames = Frames()
    writer = None
    reported = None
    last_tick = 0.0
    while True:
        ready, _, _ = select.select([rfd], [], [], 1.0)
        data = os.read(rfd, 1 << 20) if ready else None
        if data == b"":
            break
        for f in frames.feed(data) if data else ():
            obj = marshal.loads(f)
            if writer is None:
                writer = Writer(obj)
                try:
                    writer.recover()
                except OSError as e:
                    writer.fail(e, 0)
            else:
                writer.batch(obj)
        now = time()
        if writer is not None and now - last_tick >= 1.0:
            last_tick = now
            writer.tick(now)
        if writer is not None:
            status = (writer.written, writer.failed, writer.errors, writer.last_error)
            if status != reported:
                reported = status
                os.write(wfd, frame(status))
    if writer is not None:
        writer.finish()
        os.write(wfd, frame((writer.written, writer.failed, writer.errors, writer.last_error)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
