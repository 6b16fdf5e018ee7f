"""State that pins a backend connection to one client: transactions, pub/sub, blocking commands,
MONITOR, CLIENT TRACKING, CLIENT REPLY; the max_pinned limit; pinned connections coming back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import redis
import redis.asyncio as aredis
from conftest import RawClient, proxy_stats, wait_for

E = RawClient.encode


def pinned(proxy) -> int:
    return int(proxy_stats(proxy)["backend_connections_pinned"])


def wait_unpinned(proxy, n: int = 0, timeout: float = 10.0) -> None:
    wait_for(lambda: pinned(proxy) == n, timeout, what=f"backend_connections_pinned == {n}")


# ---- transactions ----

THREADS, COUNTERS, ROUNDS = 50, 5, 4


def _increment(c: redis.Redis, ctr: str) -> int:
    """One optimistic increment: WATCH, read, MULTI (write the counter, log the value), EXEC; retried."""
    attempts = 0
    while True:
        attempts += 1
        with c.pipeline() as p:
            try:
                p.watch(ctr)
                v = int(p.get(ctr) or 0) + 1
                p.multi()
                p.set(ctr, v)
                p.rpush(f"log:{ctr}", v)
                p.incr("total")
                p.execute()
                return attempts
            except redis.WatchError:
                continue


def _check_counters(server) -> None:
    d = server.client(protocol=2)
    per = THREADS // COUNTERS * ROUNDS
    for k in range(COUNTERS):
        assert d.get(f"ctr{k}") == str(per).encode()
        # every committed transaction read the value the previous one wrote: no lost or interleaved write
        assert d.lrange(f"log:ctr{k}", 0, -1) == [str(v).encode() for v in range(1, per + 1)]
    assert d.get("total") == str(THREADS * ROUNDS).encode()


def test_concurrent_watch_multi_exec_threads(proxy, server):
    server.client().flushall()
    errors, retries = [], []

    def worker(n: int):
        c = proxy.client(protocol=2 if n % 2 else 3)
        try:
            for _ in range(ROUNDS):
                retries.append(_increment(c, f"ctr{n % COUNTERS}"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)
    _check_counters(server)
    assert max(retries) > 1  # there really was contention: some EXECs were aborted and retried
    wait_unpinned(proxy)


def test_concurrent_watch_multi_exec_asyncio(proxy, server):
    server.client().flushall()

    async def worker(n: int):
        c = aredis.Redis(port=proxy.port, protocol=3 if n % 2 else 2, socket_timeout=15)
        try:
            for _ in range(ROUNDS):
                ctr = f"ctr{n % COUNTERS}"
                while True:
                    async with c.pipeline() as p:
                        try:
                            await p.watch(ctr)
                            v = int(await p.get(ctr) or 0) + 1
                            p.multi()
                            p.set(ctr, v)
                            p.rpush(f"log:{ctr}", v)
                            p.incr("total")
                            await p.execute()
                            break
                        except redis.WatchError:
                            continue
        finally:
            await c.aclose()

    async def main():
        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(THREADS))), 90)

    asyncio.run(main())
    _check_counters(server)
    wait_unpinned(proxy)


def test_watch_conflict_aborts_exec(proxy, server):
    server.client().flushall()
    c, other = proxy.client(protocol=2), proxy.client(protocol=3)
    c.set("w", "0")
    with c.pipeline() as p:
        p.watch("w")
        assert p.get("w") == b"0"
        other.set("w", "changed-by-other")
        p.multi()
        p.set("w", "mine")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert c.get("w") == b"changed-by-other"


@pytest.mark.parametrize("protocol", [2, 3])
def test_aborted_exec_reply_bytes_match_server(proxy, server, protocol):
    """The nil EXEC reply (*-1 in RESP2, _ in RESP3) reaches the client exactly as the server sends it."""

    def scenario(port):
        server.client().set("w", "0")
        with RawClient(port) as c, RawClient(port) as o:
            c.call("HELLO", str(protocol))
            assert c.call("WATCH", "w") == b"+OK\r\n"
            assert o.call("SET", "w", "1") == b"+OK\r\n"
            c.send(E("MULTI") + E("SET", "w", "2") + E("EXEC"))
            return c.read_n(3)

    via, direct = scenario(proxy.port), scenario(server.port)
    assert via == direct
    assert via[2] == (b"*-1\r\n" if protocol == 2 else b"_\r\n")
    assert server.client().get("w") == b"1"


def test_multi_exec_pipeline_and_discard(raw, proxy):
    c = raw()
    c.send(E("MULTI") + E("SET", "t", "1") + E("INCR", "t") + E("GET", "t") + E("EXEC"))
    assert c.read_n(5) == [
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"+QUEUED\r\n",
        b"+QUEUED\r\n",
        b"*3\r\n+OK\r\n:2\r\n$1\r\n2\r\n",
    ]
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("SET", "t", "discarded") == b"+QUEUED\r\n"
    assert c.call("DISCARD") == b"+OK\r\n"
    assert c.call("GET", "t") == b"$1\r\n2\r\n"
    # an error queued inside MULTI aborts the whole EXEC, as on the server
    c.send(E("MULTI") + E("SET", "t", "x") + E("GET") + E("EXEC"))
    replies = c.read_n(4)
    assert replies[2].startswith(b"-ERR wrong number of arguments")
    assert replies[3].startswith(b"-EXECABORT")
    assert c.call("GET", "t") == b"$1\r\n2\r\n"


def test_select_inside_multi_applies_after_exec(raw):
    c = raw()
    c.send(E("MULTI") + E("SELECT", "7") + E("SET", "in7", "yes") + E("EXEC"))
    assert c.read_n(4)[3] == b"*2\r\n+OK\r\n+OK\r\n"
    assert c.call("GET", "in7") == b"$3\r\nyes\r\n"  # the session follows the SELECT the EXEC ran
    assert c.call("SELECT", "0") == b"+OK\r\n"
    assert c.call("GET", "in7") == b"$-1\r\n"


@pytest.mark.parametrize("ender", ["EXEC", "DISCARD", "UNWATCH"])
def test_pinned_connection_released_after_transaction(proxy, raw, ender):
    wait_unpinned(proxy)
    c = raw()
    assert c.call("WATCH", "rel") == b"+OK\r\n"
    if ender != "UNWATCH":
        assert c.call("MULTI") == b"+OK\r\n"
        assert c.call("SET", "rel", "1") == b"+QUEUED\r\n"
    assert pinned(proxy) == 1
    assert c.call(ender).startswith(b"*1\r\n" if ender == "EXEC" else b"+OK")
    wait_unpinned(proxy)
    assert c.call("PING") == b"+PONG\r\n"


# ---- pub/sub ----


def _next_message(ps, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ps.get_message(timeout=0.2)
        if m is not None:
            return m
    raise AssertionError("no pub/sub message arrived")


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub_with_redis_py(proxy, server, protocol):
    c = proxy.client(protocol=protocol)
    pub = proxy.client(protocol=2)
    ps = c.pubsub()
    ps.subscribe("news")
    ps.psubscribe("alerts.*")
    assert _next_message(ps)["type"] == "subscribe"
    assert _next_message(ps)["type"] == "psubscribe"
    assert pub.publish("news", "hello") == 1
    assert pub.publish("alerts.fire", "hot") == 1
    assert pub.publish("nobody-listens", "x") == 0
    m1, m2 = _next_message(ps), _next_message(ps)
    assert (m1["type"], m1["channel"], m1["data"]) == ("message", b"news", b"hello")
    assert (m2["type"], m2["pattern"], m2["channel"], m2["data"]) == ("pmessage", b"alerts.*", b"alerts.fire", b"hot")
    assert pub.pubsub_numsub("news") == [(b"news", 1)]
    ps.unsubscribe()
    ps.punsubscribe()
    kinds = {_next_message(ps)["type"], _next_message(ps)["type"]}
    assert kinds == {"unsubscribe", "punsubscribe"}
    ps.close()
    wait_unpinned(proxy)
    assert pub.pubsub_numsub("news") == [(b"news", 0)]


def test_pubsub_resp2_same_connection_serves_commands_after_unsubscribe(proxy, raw):
    c, pub = raw(), proxy.client(protocol=2)
    c.send(E("SUBSCRIBE", "a", "b") + E("PSUBSCRIBE", "p.*"))
    assert c.read_n(3) == [
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
        b"*3\r\n$10\r\npsubscribe\r\n$3\r\np.*\r\n:3\r\n",
    ]
    assert c.call("GET", "x").startswith(b"-ERR Can't execute 'get'")  # the server's RESP2 rule
    assert c.call("PING") == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    assert pub.publish("b", "to-b") == 1
    assert c.read() == b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$4\r\nto-b\r\n"
    assert pub.publish("p.x", "to-p") == 1
    assert c.read() == b"*4\r\n$8\r\npmessage\r\n$3\r\np.*\r\n$3\r\np.x\r\n$4\r\nto-p\r\n"
    assert pinned(proxy) == 1
    c.send(E("UNSUBSCRIBE"))
    first, second = c.read_n(2)  # one reply per channel, in the server's order; the count goes down
    assert first.endswith(b"\r\n:2\r\n") and second.endswith(b"\r\n:1\r\n")
    assert {first[:-6], second[:-6]} == {b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na", b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb"}
    assert c.call("PUNSUBSCRIBE") == b"*3\r\n$12\r\npunsubscribe\r\n$3\r\np.*\r\n:0\r\n"
    # subscriptions at zero: a normal connection again, on a shared backend connection
    assert c.call("SET", "after-sub", "1") == b"+OK\r\n"
    assert c.call("GET", "after-sub") == b"$1\r\n1\r\n"
    wait_unpinned(proxy)
    assert pub.publish("b", "nobody") == 0
    assert c.nothing_pending(0.2)


def test_pubsub_resp3_push_and_commands_while_subscribed(proxy, raw):
    c, pub = raw(), proxy.client(protocol=2)
    assert c.call("HELLO", "3").startswith(b"%")
    assert c.call("SUBSCRIBE", "r3") == b">3\r\n$9\r\nsubscribe\r\n$2\r\nr3\r\n:1\r\n"
    # RESP3 allows any command while subscribed
    assert c.call("SET", "k3", "v") == b"+OK\r\n"
    assert c.call("GET", "k3") == b"$1\r\nv\r\n"
    assert pub.publish("r3", "pushed") == 1
    assert c.read() == b">3\r\n$7\r\nmessage\r\n$2\r\nr3\r\n$6\r\npushed\r\n"
    assert c.call("UNSUBSCRIBE", "r3") == b">3\r\n$11\r\nunsubscribe\r\n$2\r\nr3\r\n:0\r\n"
    wait_unpinned(proxy)
    assert c.call("GET", "k3") == b"$1\r\nv\r\n"


@pytest.mark.parametrize("start", [("SUBSCRIBE", "r3c"), ("MONITOR",), ("CLIENT", "TRACKING", "ON")])
def test_client_commands_in_a_stream_are_the_sessions(proxy, raw, start):
    """Inside a RESP3 subscription, MONITOR or TRACKING, CLIENT ID / SETNAME / GETNAME / INFO are
    about the client's vproxy session (as outside), not the pinned backend connection."""
    c = raw()
    assert c.call("HELLO", "3").startswith(b"%")
    own_id = c.call("CLIENT", "ID")
    c.call(*start)
    assert c.call("CLIENT", "ID") == own_id
    assert c.call("CLIENT", "SETNAME", "in-stream") == b"+OK\r\n"
    assert c.call("CLIENT", "GETNAME") == b"$9\r\nin-stream\r\n"
    assert b"id=" + own_id[1:-2] + b" " in c.call("CLIENT", "INFO")
    c.send(E("RESET"))
    assert c.read() == b"+RESET\r\n"
    wait_unpinned(proxy)
    assert c.call("CLIENT", "ID") == own_id


def test_unsubscribe_when_not_subscribed_like_server(proxy, server):
    for data in (E("UNSUBSCRIBE"), E("PUNSUBSCRIBE", "x", "y")):
        n = 2 if b"x" in data else 1
        with RawClient(proxy.port) as a, RawClient(server.port) as b:
            a.send(data)
            b.send(data)
            assert a.read_n(n) == b.read_n(n)


def test_pubsub_asyncio(proxy):
    async def main():
        c = aredis.Redis(port=proxy.port, protocol=3)
        pub = aredis.Redis(port=proxy.port, protocol=2)
        ps = c.pubsub()
        await ps.subscribe("aio")
        deadline = time.monotonic() + 10
        got = []
        while time.monotonic() < deadline and len(got) < 3:
            m = await ps.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if m is not None:
                got.append(m["data"])
            elif len(got) == 0:
                await pub.publish("aio", "m0")
                await pub.publish("aio", "m1")
                await pub.publish("aio", "m2")
        await ps.unsubscribe("aio")
        await ps.aclose()
        await c.aclose()
        await pub.aclose()
        return got

    assert asyncio.run(main()) == [b"m0", b"m1", b"m2"]


# ---- blocking commands ----


def test_blpop_does_not_block_other_clients(proxy, server):
    server.client().flushall()
    blocked = RawClient(proxy.port, timeout=60)
    blocked.send(E("BLPOP", "jobs", "0"))
    wait_for(lambda: pinned(proxy) == 1, what="BLPOP to hold a pinned connection")
    errors, worst = [], [0.0]

    def busy(n: int):
        c = proxy.client(protocol=2 if n % 2 else 3, socket_timeout=10)
        try:
            for i in range(100):
                t0 = time.monotonic()
                c.set(f"busy:{n}", i)
                assert c.get(f"busy:{n}") == str(i).encode()
                worst[0] = max(worst[0], time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=busy, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert time.monotonic() - t0 < 30
    assert worst[0] < 2.0, f"a GET/SET took {worst[0]:.2f}s while BLPOP was blocked"
    assert blocked.nothing_pending(0.1)  # still blocked
    assert proxy.client(protocol=2).lpush("jobs", "job-1") == 1
    assert blocked.read() == b"*2\r\n$4\r\njobs\r\n$5\r\njob-1\r\n"
    assert blocked.call("PING") == b"+PONG\r\n"
    blocked.close()
    wait_unpinned(proxy)
    assert server.client().llen("jobs") == 0


def test_blpop_timeout_and_redis_py(proxy, server):
    c = proxy.client(protocol=3)
    assert c.blpop(["nothing-here"], timeout=0.1) is None
    c.rpush("q2", "a")
    assert c.blpop(["q2"], timeout=1) == [b"q2", b"a"]
    assert c.ping() is True


# ---- MONITOR, CLIENT TRACKING, CLIENT REPLY ----


def test_monitor_sees_other_clients(proxy, raw):
    m = raw()
    assert m.call("MONITOR") == b"+OK\r\n"
    other = proxy.client(protocol=2)
    other.set("monitor-probe", "42")
    lines = m.read_until(lambda f: b"monitor-probe" in f)
    assert b'"SET" "monitor-probe" "42"' in lines[-1]
    assert lines[-1].startswith(b"+")
    m.close()
    wait_unpinned(proxy)


def test_monitor_with_redis_py(proxy):
    c = proxy.client(protocol=2, socket_timeout=10)
    with c.monitor() as mon:
        proxy.client(protocol=2).get("monitor-redis-py")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cmd = mon.next_command()
            if "monitor-redis-py" in cmd["command"]:
                assert cmd["command"] == "GET monitor-redis-py"
                break
        else:
            raise AssertionError("MONITOR did not show the GET")


def test_client_tracking_invalidation_push(proxy, raw):
    c, other = raw(), proxy.client(protocol=2)
    other.set("tracked", "v1")
    assert c.call("HELLO", "3").startswith(b"%")
    assert c.call("CLIENT", "TRACKING", "ON") == b"+OK\r\n"
    assert c.call("GET", "tracked") == b"$2\r\nv1\r\n"
    other.set("tracked", "v2")
    assert c.read() == b">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\ntracked\r\n"
    assert c.call("GET", "tracked") == b"$2\r\nv2\r\n"


def test_client_reply_off_skip_on(raw):
    c = raw()
    c.send(E("CLIENT", "REPLY", "OFF") + E("SET", "rep", "1") + E("INCR", "rep") + E("GET", "rep"))
    assert c.nothing_pending(0.3)
    assert c.call("CLIENT", "REPLY", "ON") == b"+OK\r\n"  # the first reply after OFF
    assert c.call("GET", "rep") == b"$1\r\n2\r\n"
    c.send(E("CLIENT", "REPLY", "SKIP") + E("SET", "rep", "skipped") + E("GET", "rep"))
    assert c.read() == b"$7\r\nskipped\r\n"
    assert c.call("PING") == b"+PONG\r\n"


def test_client_reply_on_and_tracking_off_release_the_pin(proxy, raw):
    """Once REPLY is ON again (or TRACKING OFF) nothing needs the connection pinned any more."""
    wait_unpinned(proxy)
    c = raw()
    c.send(E("CLIENT", "REPLY", "OFF") + E("SET", "rep", "1"))
    assert c.call("CLIENT", "REPLY", "ON") == b"+OK\r\n"
    wait_unpinned(proxy)
    t = raw()
    t.call("HELLO", "3")
    assert t.call("CLIENT", "TRACKING", "ON") == b"+OK\r\n"
    assert pinned(proxy) == 1
    assert t.call("CLIENT", "TRACKING", "OFF") == b"+OK\r\n"
    wait_unpinned(proxy)
    assert t.call("GET", "rep") == b"$1\r\n1\r\n"


def test_client_reply_skip_releases_the_pin_after_the_skipped_request(proxy, raw):
    """SKIP skips one reply: once that request has gone the connection is shared again, also when
    the skipped request is one vproxy answers itself (AUTH) or SKIP comes again; OFF after SKIP
    keeps the pin until ON."""
    wait_unpinned(proxy)
    c = raw()
    c.send(E("CLIENT", "REPLY", "SKIP") + E("SET", "skp", "1"))
    assert c.call("GET", "skp") == b"$1\r\n1\r\n"  # SKIP's and SET's replies skipped
    wait_unpinned(proxy)
    c.send(E("CLIENT", "REPLY", "SKIP") + E("CLIENT", "REPLY", "SKIP") + E("INCR", "skp"))
    assert c.call("GET", "skp") == b"$1\r\n2\r\n"
    wait_unpinned(proxy)
    c.send(E("CLIENT", "REPLY", "SKIP") + E("CLIENT", "REPLY", "OFF") + E("INCR", "skp"))
    assert c.nothing_pending(0.3)
    assert pinned(proxy) == 1  # replies are off: the connection stays the client's
    assert c.call("CLIENT", "REPLY", "ON") == b"+OK\r\n"
    wait_unpinned(proxy)
    assert c.call("GET", "skp") == b"$1\r\n3\r\n"


def _subscribe_with_replies(port: int, server, proto: str, mode: str) -> list:
    wait_for(lambda: server.client().pubsub_numsub("secret")[0][1] == 0, what="no subscriber left")
    with RawClient(port, timeout=5) as a:
        a.call("HELLO", proto)
        a.send(E("CLIENT", "REPLY", mode) + E("SUBSCRIBE", "secret") + E("CLIENT", "REPLY", "ON") + E("PING"))
        first = a.read()  # the subscription's confirmation (sent even with replies off or skipped)
        wait_for(lambda: server.client().pubsub_numsub("secret")[0][1] == 1, what="the subscription")
        server.client().publish("secret", "for-a")
        a.send(E("UNSUBSCRIBE") + E("CLIENT", "REPLY", "ON") + E("ECHO", "end-marker"))
        rest = a.read_until(lambda f: f == b"$10\r\nend-marker\r\n")
        return [first, *rest]


@pytest.mark.parametrize("proto", ["2", "3"])
@pytest.mark.parametrize("mode", ["SKIP", "OFF"])
def test_subscribe_while_replies_are_off_or_skipped(proxy, server, raw, proto, mode):
    """A SUBSCRIBE whose reply is skipped or off still subscribes: the client gets its messages as
    directly, and that connection, subscribed, is never handed to another client."""
    wait_unpinned(proxy)
    want = _subscribe_with_replies(server.port, server, proto, mode)
    assert any(b"for-a" in f for f in want)
    assert _subscribe_with_replies(proxy.port, server, proto, mode) == want
    wait_unpinned(proxy)
    b = raw()  # the next client pinning a connection gets a clean one, and none of the messages
    b.send(E("CLIENT", "REPLY", "OFF") + E("SET", "skp-b", "1") + E("CLIENT", "REPLY", "ON") + E("GET", "skp-b"))
    assert b.read_n(2) == [b"+OK\r\n", b"$1\r\n1\r\n"]
    server.client().publish("secret", "for-nobody")
    assert b.nothing_pending(0.3)


# ---- the max_pinned limit ----


def test_max_pinned_limit(server, start_proxy):
    p = start_proxy("--backend", server.addr, "--max-pinned", "2")
    server.client().delete("lim1", "lim2", "lim3")
    holders = [RawClient(p.port, timeout=30) for _ in range(2)]
    for i, h in enumerate(holders):
        h.send(E("BLPOP", f"lim{i + 1}", "0"))
    wait_for(lambda: pinned(p) == 2, what="two BLPOPs pinned")
    with RawClient(p.port) as third:
        reply = third.call("BLPOP", "lim3", "0")
        assert reply.startswith(b"-ERR") and b"max_pinned" in reply
        assert third.call("MULTI").startswith(b"-ERR")  # MULTI needs a pin too
        assert third.call("SET", "lim-ok", "0").startswith(b"-ERR")  # not run outside the transaction
        assert third.call("DISCARD") == b"+OK\r\n"
        assert third.call("SET", "lim-ok", "1") == b"+OK\r\n"  # still usable, on a shared connection
        assert third.call("GET", "lim-ok") == b"$1\r\n1\r\n"
        c = p.client(protocol=3)  # a whole new redis-py client connects fine meanwhile
        assert c.ping() is True
        c.rpush("lim1", "x")
        assert holders[0].read() == b"*2\r\n$4\r\nlim1\r\n$1\r\nx\r\n"
        wait_for(lambda: pinned(p) == 1, what="a pin to come back")
        third.send(E("BLPOP", "lim3", "0"))
        wait_for(lambda: pinned(p) == 2, what="the third client to get the freed pin")
        c.rpush("lim3", "y")
        assert third.read() == b"*2\r\n$4\r\nlim3\r\n$1\r\ny\r\n"
    c.rpush("lim2", "z")
    assert holders[1].read() == b"*2\r\n$4\r\nlim2\r\n$1\r\nz\r\n"
    for h in holders:
        h.close()
    wait_unpinned(p)


# ---- pipelines that cross into and out of pinned state keep the client's order ----

ORDER_CASES = {
    "watch-multi": E("SET", "a", "1")
    + E("WATCH", "a")
    + E("GET", "a")
    + E("MULTI")
    + E("SET", "a", "2")
    + E("EXEC")
    + E("GET", "a"),
    "blpop-between": E("SET", "x", "1")
    + E("BLPOP", "q", "0.01")
    + E("GET", "x")
    + E("RPUSH", "q", "v")
    + E("BLPOP", "q", "0")
    + E("GET", "x"),
    "subscribe-between": E("SET", "x", "1") + E("SUBSCRIBE", "ch") + E("PING") + E("UNSUBSCRIBE") + E("GET", "x"),
    "blpop-in-multi": E("MULTI") + E("BLPOP", "q", "0") + E("EXEC"),
    "blpop-while-watching": E("WATCH", "a") + E("BLPOP", "q", "0.01") + E("UNWATCH") + E("GET", "a"),
    "xread-block": E("XADD", "s", "1-1", "f", "v")
    + E("XREAD", "BLOCK", "50", "STREAMS", "s", "0")
    + E("XREAD", "BLOCK", "50", "STREAMS", "s", "$")
    + E("PING"),
    "select-discarded": E("MULTI")
    + E("SELECT", "2")
    + E("DISCARD")
    + E("SET", "k", "v")
    + E("SELECT", "2")
    + E("GET", "k"),
    "sub-unsub-set": E("SUBSCRIBE", "a")
    + E("SUBSCRIBE", "b")
    + E("UNSUBSCRIBE", "a")
    + E("UNSUBSCRIBE", "b")
    + E("SET", "k", "v"),
    "reply-skip-twice": E("CLIENT", "REPLY", "SKIP")
    + E("CLIENT", "REPLY", "SKIP")
    + E("SET", "k", "1")
    + E("GET", "k")
    + E("CLIENT", "REPLY", "SKIP")
    + E("MULTI")
    + E("SET", "k", "2")
    + E("EXEC")
    + E("GET", "k"),
    "reply-skip-off-on": E("CLIENT", "REPLY", "SKIP")
    + E("SET", "k", "1")
    + E("GET", "k")
    + E("CLIENT", "REPLY", "OFF")
    + E("SET", "k", "2")
    + E("CLIENT", "REPLY", "ON")
    + E("GET", "k"),
    "reply-skip-reset": E("CLIENT", "REPLY", "SKIP") + E("RESET") + E("GET", "k"),
    "reply-off-reset": E("CLIENT", "REPLY", "OFF") + E("SET", "k", "1") + E("RESET") + E("GET", "k"),
    # a stream started and ended in one write: the stream's own replies come first
    "subscribe-quit": E("SUBSCRIBE", "ch") + E("QUIT"),
    "psubscribe-reset": E("PSUBSCRIBE", "x*") + E("RESET") + E("SET", "k", "1"),
    "monitor-quit": E("MONITOR") + E("QUIT"),
    "monitor-reset": E("MONITOR") + E("RESET") + E("GET", "k"),
    "tracking-reset": E("CLIENT", "TRACKING", "ON") + E("RESET") + E("GET", "k"),
}


def _all_replies(port: int, data: bytes, server) -> bytes:
    """Every byte answered to data: up to EOF after a QUIT, else up to an ECHO marker sent behind it."""
    server.client().flushall()
    with RawClient(port, timeout=5) as c:
        if data.endswith(E("QUIT")):
            c.send(data)
            assert c.closed_by_peer(5)
            return c.buf
        marker = E("ECHO", "end-of-case")
        c.send(data + marker)
        frames = c.read_until(lambda f: f == b"$11\r\nend-of-case\r\n")
        return b"".join(frames)


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_pipeline_order_across_pinned_state_matches_server(proxy, server, case):
    data = ORDER_CASES[case]
    direct = _all_replies(server.port, data, server)
    via = _all_replies(proxy.port, data, server)
    assert via == direct
    wait_unpinned(proxy)


def test_client_unblock_and_kill(proxy, raw):
    b, admin = raw(), raw()
    my_id = int(b.call("CLIENT", "ID")[1:-2])
    b.send(E("BLPOP", "never-filled", "0"))
    wait_for(lambda: pinned(proxy) == 1, what="BLPOP pinned")
    assert admin.call("CLIENT", "UNBLOCK", str(my_id)) == b":1\r\n"
    assert b.read() == b"*-1\r\n"  # unblocked as if timed out: a null array, as the server answers
    assert admin.call("CLIENT", "UNBLOCK", str(my_id)) == b":0\r\n"  # not blocked any more
    b.send(E("BLPOP", "never-filled", "0"))
    wait_for(lambda: pinned(proxy) == 1, what="BLPOP pinned again")
    assert admin.call("CLIENT", "UNBLOCK", str(my_id), "ERROR").startswith(b":1")
    assert b.read().startswith(b"-UNBLOCKED")
    assert admin.call("CLIENT", "KILL", "ID", str(my_id)) == b":1\r\n"
    assert b.closed_by_peer(5)
    wait_unpinned(proxy)
    assert admin.call("PING") == b"+PONG\r\n"


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize(
    "cmd",
    [
        ("BLPOP", "q", "0"),
        ("BLMOVE", "q", "d", "LEFT", "RIGHT", "0"),
        ("BZPOPMIN", "z", "0"),
        ("XREAD", "BLOCK", "0", "STREAMS", "st", "$"),
    ],
)
def test_client_unblock_reply_matches_server(proxy, server, protocol, cmd):
    def unblocked(port: int) -> bytes:
        with RawClient(port) as b, RawClient(port) as admin:
            b.call("HELLO", protocol)
            bid = b.call("CLIENT", "ID")[1:-2]
            b.send(E(*cmd))
            wait_for(lambda: admin.call("CLIENT", "UNBLOCK", bid) == b":1\r\n", what="the client to block")
            return b.read()

    assert unblocked(proxy.port) == unblocked(server.port) == (b"*-1\r\n" if protocol == 2 else b"_\r\n")


# ---- connection state changed inside a transaction must not leak to other clients ----


def test_subscribe_inside_multi_is_refused_and_poisons_no_connection(proxy, server):
    """A SUBSCRIBE queued in MULTI would subscribe the transaction's connection but leave the client
    outside a stream (no message would reach it): refused at queue time, EXEC aborts; UNSUBSCRIBE
    run by EXEC still keeps that connection from other clients."""
    with RawClient(proxy.port) as a:
        for sub in ("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"):
            a.send(E("MULTI") + E(sub, "in-multi") + E("SET", "never", "1") + E("EXEC"))
            out = a.read_n(4)
            assert out[1].startswith(b"-ERR vproxy: SUBSCRIBE inside MULTI is not supported"), out
            assert out[2:] == [b"+QUEUED\r\n", b"-EXECABORT Transaction discarded because of previous errors.\r\n"]
        assert a.call("EXISTS", "never") == b":0\r\n"
        a.send(E("MULTI") + E("UNSUBSCRIBE", "x") + E("EXEC"))
        assert a.read_n(3)[2] == b"*1\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:0\r\n"
    wait_unpinned(proxy)
    for _ in range(3):  # whichever pinned connection the pool hands out next is a clean one
        with RawClient(proxy.port) as b:
            b.send(E("MULTI") + E("SET", "after", "1") + E("EXEC") + E("WATCH", "after") + E("UNWATCH"))
            assert b.read_n(5) == [b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+OK\r\n", b"+OK\r\n", b"+OK\r\n"]


def test_subscribe_inside_multi_inside_a_resp3_subscription_runs(proxy, server):
    """In a RESP3 subscription the stream's own connection runs the transaction: SUBSCRIBE in its
    MULTI subscribes the client (not refused), as directly."""
    got = []
    for port in (server.port, proxy.port):
        with RawClient(port) as c:
            assert c.call("HELLO", "3").startswith(b"%")
            c.send(E("SUBSCRIBE", "s1") + E("MULTI") + E("SUBSCRIBE", "s2") + E("EXEC") + E("UNSUBSCRIBE"))
            got.append(c.read_n(6))
    assert got[1] == got[0]
    assert got[0][3].endswith(b":2\r\n") and got[0][5].endswith(b":0\r\n")  # s2 was subscribed by EXEC
    wait_unpinned(proxy)


def test_hello_while_watching_switches_replies(raw, server):
    server.client().hset("hw", "f", "v")
    c = raw()
    assert c.call("WATCH", "k") == b"+OK\r\n"
    assert c.call("HELLO", "3").startswith(b"%")
    assert c.call("HGETALL", "hw") == b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"


def test_hello_inside_multi_applies_after_exec(raw, server):
    server.client().hset("hm", "f", "v")
    c = raw()
    c.send(E("MULTI") + E("HELLO", "3") + E("EXEC"))
    assert c.read_n(3)[2].startswith(b"*1\r\n%")
    assert c.call("HGETALL", "hm") == b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"


def test_subscribe_then_hang_up_leaks_no_backend_connection(proxy, server):
    """A client that subscribes and disconnects at once must not leave a backend connection open."""
    wait_for(lambda: proxy_stats(proxy)["backend_connections_pinned"] == 0, what="no pins")
    reused = proxy_stats(proxy)["backend_connections_idle_pinned"]  # kept connections: no connect
    d = server.client(protocol=2)  # one probe connection, kept
    before = d.info("clients")["connected_clients"]
    accepted = d.info("stats")["total_connections_received"]
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(E("SUBSCRIBE", f"ch{i}"))
        s.close()
    # the proxy opened a backend connection for each (dropped before or after it was up) ...
    wait_for(lambda: d.info("stats")["total_connections_received"] >= accepted + 20 - reused, what="backend connects")
    wait_for(lambda: proxy_stats(proxy)["backend_connections_pinned"] == 0, what="pins released")
    # ... and every one of them is closed on the backend too
    wait_for(lambda: d.info("clients")["connected_clients"] <= before + 2, what="backend connections closed")
    d.close()


def test_failed_multi_applies_no_queued_command(server, start_proxy):
    """MULTI refused (max_pinned reached): the commands behind it must not run outside a transaction."""
    server.client().flushall()
    p = start_proxy("--backend", server.addr, "--max-pinned", "1")
    with RawClient(p.port) as a, RawClient(p.port) as b:
        assert a.call("WATCH", "w") == b"+OK\r\n"  # holds the one pinned connection
        b.send(E("MULTI") + E("SET", "t", "1") + E("EXEC"))
        multi, queued, exec_ = b.read_n(3)
        assert multi.startswith(b"-ERR") and queued.startswith(b"-ERR") and exec_.startswith(b"-EXECABORT")
        assert server.client().get("t") is None
        assert b.call("SET", "t", "2") == b"+OK\r\n"  # the failed transaction is over
        assert a.call("UNWATCH") == b"+OK\r\n"
        assert b.call("MULTI") == b"+OK\r\n"  # and a new one works
        assert b.call("INCR", "t") == b"+QUEUED\r\n"
        assert b.call("EXEC") == b"*1\r\n:3\r\n"
