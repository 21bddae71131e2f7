"""The cache directory removed (or moved away, or made again) under a running cachegate.

Its databases stay open and keep working on the removed files, so no error says it. A reviewer
removed it with ``rm -rf`` under load: nothing noticed (``/healthz`` ok, no error), the open
files held 15 MB out of sight, diskcache made body files again in a directory of the same name
with no database to name them, and the stop wrote an empty index there, which the next start
took for an index of an earlier release. Now the owner's upkeep compares the directory (and its
index) with what it opened, every round: once gone, the disk tier is off in every process
(memory only), said once as an error with what to do, ``/healthz`` says degraded, ``/stats``
and the metrics show it, and nothing is written there any more, not at the stop either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import proxy.runtime
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.storage.helpers import close_proxy
from tests.storage.procs import ProxyProcess, write_config

HOST = {"Host": "site.test"}
# Bodies over 64 KB go to disk at once, from the process that fetched them (never memory).
CONFIG = ("cache: {memory: 16MB, memory_max_object: 64KB, disk: {path: cache, size: 64MB, shards: 2}}\n"
          "shutdown_grace: 1s\n")
SMALL, BIG = b"s" * 1000, os.urandom(200_000)


def pages(origin: Origin, names: list[str]) -> None:
    for name in names:
        origin.route(f"/small/{name}", body=SMALL, headers={"Cache-Control": "max-age=600"})
        origin.route(f"/big/{name}", body=BIG, headers={"Cache-Control": "max-age=600"})


async def health(proxy: Proxy) -> tuple[int, dict[str, str]]:
    reply = await proxy.admin("GET", "/healthz")
    return reply.status, json.loads(reply.body)


@pytest.mark.parametrize("how", ["removed", "made-again"])
async def test_a_cache_directory_removed_while_running_is_said_once_and_never_written_again(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, how: str) -> None:
    monkeypatch.setattr(proxy.runtime, "UPKEEP_INTERVAL", 0.05)
    pages(origin, ["a", "b"])
    running = await make_proxy(config=CONFIG, directory=tmp_path / "p")
    cache = Path(running.cache_dir)
    for path in ("/small/a", "/big/a"):
        assert (await running.get(path, headers=HOST)).status == 200
    for _ in range(100):  # the big body's own write to disk (after its answer) is over
        if not running.runtime.storage.writing("http://site.test/big/a"):
            break
        await asyncio.sleep(0.02)
    assert (await running.get("/big/a", headers=HOST)).x_cache == "HIT"
    await running.runtime.storage.flush()
    caplog.set_level(logging.INFO, logger="cachegate")

    # Removed at once (an ``rm -rf`` takes a while, and what the processes write meanwhile,
    # before the next upkeep round looks, may be left in its way).
    os.rename(cache, tmp_path / "trash")
    shutil.rmtree(tmp_path / "trash")
    if how == "made-again":
        os.mkdir(cache)
    for _ in range(200):
        status, said = await health(running)
        if said["status"] != "ok":
            break
        await asyncio.sleep(0.05)
    assert status == 200 and said["status"] == "degraded", said
    assert str(cache) in said["reason"] and "restart" in said["reason"], said
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(cache) in errors[0].getMessage(), errors
    assert "restart" in errors[0].getMessage() and errors[0].exc_info is None
    stats = json.loads((await running.admin("GET", "/stats")).body)
    assert set(stats["tiers"]["disk"]) == {"gone"} and str(cache) in stats["tiers"]["disk"]["gone"]
    metrics = (await running.admin("GET", "/metrics")).body.decode()
    assert "cachegate_disk_directory_gone 1.0" in metrics

    # Memory only from now on: every answer whole, small bodies kept in memory, nothing on disk.
    for path, body in [("/small/b", SMALL), ("/big/b", BIG), ("/small/b", SMALL), ("/big/b", BIG),
                       ("/big/a", BIG)]:
        reply = await running.get(path, headers=HOST)
        assert (reply.status, reply.body == body) == (200, True), path
    assert (await running.get("/small/b", headers=HOST)).x_cache == "HIT"
    purged = await running.admin("POST", "/purge", json={"all": True})
    assert purged.status == 200, purged.body
    await asyncio.sleep(0.2)  # upkeep rounds
    await close_proxy(running)  # the stop writes nothing there either
    try:
        left: list[str] | None = os.listdir(cache)
    except FileNotFoundError:
        left = None
    assert left == ([] if how == "made-again" else None)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info], caplog.records


@pytest.mark.slow
async def test_a_cache_directory_moved_away_under_workers_is_left_alone_and_kept_for_the_restart(
        origin: Origin, tmp_path: Path) -> None:
    """With workers: each writes big bodies to disk itself, and learns from the shared memory
    that the supervisor found the directory gone (none of them makes it again). Moved back
    after the stop, the directory still has what was stored before it left. (This scenario
    logged a traceback every few seconds, as the upkeep's rounds failed and worked in turn.)"""
    pages(origin, ["a", "b", "c"])
    running = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CONFIG.split("\n")[0] + "\n"))
    await running.start("--workers", "2", with_log=True)
    cache, moved = tmp_path / "cache", tmp_path / "cache.moved"
    try:
        await running.wait_for(lambda: bool(running.admin_url) and len(running.workers) == 2)
        for path in ("/small/a", "/big/a"):
            assert (await running.get(path)).status == 200
        await asyncio.sleep(0.5)  # write-behind's batch
        os.rename(cache, moved)
        for _ in range(100):
            said = json.loads((await running.admin("GET", "/healthz")).body)
            if said["status"] != "ok":
                break
            await asyncio.sleep(0.1)
        assert said["status"] == "degraded" and str(cache) in said["reason"], said
        for _ in range(4):  # new connections: either worker
            for path, body in [("/big/b", BIG), ("/small/c", SMALL), ("/big/c", BIG)]:
                reply = await running.get(path)
                assert (reply.status, reply.body == body) == (200, True), path
        assert not cache.exists()
    finally:
        code = await running.stop()
    text = "\n".join(running.lines)
    assert code == 0, text
    assert not cache.exists(), text  # nor at the stop
    assert text.count(f"the cache directory {cache} is gone") == 1, text
    assert "Traceback" not in text and "storage upkeep failed" not in text, text

    os.rename(moved, cache)  # what the error says may be done before the restart
    again = ProxyProcess(str(tmp_path), running.config_path)
    await again.start()
    try:
        reply = await again.get("/big/a")
        assert (reply.status, reply.x_cache, reply.body == BIG) == (200, "HIT", True)
    finally:
        assert await again.stop() == 0
