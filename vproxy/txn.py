"""MULTI/EXEC and WATCH on a cluster: a transaction lives on the node of its first key's slot.

    WATCH k         -> lease on owner(slot k); the transaction is bound to that slot
    MULTI           -> +OK at once; keyless requests queue in vproxy (+QUEUED) until a key
    first key       -> lease on owner(slot), then MULTI + the queued requests (their replies dropped)
    key of another slot -> CROSSSLOT error; EXEC then answers EXECABORT (the server gets DISCARD)
    EXEC / DISCARD  -> on the lease (a transaction without keys runs on any primary)
"""

from __future__ import annotations

from . import resp
from .client import _STATEFUL, ClientSession
from .local import LOCAL

MULTI = resp.encode_request([b"MULTI"])
DISCARD = resp.encode_request([b"DISCARD"])
EXECABORT = resp.error("EXECABORT Transaction discarded because of previous errors.")


def other_slot(pin) -> str:
    return (f"CROSSSLOT vproxy: this transaction is bound to slot {pin} (the slot of its first key); "
            "keys of other slots cannot join it (put them in one slot with a hash tag {...})")


def _held(s) -> bool:
    return s.lease is not None and not s.lease.ending


def open_lease(s, i, batch, slot: int, multi: bool) -> bool:
    """Lease a connection on slot's owner (any primary for -1); replay MULTI and the queue."""
    topo = s.app.router.topology
    s.lease_addr = topo.owner(slot) if slot >= 0 else None
    try:
        lease = s._new_lease(i, batch)
    finally:
        s.lease_addr = None
    if lease is None:
        s.multi_failed = s.in_multi
        return False
    s.lease, s.cur = lease, lease.channel
    s.pin_slot = slot if slot >= 0 else None
    if multi:
        lease.channel.submit(MULTI, None, 0, 0.0)
        for name, args, raw in s.mq:
            if name in _STATEFUL:
                lease.dirty = True
            lease.channel.submit(raw, None, 0, 0.0)
        s.mq = []
    return True


def multi(s, i, args, raw, batch):
    if s.in_multi:
        batch.replies[i] = resp.error("ERR MULTI calls can not be nested")
        return
    s.in_multi, s.multi_select, s.multi_failed, s.mq = True, None, False, []
    if _held(s):  # after WATCH: the node is chosen already
        return s.submit(s.lease.channel, i, raw, batch)
    batch.replies[i] = resp.OK


def watch(s, i, args, raw, batch):
    slots = s.slots_of(b"watch", args)
    if not slots or len(slots) > 1:
        batch.replies[i] = resp.error("CROSSSLOT vproxy: WATCH keys must all be in one slot (use a hash tag {...})")
        return
    slot = slots.pop()
    if _held(s):
        if s.pin_slot is not None and slot != s.pin_slot:
            batch.replies[i] = resp.error(other_slot(s.pin_slot))
            return
    elif not open_lease(s, i, batch, slot, multi=False):
        return
    s.watching = True
    s.submit(s.lease.channel, i, raw, batch)


def queue(s, i, name, args, raw, batch):
    """A request inside MULTI: checked against the transaction's slot, then queued on the node."""
    slots = s.slots_of(name, args)
    if slots is None or len(slots) > 1 or (slots and s.pin_slot is not None and s.pin_slot not in slots):
        s.multi_failed = True
        why = other_slot(s.pin_slot) if slots and len(slots) == 1 else \
            f"CROSSSLOT vproxy: the keys of '{name.decode()}' are not all in one slot"
        batch.replies[i] = resp.error(why)
        return
    if not _held(s):
        if not slots:
            return _queue_keyless(s, i, name, args, raw, batch)
        if not open_lease(s, i, batch, next(iter(slots)), multi=True):
            return
    elif s.pin_slot is None and slots:
        s.pin_slot = next(iter(slots))
    ClientSession.in_transaction(s, i, name, args, raw, batch)


def _queue_keyless(s, i, name, args, raw, batch):
    cmd = s.app.commands.get(name)
    if cmd is None or not cmd.arity_ok(len(args)):
        s.multi_failed = True
        what = "unknown command" if cmd is None else "wrong number of arguments for"
        batch.replies[i] = resp.error(f"ERR {what} '{args[0].decode(errors='replace')}'")
        return
    if name == b"select" and len(args) == 2 and args[1].isdigit():
        s.multi_select = int(args[1])
    s.mq.append((name, args, raw))
    batch.replies[i] = b"+QUEUED\r\n"


def exec_(s, i, args, raw, batch):
    name = args[0].lower()
    if not s.in_multi:
        return LOCAL[name](s, i, args, raw, batch)
    if s.multi_failed or (name == b"discard" and not _held(s)):
        if _held(s):
            s.lease.ending = True
            s.lease.channel.submit(DISCARD, None, 0, 0.0)
        s.in_multi = s.watching = s.multi_failed = False
        s.mq = []
        batch.replies[i] = EXECABORT if name == b"exec" else resp.OK
        return
    if not _held(s) and not open_lease(s, i, batch, -1, multi=True):
        s.in_multi = False
        return
    s.mq = []
    LOCAL[name](s, i, args, raw, batch)


def reset(s, i, args, raw, batch):
    s.mq, s.multi_failed, s.pin_slot, s.ns = [], False, None, None
    LOCAL[b"reset"](s, i, args, raw, batch)


PRE = {b"multi": multi, b"watch": watch, b"exec": exec_, b"discard": exec_, b"reset": reset}
