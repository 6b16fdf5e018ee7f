"""Command line: load settings, set up logging and signals, run until told to stop."""

from __future__ import annotations

import signal
import sys

import gevent
from gevent.event import Event
from loguru import logger

from .config import load
from .errors import ConfigError


def _dump_greenlets() -> None:
    """SIGUSR1: log every greenlet's stack (what is each client waiting for?)."""
    from gevent.util import format_run_info

    logger.warning("greenlet dump (SIGUSR1):\n{}", "\n".join(format_run_info()))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load(argv)
    except ConfigError as e:
        print(f"vproxy: {e}", file=sys.stderr)
        return 2
    logger.remove()
    logger.add(sys.stderr, level=cfg.log_level)
    from .app import App  # after monkey patching (see __main__)

    try:
        app = App(cfg)
    except (OSError, RuntimeError, TimeoutError) as e:
        logger.error("cannot start: {}", e)
        return 1
    stop = Event()
    # Signals only queue work: the handler sets an event, the main greenlet does the shutdown.
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    gevent.signal_handler(signal.SIGUSR1, lambda: gevent.spawn(_dump_greenlets))
    app.start()
    stop.wait()
    logger.info("shutting down")
    app.stop()
    return 0
