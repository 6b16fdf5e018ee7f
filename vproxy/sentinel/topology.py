"""An immutable snapshot of what is behind the proxy; replaced whole, never patched in place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    mode: str
    primary: tuple[str, int] | None
    replicas: tuple[tuple[str, int], ...] = ()
    version: int = 0
