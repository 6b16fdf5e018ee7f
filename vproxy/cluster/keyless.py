"""Keyless and server commands on a cluster: fan out to every primary and merge, or answer as one node.

    KEYS, DBSIZE, FLUSHALL/FLUSHDB, SCRIPT LOAD/EXISTS/FLUSH, FUNCTION LOAD/DELETE/FLUSH/RESTORE,
    CONFIG SET, WAIT, INFO   -> every slot-owning primary, replies merged
    SCAN                     -> one primary at a time; the client's cursor is (node cursor << 10 | node)
    RANDOMKEY                -> every primary, one non-empty answer picked
    CLUSTER INFO/NODES/SLOTS/SHARDS/MYID/KEYSLOT -> vproxy itself, as one node owning every slot

Primaries are numbered by their lowest slot, so a SCAN cursor survives a failover.
"""

from __future__ import annotations

import hashlib
import random
from binascii import hexlify

from .. import admin, resp
from .. import errors as E
from ..client import ClientSession
from ..gatecmds import hide_config_secrets
from ..local import append_proxy_sections
from ..slots import key_slot
from . import namespaces
from ..handler import ClusterSession

SCRIPTS: dict[bytes, bytes] = {}  # sha1 -> body of scripts loaded through SCRIPT LOAD (NOSCRIPT repair)
MAX_SCRIPTS = 10000
NODE_BITS = 10
SCAN_NODE_MASK = (1 << NODE_BITS) - 1
NO_MAP = resp.error("CLUSTERDOWN vproxy: the cluster's slot map is not known yet; retry shortly")


def fan(s: ClusterSession, i, args, batch, merge, slots=None) -> None:
    """Send args to every slot-owning primary (or to `slots`' owners); merge(frames) is the reply."""
    if s.lease is not None or s.oneshot is not None:
        s.settle()  # after the client's pinned requests, in order
    slots = s.app.router.topology.first_slots if slots is None else slots
    if not slots:
        batch.replies[i] = NO_MAP
        return
    s.op(batch, i, [(slot, args) for slot in slots], merge)


def one(s: ClusterSession, i, args, raw, batch) -> None:
    """Any primary (keyless commands whose answer is the same everywhere)."""
    s.route(batch, i, raw, -1, args[0].lower())


# ---- merges (frames are whole raw replies, none of them an error) ----

def first(frames):
    return frames[0]


def killed(frames):
    """SCRIPT/FUNCTION KILL on every primary, answered as the one server running the script would:
    +OK if a node killed it; else that node's refusal (UNKILLABLE, or BUSY: it runs the other kind,
    a function for SCRIPT KILL or a script for FUNCTION KILL); else the error of a node vproxy
    could not ask (it may be the busy one); else NOTBUSY (nothing runs anywhere)."""
    for answer in (resp.OK, b"-UNKILLABLE", b"-BUSY"):
        found = next((f for f in frames if f.startswith(answer)), None)
        if found is not None:
            return found
    return next((f for f in frames if not f.startswith(b"-NOTBUSY")), frames[0])


TAKE_ERRORS = frozenset([killed])  # merges that get the nodes' error replies too


def sum_ints(frames):
    return resp.integer(sum(int(f[1:-2]) for f in frames))


def concat(frames):
    n, bodies = 0, []
    for f in frames:
        head, _, body = f.partition(b"\r\n")
        n += max(0, int(head[1:]))
        bodies.append(body)
    return b"*%d\r\n" % n + b"".join(bodies)


def min_int(frames):
    return resp.integer(min(int(f[1:-2]) for f in frames))


# ---- handlers: fn(session, idx, args, raw, batch) ----

def keys(s: ClusterSession, i, args, raw, batch):
    if not namespaces.emulated(s):
        return fan(s, i, args, batch, concat)
    if s.ns:
        args = [args[0], s.ns + args[1]]
    fan(s, i, args, batch, namespaces.keys_merge(s, concat))


def dbsize(s: ClusterSession, i, args, raw, batch):
    if s.ns:
        return namespaces.dbsize(s, i, args, raw, batch)
    fan(s, i, args, batch, sum_ints)


def all_ok(s: ClusterSession, i, args, raw, batch):
    if s.ns and args[0].lower() == b"flushdb":
        return namespaces.flushdb(s, i, args, raw, batch)
    fan(s, i, args, batch, first)


def randomkey(s: ClusterSession, i, args, raw, batch):
    if s.ns:
        return namespaces.randomkey(s, i, args, raw, batch)
    hide = namespaces.emulated(s)  # db 0 beside emulated databases: skip their namespaces

    def merge(frames):
        found = [f for f in frames if f[:2] not in (b"$-", b"_\r")
                 and not (hide and f.split(b"\r\n", 2)[1].startswith(namespaces.NS))]
        return random.choice(found) if found else frames[0]
    fan(s, i, args, batch, merge)


def scan(s: ClusterSession, i, args, raw, batch):
    cursor = resp.string2ull(args[1])
    if cursor is None:
        batch.replies[i] = resp.error("ERR invalid cursor")
        return
    nodes = s.app.router.topology.first_slots
    node, inner = cursor & SCAN_NODE_MASK, cursor >> NODE_BITS
    if not nodes:
        batch.replies[i] = NO_MAP
        return
    if node >= len(nodes) or cursor < 0:
        batch.replies[i] = b"*2\r\n$1\r\n0\r\n*0\r\n"
        return

    emulated = namespaces.emulated(s)
    if emulated:
        args = namespaces.scan_args(s, args)

    def merge(frames):
        nxt, found = resp.decode(frames[0])
        nxt = int(nxt)
        if emulated:
            found = namespaces.scan_names(s, found)
        if nxt:
            out = nxt << NODE_BITS | node
        else:
            out = node + 1 if node + 1 < len(nodes) else 0
        return b"*2\r\n" + resp.bulk(str(out)) + resp.value(found, s.proto)
    s.op(batch, i, [(nodes[node], [args[0], str(inner).encode(), *args[2:]])], merge)


def remember_script(body: bytes) -> None:
    if len(SCRIPTS) >= MAX_SCRIPTS:
        SCRIPTS.clear()
    SCRIPTS[hashlib.sha1(body).hexdigest().encode()] = body


def script(s: ClusterSession, i, args, raw, batch):
    sub = args[1].lower() if len(args) > 1 else b""
    if sub == b"exists":
        def merge(frames):
            lists = [resp.decode(f) for f in frames]
            return resp.value([int(all(v[k] for v in lists)) for k in range(len(lists[0]))], s.proto)
        return fan(s, i, args, batch, merge)
    if sub == b"load" and len(args) == 3:
        remember_script(args[2])
    if sub in (b"load", b"flush"):
        return fan(s, i, args, batch, first)
    if sub == b"kill" and len(args) == 2:
        return s.sides_everywhere(batch, i, raw, killed)
    one(s, i, args, raw, batch)


def function(s: ClusterSession, i, args, raw, batch):
    sub = args[1].lower() if len(args) > 1 else b""
    if sub in (b"load", b"delete", b"flush", b"restore"):
        return fan(s, i, args, batch, first)
    if sub == b"kill" and len(args) == 2:
        return s.sides_everywhere(batch, i, raw, killed)
    one(s, i, args, raw, batch)


def config(s: ClusterSession, i, args, raw, batch):
    sub = args[1].lower() if len(args) > 1 else b""
    if sub == b"resetstat" and len(args) == 2:
        admin.reset_stats(s.app)
    if sub in (b"set", b"resetstat"):
        return fan(s, i, args, batch, first)
    hide_config_secrets(s, i, args)
    one(s, i, args, raw, batch)


def slowlog(s: ClusterSession, i, args, raw, batch):
    """SLOWLOG across the primaries: GET merges the nodes' entries, newest first (ids are each
    node's own), LEN sums, RESET runs on every node; anything else one node answers."""
    sub = args[1].lower() if len(args) > 1 else b""
    if sub == b"get" and len(args) <= 3:
        n = resp.string2ll(args[2]) if len(args) == 3 else 10
        if n is None or n < -1:
            return one(s, i, args, raw, batch)  # the server's own error

        def merge(frames):
            entries = [e for f in frames for e in (resp.decode(f) or [])]
            entries.sort(key=lambda e: (e[1], e[0]), reverse=True)
            return resp.value(entries if n == -1 else entries[:n], s.proto)
        return fan(s, i, args, batch, merge)
    if sub == b"len" and len(args) == 2:
        return fan(s, i, args, batch, sum_ints)
    if sub == b"reset" and len(args) == 2:
        return fan(s, i, args, batch, first)
    one(s, i, args, raw, batch)


def wait(s: ClusterSession, i, args, raw, batch):
    """WAIT on every primary this session wrote to (its channels there); the smallest count wins.

    The timeout is capped below command_timeout, because the wait holds a shared connection."""
    n, timeout = resp.string2ll(args[1]), resp.string2ll(args[2])
    if n is None or timeout is None or timeout < 0:  # the server's checks, in its order
        batch.replies[i] = resp.error(E.NOT_INTEGER if n is None else "ERR timeout is negative" if timeout is not None
                                      else "ERR timeout is not an integer or out of range")
        return
    cap = max(1, int(s.app.cfg.command_timeout * 800))
    timeout = cap if timeout <= 0 else min(timeout, cap)
    topo = s.app.router.topology
    slots = [sl for sl in topo.first_slots if topo.owner(sl) in s.chans] or topo.first_slots[:1]
    fan(s, i, [b"WAIT", str(n).encode(), str(timeout).encode()], batch, min_int, slots)


def ok(s: ClusterSession, i, args, raw, batch):
    batch.replies[i] = resp.OK


# ---- INFO: one node's text, keyspace summed, a '# Cluster' summary ----

def info(s: ClusterSession, i, args, raw, batch):
    sections = {a.lower() for a in args[1:]}
    if sections and sections <= admin.PROXY_SECTIONS:
        return ClientSession.dispatch(s, i, args, raw, batch, True)

    def merge(frames):
        texts = [_text(resp.decode(f)) for f in frames]
        out = _merge_info(texts, s.app.router.topology)
        return append_proxy_sections(s, resp.verbatim(out, s.proto), sections)
    fan(s, i, args, batch, merge)


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


_STAT_SECTIONS = {"commandstats": "cmdstat_", "errorstats": "errorstat_", "latencystats": "latency_percentiles_usec_"}


def _merge_stats(texts: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """The per-command sections of every node, merged: counts summed (commandstats, errorstats),
    latency percentiles the worst node's (a percentile of the union is not known from the parts)."""
    merged: dict[str, dict[str, dict[str, float]]] = {name: {} for name in _STAT_SECTIONS}
    prefixes = {prefix: name for name, prefix in _STAT_SECTIONS.items()}
    for t in texts:
        for line in t.splitlines():
            key, sep, rest = line.partition(":")
            section = next((n for p, n in prefixes.items() if key.startswith(p)), None)
            if not sep or section is None:
                continue
            acc = merged[section].setdefault(key, {})
            for kv in rest.split(","):
                k, _, v = kv.partition("=")
                try:
                    x = float(v)
                except ValueError:
                    continue
                acc[k] = max(acc.get(k, x), x) if section == "latencystats" else acc.get(k, 0) + x
    return merged


def _stat_lines(section: str, entries: dict[str, dict[str, float]]) -> list[str]:
    out = []
    for key, f in entries.items():
        if section == "commandstats":
            calls = f.get("calls", 0)
            f["usec_per_call"] = f.get("usec", 0) / calls if calls else 0.0
        fields = ",".join(f"{k}={v:.3f}" if section == "latencystats" else
                          (f"{k}={v:.2f}" if k == "usec_per_call" else f"{k}={int(v)}") for k, v in f.items())
        out.append(f"{key}:{fields}")
    return out


def _merge_info(texts: list[str], topo) -> str:
    keyspace: dict[str, list[int]] = {}
    for t in texts:
        for line in t.splitlines():
            if line.startswith("db") and ":keys=" in line:
                db, _, rest = line.partition(":")
                fields = dict(kv.split("=", 1) for kv in rest.split(","))
                acc = keyspace.setdefault(db, [0, 0])
                acc[0] += int(fields.get("keys", 0))
                acc[1] += int(fields.get("expires", 0))
    stats = _merge_stats(texts) if len(texts) > 1 else None
    out, skip, merged = [], False, False
    for line in texts[0].splitlines():
        if line.startswith("# "):
            section = line[2:].strip().lower()
            skip = section in ("keyspace", "cluster")
            merged = stats is not None and section in _STAT_SECTIONS
            if merged:  # every node's lines, merged, instead of the first node's
                out.append(line)
                out += _stat_lines(section, stats[section])
            elif not skip:
                out.append(line)
            continue
        if merged:
            if not line.strip():
                out.append(line)  # the blank line that ends the section
            continue
        if not skip:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    if keyspace or any("# Keyspace" in t for t in texts):
        out += ["", "# Keyspace"] + [f"{db}:keys={k},expires={e},avg_ttl=0" for db, (k, e) in sorted(keyspace.items())]
    out += ["", "# Cluster", "cluster_enabled:0", f"proxy_cluster_nodes:{len(topo.first_slots)}",
            f"proxy_cluster_replicas:{sum(len(sh.replicas) for sh in topo.shards)}",
            f"proxy_cluster_slots_covered:{topo.covered()}", f"proxy_cluster_map_version:{topo.version}"]
    return "\r\n".join(out) + "\r\n"


# ---- CLUSTER: vproxy as one node owning every slot ----

def _me(s: ClusterSession):
    try:
        host, port = s.sock.getsockname()[:2]
    except OSError:
        host, port = s.app.address
    return host, port, hexlify(f"vproxy-{host}:{port}".encode()).decode()[:40].ljust(40, "0")


def cluster(s: ClusterSession, i, args, raw, batch):
    sub = args[1].lower() if len(args) > 1 else b""
    h = CLUSTER.get(sub)
    if h is None:
        batch.replies[i] = resp.error(f"ERR vproxy: CLUSTER {sub.decode(errors='replace').upper()} is not "
                                      "available through the proxy, which presents the cluster as one node")
        return
    h(s, i, args, raw, batch)


def _cluster_info(s: ClusterSession, i, args, raw, batch):
    topo = s.app.router.topology
    state = "ok" if topo.covered() == 16384 else "fail"
    text = (f"cluster_state:{state}\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n"
            "cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:1\r\ncluster_size:1\r\n"
            "cluster_current_epoch:1\r\ncluster_my_epoch:1\r\n")
    batch.replies[i] = resp.verbatim(text, s.proto)


def _cluster_nodes(s: ClusterSession, i, args, raw, batch):
    host, port, nid = _me(s)
    line = f"{nid} {host}:{port}@0 myself,master - 0 0 1 connected 0-16383\n"
    batch.replies[i] = resp.verbatim(line, s.proto)


def _cluster_slots(s: ClusterSession, i, args, raw, batch):
    host, port, nid = _me(s)
    batch.replies[i] = resp.value([[0, 16383, [host, port, nid]]], s.proto)


def _cluster_shards(s: ClusterSession, i, args, raw, batch):
    host, port, nid = _me(s)
    node = {"id": nid, "port": port, "ip": host, "endpoint": host, "role": "master",
            "replication-offset": 0, "health": "online"}
    batch.replies[i] = resp.value([{"slots": [0, 16383], "nodes": [node]}], s.proto)


def _cluster_keyslot(s: ClusterSession, i, args, raw, batch):
    if len(args) != 3:
        batch.replies[i] = resp.error("ERR wrong number of arguments for 'cluster|keyslot' command")
        return
    batch.replies[i] = resp.integer(key_slot(args[2]))


def _in_slot(s: ClusterSession, i, args, raw, batch):
    """COUNTKEYSINSLOT / GETKEYSINSLOT: asked of the slot's owner; a slot the server would refuse
    goes to slot 0's owner, which answers with its own error."""
    slot = resp.string2ll(args[2]) if len(args) > 2 else None
    s.route(batch, i, raw, slot if slot is not None and 0 <= slot < 16384 else 0, b"cluster")


CLUSTER = {
    b"info": _cluster_info, b"nodes": _cluster_nodes, b"slots": _cluster_slots, b"shards": _cluster_shards,
    b"myid": lambda s, i, a, r, b: b.replies.__setitem__(i, resp.bulk(_me(s)[2])),
    b"myshardid": lambda s, i, a, r, b: b.replies.__setitem__(i, resp.bulk(_me(s)[2])),
    b"keyslot": _cluster_keyslot, b"countkeysinslot": _in_slot, b"getkeysinslot": _in_slot,
}

PRE = {
    b"keys": keys, b"dbsize": dbsize, b"flushall": all_ok, b"flushdb": all_ok, b"randomkey": randomkey,
    b"scan": scan, b"script": script, b"function": function, b"config": config, b"wait": wait, b"slowlog": slowlog,
    b"readonly": ok, b"readwrite": ok, b"info": info, b"cluster": cluster,
}
KEYLESS: dict = {}
