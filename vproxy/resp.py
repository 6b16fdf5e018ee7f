"""RESP2/RESP3 wire format: request parsing, exact reply framing, encoders for replies vproxy makes.

    client bytes --RequestParser--> [(args, raw)]       raw is forwarded as is
    backend bytes --ReplyFramer--> [frame bytes]        each frame is one whole reply, byte for byte
    frame --decode()--> Python value (hiredis)          only when vproxy must read a reply

Why not hiredis for the framing: hiredis gives values, not byte boundaries (`+OK` and `$2 OK`
decode alike, RESP3 attributes become separate replies), so forwarding its values would not be
byte-exact. The framers below are resumable scanners (no rescan when a big reply arrives in pieces)
with the common shapes (`+`, `-`, `:`, `$`) handled in one or two `find` calls.
"""

from __future__ import annotations

import hiredis

from .errors import ProtocolError

CRLF = b"\r\n"
_STAR, _DOLLAR = 42, 36
# Reply type bytes, by how their length is known.
_LINE_TYPES = frozenset(b"+-:_,#(")  # one line
_BULK_TYPES = frozenset(b"$=!")  # length-prefixed payload
_AGG_TYPES = frozenset(b"*~>")  # n elements
_PAIR_TYPES = frozenset(b"%")  # n key/value pairs
_ATTR = ord("|")  # n pairs of attributes, then the reply they describe
MAX_LINE = 64 * 1024  # inline request or header line without CRLF (Redis: PROTO_INLINE_MAX_SIZE)


class RequestParser:
    """Splits a client byte stream into requests: multibulk (`*`) or inline (telnet style)."""

    __slots__ = ("buf", "pos", "nargs", "args", "need", "max_bulk", "max_args", "max_buffer")

    def __init__(self, max_bulk: int = 512 * 1024 * 1024, max_args: int = 1024 * 1024 * 1024,
                 max_buffer: int = 1024 * 1024 * 1024):
        self.buf = bytearray()
        self.pos = 0  # scan position inside the request being parsed
        self.nargs = -1  # arguments announced by the current `*` header, -1 between requests
        self.args: list[bytes] = []
        self.need = 0  # bytes needed before a rescan can make progress
        self.max_bulk, self.max_args, self.max_buffer = max_bulk, max_args, max_buffer

    def feed(self, data: bytes) -> list[tuple[list[bytes], bytes]]:
        """Add bytes; return the requests now complete. Raises ProtocolError(msg, done) on bad input."""
        buf = self.buf
        buf += data
        if len(buf) < self.need:
            return []
        out: list[tuple[list[bytes], bytes]] = []
        try:
            self._parse(out)
        except ProtocolError as e:
            e.requests = out  # requests before the bad one still run, as in Redis
            raise
        if len(buf) > self.max_buffer:
            e = ProtocolError("client query buffer limit reached")
            e.requests = out
            raise e
        return out

    def _parse(self, out: list) -> None:
        buf = self.buf
        start = 0
        while start < len(buf):
            if self.nargs < 0:
                if buf[start] != _STAR:
                    end = self._inline(start, out)
                    if end < 0:
                        break
                    start = end
                    continue
                nl = buf.find(CRLF, start)
                if nl < 0:
                    if len(buf) - start > MAX_LINE:
                        raise ProtocolError("too big mbulk count string")
                    break
                n = _header_int(buf, start + 1, nl, "invalid multibulk length")
                if n > self.max_args:
                    raise ProtocolError("invalid multibulk length")
                if n <= 0:  # `*0` and `*-1` are ignored, as Redis does
                    start = nl + 2
                    continue
                self.nargs, self.pos, self.args = n, nl + 2, []
            end = self._bulk_args(start)
            if end < 0:
                break
            out.append((self.args, bytes(buf[start:end])))
            self.nargs, self.args = -1, []
            start = end
        if start:
            del buf[:start]  # O(1): CPython moves the bytearray's start offset
            self.need = max(0, self.need - start)
            if self.nargs >= 0:
                self.pos -= start

    def _bulk_args(self, start: int) -> int:
        """Read the current request's bulk arguments; its end offset, or -1 if incomplete."""
        buf, pos, args, nargs = self.buf, self.pos, self.args, self.nargs
        size = len(buf)
        while len(args) < nargs:
            if pos >= size:
                break
            if buf[pos] != _DOLLAR:
                raise ProtocolError(f"expected '$', got '{chr(buf[pos])}'")
            nl = buf.find(CRLF, pos)
            if nl < 0:
                if size - pos > MAX_LINE:
                    raise ProtocolError("too big bulk count string")
                break
            n = _header_int(buf, pos + 1, nl, "invalid bulk length")
            if n < 0 or n > self.max_bulk:
                raise ProtocolError("invalid bulk length")
            end = nl + 2 + n
            if end + 2 > size:
                self.need = end + 2
                break
            if buf[end:end + 2] != CRLF:
                raise ProtocolError("bulk argument not terminated by CRLF")
            args.append(bytes(buf[nl + 2:end]))
            pos = end + 2
        self.pos = pos
        if len(args) < nargs:
            self.need = max(self.need, pos + 1)
            return -1
        self.need = 0
        return pos

    def _inline(self, start: int, out: list) -> int:
        buf = self.buf
        nl = buf.find(b"\n", start)
        if nl < 0:
            if len(buf) - start > MAX_LINE:
                raise ProtocolError("too big inline request")
            self.need = len(buf) + 1
            return -1
        self.need = 0
        line = bytes(buf[start:nl]).rstrip(b"\r")
        args = split_inline(line)
        if args:
            out.append((args, encode_request(args)))
        return nl + 1


def _header_int(buf: bytearray, a: int, b: int, msg: str) -> int:
    try:
        return int(buf[a:b])
    except ValueError:
        raise ProtocolError(msg) from None


_ESCAPES = {110: 10, 114: 13, 116: 9, 98: 8, 97: 7}  # \n \r \t \b \a, as sdssplitargs
_HEX = frozenset(b"0123456789abcdefABCDEF")


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
        buf += data
        if len(buf) < self.need:
            return []
        frames: list[bytes] = []
        self._scan(frames)
        if self.start:
            del buf[: self.start]
            self.pos -= self.start
            if self.need:
                self.need -= self.start
            self.start = 0
        return frames

    def _scan(self, frames: list) -> None:
        buf, pos, stack = self.buf, self.pos, self.stack
        size = len(buf)
        self.need = 0
        while pos < size:
            t = buf[pos]
            if t in _LINE_TYPES:
                nl = buf.find(CRLF, pos)
                if nl < 0:
                    break
                pos = nl + 2
            elif t in _BULK_TYPES:
                nl = buf.find(CRLF, pos)
                if nl < 0:
                    break
                n = int(buf[pos + 1:nl])
                end = nl + 2 if n < 0 else nl + 4 + n
                if end > size:
                    self.need = end
                    break
                pos = end
            else:
                nl = buf.find(CRLF, pos)
                if nl < 0:
                    break
                n = _aggregate_len(t, buf, pos, nl)
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
                frames.append(bytes(buf[self.start:pos]))
                self.start = pos
        self.pos = pos


def _aggregate_len(t: int, buf: bytearray, pos: int, nl: int) -> int:
    """Elements an aggregate header announces (pairs count twice; an attribute adds its reply)."""
    try:
        n = int(buf[pos + 1:nl])
    except ValueError:
        raise ProtocolError(f"bad aggregate header from backend: {bytes(buf[pos:nl])[:40]!r}") from None
    if t in _AGG_TYPES:
        return n
    if t in _PAIR_TYPES:
        return 2 * n
    if t == _ATTR:
        return 2 * n + 1
    raise ProtocolError(f"unknown reply type byte {chr(t)!r} from backend")


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
    return b"-" + msg.replace("\r", " ").replace("\n", " ").encode() + CRLF


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
