"""Counters the proxy keeps about itself (rendered by admin.proxy_section)."""

from __future__ import annotations


class Stats:
    """Plain integer counters; cheap enough to bump on every request."""

    __slots__ = ("auth_failures", "commands", "connections", "output_limit_disconnects", "rejected",
                 "tls_handshake_failures")

    def __init__(self):
        self.connections = 0
        self.rejected = 0
        self.commands = 0
        self.auth_failures = 0  # AUTH / HELLO AUTH refused (by the proxy password or the backend's ACL)
        self.tls_handshake_failures = 0
        self.output_limit_disconnects = 0  # clients dropped past client_output_buffer_limit
