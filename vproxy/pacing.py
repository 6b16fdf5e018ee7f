"""A session's limits: its request rate (the token buckets of limits.py: its own, its user's),
its pipeline depth (max_pipeline: counted and logged) and its unread replies
(client_output_buffer_limit: the client is dropped). A mixin of ClientSession (client.py)."""

from __future__ import annotations

import socket

import gevent

from . import hostport


class Paced:
    """Rate buckets in front of the plain path and the batch path; the limits' counters and logs."""

    def set_buckets(self) -> None:
        """The rate buckets this session takes from: its own (client_rate_limit), its user's (rate=N);
        with any, the plain path's forward_plain (its class's) runs behind _forward_plain_paced."""
        user = self.proxy_user
        self.buckets = tuple(b for b in (self.rate_bucket, user.bucket if user is not None else None) if b)
        self.plain_fn = type(self).forward_plain
        if self.buckets:
            self.forward_plain = self._forward_plain_paced
        else:
            self.__dict__.pop("forward_plain", None)

    def _forward_plain_paced(self, reqs: list, wait: bool = True) -> int:
        """forward_plain behind the rate buckets: in the loop (wait False) a read batch goes on only
        when every bucket holds its tokens now; else it is handed to the greenlet, which sleeps in
        pace() while nothing more is read from the client."""
        if wait:  # the greenlet's call (process): paid in pace
            return self.plain_fn(self, reqs, wait)
        n = len(reqs)
        if not all(b.ready(n) for b in self.buckets):
            self.paid = False
            return 0
        for b in self.buckets:
            b.take(n)
        done = self.plain_fn(self, reqs, wait)
        self.paid = done < n  # the rest is handed to the greenlet: already paid for
        return done

    def pace(self, n: int) -> None:
        """Take n tokens from every bucket; sleep off a debt (the client's socket is not read meanwhile)."""
        if self.paid:
            self.paid = False
            return
        wait = max(b.take(n) for b in self.buckets)
        if wait > 0:
            app = self.app
            app.stats.rate_limited += 1
            app.limit_log.log("rate", "INFO", lambda: f"client {self.id} ({hostport.fmt(self.addr)}) slowed "
                              f"down: over its request rate ({self._rate_said()})")
            gevent.sleep(wait)

    def _rate_said(self) -> str:
        user = self.proxy_user
        parts = [f"client_rate_limit {self.app.cfg.client_rate_limit:g}/s"] if self.rate_bucket else []
        if user is not None and user.bucket is not None:
            parts.append(f"user {user.name} rate={user.rate:g}/s")
        return ", ".join(parts)

    def _pipeline_limited(self) -> None:
        """More requests than max_pipeline at once: they wait for replies (counted, logged)."""
        app = self.app
        app.stats.pipeline_limited += 1
        app.limit_log.log("pipeline", "INFO", lambda: f"client {self.id} ({hostport.fmt(self.addr)}) pipelines "
                          f"past max_pipeline ({self.max_window}): not read until its replies are written")

    def output_overflow(self, size: int) -> None:
        """The client left more reply bytes unread than client_output_buffer_limit: it is dropped."""
        app = self.app
        app.stats.output_limit_disconnects += 1
        app.limit_log.log("output", "WARNING", f"client {self.id} ({hostport.fmt(self.addr)}) disconnected: "
                          f"{size} bytes of replies unread, past client_output_buffer_limit "
                          f"({app.cfg.client_output_buffer_limit})")
        self.closing = True
        try:  # the greenlet (parked, or waiting in send) sees the end of the connection
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
