"""A cluster session's requests in flight (Subs): split ones sent as parts, every one settled by
following what the nodes answer, then the parts merged.

    op(parts, merge) / call(parts) -> one Sub per part, sent on the slot owner's channel
    settle -> wait -> every Sub, in send order:
        -MOVED slot addr         -> the slot map patched (a refresh asked), resent there
        -ASK slot addr           -> ASKING + resent there, the map unchanged
        -TRYAGAIN -CLUSTERDOWN -LOADING -MASTERDOWN -READONLY, a lost connection
                                 -> back off, refresh, resend (a lost request only if it never
                                    reached the server, or may run twice)
        -NOSCRIPT (EVALSHA of a script vproxy saw loaded) -> SCRIPT LOAD + resent
      until primary_wait has passed; then the merges: a failed part makes the reply an error

Redirects is a mixin of ClusterSession (session.py): the session's inflight, ops and sb hold the state.
"""

from __future__ import annotations

from time import monotonic

import gevent

from .. import hostport, resp
from ..mux import busy
from ..mux.channel import TIMED_OUT, Batch
from . import keyless

ASKING = resp.encode_request([b"ASKING"])
WAIT = (b"-TRYAGAIN", b"-CLUSTERDOWN", b"-LOADING", b"-MASTERDOWN", b"-READONLY")  # not now: wait, then again
REDIRECT = (b"-MOVED ", b"-ASK ", *WAIT)  # not here or not now: the request may run again
HOLD = (b"-MOVED ", b"-ASK ", b"-NOSCRIPT", *WAIT)  # replies the outbox holds for finish() to sort out
_IDEMPOTENT = frozenset([b"set", b"hset", b"sadd", b"zadd", b"expire", b"pexpire", b"persist", b"mset"])


class Sub:
    """One request vproxy sends to a node: its reply lands in batch.replies[idx]."""

    __slots__ = ("addr", "batch", "block", "idx", "name", "raw", "slot")

    def __init__(self, batch, idx, raw, slot, name, block=False):
        self.batch, self.idx, self.raw, self.slot, self.name, self.block = batch, idx, raw, slot, name, block
        self.addr = None  # the node it was last sent to


def _script_of(sub: Sub) -> bytes | None:
    """The body of the script an EVALSHA names, if vproxy saw it loaded."""
    if sub.name not in (b"evalsha", b"evalsha_ro"):
        return None
    parts = sub.raw.split(b"\r\n", 5)
    return keyless.SCRIPTS.get(parts[4].lower()) if len(parts) > 5 else None


class Redirects:
    """Parts sent and settled: redirections followed, retries, merges (a mixin of ClusterSession)."""

    # ---- split and fan-out requests ----

    def op(self, batch: Batch, i: int, parts: list, merge, reads: bool = False) -> None:
        """Send parts [(slot, args)] now; at settle, batch.replies[i] = merge(their replies).

        reads: read-only parts may go to replicas (read_from); never for cursors (SCAN)."""
        subs = self.subs(parts, reads and self.reads)  # first: it may settle (and merge) what came before
        self.ops.append((batch, i, subs, merge))

    def subs(self, parts: list, reads: bool = False) -> list:
        out = []
        for slot, args in parts:
            sub = Sub(None, 0, resp.encode_request(args), slot, args[0].lower())
            replica = self.replica_for(slot, sub.name) if reads else None
            self.send(sub, replica, fresh=True, readonly=replica is not None)
            out.append(sub)
        return out

    def sides_everywhere(self, batch: Batch, i: int, raw: bytes, merge) -> None:
        """SCRIPT KILL / FUNCTION KILL on every slot-owning primary right now (busy.kill: the node
        that runs the script answers nothing on the connections it already has); at settle,
        batch.replies[i] = merge(their replies, errors included). vproxy does not know which node
        runs a script (it may not have answered anyone yet), so every node is asked."""
        subs = []
        for addr in self.app.router.topology.primaries:
            sb = self.sb
            sub = Sub(sb, len(sb.replies), raw, -1, b"kill")
            sb.replies.append(None)
            subs.append(sub)
            busy.kill(addr, self.app.cfg, raw, sb, sub.idx, self.user)
        if not subs:
            batch.replies[i] = keyless.NO_MAP
            return
        self.ops.append((batch, i, subs, merge))

    def call(self, parts: list) -> list:
        """Run parts [(slot, args)] now, after everything before them; their final replies, in order."""
        self.settle()
        subs = self.subs(parts)
        self.finish()
        return [s.batch.replies[s.idx] for s in subs]

    # ---- plain requests the outbox held (a redirection, a lost connection: outbox.py) ----

    def _unstick(self) -> None:
        """The held plain requests become a batch of Subs, settled (redirections followed) and written."""
        box = self.outbox
        held = box.held_all()
        batch = self.batch = Batch(len(held))
        self.held_stats(batch, len(held))
        audits = {e.idx: e for e in self.audits if e.batch is batch}  # held records (audit.AuditTrack.drop)
        for j, (frame, fact, (raw, slot, name, addr)) in enumerate(held):
            batch.replies[j] = frame
            if fact is not None:
                batch.lost = batch.lost or {}
                batch.lost[j] = fact
            sub = Sub(batch, j, raw, slot, name)
            sub.addr = addr
            self.inflight.append(sub)
            if j in audits:
                audits[j].target = sub  # the node that answers in the end (after MOVED/ASK)
        self.settle()
        self.flush(batch, len(held))

    def audit_target(self, i: int, batch: Batch):
        """audit.py: the Sub of request i (its node once answered, after redirections), "*" when it was
        split over several nodes, else as a standalone session says."""
        for sub in reversed(self.inflight):
            if sub.batch is batch and sub.idx == i:
                return sub
        for op in self.ops:
            if op[0] is batch and op[1] == i:
                return "*"
        return super().audit_target(i, batch)

    # ---- settle: wait, follow redirections, retry, merge ----

    def settle(self) -> None:
        if self.inflight or self.ops:
            self.finish()
        super().settle()

    def finish(self) -> None:
        deadline, delay, rounds = 0.0, 0.02, 0
        while True:
            self.wait_all()
            redo = [(s, f) for s in self.inflight if (f := s.batch.replies[s.idx]) is not None and f[:1] == b"-"
                    and self.retryable(s, f)]
            if not redo:
                break
            now = monotonic()
            deadline = deadline or now + max(self.app.cfg.primary_wait, 0.2)
            if now >= deadline:
                break
            rounds += 1
            if rounds > 3 or any(not f.startswith((b"-MOVED ", b"-ASK ")) for _, f in redo):
                self.refresh()
                gevent.sleep(delay)
                delay = min(delay * 2, 0.5)
            for s, f in redo:
                if not self.stuck_here(s):
                    self.resend(s, f)
        self.inflight = []
        if self.ops or self.sb.replies:
            self.merge_ops()

    def wait_all(self) -> None:
        batch = self.batch
        if batch is not None and batch.left:
            self.wait_batch()
        if self.sb.left:
            self.sb.wait()

    def retryable(self, sub: Sub, frame: bytes) -> bool:
        """May this failed sub run again? Decided from facts: a redirection, or what its batch
        recorded when the connection failed (never sent: yes; sent: only if it may run twice)."""
        lost = sub.batch.lost
        sent = lost.get(sub.idx) if lost else None
        if frame.startswith((b"-MOVED ", b"-ASK ")) or frame.startswith(WAIT):
            return True
        if frame.startswith(b"-NOSCRIPT"):  # a node that never saw SCRIPT LOAD (new, promoted, flushed)
            return _script_of(sub) is not None
        if sent is None:  # the server's own error reply
            return False
        if not sent:
            return True
        cmd = self.app.commands.get(sub.name)  # sent, then lost: resend only what may run twice
        return cmd is not None and ("readonly" in cmd.flags or sub.name in _IDEMPOTENT)

    def stuck_here(self, sub: Sub) -> bool:
        """The sub timed out on a node that still owns its slot: that node is stuck, and sending it
        there again would only wait once more. It waits (until the deadline) for a new owner, and
        if none comes the client gets the timeout, which says what happened."""
        lost = sub.batch.lost
        if not lost or lost.get(sub.idx) != TIMED_OUT:
            return False
        topo = self.app.router.topology
        return (topo.owner(sub.slot) if sub.slot >= 0 else topo.primary) == sub.addr

    def resend(self, sub: Sub, frame: bytes) -> None:
        lost = sub.batch.lost
        if lost:
            lost.pop(sub.idx, None)  # the new attempt records its own fact
        if frame.startswith((b"-MOVED ", b"-ASK ")):
            parts = frame[1:].split()
            slot, addr = int(parts[1]), hostport.parse_node(parts[2])
            if frame.startswith(b"-MOVED "):
                self.patch(slot, addr)
                return self.send(sub, addr)
            return self.send(sub, addr, asking=True)
        if frame.startswith(b"-NOSCRIPT"):
            return self.send(sub, asking=resp.encode_request([b"SCRIPT", b"LOAD", _script_of(sub)]))
        self.send(sub)

    def patch(self, slot: int, addr) -> None:
        router = self.app.router
        topo = router.topology
        if hasattr(topo, "moved") and topo.owner(slot) != addr:
            router.publish(topo.moved(slot, addr))
            self.refresh()

    def refresh(self) -> None:
        mon = self.app.monitor
        if mon is not None:
            mon.request_refresh()

    def merge_ops(self) -> None:
        ops, self.ops = self.ops, []
        if self.sb.replies:
            self.sb = Batch(0)
        for batch, i, subs, merge in ops:
            frames = [s.batch.replies[s.idx] for s in subs]
            err = next((f for f in frames if f is None or (f[:1] == b"-" and merge not in keyless.TAKE_ERRORS)),
                       False)
            if err is not False:
                batch.replies[i] = err or resp.error("ERR vproxy: a part of the request got no reply")
                continue
            try:
                batch.replies[i] = merge(frames)
            except Exception as e:  # a reply vproxy could not merge: an error, never half an answer
                batch.replies[i] = resp.error(f"ERR vproxy: cannot merge the nodes' replies ({e})")
