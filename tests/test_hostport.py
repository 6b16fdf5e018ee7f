"""hostport.py: the one parser and formatter of addresses (settings, peers, CLUSTER replies, logs)."""

import pytest

from vproxy import hostport
from vproxy.config import ConfigError, load


@pytest.mark.parametrize("text, addr", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)),
    ("redis.example:7000", ("redis.example", 7000)),
    ("[::1]:6380", ("::1", 6380)),
    ("[2001:db8::5]:1", ("2001:db8::5", 1)),
    (":6379", ("127.0.0.1", 6379)),  # the port alone: this host
    ("  10.0.0.1:65535 ", ("10.0.0.1", 65535)),
    (b"10.0.0.2:7001", ("10.0.0.2", 7001)),
])
def test_parse(text, addr):
    assert hostport.parse(text) == addr


@pytest.mark.parametrize("text", ["", "6379", "host", "host:", "host:port", "host:0", "host:65536", "host:-1",
                                  "[::1]", "host:63 79"])
def test_parse_refuses_what_is_not_an_address(text):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        hostport.parse(text)


def test_parse_node_drops_the_cluster_bus_port():
    assert hostport.parse_node(b"10.0.0.3:7002@17002") == ("10.0.0.3", 7002)
    assert hostport.parse_node("[::1]:7002@17002") == ("::1", 7002)
    assert hostport.parse_node(":7003") == ("127.0.0.1", 7003)


def test_fmt_brackets_ipv6_only():
    assert hostport.fmt(("127.0.0.1", 6379)) == "127.0.0.1:6379"
    assert hostport.fmt(("::1", 6379)) == "[::1]:6379"
    assert hostport.fmt(("fe80::1", 1, 0, 2)) == "[fe80::1]:1"  # an IPv6 socket address has 4 items


@pytest.mark.parametrize("addr", [("127.0.0.1", 6379), ("::1", 6380), ("2001:db8::5", 1), ("node-a", 7000)])
def test_fmt_and_parse_round_trip(addr):
    assert hostport.parse(hostport.fmt(addr)) == addr


def test_show_takes_absent_and_text():
    assert hostport.show(None) == ""
    assert hostport.show("") == ""
    assert hostport.show("already:1") == "already:1"
    assert hostport.show(("::1", 2)) == "[::1]:2"


def test_a_bad_address_setting_names_the_setting():
    with pytest.raises(ConfigError, match="'backend'.*expected HOST:PORT"):
        load(["--backend", "nohost"], env={})
    assert load(["--backend", "[::1]:7000"], env={}).backend == ["[::1]:7000"]
