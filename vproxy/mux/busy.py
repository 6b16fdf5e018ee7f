"""A backend busy with a script: find out whether it is (for the janitor), and kill its script.

A Lua script or function running past `busy-reply-threshold` makes the server answer `-BUSY` to
every command but a few (AUTH, HELLO, SCRIPT KILL, FUNCTION KILL, SHUTDOWN NOSAVE; Redis 7 also
refuses SELECT and CLIENT SETNAME); before the threshold it answers nothing at all. Both jobs below
therefore use a connection of their own whose only handshake is AUTH, sent with the request:

    janitor -> NodePool.expire -> a channel past its deadline -> BusyProbe.spares(channel)?
        a probe is out                       -> yes (wait for its verdict)
        the last probe began after the deadline:
            it was answered -BUSY            -> yes, and every request there gets command_timeout more
            anything else (PONG, no answer)  -> no: the channel is timed out, as for a stuck server
        else                                 -> start a probe (PING, in a greenlet of its own): yes

    SCRIPT KILL / FUNCTION KILL -> kill(): the reply lands in the client's batch when it comes

Why keep a busy server's connection: replacing it frees nothing (the script keeps running), and
the script's caller would lose the server's answer (its error once the script is killed).
"""

from __future__ import annotations

import gevent

from .. import resp
from ..errors import BackendError, backend_unavailable
from .backend import BackendConn, auth_steps

PING = resp.encode_request([b"PING"])


def ask(addr: tuple[str, int], cfg, request: bytes, seconds: float, user=None) -> bytes:
    """request (raw RESP) on a new connection, behind AUTH alone: the reply frame, or a vproxy error
    frame when the backend cannot be reached or says nothing within seconds (0: no limit).
    user: the client's backend Credentials (users.py), else vproxy's own."""
    conn = BackendConn(addr)
    if user is not None:
        auth = auth_steps(2, user.user, user.password)
    else:
        auth = auth_steps(2, cfg.backend_username, cfg.backend_password)
    try:
        conn.connect(cfg.connect_timeout, handshake=False, cfg=cfg)  # the kernel accepts even while a script runs
        with gevent.Timeout(seconds or None, BackendError(f"no answer within {seconds:g}s")):
            conn.send(b"".join(resp.encode_request(a) for a in auth) + request)
            frames = conn.read_n(len(auth) + 1)
    except (BackendError, OSError) as e:
        return resp.error(backend_unavailable(conn.name, str(e)))
    finally:
        conn.close()
    if auth and frames[0][:1] == b"-":
        if user is not None:  # the client's own credentials: the server's words, as on a direct connection
            return frames[0]
        why = frames[0][1:].strip().decode(errors="replace")
        return resp.error(backend_unavailable(conn.name, f"AUTH failed: {why}"))
    return frames[len(auth)]


def kill(addr: tuple[str, int], cfg, raw: bytes, batch, idx: int, user=None) -> None:
    """Send SCRIPT KILL / FUNCTION KILL to addr now; the server's answer goes to batch.replies[idx].

    Out of the client's order on purpose: the connection that runs the script answers nothing
    before the script ends. Waits up to command_timeout (a server before its busy threshold answers
    only then; a direct client would wait as long)."""
    batch.left += 1
    gevent.spawn(lambda: batch.put(idx, ask(addr, cfg, raw, cfg.command_timeout, user)))


class BusyProbe:
    """Whether one node is busy with a script, asked at most once at a time (see the module doc)."""

    __slots__ = ("addr", "asked", "busy", "cfg", "probe")

    def __init__(self, addr: tuple[str, int], cfg):
        self.addr, self.cfg = addr, cfg
        self.probe = None  # the greenlet asking now
        self.asked = 0.0  # when the last probe began
        self.busy = False  # what it found

    def spares(self, ch, now: float) -> bool:
        """ch's oldest request is past its deadline: True when the janitor must leave ch alone."""
        if self.probe is not None:
            return True
        if self.asked > ch.waiters[0][2]:  # a verdict from after this deadline
            if self.busy:
                ch.extend(now + self.cfg.command_timeout)
            return self.busy
        self.asked = now
        self.probe = gevent.spawn(self._probe)
        return True

    def _probe(self) -> None:
        # a busy server answers -BUSY at once; waiting longer than command_timeout would only delay
        # the timeout of a server that is stuck for another reason (paused, DEBUG SLEEP ...)
        seconds = min(self.cfg.connect_timeout, self.cfg.command_timeout)
        busy = False
        try:
            busy = ask(self.addr, self.cfg, PING, seconds).startswith(b"-BUSY")
        finally:  # whatever happens, the next expired deadline may ask again
            self.busy, self.probe = busy, None
