"""Per-command statistics measured at the proxy: calls, errors, refusals, time, latency percentiles.

One record per reply vproxy writes to a client, with the time from the read that brought the
request in to the moment its reply is handed to the client's socket (what the client sees, less
the network). Rendered as Redis 7 renders its own:

    INFO proxy_commandstats  ->  cmdstat_get:calls=N,usec=N,usec_per_call=F,rejected_calls=N,failed_calls=N
    INFO proxy_latencystats  ->  latency_percentiles_usec_get:p50=F,p99=F,p99.9=F

and exported to Prometheus (metrics.py). `failed_calls`: error replies (from the server or vproxy);
`rejected_calls`: requests vproxy refused before sending them anywhere (NOAUTH, wrong arity, a
command it does not pass through). Unknown command names are counted apart (`unknown`), never
given an entry: a client sending random names cannot grow the table.

Latency histogram: log-linear buckets, 32 per power of two above 64 us (HdrHistogram's idea with
5 significant bits): values below 64 us are exact, above that a bucket is at most 1/32 (3.1 %)
wide, and a percentile is reported as its bucket's middle (within 1.6 %). Recording is a few
integer operations and one list increment.
"""

from __future__ import annotations

import heapq
from collections import deque
from operator import itemgetter
from time import monotonic, time

from .twins import twin

SUB = 32  # buckets per power of two (above 2 * SUB)
NBUCKETS = SUB * 30  # up to ~2**34 us (4.7 hours); longer is counted in the last bucket
# The edges of the Prometheus histogram (metrics.py), in microseconds: 50 us to 10 s.
PROM_EDGES_US = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
                 1000000, 2500000, 10000000)


def bucket(us: int) -> int:
    """The histogram bucket of a latency in microseconds."""
    if us < 2 * SUB:
        return us if us > 0 else 0
    shift = us.bit_length() - 6  # 6: bits of 2 * SUB
    i = SUB * shift + (us >> shift)
    return i if i < NBUCKETS else NBUCKETS - 1


def bucket_range(i: int) -> tuple[int, int]:
    """[low, high) of the values that fall in bucket i."""
    if i < 2 * SUB:
        return i, i + 1
    shift = i // SUB - 1
    m = i - SUB * shift
    return m << shift, (m + 1) << shift


def bucket_value(i: int) -> float:
    """What a percentile that falls in bucket i reports: the middle of its range."""
    low, high = bucket_range(i)
    return low if high - low == 1 else (low + high - 1) / 2


class CommandStat:
    """One command's figures since start (or the last reset)."""

    __slots__ = ("calls", "failed", "hist", "max", "min", "rejected", "usec")

    def __init__(self):
        self.calls = self.failed = self.rejected = self.usec = self.max = 0
        self.min = -1
        self.hist = [0] * NBUCKETS

    def record(self, us: int, failed: bool) -> None:
        """One call that took `us` microseconds; failed: its reply was an error."""
        self.calls += 1
        self.usec += us
        if failed:
            self.failed += 1
        if us > self.max:
            self.max = us
        if us < self.min or self.min < 0:
            self.min = us
        self.hist[bucket(us)] += 1

    def percentile(self, p: float) -> float:
        """The p-th percentile (0-100) of the recorded latencies, in us (0 when there are none)."""
        total = self.calls
        if not total:
            return 0.0
        rank = max(1, -(-total * p // 100))  # the smallest value with at least p % at or below it
        seen = 0
        for i, n in enumerate(self.hist):
            if n:
                seen += n
                if seen >= rank:
                    return float(bucket_value(i))
        return float(self.max)

    def below(self, us: int) -> int:
        """How many recorded latencies are at most `us` (whole buckets; `us` is a bucket edge)."""
        return sum(self.hist[:bucket(us)])


class CommandStats:
    """Every command's CommandStat, recorded by the client sessions and outboxes (see record)."""

    ALIASES = 4096  # command names as clients spell them, mapped to their entry

    def __init__(self, known, enabled: bool = True, percentiles=(50.0, 99.0, 99.9),
                 slower_than_us: int = 10000, slowlog_len: int = 128, first_key=lambda name: 0,
                 hotkeys_sample: int = 128):
        self.known = known  # name -> bool: a command the table knows (only those get an entry)
        self.keys = KeyStats(first_key, hotkeys_sample)
        self.enabled = enabled
        self.percentiles = tuple(percentiles)
        self.by_name: dict[bytes, CommandStat] = {}
        self.alias: dict[bytes, CommandStat] = {}  # name as written -> entry (see entry_for)
        self.unknown = 0  # requests naming no known command
        self.sampled = 0  # requests since the last hot-key sample
        self.since = monotonic()
        self.slowlog = SlowLog(slowlog_len)
        # a request slower than this (seconds) goes to the slow log; None: none does
        self.slow_s = slower_than_us / 1e6 if slower_than_us >= 0 else None

    def entry_for(self, name: bytes) -> CommandStat | None:
        """The entry of a command name as the client wrote it ("GET", "get" ...): looked up in
        lower case once, then remembered as written (at most ALIASES spellings)."""
        st = self._entry(name.lower())
        if st is not None and len(self.alias) < self.ALIASES:
            self.alias[name] = st
        return st

    def _entry(self, name: bytes) -> CommandStat | None:
        st = self.by_name.get(name)
        if st is None:
            if not self.known(name):
                self.unknown += 1
                return None
            st = self.by_name[name] = CommandStat()
        return st

    def record(self, name: bytes, seconds: float, failed: bool) -> None:
        """A reply went out: name's request took `seconds` from read to write; failed: an error reply."""
        st = self.by_name.get(name) or self._entry(name)
        if st is not None:
            st.record(int(seconds * 1e6), failed)

    def reject(self, name: bytes) -> None:
        """vproxy refused the request (it was never sent): rejected, not a call (as Redis counts)."""
        st = self.by_name.get(name) or self._entry(name)
        if st is not None:
            st.rejected += 1

    def record_batch(self, session, reqs: list, replies: list, start: int, upto: int, t0: float,
                     rejected) -> None:
        """The batch path: replies[start:upto] are written now for the requests reqs[start:upto]
        ((args, raw) pairs) read at t0; `rejected` holds the indices vproxy refused."""
        now = monotonic()
        slow = self.slow_s
        took = now - t0
        for i in range(start, upto):
            frame = replies[i]
            if frame is None:
                continue  # no reply goes out (CLIENT REPLY OFF ...)
            args, raw = reqs[i]
            name = args[0].lower()
            if rejected and i in rejected:
                self.reject(name)
                continue
            self.record(name, took, frame[:1] in ERRORS)
            if slow is not None and took > slow:
                self.slowlog.add(session, raw, took)
            self.request_seen(name, raw, args)
            if len(frame) > self.keys.big_min:
                self.keys.big("reply", name, raw, len(frame))

    def request_seen(self, name: bytes | None, raw: bytes, args: list) -> None:
        """Hot-key sampling and big requests; name: args[0] in lower case, None when not at hand."""
        keys = self.keys
        if keys.sample:
            self.sampled += 1
            if self.sampled >= keys.sample:
                self.sampled = 0
                keys.seen(name or args[0].lower(), raw)
        if len(raw) > keys.big_min:
            keys.big("request", name or args[0].lower(), raw, len(raw))

    def slow(self, session, raw: bytes, seconds: float) -> None:
        self.slowlog.add(session, raw, seconds)

    def reset(self) -> None:
        self.by_name.clear()
        self.alias.clear()
        self.unknown = 0
        self.since = monotonic()
        self.keys.reset()

    # ---- rendering (INFO sections, PROXY STATS) ----

    def commandstats_text(self) -> str:
        lines = ["# Proxy_commandstats"]
        for name in sorted(self.by_name):
            st = self.by_name[name]
            per = st.usec / st.calls if st.calls else 0.0
            lines.append(f"cmdstat_{name.decode(errors='replace')}:calls={st.calls},usec={st.usec},"
                         f"usec_per_call={per:.2f},rejected_calls={st.rejected},failed_calls={st.failed}")
        return "\r\n".join(lines) + "\r\n"

    def latencystats_text(self) -> str:
        lines = ["# Proxy_latencystats"]
        for name in sorted(self.by_name):
            st = self.by_name[name]
            if not st.calls:
                continue
            values = ",".join(f"p{_pct_label(p)}={st.percentile(p):.3f}" for p in self.percentiles)
            lines.append(f"latency_percentiles_usec_{name.decode(errors='replace')}:{values}")
        return "\r\n".join(lines) + "\r\n"

    def table(self) -> list[dict]:
        """Every command's figures (PROXY STATS, vproxy top): calls, failed, rejected, usec, min,
        max, avg and p50/p95/p99/p99.9."""
        out = []
        for name in sorted(self.by_name):
            st = self.by_name[name]
            out.append({"command": name.decode(errors="replace"), "calls": st.calls, "failed": st.failed,
                        "rejected": st.rejected, "usec": st.usec, "min": max(st.min, 0), "max": st.max,
                        "avg": round(st.usec / st.calls, 2) if st.calls else 0.0,
                        **{f"p{_pct_label(p)}": st.percentile(p) for p in (50, 95, 99, 99.9)}})
        return out


ERRORS = (b"-", b"!")  # RESP2/RESP3 simple error, RESP3 blob error


def _pct_label(p: float) -> str:
    return f"{p:g}"


def nth_arg(raw: bytes, n: int) -> bytes | None:
    """Argument n (0: the command name) of one RESP request, read off its bytes (None: not there,
    or an inline request); cheaper than parsing it again."""
    if raw[:1] != b"*":
        return None
    pos = raw.find(b"\r\n") + 2
    for _ in range(n):
        end = raw.find(b"\r\n", pos)
        if end < 0 or raw[pos:pos + 1] != b"$":
            return None
        pos = end + 2 + int(raw[pos + 1:end]) + 2
    end = raw.find(b"\r\n", pos)
    if end < 0 or raw[pos:pos + 1] != b"$":
        return None
    start = end + 2
    return raw[start:start + int(raw[pos + 1:end])]


class KeyStats:
    """PROXY HOTKEYS and PROXY BIGKEYS.

    Hot keys: one request in `sample` (plain and batch path alike) has its first key counted in
    the current 10-second slot; six slots make the last minute. A slot holds at most CAP keys:
    past that, the keys seen once go (and if that is not enough, all but the CAP/2 most counted):
    a key that is hot stays, memory is bounded whatever the key space, and the pruning costs
    little per sample. Counts are scaled back by `sample`.
    Big keys: the BIG largest requests and replies seen (size, command, key), since start or reset.
    """

    SLOT_SECONDS = 10
    SLOTS = 6
    CAP = 2048
    BIG = 16
    BIG_FLOOR = 1024  # smaller requests and replies are never "big"

    def __init__(self, first_key, sample: int):
        self.first_key = first_key  # name -> position of its first key (0: none)
        self.sample = sample  # 0: hot keys off
        self.slots: deque = deque()  # (slot number, {key: count})
        self.bigs: list = []  # heap of (size, seq, kind, command, key)
        self.big_min = self.BIG_FLOOR
        self.seq = 0

    def seen(self, name: bytes, raw: bytes) -> None:
        """A sampled request: count its first key."""
        pos = self.first_key(name)
        key = nth_arg(raw, pos) if pos > 0 else None
        if key is None:
            return
        now = int(monotonic()) // self.SLOT_SECONDS
        slots = self.slots
        if not slots or slots[-1][0] != now:
            slots.append((now, {}))
            while len(slots) > self.SLOTS or slots[0][0] <= now - self.SLOTS:
                slots.popleft()
        counts = slots[-1][1]
        counts[key] = counts.get(key, 0) + 1
        if len(counts) > self.CAP:  # the long tail goes: keys seen once, or past the CAP/2 most seen
            keep = [kv for kv in counts.items() if kv[1] > 1]
            if len(keep) > self.CAP // 2:
                keep = heapq.nlargest(self.CAP // 2, keep, key=itemgetter(1))
            counts.clear()
            counts.update(keep)

    def big(self, kind: str, name: bytes, raw: bytes, size: int) -> None:
        """A request or reply larger than big_min."""
        pos = self.first_key(name)
        key = (nth_arg(raw, pos) if pos > 0 else None) or b""
        self.seq += 1
        entry = (size, self.seq, kind, name, key)
        if len(self.bigs) < self.BIG:
            heapq.heappush(self.bigs, entry)
        else:
            heapq.heappushpop(self.bigs, entry)
        if len(self.bigs) == self.BIG:
            self.big_min = max(self.BIG_FLOOR, self.bigs[0][0])

    def hot(self, n: int = 10) -> list[tuple[bytes, int, float]]:
        """The n most requested keys over the last minute: (key, requests, requests per second)."""
        now = int(monotonic()) // self.SLOT_SECONDS
        total: dict = {}
        slots = [(k, c) for k, c in self.slots if k > now - self.SLOTS]
        for _, counts in slots:
            for key, c in counts.items():
                total[key] = total.get(key, 0) + c
        span = max(1.0, monotonic() - slots[0][0] * self.SLOT_SECONDS) if slots else 1.0
        top = heapq.nlargest(n, total.items(), key=lambda kv: kv[1])
        return [(key, c * self.sample, round(c * self.sample / span, 2)) for key, c in top]

    def biggest(self, n: int = 10) -> list[tuple[int, str, bytes, bytes]]:
        """The n largest requests and replies: (bytes, 'request' or 'reply', command, key)."""
        return [(size, kind, name, key) for size, _, kind, name, key in sorted(self.bigs, reverse=True)[:n]]

    def reset(self) -> None:
        self.slots.clear()
        self.bigs.clear()
        self.big_min = self.BIG_FLOOR


class SlowLog:
    """PROXY SLOWLOG: the latest requests slower than slowlog_log_slower_than, newest first, in the
    shape of the server's SLOWLOG GET entries: id, unix time, microseconds, arguments (at most 32,
    each cut to 128 bytes, as Redis cuts them), client address, client name."""

    MAX_ARGS = 32
    MAX_ARG_LEN = 128

    def __init__(self, maxlen: int):
        self.entries: deque = deque(maxlen=maxlen)
        self.next_id = 0

    RAW_KEPT = 8192  # a request up to this size is kept as it is and shown when asked for

    def add(self, session, raw: bytes, seconds: float) -> None:
        """Cheap: under overload every request can be slower than the threshold, so an entry keeps
        the request's bytes (or, for a big one, its cut arguments) and is shown when asked for."""
        if self.entries.maxlen == 0:
            return
        shown = raw if len(raw) <= self.RAW_KEPT else self._show(raw)
        self.entries.appendleft((self.next_id, int(time()), int(seconds * 1e6), shown,
                                 session.addr, session.name))
        self.next_id += 1

    def _show(self, raw: bytes) -> list:
        """A request's arguments as SLOWLOG shows them: at most 32, each cut to 128 bytes."""
        from .resp import PureRequestParser  # one request's bytes, parsed again

        try:
            args = PureRequestParser().feed(raw)[0][0]
        except Exception:  # noqa: BLE001 - never: raw is what the parser accepted once
            args = [raw[:self.MAX_ARG_LEN]]
        shown = [a if len(a) <= self.MAX_ARG_LEN else a[:self.MAX_ARG_LEN] + b"... (%d more bytes)"
                 % (len(a) - self.MAX_ARG_LEN) for a in args[:self.MAX_ARGS]]
        if len(args) > self.MAX_ARGS:
            shown[-1] = b"... (%d more arguments)" % (len(args) - self.MAX_ARGS + 1)
        return shown

    def get(self, n: int | None = 10) -> list:
        """The newest n entries (all when n is None): [id, time, us, arguments, b'host:port', name]."""
        items = list(self.entries)
        if n is not None and n >= 0:
            items = items[:n]
        return [[i, t, us, self._show(shown) if type(shown) is bytes else shown,
                 ("%s:%s" % addr[:2] if addr else ":0").encode(), name]
                for i, t, us, shown, addr, name in items]

    def reset(self) -> None:
        self.entries.clear()


class Track:
    """The plain path's record of requests in flight (an outbox's): each request as the parser gave
    it ((args, raw)) and its read time, in the order their replies are written (outbox.push calls
    written()). Nothing is built per request but the entry."""

    __slots__ = ("entries", "session", "stats", "t0")

    def __init__(self, stats: CommandStats, session):
        self.stats, self.session = stats, session
        self.entries: deque = deque()  # ((args, raw), read time)
        self.t0 = 0.0

    def start(self, t0: float) -> None:
        """The read time of the requests add() is given next (one call per read)."""
        self.t0 = t0

    def add(self, req: tuple) -> None:
        args, raw = req
        self.entries.append((([args[0]], raw), self.t0))  # the name and bytes only: the arguments go
        self.stats.request_seen(None, raw, args)

    def add_many(self, reqs: list, start: int, end: int) -> None:
        """reqs[start:end], sent in this order (one call per read on the standalone plain path)."""
        for i in range(start, end):
            self.add(reqs[i])

    def written(self, frames: list) -> None:
        """These replies (in order) are handed to the socket now."""
        now = monotonic()
        stats = self.stats
        entries, slow, alias = self.entries, stats.slow_s, stats.alias
        for f in frames:
            if not entries:
                return
            (args, raw), t0 = entries.popleft()
            st = alias.get(args[0]) or stats.entry_for(args[0])
            if st is None:
                continue
            took = now - t0
            st.record(int(took * 1e6), f[:1] in ERRORS)
            if slow is not None and took > slow:
                stats.slow(self.session, raw, took)
            if len(f) > stats.keys.big_min:
                stats.keys.big("reply", args[0].lower(), raw, len(f))

    def drop(self, n: int) -> list:
        """n requests leave the plain path unwritten (held replies the batch path records): their
        ((args, raw), read time) entries, oldest first."""
        entries = self.entries
        return [entries.popleft() for _ in range(min(n, len(entries)))]


# ---- the compiled twin (vproxy/_stats.pyx) when it is built: same interface, C integers and arrays ----
PureCommandStat, PureTrack = CommandStat, Track
_twin = twin("_stats")
IMPL = "pure" if _twin is None else "compiled"
if _twin is not None:
    CommandStat, Track = _twin.CommandStat, _twin.Track
