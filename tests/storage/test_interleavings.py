"""The storage's guarantees when its operations meet others: a 304's metadata or a soft purge
after the ring has gone round, a read during a delete, a reader's mark of a record another
process reclaimed, a write-behind batch that failed, the index's clean-up beside write-behind,
another worker's fill of a key between this process's read of the key and its write.
Nothing is lost, nothing purged comes back, no body is corrupted. (The interleavings are
forced: a hook runs the other side at the moment it matters.)"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from proxy.purge import Purger, PurgeSpec, match_from_json, match_to_json
from proxy.rules import RuleSet
from proxy.storage import upkeep
from proxy.storage.arena import F_PERSISTED, Arena
from proxy.storage.bans import PurgeMatch
from proxy.storage.disk import DiskTier, new_body_id
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import ALL_TO_WRITE, HEAD_OVERHEAD, Cached, MemoryTier
from proxy.storage.tiered import Storage
from tests.storage.helpers import MB, entry, open_store, read_body, store

K = "http://h.test/k"
EN, FR = (("accept-language", "en"),), (("accept-language", "fr"),)
DE = (("accept-language", "de"),)


async def wrap_the_ring(s: Storage) -> None:
    """Fill the shared memory's ring until it has gone round once (its first records reused)."""
    arena, i = s.memory.arena, 0
    while arena.head < arena.capacity + 64 * 1024:
        await store(s, entry(f"http://h.test/f{i}"), b"f" * 2000, flush=False)
        i += 1


def test_a_304_update_after_the_ring_went_round_keeps_the_body(tmp_path: Path) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"), memory=1 * MB)
        await wrap_the_ring(s)
        assert await store(s, entry(K), b"the body" * 100, flush=False)  # not written behind yet
        (c,) = s.memory.peek(K) or ()
        r = c.entry.response
        await s.update_many([c.entry.with_response(dataclasses.replace(r, response_time=r.response_time + 5))])
        (u,) = s.memory.peek(K) or ()
        assert u.body is not None and bytes(u.body) == b"the body" * 100
        assert u.entry.response.response_time == r.response_time + 5
        await s.flush()
        assert await read_body(s, K) == b"the body" * 100
        s.close()

    asyncio.run(main())


def test_a_soft_purge_after_the_ring_went_round_keeps_the_body(tmp_path: Path) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"), memory=1 * MB)
        await wrap_the_ring(s)
        assert await store(s, entry(K), b"the body" * 100, flush=False)
        await s.delete([K], soft=True)
        (u,) = s.memory.peek(K) or ()
        assert u.entry.response.invalidated
        assert u.body is not None and bytes(u.body) == b"the body" * 100
        await s.flush()
        assert await read_body(s, K) == b"the body" * 100
        s.close()

    asyncio.run(main())


def test_the_heads_of_the_other_variants_stay_counted_after_a_fill_of_another(tmp_path: Path) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"))
        s.memory._doorkeeper_keys = 0  # every key kept decoded (the doorkeeper is not the point)
        await store(s, entry(K, vary=EN), b"en" * 100)
        (en,) = s.memory.peek(K) or ()
        for _ in range(8):  # the fast path built heads for this variant
            s.keep_head(K, en, object(), 4000)
        await store(s, entry(K, vary=FR), b"fr" * 100)  # the key's record is written anew
        kept = next(c for c in s.memory.peek(K) or () if c.entry.response.vary == EN)
        assert kept.heads is not None
        held = sum(size + HEAD_OVERHEAD for _, size in kept.heads.items)
        assert s.memory.decoded_bytes >= held
        s.close()

    asyncio.run(main())


def test_a_read_during_a_delete_does_not_bring_the_key_back(tmp_path: Path) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"))
        assert await store(s, entry(K), b"before the POST")
        s.memory.delete(K)  # the ring moved on: on disk only
        assert await s.get(K)  # read from disk once (the doorkeeper knows it now)
        go = threading.Event()
        real = s.purges._purge_shared

        def slow_disk_delete(*args: Any) -> Any:  # the disk's half waits (a shard's lock)
            go.wait(5)
            return real(*args)

        s.purges._purge_shared = slow_disk_delete  # type: ignore[method-assign]
        deleting = asyncio.ensure_future(s.delete([K]))  # an unsafe request invalidates K
        await asyncio.sleep(0.05)
        during = await s.get(K, bodies=True)  # a GET meanwhile, read from disk
        go.set()
        await deleting
        assert during  # (the delete was not over yet)
        assert s.memory.peek(K) is None
        assert await read_body(s, K) is None
        s.close()

    asyncio.run(main())


def test_a_readers_mark_of_a_record_another_process_reclaimed_changes_no_other_body() -> None:
    kb = 1024
    filler = MemoryTier(budget=256 * kb, max_object=10_000)  # another worker, filling
    reader = MemoryTier(budget=256 * kb, max_object=10_000, arena=filler.arena, doorkeeper=0)
    filler.put("http://h/first", (Cached(entry("http://h/first"), b"f" * 500),))
    filler.put("http://h/victim", (Cached(entry("http://h/victim"), b"v" * 3000),))
    slot = reader.slot("http://h/victim")  # alive when the reader looked
    assert slot is not None
    arena, i = filler.arena, 0
    while arena.alive(slot.pos) or arena.head - slot.pos < arena.capacity + 8 * kb:
        k = f"http://h/k{i}"
        filler.put(k, (Cached(entry(k), bytes([65 + i % 26]) * 1000),))
        i += 1
    target = arena._phys(slot.pos) + 31
    assert any(r.body_at <= target < r.body_at + r.body_len for r in arena.scan())  # inside a body now
    before = {r.key: arena.body(r) for r in arena.scan()}
    reader.use(slot)  # counts the use, marks the record it read
    assert {r.key: arena.body(r) for r in arena.scan()} == before


def test_a_failed_write_behind_batch_does_not_hide_a_variant_from_a_purge_by_its_tag(tmp_path: Path) -> None:
    path = str(tmp_path / "c")

    async def main() -> None:
        s = open_store(path)
        assert await store(s, entry(K, vary=EN, tags=("a",)), b"EN body, tag a")  # on disk
        s.memory.delete(K)
        assert len(await s.get(K)) == 1  # read from disk (a key that varies: promoted at once)
        assert await store(s, entry(K, vary=FR, tags=("b",)), b"FR body, tag b", flush=False)
        real = s.disk.commit_many
        s.disk.commit_many = lambda items, new=None, **_: [False] * len(items)  # type: ignore[method-assign]
        await s.flush()  # the shard's lock timed out: nothing committed
        s.disk.commit_many = real  # type: ignore[method-assign]
        assert s.index is not None and K in s.index.keys_for_tag("a")
        async with s.purging():  # a purge of tag "a", as the purger makes it
            _, bans = await s.purge_shared((), tags=["a"])
            match = PurgeMatch(tags=frozenset({"a"}))
            _, start = await s.purge_memory(match)
            await s.purge_local(dataclasses.replace(match, arena_from=start), bans)
        await s.maintain()  # the ban is swept, then dropped
        s.close()
        fresh = open_store(path)  # a restart
        variants = await fresh.get(K)
        assert not any("a" in c.entry.tags for c in variants)
        fresh.close()

    asyncio.run(main())


def test_the_index_clean_up_keeps_the_row_of_a_refill_committed_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upkeep, "GC_SEQ_LAG", 0.0)
    path = str(tmp_path / "cache")

    async def main() -> None:
        st = Storage(MemoryTier(MB, 64 * 1024, arena=Arena.create(MB, 64 * MB), owns_arena=True),
                     DiskTier(path, 64 * MB, 2), UrlTagIndex(path), max_object=MB)
        await st.rebuild_directory()
        disk, index, arena = st.disk, st.index, st.memory.arena
        assert disk is not None and index is not None
        assert await store(st, entry(K, tags=("t",)), b"old")
        disk._shard(K).delete("m:" + K)  # diskcache evicted it (nobody is told)
        assert await store(st, entry(K, tags=("t",)), b"refill", flush=False)
        real_present = disk.present

        def present_then_write_behind_lands(keys: Any) -> set[str]:
            there = real_present(keys)
            st.persister._commit(list(arena.scan(skip=F_PERSISTED)))  # the persist thread, now
            return there

        disk.present = present_then_write_behind_lands  # type: ignore[method-assign]
        await st.maintain()
        disk.present = real_present  # type: ignore[method-assign]
        assert disk.has(K) and index.all_keys() == [K] and arena.on_disk(K)
        st.memory.clear()  # the ring moved on
        assert await read_body(st, K) == b"refill"
        _, bans = await st.purge_shared((), tags=["t"])  # then an operator purges tag t
        await st.purge_local(PurgeMatch(tags=frozenset({"t"})), bans)
        await st.maintain()
        st.close()
        fresh = open_store(path)  # a restart
        assert await read_body(fresh, K) is None
        fresh.close()

    asyncio.run(main())


def test_a_promotion_from_disk_does_not_replace_a_fill_another_process_wrote_meanwhile(tmp_path: Path) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"))
        assert await store(s, entry(K), b"older, on disk")
        s.memory.delete(K)  # the ring moved on
        assert await s.get(K)  # a first disk read (the doorkeeper notes it)
        other = MemoryTier(budget=16 * MB, max_object=MB, arena=s.memory.arena, doorkeeper=0)  # a worker
        real_peek = s.memory.peek

        def peek_then_the_other_fills(key: str) -> Any:
            seen = real_peek(key)
            if key == K and seen is None:  # between this process's look and its promotion
                other.put(K, (Cached(entry(K), b"newer fill", state=ALL_TO_WRITE),))
            return seen

        s.memory.peek = peek_then_the_other_fills  # type: ignore[method-assign]
        assert await s.get(K)  # the second disk read promotes
        s.memory.peek = real_peek  # type: ignore[method-assign]
        (held,) = s.memory.peek(K) or ()
        assert s.memory.body_bytes(held) == b"newer fill"
        s.close()

    asyncio.run(main())


def test_a_put_whose_view_of_another_variant_died_meanwhile_keeps_that_variants_body(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A process putting a body read from disk back into the key's record carries the other
    variants' bodies as views of the record it read; another worker replacing that record at
    the same moment made them unreadable, and a variant not written behind yet was written
    body-less: never committed to disk, and its next hit forgot the whole key."""
    de = (("accept-language", "de"),)
    bodies = {EN: b"en" * 10_000, FR: b"fr" * 10_000, de: b"de" * 10_000}

    async def main() -> None:
        s = open_store(str(tmp_path / "c"))
        for vary in (EN, FR):
            assert await store(s, entry(K, vary=vary), bodies[vary])  # on disk
        s.memory.delete(K)  # the ring moved on
        assert len(await s.get(K)) == 2  # back in memory, metadata only (bodies read when sent)
        assert await store(s, entry(K, vary=de), bodies[de], flush=False)  # not on disk yet
        en = next(c for c in s.memory.peek(K) or () if c.entry.response.vary == EN)
        assert en.body is None
        other = MemoryTier(budget=16 * MB, max_object=MB, arena=s.memory.arena, doorkeeper=0)  # a worker
        real_peek = s.memory.peek
        interleaved = []

        def peek_then_the_other_replaces(key: str) -> Any:
            seen = real_peek(key)
            if key == K and not interleaved:  # between this process's look and its put
                interleaved.append(other.put(K, other.peek(K) or ()))
            return seen

        s.memory.peek = peek_then_the_other_replaces  # type: ignore[method-assign]
        assert await s.open_body(en) == bodies[EN]  # read from disk, put back beside the others
        s.memory.peek = real_peek  # type: ignore[method-assign]
        assert interleaved == [True]
        held = {c.entry.response.vary: c for c in s.memory.peek(K) or ()}
        assert s.memory.body_bytes(held[de]) == bodies[de]
        await s.flush()
        assert "holds no body" not in caplog.text
        s.memory.delete(K)
        for c in await s.get(K):  # from disk: every variant, its own body
            assert await s.open_body(c) == bodies[c.entry.response.vary]
        assert len(await s.get(K)) == 3
        s.close()

    asyncio.run(main())


def another_worker_fills(s: Storage, vary: tuple[tuple[str, str], ...], body: bytes,
                         monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make another worker (its own tier on the same shared memory) store a variant of K beside
    what it finds there, right after this process's next read of K: between its read of the
    key and its write. Whether the other worker's put went in, once it has run."""
    other = MemoryTier(budget=16 * MB, max_object=MB, arena=s.memory.arena, doorkeeper=0)
    real_peek = s.memory.peek
    filled: list[bool] = []

    def peek_then_the_other_fills(key: str) -> Any:
        seen = real_peek(key)
        if key == K and not filled:
            new = Cached(entry(K, vary=vary).with_body(new_body_id(), len(body)), body, state=ALL_TO_WRITE)
            filled.append(bool(other.put(K, (*(other.peek(K) or ()), new))))
        return seen

    monkeypatch.setattr(s.memory, "peek", peek_then_the_other_fills)
    return filled


def test_a_304_update_keeps_a_variant_another_worker_filled_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"))
        assert await store(s, entry(K, vary=EN), b"en" * 100, flush=False)
        (c,) = s.memory.peek(K) or ()
        r = c.entry.response
        filled = another_worker_fills(s, FR, b"fr" * 100, monkeypatch)
        await s.update_many([c.entry.with_response(dataclasses.replace(r, response_time=r.response_time + 5))])
        monkeypatch.undo()
        assert filled == [True]
        held = {v.entry.response.vary: v for v in s.memory.peek(K) or ()}
        assert set(held) == {EN, FR}
        assert held[EN].entry.response.response_time == r.response_time + 5
        assert s.memory.body_bytes(held[EN]) == b"en" * 100
        assert s.memory.body_bytes(held[FR]) == b"fr" * 100
        await s.flush()  # and write-behind commits both
        s.memory.delete(K)
        assert {v.entry.response.vary for v in await s.get(K)} == {EN, FR}
        s.close()

    asyncio.run(main())


def test_a_soft_purge_keeps_a_variant_another_worker_filled_meanwhile_and_marks_it_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"))
        assert await store(s, entry(K, vary=EN), b"en" * 100, flush=False)
        filled = another_worker_fills(s, FR, b"fr" * 100, monkeypatch)
        await s.delete([K], soft=True)
        monkeypatch.undo()
        assert filled == [True]
        held = {v.entry.response.vary: v for v in s.memory.peek(K) or ()}
        assert set(held) == {EN, FR}
        assert all(v.entry.response.invalidated for v in held.values())
        assert s.memory.body_bytes(held[FR]) == b"fr" * 100
        s.close()

    asyncio.run(main())


def test_a_body_read_back_from_disk_keeps_a_variant_another_worker_filled_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        s = open_store(str(tmp_path / "c"))
        for vary in (EN, FR):
            assert await store(s, entry(K, vary=vary), b"on disk")
        s.memory.delete(K)  # the ring moved on
        assert len(await s.get(K)) == 2  # back in memory, metadata only (bodies read when sent)
        en = next(c for c in s.memory.peek(K) or () if c.entry.response.vary == EN)
        assert en.body is None
        filled = another_worker_fills(s, DE, b"de" * 100, monkeypatch)
        assert await s.open_body(en) == b"on disk"  # read from disk (put back beside the others)
        monkeypatch.undo()
        assert filled == [True]
        held = {v.entry.response.vary: v for v in s.memory.peek(K) or ()}
        assert set(held) == {EN, FR, DE}
        assert s.memory.body_bytes(held[DE]) == b"de" * 100
        s.close()

    asyncio.run(main())


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("filler", ["the purging process", "another worker"])
def test_a_fill_that_completes_after_its_url_was_looked_up_does_not_outlive_the_purge(
        tmp_path: Path, filler: str, soft: bool) -> None:
    """A purge by URL looks the URLs' keys up a slice at a time, the event loop running in
    between. A fill of a URL whose slice was already looked up (its response from before the
    purge) completed right then: no step of the purge found it, and after the purge answered
    it was served as a fresh hit, and written behind to disk."""
    path = str(tmp_path / "c")

    async def main() -> None:
        sup = open_store(path)  # the only process, or the supervisor with workers
        worker = sup if filler == "the purging process" else Storage(
            MemoryTier(8 * MB, 64 * 1024, arena=sup.memory.arena), DiskTier(path, 64 * MB, 2),
            UrlTagIndex(path), max_object=16 * MB)
        real = sup.purges.keys_for_urls
        filled: list[bool] = []

        async def looked_up_then_filled(urls: Any, exact: bool = False) -> set[str]:
            urls = list(urls)
            keys = await real(urls, exact)
            if K in urls:  # K's slice is looked up (nothing of K stored yet): the fill completes
                filled.append(await store(worker, entry(K), b"from before the purge", flush=False))
                filled.append(sup.memory.peek(K) is not None)
            return keys

        sup.purges.keys_for_urls = looked_up_then_filled  # type: ignore[method-assign]
        purger = Purger(sup, RuleSet)
        spec = PurgeSpec(urls=("http://h.test/other", K), soft=soft)
        if worker is sup:
            await purger.purge(spec)
        else:  # as the supervisor does it (``Supervisor.purge_here``)
            async with sup.purging():
                _, bans, match = await purger.purge_shared(spec)
                await sup.purge_local(match, bans)
                await worker.purge_local(match_from_json(match_to_json(match)), bans)
        assert filled == [True, True]
        for s in (sup, worker):
            variants = await s.get(K)
            if soft:
                assert variants and all(c.entry.response.invalidated for c in variants)
            else:
                assert variants == ()
        await sup.flush()  # write-behind does not bring it back either
        if worker is not sup:
            worker.close()
        sup.close()
        fresh = open_store(path)  # a restart: the disk only
        variants = await fresh.get(K)
        if soft:
            assert variants and all(c.entry.response.invalidated for c in variants)
        else:
            assert variants == ()
        fresh.close()

    asyncio.run(main())
