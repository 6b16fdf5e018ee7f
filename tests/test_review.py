"""Review findings on the standalone data path: each test shows one bug a user would hit."""

from __future__ import annotations

import socket
import time

from conftest import RawClient, proxy_stats, wait_for

E = RawClient.encode


def test_subscribe_then_hang_up_leaks_no_backend_connection(proxy, server):
    """A client that subscribes and disconnects at once must not leave a backend connection open."""
    wait_for(lambda: proxy_stats(proxy)["backend_connections_pinned"] == 0, what="no pins")
    d = server.client(protocol=2)  # one probe connection, kept
    before = d.info("clients")["connected_clients"]
    accepted = d.info("stats")["total_connections_received"]
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(E("SUBSCRIBE", f"ch{i}"))
        s.close()
    # the proxy opened a backend connection for each (dropped before or after it was up) ...
    wait_for(lambda: d.info("stats")["total_connections_received"] >= accepted + 20, what="backend connects")
    wait_for(lambda: proxy_stats(proxy)["backend_connections_pinned"] == 0, what="pins released")
    # ... and every one of them is closed on the backend too
    wait_for(lambda: d.info("clients")["connected_clients"] <= before + 2, what="backend connections closed")
    d.close()
