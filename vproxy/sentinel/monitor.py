"""The monitor greenlet of a primary/replica set: look, decide, publish a snapshot; repeat.

    loop: take suspects from the router (connections that failed) -> tick() (the mode decides:
          ask sentinels, or probe the nodes and fail over) -> publish Topology -> set the verdict
          -> sleep topology_refresh, or less while there is no primary, or until woken

Subclasses (sentinel.py, replication.py) implement tick(); this base owns the node links, the
probes, replica health, the outage/failover bookkeeping and publishing. It reaches the router
only through the app (publish, take_suspects, wake), never through mux/.
"""

from __future__ import annotations

from time import monotonic, time

import gevent
from loguru import logger

from .. import hostport
from .node import NodeBusy, NodeError, NodeInfo, NodeLink, busy_role, probe
from .topology import HAStatus, ReplicaState, Topology

FAST_POLL = 0.1  # seconds between looks while the set has no primary


class HAMonitor:
    """Shared machinery of the sentinel and replication monitors."""

    def __init__(self, app):
        self.app, self.cfg, self.router = app, app.cfg, app.router
        self.links: dict[tuple[str, int], NodeLink] = {}
        self.infos: dict[tuple[str, int], NodeInfo] = {}  # last good probe of each node
        self.errors: dict[tuple[str, int], str] = {}  # nodes whose last probe failed, and why
        self.primary: tuple[str, int] | None = None  # last published
        self.last_good: tuple[str, int] | None = None  # last primary that was not None
        self.had_primary = False
        self.version = 0
        self.stopped = False
        self.failovers = 0
        self.last_failover = ""
        self.last_failover_at = 0.0
        self.no_primary_since = 0.0
        self.last_outage = self.total_outage = 0.0
        self.source = ""

    @property
    def probe_timeout(self) -> float:
        """Seconds a probe may take (from connect_timeout and topology_refresh, as a reload leaves them)."""
        return max(0.5, min(self.cfg.connect_timeout, self.cfg.topology_refresh))

    # ---- the loop ----

    def run(self) -> None:
        while not self.stopped:
            suspects, verdict = self.router.take_suspects()
            try:
                self.tick(suspects)
            except Exception:  # the monitor must outlive any one bad look
                logger.exception("topology monitor tick failed")
            if verdict is not None:
                verdict.set()
            wait = FAST_POLL if self.primary is None else self.cfg.topology_refresh
            self.router.wake.wait(wait)

    def stop(self) -> None:
        self.stopped = True
        self.router.wake.set()
        for link in self.links.values():
            link.close()

    def tick(self, suspects: set) -> None:
        raise NotImplementedError

    # ---- probes ----

    def link(self, addr: tuple[str, int]) -> NodeLink:
        link = self.links.get(addr)
        if link is None:
            link = self.links[addr] = NodeLink(addr, self.probe_timeout, self.cfg)
        link.timeout = self.probe_timeout
        return link

    def probe_all(self, addrs) -> dict[tuple[str, int], NodeInfo]:
        """Probe nodes concurrently (a paused node only costs its own timeout); the reachable ones."""
        addrs = list(dict.fromkeys(addrs))
        jobs = [gevent.spawn(self._probe_one, a) for a in addrs]
        gevent.joinall(jobs, timeout=self.probe_timeout * 2 + 1)
        found = {}
        for a, job in zip(addrs, jobs):
            if job.successful() and job.value is not None:
                found[a] = job.value
            else:
                job.kill(block=False)
        return found

    def _probe_one(self, addr) -> NodeInfo | None:
        try:
            info = self._look(addr)
        except NodeError as e:
            self.infos.pop(addr, None)
            if addr not in self.errors:
                logger.warning("node {} unreachable: {}", hostport.fmt(addr), e)
            self.errors[addr] = str(e)
            return None
        if self.errors.pop(addr, None) is not None:
            logger.info("node {} reachable again ({})", hostport.fmt(addr), info.role)
        self.infos[addr] = info
        return info

    def _look(self, addr) -> NodeInfo:
        link = self.link(addr)
        try:
            return probe(link)
        except NodeBusy:
            # a script runs past busy-reply-threshold: the node is alive and still what HELLO says.
            # Dropping it would publish "no primary": every command, SCRIPT KILL too, would wait.
            role = busy_role(link)
            last = self.infos.get(addr)
            return last if last is not None and last.role == role else NodeInfo(addr, role)

    def command(self, addr, *args) -> bool:
        """An administrative command (REPLICAOF ...) to one node; False (logged) if it failed."""
        try:
            self.link(addr).call(*args)
            logger.warning("{}: {}", hostport.fmt(addr), " ".join(str(a) for a in args))
            return True
        except NodeError as e:
            logger.error("{} {} failed: {}", hostport.fmt(addr), args[0], e)
            return False

    # ---- publishing ----

    def publish(self, primary, replicas, how: str = "") -> None:
        """Publish a snapshot: `primary` (None while there is none) and the replicas' health."""
        self._track(primary, how)
        states = tuple(self.replica_state(a, primary) for a in replicas if a != primary)
        self.version += 1
        ha = HAStatus(states, self.failovers, self.last_failover, self.last_failover_at,
                      self.no_primary_since, self.last_outage, self.total_outage, self.source)
        self.router.publish(Topology(self.cfg.mode, primary, tuple(s.addr for s in states), self.version,
                                     readable=tuple(s.addr for s in states if s.healthy), ha=ha))

    def replica_state(self, addr, primary) -> ReplicaState:
        """Whether a replica may serve reads, and why not."""
        info = self.infos.get(addr)
        if info is None:
            return ReplicaState(addr, False, why="unreachable")
        lag = info.last_io
        pinfo = self.infos.get(primary) if primary else None
        if pinfo is not None and addr in pinfo.replicas:
            lag = pinfo.replicas[addr][1]
        why = ""
        if info.is_master:
            why = "reports role master"
        elif info.loading:
            why = "loading"
        elif not info.link_up:
            why = "link to its primary is down"
        elif primary is not None and pinfo is not None and addr not in pinfo.replicas and info.master == primary:
            why = "not online at the primary"
        elif lag is not None and lag > self.cfg.max_replica_lag:
            why = f"lag {lag:g}s > max_replica_lag"
        return ReplicaState(addr, not why, lag, info.offset, why)

    def _track(self, primary, how: str) -> None:
        now = monotonic()
        if primary is None:
            if self.had_primary and not self.no_primary_since:
                self.no_primary_since = now
                logger.warning("no primary: commands wait up to {}s (primary_wait)", self.cfg.primary_wait)
        else:
            if self.no_primary_since:
                self.last_outage = now - self.no_primary_since
                self.total_outage += self.last_outage
                self.no_primary_since = 0.0
            old = self.last_good
            if old is not None and old != primary:
                self.failovers += 1
                self.last_failover = f"{hostport.fmt(old)} -> {hostport.fmt(primary)}" + (f" ({how})" if how else "")
                self.last_failover_at = time()
                logger.warning("primary changed: {}", self.last_failover)
            elif old is None:
                logger.info("primary is {}", hostport.fmt(primary))
            self.had_primary = True
            self.last_good = primary
        self.primary = primary
