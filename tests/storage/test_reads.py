"""Where disk reads run (in the event loop while they are quick, in the thread pool while not),
and which disk hits are promoted into memory."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.storage import reads
from proxy.storage.disk import DiskTier
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import MemoryTier
from proxy.storage.reads import INLINE_READ_BACKOFF, INLINE_READ_LIMIT, Promotions, ReadPlace
from proxy.storage.tiered import Storage
from tests.storage.helpers import MB, entry, open_store, read_body, store

FAST = 0.00005  # a read the page cache answers
SLOW = 0.005  # a read that waited for a disk


@pytest.fixture
async def disk_store(tmp_path: Path) -> AsyncIterator[Storage]:
    st = open_store(str(tmp_path / "cache"))
    yield st
    st.close()


@pytest.mark.parametrize(("times", "in_threads_after"), [
    ([FAST] * 200, None),  # quick reads stay in the loop
    ([FAST] * 20 + [SLOW] + [FAST] * 20, None),  # one preempted read does not move them
    ([FAST] * 20 + [SLOW, FAST, SLOW, FAST] + [FAST] * 20, None),  # nor do two near each other
    ([SLOW] * 10, 3),  # a slow disk: the third read's average passes the limit
    ([FAST] * 50 + [SLOW] * 10, 53),  # ... however long it was quick before
    ([0.1], 1),  # one read that stalled the loop for 100 ms is enough
    ([0.0009] * 300, 223),  # quick enough each, but a fifth of a second spent reading: a slow disk
])
def test_reads_go_to_the_thread_pool_when_their_moving_average_passes_the_limit(
        times: list[float], in_threads_after: int | None) -> None:
    place, now, switched_at = ReadPlace(), 100.0, None
    for n, took in enumerate(times, 1):
        assert place.inline(now)
        now += took
        if place.took(took, now):
            switched_at = n
            break
    assert switched_at == in_threads_after
    if switched_at is None:
        assert place.average <= INLINE_READ_LIMIT and place.switches == 0
        return
    assert place.switches == 1
    assert not place.inline(now) and not place.inline(now + INLINE_READ_BACKOFF - 0.01)
    assert place.inline(now + INLINE_READ_BACKOFF)  # tried in the loop again, from a clean average
    assert place.average == 0.0 and place.inline(now + INLINE_READ_BACKOFF + 1)


def test_a_disk_that_stays_slow_is_logged_once_in_ten_minutes() -> None:
    place = ReadPlace()
    assert place.should_log(1000.0)
    assert not place.should_log(1005.0) and not place.should_log(1599.0)
    assert place.should_log(1600.0)


class Disk:
    """The store's disk reads, watched: which thread ran each (True: the event loop's), and a
    fake clock each metadata read moves on by ``delay`` seconds (no real sleeping)."""

    def __init__(self, st: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        disk = st.disk
        assert disk is not None
        self.loop_thread = threading.get_ident()
        self.meta: list[bool] = []
        self.bodies: list[bool] = []
        self.delay = 0.0
        self.now = 1000.0
        real_meta, real_body = disk.get_variants, disk.get_body

        def get_variants(key: str) -> object:
            self.meta.append(threading.get_ident() == self.loop_thread)
            self.now += self.delay
            return real_meta(key)

        def get_body(*args: object) -> object:
            self.bodies.append(threading.get_ident() == self.loop_thread)
            return real_body(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(disk, "get_variants", get_variants)
        monkeypatch.setattr(disk, "get_body", get_body)
        monkeypatch.setattr(reads, "perf_counter", lambda: self.now)


async def test_disk_hits_are_read_in_the_event_loop_until_the_disk_turns_slow(
        disk_store: Storage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(14):
        assert await store(disk_store, entry(f"http://h.test/{i}"), b"body %d" % i)
    disk_store.memory.clear()  # every key is on disk only
    watch = Disk(disk_store, monkeypatch)
    for i in range(4):  # quick: in the loop, metadata and body
        (c,) = await disk_store.get(f"http://h.test/{i}")
        assert await disk_store.open_body(c) == b"body %d" % i
    assert watch.meta == watch.bodies == [True] * 4
    watch.delay = 0.005  # the disk turns slow
    with caplog.at_level(logging.INFO, logger="cachegate.storage"):
        for i in range(4, 12):
            (c,) = await disk_store.get(f"http://h.test/{i}")
            assert await disk_store.open_body(c) == b"body %d" % i
    # The average: 0.5, (0.45), 0.905, (0.81), 1.23 ms: the third slow read switches.
    assert watch.meta[4:] == [True, True, True] + [False] * 5
    assert watch.bodies[4:] == [True, True, False] + [False] * 5
    assert disk_store.reads.place.switches == 1
    assert [r.message for r in caplog.records if "thread pool" in r.message] == [
        "disk reads took 1.2 ms on average in the event loop: they go to the thread pool for 5 s "
        "(then the loop is tried again; logged once in 10 minutes)"]
    watch.delay = 0.0
    watch.now += INLINE_READ_BACKOFF  # the backoff is over: in the loop again
    (c,) = await disk_store.get("http://h.test/12")
    assert watch.meta[12:] == [True]
    disk_store.memory.clear()
    (c,) = await disk_store.reads.reread("http://h.test/13")  # the other workers' store, read in the loop
    assert watch.meta[13:] == [True] and c.entry.key == "http://h.test/13"


async def test_bodies_that_are_files_are_read_in_the_loop_and_reads_that_write_in_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = open_store(str(tmp_path / "cache"))  # bodies of 32 KiB and more are files on disk
    try:
        assert await store(st, entry("http://h.test/file"), b"f" * 40_000)
        st.memory.clear()
        watch = Disk(st, monkeypatch)
        (c,) = await st.get("http://h.test/file", bodies=True)  # metadata and file, in the loop
        assert c.body is not None and watch.meta == [True] and watch.bodies == [True]
        assert await st.open_body(c) == b"f" * 40_000
    finally:
        st.close()
    path = str(tmp_path / "lru")
    lru = Storage(MemoryTier(8 * MB, 64 * 1024), DiskTier(path, 64 * MB, 2, "least-recently-used"),
                  UrlTagIndex(path), max_object=16 * MB)
    try:
        assert lru.disk is not None and not lru.disk.reads_are_plain
        assert await store(lru, entry("http://h.test/lru"), b"l" * 1000)
        lru.memory.clear()
        watch = Disk(lru, monkeypatch)
        (c,) = await lru.get("http://h.test/lru")
        assert await lru.open_body(c) == b"l" * 1000
        assert watch.meta == watch.bodies == [False]  # each read is a write transaction there
    finally:
        lru.close()


def test_a_key_is_promoted_on_its_second_disk_read_in_a_while() -> None:
    p = Promotions(limit=3)
    assert [p.admit("a"), p.admit("a"), p.admit("a")] == [False, True, False]  # forgotten once admitted
    assert [p.admit("b"), p.admit("c")] == [False, False]  # a, b and c seen once: the limit
    assert p.admit("d") is False  # a fourth: the three before it are forgotten
    assert p.admit("a") is False and p.admit("d") is True
    assert all(Promotions(limit=0).admit("x") for _ in range(3))  # 0: every disk hit is promoted


async def test_a_disk_hit_enters_memory_on_the_second_read_and_is_served_either_way(
        disk_store: Storage) -> None:
    key = "http://h.test/p"
    assert await store(disk_store, entry(key), b"on disk")
    disk_store.memory.clear()  # on disk only
    assert await read_body(disk_store, key) == b"on disk"
    assert disk_store.memory.peek(key) is None  # the first read in a while: not promoted
    assert await read_body(disk_store, key) == b"on disk"
    (c,) = disk_store.memory.peek(key) or ()  # the second: metadata, then its body once sent
    assert c.body is not None and bytes(c.body) == b"on disk"
    disk_store.memory.clear()
    (c,) = await disk_store.get(key, bodies=True)  # with its body in the same read
    assert c.body == b"on disk" and disk_store.memory.peek(key) is None
    (c,) = await disk_store.get(key, bodies=True)
    (kept,) = disk_store.memory.peek(key) or ()
    assert kept.body is not None and bytes(kept.body) == b"on disk"


async def test_a_key_with_variants_enters_memory_on_its_first_disk_read(disk_store: Storage) -> None:
    """A fill of one more variant merges with what memory holds: were the key left out of
    memory after a disk read, its variants on disk would be hidden behind the new one."""
    key = "http://h.test/v"
    for coding in ("gzip", "br"):
        assert await store(disk_store, entry(key, vary=(("accept-encoding", coding),)), coding.encode())
    disk_store.memory.clear()
    assert len(await disk_store.get(key)) == 2
    assert len(disk_store.memory.peek(key) or ()) == 2  # at once, not on a second read
    assert await store(disk_store, entry(key, vary=(("accept-encoding", ""),)), b"identity", flush=False)
    variants = await disk_store.get(key)  # from memory
    assert sorted([await disk_store.open_body(c) for c in variants]) == [  # type: ignore[type-var]
        b"br", b"gzip", b"identity"]


async def test_an_entry_stored_while_the_clock_was_ahead_is_logged_once_per_process(
        disk_store: Storage, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy makes such an entry stale (``Freshness.age``); the disk read says why, once."""
    monkeypatch.setattr(reads._ClockBack, "seen", False)
    for k in ("ahead-1", "ahead-2", "now"):
        e = entry(k)
        ahead = 86400.0 if k != "now" else 0.0
        f = replace(e.response.freshness, response_time=time.time() + ahead)
        await store(disk_store, replace(e, response=replace(e.response, freshness=f)), b"x")
    disk_store.memory.clear()
    with caplog.at_level(logging.WARNING, "cachegate.storage"):
        assert await disk_store.get("now")
        assert not [r for r in caplog.records if "clock" in r.message]
        for k in ("ahead-1", "ahead-2", "ahead-1"):
            assert await disk_store.get(k)
    said = [r for r in caplog.records if "gone back" in r.message]
    assert len(said) == 1 and "ahead-1" in said[0].message, caplog.text
    assert reads._ClockBack.seen
