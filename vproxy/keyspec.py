"""Which arguments of a request are keys: the learned COMMAND positions, plus the movable-keys rules.

`COMMAND` gives first/last/step for most commands; for those flagged `movablekeys` (EVAL,
ZUNIONSTORE, XREAD, SORT ... STORE) the keys depend on other arguments, so the common ones are
worked out here the way `COMMAND GETKEYS` does. A movable command not listed here gets its static
positions (often none): the cluster session then asks a backend with COMMAND GETKEYS.
"""

from __future__ import annotations

from .resp import string2ll


def _int(v: bytes, default: int = -1) -> int:
    n = string2ll(v)  # as the server reads numkeys: " 1" is no number, so no keys
    return default if n is None else n


def _numkeys_at(pos: int, before: tuple = ()):
    """Keys are `numkeys` arguments after position pos (which holds numkeys); `before` are fixed keys."""
    def keys(args):
        n = _int(args[pos]) if len(args) > pos else -1
        if n < 0 or pos + 1 + n > len(args):
            return None
        return list(before) + list(range(pos + 1, pos + 1 + n))
    return keys


def _streams(args):
    for j in range(1, len(args)):
        if args[j].lower() == b"streams":
            rest = len(args) - j - 1
            if rest <= 0 or rest % 2:
                return None
            return list(range(j + 1, j + 1 + rest // 2))
    return None


def _store_option(*options: bytes):
    def keys(args):
        out = [1] if len(args) > 1 else []
        for j in range(2, len(args) - 1):
            if args[j].lower() in options:
                out.append(j + 1)
        return out
    return keys


MOVABLE = {
    **dict.fromkeys([b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro"], _numkeys_at(2)),
    **dict.fromkeys([b"zunionstore", b"zinterstore", b"zdiffstore"], _numkeys_at(2, (1,))),
    **dict.fromkeys([b"zunion", b"zinter", b"zdiff", b"sintercard", b"zintercard", b"lmpop", b"zmpop"],
                    _numkeys_at(1)),
    **dict.fromkeys([b"blmpop", b"bzmpop"], _numkeys_at(2)),
    **dict.fromkeys([b"xread", b"xreadgroup"], _streams),
    **dict.fromkeys([b"sort", b"sort_ro"], _store_option(b"store")),
    **dict.fromkeys([b"georadius", b"georadiusbymember"], _store_option(b"store", b"storedist")),
}


# Container commands whose subcommand takes a key right after it (COMMAND lists them keyless).
CONTAINER_KEY = {
    b"object": {b"encoding", b"freq", b"idletime", b"refcount"},
    b"xinfo": {b"stream", b"groups", b"consumers"},
    b"memory": {b"usage"},
    b"xgroup": {b"create", b"setid", b"destroy", b"createconsumer", b"delconsumer"},
}


def key_positions(cmd, name: bytes, args: list) -> list[int] | None:
    """Indices of the key arguments ([] for none); None when only the server can tell (ask it)."""
    if cmd is None:
        return []
    subs = CONTAINER_KEY.get(name)
    if subs is not None:
        return [2] if len(args) > 2 and args[1].lower() in subs else []
    if "movablekeys" in cmd.flags:
        rule = MOVABLE.get(name)
        if rule is not None:
            return rule(args)
        if cmd.first_key <= 0:
            return None
    first = cmd.first_key
    n = len(args)
    if first <= 0 or first >= n:
        return []
    last = cmd.last_key
    last = n + last if last < 0 else min(last, n - 1)
    return list(range(first, last + 1, cmd.step or 1))
