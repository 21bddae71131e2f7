"""Stampede protection: one origin fetch per key, bounded waits, hit-for-pass, stale serving."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

BODY = bytes(range(256)) * 1024  # 256 KiB: streamed to waiters in several chunks


async def herd(url: str, n: int, headers: dict[str, str] | None = None) -> list[tuple[int, str, bytes]]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def one() -> tuple[int, str, bytes]:
            async with session.get(url, headers=headers) as resp:
                return resp.status, resp.headers.get("X-Cache-Status", ""), await resp.read()

        return await asyncio.gather(*(one() for _ in range(n)))


async def test_500_concurrent_misses_make_exactly_one_origin_request(origin: Origin, proxy: Proxy) -> None:
    origin.route("/cold", body=BODY, headers={"Cache-Control": "max-age=60"}, delay=0.2)
    results = await herd(proxy.url + "/cold", 500)
    assert origin.count("/cold") == 1
    digest = hashlib.sha256(BODY).hexdigest()
    assert {(status, hashlib.sha256(body).hexdigest()) for status, _, body in results} == {(200, digest)}
    statuses = [x for _, x, _ in results]
    assert statuses.count("MISS") == 1
    assert statuses.count("HIT") == 499
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert "cachegate_coalesced_requests_total 499.0" in metrics


async def test_waiters_are_not_given_a_response_that_is_not_shareable(origin: Origin, proxy: Proxy) -> None:
    calls = 0

    async def personal(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        mine = calls
        await asyncio.sleep(0.2)
        return web.Response(text=f"for caller {mine}", headers={"Cache-Control": "private, max-age=60"})

    origin.route("/me", personal)
    results = await herd(proxy.url + "/me", 10)
    bodies = {body for _, _, body in results}
    assert len(bodies) == 10  # every client got its own response
    assert origin.count("/me") == 10
    key = proxy.url.removeprefix("http://")
    assert proxy.runtime.engine.coalescer.is_pass(f"http://{key}/me")  # hit-for-pass remembered
    # The next herd goes straight through: nobody waits for anybody.
    results = await herd(proxy.url + "/me", 10)
    assert len({body for _, _, body in results}) == 10
    assert origin.count("/me") == 20


async def test_a_waiter_goes_upstream_itself_after_lock_timeout(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/slow", body=b"slow", headers={"Cache-Control": "max-age=60"}, delay=1.0)
    proxy = await make_proxy(config="cache: {lock_timeout: 200ms, disk: {path: cache, size: 64MB}}\n")
    results = await herd(proxy.url + "/slow", 3)
    assert {(s, b) for s, _, b in results} == {(200, b"slow")}
    assert origin.count("/slow") == 3


async def test_stale_while_revalidate_refreshes_once_in_the_background(origin: Origin, proxy: Proxy) -> None:
    version = 0

    async def page(request: web.Request) -> web.Response:
        nonlocal version
        version += 1
        await asyncio.sleep(0.3)
        return web.Response(text=f"v{version}",
                            headers={"Cache-Control": "max-age=1, stale-while-revalidate=30"})

    origin.route("/swr", page)
    assert (await proxy.get("/swr")).body == b"v1"
    await asyncio.sleep(1.1)
    results = await herd(proxy.url + "/swr", 20)
    assert {(s, x, b) for s, x, b in results} == {(200, "UPDATING", b"v1")}
    for _ in range(50):
        if (await proxy.get("/swr")).body == b"v2":
            break
        await asyncio.sleep(0.05)
    assert origin.count("/swr") == 2  # one background refresh for the whole herd
    fresh = await proxy.get("/swr")
    assert (fresh.body, fresh.x_cache) == (b"v2", "HIT")


async def test_stale_if_error_serves_stale_while_the_origin_is_stopped(origin: Origin, proxy: Proxy) -> None:
    origin.route("/sie", body=b"kept", headers={"Cache-Control": "max-age=1, stale-if-error=2"})
    await proxy.get("/sie")
    await origin.stop()
    await asyncio.sleep(1.1)
    stale = await proxy.get("/sie")
    assert (stale.status, stale.body, stale.x_cache) == (200, b"kept", "STALE")
    assert "detail=ORIGIN-UNREACHABLE" in stale.cache_status
    await asyncio.sleep(2.0)  # past the stale-if-error window: the error passes through
    assert (await proxy.get("/sie")).status == 502


async def test_stale_if_error_covers_5xx_answers(origin: Origin, proxy: Proxy) -> None:
    origin.route("/e", body=b"good", headers={"Cache-Control": "max-age=1, stale-if-error=60", "ETag": '"1"'})
    await proxy.get("/e")
    origin.route("/e", status=503, body=b"down for maintenance")
    await asyncio.sleep(1.1)
    reply = await proxy.get("/e")
    assert (reply.status, reply.body, reply.x_cache) == (200, b"good", "STALE")
    assert "fwd-status=503" in reply.cache_status
