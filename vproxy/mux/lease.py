"""A backend connection pinned to one client: why it is pinned, whether its state is still known."""

from __future__ import annotations

from .channel import Channel
from .pool import NodePool


class Lease:
    """Holds one leased channel; release() hands it back clean (reusable) or dirty (closed)."""

    __slots__ = ("pool", "channel", "dirty")

    def __init__(self, pool: NodePool, key: tuple[int, int]):
        self.pool = pool
        self.channel: Channel = pool.lease(key)
        self.dirty = False  # the connection's state is no longer what its key says: close it

    def release(self, clean: bool = True) -> None:
        if self.channel is not None:
            ch, self.channel = self.channel, None
            self.pool.release(ch, clean and not self.dirty)

    def __enter__(self) -> Channel:
        return self.channel

    def __exit__(self, *exc) -> None:
        self.release(clean=exc[0] is None)
