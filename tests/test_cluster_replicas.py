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
