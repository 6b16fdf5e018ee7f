"""Backend connections of one node: shared channels and pinned (leased) ones, by (db, protocol).

A connection's state is the container it sits in: `shared[key]`, `idle[key]` (clean, leasable),
`leased` (pinned to one client). A dirty connection is closed, never put back. While the node is
down, requests fail fast with the last error and reconnects back off up to retry_max_backoff.

The pool sees every connect, failure and close of its node, so it logs the node's trouble: a
shared connection lost, one replaced after command_timeout, failed connects (WARNING), the node
reachable again (INFO), rate-limited per node; each connection's open and close at DEBUG.
"""

from __future__ import annotations

from time import monotonic

from loguru import logger

from .. import hostport, resp
from ..errors import BackendError, backend_unavailable
from ..ratelog import RateLog
from .backend import Credentials
from .busy import BusyProbe
from .channel import Batch, Channel, deadline_after

# The keys of the connections that check clients' AUTH requests (any connection may run AUTH; a
# RESET behind each makes it nobody's again) and ask ACL DRYRUN (vproxy's own user throughout).
AUTH_CHECK = (0, 2, "auth-check")
ACL_CHECK = (0, 2, "acl-check")
_RESET = resp.encode_request([b"RESET"])
REFUSED_FOR = 1.0  # seconds a user the node refused gets its error without a new connect attempt


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
        self.events = RateLog()
        self.troubles = {"connect": 0, "lost": 0, "timeout": 0}  # counted by kind (INFO proxy_backendstats)
        self.trouble_since = 0.0  # when the node last failed us (0: fine since the last connect)
        self.failed_connects = 0  # connect attempts failed since then
        self.closing = False  # the pool itself is closing connections: their loss is no news
        self.busy = BusyProbe(addr, cfg)
        self.refused: dict = {}  # Credentials -> (until, the node's error): see refuse()

    @property
    def name(self) -> str:
        return hostport.fmt(self.addr)

    def _check_up(self, key: tuple) -> None:
        if self.down_until and monotonic() < self.down_until:
            raise BackendError(backend_unavailable(self.name, f"{self.last_error}; retrying"))
        if self.refused and len(key) > 2 and key[2] in self.refused:
            until, text = self.refused[key[2]]
            if monotonic() < until:
                raise BackendError(text)
            del self.refused[key[2]]

    def refuse(self, user: Credentials, text: str) -> None:
        """The node refused a connection for user (deleted, new password): for REFUSED_FOR seconds
        its requests get the node's words without another connect attempt."""
        self.refused[user] = (monotonic() + REFUSED_FOR, text)

    def channel(self, key: tuple[int, int]) -> Channel:
        """The least busy shared channel for key, opening one if the pool is not full."""
        chans = self.shared.get(key)
        if chans is None:
            chans = self.shared[key] = []
        if len(chans) < self.cfg.pool_size:
            self._check_up(key)
            ch = Channel(self, key)
            chans.append(ch)
            return ch
        return min(chans, key=_load)

    def check(self, request: list, key: tuple = AUTH_CHECK) -> bytes:
        """The server's reply to `request` (AUTH user pass, AUTH pass; ACL DRYRUN with ACL_CHECK) on a
        check connection; sent once more if that connection was lost before it was answered.
        Raises BackendError when the node cannot be reached."""
        raw = resp.encode_request(request)
        batch = self._ask(raw, key)
        if batch.lost:
            batch = self._ask(raw, key)
        return batch.replies[0]

    def _ask(self, raw: bytes, key: tuple) -> Batch:
        batch = Batch(1)
        ch = self.channel(key)
        deadline = deadline_after(self.cfg.command_timeout)
        ch.submit(raw, batch, 0, deadline)
        if key is AUTH_CHECK:  # back to no user at all: the connection never keeps a client's rights
            ch.submit(_RESET, None, 0, deadline)
        batch.wait()
        return batch

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
            self._check_up(key)
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

    def drop_users(self, live) -> bool:
        """Close the shared and idle connections of client users (Credentials keys) not in `live`;
        True when some are left because they still have requests in flight."""
        left = False
        for store in (self.shared, self.idle):
            for key in [k for k in store if len(k) > 2 and isinstance(k[2], Credentials) and k[2] not in live]:
                for ch in list(store.get(key, ())):
                    if ch.waiters:
                        left = True
                    else:
                        self._close_own(ch.close)
                if not store.get(key):
                    store.pop(key, None)
        return left

    def forget(self, ch: Channel) -> None:
        """Called by a channel that closed: drop it from whichever container holds it."""
        logger.debug("backend {}: connection closed ({!r})", self.name, ch)
        chans = self.shared.get(ch.key)
        if chans and ch in chans:
            chans.remove(ch)
            if ch.ready and not self.closing:  # only the pool closes shared connections: the backend did
                self._trouble("lost", f"backend {self.name}: connection lost; {_failed(ch)}")
        idle = self.idle.get(ch.key)
        if idle and ch in idle:
            idle.remove(ch)
        self.leased.discard(ch)

    def connect_ok(self) -> None:
        self.connects += 1
        self.down_until = self.backoff = 0.0
        if self.trouble_since:
            self.events.log("recovered", "INFO", f"backend {self.name}: connected again, "
                            f"{monotonic() - self.trouble_since:.1f}s after the trouble began "
                            f"({self.failed_connects} failed connect attempt(s) in between)")
            self.trouble_since, self.failed_connects = 0.0, 0
        logger.debug("backend {}: connection opened", self.name)

    def connect_failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self.backoff = min(self.cfg.retry_max_backoff, max(0.05, self.backoff * 2))
        self.down_until = monotonic() + self.backoff
        self.failed_connects += 1
        self._trouble("connect", f"backend {self.name}: cannot connect ({why}); requests get an error, "
                      f"next attempt in {self.backoff:g}s at the earliest")

    def _trouble(self, kind: str, text: str) -> None:
        self.trouble_since = self.trouble_since or monotonic()
        self.troubles[kind] = self.troubles.get(kind, 0) + 1
        self.events.log(kind, "WARNING", text)

    def expire(self, now: float) -> None:
        """Replace connections whose oldest request is past its deadline (called by the janitor),
        unless the server is busy with a script (busy.py): replacing them would not free it."""
        for ch in [c for chans in self.shared.values() for c in chans] + list(self.leased):
            if ch.expired(now) and not self.busy.spares(ch, now):
                self._trouble("timeout", f"backend {self.name}: no reply within {self.cfg.command_timeout:g}s "
                              f"(command_timeout); connection replaced; {_failed(ch)}")
                self._close_own(ch.timeout)

    def quiet(self) -> bool:
        """Nothing in flight and nothing pinned: closing loses no request."""
        return not self.leased and not any(ch.waiters for chans in self.shared.values() for ch in chans)

    def in_flight(self) -> int:
        """Requests sent (or queued) on this node's connections whose reply has not come yet."""
        return sum(len(ch.waiters) for chans in self.shared.values() for ch in chans) + \
            sum(len(ch.waiters) for ch in self.leased)

    def counts(self) -> dict[str, int]:
        return {
            "shared": sum(len(c) for c in self.shared.values()),
            "pinned": len(self.leased),
            "idle_pinned": sum(len(c) for c in self.idle.values()),
        }

    def close(self, why: str = "") -> None:
        """Close every connection; waiters get `why` (default: closed by vproxy) in their error."""
        msg = backend_unavailable(self.name, why or "connection closed by vproxy")
        for ch in [c for chans in self.shared.values() for c in chans] + list(self.leased) + \
                [c for chans in self.idle.values() for c in chans]:
            self._close_own(ch.abort, msg)

    def _close_own(self, close, *args) -> None:
        """Run a channel's close; the forget() it calls knows the pool did it, not the backend."""
        self.closing = True
        try:
            close(*args)
        finally:
            self.closing = False


def _failed(ch: Channel) -> str:
    """What a connection's loss costs its clients (read before its waiters get their errors)."""
    n = len(ch.waiters)
    return "no request was in flight" if not n else f"{n} request{'s' if n > 1 else ''} in flight got an error"


def _load(ch: Channel) -> int:
    return len(ch.waiters) if not ch.closed else 1 << 30
