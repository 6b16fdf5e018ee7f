"""The one transaction model (vproxy/transaction.py) in both modes: its state transitions, and what a
client sees of them: CLIENT LIST's watch=/multi=/flags while WATCH and MULTI are on, the pinned
connection given back after EXEC, a cross-slot request refused inside a cluster MULTI."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from clusterkit import Cluster
from conftest import BACKENDS, Proxy, RawClient, wait_for
from test_pinning import pinned, wait_unpinned

from vproxy import transaction as tx
from vproxy.transaction import ENDING, FAILED, IDLE, QUEUED, WATCHING

# ---- the state machine, on a stand-in session ----


def _session(lease=None):
    return SimpleNamespace(tx=IDLE, lease=lease, pin_slot=None)


def test_watch_multi_exec_with_a_lease():
    s = _session(lease=object())
    tx.watch(s)
    assert s.tx == WATCHING and tx.watching(s) and tx.pinned(s) and not tx.in_multi(s)
    tx.multi(s)
    assert s.tx == WATCHING | QUEUED and tx.in_multi(s) and s.tx >= QUEUED
    tx.fail(s)
    assert tx.failed(s) and tx.in_multi(s)
    tx.end_pinned(s)  # EXEC: the lease waits for its reply, no longer pinned
    assert s.tx == ENDING and tx.ending(s) and not tx.pinned(s) and not tx.in_multi(s) and not tx.watching(s)
    assert s.tx < QUEUED  # the hot paths' "outside MULTI"
    tx.released(s)
    assert s.tx == IDLE


def test_fail_outside_multi_changes_nothing_and_multi_keeps_an_ending_lease():
    s = _session(lease=object())
    tx.fail(s)
    assert s.tx == IDLE
    tx.end_pinned(s)
    tx.multi(s)  # cluster: a MULTI pipelined behind an EXEC whose lease is still ending
    assert s.tx == ENDING | QUEUED and tx.ending(s) and tx.in_multi(s)
    tx.end_multi(s)
    assert s.tx == ENDING
    s.lease = None
    tx.end_pinned(s)  # MULTI without a lease (it failed, or a cluster MULTI): straight back to IDLE
    assert s.tx == IDLE and not tx.ending(s)


def test_the_cluster_slot_binding_ends_with_the_transaction():
    s = _session(lease=object())
    tx.watch(s)
    tx.bind_slot(s, 7)
    tx.multi(s)
    tx.end_multi(s)
    assert tx.slot(s) == 7  # EXEC is being sent: the WATCH still holds it
    tx.end_pinned(s)
    assert tx.slot(s) is None and tx.ending(s)
    assert FAILED > QUEUED > ENDING > WATCHING > IDLE


# ---- what a client sees ----


def _fields(c: RawClient, client_id: bytes) -> dict:
    line = c.call("CLIENT", "LIST", "ID", client_id).decode()
    return dict(re.findall(r"(\w+)=(\S*)", line))


def _watch_multi_exec(proxy_port: int, key: str, check_pinned) -> None:
    with RawClient(proxy_port) as c, RawClient(proxy_port) as look:
        cid = c.call("CLIENT", "ID")[1:-2]
        f = _fields(look, cid)
        assert (f["flags"], f["multi"], f["watch"]) == ("N", "-1", "0")
        assert c.call("WATCH", key) == b"+OK\r\n"
        f = _fields(look, cid)
        assert (f["flags"], f["multi"], f["watch"]) == ("N", "-1", "1")
        check_pinned(1)
        assert c.call("MULTI") == b"+OK\r\n"
        assert c.call("SET", key, "1") == b"+QUEUED\r\n"
        f = _fields(look, cid)
        assert (f["flags"], f["multi"], f["watch"]) == ("x", "0", "1")
        assert c.call("EXEC") == b"*1\r\n+OK\r\n"
        f = _fields(look, cid)
        assert (f["flags"], f["multi"], f["watch"]) == ("N", "-1", "0")
        check_pinned(0)
        assert c.call("GET", key) == b"$1\r\n1\r\n"


def test_standalone_watch_multi_exec(proxy, raw):
    wait_unpinned(proxy)
    _watch_multi_exec(proxy.port, "txk", lambda n: wait_unpinned(proxy, n))


@pytest.fixture(scope="module")
def cluster_proxy():
    c = Cluster(BACKENDS[0], 3)
    p = Proxy("--mode", "cluster", *[a for s in c.seeds[:2] for a in ("--backend", s)])
    try:
        wait_for(lambda: p.client().execute_command("DBSIZE") == 0 or True, what="slot map")
        yield p
    finally:
        p.stop()
        c.stop()


def test_cluster_watch_multi_exec(cluster_proxy):
    p = cluster_proxy
    _watch_multi_exec(p.port, "{t}k", lambda n: wait_for(lambda: pinned(p) == n, what=f"{n} pinned"))


def test_cluster_multi_refuses_another_slot(cluster_proxy):
    with RawClient(cluster_proxy.port) as c:
        assert c.call("MULTI") == b"+OK\r\n"
        assert c.call("SET", "{a}k", "1") == b"+QUEUED\r\n"
        assert c.call("SET", "{b}k", "1").startswith(b"-CROSSSLOT vproxy: this transaction is bound to slot")
        assert c.call("EXEC").startswith(b"-EXECABORT")
        assert c.call("EXISTS", "{a}k") == b":0\r\n"
        assert c.call("MULTI") == b"+OK\r\n"  # the next transaction binds a slot of its own
        assert c.call("SET", "{b}k", "2") == b"+QUEUED\r\n"
        assert c.call("EXEC") == b"*1\r\n+OK\r\n"


def test_cluster_transaction_pipelined_behind_a_watched_one_binds_its_own_slot(cluster_proxy):
    """The slot of a WATCH ends with its EXEC (or UNWATCH), not when its connection is given back:
    a second transaction in the same pipeline may use another slot."""
    with RawClient(cluster_proxy.port) as c:
        for ender in ([b"MULTI"], [b"SET", b"{a}w", b"1"], [b"EXEC"]), ([b"UNWATCH"],):
            c.send(b"".join(RawClient.encode(*a) for a in [[b"WATCH", b"{a}w"], *ender, [b"MULTI"],
                                                           [b"SET", b"{b}w", b"2"], [b"EXEC"]]))
            out = c.read_n(len(ender) + 4)
            assert out[-2:] == [b"+QUEUED\r\n", b"*1\r\n+OK\r\n"], out


def _client_in_multi(port: int, other_port: int, key: str) -> None:
    """CLIENT SETNAME / GETNAME / ID / INFO queued in MULTI answer about the client's vproxy session
    (they reached the pinned backend connection: its id, its name), SETNAME applied by EXEC only."""
    with RawClient(port) as c, RawClient(other_port) as other:
        own_id = c.call("CLIENT", "ID")[1:-2]
        assert c.call("CLIENT", "SETNAME", "before") == b"+OK\r\n"
        c.send(E("MULTI") + E("CLIENT", "SETNAME", "in-tx") + E("CLIENT", "GETNAME") + E("SET", key, "1")
               + E("CLIENT", "ID") + E("CLIENT", "INFO") + E("EXEC") + E("CLIENT", "GETNAME"))
        out = c.read_n(8)
        assert out[:6] == [b"+OK\r\n"] + [b"+QUEUED\r\n"] * 5
        head = b"*5\r\n+OK\r\n$5\r\nin-tx\r\n+OK\r\n:" + own_id + b"\r\n"
        assert out[6].startswith(head), out[6]
        assert b"id=" + own_id + b" " in out[6] and b"name=in-tx " in out[6]
        assert out[7] == b"$5\r\nin-tx\r\n"
        # the transaction does not run (WATCH failed): nothing of it applies
        assert c.call("WATCH", key) == b"+OK\r\n"
        assert other.call("SET", key, "2") == b"+OK\r\n"
        c.send(E("MULTI") + E("CLIENT", "SETNAME", "never") + E("EXEC") + E("CLIENT", "GETNAME"))
        assert c.read_n(4) == [b"+OK\r\n", b"+QUEUED\r\n", b"*-1\r\n", b"$5\r\nin-tx\r\n"]
        # a wrong argument count is the server's, at queue time: EXEC aborts
        c.send(E("MULTI") + E("CLIENT", "ID", "extra") + E("EXEC"))
        out = c.read_n(3)
        assert out[1].startswith(b"-ERR wrong number of arguments") and out[2].startswith(b"-EXECABORT"), out


E = RawClient.encode


def test_standalone_client_in_multi_is_the_sessions(proxy):
    _client_in_multi(proxy.port, proxy.port, "txc")


def test_cluster_client_in_multi_is_the_sessions(cluster_proxy):
    _client_in_multi(cluster_proxy.port, cluster_proxy.port, "{t}c")


@pytest.mark.parametrize("mode", ["standalone", "cluster"])
def test_subscribe_in_multi_is_refused_at_queue_time(mode, proxy, cluster_proxy):
    """Subscribed by EXEC, the client would not be in a stream: refused, EXEC aborts (both modes)."""
    p = proxy if mode == "standalone" else cluster_proxy
    with RawClient(p.port) as c:
        c.send(E("MULTI") + E("SSUBSCRIBE", "{t}ch") + E("EXEC") + E("PING"))
        out = c.read_n(4)
        assert out[1].startswith(b"-ERR vproxy: SUBSCRIBE inside MULTI") and out[2].startswith(b"-EXECABORT")
        assert out[3] == b"+PONG\r\n"
