"""Reload: SIGHUP and PROXY RELOAD read the config file again; live settings change, the rest are
reported as needing a restart, a bad file changes nothing."""

from __future__ import annotations

import signal

import pytest
import redis
from conftest import Proxy, Server, wait_for


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def config(path, **values) -> None:
    lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
             for k, v in values.items()]
    path.write_text("\n".join(lines).replace("'", '"') + "\n")


def setting(c, name: str) -> str:
    reply = c.execute_command("PROXY", "CONFIG", "GET", name)
    return (dict(zip(reply[::2], reply[1::2])) if isinstance(reply, list) else reply)[name.encode()].decode()


def test_sighup_changes_live_settings_and_reports_the_rest(server, tmp_path):
    conf, log = tmp_path / "vproxy.toml", tmp_path / "vproxy.log"
    config(conf, backend=[server.addr], command_timeout=5.0, slowlog_log_slower_than=10000, max_clients=50)
    p = Proxy("-c", str(conf), "--max-clients", "100", "--log-level", "INFO", log_path=log)
    try:
        c = p.client()
        assert setting(c, "command_timeout") == "5.0"
        config(conf, backend=[server.addr], command_timeout=2.5, slowlog_log_slower_than=0, max_clients=7,
               admin_listen="127.0.0.1:1", pool_size=3)
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: setting(c, "command_timeout") == "2.5", what="the new command_timeout")
        assert setting(c, "pool_size") == "3"
        assert setting(c, "max_clients") == "100"  # the command line still wins over the file
        c.execute_command("PROXY", "SLOWLOG", "RESET")
        c.get("now-everything-is-slow")
        assert any(e[3][:1] == [b"GET"] for e in c.execute_command("PROXY", "SLOWLOG", "GET"))
        text = wait_for(lambda: (lambda t: t if "needs a restart to change: admin_listen" in t else None)(
            log.read_text()),
                        what="the reload's log line")
        assert "command_timeout 5.0 -> 2.5" in text
        conf.write_text("command_timeout = = 1\n")  # a broken file: nothing changes
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "nothing changed" in log.read_text(), what="the refused reload")
        assert setting(c, "command_timeout") == "2.5"
    finally:
        p.stop()


class FileAuthProxy(Proxy):
    ready_reply = b"-NOAUTH"  # the password comes from the file: up when it refuses the unauthenticated


def test_proxy_reload_and_password_rotation(server, tmp_path):
    conf = tmp_path / "vproxy.toml"
    config(conf, backend=[server.addr], password="first")
    p = FileAuthProxy("-c", str(conf), wait_learned=False)
    try:
        old = p.client(password="first")
        assert old.ping()
        config(conf, backend=[server.addr], command_timeout=3.0, password="second")
        out = old.execute_command("PROXY", "RELOAD")
        out = dict(zip(out[::2], out[1::2])) if isinstance(out, list) else out
        assert sorted(out[b"changed"]) == [b"command_timeout 5.0 -> 3.0", b"password (changed)"]
        assert out[b"restart"] == []
        assert old.ping()  # an authenticated connection stays so
        with pytest.raises(redis.AuthenticationError):
            p.client(password="first").ping()
        assert p.client(password="second").ping()
        conf.write_text("pool_size = 0\n")  # loads, but a bad value: refused whole
        out = old.execute_command("PROXY", "RELOAD")
        out = dict(zip(out[::2], out[1::2])) if isinstance(out, list) else out
        assert b"pool_size" in out[b"error"]
    finally:
        p.stop()
