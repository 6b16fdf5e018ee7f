"""Databases on a cluster: SELECT passed through (Valkey 9 cluster-databases) or emulated by key prefix.

Emulated form (the cluster serves db 0 only): database N > 0 is the key namespace `__vdbN__:`.

    request keys (COMMAND key positions)      k -> __vdbN__:k   (hash tags keep working: the prefix
                                                                  has no braces)
    KEYS / SCAN MATCH p                       -> MATCH __vdbN__:p, prefix cut from the names
    DBSIZE / FLUSHDB / RANDOMKEY              -> SCAN MATCH __vdbN__:* on every primary (O(keys of N))
    replies naming keys (BLPOP, BZPOPMIN, LMPOP, ZMPOP, XREAD ...) -> prefix cut
    db 0                                      -> the cluster's own keyspace; KEYS/SCAN/RANDOMKEY
                                                 there skip the other databases' namespaces
Refused with emulation: MOVE, SWAPDB, COPY ... DB, SELECT inside MULTI.
"""

from __future__ import annotations

import random

from .. import resp
from .. import transaction as tx
from ..keyspec import key_positions
from ..local import LOCAL, db_index
from ..slots import key_slot
from ..handler import ClusterSession

NS = b"__vdb"
SCAN_COUNT = b"1000"
REFUSED = {b"move", b"swapdb"}
# Replies that carry key names: the prefix is cut from them.
NAMES_IN_REPLY = frozenset([b"blpop", b"brpop", b"bzpopmin", b"bzpopmax", b"blmpop", b"bzmpop", b"lmpop",
                            b"zmpop", b"xread", b"xreadgroup"])
# Answered by the fan-out with the namespace in mind, not rewritten here.
NOT_REWRITTEN = frozenset([b"select", b"keys", b"scan", b"dbsize", b"flushdb", b"flushall", b"randomkey",
                           b"multi", b"exec", b"discard", b"unwatch", b"ping", b"echo", b"quit", b"reset",
                           b"hello", b"auth", b"client", b"info", b"cluster", b"proxy"])


def prefix(db: int) -> bytes:
    return b"%s%d__:" % (NS, db)


def emulated(s: ClusterSession) -> bool:
    return getattr(s.app.router.topology, "databases", 1) <= 1


def select(s: ClusterSession, i, args, raw, batch):
    native = getattr(s.app.router.topology, "databases", 1)
    if tx.in_multi(s) and native > 1:  # queued as the server queues it; EXEC answers its error
        return s.in_transaction(i, b"select", args, raw, batch)
    db, err = db_index(args[1], s.app.databases if native <= 1 else native)
    if err:
        batch.replies[i] = resp.error(err)
        return
    if native > 1:
        return LOCAL[b"select"](s, i, args, raw, batch)
    if tx.in_multi(s):
        batch.replies[i] = resp.error("ERR vproxy: SELECT inside MULTI is not supported with emulated databases")
        tx.fail(s)
        return
    s.db, s.ns = db, (prefix(db) if db else None)
    batch.replies[i] = resp.OK


def rewrite(s: ClusterSession, name: bytes, args: list, raw: bytes, i: int):
    """The request with its keys moved into the session's namespace (and a reply fix-up queued)."""
    if name in NOT_REWRITTEN:
        return args, raw, None
    if name in REFUSED or (name == b"copy" and any(a.lower() == b"db" for a in args[3:])):
        return args, raw, f"ERR vproxy: '{name.decode()}' across databases is not supported with emulated databases"
    cmd = s.app.commands.get(name)
    if cmd is None or "pubsub" in cmd.flags:
        return args, raw, None
    pos = key_positions(cmd, name, args)
    if not pos:
        return args, raw, None
    ns = s.ns
    args = list(args)
    for p in pos:
        args[p] = ns + args[p]
    if name in NAMES_IN_REPLY:
        keys = [args[p] for p in pos]
        s.post.append((i, lambda frame: strip_bulk(frame, keys, len(ns))))
    return args, resp.encode_request(args), None


def strip_bulk(frame: bytes, keys: list, n: int) -> bytes:
    """Cut the prefix from the key names as they appear (bulk strings) in a reply."""
    for k in keys:
        frame = frame.replace(b"$%d\r\n%s\r\n" % (len(k), k), b"$%d\r\n%s\r\n" % (len(k) - n, k[n:]))
    return frame


# ---- keyspace commands in a namespace (or db 0 beside namespaces) ----

def _strip_names(frame: bytes, ns: bytes | None, proto: int) -> bytes:
    names = resp.decode(frame)
    if ns:
        names = [k[len(ns):] for k in names if k.startswith(ns)]
    else:
        names = [k for k in names if not k.startswith(NS)]
    return resp.value(names, proto)


def keys_merge(s: ClusterSession, frames_merge):
    ns = s.ns

    def merge(frames):
        return _strip_names(frames_merge(frames), ns, s.proto)
    return merge


def scan_args(s: ClusterSession, args: list) -> list:
    """SCAN's arguments with MATCH moved into the namespace."""
    if not s.ns:
        return args
    out, j, matched = list(args[:2]), 2, False
    while j < len(args):
        if args[j].lower() == b"match" and j + 1 < len(args):
            out += [args[j], s.ns + args[j + 1]]
            matched, j = True, j + 2
        else:
            out.append(args[j])
            j += 1
    return out if matched else out + [b"MATCH", s.ns + b"*"]


def scan_names(s: ClusterSession, found: list) -> list:
    if s.ns:
        return [k[len(s.ns):] for k in found if k.startswith(s.ns)]
    return [k for k in found if not k.startswith(NS)]


def all_names(s: ClusterSession, limit: int = 0) -> list:
    """Every key of the namespace (prefixed), by SCAN on every primary."""
    out = []
    for slot in s.app.router.topology.first_slots:
        cursor = b"0"
        while True:
            frame = s.call([(slot, [b"SCAN", cursor, b"MATCH", s.ns + b"*", b"COUNT", SCAN_COUNT])])[0]
            if frame[:1] == b"-":
                raise ValueError(frame[1:].decode().strip())
            cursor, found = resp.decode(frame)
            out += found
            if cursor in (b"0", 0) or (limit and len(out) >= limit):
                break
        if limit and len(out) >= limit:
            break
    return out


def dbsize(s: ClusterSession, i, args, raw, batch):
    batch.replies[i] = _guard(lambda: resp.integer(len(all_names(s))))


def randomkey(s: ClusterSession, i, args, raw, batch):
    def pick():
        names = all_names(s, limit=1000)
        return resp.bulk(random.choice(names)[len(s.ns):]) if names else resp.null(s.proto)
    batch.replies[i] = _guard(pick)


def flushdb(s: ClusterSession, i, args, raw, batch):
    def flush():
        names = all_names(s)
        groups: dict[int, list] = {}
        for k in names:
            groups.setdefault(key_slot(k), []).append(k)
        for slot, ks in groups.items():
            for j in range(0, len(ks), 500):
                frame = s.call([(slot, [b"UNLINK", *ks[j:j + 500]])])[0]
                if frame[:1] == b"-":
                    return frame
        return resp.OK
    batch.replies[i] = _guard(flush)


def _guard(fn) -> bytes:
    try:
        return fn()
    except (ValueError, TypeError) as e:
        return resp.error(f"ERR vproxy: {e}")
