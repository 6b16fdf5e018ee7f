#!/usr/bin/env python3
"""Two vproxy configurations side by side in one run: B's throughput and CPU per request against A's.

    python scripts/bench_ab.py --b-arg=--no-stats                 # the cost of statistics (A on, B off)
    python scripts/bench_ab.py --a-src /path/to/old/checkout      # a change: A = old code, B = this one
    python scripts/bench_ab.py --mode cluster --only "c50 P16"    # in front of a 3-primary cluster

Both proxies front the same backend (a valkey-server, or a cluster from tests/clusterkit.py), each
started with `python -m vproxy` from its source directory with its own extra flags. For every load
and command, paired rounds run A then B (the order swapped every round) with redis-benchmark
(64-byte values, 100,000 random keys); the B/A throughput ratio is the median of the per-round
ratios, so a change in the machine's load hits both alike. Every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests"), str(ROOT)]

from bench import SCENARIOS, cpu_seconds, install_signal_handlers, run_redis_benchmark  # noqa: E402
from conftest import free_port, stop_process, wait_for  # noqa: E402

KEYSPACE = ("-r", "100000")


def children_cpu(pid: int) -> float:
    """CPU seconds of pid's living child processes (the audit log's writer process, for one), with
    their own children's that have exited (the writer's gzip processes: /proc cutime + cstime)."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return 0.0
    for k in kids:
        try:
            total += cpu_seconds(k)
            with open(f"/proc/{k}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        except OSError:  # exited meanwhile
            pass
    return total


def start(src: str, backend_args: list[str], extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}", "--log-level",
                             "WARNING", *backend_args, *extra], cwd=src, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        if proc.poll() is not None:
            raise SystemExit(f"vproxy from {src} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"SET bench:ab:up 1\r\n")
                return s.recv(16).startswith(b"+OK")
        except OSError:
            return False
    wait_for(up, 30, what=f"vproxy from {src}")
    return proc, port


def proxy_info(port: int) -> dict:
    """INFO proxy of a vproxy, as text fields."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO proxy\r\n")
        data = b""
        while b"\r\n" not in data or len(data) < data.index(b"\r\n") + 2 + int(data[1:data.index(b"\r\n")]):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.decode(errors="replace").split("\r\n")[1:]
    return dict(line.split(":", 1) for line in lines if ":" in line)


def kid_cpu(kids: dict) -> str:
    """The child processes' CPU per request (when there is any), as a suffix."""
    a, b = statistics.median(kids["A"]), statistics.median(kids["B"])
    return f"; child processes A {a:.2f}, B {b:.2f}" if a or b else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a-src", default=str(ROOT), help="A's source directory (default: this checkout)")
    ap.add_argument("--b-src", default=str(ROOT), help="B's source directory (default: this checkout)")
    ap.add_argument("--a-arg", action="append", default=[], help="extra vproxy flag for A (repeatable)")
    ap.add_argument("--b-arg", action="append", default=[], help="extra vproxy flag for B (repeatable)")
    ap.add_argument("--mode", choices=("standalone", "cluster"), default="standalone")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100_000, help="per run; pipelined loads run 8x as many")
    ap.add_argument("--only", action="append", choices=[s[0] for s in SCENARIOS], help="this load only (repeatable)")
    args = ap.parse_args(argv)
    install_signal_handlers()
    stack = contextlib.ExitStack()
    try:
        if args.mode == "cluster":
            from clusterkit import Cluster
            cluster = Cluster("valkey", 3)
            stack.callback(cluster.stop)
            backend_args = ["--mode", "cluster", *[a for s in cluster.seeds for a in ("--backend", s)]]
        else:
            from vproxy.embedded import EmbeddedValkey
            server = EmbeddedValkey(free_port(), "--maxclients", "2000")
            stack.callback(server.stop)
            server.wait_ready()
            backend_args = ["--backend", f"127.0.0.1:{server.port}"]
        procs = {}
        for name, src, extra in (("A", args.a_src, args.a_arg), ("B", args.b_src, args.b_arg)):
            proc, port = start(src, backend_args, extra)
            stack.callback(stop_process, proc, 10)
            procs[name] = (proc, port)
            print(f"# {name}: vproxy from {src} {' '.join(extra)} on 127.0.0.1:{port} (pid {proc.pid})", flush=True)
        for _, port in procs.values():  # warm-up, not measured
            run_redis_benchmark(port, 50, 1, 20_000, "GET", KEYSPACE)
        print(f"# {args.mode}, {args.rounds} paired rounds; B/A = median of the per-round ratios", flush=True)
        for label, clients, pipeline, mult in SCENARIOS:
            if args.only and label not in args.only:
                continue
            n = args.requests * mult
            for cmd in ("GET", "SET"):
                ratios, cpu, kids = [], {"A": [], "B": []}, {"A": [], "B": []}
                for r in range(args.rounds):
                    rps = {}
                    for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                        proc, port = procs[name]
                        c0, k0 = cpu_seconds(proc.pid), children_cpu(proc.pid)
                        rps[name] = run_redis_benchmark(port, clients, pipeline, n, cmd, KEYSPACE)["rps"]
                        cpu[name].append((cpu_seconds(proc.pid) - c0) * 1e6 / n)
                        kids[name].append((children_cpu(proc.pid) - k0) * 1e6 / n)
                    ratios.append(rps["B"] / rps["A"])
                print(f"{label:8} {cmd}: B/A throughput {statistics.median(ratios):.3f} "
                      f"(rounds {' '.join(f'{x:.2f}' for x in ratios)}); CPU us/req A "
                      f"{statistics.median(cpu['A']):.2f}, B {statistics.median(cpu['B']):.2f}"
                      f"{kid_cpu(kids)}", flush=True)
        for name, (proc, port) in procs.items():  # the audit log's figures, when it is on
            info = proxy_info(port)
            if "audit_enabled" in info and info["audit_enabled"] == "1":
                print(f"# {name}: " + ", ".join(f"{k} {info[k]}" for k in ("audit_records", "audit_dropped",
                                                                            "audit_write_errors")), flush=True)
    finally:
        stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
