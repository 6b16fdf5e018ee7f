"""Unit tests of vproxy.resp, no server: numbers read as the server's string2ll() reads them, the
request parser's answers to good and bad bytes (however the bytes are split), the reply framer.

Each parser and framer test runs against both implementations: the pure-Python reference and
the compiled twin (vproxy/_resp.pyx, skipped when not built); a differential test feeds both the
same random streams."""

from __future__ import annotations

from pathlib import Path

import pytest

from vproxy import resp
from vproxy.errors import ProtocolError

try:
    from vproxy import _resp as compiled
except ImportError:  # not built: `python setup.py build_ext --inplace` or `pip install -e .`
    compiled = None
NOT_BUILT = pytest.mark.skipif(compiled is None, reason="the compiled twin vproxy/_resp.pyx is not built")
PARSERS = [pytest.param(resp.PureRequestParser, id="pure"),
           pytest.param(getattr(compiled, "RequestParser", None), id="compiled", marks=NOT_BUILT)]
FRAMERS = [pytest.param(resp.PureReplyFramer, id="pure"),
           pytest.param(getattr(compiled, "ReplyFramer", None), id="compiled", marks=NOT_BUILT)]


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


@pytest.mark.parametrize("cls", PARSERS)
def test_error_keeps_raw_bytes(cls):
    """The server's "%c" puts the byte itself in the reply, a NUL or a non-ASCII one alike."""
    for byte in (b"\x8f", b"\x00", b"x"):
        try:
            cls().feed(b"*1\r\n" + byte + b"\r\n")
        except ProtocolError as e:
            want = b"-ERR Protocol error: expected '$', got '" + byte + b"'\r\n"
            assert resp.error(f"ERR Protocol error: {e}") == want
        else:
            pytest.fail("no protocol error")


@pytest.mark.parametrize("cls", PARSERS)
def test_query_buffer_limit_counts_the_arguments_of_a_request_in_progress(cls):
    """An endless request of 1-byte arguments: its parsed arguments (objects, ARG_COST each besides
    their bytes) count against the limit, not only its bytes (the memory it holds was ~8 times them)."""
    limit = 100_000
    p = cls(max_buffer=limit)
    head, arg = b"*2147483647\r\n", E("a")[4:]  # "$1\r\na\r\n"
    n_ok = (limit - len(head)) // (len(arg) + resp.ARG_COST)
    p.feed(head + arg * n_ok)  # under the limit: it waits for the rest
    assert len(p.args) == n_ok
    with pytest.raises(ProtocolError, match="client query buffer limit reached"):
        p.feed(arg * 2)
    assert (n_ok + 2) * len(arg) + len(head) < limit  # the bytes alone would have been under it
    q = cls(max_buffer=limit)  # complete requests: nothing held between them
    assert len(q.feed(E("SET", "k", "v") * 10_000)) == 10_000


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


# ---- differential: the compiled twin answers every random stream as the pure one does ----

SPICE = [b"\r", b"\n", b"\x00", b"0", b"1", b"9", b"+", b"-", b" ", b"_", b"$", b"*", b'"', b"'", b"\\", b"\xff"]


def _random_request(rnd) -> bytes:
    kind = rnd.random()
    if kind < 0.15:
        words = [rnd.choice([b"GET", b"SET", b"AUTH", b"hello", b'"a b"', b"'x'", b"\\x41", b"k"])
                 for _ in range(rnd.randint(0, 4))]
        return b" ".join(words) + rnd.choice([b"\r\n", b"\n"])
    if kind < 0.2:
        return rnd.choice([b"*0\r\n", b"*-1\r\n", b"\r\n"])
    args = [bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 1, 2, 5, 12, 40, 120])))
            for _ in range(rnd.randint(1, 13))]
    if rnd.random() < 0.1:
        args[0] = rnd.choice([b"AUTH", b"auth", b"HELLO"])
    return resp.encode_request(args)


def _mutate(rnd, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rnd.choice([0, 0, 1, 1, 2, 3])):
        if not data:
            break
        i = rnd.randrange(len(data))
        op = rnd.random()
        if op < 0.6:
            data[i:i + 1] = rnd.choice(SPICE)
        elif op < 0.8:
            data[i:i] = rnd.choice(SPICE)
        else:
            del data[i]
    return bytes(data)


def _splits(rnd, n: int) -> list[int]:
    cuts = sorted(rnd.sample(range(1, n), min(n - 1, rnd.randint(0, 6)))) if n > 1 else []
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


def _run(obj, data: bytes, sizes: list[int]) -> list:
    """What each feed answered (results or the error with its requests), and the state after."""
    seen, pos = [], 0
    for n in sizes:
        try:
            seen.append(("ok", obj.feed(data[pos:pos + n])))
        except ProtocolError as e:
            seen.append(("error", str(e), e.requests))
            break
        pos += n
    seen.append((bytes(obj.buf), obj.need, getattr(obj, "nargs", None), getattr(obj, "args", None)))
    return seen


@NOT_BUILT
def test_parsers_agree_on_random_streams():
    import random

    rnd = random.Random(20261127)
    for case in range(4000):
        data = _mutate(rnd, b"".join(_random_request(rnd) for _ in range(rnd.randint(1, 6))))
        sizes = _splits(rnd, len(data)) if data else [0]
        if rnd.random() < 0.3:  # cut short: a request left half-read
            data = data[:rnd.randrange(len(data) + 1)]
        auth, max_bulk = rnd.random() < 0.2, 100 if rnd.random() < 0.1 else 512 * 1024 * 1024
        runs = []
        for cls in (resp.PureRequestParser, compiled.RequestParser):
            p = cls(max_bulk=max_bulk)
            p.auth_required = auth
            runs.append(_run(p, data, sizes))
        assert runs[0] == runs[1], f"case {case}: {data!r} split {sizes}"


def _random_reply(rnd, depth: int = 0) -> bytes:
    t = rnd.choice(b"+-:$*%~>|_,#(=!" if depth < 3 else b"+-:$_,#(=!")
    if t in b"+-:_,#(":
        return bytes([t]) + bytes(rnd.choice(b"abc 0123") for _ in range(rnd.randint(0, 8))) + b"\r\n"
    if t in b"$=!":
        body = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 3, 9, 10, 99, 150])))
        return b"$-1\r\n" if rnd.random() < 0.1 else bytes([t]) + b"%d\r\n" % len(body) + body + b"\r\n"
    n = rnd.choice([-1, 0, 1, 2, 3, 11])
    items = max(n, 0) * (2 if t in b"%|" else 1) + (1 if t == ord("|") else 0)
    return bytes([t]) + b"%d\r\n" % n + b"".join(_random_reply(rnd, depth + 1) for _ in range(items))


@NOT_BUILT
def test_framers_agree_on_random_streams():
    import random

    rnd = random.Random(11272026)
    for case in range(3000):
        data = b"".join(_random_reply(rnd) for _ in range(rnd.randint(1, 5)))
        if rnd.random() < 0.3:
            data = _mutate(rnd, data)
        sizes = _splits(rnd, len(data)) if data else [0]
        runs = [_run(cls(), data, sizes) for cls in (resp.PureReplyFramer, compiled.ReplyFramer)]
        assert runs[0] == runs[1], f"case {case}: {data!r} split {sizes}"
        if runs[0][-2][0] == "ok":  # the frames and what is left over are the stream, byte for byte
            assert b"".join(f for _, fs in runs[0][:-1] for f in fs) + runs[0][-1][0] == data


@NOT_BUILT
def test_corpus_streams_agree():
    """tests/corpus/*.resp (what test_resp_corpus sends to servers) parsed alike, however split."""
    import random

    rnd = random.Random(7)
    for f in sorted((Path(__file__).parent / "corpus").glob("*.resp")):
        data = f.read_bytes()
        whole = _run(resp.PureRequestParser(), data, [len(data)])
        assert whole[0][0] == "ok" and whole[0][1]
        for _ in range(50):
            sizes = _splits(rnd, len(data))
            runs = [_run(cls(), data, sizes) for cls in (resp.PureRequestParser, compiled.RequestParser)]
            assert runs[0] == runs[1], f.name
            assert [r for step in runs[0][:-1] for r in step[1]] == whole[0][1]


# ---- the corpus, big payloads, every RESP3 type: each implementation on its own ----

CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.resp"))


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_stream_gives_its_count_of_requests(cls, path):
    """tests/corpus/NAME.resp holds NAME.n requests (one reply each): whole, byte by byte, in 7s."""
    data, n = path.read_bytes(), int(path.with_suffix(".n").read_text())
    whole, err, p = parse(cls, data)
    assert err is None and len(whole) == n and not p.buf
    assert parse(cls, data, chunks=[1] * len(data))[0] == whole
    assert parse(cls, data, chunks=[7] * (len(data) // 7 + 1))[0] == whole


@pytest.mark.parametrize("cls", PARSERS)
def test_big_bulk_request_in_socket_sized_chunks(cls):
    """A 3 MB argument arriving 64 KB at a time: one request, the argument intact, nothing left over."""
    big = bytes(range(256)) * (3 * 4096)
    data = E("SET", "k", big) + E("GET", "k")
    got, err, p = parse(cls, data, chunks=[65536] * (len(data) // 65536 + 1))
    assert err is None and [a for a, _ in got] == [[b"SET", b"k", big], [b"GET", b"k"]]
    assert got[0][1] == E("SET", "k", big) and not p.buf


@pytest.mark.parametrize("cls", PARSERS)
def test_inline_quoting(cls):
    """Inline requests split as the server's sdssplitargs: quotes group, escapes in double quotes."""
    got, err, _ = parse(cls, b'SET k "a\\nb\\x41\\"" \'c\\\'d\'\r\n\tGET\t k \r\n')
    assert err is None and [a for a, _ in got] == [[b"SET", b"k", b'a\nbA"', b"c'd"], [b"GET", b"k"]]


RESP3_REPLIES = [
    b"!21\r\nSYNTAX invalid syntax\r\n",  # blob error
    b",inf\r\n", b",-inf\r\n", b",nan\r\n", b",3.0e-2\r\n", b"#f\r\n", b"%0\r\n", b"~0\r\n", b">0\r\n",
    b"*3\r\n$-1\r\n_\r\n*-1\r\n",  # nulls inside an array
    b"*2\r\n-ERR one failed\r\n:1\r\n",  # an error inside an array (EXEC)
    b"%2\r\n~1\r\n:1\r\n*0\r\n$1\r\nk\r\n%1\r\n+a\r\n=7\r\ntxt:xyz\r\n",  # aggregates as map keys and values
    b"|2\r\n+a\r\n:1\r\n+b\r\n:2\r\n*1\r\n:7\r\n",  # attributes, then the reply they describe
    b">4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npc\r\n$1\r\nm\r\n",  # a push between replies
    b"$" + b"%d" % (2 << 20) + b"\r\n" + b"\r\n" * (1 << 20) + b"\r\n",  # 2 MB of CRLFs as a payload
    b"*10000\r\n" + b":1\r\n" * 10000,
]


@pytest.mark.parametrize("cls", FRAMERS)
def test_framer_cuts_resp3_types_and_big_replies(cls):
    stream = b"".join(RESP3_REPLIES)
    assert cls().feed(stream) == RESP3_REPLIES
    f = cls()
    frames = [fr for pos in range(0, len(stream), 4093) for fr in f.feed(stream[pos:pos + 4093])]
    assert frames == RESP3_REPLIES and not f.buf


@pytest.mark.parametrize("cls", FRAMERS)
def test_framer_holds_a_partial_reply(cls):
    f = cls()
    assert f.feed(b"+OK\r\n*2\r\n$3\r\nab") == [b"+OK\r\n"]
    assert f.feed(b"c\r\n") == []
    assert f.feed(b":5\r\n+next") == [b"*2\r\n$3\r\nabc\r\n:5\r\n"]
    assert f.feed(b"\r\n") == [b"+next\r\n"] and not f.buf


# ---- the encoders for replies vproxy makes itself, read back by hiredis ----

@pytest.mark.parametrize("proto", [2, 3])
def test_value_round_trips_through_a_reader(proto):
    v = {"name": "vproxy", "n": 3, "ratio": 0.5, "on": True, "none": None, "list": [1, b"two", [3]]}
    frame = resp.value(v, proto)
    assert resp.PureReplyFramer().feed(frame) == [frame]  # one whole reply
    back = resp.decode(frame)
    flat = back if proto == 2 else [x for kv in back.items() for x in kv]
    assert flat[:2] == [b"name", b"vproxy"] and flat[3] == 3 and flat[11] == [1, b"two", [3]]
    assert flat[5] == (0.5 if proto == 3 else b"0.5") and flat[7] == (True if proto == 3 else 1)
    assert flat[9] is None


def test_small_encoders():
    assert resp.error("ERR a\r\nb") == b"-ERR a  b\r\n"  # a reply line never breaks
    assert resp.simple("PONG") == b"+PONG\r\n" and resp.integer(-7) == b":-7\r\n"
    assert resp.bulk("é") == b"$2\r\n\xc3\xa9\r\n" and resp.bulk(b"") == b"$0\r\n\r\n"
    assert resp.null(2) == b"$-1\r\n" and resp.null(3) == b"_\r\n"
    assert resp.verbatim("a\r\nb", 3) == b"=8\r\ntxt:a\r\nb\r\n" and resp.verbatim("ab", 2) == b"$2\r\nab\r\n"
    assert resp.encode_request(["GET", b"k"]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    with pytest.raises(TypeError):
        resp.value(object(), 2)
