"""Socket reads and writes for gevent sockets, minus the syscall gevent's own recv/sendall waste.

gevent's recv tries the read first and, when nothing is there (EAGAIN: a Python exception), parks
the greenlet and tries again. For a proxy the first try nearly always fails: a client that has its
reply sends its next request later, a backend answers after it was written to. Parking first and
reading once the socket is readable saves a syscall and an exception per request. The event loop
(libev, level-triggered) wakes at once when bytes are already waiting, so nothing is ever missed.

gevent's sendall asks the kernel for SO_SNDBUF and the clock on every call; one plain send takes
the whole of a reply nearly always, and only a remainder goes through sendall.

A TLS socket (gevent.ssl.SSLSocket) is read and written with its own calls instead: the raw
socket under it carries ciphertext, and decrypted bytes may wait in the SSL object while the file
descriptor is quiet.
"""

from __future__ import annotations

from errno import EBADF

from gevent.ssl import SSLSocket, SSLWantReadError, SSLWantWriteError, SSLZeroReturnError


def recv_ready(sock, size: int) -> bytes:
    """Wait until the gevent socket `sock` is readable, then read up to size bytes (b'' at EOF)."""
    if isinstance(sock, SSLSocket):
        return sock.recv(size)
    raw = sock._sock
    while True:
        ev = sock._read_event
        if ev is None:  # closed by another greenlet
            raise OSError(EBADF, "socket closed")
        sock._wait(ev)
        try:
            return raw.recv(size)
        except BlockingIOError:  # woken, but another reader took the bytes: wait again
            continue


def send_all(sock, data: bytes) -> None:
    """Send all of data: one plain send, gevent's sendall (which parks until drained) for the rest."""
    if isinstance(sock, SSLSocket):
        return sock.sendall(data)
    try:
        sent = sock._sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_nowait(sock, size: int) -> bytes:
    """For loop callbacks (which must never park): up to size bytes, b'' at EOF, BlockingIOError
    when nothing is there. On a TLS socket, reading until BlockingIOError also drains the bytes
    already decrypted (the fd's readiness says nothing about those)."""
    if isinstance(sock, SSLSocket):
        try:
            return sock._sslobj.read(size)
        except (SSLWantReadError, SSLWantWriteError):
            raise BlockingIOError from None
        except SSLZeroReturnError:
            return b""
    return sock._sock.recv(size)


def close_quietly(sock) -> None:
    """Close a socket (None: nothing to do); an error on close tells nothing anyone acts on."""
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
