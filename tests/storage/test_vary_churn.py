"""New Vary variants of one key against the shared memory's other keys: what a fill of a new
variant writes into the ring is a small multiple of what it brings, so one client sending a new
``User-Agent`` per request to one page pushes out no more than as many distinct URLs would."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from proxy.storage.entry import Entry
from proxy.storage.memory import OLDER_BODIES, fill_limit
from proxy.storage.persist import MAX_VARIANTS, merge_variant
from proxy.storage.tiered import Storage
from tests.storage.helpers import MB, entry, open_store, read_body, store

KEY = "http://h.test/vary"
OTHERS = 2000
SIZE = 30_000
MISSES = 40


async def churn(s: Storage, misses: int = MISSES, flush_every: int = 0) -> tuple[int, int]:
    """Fill ``OTHERS`` ordinary keys of 1 KB, then ``misses`` new variants of ``KEY`` (``SIZE``
    bytes each): the ring's evictions and the bytes it took during the variants' fills."""
    for i in range(OTHERS):
        assert await store(s, entry(f"http://h.test/o{i}"), b"o" * 1024, flush=False)
    await s.flush()
    ring = s.memory.arena
    evictions, head = ring.evictions, ring.head
    for i in range(misses):
        e = replace(entry(KEY, vary=(("user-agent", f"agent-{i}"),)), stored_at=1000.0 + i)  # (its response's time)
        assert await store(s, e, bytes([65 + i % 26]) * SIZE, flush=bool(flush_every) and i % flush_every == 0)
    return ring.evictions - evictions, ring.head - head


def others_held(s: Storage) -> int:
    return sum(s.memory.peek(f"http://h.test/o{i}") is not None for i in range(OTHERS))


async def test_without_a_disk_tier_new_variants_of_one_key_push_out_no_other_key() -> None:
    """Memory only, 40 misses of 30 KB with a new User-Agent each (1.2 MB from the origin): each
    rewrote the key's record with up to 1/64 of the ring of the older variants' bodies, and the
    ring's 2,000 other keys were all pushed out (every one a miss again)."""
    s = open_store(None, memory=16 * MB, memory_max_object=MB)
    try:
        evicted, written = await churn(s)
        assert evicted == 0 and others_held(s) == OTHERS
        # What the ring took: each fill its own body and as much of the older ones at most
        # (and the variants' metadata), not a megabyte.
        assert written <= MISSES * (1 + OLDER_BODIES) * SIZE + MISSES * MAX_VARIANTS * 512
        variants = s.memory.peek(KEY) or ()
        assert sum(len(c.body) for c in variants if c.body is not None) <= fill_limit(SIZE, MB)
        # The newest are hits, the older ones past the bound misses (asked of the origin again).
        assert await read_body(s, KEY, len(variants) - 1) == bytes([65 + (MISSES - 1) % 26]) * SIZE
        assert len(variants) == 1 + OLDER_BODIES
    finally:
        s.close()


@pytest.mark.parametrize("flush_every", [0, 7, 1], ids=["within-one-interval", "written-behind-now-and-then",
                                                       "each-written-behind"])
async def test_with_a_disk_tier_new_variants_of_one_key_push_out_no_other_key_and_lose_none(
        tmp_path: Path, flush_every: int) -> None:
    """With a disk tier, the older variants' bodies on disk keep their metadata only in the
    record; those not written behind yet stayed in it (up to 4 × memory_max_object), so 40
    misses within one write-behind interval rewrote all the earlier ones each time: 1 MB
    records, and the other keys pushed out. Now such a fill's body goes to disk at once (as a
    bigger body's does), and none of the variants is lost: the disk keeps the same newest 32
    as the record (a fill committed to disk at once before an older one written behind made the
    disk keep that older one and drop a newer one, a miss that the record still listed)."""
    s = open_store(str(tmp_path / "cache"), memory=16 * MB, memory_max_object=MB)
    try:
        evicted, written = await churn(s, flush_every=flush_every)
        assert evicted == 0 and others_held(s) == OTHERS
        assert written <= MISSES * (1 + OLDER_BODIES) * SIZE + MISSES * MAX_VARIANTS * 512
        await s.flush()
        variants = await s.get(KEY)
        assert len(variants) == MAX_VARIANTS  # the newest 32 (as before): every one with its body
        for i, c in enumerate(variants):
            n = MISSES - MAX_VARIANTS + i
            assert c.entry.response.vary == (("user-agent", f"agent-{n}"),)
            assert await read_body(s, KEY, i) == bytes([65 + n % 26]) * SIZE, n
    finally:
        s.close()


async def test_a_key_of_small_variants_keeps_several_bodies_in_its_record() -> None:
    """The floor: a key whose variants are a few KB each keeps a handful of bodies together."""
    s = open_store(None, memory=16 * MB, memory_max_object=MB)
    try:
        for i in range(12):
            assert await store(s, entry(KEY, vary=(("user-agent", f"a{i}"),)), b"s" * 2000)
        variants = s.memory.peek(KEY) or ()
        # 2 KB and 16 KB of the older ones: the newest nine (memory only: the others are misses)
        assert [c.entry.response.vary for c in variants] == [(("user-agent", f"a{i}"),) for i in range(3, 12)]
        assert all(c.body is not None for c in variants)
    finally:
        s.close()


async def test_variants_filled_faster_than_write_behind_are_none_of_them_lost(tmp_path: Path) -> None:
    """Six 50 KB variants at once with a 64 KB memory_max_object: the record kept the bodies not
    written behind yet up to 4 × that, and the oldest was left out before it reached the disk
    (answered stored, a miss afterwards). Now the fills past what the record may carry go to
    disk at once."""
    s = open_store(str(tmp_path / "cache"), memory_max_object=64 * 1024)
    try:
        for i in range(6):
            assert await store(s, entry(KEY, vary=(("user-agent", f"a{i}"),)), bytes([65 + i]) * 50_000,
                               flush=False)
        await s.flush()
        variants = await s.get(KEY)
        assert [c.entry.response.vary for c in variants] == [(("user-agent", f"a{i}"),) for i in range(6)]
        for i in range(6):
            assert await read_body(s, KEY, i) == bytes([65 + i]) * 50_000, i
    finally:
        s.close()


def test_the_disk_places_a_variant_written_behind_late_among_those_stored_before_and_after_it() -> None:
    def v(n: int) -> Entry:
        return replace(entry(KEY, vary=(("user-agent", f"a{n}"),)), body_id=f"b{n}", stored_at=1000.0 + n)

    on_disk = tuple(v(n) for n in range(2, 2 + MAX_VARIANTS))  # committed by their workers at once
    kept, dropped = merge_variant(on_disk, v(0), in_order=True)  # older, written behind since
    assert [e.body_id for e in kept] == [e.body_id for e in on_disk]  # the oldest goes: itself,
    assert dropped == ["b0"]  # as the record had dropped it (a newer one gone: a listed miss)
    kept, dropped = merge_variant(on_disk[1:], v(0), in_order=True)
    assert [e.body_id for e in kept] == ["b0", *(e.body_id for e in on_disk[1:])] and dropped == []
    kept, dropped = merge_variant(on_disk, v(0))  # the shared memory's merge: the newest last
    assert kept[-1].body_id == "b0" and dropped == ["b2"]
