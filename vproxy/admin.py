"""The proxy's own view: the INFO `# Proxy` section, CLIENT LIST/KILL/UNBLOCK, the PROXY command."""

from __future__ import annotations

import os
import resource
from time import monotonic, time

from . import __version__, audit, auditfmt, cmdstats, hostport, outbox, resp
from .commands import AUDIT_CLASSES
from . import errors as E
from . import transaction as tx
from .users import user_name
from .handler import Session


def proxy_section(app) -> str:
    """INFO's `# Proxy` section: what vproxy holds right now."""
    counts = {"shared": 0, "pinned": 0, "idle_pinned": 0}
    for pool in app.router.pools.values():
        for k, v in pool.counts().items():
            counts[k] += v
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fields = {
        "proxy_version": __version__,
        "proxy_impl": resp.IMPL,  # the RESP parser and framer: "compiled" (vproxy/_resp.pyx) or "pure"
        "proxy_stats_impl": cmdstats.IMPL if app.cmdstats.enabled else "off",  # vproxy/_stats.pyx or pure
        "proxy_plain_impl": outbox.IMPL,  # the plain path's per-request code: vproxy/_plain.pyx or pure
        # the audit log's recorder (vproxy/_audit.pyx) and its writer's formatter (vproxy/_auditfmt.pyx)
        "proxy_audit_impl": audit.IMPL if audit.IMPL == auditfmt.IMPL else f"{audit.IMPL},{auditfmt.IMPL}",
        "proxy_mode": app.cfg.mode,
        "proxy_pid": os.getpid(),
        "proxy_uptime_in_seconds": int(monotonic() - app.started),
        "proxy_backends": ",".join(_backend_names(app)),
        "connected_clients": len(app.clients),
        "total_connections_received": app.stats.connections,
        "rejected_connections": app.stats.rejected,
        "total_commands_processed": app.stats.commands,
        "auth_failures": app.stats.auth_failures,
        "tls_connected_clients": sum(1 for c in app.clients.values() if c.tls),
        "tls_handshake_failures": app.stats.tls_handshake_failures,
        "output_limit_disconnects": app.stats.output_limit_disconnects,
        "proxy_users": len(app.gate.users) if app.gate is not None else 0,
        "acl_denied": app.stats.acl_denied,
        "rate_limited": app.stats.rate_limited,
        "pipeline_limited": app.stats.pipeline_limited,
        "backend_users": len(app.user_sessions),  # client ACL users with sessions (users.py)
        "backend_connections_shared": counts["shared"],
        "backend_connections_pinned": counts["pinned"],
        "backend_connections_idle_pinned": counts["idle_pinned"],
        "backend_connections_total": counts["shared"] + counts["pinned"] + counts["idle_pinned"],
        "backend_connects": sum(p.connects for p in app.router.pools.values()) + app.router.retired[0],
        "backend_connect_failures": sum(p.failures for p in app.router.pools.values()) + app.router.retired[1],
        "max_pinned": app.cfg.max_pinned,
        "pool_size": app.cfg.pool_size,
        "commands_learned": int(app.commands.learned),
        "peak_rss_kb": rss_kb,
    }
    fields.update(ha_fields(app))
    fields.update(fleet_fields(app))
    fields.update(app.audit.fields())
    return "# Proxy\r\n" + "".join(f"{k}:{v}\r\n" for k, v in fields.items())


# INFO sections vproxy answers itself (INFO proxy_commandstats ...): `proxy` with INFO, INFO default,
# INFO all and INFO everything; the others only by name, because their keys are the server's own
# (cmdstat_get, latency_percentiles_usec_get): beside the server's sections in one reply, a parser
# that reads INFO into one dict (redis-py does) would mix the two.
PROXY_SECTIONS = frozenset({b"proxy", b"proxy_commandstats", b"proxy_latencystats", b"proxy_backendstats"})
_WITH_PROXY = {b"proxy", b"all", b"everything", b"default"}


def proxy_info(app, sections: set, probe: bool = False):
    """The proxy's INFO sections that a request for `sections` includes, as text ('' when none);
    probe: only whether there are any."""
    want = []
    if not sections or sections & _WITH_PROXY:
        want.append(proxy_section)
    for name, render in ((b"proxy_commandstats", lambda a: a.cmdstats.commandstats_text()),
                         (b"proxy_latencystats", lambda a: a.cmdstats.latencystats_text()),
                         (b"proxy_backendstats", backendstats_section)):
        if name in sections:
            want.append(render)
    if probe:
        return bool(want)
    return "\r\n".join(render(app) for render in want)


def backendstats_section(app) -> str:
    """INFO proxy_backendstats: per backend node, its connections and what went wrong with them."""
    lines = ["# Proxy_backendstats"]
    for n, pool in enumerate(list(app.router.pools.values())):
        c = pool.counts()
        t = pool.troubles
        lines.append(f"backend{n}:ip={pool.addr[0]},port={pool.addr[1]},shared={c['shared']},pinned={c['pinned']},"
                     f"idle_pinned={c['idle_pinned']},in_flight={pool.in_flight()},connects={pool.connects},"
                     f"connect_failures={pool.failures},lost={t.get('lost', 0)},timeouts={t.get('timeout', 0)},"
                     f"down={int(pool.down_until > monotonic())}")
    return "\r\n".join(lines) + "\r\n"


def nodes(app) -> list[dict]:
    """PROXY NODES: this node and every live peer (fleet.py): address, version, uptime, clients, requests/s."""
    fleet = app.fleet
    if fleet is None:
        return [{"node": hostport.fmt(app.address), "self": 1, "version": __version__,
                 "uptime": int(monotonic() - app.started), "clients": len(app.clients)}]
    me = fleet.heartbeat()
    rows = [{"node": me["name"], "self": 1, "address": me["addr"], "version": me["version"], "uptime": me["uptime"],
             "clients": me["clients"]}]
    for p in sorted(fleet.live(), key=lambda p: p.get("name", "")):
        rows.append({"node": p.get("name", "?"), "self": 0, "address": p.get("addr", "?"), "version": p.get("version", "?"),
                     "uptime": p.get("uptime", 0), "clients": p.get("clients", 0), "ops_per_sec": p.get("ops", 0.0)})
    return rows


def fleet_fields(app) -> dict:
    fleet = app.fleet
    if fleet is None:
        return {}
    peers = fleet.live()
    return {"fleet_node": fleet.name, "fleet_nodes": 1 + len(peers),
            "fleet_clients": fleet.clients() + sum(p.get("clients", 0) for p in peers),
            "fleet_ops_per_sec": round(fleet.ops() + sum(p.get("ops", 0.0) for p in peers), 1),
            "fleet_unreachable": fleet.unreachable}


def reset_stats(app) -> None:
    """PROXY STATS RESET, CONFIG RESETSTAT: the per-command statistics, the slow log and the counters
    the server's CONFIG RESETSTAT resets too (total_commands_processed, total_connections_received,
    rejected_connections: INFO shows the proxy's) start over."""
    app.cmdstats.reset()
    app.cmdstats.slowlog.reset()
    app.stats.commands = app.stats.connections = app.stats.rejected = 0


def _backend_names(app) -> list[str]:
    """The configured backends (or the embedded one) and the known primary from the start, then
    every other node vproxy has connections to (pools open on a node's first command)."""
    addrs = [*app.seeds, app.router.topology.primary, *(p.addr for p in app.router.pools.values())]
    return list(dict.fromkeys(hostport.fmt(a) for a in addrs if a is not None))


def _flags(s: Session) -> str:
    f = ""
    if tx.in_multi(s):
        f += "x"
    if s.stream is not None:
        f += {"sub": "P", "monitor": "O", "tracking": "t", "reply": "N"}.get(s.stream.kind, "")
    if s.oneshot is not None and s.oneshot.channel is not None and s.oneshot.channel.waiters:
        f += "b"
    if s.no_evict:
        f += "e"
    if s.no_touch:
        f += "T"
    return f or "N"


def client_line(s: Session) -> str:
    """One CLIENT LIST line, in the server's field order, for a proxy client."""
    sock_name = ("?", 0)
    try:
        sock_name = s.sock.getsockname()
    except OSError:
        pass
    st = s.stream
    counts = st.counts if st is not None else [0, 0]
    patterns = st.patterns if st is not None else 0
    now = time()
    return (
        f"id={s.id} addr={hostport.fmt(s.addr)} laddr={hostport.fmt(sock_name)} fd={_fileno(s)} "
        f"name={s.name.decode(errors='replace')} age={int(now - s.created)} "
        f"idle={int(monotonic() - s.last_active)} flags={_flags(s)} db={s.db} sub={counts[0] - patterns} "
        f"psub={patterns} ssub={counts[1]} multi={-1 if not tx.in_multi(s) else 0} watch={int(tx.watching(s))} qbuf=0 "
        f"qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 "
        f"events=r cmd={s.last_cmd.decode(errors='replace')} user={user_name(s)} redir=-1 resp={s.proto} "
        f"lib-name={s.lib_name.decode(errors='replace')} lib-ver={s.lib_ver.decode(errors='replace')}"
    )


def _fileno(s: Session) -> int:
    try:
        return s.sock.fileno()
    except OSError:
        return -1


def client_list(app, filters: list, local: bool = False) -> str:
    """CLIENT LIST [LOCAL] [TYPE t | ID id ...]: the proxy's clients; with the fleet on, every live
    node's too (fleet.py), each line ending in proxy=<node>; LOCAL: this process's only."""
    if filters[:1] and filters[0].lower() == b"local":
        local, filters = True, filters[1:]
    fleet = app.fleet
    text = _local_clients(app, filters)
    if fleet is None:
        return text
    tag = f" proxy={fleet.name}\n"
    text = text.replace("\n", tag)
    if not local:
        for _, reply in fleet.ask_all(b"PROXY", b"CLIENTS-LOCAL", *filters):
            if isinstance(reply, bytes):
                text += reply.decode(errors="replace")
    return text


def _local_clients(app, filters: list) -> str:
    sessions = [s for s in app.clients.values() if not s.peer]
    if len(filters) >= 2 and filters[0].lower() == b"id":
        wanted = {int(x) for x in filters[1:] if x.isdigit()}
        sessions = [s for s in sessions if s.id in wanted]
    elif len(filters) == 2 and filters[0].lower() == b"type":
        kind = filters[1].lower()
        if kind == b"pubsub":
            sessions = [s for s in sessions if s.stream is not None and s.stream.kind == "sub"]
        elif kind in (b"master", b"replica", b"slave"):
            sessions = []
    return "".join(client_line(s) + "\n" for s in sessions)


def client_kill(s: Session, args: list, local: bool = False) -> bytes:
    """CLIENT KILL over proxy clients: `ID n`, `ADDR host:port`, `USER name`, `SKIPME yes|no`, or the
    old `addr` form; with the fleet on, the other nodes' clients too (local: this process's only)."""
    app = s.app
    fleet = None if local else app.fleet
    if len(args) == 3:  # old form: CLIENT KILL addr:port
        victims = [c for c in app.clients.values() if hostport.fmt(c.addr) == args[2].decode(errors="replace")]
        if not victims and fleet is not None:
            if any(r == b"OK" for _, r in fleet.ask_all(b"PROXY", b"KILL-LOCAL", *args[2:])):
                return resp.OK
        if not victims:
            return resp.error("ERR No such client")
        _kill(victims)
        return resp.OK
    opts, victims, skipme = args[2:], list(app.clients.values()), True
    if len(opts) % 2:
        return resp.error(E.SYNTAX)
    for key, val in zip(opts[::2], opts[1::2]):
        key = key.lower()
        if key == b"id":
            cid = resp.string2ll(val)
            if cid is None:
                return resp.error(E.SYNTAX)
            if cid <= 0:
                return resp.error("ERR client-id should be greater than 0")
            victims = [c for c in victims if c.id == cid]
        elif key == b"addr":
            victims = [c for c in victims if hostport.fmt(c.addr) == val.decode(errors="replace")]
        elif key == b"user":  # the backend user each client runs as (users.py)
            victims = [c for c in victims if user_name(c) == val.decode(errors="replace")]
        elif key == b"skipme":
            if val.lower() not in (b"yes", b"no"):
                return resp.error(E.SYNTAX)
            skipme = val.lower() == b"yes"
        else:
            return resp.error(f"ERR vproxy: CLIENT KILL {key.decode(errors='replace').upper()} is not "
                              "supported through the proxy (use ID, ADDR or USER)")
    if skipme:
        victims = [c for c in victims if c is not s]
    _kill(victims)
    n = len(victims)
    if fleet is not None:
        n += sum(r for _, r in fleet.ask_all(b"PROXY", b"KILL-LOCAL", *args[2:]) if isinstance(r, int))
    return resp.integer(n)


def _kill(victims) -> None:
    for c in victims:
        c.closing = True
        try:
            c.sock.shutdown(2)
        except OSError:
            pass


def client_unblock(s: Session, args: list) -> bytes:
    """CLIENT UNBLOCK <proxy id> [TIMEOUT|ERROR]: cancel that client's blocking command by closing its connection.

    Checked as Valkey does: the reason first, then the id; with more arguments than that, the
    reason is not read at all (a plain timeout)."""
    if len(args) < 3:
        return resp.error(E.wrong_arity("client|unblock"))
    reason = args[3].lower() if len(args) == 4 else b"timeout"
    if reason not in (b"timeout", b"error"):
        return resp.error("ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR")
    cid = resp.string2ll(args[2])
    if cid is None:
        return resp.error(E.NOT_INTEGER)
    target = s.app.clients.get(cid)
    lease = target.oneshot if target is not None else None
    if lease is None or lease.channel is None or not lease.channel.waiters:
        return resp.integer(0)
    error = reason == b"error"
    # as the server does: the blocked command answers as if it timed out (a null array; WAIT: 0 replicas)
    timed_out = b":0\r\n" if target.last_cmd == b"wait" else b"*-1\r\n" if target.proto == 2 else b"_\r\n"
    frame = resp.error("UNBLOCKED client unblocked via CLIENT UNBLOCK") if error else timed_out
    ch = lease.channel
    lease.dirty = True
    waiters, ch.waiters = ch.waiters, type(ch.waiters)()
    while waiters:  # emptied: the channel's reader must find nobody left to answer
        batch, idx, _ = waiters.popleft()
        if batch is not None:
            batch.put(idx, frame)
    ch.close()
    return resp.integer(1)


_PROXY_SUBS = {b"info", b"version", b"topology", b"clients", b"clients-local", b"kill-local", b"nodes", b"reload",
               b"slowlog", b"hotkeys", b"bigkeys", b"stats", b"config", b"audit"}


def proxy_command(s: Session, args: list) -> bytes:
    """PROXY INFO | CONFIG GET <name> | CLIENTS | VERSION ...; PROXY or PROXY HELP: the list."""
    sub = args[1].lower() if len(args) > 1 else b"help"
    app = s.app
    if sub == b"info":
        return resp.verbatim(proxy_section(app), s.proto)
    if sub == b"version":
        return resp.bulk(__version__)
    if sub == b"topology":
        return resp.value(topology_view(app), s.proto)
    if sub == b"clients":
        return resp.verbatim(client_list(app, []), s.proto)
    if sub == b"clients-local":  # a peer asks (fleet.py): this process's clients only
        return resp.bulk(client_list(app, args[2:], local=True))
    if sub == b"kill-local" and len(args) >= 3:  # a peer asks: CLIENT KILL over this process's clients
        return client_kill(s, [b"client", b"kill", *args[2:]], local=True)
    if sub == b"nodes" and len(args) == 2:
        return resp.value(nodes(app), s.proto)
    if sub == b"reload" and len(args) == 2:
        return resp.value(app.reload(), s.proto)  # reload.py is the layer above: the app wires it
    if sub == b"slowlog":
        return _slowlog(app, args[2:], s.proto)
    if sub in (b"hotkeys", b"bigkeys") and len(args) <= 3:
        n = resp.string2ll(args[2]) if len(args) == 3 else 10
        if n is None or n < 1:
            return resp.error("ERR count must be a positive integer")
        keys = app.cmdstats.keys
        if sub == b"hotkeys":
            if not keys.sample:
                return resp.error("ERR vproxy: hot-key counting is off (hotkeys_sample = 0)")
            rows = [{"key": k, "requests": c, "per_second": r} for k, c, r in keys.hot(n)]
        else:
            rows = [{"key": k, "command": c, "kind": kind, "bytes": size} for size, kind, c, k in keys.biggest(n)]
        return resp.value(rows, s.proto)
    if sub == b"stats":
        if len(args) == 3 and args[2].lower() == b"reset":
            reset_stats(app)
            return resp.OK
        if len(args) != 2:
            return resp.error("ERR syntax error: PROXY STATS [RESET]")
        return resp.value(app.cmdstats.table(), s.proto)
    if sub == b"config" and len(args) == 4 and args[2].lower() == b"get":
        pattern = args[3].decode(errors="replace").lower()
        items = {k: v for k, v in app.cfg.values.items() if pattern in ("*", k) and "password" not in k
                 and "secret" not in k and k != "users"}
        return resp.value({k: str(v) for k, v in items.items()}, s.proto)
    if sub == b"audit":
        return audit_command(s, args[2:])
    if sub != b"help" or len(args) > 2:  # a typo or a bad form must not look like success (an array)
        name = args[1].decode(errors="replace")
        if sub in _PROXY_SUBS or sub == b"help":
            return resp.error(f"ERR vproxy: wrong arguments for 'PROXY {name.upper()}'. Try PROXY HELP.")
        return resp.error(f"ERR vproxy: unknown subcommand '{name}'. Try PROXY HELP.")
    return resp.value(["PROXY INFO", "PROXY VERSION", "PROXY CLIENTS", "PROXY CONFIG GET <name|*>",
                       "PROXY TOPOLOGY", "PROXY STATS [RESET]", "PROXY SLOWLOG GET [count] | LEN | RESET",
                       "PROXY HOTKEYS [count]", "PROXY BIGKEYS [count]", "PROXY RELOAD", "PROXY NODES",
                       "PROXY AUDIT [STATUS|ON|OFF|CLASSES <class|command> ...]"], s.proto)


def _slowlog(app, args: list, proto: int) -> bytes:
    """PROXY SLOWLOG GET [count] | LEN | RESET: as the server's SLOWLOG, for the proxy's own timing."""
    log = app.cmdstats.slowlog
    sub = args[0].lower() if args else b"get"
    if sub == b"len" and len(args) == 1:
        return resp.integer(len(log.entries))
    if sub == b"reset" and len(args) == 1:
        log.reset()
        return resp.OK
    if sub == b"get" and len(args) <= 2:
        n = 10
        if len(args) == 2:
            n = resp.string2ll(args[1])
            if n is None or n < -1:
                return resp.error("ERR count should be greater than or equal to -1")
        return resp.value(log.get(None if n == -1 else n), proto)
    return resp.error("ERR syntax error: PROXY SLOWLOG GET [count] | LEN | RESET")


def audit_command(s: Session, args: list) -> bytes:
    """PROXY AUDIT [STATUS|INFO] | ON | OFF | CLASSES <class|command> ...: the audit log at run time."""
    audit = s.app.audit
    sub = args[0].lower() if args else b"status"
    if sub in (b"status", b"info") and len(args) <= 1:
        fields = audit.fields()
        fields["audit_file"] = audit.path or "none"
        fields["audit_node"] = audit.node
        return resp.value({k: str(v) for k, v in fields.items()}, s.proto)
    if sub == b"on" and len(args) == 1:
        try:
            audit.start()
        except (ValueError, OSError) as e:
            return resp.error(f"ERR vproxy: audit log: {e}")
        return resp.OK
    if sub == b"off" and len(args) == 1:
        audit.stop()
        return resp.OK
    if sub == b"classes" and len(args) > 1:
        from .config import check_classes

        names = [p for a in args[1:] for p in a.decode(errors="replace").split(",")]
        try:
            names = check_classes(names)
        except ValueError as e:
            return resp.error(f"ERR vproxy: audit classes: {e}")
        unknown = [n for n in names if not _audit_name_known(s.app.commands, n)]
        if unknown:  # a typo (wirte) must not quietly stop recording what was meant
            return resp.error(f"ERR vproxy: audit classes: neither a class ({', '.join(sorted(AUDIT_CLASSES))}) "
                              f"nor a command the server knows: {', '.join(unknown)}")
        audit.set_classes(names)
        return resp.OK
    return resp.error("ERR vproxy: PROXY AUDIT [STATUS] | ON | OFF | CLASSES <class|command> ...")


def _audit_name_known(table, name: str) -> bool:
    """An audit class, or a command (command|subcommand) of the command table, or vproxy's PROXY."""
    if name in AUDIT_CLASSES:
        return True
    base, _, sub = name.partition("|")
    if base == "proxy":
        return True
    cmd = table.get(base.encode())
    return cmd is not None and (not sub or not cmd.subs or sub.encode() in cmd.subs)


# ---- primary/replica sets (sentinel, replication modes): INFO fields and PROXY TOPOLOGY ----

def ha_fields(app) -> dict:
    """INFO `# Proxy` lines about the primary, the replicas and failovers (empty in other modes)."""
    t = app.router.topology
    ha = getattr(t, "ha", None)
    if ha is None:
        return {}
    now = monotonic()
    fields = {
        "proxy_primary": hostport.fmt(t.primary) if t.primary else "none",
        "proxy_replicas": len(ha.replicas),
        "proxy_replicas_healthy": len(t.readable),
        "proxy_read_from": app.cfg.read_from,
        "proxy_failovers": ha.failovers,
        "proxy_last_failover": ha.last_failover or "none",
        "proxy_last_failover_ago_seconds": round(time() - ha.last_failover_at, 3) if ha.last_failover_at else -1,
        "proxy_no_primary_seconds": round(now - ha.no_primary_since, 3) if ha.no_primary_since else 0,
        "proxy_last_outage_seconds": round(ha.last_outage, 3),
        "proxy_total_outage_seconds": round(ha.total_outage, 3),
        "proxy_sentinel": ha.source or "none",
    }
    for i, r in enumerate(ha.replicas):  # like the server's slaveN lines
        lag = -1 if r.lag is None else f"{r.lag:g}"
        why = r.why.replace(" ", "_").replace(",", ";") or "ok"
        fields[f"proxy_replica{i}"] = (f"ip={r.addr[0]},port={r.addr[1]},healthy={int(r.healthy)},lag={lag},"
                                       f"offset={r.offset},state={why}")
    return fields


def topology_view(app) -> dict:
    """PROXY TOPOLOGY: the current snapshot; in sentinel/replication modes with health and failovers."""
    t = app.router.topology
    view = {"mode": t.mode, "version": t.version,
            "primary": hostport.fmt(t.primary) if t.primary else None}
    ha = getattr(t, "ha", None)
    if ha is None:
        return view
    view["replicas"] = [{"addr": hostport.fmt(r.addr), "healthy": int(r.healthy),
                         "lag": "" if r.lag is None else f"{r.lag:g}", "offset": r.offset, "why": r.why}
                        for r in ha.replicas]
    fields = ha_fields(app)
    for key in ("proxy_replicas_healthy", "proxy_failovers", "proxy_last_failover", "proxy_last_failover_ago_seconds",
                "proxy_no_primary_seconds", "proxy_last_outage_seconds", "proxy_total_outage_seconds",
                "proxy_sentinel"):
        view[key[len("proxy_"):]] = str(fields[key])
    return view
