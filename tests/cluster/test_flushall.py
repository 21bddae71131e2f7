"""Redis emptied (FLUSHALL) under nodes that stay connected: they notice the new epoch at the first
purge after it, and record what they apply of the new stream, so neither a later reconnection
nor a restart applies those purges again or purges the whole cache."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.cluster.nodes import Nodes, admin_json, cluster_view, metrics, purge, wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_catch_up import fill, purge_many
from tests.harness import Origin
from tests.storage.procs import ProxyProcess

pytestmark = pytest.mark.slow

PATHS = [f"/k/{i}" for i in range(4)]
LOST = (("reason", "redis-lost-data"),)


def routes(origin: Origin) -> None:
    for path in [*PATHS, "/keep"]:
        origin.route(path, body=path.encode(), headers={"Cache-Control": "max-age=600"})


def epoch(redis: RedisServer, nodes: Nodes) -> str:
    raw = redis.command("GET", f"{nodes.namespace}:epoch")  # b"$32\r\n<hex>\r\n"
    return raw.split(b"\r\n")[1].decode()


async def me(proc: ProxyProcess) -> dict[str, object]:
    view = await cluster_view(proc)
    return next(n for n in view["nodes"] if n["node"] == view["node"])  # type: ignore[no-any-return]


async def reconnected(proc: ProxyProcess) -> bool:
    m = await metrics(proc)
    view = await cluster_view(proc)
    return m[("cachegate_cluster_bus_total", (("event", "reconnects"),))] >= 1 \
        and bool(view["connected"]) and view["state"] == "ready"


async def test_purges_made_after_a_flushall_are_not_applied_again_at_the_next_reconnection(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    routes(origin)
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await purge_many(a, [{"tags": ["before"]}])  # both have applied something of the old epoch
        assert own_redis.command("FLUSHALL").startswith(b"+OK")
        status, answer = await purge(a, all=True)
        assert status == 200, answer
        await purge_many(a, [{"tags": [f"t{i}"]} for i in range(300)])
        new = epoch(own_redis, nodes)

        for proc in (a, b):
            await fill(proc, PATHS)
        fetched = {p: origin.count(p) for p in PATHS}

        statuses: list[int] = []
        watching = True

        async def watch() -> None:  # /healthz of both nodes through the reconnection
            while watching:
                for proc in (a, b):
                    statuses.append((await admin_json(proc, "GET", "/healthz"))[0])
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        try:
            assert own_redis.command("CLIENT", "KILL", "TYPE", "normal").startswith(b":")
            await wait_until(lambda: reconnected(a), wait=10)
            await wait_until(lambda: reconnected(b), wait=10)
        finally:
            watching = False
            await watcher

        for proc in (a, b):
            for path in PATHS:
                r = await proc.get(path)
                assert r.x_cache == "HIT", f"{path} was purged again by the reconnection ({r.x_cache})"
            assert (await metrics(proc))[("cachegate_cluster_full_purges_total", LOST)] == 0
        assert {p: origin.count(p) for p in PATHS} == fetched
        assert set(statuses) == {200}, "a node said it was not ready while it reconnected"
        for proc in (a, b):  # what each applied of the new stream, under its epoch
            info = await me(proc)
            assert (info["epoch"], info["applied_seq"]) == (new, 301), info
    finally:
        await nodes.stop_all()


async def test_a_node_that_applied_every_purge_after_a_flushall_keeps_its_cache_when_it_restarts(
        origin: Origin, tmp_path: Path, own_redis: RedisServer) -> None:
    routes(origin)
    nodes = Nodes(str(tmp_path), origin.url, own_redis.url, timeout="0.5s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await purge_many(a, [{"tags": ["before"]}])
        await fill(b, ["/keep"])
        assert own_redis.command("FLUSHALL").startswith(b"+OK")
        await purge_many(a, [{"tags": [f"t{i}"]} for i in range(3)])  # 200: b applied each

        await b.stop()
        b = await nodes.start("b")
        r = await b.get("/keep")
        assert r.x_cache == "HIT", "b purged its whole cache though it had applied every purge"
        assert (await metrics(b))[("cachegate_cluster_full_purges_total", LOST)] == 0
        info = await me(b)
        assert (info["epoch"], info["applied_seq"]) == (epoch(own_redis, nodes), 3), info
    finally:
        await nodes.stop_all()
