"""An immutable snapshot of what is behind the proxy; replaced whole, never patched in place."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property


@dataclass(frozen=True)
class Topology:
    mode: str
    primary: tuple[str, int] | None
    replicas: tuple[tuple[str, int], ...] = ()
    version: int = 0


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

    def shard_of(self, slot: int) -> Shard | None:
        i = self.slots[slot] if self.slots else -1
        return self.shards[i] if i >= 0 else None

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
