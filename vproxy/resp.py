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
        if len(self.buf) > self.max_buffer:
            e = ProtocolError("client query buffer limit reached")
            e.requests = out
            raise e
        return out

    def _parse(self, data: bytes, base: int, out: list) -> None:
        """Scan data (bytes from buf offset `base`, or the received bytes when buf was empty).

        Positions below are offsets in data; `start` is where the unconsumed bytes begin: the
        request being parsed, which may lie before data (-base: it began in an earlier feed)."""
        buf, nargs, args = self.buf, self.nargs, self.args
        size = len(data)
        find = data.find
        max_bulk = self.max_bulk
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
                    end = self._inline(data, pos, out)
                    need = self.need
                    if end < 0:
                        break
                    pos = end
                    continue
                if pos + 3 < size and data[pos + 2] == 13 and data[pos + 3] == 10 \
                        and 0 <= (n := data[pos + 1] - 48) <= 9:
                    pos += 4  # `*N\r\n` with one digit, the common case: no find, no int()
                else:
                    nl = find(CRLF, pos)
                    if nl < 0:
                        if size - pos > MAX_LINE:
                            raise ProtocolError("too big mbulk count string")
                        break
                    try:
                        n = int(data[pos + 1:nl])
                    except ValueError:
                        raise ProtocolError("invalid multibulk length") from None
                    pos = nl + 2
                if n > self.max_args:
                    raise ProtocolError("invalid multibulk length")
                if n <= 0:  # `*0` and `*-1` are ignored, as Redis does
                    continue
                nargs, args = n, []
            left = nargs - len(args)
            while left:
                if pos >= size:
                    need = max(need, pos + base + 1)
                    break
                if data[pos] != _DOLLAR:
                    raise ProtocolError(f"expected '$', got '{chr(data[pos])}'")
                # `$N\r\n` with one or two digits, the common case: no find, no int()
                if pos + 3 < size and data[pos + 2] == 13 and data[pos + 3] == 10 \
                        and 0 <= (n := data[pos + 1] - 48) <= 9:
                    nl = pos + 4
                elif (pos + 4 < size and data[pos + 3] == 13 and data[pos + 4] == 10
                      and 0 <= (n := data[pos + 1] - 48) <= 9 and 0 <= (d := data[pos + 2] - 48) <= 9):
                    n = n * 10 + d
                    nl = pos + 5
                else:
                    nl = find(CRLF, pos)
                    if nl < 0:
                        if size - pos > MAX_LINE:
                            raise ProtocolError("too big bulk count string")
                        need = max(need, pos + base + 1)
                        break
                    try:
                        n = int(data[pos + 1:nl])
                    except ValueError:
                        raise ProtocolError("invalid bulk length") from None
                    nl += 2
                if n < 0 or n > max_bulk:
                    raise ProtocolError("invalid bulk length")
                end = nl + n
                if end + 2 > size:
                    need = end + 2 + base
                    break
                if data[end] != 13 or data[end + 1] != 10:
                    raise ProtocolError("bulk argument not terminated by CRLF")
                args.append(data[nl:end])
                pos = end + 2
                left -= 1
            if left:
                break
            out.append((args, data[start:pos] if start >= 0 else bytes(buf[:pos + base])))
            nargs, args, need = -1, [], 0
        consumed = _keep_tail(buf, data, start + base, size)  # the request in progress stays
        self.nargs, self.args = nargs, args
        self.pos = pos + base - consumed if nargs >= 0 else 0
        self.need = max(0, need - consumed)

    def _inline(self, data: bytes, start: int, out: list) -> int:
        """One inline (telnet style) request at start; its end offset, or -1 if incomplete."""
        nl = data.find(b"\n", start)
        if nl < 0:
            if len(data) - start > MAX_LINE:
                raise ProtocolError("too big inline request")
            self.need = len(data) + 1
            return -1
        self.need = 0
        args = split_inline(data[start:nl].rstrip(b"\r"))
        if args:
            out.append((args, encode_request(args)))
        return nl + 1


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
                    n = int(data[pos + 1:nl])
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
