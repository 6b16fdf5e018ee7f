"""Command + topology snapshot -> the backend pool that must run it."""

from __future__ import annotations

from .errors import BackendError
from .mux.pool import NodePool
from .sentinel.topology import Topology


class Router:
    """Holds the current topology and a NodePool per backend address."""

    def __init__(self, cfg, topology: Topology):
        self.cfg = cfg
        self.pools: dict[tuple[str, int], NodePool] = {}
        self.topology = topology

    def pool(self, addr: tuple[str, int]) -> NodePool:
        p = self.pools.get(addr)
        if p is None:
            p = self.pools[addr] = NodePool(addr, self.cfg)
        return p

    def primary(self) -> NodePool:
        """The pool of the node that takes writes (standalone: the one server)."""
        addr = self.topology.primary
        if addr is None:
            raise BackendError("ERR vproxy: no primary is known yet; retry shortly")
        return self.pool(addr)

    def pool_for(self, name: bytes | None, args, session) -> NodePool:
        """The pool a shared-connection command runs on (standalone: always the primary)."""
        return self.primary()

    def publish(self, topology: Topology) -> None:
        self.topology = topology  # one assignment: readers see the old or the new snapshot

    def expire(self, now: float) -> None:
        for p in list(self.pools.values()):
            p.expire(now)

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
