"""The pure decisions of replication mode: which replica to promote, which of several masters to keep."""

from __future__ import annotations

from vproxy.sentinel.node import NodeInfo
from vproxy.sentinel.replication import choose_master, choose_replica, related

P_ID, Q_ID, R_ID, ZERO = "a" * 40, "b" * 40, "c" * 40, "0" * 40


def node(port, role="slave", offset=0, run_id="", **kw) -> NodeInfo:
    return NodeInfo(("127.0.0.1", port), role, run_id=run_id or f"{port:040d}", offset=offset, **kw)


def test_promote_the_greatest_offset():
    a, b = node(1, offset=100), node(2, offset=250)
    assert choose_replica([a, b]) is b


def test_ties_broken_by_smallest_run_id_whatever_the_order():
    a, b = node(1, offset=100, run_id="f" * 40), node(2, offset=100, run_id="1" * 40)
    assert choose_replica([a, b]) is b and choose_replica([b, a]) is b


def test_never_promote_loading_or_priority_zero_or_a_master():
    a = node(1, offset=900, loading=True)
    b = node(2, offset=800, priority=0)
    c = node(3, role="master", offset=700)
    d = node(4, offset=10)
    assert choose_replica([a, b, c, d]) is d
    assert choose_replica([a, b, c]) is None


def test_promoted_successor_beats_the_old_primary_that_came_back():
    old = node(1, "master", offset=10_000, replid=P_ID, replid2=ZERO)  # resumed after SIGSTOP
    new = node(2, "master", offset=5_000, replid=Q_ID, replid2=P_ID)  # promoted from old's line
    assert choose_master([old, new]) is new and choose_master([new, old]) is new
    assert related(old, new)


def test_two_promoted_replicas_converge_on_the_same_one():
    a = node(1, "master", offset=500, replid=Q_ID, replid2=P_ID, replicas={("127.0.0.1", 3): (500, 0)})
    b = node(2, "master", offset=500, replid=R_ID, replid2=P_ID)
    assert choose_master([a, b]) is a and choose_master([b, a]) is a  # more replicas attached
    c = node(2, "master", offset=500, replid=R_ID, replid2=P_ID, replicas={("127.0.0.1", 4): (500, 0)})
    assert choose_master([a, c]) is choose_master([c, a])  # then offset, then run id


def test_unrelated_masters_are_not_related():
    a = node(1, "master", replid=P_ID, replid2=ZERO)
    b = node(2, "master", replid=Q_ID, replid2=ZERO)
    assert not related(a, b)
