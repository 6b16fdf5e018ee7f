#!/usr/bin/env python3
"""The long run of tests/test_fuzz.py: random and mutated RESP against a live vproxy.

    python scripts/fuzz.py                 # 20,000 inputs
    python scripts/fuzz.py --inputs 200000 --seconds 600

Starts a valkey-server and vproxy on free ports, a well-behaved client checking its own SET/GET
answers the whole time, and throws the fuzzer's inputs (tests/test_fuzz.py `streams`) at vproxy,
one connection each (send, half-close, read until closed). Prints how many inputs it tried, how
they were answered, the slowest, the good client's rounds and wrong answers, and vproxy's RSS
before and after; exits 1 on a hang, a crash or a wrong answer. Every process is stopped by pid.
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import Proxy, Server, wait_for  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from test_fuzz import GoodClient, rss_kb, streams  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no limit)")
    args = ap.parse_args(argv)
    server = Server()
    proxy = Proxy("--backend", server.addr)
    kinds: collections.Counter = collections.Counter()
    slowest = (0.0, b"")
    deadline = time.monotonic() + args.seconds if args.seconds else None
    good = GoodClient(proxy.port)
    good.start()
    try:
        wait_for(lambda: good.rounds > 10 or good.wrong, what="the good client to run")
        before = rss_kb(proxy.proc.pid)

        @settings(max_examples=args.inputs, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(streams())
        def one(data):
            nonlocal slowest
            if deadline and time.monotonic() > deadline:
                return
            t = time.monotonic()
            out = b""
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    while chunk := sock.recv(65536):
                        out += chunk
                except (ConnectionResetError, BrokenPipeError):
                    out += b"<reset>"
            took = time.monotonic() - t
            slowest = max(slowest, (took, data))
            kinds["protocol error" if b"Protocol error" in out else "closed, no reply" if not out
                  else "error reply" if out[:1] == b"-" else "reply"] += 1
            if proxy.proc.poll() is not None:
                raise SystemExit(f"vproxy died on {data!r}")
        one()
        good.stop.set()
        good.join(20)
        after = rss_kb(proxy.proc.pid)
        print(f"inputs tried: {sum(kinds.values()):,}  ({', '.join(f'{k}: {v:,}' for k, v in kinds.most_common())})")
        print(f"slowest connection: {slowest[0] * 1000:.1f} ms for {slowest[1][:60]!r}")
        print(f"good client: {good.rounds:,} round trips, {len(good.wrong)} wrong answers {good.wrong[:3]}")
        print(f"vproxy RSS: {before:,} KB before, {after:,} KB after; answers PING: {proxy.client().ping()}")
        return 1 if good.wrong or slowest[0] > 8 else 0
    finally:
        good.stop.set()
        proxy.stop()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
