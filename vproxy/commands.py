"""The command table: arity, flags and key positions (learned from the server), and vproxy's policy.

The server's own `COMMAND` reply is the source of truth for arity, flags and key positions, so a
command vproxy has never heard of still gets checked and (later) routed. The policy table below
is vproxy's: what must run on a connection of its own, what is answered locally, what is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import builtin_commands
from .keyspec import CONTAINER_KEY

# How vproxy runs a command (the `policy` of a Command):
FORWARD = "forward"  # any shared connection of the client's (db, protocol)
LOCAL = "local"  # answered by vproxy itself (session state it tracks)
BLOCK = "block"  # a connection leased to this client for this one command
PIN = "pin"  # starts state that needs a leased connection until it ends (MULTI, WATCH)
STREAM = "stream"  # leased connection whose replies are streamed (pub/sub, MONITOR, ...)
SIDE = "side"  # a connection of its own, out of the client's order (SCRIPT KILL while a script runs: mux/busy.py)
REFUSE = "refuse"  # would break the proxy: answered with -ERR

# Answered by vproxy from the session state it tracks: local.LOCAL holds a handler for each of these,
# and for USERS_LOCAL, answered by vproxy only while users are at the proxy (gate.py; else forwarded).
LOCAL_NAMES = frozenset([b"quit", b"reset", b"hello", b"auth", b"select", b"client",
                         b"proxy", b"info", b"unsubscribe", b"punsubscribe", b"sunsubscribe",
                         b"exec", b"discard", b"unwatch", b"config"])
USERS_LOCAL = frozenset([b"acl"])
POLICY: dict[bytes, str] = {
    **dict.fromkeys(LOCAL_NAMES, LOCAL),
    **dict.fromkeys([b"multi", b"watch"], PIN),
    **dict.fromkeys([b"subscribe", b"psubscribe", b"ssubscribe", b"monitor"], STREAM),
    **dict.fromkeys([b"blpop", b"brpop", b"brpoplpush", b"blmove", b"blmpop", b"bzpopmin",
                     b"bzpopmax", b"bzmpop", b"wait", b"waitaof", b"debug"], BLOCK),
    **dict.fromkeys([b"shutdown", b"sync", b"psync", b"replconf"], REFUSE),
}
REFUSE_WHY = {
    b"shutdown": "it would stop the backend every client shares; run it on the server directly",
    b"sync": "replication streams are not proxied",
    b"psync": "replication streams are not proxied",
    b"replconf": "replication streams are not proxied",
}
# Subcommands that need a fresh connection: the one they target is busy by definition.
SIDE_SUBCOMMANDS = {(b"script", b"kill"), (b"function", b"kill")}
_SIDE_CONTAINERS = {c for c, _ in SIDE_SUBCOMMANDS}
# Commands that block only when an option says so.
BLOCK_OPTION = {b"xread": b"block", b"xreadgroup": b"block"}
BY_ARGS = _BY_ARGS = "by-args"  # policy depends on the arguments
# Commands that change a connection's state: forwarded on a lease, they make it dirty (and a cluster
# transaction holding one runs on a connection of its own).
STATEFUL = frozenset([b"select", b"hello", b"client", b"readonly", b"readwrite", b"auth", b"reset"])


@dataclass(slots=True)
class Command:
    name: str
    arity: int  # >0 exact count (with the name), <0 at least -arity
    flags: frozenset
    first_key: int = 0
    last_key: int = 0
    step: int = 0
    acl: frozenset = frozenset()  # ACL categories ("@dangerous" ...): empty in the built-in table
    subs: dict | None = None  # container commands: lower-case subcommand -> Command (learned only)
    specs: tuple = ()  # key specs (learned only): (flags, begin index or None, lastkey or None, keystep)

    def arity_ok(self, nargs: int) -> bool:
        return arity_fits(self.arity, nargs)


# Entries at most in each cache keyed by command names as clients send them (they may make names
# up, or spell them in any case): past that, lookups are answered uncached.
NAME_CACHE = 4096

def arity_fits(arity: int, nargs: int) -> bool:
    """nargs (the name included) fits arity: >0 exactly, <0 at least -arity, 0 (unknown) any."""
    return not arity or (nargs == arity if arity > 0 else nargs >= -arity)


class CommandTable:
    """Commands by lower-case name: arity, flags, key positions."""

    def __init__(self):
        # the fallback until (or unless) the server's COMMAND reply is read
        self.commands: dict[bytes, Command] = {e[0].encode(): Command(*e) for e in builtin_commands.entries()}
        self.learned = False
        self._policies: dict[bytes, str] = {}  # name -> policy, for names whose args don't matter
        self._specs: dict[bytes, tuple[int, str]] = {}  # name -> (arity, policy): one lookup per request
        # name -> (position of its only key or 0, arity): fast_key's cache (the compiled cluster
        # path, _plain.pyx, reads it too); emptied whenever a policy may change
        self.derived: dict = {}
        self._single: dict[bytes, int] = {}  # name -> position of its only key, 0 if not so (single_key)
        self.session_first: frozenset = frozenset()  # names the mode's session answers before the policy
        self.audit_plans: dict = {}  # name as sent -> what recording it takes (audit.Audit.plan)
        # a request's name as the client spelled it -> (lower-case name, arity, may take the plain
        # path): the plain path's one dict lookup per request (plain_spec)
        self.plain_specs: dict[bytes, tuple[bytes, int, bool]] = {}
        self.narrowed: list[dict] = []  # caches of narrower predicates (gate.py): emptied with those
        self.audit_select: frozenset | None = None  # audit on: the classes and names selected
        self.audit_names: frozenset | _Everything = frozenset()  # names the audit records
        self._audits: dict = {}  # (name, subcommand) -> recorded?
        self.local_names: frozenset = frozenset()  # more names vproxy answers (ACL with proxy users)

    def get(self, name: bytes) -> Command | None:
        return self.commands.get(name)

    def learn(self, reply: list) -> int:
        """Take the server's COMMAND reply (decoded); return how many commands it listed."""
        table = {}
        for entry in reply:
            cmd = _from_entry(entry)
            if cmd is not None:
                table[cmd.name.encode()] = cmd
        if table:
            self.commands.update(table)
            self._policies.clear()
            self._specs.clear()
            self.derived.clear()
            self._single.clear()
            self.audit_plans.clear()
            self.learned = True
            self.select_audit(self.audit_select)
        return len(table)

    def lookup(self, name: bytes) -> tuple[int, str]:
        """(arity, policy) of a name, cached: arity 0 when unknown; policy BY_ARGS needs policy()."""
        spec = self._specs.get(name)
        if spec is None:
            cmd = self.commands.get(name)
            spec = (cmd.arity if cmd is not None else 0, self._policy_of(name))
            if cmd is not None or len(self._specs) < NAME_CACHE:
                self._specs[name] = spec
        return spec

    def single_key(self, name: bytes) -> int:
        """The position of a command's only key when it has one at a fixed place (GET k, HSET k f v:
        1); 0 when it has none, several, movable ones, or a key only with some subcommands."""
        pos = self._single.get(name)
        if pos is None:
            cmd = self.commands.get(name)
            if cmd is None:
                return 0
            ok = cmd.first_key > 0 and cmd.first_key == cmd.last_key and "movablekeys" not in cmd.flags \
                and name not in CONTAINER_KEY
            pos = self._single[name] = cmd.first_key if ok else 0
        return pos

    def fast_key(self, name: bytes, nargs: int) -> int:
        """The key position of a plain one-key command (forwarded, right arity, not one the session
        answers first: session_first) with nargs arguments; 0 when dispatch must take the long way.
        Cached in `derived`, which the compiled cluster path (_plain.pyx) reads before calling this."""
        spec = self.derived.get(name)
        if spec is None:
            cmd = self.commands.get(name)
            arity, policy = self.lookup(name)
            pos = self.single_key(name) if policy is FORWARD and name not in self.session_first else 0
            spec = (pos, arity)
            if cmd is not None or len(self.derived) < NAME_CACHE:
                self.derived[name] = spec
        pos, arity = spec
        if not pos or pos >= nargs or (nargs != arity if arity > 0 else nargs < -arity):
            return 0
        return pos

    def set_session_first(self, names: frozenset) -> None:
        """Names the mode's session answers itself before the policy (cluster: fan-outs, transactions,
        SELECT, SSUBSCRIBE): never a fast key."""
        if names != self.session_first:
            self.session_first = names
            self.derived.clear()

    def forwards(self, name: bytes, nargs: int) -> bool:
        """A plain forward (policy FORWARD) with an arity the server accepts: what the plain path
        may send (plain.py inlines it: plain_specs, then the arity)."""
        spec = self.plain_specs.get(name) or self.plain_spec(name)
        arity = spec[1]
        return spec[2] and (not arity or (nargs == arity if arity > 0 else nargs >= -arity))

    def plain_spec(self, raw: bytes) -> tuple[bytes, int, bool]:
        """(lower-case name, arity, may take the plain path) of a command name as a client spelled it
        (what forwards() decides, with the arity left to check). Cached in plain_specs, up to a
        bound (a client may spell names in any case, or make them up)."""
        name = raw.lower()
        arity, policy = self.lookup(name)
        spec = (name, arity, policy is FORWARD)
        if len(self.plain_specs) < NAME_CACHE:
            self.plain_specs[raw] = spec
        return spec

    def _clear_plain(self) -> None:
        self.plain_specs.clear()
        for cache in self.narrowed:
            cache.clear()

    def policy(self, name: bytes, args: list[bytes]) -> str:
        """How vproxy must run this request (see the constants above)."""
        p = self._policies.get(name)
        if p is None:
            p = self._policies[name] = self._policy_of(name)
        if p is _BY_ARGS:
            option = BLOCK_OPTION.get(name)
            if option is not None:
                return BLOCK if any(a.lower() == option for a in args[1:]) else FORWARD
            return SIDE if len(args) > 1 and (name, args[1].lower()) in SIDE_SUBCOMMANDS else FORWARD
        return p

    def set_local(self, names: frozenset) -> None:
        """These names are answered by vproxy too (gate.py: ACL, with users at the proxy)."""
        if names != self.local_names:
            self.local_names = names
            self._policies.clear()
            self._specs.clear()
            self._clear_plain()
            self.derived.clear()
            self.audit_plans.clear()

    def _policy_of(self, name: bytes) -> str:
        if name in self.local_names:
            return LOCAL
        p = POLICY.get(name)
        if p is not None:
            return p
        if name in BLOCK_OPTION or name in _SIDE_CONTAINERS:
            return _BY_ARGS
        cmd = self.commands.get(name)
        return BLOCK if cmd is not None and "blocking" in cmd.flags else FORWARD

    # ---- audit: which requests are recorded (audit.py); recorded ones never take the plain path ----

    def classes_of(self, name: bytes, sub: bytes | None = None) -> frozenset:
        """The audit classes of a command: of its subcommand when given (CONFIG SET; an unknown one:
        the container's own); of a container without one: every subcommand's (for the plain-path gate)."""
        own = _OWN_CLASSES.get(name)
        if own is not None:
            return own.get(sub, frozenset()) if sub is not None else frozenset().union(*own.values())
        cmd = self.commands.get(name)
        if cmd is not None and cmd.subs:
            if sub is not None:
                return _classes(cmd.subs[sub], name) if sub in cmd.subs else _classes(cmd, name)
            return frozenset().union(_classes(cmd, name), *(_classes(c, name) for c in cmd.subs.values()))
        return _classes(cmd, name)

    def select_audit(self, select: frozenset | None) -> None:
        """Record the requests of these classes and names (None: audit off). Recorded requests keep
        the plain path: audit.AuditTrack records them there."""
        self.audit_select = select
        if not select:
            names = frozenset()
        elif "all" in select:
            names = _Everything()
        else:
            named = {n.encode().split(b"|")[0] for n in select if n not in AUDIT_CLASSES}
            names = frozenset(named | {n for n in [*self.commands, *_OWN_CLASSES] if self.classes_of(n) & select})
        self.audit_names = names
        self._clear_plain()
        self._audits.clear()
        self.derived.clear()
        self.audit_plans.clear()

    def audits(self, name: bytes, args: list) -> bool:
        """Whether this request is recorded (its subcommand decides for a container command)."""
        if name not in self.audit_names:
            return False
        sub = self.subcommand(name, args)
        key = (name, sub)
        hit = self._audits.get(key)
        if hit is None:
            select = self.audit_select or frozenset()
            names = {name.decode(errors="replace")} | ({f"{name.decode()}|{sub.decode(errors='replace')}"}
                                                       if sub else set())
            hit = "all" in select or bool(names & select) or bool(self.classes_of(name, sub) & select)
            if len(self._audits) < NAME_CACHE:  # subcommand names are the client's
                self._audits[key] = hit
        return hit

    def subcommand(self, name: bytes, args: list) -> bytes | None:
        """The request's subcommand when its command is a container (CONFIG SET -> b"set")."""
        if len(args) > 1 and (name in _OWN_CLASSES or (name in self.commands and self.commands[name].subs)):
            return args[1].lower()
        return None


AUDIT_CLASSES = frozenset(["write", "read", "admin", "dangerous", "pubsub", "scripting", "all"])
# Classes for what the table cannot say: vproxy's own PROXY command, and the built-in table's
# commands before the server's COMMAND reply (with ACL categories) is read.
_OWN_CLASSES = {b"proxy": {b"audit": frozenset(["admin"])}}
_FALLBACK = {
    **dict.fromkeys([b"flushall", b"flushdb", b"keys", b"config", b"debug", b"shutdown", b"sync", b"psync",
                     b"replconf", b"replicaof", b"slaveof", b"migrate", b"restore", b"sort", b"sort_ro",
                     b"monitor", b"cluster", b"failover", b"acl", b"save", b"bgsave", b"bgrewriteaof",
                     b"lastsave", b"swapdb", b"info", b"role", b"module", b"latency", b"slowlog"],
                    frozenset(["dangerous"])),
    **dict.fromkeys([b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro", b"script",
                     b"function"], frozenset(["scripting"])),
}


class _Everything:
    """audit_commands = all: every name is recorded."""

    def __contains__(self, name) -> bool:
        return True


def _classes(cmd: Command | None, name: bytes) -> frozenset:
    """A command's audit classes, from its flags and ACL categories."""
    if cmd is None:
        return frozenset()
    f, a = cmd.flags, cmd.acl
    out = set()
    if "write" in f:
        out.add("write")
    if "readonly" in f:
        out.add("read")
    if "admin" in f or "@admin" in a:
        out.add("admin")
    if "pubsub" in f or "@pubsub" in a:
        out.add("pubsub")
    if "@dangerous" in a:
        out.add("dangerous")
    if "@scripting" in a:
        out.add("scripting")
    if not a:
        out |= _FALLBACK.get(name, frozenset())
    return frozenset(out)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _from_entry(entry) -> Command | None:
    if not isinstance(entry, list) or len(entry) < 6:
        return None
    name, arity, flags, first, last, step = entry[:6]
    acl = frozenset(_text(c) for c in entry[6]) if len(entry) > 6 and isinstance(entry[6], list) else frozenset()
    subs = None
    if len(entry) > 9 and isinstance(entry[9], list) and entry[9]:
        subs = {}
        for e in entry[9]:
            sub = _from_entry(e)
            if sub is not None:
                subs[sub.name.rpartition("|")[2].encode()] = sub
    specs = _key_specs(entry[8]) if len(entry) > 8 and isinstance(entry[8], list) else ()
    return Command(_text(name).lower(), int(arity), frozenset(_text(f) for f in flags),
                   int(first), int(last), int(step), acl, subs, specs)


def _pairs(v) -> dict:
    """A RESP2 flat [name, value, ...] list (or a RESP3 map) as a dict with str keys."""
    if isinstance(v, dict):
        return {_text(k): x for k, x in v.items()}
    if isinstance(v, list):
        return {_text(v[j]): v[j + 1] for j in range(0, len(v) - 1, 2)}
    return {}


def _key_specs(raw: list) -> tuple:
    """COMMAND's key specifications: per spec its flags (lower-case: rw, access, insert ...) and, for
    the usual index + range kind, where its keys are (the gate's read/write checks: gate.key_perm)."""
    out = []
    for spec in raw:
        d = _pairs(spec)
        flags = frozenset(_text(f).lower() for f in d.get("flags", []) or [])
        begin, find = _pairs(d.get("begin_search")), _pairs(d.get("find_keys"))
        index = last = step = None
        try:
            if _text(begin.get("type", "")) == "index":
                index = int(_pairs(begin.get("spec")).get("index"))
            if _text(find.get("type", "")) == "range":
                r = _pairs(find.get("spec"))
                last, step = int(r.get("lastkey")), int(r.get("keystep"))
        except (TypeError, ValueError):
            index = last = None
        out.append((flags, index, last, step))
    return tuple(out)
