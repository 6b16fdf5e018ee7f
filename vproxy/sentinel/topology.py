"""An immutable snapshot of what is behind the proxy; replaced whole, never patched in place."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property


@dataclass(frozen=True)
class ReplicaState:
    """One replica as the HA monitor last saw it (primary/replica sets)."""

    addr: tuple[str, int]
    healthy: bool  # may serve reads: reachable, not loading, link up, lag within max_replica_lag
    lag: float | None = None  # seconds since the replica last heard from / acknowledged the primary
    offset: int = 0  # replication offset
    why: str = ""  # why it is not healthy ('' when it is)


@dataclass(frozen=True)
class HAStatus:
    """What the HA monitor (sentinel or replication mode) knows beyond who is primary."""

    replicas: tuple[ReplicaState, ...] = ()
    failovers: int = 0  # primary changes seen since start
    last_failover: str = ""  # 'old -> new (how)' of the latest one
    last_failover_at: float = 0.0  # wall-clock time of the latest one
    no_primary_since: float = 0.0  # monotonic time the primary went missing; 0 while there is one
    last_outage: float = 0.0  # seconds the latest stretch without a primary lasted
    total_outage: float = 0.0  # seconds without a primary since start (finished stretches)
    source: str = ""  # the sentinel that answered last (sentinel mode)


@dataclass(frozen=True)
class Topology:
    mode: str
    primary: tuple[str, int] | None
    replicas: tuple[tuple[str, int], ...] = ()
    version: int = 0
    # sentinel and replication modes (keyword-only: subclasses keep their positional fields)
    readable: tuple[tuple[str, int], ...] = field(default=(), kw_only=True)  # healthy replicas for reads
    ha: HAStatus | None = field(default=None, kw_only=True)


# ---- cluster mode (ClusterMonitor publishes these) ----

SLOTS = 16384


@dataclass(frozen=True)
class Shard:
    """One cluster shard: the primary that owns its slots, and its replicas."""

    primary: tuple[str, int]
    replicas: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ClusterTopology(Topology):
    """A cluster's slot map: `slots[s]` is the index in `shards` of slot s's owner, or -1 (unowned).

    `primary` (inherited) is any slot-owning primary: what start-up learning and keyless commands use.
    `databases` is how many databases the cluster serves natively (Valkey 9 cluster-databases; 1: db 0 only).
    """

    shards: tuple[Shard, ...] = ()
    slots: tuple[int, ...] = ()
    databases: int = 1

    def owner(self, slot: int) -> tuple[str, int] | None:
        i = self.slots[slot] if self.slots else -1
        return self.shards[i].primary if i >= 0 else None

    @cached_property
    def slot_owners(self) -> tuple:
        """owner() of every slot, as one table: the cluster plain path looks a slot up per request."""
        shards = self.shards
        return tuple(shards[i].primary if i >= 0 else None for i in self.slots) if self.slots else (None,) * SLOTS

    def shard_of(self, slot: int) -> Shard | None:
        i = self.slots[slot] if self.slots else -1
        return self.shards[i] if i >= 0 else None

    @cached_property
    def nodes(self) -> frozenset:
        """Every node the map names: each shard's primary and replicas."""
        return frozenset(a for sh in self.shards for a in (sh.primary, *sh.replicas))

    @property
    def primaries(self) -> tuple[tuple[str, int], ...]:
        """Primaries owning at least one slot, in the order of their lowest slot."""
        return tuple(self.owner(s) for s in self.first_slots)

    @cached_property
    def first_slots(self) -> tuple[int, ...]:
        """One slot per slot-owning shard (its lowest), ordered by it: stable across failovers."""
        seen: dict[int, int] = {}
        for slot, i in enumerate(self.slots):
            if i >= 0 and i not in seen:
                seen[i] = slot
        return tuple(sorted(seen.values()))

    def covered(self) -> int:
        return sum(1 for i in self.slots if i >= 0)

    def moved(self, slot: int, addr: tuple[str, int]) -> "ClusterTopology":
        """A copy where `addr` owns `slot` (the MOVED patch); self when nothing changes."""
        if self.owner(slot) == addr:
            return self
        shards = list(self.shards)
        idx = next((i for i, s in enumerate(shards) if s.primary == addr), -1)
        if idx < 0:
            shards.append(Shard(addr))
            idx = len(shards) - 1
        slots = list(self.slots) if self.slots else [-1] * SLOTS
        slots[slot] = idx
        return replace(self, primary=self.primary or addr, version=self.version + 1,
                       shards=tuple(shards), slots=tuple(slots))
