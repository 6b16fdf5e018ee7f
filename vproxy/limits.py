"""Request rate limits: token buckets, per client (client_rate_limit) and per proxy user (rate=N).

    a read batch of n requests -> every bucket of the session: refill, take n
        enough tokens  -> on, as it came (the plain path's loop callback, or the batch path)
        too few        -> the greenlet sleeps until the debt is refilled; meanwhile nothing is read
                          from that client (its socket's reader is stopped): slowed, never dropped

Checked once per read batch, not per request: the plain path pays one call per batch.
"""

from __future__ import annotations

from time import monotonic


class Bucket:
    """rate tokens a second, at most burst in store; a batch may take it below zero (a debt)."""

    __slots__ = ("burst", "rate", "t", "tokens")

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, max(burst, 1.0)
        self.tokens, self.t = self.burst, monotonic()

    def _refill(self) -> float:
        now = monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        return self.tokens

    def ready(self, n: int) -> bool:
        """Are there n tokens now (nothing taken)?"""
        return self._refill() >= n

    def take(self, n: int) -> float:
        """Take n tokens; the seconds to wait before the requests may go (0: at once)."""
        self.tokens = self._refill() - n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
