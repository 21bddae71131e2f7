"""The write side of the disk tier: grouped commits, grouped lookups, culling after writes, and
a purge that meets a grouped commit which ended while it was under way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.storage import persist, reads
from proxy.storage.arena import Arena
from proxy.storage.bans import PurgeMatch
from proxy.storage.disk import DiskTier, _transaction, new_body_id, shard_budget
from proxy.storage.entry import Entry
from proxy.storage.index import Ban, UrlTagIndex
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import Storage
from tests.storage.helpers import MB, entry, open_store, read_body, store

KEY = "http://h.test/a"


@pytest.fixture
async def disk_store(tmp_path: Path) -> AsyncIterator[Storage]:
    st = open_store(str(tmp_path / "cache"), memory_max_object=1024)
    yield st
    st.close()


async def test_fills_are_written_behind_in_one_batch_and_all_read_back(disk_store: Storage) -> None:
    assert disk_store.disk is not None
    batches: list[int] = []
    commit_many = disk_store.disk.commit_many

    def counting(items: list[tuple[object, ...]], new: list[bool] | None = None, **kw: Any) -> list[bool]:
        batches.append(len(items))
        return commit_many(items, new, **kw)  # type: ignore[arg-type]

    disk_store.disk.commit_many = counting  # type: ignore[method-assign]
    bodies = {f"{KEY}/{i}": os.urandom(1000) for i in range(200)}
    results = await asyncio.gather(*(store(disk_store, entry(k), b, flush=False) for k, b in bodies.items()))
    assert all(results)  # stored: answered from memory, before the disk has any of them
    assert not any(disk_store.disk.has(k) for k in bodies)
    assert await disk_store.flush() == 200
    assert batches == [200]  # one transaction per shard for all of them
    disk_store.memory.clear()  # read them back from disk
    for k, b in bodies.items():
        assert await read_body(disk_store, k) == b
    seqs = [(await disk_store.get(k))[0].entry.seq for k in bodies]
    assert len(set(seqs)) == 200 and min(seqs) > 0  # each entry took its own index seq
    assert await disk_store.flush() == 0  # nothing twice


async def test_a_fill_purged_before_its_turn_never_reaches_the_disk(disk_store: Storage) -> None:
    assert disk_store.disk is not None
    assert await store(disk_store, entry(KEY), b"purged before written", flush=False)
    await disk_store.delete([KEY])
    await disk_store.flush()
    assert not disk_store.disk.has(KEY) and await disk_store.get(KEY) == ()


async def test_a_batch_still_queued_when_write_behind_is_cancelled_is_committed_at_close(tmp_path: Path) -> None:
    # A clean stop cancels the write-behind loop; a batch it had handed to its thread (still
    # queued behind another job there, as under load) must not be dropped with it.
    path = str(tmp_path / "cache")
    st = open_store(path, memory_max_object=1024)
    assert st.persister is not None
    bodies = {f"{KEY}/{i}": os.urandom(500) for i in range(20)}
    for k, b in bodies.items():
        assert await store(st, entry(k), b, flush=False)
    gate = asyncio.get_running_loop().run_in_executor(st.persister._thread, time.sleep, 0.3)
    task = asyncio.ensure_future(st.persister.flush())
    await asyncio.sleep(0.05)  # the batch is scanned and queued behind the sleep
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await gate
    await st.flush()  # what a clean stop does next
    st.close()
    reopened = open_store(path, memory_max_object=1024)
    try:
        for k, b in bodies.items():
            assert await read_body(reopened, k) == b, k
    finally:
        reopened.close()


async def test_the_backlog_counts_what_memory_holds_until_its_batch_is_committed(disk_store: Storage) -> None:
    """``cachegate_disk_writes_pending`` (the write-behind queue): records not on disk yet,
    those of a batch being committed included, none once it is."""
    writer = disk_store.persister
    assert writer is not None and writer.backlog() == 0
    for i in range(20):
        assert await store(disk_store, entry(f"{KEY}/{i}"), os.urandom(500), flush=False)
    assert writer.backlog() == 20
    gate = asyncio.get_running_loop().run_in_executor(writer._thread, time.sleep, 0.3)
    flushing = asyncio.ensure_future(writer.flush())
    await asyncio.sleep(0.05)  # the batch is scanned (the cursor past it) and queued behind the sleep
    assert writer.backlog() == 20
    await gate
    assert await flushing == 20
    assert writer.backlog() == 0
    assert await store(disk_store, entry(f"{KEY}/new"), b"one more", flush=False)
    assert writer.backlog() == 1


async def test_two_variants_of_one_key_in_one_group_are_both_kept(disk_store: Storage) -> None:
    gz = entry(KEY, vary=(("accept-encoding", "gzip"),))
    br = entry(KEY, vary=(("accept-encoding", "br"),))
    assert all(await asyncio.gather(store(disk_store, gz, b"gzip body"), store(disk_store, br, b"br body")))
    disk_store.memory.clear()
    variants = await disk_store.get(KEY)
    assert sorted(c.entry.response.vary for c in variants) == [
        (("accept-encoding", "br"),), (("accept-encoding", "gzip"),)]


async def test_two_variants_of_a_key_new_to_the_disk_in_one_batch_are_both_kept(tmp_path: Path) -> None:
    # The directory says the key is new: its first item is written without reading the disk,
    # the second one merges with it.
    path = str(tmp_path / "cache")
    st = Storage(MemoryTier(MB, 64 * 1024, arena=Arena.create(MB, 64 * MB), owns_arena=True),
                 DiskTier(path, 64 * MB, 2), UrlTagIndex(path), max_object=MB)
    try:
        await st.rebuild_directory()
        gz = entry(KEY, vary=(("accept-encoding", "gzip"),))
        br = entry(KEY, vary=(("accept-encoding", "br"),))
        assert await store(st, gz, b"gzip body", flush=False)
        assert await store(st, br, b"br body", flush=False)
        await st.flush()
        st.memory.clear()
        variants = await st.get(KEY)
        assert sorted(c.entry.response.vary for c in variants) == [
            (("accept-encoding", "br"),), (("accept-encoding", "gzip"),)]
    finally:
        st.close()


async def test_write_behind_commits_early_when_the_writers_filled_part_of_the_ring(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persist, "PERSIST_POLL", 0.01)
    st = open_store(str(tmp_path / "cache"))
    assert st.persister is not None
    writer = st.persister
    share = st.memory.arena.capacity // persist.EARLY_COMMIT_SHARE
    looking = asyncio.ensure_future(writer.run_forever(interval=3600))  # no batch on the timer
    try:
        await asyncio.sleep(0.05)
        body = os.urandom(10_000)
        for i in range(share // 20_000):  # well under the share: waits for the timer
            assert await store(st, entry(f"{KEY}/a{i}"), body, flush=False)
        await asyncio.sleep(0.2)
        assert writer.stats.entries == 0
        for i in range(share // 10_000):  # past it: committed at once
            assert await store(st, entry(f"{KEY}/b{i}"), body, flush=False)
        for _ in range(200):
            if writer.stats.entries:
                break
            await asyncio.sleep(0.01)
        assert writer.stats.entries >= share // 10_000
    finally:
        looking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await looking
        st.close()


async def test_a_failing_write_behind_tries_again_after_its_interval_not_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # More than the early-commit share is pending and stays so while every batch fails: the
    # next try still waits for the interval (not a loop of failures as fast as they come).
    monkeypatch.setattr(persist, "PERSIST_POLL", 0.01)
    st = open_store(str(tmp_path / "cache"))
    assert st.persister is not None
    writer = st.persister
    body = os.urandom(10_000)
    for i in range(st.memory.arena.capacity // persist.EARLY_COMMIT_SHARE // 10_000 + 5):
        assert await store(st, entry(f"{KEY}/{i}"), body, flush=False)
    tries = 0

    async def failing() -> int:
        nonlocal tries
        tries += 1
        await asyncio.sleep(0)
        raise OSError("disk went away")

    monkeypatch.setattr(writer, "flush", failing)
    looking = asyncio.ensure_future(writer.run_forever(interval=0.2))
    try:
        await asyncio.sleep(0.5)
    finally:
        looking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await looking
        st.close()
    assert 2 <= tries <= 4


@pytest.mark.parametrize("in_loop", [True, False], ids=["in the event loop", "grouped in threads"])
async def test_lookups_answer_each_key_and_a_failing_key_fails_alone(
        disk_store: Storage, in_loop: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if in_loop:  # a stopped clock: no read is slow, whatever else the machine is doing
        monkeypatch.setattr(reads, "perf_counter", lambda: 1000.0)
    else:
        disk_store.reads.place.threads_until = float("inf")
    for i in range(20):
        assert await store(disk_store, entry(f"{KEY}/{i}"), b"body %d" % i)
    disk_store.memory.clear()
    load = disk_store.reads._load_from_disk
    loop_thread, threads = threading.get_ident(), set()

    def failing(key: str, bodies: bool = False) -> tuple[object, ...]:
        threads.add(threading.get_ident())
        if key.endswith("/13"):
            raise OSError("disk went away")
        return load(key, bodies)

    disk_store.reads._load_from_disk = failing  # type: ignore[assignment, method-assign]
    results = await asyncio.gather(*(disk_store.get(f"{KEY}/{i}") for i in range(30)),
                                   return_exceptions=True)
    assert isinstance(results[13], OSError)
    for i, found in enumerate(results):
        if i != 13:
            assert isinstance(found, tuple) and len(found) == (1 if i < 20 else 0), i
    assert (threads == {loop_thread}) if in_loop else (loop_thread not in threads)


async def test_a_fill_that_lands_between_a_purges_halves_is_never_written(disk_store: Storage) -> None:
    # With several workers the supervisor purges the disk and the shared memory first, then
    # tells each worker. A fill that reached the shared memory in between (a response from
    # before the purge) is found by the worker's half, and write-behind, held for the whole
    # purge, never commits it.
    assert disk_store.disk is not None
    match = PurgeMatch(keys=frozenset({KEY}), since=time.monotonic())
    async with disk_store.purging():
        _, bans = await disk_store.purge_shared([KEY])
        _, start = await disk_store.purge_memory(match)
        assert await store(disk_store, entry(KEY), b"fetched before the purge", flush=False)
        flushing = asyncio.ensure_future(disk_store.flush())  # waits for the purge
        await asyncio.sleep(0.05)
        assert not flushing.done()
        await disk_store.purge_local(replace(match, arena_from=start), bans)
    await flushing
    assert not disk_store.disk.has(KEY)
    assert await disk_store.get(KEY) == ()


async def test_a_shard_over_its_budget_is_culled_after_writes(tmp_path: Path) -> None:
    disk = DiskTier(str(tmp_path / "cache"), 8 * MB, shards=1)
    try:
        for i in range(60):  # 60 x 300 KB into a shard of 7.2 MB
            assert disk.put_body(f"{KEY}/{i}", f"b{i}", os.urandom(300_000))
        assert disk.volume() <= shard_budget(8 * MB, 1) + 300_000
    finally:
        disk.close()


async def test_a_commit_group_on_a_locked_shard_fails_and_the_others_are_stored(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    st = Storage(MemoryTier(MB, 1000), DiskTier(path, 64 * MB, shards=2, timeout=0.05), UrlTagIndex(path),
                 max_object=MB)
    assert st.disk is not None
    locked = [k for k in (f"{KEY}/{i}" for i in range(20)) if st.disk._shard(k) is st.disk._shards[0]]
    free = [k for k in (f"{KEY}/{i}" for i in range(20)) if k not in locked]
    blocker = sqlite3.connect(os.path.join(path, "000", "cache.db"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        results = await asyncio.gather(*(store(st, entry(k), b"x", flush=False) for k in locked + free))
        assert all(results)  # answered and in memory; the disk gets them behind
        await st.flush()
        assert st.failed_writes == len(locked)
        assert not any(st.disk.has(k) for k in locked) and all(st.disk.has(k) for k in free)
        blocker.execute("ROLLBACK")
        await st.flush()  # tried again, now that the shard is free
        assert all(st.disk.has(k) for k in locked)
    finally:
        with contextlib.suppress(sqlite3.Error):
            blocker.execute("ROLLBACK")
        blocker.close()
        st.close()


async def test_open_body_files_hold_at_most_a_twentieth_of_the_disk_budget(tmp_path: Path) -> None:
    """Files kept open for sendfile keep their disk space after diskcache culls or a purge
    deletes them: what they hold is bounded by the disk budget, not by a count alone."""
    st = open_store(str(tmp_path / "cache"), memory_max_object=1024, disk_size=64 * MB)
    try:
        bodies = {f"{KEY}/{i}": os.urandom(MB) for i in range(8)}
        for key, body in bodies.items():
            assert await store(st, entry(key), body)
        st.memory.clear()
        for key, body in bodies.items():
            assert await read_body(st, key) == body
        assert 1 <= len(st.body_files) <= 64 // 20
        huge = os.urandom(5 * MB)  # alone over the bound: still sent from its open file
        assert await store(st, entry(f"{KEY}/huge"), huge)
        st.memory.clear()
        assert await read_body(st, f"{KEY}/huge") == huge
        assert len(st.body_files) == 1
    finally:
        st.close()


async def test_a_body_file_being_opened_for_sendfile_when_the_store_closes_is_closed(
        tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "cache"))  # 64 KiB bodies stay in memory, and are files on disk
    assert await store(st, entry(KEY), b"b" * 60_000)
    await st.flush()  # the disk commit (write-behind)
    (cached,) = st.memory.peek(KEY) or ()
    assert cached.body is not None
    assert st.sendable_file(cached.entry) is None  # being opened in the thread pool
    st.close()  # before the event loop took the open file
    await asyncio.sleep(0.1)  # whatever the loop still had to do with it
    assert open_body_files(tmp_path) == []
    assert len(st.body_files) == 0


def open_body_files(under: Path) -> list[str]:
    """The body files under ``under`` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)) and target.endswith(".val"):
            found.append(target)
    return found


async def test_a_url_purge_finds_every_key_shape_not_yet_written_behind(disk_store: Storage) -> None:
    # The index knows only what reached the disk: a key with header parts (or a range's parts)
    # still waiting in memory must be found by its URL all the same.
    shaped = f"{KEY}\x1faccept-language=fr"
    for k in (KEY, shaped):
        assert await store(disk_store, entry(k), b"x" * 100, flush=False)
    assert await disk_store.keys_for_urls([KEY]) == {KEY, shaped}
    assert disk_store.persister is not None
    await disk_store.persister.flush()
    assert await disk_store.keys_for_urls([KEY]) == {KEY, shaped}


async def test_a_ban_added_while_this_process_reloads_the_bans_is_not_lost(disk_store: Storage) -> None:
    # The upkeep (and each worker) reads the index's bans in a thread and then replaces its
    # list with them: a purge whose ban was added meanwhile must not vanish with that list,
    # or what it purged is served again until the next reload.
    index = disk_store.index
    assert index is not None
    assert await store(disk_store, entry(KEY), b"x" * 100)
    real = index.bans
    reading, release = threading.Event(), threading.Event()

    def slow_bans() -> list[Ban]:
        found = real()  # the bans as they were before the purge
        reading.set()
        release.wait(5)
        return found

    index.bans = slow_bans  # type: ignore[method-assign]
    reload = asyncio.ensure_future(disk_store.reload_bans())
    assert await asyncio.get_running_loop().run_in_executor(None, reading.wait, 5)
    assert await disk_store.delete_all() == 1
    release.set()
    await reload
    index.bans = real  # type: ignore[method-assign]
    assert await disk_store.get(KEY) == ()


def _rows(disk: DiskTier) -> tuple[list[tuple[object, ...]], list[tuple[str, int]]]:
    """Every shard's rows (without rowid and times) and diskcache's count and size."""
    rows: list[tuple[object, ...]] = []
    settings: list[tuple[str, int]] = []
    for shard in disk._shards:
        con = sqlite3.connect(os.path.join(shard.directory, "cache.db"))
        try:
            rows += con.execute("SELECT key, raw, expire_time IS NULL, store_time > 0, access_time > 0,"
                                " access_count, tag, size, mode, filename IS NULL, value FROM Cache").fetchall()
            settings += con.execute("SELECT key, value FROM Settings WHERE key IN ('count', 'size')").fetchall()
        finally:
            con.close()
    return sorted(rows, key=repr), sorted(settings)


def _jobs(bans: object, entries: list[tuple[str, str, bytes]]) -> list[tuple[str, object, str, bytes]]:
    from proxy.storage.persist import adding
    return [(key, adding(bans, replace(entry(key), body_id=body_id, body_size=len(body), seq=i + 1), []),  # type: ignore[arg-type]
             body_id, body) for i, (key, body_id, body) in enumerate(entries)]


def test_keys_new_to_the_disk_are_inserted_in_bulk_as_diskcache_would_store_them(tmp_path: Path) -> None:
    """Keys the directory says are not on disk skip ``Cache.set`` (two INSERTs for the whole
    batch): the rows, diskcache's count and size, and what reads give back are the same as
    through ``set``; a body too big for the database still goes to a file."""
    from proxy.storage.bans import BanList
    from proxy.storage.disk import INLINE_LIMIT
    entries = [(f"{KEY}/{i}", f"b{i}", bytes([i]) * (100 + i)) for i in range(40)]
    entries.append((f"{KEY}/big", "bbig", b"z" * (INLINE_LIMIT + 1)))
    bulk = DiskTier(str(tmp_path / "bulk"), 64 * MB, shards=2)
    plain = DiskTier(str(tmp_path / "plain"), 64 * MB, shards=2)
    try:
        inserted: list[int] = []
        real = bulk._insert_new

        def counting(shard: object, items: list[object], cost: list[int]) -> None:
            inserted.append(len(items))
            real(shard, items, cost)  # type: ignore[arg-type]

        bulk._insert_new = counting  # type: ignore[assignment,method-assign]
        assert all(bulk.commit_many(_jobs(BanList(), entries), [True] * len(entries)))  # type: ignore[arg-type]
        assert all(plain.commit_many(_jobs(BanList(), entries), None))  # type: ignore[arg-type]
        assert sum(inserted) == 40  # all but the big body went in bulk
        bulk_rows, bulk_settings = _rows(bulk)
        plain_rows, plain_settings = _rows(plain)
        assert bulk_rows == plain_rows
        assert bulk_settings == plain_settings
        assert sum(v for k, v in bulk_settings if k == "count") == 2 * len(entries)
        for key, body_id, body in entries:
            assert [e.body_id for e in bulk.get_variants(key)] == [body_id]
            assert bulk.get_variants(key) == plain.get_variants(key)
            got = bulk.get_body(key, body_id)
            if not isinstance(got, bytes):
                assert got is not None
                with got:
                    got = got.read()
            assert got == body
    finally:
        bulk.close()
        plain.close()


def test_a_key_the_directory_missed_is_rewritten_not_duplicated(tmp_path: Path) -> None:
    """A worker may write a big variant of a key just as write-behind commits it as new: the
    bulk INSERT leaves that row alone, and the key's metadata is then rewritten through
    ``set``, as before (one row per key, the batch's variant in it)."""
    from proxy.storage.bans import BanList
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1)
    try:
        assert all(disk.commit_many(_jobs(BanList(), [(KEY, "old", b"o" * 50)]), None))  # type: ignore[arg-type]
        ok = disk.commit_many(_jobs(BanList(), [(KEY, "new", b"n" * 50), (KEY + "/2", "two", b"t")]),  # type: ignore[arg-type]
                              [True, True])
        assert ok == [True, True]
        assert [e.body_id for e in disk.get_variants(KEY)] == ["new"]
        assert [e.body_id for e in disk.get_variants(KEY + "/2")] == ["two"]
        rows, settings = _rows(disk)
        assert sorted(r[0] for r in rows) == sorted(["b:old", "b:new", "b:two", "m:" + KEY, f"m:{KEY}/2"])
        assert sum(v for k, v in settings if k == "count") == 5
    finally:
        disk.close()


def test_a_full_database_fails_the_bulk_batch_whole_and_the_same_batch_commits_once_there_is_room(
        tmp_path: Path) -> None:
    """SQLite's "database or disk is full" in the middle of the bulk INSERTs (a page limit on the
    shard's connection, the same error a full disk gives): the shard's batch is rolled back
    whole (no row of it, diskcache's count unchanged), reported as not committed and counted,
    and the same batch commits once there is room again (write-behind tries it again)."""
    from proxy.storage.bans import BanList
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1)
    try:
        shard = disk._shards[0]
        con = shard._con
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count = {pages + 2}")
        entries = [(f"{KEY}/{i}", f"b{i}", os.urandom(8000)) for i in range(20)]
        before = _rows(disk)
        assert disk.commit_many(_jobs(BanList(), entries), [True] * len(entries)) == [False] * len(entries)  # type: ignore[arg-type]
        assert disk.failed_writes == len(entries)
        assert _rows(disk) == before
        assert all(disk.get_variants(key) == () for key, _, _ in entries)
        con.execute("PRAGMA max_page_count = 1073741823")
        assert all(disk.commit_many(_jobs(BanList(), entries), [True] * len(entries)))  # type: ignore[arg-type]
        for key, body_id, body in entries:
            assert [e.body_id for e in disk.get_variants(key)] == [body_id]
            assert disk.get_body(key, body_id) == body
    finally:
        disk.close()


def test_a_shard_whose_commit_fails_gives_its_error_to_the_caller_and_logs_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A shard whose batch fails (here "database or disk is full", as on a full disk) hands its
    items and its error to the caller (``raised``: write-behind reports them as `write` failures,
    once per streak, in /stats and the metrics) and logs nothing itself. Before, it logged its own
    traceback and no caller counted it: /stats said no write failed, and a batch whose other
    shards committed counted as writes that succeed."""
    import logging

    from proxy.storage.bans import BanList
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1)
    try:
        con = disk._shards[0]._con
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        caplog.set_level(logging.INFO, logger="cachegate.storage")
        for n in range(3):
            con.execute(f"PRAGMA max_page_count = {pages + 2}")
            entries = [(f"{KEY}/{n}/{i}", f"b{n}-{i}", os.urandom(8000)) for i in range(20)]
            raised: list[tuple[list[int], Exception]] = []
            assert not any(disk.commit_many(_jobs(BanList(), entries), [True] * len(entries),  # type: ignore[arg-type]
                                            raised=raised))
            assert [(items, type(exc)) for items, exc in raised] == [(list(range(20)), sqlite3.OperationalError)]
            assert "full" in str(raised[0][1])
            con.execute("PRAGMA max_page_count = 1073741823")
            small = [(f"{KEY}/{n}/small", f"s{n}", b"x")]  # a small one fits between them
            raised = []
            assert disk.commit_many(_jobs(BanList(), small), [True], raised=raised) == [True]  # type: ignore[arg-type]
            assert raised == []
        assert caplog.records == []
        assert disk.failed_writes == 60
    finally:
        disk.close()


def test_an_index_write_on_a_full_database_says_it_is_full(tmp_path: Path) -> None:
    """SQLite rolls a transaction back by itself when the disk is full; the ROLLBACK after it
    raised "cannot rollback - no transaction is active" in place of the error that says why."""
    index = UrlTagIndex(str(tmp_path / "cache"))
    try:
        db = index._db()
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            index.add_many([(f"{KEY}/{i}/" + "u" * 2000, ("t",)) for i in range(50)])
        db.execute("PRAGMA max_page_count = 1073741823")
        assert len(index.add_many([(KEY, ())])) == 1  # and works once there is room
    finally:
        index.close()


def test_retag_does_not_depend_on_the_number_of_tags(tmp_path: Path) -> None:
    # One SQL variable per tag ("NOT IN (?, ?, ...)") failed past SQLite's limit: "too many SQL
    # variables", and the write-behind batch holding the entry failed with it.
    limit = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    index = UrlTagIndex(str(tmp_path / "index"))
    many = tuple(f"t{i}" for i in range(limit + 10))
    index.add("k", many[:3])
    index.retag([("k", many), ("other", ("t1",))])
    assert index.count_tag("t0") == 1 and index.count_tag(many[-1]) == 1 and index.count_tag("t1") == 2
    index.retag([("k", many[5:])])  # fewer: the others' rows go
    assert index.count_tag("t0") == 0 and index.count_tag("t5") == 1 and index.count_tag(many[-1]) == 1
    assert index.keys_for_tag("t1") == ["other"]
    index.retag([("k", ())])
    assert index.count_tag(many[-1]) == 0


def _val_files(path: Path) -> set[str]:
    return {f for _, _, files in os.walk(path) for f in files if f.endswith(".val")}


def test_a_rolled_back_batch_keeps_the_files_its_rows_still_refer_to(tmp_path: Path) -> None:
    """diskcache removes a replaced value's file when the write's own block ends, before the
    batch's COMMIT: a batch that then rolled back (or a kill -9 before its COMMIT) left the old
    metadata pointing at a body whose file was gone. The files go only after the COMMIT."""
    disk = DiskTier(str(tmp_path / "d"), 64 * MB, shards=1)
    big = os.urandom(40 * 1024)  # over diskcache's 32 KiB: kept as a file
    old = entry(KEY).with_body(new_body_id(), len(big))
    assert disk.put_body(KEY, old.body_id, big)
    assert disk.commit(KEY, lambda current: ((old,), []))
    file_of_old = _val_files(tmp_path)
    assert len(file_of_old) == 1

    new = entry(KEY).with_body(new_body_id(), 10)

    def replace_old(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
        return (new,), [e.body_id for e in current]

    def broken(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
        raise ValueError("a merge that fails after the first item's replaced the body")

    done = disk.commit_many([(KEY, replace_old, new.body_id, b"x" * 10),
                             (KEY + "/other", broken, new_body_id(), b"y")])
    assert done == [False, False]  # one shard, one transaction: rolled back whole
    assert disk.get_variants(KEY) == (old,)
    kept = disk.get_body(KEY, old.body_id, len(big))
    assert kept is not None, "the old row's file was removed"
    with kept if not isinstance(kept, bytes) else contextlib.nullcontext():
        assert (kept if isinstance(kept, bytes) else kept.read()) == big
    assert _val_files(tmp_path) == file_of_old

    assert disk.commit_many([(KEY, replace_old, new.body_id, b"x" * 10)]) == [True]
    assert disk.get_variants(KEY) == (new,)
    assert _val_files(tmp_path) == set()  # committed: the replaced body's file is gone
    disk.close()


def test_a_nested_transaction_leaves_file_removals_to_the_outer_commit(tmp_path: Path) -> None:
    disk = DiskTier(str(tmp_path / "d"), 64 * MB, shards=1)
    shard = disk._shards[0]
    big = os.urandom(40 * 1024)  # a file
    shard.set("b:x", big)
    files = _val_files(tmp_path)
    assert len(files) == 1
    with pytest.raises(ValueError), _transaction(shard):
        with _transaction(shard):
            shard.delete("b:x")
        assert _val_files(tmp_path) == files  # the inner one's end is no COMMIT
        raise ValueError("rolled back")
    assert shard.get("b:x") == big  # the row and its file both kept
    with _transaction(shard):
        with _transaction(shard):
            shard.delete("b:x")
        assert _val_files(tmp_path) == files
    assert _val_files(tmp_path) == set()
    disk.close()


async def test_a_record_the_index_cannot_hold_costs_no_other_fill_its_place_on_disk(disk_store: Storage) -> None:
    # A key or tag with a lone surrogate (a byte that is not UTF-8, as the parser hands it over)
    # cannot be written to SQLite. It used to fail the whole write-behind batch: every other
    # client's fills in it stayed in memory only. Now the batch is written in halves until the
    # record is alone, and only it is left out.
    assert disk_store.disk is not None and disk_store.persister is not None
    bodies = {f"{KEY}/{i}": os.urandom(300) for i in range(40)}
    bad = {f"{KEY}/key\x1fh:accept-language=d\udce9": (), f"{KEY}/tag": ("caf\udce9",)}
    keys = list(bodies)
    for k in keys[:20]:
        assert await store(disk_store, entry(k), bodies[k], flush=False)
    for k, tags in bad.items():
        assert await store(disk_store, entry(k, tags=tags), b"bad", flush=False)
    for k in keys[20:]:
        assert await store(disk_store, entry(k), bodies[k], flush=False)
    assert await disk_store.flush() == 40
    assert all(disk_store.disk.has(k) for k in bodies)
    assert disk_store.persister.stats.failed == 2  # the two records alone, not the batch
    disk_store.memory.clear()
    for k, b in bodies.items():
        assert await read_body(disk_store, k) == b


async def _batch_held_in_the_thread(disk_store: Storage) -> tuple[
        persist.Persister, dict[str, bytes], threading.Event, asyncio.Future[int]]:
    """Ten fills pending, and a write-behind round (the background loop's) started and held in
    its thread until the event returned is set: the persister, the bodies, that event, the round."""
    persister = disk_store.persister
    assert persister is not None and disk_store.disk is not None
    bodies = {f"{KEY}/{i}": os.urandom(300) for i in range(10)}
    for k, b in bodies.items():
        assert await store(disk_store, entry(k), b, flush=False)
    started, release = threading.Event(), threading.Event()
    commit = persister._commit

    def slow(records: list[object]) -> object:
        started.set()
        release.wait(5)
        return commit(records)  # type: ignore[arg-type]

    persister._commit = slow  # type: ignore[method-assign]
    held = asyncio.ensure_future(persister.flush())
    assert await asyncio.to_thread(started.wait, 5)
    return persister, bodies, release, held


async def test_a_flush_waits_for_the_batch_the_background_loop_is_committing(disk_store: Storage) -> None:
    # The owner's write-behind loop can take every pending record a moment before a flush (a
    # clean stop, a test) asks: that flush then saw nothing pending and returned while the
    # loop's batch was still in the thread, so the disk (and the URL index's count) had none.
    persister, bodies, release, loop_batch = await _batch_held_in_the_thread(disk_store)
    assert not persister.pending  # the loop's batch holds every record
    asked = asyncio.ensure_future(disk_store.flush())
    await asyncio.sleep(0.05)
    assert not asked.done()  # waits for the batch in the thread
    release.set()
    assert await asked == 0 and await loop_batch == 10
    assert all(disk_store.disk.has(k) for k in bodies)


async def test_a_stops_flush_waits_for_the_batch_a_cancelled_flush_left_in_the_thread(disk_store: Storage) -> None:
    # A clean stop cancels the write-behind loop while its batch is in the thread (the lock is
    # released, the batch goes on there); the stop's own flush then found nothing pending and
    # returned at once, and ``unwritten`` counted that batch's records: "573 entries in memory
    # were not written to disk" logged at a stop whose every entry was on disk at the restart.
    persister, bodies, release, loop_round = await _batch_held_in_the_thread(disk_store)
    loop_round.cancel()  # the stop cancels the loop
    with contextlib.suppress(asyncio.CancelledError):
        await loop_round
    asyncio.get_running_loop().call_later(0.2, release.set)
    await persister.flush(until=time.monotonic() + 5)
    assert persister.unwritten() == 0
    assert all(disk_store.disk.has(k) for k in bodies)
