"""The client listener (gevent StreamServer, a greenlet per client) and the janitor greenlet."""

from __future__ import annotations

import socket
from time import monotonic

import gevent
from gevent.server import StreamServer
from loguru import logger

from . import hostport, tls, users
from .client import ClientSession, tls_session
from .errors import StartError
from .sockio import close_quietly

JANITOR_PERIOD = 0.1


class Listener:
    """Accepts clients, plain ones on `listen` and TLS ones on `tls_listen`, and runs one
    ClientSession greenlet each."""

    def __init__(self, app, address: tuple[str, int] | None = None):
        """address: another listener than the client one (the fleet's peer listener)."""
        self.app = app
        cfg = app.cfg
        # workers (workers.py) share the client ports: the kernel spreads connections over them
        reuse = cfg.worker_index >= 0 and address is None
        self.session_class = ClientSession  # cluster: cluster.session.ClusterSession; HA: client.HASession
        self.peers_only = address is not None  # the fleet's peer listener: its sessions are not clients
        # first: a bad certificate fails the start (the peer listener is plain)
        self.tls_context = tls.server_context(cfg) if address is None else None
        self.servers: list[StreamServer] = []
        self.plain_address = self.tls_address = None
        try:
            if address is not None or cfg.listen:
                sock = _bound(*(address or hostport.parse(cfg.listen)), reuse_port=reuse)
                self.servers.append(StreamServer(sock, self.handle))
                self.plain_address = sock.getsockname()[:2]
            if self.tls_context is not None:
                sock = _bound(*hostport.parse(cfg.tls_listen), reuse_port=reuse)
                self.servers.append(StreamServer(sock, self.handle_tls))
                self.tls_address = sock.getsockname()[:2]
        except BaseException:
            self.close()
            raise
        self.address = self.plain_address or self.tls_address  # what vproxy calls its own (CLUSTER NODES)

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop(timeout=0)

    def close(self) -> None:
        """Give the addresses back without ever having served (a start that failed)."""
        for server in self.servers:
            server.close()

    def handle_tls(self, sock, addr) -> None:
        """A TLS client: the handshake first (within connect_timeout), then a session with no plain
        path (tls.py says why)."""
        try:
            sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            with gevent.Timeout(self.app.cfg.connect_timeout):
                sock.do_handshake()
        except (OSError, gevent.Timeout) as e:  # ssl.SSLError is an OSError
            self.app.stats.tls_handshake_failures += 1
            self.app.tls_failures.log("handshake", "INFO", f"TLS client {hostport.fmt(addr)}: handshake failed "
                                      f"({e if isinstance(e, OSError) else 'timed out'})")
            close_quietly(sock)
            return
        self.handle(sock, addr, tls_session(self.session_class))

    def handle(self, sock, addr, session_class=None) -> None:
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
        session = (session_class or self.session_class)(app, sock, addr)
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
        raise StartError(f"cannot listen on {hostport.fmt((host, port))}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def janitor(app) -> None:
    """The one periodic actor: command timeouts and idle clients."""
    while True:
        gevent.sleep(JANITOR_PERIOD)
        try:
            now = monotonic()
            app.router.expire(now)
            users.sweep(app)
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
