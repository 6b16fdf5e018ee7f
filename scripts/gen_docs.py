"""Regenerate docs/configuration.md from the settings declared in vproxy/config.py."""

from pathlib import Path

from vproxy.config import reference_markdown

HEAD = """# Configuration reference

Every setting can be given in a TOML file (`vproxy --config FILE`, or `VPROXY_CONFIG=FILE`), as an
environment variable, or as a command-line flag; later sources win: **TOML < environment < CLI**.
List settings take a TOML array, a comma-separated environment value, or a repeated flag. A bad
value stops vproxy at start-up with a message that names the setting.

This table is generated from `vproxy/config.py` by `python scripts/gen_docs.py`
(a test fails when it is out of date).

"""

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    path.write_text(HEAD + reference_markdown())
    print(f"wrote {path}")
