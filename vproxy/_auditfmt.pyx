# cython: language_level=3, boundscheck=False, wraparound=False, always_allow_keywords=False
"""The compiled twin of auditfmt.Formatter (vproxy/auditfmt.py is the reference).

The writer process's main cost was formatting: per record a dozen f-string pieces, a decode and
a JSON escape of each key, then the line encoded. Here each batch's lines are written straight
into one C buffer: the keys escaped from their bytes (valid UTF-8 copied, invalid bytes as
\\\\xNN, as bytes.decode("utf-8", "backslashreplace") then JSON would), the numbers printed in C.
The parts a read's records share (client, command, backend) and the rare fields (errors, hashed
keys, values that are not bytes) come from auditfmt's own functions, encoded once. A packed batch
(packed: auditfmt.REC) is read in place: the numbers with memcpy, a one-key record's key escaped
from the batch's bytes, no object made or read per record in the common case.
tests/test_auditfmt.py holds both to byte-identical lines.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free
from libc.string cimport memcpy

from vproxy._buf cimport grow_buffer

from vproxy.auditfmt import CACHE_MAX, CTX, ERR, KEY, KLEN, OUTCOMES, REC, STRIDE, VALUES, day_text, js, key_hash, \
    sub_part, value_part, who_part
from vproxy.hostport import show as fmt_addr

cdef bytes _OUT0 = OUTCOMES[0].encode(), _OUT1 = OUTCOMES[1].encode(), _OUT2 = OUTCOMES[2].encode()
cdef bytes _OUT3 = OUTCOMES[3].encode()
cdef const char *HEX = b"0123456789abcdef"
DEF REC_SIZE = 34  # auditfmt.REC: <ddQQBB
import sys
if REC.size != REC_SIZE or KLEN.size != 4 or REC.format != "<ddQQBB" or sys.byteorder != "little":
    raise ImportError("auditfmt.REC is not the layout the compiled formatter reads: rebuild it")
cdef unsigned char F_CTX = CTX, F_KEY = KEY, F_VALUES = VALUES, F_ERR = ERR


cdef inline Py_ssize_t utf8_len(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The length of the valid UTF-8 sequence at s[i] (a byte >= 0x80), or 0 when it is not one
    (what Python's decoder rejects: stray continuations, overlongs, surrogates, past U+10FFFF)."""
    cdef unsigned char c = s[i], c1
    if 0xC2 <= c <= 0xDF:
        return 2 if i + 1 < n and 0x80 <= s[i + 1] <= 0xBF else 0
    if 0xE0 <= c <= 0xEF:
        if i + 2 >= n:
            return 0
        c1 = s[i + 1]
        if c == 0xE0:
            if not 0xA0 <= c1 <= 0xBF:
                return 0
        elif c == 0xED:
            if not 0x80 <= c1 <= 0x9F:
                return 0
        elif not 0x80 <= c1 <= 0xBF:
            return 0
        return 3 if 0x80 <= s[i + 2] <= 0xBF else 0
    if 0xF0 <= c <= 0xF4:
        if i + 3 >= n:
            return 0
        c1 = s[i + 1]
        if c == 0xF0:
            if not 0x90 <= c1 <= 0xBF:
                return 0
        elif c == 0xF4:
            if not 0x80 <= c1 <= 0x8F:
                return 0
        elif not 0x80 <= c1 <= 0xBF:
            return 0
        return 4 if 0x80 <= s[i + 2] <= 0xBF and 0x80 <= s[i + 3] <= 0xBF else 0
    return 0


cdef class Formatter:
    """auditfmt.Formatter."""

    cdef readonly object node, default_user, secret
    cdef dict _who, _names, _addrs, _mids
    cdef object _lw, _ln, _lt, _ls  # the last record's who, name, target, sub (compared by identity)
    cdef bytes _mid0, _mid1  # their parts: node .. subcommand, and the backend
    cdef long long _day_sec
    cdef bytes _day
    cdef char *buf
    cdef Py_ssize_t n, cap

    def __init__(self, node, default_user, secret):
        self.node, self.default_user, self.secret = node, default_user, secret
        self._who, self._names, self._addrs, self._mids = {}, {}, {}, {}
        self._lw = self._ln = self._lt = self._ls = self  # matches no record
        self._day_sec = -1
        self._day = b""

    def __dealloc__(self):
        PyMem_Free(self.buf)

    cdef int grow(self, Py_ssize_t k) except -1:
        return grow_buffer(&self.buf, &self.cap, self.n + k, 65536)

    cdef inline int put(self, const char *s, Py_ssize_t k) except -1:
        if self.n + k > self.cap:
            self.grow(k)
        memcpy(self.buf + self.n, s, k)
        self.n += k
        return 0

    cdef inline int put_bytes(self, bytes b) except -1:
        return self.put(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    cdef int put_int(self, long long v, int width) except -1:
        """v in decimal, zero-padded to width digits (f"{v:0{width}d}" for v >= 0; width <= 20)."""
        cdef char tmp[24]
        cdef int k = 24
        cdef unsigned long long u
        if v < 0:
            return self.put_bytes(f"{v:0{width}d}".encode() if width else str(v).encode())
        u = <unsigned long long>v
        while True:
            k -= 1
            tmp[k] = <char>(48 + u % 10)
            u //= 10
            if u == 0:
                break
        while 24 - k < width:
            k -= 1
            tmp[k] = b'0'
        return self.put(tmp + k, 24 - k)

    cdef int put_json(self, const unsigned char *s, Py_ssize_t n) except -1:
        """s[:n] as a JSON string, quotes included: auditfmt.value_part(s[:n]), from the bytes."""
        cdef Py_ssize_t i = 0, k
        cdef unsigned char c
        cdef char *o
        if self.n + 2 + 6 * n > self.cap:  # the worst case: every byte as \u00XX
            self.grow(2 + 6 * n)
        o = self.buf + self.n
        o[0] = b'"'
        o += 1
        while i < n:
            c = s[i]
            if c >= 0x80:
                k = utf8_len(s, i, n)
                if k:
                    memcpy(o, s + i, k)
                    o += k
                    i += k
                    continue
                o[0] = b'\\'; o[1] = b'\\'; o[2] = b'x'; o[3] = HEX[c >> 4]; o[4] = HEX[c & 15]
                o += 5
            elif c == b'"' or c == b'\\':
                o[0] = b'\\'; o[1] = c
                o += 2
            elif c >= 0x20:
                o[0] = c
                o += 1
            elif c == b'\n':
                o[0] = b'\\'; o[1] = b'n'
                o += 2
            elif c == b'\r':
                o[0] = b'\\'; o[1] = b'r'
                o += 2
            elif c == b'\t':
                o[0] = b'\\'; o[1] = b't'
                o += 2
            elif c == 8:
                o[0] = b'\\'; o[1] = b'b'
                o += 2
            elif c == 12:
                o[0] = b'\\'; o[1] = b'f'
                o += 2
            else:
                o[0] = b'\\'; o[1] = b'u'; o[2] = b'0'; o[3] = b'0'; o[4] = HEX[c >> 4]; o[5] = HEX[c & 15]
                o += 6
            i += 1
        o[0] = b'"'
        self.n = o + 1 - self.buf
        return 0

    cdef int put_value(self, v) except -1:
        if type(v) is bytes:
            return self.put_json(<const unsigned char *>PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v))
        return self.put_bytes(value_part(v).encode())

    cdef _mid(self, who, name, target, sub):
        """auditfmt.Formatter._mid, its parts encoded (and cached whole: in a batch the clients of
        consecutive records differ more often than not)."""
        cdef tuple key = (who, name, sub)
        m = self._mids.get(key)
        if m is None:
            w = self._who.get(who)
            if w is None:
                if len(self._who) > CACHE_MAX:
                    self._who.clear()
                w = self._who[who] = who_part(who, self.node, self.default_user).encode()
            cmd = self._names.get(name)
            if cmd is None:
                if len(self._names) > CACHE_MAX:
                    self._names.clear()
                cmd = self._names[name] = value_part(name).encode()
            if len(self._mids) > CACHE_MAX:
                self._mids.clear()
            m = self._mids[key] = b"".join((w, b',"command":', cmd, b',"subcommand":', sub_part(sub).encode(), b','))
        self._mid0 = m
        if target is not self._lt:
            backend = self._addrs.get(target)
            if backend is None:
                if len(self._addrs) > CACHE_MAX:
                    self._addrs.clear()
                backend = self._addrs[target] = b'"backend":' + js(fmt_addr(target)).encode() + b','
            self._mid1 = backend
        self._lw, self._ln, self._lt, self._ls = who, name, target, sub

    def line(self, r):
        return self.lines(list(r))

    cdef int one(self, double start, who, name, sub, keys, const char *kp, Py_ssize_t kn, long long argc,
                 long long size, target, values, double end, int outcome, err) except -1:
        """One record's line into the buffer; keys NULL: its one key is kp[:kn] (a packed batch)."""
        cdef long long sec, us
        cdef Py_ssize_t j
        secret = self.secret
        sec = <long long>start
        if sec != self._day_sec:
            self._day = day_text(sec).encode()
            self._day_sec = sec
        if who is not self._lw or name is not self._ln or target is not self._lt or sub is not self._ls:
            self._mid(who, name, target, sub)
        self.put(b'{"ts":"', 7)
        self.put_bytes(self._day)
        self.put(b".", 1)
        self.put_int(<long long>((start - <double>sec) * 1e6), 6)
        self.put(b'Z",', 3)
        self.put_bytes(self._mid0)
        self.put(b'"keys":[', 8)
        if keys is None:  # one key, in the packed batch
            if secret is not None:
                self.put_bytes(f'"{key_hash(secret, PyBytes_FromStringAndSize(kp, kn))}"'.encode())
            else:
                self.put_json(<const unsigned char *>kp, kn)
        elif type(keys) is bytes:  # one key (audit.keys_in)
            if secret is not None:
                self.put_bytes(f'"{key_hash(secret, keys)}"'.encode())
            else:
                self.put_json(<const unsigned char *>PyBytes_AS_STRING(keys), PyBytes_GET_SIZE(keys))
        else:
            j = 0
            for k in keys:
                if j:
                    self.put(b",", 1)
                j += 1
                if secret is not None:
                    self.put_bytes(f'"{key_hash(secret, k)}"'.encode())
                else:
                    self.put_value(k)
        self.put(b'],"argc":', 9)
        self.put_int(argc, 0)
        self.put(b',"bytes":', 9)
        self.put_int(size, 0)
        self.put(b",", 1)
        self.put_bytes(self._mid1)
        self.put(b'"latency_us":', 13)
        us = <long long>((end - start) * 1e6)
        self.put_int(us if us > 0 else 0, 0)
        self.put(b',"outcome":"', 12)
        if outcome == 0:
            self.put_bytes(_OUT0)
        elif outcome == 1:
            self.put_bytes(_OUT1)
        elif outcome == 2:
            self.put_bytes(_OUT2)
        elif outcome == 3:
            self.put_bytes(_OUT3)
        else:
            raise IndexError("tuple index out of range")
        self.put(b'","error":', 10)
        if err:
            self.put_bytes(js(err).encode())
        else:
            self.put(b"null", 4)
        if secret is not None:
            self.put(b',"keys_hashed":true', 19)
        if values is not None:
            self.put(b',"args":[', 9)
            j = 0
            for v in values:
                if j:
                    self.put(b",", 1)
                j += 1
                self.put_value(v)
            self.put(b"]", 1)
        self.put(b"}\n", 2)
        return 0

    def lines(self, list flat):
        """A batch: auditfmt.STRIDE fields a record, one after the other (auditfmt.FIELDS), read in
        place: no list per record."""
        cdef Py_ssize_t i, nf = PyList_GET_SIZE(flat)
        if nf % 12 or STRIDE != 12:
            raise ValueError(f"a batch has {STRIDE} fields a record: {nf} is not a multiple")
        self.n = 0
        for i in range(0, nf, 12):
            self.one(<object>PyList_GET_ITEM(flat, i), <object>PyList_GET_ITEM(flat, i + 1),
                     <object>PyList_GET_ITEM(flat, i + 2), <object>PyList_GET_ITEM(flat, i + 3),
                     <object>PyList_GET_ITEM(flat, i + 4), NULL, 0, <object>PyList_GET_ITEM(flat, i + 5),
                     <object>PyList_GET_ITEM(flat, i + 6), <object>PyList_GET_ITEM(flat, i + 7),
                     <object>PyList_GET_ITEM(flat, i + 8), <object>PyList_GET_ITEM(flat, i + 9),
                     <object>PyList_GET_ITEM(flat, i + 10), <object>PyList_GET_ITEM(flat, i + 11))
        return PyBytes_FromStringAndSize(self.buf, self.n)

    def packed(self, Py_ssize_t n, bytes pack, list objs):
        """A packed batch (auditfmt.Batch, REC): read in place, no object made per record (a
        one-key record's key is escaped from the packed bytes)."""
        cdef const char *p = PyBytes_AS_STRING(pack)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(pack), pos = 0, oi = 0, no = PyList_GET_SIZE(objs), r, need
        cdef double start, end
        cdef unsigned long long nbytes, argc
        cdef unsigned char outcome, flags
        cdef unsigned int klen
        cdef const char *kp
        who = name = sub = target = None
        self.n = 0
        for r in range(n):
            if pos + REC_SIZE > size:
                raise ValueError("a packed batch ends within a record")
            memcpy(&start, p + pos, 8)
            memcpy(&end, p + pos + 8, 8)
            memcpy(&nbytes, p + pos + 16, 8)
            memcpy(&argc, p + pos + 24, 8)
            outcome = <unsigned char>p[pos + 32]
            flags = <unsigned char>p[pos + 33]
            pos += REC_SIZE
            need = (4 if flags & F_CTX else 0) + (0 if flags & F_KEY else 1) + (1 if flags & F_VALUES else 0) \
                + (1 if flags & F_ERR else 0)
            if oi + need > no:
                raise ValueError("a packed batch has fewer objects than its records")
            if flags & F_CTX:
                who = <object>PyList_GET_ITEM(objs, oi)
                name = <object>PyList_GET_ITEM(objs, oi + 1)
                sub = <object>PyList_GET_ITEM(objs, oi + 2)
                target = <object>PyList_GET_ITEM(objs, oi + 3)
                oi += 4
            if flags & F_KEY:
                if pos + 4 > size:
                    raise ValueError("a packed batch ends within a record")
                memcpy(&klen, p + pos, 4)
                pos += 4
                if pos + <Py_ssize_t>klen > size:
                    raise ValueError("a packed batch ends within a record")
                kp = p + pos
                pos += klen
                keys = None
            else:
                kp = NULL
                klen = 0
                keys = <object>PyList_GET_ITEM(objs, oi)
                oi += 1
            values = err = None
            if flags & F_VALUES:
                values = <object>PyList_GET_ITEM(objs, oi)
                oi += 1
            if flags & F_ERR:
                err = <object>PyList_GET_ITEM(objs, oi)
                oi += 1
            self.one(start, who, name, sub, keys, kp, klen, <long long>argc, <long long>nbytes, target, values, end,
                     outcome, err)
        if pos != size or oi != no:
            raise ValueError(f"a packed batch of {n} records does not end where its records do")
        return PyBytes_FromStringAndSize(self.buf, self.n)
