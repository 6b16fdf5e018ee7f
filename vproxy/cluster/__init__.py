"""Cluster mode: a client session routed by key slot across a Redis/Valkey Cluster's nodes.

    session.py       ClusterSession: dispatch, key slots -> node channels, the plain path's cluster twin
    redirects.py     what a node answers: MOVED/ASK/TRYAGAIN followed, retries, split requests merged
    shard_pubsub.py  a subscribed stream's other-node connections: shard channels (SSUBSCRIBE), MONITOR
    resubscribe.py   shard channels a node dropped (slot moved, node lost), subscribed again
    keyless.py       keyless and server commands: fan-out and merge (INFO too), SCAN, CLUSTER as one node
    multikey.py      cross-slot MGET/MSET/DEL ...: split per slot, merged in the client's order
    setops.py        set and sorted-set algebra across slots, computed in vproxy
    transaction.py   MULTI/EXEC/WATCH bound to the slot of the first key
    namespaces.py    SELECT: native cluster databases or emulated by key prefix

The package imports the layers below it (client, local, mux, commands ...); nothing below imports it
(app.py picks ClusterSession in cluster mode). docs/cluster.md tells the behaviour.
"""
