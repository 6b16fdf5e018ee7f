"""Set and sorted-set algebra across slots, computed in vproxy: read every input, combine, reply or store.

    SUNION/SINTER/SDIFF, SINTERCARD        -> SMEMBERS of each key (one per slot owner), combined here
    ZUNION/ZINTER/ZDIFF [WEIGHTS] [AGGREGATE] [WITHSCORES]
                                           -> each input read as a sorted set (a plain set scores 1)
    ...STORE dest                          -> the result replaces dest in one script on dest's node
    SMOVE src dst m                        -> TYPE dst, SREM src m, then SADD dst m (put back on failure)

The inputs are read one key at a time, so the result is what each key held when read (the nodes
cannot freeze several keys at once); the store itself is atomic on the destination's node.
"""

from __future__ import annotations

import math

from .. import resp
from ..slots import key_slot
from ..handler import ClusterSession

CHUNK = 4000  # arguments per SADD/ZADD inside the store script (Lua's unpack limit is ~8000)
STORE_SET = (b"redis.call('DEL', KEYS[1]) for i = 1, #ARGV, %d do redis.call('SADD', KEYS[1], "
             b"unpack(ARGV, i, math.min(i + %d, #ARGV))) end return #ARGV" % (CHUNK, CHUNK - 1))
STORE_ZSET = (b"redis.call('DEL', KEYS[1]) for i = 1, #ARGV, %d do redis.call('ZADD', KEYS[1], "
              b"unpack(ARGV, i, math.min(i + %d, #ARGV))) end return #ARGV / 2" % (CHUNK, CHUNK - 1))
READ_ZSET = (b"local t = redis.call('TYPE', KEYS[1]).ok "
             b"if t == 'set' then return {'s', redis.call('SMEMBERS', KEYS[1])} end "
             b"if t == 'zset' or t == 'none' then return {'z', redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')} end "
             b"return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value')")


KIND = {b"union": b"union", b"inter": b"inter", b"diff": b"diff"}


class Bad(Exception):
    """A request vproxy refuses before reading anything; the message is the error reply."""


def _err(batch, i, msg: str) -> None:
    batch.replies[i] = resp.error(msg)


def set_reply(members, proto: int) -> bytes:
    head = b"~%d\r\n" if proto == 3 else b"*%d\r\n"
    return head % len(members) + b"".join(resp.bulk(m) for m in members)


# ---- plain sets ----

def _combine(kind: bytes, sets: list) -> set:
    if kind == b"union":
        return set().union(*sets)
    if kind == b"inter":
        out = set(sets[0])
        for x in sets[1:]:
            out &= x
        return out
    out = set(sets[0])
    for x in sets[1:]:
        out -= x
    return out


def _members(frames) -> list:
    return [set(resp.decode(f)) for f in frames]


def sets(s: ClusterSession, i, args, batch):
    """SUNION/SINTER/SDIFF key [key ...] and their STORE forms."""
    name = args[0].lower()
    store = name.endswith(b"store")
    kind = KIND[name[1:-5] if store else name[1:]]
    keys = args[2:] if store else args[1:]
    parts = [(key_slot(k), [b"SMEMBERS", k]) for k in keys]
    if not store:
        return s.op(batch, i, parts, lambda frames: set_reply(sorted(_combine(kind, _members(frames))), s.proto))
    frames = s.call(parts)
    err = _first_error(frames)
    if err:
        batch.replies[i] = err
        return
    members = sorted(_combine(kind, _members(frames)))
    batch.replies[i] = _store(s, args[1], STORE_SET, members)


def _sintercard_args(args: list) -> tuple[list, int]:
    """(keys, limit) of SINTERCARD numkeys key... [LIMIT n], checked as the server does; raises Bad."""
    n = resp.string2ll(args[1])
    if n is None or n <= 0:
        raise Bad("ERR numkeys should be greater than 0")
    if n > len(args) - 2:
        raise Bad("ERR Number of keys can't be greater than number of args")
    limit, j = 0, 2 + n
    while j < len(args):  # LIMIT may come more than once: the last one counts
        if args[j].lower() != b"limit" or j + 1 >= len(args):
            raise Bad("ERR syntax error")
        limit = resp.string2ll(args[j + 1])
        if limit is None or limit < 0:
            raise Bad("ERR LIMIT can't be negative")
        j += 2
    return args[2:2 + n], limit


def sintercard(s: ClusterSession, i, args, batch):
    try:
        keys, limit = _sintercard_args(args)
    except Bad as e:
        return _err(batch, i, str(e))

    def merge(frames):
        size = len(_combine(b"inter", _members(frames)))
        return resp.integer(min(size, limit) if limit else size)
    s.op(batch, i, [(key_slot(k), [b"SMEMBERS", k]) for k in keys], merge)


def smove(s: ClusterSession, i, args, batch):
    src, dst, member = args[1], args[2], args[3]
    kind = resp.decode(s.call([(key_slot(dst), [b"TYPE", dst])])[0])
    if isinstance(kind, Exception):
        batch.replies[i] = resp.error(str(kind))
        return
    if kind not in (b"set", b"none", "set", "none"):
        return _err(batch, i, "WRONGTYPE Operation against a key holding the wrong kind of value")
    removed = s.call([(key_slot(src), [b"SREM", src, member])])[0]
    if removed[:1] == b"-" or removed == b":0\r\n":
        batch.replies[i] = removed
        return
    added = s.call([(key_slot(dst), [b"SADD", dst, member])])[0]
    if added[:1] == b"-":  # give the member back: nothing moved
        s.call([(key_slot(src), [b"SADD", src, member])])
        batch.replies[i] = added
        return
    batch.replies[i] = resp.integer(1)


# ---- sorted sets ----

def _zparse(name: bytes, args: list, store: bool):
    """(dest, keys, weights, aggregate, withscores) of ZUNION/ZINTER/ZDIFF[STORE]; raises Bad."""
    base = 2 if store else 1
    n = resp.string2ll(args[base])
    if n is None:
        raise Bad("ERR value is not an integer or out of range")
    if n <= 0:
        raise Bad(f"ERR at least 1 input key is needed for '{name.decode()}' command")
    keys = args[base + 1:base + 1 + n]
    if len(keys) < n:
        raise Bad("ERR syntax error")
    weights, agg, withscores, j = [1.0] * n, b"sum", False, base + 1 + n
    diff = name.startswith(b"zdiff")
    while j < len(args):
        opt = args[j].lower()
        if opt == b"weights" and not diff and j + n < len(args):
            try:
                weights = [float(w) for w in args[j + 1:j + 1 + n]]
            except ValueError:
                raise Bad("ERR weight value is not a float") from None
            j += n + 1
        elif opt == b"aggregate" and not diff and j + 1 < len(args) and args[j + 1].lower() in (b"sum", b"min", b"max"):
            agg, j = args[j + 1].lower(), j + 2
        elif opt == b"withscores" and not store:
            withscores, j = True, j + 1
        else:
            raise Bad("ERR syntax error")
    return (args[1] if store else None), keys, weights, agg, withscores


def _zinput(frame) -> dict:
    kind, items = resp.decode(frame)
    if kind in (b"s", "s"):
        return {m: 1.0 for m in items}
    return {items[k]: float(items[k + 1]) for k in range(0, len(items), 2)}


def _agg(agg: bytes, a: float, b: float) -> float:
    if agg == b"min":
        return min(a, b)
    if agg == b"max":
        return max(a, b)
    v = a + b
    return 0.0 if math.isnan(v) else v


def zcompute(kind: bytes, inputs: list, weights: list, agg: bytes) -> list:
    """[(member, score)] sorted by score then member, as the server would order them."""
    def weighted(x: float, w: float) -> float:
        v = x * w
        return 0.0 if math.isnan(v) else v
    if kind == b"diff":
        others = set().union(*inputs[1:]) if len(inputs) > 1 else set()
        out = {m: sc for m, sc in inputs[0].items() if m not in others}
    else:
        out = {}
        common = set(inputs[0]).intersection(*inputs[1:]) if kind == b"inter" else None
        for inp, w in zip(inputs, weights):
            for m, sc in inp.items():
                if common is not None and m not in common:
                    continue
                v = weighted(sc, w)
                out[m] = _agg(agg, out[m], v) if m in out else v
    return sorted(out.items(), key=lambda kv: (kv[1], kv[0]))


def fmt_score(x: float) -> bytes:
    if math.isinf(x):
        return b"inf" if x > 0 else b"-inf"
    text = repr(x)
    return (text.removesuffix(".0")).encode()


def zreply(items: list, withscores: bool, proto: int) -> bytes:
    if not withscores:
        return b"*%d\r\n" % len(items) + b"".join(resp.bulk(m) for m, _ in items)
    if proto == 3:
        return b"*%d\r\n" % len(items) + b"".join(b"*2\r\n" + resp.bulk(m) + b"," + fmt_score(sc) + b"\r\n"
                                                 for m, sc in items)
    return b"*%d\r\n" % (2 * len(items)) + b"".join(resp.bulk(m) + resp.bulk(fmt_score(sc)) for m, sc in items)


def zsets(s: ClusterSession, i, args, batch):
    """ZUNION/ZINTER/ZDIFF and their STORE forms."""
    name = args[0].lower()
    store = name.endswith(b"store")
    try:
        dest, keys, weights, agg, withscores = _zparse(name, args, store)
    except Bad as e:
        return _err(batch, i, str(e))
    kind = KIND[name[1:-5] if store else name[1:]]
    parts = [(key_slot(k), [b"EVAL", READ_ZSET, b"1", k]) for k in keys]
    if not store:
        def merge(frames):
            return zreply(zcompute(kind, [_zinput(f) for f in frames], weights, agg), withscores, s.proto)
        return s.op(batch, i, parts, merge)
    frames = s.call(parts)
    err = _first_error(frames)
    if err:
        batch.replies[i] = err
        return
    items = zcompute(kind, [_zinput(f) for f in frames], weights, agg)
    batch.replies[i] = _store(s, dest, STORE_ZSET, [a for m, sc in items for a in (fmt_score(sc), m)])


# ---- helpers ----

def _first_error(frames):
    return next((f for f in frames if f is None or f[:1] == b"-"), None)


def _store(s: ClusterSession, dest: bytes, script: bytes, argv: list) -> bytes:
    return s.call([(key_slot(dest), [b"EVAL", script, b"1", dest, *argv])])[0]


SPLIT = {
    **dict.fromkeys([b"sunion", b"sinter", b"sdiff", b"sunionstore", b"sinterstore", b"sdiffstore"], sets),
    b"sintercard": sintercard, b"smove": smove,
    **dict.fromkeys([b"zunion", b"zinter", b"zdiff", b"zunionstore", b"zinterstore", b"zdiffstore"], zsets),
}
