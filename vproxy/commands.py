"""The command table: arity, flags and key positions (learned from the server), and vproxy's policy.

The server's own `COMMAND` reply is the source of truth for arity, flags and key positions, so a
command vproxy has never heard of still gets checked and (later) routed. The policy table below
is vproxy's: what must run on a connection of its own, what is answered locally, what is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import builtin_commands

# How vproxy runs a command (the `policy` of a Command):
FORWARD = "forward"  # any shared connection of the client's (db, protocol)
LOCAL = "local"  # answered by vproxy itself (session state it tracks)
BLOCK = "block"  # a connection leased to this client for this one command
PIN = "pin"  # starts state that needs a leased connection until it ends (MULTI, WATCH)
STREAM = "stream"  # leased connection whose replies are streamed (pub/sub, MONITOR, ...)
SIDE = "side"  # a connection of its own, out of the client's order (SCRIPT KILL while a script runs: mux/busy.py)
REFUSE = "refuse"  # would break the proxy: answered with -ERR

POLICY: dict[bytes, str] = {
    **dict.fromkeys([b"quit", b"reset", b"hello", b"auth", b"select", b"client",
                     b"proxy", b"info", b"unsubscribe", b"punsubscribe", b"sunsubscribe",
                     b"exec", b"discard", b"unwatch", b"config"], LOCAL),
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


@dataclass(slots=True)
class Command:
    name: str
    arity: int  # >0 exact count (with the name), <0 at least -arity
    flags: frozenset
    first_key: int = 0
    last_key: int = 0
    step: int = 0

    def arity_ok(self, nargs: int) -> bool:
        return arity_fits(self.arity, nargs)


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
        self.derived: dict = {}  # other modules' per-name facts derived from the table (emptied by learn)

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
            self.learned = True
        return len(table)

    def lookup(self, name: bytes) -> tuple[int, str]:
        """(arity, policy) of a name, cached: arity 0 when unknown; policy BY_ARGS needs policy()."""
        spec = self._specs.get(name)
        if spec is None:
            cmd = self.commands.get(name)
            spec = self._specs[name] = (cmd.arity if cmd is not None else 0, self._policy_of(name))
        return spec

    def forwards(self, name: bytes, nargs: int) -> bool:
        """A plain forward (policy FORWARD) with an arity the server accepts: what the plain path
        may send (per request: lookup and arity_fits inlined)."""
        spec = self._specs.get(name) or self.lookup(name)
        arity = spec[0]
        return spec[1] is FORWARD and (not arity or (nargs == arity if arity > 0 else nargs >= -arity))

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

    def _policy_of(self, name: bytes) -> str:
        p = POLICY.get(name)
        if p is not None:
            return p
        if name in BLOCK_OPTION or name in _SIDE_CONTAINERS:
            return _BY_ARGS
        cmd = self.commands.get(name)
        return BLOCK if cmd is not None and "blocking" in cmd.flags else FORWARD


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _from_entry(entry) -> Command | None:
    if not isinstance(entry, list) or len(entry) < 6:
        return None
    name, arity, flags, first, last, step = entry[:6]
    return Command(_text(name).lower(), int(arity), frozenset(_text(f) for f in flags),
                   int(first), int(last), int(step))
