"""Which implementation runs: a compiled twin (vproxy/_*.pyx, built by `pip install` where Cython and
a C compiler exist) or the pure-Python reference it mirrors.

Each module that has a twin asks here once, at import: twin("_resp") is the compiled module, or
None when it is not built or VPROXY_PURE=1 (tests run both ways; `vproxy --version` and INFO proxy
say which runs).
"""

from __future__ import annotations

import importlib
import os


def pure() -> bool:
    """VPROXY_PURE=1: the pure-Python references run, built twins or not."""
    return os.environ.get("VPROXY_PURE") == "1"


def twin(name: str):
    """The compiled module vproxy.<name>, or None (not built, or pure())."""
    if pure():
        return None
    try:
        return importlib.import_module(f"vproxy.{name}")
    except ImportError:  # not built (no compiler or no Cython at install time)
        return None
