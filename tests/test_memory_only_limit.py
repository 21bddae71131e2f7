"""Without a disk tier the biggest body stored is what one record of the shared memory's ring
holds (half the ring, less the record's header, key and metadata), not half of
``cache.memory`` nor ``memory_max_object``. The threshold is found by asking, as an operator
would: a response just under it is stored (the next request is a HIT); one just over it is
refused up front (``Cache-Status: ...; detail=TOO-LARGE``, counted in
``cachegate_not_stored_total``), or, when no Content-Length said its size, given up as it
streams, and the flight ends as not stored. It used to be answered ``stored`` and be a miss
again at the next request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.settings import ring_body_limit
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, Reply

# memory_max_object (1 MB) and half of cache.memory (512 KiB) are both over what a record of the
# ring holds (a little under 481 KiB here): the ring is the limit.
CONFIG = "cache: {memory: 1MB, memory_max_object: 1MB, disk: null}\n"
CACHEABLE = {"Cache-Control": "max-age=600"}


def chunked(n: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An origin route answering ``n`` bytes with no Content-Length."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=CACHEABLE)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"c" * n)
        await resp.write_eof()
        return resp

    return handler


class Probe:
    """Each size asked twice at a path of its own: the first answer, and whether the second hit."""

    def __init__(self, proxy: Proxy, origin: Origin, with_length: bool) -> None:
        self.proxy, self.origin, self.with_length = proxy, origin, with_length
        self.n = 0

    async def __call__(self, size: int) -> tuple[Reply, Reply]:
        self.n += 1
        path = f"/{'l' if self.with_length else 'c'}{self.n}"
        if self.with_length:
            self.origin.route(path, body=b"l" * size, headers=CACHEABLE)
        else:
            self.origin.route(path, chunked(size))
        first = await self.proxy.get(path)
        second = await self.proxy.get(path)
        assert len(first.body) == len(second.body) == size  # the client gets it whole either way
        return first, second


async def largest_stored(probe: Probe, below: int) -> int:
    """The biggest body size stored (binary search over the last 4 KiB under ``below``)."""
    lo, hi = below - 4096, below + 1
    assert (await probe(lo))[1].x_cache == "HIT"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (await probe(mid))[1].x_cache == "HIT":
            lo = mid
        else:
            hi = mid
    return lo


def too_large(proxy: Proxy) -> float:
    return proxy.runtime.metrics.registry.get_sample_value(
        "cachegate_not_stored_total", {"reason": "TOO-LARGE"}) or 0.0


def passed(proxy: Proxy) -> float:
    return proxy.runtime.metrics.registry.get_sample_value(
        "cachegate_flights_total", {"outcome": "passed"}) or 0.0


async def test_a_response_just_over_what_the_ring_holds_is_refused_up_front_not_said_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=CONFIG)
    ring = ring_body_limit(proxy.runtime.storage.memory.arena.capacity)
    probe = Probe(proxy, origin, with_length=True)
    limit = await largest_stored(probe, ring)
    assert ring - 1024 < limit < ring < 512 * 1024  # the record's key and metadata come off

    first, second = await probe(limit)  # just under: stored, and said so
    assert (first.x_cache, second.x_cache) == ("MISS", "HIT")
    assert first.cache_status.endswith("; stored")

    refused, flights = too_large(proxy), passed(proxy)
    first, second = await probe(limit + 1)  # just over: refused as its head arrives
    assert first.x_cache == second.x_cache == "MISS"
    assert first.cache_status.endswith("detail=TOO-LARGE"), first.cache_status
    assert "stored" not in first.cache_status + second.cache_status
    assert too_large(proxy) == refused + 2 and passed(proxy) == flights + 2
    assert origin.count(f"/l{probe.n}") == 2


async def test_a_body_with_no_length_just_over_what_the_ring_holds_ends_its_flight_not_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=CONFIG)
    ring = ring_body_limit(proxy.runtime.storage.memory.arena.capacity)
    probe = Probe(proxy, origin, with_length=False)
    limit = await largest_stored(probe, ring)
    assert ring - 1024 < limit < ring

    refused, flights = too_large(proxy), passed(proxy)
    fills = proxy.runtime.metrics.registry.get_sample_value("cachegate_flights_total", {"outcome": "filled"})
    first, second = await probe(limit + 1)
    # (Its head went out before its size was known.) Given up as it streamed: counted, not a fill.
    assert first.x_cache == second.x_cache == "MISS"
    assert too_large(proxy) == refused + 2 and passed(proxy) == flights + 2
    assert proxy.runtime.metrics.registry.get_sample_value(
        "cachegate_flights_total", {"outcome": "filled"}) == fills
    assert origin.count(f"/c{probe.n}") == 2
