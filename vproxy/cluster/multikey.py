"""Cross-slot multi-key commands: split per slot, run on the owners, merge in the client's order.

    MGET / MSET / DEL / UNLINK / EXISTS / TOUCH      -> one sub-request per slot, merged as they answer
    SUNION/SINTER/SDIFF[STORE], SINTERCARD, SMOVE,
    ZUNION/ZINTER/ZDIFF[STORE]                       -> see setops.py (read, compute here, store)
    MSETNX, RENAME[NX], COPY, LMOVE, RPOPLPUSH ...   -> CROSSSLOT with the reason (not atomic across nodes)

A sub-request that fails makes the whole reply an error (the first one), never half an answer.
Handlers are fn(session, idx, args, batch); session.op(batch, idx, parts, merge) sends and merges.
"""

from __future__ import annotations

from .. import resp
from ..slots import key_slot
from . import setops
from ..handler import ClusterSession

WHY = {
    b"msetnx": "MSETNX must set all keys or none, which nodes cannot do together",
    b"rename": "a rename across slots would move the value between nodes non-atomically",
    b"renamenx": "a rename across slots would move the value between nodes non-atomically",
    b"copy": "a copy across slots would not be atomic",
    b"lmove": "an element moved across nodes could be lost if the second node failed",
    b"rpoplpush": "an element moved across nodes could be lost if the second node failed",
    b"blmove": "an element moved across nodes could be lost if the second node failed",
    b"brpoplpush": "an element moved across nodes could be lost if the second node failed",
    b"eval": "a script runs on one node: its keys must share a slot",
    b"evalsha": "a script runs on one node: its keys must share a slot",
    b"fcall": "a function runs on one node: its keys must share a slot",
}


def crossslot(name: bytes) -> str:
    why = WHY.get(name, "vproxy cannot split this command")
    return (f"CROSSSLOT Keys in request don't hash to the same slot (vproxy: '{name.decode(errors='replace')}' "
            f"across slots: {why}; put the keys in one slot with a hash tag {{...}})")


def group(args: list, start: int, step: int) -> dict[int, list[int]]:
    """Argument positions of keys (from start, every step), grouped by slot in first-seen order."""
    out: dict[int, list[int]] = {}
    for p in range(start, len(args), step):
        out.setdefault(key_slot(args[p]), []).append(p)
    return out


def mget(s: ClusterSession, i, args, batch):
    groups = group(args, 1, 1)
    order = list(groups.values())

    def merge(frames):
        out = [None] * (len(args) - 1)
        for ps, f in zip(order, frames):
            for p, v in zip(ps, resp.decode(f)):
                out[p - 1] = v
        return resp.value(out, s.proto)
    s.op(batch, i, [(slot, [args[0]] + [args[p] for p in ps]) for slot, ps in groups.items()], merge, reads=True)


def mset(s: ClusterSession, i, args, batch):
    if len(args) % 2 == 0:
        batch.replies[i] = resp.error(f"ERR wrong number of arguments for '{args[0].decode().lower()}' command")
        return
    groups = group(args, 1, 2)
    parts = [(slot, [args[0]] + [a for p in ps for a in (args[p], args[p + 1])]) for slot, ps in groups.items()]
    s.op(batch, i, parts, lambda frames: resp.OK)


def count(s: ClusterSession, i, args, batch):
    """DEL, UNLINK, EXISTS, TOUCH: the per-slot counts added up."""
    groups = group(args, 1, 1)
    parts = [(slot, [args[0]] + [args[p] for p in ps]) for slot, ps in groups.items()]
    s.op(batch, i, parts, lambda frames: resp.integer(sum(int(f[1:-2]) for f in frames)), reads=True)


SPLIT = {
    b"mget": mget, b"mset": mset, b"del": count, b"unlink": count, b"exists": count, b"touch": count,
    **setops.SPLIT,
}
