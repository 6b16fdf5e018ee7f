"""The fleet (fleet = true): vproxy nodes and workers in front of one backend find each other; CLIENT
LIST, CLIENT KILL and PROXY NODES cover them all; a node that dies or hangs leaves the view."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from conftest import Proxy, Server, wait_for

from vproxy.embedded import free_port, stop_process

FLEET = ("--fleet", "--fleet-interval", "0.2")


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def nodes(c) -> list[dict]:
    rows = c.execute_command("PROXY", "NODES")
    return [r if isinstance(r, dict) else dict(zip(r[::2], r[1::2])) for r in rows]


def listed(c, *args) -> dict[str, str]:
    """CLIENT LIST [args] through c: client name -> its proxy= field."""
    text = c.execute_command("CLIENT", "LIST", *args)
    text = text.decode() if isinstance(text, bytes) else text
    out = {}
    for line in text.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split(" ") if "=" in kv)
        out[fields.get("name", "")] = fields.get("proxy", "")
    return out


def test_nodes_find_each_other_and_answer_for_all(server):
    server.client().flushall()
    a, b = Proxy("--backend", server.addr, *FLEET), Proxy("--backend", server.addr, *FLEET)
    try:
        ca, cb = a.client(), b.client()
        ca.client_setname("on-a")
        cb.client_setname("on-b")
        wait_for(lambda: len(nodes(ca)) == 2 and len(nodes(cb)) == 2, what="the nodes to hear each other")
        seen = listed(ca)
        assert {"on-a", "on-b"} <= set(seen) and seen["on-a"] != seen["on-b"] and all(seen.values())
        assert "on-b" not in listed(ca, "LOCAL") and "on-a" in listed(ca, "LOCAL")
        assert ca.client_id() != cb.client_id()
        info = wait_for(lambda: (lambda i: i if i["fleet_clients"] >= 2 else None)(ca.info("proxy")),
                        what="the heartbeats to count both clients")
        assert info["fleet_nodes"] == 2
        # CLIENT KILL through one node reaches a client of the other
        victim = cb.client_id()
        assert ca.execute_command("CLIENT", "KILL", "ID", victim) == 1
        assert cb.client_id() != victim  # redis-py had to connect again: the old connection was closed
        assert ca.execute_command("CLIENT", "KILL", "ID", victim) == 0
        assert server.client().dbsize() == 0  # nothing written into the user's keyspace
        # a node that hangs: the others answer without it, within about a second, and say so
        b.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.monotonic()
            assert "on-a" in listed(ca)
            assert time.monotonic() - t < 3
            assert ca.info("proxy")["fleet_unreachable"] >= 1 or len(nodes(ca)) == 1
        finally:
            b.proc.send_signal(signal.SIGCONT)
        # a node that dies leaves the view within three heartbeat intervals
        os.kill(b.proc.pid, signal.SIGKILL)
        # (both views: a heartbeat the node sent just before it died may still be read after the
        # first look dropped it, and count it once more until it ages out too)
        wait_for(lambda: len(nodes(ca)) == 1 and ca.info("proxy")["fleet_nodes"] == 1, timeout=5,
                 what="the dead node to leave")
    finally:
        a.stop()
        b.stop()


def test_workers_in_a_fleet_list_each_others_clients(server):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}", "--backend", server.addr,
                             "--workers", "2", *FLEET, "--log-level", "WARNING"])
    try:
        clients = []

        def both_workers():
            c = redis.Redis(port=port, socket_timeout=5)
            c.client_setname(f"w{len(clients)}")
            clients.append(c)
            return len({x.info("proxy")["proxy_pid"] for x in clients}) == 2
        wait_for(both_workers, timeout=30, what="clients on both workers")
        wait_for(lambda: all(len(nodes(c)) == 2 for c in clients), what="the workers to hear each other")
        names = {f"w{i}" for i in range(len(clients))}
        for c in (clients[0], clients[-1]):
            seen = listed(c)
            assert names <= set(seen)
            assert {seen[n].rsplit("/", 1)[1] for n in names} == {"0", "1"}  # proxy=host:port/worker
    finally:
        stop_process(proc, 15)


def test_without_fleet_the_view_is_local(server):
    p = Proxy("--backend", server.addr)
    try:
        c = p.client()
        c.client_setname("solo")
        assert listed(c) == {"solo": ""}  # no proxy= field: the server's own format
        assert [n[b"self"] for n in nodes(c)] == [1]
    finally:
        p.stop()


def test_fleet_with_users_and_no_password(server, tmp_path):
    """With users at the proxy and no `password`, the nodes ask each other as the user vproxy-fleet
    (fleet_password), which may ask those two questions and nothing else; a reload changes it."""
    from conftest import GateProxy, RawClient

    conf = tmp_path / "fleet.toml"
    conf.write_text('fleet_password = "f-secret"\n')
    users = ("--users", "admin on >adminpw allkeys allchannels allcommands", "-c", str(conf))
    a, b = GateProxy("--backend", server.addr, *FLEET, *users), GateProxy("--backend", server.addr, *FLEET, *users)
    try:
        ca, cb = a.client(), b.client()
        ca.client_setname("gated-a")
        cb.client_setname("gated-b")
        wait_for(lambda: len(nodes(ca)) == 2, what="the nodes to hear each other")
        seen = listed(ca)
        assert {"gated-a", "gated-b"} <= set(seen) and seen["gated-a"] != seen["gated-b"]
        assert ca.info("proxy")["fleet_unreachable"] == 0
        with RawClient(b.port) as peer:
            assert peer.call("AUTH", "vproxy-fleet", "wrong").startswith(b"-WRONGPASS")
            assert peer.call("AUTH", "vproxy-fleet", "f-secret") == b"+OK\r\n"
            assert b"gated-b" in peer.call("PROXY", "CLIENTS-LOCAL")
            for req in (("GET", "k"), ("PROXY", "RELOAD"), ("CLIENT", "LIST"), ("FLUSHALL",)):
                assert peer.call(*req).startswith(b"-NOPERM"), req
        assert "vproxy-fleet" not in ca.execute_command("ACL", "USERS")
        conf.write_text('fleet_password = "f-new"\n')  # a rolling change: every node reloads
        for c in (ca, cb):
            c.execute_command("PROXY", "RELOAD")
        with RawClient(b.port) as peer:
            assert peer.call("AUTH", "vproxy-fleet", "f-secret").startswith(b"-WRONGPASS")
            assert peer.call("AUTH", "vproxy-fleet", "f-new") == b"+OK\r\n"
        assert "gated-b" in listed(ca)
    finally:
        a.stop()
        b.stop()
