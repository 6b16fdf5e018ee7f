"""Reload: SIGHUP (or PROXY RELOAD) reads the settings again (file, environment, the same command line).

Settings marked reloadable (docs/configuration.md, column "reload") change at once: vproxy reads
them where it uses them (timeouts, pool sizes, limits, passwords for new connections ...), and the
few kept elsewhere are updated here (log level and format, the slow log, statistics). Any other
setting that changed is reported as needing a restart and left as it is. A file that does not load
(a syntax error, a bad value) changes nothing. Passwords are never written to the log.
"""

from __future__ import annotations

import sys
from collections import deque

from loguru import logger

from .config import SETTINGS, load
from .errors import ConfigError

_SECRET = ("password", "users")


def reload(app) -> dict:
    """Apply the settings as they load now; returns {"changed": [...], "restart": [...]} or {"error": why}."""
    try:
        new = load(app.argv)
    except ConfigError as e:
        logger.error("reload: {}; nothing changed", e)
        return {"error": str(e)}
    cfg = app.cfg
    changed, restart = [], []
    for s in SETTINGS:
        old, value = cfg.values[s.name], new.values[s.name]
        if old == value:
            continue
        if not s.reloadable:
            restart.append(s.name)
            continue
        cfg.values[s.name] = value
        setattr(cfg, s.name, value)
        shown = "(changed)" if any(w in s.name for w in _SECRET) else f"{old} -> {value}"
        changed.append(f"{s.name} {shown}")
    _apply(app, {c.split(" ", 1)[0] for c in changed})
    app.reload_tls()  # the certificate files, renewed in place or not: read again every time
    if changed or restart:
        logger.info("reload: {}{}", "; ".join(changed) or "nothing changed live",
                    f"; needs a restart to change: {', '.join(restart)}" if restart else "")
    else:
        logger.info("reload: no setting changed")
    return {"changed": changed, "restart": restart}


def _apply(app, names: set) -> None:
    """The settings vproxy keeps outside cfg: set them from cfg again."""
    cfg, stats = app.cfg, app.cmdstats
    if names & {"log_level", "log_format"}:
        logger.remove()
        logger.add(sys.stderr, level=cfg.log_level, serialize=cfg.log_format == "json")
    if "stats" in names:
        stats.enabled = cfg.stats  # sessions that connect from now on (and every batch-path request)
    if "latency_tracking_info_percentiles" in names:
        stats.percentiles = tuple(float(p) for p in cfg.latency_tracking_info_percentiles.split())
    if "slowlog_log_slower_than" in names:
        us = cfg.slowlog_log_slower_than
        stats.slow_s = us / 1e6 if us >= 0 else None
    if "slowlog_max_len" in names:
        stats.slowlog.entries = deque(stats.slowlog.entries, maxlen=cfg.slowlog_max_len)
    if names & {"users", "password", "fleet_password"}:
        app.set_gate()
    if "hotkeys_sample" in names:
        stats.keys.sample = cfg.hotkeys_sample  # sessions that connect from now on
