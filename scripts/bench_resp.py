"""Micro-benchmark of the RESP hot path: pure-Python RequestParser/ReplyFramer against the compiled twin.

    python scripts/bench_resp.py            # ~10 s
    python scripts/bench_resp.py --quick    # ~3 s
    python scripts/bench_resp.py -n 500000  # requests per case

Each case feeds the same bytes to a fresh parser (or framer) the way vproxy does: one recv per
request for a client that waits for each reply, 16 per recv for a pipelining one, and a stream cut
at fixed odd offsets (requests arriving in pieces). It prints ns per request (per reply) for each
implementation and their ratio; the best of --repeat runs counts (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vproxy import resp  # noqa: E402

try:
    from vproxy import _resp as compiled  # noqa: E402
except ImportError:
    compiled = None


def _requests(n: int) -> list[bytes]:
    """What an application sends: mostly GET and SET of short keys, some MGET, HSET, INCR."""
    out = []
    value = b"v" * 32
    for i in range(n):
        key = b"key:%d" % (i % 10000)
        kind = i % 10
        if kind < 5:
            args = [b"GET", key]
        elif kind < 8:
            args = [b"SET", key, value]
        elif kind == 8:
            args = [b"MGET"] + [b"key:%d" % (i + j) for j in range(10)]
        else:
            args = [b"HSET", b"h:%d" % (i % 100), b"field", value]
        out.append(resp.encode_request(args))
    return out


def _replies(n: int) -> list[bytes]:
    """What a server answers: +OK, bulk strings, nulls, integers, an MGET array now and then."""
    bulk = b"$32\r\n" + b"v" * 32 + b"\r\n"
    shapes = [bulk, b"+OK\r\n", bulk, b"$-1\r\n", b":42\r\n", bulk, b"+OK\r\n",
              b"*10\r\n" + bulk * 9 + b"$-1\r\n", b":1\r\n", bulk]
    return [shapes[i % len(shapes)] for i in range(n)]


def _chunks(items: list[bytes], per: int) -> list[bytes]:
    return [b"".join(items[i:i + per]) for i in range(0, len(items), per)]


def _pieces(items: list[bytes], size: int) -> list[bytes]:
    data = b"".join(items)
    return [data[i:i + size] for i in range(0, len(data), size)]


def _time(cls, chunks: list[bytes], expect: int, repeat: int) -> float:
    """Best wall time of `repeat` runs feeding every chunk to one fresh object, in ns per item."""
    best = float("inf")
    for _ in range(repeat):
        obj = cls()
        feed = obj.feed
        got = 0
        t0 = time.perf_counter_ns()
        for c in chunks:
            got += len(feed(c))
        best = min(best, time.perf_counter_ns() - t0)
        assert got == expect, (cls, got, expect)
    return best / expect


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--requests", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="-n 30000 --repeat 3")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.repeat = 30_000, 3
    if compiled is None:
        print("the compiled twin is not built (python setup.py build_ext --inplace); nothing to compare")
        return 1
    n = args.requests
    reqs, reps = _requests(n), _replies(n)
    cases = [
        ("requests, 1 per recv", resp.PureRequestParser, compiled.RequestParser, _chunks(reqs, 1)),
        ("requests, 16 per recv", resp.PureRequestParser, compiled.RequestParser, _chunks(reqs, 16)),
        ("requests, cut every 1000 B", resp.PureRequestParser, compiled.RequestParser, _pieces(reqs, 1000)),
        ("replies, 1 per recv", resp.PureReplyFramer, compiled.ReplyFramer, _chunks(reps, 1)),
        ("replies, 16 per recv", resp.PureReplyFramer, compiled.ReplyFramer, _chunks(reps, 16)),
        ("replies, cut every 1000 B", resp.PureReplyFramer, compiled.ReplyFramer, _pieces(reps, 1000)),
    ]
    print(f"{n} requests/replies per case, best of {args.repeat}; ns per request (reply)")
    print(f"{'case':<30}{'pure':>10}{'compiled':>10}{'ratio':>8}")
    for name, pure_cls, fast_cls, chunks in cases:
        pure = _time(pure_cls, chunks, n, args.repeat)
        fast = _time(fast_cls, chunks, n, args.repeat)
        print(f"{name:<30}{pure:>10.0f}{fast:>10.0f}{pure / fast:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
