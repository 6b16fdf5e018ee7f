"""WAIT through the proxy counts the replicas that have the client's own writes."""

import pytest

from conftest import Proxy, Server, wait_for


@pytest.fixture(scope="module")
def replicated():
    primary = Server("valkey")
    replica = Server("valkey", None, "--replicaof", "127.0.0.1", str(primary.port))
    wait_for(lambda: primary.client().info("replication").get("slave0", {}).get("state") == "online",
             timeout=30, what="replica online")
    proxy = Proxy("--backend", primary.addr)
    yield primary, replica, proxy
    proxy.stop()
    replica.stop()
    primary.stop()


def test_wait_counts_a_replica_that_has_the_write(replicated):
    _, _, proxy = replicated
    c = proxy.client()
    c.set("k", "v")
    assert c.execute_command("WAIT", 1, 5000) == 1


def test_wait_does_not_count_a_replica_that_lacks_the_write(replicated):
    """A paused replica has not acknowledged the write: WAIT must time out with 0, not say 1."""
    _, replica, proxy = replicated
    c = proxy.client()
    replica.pause()
    try:
        c.set("k2", "v")
        assert c.execute_command("WAIT", 1, 300) == 0
    finally:
        replica.resume()
    assert c.execute_command("WAIT", 1, 5000) == 1  # caught up once it runs again
