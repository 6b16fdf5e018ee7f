# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled twin of resp.RequestParser and resp.ReplyFramer: the same interface and answers, C scanning.

resp.py is the reference: every rule here mirrors a line there (tests/test_resp.py runs both and
feeds both the same random streams). What differs is only how: the bytes are read through a
`const unsigned char *`, lines are found with memchr(), numbers are read with C integers, and
slices are made with PyBytes_FromStringAndSize() (one copy, no intermediate object).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from libc.string cimport memchr, memcpy

from vproxy.errors import ProtocolError
from vproxy.resp import (ARG_COST, INT_MAX, MAX_LINE, UNAUTH_MAX_ARGS, UNAUTH_MAX_BULK, _aggregate_len,
                         encode_request, split_inline)

cdef enum:
    CR = 13
    LF = 10
    STAR = 42
    DOLLAR = 36

cdef Py_ssize_t C_MAX_LINE = MAX_LINE, C_ARG_COST = ARG_COST
cdef long long C_UNAUTH_ARGS = UNAUTH_MAX_ARGS, C_UNAUTH_BULK = UNAUTH_MAX_BULK
cdef unsigned long long LLONG_MAX_U = 9223372036854775807ULL


cdef inline bint string2ll(const unsigned char *p, Py_ssize_t n, long long *out) noexcept:
    """resp.string2ll: optional '-', digits, no leading zero ("0" alone), fits a long long."""
    cdef Py_ssize_t i = 0
    cdef bint neg = n > 0 and p[0] == 45
    cdef unsigned long long v = 0
    cdef unsigned int d
    if neg:
        i = 1
    if n - i < 1 or n - i > 19:
        return False
    if p[i] == 48 and (neg or n - i > 1):
        return False
    while i < n:
        d = p[i] - 48
        if d > 9:
            return False
        v = v * 10 + d  # 19 digits at most: no overflow of 64 bits
        i += 1
    if neg:
        if v > LLONG_MAX_U + 1:
            return False
        out[0] = <long long>(0ULL - v)  # two's complement: -2**63 included
    else:
        if v > LLONG_MAX_U:
            return False
        out[0] = <long long>v
    return True


cdef inline Py_ssize_t find_crlf(const unsigned char *p, Py_ssize_t pos, Py_ssize_t size) noexcept:
    """Offset of the first CR LF at or after pos, -1 if none (bytes.find(b"\\r\\n"))."""
    cdef const unsigned char *q
    while pos < size - 1:
        q = <const unsigned char *>memchr(p + pos, CR, size - 1 - pos)
        if q == NULL:
            return -1
        pos = q - p
        if p[pos + 1] == LF:
            return pos
        pos += 1
    return -1


cdef inline Py_ssize_t find_byte(const unsigned char *p, Py_ssize_t pos, Py_ssize_t end, int c) noexcept:
    cdef const unsigned char *q
    if pos >= end:
        return -1
    q = <const unsigned char *>memchr(p + pos, c, end - pos)
    return -1 if q == NULL else q - p


cdef inline bytes cut(const unsigned char *p, Py_ssize_t start, Py_ssize_t end):
    return PyBytes_FromStringAndSize(<const char *>p + start, end - start)


cdef bytes unscanned(bytearray buf, Py_ssize_t base):
    """buf[base:] as bytes, in one copy."""
    return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf) + base, PyByteArray_GET_SIZE(buf) - base)


cdef int keep_tail(bytearray buf, const unsigned char *p, Py_ssize_t consumed, Py_ssize_t size) except -1:
    """resp._keep_tail: keep only the unconsumed bytes in buf (empty when data was scanned in place)."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
    if old:
        if consumed:
            del buf[:consumed]  # O(1): CPython moves the bytearray's start offset
    elif consumed < size:
        PyByteArray_Resize(buf, size - consumed)
        memcpy(PyByteArray_AS_STRING(buf), p + consumed, size - consumed)
    return 0


cdef class RequestParser:
    """Splits a client byte stream into requests: multibulk (`*`) or inline (telnet style)."""

    cdef public bytearray buf
    cdef public Py_ssize_t pos, need
    cdef public long long nargs, max_bulk, max_args, max_buffer
    cdef public list args
    cdef public bint auth_required

    def __init__(self, max_bulk=512 * 1024 * 1024, max_args=INT_MAX, max_buffer=1024 * 1024 * 1024):
        self.buf = bytearray()
        self.pos = 0
        self.nargs = -1
        self.args = []
        self.need = 0
        self.max_bulk, self.max_args, self.max_buffer = max_bulk, max_args, max_buffer
        self.auth_required = False

    def feed(self, data):
        """Add bytes; return the requests now complete. Raises ProtocolError(msg, done) on bad input."""
        cdef bytearray buf = self.buf
        cdef Py_ssize_t base = 0
        cdef bytes chunk
        cdef list out = []
        if PyByteArray_GET_SIZE(buf):
            buf += data
            if PyByteArray_GET_SIZE(buf) < self.need:
                return out
            base = self.pos if self.nargs >= 0 else 0
            chunk = unscanned(buf, base)
        else:
            chunk = data if type(data) is bytes else bytes(data)
        try:
            self._parse(chunk, base, out)
        except ProtocolError as e:
            e.requests = out  # requests before the bad one still run, as in Redis
            raise
        if PyByteArray_GET_SIZE(self.buf) + PyList_GET_SIZE(self.args) * C_ARG_COST > self.max_buffer:
            e = ProtocolError("client query buffer limit reached")
            e.requests = out
            raise e
        return out

    cdef int _parse(self, bytes data, Py_ssize_t base, list out) except -1:
        """resp.RequestParser._parse, line for line."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef bytearray buf = self.buf
        cdef long long nargs = self.nargs, n
        cdef list args = self.args
        cdef bint auth = self.auth_required
        cdef Py_ssize_t start, pos, cr, nl, end, need = 0, left, done, consumed
        cdef unsigned int d
        if nargs >= 0:
            start, pos = -base, 0
        else:
            start = pos = 0
        while True:
            if nargs < 0:
                start = pos
                if pos >= size:
                    break
                if p[pos] != STAR:
                    done = len(out)
                    end = self._inline(data, p, size, pos, out)
                    need = self.need
                    if end < 0:
                        break
                    pos = end
                    if auth and len(out) > done and _is_auth(out):
                        auth = False
                    continue
                if pos + 3 < size and p[pos + 2] == CR and p[pos + 3] == LF and <unsigned int>(p[pos + 1] - 48) <= 9:
                    n = p[pos + 1] - 48
                    pos += 4
                else:
                    cr = find_byte(p, pos, size, CR)
                    if cr < 0 or cr + 1 >= size:
                        if cr < 0 and size - pos > C_MAX_LINE:
                            raise ProtocolError("too big mbulk count string")
                        need = size + base + 1
                        break
                    if p[cr + 1] != LF:
                        raise ProtocolError("invalid CRLF in request")
                    if not string2ll(p + pos + 1, cr - pos - 1, &n) or n > self.max_args:
                        raise ProtocolError("invalid multibulk length")
                    if n > C_UNAUTH_ARGS and auth:
                        raise ProtocolError("unauthenticated multibulk length")
                    pos = cr + 2
                if n <= 0:
                    continue
                nargs, args = n, []
            left = <Py_ssize_t>(nargs - len(args))
            while left:
                if pos + 3 < size and p[pos] == DOLLAR and p[pos + 2] == CR and p[pos + 3] == LF \
                        and <unsigned int>(p[pos + 1] - 48) <= 9:
                    n = p[pos + 1] - 48
                    nl = pos + 4
                elif (pos + 4 < size and p[pos] == DOLLAR and p[pos + 3] == CR and p[pos + 4] == LF
                      and <unsigned int>(p[pos + 1] - 49) <= 8 and <unsigned int>(p[pos + 2] - 48) <= 9):
                    n = (p[pos + 1] - 48) * 10 + p[pos + 2] - 48
                    nl = pos + 5
                else:
                    cr = find_byte(p, pos, size, CR)
                    if cr < 0 or cr + 1 >= size:
                        if cr < 0 and size - pos > C_MAX_LINE:
                            raise ProtocolError("too big bulk count string")
                        if size + base + 1 > need:
                            need = size + base + 1
                        break
                    n = self._bulk_len(data, p, pos, cr, auth)
                    nl = cr + 2
                end = nl + <Py_ssize_t>n
                if end + 2 > size:
                    need = end + 2 + base
                    break
                if p[end] != CR or p[end + 1] != LF:
                    raise ProtocolError("invalid CRLF in request")
                args.append(cut(p, nl, end))
                pos = end + 2
                left -= 1
            if left:
                break
            out.append((args, cut(p, start, pos) if start >= 0
                        else PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), pos + base)))
            nargs, args, need = -1, [], 0
            if auth and _is_auth(out):
                auth = False
        consumed = start + base
        keep_tail(buf, p, consumed, size)  # the request in progress stays
        self.nargs, self.args = nargs, args
        self.pos = pos + base - consumed if nargs >= 0 else 0
        self.need = need - consumed if need > consumed else 0
        return 0

    cdef long long _bulk_len(self, bytes data, const unsigned char *p, Py_ssize_t pos, Py_ssize_t cr,
                             bint auth) except -1:
        """resp._bulk_len: the `$` header at pos whose line ends at cr, the server's checks in order."""
        cdef long long n
        if p[pos] != DOLLAR:
            got = data[pos:pos + 1].decode("utf-8", "surrogateescape")
            raise ProtocolError(f"expected '$', got '{got}'")
        if p[cr + 1] != LF:
            raise ProtocolError("invalid CRLF in request")
        if not string2ll(p + pos + 1, cr - pos - 1, &n) or n < 0 or n > self.max_bulk:
            raise ProtocolError("invalid bulk length")
        if n > C_UNAUTH_BULK and auth:
            raise ProtocolError("unauthenticated bulk length")
        return n

    cdef Py_ssize_t _inline(self, bytes data, const unsigned char *p, Py_ssize_t size, Py_ssize_t start,
                            list out) except -2:
        """resp.RequestParser._inline: a NUL before the LF leaves the line unfinished (strchr)."""
        cdef Py_ssize_t nl = find_byte(p, start, size, LF), end
        if nl < 0 or find_byte(p, start, nl, 0) >= 0:
            if size - start > C_MAX_LINE:
                raise ProtocolError("too big inline request")
            self.need = size + 1
            return -1
        self.need = 0
        end = nl - 1 if nl > start and p[nl - 1] == CR else nl
        args = split_inline(cut(p, start, end))
        if args:
            out.append((args, encode_request(args)))
        return nl + 1


cdef inline bint _is_auth(list out):
    """resp._is_auth: the request just parsed may authenticate (AUTH, HELLO ... AUTH)."""
    name = (<list>(<tuple>out[len(out) - 1])[0])[0].lower()
    return name == b"auth" or name == b"hello"


cdef class ReplyFramer:
    """Cuts a backend byte stream into whole replies, byte for byte, resuming where it stopped."""

    cdef public bytearray buf
    cdef public Py_ssize_t pos, start, need
    cdef public list stack

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0
        self.start = 0
        self.stack = []
        self.need = 0

    def feed(self, data):
        cdef bytearray buf = self.buf
        cdef Py_ssize_t base = 0
        cdef bytes chunk
        cdef list frames = []
        if PyByteArray_GET_SIZE(buf):
            buf += data
            if PyByteArray_GET_SIZE(buf) < self.need:
                return frames
            base = self.pos
            chunk = unscanned(buf, base)
        else:
            chunk = data if type(data) is bytes else bytes(data)
        self._scan(chunk, base, frames)
        return frames

    cdef int _scan(self, bytes data, Py_ssize_t base, list frames) except -1:
        """resp.ReplyFramer._scan, line for line."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef bytearray buf = self.buf
        cdef list stack = self.stack
        cdef Py_ssize_t start = self.start - base, pos = 0, need = 0, nl, end, consumed, depth
        cdef long long n
        cdef unsigned char t
        while pos < size:
            t = p[pos]
            if t == 43 or t == 45 or t == 58 or t == 95 or t == 44 or t == 35 or t == 40:  # + - : _ , # (
                nl = find_crlf(p, pos, size)
                if nl < 0:
                    break
                pos = nl + 2
            elif t == 36 or t == 61 or t == 33:  # $ = !
                if pos + 3 < size and p[pos + 2] == CR and p[pos + 3] == LF and <unsigned int>(p[pos + 1] - 48) <= 9:
                    end = pos + 6 + p[pos + 1] - 48
                elif pos + 4 < size and p[pos + 3] == CR and p[pos + 4] == LF \
                        and <unsigned int>(p[pos + 1] - 48) <= 9 and <unsigned int>(p[pos + 2] - 48) <= 9:
                    end = pos + 7 + (p[pos + 1] - 48) * 10 + p[pos + 2] - 48
                else:
                    nl = find_crlf(p, pos, size)
                    if nl < 0:
                        break
                    n = _header_number(data, p, pos, nl)
                    end = nl + 2 if n < 0 else nl + 4 + <Py_ssize_t>n
                if end > size:
                    need = end + base
                    break
                pos = end
            else:
                nl = find_crlf(p, pos, size)
                if nl < 0:
                    break
                if t == 42 or t == 126 or t == 62:  # * ~ >
                    n = _header_number(data, p, pos, nl)
                elif t == 37:  # %
                    n = 2 * _header_number(data, p, pos, nl)
                elif t == 124:  # |
                    n = 2 * _header_number(data, p, pos, nl) + 1
                else:
                    n = _aggregate_len(t, data, pos, nl)  # raises: the pure one's error, word for word
                pos = nl + 2
                if n > 0:
                    stack.append(n)
                    continue
            # one element is complete: close every aggregate it completes
            depth = len(stack)
            while depth:
                n = <long long>stack[depth - 1] - 1
                if n:
                    stack[depth - 1] = n
                    break
                stack.pop()
                depth -= 1
            if not depth:
                frames.append(cut(p, start, pos) if start >= 0
                              else PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), pos + base))
                start = pos
        consumed = start + base
        keep_tail(buf, p, consumed, size)  # the reply in progress stays
        self.start = 0
        self.pos = pos + base - consumed
        self.need = need - consumed if need else 0
        return 0


cdef long long _header_number(bytes data, const unsigned char *p, Py_ssize_t pos, Py_ssize_t nl) except? -1:
    """resp._header_number: the number in the backend's header line at pos."""
    cdef long long n
    if not string2ll(p + pos + 1, nl - pos - 1, &n):
        raise ProtocolError(f"bad reply header from backend: {data[pos:nl][:40]!r}")
    return n
