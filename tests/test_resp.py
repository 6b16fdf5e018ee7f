"""Unit tests of vproxy.resp, no server: numbers read as the server's string2ll() reads them, the
request parser's answers to good and bad bytes (however the bytes are split), the reply framer."""

from __future__ import annotations

import pytest

from vproxy import resp
from vproxy.errors import ProtocolError

PARSERS = [pytest.param(resp.RequestParser, id="pure")]
FRAMERS = [pytest.param(resp.ReplyFramer, id="pure")]


def E(*args) -> bytes:
    return resp.encode_request([a if isinstance(a, bytes) else str(a).encode() for a in args])


def parse(cls, data: bytes, chunks=None, **attrs):
    """Feed data (in the given chunk sizes, else whole): (requests, error message or None, parser)."""
    p = cls()
    for k, v in attrs.items():
        setattr(p, k, v)
    got, pos = [], 0
    sizes = chunks or [len(data)]
    try:
        for n in sizes:
            got += p.feed(data[pos:pos + n])
            pos += n
        if pos < len(data):
            got += p.feed(data[pos:])
    except ProtocolError as e:
        return got + e.requests, str(e), p
    return got, None, p


# ---- string2ll / string2ull ----

@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"7", 7), (b"-7", -7), (b"10", 10), (b"9223372036854775807", 2**63 - 1),
    (b"-9223372036854775808", -(2**63)),
])
def test_string2ll_accepts(text, value):
    assert resp.string2ll(text) == value


@pytest.mark.parametrize("text", [
    b"", b"-", b"+1", b" 1", b"1 ", b"1_0", b"-0", b"01", b"00", b"-01", b"0x1", b"1.0", b"1e3",
    b"9223372036854775808", b"-9223372036854775809", b"99999999999999999999", "١".encode(), b"\x001",
])
def test_string2ll_refuses(text):
    assert resp.string2ll(text) is None


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"-0", 0), (b"+5", 5), (b" 5", 5), (b"\t5", 5), (b"007", 7), (b"-01", 2**64 - 1),
    (b"18446744073709551615", 2**64 - 1), (b"-18446744073709551615", 1),
    (b"-1", None), (b"5 ", None), (b"", None), (b"-", None), (b"1_0", None), (b"18446744073709551616", None),
])
def test_string2ull_reads_like_valkey(text, value):
    assert resp.string2ull(text) == value


# ---- requests: what is accepted ----

GOOD = [
    (E("PING"), [[b"PING"]]),
    (E("SET", "k", "v" * 100), [[b"SET", b"k", b"v" * 100]]),
    (E("ECHO", b"a\r\nb\x00c"), [[b"ECHO", b"a\r\nb\x00c"]]),  # payloads are binary-safe
    (b"*1\r\n$0\r\n\r\n", [[b""]]),
    (b"*0\r\n*-1\r\n*-9223372036854775808\r\n" + E("PING"), [[b"PING"]]),  # empty and negative: skipped
    (b"PING\r\n", [[b"PING"]]),
    (b"PING\n", [[b"PING"]]),
    (b"\r\n\n  \r\nPING\r\r\n", [[b"PING"]]),
    (b"\rPING\r\n", [[b"PING"]]),
    (b'SET a "b c"\r\n', [[b"SET", b"a", b"b c"]]),
    (E("GET", "a") + b"GET b\r\n" + E("GET", "c"), [[b"GET", b"a"], [b"GET", b"b"], [b"GET", b"c"]]),
    (b"*2\r\n$4\r\nECHO\r\n$" + b"%d" % 100000 + b"\r\n" + b"x" * 100000 + b"\r\n", [[b"ECHO", b"x" * 100000]]),
]


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize("data, want", GOOD)
def test_good_requests(cls, data, want):
    got, err, p = parse(cls, data)
    assert err is None and [a for a, _ in got] == want
    assert not p.buf


@pytest.mark.parametrize("cls", PARSERS)
def test_raw_bytes_are_the_clients_for_multibulk_and_reencoded_for_inline(cls):
    data = E("SET", "k", "v") + b"GET  k\r\n"
    got, err, _ = parse(cls, data)
    assert err is None
    assert got == [([b"SET", b"k", b"v"], E("SET", "k", "v")), ([b"GET", b"k"], E("GET", "k"))]


# ---- requests: what is refused, with the server's words ----

BAD = [
    (b"*03\r\n", "invalid multibulk length"),
    (b"*+1\r\n", "invalid multibulk length"),
    (b"* 1\r\n", "invalid multibulk length"),
    (b"*1 \r\n", "invalid multibulk length"),
    (b"*1_0\r\n", "invalid multibulk length"),
    (b"*-0\r\n", "invalid multibulk length"),
    (b"*-01\r\n", "invalid multibulk length"),
    (b"*\r\n", "invalid multibulk length"),
    (b"*2147483648\r\n", "invalid multibulk length"),
    (b"*1\x00\r\n", "invalid multibulk length"),  # (Redis 7 waits: strchr stops at the NUL)
    (b"*1\n$4\r\nPING\r\n", "invalid multibulk length"),
    (b"*1\rx", "invalid CRLF in request"),
    (b"*abc\rx", "invalid CRLF in request"),  # the CRLF is checked before the number
    (b"*1\r\n$04\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$+4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$ 4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$4 \r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$-0\r\n\r\n", "invalid bulk length"),
    (b"*1\r\n$-1\r\n", "invalid bulk length"),
    (b"*1\r\n$\r\n", "invalid bulk length"),
    (b"*1\r\n$1_0\r\n", "invalid bulk length"),
    (b"*1\r\n$536870913\r\n", "invalid bulk length"),  # past proto-max-bulk-len
    (b"*1\r\n$99999999999999999999\r\n", "invalid bulk length"),
    (b"*1\r\n$4\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$4\r\x02INFOO\n", "invalid CRLF in request"),
    (b"*1\r\n$x\rx", "invalid CRLF in request"),
    (b"*1\r\n$4\r\nPINGxx", "invalid CRLF in request"),
    (b"*1\r\n$4\r\nPING\n\r", "invalid CRLF in request"),
    (b"*1\r\nx\r\n", "expected '$', got 'x'"),
    (b"*1\r\n\r\n", "expected '$', got '\r'"),
    (b"*1\r\n\x8f\r\n", "expected '$', got '\udc8f'"),  # the raw byte (see test_error_keeps_raw_bytes)
    (b'GET "a\r\n', "unbalanced quotes in request"),
]


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize("data, message", BAD)
def test_bad_requests(cls, data, message):
    got, err, _ = parse(cls, E("PING") + data + E("PING"))
    assert err == message
    assert [a for a, _ in got] == [[b"PING"]]  # the request before still runs, none after


def test_error_keeps_raw_bytes():
    """The server's "%c" puts the byte itself in the reply, a NUL or a non-ASCII one alike."""
    for byte in (b"\x8f", b"\x00", b"x"):
        try:
            resp.RequestParser().feed(b"*1\r\n" + byte + b"\r\n")
        except ProtocolError as e:
            assert resp.error(f"ERR Protocol error: {e}") == b"-ERR Protocol error: expected '$', got '" + byte + b"'\r\n"
        else:
            pytest.fail("no protocol error")


# ---- requests: what is incomplete (the server waits) ----

WAITS = [
    b"*1\r",  # a CR needs the byte after it before the line counts
    b"*1\r\n$4\r",
    b"*1\r\nx",  # not '$', but the server looks only once the line is whole
    b"*1\r\nx\r",
    b"*1\r\n$4\r\nPING",
    b"*1\r\n$4\r\nPING\r",
    b"*2147483647\r\n",
    b"*1\r\n$536870912\r\n",
    b"PING",
    b"PING\x00x\r\n",  # the server's strchr() stops at the NUL: no end of line yet
    b"\x00PING\r\n",
]


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize("data", WAITS)
def test_incomplete_requests_wait(cls, data):
    got, err, p = parse(cls, E("PING") + data)
    assert err is None and [a for a, _ in got] == [[b"PING"]]
    assert bytes(p.buf) == data


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize("data, message", [
    (b"*" + b"1" * 70000, "too big mbulk count string"),
    (b"*1\r\n$" + b"1" * 70000, "too big bulk count string"),
    (b"PING" + b"x" * 70000, "too big inline request"),
    (b"PING\x00\n" + b"x" * 70000, "too big inline request"),
    (b"*1\x00" + b"1" * 70000, "too big mbulk count string"),
])
def test_lines_past_64k(cls, data, message):
    assert parse(cls, data, chunks=[1000] * (len(data) // 1000 + 1))[1] == message


# ---- requests: the caps before AUTH ----

@pytest.mark.parametrize("cls", PARSERS)
def test_unauthenticated_caps(cls):
    assert parse(cls, b"*11\r\n", auth_required=True)[1] == "unauthenticated multibulk length"
    assert parse(cls, b"*1\r\n$16385\r\n", auth_required=True)[1] == "unauthenticated bulk length"
    assert parse(cls, b"*10\r\n$16384\r\n", auth_required=True)[1] is None
    assert parse(cls, b"*11\r\n$16385\r\n")[1] is None
    for auth in (E("AUTH", "pw"), E("hello", "3", "AUTH", "default", "pw"), b"auth pw\r\n"):
        got, err, _ = parse(cls, auth + E("DEL", *range(11)), auth_required=True)
        assert err is None and len(got) == 2  # the AUTH is assumed to work for what follows it


# ---- requests: any split of the bytes gives the same answer ----

STREAM = (E("SET", "k", "v" * 300) + b"PING\r\n" + b"*0\r\n" + E("ECHO", b"\r\n") + b'ECHO "x y"\n'
          + E(*[b"a" * n for n in range(1, 40)]) + E("GET", "k"))


@pytest.mark.parametrize("cls", PARSERS)
def test_every_split_point(cls):
    whole, err, _ = parse(cls, STREAM)
    assert err is None and len(whole) == 6
    for cut in range(1, len(STREAM)):
        assert parse(cls, STREAM, chunks=[cut])[0] == whole
    assert parse(cls, STREAM, chunks=[1] * len(STREAM))[0] == whole


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize("data, message", BAD)
def test_bad_requests_byte_by_byte(cls, data, message):
    stream = E("PING") + data + E("PING")
    got, err, _ = parse(cls, stream, chunks=[1] * len(stream))
    assert err == message and [a for a, _ in got] == [[b"PING"]]


# ---- replies: framed byte for byte ----

REPLIES = [
    b"+OK\r\n", b"-ERR x\r\n", b":-12\r\n", b"$3\r\nabc\r\n", b"$-1\r\n", b"$0\r\n\r\n", b"*-1\r\n", b"*0\r\n",
    b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n", b"%1\r\n+k\r\n$1\r\nv\r\n", b"~2\r\n,1.5\r\n#t\r\n", b"_\r\n",
    b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n", b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n", b"=8\r\ntxt:abcd\r\n",
    b"(123456789012345678901234567890\r\n", b"$12\r\nab\r\ncd\r\nefgh\r\n", b"*1\r\n" * 50 + b":1\r\n",
    b"$300\r\n" + b"z" * 300 + b"\r\n",
]


@pytest.mark.parametrize("cls", FRAMERS)
def test_framer_cuts_replies_at_any_split(cls):
    stream = b"".join(REPLIES)
    assert cls().feed(stream) == REPLIES
    for cut in range(1, len(stream)):
        f = cls()
        assert f.feed(stream[:cut]) + f.feed(stream[cut:]) == REPLIES
    f = cls()
    assert [fr for i in range(len(stream)) for fr in f.feed(stream[i:i + 1])] == REPLIES
    assert not f.buf


@pytest.mark.parametrize("cls", FRAMERS)
@pytest.mark.parametrize("data, message", [
    (b"$abc\r\n", "bad reply header from backend: b'$abc'"),
    (b"$ 300\r\n", "bad reply header from backend: b'$ 300'"),
    (b"*x\r\n", "bad reply header from backend: b'*x'"),
    (b"?1\r\n", "unknown reply type byte '?' from backend"),
])
def test_framer_refuses_a_broken_backend_stream(cls, data, message):
    """Never from a real server; a clear error rather than a crash or a wrong cut."""
    with pytest.raises(ProtocolError) as e:
        cls().feed(b"+OK\r\n" + data)
    assert str(e.value) == message
