"""The admin HTTP server: /metrics (Prometheus text format), /healthz, /readyz.

Off unless `admin_listen` is set. Nothing here runs per request: the collector reads the figures
the proxy keeps anyway (cmdstats.py, the pools, the router) when Prometheus scrapes.

    /metrics  every vproxy_* metric (see docs/operations.md, "Metrics")
    /healthz  200 while the process serves
    /readyz   200 when clients can be served: the command table is learned and the primary (every
              shard's primary in cluster mode) answers PING; else 503 with the reason
"""

from __future__ import annotations

from time import monotonic

from gevent.pywsgi import WSGIServer
from loguru import logger
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import __version__, hostport, resp
from .cmdstats import PROM_EDGES_US
from .errors import StartError

READY_CACHE = 0.5  # seconds a /readyz verdict is reused (load balancers poll it often)


class ProxyCollector:
    """Builds every vproxy_* metric from the app's state at scrape time."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        app = self.app
        yield from self._commands(app)
        info = GaugeMetricFamily("vproxy_info", "vproxy's version, mode and parser (always 1)",
                                 labels=["version", "mode", "parser"])
        info.add_metric([__version__, app.cfg.mode, resp.IMPL], 1)
        yield info
        yield GaugeMetricFamily("vproxy_uptime_seconds", "Seconds since vproxy started",
                                value=monotonic() - app.started)
        yield GaugeMetricFamily("vproxy_client_connections", "Client connections open now", value=len(app.clients))
        yield CounterMetricFamily("vproxy_client_connections_received", "Client connections accepted",
                                  value=app.stats.connections)
        yield CounterMetricFamily("vproxy_client_connections_rejected", "Client connections refused (max_clients)",
                                  value=app.stats.rejected)
        yield CounterMetricFamily("vproxy_requests_received", "Requests read from clients",
                                  value=app.stats.commands)
        yield CounterMetricFamily("vproxy_auth_failures", "AUTH / HELLO AUTH refused (proxy password or "
                                  "backend ACL)", value=app.stats.auth_failures)
        yield CounterMetricFamily("vproxy_tls_handshake_failures", "TLS client handshakes that failed",
                                  value=app.stats.tls_handshake_failures)
        yield CounterMetricFamily("vproxy_output_limit_disconnects", "Clients disconnected past "
                                  "client_output_buffer_limit", value=app.stats.output_limit_disconnects)
        yield from self._backends(app)
        yield CounterMetricFamily("vproxy_topology_updates", "Topology snapshots the monitor published "
                                  "(cluster map, primary and replicas)", value=app.router.publishes)
        ha = getattr(app.router.topology, "ha", None)
        yield CounterMetricFamily("vproxy_failovers", "Primary changes seen (sentinel and replication modes)",
                                  value=ha.failovers if ha is not None else 0)
        yield GaugeMetricFamily("vproxy_primary_known", "1 when a primary is known, 0 during a failover",
                                value=int(app.router.topology.primary is not None))

    def _commands(self, app):
        stats = app.cmdstats
        calls = CounterMetricFamily("vproxy_commands", "Replies written, by command", labels=["command"])
        failed = CounterMetricFamily("vproxy_command_errors", "Error replies written (from the server or vproxy), "
                                     "by command", labels=["command"])
        rejected = CounterMetricFamily("vproxy_command_rejected", "Requests vproxy refused without sending them "
                                       "(NOAUTH, wrong arity, refused commands), by command", labels=["command"])
        hist = HistogramMetricFamily("vproxy_command_duration_seconds", "Time from reading a request to "
                                     "writing its reply, by command", labels=["command"])
        for name, st in list(stats.by_name.items()):
            label = [name.decode(errors="replace")]
            calls.add_metric(label, st.calls)
            failed.add_metric(label, st.failed)
            rejected.add_metric(label, st.rejected)
            buckets = [(repr(edge / 1e6), st.below(edge)) for edge in PROM_EDGES_US]
            buckets.append(("+Inf", st.calls))
            hist.add_metric(label, buckets, st.usec / 1e6)
        yield from (calls, failed, rejected, hist)
        yield CounterMetricFamily("vproxy_unknown_commands", "Requests naming a command the backend does not know",
                                  value=stats.unknown)
        yield GaugeMetricFamily("vproxy_slowlog_length", "Entries in PROXY SLOWLOG", value=len(stats.slowlog.entries))
        hot = GaugeMetricFamily("vproxy_hotkey_requests_per_second", "The 10 most requested keys over the last "
                                "minute (sampled: hotkeys_sample)", labels=["key"])
        for key, _, rate in stats.keys.hot(10):
            hot.add_metric([key.decode(errors="replace")], rate)
        big = GaugeMetricFamily("vproxy_bigkey_bytes", "The 10 largest requests and replies seen", labels=["key", "command", "kind"])
        for size, kind, name, key in stats.keys.biggest(10):
            big.add_metric([key.decode(errors="replace"), name.decode(errors="replace"), kind], size)
        yield hot
        yield big

    def _backends(self, app):
        conns = GaugeMetricFamily("vproxy_backend_connections", "Backend connections by node and kind "
                                  "(shared: multiplexed; pinned: held by one client; idle_pinned: kept for reuse)",
                                  labels=["node", "kind"])
        inflight = GaugeMetricFamily("vproxy_backend_requests_in_flight", "Requests sent to a node, reply not in yet",
                                     labels=["node"])
        connects = CounterMetricFamily("vproxy_backend_connects", "Backend connections opened", labels=["node"])
        errors = CounterMetricFamily("vproxy_backend_errors", "Backend trouble by kind (connect: a connect "
                                     "failed; lost: a connection dropped; timeout: no reply within "
                                     "command_timeout)", labels=["node", "kind"])
        for pool in list(app.router.pools.values()):
            node = hostport.fmt(pool.addr)
            for kind, n in pool.counts().items():
                conns.add_metric([node, kind], n)
            inflight.add_metric([node], pool.in_flight())
            connects.add_metric([node], pool.connects)
            for kind, n in pool.troubles.items():
                errors.add_metric([node, kind], n)
        yield from (conns, inflight, connects, errors)


class AdminServer:
    """The admin HTTP server (a gevent WSGI server in the proxy's own process and loop)."""

    def __init__(self, app, listen: str):
        self.app = app
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(app))
        self._ready: tuple[float, bool, str] = (0.0, False, "")
        host, port = hostport.parse(listen)
        port += max(0, app.cfg.worker_index)  # workers (workers.py): worker i on the admin port + i
        listen = hostport.fmt((host, port))
        self.server = WSGIServer((host, port), self.handle, log=None, error_log=logger)
        try:  # bound now: a taken address fails the start, as the listener's does
            self.server.init_socket()
        except OSError as e:
            raise StartError(f"cannot start: admin_listen {listen}: {e.strerror or e}") from None

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address[:2]

    def start(self) -> None:
        self.server.start()
        logger.info("admin HTTP server on http://{}:{} (/metrics, /healthz, /readyz)", *self.address)

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def handle(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body = generate_latest(self.registry)
            return _reply(start_response, "200 OK", body, "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            return _reply(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            ok, why = self.ready()
            return _reply(start_response, "200 OK" if ok else "503 Service Unavailable", (why + "\n").encode())
        return _reply(start_response, "404 Not Found", b"not found: try /metrics, /healthz or /readyz\n")

    def ready(self) -> tuple[bool, str]:
        if self.app.draining:
            return False, "not ready: shutting down (draining clients)"
        at, ok, why = self._ready
        now = monotonic()
        if now - at < READY_CACHE:
            return ok, why
        ok, why = self._check()
        self._ready = (monotonic(), ok, why)
        return ok, why

    def _check(self) -> tuple[bool, str]:
        app = self.app
        if not app.commands.learned:
            return False, "not ready: the backend's command table is not read yet"
        topo = app.router.topology
        shards = getattr(topo, "shards", None)
        primaries = [s.primary for s in shards] if shards else [topo.primary]
        if not primaries or primaries[0] is None:
            return False, "not ready: no primary known (failover in progress?)"
        for addr in primaries:
            problem = _ping(addr, app.cfg)
            if problem:
                return False, f"not ready: primary {hostport.fmt(addr)} {problem}"
        return True, f"ready: {len(primaries)} primar{'y' if len(primaries) == 1 else 'ies'} answer PING"


def _ping(addr, cfg) -> str:
    """'' when the node answers PING (-NOAUTH/-BUSY/-LOADING say it is there but cannot serve)."""
    from .mux.backend import BackendConn

    conn = BackendConn(addr)
    try:
        conn.connect(cfg.connect_timeout, cfg.backend_username, cfg.backend_password, cfg=cfg)  # cfg: TLS
        reply = conn.call("PING")
    except Exception as e:  # noqa: BLE001 - BackendError, OSError ...: the reason is the answer
        return f"does not answer ({e})"
    finally:
        conn.close()
    if isinstance(reply, Exception):
        return f"answers PING with an error: {reply}"
    return ""


def _reply(start_response, status: str, body: bytes, ctype: str = "text/plain; charset=utf-8"):
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]
