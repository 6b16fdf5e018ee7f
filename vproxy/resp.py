"""RESP2/RESP3 wire format: request parsing, exact reply framing, encoders for replies vproxy makes.

    client bytes --RequestParser--> [(args, raw)]       raw is forwarded as is
    backend bytes --ReplyFramer--> [frame bytes]        each frame is one whole reply, byte for byte
    frame --decode()--> Python value (hiredis)          only when vproxy must read a reply

Why not hiredis for the framing: hiredis gives values, not byte boundaries (`+OK` and `$2 OK`
decode alike, RESP3 attributes become separate replies), so forwarding its values would not be
byte-exact. The framers below are resumable scanners (no rescan when a big reply arrives in pieces)
with the common shapes (`+`, `-`, `:`, `$`) handled in one or two `find` calls.

The parser and framer here are the reference; vproxy/_resp.pyx is their compiled twin, picked at
the end of this module unless VPROXY_PURE=1 (IMPL says which runs).
"""

from __future__ import annotations

import re

import hiredis

from .errors import ProtocolError
from .twins import twin

CRLF = b"\r\n"
_STAR, _DOLLAR = 42, 36
# Reply type bytes, by how their length is known.
_LINE_TYPES = frozenset(b"+-:_,#(")  # one line
_BULK_TYPES = frozenset(b"$=!")  # length-prefixed payload
_AGG_TYPES = frozenset(b"*~>")  # n elements
_PAIR_TYPES = frozenset(b"%")  # n key/value pairs
_ATTR = ord("|")  # n pairs of attributes, then the reply they describe
MAX_LINE = 64 * 1024  # inline request or header line without CRLF (Redis: PROTO_INLINE_MAX_SIZE)
INT_MAX = 2**31 - 1  # most arguments a `*` header may announce (the server: INT_MAX)
# What an argument of a request in progress costs besides its bytes, counted against max_buffer (the
# query buffer limit): a bytes object's header (33, rounded up by the allocator) and its list slot. A
# `*2147483647` request of 1-byte arguments otherwise held ~8 times the limit in objects.
ARG_COST = 56
LLONG_MIN, LLONG_MAX, ULLONG_MAX = -(2**63), 2**63 - 1, 2**64 - 1
_STRTOULL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)")  # what strtoull(s, &end, 10) reads whole
# Before AUTH the server refuses bigger headers (its defence against unauthenticated memory use).
UNAUTH_MAX_ARGS, UNAUTH_MAX_BULK = 10, 16384


def string2ll(s: bytes) -> int | None:
    """The integer s spells exactly as the server's string2ll() reads it, else None.

    Optional '-', then digits with no leading zero ("0" alone is fine, "-0" is not), fitting a
    long long: no '+', no spaces, no '_' (all of which Python's int() accepts). Every number vproxy
    reads from a client goes through here, so it refuses exactly what the server refuses."""
    digits = s[1:] if s[:1] == b"-" else s
    if not digits.isdigit() or len(digits) > 19 or (digits[0] == 48 and (len(digits) > 1 or digits is not s)):
        return None
    n = int(digits)
    if digits is not s:
        n = -n
    return n if LLONG_MIN <= n <= LLONG_MAX else None


def string2ull(s: bytes) -> int | None:
    """An unsigned 64-bit number as Valkey's string2ull() reads it (SCAN cursors), else None.

    string2ll first, negatives refused; failing that, strtoull(): leading blanks, a sign, zeros
    are fine, and "-N" wraps around 2**64 as C does."""
    n = string2ll(s)
    if n is not None:
        return n if n >= 0 else None
    m = _STRTOULL.fullmatch(s)
    if m is None:
        return None
    n = int(m.group(2))
    if n > ULLONG_MAX:
        return None
    return (-n) % (ULLONG_MAX + 1) if m.group(1) == b"-" else n


class RequestParser:
    """Splits a client byte stream into requests: multibulk (`*`) or inline (telnet style).

    It refuses what Valkey 9 refuses, with the same message (Redis 7 is laxer about CRLF; nothing
    either server refuses may reach a shared backend connection, where it would close the
    connection under other clients' requests). `auth_required`: the session is not authenticated,
    so headers are capped as the server caps them."""

    __slots__ = ("buf", "pos", "nargs", "args", "need", "max_bulk", "max_args", "max_buffer", "auth_required")

    def __init__(self, max_bulk: int = 512 * 1024 * 1024, max_args: int = INT_MAX,
                 max_buffer: int = 1024 * 1024 * 1024):
        self.buf = bytearray()
        self.pos = 0  # scan position inside the request being parsed
        self.nargs = -1  # arguments announced by the current `*` header, -1 between requests
        self.args: list[bytes] = []
        self.need = 0  # bytes needed before a rescan can make progress
        self.max_bulk, self.max_args, self.max_buffer = max_bulk, max_args, max_buffer
        self.auth_required = False

    def feed(self, data: bytes) -> list[tuple[list[bytes], bytes]]:
        """Add bytes; return the requests now complete. Raises ProtocolError(msg, done) on bad input."""
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return []
            # Scan an immutable copy: slices of bytes are the bytes we hand out, no second copy.
            # Mid-request, only the part not scanned yet is copied (a big request arriving in
            # pieces is never copied again and again).
            base = self.pos if self.nargs >= 0 else 0
            chunk = bytes(buf) if not base else bytes(buf[base:])
        else:  # the common case: nothing left over, scan the received bytes themselves
            base = 0
            chunk = data if type(data) is bytes else bytes(data)
        out: list[tuple[list[bytes], bytes]] = []
        try:
            self._parse(chunk, base, out)
        except ProtocolError as e:
            e.requests = out  # requests before the bad one still run, as in Redis
            raise
        if len(self.buf) + len(self.args) * ARG_COST > self.max_buffer:
            e = ProtocolError("client query buffer limit reached")
            e.requests = out
            raise e
        return out

    def _parse(self, data: bytes, base: int, out: list) -> None:
        """Scan data (bytes from buf offset `base`, or the received bytes when buf was empty).

        Positions below are offsets in data; `start` is where the unconsumed bytes begin: the
        request being parsed, which may lie before data (-base: it began in an earlier feed).
        A header line is read as the server reads it: up to the first CR, which must be followed
        by LF; the line is complete only once the byte after the CR is in."""
        buf, nargs, args = self.buf, self.nargs, self.args
        size = len(data)
        find = data.find
        max_bulk = self.max_bulk
        auth = self.auth_required
        need = 0
        if nargs >= 0:
            start, pos = -base, 0
        else:
            start = pos = 0
        while True:
            if nargs < 0:
                start = pos
                if pos >= size:
                    break
                if data[pos] != _STAR:  # (base is 0 here: data holds every unconsumed byte)
                    done = len(out)
                    end = self._inline(data, pos, out)
                    need = self.need
                    if end < 0:
                        break
                    pos = end
                    if auth and len(out) > done and _is_auth(out):
                        auth = False  # (see _is_auth)
                    continue
                if pos + 3 < size and data[pos + 2] == 13 and data[pos + 3] == 10 \
                        and 0 <= (n := data[pos + 1] - 48) <= 9:
                    pos += 4  # `*N\r\n` with one digit, the common case: no find, no int()
                else:
                    cr = find(b"\r", pos)
                    if cr < 0 or cr + 1 >= size:
                        if cr < 0 and size - pos > MAX_LINE:
                            raise ProtocolError("too big mbulk count string")
                        need = size + base + 1
                        break
                    n = _count(data, pos, cr, self.max_args, auth)
                    pos = cr + 2
                if n <= 0:  # `*0` and `*-1` are ignored, as Redis does
                    continue
                nargs, args = n, []
            left = nargs - len(args)
            while left:
                # `$N\r\n` with one or two digits, the common case: no find, no int()
                if pos + 3 < size and data[pos] == _DOLLAR and data[pos + 2] == 13 and data[pos + 3] == 10 \
                        and 0 <= (n := data[pos + 1] - 48) <= 9:
                    nl = pos + 4
                elif (pos + 4 < size and data[pos] == _DOLLAR and data[pos + 3] == 13 and data[pos + 4] == 10
                      and 1 <= (n := data[pos + 1] - 48) <= 9 and 0 <= (d := data[pos + 2] - 48) <= 9):
                    n = n * 10 + d
                    nl = pos + 5
                else:
                    cr = find(b"\r", pos)
                    if cr < 0 or cr + 1 >= size:
                        if cr < 0 and size - pos > MAX_LINE:
                            raise ProtocolError("too big bulk count string")
                        need = max(need, size + base + 1)
                        break
                    n = _bulk_len(data, pos, cr, max_bulk, auth)
                    nl = cr + 2
                end = nl + n
                if end + 2 > size:
                    need = end + 2 + base
                    break
                if data[end] != 13 or data[end + 1] != 10:
                    raise ProtocolError("invalid CRLF in request")
                args.append(data[nl:end])
                pos = end + 2
                left -= 1
            if left:
                break
            out.append((args, data[start:pos] if start >= 0 else bytes(buf[:pos + base])))
            nargs, args, need = -1, [], 0
            if auth and _is_auth(out):
                auth = False
        consumed = _keep_tail(buf, data, start + base, size)  # the request in progress stays
        self.nargs, self.args = nargs, args
        self.pos = pos + base - consumed if nargs >= 0 else 0
        self.need = max(0, need - consumed)

    def _inline(self, data: bytes, start: int, out: list) -> int:
        """One inline (telnet style) request at start; its end offset, or -1 if incomplete.

        The server looks for the LF with strchr(), which stops at a NUL byte: a NUL before the LF
        leaves the line incomplete (until the 64KB limit), so it does here too."""
        nl = data.find(b"\n", start)
        if nl < 0 or data.find(b"\0", start, nl) >= 0:
            if len(data) - start > MAX_LINE:
                raise ProtocolError("too big inline request")
            self.need = len(data) + 1
            return -1
        self.need = 0
        end = nl - 1 if nl > start and data[nl - 1] == 13 else nl
        args = split_inline(data[start:end])
        if args:
            out.append((args, encode_request(args)))
        return nl + 1


def _count(data: bytes, pos: int, cr: int, max_args: int, auth: bool) -> int:
    """The argument count of the `*` header at pos whose line ends at cr (the server's checks, in order)."""
    if data[cr + 1] != 10:
        raise ProtocolError("invalid CRLF in request")
    n = string2ll(data[pos + 1:cr])
    if n is None or n > max_args:
        raise ProtocolError("invalid multibulk length")
    if n > UNAUTH_MAX_ARGS and auth:
        raise ProtocolError("unauthenticated multibulk length")
    return n


def _bulk_len(data: bytes, pos: int, cr: int, max_bulk: int, auth: bool) -> int:
    """The length of the `$` header at pos whose line ends at cr (the server's checks, in order)."""
    if data[pos] != _DOLLAR:
        # the byte as is, even a NUL or a non-ASCII one (error() keeps it: surrogateescape)
        got = bytes(data[pos:pos + 1]).decode("utf-8", "surrogateescape")
        raise ProtocolError(f"expected '$', got '{got}'")
    if data[cr + 1] != 10:
        raise ProtocolError("invalid CRLF in request")
    n = string2ll(data[pos + 1:cr])
    if n is None or n < 0 or n > max_bulk:
        raise ProtocolError("invalid bulk length")
    if n > UNAUTH_MAX_BULK and auth:
        raise ProtocolError("unauthenticated bulk length")
    return n


def _is_auth(out: list) -> bool:
    """The request just parsed may authenticate (AUTH, HELLO ... AUTH).

    The server checks the caps before each request, knowing whether the previous AUTH worked;
    this parser reads a whole pipeline before any of it runs, so it assumes the AUTH will work
    and lifts the caps for the rest of the bytes at hand (the session sets auth_required again
    when it did not: later requests are then refused with NOAUTH, not with a protocol error)."""
    name = out[-1][0][0].lower()
    return name == b"auth" or name == b"hello"


_ESCAPES = {110: 10, 114: 13, 116: 9, 98: 8, 97: 7}  # \n \r \t \b \a, as sdssplitargs
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _keep_tail(buf: bytearray, data, consumed: int, size: int) -> int:
    """Keep only the unconsumed bytes in buf (which is empty when `data` was scanned in place)."""
    if buf:
        if consumed:
            del buf[:consumed]  # O(1): CPython moves the bytearray's start offset
    elif consumed < size:
        buf += data[consumed:] if consumed else data
    return consumed


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command like Redis's sdssplitargs: spaces separate, quotes group."""
    if b'"' not in line and b"'" not in line:
        return line.split()
    args, cur, quote, i, started = [], bytearray(), 0, 0, False
    while i < len(line):
        c = line[i]
        if quote:
            if c == 92 and quote == 34 and i + 1 < len(line):  # backslash escape in "..."
                if line[i + 1] == 120 and all(h in _HEX for h in line[i + 2:i + 4]) and i + 3 < len(line):
                    cur.append(int(line[i + 2:i + 4], 16))  # \xHH
                    i += 3
                else:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
            elif c == 92 and quote == 39 and line[i + 1:i + 2] == b"'":  # \' in '...'
                i += 1
                cur.append(39)
            elif c == quote:
                quote = 0
            else:
                cur.append(c)
        elif c in (34, 39):
            quote, started = c, True
        elif c in b" \t":
            if started:
                args.append(bytes(cur))
                cur, started = bytearray(), False
        else:
            cur.append(c)
            started = True
        i += 1
    if quote:
        raise ProtocolError("unbalanced quotes in request")
    if started:
        args.append(bytes(cur))
    return args


class ReplyFramer:
    """Cuts a backend byte stream into whole replies, byte for byte, resuming where it stopped."""

    __slots__ = ("buf", "pos", "start", "stack", "need")

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0  # next byte to scan
        self.start = 0  # first byte of the reply being scanned
        self.stack: list[int] = []  # elements still due in each open aggregate
        self.need = 0

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return []
            # Scan an immutable copy of what is not scanned yet (a big reply arriving in pieces
            # is not copied again and again): frames are then plain slices, one copy each.
            base = self.pos
            chunk = bytes(buf) if not base else bytes(buf[base:])
        else:  # the common case: nothing left over, scan the received bytes themselves
            base = 0
            chunk = data if type(data) is bytes else bytes(data)
        frames: list[bytes] = []
        self._scan(chunk, base, frames)
        return frames

    def _scan(self, data: bytes, base: int, frames: list) -> None:
        """Scan data (bytes from buf offset `base`, or the received bytes when buf was empty).

        Positions are offsets in data; `start`, the first byte of the reply being scanned, is
        -base when that reply began in an earlier feed (its bytes are then in buf)."""
        buf, stack = self.buf, self.stack
        size = len(data)
        find = data.find
        start = self.start - base
        pos = 0
        need = 0
        while pos < size:
            t = data[pos]
            if t in _LINE_TYPES:
                nl = find(CRLF, pos)
                if nl < 0:
                    break
                pos = nl + 2
            elif t in _BULK_TYPES:
                # `$N\r\n` with one or two digits, the common case: no find, no int()
                if pos + 3 < size and data[pos + 2] == 13 and data[pos + 3] == 10 \
                        and 0 <= (n := data[pos + 1] - 48) <= 9:
                    end = pos + 6 + n
                elif pos + 4 < size and data[pos + 3] == 13 and data[pos + 4] == 10 \
                        and 0 <= (n := data[pos + 1] - 48) <= 9 and 0 <= (d := data[pos + 2] - 48) <= 9:
                    end = pos + 7 + n * 10 + d
                else:
                    nl = find(CRLF, pos)
                    if nl < 0:
                        break
                    n = _header_number(data, pos, nl)
                    end = nl + 2 if n < 0 else nl + 4 + n
                if end > size:
                    need = end + base
                    break
                pos = end
            else:
                nl = find(CRLF, pos)
                if nl < 0:
                    break
                n = _aggregate_len(t, data, pos, nl)
                pos = nl + 2
                if n > 0:
                    stack.append(n)
                    continue
            # one element is complete: close every aggregate it completes
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            if not stack:
                frames.append(data[start:pos] if start >= 0 else bytes(buf[:pos + base]))
                start = pos
        consumed = _keep_tail(buf, data, start + base, size)  # the reply in progress stays
        self.start = 0
        self.pos = pos + base - consumed
        self.need = need - consumed if need else 0


def _header_number(data: bytes, pos: int, nl: int) -> int:
    """The length or count in the backend's header line at pos (the server writes canonical numbers)."""
    n = string2ll(data[pos + 1:nl])
    if n is None:
        raise ProtocolError(f"bad reply header from backend: {bytes(data[pos:nl])[:40]!r}")
    return n


def _aggregate_len(t: int, data: bytes, pos: int, nl: int) -> int:
    """Elements an aggregate header announces (pairs count twice; an attribute adds its reply)."""
    if t not in _AGG_TYPES and t not in _PAIR_TYPES and t != _ATTR:
        raise ProtocolError(f"unknown reply type byte {chr(t)!r} from backend")
    n = _header_number(data, pos, nl)
    if t in _AGG_TYPES:
        return n
    if t in _PAIR_TYPES:
        return 2 * n
    return 2 * n + 1  # an attribute: its pairs, then the reply it describes


def decode(frame: bytes):
    """One framed reply as a Python value (errors come back as hiredis.ReplyError instances)."""
    reader = hiredis.Reader()
    reader.feed(frame)
    return reader.gets()


# ---- encoders for requests and for replies vproxy makes itself ----

def encode_request(args) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, (bytes, bytearray)):
            a = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def error(msg: str) -> bytes:
    # surrogateescape: a message may carry a client's raw byte (ProtocolError "expected '$', got ...")
    return b"-" + msg.replace("\r", " ").replace("\n", " ").encode("utf-8", "surrogateescape") + CRLF


def simple(s: str) -> bytes:
    return b"+" + s.encode() + CRLF


OK = b"+OK\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(b) -> bytes:
    if isinstance(b, str):
        b = b.encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def null(proto: int) -> bytes:
    return b"_\r\n" if proto == 3 else b"$-1\r\n"


def verbatim(text: str, proto: int) -> bytes:
    """A text blob: a verbatim string in RESP3, a bulk string in RESP2 (as INFO and CLIENT LIST)."""
    data = text.encode()
    if proto == 3:
        return b"=%d\r\ntxt:%s\r\n" % (len(data) + 4, data)
    return bulk(data)


def value(v, proto: int) -> bytes:
    """Encode a Python value: dict -> map (RESP3) or flat array (RESP2), list -> array, None -> null."""
    if v is None:
        return null(proto)
    if isinstance(v, bool):
        return (b"#t\r\n" if v else b"#f\r\n") if proto == 3 else integer(int(v))
    if isinstance(v, int):
        return integer(v)
    if isinstance(v, float):  # RESP3 double; RESP2: its text, as the server sends ZSCORE
        text = repr(v).encode()
        return b",%s\r\n" % text if proto == 3 else bulk(text)
    if isinstance(v, (bytes, str)):
        return bulk(v)
    if isinstance(v, dict):
        head = b"%%%d\r\n" % len(v) if proto == 3 else b"*%d\r\n" % (2 * len(v))
        return head + b"".join(value(k, proto) + value(x, proto) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return b"*%d\r\n" % len(v) + b"".join(value(x, proto) for x in v)
    if isinstance(v, hiredis.ReplyError):
        return error(str(v))
    raise TypeError(f"cannot encode {type(v).__name__}")


# ---- the compiled twin (vproxy/_resp.pyx): chosen here, at import, unless VPROXY_PURE=1 ----
# As redis-py picks hiredis when it is there: same interface, same answers (tests/test_resp.py
# runs both), less CPU per request. The pure classes above stay the reference and the fallback.

PureRequestParser, PureReplyFramer = RequestParser, ReplyFramer
_twin = twin("_resp")
IMPL = "pure" if _twin is None else "compiled"
if _twin is not None:
    RequestParser, ReplyFramer = _twin.RequestParser, _twin.ReplyFramer
