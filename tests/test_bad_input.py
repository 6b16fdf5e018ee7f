"""Input a client should not send, or sends in odd shapes: protocol errors close only that client,
odd-but-valid framing (inline, split, huge pipelines) works, and command errors match the server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import RawClient, proxy_stats, raw_exchange, split_reply, wait_for

E = RawClient.encode
CORPUS = Path(__file__).parent / "corpus"


def both(server, proxy, data: bytes, n: int) -> tuple[list[bytes], list[bytes]]:
    return raw_exchange(server.port, data, n), raw_exchange(proxy.port, data, n)


def closes_after(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send data; return every byte the peer sent before closing (the test fails if it stays open)."""
    with RawClient(port) as c:
        c.send(data)
        assert c.closed_by_peer(timeout), f"still open after {data[:40]!r}; got {c.buf!r}"
        return c.buf


# ---- protocol errors: that client is answered and closed, nobody else notices ----


@pytest.mark.parametrize(
    "data",
    [
        b"*1\r\n+PING\r\n",  # an argument that is not a bulk string
        b"*\x8f\xff\x01garbage\r\n",  # binary noise as a multibulk count (no NUL: Redis 7 strchr()s)
        b"*1\r\n$abc\r\n",  # a bulk length that is not a number
        b"*1\r\n$-5\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$-1\r\n",  # a null bulk as an argument
        b"*99999999999\r\n",
        b'SET "unbalanced\r\n',  # inline, unbalanced quotes
    ],
    ids=["plus-arg", "binary-count", "alpha-len", "negative-len", "null-arg", "huge-count", "inline-quote"],
)
def test_protocol_error_closes_only_that_client(proxy, server, raw, data):
    bystander = raw()
    bystander.send(E("SET", "bystander", "1") + E("BLPOP", "never", "0.01"))  # busy, mid-session
    direct = closes_after(server.port, data)
    via = closes_after(proxy.port, data)
    assert via == direct
    assert via.startswith(b"-ERR Protocol error")
    assert bystander.read_n(2)[0] == b"+OK\r\n"
    assert bystander.call("GET", "bystander") == b"$1\r\n1\r\n"


@pytest.mark.parametrize("data", [b"*2\r\n$3\r\nGET\r\n$1\r\nabc\r\n", b"*1\r\n$4\r\nPINGxx\r\n"])
def test_bulk_not_followed_by_crlf_is_a_protocol_error(proxy, raw, data):
    """Valkey closes with 'invalid CRLF in request' (Redis 7.0 silently skips two bytes): vproxy closes."""
    via = closes_after(proxy.port, data)
    assert via.startswith(b"-ERR Protocol error")
    assert raw().call("PING") == b"+PONG\r\n"


def test_requests_before_a_protocol_error_still_run(proxy, server):
    data = E("SET", "before-error", "yes") + b"PING\r\n" + b"*1\r\nZ\r\n" + E("SET", "after-error", "yes")
    server.client().delete("before-error", "after-error")
    direct = closes_after(server.port, data)
    server.client().delete("before-error", "after-error")
    via = closes_after(proxy.port, data)
    assert via == direct == b"+OK\r\n+PONG\r\n-ERR Protocol error: expected '$', got 'Z'\r\n"
    assert server.client().get("before-error") == b"yes"
    assert server.client().get("after-error") is None


def test_huge_bulk_header_is_refused_at_once(proxy, server):
    """*1 $600000000: more than proto-max-bulk-len (512MB). The error comes before any payload."""
    t0 = time.monotonic()
    via = closes_after(proxy.port, b"*1\r\n$600000000\r\n", timeout=5)
    assert time.monotonic() - t0 < 3
    assert via == b"-ERR Protocol error: invalid bulk length\r\n"
    assert closes_after(server.port, b"*1\r\n$600000000\r\n") == via


def test_unterminated_bulk_then_close(proxy, server, raw):
    before = proxy_stats(proxy)["connected_clients"]
    c = raw()
    c.send(b"*3\r\n$3\r\nSET\r\n$9\r\nhalf-sent\r\n$100\r\nonly-some-of-the-value")
    assert c.nothing_pending(0.2)  # the proxy waits for the rest, like the server
    assert proxy_stats(proxy)["connected_clients"] == before + 1
    c.close()
    wait_for(lambda: proxy_stats(proxy)["connected_clients"] == before, what="the closed client to be gone")
    assert server.client().exists("half-sent") == 0
    assert raw().call("PING") == b"+PONG\r\n"


# ---- odd but valid framing ----


def test_inline_commands(proxy, server, raw):
    c = raw()
    c.send(b"PING\r\n")
    assert c.read() == b"+PONG\r\n"
    c.send(b'SET a "b c"\r\n')
    assert c.read() == b"+OK\r\n"
    assert c.call("GET", "a") == b"$3\r\nb c\r\n"
    c.send(b"GET a\n")  # LF alone ends an inline command too
    assert c.read() == b"$3\r\nb c\r\n"
    c.send(b"\r\n\r\n   \r\nPING\r\n")  # empty lines are skipped
    assert c.read() == b"+PONG\r\n"
    assert c.nothing_pending(0.1)


@pytest.mark.parametrize(
    "line",
    [
        b'ECHO "a b"',
        b"ECHO 'a b'",
        b'ECHO "tab\\there"',
        b'ECHO "nl\\nx"',
        b"ECHO 'no\\nescape'",
        b'ECHO "\\x41\\x42"',
        b'ECHO "\\x4"',
        b'ECHO "bell\\a\\b"',
        b"ECHO 'it\\'s'",
        b'ECHO "q\\"q"',
        b'ECHO ""',
        b"SET   spaced    out  ",
        b"MGET x 'y z'",
    ],
)
def test_inline_quoting_matches_server(proxy, server, line):
    direct, via = both(server, proxy, line + b"\r\n", 1)
    assert via == direct


def test_request_split_byte_by_byte(proxy, server, raw):
    data = (
        E("SET", "split", "v" * 50)
        + b"PING\r\n"
        + E("APPEND", "split", "!")
        + b'ECHO "x y"\r\n'
        + E("GET", "split")
        + E("HELLO", "3")
        + E("GET", "missing")
        + E("HELLO", "2")
    )
    want = raw_exchange(server.port, data, 8)
    c = raw()
    for b in data:
        c.send(bytes([b]))
    got = c.read_n(8)
    assert got[:5] == want[:5] and got[6] == want[6] == b"_\r\n"  # [5], [7]: HELLO, vproxy's own id
    assert got[5].startswith(b"%7\r\n") and b"proto\r\n:3\r\n" in got[5]
    assert got[7].startswith(b"*14\r\n") and b"proto\r\n:2\r\n" in got[7]
    assert want[4] == b"$51\r\n" + b"v" * 50 + b"!\r\n"


def _pipeline(port: int, data: bytes, n: int) -> list[bytes]:
    """Write everything from one thread while reading from another (no deadlock on full buffers)."""
    with RawClient(port, timeout=60) as c:
        t = threading.Thread(target=c.send, args=(data,))
        t.start()
        replies = c.read_n(n)
        t.join(60)
        return replies


def test_pipeline_of_10000_commands_in_one_write(proxy, server):
    server.client().flushall()
    n = 10_000
    data = b"".join(E("INCR", "p10k") if i % 2 else E("SET", f"p:{i}", i) for i in range(n))
    t0 = time.monotonic()
    replies = _pipeline(proxy.port, data, n)
    assert time.monotonic() - t0 < 30
    assert replies[0::2] == [b"+OK\r\n"] * (n // 2)
    assert replies[1::2] == [b":%d\r\n" % (i + 1) for i in range(n // 2)]  # in order, none lost
    assert server.client().get("p10k") == b"5000"


def test_redis_py_pipeline_of_10000(proxy, server):
    server.client().flushall()
    for protocol in (2, 3):
        p = proxy.client(protocol=protocol).pipeline(transaction=False)
        for i in range(5000):
            p.set(f"rp:{i}", i)
            p.get(f"rp:{i}")
        out = p.execute()
        assert out[1::2] == [str(i).encode() for i in range(5000)]


def test_big_values_round_trip(proxy, server, raw):
    c = raw()
    big = bytes(range(256)) * (20 * 1024 * 1024 // 256)  # 20 MB, every byte value
    assert c.call("SET", "big", big) == b"+OK\r\n"
    assert c.call("GET", "big") == b"$%d\r\n" % len(big) + big + b"\r\n"
    assert c.call("STRLEN", "big") == b":%d\r\n" % len(big)


def test_empty_and_null_multibulk_are_ignored(proxy, server):
    direct, via = both(server, proxy, b"*0\r\n*-1\r\n" + E("PING"), 1)
    assert via == direct == [b"+PONG\r\n"]


# ---- command errors: answered like the server, the connection stays ----


@pytest.mark.parametrize(
    "args",
    [
        ("NOSUCHCOMMAND", "x", "y"),
        ("nosuch",),
        ("GET",),
        ("GET", "a", "b"),
        ("SET", "k"),
        ("MGET",),
        ("HSET", "h", "f"),
        ("INCR", "k", "extra"),
        ("SELECT",),
        ("ECHO",),
        ("PING", "a", "b"),
        ("CLIENT", "NOSUCHSUB"),
        ("CONFIG", "NOSUCH"),
        ("OBJECT", "NOSUCH", "k"),
    ],
)
def test_command_errors_match_server(proxy, server, args):
    data = E(*args) + E("PING")
    direct, via = both(server, proxy, data, 2)
    assert via == direct
    assert via[0].startswith(b"-") and via[1] == b"+PONG\r\n"


def test_wrong_type(proxy, server, raw):
    c = raw()
    c.call("RPUSH", "wt", "x")
    assert c.call("GET", "wt").startswith(b"-WRONGTYPE")
    assert c.call("PING") == b"+PONG\r\n"


# ---- replies that are hard to frame ----

SELF_REF = "local t = {}; t[1] = t; return t"


@pytest.mark.parametrize("protocol", [2, 3])
def test_lua_self_referencing_table_matches_server(proxy, server, protocol):
    data = E("HELLO", protocol) + E("EVAL", SELF_REF, "0") + E("PING")
    direct, via = both(server, proxy, data, 3)
    assert via[1] == direct[1]
    assert split_reply(via[1]) == len(via[1])
    assert via[2] == b"+PONG\r\n"


@pytest.mark.parametrize("protocol", [2, 3])
def test_deeply_nested_and_typed_replies_match_server(proxy, server, protocol):
    """Nested arrays, maps from Lua, doubles, big numbers, verbatim text: byte for byte."""
    scripts = [
        "return {1, {2, {3, {4, {5, {'deep'}}}}}}",
        "return {err='custom error text'}",
        "return {ok='STATUS'}",
        "return {1, 2, false, 'x', {}}",
        "return redis.call('HGETALL', KEYS[1])",
    ]
    server.client().hset("nested-h", mapping={"a": "1", "b": "2"})
    server.client().zadd("zz", {"m": 1.5, "n": 2.25})
    for s in scripts:
        data = E("HELLO", protocol) + E("EVAL", s, "1", "nested-h")
        direct, via = both(server, proxy, data, 2)
        assert via[1] == direct[1], s
    for cmd in (
        ("ZSCORE", "zz", "m"),
        ("ZRANGE", "zz", "0", "-1", "WITHSCORES"),
        ("HGETALL", "nested-h"),
        ("SMEMBERS", "nope"),
        ("CLIENT", "TRACKINGINFO"),
        ("LPOS", "nolist", "x"),
        ("CONFIG", "GET", "maxmemory*"),
    ):
        data = E("HELLO", protocol) + E(*cmd)
        direct, via = both(server, proxy, data, 2)
        assert via[1] == direct[1], cmd


@pytest.mark.parametrize("protocol", [2, 3])
def test_resp_corpus(proxy, server, protocol):
    """tests/corpus/*.resp: raw request streams; the proxy must answer each exactly like the server.

    Each stream runs in RESP2 and after HELLO 3 (whose own reply differs: vproxy answers it)."""
    files = sorted(CORPUS.glob("*.resp"))
    assert files, "the corpus is empty"
    hello = E("HELLO", "3") if protocol == 3 else b""
    for f in files:
        data = hello + f.read_bytes()
        n = int(f.with_suffix(".n").read_text()) + (protocol == 3)
        server.client().flushall()
        direct = raw_exchange(server.port, data, n)
        server.client().flushall()
        via = raw_exchange(proxy.port, data, n)
        skip = 1 if protocol == 3 else 0
        for i, (a, b) in enumerate(zip(via[skip:], direct[skip:])):
            assert a == b, f"{f.name} reply {i}: proxy {a[:200]!r} server {b[:200]!r}"
