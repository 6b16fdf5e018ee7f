"""The admin HTTP server: /metrics parsed with Prometheus' own parser, /healthz, /readyz following the
backend; JSON log lines."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import Proxy, Server, wait_for
from prometheus_client.parser import text_string_to_metric_families

from vproxy.embedded import free_port


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    status, text = http(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def setup(server):
    admin = free_port()
    p = Proxy("--backend", server.addr, "--admin-listen", f"127.0.0.1:{admin}")
    yield p, admin, server
    p.stop()


def test_metrics_count_what_the_clients_did(setup):
    proxy, admin, server = setup
    c = proxy.client()
    for i in range(30):
        c.set(f"k{i}", i)
    pipe = c.pipeline(transaction=False)
    for i in range(70):
        pipe.get(f"k{i}")
    pipe.execute()
    m = samples(admin)
    get = frozenset({("command", "get")})
    assert m[("vproxy_commands_total", get)] == 70
    assert m[("vproxy_command_errors_total", get)] == 0
    assert m[("vproxy_command_duration_seconds_count", get)] == 70
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                     if k[0] == "vproxy_command_duration_seconds_bucket" and ("command", "get") in k[1])
    assert buckets[-1] == (float("inf"), 70)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative
    assert 0 < m[("vproxy_command_duration_seconds_sum", get)] < 70 * 1.0
    assert m[("vproxy_commands_total", frozenset({("command", "set")}))] == 30
    assert m[("vproxy_client_connections", frozenset())] >= 1
    node = frozenset({("node", f"127.0.0.1:{server.port}"), ("kind", "shared")})
    assert m[("vproxy_backend_connections", node)] >= 1
    assert m[("vproxy_info", frozenset({("version", proxy.info()["proxy_version"]), ("mode", "standalone"),
                                          ("parser", proxy.info()["proxy_impl"])}))] == 1
    with pytest.raises(Exception, match="wrong number"):
        c.execute_command("GET")
    assert samples(admin)[("vproxy_command_rejected_total", get)] == 1
    c.close()


def test_health_and_readiness_follow_the_backend(setup):
    proxy, admin, server = setup
    assert http(admin, "/healthz") == (200, "ok\n")
    wait_for(lambda: http(admin, "/readyz")[0] == 200, what="/readyz 200")
    assert http(admin, "/readyz")[1].startswith("ready")
    server.stop()
    status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(http(admin, "/readyz")),
                            timeout=15, what="/readyz 503 with the backend stopped")
    assert f"127.0.0.1:{server.port}" in body and "not ready" in body
    assert http(admin, "/healthz")[0] == 200  # the process still serves (clients get errors)
    server.start()
    wait_for(lambda: http(admin, "/readyz")[0] == 200, timeout=15, what="/readyz 200 again")
    assert http(admin, "/nosuch")[0] == 404


def test_taken_admin_port_stops_the_start(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{free_port()}",
                              "--backend", server.addr, "--admin-listen", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert "cannot start" in out.stderr and str(port) in out.stderr


def test_json_log_lines(server, tmp_path):
    log = tmp_path / "vproxy.log"
    p = Proxy("--backend", server.addr, "--log-format", "json", "--log-level", "INFO", log_path=log)
    try:
        p.client().ping()
    finally:
        p.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    texts = [rec["record"]["message"] for rec in lines]
    assert any("listening on" in t for t in texts), texts
    assert all(rec["record"]["level"]["name"] in ("INFO", "WARNING", "SUCCESS") for rec in lines)


def test_vproxy_top_shows_the_busiest_commands(setup):
    proxy, _, _ = setup
    c = proxy.client()
    top = subprocess.Popen([sys.executable, "-m", "vproxy", "top", f"127.0.0.1:{proxy.port}", "--interval", "0.5",
                            "--count", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while top.poll() is None:  # traffic while top samples
            c.execute_command("INCR", "n")
        out, err = top.communicate(timeout=30)
    finally:
        if top.poll() is None:
            top.kill()
    assert top.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"vproxy 127.0.0.1:{proxy.port}") and "ops/s" in lines[0]
    row = next((line for line in lines if line.startswith("incr ")), None)
    assert row is not None, out
    assert float(row.split()[1].replace(",", "")) > 0  # calls/s
    c.close()


def test_vproxy_top_unreachable():
    out = subprocess.run([sys.executable, "-m", "vproxy", "top", f"127.0.0.1:{free_port()}", "--count", "1"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1 and "cannot reach" in out.stderr


def test_grafana_dashboard_queries_only_exported_metrics(setup):
    """conf/grafana-dashboard.json: every metric its queries name is one /metrics serves."""
    import re
    from pathlib import Path

    proxy, admin, _ = setup
    proxy.client().get("x")  # one command: the per-command families have a sample
    exported = {name for name, _ in samples(admin)}
    dash = json.loads((Path(__file__).resolve().parent.parent / "conf" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    named = {m for e in exprs for m in re.findall(r"\b(vproxy_[a-z_]+)\b", e)}
    assert named and named <= exported, named - exported


def test_sigterm_drains_between_replies(server):
    """SIGTERM: /readyz turns 503, an idle client is closed at once, a client whose blocking command
    is in flight gets its reply first, then the process exits."""
    import signal
    import threading
    import time

    import redis

    admin = free_port()
    p = Proxy("--backend", server.addr, "--admin-listen", f"127.0.0.1:{admin}", "--drain-timeout", "10")
    idle, busy = p.client(socket_timeout=20), p.client(socket_timeout=20)
    idle.ping()
    got = {}

    def blpop():
        t = time.monotonic()
        got["reply"] = busy.blpop(["drain:empty"], 1.5)
        got["took"] = time.monotonic() - t
    th = threading.Thread(target=blpop)
    th.start()
    wait_for(lambda: any(c.get("cmd") == "blpop" for c in server.client().client_list()), what="the BLPOP")
    p.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: http(admin, "/readyz")[0] == 503, what="/readyz 503 while draining")
    with pytest.raises(redis.ConnectionError):
        idle.ping()
    th.join(20)
    assert got["reply"] is None and got["took"] >= 1.4  # the server's own answer to the BLPOP, not an error
    assert p.proc.wait(20) == 0
    p.stop()
