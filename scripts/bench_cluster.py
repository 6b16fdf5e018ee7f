#!/usr/bin/env python3
"""vproxy in front of a 3-primary cluster vs the cluster direct (`redis-benchmark --cluster`).

    python scripts/bench_cluster.py [--requests N] [--rounds N] [--kind valkey|redis7] [--proxy-arg=--pool-size=1 ...]

Builds the cluster (tests/clusterkit.py) and a vproxy in cluster mode on free ports, runs
redis-benchmark GET and SET at 50 clients (unpipelined, then -P 16) and at 500 clients, in paired
rounds (cluster direct and vproxy back to back, the order swapped every round; medians of the
rounds, ratios as medians of the per-round ratios), prints requests/s, the vproxy/direct ratio and
the CPU time per request (vproxy alone; the cluster's servers summed), and stops every process by
pid, also on Ctrl-C and SIGTERM. No twemproxy here: it does not speak Redis Cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests"), str(ROOT)]

from bench import (COMMANDS, SCENARIOS, Target, fmt, ignore_signals, install_signal_handlers,  # noqa: E402
                   run_redis_benchmark, run_rounds, summarize)
from clusterkit import Cluster  # noqa: E402
from conftest import Proxy  # noqa: E402

KEYSPACE = ("-r", "100000")  # random keys, so that every primary gets its share


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000,
                    help="requests per GET/SET run (the pipelined load runs 8x as many); default 100,000")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds per load, medians kept (default 3)")
    ap.add_argument("--kind", default="valkey", choices=["valkey", "redis7"])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--proxy-arg", action="append", default=[],
                    help="extra vproxy flag (repeatable), e.g. --proxy-arg=--pool-size=1")
    return ap.parse_args(argv)


def run_loads(args, targets: list[Target]) -> dict:
    out = {}
    for label, clients, pipeline, mult in SCENARIOS:
        n = args.requests * mult
        runs = run_rounds(run_redis_benchmark, targets, label, clients, pipeline, n, args.rounds)
        out[label] = {"clients": clients, "pipeline": pipeline, "requests": n, "rounds": args.rounds,
                      **summarize(runs)}
    return out


def render(load: dict, rounds: int) -> str:
    lines = ["| load | test | direct rps | vproxy rps | ratio | cluster CPU us/req | vproxy CPU us/req | CPU ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, sc in load.items():
        for cmd in ("GET", "SET"):
            d, p, r = sc["direct"][cmd], sc["proxy"][cmd], sc["ratio"]["proxy"][cmd]
            lines.append(f"| {label} | {cmd} | {fmt(d['rps'])} | {fmt(p['rps'])} | {fmt(r['rps'], '.2f')} | "
                         f"{fmt(d['cpu_us_per_request'], '.2f')} | {fmt(p['cpu_us_per_request'], '.2f')} | "
                         f"{fmt(r['cpu_us_per_request'], '.2f')} |")
    lines.append("")
    lines.append(f"Medians of {rounds} paired round(s); ratio = vproxy / direct, the median of the per-round ratios. "
                 "CPU us/req: CPU time per request of vproxy alone, and of the cluster's servers summed.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not shutil.which("redis-benchmark"):
        sys.exit("redis-benchmark is not installed")
    install_signal_handlers()
    stack = contextlib.ExitStack()
    try:
        cluster = Cluster(args.kind, 3)  # stops its own nodes if it fails half-way
        stack.callback(cluster.stop)
        proxy = Proxy("--mode", "cluster", *[a for s in cluster.seeds for a in ("--backend", s)], *args.proxy_arg)
        stack.callback(proxy.stop)
        print(f"# cluster {' '.join(cluster.seeds)} ({args.kind}), vproxy 127.0.0.1:{proxy.port} "
              f"(pid {proxy.proc.pid}) {' '.join(args.proxy_arg)}".rstrip(), flush=True)
        targets = [Target("direct", "direct", cluster.primaries[0].port, tuple(n.proc.pid for n in cluster.nodes),
                          ("--cluster", *KEYSPACE)),
                   Target("proxy", "vproxy", proxy.port, (proxy.proc.pid,), KEYSPACE)]
        for t in targets:  # warm-up: vproxy opens its connections to every node; not measured
            for command in COMMANDS:
                run_redis_benchmark(t.port, 50, 1, min(args.requests, 20_000), command, t.bench_args)
        load = run_loads(args, targets)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping vproxy and the cluster", file=sys.stderr)
        return 130
    finally:
        ignore_signals()
        stack.close()
        install_signal_handlers()
    print()
    print(render(load, args.rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": args.kind, "requests": args.requests, "rounds": args.rounds,
                       "proxy_args": args.proxy_arg, "load": load}, f, indent=2)
        print(f"# results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
