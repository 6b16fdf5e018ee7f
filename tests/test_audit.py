"""The audit log, black-box: a real valkey-server, vproxy processes with --audit-dir, and the
`vproxy audit` command reading what they wrote (docs/audit.md)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone

import pytest
import redis
from conftest import AUDIT_NODE as NODE
from conftest import PasswordProxy, Proxy, RawClient, wait_for


def audit_cli(*args, check=True, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "vproxy", "audit", *map(str, args)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
                       check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def query(*args) -> list[dict]:
    return [json.loads(line) for line in audit_cli(*args, "--format", "json").stdout.splitlines()]


def records_written(p) -> int:
    return p.info()["audit_records"]


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def req_bytes(*args) -> int:
    return len(RawClient.encode(*args))


def script(p, valkey) -> tuple[list[dict], dict]:
    """A session of two named clients: writes, a read, FLUSHDB, refused requests, an error reply.
    Returns the records expected (with default audit classes write,admin,dangerous) and the clients."""
    server = f"127.0.0.1:{valkey.port}"
    a = p.client(client_name="billing")
    b = p.client(client_name="reports", db=2)
    a.set("a:1", "x")
    assert a.get("a:1") == b"x"  # a read: not recorded by default
    a.delete("a:1", "a:2")
    with pytest.raises(redis.ResponseError, match="not allowed through the proxy"):
        a.execute_command("SHUTDOWN")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        a.execute_command("SET", "lonely")
    b.set("b:1", "y")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        b.execute_command("INCR", "b:1")
    b.execute_command("CONFIG", "GET", "maxmemory")
    b.flushdb()
    ids = {"billing": a.client_id(), "reports": b.client_id()}
    lib = {"lib_name": "redis-py", "lib_ver": redis.__version__}
    common = {"node": NODE, "user": "default", "subcommand": None, "error": None, "outcome": "ok",
              "backend": server, **lib}
    A = {**common, "client_name": "billing", "client_id": ids["billing"], "db": 0}
    B = {**common, "client_name": "reports", "client_id": ids["reports"], "db": 2}
    expected = [
        {**A, "command": "set", "keys": ["a:1"], "argc": 3, "bytes": req_bytes("SET", "a:1", "x")},
        {**A, "command": "del", "keys": ["a:1", "a:2"], "argc": 3, "bytes": req_bytes("DEL", "a:1", "a:2")},
        {**A, "command": "shutdown", "keys": [], "argc": 1, "bytes": req_bytes("SHUTDOWN"),
         "outcome": "refused", "error": "ERR", "backend": ""},
        {**A, "command": "set", "keys": ["lonely"], "argc": 2, "bytes": req_bytes("SET", "lonely"),
         "outcome": "refused", "error": "ERR", "backend": ""},
        {**B, "command": "set", "keys": ["b:1"], "argc": 3, "bytes": req_bytes("SET", "b:1", "y")},
        {**B, "command": "incr", "keys": ["b:1"], "argc": 2, "bytes": req_bytes("INCR", "b:1"),
         "outcome": "error", "error": "ERR"},
        {**B, "command": "config", "subcommand": "get", "keys": [], "argc": 3,
         "bytes": req_bytes("CONFIG", "GET", "maxmemory")},
        {**B, "command": "flushdb", "keys": [], "argc": 1, "bytes": req_bytes("FLUSHDB")},
    ]
    a.close()
    b.close()
    return expected, ids


def strip(recs: list[dict]) -> list[dict]:
    """The fields a test can know exactly (time, latency and the client's port vary)."""
    return [{k: v for k, v in r.items() if k not in ("ts", "latency_us", "client_addr")} for r in recs]


def test_scripted_session_and_every_filter(audited, valkey):
    p = audited()
    t0 = now_iso()
    expected, ids = script(p, valkey)
    wait_for(lambda: len(query(p.dir, "--since", t0)) == len(expected), what="the session's records")
    got = query(p.dir, "--since", t0)
    assert strip(got) == expected
    assert all(r["ts"] >= t0 and r["ts"].endswith("Z") and r["latency_us"] >= 0 for r in got)
    assert [r["ts"] for r in got] == sorted(r["ts"] for r in got)
    addr_b = next(r["client_addr"] for r in got if r["client_name"] == "reports")

    def only(*args) -> list[dict]:
        return strip(query(p.dir, "--since", t0, *args))

    assert only("--client", "billing") == expected[:4]
    assert only("--client", addr_b) == expected[4:]
    assert only("--client", ids["billing"]) == expected[:4]
    assert only("--client", addr_b.rsplit(":", 1)[0] + ":*") == expected
    assert only("--command", "set") == [expected[0], expected[3], expected[4]]
    assert only("--command", "config|get,flushdb") == expected[6:]
    assert only("--key", "a:*") == expected[:2]
    assert only("--key", "b:1") == expected[4:6]
    assert only("--db", 2) == expected[4:]
    assert only("--outcome", "ok") == [expected[i] for i in (0, 1, 4, 6, 7)]
    assert only("--outcome", "error") == [expected[5]]
    assert only("--outcome", "refused") == expected[2:4]
    assert only("--node", NODE) == expected
    assert only("--node", "node-b") == []
    assert only("--user", "default") == expected
    assert only("--user", "alice") == []
    assert strip(query(p.dir, "--since", got[4]["ts"][:-1], "--until", got[6]["ts"][:-1])) == expected[4:7]
    assert only("--until", "-1h") == []
    assert strip([r for r in query(p.dir, "--since", "-1h") if r["ts"] >= t0]) == expected

    table = audit_cli(p.dir, "--since", t0, "--client", "reports").stdout.splitlines()
    assert len(table) == 1 + 4 and "FLUSHDB" in table[-1] and "CONFIG GET" in table[3]
    assert "error ERR" in table[2] and "reports" in table[1]
    rows = list(csv.DictReader(io.StringIO(audit_cli(p.dir, "--since", t0, "--format", "csv").stdout)))
    assert [(r["command"], r["keys"], r["outcome"]) for r in rows] == \
        [(e["command"], " ".join(e["keys"]), e["outcome"]) for e in expected]

    res = audit_cli(p.dir, "--since", t0, "--summary", "--progress", "always")
    assert "100.0%" in res.stderr and " records" in res.stderr and "[###" in res.stderr  # the bar, on stderr only
    summary = res.stdout
    assert "records: 8" in summary
    assert "error rate 37.50%" in summary  # 1 error + 2 refused of 8
    top = summary.split("top commands:")[1].split("top clients:")[0].split()
    assert top[:2] == ["3", "SET"]
    assert "billing" in summary and "reports" in summary and "a:1" in summary
    assert "latency per command (ms)" in summary and "requests per minute" in summary and "█" in summary
    stats = p.client().info("proxy_commandstats")  # the statistics still count what the audit records
    assert stats["cmdstat_set"]["calls"] == 2 and stats["cmdstat_set"]["rejected_calls"] == 1


def test_reads_are_recorded_when_selected_and_turned_on_at_run_time(audited, valkey):
    p = audited("--audit-commands", "read")
    r = p.client(client_name="reader")
    t0 = now_iso()
    r.set("k", "v")
    assert r.get("k") == b"v"
    wait_for(lambda: query(p.dir, "--since", t0), what="the GET's record")
    assert [(x["command"], x["keys"]) for x in query(p.dir, "--since", t0)] == [("get", ["k"])]

    ctl = p.client()
    assert ctl.execute_command("PROXY", "AUDIT", "CLASSES", "write,flushall") == b"OK"
    r.set("k2", "v")
    r.get("k2")
    assert ctl.execute_command("PROXY", "AUDIT", "OFF") == b"OK"
    r.set("k3", "v")  # not recorded: off
    status = ctl.execute_command("PROXY", "AUDIT", "STATUS")
    status = dict(zip(status[::2], status[1::2])) if isinstance(status, list) else status
    assert status[b"audit_enabled"] == b"0"
    assert status[b"audit_file"] == str(p.dir / "audit.jsonl").encode()
    assert status[b"audit_dropped"] == b"0"
    assert ctl.execute_command("PROXY", "AUDIT", "ON") == b"OK"
    r.set("k4", "v")
    wait_for(lambda: [x["keys"] for x in query(p.dir, "--since", t0, "--command", "set")] == [["k2"], ["k4"]],
             what="the SETs made while write was selected and audit on")
    assert p.info()["audit_enabled"] == 1
    with pytest.raises(redis.ResponseError, match="not a class or command name"):
        ctl.execute_command("PROXY", "AUDIT", "CLASSES", "wr ite")
    with pytest.raises(redis.ResponseError, match="nor a command the server knows: wirte, config.nosuch"):
        ctl.execute_command("PROXY", "AUDIT", "CLASSES", "wirte,flushall,config|nosuch,config|set")
    assert ctl.execute_command("PROXY", "AUDIT", "CLASSES", "dangerous,config|set,proxy|audit") == b"OK"
    assert ctl.execute_command("PROXY", "AUDIT", "STATUS")[b"audit_commands"] == b"dangerous,config|set,proxy|audit"
    ctl.close()
    r.close()


def test_slow_disk_drops_records_and_never_blocks_clients(audited, valkey, tmp_path):
    """The file is a FIFO nobody reads: the writer thread blocks in open(), as on a hung disk."""
    d = tmp_path / "slow"
    d.mkdir()
    fifo = d / "audit.jsonl"
    os.mkfifo(fifo)
    log = tmp_path / "slow.log"
    p = audited("--audit-commands", "all", "--audit-queue", "500", sub="slow", log_path=log)
    r = p.client()
    pipe = r.pipeline(transaction=False)
    n = 20000
    for i in range(n):
        pipe.set(f"s:{i}", "v")
    assert pipe.execute() == [True] * n  # every client request answered while the disk is stuck
    info = p.info()
    assert info["audit_queued"] == 500
    assert info["audit_records"] == 0
    assert info["audit_dropped"] >= n - 500
    rss_before = info["peak_rss_kb"]
    for _ in range(2):
        for i in range(n):
            pipe.get(f"s:{i}")
        pipe.execute()
    info = p.info()
    assert info["audit_queued"] == 500
    assert info["audit_dropped"] >= 3 * n - 500
    assert info["peak_rss_kb"] - rss_before < 20 * 1024  # queue bounded: 40,000 more records held nothing
    wait_for(lambda: "records dropped" in log.read_text(), what="the dropped-records log line")

    lines = []

    def read_fifo():
        with open(fifo, "rb") as f:
            lines.extend(f)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()  # the disk is back: the queued records are written
    wait_for(lambda: p.info()["audit_records"] >= 500, what="the queued records written")
    r.close()
    p.stop()
    reader.join(10)
    recs = [json.loads(x) for x in lines]
    sets = [x["keys"][0] for x in recs if x["command"] == "set"]
    assert len(recs) >= 500 and sets == [f"s:{i}" for i in range(len(sets))]  # the first ones, then drops


def test_a_stuck_disk_with_a_big_queue_keeps_every_queued_record_in_order(audited, valkey, tmp_path):
    """More records wait than the pipe holds: past the pipe they wait in the proxy as frames of at
    most CHUNK records (audit.Audit.full), counted in audit_queued, and reach the file in order."""
    d = tmp_path / "stuck"
    d.mkdir()
    fifo = d / "audit.jsonl"
    os.mkfifo(fifo)
    p = audited("--audit-queue", "60000", sub="stuck")
    r = p.client()
    pipe = r.pipeline(transaction=False)
    n = 80000
    for i in range(n):
        pipe.set(f"k:{i}", "v")
    assert pipe.execute() == [True] * n
    info = p.info()
    assert info["audit_queued"] == 60000 and info["audit_dropped"] >= n - 60000 and info["audit_records"] == 0
    lines = []

    def read_fifo():
        with open(fifo, "rb") as f:
            lines.extend(f)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    wait_for(lambda: p.info()["audit_records"] >= 60000, timeout=60, what="the queued records written")
    r.close()
    p.stop()
    reader.join(10)
    recs = [json.loads(x) for x in lines]
    sets = [x["keys"][0] for x in recs if x["command"] == "set"]
    assert len(recs) >= 60000 and len(sets) >= 59990 and sets == [f"k:{i}" for i in range(len(sets))]


def test_rotation_compression_and_retention_by_count(audited, valkey):
    p = audited("--audit-commands", "write", "--audit-rotation", "4 KB", "--audit-retention", "3 files")
    r = p.client(client_name="rot")
    for i in range(300):
        r.set(f"rot:{i:04d}", "v")
    wait_for(lambda: records_written(p) >= 300, what="300 records written")

    def rotated():
        return sorted(n for n in os.listdir(p.dir) if n.startswith("audit-"))

    wait_for(lambda: len(rotated()) == 3 and all(n.endswith(".jsonl.gz") for n in rotated()), timeout=60,
             what="3 compressed rotated files")  # (compressed at idle priority: the deadline allows a busy machine)
    for n in rotated():
        assert os.path.getsize(p.dir / n) < 4096  # compressed
        with gzip.open(p.dir / n) as f:
            body = f.read()
        assert body.endswith(b"\n") and len(body) >= 4096  # rotated past 4 KB, at a line's end
        assert all(json.loads(line)["command"] == "set" for line in body.splitlines())
    got = query(p.dir)
    keys = [x["keys"][0] for x in got]
    assert keys == sorted(keys)  # time order across .gz and the active file
    assert keys[-1] == "rot:0299"  # the newest kept, the oldest deleted
    assert 0 < len(keys) < 300 and keys[0] > "rot:0000"
    assert keys == [f"rot:{i:04d}" for i in range(300 - len(keys), 300)]  # no gap, nothing twice
    r.close()


def test_rotation_and_retention_by_age(audited, valkey):
    p = audited("--audit-commands", "write", "--audit-rotation", "1 s", "--audit-retention", "3 s")
    r = p.client()
    r.set("age", "1")
    wait_for(lambda: any(n.startswith("audit-") for n in os.listdir(p.dir)), timeout=15,
             what="the file rotated after 1 s")
    wait_for(lambda: not any(n.startswith("audit-") for n in os.listdir(p.dir)), timeout=60,
             what="the rotated file deleted after 3 s")  # (after its compression, at idle priority)
    r.close()


def test_a_compression_cut_short_by_a_crash_is_done_again_and_loses_nothing(audited, valkey):
    """Rotated files are compressed by a child process at idle priority; a crash (or kill) in the
    middle leaves a .tmp the reader skips and the original file, which the next writer compresses."""
    p = audited("--audit-commands", "write", "--audit-rotation", "4 KB")
    r = p.client()
    for i in range(100):
        r.set(f"cut:{i:03d}", "v")
    wait_for(lambda: any(n.endswith(".jsonl.gz") for n in os.listdir(p.dir)), timeout=60,
             what="a compressed rotated file")
    p.stop()
    gz = sorted(n for n in os.listdir(p.dir) if n.endswith(".jsonl.gz"))[0]
    with gzip.open(p.dir / gz) as f:
        body = f.read()
    os.unlink(p.dir / gz)  # as if the compression of that file had been killed half-way:
    (p.dir / gz[:-3]).write_bytes(body)  # the original still there,
    (p.dir / f"{gz}.4242.tmp").write_bytes(gzip.compress(body)[:50])  # its .gz half-written
    assert [x["keys"][0] for x in query(p.dir)] == [f"cut:{i:03d}" for i in range(100)]  # the .tmp skipped

    p2 = audited("--audit-commands", "write", "--audit-rotation", "4 KB", sub="audit")
    p2.client().set("cut:100", "v")
    wait_for(lambda: records_written(p2) >= 1, what="a record after the restart")
    wait_for(lambda: sorted(n for n in os.listdir(p.dir) if gz[:-3] in n) == [gz], timeout=60,
             what="the file compressed again")
    with gzip.open(p.dir / gz) as f:
        assert f.read() == body
    assert [x["keys"][0] for x in query(p.dir)] == [f"cut:{i:03d}" for i in range(101)]
    r.close()


def test_truncated_last_line_is_skipped_with_a_warning(audited, valkey):
    p = audited("--audit-commands", "write")
    r = p.client()
    r.set("t1", "v")
    wait_for(lambda: records_written(p) >= 1, what="a record")
    p.stop()
    path = p.dir / "audit.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:40])  # a crash in the middle of the next record

    res = audit_cli(p.dir, "--format", "json")
    assert [json.loads(x)["keys"] for x in res.stdout.splitlines()] == [["t1"]]
    assert "truncated last record" in res.stderr

    # a restart appends after the cut record: the new ones stand alone, the cut one is skipped
    p2 = audited("--audit-commands", "write", sub="audit")
    c = p2.client()
    c.set("t2", "v")
    wait_for(lambda: records_written(p2) >= 1, what="a record after the restart")
    for pure in ("0", "1"):  # with orjson when installed, and with the json module
        res = audit_cli(p.dir, "--summary", env={"VPROXY_PURE": pure})
        assert "records: 2" in res.stdout and "not a whole record" in res.stderr
        res = audit_cli(p.dir, "--format", "json", "--command", "set", env={"VPROXY_PURE": pure})
        assert [json.loads(x)["keys"] for x in res.stdout.splitlines()] == [["t1"], ["t2"]]
        assert "not a whole record" in res.stderr
    c.close()


def test_hashed_keys_and_values(audited, valkey):
    p = audited("--audit-commands", "write", "--audit-hash-keys", "--audit-hash-secret", "s3cret",
                "--audit-values")
    r = p.client()
    r.set("customer:42", "secret-value")
    wait_for(lambda: records_written(p) >= 1, what="a record")
    text = (p.dir / "audit.jsonl").read_text()
    assert "customer:42" not in text and "secret-value" in text
    rec = json.loads(text.splitlines()[-1])
    want = hmac.new(b"s3cret", b"customer:42", hashlib.sha256).hexdigest()[:16]
    assert rec["keys"] == [want] and rec["keys_hashed"] is True
    assert rec["args"] == [want, "secret-value"]  # the key hashed among the values too
    assert [x["keys"] for x in query(p.dir, "--key", "customer:42", "--hash-secret", "s3cret")] == [[want]]
    assert query(p.dir, "--key", "customer:43", "--hash-secret", "s3cret") == []
    shown = p.client().execute_command("PROXY", "CONFIG", "GET", "*")
    assert b"s3cret" not in (b" ".join(shown) if isinstance(shown, list) else repr(shown).encode())
    r.close()


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hashed"])
def test_long_keys_are_cut_and_found(audited, valkey, hashed):
    """A key may be 512 MB: records keep its first KEY_MAX bytes and its length (the proxy's queue,
    the pipe and the writer stay small); `vproxy audit --key` with the whole key finds it, hashed too."""
    from vproxy.auditfmt import KEY_MAX
    extra = ("--audit-hash-keys", "--audit-hash-secret", "s3cret") if hashed else ()
    p = audited("--audit-commands", "write", *extra)
    r = p.client()
    long1, long2 = "L" * (KEY_MAX + 10), "M" * 100_000  # (a command-line argument for --key: < 128 KB)
    cut1 = "L" * KEY_MAX + "...(+10 bytes)"
    r.set(long1, "v")  # one key: the plain path
    r.mset({"short": "1", long2: "2"})  # several: a slice of the arguments
    r.zadd("z", {"a": 1})
    r.zunionstore(long1, ["z", "N" * (KEY_MAX + 1)])  # movable keys: the batch path's key positions
    wait_for(lambda: records_written(p) >= 4, what="four records")
    assert (p.dir / "audit.jsonl").stat().st_size < 20_000  # not the 100 KB key
    recs = [x for x in query(p.dir) if x["command"] in ("set", "mset", "zunionstore")]
    cut2 = "M" * KEY_MAX + "...(+%d bytes)" % (100_000 - KEY_MAX)
    cut3 = "N" * KEY_MAX + "...(+1 bytes)"
    want = [[cut1], ["short", cut2], [cut1, "z", cut3]]
    if hashed:
        h = {k: hmac.new(b"s3cret", k.encode(), hashlib.sha256).hexdigest()[:16]
             for k in (cut1, cut2, cut3, "short", "z")}
        want = [[h[k] for k in ks] for ks in want]
    assert [x["keys"] for x in recs] == want
    secret = ("--hash-secret", "s3cret") if hashed else ()
    assert [x["command"] for x in query(p.dir, "--key", long2, *secret)] == ["mset"]
    assert [x["command"] for x in query(p.dir, "--key", long1, *secret)] == ["set", "zunionstore"]
    r.close()


def test_refused_before_auth_and_passwords_redacted(audited, valkey):
    p = audited("--audit-commands", "all", "--audit-values", cls=PasswordProxy, password="pw1")
    t0 = now_iso()
    with RawClient(p.port) as c:
        assert c.call("SET", "x", "1").startswith(b"-NOAUTH")
        assert c.call("AUTH", "pw1") == b"+OK\r\n"
        assert c.call("SET", "x", "1") == b"+OK\r\n"
    wait_for(lambda: len(query(p.dir, "--since", t0)) >= 3, what="three records")
    got = query(p.dir, "--since", t0)
    assert [(x["command"], x["outcome"], x["error"], x.get("args")) for x in got] == [
        ("set", "refused", "NOAUTH", ["x", "1"]),
        ("auth", "ok", None, ["(redacted)"]),
        ("set", "ok", None, ["x", "1"]),
    ]


def test_cluster_records_name_the_node_that_answered(tmp_path):
    from clusterkit import Cluster

    cluster = Cluster("valkey", 3)
    d = tmp_path / "cluster"
    p = None
    try:
        p = Proxy("--mode", "cluster", "--backend", cluster.seeds[0], "--audit-dir", str(d))
        r = p.client(client_name="sharded")
        keys = [f"ck:{n}" for n in range(30)]
        pipe = r.pipeline(transaction=False)
        for k in keys:  # one-key writes on every node, pipelined: the cluster plain path would take them
            pipe.set(k, "v")
        pipe.get(keys[0])
        assert pipe.execute() == [True] * 30 + [b"v"]
        r.mset({"ck:a": "1", "ck:b": "2", "ck:c": "3"})  # split over nodes by vproxy
        wait_for(lambda: records_written(p) >= 31, what="the cluster records")
        got = [x for x in query(d) if x["client_name"] == "sharded"]
        assert [(x["command"], x["keys"]) for x in got] == [("set", [k]) for k in keys] + \
            [("mset", ["ck:a", "ck:b", "ck:c"])]
        for x, k in zip(got, keys):
            assert x["backend"] == cluster.owner(k).addr and x["outcome"] == "ok"
        owners = {cluster.owner(k).addr for k in ("ck:a", "ck:b", "ck:c")}
        assert got[-1]["backend"] == ("*" if len(owners) > 1 else owners.pop())
        r.close()
    finally:
        if p is not None:
            p.stop()
        cluster.stop()


def test_replication_mode_records_where_reads_and_writes_went(tmp_path, start_proxy):
    """HA session (read_from replica): writes recorded on the primary, reads on a replica."""
    from ha_kit import ReplSet

    rset = ReplSet(1)
    try:
        d = tmp_path / "ha"
        p = start_proxy("--mode", "replication", *rset.args(), "--read-from", "replica", "--audit-dir", str(d),
                        "--audit-commands", "write,read")
        r = p.client(client_name="ha")
        r.set("h1", "v")
        wait_for(lambda: rset.replicas[0].client().get("h1") == b"v", what="h1 replicated")
        pipe = r.pipeline(transaction=False)
        pipe.get("h1").set("h2", "w").get("h2")
        pipe.execute()
        wait_for(lambda: len([x for x in query(d) if x["client_name"] == "ha"]) == 4, what="the HA records")
        got = [(x["command"], x["keys"], x["backend"]) for x in query(d) if x["client_name"] == "ha"]
        primary, replica = rset.primary.addr, rset.replicas[0].addr
        assert got[:3] == [("set", ["h1"], primary), ("get", ["h1"], replica), ("set", ["h2"], primary)]
        assert got[3][:2] == ("get", ["h2"]) and got[3][2] in (primary, replica)
        r.close()
    finally:
        rset.stop()


@pytest.mark.skipif(not hasattr(__import__("socket"), "SO_REUSEPORT"), reason="workers need SO_REUSEPORT")
def test_workers_write_a_directory_each_and_are_read_together(valkey, tmp_path):
    from vproxy.embedded import free_port, stop_process

    port, d = free_port(), tmp_path / "workers"
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "--listen", f"127.0.0.1:{port}", "--backend",
                             valkey.addr, "--workers", "2", "--log-level", "WARNING", "--audit-dir", str(d)])
    try:
        wait_for(lambda: redis.Redis(port=port, socket_timeout=2).ping(), timeout=30, what="the workers")
        pids, n = set(), 0
        while len(pids) < 2 and n < 200:  # new connections: the kernel spreads them over the workers
            c = redis.Redis(port=port, socket_timeout=5, client_name=f"w{n}")
            pids.add(c.info("proxy")["proxy_pid"])
            c.set(f"wk:{n}", "v")
            c.close()
            n += 1
        assert len(pids) == 2
        assert sorted(os.listdir(d)) == ["worker-0", "worker-1"]
        wait_for(lambda: len(query(d, "--command", "set")) == n, what="every SET's record, from both workers")
        got = query(d, "--command", "set")
        assert sorted(x["keys"][0] for x in got) == sorted(f"wk:{i}" for i in range(n))
        assert [x["ts"] for x in got] == sorted(x["ts"] for x in got)  # merged in time order
    finally:
        stop_process(proc, 15)


def test_classes_from_the_servers_command_table(audited, valkey):
    """scripting and pubsub come from COMMAND's ACL categories and flags; a SUBSCRIBE's reply is
    streamed, so its outcome is 'sent'; a subcommand decides for a container (CONFIG GET: admin)."""
    p = audited("--audit-commands", "scripting,pubsub,config|set")
    t0 = now_iso()
    r = p.client(client_name="cls")
    r.set("s", "1")  # write: not selected
    assert r.eval("return redis.call('GET', KEYS[1])", 1, "s") == b"1"
    r.publish("news", "hi")
    r.config_get("maxmemory")  # config|get: not selected (config|set is)
    with RawClient(p.port) as c:
        c.send(RawClient.encode("SUBSCRIBE", "news"))
        assert b"subscribe" in c.read()
    wait_for(lambda: len(query(p.dir, "--since", t0)) >= 3, what="three records")
    got = [(x["command"], x["keys"], x["outcome"]) for x in query(p.dir, "--since", t0)]
    assert got == [("eval", ["s"], "ok"), ("publish", [], "ok"), ("subscribe", [], "sent")]
    r.close()


def test_pipelined_records_keep_each_requests_db_and_client_name(audited, valkey):
    """Plain and batch-path requests interleaved in one pipeline: each record has the database and
    client name in force for that request."""
    p = audited()
    t0 = now_iso()
    with RawClient(p.port) as c:
        cmds = [("CLIENT", "SETNAME", "n1"), ("SET", "p1", "v"), ("SELECT", "3"), ("SET", "p2", "v"),
                ("CLIENT", "SETNAME", "n2"), ("DEL", "p2"), ("SELECT", "0"), ("SET", "p3", "v")]
        c.send(b"".join(RawClient.encode(*x) for x in cmds))
        assert c.read_n(len(cmds)) == [b"+OK\r\n"] * 5 + [b":1\r\n"] + [b"+OK\r\n"] * 2
    wait_for(lambda: len(query(p.dir, "--since", t0)) == 4, what="four records")
    got = [(x["command"], x["keys"], x["db"], x["client_name"]) for x in query(p.dir, "--since", t0)]
    assert got == [("set", ["p1"], 0, "n1"), ("set", ["p2"], 3, "n1"), ("del", ["p2"], 3, "n2"),
                   ("set", ["p3"], 0, "n2")]


def test_records_name_the_backend_acl_user(audited, valkey):
    """A client that authenticates as one of the backend's ACL users: its records say so; a NOPERM
    from the server is an error with its code."""
    admin = valkey.client()
    admin.execute_command("ACL", "SETUSER", "auditor", "reset", "on", ">apass", "~au:*", "+@all", "-flushdb")
    try:
        p = audited()
        t0 = now_iso()
        with RawClient(p.port) as c:
            assert c.call("AUTH", "auditor", "apass") == b"+OK\r\n"
            assert c.call("SET", "au:1", "v") == b"+OK\r\n"
            assert c.call("FLUSHDB").startswith(b"-NOPERM")
        with RawClient(p.port) as c:
            assert c.call("SET", "au:2", "v") == b"+OK\r\n"  # no AUTH: the default user
        wait_for(lambda: len(query(p.dir, "--since", t0)) == 3, what="three records")
        got = [(x["user"], x["command"], x["outcome"], x["error"]) for x in query(p.dir, "--since", t0)]
        assert got == [("auditor", "set", "ok", None), ("auditor", "flushdb", "error", "NOPERM"),
                       ("default", "set", "ok", None)]
        assert [x["keys"] for x in query(p.dir, "--since", t0, "--user", "auditor")] == [["au:1"], []]
    finally:
        admin.execute_command("ACL", "DELUSER", "auditor")
        admin.close()


def audit_status(c) -> dict:
    status = c.execute_command("PROXY", "AUDIT", "STATUS")
    return dict(zip(status[::2], status[1::2])) if isinstance(status, list) else status


def set_calls(c) -> int:
    return c.execute_command("INFO", "proxy_commandstats")["cmdstat_set"]["calls"]


def test_audit_off_takes_the_recorder_off_every_client_and_on_puts_it_back(audited):
    """PROXY AUDIT OFF leaves each client's plain path as it was without the audit log (its
    statistics still counted), ON records every client again, those connected meanwhile too,
    and their pipelined requests get their own outcomes."""
    p = audited()
    ctl, a = p.client(), p.client(client_name="a")
    t0 = now_iso()
    a.set("on:1", "v")
    wait_for(lambda: [x["keys"] for x in query(p.dir, "--since", t0)] == [["on:1"]], what="a's first record")

    def clients() -> int:
        return len(ctl.client_list())

    wait_for(lambda: int(audit_status(ctl)[b"audit_clients"]) == clients(), what="every client recorded")
    assert ctl.execute_command("PROXY", "AUDIT", "OFF") == b"OK"
    assert audit_status(ctl)[b"audit_clients"] == b"0"
    calls = set_calls(ctl)
    a.set("off:1", "v")  # not recorded, but counted by the plain path's statistics
    b = p.client(client_name="b")  # connected while off
    b.set("off:2", "v")
    assert set_calls(ctl) == calls + 2
    assert audit_status(ctl)[b"audit_clients"] == b"0"

    assert ctl.execute_command("PROXY", "AUDIT", "ON") == b"OK"
    wait_for(lambda: int(audit_status(ctl)[b"audit_clients"]) == clients(), what="every client recorded again")
    for c, name in ((b, "b"), (a, "a")):
        pipe = c.pipeline(transaction=False)
        pipe.set(f"{name}:1", "v").incr(f"{name}:1").set(f"{name}:2", "v")
        assert pipe.execute(raise_on_error=False)[0] is True
    assert set_calls(ctl) == calls + 6
    got = lambda: [(x["client_name"], x["command"], x["keys"], x["outcome"], x["error"])  # noqa: E731
                   for x in query(p.dir, "--since", t0) if x["client_name"] and x["keys"] != ["on:1"]]
    want = [("b", "set", ["b:1"], "ok", None), ("b", "incrby", ["b:1"], "error", "ERR"),
            ("b", "set", ["b:2"], "ok", None), ("a", "set", ["a:1"], "ok", None),
            ("a", "incrby", ["a:1"], "error", "ERR"), ("a", "set", ["a:2"], "ok", None)]
    wait_for(lambda: got() == want, what="the records after ON, each with its own outcome")
    for c in (ctl, a, b):
        c.close()


def test_records_follow_the_clients_changes_between_reads(audited):
    """One request per read: each record has the client's name, database and user as they were
    when that request came, though its plain-path records share what did not change."""
    p = audited()
    c = p.client()
    t0 = now_iso()
    c.set("r:1", "v")
    c.set("r:2", "v")
    c.client_setname("n1")
    c.set("r:3", "v")
    c.execute_command("SELECT", "3")
    c.set("r:4", "v")
    c.execute_command("CLIENT", "SETINFO", "LIB-NAME", "mylib")
    c.set("r:5", "v")
    want = [("r:1", "", 0, "redis-py"), ("r:2", "", 0, "redis-py"), ("r:3", "n1", 0, "redis-py"),
            ("r:4", "n1", 3, "redis-py"), ("r:5", "n1", 3, "mylib")]
    got = lambda: [(x["keys"][0], x["client_name"], x["db"], x["lib_name"])  # noqa: E731
                   for x in query(p.dir, "--since", t0, "--command", "set")]
    wait_for(lambda: got() == want, what="the SETs' records")
    c.close()
