"""A cache directory written, between two runs of this release, by another program with another
``cache.disk.shards``: an earlier release the operator went back to, with its own config.

Such a release knows neither the layout record (``<path>/shards``) nor the stamp of our clean
stop: it looks keys up at ``crc32 % its count``, so its purges miss the entries we placed
elsewhere (its ban sweep deletes in the wrong shards, then drops the ban) and its fills land
where we never look. Our next start trusted the record (the same count as ours) and served what
the earlier release had purged, 200 and all. Now the stamp of the last clean stop does not match,
the placement is checked, an entry out of place shows another count wrote the directory, and
the disk tier is emptied, with one WARNING line saying why and what to do.

The earlier release is simulated with the shards and the index themselves, doing what it did:
its purge of a tag deletes each key in the shard its count names (and its index rows), and a
refill of one purged URL lands in that shard.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import diskcache
import pytest

from proxy.storage.disk import STAMP_FILE, DiskTier, foreign_placement, shard_of, stamp_matches
from proxy.storage.entry import body_refs
from proxy.storage.index import UrlTagIndex
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

PATHS = [f"/s{i}" for i in range(40)]
PURGED = [p for i, p in enumerate(PATHS) if i % 10 == 3]
FOREIGN = "another program with another shard count"


def cache(shards: int, size: str = "64MB") -> str:
    return f"cache: {{memory: 8MB, max_object: 1MB, disk: {{path: cache, size: {size}, shards: {shards}}}}}\n"


def body(path: str) -> bytes:
    return (path.encode() + b"|") * 20


def route(origin: Origin) -> None:
    for p in PATHS:
        origin.route(p, body=body(p), headers={"Cache-Control": "max-age=600",
                                               "Surrogate-Key": "t3" if p in PURGED else "x"})


async def run(tmp_path: Path, origin: Origin, shards: int, size: str = "64MB") -> ProxyProcess:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache(shards, size)))
    await proxy.start(with_log=True)
    return proxy


async def filled(tmp_path: Path, origin: Origin, shards: int) -> None:
    """cachegate with ``shards`` shards stores every path, then stops cleanly (its stamp)."""
    route(origin)
    proxy = await run(tmp_path, origin, shards)
    try:
        assert set((await statuses(proxy, PATHS)).values()) == {"MISS"}
    finally:
        assert await proxy.stop() == 0


async def statuses(proxy: ProxyProcess, paths: list[str]) -> dict[str, str]:
    found = {}
    for p in paths:
        r = await proxy.get(p)
        assert (r.status, r.body) == (200, body(p)), p
        found[p] = r.x_cache
    return found


def shard(directory: Path, index: int) -> diskcache.Cache:
    return diskcache.Cache(str(directory / f"{index:03d}"), statistics=False)


def earlier_release_purges(directory: Path, shards: int, tag: str) -> list[str]:
    """An earlier release run with ``shards`` shards (its own budget per shard) purges ``tag``:
    its ban sweep deletes each key in the shard its count names, then drops the ban. The keys it
    missed."""
    index = UrlTagIndex(str(directory))
    try:
        keys = index.keys_for_tag(tag)
    finally:
        index.close()
    disk = DiskTier(str(directory), 64 << 20, shards)
    try:
        missed = [k for k in keys if not disk.has(k)]
        disk.delete_keys(keys)
    finally:
        disk.close()
    return missed


def earlier_release_purges_and_refills(directory: Path, shards: int, tag: str) -> list[str]:
    """What an earlier release run with ``shards`` shards leaves after a purge of ``tag`` and a
    refill of one purged URL; the keys it purged."""
    index = UrlTagIndex(str(directory))
    try:
        keys = index.keys_for_tag(tag)
    finally:
        index.close()
    for key in keys:  # (the shards opened as they are: only the placement tells)
        s = shard(directory, shard_of(key, shards))
        s.delete("m:" + key)
        s.close()
    recorded = int((directory / "shards").read_text())
    refilled = next(k for k in keys if shard_of(k, shards) != shard_of(k, recorded))
    ours, theirs = shard(directory, shard_of(refilled, recorded)), shard(directory, shard_of(refilled, shards))
    try:  # (its refill: a copy of the entry, in the shard its count names)
        meta = ours.get("m:" + refilled)
        for body_id, _ in body_refs(meta):
            theirs.set("b:" + body_id, ours.get("b:" + body_id))
        theirs.set("m:" + refilled, meta)
    finally:
        ours.close()
        theirs.close()
    return keys


async def test_purges_of_an_earlier_release_run_with_another_count_are_not_undone(
        origin: Origin, tmp_path: Path) -> None:
    await filled(tmp_path, origin, 8)
    directory = tmp_path / "cache"
    purged = earlier_release_purges_and_refills(directory, 4, "t3")
    assert len(purged) == len(PURGED)
    # Some purged entries are in shards 4-7, which a 4-shard release never reads.
    assert any(shard_of(k, 8) >= 4 for k in purged)

    proxy = await run(tmp_path, origin, 8)
    try:
        # Without the check, those were HITs with the copy fetched before the purge.
        assert set((await statuses(proxy, PURGED)).values()) == {"MISS"}
        warned = [line for line in proxy.lines if FOREIGN in line]
        assert len(warned) == 1 and "Keep the same cache.disk.shards" in warned[0], proxy.lines
    finally:
        assert await proxy.stop() == 0
    assert all(origin.count(p) == 2 for p in PURGED)


async def test_purges_of_an_earlier_release_run_with_fewer_shards_that_stored_nothing_are_not_undone(
        origin: Origin, tmp_path: Path) -> None:
    """Nothing out of place: only the budget diskcache noted in the shards it opened (the first
    four, with a 4-shard budget) tells that it ran with fewer shards."""
    await filled(tmp_path, origin, 8)
    missed = earlier_release_purges(tmp_path / "cache", 4, "t3")
    assert missed and all(shard_of(k, 8) >= 4 for k in missed)

    proxy = await run(tmp_path, origin, 8)
    try:
        # Without the check, the missed ones were HITs with the copy fetched before the purge.
        assert set((await statuses(proxy, PURGED)).values()) == {"MISS"}
        warned = [line for line in proxy.lines if FOREIGN in line]
        assert len(warned) == 1 and "fewer shards" in warned[0], proxy.lines
    finally:
        assert await proxy.stop() == 0


async def test_a_restart_after_a_kill_checks_the_placement_and_keeps_every_entry(
        origin: Origin, tmp_path: Path) -> None:
    await filled(tmp_path, origin, 8)
    assert (tmp_path / "cache" / STAMP_FILE).exists()
    proxy = await run(tmp_path, origin, 8)  # (a HIT takes the entry from disk: memory is new)
    await proxy.kill()
    assert not stamp_matches(str(tmp_path / "cache"))  # (the run wrote since the stamp)
    proxy = await run(tmp_path, origin, 8)
    try:
        assert set((await statuses(proxy, PATHS)).values()) == {"HIT"}
        assert not [line for line in proxy.lines if "emptied" in line or FOREIGN in line], proxy.lines
    finally:
        assert await proxy.stop() == 0


async def test_folders_past_the_count_of_a_release_run_with_more_shards_empty_the_disk_tier(
        origin: Origin, tmp_path: Path) -> None:
    """An 8-shard release run on our 4-shard directory made folders 004-007, and looked each of
    our entries up at crc32 % 8: its purges missed half of them, though it stored nothing."""
    await filled(tmp_path, origin, 4)
    # Its purge of t3 (folders 004-007 made): the entries whose shard at 8 is another than at 4 stay.
    missed = earlier_release_purges(tmp_path / "cache", 8, "t3")
    assert missed
    proxy = await run(tmp_path, origin, 4)
    try:
        # Without the check, those were HITs, and the start said "an interrupted move ... finished".
        assert set((await statuses(proxy, PURGED)).values()) == {"MISS"}
        warned = [line for line in proxy.lines if FOREIGN in line]
        assert len(warned) == 1 and "shard folder 004" in warned[0], proxy.lines
        assert not [line for line in proxy.lines if "interrupted" in line], proxy.lines
    finally:
        assert await proxy.stop() == 0
    assert not (tmp_path / "cache" / "005").exists()


def test_the_placement_check_leaves_a_shard_sqlite_cannot_read_to_its_repair(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    (directory / "000").mkdir(parents=True)
    (directory / "000" / "cache.db").write_bytes(b"not a database" * 100)
    (directory / "shards").write_text("1\n")
    assert foreign_placement(str(directory)) is None


async def test_a_clean_stop_of_a_single_process_leaves_a_stamp_the_next_start_finds_matching(
        origin: Origin, tmp_path: Path) -> None:
    """The stamp listed each shard's empty write-ahead log, which SQLite removes when the
    process's last connection closes, after the stamp: no clean stop's stamp ever matched, and
    every start scanned the shards."""
    await filled(tmp_path, origin, 8)
    assert stamp_matches(str(tmp_path / "cache"))


def immutable(file: Path, on: bool) -> bool:
    """``chattr +i`` / ``-i``: a file even root cannot write (False: not supported here)."""
    return subprocess.run(["chattr", "+i" if on else "-i", str(file)], capture_output=True).returncode == 0


async def test_a_start_that_failed_midway_after_a_size_change_empties_nothing(
        origin: Origin, tmp_path: Path) -> None:
    """diskcache writes the budget into each shard it opens: a start with a new cache.disk.size
    that failed at shard 005 (not writable) left shards of two budgets, as a program with fewer
    shards does, and the next start emptied the operator's cache for it."""
    await filled(tmp_path, origin, 8)
    db = tmp_path / "cache" / "005" / "cache.db"
    if not immutable(db, True):
        pytest.skip("chattr +i is not supported here (a shard that cannot be written is how a start fails midway)")
    try:
        with pytest.raises(AssertionError, match="cannot be written"):  # (it exits: ``wait_for``)
            await run(tmp_path, origin, 8, "48MB")
    finally:
        assert immutable(db, False)
    proxy = await run(tmp_path, origin, 8, "48MB")
    try:
        assert set((await statuses(proxy, PATHS)).values()) == {"HIT"}
        assert not [line for line in proxy.lines if FOREIGN in line], proxy.lines
    finally:
        assert await proxy.stop() == 0


async def test_a_rollback_after_a_run_that_was_killed_is_still_seen(origin: Origin, tmp_path: Path) -> None:
    """The budgets our starts opened the shards with were kept until the next clean stop: after
    a run at 8 shards that was killed, a 4-shard earlier release's budget was still among ours
    (the 4-shard run before it), and its purges' misses were HITs again."""
    await filled(tmp_path, origin, 4)
    proxy = await run(tmp_path, origin, 8)  # (its start moves the entries to 8 shards)
    await proxy.kill()
    missed = earlier_release_purges(tmp_path / "cache", 4, "t3")
    assert missed and all(shard_of(k, 8) >= 4 for k in missed)
    proxy = await run(tmp_path, origin, 8)
    try:
        assert set((await statuses(proxy, PURGED)).values()) == {"MISS"}
        assert len([line for line in proxy.lines if FOREIGN in line]) == 1, proxy.lines
    finally:
        assert await proxy.stop() == 0
