"""client_output_buffer_limit: a client that asks for replies and does not read them is
disconnected before vproxy holds more than the limit for it; other clients are unaffected."""

from __future__ import annotations

import socket

import pytest
from conftest import RawClient, proxy_stats, wait_for

E = RawClient.encode
LIMIT = 4 << 20


@pytest.fixture
def limited(server, start_proxy):
    server.client().flushall()
    server.client().set("big", b"x" * (1 << 20))
    return start_proxy("--backend", server.addr, "--client-output-buffer-limit", str(LIMIT))


def _slow_reader(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.connect(("127.0.0.1", port))
    return s


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_client_that_never_reads_is_disconnected(limited, server):
    rss_before = _rss_kb(limited.proc.pid)
    hog = _slow_reader(limited.port)
    other = RawClient(limited.port)
    try:
        hog.sendall(E("GET", "big") * 60)  # 60 MiB of replies, never read
        wait_for(lambda: proxy_stats(limited)["output_limit_disconnects"] == 1, what="the hog dropped")
        assert other.call("GET", "small") == b"$-1\r\n"  # others go on
        assert proxy_stats(limited)["connected_clients"] == 2  # other, and this INFO's own
        # vproxy held at most about the limit (plus the replies in flight when it hit), not 60 MiB
        assert _rss_kb(limited.proc.pid) - rss_before < 40 * 1024
        hog.settimeout(10)
        got = b""
        while True:  # what was sent before the drop, then the end of the connection
            chunk = hog.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        assert len(got) < 60 << 20
    finally:
        hog.close()
        other.close()


def test_one_reply_past_the_limit_disconnects_like_the_server(limited, server):
    """A window whose replies add up past the limit is dropped whole (the batch path), as the
    server's hard limit drops a client whose buffered reply is too big."""
    server.client().set("huge", b"y" * (LIMIT + 1))
    with RawClient(limited.port) as c:
        assert c.call("MULTI") == b"+OK\r\n"
        assert c.call("GET", "huge") == b"+QUEUED\r\n"
        c.send(E("EXEC"))
        assert c.closed_by_peer()
    assert proxy_stats(limited)["output_limit_disconnects"] == 1


def test_clients_that_read_are_not_limited(limited):
    c = limited.client()
    try:
        for _ in range(20):
            assert len(c.get("big")) == 1 << 20
        p = c.pipeline(transaction=False)
        for _ in range(3):
            p.get("big")
        assert [len(v) for v in p.execute()] == [1 << 20] * 3
    finally:
        c.close()
    assert proxy_stats(limited)["output_limit_disconnects"] == 0
