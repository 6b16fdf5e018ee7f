"""Cluster mode with one replica per primary: read_from=replica sends reads to replicas (READONLY)."""

from __future__ import annotations

import pytest
from clusterkit import Cluster
from conftest import Proxy, wait_for


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("valkey", 3, 1)
    yield c
    c.stop()


def _calls(node, cmd: str) -> int:
    return node.client().info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0)


def test_reads_go_to_replicas(cluster):
    p = Proxy("--mode", "cluster", "--backend", cluster.seeds[0], "--read-from", "replica")
    try:
        c = p.client()
        wait_for(lambda: c.info()["proxy_cluster_replicas"] == 3, 20, "the proxy to know the replicas")
        for n in cluster.nodes:
            n.client().config_resetstat()
        keys = [f"rk{n}" for n in range(100)]
        c.mset({k: k for k in keys})
        wait_for(lambda: all(r.client().dbsize() > 0 for r in cluster.replicas), what="replication")
        wait_for(lambda: all(c.get(k) == k.encode() for k in keys), what="replicas to catch up")
        assert sum(_calls(r, "get") for r in cluster.replicas) >= 100
        assert sum(_calls(m, "get") for m in cluster.primaries) == 0
        assert c.set("w", 1) and sum(_calls(m, "set") for m in cluster.primaries) == 1
        gets = sum(_calls(r, "mget") for r in cluster.replicas)
        assert c.mget(keys[:10]) == [k.encode() for k in keys[:10]]
        assert sum(_calls(r, "mget") for r in cluster.replicas) > gets  # split reads use replicas too
        assert sum(_calls(m, "mget") for m in cluster.primaries) == 0
    finally:
        p.stop()


def test_primary_reads_by_default(cluster):
    p = Proxy("--mode", "cluster", "--backend", cluster.seeds[0])
    try:
        c = p.client()
        for n in cluster.nodes:
            n.client().config_resetstat()
        c.set("x", 1)
        assert c.get("x") == b"1"
        assert sum(_calls(r, "get") for r in cluster.replicas) == 0
    finally:
        p.stop()


def test_read_from_a_silent_replica_falls_back_to_the_primary(cluster):
    """A replica that stops answering (SIGSTOP) before a session's first read goes there: the new
    connection's handshake times out, and the read runs on the primary instead of failing."""
    p = Proxy("--mode", "cluster", "--backend", cluster.seeds[0], "--read-from", "replica",
              "--command-timeout", "1")
    shard = 0
    replica = cluster.replicas[shard]  # clusterkit: replica j follows primary j % 3
    key = next(f"silent{n}" for n in range(1000) if cluster.owner(f"silent{n}") is cluster.primaries[shard])
    try:
        c = p.client(socket_timeout=10)
        wait_for(lambda: c.info()["proxy_cluster_replicas"] == 3, 20, "the proxy to know the replicas")
        assert c.set(key, "v")
        rc = replica.client(single_connection_client=True)
        rc.execute_command("READONLY")
        wait_for(lambda: rc.get(key) == b"v", what="replication")
        rc.close()
        replica.pause()
        try:
            assert c.get(key) == b"v"
        finally:
            replica.resume()
    finally:
        p.stop()
