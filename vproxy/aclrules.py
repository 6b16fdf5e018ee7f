"""Proxy users' ACL rules as text: parsed, checked, described, and their clear-text passwords hashed.

    "alice on >pw ~app:* +@read db=0 rate=100"  --parse-->  Rules (gate.ProxyUser adds the checks)
    the `users` setting                         --normalize-->  the same lines, passwords as #sha256

Layer 0 (the settings check the `users` lines with it); the checks made on requests live in gate.py.
The syntax is Redis ACL's (plus valkey 9's db=, alldbs, resetdbs, and vproxy's rate=N).
"""

from __future__ import annotations

import hashlib
import re

R, W = 1, 2  # key permissions: read, write
CATEGORIES = frozenset(["keyspace", "read", "write", "set", "sortedset", "list", "hash", "string", "bitmap",
                        "hyperloglog", "geo", "stream", "pubsub", "admin", "fast", "slow", "blocking",
                        "dangerous", "connection", "transaction", "scripting"])
_HEX = re.compile(r"[0-9a-f]{64}")
FLEET_USER = "vproxy-fleet"  # the user a fleet's peers ask as (setting fleet_password), not one of `users`
# rules for the user as a whole, which a selector cannot hold
_NOT_IN_SELECTOR = frozenset(["on", "off", "nopass", "resetpass", "reset", "clearselectors"])


def glob(pattern: bytes) -> re.Pattern:
    """The server's glob (stringmatchlen): * ? [abc] [^a-z] and \\ escapes, as a compiled regex."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i:i + 1]
        i += 1
        if c == b"*":
            out.append(b".*")
        elif c == b"?":
            out.append(b".")
        elif c == b"\\" and i < n:
            out.append(re.escape(pattern[i:i + 1]))
            i += 1
        elif c == b"[" and pattern.find(b"]", i) > 0:
            end = pattern.find(b"]", i)
            body, i = pattern[i:end], end + 1
            neg = body[:1] == b"^"
            parts = []
            j = 1 if neg else 0
            while j < len(body):
                ch = body[j:j + 1]
                if ch == b"\\" and j + 1 < len(body):
                    j += 1
                    ch = body[j:j + 1]
                elif body[j + 1:j + 2] == b"-" and j + 2 < len(body):  # a range; reversed, the server swaps it
                    lo, hi = sorted((ch, body[j + 2:j + 3]))
                    parts.append(re.escape(lo) + b"-" + re.escape(hi))
                    j += 3
                    continue
                parts.append(re.escape(ch))
                j += 1
            out.append(b"[" + (b"^" if neg else b"") + b"".join(parts) + b"]" if parts else b"(?!)")
        else:
            out.append(re.escape(c))
    return re.compile(b"".join(out) + b"\\Z", re.S)


def sha256(password: bytes) -> str:
    return hashlib.sha256(password).hexdigest()


class Rules:
    """One user's rules as parsed: enabled, passwords (hashes), commands, keys, channels, databases, rate."""

    def __init__(self, name: str):
        self.name = name
        self.enabled = False
        self.nopass = False
        self.hashes: list[str] = []
        self.commands: list = []  # (allow, kind, what) in order: kind all | cat | cmd | sub
        self.keys: list = []  # (perms, regex, text)
        self.channels: list | None = []  # regexes; None: every channel
        self.channel_text: list[str] = []
        self.dbs: frozenset | None = None  # None: every database
        self.rate = 0.0  # vproxy's `rate=N`: requests per second, all its clients together
        # further rule sets, "(~s:* +set db=1)": a request any one of them allows is allowed (as
        # the server's selectors); None in a selector itself (it has none of its own)
        self.selectors: list | None = []

    def _selector(self, rule: str) -> "Rules":
        """'(~s:* +set db=1)' -> a Rules of the same class with only command, key, channel and
        database rules (the server's selector: no passwords, on/off, reset or nested selectors)."""
        sel = type(self)(self.name)
        sel.selectors = None
        for word in rule[1:-1].split():
            if word.lower() in _NOT_IN_SELECTOR or word[:1] in "><#!" or word.lower().startswith("rate=") \
                    or "(" in word or ")" in word:
                raise ValueError(f"'{rule}': '{word}' is not a rule a selector can hold")
            sel.apply(word)
        return sel

    def apply(self, rule: str) -> None:
        """One rule, in Redis ACL syntax (plus db=, alldbs, resetdbs as valkey 9, and rate=N)."""
        low = rule.lower()
        if low in ("on", "off"):
            self.enabled = low == "on"
        elif low == "nopass":
            self.nopass, self.hashes = True, []
        elif low == "resetpass":
            self.nopass, self.hashes = False, []
        elif rule[:1] in (">", "<"):
            h = sha256(rule[1:].encode())
            self._password(rule[0] == ">", h)
        elif rule[:1] in ("#", "!"):
            if not _HEX.fullmatch(rule[1:].lower()):
                raise ValueError(f"'{rule[0]}' must be followed by a SHA-256 hash (64 hex digits)")
            self._password(rule[0] == "#", rule[1:].lower())
        elif low in ("allcommands", "+@all", "nocommands", "-@all"):
            self.commands.append((low in ("allcommands", "+@all"), "all", None))
        elif rule[:2] in ("+@", "-@"):
            if low[2:] not in CATEGORIES:
                raise ValueError(f"unknown command category '{rule[2:]}'")
            self.commands.append((rule[0] == "+", "cat", "@" + low[2:]))
        elif rule[:1] in ("+", "-") and len(rule) > 1:
            name, _, sub = low[1:].encode().partition(b"|")
            self.commands.append((rule[0] == "+", "sub" if sub else "cmd", (name, sub) if sub else name))
        elif low == "allkeys":
            self._key("~*")
        elif low == "resetkeys":
            self.keys = []
        elif rule[:1] == "~" or rule[:1] == "%":
            self._key(rule)
        elif low == "allchannels":
            self.channels, self.channel_text = None, ["&*"]
        elif low == "resetchannels":
            self.channels, self.channel_text = [], []
        elif rule[:1] == "&":
            if rule == "&*":
                self.channels, self.channel_text = None, ["&*"]
            elif self.channels is not None:
                self.channels.append(glob(rule[1:].encode()))
                self.channel_text.append(rule)
        elif low in ("alldbs", "resetdbs"):
            self.dbs = None if low == "alldbs" else frozenset()
        elif low.startswith("db="):
            dbs = [int(d) for d in low[3:].split(",") if d.strip().isdigit()]
            if len(dbs) != len(low[3:].split(",")):
                raise ValueError(f"'{rule}': db= takes database numbers separated by commas (db=0,1)")
            self.dbs = frozenset(dbs)  # as the server: the last db= says them all
        elif low.startswith("rate="):
            self.rate = float(low[5:])
            if self.rate < 0:
                raise ValueError(f"'{rule}': a rate is >= 0 requests per second")
        elif low == "reset":
            self.__init__(self.name)
        elif rule[:1] == "(" and rule[-1:] == ")" and self.selectors is not None:
            self.selectors.append(self._selector(rule))
        elif low == "clearselectors" and self.selectors is not None:
            self.selectors = []
        else:
            raise ValueError(f"unknown rule '{rule}'")

    def _password(self, add: bool, h: str) -> None:
        if add:
            self.nopass = False
            if h not in self.hashes:
                self.hashes.append(h)
        elif h in self.hashes:
            self.hashes.remove(h)

    def _key(self, rule: str) -> None:
        perms, _, pattern = rule.partition("~")
        flags = perms[1:].upper() if perms else "RW"
        if perms and (perms[:1] != "%" or not flags or set(flags) - {"R", "W"}):
            raise ValueError(f"'{rule}': key permissions are ~pattern, %R~pattern, %W~pattern or %RW~pattern")
        bits = (R if "R" in flags else 0) | (W if "W" in flags else 0)
        text = ("~" if bits == R | W else f"%{flags}~") + pattern
        self.keys.append((bits, glob(pattern.encode()), text))

    def command_rules(self) -> list[str]:
        """The command rules as ACL LIST shows them: from +@all or -@all on."""
        cmds = []
        for allow, kind, what in self.commands:
            sign = "+" if allow else "-"
            if kind == "all":
                cmds = [f"{sign}@all"]  # the later rules start over from here
            elif kind == "cat":
                cmds.append(sign + what)
            else:
                cmds.append(sign + (what.decode() if kind == "cmd" else b"|".join(what).decode()))
        return cmds if cmds and cmds[0] in ("+@all", "-@all") else ["-@all", *cmds]

    def db_rule(self) -> str | None:
        """The databases as ACL LIST shows them (None: every database, shown by nothing)."""
        if self.dbs is None:
            return None
        return "db=" + ",".join(str(d) for d in sorted(self.dbs)) if self.dbs else "resetdbs"

    def describe(self) -> str:
        """The rules as ACL LIST shows them (passwords as their hashes)."""
        parts = ["on" if self.enabled else "off"]
        parts += ["nopass"] if self.nopass else [f"#{h}" for h in self.hashes]
        parts += [k[2] for k in self.keys]
        parts += ["&*"] if self.channels is None else ["resetchannels", *self.channel_text]
        if self.dbs is not None:
            parts.append(self.db_rule())
        parts += self.command_rules()
        if self.rate:
            parts.append(f"rate={self.rate:g}")
        parts += [f"({' '.join(sel.describe().split()[1:])})" for sel in self.selectors or ()]
        return " ".join(parts)


def split(line: str) -> list[str]:
    """A user's line as its words, a selector's words joined again: 'a on (~s:* +set) +get' ->
    ['a', 'on', '(~s:* +set)', '+get'] (ValueError on an unmatched parenthesis, as the server)."""
    out, group = [], None
    for word in str(line).split():
        if group is None and word[:1] == "(":
            group = []
        if group is None:
            out.append(word)
            continue
        group.append(word)
        if word[-1:] == ")":
            out.append(" ".join(group))
            group = None
    if group is not None:
        raise ValueError(f"unmatched parenthesis in the selector starting at '{' '.join(group)}'")
    return out


def parse(line: str, cls: type = Rules):
    """'alice on >secret ~app:* +@read' -> cls (Rules or a subclass) with the rules applied in order
    (ValueError naming the bad rule)."""
    words = split(line)
    if not words:
        raise ValueError("an empty user")
    user = cls(words[0])
    for rule in words[1:]:
        user.apply(rule)
    return user


def normalize(lines: list) -> list:
    """The `users` setting as kept: each line checked, its clear-text passwords (>pw, <pw) replaced by
    their hashes (#hash, !hash), so that no clear-text password stays in the settings."""
    out, names = [], set()
    for line in lines:
        words = str(line).split()
        try:
            parse(line)
        except ValueError as e:
            raise ValueError(f"user '{words[0] if words else ''}': {e}") from None
        if words[0] in names:
            raise ValueError(f"user '{words[0]}' is defined twice")
        if words[0] == FLEET_USER:
            raise ValueError(f"'{FLEET_USER}' is the name the fleet's nodes ask each other as (fleet_password)")
        names.add(words[0])
        out.append(" ".join([words[0]] + [_hashed(w) for w in words[1:]]))
    return out


def _hashed(rule: str) -> str:
    if rule[:1] == ">":
        return "#" + sha256(rule[1:].encode())
    if rule[:1] == "<":
        return "!" + sha256(rule[1:].encode())
    return rule
