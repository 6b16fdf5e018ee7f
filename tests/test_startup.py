"""Start-up: no request is answered differently because vproxy has only just started.

Until vproxy has read the server's COMMAND table it only has its built-in fallback; clients are
accepted at once but served once the table is read, or once startup_wait has passed (then a down
backend gets vproxy's clear error, never a hang)."""

from __future__ import annotations

import socket
import time

import pytest
from clusterkit import Cluster
from conftest import Proxy, RawClient

from vproxy.embedded import free_port

E = RawClient.encode


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("valkey", 3)
    yield c
    c.stop()


class AcceptingProxy(Proxy):
    """Up as soon as its port accepts a connection (no PING answered yet): to talk to it while it starts."""

    def _up(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"vproxy exited with {self.proc.returncode}")
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        return True


@pytest.fixture
def started():
    procs = []

    def start(cls, *args, **kw):
        p = cls(*args, wait_learned=False, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def test_cross_slot_commands_are_split_right_after_start(cluster, started, tmp_path):
    cluster.flushall()
    for k in ("a", "b", "c"):  # three slots, on three nodes
        cluster.client_for(k).sadd(k, k)
    log = tmp_path / "vproxy.log"
    p = started(Proxy, "--mode", "cluster", "--backend", cluster.seeds[0], "--log-level", "INFO", log_path=log)
    with RawClient(p.port) as c:
        c.send(E("EXISTS", "a", "b", "c", "nope") + E("SUNIONSTORE", "{a}u", "a", "b", "c"))
        assert c.read_n(2) == [b":3\r\n", b":3\r\n"]
    assert cluster.client_for("{a}u").smembers("{a}u") == {b"a", b"b", b"c"}
    # the start-up line says the databases beyond 0 are vproxy's emulation, not the cluster's
    line = next(x for x in log.read_text().splitlines() if "learned" in x)  # logged before serving
    assert "16 databases (the cluster serves db 0; 1-15 are emulated by vproxy as key namespaces)" in line


def test_transaction_right_after_start_is_queued_like_the_server_does(cluster, started):
    cluster.flushall()
    p = started(Proxy, "--mode", "cluster", "--backend", cluster.seeds[0])
    with RawClient(p.port) as c:
        c.send(E("MULTI") + E("INCR", "n") + E("INCRBY", "n", "2") + E("EXEC"))
        assert c.read_n(4) == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"*2\r\n:1\r\n:3\r\n"]


def test_request_sent_while_the_backend_starts_gets_its_answer(started, start_server):
    port = free_port()
    p = started(AcceptingProxy, "--backend", f"127.0.0.1:{port}", "--startup-wait", "15")
    with RawClient(p.port, timeout=20) as c:
        c.send(E("INCR", "n"))  # the backend is not even started: the request waits for it
        start_server("valkey", port=port)
        assert c.read() == b":1\r\n"


def test_backend_down_at_start_gets_the_clear_error_after_startup_wait(started):
    port = free_port()
    p = started(AcceptingProxy, "--backend", f"127.0.0.1:{port}", "--startup-wait", "1")
    with RawClient(p.port, timeout=20) as c:
        began = time.monotonic()
        reply = c.call("GET", "k")
        assert reply.startswith(f"-ERR vproxy: backend 127.0.0.1:{port} unavailable".encode())
        assert time.monotonic() - began < 10
        # still connected; PING goes to the backend too, so it says the same (not PONG)
        assert c.call("PING").startswith(f"-ERR vproxy: backend 127.0.0.1:{port} unavailable".encode())


def test_client_without_subcommand_answers_before_the_table_is_learned(start_proxy):
    """Backend not up yet (built-in command table, no arity for CLIENT): a bare CLIENT gets -ERR."""
    from vproxy.embedded import free_port

    p = start_proxy("--backend", f"127.0.0.1:{free_port()}", wait_learned=False)
    with RawClient(p.port) as c:
        assert c.call("CLIENT") == b"-ERR wrong number of arguments for 'client' command\r\n"
        assert c.call("PING").startswith(b"-ERR vproxy: backend ")  # the backend is down: PING says so
