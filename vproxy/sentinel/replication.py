"""Replication mode: follow a primary/replica set without Sentinel, and fail it over when needed.

Every tick (topology_refresh; 0.1 s while there is no primary; at once when the router suspects):

    probe every member (configured backends + nodes learned from INFO replication)
    one node reports role master   -> it is the primary (the existing arrangement is honoured)
    several report master          -> choose_master(); the others, if they belong to the set, are
                                      made replicas of it (an old primary that came back)
    none for failover_timeout      -> look again at every node, adopt a master if one appeared
                                      (another vproxy was faster); wait while a replica still hears
                                      from its primary (only vproxy lost it); else promote the
                                      replica with the greatest offset (ties: smallest run id) and
                                      point the rest at it
    replicas following an unreachable or losing node are pointed at the primary

Double promotion (several vproxy instances on one set). Guarantee: instances that reach the same
replicas promote the same one, because the choice is a pure function of what the replicas report
(after the primary is gone their offsets no longer move): greatest offset, then smallest run id.
Each instance looks at every node again right before promoting and adopts a master it finds
instead of promoting, and REPLICAOF NO ONE on an already promoted node is a no-op, so racing
instances converge on one primary. Limits: instances that see different replicas (a network
partition between vproxy instances and the nodes), or that sample a replica still catching up,
can promote two different nodes. When any instance then sees both, choose_master() (the same
rule everywhere: the successor of the other, then more attached replicas, then greater offset,
then smallest run id) keeps one and demotes the other: writes the loser took in between are lost.
A stronger guarantee needs a quorum (Sentinel mode).
"""

from __future__ import annotations

from time import monotonic

from loguru import logger

from .monitor import HAMonitor
from .. import hostport
from .node import NodeInfo


class ReplicationMonitor(HAMonitor):
    """Follows and fails over a primary/replica set given as backend addresses."""

    def __init__(self, app):
        super().__init__(app)
        self.members: list[tuple[str, int]] = list(app.seeds)
        self.down_since = 0.0
        self.ignored: set = set()  # unrelated masters already warned about
        self.aliases: set = set()  # addresses found to name a member already known
        self.warned: set = set()  # outages (down_since) already logged as partitions

    def tick(self, suspects: set) -> None:
        infos = self.unique(self.probe_all(self.members))
        self.discover(infos)
        primary, how = self.choose(infos), ""
        if primary is None:
            primary, how = self.maybe_failover()
        else:
            self.down_since = 0.0
            self.repair(primary, infos)
        self.publish(primary, self.members, how)

    def unique(self, infos: dict) -> dict:
        """One entry per node: a second address with a run id already seen (an alias) is dropped."""
        seen: dict[str, tuple[str, int]] = {}
        for addr, info in list(infos.items()):
            first = seen.setdefault(info.run_id, addr) if info.run_id else addr
            if first != addr:
                del infos[addr]
                self.members.remove(addr)
                self.aliases.add(addr)
                logger.info("replication set: {} is {} under another name", hostport.fmt(addr), hostport.fmt(first))
        return infos

    def discover(self, infos: dict) -> None:
        """Learn members from the nodes: a primary's replicas, a replica's primary."""
        for info in list(infos.values()):
            found = list(info.replicas) if info.is_master else [info.master] if info.master else []
            for addr in found:
                if addr not in self.members and addr not in self.aliases:
                    self.members.append(addr)
                    logger.info("replication set: learned {} from {}", hostport.fmt(addr), hostport.fmt(info.addr))

    def choose(self, infos: dict) -> tuple[str, int] | None:
        """The primary among reachable nodes; several masters: keep one, demote the others of the set."""
        masters = [i for i in infos.values() if i.is_master]
        if len(masters) <= 1:
            return masters[0].addr if masters else None
        winner = choose_master(masters)
        for m in masters:
            if m is winner:
                continue
            if self.had_primary or related(m, winner):
                self.command(m.addr, "REPLICAOF", *winner.addr)
            elif m.addr not in self.ignored:
                self.ignored.add(m.addr)
                logger.error("{} and {} both report role master and share no history; using {}, "
                             "leaving {} alone", hostport.fmt(winner.addr), hostport.fmt(m.addr),
                             hostport.fmt(winner.addr), hostport.fmt(m.addr))
        return winner.addr

    def maybe_failover(self) -> tuple[tuple[str, int] | None, str]:
        """No reachable master: after failover_timeout, adopt one that appeared or promote a replica."""
        now = monotonic()
        if not self.down_since:
            self.down_since = now
        if now - self.down_since < self.cfg.failover_timeout:
            return None, ""
        infos = self.unique(self.probe_all(self.members))  # every node again, right before deciding
        if any(i.is_master for i in infos.values()):
            self.down_since = 0.0
            return self.choose(infos), "adopted"
        if self.primary_heard(infos):
            return None, ""
        best = choose_replica(infos.values())
        if best is None:
            return None, ""
        return self.promote(best, infos)

    def primary_heard(self, infos: dict) -> bool:
        """Whether a replica still hears from its primary: only vproxy lost it (a partition), so wait."""
        timeout = self.cfg.failover_timeout
        heard = [i for i in infos.values() if not i.is_master and i.master not in infos  # not chained
                 and i.link_up and i.last_io is not None and i.last_io < timeout]
        if heard and self.down_since not in self.warned:
            self.warned.add(self.down_since)
            logger.warning("primary unreachable from vproxy, but replica {} heard from it {}s ago: "
                           "not failing over", hostport.fmt(heard[0].addr), heard[0].last_io)
        return bool(heard)

    def promote(self, best: NodeInfo, infos: dict) -> tuple[tuple[str, int] | None, str]:
        if not self.command(best.addr, "REPLICAOF", "NO", "ONE"):
            return None, ""
        check = self._probe_one(best.addr)
        if check is None or not check.is_master:
            return None, ""
        for info in infos.values():
            if info.addr != best.addr:
                self.command(info.addr, "REPLICAOF", *best.addr)
        self.down_since = 0.0
        return best.addr, f"vproxy promoted it: offset {best.offset} run id {best.run_id[:8]}"

    def repair(self, primary, infos: dict) -> None:
        """Point replicas that follow an unreachable or losing member at the primary."""
        for info in list(infos.values()):
            m = info.master
            if info.is_master or m is None or m == primary or m not in self.members:
                continue
            upstream = infos.get(m)
            if upstream is not None and not upstream.is_master:
                continue  # chained behind a live replica: the existing arrangement
            if upstream is None and m not in self.errors:
                continue  # not probed yet
            self.command(info.addr, "REPLICAOF", *primary)


def choose_replica(infos) -> NodeInfo | None:
    """The replica to promote: greatest offset, then smallest run id; never loading or priority 0."""
    cands = [i for i in infos if not i.is_master and not i.loading and i.priority > 0]
    if not cands:
        return None
    return min(cands, key=lambda i: (-i.offset, i.run_id))


def choose_master(masters: list) -> NodeInfo:
    """One of several masters, the same on every vproxy instance that sees them."""
    replids = {m.replid for m in masters}

    def rank(m: NodeInfo):
        successor = m.replid2 in replids and m.replid2 != m.replid
        return (not successor, -len(m.replicas), -m.offset, m.run_id)

    return min(masters, key=rank)


def related(a: NodeInfo, b: NodeInfo) -> bool:
    """Whether two masters share replication history (one was promoted from the other's line)."""
    zero = "0" * 40
    ids_a = {a.replid, a.replid2} - {"", zero}
    return bool(ids_a & ({b.replid, b.replid2} - {"", zero}))
