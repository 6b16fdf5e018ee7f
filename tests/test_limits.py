"""client_output_buffer_limit: a client that asks for replies and does not read them is
disconnected before vproxy holds more than the limit for it; other clients are unaffected."""

from __future__ import annotations

import socket
import threading
import time

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


# ---- request rate (client_rate_limit, a user's rate=N) and pipeline depth (max_pipeline) ----

def _timed_pings(port: int, n: int, per_batch: int = 5, user: tuple | None = None) -> float:
    """Seconds n PINGs take, sent per_batch at a time (each batch's replies read before the next)."""
    with RawClient(port) as c:
        if user is not None:
            assert c.call("AUTH", *user) == b"+OK\r\n"
        t0 = time.monotonic()
        for _ in range(n // per_batch):
            c.send(E("PING") * per_batch)
            assert c.read_n(per_batch) == [b"+PONG\r\n"] * per_batch
        return time.monotonic() - t0


def test_rate_limit_slows_one_client_not_the_others(server, start_proxy):
    rate, burst, n = 50, 10, 80
    p = start_proxy("--backend", server.addr, "--client-rate-limit", str(rate), "--client-rate-burst", str(burst))
    slow = threading.Thread(target=lambda: took.append(_timed_pings(p.port, n)))
    took: list = []
    slow.start()
    wait_for(lambda: proxy_stats(p)["rate_limited"] >= 1, what="the first client slowed down")
    # meanwhile another client's burst goes through at once: its bucket is its own
    assert _timed_pings(p.port, burst) < 0.5 * (n - burst) / rate
    slow.join(30)
    assert took and took[0] >= (n - burst) / rate - 0.05  # N requests: at least (N - burst) / rate seconds
    assert proxy_stats(p)["rate_limited"] >= 2


def test_user_rate_is_shared_by_its_clients(server, start_gate):
    rate, n = 40, 40
    p = start_gate("--backend", server.addr, "--users", f"u on >pw allkeys allcommands rate={rate}",
                   "--users", "admin on >a allkeys allcommands", cred=("admin", "a"))
    took: list = []
    two = [threading.Thread(target=lambda: took.append(_timed_pings(p.port, n, user=("u", "pw")))) for _ in range(2)]
    t0 = time.monotonic()
    for t in two:
        t.start()
    for t in two:
        t.join(30)
    # 2n requests from one bucket of `rate` (its burst: one second's worth)
    assert len(took) == 2 and time.monotonic() - t0 >= (2 * n - rate) / rate - 0.05
    assert p.info()["rate_limited"] >= 1


def test_no_rate_limit_by_default(limited):
    assert _timed_pings(limited.port, 200, per_batch=50) < 5
    assert proxy_stats(limited)["rate_limited"] == 0


def test_max_pipeline_backpressures_and_answers_everything(server, start_proxy):
    p = start_proxy("--backend", server.addr, "--max-pipeline", "4")
    server.client().set("k", "v")
    with RawClient(p.port) as c:
        c.send(E("GET", "k") * 200)
        assert c.read_n(200) == [b"$1\r\nv\r\n"] * 200
    assert proxy_stats(p)["pipeline_limited"] >= 1
    assert proxy_stats(p)["rate_limited"] == 0
