"""The built-in command table: the server's own COMMAND entries, used until the real ones are read.

vproxy reads the backend's `COMMAND` reply before it serves its first client (see app.learn and
startup_wait); this table only answers while it cannot (the backend down at start). It holds what
Valkey reports for every command with keys (so a cluster routes, splits and queues them right) and
for every command vproxy handles by name. Regenerate: `python scripts/gen_commands.py`.
"""

from __future__ import annotations

# arity flags first-key last-key step: names   (flags comma-separated, '-' for none)
TABLE = """
3 write,denyoom,fast 1 1 1: append decrby getset incrby incrbyfloat setnx
-2 noscript,loading,stale,fast,no_auth,allow_busy 0 0 0: auth
-2 readonly 1 1 1: bitcount clusterscan geohash geopos hrandfield srandmember zrandmember
-2 write,denyoom 1 1 1: bitfield
-2 readonly,fast 1 1 1: bitfield_ro
-4 write,denyoom 2 -1 1: bitop
-3 readonly 1 1 1: bitpos hscan lpos sscan xpending zscan
6 write,denyoom,blocking 1 2 1: blmove
-5 write,blocking,movablekeys 0 0 0: blmpop bzmpop
-3 write,blocking 1 -2 1: blpop brpop
4 write,denyoom,blocking 1 2 1: brpoplpush
-3 write,blocking,fast 1 -2 1: bzpopmax bzpopmin
-2 - 0 0 0: client cluster config function memory object script slowlog xgroup xinfo
-3 write,denyoom 1 2 1: copy
1 readonly,fast 0 0 0: dbsize
-2 admin,noscript,loading,stale 0 0 0: debug
2 write,denyoom,fast 1 1 1: decr incr
-2 write 1 -1 1: del
3 write,fast 1 1 1: delifeq move
1 noscript,loading,stale,fast,allow_busy 0 0 0: discard unwatch
2 readonly 1 1 1: dump hgetall hkeys hvals smembers
2 loading,stale,fast 0 0 0: echo
-3 noscript,stale,skip_monitor,no_mandatory_keys,movablekeys 0 0 0: eval evalsha fcall
-3 readonly,noscript,stale,skip_monitor,no_mandatory_keys,movablekeys 0 0 0: eval_ro evalsha_ro fcall_ro
1 noscript,loading,stale,skip_commandlog 0 0 0: exec
-2 readonly,fast 1 -1 1: exists mget touch
-3 write,fast 1 1 1: expire expireat hdel pexpire pexpireat srem xdel zrem
2 readonly,fast 1 1 1: expiretime get hlen llen pexpiretime pttl scard strlen ttl type xlen zcard
-1 write 0 0 0: flushall flushdb
-5 write,denyoom 1 1 1: geoadd
-4 readonly 1 1 1: geodist xrange xrevrange zrange zrangebylex zrangebyscore zrevrange zrevrangebylex zrevrangebyscore
-6 write,denyoom,movablekeys 1 1 1: georadius
-6 readonly 1 1 1: georadius_ro
-5 write,denyoom,movablekeys 1 1 1: georadiusbymember
-5 readonly 1 1 1: georadiusbymember_ro
-7 readonly 1 1 1: geosearch
-8 write,denyoom 1 2 1: geosearchstore
3 readonly,fast 1 1 1: getbit hexists hget hstrlen sismember zscore
2 write,fast 1 1 1: getdel persist
-2 write,fast 1 1 1: getex lpop rpop spop zpopmax zpopmin
4 readonly 1 1 1: getrange lrange substr
-1 noscript,loading,stale,fast,no_auth,allow_busy 0 0 0: hello quit
-6 write,fast 1 1 1: hexpire hexpireat hpexpire hpexpireat xautoclaim xclaim
-5 readonly,fast 1 1 1: hexpiretime hpexpiretime hpttl httl
-5 write,fast 1 1 1: hgetdel hgetex hpersist
4 write,denyoom,fast 1 1 1: hincrby hincrbyfloat hsetnx zincrby
-3 readonly,fast 1 1 1: hmget smismember zmscore zrank zrevrank
-4 write,denyoom,fast 1 1 1: hmset hset zadd
-6 write,denyoom,fast 1 1 1: hsetex
-1 loading,stale 0 0 0: info
2 readonly 0 0 0: keys
-3 readonly 1 2 1: lcs
3 readonly 1 1 1: lindex
5 write,denyoom 1 1 1: linsert
5 write,denyoom 1 2 1: lmove
-4 write,movablekeys 0 0 0: lmpop zmpop
-3 write,denyoom,fast 1 1 1: lpush lpushx rpush rpushx sadd xsetid
4 write 1 1 1: lrem ltrim zremrangebylex zremrangebyrank zremrangebyscore
4 write,denyoom 1 1 1: lset psetex setbit setex setrange
-6 write,movablekeys 3 3 1: migrate
1 admin,noscript,loading,stale 0 0 0: monitor
-3 write,denyoom 1 -1 2: mset msetnx
-4 write,denyoom,movablekeys 0 0 0: msetex
1 noscript,loading,stale,fast,no_multi,allow_busy 0 0 0: multi
-2 write,denyoom,fast 1 1 1: pfadd
-2 readonly 1 -1 1: pfcount sdiff sinter sunion
3 write,denyoom,admin 2 2 1: pfdebug
-2 write,denyoom 1 -1 1: pfmerge
-1 fast 0 0 0: ping
-2 pubsub,noscript,loading,stale 0 0 0: psubscribe subscribe
-3 admin,noscript,no_async_loading,no_multi 0 0 0: psync
-1 pubsub,noscript,loading,stale 0 0 0: punsubscribe unsubscribe
1 readonly 0 0 0: randomkey
1 loading,stale,fast 0 0 0: readonly readwrite
3 write 1 2 1: rename
3 write,fast 1 2 1: renamenx
-1 admin,noscript,loading,stale,allow_busy 0 0 0: replconf
1 noscript,loading,stale,fast,no_auth,allow_busy 0 0 0: reset
-4 write,denyoom 1 1 1: restore
-4 write,denyoom,asking 1 1 1: restore-asking
3 write,denyoom 1 2 1: rpoplpush
-2 readonly 0 0 0: scan
-3 write,denyoom 1 -1 1: sdiffstore sinterstore sunionstore
2 loading,stale,fast,allow_busy 0 0 0: select
-3 write,denyoom 1 1 1: set
-1 admin,noscript,loading,stale,no_multi,allow_busy 0 0 0: shutdown
-3 readonly,movablekeys 0 0 0: sintercard zdiff zinter zintercard zunion
4 write,fast 1 2 1: smove
-2 write,denyoom,movablekeys 1 1 1: sort
-2 readonly,movablekeys 1 1 1: sort_ro
3 pubsub,loading,stale,fast 1 1 1: spublish
-2 pubsub,noscript,loading,stale 1 -1 1: ssubscribe
-1 pubsub,noscript,loading,stale 1 -1 1: sunsubscribe
3 write,fast 0 0 0: swapdb
1 admin,noscript,no_async_loading,no_multi 0 0 0: sync
-2 write,fast 1 -1 1: unlink
3 blocking 0 0 0: wait
4 blocking 0 0 0: waitaof
-2 noscript,loading,stale,fast,no_multi,allow_busy 1 -1 1: watch
-4 write,fast 1 1 1: xack
-5 write,denyoom,fast 1 1 1: xadd
-4 readonly,blocking,movablekeys 0 0 0: xread
-7 write,blocking,movablekeys 0 0 0: xreadgroup
-4 write 1 1 1: xtrim
4 readonly,fast 1 1 1: zcount zlexcount
-4 write,denyoom,movablekeys 1 1 1: zdiffstore zinterstore zunionstore
-5 write,denyoom 1 2 1: zrangestore
"""


def entries():
    """(name, arity, flags, first, last, step) for every command in TABLE."""
    for line in TABLE.strip().splitlines():
        spec, names = line.split(": ")
        arity, flags, first, last, step = spec.split()
        fl = frozenset() if flags == "-" else frozenset(flags.split(","))
        for name in names.split():
            yield name, int(arity), fl, int(first), int(last), int(step)

