"""Session state the proxy keeps per client: databases, protocol, names, auth, RESET/QUIT, INFO,
and the commands test harnesses send (FLUSH*, CONFIG, OBJECT, SCRIPT, COMMAND, DEBUG)."""

from __future__ import annotations

import subprocess
import threading
import time
import warnings

import pytest
import redis
from conftest import BACKENDS, RawClient, raw_exchange, split_reply
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_CLI = "/usr/bin/redis-cli"
NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries failed AUTH for seconds by default


def err(fn, *args, **kw) -> str:
    """The error text a redis-py call raises (the test fails if it does not raise)."""
    with pytest.raises(redis.RedisError) as ei:
        fn(*args, **kw)
    return str(ei.value)


def compare(server, proxy, data: bytes, n: int = 1) -> list[bytes]:
    """Send the same bytes straight to the server and through the proxy; the replies must match."""
    direct = raw_exchange(server.port, data, n)
    via = raw_exchange(proxy.port, data, n)
    assert via == direct, f"proxy answered {via!r}, the server {direct!r}"
    return via


# ---- SELECT ----


@pytest.mark.parametrize("protocol", [2, 3])
def test_select_isolation_between_clients(proxy, server, protocol):
    server.client().flushall()
    a = proxy.client(db=1, protocol=protocol)
    b = proxy.client(db=2, protocol=protocol)
    a.set("shared-name", "from-db1")
    b.set("shared-name", "from-db2")
    a.set("only-in-1", "x")
    assert a.get("shared-name") == b"from-db1"
    assert b.get("shared-name") == b"from-db2"
    assert b.get("only-in-1") is None
    assert b.exists("only-in-1") == 0
    assert sorted(a.keys()) == [b"only-in-1", b"shared-name"]
    assert b.keys() == [b"shared-name"]
    # the server agrees on where each key went
    assert server.client(db=1).get("shared-name") == b"from-db1"
    assert server.client(db=2).get("shared-name") == b"from-db2"
    assert server.client(db=0).dbsize() == 0


def test_select_isolation_under_concurrency(proxy, server):
    """Clients in different databases hammer the same key names at once: nobody sees another's."""
    server.client().flushall()
    errors = []

    def worker(db: int):
        c = proxy.client(db=db, protocol=2 if db % 2 else 3)
        try:
            for i in range(150):
                p = c.pipeline(transaction=False)
                p.set("k", f"{db}:{i}")
                p.get("k")
                p.incr("n")
                _, got, n = p.execute()
                if got != f"{db}:{i}".encode() or n != i + 1:
                    errors.append((db, i, got, n))
                    return
        except Exception as e:  # noqa: BLE001 - reported below, with the db that saw it
            errors.append((db, repr(e)))
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(db,)) for db in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for db in range(8):
        assert server.client(db=db).get("n") == b"150"


def test_select_switches_within_one_connection(raw):
    c = raw()
    assert c.call("SET", "k", "db0") == b"+OK\r\n"
    assert c.call("SELECT", "5") == b"+OK\r\n"
    assert c.call("GET", "k") == b"$-1\r\n"
    # pipelined: the SELECT applies exactly between the two GETs
    c.send(
        c.encode("SET", "k", "db5")
        + c.encode("SELECT", "0")
        + c.encode("GET", "k")
        + c.encode("SELECT", "5")
        + c.encode("GET", "k")
    )
    assert c.read_n(5) == [b"+OK\r\n", b"+OK\r\n", b"$3\r\ndb0\r\n", b"+OK\r\n", b"$3\r\ndb5\r\n"]


@pytest.mark.parametrize("arg", ["16", "-1", "abc", "1.5"])
def test_select_out_of_range_like_the_server(proxy, server, arg):
    compare(server, proxy, RawClient.encode("SELECT", arg))
    c = proxy.client(protocol=2)
    assert "out of range" in err(c.execute_command, "SELECT", arg)
    assert c.ping() is True


def test_select_beyond_32_bits(proxy, server):
    """A long long but no int: the server's own wording ("value must between ..." sic)."""
    reply = compare(server, proxy, RawClient.encode("SELECT", "99999999999"))[0]
    assert reply == b"-ERR value is out of range, value must between -2147483648 and 2147483647\r\n"


@pytest.mark.parametrize("arg", ["1_0", " 1", "1 ", "+1", "01", "-0", "99999999999999999999"])
def test_select_reads_the_number_as_the_server_does(proxy, server, raw, arg):
    """Python's int() takes all of these; the server's string2ll() takes none, and the session
    stays in its database (SELECT 1_0 once moved it to db 10)."""
    E = RawClient.encode
    assert compare(server, proxy, E("SELECT", arg) + E("ECHO", "next"), 2)[0] == \
        b"-ERR value is not an integer or out of range\r\n"
    c = raw()
    assert c.call("SELECT", arg).startswith(b"-ERR")
    assert c.call("SET", "where", "db0") == b"+OK\r\n"
    assert server.client(db=0).get("where") == b"db0"
    assert server.client(db=10).get("where") is None


# ---- HELLO, AUTH ----


def test_hello_switches_protocol_both_ways(raw):
    c = raw()
    c.call("HSET", "h", "f", "v")
    assert c.call("HGETALL", "h") == b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    hello = c.call("HELLO", "3")
    assert hello.startswith(b"%")
    assert b"$5\r\nproto\r\n:3\r\n" in hello
    assert c.call("HGETALL", "h") == b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    assert c.call("GET", "missing") == b"_\r\n"
    hello2 = c.call("HELLO", "2")
    assert hello2.startswith(b"*14\r\n")
    assert b"$5\r\nproto\r\n:2\r\n" in hello2
    assert c.call("HGETALL", "h") == b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    assert c.call("GET", "missing") == b"$-1\r\n"


def test_hello_without_version_and_bad_versions(proxy, server, raw):
    c = raw()
    assert b"proto\r\n:2\r\n" in c.call("HELLO")
    assert c.call("HELLO", "4").startswith(b"-NOPROTO")
    assert c.call("HELLO", "x").startswith(b"-ERR Protocol version is not an integer")
    compare(server, proxy, RawClient.encode("HELLO", "4"))
    assert c.call("PING") == b"+PONG\r\n"


@pytest.mark.parametrize("arg", [" 3", "3 ", "03", "+3"])
def test_hello_reads_the_version_as_the_server_does(proxy, server, raw, arg):
    E = RawClient.encode
    assert compare(server, proxy, E("HELLO", arg) + E("ECHO", "next"), 2)[0] == \
        b"-ERR Protocol version is not an integer or out of range\r\n"
    c = raw()
    assert c.call("HELLO", arg).startswith(b"-ERR")
    assert c.call("GET", "missing") == b"$-1\r\n"  # still RESP2


def test_hello_setname(raw):
    c = raw()
    assert c.call("HELLO", "3", "SETNAME", "worker-1").startswith(b"%")
    assert c.call("CLIENT", "GETNAME") == b"$8\r\nworker-1\r\n"
    assert b"name=worker-1 " in c.call("CLIENT", "INFO")
    assert c.call("HELLO", "3", "SETNAME", "bad name").startswith(b"-ERR Client names cannot contain spaces")
    assert c.call("CLIENT", "GETNAME") == b"$8\r\nworker-1\r\n"


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_handshake_with_name_and_lib(proxy, server, protocol):
    """What redis-py 8 sends on connect (HELLO, CLIENT SETNAME, CLIENT SETINFO LIB-NAME/LIB-VER)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # lib_name: redis-py 8 prefers driver_info
        c = proxy.client(protocol=protocol, client_name="app-main", lib_name="mylib", lib_version="9.9.9")
    assert c.ping() is True
    info = c.client_info()
    assert info["name"] == "app-main"
    assert info["lib-name"] == "mylib"
    assert info["lib-ver"] == "9.9.9"
    assert int(info["resp"]) == protocol
    assert c.client_getname() in ("app-main", b"app-main")
    my_id = c.client_id()
    assert int(info["id"]) == my_id
    other = proxy.client(protocol=protocol, client_name="app-other")
    assert other.client_id() != my_id
    listed = {int(e["id"]): e for e in c.client_list()}
    assert listed[my_id]["name"] == "app-main"
    assert listed[other.client_id()]["name"] == "app-other"
    assert c.client_list(client_id=[my_id])[0]["name"] == "app-main"
    other.close()
    c.close()


def test_client_setname_getname_setinfo_errors(raw):
    c = raw()
    assert c.call("CLIENT", "GETNAME") == b"$-1\r\n"
    assert c.call("CLIENT", "SETNAME", "svc") == b"+OK\r\n"
    assert c.call("CLIENT", "GETNAME") == b"$3\r\nsvc\r\n"
    assert c.call("CLIENT", "SETNAME", "has space").startswith(b"-ERR Client names cannot contain")
    assert c.call("CLIENT", "SETINFO", "LIB-NAME", "x y").startswith(b"-ERR")
    assert c.call("CLIENT", "SETINFO", "NOPE", "x").startswith(b"-ERR")
    assert c.call("CLIENT", "SETINFO", "lib-ver", "1.0") == b"+OK\r\n"
    assert b"lib-ver=1.0" in c.call("CLIENT", "INFO")
    assert c.call("CLIENT", "SETNAME", "") == b"+OK\r\n"  # clears the name, as on the server
    assert c.call("CLIENT", "GETNAME") == b"$-1\r\n"


@pytest.mark.parametrize(
    "args",
    [
        ("CLIENT", "ID", "x"),
        ("CLIENT", "ID", "1"),
        ("CLIENT", "GETNAME", "x"),
        ("CLIENT", "GETREDIR", "x"),
        ("CLIENT", "UNBLOCK"),
        ("CLIENT", "UNBLOCK", "x"),
        ("CLIENT", "UNBLOCK", "+987654321"),
        ("CLIENT", "UNBLOCK", " 987654321"),
        ("CLIENT", "UNBLOCK", "99999999999999999999"),
        ("CLIENT", "UNBLOCK", "-1"),
        ("CLIENT", "UNBLOCK", "987654321", "BAD"),
        ("CLIENT", "UNBLOCK", "x", "BAD"),
        ("CLIENT", "KILL", "ID", "0"),
        ("CLIENT", "KILL", "ID", "-1"),
        ("CLIENT", "KILL", "SKIPME", "maybe"),
        ("CLIENT", "KILL"),
        ("CLIENT", "REPLY"),
        ("CLIENT", "REPLY", "ON", "x"),
        ("CLIENT", "REPLY", "OFF", "x"),
        ("CLIENT", "REPLY", "SKIP", "x"),
        ("CLIENT", "TRACKING"),
        ("CLIENT", "INFO", "x"),
        ("CLIENT", "NO-EVICT"),
        ("CLIENT", "NO-EVICT", "ON", "x"),
        ("CLIENT", "SETNAME", "caf\u00e9"),  # bytes past '~' (UTF-8 here): refused as by the server
        ("CLIENT", "SETNAME", "a~b"),
        ("HELLO", "2", "SETNAME", "\x7f"),
        ("HELLO", "3", "AUTH"),  # the option named as the client spelled it
        ("HELLO", "2", "SetName"),
        ("HELLO", "3", "NoSuch"),
    ],
)
def test_client_subcommand_arguments_like_the_server(proxy, server, args):
    """Numbers read as string2ll() reads them, and the checks made in the server's order."""
    E = RawClient.encode
    assert compare(server, proxy, E(*args) + E("ECHO", "next"), 2)[1] == b"$4\r\nnext\r\n"


@pytest.mark.parametrize(
    "args, want",
    [
        (("CLIENT", "KILL", "ID", "x"), b"-ERR syntax error\r\n"),
        (("CLIENT", "KILL", "ID", "+1"), b"-ERR syntax error\r\n"),
        (("CLIENT", "KILL", "ID", "01"), b"-ERR syntax error\r\n"),
        (("CLIENT", "UNBLOCK", "987654321", "BAD", "x"), b":0\r\n"),  # the reason is read at argc 4 only
        (("CLIENT", "SETINFO", "LIB-NAME", "a b"), b"-ERR LIB-NAME cannot contain spaces, newlines or special characters.\r\n"),
        (("CLIENT", "SETINFO", "lib-ver", "\u00e9"), b"-ERR lib-ver cannot contain spaces, newlines or special characters.\r\n"),
    ],
)
def test_client_subcommand_arguments_like_valkey(proxy, server, args, want):
    """Where Redis 7 answers otherwise ("client-id should be greater than 0", "unknown subcommand")."""
    E = RawClient.encode
    if server.kind == "valkey":
        assert raw_exchange(server.port, E(*args), 1) == [want]
    assert raw_exchange(proxy.port, E(*args), 1) == [want]


def test_client_maint_notifications_costs_no_backend_connection(proxy, server):
    """redis-py 8 sends CLIENT MAINT_NOTIFICATIONS on every RESP3 connect (and tolerates an error).

    The proxy hides backend maintenance itself; answering it must not open a backend connection."""
    before = int(proxy.client(protocol=2).info("proxy")["backend_connects"])
    for _ in range(5):
        c = proxy.client()  # redis-py 8 default: RESP3, maintenance notifications "auto"
        assert c.ping() is True
        c.close()
    after = int(proxy.client(protocol=2).info("proxy")["backend_connects"])
    assert after - before <= 2  # at most the shared RESP3 channels, not one per client


def test_auth_with_proxy_password(server, start_password_proxy):
    p = start_password_proxy("s3cret", "--backend", server.addr)
    with RawClient(p.port) as c:
        assert c.call("GET", "k").startswith(b"-NOAUTH")
        assert c.call("HELLO", "3").startswith(b"-NOAUTH")
        assert c.call("AUTH", "wrong").startswith(b"-WRONGPASS")
        assert c.call("AUTH", "nobody", "s3cret").startswith(b"-WRONGPASS")
        assert c.call("GET", "k").startswith(b"-NOAUTH")
        assert c.call("AUTH", "s3cret") == b"+OK\r\n"
        assert c.call("SET", "k", "v") == b"+OK\r\n"
        # RESET forgets the authentication, as on the server
        assert c.call("RESET") == b"+RESET\r\n"
        assert c.call("GET", "k").startswith(b"-NOAUTH")
        assert c.call("AUTH", "default", "s3cret") == b"+OK\r\n"
        assert c.call("GET", "k") == b"$1\r\nv\r\n"
    with RawClient(p.port) as c:
        hello = c.call("HELLO", "3", "AUTH", "default", "s3cret", "SETNAME", "authed")
        assert hello.startswith(b"%") and b"proto\r\n:3\r\n" in hello
        assert c.call("CLIENT", "GETNAME") == b"$6\r\nauthed\r\n"
        assert c.call("GET", "k") == b"$1\r\nv\r\n"
    with RawClient(p.port) as c:
        assert c.call("HELLO", "3", "AUTH", "default", "nope").startswith(b"-WRONGPASS")
        assert c.call("GET", "k").startswith(b"-NOAUTH")
    for protocol in (2, 3):
        good = p.client(protocol=protocol)  # password="s3cret": AUTH (RESP2) or HELLO 3 AUTH (RESP3)
        assert good.get("k") == b"v"
        good.close()
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            p.client(password="bad", protocol=protocol, retry=NO_RETRY).ping()
        with pytest.raises(redis.AuthenticationError):
            p.client(password=None, protocol=protocol, retry=NO_RETRY).get("k")  # redis-py maps NOAUTH to this


def test_auth_without_proxy_password_is_an_error_like_the_server(proxy, server):
    compare(server, proxy, RawClient.encode("AUTH", "whatever"))


# ---- RESET, QUIT, ECHO ----


def test_reset_forgets_session_state(raw):
    c = raw()
    c.call("HELLO", "3", "SETNAME", "before-reset")
    assert c.call("SELECT", "4") == b"+OK\r\n"
    assert c.call("SET", "k", "db4") == b"+OK\r\n"
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("SET", "k", "never") == b"+QUEUED\r\n"
    assert c.call("RESET") == b"+RESET\r\n"
    assert c.call("EXEC") == b"-ERR EXEC without MULTI\r\n"
    assert c.call("GET", "k") == b"$-1\r\n"  # back in db 0, and RESP2 again
    assert c.call("CLIENT", "GETNAME") == b"$-1\r\n"
    assert c.call("SELECT", "4") == b"+OK\r\n"
    assert c.call("GET", "k") == b"$3\r\ndb4\r\n"  # the MULTI was discarded


def test_quit_answers_ok_then_closes(raw):
    c = raw()
    c.send(RawClient.encode("SET", "q", "1") + RawClient.encode("QUIT") + RawClient.encode("SET", "q", "2"))
    assert c.read_n(2) == [b"+OK\r\n", b"+OK\r\n"]
    assert c.closed_by_peer(5)
    assert c.buf == b""
    assert raw().call("GET", "q") == b"$1\r\n1\r\n"  # nothing after QUIT ran


def test_echo(proxy, server, raw):
    c = raw()
    payload = bytes(range(256)) * 4
    assert c.call("ECHO", payload) == b"$1024\r\n" + payload + b"\r\n"
    assert proxy.client(protocol=3).echo("hi") == b"hi"
    compare(server, proxy, RawClient.encode("ECHO"))
    compare(server, proxy, RawClient.encode("ECHO", "a", "b"))


# ---- INFO ----


@pytest.mark.parametrize("protocol", [2, 3])
def test_info_has_server_fields_and_proxy_section(proxy, protocol):
    c = proxy.client(protocol=protocol)
    info = c.info()
    assert info["redis_version"]
    for field in ("connected_clients", "backend_connections_shared", "backend_connections_pinned"):
        assert field in info, field
    assert info["connected_clients"] >= 1
    assert c.info("proxy")["backend_connections_pinned"] >= 0
    with RawClient(proxy.port) as rc:
        if protocol == 3:
            rc.call("HELLO", "3")
        full = rc.call("INFO")
        assert full.startswith(b"=" if protocol == 3 else b"$")  # RESP3: a verbatim string, as the server
        assert b"# Server\r\n" in full and b"\r\n# Proxy\r\n" in full
        assert b"# Proxy" not in rc.call("INFO", "server")
        only = rc.call("INFO", "proxy")
        assert b"# Proxy" in only and b"redis_version" not in only


def test_info_and_version_say_which_parser_runs(proxy, server, start_proxy):
    """The compiled twin of the RESP parser (vproxy/_resp.pyx) when it is built, unless VPROXY_PURE=1."""
    import importlib.util
    import os
    import sys

    built = "compiled" if importlib.util.find_spec("vproxy._resp") else "pure"
    stats = "compiled" if importlib.util.find_spec("vproxy._stats") else "pure"
    plain = "compiled" if importlib.util.find_spec("vproxy._plain") else "pure"
    forced = os.environ.get("VPROXY_PURE") == "1"
    assert proxy.info()["proxy_impl"] == ("pure" if forced else built)
    assert proxy.info()["proxy_stats_impl"] == ("pure" if forced else stats)
    assert proxy.info()["proxy_plain_impl"] == ("pure" if forced else plain)
    recorder = "compiled" if importlib.util.find_spec("vproxy._audit") else "pure"
    fmt = "compiled" if importlib.util.find_spec("vproxy._auditfmt") else "pure"
    audit = "pure" if forced else recorder if recorder == fmt else f"{recorder},{fmt}"
    assert proxy.info()["proxy_audit_impl"] == audit
    info = start_proxy("--backend", server.addr, env={"VPROXY_PURE": "1"}).info()
    assert (info["proxy_impl"], info["proxy_stats_impl"], info["proxy_plain_impl"], info["proxy_audit_impl"]) \
        == ("pure",) * 4
    for pure, impl, st, pl in (("1", "pure", "pure", "pure"), ("", built, stats, plain)):
        out = subprocess.run([sys.executable, "-m", "vproxy", "--version"], capture_output=True, text=True, check=False,
                             env={**os.environ, "VPROXY_PURE": pure}, timeout=30)
        assert out.returncode == 0 and out.stdout == f"vproxy 0.1.0 (parser: {impl}, statistics: {st}, plain path: {pl})\n", out


def test_info_proxy_counts_connected_clients(proxy):
    base = proxy.client(protocol=2)
    n0 = base.info("proxy")["connected_clients"]
    extra = [RawClient(proxy.port) for _ in range(5)]
    for e in extra:
        assert e.call("PING") == b"+PONG\r\n"
    assert base.info("proxy")["connected_clients"] == n0 + 5
    for e in extra:
        e.close()
    from conftest import wait_for

    wait_for(lambda: base.info("proxy")["connected_clients"] == n0, what="closed clients to be counted out")


# ---- what test harnesses send through a proxy ----


def test_flushdb_and_flushall(proxy, server):
    c = proxy.client(protocol=2)
    c1 = proxy.client(db=1, protocol=2)
    c.set("a", 1)
    c1.set("b", 1)
    assert c.flushdb() is True
    assert c.dbsize() == 0 and c1.dbsize() == 1
    c.set("a", 1)
    assert c.flushall() is True
    assert c.dbsize() == 0 and c1.dbsize() == 0
    assert c.execute_command("FLUSHALL", "SYNC") is True
    assert c1.execute_command("FLUSHDB", "ASYNC") is True


def test_function_flush_load_fcall(proxy, server):
    c = proxy.client(protocol=2)
    assert c.function_flush() in (True, b"OK")
    lib = "#!lua name=vptest\nserver.register_function('vp_echo', function(keys, args) return args[1] end)"
    if server.kind == "redis7":
        lib = lib.replace("server.", "redis.")
    assert c.function_load(lib) == b"vptest"
    assert c.fcall("vp_echo", 0, "hey") == b"hey"
    assert c.function_flush() in (True, b"OK")
    assert "not found" in err(c.fcall, "vp_echo", 0, "hey").lower()


def test_config_get_set(proxy, server):
    c = proxy.client(protocol=2)
    d = server.client(protocol=2)
    old = c.config_get("maxmemory-policy")["maxmemory-policy"]
    try:
        assert c.config_set("maxmemory-policy", "allkeys-lru") is True
        assert d.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert proxy.client(protocol=3).config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    finally:
        c.config_set("maxmemory-policy", old)
    assert "no-such-setting" in err(c.config_set, "no-such-setting", "1")
    compare(server, proxy, RawClient.encode("CONFIG", "SET", "no-such-setting", "1"))


def test_object_encoding(proxy, server):
    c = proxy.client(protocol=2)
    c.set("int", 12345)
    c.set("str", "hello")
    c.rpush("list", "a")
    for key in ("int", "str", "list", "missing"):
        assert c.object("encoding", key) == server.client(protocol=2).object("encoding", key)
    assert c.object("encoding", "int") == b"int"


@pytest.mark.parametrize("protocol", [2, 3])
def test_script_load_evalsha(proxy, server, protocol):
    c = proxy.client(protocol=protocol)
    c.script_flush()
    c.delete("cnt")
    sha = c.script_load("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")
    assert c.script_exists(sha) == [True]
    assert c.evalsha(sha, 1, "cnt", "arg") == [b"cnt", b"arg", 1]
    assert c.evalsha(sha, 1, "cnt", "arg") == [b"cnt", b"arg", 2]
    with pytest.raises(redis.exceptions.NoScriptError):
        c.evalsha("0" * 40, 0)
    # the script cache is the server's: a direct client sees it too
    assert server.client().script_exists(sha) == [True]


def test_command_introspection(proxy, server):
    c, d = proxy.client(protocol=2), server.client(protocol=2)
    assert c.command_count() == d.command_count()
    assert c.execute_command("COMMAND", "INFO", "get") == d.execute_command("COMMAND", "INFO", "get")
    assert c.command_getkeys("MSET", "a", "1", "b", "2") == d.command_getkeys("MSET", "a", "1", "b", "2")
    assert len(c.execute_command("COMMAND")) == d.command_count()


def test_debug_answers_like_the_server(proxy, server):
    """Valkey/Redis refuse DEBUG unless enable-debug-command: the proxy must say the same."""
    for args in (("DEBUG", "SLEEP", "0"), ("DEBUG", "OBJECT", "nokey"), ("DEBUG",)):
        compare(server, proxy, RawClient.encode(*args))


@pytest.mark.parametrize("kind", BACKENDS)
def test_debug_when_enabled(kind, start_server, start_proxy):
    s = start_server(kind, "--enable-debug-command", "yes")
    p = start_proxy("--backend", s.addr)
    s.client().set("k", "v")
    c = p.client(protocol=2)
    assert c.execute_command("DEBUG", "SLEEP", "0") == b"OK"
    assert c.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", "1") == b"OK"
    via = c.execute_command("DEBUG", "OBJECT", "k")
    direct = s.client(protocol=2).execute_command("DEBUG", "OBJECT", "k")
    assert via.startswith(b"Value at:") and direct.startswith(b"Value at:")
    assert b"encoding:embstr" in via and b"encoding:embstr" in direct
    compare(s, p, RawClient.encode("DEBUG", "OBJECT", "nokey"))
    assert c.ping() is True


# ---- redis-cli ----


def test_redis_cli(proxy, server):
    server.client().flushall()

    def cli(*args, stdin=None):
        out = subprocess.run(
            [REDIS_CLI, "-p", str(proxy.port), *args], input=stdin, capture_output=True, check=False, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.decode()

    assert cli("PING").strip() == "PONG"
    assert cli("SET", "cli:k", "hello world").strip() == "OK"
    assert cli("GET", "cli:k").strip() == "hello world"
    assert cli("-n", "3", "SET", "cli:k", "in-db-3").strip() == "OK"
    assert cli("-n", "3", "GET", "cli:k").strip() == "in-db-3"
    assert "# Proxy" in cli("INFO")
    assert cli("-3", "HSET", "cli:h", "f", "v").strip() == "1"
    assert cli("-3", "HGETALL", "cli:h").split() == ["f", "v"]
    # --pipe: the mass-insertion mode (raw protocol on stdin, an ECHO marker at the end)
    payload = b"".join(RawClient.encode("SET", f"pipe:{i}", i) for i in range(2000))
    summary = cli("--pipe", stdin=payload)
    assert "errors: 0, replies: 2000" in summary
    assert server.client().get("pipe:1999") == b"1999"


def test_inline_and_multibulk_mix_matches_server(proxy, server):
    server.client().flushall()
    data = b'SET a "b c"\r\nGET a\r\n' + RawClient.encode("APPEND", "a", "!") + b"GET a\n"
    replies = compare(server, proxy, data, 4)
    assert replies[1] == b"$3\r\nb c\r\n" and replies[3] == b"$4\r\nb c!\r\n"
    assert split_reply(replies[0]) == len(replies[0])


# ---- the database a session is on (SELECT in pipelines, transactions, pub/sub) ----

E = RawClient.encode


def test_blocking_command_after_select_runs_in_the_new_db(raw, server):
    """A pipelined BLPOP after SELECT must not reuse the blocking connection leased for db 0."""
    server.client(db=0).rpush("a", "x")
    server.client(db=1).rpush("b", "y")
    c = raw()
    c.send(E("BLPOP", "a", "1") + E("SELECT", "1") + E("BLPOP", "b", "1"))
    assert c.read_n(3) == [b"*2\r\n$1\r\na\r\n$1\r\nx\r\n", b"+OK\r\n", b"*2\r\n$1\r\nb\r\n$1\r\ny\r\n"]


def test_failed_select_in_multi_keeps_the_session_db_and_the_pool(raw, server):
    """SELECT 99 fails inside EXEC: the session stays on its db, and no one's connections break."""
    c = raw()
    c.send(E("MULTI") + E("SELECT", "99") + E("EXEC"))
    assert c.read_n(3)[2] == b"*1\r\n-ERR DB index is out of range\r\n"
    assert c.call("SET", "k", "v") == b"+OK\r\n"
    assert server.client(db=0).get("k") == b"v"
    other = raw()
    assert other.call("SELECT", "3") == b"+OK\r\n"
    assert other.call("GET", "nothing") == b"$-1\r\n"


def test_select_in_multi_applies_to_the_rest_of_the_pipeline(raw, server):
    """MULTI / SELECT 1 / EXEC / SET in one pipeline: the SET runs in db 1, as on the server."""
    c = raw()
    c.send(E("MULTI") + E("SELECT", "1") + E("EXEC") + E("SET", "k5", "v"))
    assert c.read_n(4) == [b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+OK\r\n", b"+OK\r\n"]
    assert server.client(db=1).get("k5") == b"v"
    assert server.client(db=0).get("k5") is None


def test_select_refused_while_subscribed_resp2_keeps_the_db(raw, server):
    """In RESP2 pub/sub the server refuses SELECT: the session must not switch database."""
    c = raw()
    assert c.call("SUBSCRIBE", "ch").endswith(b":1\r\n")
    assert c.call("SELECT", "5").startswith(b"-ERR")
    assert c.call("UNSUBSCRIBE", "ch").endswith(b":0\r\n")
    assert c.call("SET", "k3", "v") == b"+OK\r\n"
    assert server.client(db=0).get("k3") == b"v"


def test_info_with_non_utf8_error_stat_answers(raw, server):
    """INFO's errorstats may hold any bytes a script put in an error: INFO must still answer."""
    c = raw()
    assert c.call("EVAL", b"return redis.error_reply('\xff\xfe boom')", "0") == b"-\xff\xfe boom\r\n"
    reply = c.call("INFO")
    assert reply.startswith(b"$") and b"# Proxy" in reply


def test_idle_timeout_spares_a_blocked_client(server, start_proxy):
    """client_idle_timeout must not close a client waiting in BLPOP (the server exempts blocked clients)."""
    p = start_proxy("--backend", server.addr, "--client-idle-timeout", "1")
    with RawClient(p.port) as c:
        started = time.monotonic()
        assert c.call("BLPOP", "nothing", "2.5") == b"*-1\r\n"
        assert time.monotonic() - started >= 2.0
        assert c.call("PING") == b"+PONG\r\n"
    with RawClient(p.port) as idle:  # and an idle client is still closed
        assert idle.closed_by_peer(timeout=5)
