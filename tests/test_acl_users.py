"""The backend's own ACL users through vproxy (no proxy `password`): AUTH and HELLO AUTH are the
server's business, and a session runs with its user's rights, never another's. Every reply is
compared byte for byte with the same requests on a direct connection to the server."""

from __future__ import annotations

import pytest
import redis
from conftest import RawClient, wait_for

E = RawClient.encode

# reader: may read app:* keys and nothing else; writer: everything on app:*, no dangerous commands
USERS = {
    "reader": ["on", ">rpass", "~app:*", "&news", "-@all", "+get", "+mget", "+ping", "+acl|whoami", "+blpop",
               "+subscribe", "+multi", "+exec", "+client|id", "+info"],
    "writer": ["on", ">wpass", "~app:*", "&*", "+@all", "-@dangerous"],
}


@pytest.fixture
def users(server):
    """The test users, created on the backend; deleted afterwards (with any a test adds)."""
    admin = server.client()
    admin.flushall()
    for name, rules in USERS.items():
        admin.execute_command("ACL", "SETUSER", name, "reset", *rules)
    yield admin
    for name in admin.execute_command("ACL", "USERS"):
        if name != b"default":
            admin.execute_command("ACL", "DELUSER", name)
    admin.close()


def both(proxy, server, *requests) -> tuple[list, list]:
    """The replies to the same requests (tuples), one at a time, via the proxy and directly."""
    out = []
    for port in (proxy.port, server.port):
        with RawClient(port) as c:
            out.append([c.call(*r) for r in requests])
    return out[0], out[1]


def same(proxy, server, *requests) -> list:
    via, direct = both(proxy, server, *requests)
    assert via == direct
    return via


def test_wrong_user_or_password_is_refused_as_by_the_server(proxy, server, users):
    before = proxy.info()["auth_failures"]
    got = same(proxy, server, ("AUTH", "nosuchuser", "wrong"), ("AUTH", "reader", "wrong"),
               ("AUTH", "justapassword"), ("ACL", "WHOAMI"))
    assert got[0].startswith(b"-WRONGPASS")
    assert got[2].startswith(b"-ERR AUTH <password> called without any password")  # default: nopass
    assert got[3] == b"$7\r\ndefault\r\n"
    assert proxy.info()["auth_failures"] == before + 3  # counted in INFO proxy


def test_session_runs_with_its_users_rights(proxy, server, users):
    server.client().set("app:1", "v")
    server.client().set("other", "x")
    got = same(proxy, server, ("AUTH", "reader", "rpass"), ("ACL", "WHOAMI"), ("GET", "app:1"),
               ("GET", "other"), ("SET", "app:1", "w"), ("MONITOR",), ("CONFIG", "GET", "maxmemory"),
               ("FLUSHALL",), ("SCRIPT", "KILL"), ("GET", "app:1"))
    assert got[:3] == [b"+OK\r\n", b"$6\r\nreader\r\n", b"$1\r\nv\r\n"]
    assert all(r.startswith(b"-NOPERM") for r in got[3:9]), got
    assert server.client().get("app:1") == b"v"  # the denied SET did not run with vproxy's rights


def test_hello_3_auth_with_redis_py(proxy, server, users):
    server.client().set("app:k", "1")
    for port in (proxy.port, server.port):
        c = redis.Redis(port=port, protocol=3, username="writer", password="wpass", socket_timeout=10)
        try:
            assert c.acl_whoami() == b"writer"
            assert c.incr("app:k") in (2, 3)
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.set("elsewhere", "1")
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.flushall()
        finally:
            c.close()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=proxy.port, protocol=3, username="writer", password="nope").ping()
    same(proxy, server, ("HELLO", "3", "AUTH", "writer", "nope"), ("HELLO", "2", "AUTH", "nouser", "x", "SETNAME", "n"))
    if server.kind == "valkey":  # Valkey checks the name before the password (Redis 7.0 after)
        same(proxy, server, ("HELLO", "2", "AUTH", "nouser", "x", "SETNAME", "a b"))


def test_many_users_at_once_never_borrow_each_others_rights(proxy, server, users):
    """Interleaved pipelines of two users and an unauthenticated client over the same proxy: each
    reply is what its own user may do."""
    server.client().set("app:x", "1")
    r, w, anon = (RawClient(proxy.port) for _ in range(3))
    try:
        assert r.call("AUTH", "reader", "rpass") == b"+OK\r\n"
        assert w.call("AUTH", "writer", "wpass") == b"+OK\r\n"
        for n in range(50):
            r.send(E("SET", "app:x", n) + E("GET", "app:x") + E("ACL", "WHOAMI"))
            w.send(E("INCR", "app:x") + E("ACL", "WHOAMI"))
            anon.send(E("SET", "free", n) + E("ACL", "WHOAMI"))
            rr, ww, aa = r.read_n(3), w.read_n(2), anon.read_n(2)
            assert rr[0].startswith(b"-NOPERM") and rr[2] == b"$6\r\nreader\r\n"
            assert ww[0].startswith(b":") and ww[1] == b"$6\r\nwriter\r\n"
            assert aa == [b"+OK\r\n", b"$7\r\ndefault\r\n"]
    finally:
        for c in (r, w, anon):
            c.close()


def test_pinned_connections_run_as_the_user(proxy, server, users):
    """MULTI/EXEC, a blocking command and SUBSCRIBE take pinned connections: the same user's."""
    same(proxy, server, ("AUTH", "reader", "rpass"), ("MULTI",), ("GET", "app:1"), ("SET", "app:1", "x"),
         ("EXEC",))
    same(proxy, server, ("AUTH", "reader", "rpass"), ("BLPOP", "other", "0.01"), ("BLPOP", "app:q", "0.01"))
    same(proxy, server, ("AUTH", "reader", "rpass"), ("SUBSCRIBE", "secret"))
    same(proxy, server, ("AUTH", "writer", "wpass"), ("WATCH", "app:w"), ("ACL", "WHOAMI"), ("MULTI",),
         ("SET", "app:w", "1"), ("CONFIG", "SET", "maxmemory", "0"), ("EXEC",))


def test_subscription_as_user(proxy, server, users):
    for port in (proxy.port, server.port):
        c = RawClient(port)
        try:
            assert c.call("AUTH", "reader", "rpass") == b"+OK\r\n"
            assert c.call("SUBSCRIBE", "news") == b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
            wait_for(lambda: server.client().publish("news", "hi") == 1, what="the subscription")
            assert c.read() == b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
        finally:
            c.close()


def test_failed_auth_keeps_the_user_and_reset_drops_it(proxy, server, users):
    got = same(proxy, server, ("AUTH", "writer", "wpass"), ("AUTH", "reader", "bad"), ("ACL", "WHOAMI"),
               ("RESET",), ("ACL", "WHOAMI"), ("AUTH", "reader", "rpass"), ("ACL", "WHOAMI"))
    assert got[2] == b"$6\r\nwriter\r\n" and got[4] == b"$7\r\ndefault\r\n" and got[6] == b"$6\r\nreader\r\n"


def test_users_made_and_deleted_at_run_time(proxy, server, users):
    """ACL SETUSER through vproxy works at once; a deleted user's session gets the server's error."""
    admin = RawClient(proxy.port)
    c = RawClient(proxy.port)
    try:
        assert admin.call("ACL", "SETUSER", "late", "on", ">lpass", "~*", "+@all") == b"+OK\r\n"
        assert c.call("AUTH", "late", "lpass") == b"+OK\r\n"
        assert c.call("SET", "k", "1") == b"+OK\r\n"
        assert c.call("ACL", "WHOAMI") == b"$4\r\nlate\r\n"
        assert admin.call("ACL", "DELUSER", "late") == b":1\r\n"
        # the server closes the deleted user's connections; new ones are refused with its words
        wait_for(lambda: c.call("GET", "k").startswith(b"-WRONGPASS"), what="the deleted user's requests refused")
        assert c.call("GET", "k") == b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        assert admin.call("PING") == b"+PONG\r\n"  # the node is not marked down for everyone else
    finally:
        admin.close()
        c.close()


def test_commands_vproxy_answers_are_checked_against_the_users_rights(proxy, server, users):
    """SELECT, CLIENT ..., INFO are answered (or partly answered) by vproxy: a restricted user gets
    the server's NOPERM for them, as directly; allowed ones still work."""
    got = same(proxy, server, ("AUTH", "reader", "rpass"), ("CLIENT", "KILL", "ID", "99999"), ("CLIENT", "LIST"),
               ("CLIENT", "SETNAME", "x"), ("SELECT", "1"), ("SELECT", "nonsense"), ("UNSUBSCRIBE", "a"))
    assert all(r.startswith(b"-NOPERM") for r in got[1:]), got
    with RawClient(proxy.port) as c:
        assert c.call("AUTH", "reader", "rpass") == b"+OK\r\n"
        assert c.call("CLIENT", "ID").startswith(b":")
        assert c.call("INFO", "proxy").startswith(b"$")
    same(proxy, server, ("AUTH", "writer", "wpass"), ("SELECT", "3"), ("SET", "app:db3", "1"), ("SELECT", "99"),
         ("GET", "app:db3"), ("SELECT", "0"), ("EXISTS", "app:db3"), ("CLIENT", "SETNAME", "w"), ("CLIENT", "GETNAME"))


def test_client_list_shows_the_user(proxy, server, users):
    c = RawClient(proxy.port)
    try:
        assert c.call("AUTH", "writer", "wpass") == b"+OK\r\n"
        line = c.call("CLIENT", "INFO")
        assert b" user=writer " in line
    finally:
        c.close()


def test_client_kill_user(proxy, server, users):
    w1, w2, r = RawClient(proxy.port), RawClient(proxy.port), RawClient(proxy.port)
    try:
        for c, u, pw in ((w1, "writer", "wpass"), (w2, "writer", "wpass"), (r, "reader", "rpass")):
            assert c.call("AUTH", u, pw) == b"+OK\r\n"
        with proxy.client() as admin:
            assert admin.execute_command("CLIENT", "KILL", "USER", "writer") == 2
        assert w1.closed_by_peer() and w2.closed_by_peer()
        assert r.call("GET", "app:1") == b"$-1\r\n"
    finally:
        for c in (w1, w2, r):
            c.close()


def test_proxy_password_keeps_vproxy_the_gate(server, users, start_password_proxy):
    """With a proxy `password`, AUTH is checked by vproxy alone, as before (no backend users)."""
    p = start_password_proxy("sekret", "--backend", server.addr)
    with RawClient(p.port) as c:
        assert c.call("GET", "x") == b"-NOAUTH Authentication required.\r\n"
        assert c.call("AUTH", "reader", "rpass").startswith(b"-WRONGPASS")
        assert c.call("AUTH", "sekret") == b"+OK\r\n"
        assert c.call("ACL", "WHOAMI") == b"$7\r\ndefault\r\n"


def test_backend_user_of_vproxy_and_passwords_never_logged(server, users, start_proxy, tmp_path):
    """vproxy's own backend user serves clients that never authenticate; no password (vproxy's or a
    client's) appears in its log, even at DEBUG, even after a failed AUTH and a deleted user."""
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "vproxy", "on", ">vpxsecret", "~*", "&*", "+@all")
    log = tmp_path / "vproxy.log"
    p = start_proxy("--backend", server.addr, "--backend-username", "vproxy", "--backend-password", "vpxsecret",
                    "--log-level", "DEBUG", log_path=log)
    with RawClient(p.port) as c:
        assert c.call("ACL", "WHOAMI") == b"$6\r\nvproxy\r\n"
        assert c.call("AUTH", "reader", "rpassWRONG").startswith(b"-WRONGPASS")
        assert c.call("AUTH", "reader", "rpass") == b"+OK\r\n"
        assert c.call("CLIENT", "INFO").startswith(b"-NOPERM")
        listed = p.client().client_list()
        assert sorted(x["user"] for x in listed) == ["reader", "vproxy"]
        admin.execute_command("ACL", "DELUSER", "reader")
        wait_for(lambda: c.call("GET", "app:1").startswith(b"-WRONGPASS"), what="the deleted user refused")
        assert c.call("PROXY", "CONFIG", "GET", "backend_password") != b"$9\r\nvpxsecret\r\n"
    admin.execute_command("ACL", "SETUSER", "vproxy", "-acl|dryrun")
    with RawClient(p.port) as c:  # vproxy cannot check a user's rights: it refuses, and says why
        assert c.call("AUTH", "writer", "wpass") == b"+OK\r\n"
        assert c.call("CLIENT", "SETNAME", "x") == (b"-ERR vproxy: cannot check 'client' against the rights of "
                                                    b"user 'writer': vproxy's backend user needs +acl|dryrun\r\n")
        assert c.call("SET", "app:ok", "1") == b"+OK\r\n"  # forwarded commands: the server checks them
    p.stop()
    text = log.read_text()
    for secret in ("vpxsecret", "rpass"):
        assert secret not in text


# ---- other modes ----

def _make_users(servers) -> None:
    for s in servers:
        for name, rules in USERS.items():
            s.client().execute_command("ACL", "SETUSER", name, "reset", *rules)


def test_users_in_cluster_mode(start_proxy):
    """Each node has the users (ACL is per node); a session's requests on every node, its pinned
    connections included, run as its user."""
    from clusterkit import Cluster

    c = Cluster("valkey", 3)
    try:
        _make_users(c.nodes)
        p = start_proxy("--mode", "cluster", *[a for s in c.seeds for a in ("--backend", s)])
        with RawClient(p.port) as w, RawClient(p.port) as r:
            assert w.call("AUTH", "writer", "wpass") == b"+OK\r\n"
            assert r.call("AUTH", "reader", "rpass") == b"+OK\r\n"
            keys = [f"app:{n}" for n in range(30)]
            for k in keys:
                assert w.call("SET", k, k) == b"+OK\r\n"
                assert r.call("SET", k, "no").startswith(b"-NOPERM")
                assert r.call("GET", k) == b"$%d\r\n%s\r\n" % (len(k), k.encode())
            assert sum(1 for n in c.nodes if n.client().dbsize()) == 3  # every node served the writer
            assert w.call("SET", "elsewhere", "1").startswith(b"-NOPERM")
            assert r.call("ACL", "WHOAMI") == b"$6\r\nreader\r\n"
            assert r.call("BLPOP", "other", "0.01").startswith(b"-NOPERM")
            assert w.call("MULTI") == b"+OK\r\n" and w.call("INCR", "app:1") == b"+QUEUED\r\n"
            assert w.call("EXEC") == b"*1\r\n-ERR value is not an integer or out of range\r\n"
            assert w.call("AUTH", "nosuchuser", "x").startswith(b"-WRONGPASS")
            for req in (("CLUSTER", "INFO"), ("SELECT", "1"), ("CLIENT", "LIST"), ("READONLY",)):
                assert r.call(*req).startswith(b"-NOPERM"), req  # answered by vproxy, checked as the user
            assert r.call("INFO", "server").startswith(b"$")  # the reader may run INFO
            # AUTH queued in MULTI: the session runs as that user after EXEC, as on the server
            assert r.call("MULTI") == b"+OK\r\n" and r.call("AUTH", "writer", "wpass") == b"+QUEUED\r\n"
            assert r.call("EXEC") == b"*1\r\n+OK\r\n"
            assert r.call("ACL", "WHOAMI") == b"$6\r\nwriter\r\n"
            assert r.call("SET", "app:2", "w") == b"+OK\r\n"
            assert r.call("MULTI") == b"+OK\r\n" and r.call("AUTH", "reader", "nope") == b"+QUEUED\r\n"
            assert r.call("EXEC") == b"*1\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n"
            assert r.call("ACL", "WHOAMI") == b"$6\r\nwriter\r\n"
            for req in (("MULTI",), ("AUTH", "reader", "rpass"), ("AUTH", "writer", "nope")):  # in turn
                r.call(*req)
            assert r.call("EXEC").startswith(b"*2\r\n+OK\r\n-WRONGPASS")
            assert r.call("ACL", "WHOAMI") == b"$6\r\nreader\r\n"
    finally:
        c.stop()


def test_users_in_replication_mode(start_proxy):
    from conftest import Server

    primary = Server("valkey")
    replica = Server("valkey", None, "--replicaof", "127.0.0.1", str(primary.port))
    try:
        wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", what="replica up")
        _make_users([primary, replica])  # ACL users are per node, not replicated
        p = start_proxy("--mode", "replication", "--backend", primary.addr, "--backend", replica.addr,
                        "--read-from", "replica")
        with RawClient(p.port) as w, RawClient(p.port) as r:
            assert w.call("AUTH", "writer", "wpass") == b"+OK\r\n"
            assert r.call("AUTH", "reader", "rpass") == b"+OK\r\n"
            assert w.call("SET", "app:k", "1") == b"+OK\r\n"
            assert r.call("SET", "app:k", "2").startswith(b"-NOPERM")
            wait_for(lambda: r.call("GET", "app:k") == b"$1\r\n1\r\n", what="the reader's read from the replica")
            assert r.call("GET", "other").startswith(b"-NOPERM")
            assert w.call("ACL", "WHOAMI") == b"$6\r\nwriter\r\n"
    finally:
        replica.stop()
        primary.stop()


def test_a_users_connections_close_when_its_last_session_ends(proxy, server, users):
    def backend_users():
        return sorted(c["user"] for c in server.client().client_list() if c["name"] == "vproxy")

    a, b = RawClient(proxy.port), RawClient(proxy.port)
    try:
        for c in (a, b):
            assert c.call("AUTH", "writer", "wpass") == b"+OK\r\n"
            assert c.call("SET", "app:x", "1") == b"+OK\r\n"
        assert b.call("SUBSCRIBE", "app") .startswith(b"*3")  # a pinned connection too
        assert "writer" in backend_users()
        a.close()
        assert "writer" in backend_users()  # b still runs as writer
        assert b.call("RESET") == b"+RESET\r\n"
        wait_for(lambda: "writer" not in backend_users(), what="the writer's connections to close")
    finally:
        a.close()
        b.close()


def test_auth_inside_a_resp3_subscription(proxy, server, users):
    """RESP3 lets a subscribed client run AUTH: the user it names is the session's afterwards."""
    def run(port):
        with RawClient(port) as c:
            out = [c.call("HELLO", "3")[:1], c.call("SUBSCRIBE", "app")]
            out += [c.call("AUTH", "reader", "rpass"), c.call("UNSUBSCRIBE", "app"), c.call("ACL", "WHOAMI"),
                    c.call("SET", "app:1", "x")]
            return out
    via, direct = run(proxy.port), run(server.port)
    assert via == direct
    assert via[4] == b"$6\r\nreader\r\n" and via[5].startswith(b"-NOPERM")


def test_acl_log_names_the_user_and_what_was_denied(proxy, server, users):
    """The server's ACL LOG records a denial made through vproxy as it records a direct one (the
    client-info is vproxy's connection's, the rest the same)."""
    admin = server.client()
    entries = {}
    for port in (proxy.port, server.port):
        admin.execute_command("ACL", "LOG", "RESET")
        with RawClient(port) as c:
            assert c.call("AUTH", "reader", "rpass") == b"+OK\r\n"
            assert c.call("GET", "other").startswith(b"-NOPERM")
            assert c.call("AUTH", "reader", "bad").startswith(b"-WRONGPASS")
        entries[port] = sorted((e["reason"], e["object"], e["username"]) for e in admin.acl_log())
    assert entries[proxy.port] == entries[server.port]
    assert len(entries[proxy.port]) == 2


def test_auth_inside_multi(proxy, server, users):
    """AUTH queued in a transaction: once EXEC ran it, the session is that user (as the connection
    that ran it is, directly)."""
    same(proxy, server, ("MULTI",), ("AUTH", "reader", "rpass"), ("EXEC",), ("ACL", "WHOAMI"), ("SET", "app:1", "x"),
         ("MULTI",), ("AUTH", "writer", "nope"), ("EXEC",), ("ACL", "WHOAMI"),
         ("MULTI",), ("AUTH", "writer", "wpass"), ("AUTH", "reader", "nope"), ("EXEC",), ("ACL", "WHOAMI"))
