"""`workers = N`: a supervisor process and N vproxy worker processes sharing the listen port.

    vproxy --workers 4 (or auto: one per core)
      supervisor: starts the embedded Valkey if there is one, then the workers; restarts a worker
                  that dies (with a log line and backoff); SIGTERM/SIGINT: stops them all;
                  SIGHUP: passed on to every worker (each reloads its settings: reload.py)
      worker i:   `python -m vproxy <the same settings> --workers 1 --worker-index i`: an ordinary
                  vproxy whose listener binds with SO_REUSEPORT, so the kernel spreads new client
                  connections over the workers; its admin HTTP server (if any) on admin port + i

Each worker keeps its own backend pool: the backend sees about N x pool_size shared connections
(docs/operations.md, "Sizing"). A worker is told to stop (SIGTERM) when the supervisor dies, however
it dies (Linux PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from time import monotonic

import gevent
from gevent.event import Event
from loguru import logger

from .embedded import EmbeddedValkey, die_with_parent, stop_process

RESTART_MIN = 0.5  # seconds before a dead worker is started again, doubled per quick death
RESTART_MAX = 10.0
STABLE = 30.0  # a worker that lived this long resets the backoff
START_GRACE = 3.0  # a worker that exits (with an error) this soon after the first start: the start failed


def count(value: str) -> int:
    """The `workers` setting: N, or auto (the cores this process may use)."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(value)


def worker_args(argv: list[str], index: int, backend: str | None) -> list[str]:
    """The command line of worker `index`: the supervisor's own settings, one process each."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--workers", "--worker-index"):
            skip = True
            continue
        if a.startswith(("--workers=", "--worker-index=")) or (backend and a == "--embedded"):
            continue
        out.append(a)
    out += ["--workers", "1", "--worker-index", str(index)]
    if backend:  # the supervisor's embedded server: every worker fronts it
        out += ["--no-embedded", "--backend", backend]
    return out


class Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = RESTART_MIN
        self.restarts = 0


def supervise(cfg, argv: list[str]) -> int:
    n = count(cfg.workers)
    embedded = None
    backend = None
    if cfg.mode == "standalone" and not cfg.backend:  # one embedded server for every worker
        embedded = EmbeddedValkey()
        embedded.wait_ready()
        backend = f"127.0.0.1:{embedded.port}"
        logger.info("embedded valkey-server on {}", backend)
    stop = Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    workers = [Worker(i) for i in range(n)]
    gevent.signal_handler(signal.SIGHUP, lambda: _reload(workers))
    code = 0
    try:
        for w in workers:
            _start(w, argv, backend)
        logger.info("vproxy supervisor (pid {}): {} workers on {} ({} mode)", os.getpid(), n, cfg.listen, cfg.mode)
        first = True
        while not stop.is_set():
            for w in workers:
                rc = w.proc.poll() if w.proc is not None else None
                if rc is None:
                    continue
                lived = monotonic() - w.started
                if first and lived < START_GRACE and rc in (1, 2):  # it could not start: neither will the rest
                    logger.error("worker {} could not start (exit code {}): stopping", w.index, rc)
                    code = 1
                    stop.set()
                    break
                if lived > STABLE:
                    w.backoff = RESTART_MIN
                logger.warning("worker {} (pid {}) exited with {}; starting it again in {:g}s", w.index, w.proc.pid,
                               rc, w.backoff)
                w.proc = None
                gevent.spawn_later(w.backoff, _restart, w, argv, backend, stop)
                w.backoff = min(RESTART_MAX, w.backoff * 2)
            if first and all(w.proc is not None and monotonic() - w.started > START_GRACE for w in workers):
                first = False
            stop.wait(0.2)
    finally:
        logger.info("stopping {} workers", n)
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            if w.proc is not None:
                stop_process(w.proc, 10)
        if embedded is not None:
            embedded.stop()
    return code


def _reload(workers: list) -> None:
    """SIGHUP: every worker reloads (each reads the settings again itself: reload.py)."""
    logger.info("reload: passing SIGHUP to {} workers", len(workers))
    for w in workers:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGHUP)


def _start(w: Worker, argv: list[str], backend: str | None) -> None:
    w.proc = subprocess.Popen([sys.executable, "-m", "vproxy", *worker_args(argv, w.index, backend)],
                              preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509 (one thread, gevent)
    w.started = monotonic()


def _restart(w: Worker, argv: list[str], backend: str | None, stop: Event) -> None:
    if stop.is_set():
        return
    w.restarts += 1
    _start(w, argv, backend)
    logger.info("worker {} started again (pid {}, restart {})", w.index, w.proc.pid, w.restarts)
