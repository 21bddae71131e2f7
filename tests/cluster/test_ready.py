"""A node reports ready only once it has caught up with the purges it missed (in-process nodes)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from proxy.cluster import join
from proxy.cluster.node import ClusterNode
from proxy.cluster.settings import ClusterSettings
from proxy.purge import PurgeSpec
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin, Proxy, start_proxy


async def node(tmp_path: Path, origin: Origin, redis: RedisServer, ns: str, name: str) -> Proxy:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    cluster = {"redis": redis.url, "node": name, "namespace": ns, "heartbeat": "0.2s", "ack_timeout": "0.5s"}
    return await start_proxy(str(d), origin.url, f"cluster: {json.dumps(cluster)}\n")


async def test_healthz_says_not_ready_with_the_reason_until_the_missed_purges_are_applied(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = await node(tmp_path, origin, shared_redis, ns, "a")
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    b2 = None
    try:
        await join(a.runtime, a.runtime.purge_here)
        await join(b.runtime, b.runtime.purge_here)
        await b.session.close()
        await b.close()  # b stops (it leaves the cluster at once)
        for i in range(3):
            outcome = await a.runtime.cluster.purge(PurgeSpec(tags=(f"t{i}",)))
            assert outcome.nodes == {"a": 0} and outcome.complete

        b2 = await node(tmp_path, origin, shared_redis, ns, "b")
        release, started = asyncio.Event(), asyncio.Event()
        applied: list[PurgeSpec] = []

        async def slow_purge(spec: PurgeSpec) -> int:
            applied.append(spec)
            started.set()
            await release.wait()
            return 0

        joining = asyncio.ensure_future(join(b2.runtime, slow_purge))
        await asyncio.wait_for(started.wait(), 10)
        r = await b2.admin("GET", "/healthz")
        assert r.status == 503
        assert json.loads(r.body) == {"status": "not ready", "cluster": "catching-up",
                                      "reason": "catching up with the cluster's purge stream"}
        release.set()
        await joining
        r = await b2.admin("GET", "/healthz")
        assert (r.status, json.loads(r.body)) == (200, {"status": "ok", "cluster": "ready"})
        # The three purges it missed were applied as one (tags are bans: cheap).
        assert [s.tags for s in applied] == [("t0", "t1", "t2")]
    finally:
        for p in (a, b2):
            if p is not None:
                await p.session.close()
                await p.close()


async def test_a_purge_that_a_live_node_does_not_acknowledge_in_time_answers_202_naming_it(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = await node(tmp_path, origin, shared_redis, ns, "a")
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    stuck = asyncio.Event()

    async def slow_purge(spec: PurgeSpec) -> int:
        await stuck.wait()  # b is alive (its heartbeat goes on) but cannot finish purging
        return 0

    try:
        await join(a.runtime, a.runtime.purge_here)
        a.runtime.purge_fn = a.runtime.cluster.purge
        await join(b.runtime, slow_purge)
        await a.get("/", headers={"Host": "site.test"})  # a has seen the host
        r = await a.admin("POST", "/purge", json={"urls": ["http://site.test/x"]})
        assert r.status == 202
        assert json.loads(r.body) == {"purged": 0, "nodes": {"a": {"purged": 0}}, "missing": ["b"],
                                      "soft": False}
        metrics = (await a.admin("GET", "/metrics")).body.decode()
        assert 'cachegate_cluster_bus_total{event="incomplete"} 1.0' in metrics
    finally:
        stuck.set()
        for p in (a, b):
            await p.session.close()
            await p.close()


async def test_a_lapse_noticed_on_the_hit_path_is_caught_up_even_when_a_heartbeat_lands_after_it(
        tmp_path: Path, shared_redis: RedisServer) -> None:
    """Resumed after a stop, the first request sees the heartbeat's deadline passed; a heartbeat
    sent just before the stop then answers with a new deadline. Hits wait until the node has
    reconnected and caught up, not for good."""
    settings = ClusterSettings(shared_redis.url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}",
                               heartbeat=0.2, timeout=0.5)

    async def local(spec: PurgeSpec) -> int:
        return 0

    n = ClusterNode(settings, local, str(tmp_path))
    await n.start()
    try:
        assert not n.hits_held()
        n._beat_deadline = time.monotonic() - 0.01  # as if stopped past it
        assert n.hits_held() and not n.ready
        n._beat_deadline = time.monotonic() + 60  # the heartbeat under way when it stopped lands
        await asyncio.wait_for(n.caught_up(), 3)
        assert not n.hits_held() and n.ready and n.counts["reconnects"] == 1
    finally:
        await n.close()
