"""The audit log's writer process: record batches from vproxy -> JSON lines, rotated, compressed, expired.

    vproxy (audit.py, in the loop) --frames on a pipe (this process's stdin)--> main()
      -> Writer.batch: marshal.loads -> one JSON line per record (auditfmt.py) -> one write() per batch
      -> past the size or age limit: audit.jsonl renamed audit-<UTC>.jsonl, gzipped by a child
         process at idle priority (compress_idle), old ones deleted
      -> after each batch: (written, failed records, write errors, last error) back on stdout

A frame is a 4-byte little-endian length and a marshal dump: the first one the settings (a dict),
every other one a batch of records, packed: (n, pack, objs) (auditfmt.REC, Batch). The formatting, the writes and gzip
cost the proxy nothing: they run here, on another core if there is one, outside the proxy's GIL;
gzip waits for idle CPU. EOF on stdin
(vproxy closed the pipe, or died) ends this process once what came is written; SIGINT and SIGTERM
are ignored for that reason (a Ctrl-C or a stop of the process group must not lose the records
that are on their way). Only the standard library (and vproxy.auditfmt, with its compiled twin
when built: twins.py): it starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import marshal
import os
import queue
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
from time import gmtime, strftime, time

from .auditfmt import OUTCOMES, STRIDE, Formatter, key_hash  # noqa: F401 - key_hash: audit.py's and auditquery's

ACTIVE = "audit.jsonl"
ROTATED = re.compile(r"^audit-(\d{8}T\d{6}\.\d{6}Z)\.jsonl(\.gz)?$")
TMP = re.compile(r"^audit-.*\.jsonl\.gz(\.\d+)?\.tmp$")  # a compression under way (gzip_file), or cut short
HEADER = struct.Struct("<I")
# A batch, as audit.py sends it: (n, pack, objs), the records packed (auditfmt.REC, Batch), whose
# fields are (auditfmt.FIELDS):
#   start (epoch s), who, name, subcommand or None, keys, argc, size, target, values or None,
#   end (epoch s), outcome (OUTCOMES index), error code or None
#   who = (client id, address, client name, lib name, lib version, user or None, db)
# (Writer.batch also takes them as one flat list, STRIDE fields a record.)
_STOP = object()  # the housekeeper's last chore


def gzip_file(path: str) -> None:
    """path -> path.gz, crash-safe: written as path.gz.<pid>.tmp (the reader skips it, a writer's
    recover() deletes it), renamed, then the original removed. The pid: a compression that a
    killed writer left running must not rename a newer one's half-written file."""
    tmp = f"{path}.gz.{os.getpid()}.tmp"
    try:
        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except FileNotFoundError:
        if os.path.exists(path + ".gz"):  # compressed meanwhile by another (see recover)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            return
        raise
    os.rename(tmp, path + ".gz")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def idle_priority() -> str:
    """This process to the lowest CPU priority there is: SCHED_IDLE (Linux: it runs only when no
    other thread wants the core), else nice 19. Returns which."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        return "nice 19"
    except (AttributeError, OSError):
        return "normal"


def compress_idle(path: str) -> None:
    """gzip_file(path) in a short-lived child process at the lowest CPU priority (idle_priority).

    Why a process and not this process's housekeeper thread with a lowered priority: the thread
    shares the writer's GIL, and a thread that holds it when the scheduler leaves it waiting
    (which is what its low priority is for, under load) stalls the main thread: the records stop
    being read. A child has its own interpreter; it starts in ~30 ms, once a rotated file (every
    ~300,000 records at the default 100 MB). Under saturation it waits for idle CPU instead of
    taking it from the proxy, the server and the clients: compression may lag, nothing is lost
    (the uncompressed file stays until its .gz is complete)."""
    proc = subprocess.run([sys.executable, "-m", "vproxy.auditwriter", "--gzip", path], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True)
    if proc.returncode:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"cannot compress {path}: {err[-1] if err else f'exit status {proc.returncode}'}")


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
        self.fmt = Formatter(self.node, self.default_user, self.secret)  # records -> JSON lines
        self._chores = self._housekeeper = None  # rotated files to compress, expiry (later)

    @property
    def path(self) -> str:
        return os.path.join(self.dir, ACTIVE)

    def batch(self, obj) -> None:
        """Write one batch of records in one write: packed, (n, pack, objs) as audit.py sends it
        (auditfmt.Batch), or a flat list of STRIDE fields a record; a failure costs the batch, counted."""
        packed = type(obj) is tuple
        n = obj[0] if packed else len(obj) // STRIDE
        try:
            data = self.fmt.packed(*obj) if packed else self.fmt.lines(obj)
            self.write(data)
            self.written += n
        except OSError as e:
            self.fail(e, n)
        except Exception as e:  # noqa: BLE001 - a bug must cost these records, not the writer
            self.fail(OSError(f"cannot format records: {e!r}"), n)

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
                    compress_idle(path)
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
        """After a crash: half-done compressions are undone, then finished (by the housekeeper,
        at idle priority). A compression a killed writer left running loses its file here: its
        rename then fails, and the file is compressed again."""
        for name in os.listdir(self.dir):
            if TMP.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))
        for name in sorted(os.listdir(self.dir)):
            m = ROTATED.match(name)
            if m and not m.group(2):
                path = os.path.join(self.dir, name)
                if os.path.exists(path + ".gz"):
                    os.unlink(path)  # compressed already, the crash came before the unlink
                elif self.compress:
                    self.later(path)

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

    def lines(self, flat: list) -> bytes:
        """The JSON lines of a batch (auditfmt.py: the format, and its compiled twin)."""
        return self.fmt.lines(flat)

    def line(self, r) -> bytes:
        """One record's JSON line (its STRIDE fields): the same definition as lines()."""
        return self.fmt.line(r)


class Frames:
    """Length-prefixed frames out of a byte stream."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data) -> list:
        """The whole frames that data completes. Those wholly in data are views of it (no copy: use
        them before data changes, as main() does with its read buffer); the others are bytes."""
        buf = self.buf
        if buf:
            buf += data
            src = buf
        else:
            src = memoryview(data)
        out, pos, end = [], 0, len(src)
        while end - pos >= 4:
            (n,) = HEADER.unpack_from(src, pos)
            if end - pos - 4 < n:
                break
            out.append(src[pos + 4:pos + 4 + n] if src is not buf else bytes(memoryview(buf)[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if src is buf:
            del buf[:pos]
        elif pos < end:
            buf += src[pos:]  # a frame's beginning: kept until the rest comes
        return out


def frame(obj) -> bytes:
    data = marshal.dumps(obj)
    return HEADER.pack(len(data)) + data


def main() -> int:
    """Read frames from stdin until EOF; report to stdout after each read's batches. With
    `--gzip PATH`: compress one rotated file at idle priority (compress_idle's child)."""
    if sys.argv[1:2] == ["--gzip"]:
        idle_priority()
        gzip_file(sys.argv[2])
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The records (lists, thousands a batch, freed once written) hold no cycles: the cyclic
    # collector's passes over them cost ~10% of this process's CPU. It runs once a minute instead.
    gc.disable()
    collected = time()
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    frames = Frames()
    chunk = bytearray(1 << 20)  # every read's buffer (a new 1 MB bytes a read was an mmap and a munmap)
    view = memoryview(chunk)
    writer = None
    reported = None
    last_tick = 0.0
    while True:
        ready, _, _ = select.select([rfd], [], [], 1.0)
        n = os.readv(rfd, [chunk]) if ready else -1
        if n == 0:
            break
        for f in frames.feed(view[:n]) if n > 0 else ():
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
            if now - collected >= 60:
                collected = now
                gc.collect()
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
