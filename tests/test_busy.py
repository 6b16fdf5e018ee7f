"""A backend busy with a runaway Lua script or function (busy-reply-threshold set low to keep the
tests quick): PING and ECHO say what the server says, SCRIPT KILL / FUNCTION KILL answer what the
server answers at every moment (before the threshold too), and the script's caller gets the
server's answer on the connection vproxy kept, however long past command_timeout."""

from __future__ import annotations

import pytest
from conftest import BACKENDS, RawClient, proxy_stats, wait_for

E = RawClient.encode
LOOP = "local i = 0 while true do i = i + 1 end"
LIB = "#!lua name=busylib\nredis.register_function('spin', function() " + LOOP + " end)"


def direct(server, *args) -> bytes:
    """One request straight to the server, its raw reply."""
    with RawClient(server.port, timeout=15) as c:
        return c.call(*args)


def _server_blocked(server) -> bool:
    """True while the server answers nobody (a script runs, before busy-reply-threshold)."""
    with RawClient(server.port) as probe:
        probe.send(E("PING"))
        return probe.nothing_pending(0.2)


def _running(server) -> bool:
    return direct(server, "GET", "x").startswith(b"-BUSY")


def _ended(server) -> bool:
    """Kill whatever script or function still runs; True once nothing does."""
    got = direct(server, "SCRIPT", "KILL")
    if got.startswith(b"-BUSY"):  # a function
        got = direct(server, "FUNCTION", "KILL")
    return got.startswith(b"-NOTBUSY")


@pytest.fixture
def threshold(server):
    """Set the server's busy-reply-threshold (ms) for one test; afterwards no script runs."""
    d = server.client(protocol=2)
    old = d.config_get("busy-reply-threshold")["busy-reply-threshold"]
    yield lambda ms: d.config_set("busy-reply-threshold", ms)
    wait_for(lambda: _ended(server), what="no script left running")  # a failed test must not leave one
    d.config_set("busy-reply-threshold", old)
    d.close()


def test_ping_and_echo_answer_what_the_server_answers(server, proxy, threshold):
    """A health check through vproxy sees the busy server, and a client waiting for -BUSY before it
    sends SCRIPT KILL sees it; even PING's arity error is the server's (-BUSY while it is busy)."""
    threshold(100)
    with RawClient(proxy.port, timeout=15) as runner, RawClient(proxy.port) as c:
        assert c.call("PING") == b"+PONG\r\n"
        assert c.call("ECHO", "hi") == b"$2\r\nhi\r\n"
        runner.send(E("EVAL", LOOP, "0"))
        wait_for(lambda: _running(server), what="the script to be running")
        for args in (("PING",), ("PING", "hi"), ("ECHO", "hi")):
            got = c.call(*args)
            assert got.startswith(b"-BUSY ") and got == direct(server, *args), (args, got)
        assert c.call("PING", "a", "b") == direct(server, "PING", "a", "b")  # the server's answer, busy or not
        assert c.call("SCRIPT", "KILL") == b"+OK\r\n"
        assert b"Script killed by user" in runner.read()
        assert c.call("PING") == b"+PONG\r\n"


def test_script_kill_reaches_a_busy_script(server, start_proxy, threshold):
    """SCRIPT KILL runs on a connection of its own: the one the script runs on is busy by definition.

    A fresh proxy: the kill's connection (and the other client's shared one) are opened while the
    server is busy, so their handshake must survive -BUSY (Redis 7 refuses CLIENT SETNAME then)."""
    threshold(100)
    proxy = start_proxy("--backend", server.addr)
    with RawClient(proxy.port, timeout=15) as runner, RawClient(proxy.port) as other:
        runner.send(E("EVAL", LOOP, "0"))
        # the server's own answer reaches clients, not a proxy error about the backend
        wait_for(lambda: other.call("GET", "x").startswith(b"-BUSY"), what="the script to be running")
        assert other.call("SCRIPT", "KILL") == b"+OK\r\n"
        assert runner.read().startswith(b"-ERR Script killed by user with SCRIPT KILL")
        assert runner.call("PING") == b"+PONG\r\n"
        assert other.call("GET", "x") == b"$-1\r\n"


def test_script_kill_before_busy_threshold(server, start_proxy, threshold):
    """Before the threshold the server answers nobody; a direct SCRIPT KILL gets +OK when it gets
    there. Through vproxy too, although that is later than connect_timeout (the kill's connection
    used to run a handshake that timed out, and the backend was marked down)."""
    threshold(1000)
    p = start_proxy("--backend", server.addr, "--connect-timeout", "0.3")
    with RawClient(p.port, timeout=15) as runner, RawClient(p.port, timeout=15) as other:
        runner.send(E("EVAL", LOOP, "0"))
        wait_for(lambda: _server_blocked(server), what="the script to block the server")
        assert other.call("SCRIPT", "KILL") == b"+OK\r\n"
        assert b"Script killed by user" in runner.read()


@pytest.mark.parametrize("kind", BACKENDS)
def test_kills_answer_what_the_server_answers(kind, start_server, start_proxy):
    """NOTBUSY with nothing running; for a function, SCRIPT KILL gets the server's BUSY ("use
    FUNCTION KILL") and FUNCTION KILL kills it, both sent before the threshold; a script that
    wrote is UNKILLABLE. A server of its own: only SHUTDOWN NOSAVE ends that last script."""
    s = start_server(kind)
    d = s.client(protocol=2)
    d.config_set("busy-reply-threshold", 1000)
    d.function_load(LIB)
    p = start_proxy("--backend", s.addr, "--connect-timeout", "0.3")
    with RawClient(p.port, timeout=15) as runner, RawClient(p.port, timeout=15) as c:
        for kill in (("SCRIPT", "KILL"), ("FUNCTION", "KILL")):
            assert c.call(*kill) == direct(s, *kill) == b"-NOTBUSY No scripts in execution right now.\r\n"
        runner.send(E("FCALL", "spin", "0"))
        wait_for(lambda: _server_blocked(s), what="the function to block the server")
        wrong = c.call("SCRIPT", "KILL")  # answered at the threshold
        assert wrong.startswith(b"-BUSY ") and b"FUNCTION KILL" in wrong, wrong
        assert c.call("FUNCTION", "KILL") == b"+OK\r\n"
        assert b"killed by user" in runner.read()
        d.config_set("busy-reply-threshold", 100)
        runner.send(E("EVAL", "redis.call('SET', 'w', '1') " + LOOP, "0"))
        wait_for(lambda: _running(s), what="the writing script to be running")
        refused = c.call("SCRIPT", "KILL")
        assert refused.startswith(b"-UNKILLABLE ") and refused == direct(s, "SCRIPT", "KILL")
        with RawClient(s.port) as last:
            last.send(E("SHUTDOWN", "NOSAVE"))
            assert last.closed_by_peer(10)


def test_busy_script_keeps_its_connection(server, start_proxy, threshold):
    """Past command_timeout, vproxy first asks whether the server is busy: it is, so the script's
    connection (and what waits behind it there) is kept, and the caller gets the server's own
    error once the script is killed. The backend connection was never replaced."""
    threshold(100)
    server.client().set("k", "v")
    p = start_proxy("--backend", server.addr, "--command-timeout", "0.5", "--pool-size", "1")
    with RawClient(p.port, timeout=15) as runner, RawClient(p.port, timeout=15) as queued, \
            RawClient(p.port) as c:
        assert runner.call("GET", "k") == b"$1\r\nv\r\n"  # the one shared connection is open
        connects = proxy_stats(p)["backend_connects"]
        runner.send(E("EVAL", LOOP, "0"))
        wait_for(lambda: _running(server), what="the script to be running")
        queued.send(E("GET", "k"))  # behind the script, on the one shared connection
        # three command_timeouts: no "did not answer within 0.5s (command_timeout)"
        assert runner.nothing_pending(1.5) and queued.nothing_pending(0.1)
        assert c.call("SCRIPT", "KILL") == b"+OK\r\n"
        killed = runner.read()
        assert killed.startswith(b"-ERR ") and b"Script killed by user" in killed, killed
        assert queued.read() == b"$1\r\nv\r\n"
        assert runner.call("PING") == b"+PONG\r\n"
        assert proxy_stats(p)["backend_connects"] == connects
