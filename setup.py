"""Build the optional compiled twins: the RESP parser and framer (vproxy/_resp.pyx), the
per-command statistics (vproxy/_stats.pyx), the plain path (vproxy/_plain.pyx), and the audit log's
recorder and line formatter (vproxy/_audit.pyx, vproxy/_auditfmt.pyx).

Everything else lives in pyproject.toml. Where Cython or a C compiler is missing, or the compile
fails, the build warns and goes on without it: vproxy then runs its pure-Python parser and framer
(`vproxy.resp.IMPL`, `vproxy --version` and INFO proxy say which).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ("_resp", "_stats", "_plain", "_audit", "_auditfmt")  # vproxy/<name>.pyx: the parser and
# framer, the per-command statistics, the plain path's per-request code, the audit log's recorder
# (audit.AuditTrack) and its writer's line formatting
# what Cython makes of them (ignored by git, shipped in sdists)
GENERATED = {name: f"vproxy/{name}.c" for name in MODULES}


def _warn(why) -> None:
    print(f"WARNING: vproxy's compiled parser is not built ({why}); the pure-Python one will run",
          file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning (the extension is an accelerator only)."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - no compiler at all (DistutilsPlatformError and the like)
            _warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - CompileError, LinkError: this extension only
            _warn(e)


def extensions() -> list:
    try:
        from Cython.Build import cythonize
    except ImportError:
        shipped = [Extension(f"vproxy.{n}", [c]) for n, c in GENERATED.items() if os.path.exists(c)]
        if not shipped:  # an sdist ships the generated C: no Cython needed
            _warn("Cython is not installed")
        return shipped
    try:
        return cythonize([Extension(f"vproxy.{n}", [f"vproxy/{n}.pyx"]) for n in MODULES], quiet=True,
                         compiler_directives={"language_level": 3})
    except Exception as e:  # noqa: BLE001 - a Cython error: still install, without the extensions
        _warn(e)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
