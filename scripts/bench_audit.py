#!/usr/bin/env python3
"""`vproxy audit` reading speed: records per second over generated audit files (plain and gzipped).

    python scripts/bench_audit.py                 # 500,000 records, ~1 minute
    python scripts/bench_audit.py --records 100000 --repeat 1

It writes records with the audit writer's own code (vproxy.auditwriter.Writer.lines) into a temp
directory, as vproxy leaves them: rotated, gzipped files plus the active audit.jsonl, then runs the
reader (vproxy.auditquery.main, in this process, output to /dev/null) over them: every record as
JSON, a table, a filtered query, and --summary. It prints records read per second for each (best
of --repeat runs); the issue's goal is >= 200,000 records/s.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vproxy import auditquery
from vproxy.auditwriter import OUTCOMES, Writer

COMMANDS = [(b"set", 3), (b"del", 2), (b"hset", 4), (b"lpush", 3), (b"expire", 3), (b"incr", 2),
            (b"get", 2), (b"flushdb", 1)]
CLIENTS = [(i, (f"10.0.{i % 7}.{i}", 40000 + i), b"app-%d" % (i % 5)) for i in range(1, 40)]


def generate(d: str, n: int, files: int) -> int:
    """n records over `files` files (the last one the active, uncompressed); returns total bytes."""
    writer = Writer({"dir": d, "node": "bench-node:7777", "default_user": "default", "secret": None,
                     "rotate_size": 0, "rotate_age": 0, "keep_seconds": 0, "keep_files": 0, "compress": True})
    rnd = random.Random(7)
    start = time.time() - n / 1000  # 1,000 records per second
    per = -(-n // files)
    recs = []
    for i in range(n):
        name, argc = rnd.choice(COMMANDS)
        cid, addr, cname = rnd.choice(CLIENTS)
        keys = [b"user:%d" % rnd.randrange(100000)] if argc > 1 else []
        outcome, err = (OUTCOMES.index("error"), "WRONGTYPE") if i % 97 == 0 else (0, None)
        t = start + i / 1000
        recs += [t, (cid, addr, cname, b"redis-py", b"5.0.1", None, 0), name, None, keys, argc, 40 + argc * 10,
                 ("10.0.0.5", 6379), None, t + rnd.randrange(50, 3000) / 1e6, outcome, err]  # (auditfmt.FIELDS)
    lines = writer.lines(recs).splitlines(keepends=True)
    total = 0
    for f in range(files):
        chunk = b"".join(lines[f * per:(f + 1) * per])
        if f == files - 1:
            path = os.path.join(d, "audit.jsonl")
            with open(path, "wb") as out:
                out.write(chunk)
        else:
            path = os.path.join(d, f"audit-20261128T{f:06d}.000000Z.jsonl.gz")
            with gzip.open(path, "wb", compresslevel=1) as out:
                out.write(chunk)
        total += os.path.getsize(path)
    return total


def timed(args: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            t = time.perf_counter()
            auditquery.main(args + ["--progress", "never"])
            best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=500_000)
    p.add_argument("--files", type=int, default=5, help="files (all but the last gzipped)")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    d = tempfile.mkdtemp(prefix="vproxy-bench-audit-")
    try:
        size = generate(d, a.records, a.files)
        print(f"{a.records:,} records in {a.files} files ({a.files - 1} gzipped), {size / 1e6:.1f} MB on disk; "
              f"parser: {auditquery.PARSER} (VPROXY_PURE=1: json)")
        print(f"{'query':<44} {'seconds':>8} {'records/s':>12}")
        for title, args in [
            ("every record, --format json", [d, "--format", "json"]),
            ("every record, table", [d]),
            ("--command flushdb (a few matches)", [d, "--command", "flushdb"]),
            ("--client app-1 --outcome ok", [d, "--client", "app-1", "--outcome", "ok"]),
            ("--key 'user:1*'", [d, "--key", "user:1*"]),
            ("--summary", [d, "--summary"]),
        ]:
            t = timed(args, a.repeat)
            print(f"{title:<44} {t:>8.2f} {a.records / t:>12,.0f}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
