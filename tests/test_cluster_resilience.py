"""Cluster changes under load: a live slot migration (zero client-visible errors, no lost key) and a
primary killed while clients run (no disconnect, bounded errors, recovery without a restart)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from clusterkit import Cluster
from conftest import BACKENDS, Proxy, RawClient, wait_for
from ha_kit import record

from vproxy.slots import key_slot


class Load:
    """Client threads writing and reading their own keys through the proxy until stopped."""

    def __init__(self, proxy, prefix: str, threads: int = 4, keys: int = 200):
        self.stop_ = threading.Event()
        self.errors: list[str] = []
        self.ops = 0
        self.slowest = 0.0  # seconds, the longest round of requests that succeeded
        self.written: dict[str, int] = {}
        self.disconnects = 0
        # a socket timeout well above --primary-wait: a command held through a failover is not a disconnect
        self.threads = [threading.Thread(target=self.run, args=(proxy.client(socket_timeout=60, retry=Retry(NoBackoff(), 0)),
                                                             f"{prefix}{t}", keys),
                                         daemon=True)
                        for t in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, c: redis.Redis, prefix: str, keys: int):
        c.ping()
        conn_id = c.client_id()
        n = 0
        while not self.stop_.is_set():
            k = f"{prefix}:{n % keys}"
            t0 = time.monotonic()
            try:
                if n % 5 == 0:  # a transaction on the same slot: it must survive the move too
                    got_tx = c.pipeline(transaction=True).set(k, n).get(k).execute()
                    if got_tx != [True, str(n).encode()]:
                        self.errors.append(f"{k}: transaction gave {got_tx!r}")
                else:
                    c.set(k, n)
                self.written[k] = n
                got = c.get(k)
                if got != str(n).encode():
                    self.errors.append(f"{k}: read {got!r}, wrote {n}")
                if n % 10 == 0:
                    vals = c.mget([f"{prefix}:{j}" for j in range(0, min(n + 1, keys), 7)])
                    if any(v is None for v in vals):
                        self.errors.append(f"mget saw a missing key at n={n}")
                self.ops += 1
                self.slowest = max(self.slowest, time.monotonic() - t0)
            except redis.TimeoutError as e:  # no reply within 60 s: counted as an error, and this client stops
                self.errors.append(f"timeout: {e}")
                return
            except redis.ConnectionError as e:
                self.disconnects += 1
                self.errors.append(f"disconnect: {e}")
            except redis.ResponseError as e:
                self.errors.append(str(e))
            n += 1
        try:
            if c.client_id() != conn_id:
                self.disconnects += 1
        except redis.ConnectionError as e:
            self.disconnects += 1
            self.errors.append(f"disconnect at the end: {e}")

    def finish(self):
        """Stop the load; every thread must end (a request hanging past the deadline is a bug)."""
        self.stop_.set()
        for t in self.threads:
            t.join(90)
        hung = [t.name for t in self.threads if t.is_alive()]
        assert not hung, f"client threads still in a request after 90 s: {hung}"


def _proxy(cluster, *extra):
    return Proxy("--mode", "cluster", "--backend", cluster.seeds[0], "--backend", cluster.seeds[1],
                 "--topology-refresh", "0.5", *extra)


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request):
    c = Cluster(request.param, 3)
    yield c
    c.stop()


def migrate_slot(cluster, slot: int, src, dst, batch: int = 10):
    sid, did = cluster.node_id(src), cluster.node_id(dst)
    dst.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", sid)
    src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", did)
    moved = 0
    while True:
        keys = src.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
        if not keys:
            break
        src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
        time.sleep(0.01)  # let the load run between batches (pacing, not synchronisation)
    for n in [dst, src] + [p for p in cluster.primaries if p not in (src, dst)]:
        if n.proc.poll() is not None:
            continue
        n.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", did)
    return moved


def test_live_slot_migration_under_load(cluster):
    cluster.flushall()
    p = _proxy(cluster)
    try:
        tag = "mig"
        slot = key_slot(f"{{{tag}}}".encode())
        load = Load(p, f"{{{tag}}}t", threads=4, keys=100)
        wait_for(lambda: load.ops > 300, 20, "load to start")
        src = cluster.owner(f"{{{tag}}}")
        dst = next(n for n in cluster.primaries if n is not src)
        moved = migrate_slot(cluster, slot, src, dst)
        wait_for(lambda: cluster.owner(f"{{{tag}}}") is dst, 10, "the slot to be owned by dst")
        before = load.ops
        wait_for(lambda: load.ops > before + 300, 20, "load to continue after the move")
        load.finish()
        assert moved > 0
        assert load.errors == [] and load.disconnects == 0
        c = dst.client()
        for k, v in list(load.written.items()):
            assert c.get(k) == str(v).encode(), k
        assert src.client().dbsize() == 0 or all(key_slot(k) != slot for k in src.client().keys("*"))
        # and back again, so later tests see the original layout
        load = Load(p, f"{{{tag}}}u", threads=2, keys=50)
        wait_for(lambda: load.ops > 100, 20, "load to start")
        migrate_slot(cluster, slot, dst, src)
        before = load.ops
        wait_for(lambda: load.ops > before + 100, 20, "load to continue")
        load.finish()
        assert load.errors == [] and load.disconnects == 0
    finally:
        p.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def replicated(request):
    c = Cluster(request.param, 3, 1)
    yield c
    c.stop()


def test_primary_killed_under_load(replicated):
    cluster = replicated
    p = _proxy(cluster, "--primary-wait", "15")
    try:
        victim = cluster.primaries[1]
        tag = next(f"k{n}" for n in range(1000) if cluster.owner(f"{{k{n}}}") is victim)
        load = Load(p, f"{{{tag}}}x", threads=3, keys=50)
        other = Load(p, "plain", threads=2, keys=50)  # keys on every node
        wait_for(lambda: load.ops > 200 and other.ops > 200, 20, "load to start")
        t0 = time.monotonic()
        victim.kill()
        alive = [n for n in cluster.nodes if n is not victim]
        wait_for(lambda: cluster.owner(f"{{{tag}}}") is not victim, 30, "a replica to take over")
        switched = time.monotonic() - t0
        before = load.ops
        wait_for(lambda: load.ops > before + 200, 30, "writes to the failed shard to resume")
        load.finish()
        other.finish()
        assert load.disconnects == 0 and other.disconnects == 0, (load.errors + other.errors)[:10]
        assert len(load.errors) <= 10, load.errors[:10]
        assert len(other.errors) <= 10, other.errors[:10]
        timeouts = [e for e in load.errors + other.errors if e.startswith("timeout")]
        assert not timeouts, timeouts  # a request vproxy never answered (it once happened: a lost split reply)
        assert max(load.slowest, other.slowest) < 15 + 5  # held at most primary_wait (+ command_timeout)
        record("cluster", fault="kill", backend=cluster.kind, switch_s=round(switched, 3),
               slowest_s=round(max(load.slowest, other.slowest), 3), errors=len(load.errors + other.errors))
        c = p.client()
        assert c.set(f"{{{tag}}}after", 1) and c.get(f"{{{tag}}}after") == b"1"
        assert alive
    finally:
        p.stop()


def test_node_joins_takes_a_slot_and_leaves_under_load(cluster):
    """A node joins and a slot migrates to it: vproxy learns the node from MOVED/ASK and the map. Then
    the slot moves back and the cluster forgets the node: clients see nothing, and vproxy lets go of
    its connections to the node that left."""
    from clusterkit import cluster_port
    from conftest import Server
    cluster.flushall()
    p = _proxy(cluster)
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1500",
            "--cluster-allow-replica-migration", "no")
    new = Server(cluster.kind, cluster_port(), *args)
    forgotten = False
    try:
        cluster.primaries[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", new.port)
        nodes = cluster.nodes + [new]
        wait_for(lambda: all(len(cluster.known(n)) == len(nodes) for n in nodes), 20, "the new node to be known")
        wait_for(lambda: Cluster.state_ok(new), 20, "the new node to see the whole map")
        tag = "newnode"
        slot = key_slot(f"{{{tag}}}".encode())
        load = Load(p, f"{{{tag}}}n", threads=3, keys=60)
        wait_for(lambda: load.ops > 200, 20, "load to start")
        src = cluster.owner(f"{{{tag}}}")
        migrate_slot(cluster, slot, src, new)
        before = load.ops
        wait_for(lambda: load.ops > before + 200, 20, "load to continue on the new node")
        assert new.client().dbsize() > 0
        assert any(c.get("name") == "vproxy" for c in new.client().client_list())

        migrate_slot(cluster, slot, new, src)  # the node leaves: its slot goes back, then it is forgotten
        new_id = Cluster.node_id(new)
        for n in cluster.nodes:
            n.client().execute_command("CLUSTER", "FORGET", new_id)
        forgotten = True
        new.client().execute_command("CLUSTER", "RESET", "SOFT")
        wait_for(lambda: not any(c.get("name") == "vproxy" for c in new.client().client_list()), 40,
                 "vproxy to close its connections to the node that left (10 s after the map dropped it)")
        before = load.ops
        wait_for(lambda: load.ops > before + 200, 20, "load to continue after the node left")
        load.finish()
        assert load.errors == [] and load.disconnects == 0
        assert new.client().dbsize() == 0
        assert src.client().dbsize() == len(set(load.written))
    finally:
        p.stop()
        if not forgotten:
            for n in cluster.nodes:
                try:
                    n.client().execute_command("CLUSTER", "FORGET", Cluster.node_id(new))
                except Exception:
                    pass
        new.stop()


def test_ask_to_a_silent_node_ends_in_an_error_not_a_hang(cluster):
    """Mid-migration, a key already moved: the old owner answers ASK, and the new owner, whose
    connection vproxy holds, stops answering (SIGSTOP). ASKING and the read wait on it; after
    command_timeout the connection is replaced, and after primary_wait the client gets an error.
    (ASKING once carried no deadline: the janitor never saw the stuck connection, the client hung.)"""
    cluster.flushall()
    src, dst = cluster.primaries[0], cluster.primaries[1]
    key = next(f"ask{n}" for n in range(1000) if cluster.owner(f"ask{n}") is src)
    on_dst = next(f"dst{n}" for n in range(1000) if cluster.owner(f"dst{n}") is dst)
    slot = key_slot(key.encode())
    p = _proxy(cluster, "--command-timeout", "1", "--primary-wait", "2")
    c = p.client(socket_timeout=20)
    try:
        assert c.set(key, "v") and c.set(on_dst, "w") and c.get(on_dst) == b"w"  # a connection to dst is open
        sid, did = cluster.node_id(src), cluster.node_id(dst)
        dst.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", sid)
        src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", did)
        src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", key)
        dst.pause()
        try:
            with pytest.raises(redis.ResponseError):
                c.get(key)
        finally:
            dst.resume()
        for n in (src, dst):
            n.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", did)
        wait_for(lambda: c.get(key) == b"v", what="the key to be served by its new owner")
        migrate_slot(cluster, slot, dst, src)  # back, for later tests
    finally:
        c.close()
        p.stop()


@pytest.mark.parametrize("command", [("GET", "{stopped}k"), ("DBSIZE",)])
def test_stopped_node_answers_within_the_settings_and_says_why(cluster, command):
    """A primary with no replica stops answering (SIGSTOP): a request that needs it gets an error
    within command_timeout + primary_wait (the longest the settings allow), naming the timeout,
    not a connect timeout of a retry; the other nodes' keys are served meanwhile."""
    cluster.flushall()
    node = cluster.owner("{stopped}k")
    other = next(f"o{n}" for n in range(1000) if cluster.owner(f"o{n}") is not node)
    p = _proxy(cluster, "--command-timeout", "1", "--primary-wait", "2")
    c = p.client(socket_timeout=30)
    try:
        assert c.set("{stopped}k", "v") and c.set(other, "w")
        node.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(redis.ResponseError) as err:
                c.execute_command(*command)
            took = time.monotonic() - t0
            assert "did not answer within 1s (command_timeout)" in str(err.value), err.value
            assert took < 1 + 2 + 2, f"{command[0]} waited {took:.1f}s"
            assert p.client(socket_timeout=10).get(other) == b"w"
        finally:
            node.resume()
        wait_for(lambda: c.get("{stopped}k") == b"v", what="the node to serve again")
    finally:
        c.close()
        p.stop()


def test_pipelined_plain_requests_across_a_moved_slot_keep_their_order(cluster):
    """Plain GETs pipelined to one node, one of them for a slot that moved behind vproxy's back:
    its MOVED is followed (the proxy's map was stale), and every reply comes back in order."""
    cluster.flushall()
    src, dst = cluster.primaries[0], cluster.primaries[1]
    keys = [f"pl{n}" for n in range(3000) if cluster.owner(f"pl{n}") is src][:40]
    moving = key_slot(keys[20].encode())
    for k in keys:
        assert cluster.owner(k).client().set(k, k)
    p = _proxy(cluster, "--topology-refresh", "60")  # vproxy learns of the move from MOVED only
    c = RawClient(p.port, timeout=20)
    try:
        assert c.call("GET", keys[0]) == b"$%d\r\n%s\r\n" % (len(keys[0]), keys[0].encode())  # a channel to src
        for k in keys:  # the map is fresh: the next ones go out from the loop
            assert c.call("GET", k).endswith(k.encode() + b"\r\n")
        migrate_slot(cluster, moving, src, dst)
        for _ in range(3):
            c.send(b"".join(RawClient.encode("GET", k) for k in keys))
            assert c.read_n(len(keys)) == [b"$%d\r\n%s\r\n" % (len(k), k.encode()) for k in keys]
    finally:
        c.close()
        p.stop()
        migrate_slot(cluster, moving, dst, src)  # back, for later tests


def test_pipeline_across_nodes_with_a_moved_slot_keeps_its_order(cluster):
    """A pipeline whose keys live on every node, sent from the loop to all of them at once, one
    key's slot moved behind vproxy's back: replies come back whole and in request order."""
    cluster.flushall()
    src, dst = cluster.primaries[0], cluster.primaries[1]
    keys = [f"px{n}" for n in range(120)]
    moving = next(key_slot(k.encode()) for k in keys[40:] if cluster.owner(k) is src)
    for k in keys:
        assert cluster.owner(k).client().set(k, k * 3)
    p = _proxy(cluster, "--topology-refresh", "60")  # vproxy learns of the move from MOVED only
    c = RawClient(p.port, timeout=20)
    try:
        for k in keys:  # a channel to every node, and the map is fresh
            assert c.call("GET", k) == b"$%d\r\n%s\r\n" % (3 * len(k), k.encode() * 3)
        migrate_slot(cluster, moving, src, dst)
        want = []
        data = b""
        for n, k in enumerate(keys):
            data += RawClient.encode("GET", k)
            want.append(b"$%d\r\n%s\r\n" % (3 * len(k), k.encode() * 3))
            if n % 9 == 0:
                data += RawClient.encode("INCR", f"{{{k}}}:n")
                want.append(b":1\r\n")
        c.send(data)
        assert c.read_n(len(want)) == want
    finally:
        c.close()
        p.stop()
        migrate_slot(cluster, moving, dst, src)  # back, for later tests
