"""A backend busy with a script: kill its script (SCRIPT KILL / FUNCTION KILL).

A Lua script or function running past `busy-reply-threshold` makes the server answer `-BUSY` to
every command but a few (AUTH, HELLO, SCRIPT KILL, FUNCTION KILL, SHUTDOWN NOSAVE; Redis 7 also
refuses SELECT and CLIENT SETNAME); before the threshold it answers nothing at all. The kill
therefore uses a connection of its own whose only handshake is AUTH, sent with the request:

    SCRIPT KILL / FUNCTION KILL -> kill(): the reply lands in the client's batch when it comes
"""

from __future__ import annotations

import gevent

from .. import resp
from ..errors import BackendError, backend_unavailable
from .backend import BackendConn, auth_steps


def ask(addr: tuple[str, int], cfg, request: bytes, seconds: float) -> bytes:
    """request (raw RESP) on a new connection, behind AUTH alone: the reply frame, or a vproxy error
    frame when the backend cannot be reached or says nothing within seconds (0: no limit)."""
    conn = BackendConn(addr)
    auth = auth_steps(2, cfg.backend_username, cfg.backend_password)
    try:
        conn.connect(cfg.connect_timeout, handshake=False)  # the kernel accepts even while a script runs
        with gevent.Timeout(seconds or None, BackendError(f"no answer within {seconds:g}s")):
            conn.send(b"".join(resp.encode_request(a) for a in auth) + request)
            frames = conn.read_n(len(auth) + 1)
    except (BackendError, OSError) as e:
        return resp.error(backend_unavailable(conn.name, str(e)))
    finally:
        conn.close()
    if auth and frames[0][:1] == b"-":
        why = frames[0][1:].strip().decode(errors="replace")
        return resp.error(backend_unavailable(conn.name, f"AUTH failed: {why}"))
    return frames[len(auth)]


def kill(addr: tuple[str, int], cfg, raw: bytes, batch, idx: int) -> None:
    """Send SCRIPT KILL / FUNCTION KILL to addr now; the server's answer goes to batch.replies[idx].

    Out of the client's order on purpose: the connection that runs the script answers nothing
    before the script ends. Waits up to command_timeout (a server before its busy threshold answers
    only then; a direct client would wait as long)."""
    batch.left += 1
    gevent.spawn(lambda: batch.put(idx, ask(addr, cfg, raw, cfg.command_timeout)))
