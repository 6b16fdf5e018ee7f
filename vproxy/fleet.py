"""The fleet (`fleet = true`): vproxy processes in front of the same backend that know each other.

No new service and nothing in the user's keyspace: every node PUBLISHes a heartbeat on the pub/sub
channel `__vproxy__:fleet` of the backend (in cluster mode a PUBLISH reaches every node) once per
`fleet_interval`, and listens on it. A heartbeat carries the node's id, the address where it
answers its peers (a second RESP listener of its own: workers share the client port, so each needs
an address of its own), its version, uptime, clients and requests served. A node whose heartbeat
is older than three intervals has left.

Through any node:
    CLIENT LIST            this node's clients and every live peer's, each line with proxy=<node>
    CLIENT LIST LOCAL      this process's only
    CLIENT KILL ID n|ADDR  the client wherever it is
    PROXY NODES            the live nodes: address, version, uptime, clients, requests/s
    INFO proxy             fleet_nodes, fleet_clients, fleet_ops_per_sec, fleet_unreachable

Peers are asked over RESP (PROXY CLIENTS-LOCAL, PROXY KILL-LOCAL: answered by that node alone, so
a question never travels further), with `fleet_password` (as the user vproxy-fleet when vproxy has
users), else the proxy's `password` when one is set. A peer that does not
answer within a second is left out of the answer, logged and counted (fleet_unreachable).
"""

from __future__ import annotations

import json
import os
import random
import socket
from time import monotonic, time

import gevent
from loguru import logger

from . import __version__, hostport, resp
from .errors import BackendError
from .gate import FLEET_USER
from .mux.backend import BackendConn
from .ratelog import RateLog

CHANNEL = b"__vproxy__:fleet"
ASK_TIMEOUT = 1.0


def advertised_host(listen_host: str) -> str:
    """The host peers can reach this node at: the listen host, or this machine's address when
    vproxy listens on every interface."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Fleet:
    def __init__(self, app, peer_address: tuple[str, int]):
        self.app = app
        self.address = peer_address  # where this node answers its peers
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.peers: dict[str, dict] = {}  # node id -> its latest heartbeat, plus "seen" (monotonic)
        self.unreachable = 0  # peers that did not answer a question in time (since start)
        self.events = RateLog()
        self.greenlets: list = []
        self._last_ops: tuple[float, int] | None = None

    @property
    def name(self) -> str:
        """This node as CLIENT LIST's proxy= field shows it."""
        worker = self.app.cfg.worker_index
        return hostport.fmt(self.address) + (f"/{worker}" if worker >= 0 else "")

    def start(self) -> None:
        self.greenlets = [gevent.spawn(self._publish), gevent.spawn(self._listen)]

    def stop(self) -> None:
        gevent.killall(self.greenlets, block=False)

    # ---- heartbeats ----

    def heartbeat(self) -> dict:
        app = self.app
        return {"id": self.node_id, "addr": hostport.fmt(self.address), "name": self.name,
                "version": __version__, "uptime": int(monotonic() - app.started), "clients": self.clients(),
                "commands": app.stats.commands, "at": time()}

    def clients(self) -> int:
        """This process's clients (the peers' questions are not clients)."""
        return sum(1 for s in list(self.app.clients.values()) if not s.peer)

    def _backend(self) -> BackendConn:
        addr = self.app.router.topology.primary
        if addr is None:
            raise BackendError("no primary known")
        cfg = self.app.cfg
        conn = BackendConn(addr)
        conn.connect(cfg.connect_timeout, cfg.backend_username, cfg.backend_password)
        return conn

    def _publish(self) -> None:
        conn = None
        while True:
            try:
                if conn is None:
                    conn = self._backend()
                conn.call("PUBLISH", CHANNEL, json.dumps(self.heartbeat()))
            except (BackendError, OSError, ValueError) as e:
                self.events.log("publish", "WARNING", f"fleet: cannot publish the heartbeat ({e})")
                if conn is not None:
                    conn.close()
                conn = None
            gevent.sleep(self.app.cfg.fleet_interval)

    def _listen(self) -> None:
        while True:
            conn = None
            try:
                conn = self._backend()
                conn.send(resp.encode_request([b"SUBSCRIBE", CHANNEL]))
                while True:
                    frames = conn.read_frames()
                    if not frames:
                        raise BackendError("connection closed by backend")
                    for frame in frames:
                        self._heard(resp.decode(frame))
            except (BackendError, OSError, ValueError) as e:
                self.events.log("listen", "WARNING", f"fleet: cannot hear the other nodes ({e})")
            finally:
                if conn is not None:
                    conn.close()
            gevent.sleep(self.app.cfg.fleet_interval)

    def _heard(self, msg) -> None:
        if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message"):
            return
        try:
            beat = json.loads(msg[2])
        except ValueError:
            return
        if not isinstance(beat, dict) or beat.get("id") in (None, self.node_id):
            return
        old = self.peers.get(beat["id"])
        if old is None:
            logger.info("fleet: node {} joined ({})", beat.get("name"), beat.get("addr"))
        else:
            dt = beat.get("at", 0) - old.get("at", 0)
            beat["ops"] = round((beat.get("commands", 0) - old.get("commands", 0)) / dt, 1) if dt > 0 else old.get("ops", 0)
        beat["seen"] = monotonic()
        self.peers[beat["id"]] = beat

    def live(self) -> list[dict]:
        """The peers heard from within three heartbeat intervals (the others have left)."""
        horizon = monotonic() - 3 * self.app.cfg.fleet_interval
        for node_id, beat in list(self.peers.items()):
            if beat["seen"] < horizon:
                del self.peers[node_id]
                logger.info("fleet: node {} left (no heartbeat for {:g}s)", beat.get("name"),
                            3 * self.app.cfg.fleet_interval)
        return list(self.peers.values())

    def ops(self) -> float:
        """This node's requests per second, since the last time it was asked."""
        now, n = monotonic(), self.app.stats.commands
        last, self._last_ops = self._last_ops, (now, n)
        return round((n - last[1]) / (now - last[0]), 1) if last and now > last[0] else 0.0

    # ---- asking the peers ----

    def ask_all(self, *args) -> list[tuple[dict, object]]:
        """Send one request to every live peer at once; (peer, reply) for those that answered."""
        peers = self.live()
        jobs = [gevent.spawn(self._ask, p, args) for p in peers]
        gevent.joinall(jobs, timeout=ASK_TIMEOUT + 0.5)
        out = []
        for p, job in zip(peers, jobs):
            value = job.value if job.successful() else None
            if value is None or isinstance(value, Exception):
                self.unreachable += 1
                why = job.exception or value or "no answer in time"
                self.events.log("ask", "WARNING", f"fleet: node {p.get('name')} ({p.get('addr')}) did not answer: {why}")
                job.kill(block=False)
                continue
            out.append((p, value))
        return out

    def _ask(self, peer: dict, args: tuple):
        conn = BackendConn(hostport.parse(peer["addr"]))  # a peer speaks RESP as a server does
        try:
            with gevent.Timeout(ASK_TIMEOUT, TimeoutError("no answer within 1s")):
                conn.connect(ASK_TIMEOUT, handshake=False)
                cfg = self.app.cfg
                if cfg.fleet_password and self.app.gate is not None:
                    conn.call("AUTH", FLEET_USER, cfg.fleet_password)
                elif cfg.password:
                    conn.call("AUTH", cfg.password)
                return conn.call(*args)
        finally:
            conn.close()


