"""The client listener (gevent StreamServer, a greenlet per client) and the janitor greenlet."""

from __future__ import annotations

import socket
from time import monotonic

import gevent
from gevent.server import StreamServer
from loguru import logger

from .client import ClientSession
from .config import parse_addr
from .errors import StartError

JANITOR_PERIOD = 0.1


class Listener:
    """Accepts clients and runs one ClientSession greenlet each."""

    def __init__(self, app, address: tuple[str, int] | None = None):
        """address: another listener than the client one (the fleet's peer listener)."""
        self.app = app
        # workers (workers.py) share the port: the kernel spreads connections over them
        sock = _bound(*address, reuse_port=False) if address else \
            _bound(*parse_addr(app.cfg.listen), reuse_port=app.cfg.worker_index >= 0)
        self.server = StreamServer(sock, self.handle)
        self.session_class = ClientSession  # cluster: csession.ClusterSession; HA: client.HASession
        self.peers_only = address is not None  # the fleet's peer listener: its sessions are not clients
        self.address = sock.getsockname()[:2]

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(timeout=0)

    def close(self) -> None:
        """Give the address back without ever having served (a start that failed)."""
        self.server.close()

    def handle(self, sock, addr) -> None:
        app = self.app
        app.stats.connections += 1
        if len(app.clients) >= app.cfg.max_clients:
            app.stats.rejected += 1
            try:
                sock.sendall(b"-ERR max number of clients reached\r\n")
            finally:
                sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = self.session_class(app, sock, addr)
        session.peer = self.peers_only
        app.clients[session.id] = session
        # Accepted (and listed) at once, served once the command table is read or startup_wait has
        # passed: a request routed with the built-in table could be answered differently.
        app.serving.wait()
        session.run()


def _bound(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket on host:port; StartError naming the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise StartError(f"cannot listen on {shown}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def janitor(app) -> None:
    """The one periodic actor: command timeouts and idle clients."""
    while True:
        gevent.sleep(JANITOR_PERIOD)
        try:
            now = monotonic()
            app.router.expire(now)
            idle = app.cfg.client_idle_timeout
            if idle:
                for s in list(app.clients.values()):
                    if (s.batch is not None and s.batch.left) or s.outbox.left:  # waiting for a reply (BLPOP ...): not idle
                        s.last_active = now
                    elif s.stream is None and now - s.last_active > idle:
                        s.closing = True
                        try:
                            s.sock.shutdown(socket.SHUT_RDWR)
                        except OSError:  # gone already: the rest still get their check
                            pass
        except Exception:  # the janitor must outlive any one bad tick
            logger.exception("janitor tick failed")
