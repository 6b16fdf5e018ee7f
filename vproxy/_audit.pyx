# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of audit.AuditTrack (vproxy/audit.py is the reference: its docstrings say what
each method does).

Per recorded request the plain path notes a record as the request is sent (add_many) and completes
it as its reply is written (written). Here the loops over a read's requests and a push's replies
run in C: the records in flight are a list walked by index (not a deque), the time is read from
the C clock once per read and once per push (one float shared by their records), a reply's first
byte is compared as a C char, and the completed records join the audit's batch directly while
there is room (Audit.put_many otherwise). A record and its keys' list are taken off the garbage
collector's lists (they hold no cycle: times, bytes, tuples of them): thousands of them wait for
the writer at any time, and would otherwise be walked by its passes and promoted into the old
generations (setting off full collections). tests/test_audit*.py run both (VPROXY_PURE=1).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_SIZE
from cpython.object cimport PyObject

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)

cdef extern from "time.h":
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_REALTIME


cdef inline double now_wall() noexcept:
    """time.time(), as CPython computes it on Linux."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# set by audit.py (bind): the functions and constants the twin shares with the reference
cdef object who_of = None, error_code = None, Entry = None
cdef object OK = 0, ERROR = 1
cdef Py_ssize_t FLUSH_AT = 2048


def bind(who=None, error_code_of=None, entry=None, ok=0, error=1, flush_at=2048) -> None:
    """audit.py's objects the twin uses."""
    global who_of, error_code, Entry, OK, ERROR, FLUSH_AT
    who_of, error_code, Entry, OK, ERROR, FLUSH_AT = who, error_code_of, entry, ok, error, flush_at


cdef class AuditTrack:
    """audit.AuditTrack."""

    cdef public object audit, session, inner, who
    cdef object kept, src_batch, src_pu, src_user  # audit.AuditTrack._who: the last who and what it was made with
    cdef object now  # the time of this read's records (a float object, shared by them)
    cdef list q  # per plain request in flight from index head on: its record (a list), or None
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
        """The records in flight, oldest first (None: a request not recorded)."""
        return self.q[self.head:]

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
        w = now = target = None
        for i in range(start, end):
            req = <tuple>reqs[i]
            args = <list>req[0]
            found = PyDict_GetItem(plans, args[0])
            if found is NULL:
                po = audit.plan(args[0])
            else:
                po = <object>found
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
            if keys is not None:
                ks = args[keys]
                PyObject_GC_UnTrack(<void *>ks)
                rec = [now, w, p[0], None, ks, PyList_GET_SIZE(args), len(req[1]), target, 0.0, OK, None, None]
                PyObject_GC_UnTrack(<void *>rec)
                q.append(rec)
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
            sub, ks, values = None, args[keys], None
        elif self.audit.table.audits(name, args):
            sub, ks, values = self.audit.pick(name, args)
        else:
            self.q.append(None)
            return
        rec = [self.now, self.who, name, sub, ks, len(args), len(raw), target, 0.0, OK, None, values]
        PyObject_GC_UnTrack(<void *>rec)  # (see add_many)
        self.q.append(rec)

    def written(self, list frames):
        cdef list q = self.q, recs = None, e
        cdef Py_ssize_t h = self.head, n = PyList_GET_SIZE(q), j, nf = PyList_GET_SIZE(frames)
        cdef char c
        if self.inner is not None:
            self.inner.written(frames)
        now = None
        for j in range(nf):
            if h >= n:
                break
            eo = q[h]
            h += 1
            if eo is None:
                continue
            e = <list>eo
            if recs is None:
                recs, now = [], now_wall()
            e[8] = now
            f = frames[j]
            if type(f) is bytes:
                c = PyBytes_AS_STRING(f)[0] if PyBytes_GET_SIZE(f) else 0
                if c == b'-' or c == b'!':
                    e[9], e[10] = ERROR, error_code(f)
            elif f[:1] == b"-" or f[:1] == b"!":
                e[9], e[10] = ERROR, error_code(f)
            recs.append(e)
        if h >= n:  # all written: the list starts again
            del q[:]
            self.head = 0
        elif h >= 1024 and 2 * h >= n:  # the written half goes (amortized O(1) per record)
            del q[:h]
            self.head = 0
        else:
            for j in range(self.head, h):
                q[j] = None  # (their records are the audit's now)
            self.head = h
        if recs is None:
            return
        audit = self.audit
        buf = audit.buf
        if audit.inflight + PyList_GET_SIZE(buf) + PyList_GET_SIZE(recs) <= audit.max_queue:  # Audit.put_many, inline
            buf += recs
            if PyList_GET_SIZE(buf) >= FLUSH_AT and not audit._rest:
                audit.flush()
            elif not audit._armed:
                audit._arm()
        else:
            audit.put_many(recs)

    def drop(self, Py_ssize_t n):
        s = self.session
        batch = s.batch
        cdef Py_ssize_t j
        cdef list q = self.q
        for j in range(min(n, PyList_GET_SIZE(q) - self.head)):
            e = q[self.head]
            q[self.head] = None
            self.head += 1
            if e is not None and batch is not None:
                s.audits.append(Entry.held(batch, j, e))
        return self.inner.drop(n) if self.inner is not None else []
