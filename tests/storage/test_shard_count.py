"""A restart with another ``cache.disk.shards``: the owner moves each entry whose shard changed
(``crc32(key) % shards``) into its new shard before anything is served, and removes the folders
past the count.

Before, the entries whose shard changed were misses (20 of 40 going from 8 shards to 4), the
folders past the count stayed on disk for good, outside the budget, /stats and every purge, and
a URL purged meanwhile came back when the count was changed back."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from proxy.storage.disk import LAYOUT_FILE, MOVING_FILE, shard_folders
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, write_config

pytestmark = pytest.mark.slow

SMALL = 40
LARGE = 6  # bodies kept as files of their own (32 KiB and more)
CHANGED = "cache.disk.shards changed"


def cache(shards: int) -> str:
    return f"cache: {{memory: 8MB, max_object: 1MB, disk: {{path: cache, size: 64MB, shards: {shards}}}}}\n"


def body(path: str) -> bytes:
    size = 100 if path.startswith("/s") else 150 * 1024
    return (path.encode() + b"|") * (size // (len(path) + 1))


PATHS = [f"/s{i}" for i in range(SMALL)] + [f"/l{i}" for i in range(LARGE)]


def route(origin: Origin) -> None:
    for p in PATHS:
        origin.route(p, body=body(p), headers={"Cache-Control": "max-age=600"})


async def start(tmp_path: Path, origin: Origin, shards: int, *args: str) -> ProxyProcess:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache(shards)))
    await proxy.start(*args, with_log=True)
    return proxy


async def statuses(proxy: ProxyProcess) -> dict[str, int]:
    """How many of PATHS answer each X-Cache-Status, every body checked byte for byte."""
    seen: dict[str, int] = {}
    for p in PATHS:
        r = await proxy.get(p)
        assert (r.status, r.body) == (200, body(p)), p
        seen[r.x_cache] = seen.get(r.x_cache, 0) + 1
    return seen


def said(proxy: ProxyProcess) -> list[str]:
    return [line for line in proxy.lines if CHANGED in line]


async def fill(tmp_path: Path, origin: Origin, shards: int) -> None:
    proxy = await start(tmp_path, origin, shards)
    try:
        assert await statuses(proxy) == {"MISS": len(PATHS)}
    finally:
        assert await proxy.stop() == 0
    assert shard_folders(str(tmp_path / "cache")) == list(range(shards))


@pytest.mark.parametrize(("before", "after"), [(8, 4), (4, 8), (1, 2)])
async def test_a_new_shard_count_keeps_every_entry_and_leaves_no_folder_behind(
        origin: Origin, tmp_path: Path, before: int, after: int) -> None:
    route(origin)
    await fill(tmp_path, origin, before)

    proxy = await start(tmp_path, origin, after)
    try:
        # Before: 20 of 40 small and 3 of 6 large URLs were misses going from 8 shards to 4.
        assert await statuses(proxy) == {"HIT": len(PATHS)}
        lines = said(proxy)
        assert len(lines) == 1 and f"({before} -> {after})" in lines[0], proxy.lines
        assert shard_folders(str(tmp_path / "cache")) == list(range(after))
        assert (tmp_path / "cache" / LAYOUT_FILE).read_text().strip() == str(after)
        stats = await proxy.admin("GET", "/stats")
        assert stats.status == 200
        urls = [f"http://{HOST}{p}" for p in PATHS]
        assert (await proxy.admin("POST", "/purge", json={"urls": urls})).status == 200
        assert await statuses(proxy) == {"MISS": len(PATHS)}
        assert (await proxy.admin("POST", "/purge", json={"urls": urls})).status == 200
    finally:
        assert await proxy.stop() == 0
    # Back to the first count: before, the entries left in the folders past the smaller count
    # (never purged) were HITs again.
    proxy = await start(tmp_path, origin, before)
    try:
        assert await statuses(proxy) == {"MISS": len(PATHS)}
    finally:
        assert await proxy.stop() == 0
    assert origin.count("/s0") == 3


async def test_a_restart_with_the_same_count_does_nothing_and_says_nothing(
        origin: Origin, tmp_path: Path) -> None:
    route(origin)
    await fill(tmp_path, origin, 4)
    record = tmp_path / "cache" / LAYOUT_FILE
    written = record.stat().st_mtime_ns
    proxy = await start(tmp_path, origin, 4)
    try:
        assert await statuses(proxy) == {"HIT": len(PATHS)}
        assert said(proxy) == []
    finally:
        assert await proxy.stop() == 0
    assert record.stat().st_mtime_ns == written


async def test_only_the_owner_moves_entries_under_workers(origin: Origin, tmp_path: Path) -> None:
    route(origin)
    await fill(tmp_path, origin, 8)
    proxy = await start(tmp_path, origin, 3, "--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        for _ in range(3):  # (new connections: either worker may answer)
            assert await statuses(proxy) == {"HIT": len(PATHS)}
        assert len(said(proxy)) == 1, proxy.lines
        assert shard_folders(str(tmp_path / "cache")) == [0, 1, 2]
    finally:
        assert await proxy.stop() == 0


# Runs a relayout of the cache directory to SHARDS shards as the owner does at start, and
# SIGKILLs itself at a point of it: after the first copy into a new shard has committed, before
# the old copy is deleted ("between"), or inside the transaction of a copy, some written
# ("inside").
KILLED = """
import os, signal, sys
import proxy.storage.disk as disk
from proxy.storage.index import UrlTagIndex
path, shards, point = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if point == "between":
    disk._delete_entry = lambda shard, key: os.kill(os.getpid(), signal.SIGKILL)
elif point == "rmtree":  # inside the removal of a folder past the count: its cache.db gone
    def partial(path, *args, **kwargs):
        os.remove(os.path.join(path, "cache.db"))
        os.kill(os.getpid(), signal.SIGKILL)
    disk.shutil.rmtree = partial
elif point == "removed":  # once a folder past the count is gone, its entries moved
    rmtree = disk.shutil.rmtree
    def removed(*args, **kwargs):
        rmtree(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    disk.shutil.rmtree = removed
else:
    copy_in, calls = disk.DiskTier._copy_in, [0]
    def counted(self, *args):
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return copy_in(self, *args)
    disk.DiskTier._copy_in = counted
index = UrlTagIndex(path, repair=True)
disk.DiskTier(path, 64 << 20, shards, repair=True).relayout(index.listed)
"""


@pytest.mark.parametrize("point", ["between", "inside"])
@pytest.mark.parametrize(("before", "after"), [(8, 4), (2, 3)])
async def test_a_kill_during_the_move_is_finished_by_the_next_start(
        origin: Origin, tmp_path: Path, point: str, before: int, after: int) -> None:
    route(origin)
    await fill(tmp_path, origin, before)
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED, str(tmp_path / "cache"), str(after), point,
        env=dict(os.environ))
    assert await killed.wait() == -9
    # (not recorded as done: the next start goes over it again)
    assert (tmp_path / "cache" / LAYOUT_FILE).read_text().strip() == str(before)

    proxy = await start(tmp_path, origin, after)
    try:
        assert await statuses(proxy) == {"HIT": len(PATHS)}
        assert len(said(proxy)) == 1, proxy.lines
        assert shard_folders(str(tmp_path / "cache")) == list(range(after))
        stats = await proxy.admin("GET", "/stats")
        assert stats.status == 200
    finally:
        assert await proxy.stop() == 0
    assert origin.count("/s0") == 1 and origin.count("/l0") == 1


async def test_a_start_at_the_old_count_after_a_move_killed_midway_brings_every_entry_home(
        origin: Origin, tmp_path: Path) -> None:
    """A start killed once a folder past the new count was removed (its entries moved into the
    others), then a start at the old count: that count was still the recorded one and no folder
    was past it, so nothing was done, and the moved entries stayed in shards no lookup or purge
    of the old count reads (misses on disk, purges answering 0)."""
    route(origin)
    await fill(tmp_path, origin, 8)
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED, str(tmp_path / "cache"), "4", "removed", env=dict(os.environ))
    assert await killed.wait() == -9
    assert len(shard_folders(str(tmp_path / "cache"))) < 8  # (a folder past 4 went)
    proxy = await start(tmp_path, origin, 8)
    try:
        assert await statuses(proxy) == {"HIT": len(PATHS)}
        assert shard_folders(str(tmp_path / "cache")) == list(range(8))
    finally:
        assert await proxy.stop() == 0
    assert not (tmp_path / "cache" / MOVING_FILE).exists()


async def test_folders_of_the_operators_in_the_cache_directory_are_left_alone(
        origin: Origin, tmp_path: Path) -> None:
    """Any all-digit folder past the count ("123", "2024") was taken for a shard and deleted with
    what it held, and the log said the count had changed (4 -> 4). Only folders holding a shard's
    database are shards."""
    route(origin)
    await fill(tmp_path, origin, 4)
    for name in ("123", "2024"):
        (tmp_path / "cache" / name).mkdir()
        (tmp_path / "cache" / name / "precious.txt").write_text("keep")
    proxy = await start(tmp_path, origin, 4)
    try:
        assert await statuses(proxy) == {"HIT": len(PATHS)}
        assert said(proxy) == []
    finally:
        assert await proxy.stop() == 0
    for name in ("123", "2024"):
        assert (tmp_path / "cache" / name / "precious.txt").read_text() == "keep"


async def test_a_folder_whose_removal_a_kill_cut_short_is_removed_by_the_next_start(
        origin: Origin, tmp_path: Path) -> None:
    """Killed inside the removal of a folder past the count, once its cache.db was gone: the
    folder, no longer a shard's, stayed on disk for good outside every budget. Renamed before it
    is removed, it goes at the next start."""
    route(origin)
    await fill(tmp_path, origin, 8)
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED, str(tmp_path / "cache"), "4", "rmtree", env=dict(os.environ))
    assert await killed.wait() == -9
    proxy = await start(tmp_path, origin, 4)
    try:
        assert await statuses(proxy) == {"HIT": len(PATHS)}
    finally:
        assert await proxy.stop() == 0
    left = sorted(n for n in os.listdir(tmp_path / "cache") if n[:1].isdigit())
    assert left == ["000", "001", "002", "003"], left
