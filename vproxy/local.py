"""Commands vproxy answers itself from the session state it tracks (PING, SELECT, HELLO, CLIENT ...).

Each handler is `fn(session, idx, args, raw, batch)` and either puts a reply in batch.replies[idx]
or hands the request on with what vproxy/handler.py declares a session offers (forward, block,
start_stream ...).
"""

from __future__ import annotations

import hmac
from functools import partial

from . import admin, resp
from . import commands as C
from . import errors as E
from . import transaction as tx
from .gate import bind
from .gatecmds import acl_command, answer_in_exec, hide_config_secrets, hide_in_exec
from .mux.channel import deadline_after
from .users import backend_auth, switch
from .handler import Session

_BAD_NAME = frozenset(range(0, 33)) | frozenset(range(127, 256))  # the server's: '!' to '~' only


def valid_name(name: bytes) -> bool:
    return not any(c in _BAD_NAME for c in name)


def _reply(batch, i, frame: bytes) -> None:
    batch.replies[i] = frame


def quit_(s: Session, i, args, raw, batch):
    s.settle()
    _reply(batch, i, resp.OK)
    s.closing = True


def reset(s: Session, i, args, raw, batch):
    s.settle()
    s.end_stream()
    s.drop_leases()
    s.reset()  # the session state of a new connection (ClientSession.reset)
    switch(s, None)  # the server's RESET deauthenticates to the default user too
    if s.app.gate is not None:
        s.app.gate.start(s)
    _reply(batch, i, b"+RESET\r\n")


def _check_password(s: Session, user: bytes | None, password: bytes) -> str | None:
    """None when the credentials match the proxy `password`, else the error to answer."""
    want = s.app.cfg.password.encode(errors="surrogateescape")
    if user not in (None, b"default") or not hmac.compare_digest(password, want):  # constant time
        return E.WRONGPASS
    return None


def _authenticate(s: Session, user: bytes | None, password: bytes) -> bytes | None:
    """None when the credentials are accepted, else the error frame to answer. With proxy `users`
    (gate.py) or a proxy `password`, vproxy is the gate; without, the backend's ACL decides (users.py)."""
    gate = s.app.gate
    if gate is not None:
        err = gate.authenticate(s, user, password)
        if err:
            s.app.stats.auth_failures += 1
            s.app.audit.refused_auth(s, user)
        return resp.error(err) if err else None
    if s.app.cfg.password:
        err = _check_password(s, user, password)
        err = resp.error(err) if err else None
    else:
        err = _as_user(s, user, password)
    if err is not None and not err.startswith(b"-ERR vproxy:"):  # refused, not unanswered
        s.app.stats.auth_failures += 1
    return err


def _as_user(s: Session, user: bytes | None, password: bytes) -> bytes | None:
    old = s.user
    err = backend_auth(s, user, password)
    if err is None and s.user != old and tx.pinned(s):
        # WATCH holds a connection: it becomes that user's too (its reply is not the client's)
        s.lease.channel.submit(resp.encode_request([b"AUTH", user or b"default", password]), None, 0,
                               deadline_after(s.app.cfg.command_timeout))  # (a deadline: it never blocks)
        s.lease.dirty = True
    return err


def auth(s: Session, i, args, raw, batch):
    if len(args) not in (2, 3):  # as the server: AUTH alone is arity, AUTH a b c a syntax error
        return _reply(batch, i, resp.error(E.wrong_arity("auth") if len(args) < 2 else "ERR syntax error"))
    user = args[1] if len(args) == 3 else None
    err = _authenticate(s, user, args[-1])
    if err:
        return _reply(batch, i, err)
    s.authed = True
    _reply(batch, i, resp.OK)


def hello(s: Session, i, args, raw, batch):
    proto = s.proto
    if len(args) > 1:
        proto = resp.string2ll(args[1])
        if proto is None:
            return _reply(batch, i, resp.error("ERR Protocol version is not an integer or out of range"))
        if proto not in (2, 3):
            return _reply(batch, i, resp.error("NOPROTO unsupported protocol version"))
    opts, j, name, authed, cred = args[2:], 0, None, s.authed, None
    while j < len(opts):
        opt = opts[j].lower()
        if opt == b"auth" and j + 2 < len(opts):
            cred, j = (opts[j + 1], opts[j + 2]), j + 3
        elif opt == b"setname" and j + 1 < len(opts):
            name, j = opts[j + 1], j + 2
            if not valid_name(name):
                return _reply(batch, i, resp.error(
                    "ERR Client names cannot contain spaces, newlines or special characters."))
        else:
            return _reply(batch, i, resp.error(f"ERR Syntax error in HELLO option '{opts[j].decode(errors='replace')}'"))
    if cred is not None:  # checked after every option, as the server does
        err = _authenticate(s, *cred)
        if err:
            return _reply(batch, i, err)
        authed = True
    if not authed:
        return _reply(batch, i, resp.error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the "
            "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
            "select the RESP protocol version at the same time"))
    if proto != s.proto and tx.pinned(s):
        # WATCH holds a connection: it must speak the new protocol too (its reply is not the client's)
        s.lease.channel.submit(resp.encode_request([b"HELLO", b"%d" % proto]), None, 0,
                               deadline_after(s.app.cfg.command_timeout))
        s.lease.dirty = True
    s.authed, s.proto = True, proto
    if name is not None:
        s.name = name
    info = s.app.server_info
    _reply(batch, i, resp.value({
        "server": info.get("server", "redis"), "version": info.get("version", "7.2.4"), "proto": proto,
        "id": s.id, "mode": "standalone", "role": "master", "modules": [],
    }, proto))


def db_index(arg: bytes, databases: int) -> tuple[int | None, str | None]:
    """(db, None) for a SELECT the server accepts, else (None, its error): an int, then in range."""
    db = resp.string2ll(arg)
    if db is None:
        return None, E.NOT_INTEGER
    if not E.INT_MIN <= db <= E.INT_MAX:
        return None, E.INT_RANGE
    if not 0 <= db < databases:
        return None, E.DB_RANGE
    return db, None


def select(s: Session, i, args, raw, batch):
    db, err = db_index(args[1], s.app.databases)
    if err:
        return _reply(batch, i, resp.error(err))
    if tx.pinned(s):  # WATCH is on: the lease's connection switches too
        s.lease.dirty = True
        s.db = db
        return s.forward(i, raw, batch, args=args)
    s.db = db
    if s.proxy_user is not None:  # the plain path's predicate depends on whether the db is allowed
        bind(s, s.proxy_user)
    _reply(batch, i, resp.OK)


def info(s: Session, i, args, raw, batch):
    sections = {a.lower() for a in args[1:]}
    if sections and sections <= admin.PROXY_SECTIONS:  # the proxy's own sections only: no backend
        return _reply(batch, i, resp.verbatim(admin.proxy_info(s.app, sections), s.proto))
    s.forward(i, raw, batch, args=args)  # the server leaves out the section names it does not know
    if admin.proxy_info(s.app, sections, probe=True):
        s.post.append((i, lambda frame: append_proxy_sections(s, frame, sections)))


def append_proxy_sections(s: Session, frame: bytes, sections: set) -> bytes:
    """The server's INFO reply with the proxy's sections that `sections` asks for after it."""
    if frame[:1] not in (b"$", b"="):
        return frame
    text = admin.proxy_info(s.app, sections)
    if not text:
        return frame
    # bytes, not text: INFO may hold any bytes (errorstats count error prefixes scripts made up)
    body = frame[frame.index(b"\r\n") + 2:-2]
    if frame[:1] == b"=":
        body = body[4:]  # "txt:"
    body = body.rstrip(b"\r\n") + b"\r\n\r\n" + text.encode()
    return b"=%d\r\ntxt:%s\r\n" % (len(body) + 4, body) if frame[:1] == b"=" else resp.bulk(body)


def exec_(s: Session, i, args, raw, batch):
    if tx.in_multi(s) and s.lease is None:  # MULTI failed (no connection): nothing was queued
        tx.end_pinned(s)
        aborted = resp.error("EXECABORT Transaction discarded because of previous errors.")
        return _reply(batch, i, aborted if args[0].lower() == b"exec" else resp.OK)
    if tx.in_multi(s):
        tx.end_pinned(s)  # the lease is ENDING: given back once EXEC's reply is in
        s.submit(s.lease.channel, i, raw, batch)
        if s.multi_hide and args[0].lower() == b"exec":  # the backend's secrets in its CONFIG GET replies
            s.post.append((i, partial(hide_in_exec, positions=tuple(s.multi_hide))))
        s.multi_hide = []
        own, s.multi_own = s.multi_own, []
        if args[0].lower() == b"exec" and (s.multi_select is not None or s.multi_proto is not None
                                           or s.multi_auth or own):
            # the requests behind EXEC run on the db/protocol/user the transaction switched to: wait for it
            s.settle()
            reply = _apply_after_exec(s, batch.replies[i], s.multi_select, s.multi_proto)
            batch.replies[i] = after_exec(s, reply, s.multi_auth, own)
            s.multi_auth = []
        return
    if tx.pinned(s):  # WATCH without MULTI: the server says why
        return s.submit(s.lease.channel, i, raw, batch)
    _reply(batch, i, resp.error(f"ERR {args[0].decode().upper()} without MULTI"))


def apply_select(s: Session, frame: bytes, db: int) -> bytes:
    return _apply_after_exec(s, frame, db, None)


def after_exec(s: Session, frame: bytes, auth: list, own: list) -> bytes:
    """EXEC's reply in (both modes): the AUTHs it ran make the session's user, in turn as the server
    ran them (the last it took is the user), then the CLIENT requests vproxy answers at EXEC get
    their answers in their places (gatecmds.answer_in_exec: SETNAME applied now)."""
    if frame[:1] == b"*" and frame[:3] != b"*-1":
        for cred in auth:
            backend_auth(s, *cred)
    return answer_in_exec(s, frame, own) if own else frame


def _apply_after_exec(s: Session, frame: bytes, db: int | None, proto: int | None) -> bytes:
    """A transaction that ran SELECT or HELLO changes the session, as it changed the connection."""
    if frame[:1] == b"*" and frame[:3] != b"*-1":
        if db is not None:
            s.db = db
        if proto is not None:
            s.proto = proto
    return frame


def unwatch(s: Session, i, args, raw, batch):
    if tx.pinned(s):
        tx.end_pinned(s)
        return s.submit(s.lease.channel, i, raw, batch)
    _reply(batch, i, resp.OK)


def unsubscribe(s: Session, i, args, raw, batch):
    """Not subscribed: answer as the server would, one reply per channel (or one for none)."""
    kind = args[0].lower()
    names = args[1:] or [None]
    head = b">3\r\n" if s.proto == 3 else b"*3\r\n"
    _reply(batch, i, b"".join(head + resp.bulk(kind) + resp.value(n, s.proto) + b":0\r\n" for n in names))


def client(s: Session, i, args, raw, batch):
    if len(args) < 2:  # the arity check needs the learned table: the backend may not have answered yet
        return _reply(batch, i, resp.error(E.wrong_arity("client")))
    sub = args[1].lower()
    handler = CLIENT.get(sub)
    if handler is None:
        return s.block(i, raw, batch, dirty=True, args=args)  # unknown to vproxy: a connection of its own
    handler(s, i, args, raw, batch)


def _arity(args: list, sub: str) -> bytes | None:
    """The server's error for a CLIENT subcommand that takes no argument but got some, else None."""
    return resp.error(E.wrong_arity(f"client|{sub}")) if len(args) != 2 else None


def _client_setname(s: Session, i, args, raw, batch):
    if len(args) != 3:
        return _reply(batch, i, resp.error(E.wrong_arity("client|setname")))
    if not valid_name(args[2]):
        return _reply(batch, i, resp.error("ERR Client names cannot contain spaces, newlines or special characters."))
    s.name = args[2]
    _reply(batch, i, resp.OK)


def _client_setinfo(s: Session, i, args, raw, batch):
    if len(args) != 4:
        return _reply(batch, i, resp.error(E.wrong_arity("client|setinfo")))
    attr = args[2].lower()
    if attr not in (b"lib-name", b"lib-ver"):
        return _reply(batch, i, resp.error(f"ERR Unrecognized option '{args[2].decode(errors='replace')}'"))
    if not valid_name(args[3]):
        return _reply(batch, i, resp.error(f"ERR {args[2].decode(errors='replace')} cannot contain spaces, newlines or "
                                           "special characters."))  # (the option as sent, as the server)
    if attr == b"lib-name":
        s.lib_name = args[3]
    else:
        s.lib_ver = args[3]
    _reply(batch, i, resp.OK)


def _on_off(s: Session, i, args, attr: str):
    if len(args) != 3:
        return resp.error(E.wrong_arity(f"client|{attr.replace('_', '-')}"))
    if args[2].lower() not in (b"on", b"off"):
        return resp.error(E.SYNTAX)
    setattr(s, attr, args[2].lower() == b"on")
    return resp.OK


def _client_kill(s: Session, i, args, raw, batch):
    if len(args) < 3:
        return _reply(batch, i, resp.error(E.wrong_arity("client|kill")))
    _reply(batch, i, admin.client_kill(s, args))


def _client_stream(s: Session, i, args, raw, batch):
    """TRACKING on / REPLY off|skip need a connection whose replies stream; the off forms are no-ops."""
    sub, arg = args[1].lower(), args[2].lower() if len(args) > 2 else b""
    if len(args) < 3 or (sub == b"reply" and len(args) != 3):  # the server's arity: REPLY 3, TRACKING -3
        return _reply(batch, i, resp.error(E.wrong_arity(f"client|{sub.decode()}")))
    starts = (sub == b"tracking" and arg == b"on") or (sub == b"reply" and arg in (b"off", b"skip"))
    if starts:
        if sub == b"tracking":
            raw = _redirect_to_backend(s, args, raw)
            if raw is None:
                return _reply(batch, i, resp.error("ERR The client ID you want redirect to does not exist"))
        s.start_stream(i, sub.decode(), raw, batch)
        if arg == b"skip" and s.stream is not None:
            s.stream.skip = True  # ends after the next request (Streams.stream_dispatch)
        return
    if arg in (b"off", b"on"):
        return _reply(batch, i, resp.OK)
    _reply(batch, i, resp.error(E.SYNTAX))


def _redirect_to_backend(s: Session, args, raw):
    """CLIENT TRACKING on REDIRECT <id>: the id is a vproxy client's (CLIENT ID); the server knows the
    backend connection that client holds pinned (it subscribed to __redis__:invalidate, so it has
    one). The request with that connection's id instead; None when there is no such connection."""
    low = [a.lower() for a in args]
    if b"redirect" not in low:
        return raw
    j = low.index(b"redirect") + 1
    if j >= len(args):
        return raw  # the server answers the syntax error
    target = s.app.clients.get(int(args[j])) if args[j].isdigit() else None
    conn_id = _pinned_backend_id(target) if target is not None else None
    if conn_id is None:
        return None
    return resp.encode_request([*args[:j], b"%d" % conn_id, *args[j + 1:]])


def _pinned_backend_id(session):
    """The server's id of the connection a client holds pinned (its stream's first), else None."""
    st = session.stream
    for lease in (st.lease if st is not None else None, session.lease, session.oneshot):
        ch = lease.channel if lease is not None else None
        if ch is not None and not ch.closed and ch.conn.backend_id is not None:
            return ch.conn.backend_id
    return None


def _client_maint_notifications(s: Session, i, args, raw, batch):
    """redis-py 8 asks on every RESP3 connect and takes an error as "unsupported". Forwarded, it would
    cost a backend connection per client connect; and the proxy follows backend maintenance itself."""
    _reply(batch, i, resp.error(E.refused("client|maint_notifications",
                                          "the proxy follows backend maintenance itself")))


CLIENT = {
    b"id": lambda s, i, a, r, b: _reply(b, i, _arity(a, "id") or resp.integer(s.id)),
    b"getname": lambda s, i, a, r, b: _reply(b, i, _arity(a, "getname") or (
        resp.bulk(s.name) if s.name else resp.null(s.proto))),
    b"setname": _client_setname,
    b"setinfo": _client_setinfo,
    b"info": lambda s, i, a, r, b: _reply(b, i, _arity(a, "info") or resp.verbatim(admin.client_line(s) + "\n", s.proto)),
    b"list": lambda s, i, a, r, b: _reply(b, i, resp.verbatim(admin.client_list(s.app, a[2:]), s.proto)),
    b"no-evict": lambda s, i, a, r, b: _reply(b, i, _on_off(s, i, a, "no_evict")),
    b"no-touch": lambda s, i, a, r, b: _reply(b, i, _on_off(s, i, a, "no_touch")),
    b"kill": _client_kill,
    b"tracking": _client_stream,
    b"reply": _client_stream,
    b"maint_notifications": _client_maint_notifications,
    b"getredir": lambda s, i, a, r, b: _reply(b, i, _arity(a, "getredir") or resp.integer(-1)),
    b"unblock": lambda s, i, a, r, b: _reply(b, i, admin.client_unblock(s, a)),
    b"pause": lambda s, i, a, r, b: s.forward(i, r, b, args=a),
    b"unpause": lambda s, i, a, r, b: s.forward(i, r, b, args=a),
    b"help": lambda s, i, a, r, b: s.forward(i, r, b, args=a),
    b"trackinginfo": lambda s, i, a, r, b: s.forward(i, r, b, args=a),
    b"caching": lambda s, i, a, r, b: s.forward(i, r, b, args=a),
}


def proxy(s: Session, i, args, raw, batch):
    _reply(batch, i, admin.proxy_command(s, args))


def config(s: Session, i, args, raw, batch):
    """CONFIG goes to the server; CONFIG RESETSTAT resets the proxy's statistics too."""
    if len(args) == 2 and args[1].lower() == b"resetstat":
        admin.reset_stats(s.app)
    hide_config_secrets(s, i, args)
    s.forward(i, raw, batch, args=args)


# The handler of each command vproxy answers: the command table declares which those are
# (commands.LOCAL_NAMES, and USERS_LOCAL while users are at the proxy); this maps them to code.
LOCAL = {
    b"quit": quit_, b"reset": reset, b"hello": hello, b"auth": auth,
    b"select": select, b"info": info, b"exec": exec_, b"discard": exec_, b"unwatch": unwatch,
    b"unsubscribe": unsubscribe, b"punsubscribe": unsubscribe, b"sunsubscribe": unsubscribe,
    b"client": client, b"proxy": proxy, b"config": config, b"acl": acl_command,
}
if LOCAL.keys() != C.LOCAL_NAMES | C.USERS_LOCAL:  # a handler for each declared name, and no other
    raise ImportError("local.LOCAL and commands.LOCAL_NAMES name different commands")
