"""The audit record's JSON line: one definition of the format, for the writer process (auditwriter.py).

    a batch (packed: Batch, REC; or one flat list, STRIDE fields a record: FIELDS) -> Formatter.packed
    (.lines) -> one JSON line per record, as bytes

This pure-Python Formatter is the reference and the fallback; vproxy/_auditfmt.pyx is its compiled
twin (picked through twins.py, as the other twins are), which writes the same bytes straight into
one buffer. tests/test_auditfmt.py holds them to byte-identical output. The parts of a line that
the records of one read share (the client, the command, the backend) are formatted by the
functions below once for them all, by both. Only the standard library: the writer process imports
this module.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from json.encoder import encode_basestring as js
from time import gmtime, strftime

from . import hostport
from .twins import twin

# A record's fields (audit.py hands them over packed: Batch below; Formatter.lines also takes them
# one after the other in one flat list, STRIDE a record), in this order: the ones noted as
# the request is sent, then the ones its reply completes. who = (client id, address, client name,
# lib name, lib version, user or None, db); keys a list, or one key's bytes (no list to make for the
# commands of one key); start and end are epoch seconds; outcome an OUTCOMES index.
FIELDS = ("start", "who", "name", "subcommand", "keys", "argc", "size", "target", "values", "end", "outcome", "error")
STRIDE = len(FIELDS)
OUTCOMES = ("ok", "error", "refused", "sent")  # a record's outcome (audit.OK, ERROR, REFUSED, SENT)
CACHE_MAX = 10000  # entries of each part cache (client, command, backend); names are the clients': bounded

# The packed hand-over (what audit.py sends: Batch.frame()): (n, pack, objs), n records. Per record,
# in `pack`: REC (start and end in epoch seconds as doubles, size, argc, outcome, flags), then with
# KEY the record's one key inline (KLEN, its bytes). Its objects, in `objs`, in this order: with CTX
# who, name, subcommand, target (what the records of a read share: written when they change, else
# the previous record's); without KEY its keys (a list); with VALUES its values; with ERR its error
# code. A one-key SET from the same client as the record before is thus no object at all.
REC = struct.Struct("<ddQQBB")
KLEN = struct.Struct("<I")
CTX, KEY, VALUES, ERR = 1, 2, 4, 8


class Batch:
    """Records packed for the writer (the format above); the pure-Python reference of the compiled
    one in vproxy/_audit.pyx (tests/test_auditfmt.py: both make the same frames)."""

    __slots__ = ("count", "last", "objs", "pack")

    def __init__(self):
        self.pack = bytearray()
        self.objs: list = []
        self.count = 0
        self.last = (self, None, None, None)  # the context of the last record: who, name, sub, target

    def add(self, start, who, name, sub, keys, argc, size, target, values, end, outcome, err) -> None:
        """One record (its FIELDS)."""
        objs = self.objs
        flags = 0
        last = self.last
        if who is not last[0] or name is not last[1] or sub is not last[2] or target is not last[3]:
            flags = CTX
            self.last = (who, name, sub, target)
            objs += (who, name, sub, target)
        one = type(keys) is bytes
        if one:
            flags |= KEY
        else:
            objs.append(keys)
        if values is not None:
            flags |= VALUES
            objs.append(values)
        if err:
            flags |= ERR
            objs.append(err)
        pack = self.pack
        pack += REC.pack(start, end, size, argc, outcome, flags)
        if one:
            pack += KLEN.pack(len(keys))
            pack += keys
        self.count += 1

    def add_flat(self, flat: list) -> None:
        """Records given as one flat list (STRIDE fields a record)."""
        add = self.add
        for i in range(0, len(flat), STRIDE):
            add(*flat[i:i + STRIDE])

    def frame(self) -> tuple:
        """What goes to the writer (marshalled): (n, pack, objs)."""
        return (self.count, bytes(self.pack), self.objs)

    def take(self) -> tuple:
        """frame(), and the batch empty again."""
        out = self.frame()
        self.__init__()
        return out


def unpack(n: int, pack, objs: list) -> list:
    """A packed batch -> the flat list of its records' FIELDS (Formatter.packed's reference)."""
    out = []
    pos = oi = 0
    who = name = sub = target = None
    rec, klen = REC.unpack_from, KLEN.unpack_from
    for _ in range(n):
        if pos + REC.size > len(pack):
            raise ValueError("a packed batch ends within a record")
        start, end, size, argc, outcome, flags = rec(pack, pos)
        pos += REC.size
        if oi + (4 if flags & CTX else 0) + (not flags & KEY) + (flags & VALUES > 0) + (flags & ERR > 0) > len(objs):
            raise ValueError("a packed batch has fewer objects than its records")
        if flags & CTX:
            who, name, sub, target = objs[oi:oi + 4]
            oi += 4
        if flags & KEY:
            (k,) = klen(pack, pos) if pos + KLEN.size <= len(pack) else (len(pack),)
            pos += KLEN.size
            if pos + k > len(pack):
                raise ValueError("a packed batch ends within a record")
            keys = bytes(pack[pos:pos + k])
            pos += k
        else:
            keys = objs[oi]
            oi += 1
        values = err = None
        if flags & VALUES:
            values = objs[oi]
            oi += 1
        if flags & ERR:
            err = objs[oi]
            oi += 1
        out += (start, who, name, sub, keys, argc, size, target, values, end, outcome, err)
    if pos != len(pack) or oi != len(objs):
        raise ValueError(f"a packed batch of {n} records does not end where its records do")
    return out


KEY_MAX = 1024  # bytes of a key a record keeps: a longer one is cut (cut_key), its length noted


def cut_key(key: bytes) -> bytes:
    """A key as records hold it: up to KEY_MAX bytes as is, a longer one cut to KEY_MAX bytes and
    "...(+N bytes)" (a key may be 512 MB: the records, the pipe and the writer stay small). Hashed
    keys (audit_hash_keys) are the hash of this form; `vproxy audit --key` cuts the same way."""
    return key if len(key) <= KEY_MAX else key[:KEY_MAX] + b"...(+%d bytes)" % (len(key) - KEY_MAX)


def cut_keys(keys: list) -> list:
    """A request's keys list with each one cut_key'd (the same list when none is longer than KEY_MAX)."""
    for k in keys:
        if len(k) > KEY_MAX:
            return [cut_key(k) for k in keys]
    return keys


def key_hash(secret: bytes, key: bytes) -> str:
    """The keyed hash written instead of a key (audit_hash_keys): HMAC-SHA256, 16 hex digits."""
    return hmac.new(secret, key, hashlib.sha256).hexdigest()[:16]


def text(b) -> str:
    """A client's bytes as text: invalid UTF-8 as \\xNN escapes (the JSON then escapes the backslash)."""
    return b.decode("utf-8", "backslashreplace") if isinstance(b, bytes) else str(b)


def day_text(sec: int) -> str:
    """A record's time to the second (the microseconds follow)."""
    return strftime("%Y-%m-%dT%H:%M:%S", gmtime(sec))


def who_part(who: tuple, node: str, default_user: str) -> str:
    """The line's fields from node to db: who = (client id, address, name, lib, version, user, db)."""
    cid, addr, cname, lib, ver, user, db = who
    return (f'"node":{js(node)},"client_id":{cid},"client_addr":{js(hostport.show(addr))},'
            f'"client_name":{js(text(cname))},"lib_name":{js(text(lib))},"lib_ver":{js(text(ver))},'
            f'"user":{js(text(user) if user is not None else default_user)},"db":{db}')


def sub_part(sub) -> str:
    return js(text(sub)) if sub else "null"


def value_part(v) -> str:
    """A key or an argument as a JSON string."""
    return js(text(v))


class Formatter:
    """Records -> JSON lines, the fields always in this order:

        {"ts", node .. db (who_part), "command", "subcommand", "keys", "argc", "bytes", "backend",
         "latency_us", "outcome", "error"[, "keys_hashed"][, "args"]}

    The reference of vproxy/_auditfmt.pyx: change both together (tests/test_auditfmt.py)."""

    def __init__(self, node: str, default_user: str, secret: bytes | None):
        self.node, self.default_user, self.secret = node, default_user, secret
        self._day = (None, "")  # (second, its text): records come in time order
        self._last = (None, None, None, None, None)  # the last record's (who, name, target, sub, parts)
        self._who: dict = {}
        self._names: dict = {}
        self._addrs: dict = {}

    def line(self, r) -> bytes:
        """One record (its STRIDE fields)."""
        return self.lines(list(r))

    def packed(self, n: int, pack, objs: list) -> bytes:
        """A packed batch (Batch.frame(): REC ...): the same lines as lines() of its fields."""
        return self.lines(unpack(n, pack, objs))

    def lines(self, flat: list) -> bytes:
        """A batch: STRIDE fields a record, one after the other (FIELDS)."""
        if len(flat) % STRIDE:
            raise ValueError(f"a batch has {STRIDE} fields a record: {len(flat)} is not a multiple")
        out = []
        add = out.append
        secret = self.secret
        day_sec, day = self._day
        last = self._last
        mid = last[4]
        for i in range(0, len(flat), STRIDE):
            start, who, name, sub, keys, argc, size, target, values, end, outcome, err = flat[i:i + STRIDE]
            sec = int(start)
            if day_sec != sec:
                day_sec, day = sec, day_text(sec)
            if who is not last[0] or name is not last[1] or target is not last[2] or sub is not last[3]:
                mid = self._mid(who, name, target, sub)
                last = (who, name, target, sub, mid)
            if type(keys) is bytes:  # one key (audit.keys_in)
                keys = (keys,)
            if secret is not None:
                ks = ",".join(f'"{key_hash(secret, k)}"' for k in keys)
            elif len(keys) == 1:
                ks = value_part(keys[0])
            else:
                ks = ",".join(map(value_part, keys))
            us = int((end - start) * 1e6)
            line = (f'{{"ts":"{day}.{int((start - sec) * 1e6):06d}Z",{mid[0]}"keys":[{ks}],"argc":{argc},'
                    f'"bytes":{size},{mid[1]}"latency_us":{us if us > 0 else 0},"outcome":"{OUTCOMES[outcome]}",'
                    f'"error":{js(err) if err else "null"}')
            if secret is not None:
                line += ',"keys_hashed":true'
            if values is not None:
                line += ',"args":[' + ",".join(map(value_part, values)) + "]"
            add(line + "}\n")
        self._day, self._last = (day_sec, day), last
        return "".join(out).encode()

    def _mid(self, who, name, target, sub) -> tuple:
        """The parts of a line from the client's fields to the subcommand, and the backend's."""
        w = self._who.get(who)
        if w is None:
            if len(self._who) > CACHE_MAX:
                self._who.clear()
            w = self._who[who] = who_part(who, self.node, self.default_user)
        cmd = self._names.get(name)
        if cmd is None:
            if len(self._names) > CACHE_MAX:
                self._names.clear()
            cmd = self._names[name] = value_part(name)
        backend = self._addrs.get(target)
        if backend is None:
            if len(self._addrs) > CACHE_MAX:
                self._addrs.clear()
            backend = self._addrs[target] = js(hostport.show(target))
        return f'{w},"command":{cmd},"subcommand":{sub_part(sub)},', f'"backend":{backend},'


# ---- the compiled twin (vproxy/_auditfmt.pyx) when it is built: same interface, one buffer ----
PureFormatter = Formatter
_twin = twin("_auditfmt")
IMPL = "pure" if _twin is None else "compiled"
if _twin is not None:
    Formatter = _twin.Formatter
