"""Unit tests for the key -> slot function (values checked against CLUSTER KEYSLOT)."""

from vproxy.slots import hash_part, key_slot


def test_known_slots():
    # reference values from the Redis Cluster spec and CLUSTER KEYSLOT
    assert key_slot(b"123456789") == 0x31C3 & 0x3FFF
    assert key_slot(b"foo") == 12182
    assert key_slot(b"bar") == 5061
    assert key_slot(b"") == 0
    assert key_slot("foo") == 12182


def test_hash_tags():
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == key_slot(b"user1000")
    assert hash_part(b"foo{}{bar}") == b"foo{}{bar}"  # empty tag: the whole key
    assert hash_part(b"foo{{bar}}zap") == b"{bar"
    assert hash_part(b"foo{bar}{zap}") == b"bar"
    assert hash_part(b"foo}bar{") == b"foo}bar{"


def test_range():
    assert all(0 <= key_slot(b"k%d" % i) < 16384 for i in range(2000))
