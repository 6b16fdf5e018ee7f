"""Hostile input: random and mutated RESP thrown at a live vproxy (hypothesis) while a well-behaved
client checks its own answers. Every connection gets an answer or is closed (never hangs), the proxy
stays up, the other client never notices, and memory is given back. scripts/fuzz.py is the longer run."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from conftest import Proxy, Server, wait_for

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz test needs hypothesis (pip install '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


# Requests a client may send (its own keys only): the fuzzer mutates and mixes them.
BASE = [resp(b"GET", b"fz:k"), resp(b"SET", b"fz:k", b"v"), resp(b"PING"), resp(b"ECHO", b"hi"),
        resp(b"HSET", b"fz:h", b"f", b"v"), resp(b"LPUSH", b"fz:l", b"a", b"b"), resp(b"MULTI"), resp(b"EXEC"),
        resp(b"SUBSCRIBE", b"fz:c"), resp(b"UNSUBSCRIBE"), resp(b"SELECT", b"1"), resp(b"HELLO", b"3"),
        resp(b"CLIENT", b"SETNAME", b"fz"), resp(b"MGET", b"fz:a", b"fz:b"), resp(b"WATCH", b"fz:k"),
        b"PING\r\n", b"GET fz:k\r\n", b"*0\r\n", b"*-1\r\n", b"$3\r\nGET\r\n", b"*1\r\n$-1\r\n"]
NASTY = [b"*", b"$", b"\r\n", b"\r", b"\n", b"\x00", b"*99999999\r\n", b"$99999999999\r\n", b"*-5\r\n",
         b"$-7\r\n", b"*1\r\n$2147483648\r\n", b":1\r\n", b"+OK\r\n", b"-ERR x\r\n", b"*2\r\n*1\r\n", b"\xff\xfe",
         b" ", b"\"unbalanced", b"*1\r\n$4\r\nPING", b"*3\r\n$3\r\nSET\r\n"]


@st.composite
def streams(draw) -> bytes:
    parts = draw(st.lists(st.one_of(st.sampled_from(BASE), st.sampled_from(NASTY), st.binary(max_size=40)),
                          min_size=1, max_size=8))
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 4))):  # byte flips, cuts and insertions
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 8))]
        else:
            data[i:i] = draw(st.sampled_from(NASTY))
    return bytes(data)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def target():
    s = Server()
    p = Proxy("--backend", s.addr)
    yield p, s
    p.stop()
    s.stop()


class GoodClient(threading.Thread):
    """A client doing its own SET/GET round trips the whole time, noting any wrong answer."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.wrong, self.rounds = port, threading.Event(), [], 0

    def run(self):
        c = __import__("redis").Redis(port=self.port, socket_timeout=10)
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                c.set(f"good:{n % 50}", n)
                got = c.get(f"good:{n % 50}")
                if got != str(n).encode():
                    self.wrong.append((n, got))
                self.rounds += 1
            except Exception as e:  # noqa: BLE001 - any failure is what this client reports
                self.wrong.append((n, repr(e)))
                return


def throw(port: int, data: bytes) -> float:
    """Send data, half-close, read until vproxy closes; how long that took."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed on a protocol error: an answer too
    return time.monotonic() - t


def test_random_and_mutated_resp_never_hurts(target):
    proxy, server = target
    good = GoodClient(proxy.port)
    good.start()
    wait_for(lambda: good.rounds > 10 or good.wrong, what="the good client to run")
    before = rss_kb(proxy.proc.pid)
    slowest = [0.0]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(streams())
    def one(data):
        took = throw(proxy.port, data)
        slowest[0] = max(slowest[0], took)
        assert took < 8, f"{data!r} kept the connection {took:.1f}s"
        assert proxy.proc.poll() is None, f"vproxy died on {data!r}"

    try:
        one()
    finally:
        good.stop.set()
        good.join(20)
    assert not good.wrong, good.wrong[:3]
    assert good.rounds > 50
    assert proxy.client().ping()
    assert proxy.info()["connected_clients"] >= 1
    assert rss_kb(proxy.proc.pid) - before < 50_000, "memory not given back"
