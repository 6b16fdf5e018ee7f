"""A stock client sees the proxy as the server: commands, replies, pipelines, RESP2 and RESP3."""

import redis


def test_set_get_and_types(r):
    assert r.set("k", "v") is True
    assert r.get("k") == b"v"
    assert r.incr("n") == 1
    assert r.get("missing") is None
    r.rpush("l", 1, 2, 3)
    assert r.lrange("l", 0, -1) == [b"1", b"2", b"3"]
    r.hset("h", mapping={"a": "1", "b": "2"})
    assert r.hgetall("h") == {b"a": b"1", b"b": b"2"}


def test_resp3_types_survive(proxy, server):
    server.client().flushall()
    c = proxy.client(protocol=3)
    c.hset("h", mapping={"a": "1"})
    assert c.hgetall("h") == {b"a": b"1"}  # a RESP3 map, not a flat list
    c.sadd("s", "x")
    assert c.smembers("s") == {b"x"}
    c.zadd("z", {"m": 1.5})
    assert c.zscore("z", "m") == 1.5  # a RESP3 double


def test_pipeline_keeps_order(r):
    p = r.pipeline(transaction=False)
    for i in range(200):
        p.set(f"k{i}", i)
        p.get(f"k{i}")
    out = p.execute()
    assert out[1::2] == [str(i).encode() for i in range(200)]


def test_unknown_command_is_an_error_not_a_disconnect(r):
    try:
        r.execute_command("NOSUCHCOMMAND", "x")
        raise AssertionError("expected an error")
    except redis.ResponseError as e:
        assert "unknown command" in str(e)
    assert r.ping() is True


def test_wrong_arity(r):
    try:
        r.execute_command("MGET")
        raise AssertionError("expected an error")
    except redis.ResponseError as e:
        assert "wrong number of arguments" in str(e)
    assert r.ping() is True
