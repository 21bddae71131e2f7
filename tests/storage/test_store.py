"""The store's contract on every tier set-up, and what the disk tier adds: sharing between
processes, bans and their sweeping, index upkeep, orphans, lock timeouts."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.storage import upkeep
from proxy.storage.arena import Arena
from proxy.storage.bans import PurgeMatch
from proxy.storage.disk import DiskTier, new_body_id
from proxy.storage.entry import Entry
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import Cached, MemoryTier
from proxy.storage.spool import SpoolDir, sweep_dead_spools
from proxy.storage.tiered import Storage
from proxy.storage.writes import BodySpool
from tests.storage.helpers import MB, entry, open_store, read_body, store

KEY = "http://h.test/a"


@pytest.fixture(params=["memory", "memory+disk"])
async def s(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "memory":
        st = open_store(None, memory_max_object=MB)
    else:
        st = open_store(str(tmp_path / "cache"))
    yield st
    st.close()


@pytest.fixture
async def disk_store(tmp_path: Path) -> AsyncIterator[Storage]:
    st = open_store(str(tmp_path / "cache"))
    yield st
    st.close()


# -- the contract: every set-up ------------------------------------------------------------

async def test_a_committed_body_reads_back_byte_for_byte(s: Storage) -> None:
    small, large = os.urandom(1000), os.urandom(300_000)
    assert await store(s, entry(KEY), small)
    assert await store(s, entry(KEY + "/large"), large)
    assert await read_body(s, KEY) == small
    assert await read_body(s, KEY + "/large") == large
    (c,) = await s.get(KEY)
    assert (c.entry.body_size, c.entry.url) == (1000, KEY)


async def test_variants_of_a_key_are_kept_side_by_side_and_replaced_by_vary_values(s: Storage) -> None:
    gz = entry(KEY, vary=(("accept-encoding", "gzip"),))
    br = entry(KEY, vary=(("accept-encoding", "br"),))
    assert await store(s, gz, b"gzip-1")
    assert await store(s, br, b"br-1")
    assert await store(s, gz, b"gzip-2")
    variants = await s.get(KEY)
    bodies = sorted([(await s.open_body(c)) for c in variants])  # type: ignore[type-var]
    assert bodies == [b"br-1", b"gzip-2"]


async def test_variants_freshened_together_are_written_once_in_memory_and_on_disk(s: Storage) -> None:
    """A revalidation's variants (the one answered, and those with its strong ETag) were each
    written on their own: a record of the key, every body in it, per variant."""
    langs = ("en", "de", "fr")
    for lang in langs:
        assert await store(s, entry(KEY, vary=(("accept-language", lang),)), lang.encode() * 1000)
    arena = s.memory.arena
    commits: list[str] = []
    if s.disk is not None:
        real = s.disk.commit
        s.disk.commit = lambda key, merge: commits.append(key) or real(key, merge)  # type: ignore[method-assign]

    def later(variants: tuple[Cached, ...], by: float) -> list[Entry]:
        return [c.entry.with_response(dataclasses.replace(c.entry.response, response_time=by)) for c in variants]

    written = arena.head
    await s.update_many(later(await s.get(KEY), 2000.0))
    assert arena.head - written < 2 * 3000 + 4096  # one record (three records: 18 KB)
    assert sorted(c.entry.response.response_time for c in await s.get(KEY)) == [2000.0] * 3
    if s.disk is not None:
        await s.flush()
        freshened = later(await s.get(KEY), 3000.0)
        s.memory.delete(KEY)  # the disk alone holds the key now: written there at once
        await s.update_many(freshened)
        assert commits == [KEY]  # one commit (it was one per variant)
        s.memory.delete(KEY)
        variants = await s.get(KEY)
        assert sorted(c.entry.response.response_time for c in variants) == [3000.0] * 3
        assert sorted([await s.open_body(c) for c in variants]) == [b"de" * 1000, b"en" * 1000, b"fr" * 1000]


async def test_an_incomplete_body_is_never_stored(s: Storage) -> None:
    spool = s.spool(entry(KEY), 1000)
    await spool.write(b"x" * 600)  # the upstream broke off here
    assert s.finalize(entry(KEY), spool) is None
    assert await s.get(KEY) == ()


async def test_a_body_over_max_object_is_not_stored(s: Storage) -> None:
    s.max_object = 100_000
    assert not await store(s, entry(KEY), b"x" * 150_000)
    spool = s.spool(entry(KEY), None)  # no Content-Length: found out while streaming
    assert await spool.write(b"x" * 90_000)
    assert not await spool.write(b"x" * 20_000)
    assert await s.get(KEY) == ()


async def test_purges_by_url_tag_prefix_and_all_hard_and_soft(s: Storage) -> None:
    for i, tags in enumerate([("red",), ("red", "blue"), ("blue",), ()]):
        assert await store(s, entry(f"http://h.test/p/{i}", tags=tags), b"b%d" % i)

    async def purge(match: PurgeMatch) -> None:
        _, bans = await s.purge_shared(match.keys, match.prefixes, match.tags, match.all, match.soft)
        await s.purge_local(match, bans)

    await purge(PurgeMatch(tags=frozenset({"red"}), soft=True))
    for i in (0, 1):
        (c,) = await s.get(f"http://h.test/p/{i}")
        assert c.entry.response.invalidated
    await purge(PurgeMatch(tags=frozenset({"blue"})))
    assert await s.get("http://h.test/p/1") == () and await s.get("http://h.test/p/2") == ()
    await purge(PurgeMatch(keys=frozenset({"http://h.test/p/3"})))
    assert await s.get("http://h.test/p/3") == ()
    await purge(PurgeMatch(prefixes=("http://h.test/p/",)))
    assert await s.get("http://h.test/p/0") == ()
    assert await store(s, entry(KEY), b"again")
    await purge(PurgeMatch(all=True))
    assert await s.get(KEY) == ()
    assert await store(s, entry(KEY), b"after")  # a purge does not block later stores
    assert await read_body(s, KEY) == b"after"


async def test_a_fill_in_flight_when_a_purge_arrives_is_not_stored(s: Storage) -> None:
    e = entry(KEY, tags=("t",))
    spool = s.spool(e, 10)
    await spool.write(b"01234")
    await s.purge_local(PurgeMatch(tags=frozenset({"t"})))
    await spool.write(b"56789")
    assert s.finalize(e, spool) is None
    assert await s.get(KEY) == ()


# -- the disk tier ---------------------------------------------------------------------------

async def test_a_large_body_streams_from_a_file_and_only_its_metadata_enters_memory(
        disk_store: Storage) -> None:
    body = os.urandom(500_000)  # over memory_max_object (64 KiB)
    assert await store(disk_store, entry(KEY), body)
    (c,) = await disk_store.get(KEY)
    assert c.body is None  # metadata in memory, body on disk
    f = await disk_store.open_body(c)
    assert f is not None and not isinstance(f, bytes)
    with f:
        assert f.read(1000) == body[:1000]  # read in pieces, not loaded whole
        assert f.read() == body[1000:]


async def test_two_processes_share_the_disk_and_a_purge_reaches_both(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    a, b = open_store(path), open_store(path)
    try:
        assert await store(a, entry(KEY, tags=("t",)), b"shared")
        for _ in range(2):  # b reads it from the shared disk; the second read puts it in b's memory
            assert await read_body(b, KEY) == b"shared"
        assert b.memory.peek(KEY) is not None
        count, bans = await a.purge_shared((), tags=["t"])
        assert count == 1
        await a.purge_local(PurgeMatch(tags=frozenset({"t"})), bans)
        await b.purge_local(PurgeMatch(tags=frozenset({"t"})), bans)  # what the supervisor asks
        assert await b.get(KEY) == () and await a.get(KEY) == ()
        c = open_store(path)  # a process started later reads the ban from the index
        try:
            assert await c.get(KEY) == ()
        finally:
            c.close()
    finally:
        a.close()
        b.close()


async def test_a_purge_waits_for_a_disk_write_in_progress_and_removes_it(disk_store: Storage) -> None:
    e = entry(KEY, tags=("t",))
    spool = disk_store.spool(e, None)
    await spool.write(os.urandom(3 * MB))
    final = disk_store.finalize(e, spool)
    assert final is not None
    writing = asyncio.ensure_future(disk_store.put_disk(final, spool))
    await asyncio.sleep(0)  # the write has started in the executor
    assert disk_store.work.writes
    since = time.monotonic()  # as the purger takes it: a write that ends during the shared half is late
    _, bans = await disk_store.purge_shared([KEY], tags=["t"])
    await disk_store.purge_local(PurgeMatch(keys=frozenset({KEY}), tags=frozenset({"t"}), since=since), bans)
    await writing
    assert await disk_store.get(KEY) == ()
    assert disk_store.disk is not None and not disk_store.disk.has(KEY)


async def test_upkeep_sweeps_bans_into_deletions_and_then_drops_the_ban(
        disk_store: Storage, tmp_path: Path) -> None:
    for i in range(30):
        assert await store(disk_store, entry(f"http://h.test/{i}", tags=("even",) if i % 2 == 0 else ()),
                           b"x" * (i * 1000))
    _, bans = await disk_store.purge_shared((), tags=["even"])
    await disk_store.purge_local(PurgeMatch(tags=frozenset({"even"})), bans)
    assert await store(disk_store, entry("http://h.test/0", tags=("even",)), b"new")  # after the ban
    await disk_store.maintain()
    index, disk = disk_store.index, disk_store.disk
    assert index is not None and disk is not None
    assert index.bans() == [] and len(disk_store.bans) == 0
    assert index.keys_for_tag("even") == ["http://h.test/0"]
    assert disk.has("http://h.test/0") and not disk.has("http://h.test/2") and disk.has("http://h.test/1")
    fresh = open_store(str(tmp_path / "cache"))  # no ban any more, and nothing reappears
    try:
        assert await fresh.get("http://h.test/2") == ()
        assert await read_body(fresh, "http://h.test/0") == b"new"
    finally:
        fresh.close()


async def test_index_rows_of_entries_diskcache_evicted_are_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upkeep, "GC_SEQ_LAG", 0.0)
    st = open_store(str(tmp_path / "cache"), disk_size=2 * MB, shards=2)
    assert st.disk is not None
    # The culls are not told (as when the index was locked when one ended, or diskcache evicted
    # on its own): the index GC drops the rows left. (Told, a cull drops them at once:
    # test_disk_size_bound.py.)
    st.disk.on_evicted = None
    try:
        stored = [f"http://h.test/{i}" for i in range(200)]
        for k in stored:  # 200 x 40 KB in two 0.9 MB shards: most are evicted
            assert await store(st, entry(k), os.urandom(40_000))
        index, disk = st.index, st.disk
        assert index is not None and disk is not None
        assert index.count() == 200
        await st.maintain()
        held = {k for k in stored if disk.has(k)}
        assert set(index.all_keys()) == held and 0 < len(held) < 60  # the live rows all stay
    finally:
        st.close()


def test_which_keys_the_disk_holds_is_asked_in_chunks_per_shard_and_agrees_with_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.storage import disk as disk_module
    monkeypatch.setattr(disk_module, "PRESENT_CHUNK", 7)  # several chunks per shard
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=3)
    try:
        stored = [f"http://h.test/{i}/é" for i in range(60)]
        for k in stored:
            e = entry(k).with_body(new_body_id(), 1)
            assert disk.put_body(k, e.body_id, b"x")  # (a commit names a body the disk holds)
            assert disk.commit(k, lambda current, e=e: ((e,), []))
        disk.delete_keys(stored[::5])  # gone again
        disk._shards[0].set("b:some-body", b"a body is not a key")
        asked = [*stored, "http://h.test/never", "some-body"]
        present = disk.present(asked)
        assert present == {k for k in asked if disk.has(k)}
        assert len(present) == 48 and disk.present([]) == set()
    finally:
        disk.close()


async def test_orphan_bodies_and_files_from_a_crash_are_swept(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    disk = DiskTier(path, 64 * MB, shards=1)
    try:
        old = time.time() - 3600
        # A crash between "body written" and "metadata written", long ago and just now:
        assert disk.put_body(KEY, new_body_id(old), os.urandom(100_000))
        young = new_body_id()
        assert disk.put_body(KEY, young, os.urandom(100_000))
        # A file diskcache wrote but never committed a row for:
        stray = _stray_file(path, old)
        st = Storage(MemoryTier(MB, 1000), disk, None, max_object=MB)
        assert await store(st, entry(KEY), os.urandom(100_000))  # a referenced body
        removed = disk.sweep_orphans(before=time.time() - 600)
        assert removed == 2
        assert stray not in _val_files(path)
        kept = disk.get_body(KEY, young)  # may be a write in progress: kept
        assert kept is not None and not isinstance(kept, bytes)
        kept.close()
        assert await read_body(st, KEY) is not None
        st.close()
    finally:
        disk.close()


def _stray_file(path: str, mtime: float) -> str:
    stray = os.path.join(path, "000", "ab", "cd", "0123456789abcdef0123456789ab.val")
    os.makedirs(os.path.dirname(stray))
    with open(stray, "wb") as f:
        f.write(b"x" * 50_000)
    os.utime(stray, (mtime, mtime))
    return stray


def _val_files(path: str) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.endswith(".val")}


def test_spool_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    root = str(tmp_path / "tmp")
    mine = SpoolDir(root)
    code = ("import os, sys; from proxy.storage.spool import SpoolDir; "
            "d = SpoolDir(sys.argv[1]); f = d.make_file(); f.write(b'x' * 1000); f.flush(); "
            "os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code, root], check=False)
    assert len(os.listdir(root)) == 2
    assert sweep_dead_spools(root) == 1
    assert os.listdir(root) == [os.path.basename(mine.path)]
    mine.close()


async def test_a_body_a_killed_writer_left_without_metadata_is_swept_from_its_intent_log(
    tmp_path: Path,
) -> None:
    """Only the dead process's pending intents are checked: no scan of every metadata record."""
    path, root = str(tmp_path / "cache"), str(tmp_path / "cache" / "tmp")
    code = ("import os, sys; from proxy.storage.disk import DiskTier; from proxy.storage.spool import SpoolDir\n"
            "disk = DiskTier(sys.argv[1], 64 << 20, shards=1); spools = SpoolDir(sys.argv[2])\n"
            "spools.intend('http://h.test/gone', 'b1'); spools.settle('b1')\n"
            "spools.intend(sys.argv[3], 'b2'); disk.put_body(sys.argv[3], 'b2', b'y' * 40000)\n"
            "os.kill(os.getpid(), 9)")
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code, path, root, KEY], check=False)
    disk = DiskTier(path, 64 * MB, shards=1)
    try:
        orphan = disk.get_body(KEY, "b2")  # a body no metadata refers to
        assert orphan is not None and not isinstance(orphan, bytes)
        orphan.close()
        seen: list[list[tuple[str, str]]] = []

        def check(intents: list[tuple[str, str]]) -> None:
            seen.append(intents)
            assert disk.sweep_intents(intents) == 1

        assert sweep_dead_spools(root, check) == 1
        assert seen == [[("http://h.test/gone", "b1"), (KEY, "b2")]]
        assert disk.get_body(KEY, "b2") is None
    finally:
        disk.close()


async def test_a_write_that_times_out_on_the_shard_lock_is_counted_and_not_stored(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    st = Storage(MemoryTier(MB, 1000), DiskTier(path, 64 * MB, shards=1, timeout=0.05),
                 UrlTagIndex(path), max_object=MB)
    blocker = sqlite3.connect(os.path.join(path, "000", "cache.db"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the shard's write lock
        big = b"a body too big for memory, written to disk by this process" * 100
        assert not await store(st, entry(KEY), big)
        assert st.failed_writes == 1
        blocker.execute("ROLLBACK")
        assert st.disk is not None and not st.disk.has(KEY)
        assert await store(st, entry(KEY), big)  # and works again once the lock is free
    finally:
        blocker.close()
        st.close()


async def test_a_read_during_this_process_s_disk_write_of_a_big_body_waits_for_it(
        disk_store: Storage) -> None:
    e = entry(KEY)
    spool = disk_store.spool(e, None)
    body = os.urandom(3 * MB)  # too big for memory: visible only once on disk
    await spool.write(body)
    final = disk_store.finalize(e, spool)
    assert final is not None
    assert not disk_store.put_memory(final, spool)
    writing = asyncio.ensure_future(disk_store.put_disk(final, spool))
    await asyncio.sleep(0)
    assert disk_store.work.writes
    assert await read_body(disk_store, KEY) == body  # not a miss
    assert await writing


async def test_a_fill_that_reaches_the_disk_between_a_purges_two_halves_is_undone(tmp_path: Path) -> None:
    """The shared half found nothing; the fill (a response from before the purge, too big for
    memory: this process writes it to disk itself) landed after it; the local half must still
    remove it, or the purged object comes back."""
    path = str(tmp_path / "cache")
    st = Storage(MemoryTier(MB, 1000), DiskTier(path, 64 * MB, shards=1), UrlTagIndex(path), max_object=MB)
    try:
        since = time.monotonic()
        await st.purge_shared([KEY])
        assert await store(st, entry(KEY), b"from before the purge" * 100)
        await st.purge_local(PurgeMatch(keys=frozenset({KEY}), since=since))
        assert st.disk is not None and not st.disk.has(KEY)
        assert await st.get(KEY) == ()
        # A fill that lands after a purge that began later than it is not touched.
        assert await store(st, entry(KEY), b"after the purge" * 100)
        await st.purge_local(PurgeMatch(keys=frozenset({"http://h.test/other"}), since=since))
        assert st.disk.has(KEY)
    finally:
        st.close()


async def test_the_directory_of_disk_keys_is_built_from_the_index_and_follows_writes_and_purges(
        tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    first = open_store(path)
    try:
        for i in range(30):
            assert await store(first, entry(f"http://h.test/{i}", tags=("t",) if i < 10 else ()), b"x")
    finally:
        first.close()
    st = Storage(MemoryTier(MB, 64 * 1024, arena=Arena.create(MB, 64 * MB), owns_arena=True),
                 DiskTier(path, 64 * MB, 2), UrlTagIndex(path), max_object=MB)
    try:
        arena = st.memory.arena
        assert arena.on_disk("http://h.test/0") is None  # not built: the disk is asked
        assert not st.absent("http://h.test/x")  # not known to be absent: read the disk
        assert await st.rebuild_directory() == 30
        assert arena.on_disk("http://h.test/0") and arena.on_disk("http://h.test/x") is False
        assert st.absent("http://h.test/x") and not st.absent("http://h.test/0")
        assert await st.get("http://h.test/x") == ()  # without reading the disk
        big = entry("http://h.test/big")  # too big for memory: this process writes it to disk
        spool = st.spool(big, None)
        await spool.write(os.urandom(200_000))
        final = st.finalize(big, spool)
        assert final is not None and not st.put_memory(final, spool)
        writing = asyncio.ensure_future(st.put_disk(final, spool))
        await asyncio.sleep(0)
        assert st.work.writes and not st.absent("http://h.test/big")  # being written: read it
        assert await writing and arena.on_disk("http://h.test/big")

        def broken(key: str, fp: int | None = None) -> bool | None:
            raise ValueError("mmap closed")

        arena.on_disk = broken  # type: ignore[method-assign]  # a failing directory: not known
        assert not st.absent("http://h.test/x")
        del arena.on_disk
        assert await store(st, entry("http://h.test/new"), b"n")  # written behind: then known
        assert arena.on_disk("http://h.test/new")
        await st.delete(["http://h.test/20"])
        assert arena.on_disk("http://h.test/20") is False
        _, bans = await st.purge_shared((), tags=["t"])
        await st.purge_local(PurgeMatch(tags=frozenset({"t"})), bans)
        await st.maintain()  # the ban is swept: its keys leave the disk and the directory
        assert not any(arena.on_disk(f"http://h.test/{i}") for i in range(10))
        assert arena.on_disk("http://h.test/15")
    finally:
        st.close()


async def test_a_reread_from_disk_does_not_replace_what_was_stored_in_memory_meanwhile(
        disk_store: Storage) -> None:
    """Another worker may store the key while this one reads the disk (a lease's holder, say):
    the shared memory's newer record stays, and is the answer."""
    s = disk_store
    assert await store(s, entry(KEY), b"old")
    s.memory.delete(KEY)  # memory lost it (the ring moved on); the disk has it
    tiers = s.reads.t
    real_run = tiers.run
    s.reads.place.threads_until = float("inf")  # the read in a thread, while the other worker stores

    async def run_then_another_worker_stores(fn: Any, *args: Any) -> Any:
        found = await real_run(fn, *args)
        assert await store(s, entry(KEY), b"new", flush=False)
        return found

    tiers.run = run_then_another_worker_stores  # type: ignore[method-assign]
    try:
        (c,) = await s.reread(KEY)
    finally:
        tiers.run = real_run  # type: ignore[method-assign]
    assert c.entry.body_size == 3 and await read_body(s, KEY) == b"new"


def test_a_purge_by_tag_lets_the_event_loop_run_while_it_scans_the_shared_memory() -> None:
    # The scan of every record (decoding each one's tags) ran in one go: 40,000 keys held the
    # event loop, and every other client, for 1.6 s.
    from proxy.purge import Purger, PurgeSpec
    from proxy.rules import RuleSet

    async def main() -> None:
        s = open_store(None, memory=64 * MB)
        for i in range(5000):
            await store(s, entry(f"http://a/k/{i}", tags=("big",)), b"x")
        turns = 0
        done = asyncio.Event()

        async def other_clients() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                if turns == 2:  # stored while the purge runs: purged too
                    await store(s, entry("http://a/late", tags=("big",)), b"x")
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other_clients())
        await asyncio.sleep(0)
        before = turns
        purged = await Purger(s, RuleSet).purge(PurgeSpec(tags=("big",)))
        during = turns - before
        done.set()
        await ticker
        assert during >= 3  # 5,000 records: the loop ran between the slices of the scan
        # And the purge still answers only once everything it covers is gone, even what was
        # stored while it scanned.
        assert purged >= 5000
        assert all(s.memory.peek(f"http://a/k/{i}") is None for i in range(5000))
        assert s.memory.peek("http://a/late") is None
        s.close()

    asyncio.run(main())


def test_bodies_being_received_take_at_most_a_share_of_the_disk_budget(tmp_path: Path) -> None:
    # Spool files were not counted against cache.disk.size: 20 fills of 95 MB in flight with a
    # 256 MB budget put 1.9 GB in the cache directory.
    async def main() -> None:
        s = open_store(str(tmp_path), disk_size=64 * MB, shards=1, max_object=24 * MB)  # spool room: 16 MB
        chunk = b"z" * MB

        async def kept(spool: BodySpool, chunks: int) -> list[bool]:
            return [await spool.write(chunk) for _ in range(chunks)]

        first = s.spool(entry("http://a/1"), 12 * MB)
        assert await kept(first, 2) == [True, True]  # on file, 12 MB reserved
        second = s.spool(entry("http://a/2"), 12 * MB)
        # 12 + 12 MB > 16 MB: passed on unstored, known at once (before its head goes out)
        assert second.no_room and second.reserved == 0 and second not in s.work.spools
        assert await kept(second, 1) == [False]
        assert second.no_room and not second.complete
        small = s.spool(entry("http://a/3"), 3 * MB)  # fits beside the first
        assert await kept(small, 2) == [True, True]
        unknown = s.spool(entry("http://a/4"), None)  # no length: what it has received counts
        assert await kept(unknown, 2) == [True, False]  # 12 + 3 + 2 MB > 16 MB
        assert await kept(first, 10) == [True] * 10
        final = s.finalize(entry("http://a/1"), first)
        assert final is not None and await s.put_disk(final, first)
        small.discard()
        assert s.writes.spooled == 0  # every reservation given back
        # Alone, a spool may take more than the share: any object up to max_object is stored.
        alone = s.spool(entry("http://a/5"), 20 * MB)
        beside = s.spool(entry("http://a/6"), None)
        assert await beside.write(b"z" * 1024) and beside.reserved == 0  # in memory: no room taken
        assert await kept(alone, 20) == [True] * 20 and alone.reserved == 20 * MB
        beside.discard()
        final = s.finalize(entry("http://a/5"), alone)
        assert final is not None and await s.put_disk(final, alone)
        assert s.writes.spooled == 0
        s.close()

    asyncio.run(main())


def test_the_spool_room_is_the_machines_split_between_its_serving_processes(tmp_path: Path) -> None:
    """Each process had a quarter of the disk budget for its spools: 16 workers could spool
    four times the budget. The quarter is the machine's now, split between the workers."""
    from proxy.config import Overrides, load_config
    from proxy.runtime import open_storage
    from tests.harness import write_config

    path = write_config(str(tmp_path), "http://127.0.0.1:9",
                        "cache: {memory: 64MB, disk: {path: cache, size: 512MB, shards: 1}}\n")
    settings = load_config(path, Overrides())
    alone = open_storage(settings)
    assert alone.writes.spool_room == 512 * MB // 4
    alone.close()
    owner = open_storage(settings, processes=2)  # a supervisor of two workers
    worker = open_storage(settings, arena_fd=os.dup(owner.memory.arena.fd))
    try:
        assert owner.writes.spool_room == worker.writes.spool_room == 512 * MB // 4 // 2
    finally:
        worker.close()
        owner.close()


def test_a_spool_folder_swept_before_its_owner_locked_it_is_replaced_not_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep (now also run whenever the supervisor sees a worker die, as siblings restart)
    could take a new folder's lock between its creation and its owner's flock, remove it as a
    dead process's, and the owner then spooled into a removed folder for the rest of its life
    (every big body unstored). The owner takes another folder."""
    import fcntl as real_fcntl

    from proxy.storage import spool as spool_module

    root = str(tmp_path / "tmp")
    real_flock = real_fcntl.flock
    swept: list[int] = []

    def flock_after_a_sweep(fd: int, op: int) -> None:
        if not swept:  # the sweep runs in the gap, on real files, with the real flock
            monkeypatch.setattr(spool_module.fcntl, "flock", real_flock)
            swept.append(sweep_dead_spools(root))
            monkeypatch.setattr(spool_module.fcntl, "flock", flock_after_a_sweep)
        real_flock(fd, op)

    monkeypatch.setattr(spool_module.fcntl, "flock", flock_after_a_sweep)
    spools = SpoolDir(root)
    monkeypatch.setattr(spool_module.fcntl, "flock", real_flock)
    try:
        assert swept == [1]  # it removed the first folder
        assert os.path.isdir(spools.path) and os.listdir(root) == [os.path.basename(spools.path)]
        with spools.make_file() as f:  # spooling works
            f.write(b"x")
        assert sweep_dead_spools(root) == 0  # its owner is alive: kept
    finally:
        spools.close()
