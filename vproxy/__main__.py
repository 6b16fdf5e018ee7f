"""`python -m vproxy`: patch the standard library for gevent first, then run the CLI."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from vproxy.cli import main  # noqa: E402


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
