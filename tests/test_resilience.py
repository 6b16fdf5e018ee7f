"""Faults: the backend killed, restarted, stuck (SIGSTOP), or down at start; clients hanging up in
the middle of a pipeline, a transaction or a blocking command. Clients stay connected and get
errors naming the backend; the proxy recovers by itself; nothing a dead client sent runs."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis
from conftest import BACKENDS, RawClient, proxy_stats, restart_server, wait_for
from redis.backoff import NoBackoff
from redis.retry import Retry

from vproxy.embedded import free_port

E = RawClient.encode
NO_RETRY = Retry(NoBackoff(), 0)  # see the proxy's own answer, not redis-py's reconnect attempts


def err_of(fn, *args) -> str:
    with pytest.raises(redis.ResponseError) as ei:
        fn(*args)
    return str(ei.value)


def pinned(p) -> int:
    return int(proxy_stats(p)["backend_connections_pinned"])


# ---- backend killed, then restarted ----


@pytest.mark.parametrize("kind", BACKENDS)
def test_backend_killed_then_restarted(kind, start_server, start_proxy):
    s = start_server(kind)
    p = start_proxy("--backend", s.addr)
    c = p.client(protocol=2, retry=NO_RETRY)
    c3 = p.client(protocol=3, retry=NO_RETRY)
    raw = RawClient(p.port)
    assert c.set("k", "before") is True and c3.get("k") == b"before"
    assert raw.call("GET", "k") == b"$6\r\nbefore\r\n"

    s.kill()
    for client in (c, c3):
        msg = err_of(client.get, "k")
        assert s.addr in msg and "vproxy" in msg, msg
    reply = raw.call("GET", "k")
    assert reply.startswith(b"-ERR") and s.addr.encode() in reply
    # every client is still connected: answered again with an error, not a hang-up; PING says the
    # backend is down (a health check through vproxy must not report all is well)
    ping = raw.call("PING")
    assert ping.startswith(b"-ERR vproxy: backend " + s.addr.encode()) and b"unavailable" in ping, ping
    assert s.addr in err_of(c.ping)
    assert raw.call("PROXY", "VERSION").startswith(b"$")
    t0 = time.monotonic()
    again = raw.call("SET", "k", "x")
    assert again.startswith(b"-ERR") and time.monotonic() - t0 < 5  # fails fast while down

    restart_server(s)
    wait_for(lambda: raw.call("SET", "k", "after") == b"+OK\r\n", timeout=20, what="the proxy to reconnect")
    assert c.get("k") == b"after"  # the same redis-py connections work again
    assert c3.get("k") == b"after"
    assert s.client().get("k") == b"after"
    raw.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_pinned_clients_when_backend_dies(kind, start_server, start_proxy):
    """A subscriber, a blocked BLPOP and a WATCHing client each get an error, not silence."""
    s = start_server(kind)
    p = start_proxy("--backend", s.addr)
    sub, blocked, watcher = RawClient(p.port), RawClient(p.port), RawClient(p.port)
    assert sub.call("SUBSCRIBE", "ch") == b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    blocked.send(E("BLPOP", "q", "0"))
    assert watcher.call("WATCH", "w") == b"+OK\r\n"
    wait_for(lambda: pinned(p) == 3, what="three pinned connections")

    s.kill()
    for c in (sub, blocked):
        reply = c.read(timeout=10)
        assert reply.startswith(b"-ERR") and s.addr.encode() in reply, reply
    wait_for(lambda: pinned(p) == 0, what="dead pinned connections to be let go")

    restart_server(s)
    with RawClient(p.port) as again:
        wait_for(lambda: again.call("GET", "x") == b"$-1\r\n", timeout=20, what="the proxy to reconnect")
        assert again.call("SUBSCRIBE", "ch") == b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
        assert p.client(protocol=2).publish("ch", "back") == 1
        assert again.read() == b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$4\r\nback\r\n"
    # The WATCH died with the backend connection: the transaction built on it must not commit.
    watcher.send(E("MULTI") + E("SET", "w", "from-a-stale-watch") + E("EXEC"))
    replies = watcher.read_n(3)
    assert replies[2].startswith(b"-") or replies[2] in (b"*-1\r\n", b"_\r\n"), replies
    assert s.client().get("w") is None
    assert watcher.call("SET", "w", "fresh") == b"+OK\r\n"  # and the client carries on
    for c in (sub, blocked, watcher):
        c.close()
    wait_for(lambda: pinned(p) == 0, what="all pins released")


def test_subscriber_told_to_resubscribe(start_server, start_proxy):
    s = start_server("valkey")
    p = start_proxy("--backend", s.addr)
    with RawClient(p.port) as sub:
        sub.call("SUBSCRIBE", "news")
        s.kill()
        reply = sub.read(timeout=10)
        assert reply.startswith(b"-ERR vproxy: backend " + s.addr.encode())
        assert b"subscribe again" in reply
        # no longer in subscribed mode: PING goes to the (dead) backend, not to the lost stream
        assert sub.call("PING").startswith(b"-ERR vproxy: backend " + s.addr.encode())


def test_backend_down_at_start_then_comes_up(start_server, start_proxy):
    port = free_port()
    p = start_proxy("--backend", f"127.0.0.1:{port}", wait_learned=False)
    with RawClient(p.port) as c:
        reply = c.call("GET", "k")
        assert reply.startswith(b"-ERR") and f"127.0.0.1:{port}".encode() in reply
        assert c.call("PING").startswith(b"-ERR vproxy: backend 127.0.0.1:%d unavailable" % port)
        assert c.call("PING", "a", "b").startswith(b"-ERR vproxy: backend 127.0.0.1:%d unavailable" % port)
        s = start_server("valkey", port=port)
        s.client().set("k", "up")
        wait_for(lambda: c.call("GET", "k") == b"$2\r\nup\r\n", timeout=20, what="the backend to be used")
        assert c.call("PING", "a", "b") == b"-ERR wrong number of arguments for 'ping' command\r\n"  # the server's
    wait_for(lambda: proxy_stats(p)["commands_learned"] == 1, timeout=20, what="COMMAND learned late")


# ---- backend stuck (SIGSTOP) ----


@pytest.mark.parametrize("kind", BACKENDS)
def test_stuck_backend_times_out_then_recovers(kind, start_server, start_proxy):
    s = start_server(kind)
    p = start_proxy("--backend", s.addr, "--command-timeout", "0.5")
    c = p.client(protocol=2, retry=NO_RETRY, socket_timeout=15)
    raw = RawClient(p.port, timeout=15)
    c.set("k", "v")
    s.pause()
    try:
        t0 = time.monotonic()
        msg = err_of(c.get, "k")
        took = time.monotonic() - t0
        assert "0.5s" in msg and "command_timeout" in msg and s.addr in msg, msg
        assert took < 4, f"the timeout error took {took:.1f}s"
        # still connected, and every later request (PING too) gets an error (not a hang) while stuck
        assert s.addr in err_of(c.ping)
        t0 = time.monotonic()
        reply = raw.call("GET", "k")
        assert reply.startswith(b"-ERR") and s.addr.encode() in reply
        assert time.monotonic() - t0 < 5
        assert raw.call("PING").startswith(b"-ERR vproxy: backend " + s.addr.encode())
    finally:
        s.resume()
    wait_for(lambda: c.get("k") == b"v", timeout=20, what="the proxy to use the resumed backend")
    assert raw.call("GET", "k") == b"$1\r\nv\r\n"
    raw.close()


def test_stuck_backend_does_not_time_out_blocking_commands(server, start_proxy):
    """command_timeout is for quick commands: a BLPOP may wait longer than it."""
    p = start_proxy("--backend", server.addr, "--command-timeout", "0.3")
    server.client().delete("slowq")
    with RawClient(p.port) as b:
        b.send(E("BLPOP", "slowq", "0"))
        wait_for(lambda: pinned(p) == 1, what="BLPOP pinned")
        assert b.nothing_pending(0.8)  # well past command_timeout, still waiting
        p.client(protocol=2).rpush("slowq", "late")
        assert b.read() == b"*2\r\n$5\r\nslowq\r\n$4\r\nlate\r\n"


# ---- clients hanging up mid-way ----


def _half_closed(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send data, shut the write side (as `printf ... | nc -N` does), read every reply up to EOF."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("data", [
    E("MULTI") + E("SET", "hc", "1") + E("INCR", "hc-n") + E("EXEC") + E("GET", "hc") + E("PING"),
    E("SET", "hc", "1") + E("WATCH", "hc") + E("GET", "hc") + E("UNWATCH") + E("PING"),
    E("SUBSCRIBE", "hc-ch"),
    E("PSUBSCRIBE", "hc-*"),
], ids=["multi-exec", "watch", "subscribe", "psubscribe"])
def test_half_closed_client_gets_every_reply(proxy, server, data):
    """A client that writes its requests and half-closes: the server runs and answers all it read
    before the EOF; so does vproxy, pinned requests (a transaction, WATCH) and streams included."""
    server.client().flushall()
    direct = _half_closed(server.port, data)
    state = server.client().get("hc-n")
    server.client().flushall()
    via = _half_closed(proxy.port, data)
    assert via == direct
    assert server.client().get("hc-n") == state
    wait_for(lambda: pinned(proxy) == 0, what="the pins to be dropped")


def test_half_close_still_cancels_a_blocked_command(proxy, server):
    """The half-close of a client blocked in BLPOP still ends the BLPOP at once (it must not take
    an element pushed later), as the server frees a client on EOF."""
    server.client().delete("hc-q")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(E("BLPOP", "hc-q", "0"))
        wait_for(lambda: pinned(proxy) == 1, what="BLPOP pinned")
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: pinned(proxy) == 0, what="the BLPOP to be cancelled")
    assert server.client().lpush("hc-q", "precious") == 1
    assert server.client().llen("hc-q") == 1


def test_client_gone_mid_transaction_leaves_nothing(proxy, server, raw):
    server.client().flushall()
    c = raw()
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("SET", "tx-k", "never") == b"+QUEUED\r\n"
    assert pinned(proxy) == 1
    in_multi = _backend_ids(server, lambda e: "x" in e["flags"])
    assert len(in_multi) == 1  # the backend connection holding the queued transaction
    c.close()
    wait_for(lambda: pinned(proxy) == 0, what="the transaction's pin to be dropped")
    later = raw()
    assert later.call("EXEC") == b"-ERR EXEC without MULTI\r\n"
    assert later.call("GET", "tx-k") == b"$-1\r\n"
    assert server.client().get("tx-k") is None
    # that backend connection was closed (its queued MULTI with it), not put back for reuse
    wait_for(lambda: not _backend_ids(server, lambda e: e["id"] in in_multi), what="the connection to close")


def _backend_ids(server, pred) -> set:
    d = server.client(protocol=2)
    try:
        return {e["id"] for e in d.client_list() if e.get("name") == "vproxy" and pred(e)}
    finally:
        d.close()


def test_client_gone_mid_pipelined_transaction(proxy, server, raw):
    server.client().flushall()
    c = raw()
    c.send(E("MULTI") + E("SET", "ptx", "1") + E("INCR", "ptx-n") + b"*1\r\n$4\r\nEX")  # EXEC cut short
    assert c.read_n(3) == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n"]
    c.close()
    wait_for(lambda: pinned(proxy) == 0, what="the pin to be dropped")
    assert raw().call("EXEC") == b"-ERR EXEC without MULTI\r\n"
    assert server.client().exists("ptx", "ptx-n") == 0


def test_client_gone_mid_pipeline_others_unaffected(proxy, server, raw):
    """A client that writes 5000 requests and hangs up without reading: its replies must not leak
    to the clients sharing its backend connection, and its half-sent last request must not run."""
    server.client().flushall()
    before = proxy_stats(proxy)["connected_clients"]
    stop, errors = threading.Event(), []

    def neighbour(n: int):
        c = proxy.client(protocol=2, socket_timeout=15)
        i = 0
        try:
            while not stop.is_set():
                c.set(f"nb:{n}", i)
                got = c.get(f"nb:{n}")
                if got != str(i).encode():
                    errors.append((n, i, got))
                    return
                i += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=neighbour, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(3):
        rude = raw()
        rude.send(
            b"".join(E("SET", f"rude:{i}", "x" * 100) for i in range(5000))
            + b"*3\r\n$3\r\nSET\r\n$8\r\nrude:cut\r\n$5\r\nhal"
        )
        rude.close()
    wait_for(lambda: proxy_stats(proxy)["connected_clients"] == before + 4, what="the rude clients to be gone")
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    wait_for(lambda: proxy_stats(proxy)["connected_clients"] == before, what="the neighbours to be gone")
    assert server.client().exists("rude:cut") == 0
    with raw() as c:
        c.send(b"".join(E("INCR", "after") for _ in range(100)))
        assert c.read_n(100) == [b":%d\r\n" % (i + 1) for i in range(100)]


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) >> 10


def _read_by_proxy(proxy_port: int, sock: socket.socket) -> bool:
    """Everything sent on sock has been read by the proxy: nothing in sock's send queue, nothing in
    the receive queue of the proxy's end (/proc/net/tcp, loopback)."""
    import fcntl
    import struct
    import termios
    if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]:
        return False
    mine = "%04X" % sock.getsockname()[1]
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, remote, _, queues = line.split()[1:5]
            if local.endswith(":%04X" % proxy_port) and remote.endswith(":" + mine):
                return int(queues.split(":")[1], 16) == 0
    return False


def test_memory_of_a_request_cut_short_is_given_back_when_its_client_leaves(proxy, server):
    """An endless multibulk (`*2147483647` then small arguments): what the parser holds for it (the
    bytes and every parsed argument) is freed as soon as the client is gone, not whenever Python's
    cyclic GC next runs (on a quiet proxy: maybe never), so clients doing it one after another
    cannot pile it up. (RSS once each client is gone: the allocator may keep freed memory for
    reuse, so what is checked is that it does not grow from one such client to the next.)"""
    before = proxy_stats(proxy)["connected_clients"]
    base, peak, after = _rss_mb(proxy.proc.pid), [], []
    for _ in range(3):
        with RawClient(proxy.port) as c:
            c.send(b"*2147483647\r\n" + b"$2\r\nab\r\n" * (2 << 20))  # 16 MB: about 2 million arguments
            wait_for(lambda: _read_by_proxy(proxy.port, c.sock), what="vproxy to read the request so far")
            peak.append(_rss_mb(proxy.proc.pid))
        wait_for(lambda: proxy_stats(proxy)["connected_clients"] == before, what="the client to be gone")
        after.append(_rss_mb(proxy.proc.pid))
    assert peak[0] - base > 60, (base, peak, after)  # what one such request holds while it is read
    assert after[2] - base < 40 and peak[2] - peak[0] < 40, (base, peak, after)  # it piled up, ~100 MB each


def test_client_gone_while_blocked_does_not_eat_the_next_push(proxy, server, raw):
    server.client().delete("handoff")
    c = raw()
    c.send(E("BLPOP", "handoff", "0"))
    wait_for(lambda: pinned(proxy) == 1, what="BLPOP pinned")
    c.close()
    wait_for(lambda: pinned(proxy) == 0, what="the dead client's BLPOP to be cancelled")
    d = server.client()
    assert d.lpush("handoff", "precious") == 1
    assert d.llen("handoff") == 1  # nobody popped it: the BLPOP died with its client
    assert d.lpop("handoff") == b"precious"


def test_client_gone_while_watching(proxy, server, raw):
    c = raw()
    assert c.call("WATCH", "wk") == b"+OK\r\n"
    assert pinned(proxy) == 1
    c.close()
    wait_for(lambda: pinned(proxy) == 0, what="the WATCH pin to be dropped")


def test_client_gone_while_subscribed_and_monitoring(proxy, server, raw):
    pub = proxy.client(protocol=2)
    s, m = raw(), raw()
    s.call("SUBSCRIBE", "gone")
    assert m.call("MONITOR") == b"+OK\r\n"
    assert pub.pubsub_numsub("gone") == [(b"gone", 1)]
    s.close()
    m.close()
    wait_for(lambda: pinned(proxy) == 0, what="stream pins dropped")
    wait_for(lambda: pub.pubsub_numsub("gone") == [(b"gone", 0)], what="the backend to drop the subscription")


def test_half_close_behind_watch_and_hello_gets_every_reply(proxy, server):
    """HELLO (and AUTH) while WATCH pins a connection switch it with a request vproxy sends itself;
    that request never blocks, so a client that half-closes right behind them gets every reply."""
    E = RawClient.encode
    with RawClient(proxy.port) as c:
        c.send(E("WATCH", "hc") + E("HELLO", "3") + E("MULTI") + E("GET", "hc") + E("EXEC"))
        c.sock.shutdown(socket.SHUT_WR)
        out = c.read_n(5)
        assert out[0] == b"+OK\r\n" and out[1].startswith(b"%7\r\n") and out[2:4] == [b"+OK\r\n", b"+QUEUED\r\n"]
        assert out[4] == b"*1\r\n_\r\n"  # RESP3 from HELLO on: EXEC's GET of a missing key
