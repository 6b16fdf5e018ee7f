"""Counters the proxy keeps about itself (rendered by admin.proxy_section)."""

from __future__ import annotations


class Stats:
    """Plain integer counters; cheap enough to bump on every request."""

    __slots__ = ("connections", "rejected", "commands")

    def __init__(self):
        self.connections = 0
        self.rejected = 0
        self.commands = 0
