# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of audit.AuditTrack (vproxy/audit.py is the reference: its docstrings say what
each method does).

Per recorded request the plain path notes a record as the request is sent (add_many) and completes
it as its reply is written (written). Here the loops over a read's requests and a push's replies
run in C, and no list is made per record: the requests in flight are one flat list walked by
index (per request a None when it is not recorded, else SLOTS items: a context tuple (start,
who, name, subcommand, target, values) that the records of one command in a read share, the keys,
argc and size), and a written reply's record goes straight into the audit's batch, packed
(Batch, the compiled twin of auditfmt.Batch: its numbers and a one-key record's key into one C
buffer, its context into the batch's list only when it differs from the record before), while
there is room (audit_queue; the rest dropped and counted). The time is read from the C clock once
per read and once per push (one float shared by their records), a reply's first byte compared as
a C char. A record's keys' list is taken off the garbage collector's lists (it holds no cycle:
bytes): thousands of them wait for the writer at any time, and would otherwise be walked by its
passes and promoted into the old generations (setting off full collections).
tests/test_audit*.py run both (VPROXY_PURE=1).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.mem cimport PyMem_Free
from cpython.object cimport PyObject
from libc.string cimport memcmp, memcpy

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)

from vproxy._buf cimport grow_buffer
from vproxy._clock cimport now_wall


# set by audit.py (bind): the functions and constants the twin shares with the reference
cdef object who_of = None, error_code = None, Entry = None, keys_in = None, cut_key = None, cut_keys = None
cdef Py_ssize_t KEY_MAX = 1024  # auditfmt.KEY_MAX (bind): a longer key is cut (auditfmt.cut_key)
cdef object OK = 0, ERROR = 1
cdef Py_ssize_t FLUSH_AT = 2048
DEF NOTED = 9  # a record's fields known when its request is sent (auditfmt.FIELDS[:9]); 3 more at its reply
# a recorded request in flight: SLOTS items of the list q: its context (a tuple: start, who, name,
# subcommand, target, values; one for the records of a read that share them), keys, argc, size
DEF SLOTS = 4
DEF REC_SIZE = 34  # auditfmt.REC: <ddQQBB (Batch)
cdef unsigned char F_CTX = 1, F_KEY = 2, F_VALUES = 4, F_ERR = 8  # auditfmt.CTX, KEY, VALUES, ERR (bind checks)


def bind(who=None, error_code_of=None, entry=None, ok=0, error=1, flush_at=2048, stride=12, keys_of=None,
         packing=None, cutting=None) -> None:
    """audit.py's objects the twin uses; packing: auditfmt's (REC, KLEN, CTX, KEY, VALUES, ERR), checked;
    cutting: auditfmt's (KEY_MAX, cut_key, cut_keys)."""
    global who_of, error_code, Entry, OK, ERROR, FLUSH_AT, keys_in, KEY_MAX, cut_key, cut_keys
    import sys
    keys_in = keys_of
    if cutting is not None:
        KEY_MAX, cut_key, cut_keys = cutting
    if stride != NOTED + 3:
        raise ValueError(f"the compiled recorder makes records of {NOTED + 3} fields, auditfmt {stride}: rebuild it")
    if packing is not None:
        rec, klen, ctx, key, values, err = packing
        if rec.format != "<ddQQBB" or rec.size != REC_SIZE or klen.format != "<I" or sys.byteorder != "little" \
                or (ctx, key, values, err) != (F_CTX, F_KEY, F_VALUES, F_ERR):
            raise ValueError("the compiled recorder packs records in another layout than auditfmt.REC: rebuild it")
    who_of, error_code, Entry, OK, ERROR, FLUSH_AT = who, error_code_of, entry, ok, error, flush_at


cdef bint too_long(list keys):
    """A key longer than KEY_MAX among them (auditfmt.cut_keys then cuts it)."""
    cdef Py_ssize_t j
    for j in range(PyList_GET_SIZE(keys)):
        k = <object>PyList_GET_ITEM(keys, j)
        if type(k) is not bytes or PyBytes_GET_SIZE(k) > KEY_MAX:
            return True
    return False


cdef class Batch:
    """auditfmt.Batch (the packed hand-over: its REC layout, CTX, KEY, VALUES, ERR), in one C buffer."""

    cdef char *buf
    cdef Py_ssize_t n, cap
    cdef public list objs
    cdef readonly Py_ssize_t count
    cdef object lw, ln, ls, lt  # the last record's context: who, name, sub, target (compared by identity)

    def __init__(self):
        self.objs = []
        self.count = 0
        self.lw = self  # matches no record
        self.ln = self.ls = self.lt = None

    def __dealloc__(self):
        PyMem_Free(self.buf)

    cdef int grow(self, Py_ssize_t k) except -1:
        return grow_buffer(&self.buf, &self.cap, self.n + k, 16384)

    cdef int add_c(self, double start, who, name, sub, keys, argc, size, target, values, double end,
                   outcome, err) except -1:
        cdef unsigned char flags = 0
        cdef unsigned long long a = argc, z = size
        cdef unsigned char o = outcome
        cdef unsigned int kn = 0
        cdef bint one = type(keys) is bytes
        cdef list objs = self.objs
        cdef char *p
        if who is not self.lw or name is not self.ln or sub is not self.ls or target is not self.lt:
            flags = F_CTX
            self.lw, self.ln, self.ls, self.lt = who, name, sub, target
            objs.append(who)
            objs.append(name)
            objs.append(sub)
            objs.append(target)
        if one:
            flags |= F_KEY
            kn = <unsigned int>PyBytes_GET_SIZE(keys)
        else:
            objs.append(keys)
        if values is not None:
            flags |= F_VALUES
            objs.append(values)
        if err:
            flags |= F_ERR
            objs.append(err)
        if self.n + REC_SIZE + 4 + <Py_ssize_t>kn > self.cap:
            self.grow(REC_SIZE + 4 + kn)
        p = self.buf + self.n
        memcpy(p, &start, 8)
        memcpy(p + 8, &end, 8)
        memcpy(p + 16, &z, 8)
        memcpy(p + 24, &a, 8)
        p[32] = <char>o
        p[33] = <char>flags
        self.n += REC_SIZE
        if one:
            memcpy(p + REC_SIZE, &kn, 4)
            memcpy(p + REC_SIZE + 4, PyBytes_AS_STRING(keys), kn)
            self.n += 4 + kn
        self.count += 1
        return 0

    def add(self, start, who, name, sub, keys, argc, size, target, values, end, outcome, err):
        self.add_c(start, who, name, sub, keys, argc, size, target, values, end, outcome, err)

    def add_flat(self, list flat):
        cdef Py_ssize_t i, nf = PyList_GET_SIZE(flat)
        if nf % (NOTED + 3):
            raise ValueError(f"a batch has {NOTED + 3} fields a record: {nf} is not a multiple")
        for i in range(0, nf, NOTED + 3):
            self.add_c(flat[i], flat[i + 1], flat[i + 2], flat[i + 3], flat[i + 4], flat[i + 5], flat[i + 6],
                       flat[i + 7], flat[i + 8], flat[i + 9], flat[i + 10], flat[i + 11])

    @property
    def pack(self):
        return PyBytes_FromStringAndSize(self.buf, self.n)

    def frame(self):
        """(n, pack, objs): what goes to the writer (marshalled)."""
        return (self.count, PyBytes_FromStringAndSize(self.buf, self.n), self.objs)

    def take(self):
        """frame(), and the batch empty again (its buffer kept: a new one's pages would fault in
        again every batch, unless it grew past 4 MB while the writer was behind)."""
        out = self.frame()
        self.n = self.count = 0
        self.objs = []
        self.lw = self
        self.ln = self.ls = self.lt = None
        if self.cap > (4 << 20):
            PyMem_Free(self.buf)
            self.buf, self.cap = NULL, 0
        return out


cdef class AuditTrack:
    """audit.AuditTrack."""

    cdef public object audit, session, inner, who
    cdef object kept, src_batch, src_pu, src_user  # audit.AuditTrack._who: the last who and what it was made with
    cdef object now  # the time of this read's records (a float object, shared by them)
    cdef list q  # per plain request in flight from index head on: None, or its SLOTS items (flat)
    cdef Py_ssize_t head

    def __init__(self, audit, session, inner, Py_ssize_t inflight=0):
        self.audit, self.session, self.inner = audit, session, inner
        self.q = [None] * inflight
        self.head = 0
        self.who = None
        self.now = 0.0
        self.kept = None

    @property
    def entries(self) -> list:
        """The records in flight, oldest first (None: a request not recorded; else its fields
        noted so far)."""
        cdef Py_ssize_t h = self.head, n = PyList_GET_SIZE(self.q)
        out = []
        while h < n:
            if self.q[h] is None:
                out.append(None)
                h += 1
            else:
                c = <tuple>self.q[h]
                out.append([c[0], c[1], c[2], c[3], self.q[h + 1], self.q[h + 2], self.q[h + 3], c[4], c[5]])
                h += SLOTS
        return out

    def start(self, t0):
        self.who = None
        if self.inner is not None:
            self.inner.start(t0)

    def add(self, tuple req):
        if self.inner is not None:
            self.inner.add(req)
        self._numbered(req, self.session.outbox.next_seq - 1)

    cdef _numbered(self, tuple req, Py_ssize_t seq):
        args, raw = req
        audit = self.audit
        p = audit.table.audit_plans.get(args[0])
        if p is None:
            p = audit.plan(args[0])
        if p is False:
            self.q.append(None)
            return
        if self.who is None:
            self.who, self.now = self._who(), now_wall()
        target = self.session.outbox.meta_of(seq)[3]
        if not isinstance(target, (tuple, str)):
            target = target.addr
        self._note(<tuple>p, args, raw, target)

    def add_many(self, list reqs, Py_ssize_t start, Py_ssize_t end):
        cdef Py_ssize_t i, base
        cdef tuple req, p
        cdef list args
        cdef PyObject *found
        cdef list q = self.q
        cdef bint first = True
        if self.inner is not None:
            self.inner.add_many(reqs, start, end)
        box = self.session.outbox
        if box.hold is not None:
            base = box.next_seq - (end - start)
            for i in range(end - start):
                self._numbered(<tuple>reqs[start + i], base + i)
            return
        audit = self.audit
        cdef dict plans = audit.table.audit_plans
        w = now = target = ctx = None
        last = po = None  # the previous request's name as sent, and its plan
        for i in range(start, end):
            req = <tuple>reqs[i]
            args = <list>req[0]
            sent = args[0]
            # a pipeline repeats its command: the same name as the request before costs a compare of
            # its bytes, not a hash of them and a lookup
            if last is None or type(sent) is not bytes or PyBytes_GET_SIZE(sent) != PyBytes_GET_SIZE(last) \
                    or memcmp(PyBytes_AS_STRING(sent), PyBytes_AS_STRING(last), PyBytes_GET_SIZE(sent)) != 0:
                found = PyDict_GetItem(plans, sent)
                if found is NULL:
                    po = audit.plan(sent)
                else:
                    po = <object>found
                last = sent if type(sent) is bytes else None
            if po is False:
                q.append(None)
                continue
            p = <tuple>po
            if first:  # the first recorded one of this call: what the others share
                first = False
                s = self.session
                if self.who is None:
                    self.who, self.now = self._who(), now_wall()
                w, now = self.who, self.now
                ch = s.cur
                target = ch.pool.addr if ch is not None and ch.pool is not None else None
            keys = p[1]
            if keys is not None:  # the record's SLOTS items
                if type(keys) is int:  # one key: its bytes (audit.keys_in)
                    ks = args[<Py_ssize_t>keys] if <Py_ssize_t>keys < PyList_GET_SIZE(args) else []
                    if type(ks) is bytes and PyBytes_GET_SIZE(ks) > KEY_MAX:
                        ks = cut_key(ks)
                else:
                    ks = args[keys]
                    if too_long(<list>ks):
                        ks = cut_keys(ks)
                    PyObject_GC_UnTrack(<void *>ks)
                if ctx is None or (<tuple>ctx)[2] is not p[0]:  # (now, who and target: this call's)
                    ctx = (now, w, p[0], None, target, None)
                q.append(ctx)
                q.append(ks)
                q.append(PyList_GET_SIZE(args))
                q.append(PyBytes_GET_SIZE(req[1]) if type(req[1]) is bytes else len(req[1]))
            else:
                self._note(p, args, req[1], target)

    cdef _who(self):
        s = self.session
        b, pu, u = s.batch, s.proxy_user, s.user
        if self.kept is None or b is not self.src_batch or pu is not self.src_pu or u is not self.src_user:
            self.src_batch, self.src_pu, self.src_user = b, pu, u
            self.kept = who_of(s)
        return self.kept

    cdef _note(self, tuple p, list args, raw, target):
        name, keys = p
        if keys is not None:
            sub, ks, values = None, keys_in(args, keys), None
        elif self.audit.table.audits(name, args):
            sub, ks, values = self.audit.pick(name, args)
        else:
            self.q.append(None)
            return
        self.q.extend(((self.now, self.who, name, sub, target, values), ks, len(args), len(raw)))

    def written(self, list frames):
        cdef list q = self.q
        cdef Py_ssize_t h = self.head, n = PyList_GET_SIZE(q), j, nf = PyList_GET_SIZE(frames), made = 0, lost = 0
        cdef Py_ssize_t room
        cdef double now = 0.0
        cdef bint timed = False
        cdef char c
        cdef tuple ctx
        cdef Batch batch
        if self.inner is not None:
            self.inner.written(frames)
        audit = self.audit
        batch = <Batch?>audit.batch
        room = audit.max_queue - audit.queued  # records that may still wait (Audit.put_many)
        for j in range(nf):
            if h >= n:
                break
            if q[h] is None:
                h += 1
                continue
            if not timed:
                now, timed = now_wall(), True
            f = frames[j]
            outcome, err = OK, None
            if type(f) is bytes:
                c = PyBytes_AS_STRING(f)[0] if PyBytes_GET_SIZE(f) else 0
                if c == b'-' or c == b'!':
                    outcome, err = ERROR, error_code(f)
            elif f[:1] == b"-" or f[:1] == b"!":
                outcome, err = ERROR, error_code(f)
            if made < room:
                ctx = <tuple>PyList_GET_ITEM(q, h)
                batch.add_c(<object>PyTuple_GET_ITEM(ctx, 0), <object>PyTuple_GET_ITEM(ctx, 1),
                            <object>PyTuple_GET_ITEM(ctx, 2), <object>PyTuple_GET_ITEM(ctx, 3),
                            <object>PyList_GET_ITEM(q, h + 1), <object>PyList_GET_ITEM(q, h + 2),
                            <object>PyList_GET_ITEM(q, h + 3), <object>PyTuple_GET_ITEM(ctx, 4),
                            <object>PyTuple_GET_ITEM(ctx, 5), now, outcome, err)
                made += 1
            else:
                lost += 1
            h += SLOTS
        if h >= n:  # all written: the list starts again
            del q[:]
            self.head = 0
        elif h >= 1024 and 2 * h >= n:  # the written half goes (amortized O(1) per record)
            del q[:h]
            self.head = 0
        else:
            for j in range(self.head, h):
                q[j] = None  # (their fields are the audit's now)
            self.head = h
        if lost:
            audit._drop(lost, "the writer is behind")
        if not made:
            return
        if batch.count >= FLUSH_AT:
            audit.full()
        elif not audit._armed:
            audit._arm()

    def drop(self, Py_ssize_t n):
        s = self.session
        batch = s.batch
        cdef Py_ssize_t j, k
        cdef list q = self.q
        for j in range(n):
            if self.head >= PyList_GET_SIZE(q):
                break
            if q[self.head] is None:
                self.head += 1
                continue
            c = <tuple>q[self.head]
            rec = [c[0], c[1], c[2], c[3], q[self.head + 1], q[self.head + 2], q[self.head + 3], c[4], c[5],
                   0.0, OK, None]  # (auditfmt.FIELDS)
            for k in range(self.head, self.head + SLOTS):
                q[k] = None
            self.head += SLOTS
            if batch is not None:
                s.audits.append(Entry.held(batch, j, rec))
        return self.inner.drop(n) if self.inner is not None else []

