"""Which nodes a purge waits for when Redis drops keys under memory pressure (in-process nodes on a
real Redis): a volatile-* maxmemory policy may evict a heartbeat key (it has a TTL), but not the
liveness ZSET (it has none)."""

from __future__ import annotations

import asyncio
import uuid

from proxy.cluster.node import ClusterNode
from proxy.cluster.redis_io import Names, client
from proxy.cluster.settings import ClusterSettings
from proxy.purge import PurgeSpec
from tests.cluster.redis_server import RedisServer


async def test_a_node_whose_heartbeat_key_was_evicted_is_still_waited_for(shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    go = asyncio.Event()

    async def quick(spec: PurgeSpec) -> int:
        return 1

    async def slow(spec: PurgeSpec) -> int:  # b takes its time to apply: a purge must wait for it
        await go.wait()
        return 1

    # b beats every 5 s: its key stays deleted (as evicted) for the whole test.
    a = ClusterNode(ClusterSettings(redis=shared_redis.url, node="a", namespace=ns, heartbeat=0.2,
                                    ack_timeout=1), quick, None)
    b = ClusterNode(ClusterSettings(redis=shared_redis.url, node="b", namespace=ns, heartbeat=5), slow, None)
    r = client(a.settings, decode=True)
    try:
        await a.start()
        await b.start()
        assert a._redis is not None
        assert await a._live_nodes(a._redis) == ["a", "b"]
        await r.delete(Names(ns).node("b"))  # what Redis's eviction does to it
        assert await a._live_nodes(a._redis) == ["a", "b"]
        outcome = await a.purge(PurgeSpec(urls=("http://h.test/p",)))
        assert outcome.missing == ("b",), outcome  # not 200 without b
        go.set()

        await b.close()  # a node that leaves is not waited for
        assert await a._live_nodes(a._redis) == ["a"]
        outcome = await a.purge(PurgeSpec(urls=("http://h.test/p",)))
        assert outcome.complete and set(outcome.nodes or {}) == {"a"}, outcome
    finally:
        go.set()
        await r.aclose()
        await a.close()
        await b.close()
