"""Sentinel mode: vproxy asks the sentinels, verifies with ROLE, follows their failovers under load."""

from __future__ import annotations

import pytest

from conftest import wait_for
from ha_kit import ReplSet, Sentinels, failover_under_load, role, topology
from vproxy.embedded import free_port

FAST = ["--topology-refresh", "0.2", "--primary-wait", "15"]


@pytest.fixture
def sset():
    rs = ReplSet(2)
    sentinels = Sentinels(rs.primary.port)
    sentinels.wait_ready(2)
    yield rs, sentinels
    sentinels.stop()
    rs.stop()


def test_discovers_primary_and_replicas(sset, start_proxy):
    rs, sentinels = sset
    dead = f"127.0.0.1:{free_port()}"  # listed first, never answers: the next sentinel moves to the front
    p = start_proxy("--sentinel", dead, *sentinels.args(), *FAST)
    t = topology(p)
    assert t["primary"] == rs.primary.addr
    assert t["sentinel"] != dead
    wait_for(lambda: sorted(r["addr"] for r in topology(p)["replicas"]) == sorted(r.addr for r in rs.replicas),
             what="replicas from SENTINEL REPLICAS")
    wait_for(lambda: all(r["healthy"] for r in topology(p)["replicas"]), what="replicas healthy")
    c = p.client()
    c.set("k", "v")
    assert rs.primary.client().get("k") == b"v"


def test_sentinel_password(start_proxy):
    rs = ReplSet(1)
    sentinels = Sentinels(rs.primary.port, n=1, password="s3cret")
    try:
        p = start_proxy(*sentinels.args(), *FAST)
        assert topology(p)["primary"] == rs.primary.addr
        assert topology(p)["sentinel"] == f"127.0.0.1:{sentinels.ports[0]}"
    finally:
        sentinels.stop()
        rs.stop()


@pytest.mark.parametrize("fault", ["kill", "pause", "shutdown"])
def test_sentinel_failover_under_load(sset, start_proxy, fault):
    rs, sentinels = sset
    p = start_proxy(*sentinels.args(), *FAST)
    out = failover_under_load(rs, p, fault, "sentinel")
    new_port = int(out["new"].rsplit(":", 1)[1])
    assert sentinels.primary_port() == new_port
    assert out["errors"] <= 50  # only writes in flight at the fault, one per client at most
    old = rs.primary
    if fault == "pause":
        old.resume()
    if fault != "kill":
        return  # Sentinel demotes it within ~10 s (its INFO period): checked once, for kill, below
    old.start()
    # Sentinel (not vproxy) turns the old primary into a replica; vproxy lists it as one
    wait_for(lambda: role(old.port)[0] == b"slave", timeout=30, what="sentinel to demote the old primary")
    wait_for(lambda: old.addr in [r["addr"] for r in topology(p)["replicas"]], timeout=30,
             what="old primary listed as a replica")
    wait_for(lambda: topology(p)["primary"] == f"127.0.0.1:{sentinels.primary_port()}", what="proxy agrees")
