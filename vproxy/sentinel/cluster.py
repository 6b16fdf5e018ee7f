"""ClusterMonitor: discover and follow a Redis/Valkey Cluster's slot map, publishing frozen snapshots.

    run(): loop  refresh() -> router.publish(ClusterTopology)  then wait for
                 topology_refresh seconds, or for request_refresh() (MOVED, connection failure)

refresh() asks the known nodes and the seeds in turn (starting from a different one each time, so
no single entry node is needed) for CLUSTER SHARDS, falling back to CLUSTER SLOTS on servers that
lack it, and keeps the first answer covering every slot (else the best one). It talks to the
nodes over short-lived control links of its own (node.NodeLink): sentinel/ does not use mux/.
"""

from __future__ import annotations

import gevent
from gevent.event import Event
from loguru import logger

from .. import hostport
from .node import NodeError, NodeLink
from .topology import SLOTS, ClusterTopology, Shard

MIN_GAP = 0.05  # fewest seconds between two refreshes asked for by MOVED or failures


class ClusterMonitor:
    """The monitor greenlet of mode 'cluster'."""

    def __init__(self, app):
        self.app, self.cfg = app, app.cfg
        self.seeds = list(app.seeds)
        self.wake = Event()
        self.stopped = False
        self.refreshes = 0
        self.failures = 0
        self.last_error = ""
        self.databases: int | None = None

    def request_refresh(self) -> None:
        """Ask for a refresh soon (after MOVED, CLUSTERDOWN or a connection failure)."""
        self.wake.set()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def run(self) -> None:
        while not self.stopped:
            self.wake.clear()
            try:
                ok = self.refresh()
            except Exception:  # the monitor must outlive one bad refresh
                logger.exception("cluster refresh failed")
                ok = False
            gevent.sleep(MIN_GAP)
            self.wake.wait(timeout=self.cfg.topology_refresh if ok else min(0.2, self.cfg.topology_refresh))

    # ---- one refresh ----

    def candidates(self) -> list[tuple[str, int]]:
        """Known nodes then seeds, without repeats, rotated so each refresh starts elsewhere."""
        topo = self.app.router.topology
        nodes = []
        for shard in getattr(topo, "shards", ()):
            nodes.append(shard.primary)
            nodes.extend(shard.replicas)
        out = list(dict.fromkeys(nodes + self.seeds))
        k = self.refreshes % len(out) if out else 0
        return out[k:] + out[:k]

    def refresh(self) -> bool:
        """Read the slot map from the first node that gives a complete one; publish it if it changed."""
        self.refreshes += 1
        best = None
        for addr in self.candidates():
            try:
                shards, slots = self.read_map(addr)
            except NodeError as e:  # names the node itself
                self.last_error = str(e)
                continue
            except (ValueError, TypeError, IndexError) as e:  # a reply not as expected
                self.last_error = f"{hostport.fmt(addr)}: {e}"
                continue
            covered = sum(1 for s in slots if s >= 0)
            if best is None or covered > best[0]:
                best = (covered, shards, slots)
            if covered == SLOTS:
                break
        if best is None:
            self.failures += 1
            logger.warning("no cluster node answered CLUSTER SHARDS/SLOTS (last: {})", self.last_error)
            return False
        self.publish(best[1], best[2])
        return best[0] == SLOTS

    def publish(self, shards: tuple, slots: tuple) -> None:
        router = self.app.router
        old = router.topology
        if getattr(old, "shards", None) == shards and getattr(old, "slots", None) == slots \
                and getattr(old, "databases", None) == self.databases:
            return
        owning = set(slots)
        primary = next((s.primary for i, s in enumerate(shards) if i in owning), None)
        if primary is None and shards:
            primary = shards[0].primary
        replicas = tuple(r for s in shards for r in s.replicas)
        router.publish(ClusterTopology("cluster", primary, replicas, getattr(old, "version", 0) + 1,
                                       shards=shards, slots=slots, databases=self.databases or 1))
        logger.info("cluster map: {} shards, {} slots covered", len(shards), sum(1 for s in slots if s >= 0))

    def read_map(self, addr) -> tuple[tuple, tuple]:
        cfg = self.cfg
        link = NodeLink(addr, cfg.connect_timeout, cfg)  # short-lived: one refresh
        try:
            if self.databases is None:
                self.databases = _cluster_databases(link)
            reply = link.query("CLUSTER", "SHARDS")
            if isinstance(reply, Exception):  # a server older than CLUSTER SHARDS
                return parse_slots(link.call("CLUSTER", "SLOTS"), addr)
            return parse_shards(reply, addr, cfg.backend_tls)
        finally:
            link.close()


def _cluster_databases(link: NodeLink) -> int:
    """How many databases the cluster serves (Valkey 9 `cluster-databases`); 1 when it cannot say."""
    reply = link.query("CONFIG", "GET", "cluster-databases")
    if isinstance(reply, list) and len(reply) == 2:
        try:
            return max(1, int(reply[1]))
        except ValueError:
            return 1
    return 1


def _pairs(flat) -> dict:
    if isinstance(flat, dict):
        return {_s(k): v for k, v in flat.items()}
    return {_s(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _node_addr(node: dict, asked, tls: bool = False) -> tuple[str, int]:
    """A node's address; with tls (backend_tls) its TLS port (CLUSTER SHARDS lists both)."""
    host = _s(node.get("ip") or node.get("endpoint") or b"")
    if host in ("", "?"):
        host = asked[0]
    if tls:
        return host, int(node.get("tls-port") or node.get("port"))
    return host, int(node.get("port") or node.get("tls-port"))


def parse_shards(reply, asked, tls: bool = False) -> tuple[tuple, tuple]:
    """CLUSTER SHARDS -> (shards, 16384 slot owner indices). A failed primary is passed over.
    tls: the nodes' TLS ports (backend_tls)."""
    found = []
    for raw in reply:
        shard = _pairs(raw)
        nodes = [_pairs(n) for n in shard.get("nodes", [])]
        primary = sorted((n for n in nodes if _s(n.get("role")) == "master"),
                         key=lambda n: _s(n.get("health")) != "online")
        ranges = [int(x) for x in shard.get("slots", [])]
        if not primary or not ranges:
            continue
        addr = _node_addr(primary[0], asked, tls)
        replicas = tuple(sorted(_node_addr(n, asked, tls) for n in nodes if n is not primary[0]
                                and _s(n.get("role")) != "master" and _s(n.get("health")) == "online"))
        found.append((min(ranges[0::2]), Shard(addr, replicas), ranges))
    found.sort(key=lambda f: f[0])  # a stable order, whichever node answered
    shards, slots = [], [-1] * SLOTS
    for idx, (_, shard, ranges) in enumerate(found):
        shards.append(shard)
        for k in range(0, len(ranges) - 1, 2):
            slots[ranges[k]:ranges[k + 1] + 1] = [idx] * (ranges[k + 1] - ranges[k] + 1)
    return tuple(shards), tuple(slots)


def parse_slots(reply, asked) -> tuple[tuple, tuple]:
    """CLUSTER SLOTS -> (shards, 16384 slot owner indices)."""
    ranges: dict[tuple, list] = {}
    reps: dict[tuple, tuple] = {}
    for entry in sorted(reply, key=lambda e: int(e[0])):
        master = entry[2]
        addr = (_s(master[0]) or asked[0], int(master[1]))
        ranges.setdefault(addr, []).append((int(entry[0]), int(entry[1])))
        reps[addr] = tuple(sorted(((_s(r[0]) or asked[0]), int(r[1])) for r in entry[3:]))
    shards, slots = [], [-1] * SLOTS
    for idx, addr in enumerate(sorted(ranges, key=lambda a: ranges[a][0][0])):
        shards.append(Shard(addr, reps[addr]))
        for start, end in ranges[addr]:
            slots[start:end + 1] = [idx] * (end - start + 1)
    return tuple(shards), tuple(slots)
