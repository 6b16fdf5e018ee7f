"""Many clients, few backend connections: 1000 concurrent client connections through one proxy
while the backend itself sees only a handful (its own INFO clients, read directly)."""

from __future__ import annotations

import asyncio
import resource
import threading
import time

import pytest
import redis.asyncio as aredis
from conftest import RawClient, proxy_stats

N_CLIENTS = 1000
BACKEND_LIMIT = 5  # includes the probe connection that reads INFO clients


@pytest.fixture(scope="module", autouse=True)
def enough_fds():
    """1000 client sockets here and 1000 in the proxy (which inherits this limit): raise it if low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * N_CLIENTS
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class BackendWatch:
    """Polls the backend's connected_clients (directly, one connection of its own) and keeps the peak."""

    def __init__(self, server):
        self.client = server.client(protocol=2)
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.client.info("clients")["connected_clients"])
            self.samples += 1
            self.stop.wait(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        self.client.close()


async def _open_all(port: int, n: int):
    conns = []
    for start in range(0, n, 200):  # in waves: the listen backlog is finite
        conns += await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(start, min(n, start + 200)))
        )
    return conns


async def _set_get(i: int, reader, writer) -> bytes:
    writer.write(RawClient.encode("SET", f"scale:{i}", f"v{i}") + RawClient.encode("GET", f"scale:{i}"))
    await writer.drain()
    want = b"+OK\r\n" + b"$%d\r\nv%d\r\n" % (len(f"v{i}"), i)
    data = b""
    while len(data) < len(want):
        chunk = await reader.read(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_1000_raw_clients_few_backend_connections(server, start_proxy):
    server.client().flushall()
    p = start_proxy("--backend", server.addr)
    n0 = proxy_stats(p)["connected_clients"]

    async def main():
        conns = await _open_all(p.port, N_CLIENTS)
        # every connection is open at once, and the proxy counts them all
        assert await asyncio.to_thread(lambda: proxy_stats(p)["connected_clients"]) == n0 + N_CLIENTS
        replies = await asyncio.gather(*(_set_get(i, r, w) for i, (r, w) in enumerate(conns)))
        for i, got in enumerate(replies):
            assert got == b"+OK\r\n" + b"$%d\r\nv%d\r\n" % (len(f"v{i}"), i), (i, got)
        # a second round on the same connections, all in flight together
        replies = await asyncio.gather(*(_set_get(i, r, w) for i, (r, w) in enumerate(conns)))
        assert all(got.startswith(b"+OK\r\n$") for got in replies)
        for _, w in conns:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)

    t0 = time.monotonic()
    with BackendWatch(server) as watch:
        asyncio.run(asyncio.wait_for(main(), 60))
    took = time.monotonic() - t0
    assert watch.samples > 0
    assert watch.peak <= BACKEND_LIMIT, f"the backend saw {watch.peak} connections"
    assert server.client().dbsize() == N_CLIENTS
    assert server.client().get(f"scale:{N_CLIENTS - 1}") == f"v{N_CLIENTS - 1}".encode()
    assert took < 60
    stats = proxy_stats(p)
    assert stats["backend_connections_pinned"] == 0
    assert stats["backend_connections_total"] <= 2  # pool_size shared connections for (db 0, RESP2)


def test_1000_redis_py_asyncio_clients(server, start_proxy):
    """Stock redis.asyncio clients (redis-py 8 defaults: RESP3, HELLO, CLIENT SETINFO, MAINT_NOTIFICATIONS)."""
    server.client().flushall()
    p = start_proxy("--backend", server.addr)

    async def main():
        clients = [aredis.Redis(port=p.port, socket_timeout=30) for _ in range(N_CLIENTS)]
        try:
            for start in range(0, N_CLIENTS, 200):
                await asyncio.gather(*(c.ping() for c in clients[start : start + 200]))  # connect in waves
            assert await asyncio.to_thread(lambda: proxy_stats(p)["connected_clients"]) >= N_CLIENTS

            async def one(i, c):
                await c.set(f"a:{i}", i)
                assert int(await c.get(f"a:{i}")) == i
                assert await c.incr("a:total") >= 1

            await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))

    with BackendWatch(server) as watch:
        asyncio.run(asyncio.wait_for(main(), 90))
    assert watch.peak <= BACKEND_LIMIT, f"the backend saw {watch.peak} connections"
    assert server.client().get("a:total") == str(N_CLIENTS).encode()
    assert int(proxy_stats(p)["backend_connects"]) <= 4  # not one per client


def test_many_clients_mixed_dbs_and_protocols(server, start_proxy):
    """300 clients over 3 databases x 2 protocols: 6 (db, protocol) pools of at most pool_size each."""
    server.client().flushall()
    p = start_proxy("--backend", server.addr, "--pool-size", "1")

    async def main():
        clients = [
            aredis.Redis(port=p.port, db=i % 3, protocol=2 + (i // 3) % 2, socket_timeout=30) for i in range(300)
        ]
        try:

            async def one(i, c):
                await c.rpush("list", i)
                await c.hset(f"h:{i}", mapping={"i": i})
                assert await c.hgetall(f"h:{i}") == {b"i": str(i).encode()}

            await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))

    with BackendWatch(server) as watch:
        asyncio.run(asyncio.wait_for(main(), 60))
    assert watch.peak <= 6 + 1
    for db in range(3):
        assert server.client(db=db).llen("list") == 100
