"""The built-in command table (used until the server's COMMAND reply is read) is Valkey's own, and it
knows every command vproxy splits, routes by keys or handles by name."""

from __future__ import annotations


from vproxy import builtin_commands, keyspec
from vproxy.cluster import keyless as fanout
from vproxy.cluster import multikey as split
from vproxy.cluster import namespaces as dbns
from vproxy.cluster import setops as algebra
from vproxy.cluster import transaction as txn
from vproxy import commands as C


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def test_entries_are_what_valkey_reports(valkey):
    server = valkey.client().command()
    for name, arity, flags, first, last, step in builtin_commands.entries():
        want = server.get(name)
        assert want is not None, f"{name}: not a command of this valkey-server"
        got = (arity, flags, first, last, step)
        assert got == (want["arity"], frozenset(map(_text, want["flags"])), want["first_key_pos"],
                       want["last_key_pos"], want["step_count"]), name


def test_every_command_with_keys_is_known(valkey):
    keyed = {_text(n) for n, e in valkey.client().command().items()
             if e["first_key_pos"] > 0 or "movablekeys" in map(_text, e["flags"])}
    assert keyed - {e[0] for e in builtin_commands.entries()} == set()


def test_every_command_vproxy_handles_by_name_is_known():
    handled = {*split.SPLIT, *split.WHY, *algebra.SPLIT, *keyspec.MOVABLE, *keyspec.CONTAINER_KEY,
               *dbns.NAMES_IN_REPLY, *dbns.REFUSED, *dbns.NOT_REWRITTEN, *fanout.PRE, *txn.PRE, *C.POLICY,
               *C.BLOCK_OPTION, *(c for c, _ in C.SIDE_SUBCOMMANDS)} - {b"proxy"}  # PROXY is vproxy's own
    table = C.CommandTable()
    assert sorted(n.decode() for n in handled if table.get(n) is None) == []
