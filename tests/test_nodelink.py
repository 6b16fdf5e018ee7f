"""sentinel/node.NodeLink, the monitors' one control connection (cluster, sentinel and replication
modes alike), against a real valkey-server: replies in order, error replies raised or returned, AUTH
with the credentials the settings hold at connect time, and a new connection after a lost one."""

from __future__ import annotations

from types import SimpleNamespace

import hiredis
import pytest
from conftest import wait_for

from vproxy.sentinel.node import NodeError, NodeLink


def _cfg(**kw):
    base = dict(backend_tls=False, backend_username="", backend_password="", sentinel_username="",
                sentinel_password="")
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def node(start_server):
    """A server of the test's own (tests set requirepass on it)."""
    return start_server()


def test_call_query_and_pipeline(node):
    link = NodeLink(("127.0.0.1", node.port), 10, _cfg())
    try:
        assert link.call("SET", "k", "v") == b"OK"
        assert link.pipeline([("INCR", "n"), ("INCR", "n"), ("GET", "k")]) == [1, 2, b"v"]
        err = link.query("NOSUCHCOMMAND")
        assert isinstance(err, hiredis.ReplyError) and "unknown command" in str(err)
        with pytest.raises(NodeError, match=rf"127\.0\.0\.1:{node.port}: .*unknown command"):
            link.call("NOSUCHCOMMAND")
        assert link.call("GET", "k") == b"v"  # an error reply does not cost the connection
    finally:
        link.close()


def test_reconnects_on_demand_after_the_connection_is_lost(node):
    link = NodeLink(("127.0.0.1", node.port), 10, _cfg())
    try:
        link.call("CLIENT", "SETNAME", "ctl")
        victims = [c["addr"] for c in node.client().client_list() if c["name"] == "ctl"]
        node.client().execute_command("CLIENT", "KILL", victims[0])
        with pytest.raises(NodeError, match=f"127.0.0.1:{node.port}"):
            link.call("PING")
        assert link.sock is None  # a failed call closes the link ...
        assert link.call("PING") == b"PONG"  # ... and the next one connects again
    finally:
        link.close()


def test_auth_uses_the_credentials_the_settings_hold_at_connect(node):
    node.client().config_set("requirepass", "first")
    cfg = _cfg(sentinel_password="first")  # who="sentinel": the sentinel_* settings
    link = NodeLink(("127.0.0.1", node.port), 10, cfg, "sentinel")
    try:
        assert link.call("PING") == b"PONG"
        node.client(password="first").config_set("requirepass", "second")
        cfg.sentinel_password = "second"  # what a reload does to the settings
        assert link.call("PING") == b"PONG"  # the open connection stays authenticated
        link.close()
        assert link.call("PING") == b"PONG"  # a new connection authenticates with the new password
        cfg.sentinel_password = "wrong"
        link.close()
        with pytest.raises(NodeError, match="AUTH failed"):
            link.call("PING")
    finally:
        link.close()
        node.client(password="second").config_set("requirepass", "")


def test_without_settings_no_auth(node):
    node.client().config_set("requirepass", "pw")
    link = NodeLink(("127.0.0.1", node.port), 10)
    try:
        with pytest.raises(NodeError, match="NOAUTH"):
            link.call("GET", "k")
    finally:
        link.close()
        node.client(password="pw").config_set("requirepass", "")


def test_pushes_after_subscribe(node):
    link = NodeLink(("127.0.0.1", node.port), 10, _cfg())
    try:
        link.send("SUBSCRIBE", "events")
        assert link.read_push(10) == [b"subscribe", b"events", 1]
        wait_for(lambda: node.client().publish("events", "hello") == 1, what="the subscriber to count")
        assert link.read_push(10) == [b"message", b"events", b"hello"]
    finally:
        link.close()


def test_unreachable_node_is_a_node_error(start_server):
    s = start_server()
    port = s.port
    s.stop()
    link = NodeLink(("127.0.0.1", port), 10, _cfg())
    with pytest.raises(NodeError, match=f"127.0.0.1:{port}"):
        link.call("PING")
