"""One transaction model for both modes (standalone: pinned.py, local.py; cluster:
cluster/transaction.py, cluster/session.py).

A session's `tx` is a TxState, and every question about a transaction is asked here:

    IDLE ──WATCH──> WATCHING ──MULTI──> WATCHING|QUEUED ──EXEC/DISCARD──> ENDING ──settle──> IDLE
      └────MULTI───> QUEUED ─(a request refused)─> QUEUED|FAILED ─EXEC/DISCARD─┘  (no lease: IDLE)
    WATCHING ──UNWATCH──> ENDING                          RESET (any state) ──> IDLE

WATCHING  WATCH ran: the server watches keys for this client (CLIENT LIST watch=1); it holds the
          session's lease (a connection pinned to it)
QUEUED    MULTI ran: requests are queued until EXEC / DISCARD / RESET (CLIENT LIST multi=0, flag x)
FAILED    with QUEUED: a request was refused at queue time, EXEC aborts (-EXECABORT)
ENDING    the issue's "exec" state: EXEC, DISCARD or UNWATCH ended the pinned state on the server,
          whose replies are still coming on the lease; settle gives the lease back (released())
          and the state is IDLE again. The lease is still the session's, but no longer pinned: new
          requests take shared connections (pinned() is false), a new WATCH/MULTI a new lease.

A cluster transaction is also bound to one slot (`pin_slot`: that of the WATCH keys, else of the
first key queued): bind_slot(), slot(); the binding ends with the transaction (end_pinned(), RESET),
so a transaction pipelined behind another's EXEC binds a slot of its own. (A standalone session
never binds one: its pin_slot stays None.)

FAILED is only ever set together with QUEUED, and ending MULTI clears both, and ENDING and WATCHING
sit below QUEUED: `tx >= QUEUED` means "inside MULTI" (an int comparison: the per-request checks
on the hot paths, plain.py's plain() and the cluster's dispatch, stay cheap), `tx < QUEUED` outside.
"""

from __future__ import annotations

from enum import IntFlag


class TxState(IntFlag):
    IDLE = 0
    WATCHING = 1  # WATCH ran: the server watches keys for this client (CLIENT LIST watch=1)
    ENDING = 2  # EXEC/DISCARD/UNWATCH sent on the lease: give it back once its replies are in
    QUEUED = 4  # MULTI ran: requests are queued until EXEC / DISCARD / RESET
    FAILED = 8  # with QUEUED: a request was refused at queue time, EXEC aborts (cluster: -EXECABORT)


IDLE, WATCHING, ENDING, QUEUED, FAILED = (TxState.IDLE, TxState.WATCHING, TxState.ENDING, TxState.QUEUED,
                                          TxState.FAILED)

# ---- questions ----


def in_multi(s) -> bool:
    return s.tx >= QUEUED


def failed(s) -> bool:
    return bool(s.tx & FAILED)


def watching(s) -> bool:
    return bool(s.tx & WATCHING)


def pinned(s) -> bool:
    """The session holds a lease that still carries its WATCH/MULTI: its requests go there."""
    return s.lease is not None and not s.tx & ENDING


def ending(s) -> bool:
    """The session's lease has ended its pinned state and waits for its replies (settle gives it back)."""
    return s.lease is not None and bool(s.tx & ENDING)


def slot(s) -> int | None:
    """Cluster: the slot the transaction is bound to, None: none yet."""
    return s.pin_slot


# ---- transitions ----


def watch(s) -> None:
    s.tx |= WATCHING


def multi(s) -> None:
    s.tx = (s.tx & (WATCHING | ENDING)) | QUEUED


def fail(s) -> None:
    """A request refused while queued: only inside MULTI (outside it there is nothing to abort)."""
    if s.tx >= QUEUED:
        s.tx |= FAILED


def end_multi(s) -> None:
    """EXEC/DISCARD, cluster: the queue is done with (sent whole, or dropped); the WATCH is ended
    by end_pinned() when it holds a lease."""
    s.tx &= WATCHING | ENDING


def end_pinned(s) -> None:
    """EXEC/DISCARD/UNWATCH ended the pinned state: no WATCH, no MULTI, no slot bound; the lease (if
    any) is ENDING until settle gives it back."""
    s.tx = ENDING if s.lease is not None else IDLE
    s.pin_slot = None


def released(s) -> None:
    """settle gave the ending lease back."""
    s.tx &= ~ENDING


def forget_queued(s) -> None:
    """RESET, cluster: the queued transaction's refusals and its bound slot are forgotten."""
    s.tx &= ~FAILED
    s.pin_slot = None


def bind_slot(s, slot_: int) -> None:
    s.pin_slot = slot_

