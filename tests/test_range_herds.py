"""Range misses share the key's whole fill, as its other misses do: a herd of them is one
origin fetch (or one range and one whole fetch), never one each; and a range of an object that
may not be stored never costs a fetch of the whole object.

A browser's video element asks ``Range: bytes=0-`` first: twenty players on a cold object
were twenty whole downloads from the origin (forty with an origin that honours ranges: each
range, then each one's whole fill), and ranges arriving while the object was being filled
each went to the origin too. Each origin route here records the Range (and Authorization) of
every request it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.storage.procs import HOST, ProxyProcess, write_config
from tests.test_conditional_fills import flights_over

BODY = bytes(i % 251 for i in range(256 * 1024))
NONE = "cache: {memory: 64MB, range_fill: none, disk: {path: cache, size: 512MB, shards: 2}}\n"
WHOLE = "cache: {memory: 64MB, range_fill: whole, disk: {path: cache, size: 512MB, shards: 2}}\n"


class Video:
    """An origin resource that honours single byte ranges (``ranges``) or ignores them, each
    answer after ``delay`` (the herd arrives meanwhile); ``held``: the whole body's first
    64 KiB go out with its head, the rest once ``release`` is set."""

    def __init__(self, body: bytes = BODY, *, ranges: bool = True, delay: float = 0.0,
                 cache_control: str = "max-age=3600", held: bool = False) -> None:
        self.body, self.honours, self.delay, self.cache_control = body, ranges, delay, cache_control
        self.held = held
        self.release = asyncio.Event()
        self.started = asyncio.Event()  # a held body's first bytes went out
        self.seen: list[tuple[str | None, str | None]] = []  # (Range, Authorization) of each request

    @property
    def ranges(self) -> list[str | None]:
        return [rng for rng, _ in self.seen]

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.seen.append((rng, request.headers.get("Authorization")))
        await asyncio.sleep(self.delay)
        headers = {"Cache-Control": self.cache_control, "ETag": '"v1"', "Content-Type": "video/mp4"}
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "") if self.honours else None
        if m is not None:
            size = len(self.body)
            first, last = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            return web.Response(status=206, body=self.body[first:last + 1], headers=headers)
        if not self.held:
            return web.Response(body=self.body, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(self.body)
        await resp.prepare(request)
        await resp.write(self.body[:65536])
        self.started.set()
        await self.release.wait()
        await resp.write(self.body[65536:])
        await resp.write_eof()
        return resp


async def ranged(proxy: Proxy, ranges: list[str], headers: dict[str, str] | None = None
                 ) -> list[tuple[int, str | None, bytes]]:
    """Each range asked at once, on a connection of its own: (status, Content-Range, body)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def one(rng: str) -> tuple[int, str | None, bytes]:
            async with session.get(proxy.url + "/v", headers={**(headers or {}), "Range": rng}) as resp:
                return resp.status, resp.headers.get("Content-Range"), await resp.read()

        return await asyncio.gather(*(one(r) for r in ranges))


@contextlib.asynccontextmanager
async def pinned(origin: Origin, tmp_path: Path, cache: str, each: int
                 ) -> AsyncIterator[tuple[ProxyProcess, list[aiohttp.ClientSession], list[aiohttp.ClientSession]]]:
    """cachegate with two workers and ``cache``, and keep-alive connections (one per session,
    each answered by the worker that accepted it) until each worker has accepted ``each`` (a
    no-store ``/probe`` says which): the proxy, one worker's connections and the other's.
    Stopped (SIGTERM) on the way out."""
    origin.route("/probe", body="x", headers={"Cache-Control": "no-store"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache))
    await proxy.start("--workers", "2")
    async with contextlib.AsyncExitStack() as stack:
        try:
            await proxy.wait_for(lambda: len(proxy.workers) == 2)
            by_worker: dict[str, list[aiohttp.ClientSession]] = {}
            for _ in range(200):
                session = await stack.enter_async_context(aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=1), headers={"Host": HOST}))
                async with session.get(proxy.url + "/probe") as r:
                    await r.read()
                    by_worker.setdefault(r.headers["X-Cachegate-Worker"], []).append(session)
                if len(by_worker) == 2 and all(len(s) >= each for s in by_worker.values()):
                    break
            mine, others = by_worker.values()
            yield proxy, mine, others
        finally:
            await proxy.stop(signal.SIGTERM)

def answers(ranges: list[str], body: bytes = BODY) -> list[tuple[int, str | None, bytes]]:
    """The 206 each range asks for."""
    out: list[tuple[int, str | None, bytes]] = []
    for rng in ranges:
        first_text, last_text = rng.removeprefix("bytes=").split("-")
        first, last = int(first_text), int(last_text or len(body) - 1)
        out.append((206, f"bytes {first}-{last}/{len(body)}", body[first:last + 1]))
    return out


@pytest.mark.parametrize("config", [WHOLE, NONE], ids=["range_fill-whole", "range_fill-none"])
@pytest.mark.parametrize("honours", [True, False], ids=["origin-honours-ranges", "origin-ignores-ranges"])
async def test_twenty_video_players_on_a_cold_object_are_one_origin_fetch(
        origin: Origin, make_proxy: MakeProxy, config: str, honours: bool) -> None:
    """``bytes=0-`` asks for the whole representation: the key's fill, joined by the others,
    each answered 206 from it as it arrives (with ``range_fill: none`` too: the origin sends
    no more than they ask for)."""
    video = Video(ranges=honours, delay=0.2)
    origin.route("/v", video)
    proxy = await make_proxy(config=config)
    replies = await ranged(proxy, ["bytes=0-"] * 20)
    assert replies == answers(["bytes=0-"] * 20)
    assert video.ranges == [None]  # one whole fetch
    await flights_over(proxy)
    assert (await ranged(proxy, ["bytes=5-9"])) == answers(["bytes=5-9"])
    assert video.ranges == [None]  # stored


async def test_ranges_asked_while_the_object_is_being_filled_are_answered_from_the_fill(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The Bounded wait of docs/upstreams.md: a range request that comes while the key is
    filled joins the fill and is answered from its head and body (the origin honours ranges:
    each went to it as a range request of its own)."""
    video = Video(held=True)
    origin.route("/v", video)
    proxy = await make_proxy()
    leader = asyncio.ensure_future(proxy.get("/v"))
    await asyncio.wait_for(video.started.wait(), 5)
    wanted = [f"bytes={i * 9000}-{i * 9000 + 99}" for i in range(20)] + ["bytes=200000-"]
    herd = asyncio.ensure_future(ranged(proxy, wanted))
    flight = proxy.runtime.engine.coalescer.get(f"http://{proxy.url.removeprefix('http://')}/v")
    assert flight is not None
    for _ in range(500):  # until every range has joined the fill (it holds the rest of its body)
        if flight.followers == len(wanted):
            break
        await asyncio.sleep(0.01)
    assert flight.followers == len(wanted)
    video.release.set()
    assert await herd == answers(wanted)
    assert (await leader).body == BODY
    await flights_over(proxy)
    assert video.ranges == [None]


async def test_a_cold_herd_of_ranges_is_one_range_and_one_whole_fetch(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """range_fill: whole. The first range goes to the origin and holds the key's fill; its 206
    may be stored, so the whole object follows, and the other ranges are answered from that
    fill rather than each asking for its range (and each then starting a whole fill)."""
    video = Video(delay=0.2)
    origin.route("/v", video)
    proxy = await make_proxy(config=WHOLE)
    wanted = [f"bytes={i * 100}-{i * 100 + 99}" for i in range(20)]
    assert await ranged(proxy, wanted) == answers(wanted)
    await flights_over(proxy)
    assert len(video.ranges) == 2 and video.ranges[1] is None, video.ranges  # a range, then the whole
    full = await proxy.get("/v")
    assert (full.status, full.x_cache, full.body) == (200, "HIT", BODY)


async def test_a_seek_far_past_a_fill_in_flight_is_asked_of_the_origin_at_once(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A range that starts more than a MiB past what the fill has received does not wait for
    the fill to get there (the origin holds the rest of the body here: it never would)."""
    big = bytes(i % 253 for i in range(3 << 20))
    video = Video(big, held=True)
    origin.route("/v", video)
    proxy = await make_proxy()
    leader = asyncio.ensure_future(proxy.get("/v"))
    await asyncio.wait_for(video.started.wait(), 5)
    seek = ["bytes=2621440-2621539"]
    assert await asyncio.wait_for(ranged(proxy, seek), 5) == answers(seek, big)
    assert video.ranges == [None, "bytes=2621440-2621539"]  # no second whole fetch
    video.release.set()
    assert (await leader).body == big
    await flights_over(proxy)


@pytest.mark.parametrize(("cache_control", "headers"), [
    ("private, max-age=100", {}), ("no-store", {}), ("max-age=100", {"Authorization": "Bearer alice"})],
    ids=["private", "no-store", "authorization"])
async def test_a_range_of_an_object_that_may_not_be_stored_never_fetches_it_whole(
        origin: Origin, make_proxy: MakeProxy, cache_control: str, headers: dict[str, str]) -> None:
    """range_fill: whole fetches the whole object after a range only when the range's 206 may be
    stored: a private object's every 1 KB range had the origin send all of it again, and a
    request with credentials had them sent on a whole fetch the client never asked for."""
    video = Video(cache_control=cache_control)
    origin.route("/v", video)
    proxy = await make_proxy(config=WHOLE)
    for i in range(3):
        wanted = [f"bytes={i * 1024}-{i * 1024 + 1023}"]
        assert await ranged(proxy, wanted, headers) == answers(wanted)
        await flights_over(proxy)
    assert video.ranges == ["bytes=0-1023", "bytes=1024-2047", "bytes=2048-3071"]


async def test_ranges_that_waited_for_a_fill_their_first_range_declined_ask_for_their_own(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A cold herd of ranges of a private object: the others waited for the fill the first one
    held, which its private 206 said not to make; each then asks for its own range (never the
    whole object) and gets its 206."""
    video = Video(cache_control="private, max-age=100", delay=0.2)
    origin.route("/v", video)
    proxy = await make_proxy(config=WHOLE)
    wanted = [f"bytes={i * 100}-{i * 100 + 99}" for i in range(8)]
    assert await ranged(proxy, wanted) == answers(wanted)
    await flights_over(proxy)
    assert sorted(map(str, video.ranges)) == sorted(wanted)


async def test_ranges_that_waited_for_a_fill_whose_range_failed_get_its_error(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The first range's fetch breaks (the origin closes the connection): the ranges waiting for
    the fill it held get that error as a fill's followers do, rather than each trying again."""
    seen: list[str | None] = []

    async def broken(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Range"))
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    origin.route("/v", broken)
    proxy = await make_proxy(config=WHOLE)
    wanted = [f"bytes={i * 100}-{i * 100 + 99}" for i in range(5)]
    replies = await ranged(proxy, wanted)
    assert [status for status, _, _ in replies] == [502] * 5
    await flights_over(proxy)
    assert len(set(seen)) == 1, seen  # one range's fetch (the pool tries it twice: it is idempotent)


async def test_whole_misses_that_joined_a_held_fill_its_range_declined_share_one_fetch(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A range past the object's end holds the key's fill (range_fill: whole) and gets a 416,
    which says nothing of the object: the plain GETs that joined the held fill meanwhile are
    one whole fetch, not one each (any client could multiply the origin's load so)."""
    seen: list[str | None] = []

    async def video(request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        seen.append(rng)
        await asyncio.sleep(0.5)
        headers = {"Cache-Control": "max-age=3600", "ETag": '"v1"'}
        if rng is not None:
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{len(BODY)}"})
        return web.Response(body=BODY, headers=headers)

    origin.route("/v", video)
    proxy = await make_proxy(config=WHOLE)
    past_end = asyncio.ensure_future(ranged(proxy, ["bytes=5000000-"]))
    await asyncio.sleep(0.1)
    plain = await asyncio.gather(*(proxy.get("/v") for _ in range(10)))
    assert [(r.status, r.body == BODY) for r in plain] == [(200, True)] * 10
    assert [status for status, _, _ in await past_end] == [416]
    await flights_over(proxy)
    assert seen == ["bytes=5000000-", None], seen


async def test_a_held_fill_in_a_worker_waits_for_the_other_workers_fill_of_the_key(
        origin: Origin, tmp_path: Path) -> None:
    """Two workers: one fills the key (a slow body) when ranges and plain GETs come to both. In
    the other worker a range holds the key's fill and the plain GETs join it; its storable 206
    sends the fill for the whole object, which must wait for the first worker's lease as any
    fill does: as a background fill it skipped it, and each GET waiting on it then fetched the
    2 MiB alone (10-12 whole downloads in a run of 16)."""
    big = bytes(i % 251 for i in range(2 << 20))

    async def video(request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        headers = {"Cache-Control": "max-age=3600", "ETag": '"v1"', "Content-Type": "video/mp4"}
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng or "")
        if m is not None:
            await asyncio.sleep(0.3)
            first, last = int(m.group(1)), int(m.group(2))
            headers["Content-Range"] = f"bytes {first}-{last}/{len(big)}"
            return web.Response(status=206, body=big[first:last + 1], headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(big)
        await resp.prepare(request)
        for i in range(0, len(big), 65536):
            await resp.write(big[i:i + 65536])
            await asyncio.sleep(0.06)
        await resp.write_eof()
        return resp

    origin.route("/v", video)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, WHOLE))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        first = asyncio.ensure_future(proxy.get("/v"))
        await asyncio.sleep(0.3)
        ranges = [asyncio.ensure_future(proxy.get("/v", headers={"Range": "bytes=1000-1999"}))
                  for _ in range(16)]
        plain = [asyncio.ensure_future(proxy.get("/v")) for _ in range(16)]
        for r in [await c for c in [first, *plain]]:
            assert (r.status, r.body == big) == (200, True)
        for r in [await c for c in ranges]:
            assert (r.status, r.body) == (206, big[1000:2000])
    finally:
        await proxy.stop(signal.SIGTERM)
    whole = [s for s in origin.seen if s.path == "/v" and "Range" not in s.headers]
    assert len(whole) == 1, len(whole)  # one whole download


async def test_whole_misses_behind_a_held_fill_wait_lock_timeout_for_its_fetch_not_for_the_range_too(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """range_fill: whole, an origin that takes more than half of lock_timeout to answer. The plain
    GETs that joined the fill a range holds wait for that range's answer, then lock_timeout for
    the whole fetch it starts: their wait counted from when they joined ran out before the
    range's round trip and the whole fetch were over, and each GET then fetched the object alone
    (1 range and 11 whole downloads for a range and 10 GETs)."""
    video = Video(delay=1.4)
    origin.route("/v", video)
    proxy = await make_proxy(config="cache: {memory: 64MB, range_fill: whole, lock_timeout: 2s, "
                                    "disk: {path: cache, size: 512MB, shards: 2}}\n")
    first = asyncio.ensure_future(ranged(proxy, ["bytes=100-199"]))
    for _ in range(500):  # the range is at the origin: the key's fill is held
        if video.seen:
            break
        await asyncio.sleep(0.01)
    plain = await asyncio.gather(*(proxy.get("/v") for _ in range(10)))
    assert [(r.status, r.body == BODY) for r in plain] == [(200, True)] * 10
    assert await first == answers(["bytes=100-199"])
    await flights_over(proxy)
    assert video.ranges == ["bytes=100-199", None]  # the range, then one whole fetch


async def test_whole_misses_behind_a_held_fill_whose_range_never_answers_fetch_alone_after_lock_timeout(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The wait for a held fill's word is bounded too: past lock_timeout without the range's
    answer, a GET that joined the fill fetches the object on its own (as nginx passes a request
    to the upstream after proxy_cache_lock_timeout), never waits as long as the range does."""
    release = asyncio.Event()
    seen: list[str | None] = []

    async def video(request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        seen.append(rng)
        headers = {"Cache-Control": "max-age=3600", "ETag": '"v1"'}
        if rng is None:
            return web.Response(body=BODY, headers=headers)
        await release.wait()  # the range's answer comes only once the GETs have theirs
        return web.Response(status=206, body=BODY[100:200],
                            headers={**headers, "Content-Range": f"bytes 100-199/{len(BODY)}"})

    origin.route("/v", video)
    proxy = await make_proxy(config="cache: {memory: 64MB, range_fill: whole, lock_timeout: 300ms, "
                                    "disk: {path: cache, size: 512MB, shards: 2}}\n")
    first = asyncio.ensure_future(ranged(proxy, ["bytes=100-199"]))
    for _ in range(500):
        if seen:
            break
        await asyncio.sleep(0.01)
    plain = await asyncio.wait_for(asyncio.gather(*(proxy.get("/v") for _ in range(3))), 10)
    assert [(r.status, r.body == BODY) for r in plain] == [(200, True)] * 3
    release.set()
    assert await first == answers(["bytes=100-199"])
    await flights_over(proxy)


async def test_whole_misses_behind_a_held_fill_in_one_of_two_workers_share_its_one_whole_fetch(
        origin: Origin, tmp_path: Path) -> None:
    """The same with two workers, the range and the GETs all in one of them (keep-alive
    connections, each answered by the worker that accepted it): the held fill's whole fetch,
    under the key's lease, is the GETs' one fetch (each of them fetched the object alone)."""
    video = Video(delay=1.4)
    origin.route("/v", video)
    cache = ("cache: {memory: 64MB, range_fill: whole, lock_timeout: 2s, "
             "disk: {path: cache, size: 512MB, shards: 2}}\n")
    async with pinned(origin, tmp_path, cache, 11) as (proxy, one, _):

        async def get(session: aiohttp.ClientSession, headers: dict[str, str]) -> tuple[str, int, bytes]:
            async with session.get(proxy.url + "/v", headers=headers) as r:
                return r.headers["X-Cachegate-Worker"], r.status, await r.read()

        first = asyncio.ensure_future(get(one[0], {"Range": "bytes=100-199"}))
        for _ in range(500):  # the range is at the origin: the key's fill is held
            if video.seen:
                break
            await asyncio.sleep(0.01)
        plain = await asyncio.gather(*(get(s, {}) for s in one[1:11]))
        worker, *got = await first
        assert plain == [(worker, 200, BODY)] * 10  # all in the range's worker
        assert got == [206, BODY[100:200]]
    assert video.ranges == ["bytes=100-199", None]  # the range, then one whole fetch


@pytest.mark.parametrize("honours", [True, False], ids=["origin-serves-ranges", "origin-ignores-range"])
async def test_ranges_in_one_worker_wait_for_the_other_workers_fill_of_the_key(
        origin: Origin, tmp_path: Path, honours: bool) -> None:
    """Two workers: one fills the key (a slow body); ranges near its start come to the other
    worker meanwhile. They wait for that fill under its lease, as plain GETs there do, and are
    answered from what it stored: one fetch per machine. They looked only at their own worker's
    flights, so the first of them asked the origin itself: one more Range request, or (an
    origin that ignores Range) the whole object downloaded and stored a second time.

    They say they waited for a fetch (``collapsed``, no ``hit``), as a range that joined the fill
    in the filling worker does, in their fields and in the access log: they said ``hit; ttl=3599``
    as if the object had been stored before they came."""
    video = Video(ranges=honours, held=True)
    origin.route("/v", video)
    cache = ("cache: {memory: 64MB, lock_timeout: 20s, disk: {path: cache, size: 512MB, shards: 2}}\n"
             "access_log: true\n")
    async with pinned(origin, tmp_path, cache, 4) as (proxy, (filler, beside, *_), (_, *others)):

        async def get(session: aiohttp.ClientSession, headers: dict[str, str]
                      ) -> tuple[int, bytes, str, str]:
            async with session.get(proxy.url + "/v", headers=headers) as r:
                return r.status, await r.read(), r.headers["X-Cache-Status"], r.headers["Cache-Status"]

        whole = asyncio.ensure_future(get(filler, {}))
        await asyncio.wait_for(video.started.wait(), 10)  # the fill is under way in one worker
        ranges = [asyncio.ensure_future(get(s, {"Range": "bytes=100-200"})) for s in others[:3]]
        joined = asyncio.ensure_future(get(beside, {"Range": "bytes=100-200"}))  # in the filling worker
        await asyncio.sleep(0.5)  # they are waiting in the other worker
        video.release.set()
        assert await whole == (200, BODY, "MISS", "cachegate; fwd=uri-miss; fwd-status=200; stored")
        assert await joined == (206, BODY[100:201], "HIT", "cachegate; fwd=uri-miss; fwd-status=200; stored; "
                                "collapsed")
        # Said as in the filling worker (they used to leave "stored" out).
        waited = (206, BODY[100:201], "HIT", "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed")
        assert [await r for r in ranges] == [waited] * 3
        await proxy.wait_for(lambda: sum('"path":"/v"' in line for line in proxy.lines) == 5, 10)
        logged = [json.loads(line) for line in proxy.lines if '"path":"/v"' in line]
        assert sorted((e["status"], e["cache"], e["cache_status"]) for e in logged) == [
            (200, "MISS", "cachegate; fwd=uri-miss; fwd-status=200; stored"),
            *[(206, "HIT", "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed")] * 4]
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert "cachegate_coalesced_requests_total 4.0" in metrics
    assert video.ranges == [None]  # one fetch of the object, and no range of it


@pytest.mark.parametrize("honours", [True, False], ids=["origin-serves-ranges", "origin-ignores-range"])
async def test_a_range_that_leads_a_fill_holds_the_keys_lease_for_the_other_workers(
        origin: Origin, tmp_path: Path, honours: bool) -> None:
    """Two workers, range_fill: whole. A range leads the key's fill in one worker (it asks the
    origin for its range first); ranges and a plain GET of the key come to the other worker
    meanwhile. The leading range holds the key's lease, as a plain miss's fill does, so they
    wait for its fill and are answered from what it stored: one whole download per machine. It
    held its fill without the lease, so the other worker's first range led a fill of its own and
    its GET fetched the object too (an origin that ignores Range: three whole downloads)."""
    video = Video(ranges=honours, held=True, delay=0.3 if honours else 0.0)
    origin.route("/v", video)
    cache = ("cache: {memory: 64MB, range_fill: whole, lock_timeout: 20s, "
             "disk: {path: cache, size: 512MB, shards: 2}}\n")
    async with pinned(origin, tmp_path, cache, 4) as (proxy, (leader, *_), others):

        async def get(session: aiohttp.ClientSession, headers: dict[str, str]) -> tuple[int, bytes]:
            async with session.get(proxy.url + "/v", headers=headers) as r:
                return r.status, await r.read()

        first = asyncio.ensure_future(get(leader, {"Range": "bytes=100-199"}))
        for _ in range(500):  # the range is at the origin: the key's fill is held, leased
            if video.seen:
                break
            await asyncio.sleep(0.01)
        ranges = [asyncio.ensure_future(get(s, {"Range": f"bytes={i * 1000}-{i * 1000 + 9}"}))
                  for i, s in enumerate(others[:3], 1)]
        plain = asyncio.ensure_future(get(others[3], {}))
        await asyncio.sleep(0.8)  # they are waiting in the other worker
        video.release.set()
        assert await first == (206, BODY[100:200])
        assert [await r for r in ranges] == [(206, BODY[i * 1000:i * 1000 + 10]) for i in (1, 2, 3)]
        assert await plain == (200, BODY)
    # The leading range, and the whole fetch its storable 206 sends for (none when its answer
    # was the whole object already).
    assert video.ranges == (["bytes=100-199", None] if honours else ["bytes=100-199"]), video.ranges


async def test_ranges_that_waited_on_another_workers_failed_whole_fetch_are_answered_from_its_part(
        origin: Origin, tmp_path: Path) -> None:
    """Two workers, range_fill: whole, an origin that serves ranges and answers a request without
    Range with a 206 too. A range leads the key's fill in one worker: its 206 is stored as a
    part, and the whole fetch behind it fails. Ranges of the same bytes in the other worker
    waited for that worker's lease; told nothing whole was stored, each asked the origin for
    its range, though the part the leader stored holds it: they look at the parts first now."""
    body = bytes(i % 251 for i in range(1000))
    seen: list[str | None] = []

    async def ranges_only(request: web.Request) -> web.Response:
        rng = request.headers.get("Range")
        seen.append(rng)
        await asyncio.sleep(0.5 if rng else 1.0)  # (the other worker's ranges come and wait meanwhile)
        first, last = (int(x) for x in (rng or "bytes=0-99").removeprefix("bytes=").split("-"))
        return web.Response(status=206, body=body[first:last + 1], headers={
            "Cache-Control": "max-age=3600", "ETag": '"v1"', "Content-Range": f"bytes {first}-{last}/1000"})

    origin.route("/a", ranges_only)
    cache = ("cache: {memory: 64MB, range_fill: whole, lock_timeout: 20s, "
             "disk: {path: cache, size: 512MB, shards: 2}}\nupstream: {retries: 0}\n")
    async with pinned(origin, tmp_path, cache, 3) as (proxy, (leader, *_), others):

        async def get(session: aiohttp.ClientSession) -> tuple[int, bytes]:
            async with session.get(proxy.url + "/a", headers={"Range": "bytes=0-99"}) as r:
                return r.status, await r.read()

        first = asyncio.ensure_future(get(leader))
        for _ in range(500):  # its range is at the origin (the key's lease taken, no part yet)
            if seen:
                break
            await asyncio.sleep(0.01)
        waiting = [asyncio.ensure_future(get(s)) for s in others[:3]]
        assert await first == (206, body[:100])
        assert [await w for w in waiting] == [(206, body[:100])] * 3
    assert seen == ["bytes=0-99", None], seen  # the leader's range and its whole fetch, nothing else
