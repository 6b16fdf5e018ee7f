"""Replication mode: vproxy learns a primary/replica set and fails it over itself, under load.

Each failover test runs 50 clients through the proxy, fences (a write + WAIT on the primary), then
SIGKILLs, SIGSTOPs or gracefully stops the primary. Checked: no client connection closed, every
write acknowledged before the fence still readable, errors only for writes whose outcome is
unknown, and the old primary rejoining as a replica of the new one.
"""

from __future__ import annotations

import time

import pytest
import redis

from conftest import RawClient, wait_for
from ha_kit import ReplSet, failover_under_load, repl_info, role, topology

FAST = ["--mode", "replication", "--failover-timeout", "1", "--topology-refresh", "0.2",
        "--primary-wait", "15"]


@pytest.fixture
def rset():
    s = ReplSet(2)
    yield s
    s.stop()


def new_primary(proxy, old: str, timeout: float = 20) -> str:
    return wait_for(lambda: (lambda p: p if p not in (None, old) else None)(topology(proxy)["primary"]),
                    timeout=timeout, what="a new primary")


def test_learns_primary_from_a_replica_address(rset, start_proxy):
    """Only a replica is configured: the primary is learned from its INFO replication."""
    p = start_proxy("--backend", rset.replicas[0].addr, *FAST)
    assert topology(p)["primary"] == rset.primary.addr
    c = p.client()
    c.set("k", "v")
    assert rset.primary.client().get("k") == b"v"
    wait_for(lambda: len(topology(p)["replicas"]) == 2, what="both replicas learned")


@pytest.mark.parametrize("fault", ["kill", "pause", "shutdown"])
def test_failover_under_load(rset, start_proxy, fault):
    p = start_proxy(*rset.args(), *FAST)
    out = failover_under_load(rset, p, fault)
    new_port = int(out["new"].rsplit(":", 1)[1])
    other = next(r for r in rset.replicas if r.port != new_port)
    wait_for(lambda: repl_info(other.port).get("master_port") == new_port, what="other replica re-pointed")
    old = rset.primary
    if fault == "pause":
        old.resume()
    else:
        old.start()  # restarted empty on the same port
    wait_for(lambda: role(old.port)[0] == b"slave" and role(old.port)[2] == new_port, timeout=15,
             what="old primary rejoining as a replica of the new one")
    wait_for(lambda: repl_info(old.port).get("master_link_status") == "up", what="old primary synced")
    assert rset.masters() == [new_port]
    assert p.client().get("ha:fence") is not None


def test_transaction_during_failover_gets_a_retryable_error(rset, start_proxy):
    p = start_proxy(*rset.args(), *FAST)
    c = p.client()
    c.execute_command("MULTI")
    c.execute_command("SET", "tx", "1")
    old = rset.primary.addr
    rset.primary.kill()
    new_primary(p, old)
    with pytest.raises(redis.ResponseError, match="vproxy"):
        c.execute_command("EXEC")
    tx = c.pipeline(transaction=True)  # the same connection retries and succeeds
    tx.set("tx", "2").get("tx")
    assert tx.execute() == [True, b"2"]


def test_two_proxies_promote_one_replica(rset, start_proxy):
    """Two vproxy instances watch one set: the primary dies, exactly one replica is promoted."""
    a = start_proxy(*rset.args(), *FAST)
    b = start_proxy(*rset.args(), *FAST)
    old = rset.primary.addr
    seen_masters = set()
    rset.primary.kill()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        masters = rset.masters()  # one look per round: the promotion may land between two
        seen_masters.update(masters)
        ta, tb = topology(a)["primary"], topology(b)["primary"]
        if ta not in (None, old) and ta == tb and len(masters) == 1:
            break
        time.sleep(0.02)  # polling interval, not synchronisation
    assert ta == tb and ta not in (None, old)
    assert len(seen_masters) == 1, f"more than one replica was promoted: {seen_masters}"
    assert rset.masters() == [int(ta.rsplit(":", 1)[1])]
    for proxy in (a, b):
        proxy.client().set(f"after:{proxy.port}", 1)
    assert rset.by_port(int(ta.rsplit(":", 1)[1])).client().dbsize() >= 2


def test_two_masters_are_reconciled_the_same_way_everywhere(rset, start_proxy):
    """A double promotion (made by hand here) is undone: both proxies keep the same one, demote the other."""
    slow = [a if a != "1" else "60" for a in FAST]  # failover_timeout 60: the proxies never promote
    a = start_proxy(*rset.args(), *slow)
    b = start_proxy(*rset.args(), *slow)
    rset.primary.kill()
    wait_for(lambda: topology(a)["primary"] is None and topology(b)["primary"] is None, what="no primary")
    for r in rset.replicas:
        r.client().execute_command("REPLICAOF", "NO", "ONE")
    wait_for(lambda: len(rset.masters()) == 1, timeout=15, what="one master left")
    kept = rset.masters()[0]
    wait_for(lambda: topology(a)["primary"] == topology(b)["primary"] == f"127.0.0.1:{kept}", what="both agree")
    other = next(r for r in rset.replicas if r.port != kept)
    wait_for(lambda: repl_info(other.port).get("master_port") == kept, what="the other follows it")
    assert rset.masters() == [kept]  # which one is kept: test_ha_choice (the same rule on every proxy)


def test_no_promotion_while_replicas_still_hear_the_primary(rset, start_proxy):
    """vproxy cannot reach the primary (here: it lacks the password), the replicas can: no failover."""
    for r in rset.replicas:
        r.client().config_set("masterauth", "pw")
    rset.primary.client().config_set("requirepass", "pw")  # the replicas' links stay up
    p = start_proxy("--backend", rset.replicas[0].addr, "--mode", "replication", "--failover-timeout", "2",
                    "--topology-refresh", "0.2", "--primary-wait", "0.5", wait_learned=False)
    wait_for(lambda: topology(p)["version"] > 40, timeout=30, what="40 looks without a primary (> 4 s)")
    assert topology(p)["primary"] is None
    with RawClient(p.port) as c:  # a health check through vproxy is told, after primary_wait
        assert c.call("PING").startswith(b"-ERR vproxy: no primary")
    assert [role(r.port)[0] for r in rset.replicas] == [b"slave", b"slave"]
    assert all(repl_info(r.port)["master_link_status"] == "up" for r in rset.replicas)


def test_blocked_and_subscribed_clients_get_a_retryable_error(rset, start_proxy):
    """BLPOP and SUBSCRIBE pinned to the old primary: an error, the connection stays, a retry works."""
    from conftest import RawClient
    p = start_proxy(*rset.args(), *FAST)
    blocked, sub = RawClient(p.port, timeout=20), RawClient(p.port, timeout=20)
    blocked.send(RawClient.encode("BLPOP", "q", "0"))
    assert sub.call("SUBSCRIBE", "ch").startswith(b"*3\r\n$9\r\nsubscribe")
    wait_for(lambda: b"cmd=blpop" in rset.primary.client().execute_command("CLIENT", "LIST"), what="BLPOP parked")
    old = rset.primary.addr
    rset.primary.kill()
    assert blocked.read().startswith(b"-ERR vproxy: backend")
    assert b"subscribe again" in sub.read()
    new_primary(p, old)
    blocked.send(RawClient.encode("BLPOP", "q", "0"))
    assert sub.call("SUBSCRIBE", "ch").startswith(b"*3\r\n$9\r\nsubscribe")
    c = p.client()
    wait_for(lambda: c.publish("ch", "hi") == 1, what="subscriber on the new primary")
    assert sub.read() == b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
    c.rpush("q", "x")  # before or after BLPOP parks: it gets x either way
    assert blocked.read() == b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n"


LOOP = "local i = 0 while true do i = i + 1 end"


def _primary_busy(rset) -> bool:
    with RawClient(rset.primary.port) as direct:
        return direct.call("GET", "x").startswith(b"-BUSY")


def _primary_blocked(rset) -> bool:
    """True while the primary answers nobody (a script runs, before busy-reply-threshold)."""
    with RawClient(rset.primary.port) as probe:
        probe.send(RawClient.encode("PING"))
        return probe.nothing_pending(0.2)


def test_busy_primary_stays_the_primary(start_proxy):
    """A script loops on the primary: ROLE and INFO get -BUSY, but it is alive and still the primary
    (HELLO says so). PING through vproxy says -BUSY, the script's caller waits past command_timeout,
    and SCRIPT KILL reaches the primary, also when sent before the busy threshold."""
    rset = ReplSet(1)
    args = [*rset.args(), "--mode", "replication", "--topology-refresh", "0.2", "--failover-timeout", "30",
            "--connect-timeout", "0.3"]
    try:
        p = start_proxy(*args, "--command-timeout", "0.5")
        d = rset.primary.client()
        d.config_set("busy-reply-threshold", 100)
        with RawClient(p.port, timeout=15) as runner, RawClient(p.port, timeout=15) as c:
            runner.send(RawClient.encode("EVAL", LOOP, "0"))
            wait_for(lambda: _primary_busy(rset), what="the script to be running")
            looks = topology(p)["version"]
            wait_for(lambda: topology(p)["version"] > looks + 3, what="the monitor to look at the busy primary")
            assert topology(p)["primary"] == rset.primary.addr
            assert c.call("PING").startswith(b"-BUSY ")
            assert runner.nothing_pending(1.5)  # three command_timeouts
            assert c.call("SCRIPT", "KILL") == b"+OK\r\n"
            assert b"Script killed by user" in runner.read()
        # before the threshold the primary answers nobody, the monitor's probes included; the kill
        # waits up to command_timeout (default 5 s) for it, as a direct client would wait
        q = start_proxy(*args)
        d.config_set("busy-reply-threshold", 1500)
        with RawClient(q.port, timeout=15) as runner, RawClient(q.port, timeout=15) as c:
            runner.send(RawClient.encode("EVAL", LOOP, "0"))
            wait_for(lambda: _primary_blocked(rset), what="the script to block the primary")
            assert c.call("SCRIPT", "KILL") == b"+OK\r\n"
            assert b"Script killed by user" in runner.read()
        assert topology(q)["primary"] == rset.primary.addr
        assert rset.masters() == [rset.primary.port]
    finally:
        rset.stop()
