"""Long keys hold the disk budget: the URL index's bytes count against ``cache.disk.size``.

diskcache keeps each shard within its share (90 % of ``size``) counting its own pages, but the
index beside it (``index.sqlite3``: every entry's key) is outside that count: distinct URLs with
8,000-byte query strings and tiny bodies grew the directory to 1.9x ``size`` (1,884 MB for a
1 GB budget). The index's bytes past its share now come off the shards' budget, so the
shards evict sooner and the index GC drops the evicted entries' rows."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.settings import SHARD_FLOOR, index_allowance, shard_budget, shard_budget_beside
from proxy.storage import upkeep
from proxy.storage.arena import Arena
from proxy.storage.disk import DiskTier
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import Storage
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.storage.helpers import entry, fetch_all, open_store, read_body, store
from tests.storage.procs import breakdown, disk_usage

MB = 1 << 20
DISK = 4 * MB
PAD = "q" * 8000


@pytest.mark.parametrize(("outside", "budget"), [
    (0, shard_budget(DISK, 2)),  # an index (and journals) within their share take nothing
    (index_allowance(DISK), shard_budget(DISK, 2)),  # (the 10 % reserve less the slack of 1/32)
    (index_allowance(DISK) + 2 * MB, shard_budget(DISK, 2) - MB),  # past it: off the shards, evenly
    (10 * DISK, SHARD_FLOOR),  # never below the floor (and no eighth of the budget above it)
])
def test_the_index_past_its_share_comes_off_the_shards_budget(outside: int, budget: int) -> None:
    assert index_allowance(DISK) == int(DISK * (0.10 - 1 / 32))
    assert shard_budget_beside(DISK, 2, outside) == budget


def test_a_small_shards_budget_stays_above_what_an_empty_shard_takes() -> None:
    """2 MB over 8 shards beside a large index: an eighth of the usual budget (29 KB) is under
    the ~36 KB an empty shard's database takes, and every write's cull emptied the shard of the
    entries it had just answered stored. A budget is never lowered below SHARD_FLOOR (nor raised
    past the usual one)."""
    usual = shard_budget(2 * MB, 8)
    assert usual // 8 < 36 * 1024 < usual < SHARD_FLOOR
    assert shard_budget_beside(2 * MB, 8, 3 * MB) == usual
    assert shard_budget(16 * MB, 8) // 8 < SHARD_FLOOR < shard_budget(16 * MB, 8)
    assert shard_budget_beside(16 * MB, 8, 64 * MB) == SHARD_FLOOR


async def test_long_url_entries_keep_the_directory_within_its_budget(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Index rows are judged once no commit in progress can own them: 10 s, 0.3 s here.
    monkeypatch.setattr(upkeep, "GC_SEQ_LAG", 0.3)

    async def tiny(request: web.Request) -> web.Response:
        return web.Response(body=b"k", headers={"Cache-Control": "max-age=600"})

    origin.route("/k", tiny)
    proxy = await make_proxy(config=f"cache: {{memory: 16MB, disk: {{path: cache, size: {DISK}, shards: 2}}}}\n")
    cache = str(tmp_path / "cache")
    # (a pause after each hundred: write-behind and the upkeep keep up, as between bursts)
    await fetch_all(lambda i: f"{proxy.url}/k?i={i:06d}&p={PAD}", 900, pause=0.3)
    usage = 0
    for _ in range(60):  # the index GC drops the evicted entries' rows, then gives the pages back
        await asyncio.sleep(0.25)
        usage = disk_usage(cache)
        if usage <= DISK * 1.10:
            break
    assert usage <= DISK * 1.10, (usage / MB, breakdown(cache))
    # The newest entries are still kept.
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/k?i={899:06d}&p={PAD}") as r:
        assert r.headers["X-Cache-Status"] == "HIT"


def test_the_index_holds_each_key_once_and_finds_a_urls_keys_by_it(tmp_path: Path) -> None:
    index = UrlTagIndex(str(tmp_path / "cache"))
    try:
        long = [f"http://h.test/k?i={i:06d}&p={PAD}" for i in range(200)]
        index.add_many([(k, ()) for k in long])
        index.checkpoint()
        # The key and its UNIQUE index: about twice its length, not four times (a URL column too).
        assert index.size() < 200 * len(long[0]) * 2.5, index.size()
        keys = ["http://h/a", "http://h/a\x1fh:accept=x", "http://h/a\x1fpart", "http://h/ab", "http://h/a/b"]
        index.add_many([(k, ()) for k in keys])
        assert sorted(index.keys_for_url("http://h/a")) == keys[:3]
        assert index.keys_for_url("http://h/ab") == ["http://h/ab"]
        assert index.keys_for_url(long[7]) == [long[7]]
        assert index.keys_for_url("http://h/") == []
    finally:
        index.close()


def test_an_index_with_a_url_column_loses_it_at_the_owners_start(tmp_path: Path) -> None:
    """An index of an earlier release (a URL column, indexed) keeps its keys and sequence."""
    (tmp_path / "cache").mkdir()
    old = sqlite3.connect(tmp_path / "cache" / "index.sqlite3")
    old.executescript("""
        CREATE TABLE entries (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
                              url TEXT NOT NULL);
        CREATE INDEX entries_url ON entries (url);
        INSERT INTO entries (key, url) VALUES ('http://h/a', 'http://h/a'),
                                              ('http://h/a' || char(31) || 'h:accept=x', 'http://h/a');
    """)
    old.commit()
    old.close()
    index = UrlTagIndex(str(tmp_path / "cache"), repair=True)
    try:
        columns = [r[1] for r in index._db().execute("PRAGMA table_info(entries)")]
        assert columns == ["seq", "key"]
        assert sorted(index.keys_for_url("http://h/a")) == ["http://h/a", "http://h/a\x1fh:accept=x"]
        assert index.add("http://h/b", ()) == 3
    finally:
        index.close()


async def test_what_is_stored_follows_the_shards_budget_in_every_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The biggest body stored is half a shard's budget in force: lowered while the index takes
    more than its share (the owner's upkeep counts it, ``count_index``), in the owner and in a
    worker (which follows what the owner published in the shared memory), and raised again
    once the index has shrunk. A body over it is not stored, as any body over half a shard."""
    path = str(tmp_path / "cache")
    owner = open_store(path, disk_size=DISK, shards=2, memory_max_object=16 * 1024)
    arena = Arena.attach(os.dup(owner.memory.arena.fd))
    worker = Storage(MemoryTier(8 * MB, 16 * 1024, arena=arena, owns_arena=True), DiskTier(path, DISK, 2),
                     UrlTagIndex(path), max_object=16 * MB)
    usual = shard_budget(DISK, 2)
    # An index that holds the shards at their floor, the directory within its size all the same
    # (past it, bodies too big for memory are not stored at all: test_disk_size_bound.py).
    at_floor = index_allowance(DISK) + 2 * (usual - SHARD_FLOOR)
    lowered = shard_budget_beside(DISK, 2, at_floor)
    assert lowered == SHARD_FLOOR
    between = (lowered // 2 + usual // 2) // 2  # stored under the usual budget, not the lowered one
    index_bytes = {"now": 0}
    assert owner.index is not None
    monkeypatch.setattr(owner.index, "size", lambda: index_bytes["now"])
    try:
        assert owner.max_object == worker.max_object == usual // 2
        index_bytes["now"] = at_floor
        await owner.maintain()
        assert owner.max_object == worker.max_object == lowered // 2 < between
        assert worker.room(entry("http://h.test/a")) == lowered // 2
        assert owner.disk is not None and worker.disk is not None
        assert [s.size_limit for s in worker.disk._shards] == [lowered] * 2  # (its culls too)
        assert not await store(worker, entry("http://h.test/big"), b"b" * between)
        assert await read_body(worker, "http://h.test/big") is None
        assert await store(worker, entry("http://h.test/fits"), b"f" * (lowered // 2))
        index_bytes["now"] = 0  # (a purge emptied it)
        await owner.maintain()
        assert owner.max_object == worker.max_object == usual // 2
        assert await store(worker, entry("http://h.test/big"), b"b" * between)
        assert await read_body(owner, "http://h.test/big") == b"b" * between
    finally:
        worker.close()
        owner.close()
