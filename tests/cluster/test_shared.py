"""``shared_cache: true``: Redis as a shared tier behind every node, and one origin request per
herd however it is spread over the nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from tests.cluster.nodes import Nodes, metrics, purge
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin

pytestmark = pytest.mark.slow


async def test_a_herd_over_three_nodes_costs_one_origin_request_and_fills_are_shared(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    calls = {"n": 0}

    async def slow(request: web.Request) -> web.Response:
        calls["n"] += 1
        await asyncio.sleep(0.3)
        return web.Response(body=b"herd-body", headers={"Cache-Control": "max-age=300"})

    origin.route("/herd", slow)
    origin.route("/s", body=b"shared", headers={"Cache-Control": "max-age=300", "Surrogate-Key": "s"})
    origin.route("/priv", body=b"mine", headers={"Cache-Control": "private, max-age=300"})
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, shared_cache=True)
    try:
        a, b, c = await asyncio.gather(nodes.start("a"), nodes.start("b"), nodes.start("c", "--workers", "2"))
        replies = await asyncio.gather(*(p.get("/herd") for _ in range(20) for p in (a, b, c)))
        assert {(r.status, r.body) for r in replies} == {(200, b"herd-body")}
        assert calls["n"] == 1

        # A fill on a is found by b and c in the shared tier, with its age kept.
        assert (await a.get("/s")).x_cache == "MISS"
        await asyncio.sleep(1.1)
        for proc in (b, c):
            r = await proc.get("/s")
            assert (r.status, r.body, r.x_cache) == (200, b"shared", "HIT")
            assert int(r.headers["Age"]) >= 1
        assert origin.count("/s") == 1

        # A purge removes it from the shared tier too.
        status, answer = await purge(a, tags=["s"])
        assert status == 200, answer
        r = await b.get("/s")
        assert r.x_cache == "MISS" and origin.count("/s") == 2

        # What may not be shared never reaches the shared tier.
        await a.get("/priv")
        assert (await b.get("/priv")).x_cache == "MISS"
        assert origin.count("/priv") == 2

        counts = [await metrics(p) for p in (a, b, c)]
        assert sum(m[("cachegate_cluster_shared_total", (("event", "hit"),))] for m in counts) >= 4
        assert sum(m[("cachegate_cluster_shared_total", (("event", "written"),))] for m in counts) == 3
    finally:
        await nodes.stop_all()
