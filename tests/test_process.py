"""The vproxy process and the embedded valkey-server it may start: the server never outlives vproxy
(failed start, SIGKILL), and a start that cannot listen says where and why, without a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import Proxy, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; parent-death "
                                "signal is Linux only")


def _servers_in(tmp: str) -> list[int]:
    """Pids of live processes working in a directory under tmp: the embedded server runs in its data
    directory, made under the TMPDIR vproxy got (the server's title hides its argv, not its cwd)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:  # gone meanwhile (a zombie has no cwd either)
            continue
        if cwd.startswith(tmp + os.sep):
            found.append(int(pid))
    return found


@pytest.fixture
def tmp(tmp_path):
    """The TMPDIR of one test's vproxy; a server still working there afterwards is killed by its pid."""
    yield str(tmp_path)
    for pid in _servers_in(str(tmp_path)):  # what the old code left behind: never leak it
        os.kill(pid, signal.SIGKILL)


def test_taken_listen_address_fails_cleanly_and_starts_no_server(tmp):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for _ in range(2):  # a service manager retrying must not pile servers up either
            out = subprocess.run([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}"], check=False,
                                 capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": tmp})
            assert out.returncode == 1
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
            assert "Traceback" not in out.stderr
    assert _servers_in(tmp) == []


def test_embedded_server_dies_with_a_killed_vproxy(tmp):
    p = Proxy(env={"TMPDIR": tmp})  # no backend: vproxy starts and fronts its own server
    try:
        assert p.client().set("k", "v") is True
        assert len(_servers_in(tmp)) == 1
    finally:
        p.proc.send_signal(signal.SIGKILL)
        p.stop()
    wait_for(lambda: _servers_in(tmp) == [], what="the embedded server to die with vproxy")
