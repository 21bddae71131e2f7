"""The purge bus with real nodes (``cachegate run`` subprocesses, one with ``--workers 2``) and a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from tests.cluster.nodes import Nodes, admin_json, cluster_view, metrics, purge, wait_until
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess

pytestmark = pytest.mark.slow


async def cached_everywhere(procs: list[ProxyProcess], path: str, tries: int = 40) -> None:
    """``path`` answered HIT by every node (for a node with workers: by each of them)."""
    for proc in procs:
        hits = 0
        for _ in range(tries):
            r = await proc.get(path)
            assert r.status == 200
            hits = hits + 1 if r.x_cache == "HIT" else 0
            if hits >= 4:
                break
        else:
            raise AssertionError(f"{path} is not a hit on {proc.admin_url}")


def versioned(origin: Origin, path: str, **headers: str) -> list[int]:
    """A route whose body names how many times the origin was asked: a stale copy shows."""
    version = [0]

    async def handler(request: web.Request) -> web.Response:
        version[0] += 1
        return web.Response(body=f"v{version[0]}".encode(), headers={"Cache-Control": "max-age=300", **headers})

    origin.route(path, handler)
    return version


async def served_everywhere(procs: list[ProxyProcess], path: str) -> set[bytes]:
    """The bodies every node (each worker of a node with several) serves for ``path``."""
    bodies = set()
    for proc in procs:
        for _ in range(6):
            r = await proc.get(path)
            assert r.status == 200
            bodies.add(r.body)
    return bodies


async def test_a_purge_on_one_node_is_answered_by_every_node_and_served_by_none_afterwards(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    versioned(origin, "/p", **{"Surrogate-Key": "pages"})
    versioned(origin, "/q")
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url)
    try:
        a, b, c = await asyncio.gather(nodes.start("a"), nodes.start("b"), nodes.start("c", "--workers", "2"))
        await cached_everywhere([a, b, c], "/p")
        await cached_everywhere([a, b, c], "/q")
        old_p = await served_everywhere([a, b, c], "/p")
        old_q = await served_everywhere([a, b, c], "/q")
        await wait_until(lambda: _live(a, 3))

        status, answer = await purge(a, tags=["pages"])
        assert status == 200, answer
        assert set(answer["nodes"]) == {"a", "b", "c"} and answer["missing"] == []
        assert all(n["purged"] >= 1 for n in answer["nodes"].values())
        assert answer["purged"] == sum(n["purged"] for n in answer["nodes"].values())
        # No node (no worker of c) serves a copy from before the purge.
        assert not (await served_everywhere([a, b, c], "/p")) & old_p
        # What the purge did not cover stays cached everywhere.
        assert await served_everywhere([a, b, c], "/q") == old_q

        # A purge by URL on c (the node with workers) reaches a and b as well.
        await cached_everywhere([a, b, c], "/p")
        old_p = await served_everywhere([a, b, c], "/p")
        status, answer = await purge(c, urls=[f"http://{HOST}/p"])
        assert status == 200 and set(answer["nodes"]) == {"a", "b", "c"}, answer
        assert not (await served_everywhere([a, b, c], "/p")) & old_p

        async def caught_up() -> bool:
            view = await cluster_view(b)
            return all(n["state"] == "ready" and n["lag"] == 0 for n in view["nodes"])

        await wait_until(caught_up)
        view = await cluster_view(b)
        assert view["node"] == "b" and view["connected"] is True and view["ready"] is True
        assert [n["node"] for n in view["nodes"]] == ["a", "b", "c"]
        assert view["stream_seq"] == 2 and {n["applied_seq"] for n in view["nodes"]} == {2}
        assert view["nodes"][2]["workers"] == 2
        status, health = await admin_json(c, "GET", "/healthz")
        assert status == 200 and health == {"status": "ok", "cluster": "ready"}
        m = await metrics(a)
        assert m[("cachegate_cluster_connected", ())] == 1
        assert m[("cachegate_cluster_bus_total", (("event", "sent"),))] == 1
        assert m[("cachegate_cluster_bus_total", (("event", "applied"),))] == 1
    finally:
        await nodes.stop_all()


async def _live(proc: ProxyProcess, n: int) -> bool:
    view = await cluster_view(proc)
    return sum(1 for node in view["nodes"] if node.get("live")) == n
