# cython: language_level=3, boundscheck=False, wraparound=False, always_allow_keywords=False
"""The compiled twin of cmdstats.CommandStat and cmdstats.Track (vproxy/cmdstats.py is the reference).

Per request the plain path adds one entry (add) and, when the reply is written, records it
(written): here that is C integers, a C array for the histogram and lists walked by index, instead
of a tuple, a deque and a Python method call per request. tests/test_cmdstats.py runs both.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memset

from vproxy._clock cimport now_monotonic

from vproxy.cmdstats import NBUCKETS as _NB, SUB as _SUB, bucket_value

cdef enum:
    NB = 960  # cmdstats.NBUCKETS
    SUB = 32  # cmdstats.SUB

assert _NB == NB and _SUB == SUB, "vproxy/_stats.pyx is out of step with vproxy/cmdstats.py"


cdef inline Py_ssize_t c_bucket(long long us) noexcept:
    cdef int shift
    cdef long long i
    if us < 2 * SUB:
        return <Py_ssize_t>us if us > 0 else 0
    shift = 63 - __builtin_clzll(<unsigned long long>us) + 1 - 6  # bit_length - 6
    i = SUB * shift + (us >> shift)
    return <Py_ssize_t>i if i < NB else NB - 1


cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil




cdef class CommandStat:
    """cmdstats.CommandStat."""

    cdef public long long calls, failed, rejected, usec, max, min
    cdef long long _hist[NB]

    def __init__(self):
        self.calls = self.failed = self.rejected = self.usec = self.max = 0
        self.min = -1
        memset(self._hist, 0, sizeof(self._hist))

    cdef inline void add(self, long long us, bint failed) noexcept:
        if us < 0:
            us = 0
        self.calls += 1
        self.usec += us
        if failed:
            self.failed += 1
        if us > self.max:
            self.max = us
        if us < self.min or self.min < 0:
            self.min = us
        self._hist[c_bucket(us)] += 1

    def record(self, long long us, bint failed):
        self.add(us, failed)

    @property
    def hist(self):
        return [self._hist[i] for i in range(NB)]

    def percentile(self, double p):
        cdef long long total = self.calls, seen = 0, rank
        cdef Py_ssize_t i
        if not total:
            return 0.0
        rank = <long long>(-(-total * p // 100))
        if rank < 1:
            rank = 1
        for i in range(NB):
            if self._hist[i]:
                seen += self._hist[i]
                if seen >= rank:
                    return float(bucket_value(i))
        return float(self.max)

    def below(self, long long us):
        cdef long long n = 0
        cdef Py_ssize_t i, end = c_bucket(us)
        for i in range(end):
            n += self._hist[i]
        return n


cdef long long _sampled = 0  # requests since the last hot-key sample (all clients: cmdstats.CommandStats.sampled)
cdef Py_ssize_t BIG_FLOOR = 1024  # cmdstats.KeyStats.BIG_FLOOR: below it, no size is looked at


cdef class Track:
    """cmdstats.Track: the plain path's requests in flight, recorded as their replies are written.
    It keeps each request's name and bytes (not the parsed arguments: those are freed once sent)."""

    cdef public object stats, session
    cdef object keys, t0
    cdef long long sample
    cdef list names, raws, t0s  # the command name as sent, the request's bytes, its read time
    cdef Py_ssize_t head

    def __init__(self, stats, session):
        self.stats, self.session = stats, session
        self.keys = stats.keys
        self.sample = stats.keys.sample
        self.names, self.raws, self.t0s = [], [], []
        self.head = 0
        self.t0 = 0.0

    def start(self, t0):
        """The read time of the requests add() is given next (one call per read)."""
        self.t0 = t0

    cdef inline void _one(self, object name, bytes raw):
        global _sampled
        self.names.append(name)
        self.raws.append(raw)
        self.t0s.append(self.t0)
        if self.sample:
            _sampled += 1
            if _sampled >= self.sample:
                _sampled = 0
                self.keys.seen(name.lower(), raw)
        if PyBytes_GET_SIZE(raw) > BIG_FLOOR and PyBytes_GET_SIZE(raw) > self.keys.big_min:
            self.keys.big("request", name.lower(), raw, PyBytes_GET_SIZE(raw))

    def add(self, tuple req):
        self._one(req[0][0], <bytes>req[1])

    def add_many(self, list reqs, Py_ssize_t start, Py_ssize_t end):
        """reqs[start:end], sent in this order (one call per read on the standalone plain path)."""
        cdef Py_ssize_t i
        cdef tuple req
        for i in range(start, end):
            req = <tuple>reqs[i]
            self._one(req[0][0], <bytes>req[1])

    cdef void _compact(self):
        if self.head >= len(self.names):
            self.names.clear()
            self.raws.clear()
            self.t0s.clear()
            self.head = 0
        elif self.head > 256:
            del self.names[:self.head]
            del self.raws[:self.head]
            del self.t0s[:self.head]
            self.head = 0

    def written(self, list frames):
        cdef double now = now_monotonic(), took
        cdef double slow = -1.0
        cdef object stats = self.stats, st, name
        cdef dict alias = stats.alias
        cdef list names = self.names, t0s = self.t0s
        cdef Py_ssize_t head = self.head, n = len(names)
        cdef bytes f
        cdef char c
        if stats.slow_s is not None:
            slow = stats.slow_s
        for f in frames:
            if head >= n:
                break
            name = names[head]
            took = now - <double>t0s[head]
            head += 1
            st = alias.get(name)
            if st is None:
                st = stats.entry_for(name)
                if st is None:
                    continue
            c = PyBytes_AS_STRING(f)[0] if PyBytes_GET_SIZE(f) else 0
            (<CommandStat?>st).add(<long long>(took * 1e6), c == 45 or c == 33)  # '-', '!'
            if slow >= 0 and took > slow:
                stats.slow(self.session, self.raws[head - 1], took)
            if PyBytes_GET_SIZE(f) > BIG_FLOOR and PyBytes_GET_SIZE(f) > self.keys.big_min:
                self.keys.big("reply", name.lower(), self.raws[head - 1], PyBytes_GET_SIZE(f))
        self.head = head
        self._compact()

    def drop(self, Py_ssize_t n):
        """n requests leave the plain path unwritten: (([name], raw), read time) each, oldest first."""
        cdef Py_ssize_t end = min(self.head + n, len(self.names))
        out = [(([nm], r), t) for nm, r, t in zip(self.names[self.head:end], self.raws[self.head:end],
                                                  self.t0s[self.head:end])]
        self.head = end
        self._compact()
        return out
