"""mux/ (channel, pool) in this process against real valkey-server processes: replies matched FIFO to
the requests' waiters across interleaved clients, and abort() (a lost, timed-out or closed
connection) answering every waiter with an error and recording whether its request was sent.

The channel does its I/O with gevent's loop; the test swaps mux/backend.py's socket module for
gevent's (what `monkey.patch_all()` does in vproxy's own process) and waits by yielding to the loop."""

from __future__ import annotations

import time

import gevent
import gevent.socket
import pytest

from vproxy import resp
from vproxy.config import load
from vproxy.mux import backend
from vproxy.mux.channel import TIMED_OUT, Batch, deadline_after
from vproxy.mux.pool import NodePool

E = resp.encode_request


@pytest.fixture(autouse=True)
def gevent_sockets(monkeypatch):
    monkeypatch.setattr(backend, "socket", gevent.socket)


def until(cond, what: str, timeout: float = 10.0):
    """Yield to the loop until cond() is true; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.005)


@pytest.fixture
def node(start_server):
    return start_server()


@pytest.fixture
def pool(node):
    cfg = load(["--backend", node.addr, "--pool-size", "1", "--command-timeout", "30"], env={})
    p = NodePool(("127.0.0.1", node.port), cfg)
    yield p
    p.close()


def connected(pool):
    """The pool's shared channel for (db 0, RESP2), once a PING has gone through it."""
    ch = pool.channel((0, 2))
    warm = Batch(1)
    ch.submit(E([b"PING"]), warm, 0, deadline_after(30))
    warm.wait()
    assert warm.replies == [b"+PONG\r\n"]
    return ch


def sent(ch) -> bool:
    """Every queued request has been handed to the kernel."""
    return ch.unsent == 0 and not ch.flushing


def test_replies_go_to_their_waiters_in_order(pool):
    """Three clients' requests interleaved on one shared connection: each reply lands in the slot of
    the request it answers, and the server ran them in submit order (the counter rises with it)."""
    ch = pool.channel((0, 2))
    assert pool.channel((0, 2)) is ch  # pool_size 1: everyone shares it
    batches = [Batch(60) for _ in range(3)]
    want = {}
    deadline = deadline_after(30)
    for i in range(60):
        for c, b in enumerate(batches):
            if i % 3 == 0:
                ch.submit(E([b"INCR", b"order"]), b, i, deadline)
            else:
                payload = b"c%d-r%d-" % (c, i) + b"x" * (i * 37)
                ch.submit(E([b"ECHO", payload]), b, i, deadline)
                want[(c, i)] = resp.bulk(payload)
    for b in batches:
        b.wait()
    for (c, i), frame in want.items():
        assert batches[c].replies[i] == frame
    counts = [int(batches[c].replies[i][1:-2]) for i in range(0, 60, 3) for c in range(3)]
    assert counts == list(range(1, 61))
    assert not ch.waiters and all(b.lost is None for b in batches)


def test_a_batch_spread_over_two_connections_keeps_its_order(pool, node):
    """One client's requests on two databases (two channels): the replies sit in request order."""
    b = Batch(4)
    d = deadline_after(30)
    pool.channel((0, 2)).submit(E([b"SET", b"k", b"db0"]), b, 0, d)
    pool.channel((1, 2)).submit(E([b"SET", b"k", b"db1"]), b, 1, d)
    pool.channel((1, 2)).submit(E([b"GET", b"k"]), b, 3, d)
    pool.channel((0, 2)).submit(E([b"GET", b"k"]), b, 2, d)
    b.wait()
    assert b.replies == [b"+OK\r\n", b"+OK\r\n", resp.bulk(b"db0"), resp.bulk(b"db1")]


def test_abort_answers_every_waiter_and_says_what_was_sent(pool, node):
    ch = connected(pool)
    node.pause()  # the server reads nothing more: requests stay unanswered
    try:
        batches = [Batch(2) for _ in range(3)]
        d = deadline_after(30)
        for b in batches:
            ch.submit(E([b"PING"]), b, 0, d)
            ch.submit(E([b"GET", b"k"]), b, 1, d)
        until(lambda: sent(ch), "the requests to be handed to the kernel")
        ch.abort("ERR vproxy: test abort")
        for b in batches:
            assert b.left == 0 and b.replies == [b"-ERR vproxy: test abort\r\n"] * 2
            assert b.lost == {0: True, 1: True}  # sent: the server may have run them
        assert ch.closed and not ch.waiters
        late = Batch(1)
        ch.submit(E([b"PING"]), late, 0, d)  # after the abort: answered at once, never sent
        assert late.left == 0 and late.lost == {0: False} and b"connection closed" in late.replies[0]
        ch.abort("ERR again")  # idempotent: nobody is answered twice
        assert batches[0].replies[0] == b"-ERR vproxy: test abort\r\n"
    finally:
        node.resume()


def test_requests_queued_before_the_connection_is_up_are_unsent(pool, node):
    node.pause()  # the handshake cannot finish: the channel is not ready
    try:
        ch = pool.channel((0, 2))
        b = Batch(2)
        d = deadline_after(30)
        ch.submit(E([b"SET", b"a", b"1"]), b, 0, d)
        ch.submit(E([b"SET", b"b", b"1"]), b, 1, d)
        assert not ch.ready and ch.unsent == 2
        ch.close()
        assert b.left == 0 and b.lost == {0: False, 1: False}  # safe to send again
        assert all(r.startswith(b"-ERR vproxy: backend 127.0.0.1:%d unavailable" % node.port) for r in b.replies)
    finally:
        node.resume()


def test_timeout_records_timed_out(pool, node):
    ch = connected(pool)
    node.pause()
    try:
        b = Batch(1)
        ch.submit(E([b"PING"]), b, 0, deadline_after(30))
        until(lambda: sent(ch), "the request to be sent")
        ch.timeout()
        assert b.lost == {0: TIMED_OUT} and b"did not answer within 30s" in b.replies[0]
    finally:
        node.resume()


def test_a_killed_backend_answers_every_waiter(pool, node):
    ch = connected(pool)
    node.pause()  # so that nothing is answered before the kill
    b = Batch(5)
    d = deadline_after(30)
    for i in range(5):
        ch.submit(E([b"INCR", b"n"]), b, i, d)
    until(lambda: sent(ch), "the requests to be sent")
    node.kill()
    b.wait()  # the reader sees the connection close: every waiter answered, none left hanging
    assert all(r.startswith(b"-ERR vproxy: backend 127.0.0.1:%d unavailable" % node.port) for r in b.replies)
    assert b.lost == {i: True for i in range(5)} and ch.closed
    assert ch not in pool.shared.get((0, 2), [])  # the pool forgot it: the next request opens another
