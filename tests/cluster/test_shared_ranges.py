"""``shared_cache: true`` and range requests: a range miss takes what another node stored in the
shared tier, and never hands a client a version older than the one its last range got."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from tests.cluster.nodes import Nodes, metrics, wait_until
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin, ProxyProcess

pytestmark = pytest.mark.slow

SIZE = 4000
WRITTEN = ("cachegate_cluster_shared_total", (("event", "written"),))


class Versioned:
    """An object of ``SIZE`` bytes whose every byte is its version's digit, with the strong
    ETag "vN"; it answers a single Range with a 206, as an origin that serves ranges does."""

    def __init__(self) -> None:
        self.version = 0
        self.asked: list[str | None] = []  # each request's Range (None: the whole object)
        self.slow_whole = 0.0  # the first whole request's answer waits this long (its version kept)
        self.refuse_whole = 0  # this many whole requests are refused (a 403, neither stored nor passed)

    def body(self, version: int) -> bytes:
        return str(version).encode() * SIZE

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(request.headers.get("Range"))
        version = self.version
        body = self.body(version)
        fields = {"Cache-Control": "max-age=300", "ETag": f'"v{version}"', "Accept-Ranges": "bytes"}
        wanted = request.headers.get("Range")
        if wanted is None and self.refuse_whole:
            self.refuse_whole -= 1
            return web.Response(status=403, body=b"not now")
        if wanted is None:
            delay, self.slow_whole = self.slow_whole, 0.0
            await asyncio.sleep(delay)
            return web.Response(body=body, headers=fields)
        first, last = (int(n) for n in wanted.removeprefix("bytes=").split("-"))
        return web.Response(status=206, body=body[first:last + 1],
                            headers={**fields, "Content-Range": f"bytes {first}-{last}/{SIZE}"})


async def written(proc: ProxyProcess, count: int) -> None:
    """Until ``proc`` has written ``count`` fills through to the shared tier."""
    async def check() -> bool:
        return (await metrics(proc)).get(WRITTEN, 0) >= count
    await wait_until(check)


async def test_a_range_is_answered_from_the_shared_tier_without_asking_the_origin(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    obj = Versioned()
    origin.route("/obj", obj.handle)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, shared_cache=True)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        assert (await b.get("/obj")).body == obj.body(0)
        await written(b, 1)
        assert obj.asked == [None]

        r = await a.get("/obj", headers={"Range": "bytes=100-199"})
        assert (r.status, r.body, r.headers["ETag"]) == (206, b"0" * 100, '"v0"')
        assert r.headers["Content-Range"] == "bytes 100-199/4000"
        # Kept on a: its next range is a hit, and the origin was never asked by a.
        r = await a.get("/obj", headers={"Range": "bytes=2000-2999"})
        assert (r.status, r.body, r.x_cache) == (206, b"0" * 1000, "HIT")
        assert obj.asked == [None]
    finally:
        await nodes.stop_all()


async def test_a_range_after_the_origin_moved_on_is_never_followed_by_the_older_version(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    """b fetches v0 slowly (under the fill lock); the origin moves to v1 meanwhile; a's range,
    finding nothing in the shared tier yet, gets v1 from the origin. The whole fetch behind it
    must not take b's v0 from the shared tier: the client's next range would be v0's bytes
    (joined to v1's by a client without If-Range). It fetches v1 instead, and writes it through."""
    obj = Versioned()
    obj.slow_whole = 1.0
    origin.route("/obj", obj.handle)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, shared_cache=True)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        on_b = asyncio.create_task(b.get("/obj"))
        await wait_until(lambda: asyncio.sleep(0, result=None in obj.asked))
        obj.version = 1

        first = await a.get("/obj", headers={"Range": "bytes=0-999"})
        assert (first.status, first.headers["ETag"], first.body) == (206, '"v1"', b"1" * 1000)
        assert (await on_b).body == obj.body(0)
        await written(b, 1)

        async def whole_on_a() -> bool:  # a's whole fetch after its range has ended
            m = await metrics(a)
            return m.get(WRITTEN, 0) + m.get(("cachegate_flights_total", (("outcome", "adopted"),)), 0) >= 1
        await wait_until(whole_on_a)

        second = await a.get("/obj", headers={"Range": "bytes=1000-1999"})
        assert (second.status, second.headers["ETag"], second.body) == (206, '"v1"', b"1" * 1000)
        # That whole fetch went to the origin, and was written through over b's v0.
        assert obj.asked.count(None) == 2
        assert (await metrics(a)).get(WRITTEN) == 1
    finally:
        await nodes.stop_all()


async def test_a_whole_taken_from_the_shared_tier_removes_the_parts_of_another_version(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    """a holds a part of v1 (the whole fetch after it failed); b stores v2 in the shared tier;
    a takes that whole for its next plain miss: the v1 part goes with it, never to answer a
    range once the whole is gone (evicted) while its clients were given v2."""
    obj = Versioned()
    obj.version = 1
    obj.refuse_whole = 1
    origin.route("/obj", obj.handle)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, shared_cache=True)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        r = await a.get("/obj", headers={"Range": "bytes=0-999"})
        assert (r.status, r.headers["ETag"]) == (206, '"v1"')
        await wait_until(lambda: asyncio.sleep(0, result=obj.refuse_whole == 0))

        async def statuses() -> list[int]:
            listed = json.loads((await a.admin("GET", "/cache?url=" + quote("http://cachegate.test/obj"))).body)
            assert "variants" in listed, listed
            return sorted(v["status"] for v in listed["variants"])
        await wait_until(lambda: statuses_are(statuses, [206]))

        obj.version = 2
        assert (await b.get("/obj")).body == obj.body(2)
        await written(b, 1)
        r = await a.get("/obj")
        assert (r.status, r.headers["ETag"], r.body) == (200, '"v2"', obj.body(2))
        await wait_until(lambda: statuses_are(statuses, [200]))
    finally:
        await nodes.stop_all()


async def statuses_are(statuses: Callable[[], Awaitable[list[int]]], expected: list[int]) -> bool:
    got = await statuses()
    return got == expected
