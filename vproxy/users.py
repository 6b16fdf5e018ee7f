"""The backend's own ACL users through the proxy: AUTH checked by the backend, the session's user.

With no proxy `password` (vproxy is not the gate), a client's credentials are the backend's
business, exactly as on a direct connection:

    AUTH [user] pass / HELLO ... AUTH user pass
        -> the primary's AUTH check connection (NodePool.check): the server's own reply
        -> +OK: session.user = Credentials(user, pass); its key (db, protocol, user) now picks
           connections authenticated as that user: shared, pinned (MULTI, blocking, pub/sub) and
           SCRIPT/FUNCTION KILL's own; none of them ever serves another user
        -> an error: the server's reply, byte for byte; the session keeps the user it had

A session that never authenticates runs as vproxy's backend user (backend_username), as before.
The password stays in memory only (new connections of that user need it); it is never logged.
"""

from __future__ import annotations

from . import resp
from .errors import BackendError
from .mux.backend import Credentials
from .mux.pool import ACL_CHECK
from .handler import Session

# Commands vproxy answers itself (or answers in part) that the server's ACL would check: for a
# session running as a client's own user they are first asked of the server with ACL DRYRUN.
# (CLUSTER, READONLY, READWRITE: cluster mode answers them; standalone forwards them.)
DRYRUN = frozenset([b"select", b"client", b"info", b"unsubscribe", b"punsubscribe", b"sunsubscribe",
                    b"cluster", b"readonly", b"readwrite"])


def backend_auth(s: Session, user: bytes | None, password: bytes) -> bytes | None:
    """Check AUTH [user] pass with the backend. None when accepted (the session now runs as that
    user), else the reply frame to give the client (the server's error, or vproxy's when the
    backend cannot be reached)."""
    request = [b"AUTH", password] if user is None else [b"AUTH", user, password]
    try:
        frame = s.app.router.primary().check(request)
    except BackendError as e:
        return resp.error(str(e))
    if frame[:1] != b"+":
        return frame
    cred = Credentials(b"default" if user is None else user, password)
    switch(s, None if cred == own_credentials(s.app.cfg) else cred)
    return None


def switch(s: Session, cred: Credentials | None) -> None:
    """The session now runs as cred (None: vproxy's own user). A user no session runs as any more
    has its connections closed by the janitor (sweep), and its password forgotten with them."""
    old, s.user = s.user, cred
    if old == cred:
        return
    live = s.app.user_sessions
    if cred is not None:
        live[cred] = live.get(cred, 0) + 1
    if old is not None:
        n = live.pop(old) - 1
        if n:
            live[old] = n
        else:
            s.app.users_gone = True


def sweep(app) -> None:
    """Janitor: close the idle connections of users no session runs as (those with requests in
    flight are closed on a later tick, once answered)."""
    if app.users_gone:
        left = False
        for pool in list(app.router.pools.values()):
            left |= pool.drop_users(app.user_sessions)
        app.users_gone = left


def own_credentials(cfg) -> Credentials | None:
    """vproxy's backend user as Credentials (None without a backend password)."""
    if not cfg.backend_password:
        return None
    return Credentials((cfg.backend_username or "default").encode(), cfg.backend_password.encode())


def user_name(s: Session) -> str:
    """The user the session runs as (CLIENT LIST's user=): its proxy user (gate.py), else the backend's."""
    if s.proxy_user is not None:
        return s.proxy_user.name
    if s.user is not None:
        return s.user.user.decode(errors="replace")
    return s.app.cfg.backend_username or "default"


def dryrun(s: Session, args: list) -> bytes | None:
    """None when the session's user may run args (ACL DRYRUN), else the -NOPERM error the server
    would give (vproxy's own backend user needs +acl|dryrun; without it the command is refused
    with vproxy's error saying so)."""
    try:
        frame = s.app.router.primary().check([b"ACL", b"DRYRUN", s.user.user, *args], ACL_CHECK)
    except BackendError as e:
        return resp.error(str(e))
    if frame == b"+OK\r\n":
        return None
    if frame[:1] == b"$":  # the reason: the server's NOPERM text (Redis 7 says "This user ...")
        why = frame[frame.index(b"\r\n") + 2:-2]
        if why.startswith(b"This user"):
            why = b"t" + why[1:]
        return b"-NOPERM " + why + b"\r\n"
    if frame.startswith(b"-NOPERM"):  # vproxy's own user may not ask: refuse rather than guess
        return resp.error(f"ERR vproxy: cannot check '{args[0].decode(errors='replace').lower()}' against the "
                          f"rights of user '{s.user.user.decode(errors='replace')}': vproxy's backend user needs "
                          "+acl|dryrun")
    return None  # another error (a subcommand the server does not know ...): vproxy's handler answers
