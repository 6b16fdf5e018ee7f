"""Per-command statistics at the proxy: INFO proxy_commandstats / proxy_latencystats /
proxy_backendstats, PROXY STATS, PROXY SLOWLOG, CONFIG RESETSTAT; the histogram and the compiled twin."""

from __future__ import annotations

import random
import time

import pytest
import redis
from conftest import Proxy, RawClient, Server, wait_for

from vproxy import cmdstats
from vproxy.cmdstats import NBUCKETS, SUB, bucket, bucket_range, bucket_value

try:
    from vproxy import _stats as compiled
except ImportError:
    compiled = None
NOT_BUILT = pytest.mark.skipif(compiled is None, reason="the compiled twin vproxy/_stats.pyx is not built")
STATS = [pytest.param(cmdstats.PureCommandStat, id="pure"),
         pytest.param(getattr(compiled, "CommandStat", None), id="compiled", marks=NOT_BUILT)]


# ---- the histogram ----

def test_buckets_hold_their_values_within_the_stated_error():
    values = list(range(0, 5000)) + [random.Random(1).randrange(1, 1 << 33) for _ in range(20000)]
    for v in values:
        i = bucket(v)
        low, high = bucket_range(i)
        assert low <= v < high, (v, i, low, high)
        assert (high - low) <= max(1, low / SUB), (v, low, high)  # at most 1/32 wide
        assert abs(bucket_value(i) - v) <= max(0.5, v / (2 * SUB) + 1)
    assert bucket(1 << 40) == NBUCKETS - 1  # beyond the range: counted in the last bucket


@pytest.mark.parametrize("cls", STATS)
def test_percentiles_min_max_from_recorded_values(cls):
    rng = random.Random(5)
    values = [int(rng.lognormvariate(5, 1.5)) for _ in range(10000)]
    st = cls()
    for v in values:
        st.record(v, v % 7 == 0)
    values.sort()
    assert (st.calls, st.failed, st.usec) == (len(values), sum(1 for v in values if v % 7 == 0), sum(values))
    assert (st.min, st.max) == (values[0], values[-1])
    for p in (50, 90, 99, 99.9):
        exact = values[max(0, int(-(-len(values) * p // 100)) - 1)]
        assert abs(st.percentile(p) - exact) <= max(1, exact / SUB), (p, st.percentile(p), exact)


@NOT_BUILT
def test_compiled_twin_agrees_with_the_pure_one():
    rng = random.Random(9)
    pure, fast = cmdstats.PureCommandStat(), compiled.CommandStat()
    for _ in range(5000):
        v = rng.choice([0, 1, 63, 64, 65, rng.randrange(1 << 30)])
        pure.record(v, v & 1)
        fast.record(v, v & 1)
    assert fast.hist == pure.hist
    assert [fast.percentile(p) for p in (1, 50, 99, 100)] == [pure.percentile(p) for p in (1, 50, 99, 100)]
    assert (fast.calls, fast.failed, fast.usec, fast.min, fast.max) == \
        (pure.calls, pure.failed, pure.usec, pure.min, pure.max)
    # Track: the same records from the same requests and replies
    for track_cls, stat_cls in ((cmdstats.PureTrack, cmdstats.PureCommandStat), (compiled.Track, compiled.CommandStat)):
        stats = cmdstats.CommandStats(lambda n: n != b"nosuch", slower_than_us=-1)
        stats.by_name[b"get"] = stat_cls()
        track = track_cls(stats, None)
        track.start(time.monotonic())
        for name in (b"GET", b"nosuch", b"get", b"set"):
            track.add(([name, b"k"], b"*2\r\n$3\r\n%s\r\n$1\r\nk\r\n" % name))
        track.written([b"$1\r\nx\r\n", b"-ERR unknown\r\n", b"-WRONGTYPE x\r\n"])
        assert [req[0][0] for req, _ in track.drop(5)] == [b"set"]
        assert (stats.by_name[b"get"].calls, stats.by_name[b"get"].failed, stats.unknown) == (2, 1, 1)
        assert set(stats.by_name) == {b"get"}  # "GET" and "get" are one command


# ---- through a live proxy ----

@pytest.fixture(scope="module")
def server():
    s = Server("valkey", None, "--enable-debug-command", "yes")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxy(server):
    p = Proxy("--backend", server.addr, "--slowlog-log-slower-than", "40000", "--slowlog-max-len", "3")
    yield p
    p.stop()


@pytest.fixture
def c(proxy, server):
    server.client().flushall()
    c = proxy.client()
    c.execute_command("PROXY", "STATS", "RESET")
    yield c
    c.close()


def cmdstat(c, name: str) -> dict:
    return c.execute_command("INFO", "proxy_commandstats").get(f"cmdstat_{name}", {})


def test_counts_are_exact_for_known_traffic(c, proxy):
    for i in range(40):
        c.set(f"k{i}", i)
    p = c.pipeline(transaction=False)
    for i in range(100):
        p.get(f"k{i % 50}")
    p.execute()
    c.set("text", "abc")
    for _ in range(3):
        with pytest.raises(redis.ResponseError, match="not an integer"):
            c.execute_command("INCR", "text")  # an error reply from the server: a failed call
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        c.execute_command("GET")  # refused by vproxy: a rejected call, never sent
    with pytest.raises(redis.ResponseError, match="unknown command"):
        c.execute_command("NOSUCHCOMMAND", "x")
    get, set_, incr = cmdstat(c, "get"), cmdstat(c, "set"), cmdstat(c, "incr")
    assert (get["calls"], get["failed_calls"], get["rejected_calls"]) == (100, 0, 1)
    assert (set_["calls"], set_["failed_calls"]) == (41, 0)
    assert (incr["calls"], incr["failed_calls"]) == (3, 3)
    assert get["usec"] > 0 and get["usec_per_call"] == pytest.approx(get["usec"] / 100, abs=0.01)
    assert "cmdstat_nosuchcommand" not in c.execute_command("INFO", "proxy_commandstats")
    # the server's own INFO commandstats is still the server's (its own counts, not the proxy's)
    assert c.info("commandstats")["cmdstat_get"]["calls"] >= 100


def test_latency_percentiles_match_what_the_client_measured(c):
    took = []
    for _ in range(4):
        t = time.monotonic()
        c.execute_command("DEBUG", "SLEEP", "0.03")
        took.append((time.monotonic() - t) * 1e6)
    lat = c.execute_command("INFO", "proxy_latencystats")["latency_percentiles_usec_debug"]
    assert set(lat) == {"p50", "p99", "p99.9"}
    st = {e[b"command"]: e for e in _stats_table(c)}[b"debug"]
    assert st[b"min"] >= 30000  # the server slept that long: the proxy cannot have seen less
    assert st[b"max"] <= max(took) * (1 + 1 / SUB)  # and never more than the client saw
    for p in ("p50", "p99", "p99.9"):
        assert 30000 * (1 - 1 / SUB) <= lat[p] <= max(took) * (1 + 1 / SUB), (p, lat[p], took)


def _stats_table(c) -> list[dict]:
    rows = c.execute_command("PROXY", "STATS")
    return [row if isinstance(row, dict) else dict(zip(row[::2], row[1::2])) for row in rows]


def test_slowlog_catches_a_slow_request_with_its_client(c, proxy):
    c.client_setname("slowpoke")
    c.execute_command("PROXY", "SLOWLOG", "RESET")
    c.get("fast")
    c.execute_command("DEBUG", "SLEEP", "0.06")
    entries = c.execute_command("PROXY", "SLOWLOG", "GET")
    assert len(entries) == 1
    ident, when, usec, args, addr, name = entries[0]
    assert args == [b"DEBUG", b"SLEEP", b"0.06"] and name == b"slowpoke"
    assert usec >= 60000 and abs(when - time.time()) < 30
    assert addr.startswith(b"127.0.0.1:")
    assert c.execute_command("PROXY", "SLOWLOG", "LEN") == 1
    big = "v" * 300
    for _ in range(4):  # max length 3: the oldest goes
        assert c.blpop([big], 0.045) is None  # a blocking command times out: slow, with a long argument
    entries = c.execute_command("PROXY", "SLOWLOG", "GET", "-1")
    assert len(entries) == 3 and all(e[3][0] == b"BLPOP" for e in entries)
    assert entries[0][0] > entries[1][0] > entries[2][0]  # newest first, ids grow
    assert entries[0][3][1] == b"v" * 128 + b"... (172 more bytes)"  # cut as the server cuts it
    huge = ["h" * 9000] + [f"k{i}" for i in range(39)]  # over 8 KB: cut when recorded, not when shown
    assert c.blpop(huge, 0.045) is None
    shown = c.execute_command("PROXY", "SLOWLOG", "GET", "1")[0][3]
    assert shown[:2] == [b"BLPOP", b"h" * 128 + b"... (8872 more bytes)"]
    assert len(shown) == 32 and shown[-1] == b"... (11 more arguments)"  # 42 arguments: 31 shown
    assert c.execute_command("PROXY", "SLOWLOG", "RESET") == b"OK"
    assert c.execute_command("PROXY", "SLOWLOG", "LEN") == 0
    with pytest.raises(redis.ResponseError, match="count should be"):
        c.execute_command("PROXY", "SLOWLOG", "GET", "-5")


def test_resetstat_and_proxy_stats_reset(c):
    c.set("a", 1)
    assert cmdstat(c, "set")["calls"] == 1
    for _ in range(20):
        c.get("a")
    assert c.config_resetstat()
    assert cmdstat(c, "set") == {}
    assert c.info()["total_commands_processed"] < 5  # reset as the server resets it (INFO shows the proxy's)
    assert c.info("commandstats").get("cmdstat_set") is None  # the server's were reset too
    c.set("a", 1)
    assert c.execute_command("PROXY", "STATS", "RESET") == b"OK"
    assert cmdstat(c, "set") == {}


def test_plain_path_and_batch_path_both_count(c, proxy):
    """Plain requests (sent from the event loop) and the batch path's (a transaction) both count, in RESP3 too."""
    with RawClient(proxy.port) as raw:
        raw.send(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n" * 20 + b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n"
                 b"*1\r\n$4\r\nEXEC\r\n")
        replies = raw.read_n(23)
    assert replies[-1] == b"*1\r\n+OK\r\n"
    assert cmdstat(c, "get")["calls"] == 20
    assert cmdstat(c, "multi")["calls"] == 1 and cmdstat(c, "exec")["calls"] == 1
    assert cmdstat(c, "set")["calls"] == 1  # queued: +QUEUED is its reply
    r3 = redis.Redis(port=proxy.port, protocol=3)
    for _ in range(5):
        r3.get("a")
    assert cmdstat(c, "get")["calls"] == 25
    r3.close()


def test_backendstats_and_sections(c, proxy, server):
    c.get("x")
    backends = c.info("proxy_backendstats")
    assert backends["backend0"]["port"] == server.port and backends["backend0"]["shared"] >= 1
    assert backends["backend0"]["in_flight"] == 0
    everything = c.info("everything")
    assert "proxy_version" in everything and "cmdstat_get" in everything  # the server's commandstats
    both = c.execute_command("INFO", "proxy_commandstats", "server")
    assert "redis_version" in both and "cmdstat_get" in both
    assert set(c.execute_command("INFO", "proxy", "proxy_commandstats")) >= {"proxy_version", "cmdstat_get"}


def test_stats_off(start_proxy, server):
    p = start_proxy("--backend", server.addr, "--no-stats")
    c = p.client()
    for _ in range(10):
        c.get("x")
    assert c.execute_command("INFO", "proxy_commandstats") == {}
    assert c.execute_command("PROXY", "SLOWLOG", "LEN") == 0
    c.close()


def test_unknown_names_do_not_grow_the_table(c):
    for i in range(200):
        with pytest.raises(redis.ResponseError):
            c.execute_command(f"nosuch{i}")
    wait_for(lambda: cmdstat(c, "get") == {}, what="no entry for unknown names")
    assert not [k for k in c.execute_command("INFO", "proxy_commandstats") if "nosuch" in k]


def _rows(reply) -> list[dict]:
    return [row if isinstance(row, dict) else dict(zip(row[::2], row[1::2])) for row in reply]


def test_hot_and_big_keys(c):
    for i in range(128 * 30):  # hotkeys_sample is 128: 30 samples, 4 in 5 of them hot:1 whatever the
        c.get("hot:1" if i % 5 else f"cold:{i}")  # sampling counter's phase (5 and 128 are coprime)
    c.set("big:1", "x" * 50_000)
    c.get("big:1")
    hot = _rows(c.execute_command("PROXY", "HOTKEYS", "3"))
    assert hot[0][b"key"] == b"hot:1"
    assert 128 * 30 * 0.8 * 0.6 <= hot[0][b"requests"] <= 128 * 30 * 0.8 * 1.4  # scaled back, sampled
    assert len(hot) <= 3
    big = _rows(c.execute_command("PROXY", "BIGKEYS"))
    kinds = {(b[b"kind"], b[b"command"]) for b in big if b[b"key"] == b"big:1"}
    assert kinds == {(b"request", b"set"), (b"reply", b"get")}
    assert max(b[b"bytes"] for b in big) >= 50_000
    c.execute_command("PROXY", "STATS", "RESET")
    assert _rows(c.execute_command("PROXY", "BIGKEYS")) == []


def test_bounded_hot_key_memory():
    stats = cmdstats.CommandStats(lambda n: True, first_key=lambda n: 1, hotkeys_sample=1)
    for i in range(20000):
        stats.keys.seen(b"get", b"*2\r\n$3\r\nGET\r\n$%d\r\nk%d\r\n" % (len(str(i)) + 1, i))
        stats.keys.seen(b"get", b"*2\r\n$3\r\nGET\r\n$3\r\nhot\r\n")
    assert sum(len(c) for _, c in stats.keys.slots) <= stats.keys.CAP * stats.keys.SLOTS
    assert stats.keys.hot(1)[0][:2] == (b"hot", 20000)


def test_nth_arg_reads_the_request_bytes():
    raw = b"*3\r\n$3\r\nSET\r\n$5\r\nk\r\ney\r\n$2\r\nvv\r\n"
    assert [cmdstats.nth_arg(raw, i) for i in range(4)] == [b"SET", b"k\r\ney", b"vv", None]
    assert cmdstats.nth_arg(b"PING\r\n", 0) is None  # an inline request
