"""Read/write splitting: read-only commands (COMMAND table) to healthy replicas, the rest to the primary.

Where a command ran is read from each backend's INFO commandstats.
"""

from __future__ import annotations

import pytest
import redis

from conftest import wait_for
from ha_kit import Load, ReplSet, Sentinels, repl_info, topology

REPL = ["--mode", "replication", "--failover-timeout", "5", "--topology-refresh", "0.2"]


@pytest.fixture(scope="module")
def rset():
    s = ReplSet(2)
    yield s
    s.stop()


def calls(server, cmd: str) -> int:
    return server.client().info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0)


def reset(rset) -> None:
    for s in rset.nodes:
        s.client().config_resetstat()


def healthy(proxy) -> list[str]:
    return sorted(r["addr"] for r in topology(proxy)["replicas"] if r["healthy"])


def test_reads_to_replicas_writes_to_primary(rset, start_proxy):
    p = start_proxy(*rset.args(), *REPL, "--read-from", "replica")
    wait_for(lambda: len(healthy(p)) == 2, what="two healthy replicas")
    reset(rset)
    c = p.client()
    for i in range(100):
        c.set(f"s:{i}", i)
    for i in range(100):
        c.get(f"s:{i}")
    c.eval("return redis.call('SET', KEYS[1], '1')", 1, "s:eval")  # not read-only: primary
    c.execute_command("EVAL_RO", "return redis.call('GET', KEYS[1])", 1, "s:eval")  # read-only
    assert calls(rset.primary, "set") == 101 and calls(rset.primary, "get") == 0  # 100 + the one in EVAL
    assert calls(rset.primary, "eval") == 1 and calls(rset.primary, "eval_ro") == 0
    per_replica = [calls(r, "get") for r in rset.replicas]
    assert sum(per_replica) == 101 and min(per_replica) >= 40  # round-robin; + the GET in EVAL_RO
    assert sum(calls(r, "eval_ro") for r in rset.replicas) == 1


def test_pipelined_reads_keep_order(rset, start_proxy):
    p = start_proxy(*rset.args(), *REPL, "--read-from", "replica", "--replica-balance", "least-outstanding")
    wait_for(lambda: len(healthy(p)) == 2, what="two healthy replicas")
    c = p.client()
    for i in range(50):
        c.set(f"o:{i}", i)
    rset.primary.client().wait(2, 5000)
    pipe = c.pipeline(transaction=False)
    for i in range(50):
        pipe.get(f"o:{i}")
        pipe.incr("o:counter")
    out = pipe.execute()
    assert out[0::2] == [str(i).encode() for i in range(50)]
    assert out[1::2] == list(range(1, 51))


def test_read_your_writes_window(rset, start_proxy):
    p = start_proxy(*rset.args(), *REPL, "--read-from", "replica", "--read-your-writes", "30")
    wait_for(lambda: len(healthy(p)) == 2, what="two healthy replicas")
    reset(rset)
    writer, reader = p.client(), p.client()
    writer.set("ryw", "1")
    assert writer.get("ryw") == b"1"  # this client wrote: its reads go to the primary
    reader.get("ryw")  # another client: a replica
    assert calls(rset.primary, "get") == 1
    assert sum(calls(r, "get") for r in rset.replicas) == 1


def test_unhealthy_replicas_are_skipped(rset, start_proxy):
    p = start_proxy(*rset.args(), *REPL, "--read-from", "prefer-replica", "--command-timeout", "2")
    wait_for(lambda: len(healthy(p)) == 2, what="two healthy replicas")
    paused, broken = rset.replicas
    broken.client().config_set("masterauth", "wrong")  # its link to the primary fails from now on
    broken.client().client_kill_filter(_type="master")
    paused.pause()
    try:
        wait_for(lambda: healthy(p) == [], timeout=10, what="both replicas skipped")
        why = {r["addr"]: r["why"] for r in topology(p)["replicas"]}
        assert "link" in why[broken.addr] and why[paused.addr] == "unreachable"
        reset_nodes = [rset.primary, broken]
        for s in reset_nodes:
            s.client().config_resetstat()
        c = p.client()
        for i in range(50):
            c.get(f"x:{i}")  # prefer-replica: the primary serves them, no errors
        assert calls(rset.primary, "get") == 50 and calls(broken, "get") == 0
    finally:
        paused.resume()
        broken.client().config_set("masterauth", "")
        broken.client().client_kill_filter(_type="master")
    wait_for(lambda: len(healthy(p)) == 2, timeout=15, what="replicas healthy again")
    assert repl_info(broken.port)["master_link_status"] == "up"


def test_read_from_replica_without_replicas_is_an_error(rset, start_proxy):
    p = start_proxy(*rset.args(), *REPL, "--read-from", "replica")
    wait_for(lambda: len(healthy(p)) == 2, what="two healthy replicas")
    for r in rset.replicas:
        r.pause()
    try:
        wait_for(lambda: healthy(p) == [], timeout=10, what="both replicas skipped")
        c = p.client()
        with pytest.raises(redis.ResponseError, match="no healthy replica"):
            c.get("k")
        assert c.set("k", "v")  # writes are unaffected
    finally:
        for r in rset.replicas:
            r.resume()
    wait_for(lambda: len(healthy(p)) == 2, timeout=15, what="replicas healthy again")


def test_replica_killed_under_load_no_client_sees_it(rset, start_proxy):
    """Reads in flight on a replica that dies run again elsewhere: no error, no disconnect."""
    p = start_proxy(*rset.args(), *REPL, "--read-from", "prefer-replica")
    wait_for(lambda: len(healthy(p)) == 2, what="two healthy replicas")
    victim = rset.replicas[1]
    load = Load(p.port, 50).start()
    try:
        wait_for(lambda: load.ops > 2000, what="load running")
        victim.kill()
        wait_for(lambda: victim.addr not in healthy(p), what="dead replica skipped")
        ops = load.ops
        wait_for(lambda: load.ops > ops + 2000, what="load running on")
    finally:
        load.stop()
        victim.start()
    assert load.errors == [] and load.disconnects == 0
    wait_for(lambda: len(healthy(p)) == 2, timeout=15, what="the replica back")


def test_sentinel_mode_splits_too(start_proxy):
    rs = ReplSet(1)
    sentinels = Sentinels(rs.primary.port)
    try:
        sentinels.wait_ready(1)
        p = start_proxy(*sentinels.args(), "--topology-refresh", "0.2", "--read-from", "replica")
        wait_for(lambda: len(healthy(p)) == 1, what="a healthy replica")
        reset(rs)
        c = p.client()
        c.set("k", "v")
        c.get("k")
        assert calls(rs.primary, "set") == 1 and calls(rs.primary, "get") == 0
        assert calls(rs.replicas[0], "get") == 1
    finally:
        sentinels.stop()
        rs.stop()
