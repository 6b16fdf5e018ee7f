"""Backend connections of one node: shared channels and pinned (leased) ones, by (db, protocol).

A connection's state is the container it sits in: `shared[key]`, `idle[key]` (clean, leasable),
`leased` (pinned to one client). A dirty connection is closed, never put back. While the node is
down, requests fail fast with the last error and reconnects back off up to retry_max_backoff.
"""

from __future__ import annotations

from time import monotonic

from ..errors import BackendError, backend_unavailable
from .busy import BusyProbe
from .channel import Channel


class PinLimitError(BackendError):
    """Every pinned connection the configuration allows is in use."""


class NodePool:
    """Channels to one backend server address."""

    def __init__(self, addr: tuple[str, int], cfg):
        self.addr, self.cfg = addr, cfg
        self.shared: dict[tuple[int, int], list[Channel]] = {}
        self.idle: dict[tuple[int, int], list[Channel]] = {}
        self.leased: set[Channel] = set()
        self.down_until = 0.0
        self.backoff = 0.0
        self.last_error = ""
        self.connects = 0
        self.failures = 0
        self.busy = BusyProbe(addr, cfg)

    @property
    def name(self) -> str:
        host, port = self.addr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _check_up(self) -> None:
        if self.down_until and monotonic() < self.down_until:
            raise BackendError(backend_unavailable(self.name, f"{self.last_error}; retrying"))

    def channel(self, key: tuple[int, int]) -> Channel:
        """The least busy shared channel for key, opening one if the pool is not full."""
        chans = self.shared.get(key)
        if chans is None:
            chans = self.shared[key] = []
        if len(chans) < self.cfg.pool_size:
            self._check_up()
            ch = Channel(self, key)
            chans.append(ch)
            return ch
        return min(chans, key=_load)

    def lease(self, key: tuple[int, int]) -> Channel:
        """A connection for one client alone: a clean idle one, or a new one."""
        if len(self.leased) >= self.cfg.max_pinned:
            raise PinLimitError(f"ERR vproxy: all {self.cfg.max_pinned} pinned backend connections are "
                                "in use (max_pinned); retry later")
        idle = self.idle.get(key)
        while idle:
            ch = idle.pop()
            if not ch.closed:
                break
        else:
            self._check_up()
            ch = Channel(self, key, exclusive=True)
        self.leased.add(ch)
        return ch

    def release(self, ch: Channel, clean: bool) -> None:
        """Give a leased connection back: kept if clean and quiet, closed otherwise."""
        self.leased.discard(ch)
        idle = self.idle.setdefault(ch.key, [])
        if clean and not ch.closed and not ch.waiters and ch.sink is None and len(idle) < self.cfg.idle_pinned:
            idle.append(ch)
        else:
            ch.close()

    def forget(self, ch: Channel) -> None:
        """Called by a channel that closed: drop it from whichever container holds it."""
        chans = self.shared.get(ch.key)
        if chans and ch in chans:
            chans.remove(ch)
        idle = self.idle.get(ch.key)
        if idle and ch in idle:
            idle.remove(ch)
        self.leased.discard(ch)

    def connect_ok(self) -> None:
        self.connects += 1
        self.down_until = self.backoff = 0.0

    def connect_failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self.backoff = min(self.cfg.retry_max_backoff, max(0.05, self.backoff * 2))
        self.down_until = monotonic() + self.backoff

    def expire(self, now: float) -> None:
        """Replace connections whose oldest request is past its deadline (called by the janitor),
        unless the server is busy with a script (busy.py): replacing them would not free it."""
        for ch in [c for chans in self.shared.values() for c in chans] + list(self.leased):
            if ch.expired(now) and not self.busy.spares(ch, now):
                ch.timeout()

    def quiet(self) -> bool:
        """Nothing in flight and nothing pinned: closing loses no request."""
        return not self.leased and not any(ch.waiters for chans in self.shared.values() for ch in chans)

    def counts(self) -> dict[str, int]:
        return {
            "shared": sum(len(c) for c in self.shared.values()),
            "pinned": len(self.leased),
            "idle_pinned": sum(len(c) for c in self.idle.values()),
        }

    def close(self, why: str = "") -> None:
        """Close every connection; waiters get `why` (default: closed by vproxy) in their error."""
        for ch in [c for chans in self.shared.values() for c in chans] + list(self.leased) + \
                [c for chans in self.idle.values() for c in chans]:
            ch.abort(backend_unavailable(self.name, why or "connection closed by vproxy"))


def _load(ch: Channel) -> int:
    return len(ch.waiters) if not ch.closed else 1 << 30
