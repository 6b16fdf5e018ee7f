"""Addresses as text: one parser of "host:port" / "[v6]:port" / ":port", one formatter (IPv6 in brackets).

Every address vproxy reads from a setting, a peer or a server's reply, and every address it shows
(logs, INFO, CLIENT LIST, audit records, metrics labels), goes through here.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # ':6379' means this host


def parse(text) -> tuple[str, int]:
    """'host:port', '[::1]:port' or ':port' -> (host, port); ValueError when it is not one of those."""
    text = (text.decode() if isinstance(text, bytes) else str(text)).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or DEFAULT_HOST, int(port)


def parse_node(text) -> tuple[str, int]:
    """A cluster node's address as CLUSTER NODES and -MOVED/-ASK write it: 'host:port' or 'host:port@cport'."""
    text = text.decode() if isinstance(text, bytes) else str(text)
    return parse(text.partition("@")[0])


def fmt(addr) -> str:
    """(host, port) -> "host:port", or "[v6]:port" for an IPv6 host (the flow and scope of an IPv6
    socket address's 4-tuple are left out)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def show(addr) -> str:
    """fmt() for a value that may be absent (''), or already text (shown as it is)."""
    if not addr:
        return ""
    return addr if isinstance(addr, str) else fmt(addr)
