"""Wiring: config -> topology, router, command table, listener, janitor; start-up learning; shutdown."""

from __future__ import annotations

import socket
from time import monotonic

import gevent
from gevent.event import Event
from loguru import logger

from . import client, hostport, tls
from .audit import Audit
from .cmdstats import CommandStats
from .commands import USERS_LOCAL, CommandTable
from .config import Config
from .embedded import EmbeddedValkey
from .errors import BackendError, ConfigError
from .gate import Gate, bind
from .mux.backend import BackendConn
from .ratelog import RateLog
from .reload import reload
from .router import Router
from .sentinel.topology import Topology
from .server import Listener, janitor
from .stats import Stats

LEARN_RETRY = 0.5
WORKER_IDS = 1_000_000_000  # worker i numbers its clients from 1 + i * WORKER_IDS


class App:
    """One running proxy."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.argv: list[str] | None = None  # the command line, read again on reload (None: sys.argv)
        self.draining = False  # stop() has begun: no new clients, the others closed between replies
        if cfg.worker_index > 0:  # client ids unique across the workers of one supervisor
            client.first_id(1 + cfg.worker_index * WORKER_IDS)
        self.embedded: EmbeddedValkey | None = None
        self.clients: dict = {}
        self.stats = Stats()
        self.commands = CommandTable()
        self.cmdstats = CommandStats(lambda name: self.commands.get(name) is not None, enabled=cfg.stats,
                                     percentiles=[float(p) for p in cfg.latency_tracking_info_percentiles.split()],
                                     slower_than_us=cfg.slowlog_log_slower_than, slowlog_len=cfg.slowlog_max_len,
                                     first_key=self._first_key, hotkeys_sample=cfg.hotkeys_sample)
        self.server_info: dict = {}
        self.databases = 16
        self.started = monotonic()
        self.greenlets: list = []
        self.serving = Event()  # set once clients may be served (see start)
        self.user_sessions: dict = {}  # Credentials -> sessions running as that backend user (users.py)
        self.users_gone = False  # a user lost its last session: the janitor closes its connections
        self.limit_log = RateLog()  # clients dropped or slowed by a limit (output buffer, rate, pipeline)
        self.gate: Gate | None = None  # users at the proxy (gate.py), when `users` is set
        self.set_gate()
        self.tls_failures = RateLog()  # failed TLS handshakes of clients, logged at most once per 5 s
        # bound first: a taken address must fail the start before an embedded server exists
        self.listener = Listener(self)
        self.admin = self.fleet = self.peer_listener = None
        try:
            if cfg.fleet:
                self._join_fleet()
            if cfg.admin_listen:
                from .metrics import AdminServer
                self.admin = AdminServer(self, cfg.admin_listen)
            self.seeds = self._backends()
        except BaseException:
            self.listener.close()
            if self.admin is not None:
                self.admin.stop()
            if self.peer_listener is not None:
                self.peer_listener.close()
            raise
        self.router = Router(cfg, Topology(cfg.mode, self.seeds[0] if cfg.mode == "standalone" else None))
        self.audit = Audit(cfg, self.commands, cfg.audit_node)
        self.audit.clients = self.clients  # PROXY AUDIT ON/OFF: each client's plain path records or not
        if cfg.audit_dir:
            self.audit.start()
        self.monitor = _monitor_for(cfg.mode)(self)
        if cfg.mode == "cluster":
            from .cluster.session import PRE, ClusterSession
            self.commands.set_session_first(frozenset(PRE))
            self.listener.session_class = ClusterSession
        elif self.router.ha:
            from .client import HASession
            self.listener.session_class = HASession
        if self.peer_listener is not None:
            self.peer_listener.session_class = self.listener.session_class

    def set_gate(self) -> None:
        """Users at the proxy from the settings (start, reload). On reload every session runs at once
        with its user's new rules; a session whose user is gone or off is closed (as the server
        closes the connections of a deleted user)."""
        cfg = self.cfg
        self.commands.narrowed.clear()  # the old users' caches
        self.gate = Gate(cfg) if cfg.users else None
        self.commands.set_local(USERS_LOCAL if self.gate is not None else frozenset())
        for s in list(self.clients.values()):
            old = s.proxy_user
            if self.gate is None:
                if old is not None:
                    bind(s, None)
            elif not s.authed:
                self.gate.start(s)
            else:  # the same user with its new rules (a session from before the gate: the default user)
                new = self.gate.users.get(old.name if old is not None else "default")
                if new is not None and new.enabled:
                    bind(s, new)
                else:
                    _close_client(s)

    def _join_fleet(self) -> None:
        """fleet = true: a listener for the peers' questions and the heartbeats (fleet.py)."""
        import random

        from .fleet import Fleet, advertised_host
        cfg = self.cfg
        if cfg.fleet_listen:
            host, port = hostport.parse(cfg.fleet_listen)
        else:  # the client listen host, a free port
            host, port = hostport.parse(cfg.listen or cfg.tls_listen)[0], 0
        self.peer_listener = Listener(self, (host, port))
        self.fleet = Fleet(self, (advertised_host(host), self.peer_listener.address[1]))
        client.first_id(1 + (random.randrange(1, 1 << 30) << 24))  # client ids unique across the fleet

    def _first_key(self, name: bytes) -> int:
        """The position of a command's first key (0: none), for PROXY HOTKEYS and BIGKEYS."""
        cmd = self.commands.get(name)
        return cmd.first_key if cmd is not None and cmd.first_key > 0 else 0

    def _backends(self) -> list[tuple[str, int]]:
        """The configured backends, or the embedded server started here (stopped again if it fails)."""
        backends = [hostport.parse(b) for b in self.cfg.backend]
        if backends or self.cfg.mode != "standalone":  # embedded is standalone-only and backend-less
            return backends
        self.embedded = EmbeddedValkey()
        try:
            self.embedded.wait_ready()
        except BaseException:
            self.embedded.stop()
            raise
        logger.info("embedded valkey-server on 127.0.0.1:{}", self.embedded.port)
        return [self.embedded.addr]

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    def start(self) -> None:
        """Accept clients now; serve them once the command table is read or startup_wait has passed."""
        self.greenlets = [gevent.spawn(janitor, self), gevent.spawn(self.learn)]
        if self.monitor is not None:
            self.greenlets.append(gevent.spawn(self.monitor.run))
        wait = self.cfg.startup_wait
        if wait > 0:
            self.greenlets.append(gevent.spawn_later(wait, self._serve_anyway))
        else:
            self.serving.set()
        self.listener.start()
        if self.admin is not None:
            self.admin.start()
        if self.fleet is not None:
            self.peer_listener.start()
            self.fleet.start()
        lst = self.listener
        where = [hostport.fmt(a) + tag for a, tag in ((lst.plain_address, ""), (lst.tls_address, " (TLS)")) if a]
        logger.info("vproxy listening on {} ({} mode)", ", ".join(where), self.cfg.mode)

    def reload(self) -> dict:
        """SIGHUP and PROXY RELOAD (reload.py): the settings read again, the live ones applied."""
        return reload(self)

    def reload_tls(self) -> None:
        """Every reload (SIGHUP, PROXY RELOAD): read the TLS certificates, keys and CAs again, for
        connections made from now on (both sides). A file that cannot be read keeps the ones in use,
        and says so."""
        try:
            server = tls.server_context(self.cfg)
            tls.reload_backend(self.cfg)
        except ConfigError as e:
            logger.error("TLS certificates not reloaded (those in use stay): {}", e)
            return
        if server is not None:
            self.listener.tls_context = server
        if server is not None or self.cfg.backend_tls:
            logger.info("TLS certificates reloaded")

    def _serve_anyway(self) -> None:
        if not self.serving.is_set():
            logger.warning("serving clients with the built-in command table: the backend's was not read "
                           "within {:g}s (startup_wait)", self.cfg.startup_wait)
            self.serving.set()

    def learn(self) -> None:
        """Read the backend's COMMAND table, database count and identity; retry until it answers."""
        attempts = 0
        while True:
            addr = self.router.topology.primary
            if addr is None:  # no primary known yet: look again as soon as the monitor publishes one
                self.router.changed.wait(LEARN_RETRY)
                continue
            conn = BackendConn(addr)
            try:
                conn.connect(self.cfg.connect_timeout, self.cfg.backend_username, self.cfg.backend_password,
                             cfg=self.cfg)
                self._learn_from(conn)
                self.serving.set()
                return
            except (BackendError, OSError, ValueError) as e:
                if attempts % 60 == 0:  # once, then every ~30 s: a down backend must not flood the log
                    logger.warning("cannot read the backend's command table yet (built-in table in use): {}", e)
                attempts += 1
            finally:
                conn.close()
            gevent.sleep(LEARN_RETRY)

    def _learn_from(self, conn: BackendConn) -> None:
        n = self.commands.learn(conn.call("COMMAND"))
        if self.gate is not None:
            self.gate.relearned()
        info = conn.call("INFO", "server")
        if isinstance(info, bytes):
            fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
            self.server_info = {"server": fields.get("server_name", "redis"),
                                "version": fields.get("valkey_version", fields.get("redis_version", ""))}
        dbs = conn.call("CONFIG", "GET", "databases")
        if isinstance(dbs, list) and len(dbs) == 2:
            self.databases = int(dbs[1])
        logger.info("learned {} commands; backend {} {}; {}", n, self.server_info.get("server"),
                    self.server_info.get("version"), self._databases_said())

    def _databases_said(self) -> str:
        """How many databases clients can SELECT, and who provides them (see cluster/namespaces.py for a cluster)."""
        if self.cfg.mode != "cluster":
            return f"{self.databases} databases"
        native = getattr(self.router.topology, "databases", 1)
        if native <= 1 and self.databases <= 1:
            return "1 database"
        if native > 1:
            return f"{native} databases (the cluster's own, cluster-databases)"
        return (f"{self.databases} databases (the cluster serves db 0; 1-{self.databases - 1} are emulated "
                "by vproxy as key namespaces)")

    def stop(self, drain: float | None = None) -> None:
        """Stop accepting; close each client between two replies (as soon as it has nothing in
        flight and nothing unwritten), the last ones when `drain` (drain_timeout) seconds are up;
        then close everything. /readyz says 503 meanwhile."""
        self.draining = True
        self.listener.stop()
        if self.fleet is not None:
            self.fleet.stop()
            self.peer_listener.stop()
        deadline = monotonic() + (self.cfg.drain_timeout if drain is None else drain)
        while self.clients and monotonic() < deadline:
            for s in list(self.clients.values()):
                if (s.batch is None or not s.batch.left) and s.outbox.idle():
                    _close_client(s)
            if self.clients:
                gevent.sleep(0.02)
        if self.clients:
            logger.warning("drain_timeout: closing {} client(s) with replies in flight", len(self.clients))
        for s in list(self.clients.values()):
            _close_client(s)
        if self.admin is not None:
            self.admin.stop()
        if self.monitor is not None:
            self.monitor.stop()
        gevent.killall(self.greenlets)
        self.audit.close()
        self.router.close()
        if self.embedded is not None:
            self.embedded.stop()


def _close_client(s) -> None:
    s.closing = True
    try:  # shutdown, not close: a greenlet parked in _intake sees EOF and closes its socket
        s.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.app.clients.pop(s.id, None)


def _monitor_for(mode: str):
    """The topology monitor class of a mode (standalone has none: its one server never changes).

    A monitor is built with the App, runs in one greenlet (`run`), publishes immutable Topology
    snapshots with `app.router.publish(...)`, and is told to `stop()` at shutdown.
    """
    if mode == "standalone":
        return lambda app: None
    if mode == "cluster":
        from .sentinel.cluster import ClusterMonitor
        return ClusterMonitor
    if mode == "sentinel":
        from .sentinel.sentinel import SentinelMonitor
        return SentinelMonitor
    from .sentinel.replication import ReplicationMonitor
    return ReplicationMonitor
