"""HA test kit: primary/replica sets, sentinels and a 50-client load that measures a failover.

Every process runs on a free port and is stopped by its pid; readiness is polled with deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import hiredis
import redis

from conftest import Server, wait_for
from vproxy.embedded import free_port, server_binary

FAST_SYNC = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")


def role(port: int) -> list:
    return redis.Redis(port=port, socket_timeout=2).execute_command("ROLE")


def repl_info(port: int) -> dict:
    return redis.Redis(port=port, socket_timeout=2).info("replication")


class ReplSet:
    """A primary and `n` replicas (`--replicaof`), all linked up before it returns."""

    def __init__(self, n: int = 2):
        self.primary = Server("valkey", None, *FAST_SYNC)
        self.replicas = [Server("valkey", None, *FAST_SYNC, "--replicaof", "127.0.0.1", str(self.primary.port))
                         for _ in range(n)]
        self.nodes = [self.primary, *self.replicas]
        for r in self.replicas:
            wait_for(lambda r=r: repl_info(r.port).get("master_link_status") == "up",
                     what=f"replica {r.port} linked")

    def args(self) -> list[str]:
        out = []
        for s in self.nodes:
            out += ["--backend", s.addr]
        return out

    def by_port(self, port: int) -> Server:
        return next(s for s in self.nodes if s.port == port)

    def masters(self) -> list[int]:
        """Ports of reachable nodes that report role master."""
        out = []
        for s in self.nodes:
            if s.proc.poll() is None:
                try:
                    if role(s.port)[0] == b"master":
                        out.append(s.port)
                except (redis.RedisError, OSError):
                    pass
        return out

    def stop(self):
        for s in self.nodes:
            s.stop()


class Sentinels:
    """`n` sentinels (valkey-server <conf> --sentinel) monitoring `name` at primary_port, quorum min(n, 2)."""

    def __init__(self, primary_port: int, n: int = 3, name: str = "mymaster", password: str = ""):
        self.name, self.password = name, password
        self.dir = tempfile.mkdtemp(prefix="vproxy-sentinel-")
        self.ports = [free_port() for _ in range(n)]
        self.procs = []
        for port in self.ports:
            conf = os.path.join(self.dir, f"sentinel-{port}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.dir}/log-{port}.txt\n"
                        f"sentinel monitor {name} 127.0.0.1 {primary_port} {min(n, 2)}\n"
                        f"sentinel down-after-milliseconds {name} 500\n"
                        f"sentinel failover-timeout {name} 3000\n"
                        + (f"requirepass {password}\n" if password else ""))
            self.procs.append(subprocess.Popen([server_binary(), conf, "--sentinel"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_for(lambda port=port: self.client(port).execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", name), what=f"sentinel {port}")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, password=self.password or None)

    def args(self) -> list[str]:
        out = ["--mode", "sentinel", "--master", self.name]
        if self.password:
            out += ["--sentinel-password", self.password]
        for p in self.ports:
            out += ["--sentinel", f"127.0.0.1:{p}"]
        return out

    def primary_port(self, port: int | None = None) -> int:
        got = self.client(port or self.ports[0]).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(got[1])

    def wait_ready(self, replicas: int) -> None:
        """Every sentinel knows the replicas and the other sentinels (else a failover may flap)."""
        def known():
            return all(len(self.client(p).execute_command("SENTINEL", "REPLICAS", self.name)) >= replicas
                       and len(self.client(p).execute_command("SENTINEL", "SENTINELS", self.name)) >= len(self.ports) - 1
                       for p in self.ports)
        wait_for(known, timeout=20, what=f"sentinels to know {replicas} replicas and each other")

    def logs(self) -> str:
        out = []
        for port in self.ports:
            try:
                with open(os.path.join(self.dir, f"log-{port}.txt")) as f:
                    out.append(f"--- sentinel {port}\n" + f.read())
            except OSError:
                pass
        return "\n".join(out)

    def stop(self):
        if os.environ.get("VPROXY_SENTINEL_LOGS"):
            print(self.logs())
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def topology(proxy) -> dict:
    """PROXY TOPOLOGY as a dict (str keys)."""
    raw = proxy.client(socket_timeout=5).execute_command("PROXY", "TOPOLOGY")
    return _to_dict(raw)


def _to_dict(v):
    if isinstance(v, dict):
        return {_to_dict(k): _to_dict(x) for k, x in v.items()}
    if isinstance(v, list) and len(v) % 2 == 0 and all(isinstance(k, bytes) for k in v[::2]):
        return {k.decode(): _to_dict(x) for k, x in zip(v[::2], v[1::2])}
    if isinstance(v, list):
        return [_to_dict(x) for x in v]
    if isinstance(v, bytes):
        return v.decode()
    return v


class Load:
    """`n` client connections (threads, raw sockets) doing SET k / GET k through the proxy.

    Records every reply error with its time, every disconnect, the slowest command, and each
    write the proxy acknowledged (key -> (value, time)).
    """

    def __init__(self, port: int, n: int = 50):
        self.port, self.n = port, n
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[tuple[float, str]] = []
        self.disconnects = 0
        self.acked: dict[str, tuple[int, float]] = {}
        self.ops = 0
        self.slowest = 0.0
        self.slow_at = 0.0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)

    def _connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s, hiredis.Reader()

    def _call(self, sock, reader, *args):
        sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        while True:
            reply = reader.gets()
            if reply is not False:
                return reply
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed by proxy")
            reader.feed(data)

    def _run(self, tid: int) -> None:
        sock, reader = self._connect()
        n = 0
        while not self.stop_flag.is_set():
            n += 1
            key = f"load:{tid}:{n}".encode()
            try:
                self._one(sock, reader, key, n)
            except (OSError, ConnectionError):
                with self.lock:
                    self.disconnects += 1
                sock.close()
                sock, reader = self._connect()
        sock.close()

    def _one(self, sock, reader, key: bytes, n: int) -> None:
        t0 = time.monotonic()
        reply = self._call(sock, reader, b"SET", key, str(n).encode())
        t1 = time.monotonic()
        if reply == b"OK":
            with self.lock:
                self.acked[key.decode()] = (n, t1)
        else:
            self._error(t1, reply)
        got = self._call(sock, reader, b"GET", key)
        t2 = time.monotonic()
        if isinstance(got, hiredis.ReplyError):
            self._error(t2, got)
        with self.lock:
            self.ops += 2
            if t2 - t0 > self.slowest:
                self.slowest, self.slow_at = t2 - t0, t0

    def _error(self, t: float, reply) -> None:
        with self.lock:
            self.errors.append((t, str(reply)))

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.acked)

    def error_window(self) -> float:
        if not self.errors:
            return 0.0
        times = [t for t, _ in self.errors]
        return max(times) - min(times)


def fence(primary_port: int, replicas: int) -> None:
    """Every write the primary executed so far is on `replicas` replicas (a write, then WAIT on it)."""
    c = redis.Redis(port=primary_port, socket_timeout=10)
    c.set("ha:fence", time.time())
    assert c.wait(replicas, 5000) >= replicas


def check_readable(proxy, writes: dict) -> list:
    """Keys of `writes` that the proxy does not return with their acknowledged value."""
    c = proxy.client(socket_timeout=15)
    keys = list(writes)
    missing = []
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        for k, v in zip(chunk, c.mget(chunk)):
            if v is None or int(v) != writes[k][0]:
                missing.append(k)
    return missing


def record(kind: str, **values) -> None:
    """Append a measurement for the report (VPROXY_HA_MEASURE=path)."""
    path = os.environ.get("VPROXY_HA_MEASURE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": kind, **values}) + "\n")


def failover_under_load(rset, proxy, fault: str, mode: str = "replication") -> dict:
    load = Load(proxy.port, 50).start()
    wait_for(lambda: load.ops > 2000, what="load running")
    fence(rset.primary.port, 2)
    acked = load.snapshot()
    old = rset.primary.addr
    t0 = time.monotonic()
    {"kill": rset.primary.kill, "pause": rset.primary.pause, "shutdown": rset.primary.proc.terminate}[fault]()
    # generous: a sentinel election that fails under load is retried after 2 x failover-timeout
    new = wait_for(lambda: _moved(proxy, old), timeout=60, what="a new primary")
    switched = time.monotonic() - t0
    ops = load.ops
    wait_for(lambda: load.ops > ops + 2000, timeout=30, what="load running on the new primary")
    load.stop()
    assert load.disconnects == 0
    assert check_readable(proxy, acked) == []
    after = {k: v for k, v in load.snapshot().items() if v[1] > t0 + switched}
    assert check_readable(proxy, after) == []
    unexpected = [e for _, e in load.errors if "outcome" not in e and "may or may not" not in e]
    assert unexpected == []
    result = {"fault": fault, "switch_s": round(switched, 3), "error_window_s": round(load.error_window(), 4),
              "errors": len(load.errors), "slowest_s": round(load.slowest, 3), "ops": load.ops}
    record(mode, **result)
    print("FAILOVER", mode, result)
    return {"new": new, **result}


def _moved(proxy, old: str):
    p = topology(proxy)["primary"]
    return p if p not in (None, old) else None
