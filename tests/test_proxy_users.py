"""Users at the proxy (setting `users`, gate.py): vproxy is the gate. Every rule against a real
valkey-server, replies byte for byte as a direct connection with the same ACL SETUSER gives them;
AUTH counted and audited; backend credentials never shown; the plain path kept where nothing needs
a check."""

from __future__ import annotations

import json
import re

import pytest
import redis
from conftest import GateProxy, RawClient, Server, wait_for

from vproxy import resp
from vproxy.aclrules import glob
from vproxy.commands import CommandTable
from vproxy.gate import parse_user

E = RawClient.encode
NOPERM_KEY = b"-NOPERM No permissions to access a key\r\n"
# The same rules at the proxy and, as ACL SETUSER, on a direct valkey (valkey 9: db= too).
RULES = {
    "alice": "on >apw ~app:* +@read -flushall +config|get +acl|whoami",
    "carl": "on >cpw %R~r:* %W~w:* +@all -config",
    "dana": "on >dpw allkeys +@all db=1,2",
    "erin": "on >epw allkeys +@all -@dangerous &news.* resetdbs db=0",
    "off1": "off >opw allkeys +@all",
    # selectors: a request any one rule set allows goes; else the furthest-reaching denial answers
    "sam": "on >spw +get +select ~a* db=0,2 (+set +select -get ~s* db=1) (+publish &ch* ~*)",
    "fern": "on >fpw allkeys +@all db=1 db=2",  # the last db= says them all
    "gus": "on >gpw ~k* +spublish +ssubscribe (+spublish &c*)",  # shard channels are no keys to ACL
}
ADMIN = "admin on >adminpw allkeys allcommands allchannels"
# (user, requests): each request's reply must be the direct server's, byte for byte
SCRIPTS = [
    ("alice", [("GET", "app:1"), ("GET", "other"), ("SET", "app:1", "v"), ("FLUSHALL",),
               ("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "SET", "maxmemory", "0"), ("ACL", "WHOAMI"),
               ("MGET", "app:1", "app:2"), ("MGET", "app:1", "x"), ("KEYS", "*"), ("PING",), ("DEL", "app:1"),
               ("PUBLISH", "news.a", "m")]),
    ("carl", [("SET", "w:1", "v"), ("GET", "w:1"), ("SET", "r:1", "v"), ("GET", "r:1"),
              ("COPY", "r:1", "w:2"), ("COPY", "w:1", "r:2"), ("EXISTS", "w:1"), ("LMOVE", "r:1", "w:1", "LEFT", "LEFT"),
              ("SET", "w:3", "v", "GET"), ("CONFIG", "GET", "x"), ("ACL", "WHOAMI"), ("DEL", "w:1")]),
    ("dana", [("GET", "a"), ("PING",), ("DBSIZE",), ("SELECT", "3"), ("SELECT", "1"), ("SET", "a", "1"),
              ("GET", "a"), ("SWAPDB", "1", "2"), ("SWAPDB", "1", "5"), ("MOVE", "a", "2"), ("MOVE", "a", "7"),
              ("COPY", "a", "b", "DB", "9"), ("FLUSHALL",), ("FLUSHDB",), ("ACL", "WHOAMI")]),
    ("erin", [("SET", "k", "v"), ("FLUSHDB",), ("KEYS", "*"), ("PUBLISH", "news.x", "m"), ("PUBLISH", "sport", "m"),
              ("SELECT", "1"), ("SPUBLISH", "sport", "m"), ("CONFIG", "RESETSTAT"), ("INFO", "keyspace")]),
    ("sam", [("SET", "s1", "v"), ("GET", "x"), ("GET", "a1"), ("PUBLISH", "x", "m"), ("PUBLISH", "ch1", "m"),
             ("MGET", "a1", "s1"), ("SELECT", "1"), ("GET", "a1"), ("SET", "s1", "v"), ("SET", "a1", "v"),
             ("GET", "s1"), ("PUBLISH", "x", "m"), ("SELECT", "3"), ("SELECT", "2"), ("SET", "s1", "v"),
             ("GET", "a1"), ("DEL", "a1")]),
    ("fern", [("AUTH", "fern", "fpw", "extra"), ("AUTH",), ("MULTI",), ("SELECT", "2"), ("SET", "q", "v"), ("EXEC",), ("GET", "q"),  # checked in db 2
              ("SELECT", "1"), ("SELECT", "2"), ("SET", "k", "v"), ("GET", "k")]),
    ("gus", [("SPUBLISH", "b1", "m"), ("SPUBLISH", "c1", "m"), ("SPUBLISH", "k1", "m"), ("GET", "k1"),
             ("SSUBSCRIBE", "c1"), ("SSUBSCRIBE", "k1")]),
]


def _users_args(extra: dict | None = None) -> list[str]:
    out = []
    for name, rules in {**RULES, **(extra or {})}.items():
        out += ["--users", f"{name} {rules}"]
    return out + ["--users", ADMIN]


@pytest.fixture(scope="module")
def valkeys():
    backend, direct = Server("valkey"), Server("valkey")
    c = direct.client()
    for name, rules in RULES.items():
        c.execute_command("ACL", "SETUSER", name, *rules.split())
    yield backend, direct
    backend.stop()
    direct.stop()


@pytest.fixture(scope="module")
def gated(valkeys):
    p = GateProxy("--backend", valkeys[0].addr, *_users_args())
    yield p
    p.stop()


def _flush(*servers):
    for s in servers:
        s.client().flushall()


def _past_monitor(c: RawClient):
    """(reply, call) on c that skip MONITOR's lines (vproxy's own probes show there too)."""
    def reply() -> bytes:
        while True:
            f = c.read()
            if not re.match(rb"\+\d", f):
                return f

    def call(*args) -> bytes:
        c.send(E(*args))
        return reply()
    return reply, call


def _session(port: int, user: str, requests) -> list[bytes]:
    with RawClient(port) as c:
        assert c.call("AUTH", user, RULES[user].split()[1][1:]) == b"+OK\r\n"
        return [c.call(*req) for req in requests]


@pytest.mark.parametrize("user,requests", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_replies_are_the_servers_byte_for_byte(gated, valkeys, user, requests):
    backend, direct = valkeys
    _flush(backend, direct)
    want = _session(direct.port, user, requests)
    got = _session(gated.port, user, requests)
    for req, w, g in zip(requests, want, got):
        assert g == w, f"{user} {req}: proxy {g!r}, server {w!r}"
    assert any(w.startswith(b"-NOPERM") for w in want)  # each script meets a refusal
    assert any(not w.startswith(b"-") for w in want)  # and an allowed request


def test_noperm_texts_exactly(gated, valkeys):
    _flush(valkeys[0])
    with RawClient(gated.port) as c:
        assert c.call("AUTH", "alice", "apw") == b"+OK\r\n"
        assert c.call("FLUSHALL") == b"-NOPERM User alice has no permissions to run the 'flushall' command\r\n"
        assert c.call("GET", "nope") == b"-NOPERM No permissions to access a key\r\n"
        assert c.call("AUTH", "dana", "dpw") == b"+OK\r\n"
        assert c.call("GET", "a") == b"-NOPERM No permissions to access database\r\n"


def test_refused_in_multi_aborts_exec_like_the_server(gated, valkeys):
    """A request the rules refuse while MULTI queues makes EXEC abort, as the server's own refusal
    does: nothing of the transaction runs."""
    backend, direct = valkeys
    _flush(backend, direct)
    reqs = [("MULTI",), ("SET", "w:1", "v"), ("GET", "w:1"), ("EXEC",)]
    want, got = _session(direct.port, "carl", reqs), _session(gated.port, "carl", reqs)
    assert got == want and want[3].startswith(b"-EXECABORT")
    assert direct.client().get("w:1") is None and backend.client().get("w:1") is None


def test_scripts_refused_to_users_with_limits(gated, valkeys):
    """A script's redis.call()s would run with vproxy's own rights, past every key, command and
    database rule: a user with limits may not run scripts or functions; a user without may."""
    backend, _ = valkeys
    _flush(backend)
    backend.client().set("other", "secret")
    with RawClient(gated.port) as c:
        assert c.call("AUTH", "carl", "cpw") == b"+OK\r\n"
        for req in (("EVAL", "return redis.call('get','other')", "0"),
                    ("EVAL", "return redis.call('set','other','x')", "0"),
                    ("EVAL_RO", "return 1", "0"), ("FCALL", "f", "0")):
            got = c.call(*req)
            assert got.startswith(b"-NOPERM User carl has no permissions to run the '" + req[0].lower().encode()), got
    assert backend.client().get("other") == b"secret"
    with RawClient(gated.port) as c:
        assert c.call("AUTH", "admin", "adminpw") == b"+OK\r\n"
        assert c.call("EVAL", "return redis.call('get','other')", "0") == b"$6\r\nsecret\r\n"


def test_auth_inside_multi_is_refused_and_never_reaches_the_backend(gated, valkeys):
    backend, _ = valkeys
    backend.client().execute_command("ACL", "LOG", "RESET")
    with RawClient(gated.port) as c:
        assert c.call("AUTH", "dana", "dpw") == b"+OK\r\n"
        assert c.call("MULTI") == b"+OK\r\n"
        assert c.call("AUTH", "admin", "adminpw").startswith(b"-ERR vproxy: AUTH inside MULTI")
        assert c.call("HELLO", "3", "AUTH", "admin", "adminpw").startswith(b"-ERR vproxy: AUTH inside MULTI")
        assert c.call("EXEC").startswith(b"-EXECABORT")
        assert c.call("ACL", "WHOAMI") == b"$4\r\ndana\r\n"
    assert backend.client().execute_command("ACL", "LOG") == []


def test_auth_failures_and_disabled_users(gated, valkeys):
    before = gated.info()["auth_failures"]
    with RawClient(gated.port) as c:
        assert c.call("PING") == b"-NOAUTH Authentication required.\r\n"
        wrong = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        assert c.call("AUTH", "alice", "bad") == wrong
        assert c.call("AUTH", "nosuch", "x") == wrong
        assert c.call("AUTH", "off1", "opw") == wrong  # off: refused, as on the server
        assert c.call("AUTH", "apw") == wrong  # the default user: not defined, no password
        assert c.call("HELLO", "3", "AUTH", "alice", "bad").startswith(b"-WRONGPASS")
        assert c.call("PING") == b"-NOAUTH Authentication required.\r\n"
        assert c.call("HELLO", "3", "AUTH", "alice", "apw").startswith(b"%")
        assert c.call("GET", "app:x") == b"_\r\n"
    assert gated.info()["auth_failures"] == before + 5


def test_redis_py_clients(gated, valkeys):
    _flush(valkeys[0])
    for proto in (2, 3):
        c = gated.client(username="carl", password="cpw", protocol=proto)
        assert c.set("w:a", "1") is True
        with pytest.raises(redis.exceptions.NoPermissionError, match="No permissions to access a key"):
            c.get("w:a")
        with pytest.raises(redis.exceptions.NoPermissionError, match=re.escape("'config|get' command")):
            c.config_get("maxmemory")
        assert c.acl_whoami() in ("carl", b"carl")  # redis-py decodes it in RESP2 only
        assert "user=carl" in c.execute_command("CLIENT", "INFO").decode()
        c.close()
    with pytest.raises(redis.exceptions.AuthenticationError):
        gated.client(username="carl", password="nope").ping()


def test_acl_getuser_and_list_are_the_servers(gated, valkeys):
    """ACL GETUSER and ACL LIST show a user (selectors and databases included) as the server shows
    the same rules."""
    proxy, direct = gated.client(), valkeys[1].client()
    listed = {x.split()[1]: x for x in proxy.execute_command("ACL", "LIST")}
    for line in direct.execute_command("ACL", "LIST"):
        name = line.split()[1]
        if name.decode() in RULES:
            assert listed[name] == line
            assert proxy.execute_command("ACL", "GETUSER", name) == direct.execute_command("ACL", "GETUSER", name)


def test_acl_commands_answer_from_the_proxy_users(gated):
    c = gated.client()
    assert sorted(c.acl_users()) == sorted(["admin", *RULES])
    listed = [x.decode() for x in c.execute_command("ACL", "LIST")]
    alice = next(x for x in listed if x.startswith("user alice "))
    assert "apw" not in " ".join(listed) and "#" in alice and "~app:*" in alice and "-flushall" in alice
    with pytest.raises(redis.exceptions.ResponseError, match="not available through the proxy"):
        c.execute_command("ACL", "SETUSER", "mallory", "on", ">x", "+@all")
    assert c.execute_command("ACL", "WHOAMI") == b"admin"
    assert c.execute_command("ACL", "GETUSER", "nosuch") is None


def test_default_user_from_password(valkeys, start_gate):
    """`password` with `users`: the default user's password, full rights; the named users beside it."""
    p = start_gate("--backend", valkeys[0].addr, "--password", "dpass", "--users", "ro on >ro ~* +@read",
                   cred=(None, "dpass"))
    c = p.client()
    assert c.set("k", "v") and c.execute_command("ACL", "WHOAMI") == b"default"
    ro = p.client(username="ro", password="ro")
    assert ro.get("k") == b"v"
    with pytest.raises(redis.exceptions.NoPermissionError):
        ro.set("k", "w")


def test_nopass_default_user_needs_no_auth(valkeys, start_gate):
    p = start_gate("--backend", valkeys[0].addr, "--users", "default on nopass ~pub:* +@read +ping",
                   "--users", ADMIN)
    c = p.client(username=None, password=None)  # no AUTH: the default user
    assert c.ping() is True and c.get("pub:x") is None
    with pytest.raises(redis.exceptions.NoPermissionError):
        c.set("pub:x", "1")
    assert p.client(username="admin", password="adminpw").set("pub:x", "1") is True
    assert c.get("pub:x") == b"1"


def test_backend_password_is_never_shown(start_server, start_gate, tmp_path):
    secret = "b4ckend-s3cret"
    backend = start_server("valkey")
    backend.client().config_set("requirepass", secret)
    log = tmp_path / "vproxy.log"
    p = start_gate("--backend", backend.addr, "--backend-password", secret, "--log-level", "DEBUG",
                   "--users", "app on >app-pw allkeys allcommands allchannels", "--users", ADMIN,
                   log_path=log, cred=("app", "app-pw"))
    c = p.client()
    seen = []
    for req in (("CONFIG", "GET", "*"), ("CONFIG", "GET", "requirepass"), ("CLIENT", "LIST"), ("INFO", "everything"),
                ("ACL", "LIST"), ("ACL", "GETUSER", "app"), ("PROXY", "CONFIG", "GET", "*"), ("PROXY", "INFO")):
        seen.append(repr(c.execute_command(*req)))
    config = c.config_get("requirepass")
    assert config["requirepass"] not in ("", secret)  # there is one, and it is hidden
    with RawClient(p.port) as raw:  # RESP3 too
        assert raw.call("HELLO", "3", "AUTH", "app", "app-pw").startswith(b"%")
        seen.append(repr(raw.call("CONFIG", "GET", "requirepass")))
    with RawClient(p.port) as raw:  # in a transaction: EXEC's reply hides them too
        assert raw.call("AUTH", "app", "app-pw") == b"+OK\r\n" and raw.call("MULTI") == b"+OK\r\n"
        for req in (("SET", "k", "requirepass"), ("CONFIG", "GET", "requirepass"), ("GET", "k")):
            assert raw.call(*req) == b"+QUEUED\r\n"
        assert raw.call("ACL", "SETUSER", "x", "on", ">y", "+@all").startswith(b"-ERR vproxy: ACL inside MULTI")
        assert raw.call("EXEC").startswith(b"-EXECABORT")
        assert raw.call("MULTI") == b"+OK\r\n"
        for req in (("SET", "k", "requirepass"), ("CONFIG", "GET", "requirepass"), ("GET", "k")):
            assert raw.call(*req) == b"+QUEUED\r\n"
        done = raw.call("EXEC")  # only the CONFIG GET's value is hidden, the GET's stays
        assert done == b"*3\r\n+OK\r\n*2\r\n$11\r\nrequirepass\r\n$18\r\n(hidden by vproxy)\r\n$11\r\nrequirepass\r\n"
        seen.append(repr(done))
    for start in (("SUBSCRIBE", "ch"), ("MONITOR",)):  # inside a stream: vproxy still answers these
        with RawClient(p.port) as raw:
            reply, call = _past_monitor(raw)
            assert call("HELLO", "3", "AUTH", "app", "app-pw").startswith(b"%")
            call(*start)
            got = call("CONFIG", "GET", "requirepass")
            assert got.startswith(b"%1\r\n") and b"hidden by vproxy" in got
            seen.append(repr(got))
            assert call("ACL", "WHOAMI") == b"$3\r\napp\r\n"
            assert call("ACL", "SETUSER", "x", "on", ">y", "+@all").startswith(b"-ERR vproxy: users are vproxy's")
            assert call("PROXY", "VERSION").startswith(b"$")
            assert call("MULTI") == b"+OK\r\n" and call("CONFIG", "GET", "requirepass") == b"-ERR wrong number of arguments for 'config' command\r\n"
            assert call("AUTH", "app", "app-pw").startswith(b"-ERR wrong number of arguments for 'auth'")
            assert call("EXEC").startswith(b"-EXECABORT")
    assert backend.client(password=secret).execute_command("ACL", "USERS") == [b"default"]  # no SETUSER got through
    text = "\n".join(seen)
    assert secret not in text and "app-pw" not in text
    p.stop()
    logged = log.read_text()
    assert "learned" in logged  # the log was written
    assert secret not in logged and "app-pw" not in logged and "adminpw" not in logged


def test_refused_auth_is_audited(valkeys, start_gate, tmp_path):
    p = start_gate("--backend", valkeys[0].addr, "--audit-dir", str(tmp_path), "--users", ADMIN)
    with RawClient(p.port) as c:
        assert c.call("AUTH", "admin", "guess").startswith(b"-WRONGPASS")

    def refused():
        path = tmp_path / "audit.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r for r in recs if r["command"] == "auth" and r["outcome"] == "refused"]
    recs = wait_for(refused, what="the refused AUTH's record")
    assert recs[0]["user"] == "admin" and recs[0]["error"] == "WRONGPASS"
    assert "guess" not in (tmp_path / "audit.jsonl").read_text()


def test_reload_applies_new_rules_to_live_sessions(valkeys, start_gate, tmp_path):
    conf = tmp_path / "v.toml"
    conf.write_text(f'backend = ["{valkeys[0].addr}"]\n[users]\nadmin = "{ADMIN.split(" ", 1)[1]}"\n'
                    'bob = "on >bpw ~* +@all"\n')
    p = start_gate("-c", str(conf))
    admin = p.client()
    bob = p.client(username="bob", password="bpw")
    assert bob.set("k", "v") is True
    conf.write_text(conf.read_text().replace('bob = "on >bpw ~* +@all"', 'bob = "on >bpw ~* +@read"'))
    assert admin.execute_command("PROXY", "RELOAD")
    with pytest.raises(redis.exceptions.NoPermissionError):
        bob.set("k", "w")  # the same connection: its user's new rules
    assert bob.get("k") == b"v"


# ---- the rules themselves, and the plain path's predicate (unit) ----

@pytest.fixture(scope="module")
def table(valkeys):
    t = CommandTable()
    with RawClient(valkeys[0].port) as c:
        assert t.learn(resp.decode(c.call("COMMAND"))) > 200
    return t


def test_plain_path_kept_for_allkeys_users(table):
    """What an allkeys user may run goes out on the plain path unchecked; what it may not, and what
    needs a key, database or channel check, takes the batch path."""
    u = parse_user("u on >x allkeys +@all -flushall -debug")
    fwd = u.predicate(table, True)
    assert fwd(b"get", 2) and fwd(b"set", 3) and fwd(b"mget", 4) and fwd(b"ping", 1)
    assert not fwd(b"flushall", 1) and not fwd(b"acl", 2) and not fwd(b"publish", 3)  # channels: none
    assert not fwd(b"get", 5)  # a wrong arity: the table's own answer (batch path)
    keyed = parse_user("k on >x ~app:* +@all").predicate(table, True)
    assert not keyed(b"get", 2) and keyed(b"ping", 1) and keyed(b"echo", 2)
    dbs = parse_user("d on >x allkeys +@all db=1")
    assert dbs.predicate(table, True)(b"get", 2) and not dbs.predicate(table, False)(b"get", 2)
    assert not dbs.predicate(table, True)(b"move", 3) and dbs.predicate(table, False)(b"ping", 1)
    assert parse_user("all on nopass allkeys allchannels allcommands").everything


def test_rules_parse_and_describe():
    u = parse_user("x on >pw #" + "a" * 64 + " nopass resetpass >p2 ~a* %R~b* %W~c* resetkeys ~d* "
                   "+@read -get +config|get allchannels db=0,3 rate=10")
    assert u.enabled and not u.nopass and len(u.hashes) == 1 and u.rate == 10
    assert u.describe().split()[2:] == ["~d*", "&*", "db=0,3", "-@all", "+@read", "-get", "+config|get", "rate=10"]
    sel = parse_user("s on nopass +get (+set ~s* db=1) (allkeys) clearselectors (~x* +@read)")
    assert sel.describe() == "on nopass resetchannels -@all +get (~x* resetchannels -@all +@read)"
    for bad in ("x on +@nosuch", "x on %X~a", "x on db=a", "x on #123", "x on whatever", "x (+get ~a",
                "x (on +get)", "x (>pw)", "x (rate=3)", "x (reset)", "x (+get)(+set)", "x (+get))", "x (+get ~a)b"):
        with pytest.raises(ValueError):
            parse_user(bad)
    assert glob(b"a[b-c]?\\*").match(b"ac1*") and not glob(b"a[^b]").match(b"ab")
    assert glob(b"[z-a]x").match(b"mx") and not glob(b"[c-a]x").match(b"dx")  # reversed: swapped, as the server


def test_users_setting_keeps_only_hashes(tmp_path):
    from vproxy.config import load
    conf = tmp_path / "v.toml"
    conf.write_text('[users]\nalice = "on >clear-text ~* +@all"\n')
    cfg = load(["-c", str(conf)], env={})
    assert "clear-text" not in repr(cfg.values) and cfg.users[0].startswith("alice on #")
    env = load([], env={"VPROXY_USERS": "a on >x db=0,1; b off"})
    assert [u.split()[0] for u in env.users] == ["a", "b"] and "db=0,1" in env.users[0]
    from vproxy.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown rule"):
        load(["--users", "a on bogus"], env={})
    with pytest.raises(ConfigError, match="fleet"):
        load(["--users", "vproxy-fleet on >x +@all"], env={})
    with pytest.raises(ConfigError, match="not both"):
        load(["--users", "default on nopass", "--password", "x"], env={})


def test_denials_counted(gated, valkeys):
    before = gated.info()["acl_denied"]
    with RawClient(gated.port) as c:
        assert c.call("AUTH", "alice", "apw") == b"+OK\r\n"
        for _ in range(3):
            assert c.call("FLUSHALL").startswith(b"-NOPERM")
        assert c.call("GET", "app:none") == b"$-1\r\n"
    assert gated.info()["acl_denied"] == before + 3


def test_cluster_mode(start_gate):
    """Cluster mode: the one-key plain path and the batch path check the same rules."""
    from clusterkit import Cluster
    cluster = Cluster("valkey", 3, 0)
    try:
        p = start_gate("--mode", "cluster", "--backend", cluster.seeds[0], *_users_args())
        carl = RawClient(p.port)
        alice = RawClient(p.port)
        assert carl.call("AUTH", "carl", "cpw") == b"+OK\r\n" and alice.call("AUTH", "alice", "apw") == b"+OK\r\n"
        keys = [f"w:{j}" for j in range(30)]  # every node
        carl.send(b"".join(E("SET", k, "v") for k in keys))
        assert carl.read_n(30) == [b"+OK\r\n"] * 30
        carl.send(b"".join(E("GET", k) for k in keys[:3]) + E("GET", "r:1") + E("SET", "r:1", "x"))
        assert carl.read_n(5) == [NOPERM_KEY] * 3 + [b"$-1\r\n", NOPERM_KEY]  # %W~w:*, %R~r:*
        assert carl.call("MSET", "w:a", "1", "r:b", "2") == NOPERM_KEY  # split across nodes: checked first
        assert carl.call("MSET", "w:a", "1", "w:b", "2") == b"+OK\r\n"
        assert carl.call("CONFIG", "GET", "x") == b"-NOPERM User carl has no permissions to run the 'config|get' command\r\n"
        assert alice.call("GET", "app:1") == b"$-1\r\n" and alice.call("GET", "w:1") == NOPERM_KEY
        assert alice.call("FLUSHALL") == b"-NOPERM User alice has no permissions to run the 'flushall' command\r\n"
        assert [carl.call("MULTI"), carl.call("SET", "w:{t}", "v"), carl.call("GET", "w:{t}")] == \
            [b"+OK\r\n", b"+QUEUED\r\n", NOPERM_KEY]
        assert carl.call("EXEC").startswith(b"-EXECABORT")  # as the server: refused while queueing
        full = p.client()
        assert full.get("w:{t}") is None
        assert full.get("w:1") == b"v" and full.get("r:1") is None
        carl.close()
        alice.close()
    finally:
        cluster.stop()


def test_conf_example_loads():
    from pathlib import Path

    from vproxy.config import load
    cfg = load(["-c", str(Path(__file__).resolve().parent.parent / "conf" / "users.toml")], env={})
    assert [u.split()[0] for u in cfg.users] == ["admin", "app", "report", "cache", "worker", "default"]
    assert "app-secret" not in repr(cfg.values)


@pytest.mark.parametrize("start", [("HELLO", "3"), ("MONITOR",)], ids=["resp3-subscription", "monitor"])
def test_auth_inside_a_stream_is_the_proxys(gated, valkeys, start):
    """RESP3 pub/sub and MONITOR let a client run AUTH: vproxy answers it (its users, not the
    backend's), in its place among the stream's replies, and the session's user is the new one."""
    backend, _ = valkeys
    backend.client().execute_command("ACL", "LOG", "RESET")
    with RawClient(gated.port) as c:
        reply, call = _past_monitor(c)
        assert call("AUTH", "admin", "adminpw") == b"+OK\r\n"
        call(*start)
        if start[0] == "HELLO":
            assert call("SUBSCRIBE", "news.a").startswith(b">3\r\n")
        assert call("AUTH", "carl", "wrong").startswith(b"-WRONGPASS")
        same, other = ("3", "2") if start[0] == "HELLO" else ("2", "3")
        hello = call("HELLO", same, "AUTH", "carl", "cpw")  # vproxy's answer: its map, its client id
        assert hello.startswith(b"%7\r\n" if same == "3" else b"*14\r\n") and b"proto" in hello
        assert call("CLIENT", "ID").split(b"\r\n")[0][1:] in hello
        assert call("HELLO", other, "AUTH", "carl", "cpw").startswith(b"-ERR vproxy: HELLO with AUTH switching")
        c.send(E("PING", "before") + E("AUTH", "carl", "cpw") + E("PING", "after"))
        assert [reply() for _ in range(3)] == [b"$6\r\nbefore\r\n", b"+OK\r\n", b"$5\r\nafter\r\n"]
        if start[0] == "HELLO":
            assert call("UNSUBSCRIBE", "news.a").startswith(b">3\r\n")
            assert call("ACL", "WHOAMI") == b"$4\r\ncarl\r\n"
    assert backend.client().execute_command("ACL", "LOG") == []  # no credentials reached the backend


def test_auth_in_reply_skip_and_resp2_subscription(gated, valkeys):
    """CLIENT REPLY SKIP skips one reply, not every AUTH's after it; in a RESP2 subscription AUTH
    gets the server's refusal, word for word, without the credentials leaving vproxy."""
    direct = valkeys[1]
    with RawClient(gated.port) as c, RawClient(direct.port) as d:
        for conn in (c, d):
            assert conn.call("AUTH", "carl", "cpw") == b"+OK\r\n"
        c.send(E("CLIENT", "REPLY", "SKIP") + E("PING", "a") + E("AUTH", "carl", "cpw") + E("PING", "b"))
        assert [c.read(), c.read()] == [b"+OK\r\n", b"$1\r\nb\r\n"]
        assert c.call("CLIENT", "REPLY", "ON") == b"+OK\r\n"
        got, want = [], []
        for conn, out in ((c, got), (d, want)):
            assert conn.call("AUTH", "erin", "epw") == b"+OK\r\n"
            out.append(conn.call("SUBSCRIBE", "news.x"))
            out += [conn.call("AUTH", "carl", "cpw"), conn.call("PING", "p")]
        assert got == want and want[1].startswith(b"-ERR Can't execute 'auth'")
