"""A video element's seeks carry ``If-Range``: they are answered at once, never after the whole
download (RFC 9110 §13.1.5, §14.2: If-Range decides only whether the range applies).

Chromium sends ``If-Range: <ETag>`` with most range requests once the first response gave it an
ETag. Any conditional range was answered by the key's whole fill: a seek to a cold object's
end (the WebM cues, an MP4's moov) waited for the download to get there (19 MB at 2 MB/s: 8.7
s; with two workers, ``lock_timeout`` and then the whole object downloaded again), and each
seek into an object over ``max_object`` (never stored) fetched it whole from byte 0 and threw
away all of it before the range. Now such a range goes to the origin as a plain range does,
with its If-Range for the origin to evaluate (its 206, or its whole 200 when it does not hold),
unless the key's fill in flight shows the If-Range does not hold: the whole 200 from that fill.

The origin here holds a whole download after its first 64 KiB until the test releases it: a
seek answered before that was not answered from the download, and one that waited for it
never ends (the tests give up after seconds: the defect).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.storage.procs import ProxyProcess, write_config
from tests.test_conditional_fills import flights_over
from tests.test_range_herds import pinned

SIZE = 4 << 20
BODY = bytes(i % 251 for i in range(SIZE))
FIRST = 64 * 1024  # a whole download's bytes sent with its head; the rest once released
ETAG = '"v1"'
TAIL = {"Range": "bytes=-16384", "If-Range": ETAG}  # what a video element asks for after bytes=0-
WHOLE = "cache: {memory: 64MB, lock_timeout: 20s, range_fill: whole, disk: {path: cache, size: 512MB, shards: 2}}\n"
TOO_LARGE = WHOLE.replace("{memory: 64MB,", "{memory: 64MB, max_object: 1MB,")
WAIT = 10  # seconds before a seek that waits for the download counts as never answered


class Seekable:
    """A 4 MiB object whose whole download (no Range, or an If-Range that does not hold: the
    whole 200) sends its first 64 KiB with its head and the rest once ``release`` is set; a
    single range whose If-Range, if any, is the ETag is its 206 at once. ``seen``: the Range
    and If-Range of each request; ``sent``: the body bytes sent so far."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()  # a whole download's first bytes went out
        self.seen: list[tuple[str | None, str | None]] = []
        self.sent = 0

    @property
    def whole(self) -> int:
        """The whole downloads asked for."""
        return sum(1 for rng, if_range in self.seen if rng is None or if_range not in (None, ETAG))

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        rng, if_range = request.headers.get("Range"), request.headers.get("If-Range")
        self.seen.append((rng, if_range))
        headers = {"Cache-Control": "max-age=3600", "ETag": ETAG, "Content-Type": "video/webm"}
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if m is not None and if_range in (None, ETAG):
            if m.group(1):
                first, last = int(m.group(1)), min(int(m.group(2) or SIZE - 1), SIZE - 1)
            else:
                first, last = SIZE - int(m.group(2)), SIZE - 1
            self.sent += last + 1 - first
            return web.Response(status=206, body=BODY[first:last + 1],
                                headers={**headers, "Content-Range": f"bytes {first}-{last}/{SIZE}"})
        resp = web.StreamResponse(headers=headers)
        resp.content_length = SIZE
        await resp.prepare(request)
        await resp.write(BODY[:FIRST])
        self.sent += FIRST
        self.started.set()
        await self.release.wait()
        for at in range(FIRST, SIZE, 1 << 20):
            await resp.write(BODY[at:at + (1 << 20)])
            self.sent += len(BODY[at:at + (1 << 20)])
        await resp.write_eof()
        return resp


async def seek(proxy: Proxy, fields: dict[str, str]) -> tuple[int, str | None, bytes]:
    """A seek on a connection of its own: (status, Content-Range, body)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.get(proxy.url + "/v.webm", headers=fields) as resp:
        return resp.status, resp.headers.get("Content-Range"), await resp.read()


def tail(size: int = 16384) -> tuple[int, str, bytes]:
    return 206, f"bytes {SIZE - size}-{SIZE - 1}/{SIZE}", BODY[-size:]


async def fill_headed(proxy: Proxy) -> None:
    """Until the key's fill in flight has its response head (its ETag known to the proxy)."""
    coalescer = proxy.runtime.engine.coalescer
    for _ in range(500):
        flight = coalescer.get(f"{proxy.url}/v.webm")
        if flight is not None and flight.head.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no fill got its head")


async def test_an_if_range_seek_past_a_fill_in_flight_is_asked_of_the_origin_at_once(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A player streams ``bytes=0-`` (the key's fill); its seeks to the end and far into the
    object carry its ETag in If-Range. The fill's head holds that ETag: each seek is decided as
    a plain range, and asked of the origin with its If-Range at once; the download is not done."""
    video = Seekable()
    origin.route("/v.webm", video)
    proxy = await make_proxy(config=WHOLE)
    player = asyncio.ensure_future(seek(proxy, {"Range": "bytes=0-"}))
    await fill_headed(proxy)
    far = {"Range": "bytes=3000000-3099999", "If-Range": ETAG}
    answers = await asyncio.wait_for(asyncio.gather(seek(proxy, TAIL), seek(proxy, far)), WAIT)
    assert not video.release.is_set() and video.sent < SIZE  # answered while the download is held
    assert answers == [tail(), (206, f"bytes 3000000-3099999/{SIZE}", BODY[3000000:3100000])]
    assert sorted(video.seen, key=str) == sorted([(None, None), ("bytes=-16384", ETAG),
                                                  ("bytes=3000000-3099999", ETAG)], key=str)
    video.release.set()
    assert await player == (206, f"bytes 0-{SIZE - 1}/{SIZE}", BODY)
    await flights_over(proxy)


async def test_an_if_range_seek_on_a_cold_object_is_asked_of_the_origin_as_a_range(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """Nothing stored, no fill: the seek is the origin's range with its If-Range, answered at
    once, and (range_fill: whole) the whole object follows it for the next seeks."""
    video = Seekable()
    origin.route("/v.webm", video)
    proxy = await make_proxy(config=WHOLE)
    assert await asyncio.wait_for(seek(proxy, TAIL), WAIT) == tail()
    assert video.seen[0] == ("bytes=-16384", ETAG)
    await asyncio.wait_for(video.started.wait(), WAIT)  # the whole fetch behind it
    assert video.seen == [("bytes=-16384", ETAG), (None, None)]
    video.release.set()
    await flights_over(proxy)
    hit = await proxy.get("/v.webm", headers={"Range": "bytes=100-199", "If-Range": ETAG})
    assert (hit.status, hit.x_cache, hit.body) == (206, "HIT", BODY[100:200])
    assert len(video.seen) == 2


async def test_a_mismatched_if_range_gets_the_whole_200(origin: Origin, make_proxy: MakeProxy) -> None:
    """An If-Range of another version: on a cold key the origin says so (its whole 200 to the
    range's fetch, relayed); while the key's fill is in flight, its head says so, and the seek
    joins that fill for the whole 200 (no second download)."""
    video = Seekable()
    origin.route("/v.webm", video)
    proxy = await make_proxy(config=WHOLE)
    stale = {"Range": "bytes=-16384", "If-Range": '"v0"'}
    cold = asyncio.ensure_future(seek(proxy, stale))
    await fill_headed(proxy)  # the first one's answer: the range's fetch got the whole 200, held
    assert video.seen == [("bytes=-16384", '"v0"')]  # the range's fetch, with the client's If-Range
    joined = asyncio.ensure_future(seek(proxy, stale))
    for _ in range(500):  # until it has joined that fill
        flight = proxy.runtime.engine.coalescer.get(f"{proxy.url}/v.webm")
        if flight is not None and flight.followers:
            break
        await asyncio.sleep(0.01)
    video.release.set()
    assert [await cold, await joined] == [(200, None, BODY)] * 2
    assert video.seen == [("bytes=-16384", '"v0"')]
    await flights_over(proxy)


SEEKS = [TAIL, *({"Range": f"bytes={first}-{first + 99999}", "If-Range": ETAG} for first in (3000000, 2000000)),
         {"Range": "bytes=1000000-1099999"}]  # (without If-Range: no whole fetch follows it either)


async def test_if_range_seeks_of_an_object_over_max_object_each_reach_the_origin_as_a_range(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The object is over max_object: never stored. Each seek (with If-Range, or without) is
    the origin's range, and no whole fetch follows any of them: one fetched the object from byte
    0 to the seek and threw it away, every time (4 seeks of a 19 MB video: 81 MB)."""
    video = Seekable()
    origin.route("/v.webm", video)
    proxy = await make_proxy(config=TOO_LARGE)
    got = 0
    for fields in SEEKS:
        status, _, body = await asyncio.wait_for(seek(proxy, fields), WAIT)
        assert status == 206
        got += len(body)
        await flights_over(proxy)
    assert video.whole == 0, video.seen
    assert video.seen == [(f["Range"], f.get("If-Range")) for f in SEEKS]
    assert video.sent == got  # the origin sent what the seeks asked for, no more


async def test_if_range_seeks_in_either_of_two_workers_are_asked_of_the_origin_while_one_fills(
        origin: Origin, tmp_path: Path) -> None:
    """Two workers: one fills the key (``bytes=0-``); the seeks to its end come to both. In the
    other worker a seek waited for the filling worker's lease (``lock_timeout``) and then
    downloaded the whole object again; in the filling one, for the download to get there."""
    video = Seekable()
    origin.route("/v.webm", video)
    async with pinned(origin, tmp_path, WHOLE, 2) as (proxy, (filler, beside, *_), (other, *_)):

        async def get(session: aiohttp.ClientSession, fields: dict[str, str]) -> tuple[int, str | None, bytes]:
            async with session.get(proxy.url + "/v.webm", headers=fields) as r:
                return r.status, r.headers.get("Content-Range"), await r.read()

        player = asyncio.ensure_future(get(filler, {"Range": "bytes=0-"}))
        await asyncio.wait_for(video.started.wait(), WAIT)
        far = {"Range": "bytes=3000000-3099999", "If-Range": ETAG}
        answers = await asyncio.wait_for(asyncio.gather(get(beside, TAIL), get(other, TAIL), get(other, far)),
                                         WAIT)
        assert not video.release.is_set() and video.sent < SIZE
        assert answers[:2] == [tail(), tail()]
        assert answers[2] == (206, f"bytes 3000000-3099999/{SIZE}", BODY[3000000:3100000])
        # (one tail may find the part the other's fetch stored)
        asked = sorted(set(video.seen), key=str)
        assert asked == sorted([(None, None), ("bytes=-16384", ETAG), ("bytes=3000000-3099999", ETAG)], key=str)
        assert video.seen.count((None, None)) == 1
        video.release.set()
        assert await player == (206, f"bytes 0-{SIZE - 1}/{SIZE}", BODY)


async def test_if_range_seeks_of_an_object_over_max_object_never_fetch_it_whole_in_two_workers(
        origin: Origin, tmp_path: Path) -> None:
    """The same with two workers (a worker's range takes the key's lease: the other worker's
    seeks may wait for it, never for a whole fetch)."""
    video = Seekable()
    origin.route("/v.webm", video)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, TOO_LARGE))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        for fields in SEEKS:
            reply = await asyncio.wait_for(proxy.get("/v.webm", headers=fields), WAIT)
            assert reply.status == 206
    finally:
        video.release.set()
        await proxy.stop()
    assert video.whole == 0, video.seen
    assert video.seen == [(f["Range"], f.get("If-Range")) for f in SEEKS]
