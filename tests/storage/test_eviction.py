"""Disk eviction (``DiskTier._cull``): whole entries in the policy's order, only until the shard is
under its budget, never the entry just stored; the index and the directory follow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import diskcache
import pytest

from proxy.storage import disk as disk_module
from proxy.storage import upkeep
from proxy.storage.disk import (
    CULL_BATCH,
    CULL_DEBT_TIME,
    CULL_PAUSE,
    CULL_SLACK,
    CULL_SPARE,
    CULL_STEP,
    CULL_TIME,
    DiskTier,
    new_body_id,
    shard_budget,
)
from proxy.storage.entry import Entry, decode_variants, encode_variants
from tests.storage.helpers import MB, entry, open_store, read_body, store

BODY = 2 * MB  # stored as files; a shard of 9 MB holds 4 of them
SMALL = 1024  # kept in the database


def _rows(disk: DiskTier) -> tuple[dict[str, list[str]], set[str]]:
    """Each shard's metadata rows (key -> the body ids its variants name) and body ids."""
    metas: dict[str, list[str]] = {}
    bodies: set[str] = set()
    for shard in disk._shards:
        for (name,) in shard._sql("SELECT key FROM Cache WHERE raw = 1").fetchall():
            if name.startswith("m:"):
                metas[name[2:]] = [e.body_id for e in decode_variants(shard.get(name))]
            elif name.startswith("b:"):
                bodies.add(name[2:])
    return metas, bodies


async def test_a_big_entry_stored_beside_others_near_the_budget_stays_and_only_the_oldest_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, diskcache's cull deleted 10 rows (5 entries) a pass: a 30 MB body stored beside two
    others in a 90 MB shard emptied it, the new entry with it (answered stored, then a miss)."""
    monkeypatch.setattr(upkeep, "GC_SEQ_LAG", 0.0)
    size = 10 * MB
    st = open_store(str(tmp_path / "cache"), disk_size=size, shards=1, memory_max_object=1024,
                    max_object=4 * MB)
    disk, index = st.disk, st.index
    assert disk is not None and index is not None
    budget = shard_budget(size, 1)
    fit = budget // (BODY + 64 * 1024)  # (each body's file, and a little of the database)
    assert fit == 4
    keys = [f"http://h.test/big/{i}" for i in range(10)]
    bodies = {k: os.urandom(BODY) for k in keys}
    try:
        for n, k in enumerate(keys, 1):
            assert await store(st, entry(k), bodies[k])
            held = [x for x in keys[:n] if disk.has(x)]
            assert held == keys[max(0, n - fit):n]  # the newest, as many as fit: the oldest went
            assert disk.volume() <= budget
            assert await read_body(st, k) == bodies[k]
        metas, ids = _rows(disk)
        assert sorted(metas) == sorted(keys[-fit:])
        assert {b for named in metas.values() for b in named} == ids  # whole entries, nothing else
        await st.maintain()  # the index GC drops the evicted entries' rows and directory slots
        assert sorted(index.all_keys()) == sorted(keys[-fit:])
        for k in keys[:-fit]:
            assert st.memory.arena.on_disk(k) is not True  # the directory no longer lists it
            assert await read_body(st, k) is None  # (memory kept its metadata: no body, a miss)
            assert not disk.has(k)
    finally:
        st.close()


def test_small_entries_keep_the_budget_and_go_whole(tmp_path: Path) -> None:
    """New small entries are inserted in bulk (``commit_many`` of keys known new: the owner's
    write-behind), bodies then metadata, with one store time: diskcache's cull took a batch's
    bodies first (10 rows a pass) and left 130 of 600 metadata records naming bodies that were
    gone."""
    disk = DiskTier(str(tmp_path / "cache"), MB, shards=1)
    budget = shard_budget(MB, 1)
    keys = [f"http://h.test/small/{i}" for i in range(3000)]
    try:
        for start in range(0, len(keys), 300):
            items = []
            for k in keys[start:start + 300]:
                body_id = new_body_id()
                e = entry(k).with_body(body_id, SMALL)
                items.append((k, lambda current, e=e: ((e,), []), body_id, os.urandom(SMALL)))
            assert all(disk.commit_many(items, [True] * len(items)))
            assert disk.volume() <= budget
            metas, ids = _rows(disk)
            assert {b for named in metas.values() for b in named} == ids  # no half entries
            assert all(k in metas for k in keys[start:start + 300])  # the batch just written stays
            held = [k for k in keys if k in metas]
            assert len(metas) == start + 300 or len(metas) * (SMALL + 300) > budget // 2  # not emptied
        held = [k for k in keys if k in metas]
        assert held == keys[len(keys) - len(held):]  # the oldest went first
    finally:
        disk.close()


def test_bodies_no_entry_names_are_culled_last_but_the_one_just_put(tmp_path: Path) -> None:
    """A body whose metadata is not committed yet (put first, outside the lock) is never the one
    culled to make room for itself; bodies of a crash no entry names go once entries are gone."""
    disk = DiskTier(str(tmp_path / "cache"), 10 * MB, shards=1)
    try:
        assert disk.put_body("http://h.test/e", "e", b"x")
        assert disk.commit("http://h.test/e", lambda cur: ((entry("http://h.test/e").with_body("e", 1),), []))
        for i in range(8):
            assert disk.put_body("http://h.test/o", f"o{i}", os.urandom(BODY))
            assert disk._shards[0].get(f"b:o{i}") is not None
        assert disk.volume() <= disk.shard_limit
        assert not disk.has("http://h.test/e")  # the entry went before any leftover body
    finally:
        disk.close()


def _fill_small(disk: DiskTier, keys: list[str]) -> None:
    """``keys`` as new 1 KiB entries, in batches as the owner's write-behind commits them."""
    for start in range(0, len(keys), 500):
        items = []
        for k in keys[start:start + 500]:
            body_id = new_body_id()
            e = entry(k).with_body(body_id, SMALL)
            items.append((k, lambda current, e=e: ((e,), []), body_id, os.urandom(SMALL)))
        assert all(disk.commit_many(items, [True] * len(items)))


def test_a_shard_far_over_its_budget_is_culled_to_close_under_it_in_bounded_rounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A smaller budget than the shard holds (cache.disk.size lowered at a restart, the index's
    share grown, culls skipped while busy): one round took the whole excess in one transaction,
    holding the shard's lock for seconds, and its estimate of the bytes freed is below what the
    pages free, so 36 MB culled to a 3.8 MB budget left the shard empty. Now each round deletes
    at most CULL_BATCH rows, aiming at an eighth of the budget, and measures again."""
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1)
    shard = disk._shards[0]
    rounds: list[int] = []  # rows each round (one transaction) deleted
    evict = disk_module._evict

    def counted(sh: object, over: int, keep: frozenset[str], keep_body: str | None, stage: int,
                spare_after: float | None, evicted: list[tuple[str, int]] | None = None) -> int:
        before = len(shard)
        freed = evict(shard, over, keep, keep_body, stage, spare_after, evicted)
        rounds.append(before - len(shard))
        return freed

    try:
        _fill_small(disk, [f"http://h.test/old/{i}" for i in range(12000)])
        full = shard.volume()
        assert not rounds and full > 14 * MB
        budget = full // 4
        shard.size_limit = budget  # (as ``count_index`` lowers it)
        monkeypatch.setattr(disk_module, "_evict", counted)
        pauses: list[float] = []  # the lock left free between rounds, for other processes
        monkeypatch.setattr(disk_module.time, "sleep", pauses.append)
        monkeypatch.setattr(disk_module, "CULL_TIME", 3600.0)  # (its time bound: the test below)
        _fill_small(disk, ["http://h.test/new"])
        monkeypatch.undo()
        kept = shard.volume()
        assert kept <= budget
        # Not emptied, nor far under: at most one round's aim (and a page or so) below.
        assert kept >= budget - budget // CULL_STEP - CULL_SLACK, (kept, budget)
        assert disk.has("http://h.test/new") and len(rounds) > 1
        assert max(rounds) <= CULL_BATCH + 2  # (the last entry a round takes goes whole)
        assert len(pauses) == len(rounds) - 1 and all(0 < p <= CULL_PAUSE for p in pauses)
        metas, ids = _rows(disk)
        assert {b for named in metas.values() for b in named} == ids  # whole entries still
    finally:
        disk.close()


def test_a_cull_stops_after_its_time_and_the_next_writes_cull_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Culls run on the write-behind thread, under the lock purges wait for: 256 rounds with
    their pauses took seconds per shard (a purge waited 9 s, the write-behind queue stopped
    draining, a stop overran its grace). A write's cull now stops after CULL_TIME, and the next
    writes cull what is left."""
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1)
    shard = disk._shards[0]
    clock = [0.0]

    def ticking() -> float:  # each look at the clock: 20 ms later (a round and its pause)
        clock[0] += 0.02
        return clock[0]

    try:
        _fill_small(disk, [f"http://h.test/old/{i}" for i in range(12000)])
        budget = shard.volume() // 4
        shard.size_limit = budget
        monkeypatch.setattr(disk_module.time, "monotonic", ticking)
        monkeypatch.setattr(disk_module.time, "sleep", lambda _: None)
        _fill_small(disk, ["http://h.test/new"])
        assert shard.volume() > budget  # stopped after CULL_TIME, the excess not worked off
        assert disk.has("http://h.test/new")
        for i in range(200):  # later writes, each culling CULL_TIME at most
            if shard.volume() <= budget:
                break
            _fill_small(disk, [f"http://h.test/later/{i}"])
        kept = shard.volume()
        assert budget - budget // CULL_STEP - CULL_SLACK <= kept <= budget, (kept, budget)
        metas, ids = _rows(disk)
        assert {b for named in metas.values() for b in named} == ids  # whole entries still
    finally:
        disk.close()


def test_a_cull_cut_by_its_time_still_frees_what_its_write_added(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The time bound let a flood outgrow the budget: the write-behind commits fills in batches
    (32 of them, 1.5 MB), a round frees an eighth of the budget, and a cull cut after two rounds
    on a slower machine left each batch's rest over the budget (8 MB: 14 MB on disk after a
    flood). A cull now frees at least what its write added before its time counts."""
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1)
    shard = disk._shards[0]
    clock = [0.0]

    def ticking() -> float:  # each look at the clock: 20 ms later (a slow machine's round)
        clock[0] += 0.02
        return clock[0]

    try:
        _fill_small(disk, [f"http://h.test/old/{i}" for i in range(1500)])
        budget = shard.volume()
        shard.size_limit = budget  # (full: every batch below is over it by what it adds)
        assert budget // CULL_STEP < 500 * SMALL < budget
        monkeypatch.setattr(disk_module.time, "monotonic", ticking)
        monkeypatch.setattr(disk_module.time, "sleep", lambda _: None)
        for n in range(6):  # six batches of 500 (each about 600 KB; a round: under 256 KiB)
            _fill_small(disk, [f"http://h.test/new/{n}/{i}" for i in range(500)])
            assert shard.volume() <= budget + CULL_SLACK, (n, shard.volume() - budget)
        assert disk.has("http://h.test/new/5/499")
        metas, ids = _rows(disk)
        assert {b for named in metas.values() for b in named} == ids  # whole entries still
    finally:
        disk.close()


@pytest.mark.parametrize("copied", [True, False])
def test_a_big_bodys_cull_owes_it_for_at_most_its_debt_time_and_a_failed_copy_owes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copied: bool) -> None:
    """Without a bound on the debt, storing a 50 MB body into a shard full of small entries culled
    69 rounds (1.7-2.5 s) on the thread a stop waits for: the stop overran a 1 s grace. And a copy
    that timed out (the shard's lock held by another process) owed its whole size all the same:
    49 rounds, 12,000 entries evicted for a write that added nothing."""
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1)
    shard = disk._shards[0]
    clock = [0.0]
    rounds: list[float] = []
    evict = disk_module._evict

    def ticking() -> float:  # each look at the clock: 20 ms later (a slow machine)
        clock[0] += 0.02
        return clock[0]

    def counted(*args: Any) -> int:
        rounds.append(clock[0])
        return evict(*args)

    try:
        _fill_small(disk, [f"http://h.test/old/{i}" for i in range(6000)])
        shard.size_limit = shard.volume() // 2  # (an older excess, and the body on top of it)
        monkeypatch.setattr(disk_module.time, "monotonic", ticking)
        monkeypatch.setattr(disk_module.time, "sleep", lambda _: None)
        monkeypatch.setattr(disk_module, "_evict", counted)
        if not copied:
            def busy(*args: Any, **kwargs: Any) -> bool:
                raise diskcache.Timeout("the shard's lock is held")
            monkeypatch.setattr(shard, "set", busy)
        assert disk.put_body("http://h.test/big", new_body_id(), os.urandom(6 * MB)) is copied
        assert rounds and rounds[-1] - rounds[0] <= (CULL_DEBT_TIME if copied else CULL_TIME)
        if copied:
            assert len(rounds) > 2  # (past CULL_TIME, for its debt)
    finally:
        disk.close()


async def test_the_owners_upkeep_culls_an_excess_no_write_added(tmp_path: Path) -> None:
    """A write's cull repays what it added and works on an older excess only for what is left of
    CULL_TIME: an excess no write added (the budget lowered as the index grew, a smaller
    cache.disk.size at a restart) stayed once writes stopped (4 MB of long-key entries on a
    loaded machine: 12.9 MB on disk for good). The owner's upkeep rounds now cull it."""
    st = open_store(str(tmp_path / "cache"), disk_size=64 * MB, shards=1)
    disk = st.disk
    assert disk is not None
    shard = disk._shards[0]
    keys = [f"http://h.test/old/{i}" for i in range(6000)]
    try:
        _fill_small(disk, keys)
        # (older than what the upkeep spares: the writes that store them cull for themselves)
        shard._sql("UPDATE Cache SET store_time = store_time - ?", (2 * CULL_SPARE,))
        disk.size_limit = 2 * MB  # (as a restart with a smaller cache.disk.size)
        assert shard.volume() > 3 * shard_budget(2 * MB, 1)
        for _ in range(200):  # upkeep rounds, no writes (one a second in the owner)
            await st.maintain()
            if shard.volume() <= shard.size_limit:
                break
        assert shard.size_limit == shard_budget(2 * MB, 1)
        assert shard.size_limit - shard.size_limit // CULL_STEP - CULL_SLACK <= shard.volume() \
            <= shard.size_limit
        assert disk.has(keys[-1]) and not disk.has(keys[0])  # the oldest went, the newest stayed
        metas, ids = _rows(disk)
        assert {b for named in metas.values() for b in named} == ids  # whole entries still
    finally:
        st.close()


async def test_the_upkeep_cull_spares_the_newest_entries_and_a_cull_measures_under_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner's upkeep cull spares no key a write names: with 2 workers and a shard far over
    its budget it took fills just answered `stored`, the newest in their shard, and two culls
    aiming at one excess measured before either took the lock emptied a shard. Now the upkeep
    spares entries stored in the last CULL_SPARE seconds, and each round measures the excess
    again under the shard's lock."""
    st = open_store(str(tmp_path / "cache"), disk_size=64 * MB, shards=1)
    disk = st.disk
    assert disk is not None
    shard = disk._shards[0]
    old = [f"http://h.test/old/{i}" for i in range(3000)]
    try:
        _fill_small(disk, old)
        shard._sql("UPDATE Cache SET store_time = store_time - ?", (2 * CULL_SPARE,))
        new = [f"http://h.test/new/{i}" for i in range(1000)]
        _fill_small(disk, new)
        shard.size_limit = shard.volume() // 8  # (under what the new entries alone take)
        for _ in range(100):
            disk.cull_over()
        assert all(disk.has(k) for k in new)  # the newest stay, over budget as they are
        assert not any(disk.has(k) for k in old)
        metas, ids = _rows(disk)
        assert {b for named in metas.values() for b in named} == ids

        # Over its budget when first looked at; under it once the lock is taken (another
        # process's cull freed it meanwhile): nothing more is evicted.
        shard.size_limit = shard.volume() + MB
        real = shard.volume
        looks = [0]

        def stale() -> int:
            looks[0] += 1
            return real() + (2 * MB if looks[0] == 1 else 0)

        monkeypatch.setattr(shard, "volume", stale)
        disk._cull(shard, keep=("http://h.test/new/0",))
        assert looks[0] >= 2 and all(disk.has(k) for k in new)
    finally:
        st.close()


def test_the_cull_of_bodies_no_entry_names_spares_named_and_young_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 deleted every body but the culling writer's own: a body another worker had put and
    was about to name (its metadata commit then named a missing body), and the body of an entry
    another process committed between two rounds. Now only bodies older than ORPHAN_AGE that no
    metadata row names, read inside the round's transaction."""
    disk = DiskTier(str(tmp_path / "cache"), 10 * MB, shards=1)
    shard = disk._shards[0]
    late = "http://h.test/late"
    evict = disk_module._evict
    committed: list[str] = []

    def another_commits_first(sh: object, over: int, keep: frozenset[str], keep_body: str | None,
                              stage: int, spare_after: float | None,
                              evicted: list[tuple[str, int]] | None = None) -> int:
        if stage == 1 and not committed:  # an entry committed by another process between rounds
            committed.append(late)
            shard.set("m:" + late, encode_variants((entry(late).with_body("late", BODY),)))
        return evict(shard, over, keep, keep_body, stage, spare_after, evicted)

    monkeypatch.setattr(disk_module, "_evict", another_commits_first)
    young = new_body_id()  # another worker's body, its metadata not committed yet
    try:
        assert disk.put_body("http://h.test/y", young, os.urandom(BODY))
        assert disk.put_body(late, "late", os.urandom(BODY))  # (an id of no time: old)
        for i in range(3):  # a crash's leftovers, old; the third is over the budget
            assert disk.put_body("http://h.test/o", f"o{i}", os.urandom(BODY))
        assert committed  # (the cull reached stage 1)
        assert disk.volume() <= disk.shard_limit
        assert shard.get("b:" + young) is not None
        assert disk.has(late) and shard.get("b:late") is not None
        assert shard.get("b:o0") is None and shard.get("b:o2") is not None  # the oldest leftover went
    finally:
        disk.close()


def test_metadata_naming_a_body_no_longer_on_disk_is_not_committed(tmp_path: Path) -> None:
    """A big body is put before its metadata, outside the lock; culled meanwhile, its metadata was
    committed anyway: answered stored, then a miss, a record naming a missing body."""
    disk = DiskTier(str(tmp_path / "cache"), 10 * MB, shards=1)
    key = "http://h.test/k"
    e = entry(key).with_body(new_body_id(), SMALL)
    try:
        assert disk.put_body(key, e.body_id, os.urandom(SMALL))
        disk.delete_body(key, e.body_id)  # (culled by another process)
        assert not disk.commit(key, lambda current: ((e,), []))
        assert not disk.has(key) and disk.failed_writes == 1

        def refresh(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
            return tuple(c.with_seq(7) for c in current), []

        assert disk.put_body(key, e.body_id, os.urandom(SMALL))
        assert disk.commit(key, lambda current: ((e,), []))
        assert disk.commit(key, refresh)  # (a variant it already names is not looked up)
        assert [v.seq for v in disk.get_variants(key)] == [7]
    finally:
        disk.close()


@pytest.mark.parametrize("policy", ["least-recently-stored", "least-recently-used"])
def test_entries_stamped_ahead_of_a_clock_set_back_are_evicted_first(tmp_path: Path, policy: str) -> None:
    """Entries stored while the clock was a day ahead (set right since, by NTP or a restart)
    sorted as the newest: the cull took every entry stored since the step first and kept the
    old ones. Stamped ahead of the clock, they now go first."""
    disk = DiskTier(str(tmp_path / "cache"), 64 * MB, shards=1, eviction_policy=policy)  # type: ignore[arg-type]
    shard = disk._shards[0]
    old = [f"http://h.test/old/{i}" for i in range(1000)]
    new = [f"http://h.test/new/{i}" for i in range(1000)]
    try:
        _fill_small(disk, old)
        shard._sql("UPDATE Cache SET store_time = store_time + 86400, access_time = access_time + 86400")
        _fill_small(disk, new)
        # (older than what the upkeep spares: the writes that store them cull for themselves)
        shard._sql("UPDATE Cache SET store_time = store_time - ?, access_time = access_time - ?"
                   " WHERE store_time < ?", (2 * CULL_SPARE, 2 * CULL_SPARE, disk_module.time.time() + 3600))
        shard.size_limit = shard.volume() // 3  # room for some of the new entries
        for _ in range(200):
            disk.cull_over()
            if shard.volume() <= shard.size_limit:
                break
        assert shard.volume() <= shard.size_limit
        assert not any(disk.has(k) for k in old)
        held = [k for k in new if disk.has(k)]
        assert held and held == new[len(new) - len(held):]  # the newest stay
        metas, ids = _rows(disk)
        assert {b for named in metas.values() for b in named} == ids  # whole entries still
        order = disk_module._EVICTION_ORDER[policy]
        for where in (disk_module._AHEAD, disk_module._NOT_AHEAD):  # each scan a range of the index
            sql = disk_module._CULL_SCAN.format(order=order, spare=disk_module._SPARE + where.format(order=order))
            plan = " ".join(str(r[-1]) for r in shard._sql("EXPLAIN QUERY PLAN " + sql, (1, 2, 3)).fetchall())
            assert f"USING INDEX Cache_{order}" in plan and "TEMP B-TREE" not in plan
    finally:
        disk.close()
