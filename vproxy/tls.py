"""TLS contexts: the client listener's (tls_* settings) and the backends' (backend_tls_* settings).

Standard library `ssl` through gevent (gevent.ssl: a handshake, read or write that would block
parks the greenlet, never the loop). Sockets wrapped here are read and written with gevent's own
blocking-style calls: decrypted bytes can wait inside the SSL object while the file descriptor
stays quiet, so the loop-level readers of the plain path (plain.py, outbox.py, the shared
channels' I/O watcher) never serve a TLS socket (see ClientSession's TLS mixin, Channel._connect).

    client --TLS--> tls_listen (server_context)      vproxy --TLS--> backend (backend_context,
                    tls_auth_clients: yes|optional|no                 SNI, verified unless insecure)
"""

from __future__ import annotations

from gevent import ssl

from .errors import ConfigError

_BACKEND = "_backend_tls_context"  # where backend() keeps the context it built for a Config


def server_context(cfg) -> ssl.SSLContext | None:
    """The context TLS clients are accepted with (None without tls_listen); ConfigError naming the
    setting and the file when a certificate or key cannot be loaded."""
    if not cfg.tls_listen:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cfg.tls_cert_file, cfg.tls_key_file, "tls_cert_file", "tls_key_file")
    mode = cfg.tls_auth_clients
    if mode != "no":
        if not cfg.tls_ca_cert_file:
            raise ConfigError(f"setting 'tls_auth_clients' = '{mode}' needs 'tls_ca_cert_file' (the CA that "
                              "signs client certificates), or tls_auth_clients = 'no'")
        _load_ca(ctx, cfg.tls_ca_cert_file, "tls_ca_cert_file")
        ctx.verify_mode = ssl.CERT_REQUIRED if mode == "yes" else ssl.CERT_OPTIONAL
    return ctx


def backend_context(cfg) -> ssl.SSLContext | None:
    """The context backend connections are made with (None without backend_tls): the server's
    certificate verified against backend_tls_ca_cert_file (else the system's CAs) and its name,
    unless backend_tls_insecure; a client certificate when backend_tls_cert_file is set."""
    if not cfg.backend_tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.backend_tls_ca_cert_file:
        _load_ca(ctx, cfg.backend_tls_ca_cert_file, "backend_tls_ca_cert_file")
    if cfg.backend_tls_cert_file or cfg.backend_tls_key_file:
        _load_chain(ctx, cfg.backend_tls_cert_file, cfg.backend_tls_key_file or cfg.backend_tls_cert_file,
                    "backend_tls_cert_file", "backend_tls_key_file")
    if cfg.backend_tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def backend(cfg) -> ssl.SSLContext | None:
    """backend_context(cfg), built once per Config (every backend connection asks)."""
    ctx = cfg.__dict__.get(_BACKEND, False)
    if ctx is False:
        ctx = cfg.__dict__[_BACKEND] = backend_context(cfg)
    return ctx


def reload_backend(cfg) -> None:
    """Read the backend certificates again (SIGHUP); ConfigError leaves the old context in use."""
    cfg.__dict__[_BACKEND] = backend_context(cfg)


def wrap_backend(sock, cfg, host: str):
    """sock, with the TLS handshake done when backend_tls is on (SNI: backend_tls_sni, else host)."""
    ctx = backend(cfg)
    if ctx is None:
        return sock
    return ctx.wrap_socket(sock, server_hostname=cfg.backend_tls_sni or host)


def _load_chain(ctx, cert: str, key: str, cert_name: str, key_name: str) -> None:
    if not cert:
        raise ConfigError(f"TLS needs setting '{cert_name}' (a PEM certificate)")
    try:
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"settings '{cert_name}'/'{key_name}': cannot load {cert} / {key or cert}: "
                          f"{getattr(e, 'strerror', None) or e}") from None


def _load_ca(ctx, path: str, name: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"setting '{name}': cannot load {path}: {getattr(e, 'strerror', None) or e}") from None
