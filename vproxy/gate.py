"""Users at the proxy: vproxy is the gate; named users with Redis ACL rules, checked before a request leaves.

    setting `users` ("alice on >pw ~app:* +@read db=0") and `password` (the default user's)
        -> Gate: ProxyUser by name (passwords held as SHA-256 hashes only)
    AUTH / HELLO AUTH -> Gate.authenticate -> bind(session, user):
        session.proxy_user  the user (ACL WHOAMI, CLIENT LIST user=, audit records)
        session.acl         the user when it has anything to check, else None (nothing to do)
        session.forwards    what the plain path may send unchecked (a per-name cache of the user's)
    batch path: ClientSession.dispatch -> ProxyUser.check(session, name, args) -> -NOPERM text or None

Every session of a gated proxy runs on the backend as vproxy's own backend user; the proxy users
exist only here. The checks follow the server's (valkey 9 / Redis 7): the database first (valkey's
`db=`), then the command (with its subcommand and ACL categories from the learned COMMAND table),
then the keys (positions from keyspec.py, read/write from the learned key specs), then channels.
"""

from __future__ import annotations

import hmac

from . import errors as E
from . import resp
from .aclrules import FLEET_USER, R, W, Rules, parse, sha256
from .keyspec import CONTAINER_KEY, key_positions
from .limits import Bucket
from .handler import Session

NOPERM_KEY = "NOPERM No permissions to access a key"
NOPERM_DB = "NOPERM No permissions to access database"
NOPERM_CHANNEL = "NOPERM No permissions to access a channel"
# A denial's rank (the server's: when no selector allows a request, the furthest-reaching denial is
# the one answered) and its text; a command's denial (rank 2) names the user and the command.
_DENIED_DB, _DENIED_KEY, _DENIED_CHANNEL = (1, NOPERM_DB), (3, NOPERM_KEY), (4, NOPERM_CHANNEL)
# Commands no rule can deny (the server's no_auth flag): a session can always authenticate and leave.
_NO_AUTH = frozenset([b"auth", b"hello", b"quit", b"reset"])
# Commands whose arguments name channels: position of the first, and whether they are patterns.
_CHANNELS = {b"subscribe": (1, False), b"ssubscribe": (1, False), b"publish": (1, False),
             b"spublish": (1, False), b"psubscribe": (1, True)}
# Shard channels: declared as key specs ("not_key") for slot routing, which the server's ACL skips
_SHARD_CHANNELS = frozenset([b"ssubscribe", b"sunsubscribe", b"spublish"])
# Keyless commands that work on the selected database (before the table names them @keyspace).
_DB_KEYLESS = frozenset([b"dbsize", b"flushdb", b"keys", b"scan", b"randomkey"])
# vproxy's own commands, in the categories a rule names them by (+@admin allows PROXY ...).
_OWN_CATEGORIES = {b"proxy": frozenset(["@admin", "@slow", "@dangerous"])}
# Scripts and functions run their redis.call()s as vproxy's backend user: no rule of the proxy user's
# applies inside them, so a user with any limit may not run them (no key, db or command check would hold).
_SCRIPTS = frozenset([b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro"])


class ProxyUser(Rules):
    """One configured user: its rules (aclrules.Rules), and what it may do."""

    def __init__(self, name: str):
        super().__init__(name)
        self.bucket: Bucket | None = None  # its rate= as a token bucket (Gate)
        self._runs: dict = {}  # (name, sub) -> may run (from the command table: cleared by relearn)
        self.preds: dict = {}  # db allowed? -> the plain path's predicate (see predicate)

    # ---- what it may do ----

    @property
    def everything(self) -> bool:
        """Nothing to check: every command, key, channel and database."""
        return (self.all_commands and self.all_keys and self.channels is None and self.dbs is None)

    @property
    def all_commands(self) -> bool:
        return bool(self.commands) and self.commands[-1][:2] == (True, "all")

    @property
    def all_keys(self) -> bool:
        return any(bits == R | W and rx.pattern == b".*\\Z" for bits, rx, _ in self.keys)

    def may_run(self, table, name: bytes, sub: bytes | None) -> bool:
        """The command rules, replayed in order for this command (cached per command and subcommand)."""
        key = (name, sub)
        ok = self._runs.get(key)
        if ok is None:
            cmd = table.get(name)
            if cmd is not None and sub is not None and cmd.subs and sub in cmd.subs:
                cmd = cmd.subs[sub]
            cats = cmd.acl if cmd is not None else _OWN_CATEGORIES.get(name, frozenset())
            ok = False
            for allow, kind, what in self.commands:
                if kind == "all" or (kind == "cat" and what in cats) or (kind == "cmd" and what == name) \
                        or (kind == "sub" and what == key):
                    ok = allow
            if len(self._runs) < 4096:  # names are the clients': bound the cache
                self._runs[key] = ok
        return ok

    def check(self, s: Session, name: bytes, args: list, db: int | None = None) -> str | None:
        """None when the session may run this request, else the server's -NOPERM text. With
        selectors, as the server: allowed when the user's own rules or any selector allow it; else
        the denial that got furthest (database < command < key < channel; the last of equals).
        db: the database it will run on (default the session's; a SELECT queued in MULTI's)."""
        db = s.db if db is None else db
        table = s.app.commands
        cmd = table.get(name)
        sub = None
        if cmd is not None and cmd.subs and len(args) > 1:
            sub = args[1].lower()
            if sub not in cmd.subs:
                sub = None
        elif name in _OWN_CATEGORIES and len(args) > 1:  # PROXY's subcommands: +proxy|nodes
            sub = args[1].lower()
        denied = self.denial(table, cmd, name, sub, args, db)
        if denied is None:
            return None
        for sel in self.selectors:
            d = sel.denial(table, cmd, name, sub, args, db)
            if d is None:
                return None
            if d[0] >= denied[0]:
                denied = d
        return denied[1]

    def denial(self, table, cmd, name: bytes, sub, args: list, db: int) -> tuple | None:
        """None when these rules (the user's own, or one selector's) allow the request, else
        (rank, -NOPERM text): what the server's ACLSelectorCheckCmd finds, in its order."""
        if self.dbs is not None and not self._db_ok(cmd, name, args, db):
            return _DENIED_DB
        if name in _NO_AUTH or (cmd is not None and "no_auth" in cmd.flags):
            return None
        if not self.may_run(table, name, sub) or name in _SCRIPTS:
            shown = name.decode(errors="replace") + ("|" + sub.decode() if sub is not None else "")
            return 2, f"NOPERM User {self.name} has no permissions to run the '{shown}' command"
        if not self.all_keys and name not in _SHARD_CHANNELS and not self._keys_ok(cmd, name, sub, args):
            return _DENIED_KEY
        if self.channels is not None and name in _CHANNELS and not self._channels_ok(name, args):
            return _DENIED_CHANNEL
        return None

    def _keys_ok(self, cmd, name: bytes, sub, args: list) -> bool:
        positions = key_positions(cmd, name, args)
        if positions is None:  # keys only the server could tell: refused rather than guessed
            return False
        spec_cmd = cmd.subs[sub] if sub is not None and name in CONTAINER_KEY else cmd
        for pos in positions:
            need = key_perm(spec_cmd, name, pos, args)
            key = args[pos]
            if not any(bits & need == need and rx.match(key) for bits, rx, _ in self.keys):
                return False
        return True

    def _channels_ok(self, name: bytes, args: list) -> bool:
        first, literal = _CHANNELS[name]
        chans = args[first:first + 1] if name in (b"publish", b"spublish") else args[first:]
        if literal:  # a pattern subscription needs that very pattern allowed, as on the server
            return all(any(t == "&" + c.decode(errors="replace") for t in self.channel_text) for c in chans)
        return all(any(rx.match(c) for rx in self.channels) for c in chans)

    def _db_ok(self, cmd, name: bytes, args: list, db: int) -> bool:
        dbs = self.dbs
        target = _CROSS_DB.get(name)
        if target is not None:
            wanted = target(args)
            if wanted is _ALL:
                return False
            if any(d not in dbs for d in wanted):
                return False
            if name in (b"select", b"swapdb"):
                return True
        return db in dbs or not db_scoped(cmd, name)

    # ---- the plain path ----

    def plain_ok(self, table, name: bytes, db_ok: bool) -> bool:
        """May every request of this name go out unchecked (whatever its arguments)?"""
        if name == b"acl" or name in _SCRIPTS:
            return False
        cmd = table.get(name)
        if cmd is not None and cmd.subs and not self.all_commands:
            return False  # subcommands may be ruled apart
        if not self.may_run(table, name, None):
            return False
        if not self.all_keys and has_keys(cmd, name):
            return False
        if self.dbs is not None and (name in _CROSS_DB or (not db_ok and db_scoped(cmd, name))):
            return False
        return self.channels is None or name not in _CHANNELS

    def predicate(self, table, db_ok: bool):
        """The session's `forwards` (plain.py): the table's, narrowed to what needs no check."""
        pred = self.preds.get(db_ok)
        if pred is None:
            cache: dict = {}  # name -> (arity, may go unchecked): emptied with the table's own (narrowed)
            table.narrowed.append(cache)

            def pred(name: bytes, nargs: int) -> bool:  # CommandTable.forwards' shape: one lookup
                spec = cache.get(name)
                if spec is None:
                    _, arity, ok = table.plain_spec(name)
                    spec = (arity, ok and self.plain_ok(table, name, db_ok))
                    if len(cache) < 4096:  # names are the clients'
                        cache[name] = spec
                arity = spec[0]
                return spec[1] and (not arity or (nargs == arity if arity > 0 else nargs >= -arity))
            self.preds[db_ok] = pred
        return pred

    def relearned(self) -> None:
        """The command table changed (learned from the backend): forget what was derived from it."""
        self._runs.clear()
        for sel in self.selectors or ():
            sel.relearned()


_ALL = object()


def _int_arg(args: list, i: int) -> list:
    n = resp.string2ll(args[i]) if len(args) > i else None
    return [] if n is None else [n]


def _copy_db(args: list) -> list:
    low = [a.lower() for a in args]
    return _int_arg(args, low.index(b"db") + 1) if b"db" in low[3:] else []


# Commands that name other databases: the ones they need (as valkey checks them).
_CROSS_DB = {
    b"select": lambda a: _int_arg(a, 1),
    b"swapdb": lambda a: _int_arg(a, 1) + _int_arg(a, 2),
    b"move": lambda a: _int_arg(a, 2),
    b"copy": _copy_db,
    b"flushall": lambda a: _ALL,
}


def has_keys(cmd, name: bytes) -> bool:
    if cmd is None:
        return True  # unknown to the table: checked (the server will say what it is)
    if name in _SHARD_CHANNELS:
        return False
    return cmd.first_key > 0 or "movablekeys" in cmd.flags or name in CONTAINER_KEY or bool(cmd.specs)


def db_scoped(cmd, name: bytes) -> bool:
    """Does the command work on the selected database (its keys, or the keyspace)?"""
    return has_keys(cmd, name) or name in _DB_KEYLESS or (cmd is not None and "@keyspace" in cmd.acl)


def key_perm(cmd, name: bytes, pos: int, args: list) -> int:
    """What a key at argument pos needs: R (the key spec says access), W (insert, update, delete),
    both, or neither (any matching pattern will do), as the server's ACLSelectorCheckKey."""
    specs = cmd.specs if cmd is not None else ()
    if not specs:  # the built-in table: the command's flags
        flags = cmd.flags if cmd is not None else frozenset()
        return (W if "write" in flags else 0) | (R if "readonly" in flags else 0)
    vary = _VARIABLE.get(name)
    if vary is not None:  # flags that depend on the arguments (the server's own getkeys functions)
        return vary([a.lower() for a in args[2:]])
    nargs, loose, union = len(args), 0, 0
    for flags, index, last, step in specs:
        need = (R if "access" in flags else 0) | (W if flags & _WRITES else 0)
        if index is not None and last is not None:
            end = index + last if last >= 0 else nargs + last
            if index <= pos <= end and (pos - index) % (step or 1) == 0:
                return need
        else:
            loose |= need  # a keyword or key-count spec (STORE key, numkeys): not placed here
        union |= need
    return loose or union


_VARIABLE = {
    b"set": lambda rest: R | W if b"get" in rest else W,
    b"bitfield": lambda rest: R | W if b"set" in rest or b"incrby" in rest else R,
}
_WRITES = frozenset(["insert", "update", "delete"])


class Gate:
    """The proxy's users (setting `users`, and `password` as the default user's)."""

    def __init__(self, cfg):
        self.users: dict[str, ProxyUser] = {}
        for line in cfg.users:
            user = parse_user(line)
            self.users[user.name] = user
        if cfg.password and "default" not in self.users:
            d = ProxyUser("default")
            for rule in ("on", "#" + sha256(cfg.password.encode()), "allkeys", "allchannels", "allcommands"):
                d.apply(rule)
            self.users["default"] = d
        for user in self.users.values():
            if user.rate:
                user.bucket = Bucket(user.rate, user.rate)
        # the fleet's peers (fleet.py) ask as this user, with fleet_password: two questions only
        self.fleet_user: ProxyUser | None = None
        if cfg.fleet and cfg.fleet_password:
            self.fleet_user = parse_user(f"{FLEET_USER} on #{sha256(cfg.fleet_password.encode())} "
                                         "+proxy|clients-local +proxy|kill-local")

    def start(self, s: Session) -> None:
        """A new (or RESET) session: the default user when it needs no password, else not authenticated."""
        d = self.users.get("default")
        if d is not None and d.enabled and d.nopass:
            bind(s, d)
            s.authed = True
        else:
            bind(s, None)
            s.authed = False

    def authenticate(self, s: Session, user: bytes | None, password: bytes) -> str | None:
        """None when accepted (the session now runs as that user), else the error to answer."""
        name = "default" if user is None else user.decode(errors="replace")
        u = self.users.get(name)
        if u is None and name == FLEET_USER:
            u = self.fleet_user
        if u is None or not u.enabled:
            return E.WRONGPASS
        if not u.nopass:
            h = sha256(password)
            if not any(hmac.compare_digest(h, x) for x in u.hashes):
                return E.WRONGPASS
        bind(s, u)
        return None

    def relearned(self) -> None:
        for u in self.users.values():
            u.relearned()


def bind(s: Session, user: ProxyUser | None) -> None:
    """The session runs as user (None: nobody yet): its checks and its plain-path predicate."""
    s.proxy_user = user
    s.acl = None if user is None or user.everything else user
    table = s.app.commands
    if s.acl is None:
        s.forwards = table.forwards
    else:
        s.forwards = user.predicate(table, user.dbs is None or s.db in user.dbs)
    s.set_buckets()


def parse_user(line: str) -> ProxyUser:
    """'alice on >secret ~app:* +@read' -> ProxyUser (ValueError naming the bad rule)."""
    return parse(line, ProxyUser)
