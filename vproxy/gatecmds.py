"""What the gate answers and keeps back (gate.py holds the users and their checks):

    ACL WHOAMI / USERS / LIST / GETUSER   answered from the proxy's users; SETUSER ... refused
    CONFIG GET                            the backend's passwords replaced by "(hidden by vproxy)",
                                          in EXEC's reply too (a CONFIG GET queued in MULTI)
    ACL queued in MULTI                   refused (it cannot run in the server's transaction)
"""

from __future__ import annotations

from . import resp
from .gate import ProxyUser
from .handler import Session


# ---- ACL ... answered from the proxy's users ----

_ACL_OWN = frozenset([b"setuser", b"deluser", b"load", b"save", b"log", b"dryrun"])


def acl_command(s: Session, i, args, raw, batch) -> None:
    """ACL WHOAMI / USERS / LIST / GETUSER from the proxy's users; the rest of ACL that would touch the
    backend's users is refused (CAT, GENPASS, HELP go to the backend)."""
    gate = s.app.gate
    if gate is None:
        return s.forward(i, raw, batch, b"acl", args)
    sub = args[1].lower() if len(args) > 1 else b""
    users = gate.users
    if sub == b"whoami" and len(args) == 2:
        batch.replies[i] = resp.bulk(s.proxy_user.name if s.proxy_user is not None else "default")
    elif sub == b"users" and len(args) == 2:
        batch.replies[i] = resp.value(sorted(users), s.proto)
    elif sub == b"list" and len(args) == 2:
        batch.replies[i] = resp.value([f"user {n} {users[n].describe()}" for n in sorted(users)], s.proto)
    elif sub == b"getuser" and len(args) == 3:
        u = users.get(args[2].decode(errors="replace"))
        batch.replies[i] = resp.null(s.proto) if u is None else resp.value(_getuser(u), s.proto)
    elif sub in _ACL_OWN:
        s.refuse(batch, i, f"ERR vproxy: users are vproxy's configuration (setting 'users'): ACL "
                           f"{sub.decode(errors='replace').upper()} is not available through the proxy")
    else:
        s.forward(i, raw, batch, b"acl", args)


def _getuser(u: ProxyUser) -> dict:
    return {
        "flags": ["on" if u.enabled else "off"] + (["nopass"] if u.nopass else []),
        "passwords": list(u.hashes),
        **_getuser_rules(u),
        "selectors": [_getuser_rules(sel) for sel in u.selectors],
    }


def _getuser_rules(r: ProxyUser) -> dict:
    """ACL GETUSER's commands, keys, channels and databases of a user's own rules or a selector's."""
    return {
        "commands": " ".join(r.command_rules()),
        "keys": " ".join(k[2] for k in r.keys),
        "channels": " ".join(r.channel_text),
        "databases": r.db_rule() or "alldbs",
    }


# ---- the backend's secrets: never shown to a proxy user ----

_SECRET_CONFIG = frozenset([b"requirepass", b"masterauth", b"masteruser", b"tls-key-file-pass",
                            b"tls-client-key-file-pass"])
HIDDEN = b"(hidden by vproxy)"


ACL_IN_MULTI = "ERR vproxy: ACL inside MULTI is not supported (users are vproxy's configuration); ACL outside MULTI"


def queued(s: Session, name: bytes, args: list, position: int) -> str | None:
    """A request queued in MULTI while vproxy is the gate (users at the proxy): ACL, which vproxy
    answers from its users, cannot run in the server's transaction (the error to refuse it with);
    a CONFIG GET's place is kept so that EXEC's reply hides the backend's secrets (hide_in_exec)."""
    if s.app.gate is None:
        return None
    if name == b"acl":
        return ACL_IN_MULTI
    if name == b"config" and len(args) > 2 and args[1].lower() == b"get":
        s.multi_hide.append(position)
    return None


def hide_in_exec(frame: bytes, positions: tuple) -> bytes:
    """EXEC's reply with the CONFIG GET replies at these places passed through _hide."""
    return in_exec(frame, [(p, _hide) for p in positions])


def in_exec(frame: bytes, changes: list) -> bytes:
    """EXEC's reply with the replies at some places rewritten: changes, (place, fn(reply) -> reply)."""
    if frame[:1] != b"*" or frame[:3] == b"*-1":
        return frame
    head, _, body = frame.partition(b"\r\n")
    parts = resp.ReplyFramer().feed(body)
    for p, fn in changes:
        if p < len(parts):
            parts[p] = fn(parts[p])
    return head + b"\r\n" + b"".join(parts)


# ---- CLIENT about the session, inside MULTI ----

# The CLIENT subcommands vproxy answers about the session (local.CLIENT's that need no server), in a
# stream too (Streams._stream_own); in MULTI (client_own), those with an argument count here: queued
# with another count, the server's arity error at queue time (EXECABORT); None: queued as sent
CLIENT_OWN = {b"id": 2, b"getname": 2, b"getredir": 2, b"info": 2, b"setname": 3, b"setinfo": 4,
              b"no-evict": 3, b"no-touch": 3, b"list": None, b"kill": None, b"unblock": None,
              b"maint_notifications": None}
PLACEHOLDER = b"*1\r\n$4\r\nPING\r\n"  # queued in their place: the server's +PONG is replaced at EXEC


def client_own(name: bytes, args: list) -> bool:
    """A CLIENT request vproxy answers about the session (its id, name, library), not the backend
    connection's: queued in MULTI, a PLACEHOLDER goes to the server, and its place in EXEC's reply
    gets vproxy's answer, the change (SETNAME ...) made then (answer_in_exec)."""
    return name == b"client" and len(args) >= 2 and CLIENT_OWN.get(args[1].lower()) == len(args)


def answer_in_exec(s: Session, frame: bytes, queued: list) -> bytes:
    """EXEC's reply with vproxy's answers to the CLIENT requests queued at these places (client_own),
    run in order now that the transaction ran (nothing when it did not: aborted, or WATCH failed)."""
    return in_exec(frame, [(p, lambda _, a=args: s.own_answer(b"client", a, b"")) for p, args in queued])


def hide_config_secrets(s: Session, i: int, args: list) -> None:
    """CONFIG GET through a gated proxy: the backend's passwords (requirepass, masterauth ...) are
    vproxy's secrets, not its users': their values are replaced in the reply."""
    if s.app.gate is not None and len(args) > 2 and args[1].lower() == b"get":
        s.post.append((i, _hide))


def _hide(frame: bytes) -> bytes:
    if frame[:1] not in (b"*", b"%") or not any(n in frame for n in _SECRET_CONFIG):
        return frame
    v = resp.decode(frame)
    if isinstance(v, dict):
        return resp.value({k: HIDDEN if k in _SECRET_CONFIG and x else x for k, x in v.items()}, 3)
    if isinstance(v, list):
        for j in range(0, len(v) - 1, 2):
            if v[j] in _SECRET_CONFIG and v[j + 1]:
                v[j + 1] = HIDDEN
        return resp.value(v, 2)
    return frame
