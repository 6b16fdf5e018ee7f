"""commands.CommandTable, learned from a real valkey-server's COMMAND reply and as built in: the policy
each command runs under, arity checks, key positions (compared with the server's COMMAND GETKEYS)."""

from __future__ import annotations

import pytest
from conftest import RawClient

from vproxy import commands as C
from vproxy import resp
from vproxy.keyspec import key_positions


@pytest.fixture(scope="module")
def learned(valkey):
    with RawClient(valkey.port) as c:
        reply = resp.decode(c.call("COMMAND"))
    table = C.CommandTable()
    assert table.learn(reply) == len(reply) > 200 and table.learned
    return table


@pytest.fixture(params=["learned", "builtin"])
def table(request, learned):
    return learned if request.param == "learned" else C.CommandTable()


POLICIES = [
    ([b"GET", b"k"], C.FORWARD),
    ([b"SET", b"k", b"v"], C.FORWARD),
    ([b"MULTI"], C.PIN),
    ([b"WATCH", b"k"], C.PIN),
    ([b"EXEC"], C.LOCAL),
    ([b"SELECT", b"1"], C.LOCAL),
    ([b"HELLO", b"3"], C.LOCAL),
    ([b"SUBSCRIBE", b"c"], C.STREAM),
    ([b"SSUBSCRIBE", b"c"], C.STREAM),
    ([b"MONITOR"], C.STREAM),
    ([b"BLPOP", b"k", b"0"], C.BLOCK),
    ([b"WAIT", b"1", b"0"], C.BLOCK),
    ([b"XREAD", b"STREAMS", b"s", b"0"], C.FORWARD),  # blocks only with BLOCK
    ([b"XREAD", b"block", b"0", b"STREAMS", b"s", b"0"], C.BLOCK),
    ([b"XREADGROUP", b"GROUP", b"g", b"c", b"BLOCK", b"0", b"STREAMS", b"s", b">"], C.BLOCK),
    ([b"SCRIPT", b"KILL"], C.SIDE),  # the connection running the script is busy by definition
    ([b"FUNCTION", b"kill"], C.SIDE),
    ([b"SCRIPT", b"LOAD", b"return 1"], C.FORWARD),
    ([b"SHUTDOWN"], C.REFUSE),
    ([b"PSYNC", b"?", b"-1"], C.REFUSE),
    ([b"NOSUCHCOMMAND", b"x"], C.FORWARD),  # the server answers what it does not know
]


@pytest.mark.parametrize("args, policy", POLICIES, ids=lambda v: v if isinstance(v, str) else b" ".join(v).decode())
def test_policy_per_command(table, args, policy):
    assert table.policy(args[0].lower(), args) == policy


def test_a_command_the_server_flags_blocking_is_leased():
    """A command vproxy has no rule for, flagged 'blocking' by the server, gets a connection of its own."""
    table = C.CommandTable()
    table.learn([[b"mywait", -2, [b"blocking"], 0, 0, 0]])
    assert table.policy(b"mywait", [b"MYWAIT", b"1"]) == C.BLOCK
    assert table.policy(b"mynowait", [b"MYNOWAIT"]) == C.FORWARD


def test_names_made_local(table):
    """With users at the proxy, ACL is answered by vproxy (gate.py): set_local changes the policy."""
    assert table.policy(b"acl", [b"ACL", b"WHOAMI"]) == C.FORWARD
    table.set_local(frozenset([b"acl"]))
    try:
        assert table.policy(b"acl", [b"ACL", b"WHOAMI"]) == C.LOCAL
        assert table.lookup(b"acl")[1] == C.LOCAL and not table.forwards(b"acl", 2)
    finally:
        table.set_local(frozenset())
    assert table.policy(b"acl", [b"ACL", b"WHOAMI"]) == C.FORWARD


@pytest.mark.parametrize("name, nargs, fits", [
    (b"get", 2, True), (b"get", 1, False), (b"get", 3, False),
    (b"set", 3, True), (b"set", 6, True), (b"set", 2, False),
    (b"mset", 3, True), (b"ping", 1, True), (b"ping", 2, True),
])
def test_arity(table, name, nargs, fits):
    assert table.get(name).arity_ok(nargs) is fits
    assert table.forwards(name, nargs) is fits  # the plain path checks the same arity


def test_arity_of_unknown_commands_is_left_to_the_server(table):
    assert table.lookup(b"nosuchcommand") == (0, C.FORWARD)
    assert table.forwards(b"nosuchcommand", 1) and table.forwards(b"nosuchcommand", 9)
    assert C.arity_fits(0, 5) and C.arity_fits(-2, 2) and not C.arity_fits(-2, 1) and not C.arity_fits(2, 3)


def test_plain_spec_reads_names_in_any_case(table):
    assert table.plain_spec(b"GeT") == (b"get", 2, True)
    assert table.plain_specs[b"GeT"] == (b"get", 2, True)
    assert table.plain_spec(b"multi") == (b"multi", 1, False)  # not a plain forward
    assert table.plain_spec(b"ZzZ") == (b"zzz", 0, True)


KEYED = [
    [b"GET", b"a"],
    [b"MSET", b"a", b"1", b"b", b"2"],
    [b"MGET", b"a", b"b", b"c"],
    [b"DEL", b"a", b"b"],
    [b"BLPOP", b"a", b"b", b"0"],
    [b"RENAME", b"a", b"b"],
    [b"LMOVE", b"a", b"b", b"LEFT", b"RIGHT"],
    [b"EVAL", b"return 1", b"2", b"a", b"b", b"x"],
    [b"ZUNIONSTORE", b"d", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2"],
    [b"ZUNION", b"2", b"a", b"b", b"WITHSCORES"],
    [b"XREAD", b"COUNT", b"1", b"STREAMS", b"a", b"b", b"0", b"0"],
    [b"SORT", b"a", b"BY", b"w*", b"STORE", b"d"],
    [b"OBJECT", b"ENCODING", b"a"],
    [b"MEMORY", b"USAGE", b"a"],
    [b"SINTERCARD", b"2", b"a", b"b", b"LIMIT", b"1"],
    [b"LMPOP", b"2", b"a", b"b", b"LEFT"],
]


@pytest.mark.parametrize("args", KEYED, ids=lambda a: a[0].decode())
def test_key_positions_match_the_server(table, valkey, args):
    """Where a request's keys are, as vproxy reads them, is where the server's COMMAND GETKEYS says."""
    with RawClient(valkey.port) as c:
        want = resp.decode(c.call("COMMAND", "GETKEYS", *args))
    name = args[0].lower()
    pos = key_positions(table.get(name), name, args)
    assert [args[p] for p in pos] == want


def test_static_key_fields_are_the_servers(learned):
    get, mset, ping = learned.get(b"get"), learned.get(b"mset"), learned.get(b"ping")
    assert (get.first_key, get.last_key, get.step) == (1, 1, 1)
    assert (mset.first_key, mset.last_key, mset.step) == (1, -1, 2)
    assert (ping.first_key, ping.last_key, ping.step) == (0, 0, 0)
    assert "readonly" in get.flags and "write" in mset.flags and "@read" in get.acl


def test_subcommands_and_audit_classes(learned):
    assert learned.subcommand(b"config", [b"CONFIG", b"SET", b"x", b"y"]) == b"set"
    assert learned.subcommand(b"get", [b"GET", b"k"]) is None
    assert learned.get(b"config").subs[b"get"].arity == -3
    assert "write" in learned.classes_of(b"set") and "read" in learned.classes_of(b"get")
    assert "admin" in learned.classes_of(b"config", b"set")


def test_learning_clears_what_was_derived():
    t = C.CommandTable()
    t.plain_spec(b"GET")
    t.derived[b"get"] = "something cached by another module"
    t.learn([[b"get", 2, [b"readonly"], 1, 1, 1]])
    assert t.derived == {} and t.learned
    assert t.learn([]) == 0  # an empty reply changes nothing
