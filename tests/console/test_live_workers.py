"""The console's live numbers against ``cachegate run`` as a real process tree: the shared memory
tier counted once however many processes read it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

BODY = 64 * 1024
WAIT = 60.0  # at most this long for the console's once-a-second sampler to see what was sent


async def live(proxy: ProxyProcess) -> dict[str, Any]:
    reply = await proxy.admin("GET", "/console/api/live?since=0&top=1")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = json.loads(reply.body)
    return body


async def stats(proxy: ProxyProcess) -> dict[str, Any]:
    reply = await proxy.admin("GET", "/stats?top=0")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = json.loads(reply.body)
    return body


async def live_until(proxy: ProxyProcess, done: Callable[[dict[str, Any]], bool],
                     seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``/console/api/live`` until ``done`` accepts it, or the last answer after WAIT (every
    answer read is added to ``seen``)."""
    body: dict[str, Any] = {}
    for _ in range(int(WAIT / 0.2)):
        body = await live(proxy)
        if seen is not None:
            seen.append(body)
        if done(body):
            break
        await asyncio.sleep(0.2)
    return body


def since_start(body: dict[str, Any]) -> int:
    return sum(body["since_start"]["requests"].values())


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_shared_memory_tier_is_counted_once_against_the_machines_budget(
        origin: Origin, tmp_path: Path, workers: str) -> None:
    """Every process reads the same shared memory tier (the whole machine's entries, bytes and
    evictions): the console shows what /stats shows, against ``cache.memory`` itself, however
    many workers there are."""
    for i in range(160):  # 10 MB of bodies for a 4 MB memory tier, no disk: evictions
        origin.route(f"/m/{i}", body=bytes([65 + i % 26]) * BODY, headers={"Cache-Control": "max-age=600"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {memory: 4MB, disk: null}\n"))
    await proxy.start("--workers", workers)
    try:
        if workers == "2":
            await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        served = set()
        for i in range(160):
            r = await proxy.get(f"/m/{i}")  # a new connection each: both workers fill some
            assert r.status == 200 and len(r.body) == BODY
            served.add(r.worker)
        if workers == "2":
            assert served == {"0", "1"}
        memory: dict[str, Any] = {}

        def agrees(body: dict[str, Any]) -> bool:
            # Read together with /stats' (nothing is sent meanwhile, so both settle on the same).
            shown = body["storage"]["memory"]
            evictions = sum(p["evictions"] for p in body["points"])
            return (shown["entries"], shown["bytes"], evictions) == (
                memory.get("entries"), memory.get("bytes"), memory.get("evictions"))

        async def settled() -> dict[str, Any]:
            for _ in range(int(WAIT / 0.2)):
                memory.update((await stats(proxy))["tiers"]["memory"])
                body = await live(proxy)
                if agrees(body):
                    return body
                await asyncio.sleep(0.2)
            raise AssertionError(f"/stats memory {memory}, console {body['storage']['memory']}, "
                                 f"evictions in its points {sum(p['evictions'] for p in body['points'])}")

        body = await settled()
        assert memory["evictions"] > 0 and 0 < memory["bytes"] <= 4 << 20
        assert body["storage"]["memory"]["budget"] == 4 << 20  # cache.memory: the machine's
        assert body["last_minute"]["evictions"] <= memory["evictions"]
        assert "disk" not in body["storage"]
        assert body["workers"] == (2 if workers == "2" else None)
    finally:
        await proxy.stop()
