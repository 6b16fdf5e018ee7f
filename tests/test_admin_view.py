"""What vproxy shows about itself: INFO `# Proxy` and CLIENT LIST, as a user reads them."""

from __future__ import annotations

import re

import pytest
from conftest import BACKENDS, RawClient

E = RawClient.encode


def _subscribe_mix(c: RawClient) -> None:
    """Two channels, one pattern, one shard channel; every confirmation read."""
    c.send(E("SUBSCRIBE", "a", "b") + E("PSUBSCRIBE", "p*") + E("SSUBSCRIBE", "s"))
    c.read_n(4)


def _counts(client_list: bytes, cmd: str) -> tuple:
    line = next(x for x in client_list.decode().splitlines() if f" cmd={cmd} " in x)
    return tuple(int(re.search(rf" {f}=(\d+)", line).group(1)) for f in ("sub", "psub", "ssub"))


@pytest.mark.parametrize("kind", BACKENDS)
def test_client_list_shows_channels_patterns_and_shard_channels_apart(kind, start_server, start_proxy):
    s = start_server(kind)
    p = start_proxy("--backend", s.addr)
    with RawClient(s.port) as direct, RawClient(p.port) as proxied:
        _subscribe_mix(direct)
        _subscribe_mix(proxied)
        server_view = _counts(s.client().execute_command("CLIENT", "LIST"), "ssubscribe")
        assert server_view == (2, 1, 1)
        assert _counts(p.client().execute_command("CLIENT", "LIST"), "ssubscribe") == server_view
        proxied.call("PUNSUBSCRIBE", "p*")
        assert _counts(p.client().execute_command("CLIENT", "LIST"), "punsubscribe") == (2, 0, 1)


def test_info_proxy_names_the_backend_before_any_command(start_server, start_proxy):
    s = start_server("valkey")
    p = start_proxy("--backend", s.addr)
    assert p.info()["proxy_backends"] == s.addr
