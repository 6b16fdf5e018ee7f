#!/usr/bin/env python3
"""vproxy in front of a 3-primary cluster vs the cluster direct (`redis-benchmark --cluster`).

    python scripts/bench_cluster.py [--requests N] [--kind valkey|redis7] [--proxy-arg=--pool-size=1 ...]

Builds the cluster (tests/clusterkit.py) and a vproxy in cluster mode on free ports, runs
redis-benchmark GET/SET at 50 clients, unpipelined and with -P 16, prints requests/s and the
proxy/direct ratio, and stops every process by pid.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from clusterkit import Cluster  # noqa: E402
from conftest import Proxy  # noqa: E402


def bench(port: int, extra: list, pipeline: int, requests: int) -> dict:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests), "-t", "get,set",
                          "-P", str(pipeline), "-r", "100000", "--csv", *extra],
                         capture_output=True, text=True, check=True).stdout
    rows = list(csv.reader(io.StringIO(out[out.index('"test"'):])))
    return {r[0]: float(r[1]) for r in rows[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--kind", default="valkey", choices=["valkey", "redis7"])
    ap.add_argument("--proxy-arg", action="append", default=[], help="extra vproxy flag (repeatable), e.g. --proxy-arg=--pool-size=1")
    args = ap.parse_args()
    if not shutil.which("redis-benchmark"):
        sys.exit("redis-benchmark is not installed")
    cluster = Cluster(args.kind, 3)
    proxy = None
    try:
        proxy = Proxy("--mode", "cluster", *[a for s in cluster.seeds for a in ("--backend", s)], *args.proxy_arg)
        print("| test | pipeline | direct rps | vproxy rps | ratio |\n| --- | --- | --- | --- | --- |")
        for pipeline in (1, 16):
            direct = bench(cluster.primaries[0].port, ["--cluster"], pipeline, args.requests)
            via = bench(proxy.port, [], pipeline, args.requests)
            for t in ("SET", "GET"):
                print(f"| {t} | {pipeline} | {direct[t]:.0f} | {via[t]:.0f} | {via[t] / direct[t]:.2f} |", flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
