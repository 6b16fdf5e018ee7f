"""Sharded pub/sub through vproxy in cluster mode: SSUBSCRIBE on the shard owner, several nodes at once,
and the subscription kept across a slot migration (CLUSTER SETSLOT ... NODE), a manual failover and a
killed primary. The server's own `sunsubscribe` for a lost slot never reaches the client, and the counts
the client sees are those one server would report (shard channels counted apart from channels)."""

from __future__ import annotations

import contextlib
import time

import pytest
import redis
from clusterkit import Cluster
from conftest import BACKENDS, Proxy, RawClient, wait_for
from test_cluster_resilience import migrate_slot

from vproxy import resp
from vproxy.slots import key_slot

E = RawClient.encode


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request):
    c = Cluster(request.param, 3, 1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def proxy(cluster):
    p = Proxy("--mode", "cluster", "--backend", cluster.seeds[0], "--backend", cluster.seeds[1],
              "--topology-refresh", "0.5", "--primary-wait", "15")
    yield p
    p.stop()


def take(sub: RawClient, n: int, timeout: float = 10) -> list:
    """The subscriber's next n frames, decoded (conftest's RawClient reads them byte for byte)."""
    return [resp.decode(f) for f in sub.read_n(n, timeout)]


def arrived(sub: RawClient, within: float):
    """Each frame that arrives within `within` seconds, decoded, as it arrives."""
    end = time.monotonic() + within
    while (left := end - time.monotonic()) > 0:
        try:
            frame = sub.read(left)
        except TimeoutError:
            return
        yield resp.decode(frame)


def channel_on(cluster, node, prefix: str) -> bytes:
    """A channel name whose slot the node owns now."""
    return next(f"{prefix}{n}".encode() for n in range(10000) if cluster.owner(f"{prefix}{n}") is node)


def heard(sub: RawClient, r, channel: bytes, timeout: float = 30) -> None:
    """SPUBLISH through the proxy until the subscriber gets the message; nothing else may arrive."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        msg = f"m{n}-{time.monotonic()}".encode()
        # the slot is moving; vproxy holds and retries, but may give up: then publish again
        with contextlib.suppress(redis.RedisError):
            r.execute_command("SPUBLISH", channel, msg)
        for v in arrived(sub, 0.3):
            assert v[0] == b"smessage" and v[1] == channel, f"unexpected frame {v!r}"
            if v == [b"smessage", channel, msg]:
                return
    raise AssertionError(f"no message on {channel!r} within {timeout}s")


def test_shard_channels_on_several_nodes_follow_a_slot_migration(cluster, proxy):
    x, y, z = cluster.primaries
    a, b, c = channel_on(cluster, x, "sa"), channel_on(cluster, y, "sb"), channel_on(cluster, x, "sc")
    r = proxy.client()
    s = RawClient(proxy.port)
    try:
        s.send(E("SUBSCRIBE", "plain"))  # channels are counted apart from shard channels, as on a server
        assert take(s, 1) == [[b"subscribe", b"plain", 1]]
        s.send(E("SSUBSCRIBE", a))
        s.send(E("SSUBSCRIBE", b))  # another node: a second connection, replies still in order
        assert take(s, 2) == [[b"ssubscribe", a, 1], [b"ssubscribe", b, 2]]
        heard(s, r, a)
        heard(s, r, b)
        slot = key_slot(a)
        migrate_slot(cluster, slot, x, z)
        wait_for(lambda: cluster.owner(a) is z, 10, "the slot to move")
        heard(s, r, a)  # re-subscribed on z; the server's sunsubscribe was hidden
        assert z.client().execute_command("PUBSUB", "SHARDNUMSUB", a)[1] == 1
        assert x.client().execute_command("PUBSUB", "SHARDNUMSUB", a)[1] == 0
        s.send(E("SSUBSCRIBE", c))
        assert take(s, 1) == [[b"ssubscribe", c, 3]]
        assert r.publish("plain", "p") >= 1
        assert take(s, 1) == [[b"message", b"plain", b"p"]]
        s.send(E("SUNSUBSCRIBE", a))
        assert take(s, 1) == [[b"sunsubscribe", a, 2]]
        s.send(E("SUNSUBSCRIBE"))
        got = take(s, 2)
        assert sorted(v[1] for v in got) == [b, c] and [v[2] for v in got] == [1, 0]
        s.send(E("UNSUBSCRIBE"))
        assert take(s, 1) == [[b"unsubscribe", b"plain", 0]]
        s.send(E("PING"))
        assert take(s, 1) == [b"PONG"]  # out of subscribed mode
        migrate_slot(cluster, slot, z, x)  # back, for the next tests
        wait_for(lambda: cluster.owner(a) is x, 10, "the slot to move back")
    finally:
        s.close()


def test_shard_channel_follows_a_manual_failover(cluster, proxy):
    primary = cluster.primaries[0]
    a = channel_on(cluster, primary, "fa")
    r = proxy.client()
    s = RawClient(proxy.port)
    try:
        s.send(E("SSUBSCRIBE", a))
        assert take(s, 1) == [[b"ssubscribe", a, 1]]
        heard(s, r, a)
        replica = next(n for n in cluster.replicas
                       if n.client().info("replication").get("master_port") == primary.port)
        replica.client().execute_command("CLUSTER", "FAILOVER")
        wait_for(lambda: cluster.owner(a) is replica, 20, "the replica to take over")
        heard(s, r, a)
        s.send(E("PING"))
        assert take(s, 1) == [[b"pong", b""]]
        s.send(E("SUNSUBSCRIBE", a))
        assert take(s, 1) == [[b"sunsubscribe", a, 0]]
    finally:
        s.close()


def test_shard_channel_survives_its_primary_killed(cluster, proxy):
    victim = cluster.primaries[1]
    a = channel_on(cluster, victim, "ka")
    r = proxy.client(socket_timeout=30)
    s = RawClient(proxy.port)
    try:
        s.send(E("SSUBSCRIBE", a))
        assert take(s, 1) == [[b"ssubscribe", a, 1]]
        heard(s, r, a)
        victim.kill()  # the last test of the module: the cluster keeps a promoted replica
        wait_for(lambda: cluster.owner(a) is not victim, 30, "a replica to take over")
        heard(s, r, a)
        s.send(E("SSUBSCRIBE", a + b"x"))
        got = take(s, 1)
        assert got[0][0] == b"ssubscribe" and got[0][2] == 2
    finally:
        s.close()


def _heard_plain(sub: RawClient, r, publish_to: bytes, expect: list, timeout: float = 30) -> None:
    """PUBLISH through the proxy until the subscriber gets `expect` + [message]; nothing else may arrive."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        msg = f"p{n}-{time.monotonic()}".encode()
        with contextlib.suppress(redis.RedisError):  # the node vproxy asks may be the dead one
            r.publish(publish_to, msg)
        for v in arrived(sub, 0.3):
            assert v[0] in (b"message", b"pmessage"), f"unexpected frame {v!r}"
            if v == expect + [msg]:
                return
    raise AssertionError(f"no message on {publish_to!r} within {timeout}s")


def test_subscriber_survives_its_node_killed(cluster, proxy):
    """SUBSCRIBE/PSUBSCRIBE live on one node's connection; when that node dies vproxy subscribes
    again on another primary, hiding the confirmations: the client keeps hearing, with no error."""
    r = proxy.client(socket_timeout=30)
    s = RawClient(proxy.port)
    try:
        s.send(E("SUBSCRIBE", "news"))
        s.send(E("PSUBSCRIBE", "al*"))
        assert take(s, 2) == [[b"subscribe", b"news", 1], [b"psubscribe", b"al*", 2]]
        _heard_plain(s, r, b"news", [b"message", b"news"])
        holder = [n for n in cluster.nodes if n.proc.poll() is None
                  and any(int(c.get("sub", 0)) > 0 for c in n.client().client_list())]
        assert len(holder) == 1
        holder[0].kill()
        _heard_plain(s, r, b"news", [b"message", b"news"])
        _heard_plain(s, r, b"alpha", [b"pmessage", b"al*", b"alpha"])
        s.send(E("SUBSCRIBE", "more"))
        assert take(s, 1) == [[b"subscribe", b"more", 3]]
        s.send(E("PING"))
        assert take(s, 1) == [[b"pong", b""]]
    finally:
        s.close()
