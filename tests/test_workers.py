"""--workers N: a supervisor and N processes sharing the listen port; restarts; stopping them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import redis
from conftest import Server, wait_for

from vproxy.embedded import free_port, stop_process
from vproxy.workers import worker_args

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="workers need SO_REUSEPORT")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return {int(x) for x in out.split()}


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def supervisor(server):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}", "--backend",
                             server.addr, "--workers", "2", "--log-level", "WARNING"])
    wait_for(lambda: redis.Redis(port=port, socket_timeout=2).ping(), timeout=30, what="the workers")
    yield proc, port
    stop_process(proc, 15)


def worker_pids(port: int, tries: int = 40) -> set[int]:
    pids = set()
    for _ in range(tries):  # new connections: the kernel spreads them over the workers
        c = redis.Redis(port=port, socket_timeout=5)
        pids.add(c.info("proxy")["proxy_pid"])
        c.close()
    return pids


def test_workers_share_the_port_and_one_keyspace(supervisor):
    proc, port = supervisor
    pids = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(port)), what="both workers serving")
    assert pids == children(proc.pid)
    clients = [redis.Redis(port=port, socket_timeout=5) for _ in range(30)]
    by_pid: dict = {}
    for c in clients:
        by_pid.setdefault(c.info("proxy")["proxy_pid"], []).append(c)
    ids = [c.client_id() for c in clients]
    assert len(set(ids)) == len(ids)  # unique across the workers
    if len(by_pid) == 2:  # the same data through either worker
        a, b = (v[0] for v in by_pid.values())
        a.set("shared", "x")
        assert b.get("shared") == b"x"
    for c in clients:
        c.close()


def test_a_dead_worker_is_started_again(supervisor):
    proc, port = supervisor
    pids = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(worker_pids(port)), what="both workers serving")
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    new = wait_for(lambda: (lambda p: p if len(p) == 2 and victim not in p else None)(worker_pids(port)),
                   timeout=20, what="a new worker in the dead one's place")
    assert proc.poll() is None and len(new - pids) == 1


def test_sigterm_stops_every_worker(server):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}", "--backend",
                             server.addr, "--workers", "2", "--log-level", "WARNING"])
    try:
        wait_for(lambda: len(worker_pids(port, 20)) == 2, timeout=30, what="both workers")
        kids = children(proc.pid)
        assert len(kids) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_for(lambda: not any(alive(k) for k in kids), what="the workers to stop")
    finally:
        stop_process(proc, 10)


def test_embedded_server_is_shared_and_stopped():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}", "--workers", "2",
                             "--log-level", "WARNING"])
    try:
        wait_for(lambda: len(worker_pids(port, 20)) == 2, timeout=30, what="both workers")
        backends = {redis.Redis(port=port).info("proxy")["proxy_backends"] for _ in range(20)}
        assert len(backends) == 1  # one embedded server, fronted by both
        kids = children(proc.pid)
        assert len(kids) == 3  # the server and two workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_for(lambda: not any(alive(k) for k in kids), what="workers and embedded server to stop")
    finally:
        stop_process(proc, 10)


def test_a_taken_address_stops_the_supervisor(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}", "--backend",
                              server.addr, "--workers", "2"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert "cannot listen on" in out.stderr and "could not start" in out.stderr


def test_worker_command_line():
    argv = ["-c", "x.toml", "--workers", "4", "--embedded", "--admin-listen=1.2.3.4:9"]
    assert worker_args(argv, 2, None) == ["-c", "x.toml", "--embedded", "--admin-listen=1.2.3.4:9", "--workers",
                                          "1", "--worker-index", "2"]
    assert worker_args(["--workers=auto", "--embedded"], 0, "127.0.0.1:5") == [
        "--workers", "1", "--worker-index", "0", "--no-embedded", "--backend", "127.0.0.1:5"]


def test_sighup_reaches_every_worker(server, tmp_path):
    conf = tmp_path / "vproxy.toml"
    conf.write_text(f'backend = ["{server.addr}"]\ncommand_timeout = 5.0\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "-c", str(conf), "--listen", f"127.0.0.1:{port}",
                             "--workers", "2", "--log-level", "WARNING"])

    def timeouts() -> dict:
        out = {}
        for _ in range(30):
            c = redis.Redis(port=port, socket_timeout=5)
            reply = c.execute_command("PROXY", "CONFIG", "GET", "command_timeout")
            out[c.info("proxy")["proxy_pid"]] = reply[1] if isinstance(reply, list) else reply[b"command_timeout"]
            c.close()
        return out
    try:
        wait_for(lambda: len(timeouts()) == 2, timeout=30, what="both workers")
        conf.write_text(f'backend = ["{server.addr}"]\ncommand_timeout = 1.5\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (lambda t: len(t) == 2 and set(t.values()) == {b"1.5"})(timeouts()), timeout=20,
                 what="both workers to reload")
    finally:
        stop_process(proc, 15)
