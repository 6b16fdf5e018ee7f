"""SELECT on a cluster: native (Valkey 9 cluster-databases) and emulated by a key namespace per db."""

from __future__ import annotations

import threading

import pytest
from clusterkit import Cluster
from conftest import Proxy


@pytest.fixture(scope="module", params=["emulated", "native"])
def setup(request):
    extra = ("--cluster-databases", "16") if request.param == "native" else ()
    c = Cluster("valkey", 3, 0, *extra)
    p = Proxy("--mode", "cluster", "--backend", c.seeds[0])
    yield request.param, c, p
    p.stop()
    c.stop()


def test_databases_are_isolated(setup):
    kind, cluster, proxy = setup
    cluster.flushall()
    c0, c3 = proxy.client(db=0), proxy.client(db=3)
    keys = [f"k{n}" for n in range(40)]
    c0.mset({k: "zero" for k in keys})
    c3.mset({k: "three" for k in keys[:25]})
    assert c0.mget(keys) == [b"zero"] * 40
    assert c3.mget(keys) == [b"three"] * 25 + [None] * 15
    assert c3.dbsize() == 25 and sorted(c3.keys("*")) == sorted(k.encode() for k in keys[:25])
    assert sorted(c0.keys("*")) == sorted(k.encode() for k in keys)
    assert set(c3.scan_iter(count=7)) == {k.encode() for k in keys[:25]}
    assert set(c0.scan_iter(match="k1*")) == {k.encode() for k in keys if k.startswith("k1")}
    assert c3.randomkey() in {k.encode() for k in keys[:25]}
    assert c3.incr("counter") == 1 and c0.get("counter") is None
    assert c3.delete(*keys[:5]) == 5 and c0.exists(*keys[:5]) == 5
    c3.rpush("{q}list", "a")
    assert c3.blpop(["{q}list"], timeout=1) == (b"{q}list", b"a")
    p = c3.pipeline(transaction=True)
    p.set("{t}x", 1).incr("{t}x")
    assert p.execute() == [True, 2]
    assert c0.get("{t}x") is None
    assert c3.flushdb() is True
    assert c3.dbsize() == 0 and c0.dbsize() >= 40 - 0
    assert c0.mget(keys) == [b"zero"] * 40
    c3.set("k1", "again")
    if kind == "native":  # db 3 of the owning node itself
        assert cluster.owner("k1").client(db=3).get("k1") == b"again"
    else:  # the namespace, in db 0
        assert cluster.owner("__vdb3__:k1").client().get("__vdb3__:k1") == b"again"


def test_select_range_and_refusals(setup):
    kind, cluster, proxy = setup
    c = proxy.client()
    import redis
    with pytest.raises(redis.ResponseError, match="out of range"):
        c.execute_command("SELECT", 99)
    p = c.pipeline(transaction=True)
    p.set("{m}a", 1).execute_command("SELECT", 2).set("{m}a", 2)
    if kind == "emulated":
        c3 = proxy.client(db=3)
        with pytest.raises(redis.ResponseError, match="emulated"):
            c3.move("k", 0)
        with pytest.raises(redis.ResponseError):
            p.execute()
    else:
        assert p.execute() == [True, True, True]
        assert proxy.client(db=2).get("{m}a") == b"2" and proxy.client().get("{m}a") == b"1"


def test_blocking_reply_names_the_client_key(setup):
    kind, cluster, proxy = setup
    c5, other = proxy.client(db=5), proxy.client(db=5)
    t = threading.Timer(0.2, lambda: other.zadd("zq", {"m": 2}))
    t.start()
    assert c5.bzpopmin(["zq"], timeout=5) == (b"zq", b"m", 2.0)
    t.join()


def test_reset_out_of_monitor_returns_to_db0(setup):
    """RESET ends MONITOR and returns the connection to database 0: the next command reads db 0's
    keys, not those of the database selected before MONITOR."""
    from conftest import RawClient
    kind, cluster, proxy = setup
    cluster.flushall()
    proxy.client(db=0).set("rk", "zero")
    proxy.client(db=3).set("rk", "three")
    with RawClient(proxy.port) as c:
        assert c.call("SELECT", "3") == b"+OK\r\n"
        assert c.call("GET", "rk") == b"$5\r\nthree\r\n"
        assert c.call("MONITOR") == b"+OK\r\n"
        c.send(RawClient.encode("RESET"))
        c.read_until(lambda f: f == b"+RESET\r\n")
        assert c.call("GET", "rk") == b"$4\r\nzero\r\n"
        assert c.call("SET", "rk2", "x") == b"+OK\r\n"
    assert proxy.client(db=0).get("rk2") == b"x" and proxy.client(db=3).get("rk2") is None


def test_select_reads_the_number_as_the_server_does(setup):
    """SELECT 1_0 once moved the session to db 10 (Python's int()); the server refuses it."""
    from conftest import RawClient

    kind, cluster, proxy = setup
    cluster.flushall()
    with RawClient(proxy.port) as c:
        for arg in ("1_0", " 1", "+1", "01", "-0"):
            assert c.call("SELECT", arg) == b"-ERR value is not an integer or out of range\r\n"
        assert c.call("SELECT", "4294967296").startswith(b"-ERR value is out of range, value must between")
        assert c.call("SET", "where", "db0") == b"+OK\r\n"
    assert proxy.client(db=0).get("where") == b"db0"
    assert proxy.client(db=10).get("where") is None
