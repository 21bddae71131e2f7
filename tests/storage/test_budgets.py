"""Budgets hold: 10x the memory and disk budgets written through a real cachegate process."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, breakdown, disk_usage, rss_bytes, write_config

pytestmark = pytest.mark.slow

MB = 1 << 20
MEMORY, DISK = 4 * MB, 8 * MB
# What a cachegate process takes besides its memory tier: the interpreter with aiohttp,
# uvloop, yaml and prometheus-client loaded (~45 MB), SQLite page caches and mapped
# database pages (bounded by the database sizes), spools of fills in flight, and malloc's
# free lists. Stated in docs/storage.md.
RSS_OVERHEAD = 80 * MB


@pytest.mark.parametrize("policy", ["lru", "lfu"])
async def test_ten_times_the_budgets_leaves_disk_and_rss_within_bounds_and_recent_objects_hit(
        origin: Origin, tmp_path: Path, policy: str) -> None:
    rnd = random.Random(policy)
    sizes = {}
    total = 0
    while total < 10 * DISK:
        i = len(sizes)
        sizes[f"/o/{i}"] = n = rnd.choice((2_000, 9_000, 30_000, 70_000, 150_000))
        total += n

    async def obj(request: web.Request) -> web.Response:
        n = sizes[request.path]
        return web.Response(body=request.path.encode().ljust(n, b"."),
                            headers={"Cache-Control": "max-age=600"})

    for path in sizes:
        origin.route(path, obj)
    cache = f"""\
        cache:
          memory: {MEMORY}
          memory_max_object: 256KB
          memory_policy: {policy}
          max_object: 1MB
          disk: {{path: cache, size: {DISK}, shards: 2}}
        """
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache))
    await proxy.start()
    assert proxy.process is not None
    idle_rss = rss_bytes(proxy.process.pid)
    paths = list(sizes)
    try:
        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector) as s:
            async def fetch(path: str) -> None:
                async with s.get(proxy.url + path, headers={"Host": HOST}) as r:
                    assert r.status == 200
                    assert len(await r.read()) == sizes[path]

            peak_disk = peak_rss = 0
            peak_parts: dict[str, int] = {}
            for start in range(0, len(paths), 32):
                await asyncio.gather(*(fetch(p) for p in paths[start:start + 32]))
                # While writing, too: every 32 objects (about 1.5 MB).
                now_disk = disk_usage(str(tmp_path / "cache"))
                if now_disk > peak_disk:
                    peak_disk, peak_parts = now_disk, breakdown(str(tmp_path / "cache"))
                peak_rss = max(peak_rss, rss_bytes(proxy.process.pid))
        await asyncio.sleep(1.0)  # let the last disk commits land
        rss = rss_bytes(proxy.process.pid)
        usage = disk_usage(str(tmp_path / "cache"))
        print(f"\n{policy}: {len(paths)} objects, {total / MB:.0f} MB written; disk {usage / MB:.2f} MB, "
              f"peak {peak_disk / MB:.2f} MB (budget {DISK / MB:.0f} MB); RSS idle {idle_rss / MB:.0f} MB, "
              f"after {rss / MB:.0f} MB, peak {peak_rss / MB:.0f} MB; at the peak: {peak_parts}")
        assert usage <= DISK * 1.10
        # While writes go on, SQLite's write-ahead logs (folded back every upkeep round) and
        # value files not yet culled add a bounded transient on top.
        assert peak_disk <= DISK * 2
        assert max(rss, peak_rss) <= MEMORY + RSS_OVERHEAD
        # The most recently used objects are still there.
        recent = paths[-8:]
        for path in recent:
            r = await proxy.get(path)
            assert r.x_cache == "HIT", (path, r.x_cache)
            assert len(r.body) == sizes[path]
        # And the oldest are long gone (the budget really was exceeded many times over).
        assert (await proxy.get(paths[0])).x_cache == "MISS"
    finally:
        assert await proxy.stop() == 0
