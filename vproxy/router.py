"""Command + topology snapshot -> the backend pool that must run it.

Standalone: every command goes to the one server (`pool_for` is `primary`, one dict lookup).
Primary/replica sets (sentinel, replication modes) add, all outside that hot path:

    no primary in the snapshot  -> primary() waits (up to primary_wait) for the monitor's next one
    connection failed in flight -> recover(): ask the monitor for a verdict (suspect), then
                                   reads and never-sent requests run again; sent writes get an error
    read_from != primary        -> pool_for is _split: read-only commands to a healthy replica
    new primary published       -> the old primary's pools are drained (no write lands on it)
"""

from __future__ import annotations

from time import monotonic

from gevent.event import Event

from . import hostport, resp
from .errors import BackendError
from .mux.pool import NodePool
from .sentinel.topology import Topology

HA_MODES = ("sentinel", "replication")
PRUNE_AFTER = 10.0  # seconds a node is out of the cluster map before its idle pool is closed
UNKNOWN_OUTCOME = ("ERR vproxy: the connection to {} was lost with this write in flight (failover?); "
                   "it may or may not have been applied, so vproxy did not retry it")


class Router:
    """Holds the current topology and a NodePool per backend address."""

    def __init__(self, cfg, topology: Topology):
        self.cfg = cfg
        self.pools: dict[tuple[str, int], NodePool] = {}
        self.topology = topology
        self.ha = cfg.mode in HA_MODES
        self.changed = Event()  # set (and replaced) by every publish
        self.publishes = 0  # topology snapshots published (the monitor's refreshes that changed something)
        self.wake = Event()  # tells the monitor to look now
        self.suspects: set = set()
        self.verdict: Event | None = None  # set once the monitor has looked at the suspects
        self.last_primary = topology.primary
        self._rr = 0
        self.absent: dict = {}  # cluster: pool address -> when the slot map stopped naming it
        self.retired = [0, 0]  # connects and connect failures of pruned pools (INFO keeps counting them)
        self.split = self.ha and cfg.read_from != "primary"
        if self.split:
            self.pool_for = self._split  # reads may go to replicas; standalone keeps the cheap method

    def pool(self, addr: tuple[str, int]) -> NodePool:
        p = self.pools.get(addr)
        if p is None:
            p = self.pools[addr] = NodePool(addr, self.cfg)
        return p

    def primary(self) -> NodePool:
        """The pool of the node that takes writes (standalone: the one server)."""
        addr = self.topology.primary
        if addr is None:
            addr = self._await_primary(monotonic() + self.cfg.primary_wait)
        return self.pool(addr)

    def pool_for(self, name: bytes | None, args, session) -> NodePool:
        """The pool a shared-connection command runs on (standalone: always the primary)."""
        return self.primary()

    def publish(self, topology: Topology) -> None:
        old = self.last_primary
        self.topology = topology  # one assignment: readers see the old or the new snapshot
        self.publishes += 1
        if self.ha and topology.primary is not None:
            self.last_primary = topology.primary
            self._revive(topology)
            if old is not None and old != topology.primary and old in self.pools:
                self.pools[old].close(f"primary moved to {hostport.fmt(topology.primary)} (failover); retry")
        ev, self.changed = self.changed, Event()
        ev.set()

    def expire(self, now: float) -> None:
        for p in list(self.pools.values()):
            p.expire(now)
        nodes = getattr(self.topology, "nodes", None)
        if nodes:
            self._prune(nodes, now)

    def _prune(self, nodes: frozenset, now: float) -> None:
        """Cluster: close the pools of nodes the slot map has not named for PRUNE_AFTER seconds
        (removed from the cluster), once nothing is in flight or pinned there. The grace spares a
        node that is importing its first slot (the map lists only slot owners; ASK leads there).
        A MOVED or ASK to a pruned node opens a new pool."""
        for addr in [a for a in self.absent if a in nodes or a not in self.pools]:
            del self.absent[addr]
        for addr in [a for a in self.pools if a not in nodes]:
            p = self.pools[addr]
            if now - self.absent.setdefault(addr, now) >= PRUNE_AFTER and p.quiet():
                p.close("node left the cluster")
                self.retired[0] += p.connects
                self.retired[1] += p.failures
                del self.pools[addr], self.absent[addr]

    def close(self) -> None:
        for p in self.pools.values():
            p.close()

    # ---- primary/replica sets: waiting out a failover ----

    def _await_primary(self, deadline: float) -> tuple[str, int]:
        if not self.ha:
            raise BackendError("ERR vproxy: no primary is known yet; retry shortly")
        while True:
            left = deadline - monotonic()
            if left <= 0:
                raise BackendError(f"ERR vproxy: no primary (failover in progress) after waiting "
                                   f"{self.cfg.primary_wait:g}s (primary_wait); retry")
            self.changed.wait(left)
            addr = self.topology.primary
            if addr is not None:
                return addr

    def _revive(self, t: Topology) -> None:
        """Nodes the monitor just verified: forget their connect backoff."""
        for addr in (t.primary, *t.readable):
            p = self.pools.get(addr)
            if p is not None and p.down_until:
                p.down_until = p.backoff = 0.0

    def suspect(self, addr: tuple[str, int]) -> Event:
        """Ask the monitor to look at addr now; the event is set once it has published its verdict."""
        self.suspects.add(addr)
        if self.verdict is None:
            self.verdict = Event()
        self.wake.set()
        return self.verdict

    def take_suspects(self) -> tuple[set, Event | None]:
        """The monitor's side of suspect(): what to look at, and the event to set afterwards."""
        s, v = self.suspects, self.verdict
        self.suspects, self.verdict = set(), None
        self.wake.clear()
        return s, v

    def recover(self, failed: list, session) -> list:
        """Requests whose backend connection failed -> [(idx, raw, key, pool or error frame)].

        `failed` holds (idx, raw, name, args, key, pool, sent) as the client sent them; sent is the
        fact the connection recorded (Batch.lost): False means the request never left vproxy, so it
        is safe to send again. A read is sent again once; a write that may have reached the backend
        is not.
        """
        deadline = monotonic() + self.cfg.primary_wait
        t = self.topology
        verdict = None
        for p in {e[5] for e in failed}:
            if p.addr == t.primary or p.addr in t.readable or t.primary is None:
                verdict = self.suspect(p.addr)
        if verdict is not None:
            verdict.wait(max(0.0, deadline - monotonic()))
        out = []
        for idx, raw, name, args, key, pool, sent in failed:
            if sent and not _is_read(name, session):
                out.append((idx, raw, key, resp.error(UNKNOWN_OUTCOME.format(pool.name))))
                continue
            try:
                out.append((idx, raw, key, self._retarget(name, session, pool, deadline)))
            except BackendError as e:
                out.append((idx, raw, key, resp.error(str(e))))
        return out

    def _retarget(self, name, session, failed: NodePool, deadline: float) -> NodePool:
        if self.split and _is_read(name, session):
            readable = [a for a in self.topology.readable if a != failed.addr]
            if readable:
                return self._pick(readable)
            if self.cfg.read_from == "replica":
                raise BackendError(NO_REPLICA)
        addr = self.topology.primary or self._await_primary(deadline)
        return self.pool(addr)

    # ---- read/write splitting ----

    def _split(self, name: bytes | None, args, session) -> NodePool:
        """Read-only commands (COMMAND table flag) to a healthy replica; everything else to the primary."""
        if not _is_read(name, session):
            if self.cfg.read_your_writes:
                session.ryw_until = monotonic() + self.cfg.read_your_writes
            return self.primary()
        if self.cfg.read_your_writes and session.ryw_until > monotonic():  # ClientSession declares it
            return self.primary()
        readable = self.topology.readable
        if not readable:
            if self.cfg.read_from == "replica":
                raise BackendError(NO_REPLICA)
            return self.primary()
        cur = session.cur  # keep a pipeline of reads on one replica: switching would settle each time
        if cur is not None and not cur.closed and cur.pool.addr in readable and session.batch and session.batch.left:
            return cur.pool
        return self._pick(readable)

    def _pick(self, readable) -> NodePool:
        if self.cfg.replica_balance == "least-outstanding":
            return min((self.pool(a) for a in readable), key=_outstanding)
        self._rr += 1
        return self.pool(readable[self._rr % len(readable)])


NO_REPLICA = "ERR vproxy: no healthy replica to read from (read_from replica); retry later"


def _is_read(name: bytes | None, session) -> bool:
    if name is None:
        return False
    cmd = session.app.commands.get(name)
    return cmd is not None and "readonly" in cmd.flags


def _outstanding(p: NodePool) -> int:
    return sum(len(c.waiters) for chans in p.shared.values() for c in chans)

