"""router.Router: which backend pool a request goes to (standalone, primary/replica read splitting,
read-your-writes, no replica), a new primary draining the old one's connections, and what
recover() does with requests whose connection failed (reads and unsent requests go again, a sent
write gets an error). The command table is learned from a real valkey-server; the connections are
real ones to real servers."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import gevent.socket
import pytest
from conftest import RawClient

from vproxy import commands as C
from vproxy import resp
from vproxy.config import load
from vproxy.errors import BackendError
from vproxy.mux import backend
from vproxy.mux.channel import Batch, deadline_after
from vproxy.router import NO_REPLICA, Router
from vproxy.sentinel.topology import Topology

P, R1, R2 = ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)  # addresses routing never connects to


@pytest.fixture(scope="module")
def table(valkey):
    with RawClient(valkey.port) as c:
        reply = resp.decode(c.call("COMMAND"))
    t = C.CommandTable()
    t.learn(reply)
    return t


def session(table):
    """What the router reads of a client session."""
    return SimpleNamespace(app=SimpleNamespace(commands=table), cur=None, batch=None, ryw_until=0.0)


def router(*argv, primary=P, readable=(R1, R2)):
    cfg = load(["--backend", "127.0.0.1:1", *argv], env={})
    return Router(cfg, Topology(cfg.mode, primary, readable, readable=readable))


def test_standalone_sends_everything_to_the_one_server(table):
    r = router(primary=P, readable=())
    s = session(table)
    assert r.pool_for(b"get", [b"GET", b"k"], s) is r.pool_for(b"set", [b"SET", b"k", b"v"], s) is r.pool(P)
    assert r.pool(P).addr == P and list(r.pools) == [P]


def test_reads_go_to_replicas_in_turn_and_writes_to_the_primary(table):
    r = router("--mode", "replication", "--read-from", "prefer-replica")
    s = session(table)
    reads = [r.pool_for(b"get", [b"GET", b"k"], s).addr for _ in range(4)]
    assert sorted(reads) == [R1, R1, R2, R2] and reads[0] != reads[1]  # round-robin
    assert r.pool_for(b"set", [b"SET", b"k", b"v"], s).addr == P
    assert r.pool_for(b"eval", [b"EVAL", b"return 1", b"0"], s).addr == P  # not flagged readonly
    assert r.pool_for(b"nosuch", [b"NOSUCH"], s).addr == P  # unknown: could write


def test_read_your_writes_keeps_a_writers_reads_on_the_primary(table):
    r = router("--mode", "replication", "--read-from", "prefer-replica", "--read-your-writes", "3600")
    writer, other = session(table), session(table)
    assert r.pool_for(b"get", [b"GET", b"k"], writer).addr in (R1, R2)
    r.pool_for(b"set", [b"SET", b"k", b"v"], writer)
    assert r.pool_for(b"get", [b"GET", b"k"], writer).addr == P
    assert r.pool_for(b"get", [b"GET", b"k"], other).addr in (R1, R2)  # per client connection


def test_no_healthy_replica(table):
    s = session(table)
    prefer = router("--mode", "replication", "--read-from", "prefer-replica", readable=())
    assert prefer.pool_for(b"get", [b"GET", b"k"], s).addr == P
    only = router("--mode", "replication", "--read-from", "replica", readable=())
    with pytest.raises(BackendError, match="no healthy replica"):
        only.pool_for(b"get", [b"GET", b"k"], s)
    assert str(NO_REPLICA).startswith("ERR vproxy:")
    assert only.pool_for(b"set", [b"SET", b"k", b"v"], s).addr == P


def test_no_primary_known_in_standalone_is_an_error(table):
    r = router(primary=None, readable=())
    with pytest.raises(BackendError, match="no primary is known yet"):
        r.primary()


@pytest.fixture
def gevent_sockets(monkeypatch):
    monkeypatch.setattr(backend, "socket", gevent.socket)


def test_a_new_primary_closes_the_old_primarys_connections(gevent_sockets, start_server, table):
    old, new = start_server(), start_server()
    a, b = ("127.0.0.1", old.port), ("127.0.0.1", new.port)
    cfg = load(["--backend", old.addr, "--mode", "replication", "--command-timeout", "30"], env={})
    r = Router(cfg, Topology("replication", a))
    ch = r.primary().channel((0, 2))
    batch = Batch(1)
    ch.submit(resp.encode_request([b"PING"]), batch, 0, deadline_after(30))
    batch.wait()
    old.pause()  # a request in flight on the old primary when the new one is published
    try:
        batch = Batch(1)
        ch.submit(resp.encode_request([b"SET", b"k", b"v"]), batch, 0, deadline_after(30))
        r.publish(Topology("replication", b, version=1))
        assert batch.left == 0 and b"primary moved to 127.0.0.1:%d (failover); retry" % new.port in batch.replies[0]
        assert ch.closed and r.primary().addr == b and r.publishes == 1
    finally:
        old.resume()
        r.close()


def _monitor_answers(r: Router, topology: Topology):
    """Play the monitor's part of recover(): take the suspects, publish a verdict, set the event."""
    def run():
        while True:
            r.wake.wait()
            suspects, verdict = r.take_suspects()
            r.publish(topology)
            if verdict is not None:
                verdict.set()
                return suspects
    return gevent.spawn(run)


def test_recover_retries_reads_and_unsent_requests_only(table):
    r = router("--mode", "replication", "--read-from", "prefer-replica", "--primary-wait", "30")
    s = session(table)
    failed_pool = r.pool(P)
    monitor = _monitor_answers(r, Topology("replication", R1, (R2,), 1, readable=(R2,)))  # R1 promoted
    get, set_ = [b"GET", b"k"], [b"SET", b"k", b"v"]
    out = r.recover([(0, b"raw0", b"get", get, (0, 2), failed_pool, True),
                     (1, b"raw1", b"set", set_, (0, 2), failed_pool, False),
                     (2, b"raw2", b"set", set_, (0, 2), failed_pool, True)], s)
    assert monitor.get(timeout=10) == {P}  # the failed node was looked at before deciding
    assert [(i, raw, key) for i, raw, key, _ in out] == [(0, b"raw0", (0, 2)), (1, b"raw1", (0, 2)),
                                                        (2, b"raw2", (0, 2))]
    assert out[0][3].addr == R2  # a read goes again, to a healthy replica
    assert out[1][3].addr == R1  # a write that never left vproxy goes to the new primary
    assert out[2][3].startswith(b"-ERR vproxy: the connection to 127.0.0.1:1 was lost with this write in flight")
