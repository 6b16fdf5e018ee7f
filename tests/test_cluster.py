"""Cluster mode against a real 3-primary valkey cluster: routing, redirections, split and merge,
fan-out, transactions; results checked against the nodes themselves."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from clusterkit import Cluster
from conftest import BACKENDS, Proxy, wait_for


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request):
    c = Cluster(request.param, 3)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def proxy(cluster):
    p = Proxy("--mode", "cluster", *[a for s in cluster.seeds[:2] for a in ("--backend", s)])
    wait_for(lambda: p.client().execute_command("DBSIZE") == 0 or True, what="slot map")
    yield p
    p.stop()


@pytest.fixture
def r(proxy, cluster):
    cluster.flushall()
    c = proxy.client()
    yield c
    c.close()


KEYS = [f"key:{n}" for n in range(60)]


def test_single_key_commands_land_on_the_owner(r, cluster):
    for k in KEYS:
        assert r.set(k, k) is True
    for k in KEYS:
        assert r.get(k) == k.encode()
        assert cluster.client_for(k).get(k) == k.encode()
    assert r.incr("counter") == 1
    assert cluster.client_for("counter").get("counter") == b"1"
    r.hset("h{x}", mapping={"a": 1})
    assert r.hgetall("h{x}") == {b"a": b"1"}


def test_pipeline_across_nodes_keeps_order(r):
    p = r.pipeline(transaction=False)
    for n in range(300):
        p.set(f"p{n}", n)
        p.get(f"p{n}")
        p.incr(f"p{n}")
    out = p.execute()
    assert out[1::3] == [str(n).encode() for n in range(300)]
    assert out[2::3] == [n + 1 for n in range(300)]


def test_mget_mset_del_exists_touch_unlink(r, cluster):
    mapping = {k: f"v{k}" for k in KEYS}
    assert r.mset(mapping) is True
    for k in KEYS:
        assert cluster.client_for(k).get(k) == f"v{k}".encode()
    got = r.mget(KEYS + ["missing"] + KEYS[:3])
    assert got == [f"v{k}".encode() for k in KEYS] + [None] + [f"v{k}".encode() for k in KEYS[:3]]
    assert r.exists(*KEYS, "missing", KEYS[0]) == len(KEYS) + 1
    assert r.touch(*KEYS[:10]) == 10
    assert r.delete(*KEYS[:20], "missing") == 20
    assert r.unlink(*KEYS[20:30]) == 10
    assert sorted(cluster.all_keys()) == sorted(k.encode() for k in KEYS[30:])


def test_resp3_mget(proxy, cluster):
    cluster.flushall()
    c = proxy.client(protocol=3)
    c.mset({"a": 1, "b": 2, "c": 3})
    assert c.mget("a", "b", "zz", "c") == [b"1", b"2", None, b"3"]


def test_crossslot_refusals_say_why(r):
    with pytest.raises(redis.ResponseError, match="msetnx.*all keys or none"):
        r.msetnx({"a": 1, "b": 2})
    assert r.msetnx({"{t}a": 1, "{t}b": 2}) is True
    with pytest.raises(redis.ResponseError, match="hash to the same slot"):
        r.rename("a", "b")


def test_keyless_fanout(r, cluster):
    r.mset({k: 1 for k in KEYS})
    assert r.dbsize() == len(KEYS)
    assert sorted(r.keys("*")) == sorted(k.encode() for k in KEYS)
    assert sorted(r.keys("key:1*")) == sorted(k.encode() for k in KEYS if k.startswith("key:1"))
    assert r.randomkey() in {k.encode() for k in KEYS}
    assert r.flushall() is True
    assert r.dbsize() == 0 and cluster.all_keys() == []
    assert r.randomkey() is None


def test_scan_visits_every_key_once(r):
    keys = {f"s:{n}".encode() for n in range(500)}
    r.mset({k: 1 for k in keys})
    r.mset({f"other:{n}": 1 for n in range(50)})
    seen, cursor, calls = [], 0, 0
    while True:
        cursor, page = r.scan(cursor, match="s:*", count=50)
        seen += page
        calls += 1
        if cursor == 0:
            break
    assert len(seen) == len(keys) and set(seen) == keys
    assert calls > 3
    assert set(r.scan_iter(_type="string", count=100)) == keys | {f"other:{n}".encode() for n in range(50)}


def test_scripts_fan_out(r, cluster):
    sha = r.script_load("return 1")
    assert r.script_exists(sha, "0" * 40) == [True, False]
    assert r.evalsha(sha, 1, "anykey") == 1
    assert r.eval("return redis.call('GET', KEYS[1])", 1, "key:1") is None
    owner = cluster.client_for("key:1")
    owner.script_flush()  # as on a node that never saw the script (new, or a promoted replica)
    assert r.evalsha(sha, 1, "key:1") == 1  # vproxy loads it there again
    assert owner.script_exists(sha) == [True]
    assert r.script_flush() is True
    assert r.script_exists(sha) == [False]
    with pytest.raises(redis.exceptions.NoScriptError):
        r.evalsha("1" * 40, 0)


def test_script_kill_reaches_the_busy_node(r, proxy, cluster):
    """SCRIPT KILL goes to every primary on side connections: the one whose node runs the script
    answers +OK (the others NOTBUSY), the script's client gets the server's error, the node serves again."""
    from conftest import RawClient
    olds = [(n, n.client().config_get("busy-reply-threshold")["busy-reply-threshold"]) for n in cluster.primaries]
    for n, _ in olds:
        n.client().config_set("busy-reply-threshold", 100)
    key = next(f"busy{n}" for n in range(1000) if cluster.owner(f"busy{n}") is cluster.primaries[-1])
    try:
        assert _raises(r.script_kill).startswith("NOTBUSY")  # nothing runs anywhere
        with RawClient(proxy.port, timeout=15) as runner, RawClient(proxy.port) as other:
            runner.send(RawClient.encode("EVAL", "local i = 0 while true do i = i + 1 end", "1", key))
            wait_for(lambda: other.call("GET", key).startswith(b"-BUSY"), what="the script to be running")
            assert other.call("SCRIPT", "KILL") == b"+OK\r\n"
            assert runner.read().startswith(b"-ERR Script killed by user with SCRIPT KILL")
            assert other.call("GET", key) == b"$-1\r\n"
        assert _raises(r.function_kill).startswith("NOTBUSY")
    finally:
        for n, old in olds:
            n.client().config_set("busy-reply-threshold", old)


LOOP = "local i = 0 while true do i = i + 1 end"


def _key_on(cluster, node) -> str:
    return next(f"busy{n}" for n in range(1000) if cluster.owner(f"busy{n}") is node)


def _direct(node, *args) -> bytes:
    from conftest import RawClient
    with RawClient(node.port, timeout=15) as c:
        return c.call(*args)


def _blocked(node) -> bool:
    """True while the node answers nobody (a script runs, before busy-reply-threshold)."""
    from conftest import RawClient
    with RawClient(node.port) as probe:
        probe.send(RawClient.encode("PING"))
        return probe.nothing_pending(0.2)


@pytest.fixture
def thresholds(cluster):
    """Set every primary's busy-reply-threshold (ms); afterwards no script runs anywhere."""
    olds = [(n, n.client().config_get("busy-reply-threshold")["busy-reply-threshold"]) for n in cluster.primaries]
    yield lambda ms: [n.client().config_set("busy-reply-threshold", ms) for n, _ in olds]
    for n, old in olds:
        wait_for(lambda n=n: _direct(n, "SCRIPT", "KILL").startswith(b"-NOTBUSY"), what="no script left running")
        n.client().config_set("busy-reply-threshold", old)


def _cluster_proxy(cluster, *args) -> Proxy:
    p = Proxy("--mode", "cluster", *[a for s in cluster.seeds[:2] for a in ("--backend", s)], *args)
    wait_for(lambda: p.client().ping(), what="the slot map (PING goes to a primary)")
    return p


def test_busy_nodes_answer_for_themselves(cluster, thresholds):
    """A script loops on every primary: PING and ECHO (sent to a primary) say -BUSY, FUNCTION KILL
    answers BUSY as the server does, the scripts' callers wait past command_timeout, SCRIPT KILL
    kills them and each caller gets its server's error; then NOTBUSY."""
    from conftest import RawClient
    thresholds(100)
    p = _cluster_proxy(cluster, "--command-timeout", "0.5")
    runners = [RawClient(p.port, timeout=15) for _ in cluster.primaries]
    c = RawClient(p.port, timeout=15)
    try:
        assert c.call("ECHO", "hi") == b"$2\r\nhi\r\n"
        keys = [_key_on(cluster, node) for node in cluster.primaries]  # asked before the nodes are busy
        for runner, key in zip(runners, keys):
            runner.send(RawClient.encode("EVAL", LOOP, "1", key))
        wait_for(lambda: all(_direct(n, "PING").startswith(b"-BUSY") for n in cluster.primaries),
                 what="a script running on every primary")
        for args in (("PING",), ("PING", "hi"), ("ECHO", "hi")):
            assert c.call(*args).startswith(b"-BUSY "), args
        refused = c.call("FUNCTION", "KILL")
        assert refused.startswith(b"-BUSY ") and b"SCRIPT KILL" in refused, refused
        assert runners[0].nothing_pending(1.5)  # three command_timeouts
        assert all(r.nothing_pending(0.05) for r in runners)
        assert c.call("SCRIPT", "KILL") == b"+OK\r\n"
        for r in runners:
            assert b"Script killed by user" in r.read()
        assert c.call("PING") == b"+PONG\r\n"
        assert c.call("SCRIPT", "KILL") == b"-NOTBUSY No scripts in execution right now.\r\n"
    finally:
        for r in (*runners, c):
            r.close()
        p.stop()


def test_script_kill_before_the_busy_threshold(cluster, thresholds):
    """Sent before the busy node's threshold, SCRIPT KILL is answered at it: +OK (the other nodes'
    NOTBUSY do not count); its side connection used to time out in the handshake."""
    from conftest import RawClient
    thresholds(1000)
    p = _cluster_proxy(cluster, "--connect-timeout", "0.3")
    node = cluster.primaries[-1]
    try:
        with RawClient(p.port, timeout=15) as runner, RawClient(p.port, timeout=15) as other:
            runner.send(RawClient.encode("EVAL", LOOP, "1", _key_on(cluster, node)))
            wait_for(lambda: _blocked(node), what="the script to block its node")
            assert other.call("SCRIPT", "KILL") == b"+OK\r\n"
            assert b"Script killed by user" in runner.read()
    finally:
        p.stop()


def test_monitor_shows_every_primary(proxy, cluster):
    """MONITOR through vproxy shows the commands every primary runs (one MONITOR per node, merged),
    with one +OK; when the client leaves, every node's MONITOR connection is closed."""
    from conftest import RawClient
    keys = [next(f"mon{n}" for n in range(1000) if cluster.owner(f"mon{n}") is p) for p in cluster.primaries]

    def monitors():
        return sum(1 for n in cluster.primaries for c in n.client().client_list() if "O" in c.get("flags", ""))
    c = proxy.client()
    with RawClient(proxy.port) as mon:
        assert mon.call("MONITOR") == b"+OK\r\n"
        wait_for(lambda: monitors() == len(cluster.primaries), what="a MONITOR on every primary")
        for k in keys:
            c.set(k, "v")
        seen = set()
        lines = mon.read_until(lambda f: seen.update(k for k in keys if f'"{k}"'.encode() in f) or seen == set(keys))
        assert all(f.startswith(b"+") for f in lines)  # status lines only: no stray +OK or error
        assert all(b'"set"' in f.lower() for f in lines if any(k.encode() in f for k in keys))
    wait_for(lambda: monitors() == 0, what="the nodes' MONITOR connections to close")
    c.close()

def _raises(fn) -> str:
    with pytest.raises(redis.ResponseError) as e:
        fn()
    return str(e.value)

def test_info_and_cluster_commands(r, proxy):
    info = r.info()
    assert info["cluster_enabled"] == 0 and info["proxy_cluster_nodes"] == 3
    assert r.execute_command("CLUSTER", "KEYSLOT", "foo") == 12182
    slots = r.execute_command("CLUSTER", "SLOTS")
    assert slots[0][0] == 0 and slots[0][1] == 16383 and slots[0][2][1] == proxy.port
    assert b"cluster_state:ok" in r.execute_command("CLUSTER", "INFO")
    with pytest.raises(redis.ResponseError, match="one node"):
        r.execute_command("CLUSTER", "FAILOVER")


def test_multi_exec_pins_to_first_key_slot(r, cluster):
    p = r.pipeline(transaction=True)
    p.set("{u}a", 1).incr("{u}a").get("{u}a")
    assert p.execute() == [True, 2, b"2"]
    assert cluster.client_for("{u}a").get("{u}a") == b"2"
    p = r.pipeline(transaction=True)
    p.set("{u}a", 5).set("{v}b", 1)
    with pytest.raises(redis.ResponseError):
        p.execute()
    assert r.get("{u}a") == b"2"  # discarded: nothing ran
    p = r.pipeline(transaction=True)
    p.ping()
    assert p.execute() == [True]


def test_watch(r):
    r.set("{w}k", 1)
    with r.pipeline() as p:
        p.watch("{w}k")
        v = int(p.get("{w}k"))
        p.multi()
        p.set("{w}k", v + 1)
        assert p.execute() == [True]
    assert r.get("{w}k") == b"2"
    with r.pipeline() as p:
        p.watch("{w}k")
        r.set("{w}k", 10)  # another connection changes it: EXEC fails
        p.multi()
        p.set("{w}k", 0)
        with pytest.raises(redis.WatchError):
            p.execute()
    assert r.get("{w}k") == b"10"


def test_blocking_pops_route_to_the_key(r, proxy):
    other = proxy.client()
    import threading
    t = threading.Timer(0.3, lambda: other.rpush("q", "x"))
    t.start()
    assert r.blpop(["q"], timeout=5) == (b"q", b"x")
    t.join()
    assert r.blpop(["q"], timeout=0.1) is None


def test_split_request_behind_a_lost_connection_is_answered(r, proxy, cluster):
    """A pipeline whose MGET needs a node whose connection vproxy has just lost: vproxy first settles
    what is in flight (the old connection's order), then opens a new one; the MGET still gets its
    reply (it once went unanswered: the client hung)."""
    keys = {}
    for n in range(1000):  # one key per primary
        keys.setdefault(cluster.owner(f"s{n}").port, f"s{n}")
        if len(keys) == 3:
            break
    first, *rest = cluster.primaries
    on_first = keys[first.port]
    c = proxy.client(socket_timeout=5, retry=Retry(NoBackoff(), 0))  # a missing reply is a timeout, not retried
    for k in keys.values():
        c.set(k, k)
    for victim in rest:  # the session now holds a connection to every node; cut those of two nodes
        direct = victim.client()
        before, shared = proxy.info()["backend_connects"], proxy.info()["backend_connections_shared"]
        for cl in direct.client_list():
            if cl.get("name") == "vproxy":
                direct.client_kill_filter(_id=cl["id"])
        direct.close()
        wait_for(lambda: proxy.info()["backend_connections_shared"] < shared, what="vproxy to see the connections go")
        p = c.pipeline(transaction=False)
        p.get(on_first)
        p.mget(list(keys.values()))
        p.get(on_first)
        assert p.execute() == [on_first.encode(), [k.encode() for k in keys.values()], on_first.encode()]
        assert proxy.info()["backend_connects"] > before  # a new connection was opened
    c.close()


def _spread(prefix, n=3):
    """n key names whose slots differ (so they are split), plus a hash-tagged twin on one node."""
    from vproxy.slots import key_slot
    out, seen = [], set()
    for j in range(1000):
        k = f"{prefix}{j}"
        if key_slot(k.encode()) not in seen:
            seen.add(key_slot(k.encode()))
            out.append(k)
        if len(out) == n:
            return out


def _copy_to_ref(r, cluster, keys):
    """Copy keys into hash-tagged twins on one node: the reference runs there natively."""
    ref = cluster.client_for("{ref}")
    for k in keys:
        dump = r.dump(k)
        ref.delete(f"{{ref}}{k}")
        if dump is not None:
            ref.restore(f"{{ref}}{k}", 0, dump)
    return ref


def test_set_algebra_matches_the_server(r, cluster):
    a, b, c = _spread("set", 3)
    r.sadd(a, *range(30))
    r.sadd(b, *range(10, 40, 2))
    r.sadd(c, *range(5, 15))
    ref = _copy_to_ref(r, cluster, [a, b, c])
    t = [f"{{ref}}{k}" for k in (a, b, c)]
    assert r.sunion(a, b, c) == ref.sunion(*t)
    assert r.sinter(a, b, c) == ref.sinter(*t)
    assert r.sdiff(a, b, c) == ref.sdiff(*t)
    assert r.sdiff(a, "missing") == ref.sdiff(t[0], "{ref}missing")
    assert r.sintercard(3, [a, b, c]) == ref.sintercard(3, t)
    assert r.sintercard(2, [a, b], limit=3) == 3
    dest = _spread("dst", 1)[0]
    for cmd in ("sunionstore", "sinterstore", "sdiffstore"):
        n = getattr(r, cmd)(dest, [a, b, c])
        assert n == getattr(ref, cmd)("{ref}d", t)
        assert r.smembers(dest) == ref.smembers("{ref}d")
    r.set("str", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.sunion(a, "str")
    assert r.smove(a, c, 0) is True and r.sismember(c, 0) and not r.sismember(a, 0)
    assert r.smove(a, c, 999) is False
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.smove(a, "str", 1)
    assert r.sismember(a, 1)


def test_sorted_set_algebra_matches_the_server(r, cluster):
    a, b, c = _spread("zs", 3)
    r.zadd(a, {f"m{j}": j * 1.5 for j in range(20)})
    r.zadd(b, {f"m{j}": -j for j in range(10, 30)})
    r.sadd(c, "m12", "m15", "m25")  # a plain set counts with score 1
    ref = _copy_to_ref(r, cluster, [a, b, c])
    t = [f"{{ref}}{k}" for k in (a, b, c)]
    for agg in (None, "MIN", "MAX"):
        assert r.zunion([a, b, c], aggregate=agg, withscores=True) == ref.zunion(t, aggregate=agg, withscores=True)
        assert r.zinter([a, b], aggregate=agg, withscores=True) == ref.zinter(t[:2], aggregate=agg, withscores=True)
    w = dict(zip([a, b, c], [2, 0.5, 3]))
    assert r.zunion(w, withscores=True) == ref.zunion(dict(zip(t, [2, 0.5, 3])), withscores=True)
    assert r.zinter([a, b, c]) == ref.zinter(t)
    assert r.zdiff([a, b], withscores=True) == ref.zdiff(t[:2], withscores=True)
    dest = _spread("zd", 1)[0]
    assert r.zunionstore(dest, w, aggregate="MAX") == ref.zunionstore("{ref}d", dict(zip(t, [2, 0.5, 3])), aggregate="MAX")
    assert r.zrange(dest, 0, -1, withscores=True) == ref.zrange("{ref}d", 0, -1, withscores=True)
    assert r.zinterstore(dest, [a, b]) == ref.zinterstore("{ref}d", t[:2])
    assert r.zrange(dest, 0, -1, withscores=True) == ref.zrange("{ref}d", 0, -1, withscores=True)
    assert r.zdiffstore(dest, [a, b]) == ref.zdiffstore("{ref}d", t[:2])
    assert r.zrange(dest, 0, -1, withscores=True) == ref.zrange("{ref}d", 0, -1, withscores=True)


def test_resp3_set_algebra(proxy, cluster):
    cluster.flushall()
    c = proxy.client(protocol=3)
    a, b = _spread("r3", 2)
    c.sadd(a, 1, 2)
    c.sadd(b, 2, 3)
    assert c.sunion(a, b) == {b"1", b"2", b"3"}
    c.zadd(a + "z", {"x": 1})
    c.zadd(b + "z", {"x": 2.5, "y": 1})
    assert c.zunion([a + "z", b + "z"], withscores=True) == [[b"y", 1.0], [b"x", 3.5]]


def test_pubsub_is_cluster_wide(r, proxy, cluster):
    sub = proxy.client().pubsub()
    sub.subscribe("news")
    wait_for(lambda: sub.get_message(timeout=0.1), what="subscribe confirmation")
    for node in cluster.primaries:  # published on any node, heard through the proxy
        node.client().publish("news", f"from {node.port}")
    got = []
    wait_for(lambda: got.append(sub.get_message(timeout=0.1)) or len([m for m in got if m]) == 3,
             what="three messages")
    assert r.publish("news", "via proxy") >= 1
    wait_for(lambda: (m := sub.get_message(timeout=0.1)) and m["data"] == b"via proxy", what="own publish")
    sub.close()


def test_sharded_pubsub_goes_to_the_owner(r, proxy, cluster):
    sub = proxy.client().pubsub()
    sub.ssubscribe("shard-chan")
    wait_for(lambda: sub.get_sharded_message(timeout=0.1), what="ssubscribe confirmation")
    cluster.client_for("shard-chan").execute_command("SPUBLISH", "shard-chan", "hello")
    wait_for(lambda: (m := sub.get_sharded_message(timeout=0.1)) and m["data"] == b"hello", what="message")
    assert r.execute_command("SPUBLISH", "shard-chan", "again") == 1
    sub.close()


def test_functions_fan_out_and_fcall_routes_by_key(r, cluster):
    code = "#!lua name=vlib\nredis.register_function('vget', function(keys) return redis.call('GET', keys[1]) end)"
    assert r.function_load(code, replace=True) == b"vlib"
    for node in cluster.primaries:
        assert b"vlib" in node.client().function_list()[0]
    for k in KEYS[:10]:
        r.set(k, k)
        assert r.fcall("vget", 1, k) == k.encode()
    assert r.function_delete("vlib") is True
    assert all(n.client().function_list() == [] for n in cluster.primaries)


def test_wait_and_movable_keys(r):
    r.set("a", 1)
    assert r.wait(0, 100) == 0
    r.rpush("{l}src", 1, 2)
    assert r.lmpop(2, "{l}src", "{l}other", direction="LEFT") == [b"{l}src", [b"1"]]
    r.xadd("s1", {"f": 1})
    assert r.xread({"s1": 0})[0][0] == b"s1"
    with pytest.raises(redis.ResponseError, match="lmove"):
        r.lmove("a1", "b2", "LEFT", "RIGHT")
    with pytest.raises(redis.ResponseError, match="[Nn]umber of keys"):
        r.eval("return 1", 5, "a")
    r.set("enc", "abc")
    assert r.object("encoding", "enc") in (b"embstr", b"raw")


def test_transaction_semantics_match_the_server(r, proxy):
    import socket

    def raw(*cmds):
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in c)
                               for c in cmds))
            data, want = b"", len(cmds)
            while data.count(b"\r\n") < want or not data.endswith(b"\r\n"):
                data += s.recv(65536)
                if data.startswith(b"-") and len(cmds) == 1:
                    break
            return data
    r.set("{s}str", "x")
    p = r.pipeline(transaction=True)
    p.incr("{s}str").set("{s}ok", 1)
    with pytest.raises(redis.ResponseError):  # an error inside EXEC's reply, the rest still ran
        p.execute()
    assert r.get("{s}ok") == b"1"
    out = raw([b"MULTI"], [b"NOSUCHCMD"], [b"SET", b"{s}a", b"1"], [b"EXEC"])
    assert out.startswith(b"+OK\r\n-ERR unknown command") and out.endswith(b"-EXECABORT Transaction discarded "
                                                                            b"because of previous errors.\r\n")
    assert r.get("{s}a") is None
    assert raw([b"MULTI"], [b"MULTI"], [b"DISCARD"]) == b"+OK\r\n-ERR MULTI calls can not be nested\r\n+OK\r\n"
    assert raw([b"EXEC"]).startswith(b"-ERR EXEC without MULTI")
    assert raw([b"MULTI"], [b"PING"], [b"EXEC"]) == b"+OK\r\n+QUEUED\r\n*1\r\n+PONG\r\n"


@pytest.mark.parametrize(
    "args",
    [
        ("SINTERCARD", "+2", "a", "b"),  # keys in two slots: vproxy computes these itself
        ("SINTERCARD", "2", "a", "b", "LIMIT", "x"),
        ("SINTERCARD", "2", "a", "b", "LIMIT", " 1"),
        ("SINTERCARD", "2", "a", "b", "LIMIT", "1", "LIMIT", "-1"),
        ("ZUNION", "+2", "a", "b"),
        ("WAIT", "+0", "0"),
        ("WAIT", "0", "x"),
        ("WAIT", "0", "-1"),
        ("CLUSTER", "COUNTKEYSINSLOT", "16384"),
    ],
)
def test_numbers_in_answered_commands_read_like_the_server(r, cluster, args):
    """Commands vproxy answers across nodes read their numbers as the server's string2ll() does
    (Python's int() took "+1", " 1", "01") and give the server's errors."""
    from conftest import RawClient, raw_exchange

    data = RawClient.encode(*args)
    r.set("a", 1)  # keys of the wrong type for some: the argument errors come first
    direct = raw_exchange(cluster.owner("a").port, data.replace(b"$1\r\nb\r\n", b"$4\r\n{a}b\r\n"), 1)
    assert raw_exchange(r.connection_pool.connection_kwargs["port"], data, 1) == direct


def test_scan_cursor_reads_like_valkey(r, cluster):
    """A cursor is read by string2ull(): "-1" is invalid, " 0" and "+0" are 0."""
    from conftest import RawClient, raw_exchange

    port = r.connection_pool.connection_kwargs["port"]
    assert raw_exchange(port, RawClient.encode("SCAN", "-1"), 1) == [b"-ERR invalid cursor\r\n"]
    assert raw_exchange(port, RawClient.encode("SCAN", "0 "), 1) == [b"-ERR invalid cursor\r\n"]
    for cursor in (" 0", "+0", "00"):
        assert raw_exchange(port, RawClient.encode("SCAN", cursor), 1)[0].startswith(b"*2\r\n")


def test_statistics_and_the_servers_stats_across_primaries(r, proxy, cluster):
    """The proxy counts each client request once (a split MGET is one call); INFO commandstats and
    SLOWLOG are the servers', merged over every primary (a split MGET is one call per node there)."""
    assert r.config_resetstat()  # the proxy's statistics and every primary's
    for k in KEYS:
        r.set(k, 1)
    assert r.mget(KEYS) == [b"1"] * len(KEYS)
    mine = r.execute_command("INFO", "proxy_commandstats")
    assert mine["cmdstat_set"]["calls"] == len(KEYS) and mine["cmdstat_mget"]["calls"] == 1
    servers = r.info("commandstats")
    assert servers["cmdstat_set"]["calls"] == len(KEYS)  # summed: each primary saw only its share
    per_node = sum(n.client().info("commandstats").get("cmdstat_mget", {}).get("calls", 0) for n in cluster.primaries)
    assert servers["cmdstat_mget"]["calls"] == per_node >= 2
    try:
        for n in cluster.primaries:
            n.client().config_set("slowlog-log-slower-than", 0)
        assert r.slowlog_reset()
        for k in KEYS[:9]:
            r.set(k, "slow")
        # every node logs everything now (the monitor's and these requests too): the merged log has
        # the nine SETs once each, from every node, newest first
        before = sum(n.client().slowlog_len() for n in cluster.primaries)
        merged = r.slowlog_len()
        assert merged >= before >= 9
        entries = r.slowlog_get(-1)
        assert len(entries) >= merged
        assert [e["start_time"] for e in entries] == sorted((e["start_time"] for e in entries), reverse=True)
        sets = [e["command"] for e in entries if e["command"].startswith(b"SET ")]
        assert sorted(sets) == sorted(b"SET %s slow" % k.encode() for k in KEYS[:9])
        assert len(r.slowlog_get(3)) == 3
    finally:
        for n in cluster.primaries:
            n.client().config_set("slowlog-log-slower-than", 10000)
