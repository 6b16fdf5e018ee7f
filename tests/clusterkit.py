"""Real clusters for the cluster tests: N primaries (and R replicas each) of valkey-server or Redis 7
on free ports, joined from Python (CLUSTER MEET / ADDSLOTSRANGE / REPLICATE), polled until
`cluster_state:ok` everywhere; every process is stopped by its pid."""

from __future__ import annotations

import socket

import redis
from conftest import Server, wait_for

SLOTS = 16384


class Cluster:
    """A running cluster: `primaries`, `replicas`, and `nodes` (all of them) as conftest Servers."""

    def __init__(self, kind: str = "valkey", primaries: int = 3, replicas: int = 0, *extra: str):
        self.kind = kind
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1500", "--cluster-require-full-coverage", "no", *extra)
        if kind == "valkey":
            args += ("--cluster-allow-replica-migration", "no")
        self.nodes: list[Server] = []
        try:
            for _ in range(primaries * (1 + replicas)):
                self.nodes.append(Server(kind, cluster_port(), *args))
            self.primaries = self.nodes[:primaries]
            self.replicas = self.nodes[primaries:]
            self._join(replicas)
        except BaseException:
            self.stop()
            raise

    @property
    def seeds(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def _join(self, replicas: int) -> None:
        first = self.nodes[0].client()
        for n in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
        per = SLOTS // len(self.primaries)
        for i, p in enumerate(self.primaries):
            end = SLOTS - 1 if i == len(self.primaries) - 1 else (i + 1) * per - 1
            p.client().execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, end)
        wait_for(lambda: all(len(self.known(n)) == len(self.nodes) for n in self.nodes), 20,
                 "every node to know every other")
        for j, rep in enumerate(self.replicas):
            prim = self.primaries[j % len(self.primaries)]
            pid = self.node_id(prim)
            wait_for(lambda rep=rep, pid=pid: rep.client().execute_command("CLUSTER", "REPLICATE", pid), 20,
                     f"replica {rep.port} to follow {prim.port}")
        self.wait_ok()

    def wait_ok(self, nodes=None, timeout: float = 30) -> None:
        """Every (living) node says cluster_state:ok and sees every slot owned."""
        nodes = nodes or self.nodes
        wait_for(lambda: all(self.state_ok(n) for n in nodes), timeout, "cluster_state:ok on every node")
        if self.replicas:
            wait_for(lambda: all(r.client().info("replication").get("master_link_status") == "up"
                                 for r in self.replicas if r in nodes), timeout, "replicas in sync")

    @staticmethod
    def state_ok(n: Server) -> bool:
        info = n.client().execute_command("CLUSTER", "INFO")
        info = info.decode() if isinstance(info, bytes) else info
        return "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info

    @staticmethod
    def node_id(n: Server) -> str:
        v = n.client().execute_command("CLUSTER", "MYID")
        return v.decode() if isinstance(v, bytes) else v

    @staticmethod
    def known(n: Server) -> list[str]:
        text = n.client().execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else text
        return [line for line in text.splitlines() if line and "handshake" not in line and "noaddr" not in line]

    def owner(self, key) -> Server:
        """The primary that owns key's slot right now (asked of the cluster itself)."""
        slot = self.primaries[0].client().execute_command("CLUSTER", "KEYSLOT", key)
        for p in self.nodes:
            if p.proc.poll() is None and _owns(p, slot):
                return p
        raise AssertionError(f"no owner for slot {slot}")

    def client_for(self, key) -> redis.Redis:
        return self.owner(key).client()

    def flushall(self) -> None:
        for p in self.nodes:
            if p.proc.poll() is None:
                try:
                    p.client().flushall()
                except redis.ReadOnlyError:
                    pass  # a replica: it follows its primary

    def all_keys(self) -> list[bytes]:
        out = []
        for p in self.nodes:
            if p.proc.poll() is None and p.client().info("replication")["role"] == "master":
                out += p.client().keys("*")
        return out

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 10000 > 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
        return port


def _owns(p: Server, slot: int) -> bool:
    for entry in p.client().execute_command("CLUSTER", "SLOTS"):
        if entry[0] <= slot <= entry[1]:
            return entry[2][1] == p.port
    return False
