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
from tests.cluster.nodes import wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_dead_connections import Middlebox, answer
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


async def test_healthz_stays_200_while_redis_takes_no_writes(
        tmp_path: Path, origin: Origin, own_redis: RedisServer) -> None:
    """CLIENT PAUSE WRITE (what FAILOVER and failover tools do): Redis answers PING and reads but
    holds every write. Each reconnection attempt said catching-up (503) from its PING until its
    first heartbeat timed out: every node's /healthz was 503 about half the time, all at the same
    moments, and a load balancer had no node left. A node that was ready stays ready until it
    knows of purges to catch up on."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = await node(tmp_path, origin, own_redis, ns, "a")
    try:
        await join(a.runtime, a.runtime.purge_here)
        cluster = a.runtime.cluster
        assert cluster is not None and cluster.ready
        assert own_redis.command("CLIENT", "PAUSE", "4000", "WRITE").startswith(b"+OK")
        loop = asyncio.get_running_loop()
        end = loop.time() + 4.5
        seen: list[tuple[int, object]] = []
        while loop.time() < end:
            r = await a.admin("GET", "/healthz")
            seen.append((r.status, json.loads(r.body)))
            await asyncio.sleep(0.02)
        assert cluster.counts["reconnects"] >= 2  # it was cut off, and retried meanwhile
        assert [s for s in seen if s[0] != 200] == [], len(seen)
        # Said all the same: serving from its cache, Redis unreachable (its writes time out).
        assert any(isinstance(body, dict) and body.get("cluster") == "disconnected"
                   and f"Redis at {own_redis.url} is unreachable" in str(body.get("reason"))
                   for _, body in seen), seen[-1]
        await wait_until(lambda: answer(cluster.state == "ready" and cluster.connected), wait=10)
        outcome = await cluster.purge(PurgeSpec(tags=("t",)))
        assert outcome.complete and outcome.nodes == {"a": 0}
    finally:
        await a.session.close()
        await a.close()


async def test_a_ready_node_back_to_purges_it_missed_is_not_ready_until_it_has_applied_them(
        shared_redis: RedisServer) -> None:
    box = Middlebox(shared_redis.port)
    url = await box.start()
    ns = f"t{uuid.uuid4().hex[:8]}"
    release, started = asyncio.Event(), asyncio.Event()

    async def local(spec: PurgeSpec) -> int:
        return 0

    async def slow(spec: PurgeSpec) -> int:
        started.set()
        await release.wait()
        return 0

    a = ClusterNode(ClusterSettings(shared_redis.url, node="a", namespace=ns, heartbeat=0.2, timeout=0.5,
                                    ack_timeout=0.5), local, None)
    b = ClusterNode(ClusterSettings(url, node="b", namespace=ns, heartbeat=0.2, timeout=0.5), slow, None)
    try:
        await a.start()
        await b.start()
        box.cut()  # b loses Redis: it serves from its own tiers, and says ready
        await wait_until(lambda: answer(b.state == "disconnected"))
        assert b.ready
        await a.purge(PurgeSpec(tags=("t",)))
        box.restore()
        await asyncio.wait_for(started.wait(), 10)  # b is back, and applies what it missed
        assert (b.state, b.reason, b.ready) == ("catching-up", "catching up with the cluster's purge stream",
                                                False)
        release.set()
        await wait_until(lambda: answer(b.state == "ready"))
        assert b.ready and b.connected
    finally:
        release.set()
        await a.close()
        await b.close()
        await box.close()


async def test_the_ready_metric_says_what_get_cluster_and_healthz_say_while_redis_is_away(
        own_redis: RedisServer) -> None:
    """Redis gone after the node was ready: it serves from its tiers, /healthz 200 and GET /cluster
    "ready": true; cachegate_cluster_ready said 0 (it read the state, "disconnected")."""

    async def nothing(spec: PurgeSpec) -> int:
        return 0

    def metric(name: str) -> float:
        return next(s.value for f in n.collect() for s in f.samples if s.name == name)

    n = ClusterNode(ClusterSettings(redis=own_redis.url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}",
                                    heartbeat=0.2, timeout=0.5), nothing, None)
    try:
        await n.start()
        assert metric("cachegate_cluster_ready") == 1.0 and metric("cachegate_cluster_connected") == 1.0
        own_redis.kill()
        await wait_until(lambda: answer(n.state == "disconnected"), wait=10)
        assert n.ready and (await n.view())["ready"] is True
        assert metric("cachegate_cluster_ready") == 1.0
        assert metric("cachegate_cluster_connected") == 0.0  # (what says Redis is away)
    finally:
        await n.close()
