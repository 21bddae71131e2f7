"""Write-behind at a stop and across the ring's drops: what it says is left unwritten or lost is
what the disk lacks, and a stop with time left writes what a shard's lock held back."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Overrides, load_config
from proxy.storage.arena import F_FILLER, F_PERSISTED, Arena
from proxy.storage.disk import DiskTier
from proxy.web.server import open_runtime
from tests.storage.helpers import MB, entry, open_store, read_body, store

KEY = "http://h.test/wb"

HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


async def test_a_stop_writes_what_a_shard_lock_held_back_once_it_is_let_go_before_the_deadline(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another program held a shard's lock and let it go 1 s into an 8 s stop: the batch in the
    thread timed out, the stop's flush dropped its result and ended, and 143 entries were
    misses after the restart (with a WARNING saying so). Now what failed is tried again until
    the deadline."""
    cache = tmp_path / "cache"
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nupstreams: ['http://127.0.0.1:9']\nadmin: {listen: off}\n"
                      f"cache: {{memory: 16MB, disk: {{path: '{cache}', size: 64MB, shards: 1}}}}\n")
    runtime = await open_runtime(load_config(str(config), Overrides()), owner=True)
    assert runtime is not None
    persister = runtime.storage.persister
    assert persister is not None
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(cache / "000" / "cache.db"), stdout=asyncio.subprocess.PIPE)
    try:
        assert holder.stdout is not None and (await holder.stdout.readline()).strip() == b"locked"
        bodies = {f"{KEY}/{i}": os.urandom(1500) for i in range(20)}
        for k, b in bodies.items():
            assert await store(runtime.storage, entry(k), b, flush=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while persister._committing == 0:  # write-behind's batch is in its thread (lock's wait: 2 s)
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.WARNING):
            closing = asyncio.ensure_future(runtime.close(8.0))  # cancels that batch's flush
            while persister.stats.failed == 0:  # the batch's shard timed out: the lock goes now
                assert loop.time() < deadline + 2 and not closing.done()
                await asyncio.sleep(0.01)
            holder.kill()
            await holder.wait()
            await asyncio.wait_for(closing, 15)
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "were not written to disk" in m], said
    reopened = open_store(str(cache), shards=1)
    try:
        assert [k for k, b in bodies.items() if await read_body(reopened, k) != b] == []
    finally:
        reopened.close()


def test_a_filler_at_the_end_of_a_lap_is_not_counted_as_a_record() -> None:
    """``count`` (what a stop says it left unwritten, the pending-writes gauge) counted the
    unused end of a lap that ``scan`` never yields: a false "1 entries ... not written"."""
    arena = Arena.create(256 * 1024)
    try:
        for i in range(9):  # 8 fit in the lap; the 9th leaves its end to a filler
            arena.put(f"k{i}", b"m", b"x" * 30_000)
        assert any(arena.mm[arena._phys(p) + 30] & F_FILLER for p in _headers(arena))
        assert arena.count() == len(list(arena.scan())) == arena.entries
        assert arena.count(skip=F_PERSISTED) == len(list(arena.scan(skip=F_PERSISTED)))
    finally:
        arena.close()


async def test_the_pending_writes_count_leaves_out_a_filler(tmp_path: Path) -> None:
    s = open_store(str(tmp_path), memory=1 * MB, memory_max_object=256 * 1024)
    try:
        persister = s.persister
        assert persister is not None
        arena = s.memory.arena
        i = 0
        while not any(arena.mm[arena._phys(p) + 30] & F_FILLER for p in _headers(arena, persister._cursor)):
            assert await store(s, entry(f"{KEY}/{i}"), os.urandom(100_000), flush=False)
            i += 1
        pending = len(list(arena.scan(persister._cursor, arena.head, skip=F_PERSISTED)))
        assert persister.backlog() == pending
        await s.flush()
        assert persister.backlog() == 0 and persister.unwritten() == 0
    finally:
        s.close()


def _headers(arena: Arena, start: int = 0) -> list[int]:
    """The positions of every record header from ``start`` to the head, fillers included."""
    out = []
    pos = max(start, arena.tail)
    while pos < arena.head:
        pos = arena._lap(pos)
        if pos >= arena.head:
            break
        out.append(pos)
        pos += arena._size_at(pos)
    return out


async def test_a_record_the_ring_drops_after_a_batch_copied_it_is_lost_only_if_the_batch_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring counted a record lost when it dropped it before write-behind marked it
    persisted, though the batch that had copied it committed it: 1,073 counted lost where 428
    were misses after the restart."""
    s = open_store(str(tmp_path), memory=1 * MB, shards=1)
    try:
        arena = s.memory.arena
        disk = s.disk
        assert disk is not None
        real = DiskTier.commit_many
        flood = [0]

        def dropping(self: DiskTier, items: Sequence[Any], *args: Any, **kwargs: Any) -> list[bool]:
            """The batch copied its records: other writers' records push them out of the ring."""
            while any(arena.find(item[0]) is not None for item in items):
                flood[0] += 1
                arena.put(f"{KEY}/other/{flood[0]}", b"m", b"o" * 8000, flags=F_PERSISTED)
            return real(self, items, *args, **kwargs)

        monkeypatch.setattr(DiskTier, "commit_many", dropping)
        body = os.urandom(3000)
        assert await store(s, entry(f"{KEY}/committed"), body, flush=False)
        await s.flush()
        assert arena.find(f"{KEY}/committed") is None
        assert arena.lost == 0  # (it was counted 1)
        assert await read_body(s, f"{KEY}/committed") == body

        blocker = sqlite3.connect(tmp_path / "000" / "cache.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the batch's shard times out: nothing committed
        try:
            assert await store(s, entry(f"{KEY}/failed"), body, flush=False)
            await s.flush()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert arena.find(f"{KEY}/failed") is None
        assert arena.lost == 1  # dropped, and its batch did not commit it: lost
        assert await read_body(s, f"{KEY}/failed") is None
    finally:
        s.close()

