"""Write-behind at a stop and across the ring's drops: what it says is left unwritten or lost is
what the disk lacks, and a stop with time left writes what a shard's lock held back."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.storage.arena import F_FILLER, F_PERSISTED, Arena
from tests.storage.helpers import MB, entry, open_store, store

KEY = "http://h.test/wb"


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
