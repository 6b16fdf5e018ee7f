# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of the plain path's per-request code (the Python references: outbox.Outbox,
plain.PlainPath.forward_plain, cluster.session.ClusterSession.forward_plain and mux.channel.Channel._deliver).

What the twins save is the interpreter's work per request: the outbox is a cdef class whose
counters are C integers, and the loops over a read's requests and a read's replies run in C, with
the channels' and batches' Python attributes reached through the C API. The logic is the
reference's, line for line; tests run both (VPROXY_PURE=1 picks the references).
"""

from cpython.list cimport PyList_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from libc.string cimport memchr
from cpython.object cimport PyObject

from vproxy._clock cimport now_monotonic

import gevent
from gevent.hub import Waiter, get_hub, getcurrent

# set by the modules whose names these are (bind): mux.channel's hold-mode list and the callback
# that pushes it, its error class and error text; CommandTable.fast_key and slots.key_slot
cdef list _touched = None
cdef object _push_touched = None
cdef object BackendError = None
cdef object fast_key = None
cdef object backend_unavailable = None


def bind(touched=None, push_touched=None, backend_error=None, unavailable=None,
         fast_key_of=None) -> None:
    """The Python objects the twins call, given by the modules that define them."""
    global _touched, _push_touched, BackendError, backend_unavailable, fast_key
    if touched is not None:
        _touched, _push_touched, BackendError = touched, push_touched, backend_error
        backend_unavailable = unavailable
    if fast_key_of is not None:
        fast_key = fast_key_of





# ---- slots.key_slot, compiled: CRC16 (XMODEM) of the key or its hash tag, in one pass over bytes ----

cdef unsigned short CRC16[256]


cdef void _crc16_table() noexcept:
    cdef unsigned int i, j, crc
    for i in range(256):
        crc = i << 8
        for j in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        CRC16[i] = crc & 0xFFFF


_crc16_table()


cdef inline Py_ssize_t slot_of(bytes key) noexcept:
    """The cluster slot of a key (hash tags honoured); forward_plain_cluster calls it in C."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(key)
    cdef const unsigned char *open_
    cdef const unsigned char *close
    cdef Py_ssize_t n = PyBytes_GET_SIZE(key), i
    cdef unsigned int crc = 0
    open_ = <const unsigned char *>memchr(p, 123, n)  # '{'
    if open_ != NULL:
        close = <const unsigned char *>memchr(open_ + 1, 125, n - (open_ + 1 - p))  # '}'
        if close != NULL and close > open_ + 1:
            p = open_ + 1
            n = close - p
    for i in range(n):
        crc = ((crc << 8) & 0xFFFF) ^ CRC16[((crc >> 8) ^ p[i]) & 0xFF]
    return crc & 0x3FFF


def key_slot(key):
    """slots.key_slot: the cluster slot of a key (hash tags honoured)."""
    if type(key) is not bytes:
        key = key.encode() if isinstance(key, str) else bytes(key)
    return slot_of(key)


cdef class Outbox:
    """outbox.Outbox (the reference: its docstrings say what each method does)."""

    cdef public bint closed, stuck, touched
    cdef public object held, hold, hub, on_overflow, on_stuck, out, pending, raw
    cdef public list frames, meta
    cdef public object track, waiter, watcher
    cdef public Py_ssize_t left, limit, next_seq, write_seq

    def __init__(self, sock, hold=None):
        self.raw = sock._sock
        self.hold = hold
        self.frames = []
        self.meta = []
        self.next_seq = self.write_seq = 0
        self.held = []
        self.stuck = False
        self.on_stuck = None
        self.limit = 0
        self.on_overflow = None
        self.left = 0
        self.pending = []
        self.out = b""
        self.watcher = None
        self.waiter = None
        self.closed = False
        self.hub = get_hub()
        self.touched = False
        self.track = None

    cpdef bint idle(self):
        return not self.left and not self.out and not self.pending and not self.touched

    def take(self, frame):
        self.pending.append(frame)
        self.left -= 1

    def fail(self, Py_ssize_t idx, frame, sent):
        if idx == -1:
            self.take(frame)
        else:
            self.put(-2 - idx, (frame, sent))
            self.left -= 1
        self.push()

    cpdef put(self, Py_ssize_t seq, frame):
        cdef Py_ssize_t pos = seq - self.write_seq
        if 0 <= pos < PyList_GET_SIZE(self.frames):
            self.frames[pos] = frame

    def meta_of(self, Py_ssize_t seq):
        return self.meta[seq - self.write_seq]

    cpdef push(self):
        cdef list pending
        self.touched = False
        if self.hold is not None:
            self._sort()
        pending = self.pending
        if pending:
            if self.track is not None:
                self.track.written(pending)
            data = pending[0] if PyList_GET_SIZE(pending) == 1 else b"".join(pending)
            del pending[:]
            if self.out:
                self.out += data
                if self.limit and len(self.out) > self.limit:
                    self._overflow()
            elif not self.closed:
                self._send(data)
        if self.waiter is not None and self.idle():
            self._wake()

    cdef _sort(self):
        cdef list frames = self.frames, meta = self.meta
        cdef Py_ssize_t i = 0, n = PyList_GET_SIZE(frames)
        cdef bint newly = False
        cdef bytes fb
        hold = self.hold
        while not self.stuck and i < n and frames[i] is not None:
            f = frames[i]
            m = meta[i]
            i += 1
            fact = None
            if type(f) is tuple:
                f, fact = f
            fb = f  # a reply is bytes (typed: checked)
            if fact is not None or (PyBytes_GET_SIZE(fb) and PyBytes_AS_STRING(fb)[0] == 45  # '-'
                                    and fb.startswith(hold)):
                self.stuck = newly = True
                self.held.append((f, fact, m))
            else:
                self.pending.append(f)
        if i:
            del frames[:i]
            del meta[:i]
            self.write_seq += i
        if newly and self.on_stuck is not None:
            self.on_stuck()

    def send(self, ch, req, meta, deadline):
        cdef Py_ssize_t seq = self.next_seq
        self.next_seq = seq + 1
        self.meta.append(meta)
        self.frames.append(None)
        if self.track is not None:
            self.track.add(req)
        ch.submit(req[1], self, -2 - seq, deadline)

    def held_all(self):
        held, self.held = self.held, []
        for f, m in zip(self.frames, self.meta):
            held.append((*f, m) if type(f) is tuple else (f, None, m))
        del self.frames[:]
        del self.meta[:]
        self.write_seq = self.next_seq
        self.stuck = False
        return held

    cdef _send(self, data):
        cdef Py_ssize_t n
        try:
            n = self.raw.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.closed = True
            return
        if n < len(data):
            self.out = data[n:]
            if self.limit and len(self.out) > self.limit:
                return self._overflow()
            if self.watcher is None:
                self.watcher = self.hub.loop.io(self.raw.fileno(), 2)
            self.watcher.start(self._on_writable)

    cdef _overflow(self):
        size = len(self.out)
        self.close()
        if self.on_overflow is not None:
            self.on_overflow(size)

    def _on_writable(self):
        out, self.out = self.out, b""
        self.watcher.stop()
        if not self.closed:
            self._send(out)
        if self.waiter is not None and self.idle():
            self._wake()

    cdef _wake(self):
        w, self.waiter = self.waiter, None
        if getcurrent() is self.hub:
            w.switch(None)
        else:
            self.hub.loop.run_callback(w.switch, None)

    def wait_idle(self):
        while not self.idle() and not self.closed:
            w = self.waiter = Waiter()
            try:
                w.get()
            finally:
                if self.waiter is w:
                    self.waiter = None

    def close(self):
        self.closed = True
        del self.pending[:]
        del self.held[:]
        del self.frames[:]
        del self.meta[:]
        self.out = b""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None


def deliver(self, list frames, bint in_hub):
    """Channel._deliver (bound as that method)."""
    popleft = self.waiters.popleft
    cdef list boxes = []
    cdef Outbox box
    cdef Py_ssize_t idx, left
    cdef tuple w
    try:
        for frame in frames:
            try:
                w = <tuple>popleft()
            except IndexError:
                raise BackendError("reply with no request waiting for it") from None
            batch = w[0]
            idx = w[1]
            if idx < 0:
                box = <Outbox>batch
                if idx == -1:
                    box.pending.append(frame)
                else:
                    box.put(-2 - idx, frame)
                box.left -= 1
                if not box.touched:
                    box.touched = True
                    boxes.append(box)
            elif batch is not None:
                batch.replies[idx] = frame
                left = batch.left - 1
                batch.left = left
                if not left:
                    batch.done(in_hub)
                    if self.closed:
                        return
    finally:
        for box in boxes:
            if box.hold is None:
                box.push()
            else:
                if not _touched:
                    self._loop.run_callback(_push_touched)
                _touched.append(box)


def forward_plain(self, list reqs, bint wait=True):
    """PlainPath.forward_plain (bound as that method)."""
    cdef Outbox box = <Outbox?>self.outbox
    cdef Py_ssize_t k = 0, told = 0, nargs, arity, n = PyList_GET_SIZE(reqs)
    cdef Py_ssize_t window = self.window, unsent = 0
    cdef tuple req, spec
    cdef list args, outbuf = None
    cdef PyObject *found
    table = self.app.commands
    cdef dict specs = table.plain_specs
    forwards = self.forwards
    cdef bint default = self.acl is None  # else a proxy user's limits narrow what may go (gate.py)
    ch = entry = waiters = name = None
    track = box.track
    if track is not None:
        track.start(self.last_active)
    try:
        while k < n:
            req = <tuple>reqs[k]
            args = <list>req[0]
            found = PyDict_GetItem(specs, args[0])
            spec = <tuple>found if found is not NULL else table.plain_spec(args[0])
            nargs = PyList_GET_SIZE(args)
            if default:
                arity = spec[1]
                if not spec[2] or (arity and (nargs != arity if arity > 0 else nargs < -arity)):
                    break
            elif not forwards(spec[0], nargs):
                break
            if ch is None:
                ch = current_channel(self)
                if ch is None:
                    ch = self._plain_channel(wait)
                    if ch is None:
                        break
                entry = (box, -1, deadline_of(self.app.cfg.command_timeout))
                waiters, outbuf = ch.waiters, ch.outbuf
            if box.left >= window or box.out:
                if unsent:
                    ch.unsent += unsent
                    unsent = 0
                if track is not None and k > told:
                    track.add_many(reqs, told, k)
                    told = k
                kick(ch)
                if not self._room(wait):
                    break
                window = self.window  # _room reads it afresh: the wait may have changed it
            if ch.closed:
                break
            name = spec[0]
            waiters.append(entry)
            outbuf.append(req[1])
            unsent += 1
            box.left += 1
            k += 1
    finally:  # what was queued is counted, sent and told, whatever happened
        if unsent:
            ch.unsent += unsent
        if k:
            self.last_cmd = name
            kick(ch)
        if track is not None and k > told:
            track.add_many(reqs, told, k)
    return k


def on_readable(self):
    """PlainPath._on_readable (bound as that method)."""
    try:
        data = self.sock._sock.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        return self._hand(None)
    self.last_active = now_monotonic()
    try:
        reqs = self.parser.feed(data)
        if not reqs:
            return
        self.app.stats.commands += len(reqs)
        done = self.forward_plain(reqs, False)
    except Exception as e:  # ProtocolError, or a bug: the greenlet says it or logs it
        return self._hand(e)
    if done < len(reqs):
        self._hand(reqs[done:] if done else reqs)


def channel_on_readable(self):
    """Channel._on_readable (bound as that method)."""
    try:
        data = self.conn.sock._sock.recv(262144)
        if not data:
            return self.abort(backend_unavailable(self.conn.name, "connection closed by backend"))
        frames = self.conn.framer.feed(data)
        if frames:
            deliver(self, frames, True)
    except BlockingIOError:
        pass
    except (OSError, AttributeError, BackendError, ValueError) as e:
        why = e if isinstance(e, BackendError) else "connection lost"
        self.abort(backend_unavailable(self.conn.name, str(why)))


def channel_flush(self):
    """Channel._flush (bound as that method)."""
    cdef list outbuf = self.outbuf
    cdef Py_ssize_t sent
    if self.closed or not outbuf:
        self.flushing = False
        return
    data = b"".join(outbuf) if PyList_GET_SIZE(outbuf) > 1 else outbuf[0]
    del outbuf[:]
    self.unsent = 0
    try:
        sent = self.conn.sock._sock.send(data)
    except BlockingIOError:
        sent = 0
    except (OSError, AttributeError):
        return self.abort(backend_unavailable(self.conn.name, "connection lost while sending"))
    if sent < len(data):
        self.writer = gevent.spawn(self._drain, data[sent:])
    else:
        self.flushing = False


cdef class Lane:
    """forward_plain_cluster's view of one channel during a call: its queues' append methods and
    how many requests it was given (Channel.unsent is counted up once, by flush_lanes)."""
    cdef object ch, wappend, oappend
    cdef Py_ssize_t unsent

    def __cinit__(self, ch):
        self.ch = ch
        self.wappend = ch.waiters.append
        self.oappend = ch.outbuf.append
        self.unsent = 0


cdef void flush_lanes(dict lanes) except *:
    """What the lanes were given goes out (Channel.unsent counted, the send scheduled)."""
    cdef Lane lane
    for lane in lanes.values():
        if lane.unsent:
            lane.ch.unsent += lane.unsent
            lane.unsent = 0
            kick(lane.ch)


cdef inline void send_numbered(Outbox box, Lane lane, bytes raw, tuple meta, deadline) except *:
    """box.send(ch, req, meta, deadline), inlined with Channel.submit: the next numbered request
    goes on the lane (the cluster and HA twins)."""
    cdef Py_ssize_t seq = box.next_seq
    box.next_seq = seq + 1
    box.meta.append(meta)
    box.frames.append(None)
    box.left += 1
    lane.wappend((box, -2 - seq, deadline))
    lane.oappend(raw)
    lane.unsent += 1


cdef void lanes_done(self, dict lanes, Py_ssize_t k, last, track, list reqs, Py_ssize_t told) except *:
    """The end of a cluster or HA twin's call: what was queued is counted, sent and told."""
    flush_lanes(lanes)
    if k:
        self.last_cmd = last
    if track is not None and k > told:
        track.add_many(reqs, told, k)


def forward_plain_cluster(self, list reqs, bint wait=True):
    """ClusterSession.forward_plain (bound as that method). Per request: the name and key position
    from the table's caches, the slot, the owner's lane (one per node, validated once per call and
    again after a wait), a sequence number and the two appends; the statistics are told a run at a
    time (Track.add_many, in send order, which is the order the replies are written in)."""
    cdef Outbox box = <Outbox?>self.outbox
    cdef Py_ssize_t k = 0, told = 0, n = PyList_GET_SIZE(reqs), window = self.window, pos, slot
    cdef Py_ssize_t nargs, arity
    cdef tuple req, spec
    cdef list args
    cdef bytes karg
    cdef dict lanes = {}, chans, specs, derived
    cdef Lane lane
    cdef PyObject *found
    if self.ns is not None or self.reads or box.stuck:
        return 0
    table, key = self.app.commands, self.key()
    specs, derived = table.plain_specs, table.derived
    forwards = self.forwards if self.acl is not None else None  # a proxy user's limits (gate.py)
    owners = self.app.router.topology.slot_owners
    chans = self.chans
    deadline = None
    track = box.track
    if track is not None:
        track.start(self.last_active)
    last = None
    try:
        while k < n:
            req = <tuple>reqs[k]
            args = <list>req[0]
            nargs = PyList_GET_SIZE(args)
            found = PyDict_GetItem(specs, args[0])
            name = (<tuple>found if found is not NULL else table.plain_spec(args[0]))[0]
            found = PyDict_GetItem(derived, name)  # CommandTable.fast_key's cache: (key position, arity)
            if found is NULL:  # not cached (a bounded cache): fast_key decides, arity included
                pos = fast_key(table, name, nargs)
                if not pos:
                    break
            else:
                spec = <tuple>found
                pos, arity = spec[0], spec[1]
                if not pos or pos >= nargs or (nargs != arity if arity > 0 else nargs < -arity):
                    break
            if forwards is not None and not forwards(name, nargs):
                break
            karg = args[pos]  # bytes, from the parser (typed: checked)
            slot = slot_of(karg)
            addr = owners[slot]
            found = PyDict_GetItem(lanes, addr)
            if found is NULL:
                ch = chans.get(addr)
                if ch is None or ch.closed or ch.key != key:
                    break  # the batch path opens it
                lane = lanes[addr] = Lane(ch)
            else:
                lane = <Lane>found
            if box.left >= window or box.out:
                flush_lanes(lanes)
                if track is not None and k > told:
                    track.add_many(reqs, told, k)
                    told = k
                if not self._room(wait):
                    break
                window = self.window  # _room reads it afresh: a wait may have changed it (flush)
                lanes.clear()  # the loop ran meanwhile: every channel is looked at again
                ch = lane.ch
                if ch.closed:
                    break
                lane = lanes[addr] = Lane(ch)
            if deadline is None:
                deadline = deadline_of(self.app.cfg.command_timeout)
            send_numbered(box, lane, req[1], (req[1], slot, name, addr), deadline)
            last = name
            k += 1
    finally:  # what was queued is counted, sent and told, whatever happened
        lanes_done(self, lanes, k, last, track, reqs, told)
    return k


cdef current_channel(self):
    """The session's channel when _plain_channel would keep it (open, shared, for its key, on the
    primary's pool), else None: _plain_channel's common case without its three calls."""
    ch = self.cur
    if ch is None or ch.closed or ch.exclusive:
        return None
    router = self.app.router
    addr = router.topology.primary
    if addr is None or router.pools.get(addr) is not ch.pool or ch.key != self.key():
        return None
    return ch


cdef inline kick(ch):
    """Channel.kick, inlined."""
    if not ch.flushing and ch.ready and ch.outbuf:
        ch.flushing = True
        ch._loop.run_callback(ch._flush)


cdef inline double deadline_of(double seconds):
    """mux.channel.deadline_after."""
    return now_monotonic() + seconds if seconds > 0 else 0.0




def forward_plain_ha(self, list reqs, bint wait=True):
    """PlainPath.forward_plain_ha (bound as HASession.forward_plain): as forward_plain_cluster, with
    the pool the router picks per request (the primary, or a replica for a read) for the node."""
    cdef Outbox box = <Outbox?>self.outbox
    cdef Py_ssize_t k = 0, told = 0, n = PyList_GET_SIZE(reqs), window = self.window
    cdef tuple req
    cdef list args
    cdef dict chans = self.plain_chans, lanes = {}
    cdef Lane lane
    cdef PyObject *found
    if box.stuck:
        return 0
    router = self.app.router
    forwards = self.forwards
    key = self.key()
    deadline = None
    track = box.track
    if track is not None:
        track.start(self.last_active)
    last = None
    try:
        while k < n:
            req = <tuple>reqs[k]
            args = <list>req[0]
            name = args[0].lower()
            if not forwards(name, PyList_GET_SIZE(args)):
                break
            if router.topology.primary is None:
                break  # a failover: the batch path waits for the new primary
            if box.left >= window or box.out:
                flush_lanes(lanes)
                if track is not None and k > told:
                    track.add_many(reqs, told, k)
                    told = k
                if not self._room(wait):
                    break
                window = self.window  # _room reads it afresh: a wait may have changed it (flush)
                lanes.clear()  # the loop ran meanwhile: every channel is looked at again
            try:
                pool = router.pool_for(name, args, self)
            except BackendError:
                break
            found = PyDict_GetItem(lanes, pool)
            if found is NULL:
                ch = chans.get(pool)  # one channel per pool: requests to one server keep their order
                if ch is None or ch.closed or ch.key != key:
                    try:
                        ch = chans[pool] = pool.channel(key)
                    except BackendError:
                        break
                lane = lanes[pool] = Lane(ch)
            else:
                lane = <Lane>found
            if deadline is None:
                deadline = deadline_of(self.app.cfg.command_timeout)
            send_numbered(box, lane, req[1], (req[1], name, key, pool), deadline)
            last = name
            k += 1
    finally:  # what was queued is counted, sent and told, whatever happened
        lanes_done(self, lanes, k, last, track, reqs, told)
    return k
