"""Status of a primary/replica set: INFO `# Proxy` and PROXY TOPOLOGY; waiting for a primary."""

from __future__ import annotations

import time

import pytest
import redis

from conftest import wait_for
from ha_kit import ReplSet, topology


@pytest.fixture
def rset():
    s = ReplSet(2)
    yield s
    s.stop()


def test_info_and_topology_follow_a_failover(rset, start_proxy):
    p = start_proxy(*rset.args(), "--mode", "replication", "--failover-timeout", "1.5",
                    "--topology-refresh", "0.2")
    info = p.info()
    assert info["proxy_primary"] == rset.primary.addr
    assert info["proxy_failovers"] == 0 and info["proxy_replicas_healthy"] == 2
    lines = [info[f"proxy_replica{i}"] for i in range(info["proxy_replicas"])]
    assert sorted(x["port"] for x in lines) == sorted(r.port for r in rset.replicas)
    assert all(x["healthy"] == 1 and x["state"] == "ok" for x in lines)
    old = rset.primary.addr
    rset.primary.kill()
    wait_for(lambda: p.info()["proxy_no_primary_seconds"] > 0, what="INFO to show the outage")
    assert p.info()["proxy_primary"] == "none"
    wait_for(lambda: p.info()["proxy_failovers"] == 1, timeout=15, what="INFO to count the failover")
    info, t = p.info(), topology(p)
    assert info["proxy_primary"] == t["primary"] != old
    assert info["proxy_last_failover"].startswith(f"{old} -> {t['primary']}")
    assert 1.0 < info["proxy_last_outage_seconds"] < 10 and info["proxy_no_primary_seconds"] == 0
    assert t["failovers"] == "1" and float(t["last_outage_seconds"]) > 1.0
    gone = next(r for r in t["replicas"] if r["addr"] == old)
    assert gone["healthy"] == 0 and gone["why"] == "unreachable"


def test_commands_wait_for_a_primary_then_get_a_clear_error(rset, start_proxy):
    p = start_proxy(*rset.args(), "--mode", "replication", "--failover-timeout", "60",
                    "--topology-refresh", "0.2", "--primary-wait", "1")
    c = p.client()
    c.set("k", "v")
    rset.primary.kill()
    wait_for(lambda: topology(p)["primary"] is None, what="no primary")
    t0 = time.monotonic()
    with pytest.raises(redis.ResponseError, match="primary_wait"):
        c.set("k", "w")
    assert 0.9 < time.monotonic() - t0 < 5
    # the connection stays open, and PING (a health check through vproxy) gets the same clear error
    with pytest.raises(redis.ResponseError, match="primary_wait"):
        c.ping()


def test_standalone_rejects_read_splitting():
    from vproxy.config import load
    from vproxy.errors import ConfigError
    with pytest.raises(ConfigError, match="read_from"):
        load(["--read-from", "replica"], env={})
