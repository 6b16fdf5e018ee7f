"""MULTI/EXEC and WATCH on a cluster: a transaction is held in vproxy and sent whole at EXEC.

    WATCH k         -> lease on owner(slot k); the transaction is bound to that slot
    MULTI           -> +OK from vproxy; nothing is sent yet
    each request    -> checked (arity, known command, same slot as the first key) -> +QUEUED, kept
    key of another slot -> CROSSSLOT error; EXEC then answers EXECABORT
    EXEC            -> [ASKING] MULTI, the requests, EXEC, back to back on one connection to the
                       slot owner (the WATCH lease, else the session's shared channel there: a
                       transaction written in one piece cannot interleave with other clients'
                       requests); a MOVED/ASK/TRYAGAIN at queue time -> the whole transaction runs
                       again at the right node, until primary_wait; under WATCH -> nil (aborted:
                       the client retries, as after a watched key changed)
    DISCARD         -> nothing was sent: +OK (UNWATCH on the lease)
Transactions holding SELECT/HELLO/CLIENT ... run on a connection of their own, closed afterwards.
"""

from __future__ import annotations

from contextlib import nullcontext
from time import monotonic

import gevent

from .. import hostport, resp
from .. import transaction as tx
from ..pinned import AUTH_IN_MULTI, SUBSCRIBE_IN_MULTI
from ..commands import STATEFUL
from ..errors import BackendError
from ..local import LOCAL, after_exec, apply_select
from ..mux.channel import Batch, deadline_after
from ..mux.lease import Lease
from ..gatecmds import PLACEHOLDER, client_own, hide_in_exec
from ..gatecmds import queued as gated
from ..streams import SUBSCRIBES
from .redirects import ASKING, REDIRECT
from ..handler import ClusterSession

MULTI = resp.encode_request([b"MULTI"])
EXEC = resp.encode_request([b"EXEC"])
UNWATCH = resp.encode_request([b"UNWATCH"])
EXECABORT = resp.error("EXECABORT Transaction discarded because of previous errors.")


def other_slot(pin) -> str:
    return (f"CROSSSLOT vproxy: this transaction is bound to slot {pin} (the slot of its first key); "
            "keys of other slots cannot join it (put them in one slot with a hash tag {...})")


def watch(s: ClusterSession, i, args, raw, batch):
    slots = s.slots_of(b"watch", args)
    if not slots or len(slots) > 1:
        batch.replies[i] = resp.error("CROSSSLOT vproxy: WATCH keys must all be in one slot (use a hash tag {...})")
        return
    slot = slots.pop()
    if tx.pinned(s):
        if tx.slot(s) is not None and slot != tx.slot(s):
            batch.replies[i] = resp.error(other_slot(tx.slot(s)))
            return
    else:
        s.lease_addr = s.app.router.topology.owner(slot)
        try:
            lease = s.new_lease(i, batch)
        finally:
            s.lease_addr = None
        if lease is None:
            return
        s.lease, s.cur = lease, lease.channel
    tx.bind_slot(s, slot)
    tx.watch(s)
    s.submit(s.lease.channel, i, raw, batch)


def multi(s: ClusterSession, i, args, raw, batch):
    if tx.in_multi(s):
        batch.replies[i] = resp.error("ERR MULTI calls can not be nested")
        return
    tx.multi(s)
    s.multi_select, s.multi_auth, s.multi_hide, s.multi_own, s.mq = None, [], [], [], []
    batch.replies[i] = resp.OK


def queue(s: ClusterSession, i, name, args, raw, batch):
    """A request inside MULTI: checked like the server would at queue time, then kept."""
    if name == b"watch":
        batch.replies[i] = resp.error("ERR WATCH inside MULTI is not allowed")
        return
    if s.proxy_auth(name, args):
        return s.refuse_queued(batch, i, AUTH_IN_MULTI)
    if name in SUBSCRIBES:
        return s.refuse_queued(batch, i, SUBSCRIBE_IN_MULTI)
    err = gated(s, name, args, len(s.mq))
    if err is not None:
        return s.refuse_queued(batch, i, err)
    cmd = s.app.commands.get(name)
    sub = cmd.subs.get(args[1].lower()) if cmd is not None and cmd.subs and len(args) > 1 else None
    if cmd is None or not cmd.arity_ok(len(args)) or (sub is not None and not sub.arity_ok(len(args))):
        tx.fail(s)
        full = name if sub is None else name + b"|" + args[1].lower()
        batch.replies[i] = resp.error(
            f"ERR unknown command '{args[0].decode(errors='replace')}'" if cmd is None
            else f"ERR wrong number of arguments for '{full.decode(errors='replace')}' command")
        return
    slots, pin = s.slots_of(name, args), tx.slot(s)
    if slots is None or len(slots) > 1 or (slots and pin is not None and pin not in slots):
        tx.fail(s)
        batch.replies[i] = resp.error(other_slot(pin) if slots and len(slots) == 1 else
                                      f"CROSSSLOT vproxy: the keys of '{name.decode()}' are not all in one slot")
        return
    if slots and pin is None:
        tx.bind_slot(s, next(iter(slots)))
    if name == b"select" and len(args) == 2 and s.db_arg(args[1]) is not None:
        s.multi_select = s.db_arg(args[1])
    elif name == b"auth" and 2 <= len(args) <= 3:  # backend users (users.py): the session's user after EXEC
        s.multi_auth.append((args[1] if len(args) == 3 else None, args[-1]))
    elif client_own(name, args):  # the session's, not the connection's: answered at EXEC
        s.multi_own.append((len(s.mq), args))
        name, raw = b"ping", PLACEHOLDER
    s.mq.append((name, raw))
    batch.replies[i] = b"+QUEUED\r\n"


def exec_(s: ClusterSession, i, args, raw, batch):
    name = args[0].lower()
    if not tx.in_multi(s):
        return LOCAL[name](s, i, args, raw, batch)
    queued, failed, target, slot, auth = s.mq, tx.failed(s), s.multi_select, tx.slot(s), s.multi_auth
    hide, own = tuple(s.multi_hide), s.multi_own
    tx.end_multi(s)
    s.mq, s.multi_auth, s.multi_hide, s.multi_own = [], [], [], []
    if name == b"discard" or failed:
        end_watch(s)
        batch.replies[i] = EXECABORT if name == b"exec" else resp.OK
        return
    s.settle()  # everything before EXEC has answered
    reply = run(s, queued, -1 if slot is None else slot)
    if target is not None:
        reply = apply_select(s, reply, target)
    if hide:  # the backend's secrets in its CONFIG GET replies
        reply = hide_in_exec(reply, hide)
    batch.replies[i] = after_exec(s, reply, auth, own)
    tx.end_pinned(s)  # EXEC ended the WATCH on the server: the lease, if any, is given back at settle


def end_watch(s: ClusterSession) -> None:
    if tx.pinned(s):
        s.lease.channel.submit(UNWATCH, None, 0, deadline_after(s.app.cfg.command_timeout))
    tx.end_pinned(s)


def run(s: ClusterSession, queued: list, slot: int) -> bytes:
    """Send the transaction whole; follow redirections by running it again. EXEC's reply."""
    cfg = s.app.cfg
    deadline, delay, addr, asking = monotonic() + max(cfg.primary_wait, 0.2), 0.02, None, False
    own = any(name in STATEFUL for name, _ in queued)
    while True:
        frames, unsent = _send(s, queued, slot, addr, asking, own)
        # may run again: the cluster said "not here / not now", or EXEC never reached a server
        bad = next((f for f in frames if f.startswith(REDIRECT)), frames[-1] if unsent else None)
        if bad is None or monotonic() >= deadline:
            return frames[-1]
        if tx.pinned(s):  # the WATCH is on a node that cannot run it: aborted, as if a watched key changed
            return resp.null(s.proto) if s.proto == 3 else b"*-1\r\n"
        addr, asking = None, False
        if bad.startswith((b"-MOVED ", b"-ASK ")):
            parts = bad[1:].split()
            addr, asking = hostport.parse_node(parts[2]), bad.startswith(b"-ASK ")
            if not asking:
                s.patch(int(parts[1]), addr)
        else:
            s.refresh()
            gevent.sleep(delay)
            delay = min(delay * 2, 0.5)


def _send(s: ClusterSession, queued: list, slot: int, addr, asking: bool, own: bool) -> tuple[list, bool]:
    """MULTI + queued + EXEC on one connection, written in one piece: every reply, in order, and
    whether EXEC surely never reached a server (so the transaction may be sent again)."""
    topo = s.app.router.topology
    lease = None
    try:
        if tx.pinned(s):
            ch = s.lease.channel
        else:
            addr = addr or (topo.owner(slot) if slot >= 0 else topo.primary)
            if addr is None:
                return [resp.error(f"CLUSTERDOWN vproxy: slot {slot} has no owner")], True
            if own:
                lease = Lease(s.app.router.pool(addr), s.key())
                lease.dirty = True
                ch = lease.channel
            else:
                ch = s.channel_to(addr)
    except BackendError as e:
        return [resp.error(str(e))], True
    b = Batch(len(queued) + 2)
    deadline = deadline_after(s.app.cfg.command_timeout)
    with lease if lease is not None else nullcontext():  # a connection of its own: closed after (dirty)
        if asking:
            ch.submit(ASKING, None, 0, deadline)  # a deadline on every request: the janitor looks at the oldest
        ch.submit(MULTI, b, 0, deadline)
        for j, (_, raw) in enumerate(queued, 1):
            ch.submit(raw, b, j, deadline)
        ch.submit(EXEC, b, len(queued) + 1, deadline)
        b.wait()
    return b.replies, bool(b.lost) and b.lost.get(len(queued) + 1) is False


def forget(s: ClusterSession) -> None:
    """RESET: the cluster session's own state (queued transaction, bound slot, database namespace)."""
    s.reset_cluster()


def reset(s: ClusterSession, i, args, raw, batch):
    forget(s)
    LOCAL[b"reset"](s, i, args, raw, batch)


PRE = {b"multi": multi, b"watch": watch, b"exec": exec_, b"discard": exec_, b"reset": reset}
