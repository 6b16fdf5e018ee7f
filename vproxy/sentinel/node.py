"""The monitors' own control connection to one node (server, sentinel, cluster node), and what INFO says.

The monitor never borrows the proxy's client-facing connections (mux/): its probes must keep
working, and time out on their own, while those are busy, broken or paused.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import gevent
import hiredis

from .. import hostport, resp, tls
from ..sockio import close_quietly


class NodeError(Exception):
    """A control query failed: unreachable, timed out, closed, or the node answered an error."""


class NodeBusy(NodeError):
    """The node answered -BUSY: a script or function runs past busy-reply-threshold. It is alive."""


class NodeLink:
    """One request/response control connection to a server or a sentinel, (re)connected on demand.

    Connected on first use and again on the next call after any failure (which closes it). TLS when
    the settings say backend_tls; AUTH with the `who`_username / `who`_password settings ("backend"
    or "sentinel"), read at each connect, so a reload's new credentials apply to the next connection.
    Every call, connect included, has a deadline of `timeout` seconds.
    """

    def __init__(self, addr: tuple[str, int], timeout: float, cfg=None, who: str = "backend"):
        """cfg: the settings (TLS, credentials); None: plain TCP, no AUTH."""
        self.addr, self.timeout, self.cfg, self.who = addr, timeout, cfg, who
        self.sock: socket.socket | None = None
        self.framer = resp.ReplyFramer()
        self.pending: list[bytes] = []  # frames read past the ones asked for (pushed messages)

    @property
    def name(self) -> str:
        return hostport.fmt(self.addr)

    def send(self, *args) -> None:
        """Send without reading (SUBSCRIBE: its replies are read as pushes)."""
        try:
            if self.sock is None:
                with gevent.Timeout(self.timeout, NodeError(f"{self.name}: connect timed out")):
                    self._connect()
            self.sock.sendall(resp.encode_request(args))
        except OSError as e:
            self.close()
            raise NodeError(f"{self.name}: {e}") from None

    def call(self, *args):
        """One command; its decoded reply (a server error raises NodeError, -BUSY NodeBusy)."""
        return self.pipeline([args])[0]

    def query(self, *args):
        """One command; its decoded reply, a server error returned as a value (hiredis.ReplyError)."""
        return self.pipeline([args], check=False)[0]

    def pipeline(self, cmds: list, check: bool = True) -> list:
        """Several commands in one round trip; decoded replies in order (check: a server error raises)."""
        try:
            with gevent.Timeout(self.timeout, NodeError(f"{self.name}: no answer in {self.timeout:g}s")):
                if self.sock is None:
                    self._connect()
                self.sock.sendall(b"".join(resp.encode_request(c) for c in cmds))
                frames = self._read(len(cmds))
        except (OSError, ValueError, NodeError) as e:
            self.close()
            raise e if isinstance(e, NodeError) else NodeError(f"{self.name}: {e}") from None
        out = [resp.decode(f) for f in frames]
        for v in out if check else ():
            if isinstance(v, hiredis.ReplyError):
                raise (NodeBusy if str(v).startswith("BUSY") else NodeError)(f"{self.name}: {v}")
        return out

    def _credentials(self) -> tuple[str, str]:
        cfg = self.cfg
        if cfg is None:
            return "", ""
        return getattr(cfg, f"{self.who}_username", ""), getattr(cfg, f"{self.who}_password", "")

    def _connect(self) -> None:
        self.framer = resp.ReplyFramer()
        self.pending = []
        self.sock = socket.create_connection(self.addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.cfg is not None and self.cfg.backend_tls:  # cluster nodes then answer with their TLS ports
            self.sock = tls.wrap_backend(self.sock, self.cfg, self.addr[0])
        username, password = self._credentials()
        if password:
            auth = ["AUTH", username, password] if username else ["AUTH", password]
            self.sock.sendall(resp.encode_request(auth))
            v = resp.decode(self._read(1)[0])
            if isinstance(v, hiredis.ReplyError):
                raise NodeError(f"{self.name}: AUTH failed: {v}")

    def _read(self, n: int) -> list[bytes]:
        frames = self.pending
        while len(frames) < n:
            data = self.sock.recv(262144)
            if not data:
                raise NodeError(f"{self.name}: connection closed")
            frames += self.framer.feed(data)
        self.pending = frames[n:]
        return frames[:n]

    def read_push(self, timeout: float | None):
        """Stream mode (after SUBSCRIBE): the next pushed message, or None when timeout passes first."""
        if self.sock is None:
            raise NodeError(f"{self.name}: not connected")
        try:
            with gevent.Timeout(timeout, False):
                return resp.decode(self._read(1)[0])
        except (OSError, ValueError, NodeError) as e:
            self.close()
            raise NodeError(f"{self.name}: {e}") from None
        return None

    def close(self) -> None:
        sock, self.sock = self.sock, None
        close_quietly(sock)


@dataclass
class NodeInfo:
    """One node's answer to ROLE + INFO server/replication/persistence."""

    addr: tuple[str, int]
    role: str  # 'master' or 'slave' (as ROLE says)
    run_id: str = ""
    offset: int = 0  # master_repl_offset (primary) or slave_repl_offset (replica)
    master: tuple[str, int] | None = None  # a replica's primary
    link_up: bool = False  # a replica's master_link_status
    last_io: float | None = None  # a replica's master_last_io_seconds_ago
    loading: bool = False
    priority: int = 100  # replica-priority; 0 means never promote
    replid: str = ""
    replid2: str = ""
    replicas: dict = field(default_factory=dict)  # a primary's view: addr -> (offset, lag seconds)

    @property
    def is_master(self) -> bool:
        return self.role == "master"


def probe(link: NodeLink) -> NodeInfo:
    """Ask a server who it is (ROLE, verified and detailed by INFO); raises NodeError."""
    role, info = link.pipeline([("ROLE",), ("INFO", "server", "replication", "persistence")])
    fields = _fields(info)
    ni = NodeInfo(link.addr, _text(role[0]) if isinstance(role, list) and role else fields.get("role", "?"))
    ni.run_id = fields.get("run_id", "")
    ni.loading = fields.get("loading") == "1"
    ni.priority = int(fields.get("slave_priority", fields.get("replica_priority", "100")) or 100)
    ni.replid, ni.replid2 = fields.get("master_replid", ""), fields.get("master_replid2", "")
    if ni.is_master:
        ni.offset = int(fields.get("master_repl_offset", "0") or 0)
        ni.replicas = _replica_lines(fields)
    else:
        ni.offset = int(fields.get("slave_repl_offset", "0") or 0)
        host, port = fields.get("master_host"), fields.get("master_port", "")
        ni.master = (host, int(port)) if host and port.isdigit() else None
        ni.link_up = fields.get("master_link_status") == "up"
        io = fields.get("master_last_io_seconds_ago", "-1")
        ni.last_io = float(io) if io.lstrip("-").isdigit() and int(io) >= 0 else None
    return ni


def busy_role(link: NodeLink) -> str:
    """The role ('master' or 'slave', as ROLE says) of a node busy with a script: HELLO is among the
    few commands such a node still answers (ROLE and INFO get -BUSY)."""
    hello = link.call("HELLO")
    fields = dict(zip(hello[::2], hello[1::2])) if isinstance(hello, list) else {}
    return "master" if fields.get(b"role") == b"master" else "slave"


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _fields(info) -> dict:
    return dict(line.split(":", 1) for line in _text(info).splitlines() if ":" in line and not line.startswith("#"))


def _replica_lines(fields: dict) -> dict:
    """slaveN:ip=...,port=...,state=online,offset=...,lag=... -> {addr: (offset, lag)} (online only)."""
    out = {}
    for k, v in fields.items():
        if not (k.startswith("slave") and k[5:].isdigit()):
            continue
        kv = dict(p.split("=", 1) for p in v.split(",") if "=" in p)
        if kv.get("state") == "online" and kv.get("port", "").isdigit():
            out[(kv.get("ip", ""), int(kv["port"]))] = (int(kv.get("offset", 0)), float(kv.get("lag", 0)))
    return out
