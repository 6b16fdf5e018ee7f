"""Review findings on the standalone data path: each test shows one bug a user would hit."""

from __future__ import annotations

import socket
import time

from conftest import RawClient, proxy_stats, wait_for

E = RawClient.encode


def test_blocking_command_after_select_runs_in_the_new_db(raw, server):
    """A pipelined BLPOP after SELECT must not reuse the blocking connection leased for db 0."""
    server.client(db=0).rpush("a", "x")
    server.client(db=1).rpush("b", "y")
    c = raw()
    c.send(E("BLPOP", "a", "1") + E("SELECT", "1") + E("BLPOP", "b", "1"))
    assert c.read_n(3) == [b"*2\r\n$1\r\na\r\n$1\r\nx\r\n", b"+OK\r\n", b"*2\r\n$1\r\nb\r\n$1\r\ny\r\n"]


def test_failed_select_in_multi_keeps_the_session_db_and_the_pool(raw, server):
    """SELECT 99 fails inside EXEC: the session stays on its db, and no one's connections break."""
    c = raw()
    c.send(E("MULTI") + E("SELECT", "99") + E("EXEC"))
    assert c.read_n(3)[2] == b"*1\r\n-ERR DB index is out of range\r\n"
    assert c.call("SET", "k", "v") == b"+OK\r\n"
    assert server.client(db=0).get("k") == b"v"
    other = raw()
    assert other.call("SELECT", "3") == b"+OK\r\n"
    assert other.call("GET", "nothing") == b"$-1\r\n"


def test_select_in_multi_applies_to_the_rest_of_the_pipeline(raw, server):
    """MULTI / SELECT 1 / EXEC / SET in one pipeline: the SET runs in db 1, as on the server."""
    c = raw()
    c.send(E("MULTI") + E("SELECT", "1") + E("EXEC") + E("SET", "k5", "v"))
    assert c.read_n(4) == [b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+OK\r\n", b"+OK\r\n"]
    assert server.client(db=1).get("k5") == b"v"
    assert server.client(db=0).get("k5") is None


def test_select_refused_while_subscribed_resp2_keeps_the_db(raw, server):
    """In RESP2 pub/sub the server refuses SELECT: the session must not switch database."""
    c = raw()
    assert c.call("SUBSCRIBE", "ch").endswith(b":1\r\n")
    assert c.call("SELECT", "5").startswith(b"-ERR")
    assert c.call("UNSUBSCRIBE", "ch").endswith(b":0\r\n")
    assert c.call("SET", "k3", "v") == b"+OK\r\n"
    assert server.client(db=0).get("k3") == b"v"


def test_info_with_non_utf8_error_stat_answers(raw, server):
    """INFO's errorstats may hold any bytes a script put in an error: INFO must still answer."""
    c = raw()
    assert c.call("EVAL", b"return redis.error_reply('\xff\xfe boom')", "0") == b"-\xff\xfe boom\r\n"
    reply = c.call("INFO")
    assert reply.startswith(b"$") and b"# Proxy" in reply


def test_subscribe_then_hang_up_leaks_no_backend_connection(proxy, server):
    """A client that subscribes and disconnects at once must not leave a backend connection open."""
    wait_for(lambda: proxy_stats(proxy)["backend_connections_pinned"] == 0, what="no pins")
    reused = proxy_stats(proxy)["backend_connections_idle_pinned"]  # kept connections: no connect
    d = server.client(protocol=2)  # one probe connection, kept
    before = d.info("clients")["connected_clients"]
    accepted = d.info("stats")["total_connections_received"]
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(E("SUBSCRIBE", f"ch{i}"))
        s.close()
    # the proxy opened a backend connection for each (dropped before or after it was up) ...
    wait_for(lambda: d.info("stats")["total_connections_received"] >= accepted + 20 - reused, what="backend connects")
    wait_for(lambda: proxy_stats(proxy)["backend_connections_pinned"] == 0, what="pins released")
    # ... and every one of them is closed on the backend too
    wait_for(lambda: d.info("clients")["connected_clients"] <= before + 2, what="backend connections closed")
    d.close()


def test_failed_multi_applies_no_queued_command(server, start_proxy):
    """MULTI refused (max_pinned reached): the commands behind it must not run outside a transaction."""
    server.client().flushall()
    p = start_proxy("--backend", server.addr, "--max-pinned", "1")
    with RawClient(p.port) as a, RawClient(p.port) as b:
        assert a.call("WATCH", "w") == b"+OK\r\n"  # holds the one pinned connection
        b.send(E("MULTI") + E("SET", "t", "1") + E("EXEC"))
        multi, queued, exec_ = b.read_n(3)
        assert multi.startswith(b"-ERR") and queued.startswith(b"-ERR") and exec_.startswith(b"-EXECABORT")
        assert server.client().get("t") is None
        assert b.call("SET", "t", "2") == b"+OK\r\n"  # the failed transaction is over
        assert a.call("UNWATCH") == b"+OK\r\n"
        assert b.call("MULTI") == b"+OK\r\n"  # and a new one works
        assert b.call("INCR", "t") == b"+QUEUED\r\n"
        assert b.call("EXEC") == b"*1\r\n:3\r\n"


def test_idle_timeout_spares_a_blocked_client(server, start_proxy):
    """client_idle_timeout must not close a client waiting in BLPOP (the server exempts blocked clients)."""
    p = start_proxy("--backend", server.addr, "--client-idle-timeout", "1")
    with RawClient(p.port) as c:
        started = time.monotonic()
        assert c.call("BLPOP", "nothing", "2.5") == b"*-1\r\n"
        assert time.monotonic() - started >= 2.0
        assert c.call("PING") == b"+PONG\r\n"
    with RawClient(p.port) as idle:  # and an idle client is still closed
        assert idle.closed_by_peer(timeout=5)


def test_client_without_subcommand_answers_before_the_table_is_learned(start_proxy):
    """Backend not up yet (built-in command table, no arity for CLIENT): a bare CLIENT gets -ERR."""
    from vproxy.embedded import free_port

    p = start_proxy("--backend", f"127.0.0.1:{free_port()}", wait_learned=False)
    with RawClient(p.port) as c:
        assert c.call("CLIENT") == b"-ERR wrong number of arguments for 'client' command\r\n"
        assert c.call("PING").startswith(b"-ERR vproxy: backend ")  # the backend is down: PING says so
