"""ClusterMonitor against a real 3-primary cluster: slot map, seeds, refresh after a change."""

from types import SimpleNamespace

import pytest
from clusterkit import Cluster

from vproxy import hostport
from vproxy.sentinel.cluster import ClusterMonitor
from vproxy.sentinel.topology import SLOTS, Topology
from vproxy.slots import key_slot


class FakeRouter:
    def __init__(self):
        self.topology = Topology("cluster", None)

    def publish(self, topo):
        self.topology = topo


def _monitor(seeds):
    cfg = SimpleNamespace(connect_timeout=2.0, backend_username="", backend_password="", topology_refresh=1.0,
                          backend_tls=False)
    app = SimpleNamespace(cfg=cfg, seeds=[hostport.parse(s) for s in seeds], router=FakeRouter())
    return ClusterMonitor(app), app


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("valkey", 3)
    yield c
    c.stop()


def test_reads_the_full_map(cluster):
    mon, app = _monitor([cluster.seeds[1]])
    assert mon.refresh() is True
    topo = app.router.topology
    assert topo.covered() == SLOTS and len(topo.primaries) == 3
    assert len(topo.first_slots) == 3
    for key in (b"foo", b"bar", b"{user}1", b"zz"):
        assert topo.owner(key_slot(key))[1] == cluster.owner(key).port
    assert topo.databases == 1  # valkey's default cluster-databases


def test_dead_seed_is_skipped(cluster):
    from vproxy.embedded import free_port
    mon, app = _monitor([f"127.0.0.1:{free_port()}", cluster.seeds[2]])
    assert mon.refresh() is True
    assert app.router.topology.covered() == SLOTS


def test_known_nodes_are_asked_when_seeds_die(cluster):
    mon, app = _monitor([cluster.seeds[0]])
    assert mon.refresh()
    mon.seeds = []  # the seed is gone: the map's own nodes are enough
    for _ in range(4):
        assert mon.refresh()
    assert len(mon.candidates()) == 3


def test_moved_patch():
    from vproxy.sentinel.topology import ClusterTopology
    t = ClusterTopology("cluster", None).moved(7, ("h", 1))
    assert t.owner(7) == ("h", 1) and t.owner(8) is None and t.moved(7, ("h", 1)) is t
