"""Counters the proxy keeps about itself (rendered by admin.proxy_section)."""

from __future__ import annotations


class Stats:
    """Plain integer counters; cheap enough to bump on every request."""

    __slots__ = ("acl_denied", "auth_failures", "commands", "connections", "output_limit_disconnects",
                 "pipeline_limited", "rate_limited", "rejected", "tls_handshake_failures")

    def __init__(self):
        self.connections = 0
        self.rejected = 0
        self.commands = 0
        self.auth_failures = 0  # AUTH / HELLO AUTH refused (by the proxy password or the backend's ACL)
        self.tls_handshake_failures = 0
        self.output_limit_disconnects = 0  # clients dropped past client_output_buffer_limit
        self.acl_denied = 0  # requests refused by a proxy user's rules (-NOPERM, gate.py)
        self.rate_limited = 0  # read batches slowed down by a rate limit (limits.py)
        self.pipeline_limited = 0  # times a client pipelined past max_pipeline (left unread meanwhile)
