"""Command line: load settings, set up logging and signals, run until told to stop."""

from __future__ import annotations

import signal
import sys

import gevent
from gevent.event import Event
from loguru import logger

from .config import load
from .errors import ConfigError, StartError


def _dump_greenlets() -> None:
    """SIGUSR1: log every greenlet's stack and every backend channel with requests in flight, and
    every reply batch still waiting (what is each client waiting for, and who owes the reply?)."""
    import gc

    from gevent.util import format_run_info

    from .mux.channel import Batch, Channel
    from .outbox import Outbox

    lines = []
    owed: dict = {}
    for obj in gc.get_objects():
        if isinstance(obj, Channel) and (obj.waiters or not obj.closed):
            reader = obj.reader
            reading = "-" if reader is None else ("dead" if reader.dead else "live") \
                if isinstance(reader, gevent.Greenlet) else ("watching" if reader.active else "stopped")
            lines.append(f"{obj!r} closed={obj.closed} ready={obj.ready} sink={obj.sink is not None} "
                         f"flushing={obj.flushing} reader={reading} queued={len(obj.outbuf)} "
                         f"unsent-requests={obj.unsent} framer-buffered={len(obj.conn.framer.buf)} "
                         f"laddr={obj.conn.sock.getsockname() if obj.conn.sock else None}")
            for batch, idx, *_ in obj.waiters:
                if batch is not None:
                    owed[id(batch)] = owed.get(id(batch), 0) + 1
    for obj in gc.get_objects():
        if isinstance(obj, Outbox) and (obj.left or obj.out):
            lines.append(f"outbox {id(obj):#x} in-flight={obj.left} unwritten={len(obj.out)} "
                         f"waiting={obj.waiter is not None} closed={obj.closed}")
        if isinstance(obj, Batch) and obj.left:
            lines.append(f"batch {id(obj):#x} left={obj.left} owed-by-channels={owed.get(id(obj), 0)} "
                         f"size={len(obj.replies)} waiting={obj._waiter is not None}")
    logger.warning("greenlet dump (SIGUSR1):\n{}\nchannels and batches:\n{}",
                   "\n".join(format_run_info()), "\n".join(lines))


def version_text() -> str:
    """`vproxy --version`: the release, and which RESP parser runs (the compiled twin or pure Python)."""
    from . import __version__, cmdstats, outbox, resp

    return f"vproxy {__version__} (parser: {resp.IMPL}, statistics: {cmdstats.IMPL}, plain path: {outbox.IMPL})"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["top"]:  # vproxy top [HOST:PORT]: the live view (top.py)
        from .top import main as top_main
        return top_main(args[1:])
    if args[:1] == ["audit"]:  # `vproxy audit ...`: query the audit log (docs/audit.md)
        from .auditquery import main as audit_main
        return audit_main(args[1:])
    if "--version" in args:
        print(version_text())
        return 0
    try:
        cfg = load(argv)
    except ConfigError as e:
        print(f"vproxy: {e}", file=sys.stderr)
        return 2
    logger.remove()
    logger.add(sys.stderr, level=cfg.log_level, serialize=cfg.log_format == "json")
    if cfg.worker_index < 0 and cfg.workers != "1":
        from .workers import count, supervise
        if count(cfg.workers) > 1:
            return supervise(cfg, list(args))
    from .app import App  # after monkey patching (see __main__)

    try:
        app = App(cfg)
    except (StartError, ConfigError) as e:  # says what and why already (ConfigError: a TLS file)
        logger.error("{}", e)
        return 1
    except (OSError, RuntimeError, TimeoutError) as e:
        logger.error("cannot start: {}", e)
        return 1
    stop = Event()
    # Signals only queue work: the handler sets an event, the main greenlet does the shutdown.
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    gevent.signal_handler(signal.SIGUSR1, lambda: gevent.spawn(_dump_greenlets))
    app.argv = list(args)  # what a reload reads again (reload.py; TLS certificates too)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(app.reload))
    app.start()
    stop.wait()
    logger.info("shutting down")
    app.stop()
    return 0
