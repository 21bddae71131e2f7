"""A disk shard found damaged while running is seen: /healthz says degraded naming it (one
line), cachegate_disk_shards_damaged counts it, and write-behind skips it quietly.

Before: /healthz said ok and /metrics had nothing of it, while every write-behind batch for
the shard failed (hundreds of storage_errors_total{operation="write"} in seconds, "storing
entries on disk failed; retrying" and "works again" logged again and again)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.runtime import UPKEEP_INTERVAL
from tests.harness import Origin
from tests.storage.procs import HOST
from tests.storage.test_shard_damage_running import (
    damaged_logged,
    fill,
    filled_on_disk,
    purge,
    routes,
    started,
)

pytestmark = pytest.mark.slow


async def test_a_shard_found_damaged_is_in_healthz_and_metrics_and_not_written(
        origin: Origin, tmp_path: Path) -> None:
    routes(origin, 300)
    proxy = await started(origin, tmp_path, shards=2)
    cache = tmp_path / "cache"
    try:
        await filled_on_disk(proxy, cache, range(150))
        db = cache / "000" / "cache.db"
        os.truncate(db, db.stat().st_size // 2)  # damaged while running
        status, answer = await purge(proxy, {"urls": [f"http://{HOST}/k{i}" for i in range(0, 150, 3)]})
        assert status == 200, answer
        assert damaged_logged(proxy), "\n".join(proxy.lines[-20:])
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.admin_url + "/healthz") as r:
                health = await r.json()
            async with s.get(proxy.admin_url + "/metrics") as r:
                metrics = await r.text()
        assert health["status"] == "degraded", health
        assert str(cache / "000") in health["reason"] and "\n" not in health["reason"], health
        assert "cachegate_disk_shards_damaged 1.0" in metrics, \
            [line for line in metrics.splitlines() if "damaged" in line]
        before = len(proxy.lines)
        await fill(proxy, range(150, 300))  # (about half of them for the damaged shard)
        await asyncio.sleep(3)  # (written behind)
        later = proxy.lines[before:]
        assert not [line for line in later if "failed" in line or "Traceback" in line], "\n".join(later)
        r = await proxy.get("/k1", headers={"Host": HOST})
        assert r.status == 200
        assert await proxy.stop(signal.SIGTERM) == 0
    finally:
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop(signal.SIGTERM, wait=30)


def overwrite(db: Path) -> None:
    """Pages of ``db`` past its header overwritten with garbage."""
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(b"\xde\xad" * 40000)


async def test_metrics_stats_and_a_purge_of_everything_go_on_past_a_shard_found_damaged(
        origin: Origin, tmp_path: Path) -> None:
    """A shard overwritten while running: once found damaged, /metrics and /stats read the disk
    tier's volume and count from the other shards (they answered 500, from the damaged shard's
    ``volume``), and a purge of everything sweeps the others (its sweep read every shard, so
    every upkeep round failed from then on and its ban was never done)."""
    routes(origin, 300)
    proxy = await started(origin, tmp_path, shards=2)
    cache = tmp_path / "cache"
    try:
        await filled_on_disk(proxy, cache, range(150))
        overwrite(cache / "001" / "cache.db")  # damaged while running
        for i in range(150):  # (reads of it find the damage)
            await proxy.get(f"/k{i}", headers={"Host": HOST})
        status, answer = await purge(proxy, {"all": True})
        assert status == 200, answer
        await proxy.wait_for(lambda: bool(damaged_logged(proxy)))
        before = len(proxy.lines)
        # Upkeep rounds (each one sweeps the purge's ban): three of them, with room to spare.
        await asyncio.sleep(3 * UPKEEP_INTERVAL + 1)
        async with aiohttp.ClientSession() as s:
            for path in ("/metrics", "/stats"):
                async with s.get(proxy.admin_url + path) as r:
                    assert r.status == 200, (path, await r.text())
                    if path == "/stats":  # (the shard named, with why)
                        shards = (await r.json())["tiers"]["disk"]["shards_damaged"]
                        assert list(shards) == [str(cache / "001")], shards
        later = proxy.lines[before:]
        assert not [line for line in later if "upkeep failed" in line or "Traceback" in line], "\n".join(later)
        for i in range(0, 150, 10):  # purged everywhere: nothing served from before the purge
            r = await proxy.get(f"/k{i}", headers={"Host": HOST})
            assert r.status == 200 and r.headers["X-Cache-Status"] != "HIT", (i, r.headers)
        assert await proxy.stop(signal.SIGTERM) == 0
    finally:
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop(signal.SIGTERM, wait=30)
