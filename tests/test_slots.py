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


def test_compiled_twin_agrees():
    """The compiled key_slot (vproxy/_plain.pyx) gives the pure one's slot for every key shape."""
    import random

    import pytest

    from vproxy import slots
    try:
        from vproxy._plain import key_slot as compiled
    except ImportError:
        pytest.skip("the compiled twin vproxy/_plain.pyx is not built")
    rng = random.Random(7)
    keys = [b"", b"{", b"}", b"{}", b"{}x", b"x{}", b"{a}", b"a{b}c{d}", b"{{a}}", b"}{a}", b"\x00{\xff}",
            "straße", bytearray(b"foo"), memoryview(b"{tag}x")]
    alphabet = b"{}ab\x00\xff"
    keys += [bytes(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(5000)]
    for k in keys:
        assert compiled(k) == slots.pure_key_slot(bytes(k) if not isinstance(k, str) else k), k
