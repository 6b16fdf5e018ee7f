"""CRC16 key slot with hash tags: which of the 16384 cluster slots a key belongs to.

Redis Cluster hashes CRC16-CCITT (XMODEM: poly 0x1021, init 0) of the key, or of the text between
the first '{' and the first '}' after it when that text is not empty, modulo 16384.
`binascii.crc_hqx` is that very CRC, computed in C.
"""

from __future__ import annotations

from binascii import crc_hqx

from .twins import twin

SLOTS = 16384


def hash_part(key: bytes) -> bytes:
    """The part of the key that is hashed: the hash tag when there is a non-empty one."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def key_slot(key: bytes) -> int:
    """The cluster slot of a key (hash tags honoured)."""
    if isinstance(key, str):
        key = key.encode()
    return crc_hqx(hash_part(key), 0) & 0x3FFF


# The compiled twin (vproxy/_plain.pyx, where the cluster plain path calls it in C) when it is built, as for the parser (resp.IMPL): same answers
# (tests/test_slots.py compares them), without the slicing and the two calls per key.
pure_key_slot = key_slot
key_slot = getattr(twin("_plain"), "key_slot", pure_key_slot)  # (a build older than key_slot: the pure one)
