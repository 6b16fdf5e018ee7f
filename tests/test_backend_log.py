"""Backend trouble shows in vproxy's log by default: a lost connection, one replaced after
command_timeout, failed connects (WARNING, rate-limited per backend), the backend back (INFO);
--log-level DEBUG adds every backend connection's open and close."""

from __future__ import annotations

import time

from conftest import RawClient, proxy_stats, restart_server, wait_for
from loguru import logger

from vproxy.ratelog import RateLog


def _lines(log, *words) -> list[str]:
    return [x for x in log.read_text().splitlines() if all(w in x for w in words)]


def test_backend_death_failed_connects_and_recovery_are_logged(start_server, start_proxy, tmp_path):
    s = start_server("valkey")
    log = tmp_path / "vproxy.log"
    p = start_proxy("--backend", s.addr, "--log-level", "INFO", "--retry-max-backoff", "0.05", log_path=log)
    with RawClient(p.port) as c:
        assert c.call("SET", "k", "v") == b"+OK\r\n"
        s.kill()
        began = time.monotonic()
        # the client keeps asking while the backend is down: many failed connects...
        wait_for(lambda: c.call("GET", "k").startswith(b"-ERR vproxy: backend")
                 and proxy_stats(p)["backend_connect_failures"] >= 10, what="10 failed connects")
        elapsed = time.monotonic() - began
        assert len(_lines(log, "WARNING", f"backend {s.addr}: connection lost")) == 1
        # ...and few lines about them: one, then at most one per 5 seconds
        failed = _lines(log, "WARNING", f"backend {s.addr}: cannot connect (")
        assert 1 <= len(failed) <= 1 + int(elapsed / 5)
        restart_server(s)
        wait_for(lambda: c.call("GET", "k") == b"$-1\r\n", what="the backend to be used again")
    back = wait_for(lambda: _lines(log, "INFO", f"backend {s.addr}: connected again"), what="the recovery line")
    assert "failed connect attempt(s) in between" in back[0]


def test_replaced_connection_after_command_timeout_is_logged(start_server, start_proxy, tmp_path):
    s = start_server("valkey")
    log = tmp_path / "vproxy.log"
    p = start_proxy("--backend", s.addr, "--command-timeout", "0.5", log_path=log)  # WARNING level
    with RawClient(p.port) as c:
        assert c.call("SET", "k", "v") == b"+OK\r\n"
        s.pause()
        try:
            assert b"did not answer within 0.5s" in c.call("GET", "k")
        finally:
            s.resume()
    line = (f"backend {s.addr}: no reply within 0.5s (command_timeout); connection replaced; "
            "1 request in flight got an error")
    wait_for(lambda: _lines(log, "WARNING", line), what="the timeout line")


def test_debug_level_shows_each_backend_connection(start_server, start_proxy, tmp_path):
    s = start_server("valkey")
    logs = {level: tmp_path / f"{level}.log" for level in ("INFO", "DEBUG")}
    for level, log in logs.items():
        p = start_proxy("--backend", s.addr, "--log-level", level, log_path=log)
        with RawClient(p.port) as c:
            assert c.call("SUBSCRIBE", "ch").startswith(b"*3\r\n")  # a connection of its own...
        wait_for(lambda p=p: proxy_stats(p)["backend_connections_pinned"] == 0, what="the subscriber gone")
    # ...closed when the subscriber leaves: both shown at DEBUG only
    assert _lines(logs["DEBUG"], "DEBUG", f"backend {s.addr}: connection opened")
    assert _lines(logs["DEBUG"], "DEBUG", f"backend {s.addr}: connection closed")
    assert _lines(logs["INFO"], "connection opened") == []


def test_rate_limited_lines_say_how_many_were_held_back():
    lines = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        rl = RateLog(every=0.2)
        for _ in range(5):
            rl.log("connect", "WARNING", "cannot connect")
        assert lines == ["cannot connect"]
        wait_for(lambda: rl.log("connect", "WARNING", "cannot connect") or len(lines) == 2, what="a second line")
        assert lines[1].startswith("cannot connect (and ") and "more like it since the last such line)" in lines[1]
    finally:
        logger.remove(sink)
