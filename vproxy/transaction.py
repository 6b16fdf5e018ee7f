"""One transaction state for both modes (standalone: client.py, local.py; cluster: cluster/transaction.py).

A session's `tx` is a TxState: which of WATCH and MULTI are on, and whether a request was refused
while queued (EXEC then answers -EXECABORT). FAILED is only ever set together with QUEUED, and
ending MULTI clears both, so `tx >= QUEUED` means "inside MULTI" (an int comparison: the
per-request check on the hot path stays cheap).

The transitions both modes use:
  WATCH               watch()       IDLE -> WATCHING (QUEUED keeps it: WATCH then MULTI)
  MULTI               multi()       + QUEUED
  a refused request   fail()        QUEUED -> QUEUED | FAILED
  EXEC / DISCARD      end_multi()   - QUEUED, - FAILED (the WATCH ends when the lease does)
  UNWATCH, EXEC done  unwatch()     - WATCHING
  RESET, EXEC         end()         IDLE
"""

from __future__ import annotations

from enum import IntFlag


class TxState(IntFlag):
    IDLE = 0
    WATCHING = 1  # WATCH ran: the server watches keys for this client (CLIENT LIST watch=1)
    QUEUED = 2  # MULTI ran: requests are queued until EXEC / DISCARD / RESET
    FAILED = 4  # with QUEUED: a request was refused at queue time, EXEC aborts (cluster: -EXECABORT)


IDLE, WATCHING, QUEUED, FAILED = TxState.IDLE, TxState.WATCHING, TxState.QUEUED, TxState.FAILED


def in_multi(s) -> bool:
    return s.tx >= QUEUED


def failed(s) -> bool:
    return bool(s.tx & FAILED)


def watching(s) -> bool:
    return bool(s.tx & WATCHING)


def watch(s) -> None:
    s.tx |= WATCHING


def multi(s) -> None:
    s.tx = (s.tx & WATCHING) | QUEUED


def fail(s) -> None:
    """A request refused while queued: only inside MULTI (outside it there is nothing to abort)."""
    if s.tx >= QUEUED:
        s.tx |= FAILED


def end_multi(s) -> None:
    s.tx &= WATCHING


def unwatch(s) -> None:
    s.tx &= ~WATCHING


def end(s) -> None:
    s.tx = IDLE
