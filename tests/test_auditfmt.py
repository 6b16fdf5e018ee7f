"""The audit record's JSON line (vproxy/auditfmt.py) and its compiled twin (vproxy/_auditfmt.pyx):
the lines an operator reads, byte for byte the same from both, for every kind of record."""

from __future__ import annotations

import json
import marshal
import random

import pytest

from vproxy.auditfmt import FIELDS, OUTCOMES, STRIDE, Batch, PureFormatter, key_hash, unpack

compiled = pytest.importorskip("vproxy._auditfmt", reason="the compiled twin is not built")

T0 = 1795826843.923031  # 2026-11-28T00:47:23.923031Z
WHO = (3, ("10.0.3.7", 38698), b"billing", b"redis-py", b"5.0.1", None, 0)
NASTY = [
    b"plain", b"", b'qu"ote', b"back\\slash", b"nl\nnl", b"\r\t\b\f", bytes(range(32)), b"\x7f",
    "é".encode(), "€".encode(), "𝄞".encode(), b"\xff", b"\x80", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80", b"\xf5\x80", b"\xe2\x82", b"\xe2\x82A", b"a\xf0\x9f\x98", "ok𝄞\u2028".encode() + b"\xfe",
    b"\xc2", b"\xe1\x80", b"\xf0\x90\x80", b"\xef\xbf\xbf", b"\xf4\x8f\xbf\xbf",
]


def corpus() -> list:
    """Records of every kind, as the proxy makes them (audit.py): each its STRIDE fields (FIELDS)."""
    rng = random.Random(11)
    whos = [WHO, (4, ("::1", 5000), b"", b"", b"", b"alice", 3), (5, "/tmp/s.sock", b'n"\xff', b"lib\n", b"\x80",
                                                                     b"b\xc3\xa9b", 15), (6, None, None, None, None, None, 0)]
    targets = [("10.0.0.5", 6379), ("fe80::1", 7000), "*", None]
    names = [b"set", b"del", b"flushall", b"config", b"s\xffet"]
    keys = NASTY + [bytes(rng.randrange(256) for _ in range(rng.randrange(12))) for _ in range(400)]
    recs = []
    for i, k in enumerate(keys):
        start = T0 + i * 0.0137
        recs.append([start, whos[i % 4], names[i % 5], (b"set" if i % 5 == 3 else None),
                     (k if i % 3 == 0 else [k]) if i % 7 else [k, b"other", k[:2]] if i % 14 else [], 3 + i % 4, 40 + i,
                     targets[i % 4], None, start + (i % 9) * 1e-5 - (1e-5 if i % 11 == 0 else 0), i % 4,
                     ("WRONGTYPE" if i % 4 == 1 else 'E"R\\R' if i % 4 == 2 else None)])
    recs.append([T0, WHO, b"auth", None, [], 1, 0, None, None, T0, 2, "WRONGPASS"])  # refused, no keys
    recs.append((T0 + 1, WHO, b"set", None, (b"t",), 3, 9, "*", None, T0 + 1.5, 3, None))  # a tuple
    assert all(len(r) == STRIDE == len(FIELDS) for r in recs)
    return recs


def keys_of(r) -> list:
    """A record's keys: a list, or one key's bytes (audit.keys_in)."""
    return [r[4]] if isinstance(r[4], bytes) else r[4]


def flat(recs: list) -> list:
    """A batch as the proxy hands it over: the records' fields one after the other."""
    return [x for r in recs for x in r]


def with_values(recs: list) -> list:
    return [list(r[:8]) + [[b"k", b"(redacted)", b"v\xff\"\n" * 3, "str value", bytes(range(40))]] + list(r[9:])
            for r in recs]


def recorded(values: bool) -> list:
    """The corpus, with argument values (audit_values) or without."""
    return with_values(corpus()) if values else corpus()


def formatters(secret=None):
    return PureFormatter("proxy-1:7777", "default", secret), compiled.Formatter("proxy-1:7777", "default", secret)


@pytest.mark.parametrize("values", [False, True])
@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_compiled_and_pure_lines_are_byte_identical(secret, values):
    recs = recorded(values)
    pure, comp = formatters(secret)
    one = pure.lines(flat(recs))
    assert comp.lines(flat(recs)) == one
    assert comp.lines(flat(recs)) == pure.lines(flat(recs))  # again, with what each has cached
    # a record at a time (Writer.line), from fresh formatters: the same lines
    pure, comp = formatters(secret)
    assert b"".join(pure.line(r) for r in recs) == one
    assert b"".join(comp.line(r) for r in recs) == one


def test_lines_are_json_with_the_documented_fields():
    recs = corpus()
    lines = formatters()[1].lines(flat(with_values(recs[:60]))).splitlines()
    assert len(lines) == 60
    for r, raw in zip(recs, lines):
        d = json.loads(raw)
        assert list(d) == ["ts", "node", "client_id", "client_addr", "client_name", "lib_name", "lib_ver", "user",
                           "db", "command", "subcommand", "keys", "argc", "bytes", "backend", "latency_us",
                           "outcome", "error", "args"]
        assert d["keys"] == [k.decode("utf-8", "backslashreplace") for k in keys_of(r)]
        assert d["outcome"] == OUTCOMES[r[10]] and d["argc"] == r[5] and d["bytes"] == r[6]
        assert d["latency_us"] >= 0
        assert d["args"][2] == (b"v\xff\"\n" * 3).decode("utf-8", "backslashreplace")
    first = json.loads(lines[0])
    assert first["ts"] == "2026-11-28T00:47:23.923031Z" and first["client_addr"] == "10.0.3.7:38698"
    assert first["user"] == "default" and first["backend"] == "10.0.0.5:6379" and first["error"] is None
    assert json.loads(lines[1])["client_addr"] == "[::1]:5000" and json.loads(lines[1])["user"] == "alice"


def test_hashed_keys_are_the_keyed_hash_of_each_key():
    recs = corpus()[:30]
    lines = formatters(b"s3cret")[1].lines(flat(recs)).splitlines()
    for r, raw in zip(recs, lines):
        d = json.loads(raw)
        assert d["keys"] == [key_hash(b"s3cret", k) for k in keys_of(r)] and d["keys_hashed"] is True
        assert b"plain" not in raw or keys_of(r) == []


def test_a_batch_that_is_not_whole_records_is_refused_by_both():
    for f in formatters():
        with pytest.raises(ValueError):
            f.lines(flat(corpus()[:3])[:-1])


# ---- the packed hand-over (auditfmt.Batch, REC): what the proxy sends and the writer formats ----

recorder = pytest.importorskip("vproxy._audit", reason="the compiled recorder is not built")


def packed(recs: list, cls=Batch) -> tuple:
    """recs packed by cls (auditfmt.Batch, or the compiled one), through marshal as the pipe has it."""
    b = cls()
    for r in recs:
        b.add(*r)
    assert b.count == len(recs)
    return marshal.loads(marshal.dumps(b.frame()))


@pytest.mark.parametrize("values", [False, True])
def test_pure_and_compiled_batches_are_the_same_frames(values):
    recs = recorded(values)
    one, two = packed(recs), packed(recs, recorder.Batch)
    assert one == two
    assert unpack(*one) == flat(recs)
    for b in (Batch(), recorder.Batch()):  # a batch taken starts again empty, with no context
        b.add_flat(flat(recs[:50]))
        assert b.take() == packed(recs[:50])
        assert b.count == 0
        b.add_flat(flat(recs[50:90]))
        assert b.take() == packed(recs[50:90])


def test_records_of_one_context_share_it_and_one_key_is_no_object():
    recs = [r for r in corpus() if isinstance(r[4], bytes)][:40]
    run = [[T0 + i, WHO, b"set", None, r[4], 3, 40, ("10.0.0.5", 6379), None, T0 + i + 1e-4, 0, None]
           for i, r in enumerate(recs)]
    for cls in (Batch, recorder.Batch):
        n, pack, objs = packed(run, cls)
        assert n == 40 and len(objs) == 4  # the context once, no key object
        assert unpack(n, pack, objs) == flat(run)


@pytest.mark.parametrize("values", [False, True])
@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_packed_batches_make_the_same_lines_as_the_flat_ones(secret, values):
    recs = recorded(values)
    ref = PureFormatter("proxy-1:7777", "default", secret).lines(flat(recs))
    for cls in (Batch, recorder.Batch):
        frame = packed(recs, cls)
        pure, comp = formatters(secret)
        assert comp.packed(*frame) == ref
        assert pure.packed(*frame) == ref
        assert comp.packed(*frame) == ref  # again, with what it has cached
        # in parts, from the same formatters (their caches carried over batches)
        pure, comp = formatters(secret)
        half = len(recs) // 2
        for f in (pure, comp):
            assert f.packed(*packed(recs[:half], cls)) + f.packed(*packed(recs[half:], cls)) == ref


def test_a_packed_batch_that_is_not_whole_records_is_refused_by_both():
    n, pack, objs = packed(corpus()[:20])
    for f in formatters():
        for bad in ((n, pack[:-1], objs), (n + 1, pack, objs), (n, pack, objs[:-1]), (n, pack + b"x", objs),
                    (n - 1, pack, objs)):
            with pytest.raises((ValueError, IndexError)):
                f.packed(*bad)
