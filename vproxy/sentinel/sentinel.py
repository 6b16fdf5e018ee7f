"""Sentinel mode: ask the sentinels who the primary is, verify it with ROLE, follow their announcements.

    tick: ask the first sentinel that answers (it moves to the front of the list):
              SENTINEL GET-MASTER-ADDR-BY-NAME, SENTINEL REPLICAS, SENTINEL SENTINELS (learn more)
          probe the named primary and replicas (ROLE + INFO)
          the named primary reports role master -> publish it; else publish "no primary" (commands
          wait) until the sentinels name one that does
    watchers: one greenlet per sentinel, subscribed to +switch-master, +sdown/-sdown, +odown/-odown,
          +slave, +convert-to-slave, +failover-end; a message about our master wakes the tick at once

Sentinel does the failover itself; vproxy never promotes in this mode.
"""

from __future__ import annotations

import gevent
from loguru import logger

from .. import hostport
from .monitor import HAMonitor
from .node import NodeError, NodeLink

EVENTS = ("+switch-master", "+sdown", "-sdown", "+odown", "-odown", "+slave", "+convert-to-slave",
          "+failover-end")
WATCH_IDLE = 5.0  # seconds a watcher waits for a message before looping (checks `stopped`)


class SentinelMonitor(HAMonitor):
    """Follows the primary a set of sentinels monitors under one master name."""

    def __init__(self, app):
        super().__init__(app)
        self.name = self.cfg.master
        self.sentinels: list[tuple[str, int]] = [hostport.parse(a) for a in self.cfg.sentinel]
        self.slinks: dict[tuple[str, int], NodeLink] = {}
        self.watchers: dict[tuple[str, int], gevent.Greenlet] = {}
        self.named: tuple[str, int] | None = None  # the primary the sentinels named last
        self.replica_addrs: list[tuple[str, int]] = []
        self.unanswered: set = set()

    def tick(self, suspects: set) -> None:
        self.ensure_watchers()
        answer = self.ask()
        if answer is not None:
            self.named, self.replica_addrs = answer
        if self.named is None:
            return self.publish(None, [])
        infos = self.probe_all([self.named, *self.replica_addrs])
        info = infos.get(self.named)
        primary = self.named if info is not None and info.is_master else None
        self.publish(primary, self.replica_addrs, "sentinel failover")

    def stop(self) -> None:
        super().stop()
        gevent.killall(list(self.watchers.values()), block=False)
        for link in self.slinks.values():
            link.close()

    # ---- asking ----

    def ask(self):
        """(primary, replicas) from the first sentinel that knows the master; it moves to the front."""
        for addr in list(self.sentinels):
            try:
                named, reps, peers = self.slink(addr).pipeline([
                    ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name),
                    ("SENTINEL", "REPLICAS", self.name),
                    ("SENTINEL", "SENTINELS", self.name)])
            except NodeError as e:
                if addr not in self.unanswered:
                    self.unanswered.add(addr)
                    logger.warning("sentinel {} did not answer: {}", hostport.fmt(addr), e)
                continue
            if not named:
                continue
            self.unanswered.discard(addr)
            if self.sentinels[0] != addr:
                self.sentinels.remove(addr)
                self.sentinels.insert(0, addr)
            self.source = hostport.fmt(addr)
            self.learn_sentinels(peers)
            return (_text(named[0]), int(named[1])), [a for a in map(_addr_of, reps) if a]
        return None

    def slink(self, addr) -> NodeLink:
        link = self.slinks.get(addr)
        if link is None:
            link = self.slinks[addr] = NodeLink(addr, self.probe_timeout, self.cfg, "sentinel")
        link.timeout = self.probe_timeout
        return link

    def learn_sentinels(self, peers) -> None:
        for addr in map(_addr_of, peers or []):
            if addr and addr not in self.sentinels:
                self.sentinels.append(addr)
                logger.info("learned sentinel {}", hostport.fmt(addr))

    # ---- announcements ----

    def ensure_watchers(self) -> None:
        for addr in self.sentinels:
            g = self.watchers.get(addr)
            if g is None or g.dead:
                self.watchers[addr] = gevent.spawn(self.watch, addr)

    def watch(self, addr) -> None:
        """Subscribe to one sentinel's events; one about our master wakes the monitor."""
        while not self.stopped:
            link = NodeLink(addr, self.probe_timeout, self.cfg, "sentinel")
            try:
                link.send("SUBSCRIBE", *EVENTS)
                while not self.stopped:
                    msg = link.read_push(WATCH_IDLE)
                    if msg is not None and self.about_us(msg):
                        self.router.wake.set()
            except NodeError:
                pass
            finally:
                link.close()
            gevent.sleep(self.cfg.topology_refresh)

    def about_us(self, msg) -> bool:
        if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message"):
            return False
        words = _text(msg[2]).split()
        if self.name in words:
            logger.info("sentinel event {} {}", _text(msg[1]), " ".join(words))
            return True
        return False


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _addr_of(entry):
    """A SENTINEL REPLICAS/SENTINELS entry (flat key/value list or map) -> (ip, port)."""
    if isinstance(entry, list):
        entry = dict(zip(entry[::2], entry[1::2]))
    if not isinstance(entry, dict):
        return None
    ip, port = entry.get(b"ip"), entry.get(b"port")
    if ip is None or port is None:
        return None
    return _text(ip), int(port)
