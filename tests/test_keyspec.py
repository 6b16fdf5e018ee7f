"""Unit tests for key positions: learned static positions and the movable-keys rules."""

from vproxy.commands import Command
from vproxy.keyspec import key_positions


def cmd(first, last, step, *flags):
    return Command("x", -1, frozenset(flags), first, last, step)


def test_static_positions():
    assert key_positions(cmd(1, 1, 1), b"get", [b"GET", b"k"]) == [1]
    assert key_positions(cmd(1, -1, 2), b"mset", [b"MSET", b"a", b"1", b"b", b"2"]) == [1, 3]
    assert key_positions(cmd(1, -2, 1), b"blpop", [b"BLPOP", b"a", b"b", b"0"]) == [1, 2]
    assert key_positions(cmd(0, 0, 0), b"ping", [b"PING"]) == []
    assert key_positions(None, b"nosuch", [b"NOSUCH", b"k"]) == []


def test_movable_keys():
    mv = cmd(0, 0, 0, "movablekeys")
    assert key_positions(mv, b"eval", [b"EVAL", b"s", b"2", b"a", b"b", b"x"]) == [3, 4]
    assert key_positions(mv, b"zunionstore", [b"ZUNIONSTORE", b"d", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2"]) == [1, 3, 4]
    assert key_positions(mv, b"zunion", [b"ZUNION", b"2", b"a", b"b", b"WITHSCORES"]) == [2, 3]
    assert key_positions(mv, b"blmpop", [b"BLMPOP", b"0", b"1", b"a", b"LEFT"]) == [3]
    assert key_positions(mv, b"xread", [b"XREAD", b"COUNT", b"1", b"STREAMS", b"a", b"b", b"0", b"0"]) == [4, 5]
    assert key_positions(mv, b"sort", [b"SORT", b"k", b"BY", b"w*", b"STORE", b"d"]) == [1, 5]
    assert key_positions(mv, b"eval", [b"EVAL", b"s", b"x"]) is None  # bad numkeys: ask the server
    assert key_positions(mv, b"mystery", [b"MYSTERY", b"a"]) is None


def test_container_subcommands():
    assert key_positions(cmd(0, 0, 0), b"object", [b"OBJECT", b"ENCODING", b"k"]) == [2]
    assert key_positions(cmd(0, 0, 0), b"object", [b"OBJECT", b"HELP"]) == []
    assert key_positions(cmd(0, 0, 0), b"memory", [b"MEMORY", b"USAGE", b"k"]) == [2]
