"""Catching up: a node stopped during purges applies them before it serves; a trimmed stream
makes it purge its whole local cache (it cannot know what it missed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.cluster.nodes import Nodes, admin_json, cluster_view, metrics, wait_until
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess

pytestmark = pytest.mark.slow

OBJECTS = 40


async def fill(proc: ProxyProcess, paths: list[str]) -> None:
    for path in paths:
        assert (await proc.get(path)).status == 200
    for path in paths:  # on disk by now: a restarted node finds it there
        await wait_until(lambda p=path: _hit(proc, p))


async def _hit(proc: ProxyProcess, path: str) -> bool:
    return (await proc.get(path)).x_cache == "HIT"


async def purge_many(proc: ProxyProcess, specs: list[dict[str, object]]) -> None:
    """Many purges, a few at a time, each acknowledged by every live node."""
    async with aiohttp.ClientSession() as session:
        async def one(spec: dict[str, object]) -> None:
            async with session.post(proc.admin_url + "/purge", json=spec) as r:
                assert r.status == 200, await r.text()

        for i in range(0, len(specs), 8):
            await asyncio.gather(*(one(s) for s in specs[i:i + 8]))


async def gone_from_cluster(proc: ProxyProcess, name: str) -> bool:
    view = await cluster_view(proc)
    return all(n["node"] != name or not n["live"] for n in view["nodes"])


def routes(origin: Origin) -> None:
    for i in range(OBJECTS):
        origin.route(f"/k/{i}", body=f"k{i}".encode(), headers={"Cache-Control": "max-age=600"})
    origin.route("/keep", body=b"keep", headers={"Cache-Control": "max-age=600"})


async def test_a_node_stopped_during_1000_purges_serves_none_of_them_once_it_reports_ready(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    routes(origin)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await a.get("/keep")  # a has seen the host: its admin API takes URLs of it
        paths = [f"/k/{i}" for i in range(OBJECTS)]
        await fill(b, [*paths, "/keep"])
        await b.stop()
        await wait_until(lambda: gone_from_cluster(a, "b"))

        # 1,000 purges while b is away: by URL (every cached object among them), by tag, by prefix.
        specs: list[dict[str, object]] = [{"urls": [f"http://{HOST}/k/{i % OBJECTS}"]} for i in range(900)]
        specs += [{"tags": [f"t{i}"]} for i in range(90)]
        specs += [{"prefixes": [f"http://{HOST}/none/{i}/"]} for i in range(10)]
        await purge_many(a, specs)

        b = await nodes.start("b")
        status, health = await admin_json(b, "GET", "/healthz")
        assert status == 200 and health["status"] == "ok"
        before = {p: origin.count(p) for p in paths}
        for path in paths:
            r = await b.get(path)
            assert r.x_cache == "MISS", f"{path} was purged while b was stopped, yet b served it"
        assert all(origin.count(p) == before[p] + 1 for p in paths)
        # Catching up was not a purge of everything: what no purge covered is still there.
        assert (await b.get("/keep")).x_cache == "HIT"
        view = await cluster_view(b)
        me = next(n for n in view["nodes"] if n["node"] == "b")
        assert me["applied_seq"] == 1000 and me["lag"] == 0
        m = await metrics(b)
        assert m[("cachegate_cluster_full_purges_total", (("reason", "trimmed"),))] == 0
    finally:
        await nodes.stop_all()


async def test_a_node_whose_last_purge_was_trimmed_away_purges_its_whole_local_cache(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    routes(origin)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, stream_max=100)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await a.get("/keep")
        await fill(b, ["/keep", "/k/1"])
        await purge_many(a, [{"tags": ["first"]}])  # b has applied something: it resumes from there
        await b.stop()
        await wait_until(lambda: gone_from_cluster(a, "b"))
        await purge_many(a, [{"tags": [f"t{i}"]} for i in range(400)])  # trims far past b's last id

        b = await nodes.start("b")
        assert (await b.get("/keep")).x_cache == "MISS"  # no purge named it, but b cannot know
        assert (await b.get("/k/1")).x_cache == "MISS"
        m = await metrics(b)
        assert m[("cachegate_cluster_full_purges_total", (("reason", "trimmed"),))] == 1
        view = await cluster_view(b)
        assert next(n for n in view["nodes"] if n["node"] == "b")["applied_seq"] == 401
        # The stream does not grow forever.
        assert int(shared_redis.command("XLEN", f"{nodes.namespace}:purges").strip(b":\r\n")) < 400
    finally:
        await nodes.stop_all()


async def test_a_node_with_a_cache_but_no_record_of_its_purges_purges_its_whole_local_cache(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    """Its record deleted (or unreadable, or a cache directory from before cluster mode): what it
    holds may have been purged while it was away, and it cannot know which."""
    routes(origin)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        await a.get("/keep")
        await fill(b, ["/keep", "/k/1"])
        await b.stop()
        await wait_until(lambda: gone_from_cluster(a, "b"))
        await purge_many(a, [{"urls": [f"http://{HOST}/k/1"]}])
        state = tmp_path / "b" / "cache" / "cluster-state.json"
        assert state.exists()
        state.unlink()

        b = await nodes.start("b")
        assert (await b.get("/k/1")).x_cache == "MISS", "b served what the cluster purged while it was away"
        assert (await b.get("/keep")).x_cache == "MISS"  # no purge named it, but b cannot know
        m = await metrics(b)
        assert m[("cachegate_cluster_full_purges_total", (("reason", "no-state"),))] == 1
        assert state.exists()  # recorded again: the next start resumes where it left off
        await b.stop()
        b = await nodes.start("b")
        assert (await b.get("/keep")).x_cache == "HIT"
        m = await metrics(b)
        assert m[("cachegate_cluster_full_purges_total", (("reason", "no-state"),))] == 0
    finally:
        await nodes.stop_all()
