"""Rate-limited log lines: at most one line per kind per interval, with a count of those held back.

A backend that is down produces an event per reconnect attempt and per lost request; the log must
show the first at once and then a line every few seconds, not one per event.
"""

from __future__ import annotations

from time import monotonic

from loguru import logger

EVERY = 5.0  # seconds between two lines of one kind


class RateLog:
    """One per source (a backend): `log(kind, level, text)` writes or holds back the line."""

    __slots__ = ("every", "held", "last")

    def __init__(self, every: float = EVERY):
        self.every = every
        self.last: dict[str, float] = {}  # kind -> when its last line was written
        self.held: dict[str, int] = {}  # kind -> lines held back since then

    def log(self, kind: str, level: str, text) -> None:
        """text: the line, or a callable that makes it (called only when the line is written)."""
        now = monotonic()
        last = self.last.get(kind)
        if last is not None and now - last < self.every:
            self.held[kind] = self.held.get(kind, 0) + 1
            return
        self.last[kind] = now
        if callable(text):
            text = text()
        held = self.held.pop(kind, 0)
        if held:
            text += f" (and {held} more like it since the last such line)"
        # depth=1: the line names the caller (the pool), not this module; text is final (no format args)
        logger.opt(depth=1).log(level, text)
