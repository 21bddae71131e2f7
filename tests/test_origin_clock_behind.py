"""An origin whose clock is behind cachegate's by more than its responses' lifetime: each arrives
stale through its Date alone (RFC 9111 §4.2.3's apparent age). Said (a warning per upstream a
while, ``cachegate_origin_date_behind_total``); ``cache.apparent_age: false`` reuses them; a
fill's followers take its response either way rather than each ask the origin again."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Overrides
from proxy.policy.httpdate import format_http_date
from proxy.web.server import install_reloader
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin, Proxy

BEHIND = 7200  # the origin's clock is 2 h behind
WARNING = re.compile(r"origin \S+: its Date is 72\d\d s behind this clock: one of the two clocks is wrong; "
                     r"its responses arrive stale and are not reused: set the wrong one \(NTP: this machine's, "
                     r"or the origin's\), or cache.apparent_age: false")


def slow_clock_origin(origin: Origin, delay: float = 0.0) -> None:
    async def page(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=b"page", headers={"Cache-Control": "max-age=600",
                                                   "Date": format_http_date(time.time() - BEHIND)})

    origin.route("/p", page)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "behind this clock" in r.getMessage()]


async def counted(proxy: Proxy) -> float:
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    found = re.findall(r"^cachegate_origin_date_behind_total\{upstream=\"[^\"]+\"\} (\S+)$", metrics, re.M)
    assert len(found) == 1, metrics  # at 0 from the start, for the one upstream
    return float(found[0])


async def test_by_default_every_response_arrives_stale_and_that_is_said_once(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    slow_clock_origin(origin)
    proxy = await make_proxy()
    assert await counted(proxy) == 0
    first = await proxy.get("/p")
    assert (first.status, first.x_cache) == (200, "MISS")
    for _ in range(3):
        again = await proxy.get("/p")
        assert (again.status, again.x_cache) == (200, "EXPIRED"), again.headers
        assert "fwd=stale" in again.cache_status and "stored" in again.cache_status
    assert origin.count("/p") == 4
    assert await counted(proxy) == 4
    said = warnings(caplog)
    assert len(said) == 1 and WARNING.fullmatch(said[0]), said


async def test_apparent_age_false_reuses_them(make_proxy: MakeProxy, origin: Origin,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    slow_clock_origin(origin)
    proxy = await make_proxy(config="cache: {apparent_age: false, memory: 64MB, "
                                    "disk: {path: cache, size: 512MB, shards: 2}}\n")
    assert (await proxy.get("/p")).x_cache == "MISS"
    hit = await proxy.get("/p")
    assert (hit.status, hit.x_cache, hit.body) == (200, "HIT", b"page")
    assert int(hit.headers["Age"]) < 60  # not the 2 h its Date says
    assert origin.count("/p") == 1
    assert await counted(proxy) == 0 and warnings(caplog) == []


async def test_a_reload_applies_apparent_age_to_new_fills(make_proxy: MakeProxy, origin: Origin) -> None:
    slow_clock_origin(origin)
    proxy = await make_proxy()
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    assert (await proxy.get("/p")).x_cache == "MISS"
    assert (await proxy.get("/p")).x_cache == "EXPIRED"
    config = Path(proxy.config_path)
    config.write_text(config.read_text().replace("cache: {", "cache: {apparent_age: false, "))  # noqa: ASYNC240
    reloaded = await proxy.admin("POST", "/reload")
    assert reloaded.status == 200, reloaded.body
    assert b"apparent_age" not in reloaded.body  # not a key that waits for a restart
    assert (await proxy.get("/p")).x_cache == "EXPIRED"  # the fill after the reload ...
    assert (await proxy.get("/p")).x_cache == "HIT"  # ... is reused
    assert origin.count("/p") == 3


@pytest.mark.parametrize("apparent_age", [True, False])
async def test_the_followers_of_a_fill_take_its_response(make_proxy: MakeProxy, origin: Origin,
                                                         apparent_age: bool) -> None:
    slow_clock_origin(origin, delay=0.5)
    proxy = await make_proxy(config="" if apparent_age else  # (the default: true)
                             "cache: {apparent_age: false, memory: 64MB, disk: {path: cache, size: 512MB, "
                             "shards: 2}}\n")
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> tuple[int, bytes]:
            async with session.get(proxy.url + "/p") as resp:
                return resp.status, await resp.read()

        answers = await asyncio.gather(*(one() for _ in range(8)))
    assert answers == [(200, b"page")] * 8
    assert origin.count("/p") == 1  # one fetch for the 8, not one after the other


async def test_a_304_whose_date_is_behind_is_counted_and_said_too(
        make_proxy: MakeProxy, origin: Origin, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A response stored with a right Date, then revalidated by an origin whose clock fell
    behind: the 304's Date freshens the stored one (RFC 9111 §4.3.4), and the response is
    stale through it alone from then on; said as a fill's would be."""
    caplog.set_level(logging.WARNING)
    behind = 0

    async def page(request: web.Request) -> web.Response:
        fields = {"ETag": '"v1"', "Date": format_http_date(clock() - behind), "Cache-Control": "max-age=600"}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=fields)
        return web.Response(body=b"page", headers=fields)

    origin.route("/p", page)
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/p")).x_cache == "MISS"
    assert (await proxy.get("/p")).x_cache == "HIT"
    assert await counted(proxy) == 0 and warnings(caplog) == []
    clock.advance(601)
    behind = BEHIND
    revalidated = await proxy.get("/p")
    assert (revalidated.status, revalidated.body, revalidated.x_cache) == (200, b"page", "REVALIDATED")
    assert origin.count("/p") == 2
    assert await counted(proxy) == 1
    said = warnings(caplog)
    assert len(said) == 1 and WARNING.fullmatch(said[0]), said
    assert (await proxy.get("/p")).x_cache != "HIT"  # stale through the 304's Date


async def test_origins_all_behind_alike_say_this_machines_clock_is_ahead(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    """This machine's clock an hour ahead, its origins' right: every origin's Date looks behind
    by the same amount. One origin cannot say which clock is wrong; two alike can."""
    caplog.set_level(logging.WARNING)
    second = Origin()
    await second.start()
    try:
        slow_clock_origin(origin)
        slow_clock_origin(second)
        proxy = await make_proxy(upstreams=[origin.url, second.url])  # round robin: both asked
        for _ in range(4):
            assert (await proxy.get("/p")).status == 200
        assert origin.count("/p") == second.count("/p") == 2
        first, then = warnings(caplog)  # one per upstream
        assert WARNING.fullmatch(first), first
        assert re.fullmatch(r"origins (\S+), (\S+): their Dates are all about 72\d\d s behind this clock, which is "
                            r"most likely 72\d\d s ahead; its responses arrive stale and are not reused: set this "
                            r"machine's clock \(NTP\), or cache.apparent_age: false", then), then
    finally:
        await second.stop()
