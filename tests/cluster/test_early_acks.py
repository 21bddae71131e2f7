"""Acknowledgements that come before this node's own append has its answer (a slower link to
Redis than the other nodes'): kept only while an append of this node is in flight, so the
acknowledgements of the other nodes' purges never fill the buffer (in-process nodes on a real
Redis, one behind a TCP proxy that holds the answer to its append)."""

from __future__ import annotations

import json
import uuid

import redis.asyncio as aioredis

from proxy.cluster.node import EARLY_ACKS_MAX, ClusterNode
from proxy.cluster.redis_io import Names
from proxy.cluster.settings import ClusterSettings
from proxy.purge import PurgeSpec
from tests.cluster.nodes import wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_purge_answers import LateReplies


async def one(spec: PurgeSpec) -> int:
    return 1


async def test_acknowledgements_of_other_nodes_purges_never_crowd_out_this_nodes_own(
        shared_redis: RedisServer) -> None:
    """More acknowledgements than the buffer holds, of purges made elsewhere, then a purge made
    here whose append's answer comes after b's acknowledgement: 200, b not named missing. The
    buffer kept every acknowledgement it was handed, for good, and dropped those past its
    10,000th: such a purge then waited ack_timeout and answered 202 naming b, which applied it."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    link = LateReplies(shared_redis.port)
    late_url = await link.start()
    # (timeout 5 s: the pong of the listener's PING comes after the flood, read on a busy machine)
    a = ClusterNode(ClusterSettings(redis=late_url, node="a", namespace=ns, heartbeat=0.2, timeout=5.0,
                                    ack_timeout=3.0), one, None)
    b = ClusterNode(ClusterSettings(redis=shared_redis.url, node="b", namespace=ns, heartbeat=0.2), one, None)
    r = aioredis.Redis.from_url(shared_redis.url)
    try:
        await a.start()
        await b.start()
        # What b publishes for purges made by a third node, c: a reads each one.
        channel = Names(ns).acks
        async with r.pipeline(transaction=False) as pipe:
            for i in range(EARLY_ACKS_MAX + 100):
                pipe.publish(channel, json.dumps({"id": f"{i + 1}-0", "node": "b", "n": 1}))
            await pipe.execute()
        # (Messages of a channel come in order: once this one is read, all of them were.)
        malformed = a.counts["malformed_acks"]
        await r.publish(channel, "the end")
        await wait_until(lambda: _true(a.counts["malformed_acks"] > malformed), wait=20)

        link.hold = 0.5  # b reads the entry, applies and acknowledges it before a has the answer
        outcome = await a.purge(PurgeSpec(tags=("t",)))
        link.hold = 0.0
        assert outcome.missing == (), outcome
        assert set(outcome.nodes or ()) == {"a", "b"}, outcome
        assert not a._early  # nothing kept once no append of a is in flight
    finally:
        await a.close()
        await b.close()
        await r.aclose()
        await link.close()


async def _true(value: bool) -> bool:
    return value
