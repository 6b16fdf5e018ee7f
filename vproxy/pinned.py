"""Pinned connections: a Lease (mux/lease.py) held by one session, for MULTI/WATCH (the session's
`lease`, its state in transaction.py) or one blocking command (`oneshot`); SCRIPT/FUNCTION KILL on
a side connection. A mixin of ClientSession (client.py); the cluster session overrides new_lease,
block and in_transaction (cluster/session.py, cluster/transaction.py).

settle() is where leases whose state has ended are given back: a lease is held across requests
(from WATCH/MULTI to the reply of EXEC/DISCARD/UNWATCH, from a blocking command to its reply), so
no `with` scope fits it; RESET and a closed connection give them back dirty (drop_leases).
"""

from __future__ import annotations

from gevent.hub import get_hub

from . import commands as C
from . import resp
from . import transaction as tx
from .errors import BackendError
from .mux import busy
from .mux.channel import Batch, deadline_after
from .mux.lease import Lease
from .sockio import recv_nowait
from .gatecmds import PLACEHOLDER, client_own, queued
from .streams import SUB_KINDS, SUBSCRIBES

# A subscription that EXEC would start (SUBSCRIBES): the connection would be subscribed, but the client
# would not be in a stream (its messages never delivered, its next requests refused by the server):
# refused at queue time, so EXEC aborts (subscribe outside MULTI; inside a RESP3 subscription, MULTI
# may hold them)
SUBSCRIBE_IN_MULTI = "ERR vproxy: SUBSCRIBE inside MULTI is not supported; subscribe outside the transaction"

_WAIT_MARK = resp.encode_request([b"PUBLISH", b"__vproxy__:wait", b""])
# AUTH inside MULTI when vproxy checks the credentials itself (a proxy password or users): refused
AUTH_IN_MULTI = "ERR vproxy: AUTH inside MULTI is not supported when vproxy checks the passwords; AUTH before MULTI"


class Pinned:
    """The session's leases: taken, used, waited on, given back."""

    def wait_batch(self) -> None:
        """Wait for every reply of the current batch (watching for a hang-up while pinned)."""
        batch = self.batch
        if batch is not None and batch.left:
            if self.oneshot is not None or self.lease is not None:
                self._wait_watching_client(batch)
            else:
                batch.wait()

    def settle(self) -> None:
        """Wait for every reply in flight, then release leases whose state has ended."""
        self.wait_batch()
        batch = self.batch
        if self.ha_sent:
            self._ha_recover(batch)
        if self.oneshot is not None:
            self.oneshot.release(clean=True)
            self.oneshot = None
            self.cur = None
        if tx.ending(self):  # EXEC/DISCARD/UNWATCH's reply is in: the connection is no longer pinned
            self.lease.release(clean=True)
            self.lease = None
            self.cur = None
            tx.released(self)

    def _wait_watching_client(self, batch: Batch) -> None:
        """Wait on a pinned connection (maybe blocked for long), noticing at once if the client hangs
        up: its pinned connections are then closed, which ends a BLPOP on the server before it can
        take an element that other clients push (and ends this wait: the waiters get errors)."""
        watcher = get_hub().loop.io(self.sock.fileno(), 1)
        watcher.start(self._watch_client, watcher)
        try:
            batch.wait()
        finally:
            watcher.stop()
            watcher.close()

    def _watch_client(self, watcher) -> None:
        """Runs in the loop while a pinned request waits: read what the client sends meanwhile (kept
        for later, up to the query buffer limit), to see its hang-up even behind pipelined requests."""
        try:
            while True:
                data = recv_nowait(self.sock, 65536)
                if not data:
                    break
                self.early.append(data)
                self.early_bytes += len(data)
                if self.early_bytes > self.app.cfg.client_query_buffer_limit:
                    watcher.stop()  # stop reading (backpressure); the hang-up is seen later
                    return
        except BlockingIOError:
            return
        except OSError:
            pass
        watcher.stop()
        if self._nothing_blocks():
            # the client half-closed (or hung up) behind requests that answer on their own (a
            # transaction, WATCH, ...): they run and are answered, as the server runs what it read
            # before the EOF; the loop sees the EOF again once their replies are in
            return
        self.closing = True
        for lease in (self.oneshot, self.lease):
            if lease is not None and lease.channel is not None:
                lease.dirty = True
                lease.channel.close()  # answers the waiters with errors: the wait ends

    def _nothing_blocks(self) -> bool:
        """No request in flight on a pinned connection may block (each has a deadline: a blocking
        command is submitted without one), so every one of them is answered soon."""
        return not any(lease is not None and lease.channel is not None and lease.channel.may_block()
                       for lease in (self.oneshot, self.lease))

    def drop_leases(self) -> None:
        """RESET, a closed connection: the leases are given back dirty (their state is unknown)."""
        for lease in (self.lease, self.oneshot):
            if lease is not None:
                lease.release(clean=False)
        self.lease = self.oneshot = None

    def new_lease(self, i: int, batch: Batch) -> Lease | None:
        self.settle()
        if self.closing:
            return None
        try:
            return Lease(self.app.router.primary(), self.key())
        except BackendError as e:
            batch.replies[i] = resp.error(str(e))
            return None

    def pin(self, i: int, name: bytes, raw: bytes, batch: Batch) -> None:
        """MULTI or WATCH: the connection stays this client's until EXEC/DISCARD/UNWATCH/RESET."""
        if not tx.pinned(self):
            lease = self.new_lease(i, batch)
            if lease is None:
                if name == b"multi":  # what the client queues behind it must not run: see in_transaction
                    tx.multi(self)
                    self.lease = None
                return
            self.lease = lease
            self.cur = lease.channel
        if name == b"multi":
            tx.multi(self)
            self.multi_select, self.multi_proto, self.multi_auth = None, None, []
            self.multi_hide, self.multi_own, self.multi_queued = [], [], 0
        else:
            tx.watch(self)
        self.submit(self.lease.channel, i, raw, batch)

    def in_transaction(self, i: int, name: bytes, args: list, raw: bytes, batch: Batch) -> None:
        """Inside MULTI everything is queued by the server, wrong arity included (it aborts EXEC)."""
        if self.lease is None:  # MULTI failed: refuse until EXEC (EXECABORT) or DISCARD
            batch.replies[i] = resp.error("ERR vproxy: MULTI failed, command not queued; send EXEC or DISCARD")
            return
        if self.proxy_auth(name, args):
            return self.refuse_queued(batch, i, AUTH_IN_MULTI)
        err = SUBSCRIBE_IN_MULTI if name in SUBSCRIBES else queued(self, name, args, self.multi_queued)
        if err is not None:
            return self.refuse_queued(batch, i, err)
        self.multi_queued += 1
        if client_own(name, args):  # the session's, not the connection's: answered at EXEC
            self.multi_own.append((self.multi_queued - 1, args))
            return self.submit(self.lease.channel, i, PLACEHOLDER, batch)
        if name in C.STATEFUL or name in SUB_KINDS:  # (an UNSUBSCRIBE run by EXEC: never reuse that connection)
            self.lease.dirty = True
            if name == b"select" and len(args) == 2 and self.db_arg(args[1]) is not None:
                self.multi_select = self.db_arg(args[1])
            elif name == b"hello" and len(args) > 1 and args[1] in (b"2", b"3"):
                self.multi_proto = int(args[1])
            elif name == b"auth" and 2 <= len(args) <= 3 and not self.app.cfg.password and self.app.gate is None:
                self.multi_auth.append((args[1] if len(args) == 3 else None, args[-1]))
        self.submit(self.lease.channel, i, raw, batch)

    def refuse_queued(self, batch: Batch, i: int, msg: str) -> None:
        """refuse() inside MULTI: as when the server refuses a request at queue time, EXEC then
        aborts the transaction (-EXECABORT)."""
        self.refuse(batch, i, msg)
        tx.fail(self)  # cluster: cluster/transaction.exec_ answers EXECABORT
        if tx.pinned(self) and self.lease.channel is not None:
            # standalone: a request the server refuses at queue time flags its transaction (reply dropped)
            self.lease.channel.submit(b"*1\r\n$4\r\nECHO\r\n", None, 0, deadline_after(self.app.cfg.command_timeout))

    def block(self, i: int, raw: bytes, batch: Batch, dirty: bool = False, wait: bool = False,
              args: list | None = None) -> None:
        """A blocking command gets a connection of its own until it answers (args: the request's
        arguments; the cluster session finds the node by its keys, standalone has one server).

        WAIT/WAITAOF count acknowledgements of the writes made on *their* connection. The client's
        writes went over shared connections, so a propagated no-op (PUBLISH, which a standalone
        server replicates) first moves the leased connection's write offset past them."""
        if tx.pinned(self):
            return self.submit(self.lease.channel, i, raw, batch, timeout=False)
        ch = self.oneshot.channel if self.oneshot is not None else None
        if ch is None or ch.closed or ch.key != self.key():  # SELECT/HELLO/AUTH since: a new one
            lease = self.new_lease(i, batch)
            if lease is None:
                return
            self.oneshot = lease
            self.cur = lease.channel
            self.flush(batch, i)  # replies before it are in (settled): the client gets them before it blocks
        self.oneshot.dirty |= dirty
        if wait:
            self.oneshot.channel.submit(_WAIT_MARK, None, 0, 0.0)
        self.submit(self.oneshot.channel, i, raw, batch, timeout=False)

    def side(self, i: int, raw: bytes, batch: Batch) -> None:
        """SCRIPT/FUNCTION KILL: to the primary right now, on a connection a busy server answers
        (busy.kill), without waiting for the client's other replies."""
        try:
            addr = self.app.router.primary().addr
        except BackendError as e:
            batch.replies[i] = resp.error(str(e))
            return
        busy.kill(addr, self.app.cfg, raw, batch, i, self.user)
