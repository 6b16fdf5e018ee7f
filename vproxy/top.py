"""`vproxy top [HOST:PORT]`: a live view of one vproxy, refreshed every second.

Reads `INFO proxy` and `PROXY STATS` over RESP (as redis-cli would, with --user/--password) and
shows ops/s, clients, backend connections, and the busiest commands by calls/s with their error
rate and latency percentiles (those since start or the last PROXY STATS RESET: vproxy keeps
lifetime histograms).

    vproxy top                       # 127.0.0.1:7777, until Ctrl-C
    vproxy top 10.0.0.5:7777 --password s3cret --count 5
"""

from __future__ import annotations

import argparse
import sys
import time

from . import hostport
from .errors import BackendError
from .mux.backend import BackendConn


class Conn:
    """The RESP connection to the vproxy watched: a BackendConn (vproxy speaks RESP as a server does)."""

    def __init__(self, addr: tuple[str, int], user: str, password: str, timeout: float = 5.0):
        self.conn = BackendConn(addr)
        self.conn.connect(timeout, handshake=False)
        if password:
            self.call(*(["AUTH", user, password] if user else ["AUTH", password]))

    def call(self, *args):
        reply = self.conn.call(*args)
        if isinstance(reply, Exception):
            raise RuntimeError(str(reply))
        return reply

    def close(self) -> None:
        self.conn.close()


def snapshot(conn: Conn) -> dict:
    text = conn.call("INFO", "proxy").decode(errors="replace")
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
    rows = conn.call("PROXY", "STATS")
    table = {}
    for row in rows:
        d = {k.decode(): v for k, v in zip(row[::2], row[1::2])}
        table[d["command"].decode()] = {k: (float(v) if isinstance(v, bytes) else v) for k, v in d.items()
                                        if k != "command"}
    return {"at": time.monotonic(), "info": info, "table": table}


def render(prev: dict, cur: dict, target: str, top: int) -> str:
    dt = max(cur["at"] - prev["at"], 1e-6)
    info = cur["info"]

    def rate(key):
        return (int(info.get(key, 0)) - int(prev["info"].get(key, 0))) / dt
    lines = [f"vproxy {target}  {info.get('proxy_version', '?')} {info.get('proxy_mode', '?')}  "
             f"up {info.get('proxy_uptime_in_seconds', '?')}s  clients {info.get('connected_clients', '?')}  "
             f"backend shared {info.get('backend_connections_shared', '?')} pinned "
             f"{info.get('backend_connections_pinned', '?')}  ops/s {rate('total_commands_processed'):,.0f}",
             "",
             f"{'command':<20}{'calls/s':>12}{'errors/s':>10}{'err %':>8}{'p50 us':>11}{'p99 us':>11}"]
    rows = []
    for name, st in cur["table"].items():
        old = prev["table"].get(name, {})
        calls = (st["calls"] - old.get("calls", 0)) / dt
        errs = (st["failed"] - old.get("failed", 0)) / dt
        rows.append((calls, name, errs, st))
    rows.sort(key=lambda r: (-r[0], r[1]))
    for calls, name, errs, st in rows[:top]:
        pct = 100.0 * errs / calls if calls else 0.0
        lines.append(f"{name:<20}{calls:>12,.0f}{errs:>10,.0f}{pct:>8.1f}{st['p50']:>11,.1f}{st['p99']:>11,.1f}")
    if not rows:
        lines.append("(no commands yet)")
    lines.append("")
    lines.append("latency percentiles: since start or PROXY STATS RESET")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vproxy top", description="A live view of one vproxy.")
    ap.add_argument("target", nargs="?", default="127.0.0.1:7777", help="HOST:PORT of vproxy (default 127.0.0.1:7777)")
    ap.add_argument("--user", default="", help="username for AUTH")
    ap.add_argument("--password", default="", help="password for AUTH")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    ap.add_argument("--count", type=int, default=0, help="frames to show, then exit (default: until Ctrl-C)")
    ap.add_argument("--top", type=int, default=15, help="commands shown (default 15)")
    args = ap.parse_args(argv)
    try:
        addr = hostport.parse(args.target)
        conn = Conn(addr, args.user, args.password)
    except (OSError, ValueError, RuntimeError, BackendError) as e:
        print(f"vproxy top: cannot reach {args.target}: {e}", file=sys.stderr)
        return 1
    tty = sys.stdout.isatty()
    shown = 0
    try:
        prev = snapshot(conn)
        while not args.count or shown < args.count:
            time.sleep(args.interval)
            cur = snapshot(conn)
            frame = render(prev, cur, args.target, args.top)
            print(("\x1b[H\x1b[2J" if tty else "") + frame, flush=True)
            if not tty:
                print("", flush=True)
            prev = cur
            shown += 1
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError, BackendError) as e:
        print(f"vproxy top: {args.target}: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    return 0
