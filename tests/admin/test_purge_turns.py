"""A big purge lets clients in while it runs: a purge of thousands of prefixes or URLs, against
a proxy holding thousands of entries, answers plain hits meanwhile, and purges what it names."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.storage import purging
from tests.admin.util import absolute, js, loop_held, memory_passes, settle
from tests.harness import Origin, Proxy


async def fill(origin: Origin, proxy: Proxy, paths: list[str]) -> None:
    for p in paths:
        origin.route(p, body=p, headers={"Cache-Control": "max-age=300"})
    room = asyncio.Semaphore(16)

    async def one(p: str) -> None:
        async with room:
            assert (await proxy.get(p)).status == 200

    await asyncio.gather(*(one(p) for p in paths))
    await settle(proxy)


async def test_a_purge_of_many_prefixes_holds_the_event_loop_for_a_slice_at_a_time_not_seconds(
        origin: Origin, proxy: Proxy) -> None:
    """Every memory record was tested against every prefix, 256 records between two turns of the
    event loop: 20,000 prefixes held clients for half a second at a time. A probe that sleeps 10 ms
    at a time on the proxy's loop now sees the loop's thread spend under 100 ms of CPU between two
    of its wakes (its CPU time, not the clock's: a loaded machine stretches the clock's gaps, a
    full test run's made 257 ms of them; the held loop spent 500-770 ms of CPU at a time)."""
    paths = [f"/p/{i % 10}/{i}" for i in range(1000)] + ["/hot"]
    await fill(origin, proxy, paths)
    prefixes = [absolute(proxy, f"/nothing/{i}/") for i in range(20_000)] + [absolute(proxy, "/p/7/")]
    async with loop_held() as gaps:
        reply = await proxy.admin("POST", "/purge", json={"prefixes": prefixes})
    assert (reply.status, js(reply)["purged"]) == (200, 100), reply.body
    assert max(gaps) < 0.1, f"the loop was held for {max(gaps) * 1000:.0f} ms of CPU at a time"
    for path in ("/p/7/7", "/p/7/997"):
        assert (await proxy.get(path)).x_cache == "MISS", path
    for path in ("/p/6/6", "/p/8/998", "/hot"):
        assert (await proxy.get(path)).x_cache == "HIT", path


async def test_a_purge_of_many_urls_answers_hits_while_it_drops_keys_and_looks_through_memory_once(
        origin: Origin, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of the purge was dropped with no turn of the event loop (10,000 URLs: a second
    without an answer to any client, right before the purge's own), and the memory was looked
    through once per 200 URLs. Slices of no length (``SLICE_SECONDS`` 0: a turn after each key)
    show the order: hits are answered between the first key dropped and the last."""
    paths = [f"/u/{i}" for i in range(3000)]
    await fill(origin, proxy, [*paths, "/hot"])
    monkeypatch.setattr(purging, "SLICE_SECONDS", 0.0, raising=False)
    purges = proxy.runtime.storage.purges
    forget = purges.forget_in_memory
    dropped = 0
    hits: list[int] = []  # keys dropped when each hit was answered
    hitting: list[asyncio.Future[Any]] = []

    def counted(key: str, soft: bool) -> bool:
        nonlocal dropped
        if not hitting:
            hitting.append(asyncio.ensure_future(hit()))
        dropped += 1
        return forget(key, soft)

    async def hit() -> None:
        while dropped < len(paths):
            assert (await proxy.get("/hot")).x_cache == "HIT"
            hits.append(dropped)

    monkeypatch.setattr(purges, "forget_in_memory", counted)
    passes = memory_passes(proxy, monkeypatch)
    reply = await proxy.admin("POST", "/purge", json={"urls": [absolute(proxy, p) for p in paths]})
    assert (reply.status, js(reply)["purged"]) == (200, len(paths)), reply.body
    await hitting[0]
    assert any(0 < n < len(paths) for n in hits), f"no hit was answered while keys were dropped: {hits[:5]}"
    assert passes[0] <= 2, f"{passes[0]} passes over the memory for one purge"
    monkeypatch.undo()
    for path in ("/u/0", "/u/1234", "/u/2999"):
        assert (await proxy.get(path)).x_cache == "MISS", path
    assert (await proxy.get("/hot")).x_cache == "HIT"
