"""``shared_cache: true``: Redis as a shared tier behind every node, and one origin request per
herd however it is spread over the nodes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from proxy.cluster.redis_io import Names, client
from proxy.cluster.settings import ClusterSettings
from proxy.policy.httpdate import format_http_date
from tests.cluster.nodes import CACHE, Nodes, metrics, purge, wait_until
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin
from tests.storage.procs import ProxyProcess

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
            # (As README.md and deploy/compose.cluster.yaml show it.)
            assert r.headers["Cache-Status"] == "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed"
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


@pytest.mark.parametrize("lost", ["expired", "evicted"])
async def test_a_fill_slower_than_its_lock_does_not_overwrite_the_newer_fill_of_another_node(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer, lost: str) -> None:
    """a's fill of v0 outlasts its lock (``lock_timeout`` 1s: the lock lives 2 s), or Redis evicts
    the lock; the origin moves to v1, b takes the lock, fetches v1 and writes it through. a's v0
    then comes, and was written over v1 (no lock held by another fill: it took that for its own):
    c, a node new to the key, got v0 from the shared tier, the older response."""
    version = {"now": 0}
    fetching, go_on = asyncio.Event(), asyncio.Event()

    async def obj(request: web.Request) -> web.Response:
        v = version["now"]
        if origin.count("/obj") == 1:  # a's fill: held until b's is written through
            fetching.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(go_on.wait(), 20)
        return web.Response(body=f"v{v}".encode(), headers={"Cache-Control": "max-age=300"})

    origin.route("/obj", obj)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url,
                  cache=CACHE.replace("}}", "}, lock_timeout: 1s}"), shared_cache=True)
    redis = client(ClusterSettings(redis=shared_redis.url, node="t", namespace=nodes.namespace), decode=True)
    locks = f"{Names(nodes.namespace).l2}:lock:*"

    async def held() -> list[str]:
        return [k async for k in redis.scan_iter(locks)]

    async def lock_gone() -> bool:
        return not await held()

    try:
        a, b, c = await asyncio.gather(nodes.start("a"), nodes.start("b"), nodes.start("c"))
        slow = asyncio.ensure_future(a.get("/obj"))
        await asyncio.wait_for(fetching.wait(), 10)  # a holds the lock and fetches v0
        if lost == "evicted":
            assert await redis.delete(*await held()) == 1
        await wait_until(lock_gone, 5)  # (expired: a's lock lives max(lock_timeout, 1s) + 1s)
        version["now"] = 1
        assert (await b.get("/obj")).body == b"v1"

        def done(proc: ProxyProcess, *events: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                m = await metrics(proc)
                return sum(m[("cachegate_cluster_shared_total", (("event", e),))] for e in events) > 0
            return check

        await wait_until(done(b, "written"), 10)  # b's fill is written through,
        await wait_until(lock_gone, 5)  # and its lock let go: no lock held when a's write comes
        go_on.set()
        assert (await slow).body == b"v0"
        await wait_until(done(a, "written", "write_voided"), 10)
        r = await c.get("/obj")
        assert (r.body, r.x_cache) == (b"v1", "HIT")
        assert origin.count("/obj") == 2
        m = await metrics(a)
        assert m[("cachegate_cluster_shared_total", (("event", "write_voided"),))] == 1
    finally:
        go_on.set()
        await nodes.stop_all()
        await redis.aclose()


async def test_a_node_of_two_workers_waiting_on_a_dead_lock_holder_makes_one_origin_request(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    """The node holding the cluster's fill lock is killed mid-fill: its lock stays until it
    expires, the waiting nodes reach ``lock_timeout`` and each fetches once. In a node of two
    workers one worker holds the key's lease and waits for the lock; the other waited for that
    lease, until the same ``lock_timeout``, and fetched too: two origin requests for the node.
    Its wait for the lease now counts ``lock_timeout`` from when the holder's own fetch begins."""
    calls = {"n": 0}
    fetching = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        calls["n"] += 1
        fetching.set()
        await asyncio.sleep(2)
        return web.Response(body=b"herd-body", headers={"Cache-Control": "max-age=300"})

    origin.route("/herd", slow)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, shared_cache=True)
    try:
        b, c = await asyncio.gather(nodes.start("b"), nodes.start("c", "--workers", "2"))
        holder = asyncio.ensure_future(b.get("/herd"))
        await asyncio.wait_for(fetching.wait(), 10)  # b has the lock and is fetching
        herd = [asyncio.ensure_future(c.get("/herd")) for _ in range(20)]
        await asyncio.sleep(0.3)
        await b.kill()
        replies = await asyncio.gather(*herd)
        holder.cancel()
        assert {(r.status, r.body) for r in replies} == {(200, b"herd-body")}
        assert {r.worker for r in replies} == {"0", "1"}, "the herd did not reach both workers"
        assert calls["n"] == 2, f"{calls['n'] - 1} origin requests from the waiting node, not 1"
    finally:
        await nodes.stop_all()


async def test_nodes_waiting_on_a_fill_stale_by_its_date_alone_take_it(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    """The origin's clock is 2 h behind: its max-age=600 response arrives stale through its
    Date's apparent age alone. Node b (two workers: one waits on the cluster's fill lock, the
    other on that worker's lease) takes what a's fill stored, as a's own followers of it do. It
    was not written through (stale: no TTL left), or, found, not taken (not a fresh hit): b
    fetched again once a was done (a reviewer: 2 fetches, b's MISS at 3.7 s on a 2 s origin).
    Stored, it stays stale for a request that waits for nobody."""
    fetching = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        fetching.set()
        await asyncio.sleep(0.8)
        return web.Response(body=b"page", headers={"Cache-Control": "max-age=600",
                                                   "Date": format_http_date(time.time() - 7200)})

    origin.route("/date-behind", page)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, shared_cache=True)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b", "--workers", "2"))
        first = asyncio.ensure_future(a.get("/date-behind"))
        await asyncio.wait_for(fetching.wait(), 10)  # a has the fill lock and is fetching
        replies = await asyncio.gather(*(b.get("/date-behind") for _ in range(12)))
        assert ((await first).status, (await first).x_cache) == (200, "MISS")
        assert {(r.status, r.body, r.x_cache, r.headers["Cache-Status"]) for r in replies} == {
            (200, b"page", "HIT", "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed")}
        assert {r.worker for r in replies} == {"0", "1"}, "the herd did not reach both workers"
        assert origin.count("/date-behind") == 1
        after = await b.get("/date-behind")
        assert (after.status, after.x_cache) == (200, "EXPIRED")
        assert origin.count("/date-behind") == 2
    finally:
        await nodes.stop_all()


@pytest.mark.parametrize(("kind", "too_large"), [
    ("long", True),  # its Content-Length is over shared_max_object (256 KB)
    ("chunked", True),  # no length: it is over once 300 KB arrived
    ("cookie", False),  # a Set-Cookie: never stored, never shared
])
async def test_a_node_waiting_on_a_fill_that_cannot_be_shared_fetches_as_soon_as_that_is_known(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer, kind: str, too_large: bool) -> None:
    """Node a holds the fill lock; b waits on it. When a's response cannot be written through
    (too large, or not stored at all), b is told at its head (or once the body passed the size)
    and fetches at once: the origin sees b's request while a's body is still held back (b used
    to wait out a's whole download, or ``lock_timeout``, for nothing)."""
    started, second = asyncio.Event(), asyncio.Event()
    size = 400 * 1024
    first = 300 * 1024 if kind == "chunked" else 64 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        headers = {"Cache-Control": "max-age=300"}
        if kind == "cookie":
            headers["Set-Cookie"] = "s=1"
        resp = web.StreamResponse(headers=headers)
        if kind != "chunked":
            resp.content_length = size
        await resp.prepare(request)
        await resp.write(b"x" * first)
        if origin.count("/big") == 1:  # the first fetch holds the rest until the second comes
            started.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second.wait(), 20)
        else:
            second.set()
        await resp.write(b"x" * (size - first))
        await resp.write_eof()
        return resp

    origin.route("/big", big)
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url,
                  cache=CACHE.replace("}}", "}, lock_timeout: 30s}"), shared_cache=True)
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        held = asyncio.ensure_future(a.get("/big"))
        await asyncio.wait_for(started.wait(), 10)  # a holds the lock, and its body
        waiting = asyncio.ensure_future(b.get("/big"))
        # b's request reaches the origin while a's body is still held back for it.
        await asyncio.wait_for(second.wait(), 10)
        ra, rb = await asyncio.gather(held, waiting)
        assert (ra.status, len(ra.body)) == (200, size) and (rb.status, len(rb.body)) == (200, size)
        assert origin.count("/big") == 2
        m = await metrics(a)
        assert m[("cachegate_cluster_shared_total", (("event", "too_large"),))] == (1 if too_large else 0)
        assert m[("cachegate_cluster_shared_total", (("event", "written"),))] == 0
    finally:
        second.set()
        await nodes.stop_all()
