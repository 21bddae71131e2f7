"""The cache directory stays within ``cache.disk.size`` whatever its entries carry.

An origin whose responses carry ~1,000 tags (each entry's metadata holds its tags and its
Cache-Tag field, ~30 KB, and the index a row per tag) grew a 100 MB directory to 3.8 GB in
three minutes: a write's cull counted 200 bytes of metadata for each entry it had written and
stopped after 50 ms, the index's rows of culled entries stayed until its GC came round, and
nothing held the shards and the index together against the size. Now an entry costs what it
takes (its metadata and its index rows), a cull drops its entries' index rows at once, and
while the shards and the index are over their room new entries stay in memory only."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.storage.helpers import entry, fetch_all, open_store, read_body, store
from tests.storage.procs import breakdown, disk_usage

MB = 1 << 20
SIZE = 32 * MB
# What the directory may hold at any moment (docs/storage.md): the size, and a sixteenth more
# (``proxy.settings.SIZE_SLACK`` past it before new entries stay off the disk, and one
# write-behind part of as much before its culls).
BOUND = SIZE * (1 + 1 / 16)


def thousand_tags(i: int) -> str:
    return ", ".join(f"p{i}-t{n:03d}" for n in range(1000))


async def test_responses_with_a_thousand_tags_keep_the_directory_within_its_size(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    async def tagged(request: web.Request) -> web.Response:
        i = int(request.query["i"])
        return web.Response(body=b"ok", headers={"Cache-Control": "max-age=600", "Cache-Tag": thousand_tags(i)})

    origin.route("/t", tagged)
    proxy = await make_proxy(config=f"cache: {{memory: 16MB, disk: {{path: cache, size: {SIZE}, shards: 2}}}}\n")
    cache = str(tmp_path / "cache")
    peak = {"bytes": 0, "parts": {}}
    sampling = True

    async def sample() -> None:  # every file of the directory: shards, index, their journals
        while sampling:
            usage = disk_usage(cache)
            if usage > peak["bytes"]:
                peak["bytes"], peak["parts"] = usage, breakdown(cache)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:  # (each answer carries its 16 KB Cache-Tag)
        await fetch_all(lambda i: f"{proxy.url}/t?i={i}", 1500, max_field_size=32 * 1024)
        await proxy.runtime.storage.flush()  # what write-behind has not written yet
        await asyncio.sleep(1.5)  # an upkeep round or so
    finally:
        sampling = False
        await sampler
    assert peak["bytes"] <= BOUND, f"{peak['bytes'] / MB:.2f} MB: {peak['parts']}"
    disk = proxy.runtime.storage.disk
    assert disk is not None and disk.count() > 0  # (the disk tier still takes entries)


async def test_while_the_disk_is_over_its_size_new_entries_stay_in_memory_and_a_warning_says_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Past cache.disk.size by more than its slack (an index that culls cannot shrink at once,
    here one said to take 5 MB of 4), new keys are kept in memory only (served, purged there,
    never written to disk), a body too big for memory is not stored (DISK-OVER-SIZE), a key
    the disk holds is still rewritten (its older response must not come back), and a warning
    says so once; back within the size, new entries go to disk again."""
    path = str(tmp_path / "cache")
    s = open_store(path, disk_size=4 * MB, shards=2, memory_max_object=64 * 1024)
    assert s.index is not None and s.disk is not None
    index_bytes = {"now": 0}
    monkeypatch.setattr(s.index, "size", lambda: index_bytes["now"])
    held = "http://h.test/held"
    try:
        assert await store(s, entry("http://h.test/kept"), b"old")
        assert s.disk.has("http://h.test/kept")
        index_bytes["now"] = 5 * MB
        with caplog.at_level(logging.INFO, "cachegate.storage"):
            await s.maintain()
            assert s.disk.full and s.memory.arena.disk_full
            assert await store(s, entry(held), b"memory")
            assert await read_body(s, held) == b"memory"  # (from memory)
            assert not s.disk.has(held) and s.index.keys_for_url(held) == []
            big = entry("http://h.test/big")
            spool = s.spool(big, 100_000)
            assert await spool.write(b"b" * 100_000)
            assert s.finalize(big, spool) is None and spool.refused == "DISK-OVER-SIZE"
            assert await store(s, entry("http://h.test/kept"), b"new")
            kept = s.disk.get_variants("http://h.test/kept")
            assert [s.disk.get_body("http://h.test/kept", v.body_id, v.body_size) for v in kept] == [b"new"]
            await s.maintain()
            await s.flush()
            index_bytes["now"] = 0
            await s.maintain()
            assert not s.disk.full and not s.memory.arena.disk_full
        said = [r for r in caplog.records if "cache.disk.size" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.WARNING, logging.INFO], [r.getMessage() for r in said]
        assert "new entries are kept in memory only" in said[0].getMessage()
        assert await store(s, entry("http://h.test/after"), b"a")
        assert s.disk.has("http://h.test/after")
        assert s.persister is not None and s.persister.stats.held_back == 1
    finally:
        s.close()


async def test_an_entry_a_cull_takes_leaves_the_index_with_it(tmp_path: Path) -> None:
    """The index rows of entries a write's cull took go at once, not when the index GC comes
    round (after 10 s and a lap of the index): meanwhile the index held every culled entry's
    rows, 1,000 tags each, gigabytes beside a 100 MB cache.disk.size."""
    path = str(tmp_path / "cache")
    s = open_store(path, disk_size=4 * MB, shards=2)
    assert s.index is not None and s.disk is not None
    try:
        for i in range(300):
            tags = tuple(f"e{i}-t{n:02d}" for n in range(20))
            assert await store(s, entry(f"http://h.test/e{i}", tags=tags), b"x" * 16384)
        on_disk = set(s.disk.iter_keys())
        assert 0 < len(on_disk) < 300  # (culled: 4 MB holds fewer)
        assert set(s.index.all_keys()) == on_disk
        assert s.index.count_tag("e0-t00") == 0 and s.index.count_tag("e299-t00") == 1
    finally:
        s.close()
