"""The audit log's writer process (vproxy/auditwriter.py): records reach it, a dead one is replaced,
it ends with the proxy, and a writer that does not keep up costs records, never clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

from conftest import Proxy, RawClient, wait_for


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def keys_written(p) -> list:
    path = p.dir / "audit.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["keys"][0] for r in recs if r["command"] == "set"]


def test_records_reach_the_writer_process_and_a_killed_one_is_replaced(audited):
    p = audited()
    c = p.client()
    c.set("w:1", "v")
    wait_for(lambda: keys_written(p) == ["w:1"], what="the first record")
    info = p.info()
    pid = info["audit_writer_pid"]
    assert pid and parent_of(pid) == p.proc.pid and info["audit_writer_restarts"] == 0
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: p.info()["audit_writer_restarts"] == 1, what="the writer's death noticed")
    c.set("w:2", "v")  # recorded by the new writer (started at most a second later)
    wait_for(lambda: keys_written(p) == ["w:1", "w:2"], what="the record after the restart")
    new = p.info()["audit_writer_pid"]
    assert new not in (0, pid) and parent_of(new) == p.proc.pid
    c.close()


def test_the_writer_ends_with_the_proxy_even_when_it_is_killed(audited):
    p = audited()
    c = p.client()
    c.set("end:1", "v")
    wait_for(lambda: keys_written(p) == ["end:1"], what="a record")
    pid = p.info()["audit_writer_pid"]
    c.close()
    p.proc.kill()  # no shutdown: the writer sees EOF on its pipe
    p.proc.wait(10)
    wait_for(lambda: gone(pid), what="the writer process to exit")

    q = audited()  # a graceful stop: what was queued is written before the writer exits
    c = q.client()
    pipe = c.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"end:{i}", "v")
    pipe.execute()
    pid = q.info()["audit_writer_pid"]
    c.close()
    q.stop()
    assert gone(pid)
    assert keys_written(q)[-2000:] == [f"end:{i}" for i in range(2000)]


def test_a_writer_that_stops_reading_costs_records_not_clients(audited):
    """The writer stopped (SIGSTOP): its pipe fills, then the queue (audit_queue records, in the
    pipe and in the proxy); the records past it are dropped and counted, and another client's
    requests are answered as before. SIGCONT: what was queued is written."""
    p = audited("--audit-commands", "all", "--audit-queue", "20000")
    pid = p.info()["audit_writer_pid"]
    os.kill(pid, signal.SIGSTOP)
    with contextlib.ExitStack() as stack:
        stack.callback(os.kill, pid, signal.SIGCONT)
        c = p.client()
        other = stack.enter_context(RawClient(p.port))
        pipe = c.pipeline(transaction=False)
        big = "x" * 200
        for rnd in range(4):
            for i in range(10000):
                pipe.set(f"full:{rnd}:{i}:{big}", "v")  # keys are recorded: ~300 bytes a record
            assert pipe.execute() == [True] * 10000
            t = time.monotonic()
            assert other.call("PING") == b"+PONG\r\n"
            assert time.monotonic() - t < 2
        info = p.info()
        assert info["audit_queued"] == 20000 and info["audit_records"] < 10  # (the start-up's INFO records)
        assert info["audit_dropped"] >= 40000 - 20000
    wait_for(lambda: p.info()["audit_records"] >= 20000, what="the queued records written")
    # (one connection: a new one's CLIENT SETINFO records would be queued when its INFO is answered)
    wait_for(lambda: c.info("proxy")["audit_queued"] <= 1, what="nothing left queued but the last INFO's record")
    keys = [k for k in keys_written(p) if k.startswith("full:")]
    assert keys == [f"full:{i // 10000}:{i % 10000}:{big}" for i in range(len(keys))]  # the first ones, in order
    c.close()


def test_cluster_plain_path_records_a_redirected_request_at_the_node_that_answered(tmp_path):
    """Cluster mode: recorded writes take the plain path (numbered sends); one that meets a MOVED
    (its slot moved behind the proxy's back) is held, recovered by the batch path, and recorded
    once, with the node that answered."""
    from clusterkit import Cluster
    from vproxy.slots import key_slot

    cluster = Cluster("valkey", 3)
    d = tmp_path / "cluster"
    p = None
    try:
        p = Proxy("--mode", "cluster", "--backend", cluster.seeds[0], "--audit-dir", str(d),
                  "--topology-refresh", "600")
        r = p.client(client_name="mover")
        key = "{audmv}k"
        src = cluster.owner(key)
        dst = next(n for n in cluster.primaries if n is not src)
        r.set(key, "v")  # opens the session's channel to src
        r.delete(key)
        slot = key_slot(key.encode())
        # the (now empty) slot moves to dst as in a migration (importing first: ending it bumps dst's
        # config epoch, so no node's older view takes the slot back); the proxy does not know yet
        dst.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(src))
        src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(dst))
        for n in [dst, src] + [n for n in cluster.primaries if n not in (src, dst)]:
            n.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(dst))
        wait_for(lambda: cluster.owner(key) is dst, what="the slot owned by dst")
        pipe = r.pipeline(transaction=False)
        pipe.set(key, "w").set(key, "x")
        assert pipe.execute() == [True, True]
        assert dst.client().get(key) == b"x"
        wait_for(lambda: len(records(d, "mover")) == 4, what="the four records")
        got = [(x["command"], x["backend"], x["outcome"]) for x in records(d, "mover")]
        assert got == [("set", src.addr, "ok"), ("del", src.addr, "ok"), ("set", dst.addr, "ok"),
                       ("set", dst.addr, "ok")]
        r.close()

        w = p.client(client_name="spread")  # a channel to every node, then a pipeline on the plain path
        keys = [f"sp:{n}" for n in range(30)]
        for k in keys:
            w.set(k, "1")
        pipe = w.pipeline(transaction=False)
        for k in keys:
            pipe.set(k, "2")
        assert pipe.execute() == [True] * 30
        wait_for(lambda: len(records(d, "spread")) == 60, what="the sixty records")
        got = [(x["keys"][0], x["backend"]) for x in records(d, "spread")][30:]
        assert got == [(k, cluster.owner(k).addr) for k in keys]
        w.close()
    finally:
        if p is not None:
            p.stop()
        cluster.stop()


def records(d, client_name: str) -> list:
    path = d / "audit.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [x for x in recs if x["client_name"] == client_name]


def test_frames_come_out_whole_however_the_stream_is_cut():
    import marshal
    import random

    from vproxy.auditwriter import Frames, frame

    objs = [(i, b"x" * random.Random(i).randrange(0, 3000), [i] * (i % 5)) for i in range(60)]
    stream = b"".join(frame(o) for o in objs)
    rng = random.Random(5)
    for _ in range(50):
        frames, got, pos = Frames(), [], 0
        chunk = bytearray(8192)  # reused between reads, as main() does
        while pos < len(stream):
            k = min(rng.choice([1, 3, 7, 100, 4000, 9000]), len(chunk), len(stream) - pos)
            chunk[:k] = stream[pos:pos + k]
            pos += k
            got += [marshal.loads(f) for f in frames.feed(memoryview(chunk)[:k])]  # used before the next read
        assert got == objs and not frames.buf
