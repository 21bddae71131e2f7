"""Values under the cluster's keys that cachegate never writes there (another program, or another
cluster in the namespace): said in words, throttled, never a crash (in-process nodes)."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path

import pytest

from proxy.cluster import ClusterUnavailable
from proxy.cluster.node import ClusterNode
from proxy.cluster.redis_io import Names, client
from proxy.cluster.settings import ClusterSettings
from proxy.cluster.shared import SharedTier
from proxy.purge import PurgeSpec, PurgeUnavailable
from tests.cluster.nodes import wait_until
from tests.cluster.redis_server import RedisServer


async def nothing(spec: PurgeSpec) -> int:
    return 0


async def answer(value: bool) -> bool:
    return value


def settings(redis: RedisServer, ns: str, **kw: object) -> ClusterSettings:
    return ClusterSettings(redis=redis.url, node="a", namespace=ns, heartbeat=0.2, **kw)  # type: ignore[arg-type]


async def test_a_sequence_number_that_is_not_a_number_is_a_clear_error_logged_once(
        shared_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    r = client(settings(shared_redis, ns), decode=True)
    await r.set(Names(ns).seq, "garbage")
    try:
        node = ClusterNode(settings(shared_redis, ns), nothing, None)
        with pytest.raises(ClusterUnavailable) as info:
            await node.start()
        assert f"{ns}:purges:seq holds 'garbage', not a number" in str(info.value)

        caplog.clear()
        caplog.set_level(logging.INFO, "cachegate.cluster")
        node = ClusterNode(settings(shared_redis, ns, required=False), nothing, None)
        await node.start()  # serves from its local cache, and retries
        try:
            # Each retry starts as catching-up and fails back to disconnected: wait for the
            # state between two retries, not just for the retries to be counted.
            await wait_until(lambda: answer(node.counts["reconnects"] >= 2 and node.state == "disconnected"))
            assert "not a number" in node.reason
            errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
            assert len(errors) == 1 and errors[0].exc_info is None, errors
            assert "purges:seq holds 'garbage', not a number" in errors[0].getMessage()
            await r.delete(Names(ns).seq)  # fixed: the node is ready again, and says so
            await wait_until(lambda: answer(node.state == "ready"))
            assert any("works again" in rec.getMessage() for rec in caplog.records)
        finally:
            await node.close()
    finally:
        await r.aclose()


async def test_a_heartbeat_that_is_not_a_nodes_is_shown_as_unreadable(shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    node = ClusterNode(settings(shared_redis, ns), nothing, None)
    await node.start()
    r = client(settings(shared_redis, ns), decode=True)
    try:
        await r.sadd(Names(ns).members, "ghost", "list")
        await r.set(Names(ns).node("ghost"), "not json", px=5000)
        await r.set(Names(ns).node("list"), "[1, 2]", px=5000)
        view = await node.view()
        by_name = {n["node"]: n for n in view["nodes"]}
        assert by_name["ghost"]["state"] == by_name["list"]["state"] == "unreadable"
        assert by_name["ghost"]["live"] is True and by_name["ghost"]["lag"] is None
        assert "'not json', which no node writes" in by_name["ghost"]["reason"]
        assert by_name["a"]["state"] == "ready"
    finally:
        await r.aclose()
        await node.close()


async def test_a_purge_redis_answers_with_an_error_does_not_blame_reachability(shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = SharedTier(settings(shared_redis, ns))
    node = ClusterNode(settings(shared_redis, ns), nothing, None, shared_purge=tier.purge)
    await node.start()
    try:
        await tier._redis.set(Names(ns).purges, "garbage")  # the purge script's INCR fails
        with pytest.raises(PurgeUnavailable) as info:
            await node.purge(PurgeSpec(all=True))
        message = str(info.value)
        assert f"Redis at {shared_redis.url} answered with an error (" in message, message
        assert "not an integer" in message and "reachable" not in message, message
        assert "nothing was purged on any node" in message
        assert node.connected and node.state == "ready"  # Redis is there: the session goes on
    finally:
        await node.close()
        await tier.close()


async def test_a_damaged_stream_entry_is_skipped_without_purging_everything(
        shared_redis: RedisServer, tmp_path: Path) -> None:
    """An entry whose number is readable but whose purge is not (another program's XADD, a
    truncated write): skipped and counted, and the next purge reaches every node as usual (a node
    following the stream, and one catching up on it), none of which purges its whole cache."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    applied: dict[str, list[PurgeSpec]] = {"a": [], "b": [], "c": []}

    def node(name: str) -> ClusterNode:
        async def local(spec: PurgeSpec) -> int:
            applied[name].append(spec)
            return 1

        os.makedirs(tmp_path / name, exist_ok=True)
        return ClusterNode(ClusterSettings(redis=shared_redis.url, node=name, namespace=ns, heartbeat=0.2,
                                           ack_timeout=3), local, str(tmp_path / name))

    a, b, c = node("a"), node("b"), node("c")
    r = client(settings(shared_redis, ns), decode=True)
    try:
        await asyncio.gather(a.start(), b.start(), c.start())
        assert (await a.purge(PurgeSpec(tags=("t0",)))).complete
        await c.close()  # c misses what follows, and catches up on it
        names = Names(ns)
        await r.eval("local s = redis.call('INCR', KEYS[2]) "
                     "return redis.call('XADD', KEYS[1], '*', 'seq', s, 'node', 'x', 'spec', '{not json')",
                     2, names.stream, names.seq)
        await wait_until(lambda: answer(b.counts["damaged"] == 1))

        outcome = await a.purge(PurgeSpec(urls=("http://h.test/gone",)))
        assert outcome.missing == () and set(outcome.nodes or {}) == {"a", "b"}, outcome
        c = node("c")
        await c.start()
        assert c.counts["damaged"] == 1 and c.saved is not None and c.saved.seq == 3
        for n in (a, b, c):
            assert sum(n.full_purges.values()) == 0, (n.name, n.full_purges)
            assert not any(s.all for s in applied[n.name]), (n.name, applied[n.name])
        assert [s.urls for s in applied["c"]] == [(), ("http://h.test/gone",)]

        # A number taken with no entry (as trimming leaves it): the others cannot know what they
        # missed and purge everything, which covers the purge: they acknowledge it all the same.
        await r.incr(names.seq)
        outcome = await a.purge(PurgeSpec(urls=("http://h.test/next",)))
        assert outcome.missing == () and set(outcome.nodes or {}) == {"a", "b", "c"}, outcome
        assert b.full_purges["trimmed"] == c.full_purges["trimmed"] == 1
    finally:
        await r.aclose()
        for n in (a, b, c):
            await n.close()
