"""One backend socket: connect, handshake (AUTH, HELLO, SELECT, name), send, read whole replies."""

from __future__ import annotations

import socket

import gevent
from gevent.ssl import SSLSocket

from .. import hostport, resp, tls
from ..errors import BackendError
from ..sockio import close_quietly, recv_ready, send_all


class Credentials:
    """A backend ACL user and its password (bytes, as the client sent them): part of a connection's
    key, so that connections made for one user never serve another. The password is never shown
    (repr, logs, errors)."""

    __slots__ = ("_hash", "password", "user")

    def __init__(self, user: bytes, password: bytes):
        self.user, self.password = user, password
        self._hash = hash((user, password))

    def __eq__(self, other) -> bool:
        return isinstance(other, Credentials) and self.user == other.user and self.password == other.password

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"<user {self.user.decode(errors='replace')}>"


class AuthError(BackendError):
    """The backend refused a connection's credentials (AUTH, HELLO) or their rights (SELECT) in the
    handshake; `frame` is its error reply."""

    def __init__(self, msg: str, frame: bytes):
        super().__init__(msg)
        self.frame = frame


class BackendConn:
    """A connected, handshaken socket to one backend server, speaking RESP `proto` on database `db`."""

    __slots__ = ("addr", "sock", "framer", "db", "proto", "backend_id")

    def __init__(self, addr: tuple[str, int], db: int = 0, proto: int = 2):
        self.addr, self.db, self.proto = addr, db, proto
        self.sock: socket.socket | None = None
        self.framer = resp.ReplyFramer()
        self.backend_id: int | None = None  # the server's CLIENT ID for this connection

    @property
    def tls(self) -> bool:
        return isinstance(self.sock, SSLSocket)

    @property
    def name(self) -> str:
        return hostport.fmt(self.addr)

    def connect(self, timeout: float, username: str = "", password: str = "", handshake: bool = True,
                cfg=None, client_user: bool = False) -> None:
        """Open the socket and run the handshake; raises BackendError naming the backend.

        handshake=False: the socket only (busy.py sends AUTH itself, behind its one request).
        cfg: the settings, for TLS (backend_tls ...); None: plain TCP.
        client_user: the credentials are a client's (users.py): see _user_handshake."""
        try:
            with gevent.Timeout(timeout, BackendError(f"connect timed out after {timeout:g}s")):
                self.sock = socket.create_connection(self.addr)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if cfg is not None and cfg.backend_tls:
                    self.sock = tls.wrap_backend(self.sock, cfg, self.addr[0])
                if handshake and client_user:
                    self._user_handshake(username, password)
                elif handshake:
                    self._handshake(username, password)
        except OSError as e:  # ssl.SSLError too (a certificate refused ...)
            self.close()
            raise BackendError(e.strerror or str(e)) from None
        except BackendError:
            self.close()
            raise

    def _user_handshake(self, username: bytes, password: bytes) -> None:
        """A connection for a client's own ACL user: one HELLO authenticates, sets the protocol and
        the name, and says the connection's id. HELLO is never denied by ACL rules, where CLIENT
        SETNAME / CLIENT ID would be for many users (and each denial would land in the server's
        ACL LOG under the client's name)."""
        steps = [[b"HELLO", b"%d" % self.proto, b"AUTH", username, password, b"SETNAME", b"vproxy"]]
        if self.db:
            steps.append([b"SELECT", str(self.db).encode()])
        self.send(b"".join(resp.encode_request(s) for s in steps))
        frames = self.read_n(len(steps), "connection closed by backend during handshake")
        for step, frame in zip(steps, frames):
            if frame[:1] == b"-":
                raise AuthError(f"{step[0].decode()} failed: {frame[1:].strip().decode(errors='replace')}", frame)
        hello = resp.decode(frames[0])
        if isinstance(hello, list):  # RESP2: a flat list of names and values
            hello = dict(zip(hello[::2], hello[1::2]))
        if isinstance(hello, dict) and isinstance(hello.get(b"id"), int):
            self.backend_id = hello[b"id"]

    def _handshake(self, username: str, password: str) -> None:
        steps = auth_steps(self.proto, username, password)
        if self.db:
            steps.append([b"SELECT", str(self.db).encode()])
        steps.append([b"CLIENT", b"SETNAME", b"vproxy"])
        steps.append([b"CLIENT", b"ID"])  # CLIENT TRACKING ... REDIRECT names connections by it
        self.send(b"".join(resp.encode_request(s) for s in steps))
        frames = self.read_n(len(steps), "connection closed by backend during handshake")
        if frames[-1][:1] == b":":
            self.backend_id = int(frames[-1][1:-2])
        for step, frame in zip(steps, frames):
            if frame[:1] != b"-":
                continue
            # CLIENT SETNAME/ID are not essential: Redis 7 answers them -BUSY while a script runs (and
            # this connection may be the one a SCRIPT KILL needs); a client's ACL user may lack them.
            if step[1:2] in ([b"SETNAME"], [b"ID"]) and frame.startswith((b"-BUSY", b"-NOPERM")):
                continue
            why = f"{step[0].decode()} failed: {frame[1:].strip().decode(errors='replace')}"
            if step[0] in (b"AUTH", b"HELLO", b"SELECT"):  # the credentials or their rights: refused
                raise AuthError(why, frame)
            raise BackendError(why)

    def send(self, data: bytes) -> None:
        send_all(self.sock, data)

    def read_frames(self) -> list[bytes]:
        """Block until at least one whole reply arrived; [] means the backend closed the socket."""
        while True:
            data = recv_ready(self.sock, 262144)
            if not data:
                return []
            frames = self.framer.feed(data)
            if frames:
                return frames

    def read_n(self, n: int, closed: str = "connection closed by backend") -> list[bytes]:
        """At least the next n replies (request/response use: no more are due); BackendError(closed) on EOF."""
        frames: list[bytes] = []
        while len(frames) < n:
            more = self.read_frames()
            if not more:
                raise BackendError(closed)
            frames += more
        return frames

    def read_frame(self) -> bytes:
        """Exactly one reply (for request/response use with nothing else in flight)."""
        frames = self.read_frames()
        if len(frames) != 1:
            raise BackendError("connection closed by backend" if not frames else "unexpected extra reply")
        return frames[0]

    def call(self, *args):
        """Send one command and return its decoded reply (for vproxy's own control queries)."""
        self.send(resp.encode_request([a if isinstance(a, bytes) else str(a).encode() for a in args]))
        return resp.decode(self.read_frame())

    def close(self) -> None:
        sock, self.sock = self.sock, None
        close_quietly(sock)


def auth_steps(proto: int, username: str, password: str) -> list[list[bytes]]:
    """The requests that authenticate a new connection and set its protocol (none for RESP2 without
    a password). AUTH and HELLO are among the few commands a server busy with a script still runs."""
    username, password = _b(username), _b(password)
    if proto == 3:
        hello = [b"HELLO", b"3"]
        if password:
            hello += [b"AUTH", username or b"default", password]
        return [hello]
    if password:
        return [[b"AUTH", username, password] if username else [b"AUTH", password]]
    return []


def _b(text) -> bytes:
    return text if isinstance(text, bytes) else text.encode()
