"""Input a client should not send, or sends in odd shapes: protocol errors close only that client,
odd-but-valid framing (inline, split, huge pipelines) works, and command errors match the server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import PasswordProxy, RawClient, Server, proxy_stats, raw_exchange, split_reply, wait_for

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


# ---- numbers read exactly as the server reads them (string2ll), nothing malformed forwarded ----

ECHO_HI = b"$4\r\nECHO\r\n$2\r\nhi\r\n"
# Each is a whole request for Python's int() (which vproxy once used) and a protocol error for the
# server. Forwarded, it would make the server close the SHARED backend connection.
BAD_NUMBERS = {
    "count-leading-zero": b"*02\r\n" + ECHO_HI,
    "count-plus": b"*+2\r\n" + ECHO_HI,
    "count-space-before": b"* 2\r\n" + ECHO_HI,
    "count-space-after": b"*2 \r\n" + ECHO_HI,
    "count-underscore": b"*1_0\r\n" + b"$4\r\nECHO\r\n" * 10,
    "count-minus-zero": b"*-0\r\n" + E("ECHO", "hi"),
    "len-leading-zero": b"*2\r\n$4\r\nECHO\r\n$02\r\nhi\r\n",
    "len-plus": b"*2\r\n$4\r\nECHO\r\n$+2\r\nhi\r\n",
    "len-space-before": b"*2\r\n$4\r\nECHO\r\n$ 2\r\nhi\r\n",
    "len-space-after": b"*2\r\n$4\r\nECHO\r\n$2 \r\nhi\r\n",
    "len-underscore": b"*2\r\n$4\r\nECHO\r\n$1_0\r\n0123456789\r\n",
    "len-minus-zero": b"*2\r\n$4\r\nECHO\r\n$-0\r\n\r\n",
}
# Keeps the server busy for a while, so that what comes behind it on the shared connection is in
# flight together with it. (Valkey 9 scripts see one frozen TIME, so Valkey's os.clock() is used;
# Redis 7 has no `os` in scripts but a live TIME.)
BUSY = ("local ok, clock = pcall(function() return os.clock end) "
        "local function now() if ok then return clock() end "
        "local t = redis.call('TIME') return t[1] + t[2] / 1e6 end "
        "local t0 = now() repeat until now() - t0 > 0.3 return 'busy'")


def _commands_done(stats_conn: RawClient) -> int:
    """The proxy's total_commands_processed, read on one raw connection (each read adds exactly 1)."""
    info = stats_conn.call("INFO", "proxy").decode()
    return int(info.split("total_commands_processed:")[1].split("\r\n")[0])


@pytest.mark.parametrize("bad", list(BAD_NUMBERS.values()), ids=list(BAD_NUMBERS))
def test_malformed_number_closes_only_that_client(proxy, server, raw, bad):
    """The offender gets the server's protocol error and is closed; the request before it still
    runs; a bystander whose requests sit on the same shared backend connection is not disturbed."""
    data = E("EVAL", BUSY, "0") + bad
    direct = closes_after(server.port, data)
    assert direct == b"$4\r\nbusy\r\n-ERR Protocol error: " + direct.split(b"Protocol error: ")[1]
    offender, bystander, stats = raw(), raw(), raw()
    assert bystander.call("SET", "by", "0") == b"+OK\r\n"  # the shared (db 0, RESP2) channel exists
    offender.send(data)
    done = _commands_done(stats)
    # the EVAL (and, were the bad request forwarded, that too) is queued on the shared channel
    wait_for(lambda: _commands_done(stats) - done - 1 >= 1 or offender.closed_by_peer(0.01), what="the EVAL")
    bystander.send(E("INCR", "by") + E("GET", "by") + E("ECHO", "after"))  # behind it, while it runs
    assert bystander.read_n(3) == [b":1\r\n", b"$1\r\n1\r\n", b"$5\r\nafter\r\n"]
    assert offender.closed_by_peer(5)
    assert offender.buf == direct
    assert bystander.call("GET", "by") == b"$1\r\n1\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"*1\r\n$4\r\x02INFOO\n",  # a header's CR not followed by LF
        b"*1\rx$4\r\nPING\r\n",
        b"*abc\rx",  # the CRLF is checked before the number
        b"*1\r\n$x\rx",
    ],
    ids=["bulk-header", "count-header", "count-before-number", "len-before-number"],
)
def test_header_without_crlf_is_answered_like_valkey(proxy, server, raw, data):
    """Valkey 9 answers 'invalid CRLF in request' and closes; Redis 7 skips the byte after the CR
    (and so runs INFO for the first one). vproxy answers as Valkey does: what either server would
    refuse must never reach a shared backend connection."""
    want = b"-ERR Protocol error: invalid CRLF in request\r\n"
    if server.kind == "valkey":
        assert closes_after(server.port, data) == want
    assert closes_after(proxy.port, data) == want
    assert raw().call("PING") == b"+PONG\r\n"


def test_nul_in_an_inline_request_waits_like_the_server(proxy, server, raw):
    """The server finds the end of an inline request with strchr(), which stops at a NUL: a NUL
    before the LF leaves the line unfinished until the 64KB inline limit, then a protocol error."""
    data = b"PING\x00x\r\n" + E("PING") + b"x" * (64 * 1024)
    direct = closes_after(server.port, data)
    assert direct == b"-ERR Protocol error: too big inline request\r\n"
    assert closes_after(proxy.port, data) == direct
    c = raw()
    c.send(b"PING\x00x\r\n")
    assert c.nothing_pending(0.2)  # no PONG: the line has not ended for the server either


def test_expected_dollar_names_the_byte_as_is(proxy, server):
    """'expected '$', got '%c'': the raw byte, not its UTF-8 spelling (Redis 7 waits on a NUL)."""
    for byte in (b"\x8f", b"\x00"):
        data = b"*1\r\n" + byte + b"\r\n"
        want = b"-ERR Protocol error: expected '$', got '" + byte + b"'\r\n"
        if server.kind == "valkey" or byte != b"\x00":
            assert closes_after(server.port, data) == want
        assert closes_after(proxy.port, data) == want


def test_expected_dollar_waits_for_the_whole_line(proxy, server, raw):
    """The server looks at the byte after `*N` only once the line's CR and one more byte are in."""
    c = raw()
    c.send(b"*1\r\nx")
    assert c.nothing_pending(0.2)
    c.send(b"\r\n")
    assert c.closed_by_peer(5)
    assert c.buf == b"-ERR Protocol error: expected '$', got 'x'\r\n"


def test_count_limit_is_int_max(proxy, server, raw):
    """Up to INT_MAX arguments is a valid header for the server (it waits for them); past it, or
    past a long long, the count or length is invalid."""
    c = raw()
    c.send(b"*2000000000\r\n$4\r\nPING\r\n")
    assert c.nothing_pending(0.2)
    for data in (b"*2147483648\r\n", b"*9223372036854775808\r\n", b"*1\r\n$99999999999999999999\r\n"):
        direct = closes_after(server.port, data)
        assert direct.startswith(b"-ERR Protocol error: invalid")
        assert closes_after(proxy.port, data) == direct
    assert raw().call("PING") == b"+PONG\r\n"


# ---- before AUTH, headers are capped as the server caps them ----


class LockedServer(Server):
    """A server started with a password (its readiness probe authenticates)."""

    def client(self, **kw):
        kw.setdefault("password", "pw")
        return super().client(**kw)


@pytest.fixture(scope="module")
def locked(server):
    """A server with a password, and a proxy with the same password in front of the open server."""
    s = LockedServer(server.kind, None, "--requirepass", "pw")
    p = PasswordProxy("pw", "--backend", server.addr)
    yield s, p
    p.stop()
    s.stop()


@pytest.mark.parametrize(
    "data",
    [b"*11\r\n", b"*1\r\n$16385\r\n", E("PING") + b"*11\r\n"],
    ids=["count", "len", "after-a-request"],
)
def test_unauthenticated_caps(locked, data):
    """(Not covered, a known difference: a failing AUTH and a big header in the SAME write. vproxy
    reads the whole write before AUTH runs, so it lifts the caps for the rest of it, and the big
    request gets NOAUTH where the server closes with a protocol error. Nothing is forwarded.)"""
    s, p = locked
    direct = closes_after(s.port, data)
    assert b"Protocol error: unauthenticated" in direct
    assert closes_after(p.port, data) == direct


def test_caps_until_auth(locked):
    """AUTH lifts the caps, even for the requests right behind it in the same write; a failed AUTH
    leaves them; the limits are the server's (10 arguments, 16384 bytes), not lower."""
    s, p = locked
    data = E("AUTH", "pw") + E("DEL", *[f"k{i}" for i in range(11)]) + E("ECHO", "x" * 16385)
    direct = raw_exchange(s.port, data, 3)
    assert direct == [b"+OK\r\n", b":0\r\n", b"$16385\r\n" + b"x" * 16385 + b"\r\n"]
    assert raw_exchange(p.port, data, 3) == direct
    for port in (s.port, p.port):
        with RawClient(port) as c:
            c.send(b"*10\r\n$16384\r\n")
            assert c.nothing_pending(0.1)
        with RawClient(port) as c:
            assert c.call("AUTH", "bad").startswith(b"-WRONGPASS")
            c.send(b"*1\r\n$16385\r\n")
            assert c.closed_by_peer(5)
            assert c.buf == b"-ERR Protocol error: unauthenticated bulk length\r\n"


def test_requests_before_a_protocol_error_still_run(proxy, server):
    data = E("SET", "before-error", "yes") + b"PING\r\n" + b"*1\r\nZ\r\n" + E("SET", "after-error", "yes")
    server.client().delete("before-error", "after-error")
    direct = closes_after(server.port, data)
    server.client().delete("before-error", "after-error")
    via = closes_after(proxy.port, data)
    assert via == direct == b"+OK\r\n+PONG\r\n-ERR Protocol error: expected '$', got 'Z'\r\n"
    assert server.client().get("before-error") == b"yes"
    assert server.client().get("after-error") is None


@pytest.mark.parametrize("data", [E("SUBSCRIBE", "c"), E("PSUBSCRIBE", "c*"), E("SSUBSCRIBE", "c"), E("MONITOR"),
                                  E("CLIENT", "TRACKING", "ON")],
                         ids=["subscribe", "psubscribe", "ssubscribe", "monitor", "tracking"])
def test_a_stream_reply_before_a_protocol_error_is_written(proxy, server, data):
    """A request that starts a stream (its reply pushed from a pinned connection) and malformed bytes
    in the same write: the stream's first reply (SUBSCRIBE's confirmation, MONITOR's +OK) comes
    before the protocol error, as from the server, not lost when the connection ends."""
    bad = b"*1\r\n$x\r\n"
    direct = closes_after(server.port, data + bad)
    via = closes_after(proxy.port, data + bad)
    assert via == direct
    assert via.endswith(b"-ERR Protocol error: invalid bulk length\r\n") and not via.startswith(b"-")


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


@pytest.mark.parametrize("args, want", [
    (("PROXY", "NOSUCH"), b"-ERR vproxy: unknown subcommand 'NOSUCH'. Try PROXY HELP.\r\n"),
    (("PROXY", "RELAOD"), b"-ERR vproxy: unknown subcommand 'RELAOD'. Try PROXY HELP.\r\n"),
    (("PROXY", "RELOAD", "now"), b"-ERR vproxy: wrong arguments for 'PROXY RELOAD'. Try PROXY HELP.\r\n"),
    (("PROXY", "CONFIG", "SET", "max_clients", "1"), b"-ERR vproxy: wrong arguments for 'PROXY CONFIG'. Try PROXY HELP.\r\n"),
    (("PROXY", "HOTKEYS", "1", "2"), b"-ERR vproxy: wrong arguments for 'PROXY HOTKEYS'. Try PROXY HELP.\r\n"),
    (("PROXY", "HELP", "x"), b"-ERR vproxy: wrong arguments for 'PROXY HELP'. Try PROXY HELP.\r\n"),
])
def test_proxy_subcommand_typos_are_errors(proxy, raw, args, want):
    """An unknown PROXY subcommand, or a known one in a form vproxy does not take, is an error (as the
    server answers an unknown subcommand), not the help list, which a script would take for success."""
    c = raw()
    assert c.call(*args) == want
    assert c.call("PROXY").startswith(b"*") and c.call("PROXY", "HELP") == c.call("PROXY")
