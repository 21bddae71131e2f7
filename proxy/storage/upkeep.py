"""Upkeep: what the owner of the cache directory does in the background (the only process, or
the supervisor): sweep bans into real deletions, drop index rows of entries diskcache evicted,
fold the write-ahead logs back, remove what a crash left behind, and build the directory of
the disk's keys at start."""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.storage.bans import GONE, BanList
from proxy.storage.entry import Entry
from proxy.storage.index import Ban
from proxy.storage.spool import SpoolDir, sweep_dead_spools
from proxy.storage.work import Tiers

log = logging.getLogger("cachegate.storage")

SWEEP_BATCH = 1000
GC_BATCH = 2000
GC_SEQ_LAG = 10.0  # seconds: index rows younger than this may belong to a commit in progress


@dataclass
class UpkeepStats:
    bans_swept: int = 0
    entries_swept: int = 0
    index_rows_dropped: int = 0
    orphans_removed: int = 0


class Upkeep:
    def __init__(self, tiers: Tiers, spools: SpoolDir) -> None:
        self.t = tiers
        self.spools = spools
        self.stats = UpkeepStats()
        self._gc_cursor = ""
        self._gc_seq_marks: collections.deque[tuple[float, int]] = collections.deque()
        self._gc_dropped_since_vacuum = 0

    async def maintain(self, *, orphans_before: float | None = None) -> UpkeepStats:
        """One round of upkeep: sweep bans, a step of index GC, and (when asked) orphans; first
        of all, whether the cache directory is still the one opened (``directory_gone``)."""
        t = self.t
        if t.index is None or t.disk is None:
            return self.stats
        if await t.run(self.directory_gone):
            return self.stats
        try:
            return await self._round(orphans_before)
        except Exception:
            # A round that failed as the directory went away under it is that, said once as
            # that (not a failed round with its traceback, nor the index's damage).
            if await t.run(self.directory_gone):
                return self.stats
            raise

    async def _round(self, orphans_before: float | None) -> UpkeepStats:
        t = self.t
        index = t.index
        assert index is not None and t.disk is not None
        if index.damage is None:
            try:
                await self._index_round()
            except sqlite3.DatabaseError as exc:
                # A damaged index: noted (and logged) once, set aside at the next start; until
                # then purges empty the disk tier, and the rounds leave the index alone.
                if await t.run(self.directory_gone) or not await t.run(index.noticed, exc):
                    raise
        await t.run(self._checkpoint)
        await t.run(index.look_for_damage)  # found by a worker: for /healthz and the metrics
        if orphans_before is not None:
            removed = await t.run(t.disk.sweep_stray_files, orphans_before)
            removed += await self.sweep_dead_spools()
            if removed:
                log.info("removed %d orphan(s) left by an earlier crash", removed)
            self.stats.orphans_removed += removed
        return self.stats

    def directory_gone(self) -> bool:
        """Whether the cache directory (or its index) is no longer the one this process opened:
        then the disk tier is given up in every process (``Tiers.lose_disk``: memory only), and
        said once, as an error naming the directory and what to do. Two stats a round."""
        t = self.t
        disk, index = t.disk, t.index
        if disk is None or index is None:
            return True
        why = disk.directory_gone()
        if why is None and index.file_gone():
            why = f"lost its index {index.file} (removed, or another file in its place)"
        if why is None:
            return False
        t.lose_disk(f"the cache directory {disk.path} {why}")
        log.error("the cache directory %s %s while cachegate ran: the disk tier is off until "
                  "cachegate restarts (responses are kept in the shared memory only, and nothing "
                  "is read from or written to %s any more, nor at the stop); restart cachegate to "
                  "have a disk tier again (it starts it empty; a directory moved away can be moved "
                  "back first, with its entries)", disk.path, why, disk.path)
        return True

    async def _index_round(self) -> None:
        """Bans swept, then a step of the index GC."""
        t = self.t
        index = t.index
        assert index is not None
        mark = t.bans.mark()
        bans = await t.run(index.bans)
        t.bans.refresh(bans, mark)
        for ban in bans:
            await self._sweep_ban(ban)
        if bans:
            mark = t.bans.mark()
            t.bans.refresh(await t.run(index.bans), mark)
        await t.run(self._gc_step)

    async def sweep_dead_spools(self) -> int:
        """Remove the spool folders of processes that are gone (their files, half-received
        bodies, count against the disk budget) and the bodies their intents orphaned; how many.
        At the orphan sweeps, and at once when the supervisor sees a worker die."""
        t = self.t
        disk = t.disk
        if disk is None:  # memory-only: the folders alone (no body is ever written from them)
            return await t.run(sweep_dead_spools, self.spools.root)

        def sweep_dead() -> int:
            orphans = 0

            def check(intents: list[tuple[str, str]]) -> None:
                nonlocal orphans
                orphans += disk.sweep_intents(intents)

            folders = sweep_dead_spools(self.spools.root, check)
            return folders + orphans

        return await t.run(sweep_dead)

    async def reload_bans(self) -> None:
        if self.t.index is not None:
            mark = self.t.bans.mark()
            self.t.bans.refresh(await self.t.run(self.t.index.bans), mark)

    async def rebuild_directory(self, page: int = 10_000) -> int:
        """Fill the shared memory's directory of the disk tier's keys from the index (the owner,
        at start); lookups of unknown keys ask the disk until it is ready. How many keys."""
        t = self.t
        arena, index = t.memory.arena, t.index
        if not arena.directory or index is None or t.disk is None:
            return 0
        arena.set_directory_ready(False)
        after, total = "", 0
        while True:
            keys = await t.run(index.all_keys, after, page)
            if not keys:
                break
            await t.run(arena.disk_add, keys)
            total += len(keys)
            after = keys[-1]
        arena.set_directory_ready()
        log.info("directory of the disk tier's keys: %d keys", total)
        return total

    async def _sweep_ban(self, ban: Ban) -> None:
        t = self.t
        index, disk = t.index, t.disk
        assert index is not None and disk is not None
        pages: dict[str, Callable[[str, int], list[str]]] = {
            "tag": lambda after, n: index.keys_for_tag(ban.value, after, n),
            "prefix": lambda after, n: index.keys_for_prefix(ban.value, after, n),
            # Every key on disk, not the index's: an entry it does not list is swept too.
            "all": disk.keys_page,
        }
        page = pages[ban.kind]
        after = ""
        while True:
            keys = await t.run(page, after, SWEEP_BATCH)
            if not keys:
                break
            await t.run(self._apply_ban, ban, keys)
            after = keys[-1]
        await t.run(index.remove_ban, ban.id)
        self.stats.bans_swept += 1

    def _apply_ban(self, ban: Ban, keys: list[str]) -> None:
        t = self.t
        disk, index = t.disk, t.index
        assert disk is not None and index is not None
        one = BanList([ban])
        emptied: list[tuple[str, int]] = []  # keys the sweep emptied, and the newest seq it saw
        swept = 0

        def merge(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
            nonlocal swept
            out: list[Entry] = []
            dropped: list[str] = []
            for e in current:
                v = one.verdict(e)
                if v is None:
                    out.append(e)
                    continue
                swept += 1
                if v == GONE:
                    dropped.append(e.body_id)
                else:
                    out.append(e if e.response.invalidated else e.invalidated())
            if current and not out:
                emptied.append((current[0].key, max(e.seq for e in current)))
            return tuple(out), dropped

        disk.update_many(keys, merge, lost=[])  # (a damaged shard's are not read any more)
        # Only rows no newer than what the sweep deleted: a fill committed meanwhile (its row
        # comes first) stays findable. Rows of keys the disk no longer had are the GC's.
        gone = index.remove_stale(emptied)
        t.memory.arena.disk_remove(gone)
        self.stats.entries_swept += swept

    def evicted(self, gone: list[tuple[str, int]]) -> None:
        """Drop the index rows of entries a disk cull took (their keys and newest sequence
        numbers), in any process, once the cull's round committed: only rows no newer than what
        it took (a refill committed meanwhile stays findable), and their keys leave the
        directory of disk keys. Why at once rather than by the GC: the GC judges a row only
        after GC_SEQ_LAG and a lap of the index, and meanwhile the index held the rows of every
        entry culled since (10 s of 400 fills a second with 1,000 tags each: over 100 MB of rows
        beside a 100 MB cache.disk.size); now the index shrinks with the shards."""
        t = self.t
        index = t.index
        if index is None or index.damage is not None:
            return
        dead = index.remove_stale(gone)
        if dead:
            t.memory.arena.disk_remove(dead)
            self.stats.index_rows_dropped += len(dead)

    def _gc_step(self) -> None:
        """Check the next batch of index rows; drop those whose entry diskcache evicted."""
        t = self.t
        index, disk = t.index, t.disk
        assert index is not None and disk is not None
        # Only rows older than GC_SEQ_LAG are judged: a younger row may belong to a commit
        # whose metadata is not written yet. Marks remember which seq was current when.
        now = time.monotonic()
        marks = self._gc_seq_marks
        marks.append((now, index.current_seq()))
        while len(marks) >= 2 and now - marks[1][0] >= GC_SEQ_LAG:
            marks.popleft()
        if now - marks[0][0] < GC_SEQ_LAG:
            return
        cutoff = marks[0][1]
        rows = index.scan(self._gc_cursor, GC_BATCH)
        self._gc_cursor = rows[-1][0] if len(rows) == GC_BATCH else ""
        judged = [(k, seq) for k, seq in rows if seq <= cutoff]
        there = disk.present(k for k, _ in judged)
        # Removed only if still the row judged: a refill committed since (a new row, a new seq)
        # would otherwise lose its row and its place in the directory while on disk.
        dead = index.remove_stale([(k, seq) for k, seq in judged if k not in there])
        if dead:
            t.memory.arena.disk_remove(dead)
            self.stats.index_rows_dropped += len(dead)
            self._gc_dropped_since_vacuum += len(dead)
        if self._gc_cursor == "" and self._gc_dropped_since_vacuum:
            index.vacuum()
            self._gc_dropped_since_vacuum = 0

    def _checkpoint(self) -> None:
        """Fold the journals back, count the index against the shards' budgets and the whole
        against cache.disk.size, and cull what is over either."""
        t = self.t
        disk, index = t.disk, t.index
        assert disk is not None and index is not None
        disk.checkpoint()
        excess = index_bytes = 0
        if index.damage is None:
            index.checkpoint()
            index_bytes = index.size()
            if disk.excess(index_bytes) > 0 and index.free_bytes():
                # Over cache.disk.size: the pages the index no longer uses (the rows of entries
                # culled meanwhile) are given back before anything more is culled for them. Not
                # otherwise: the next rows reuse them, and each step goes through the log.
                index.vacuum()
                index_bytes = index.size()
            # Published for every process: what they store follows the budget (``Writer.limit``),
            # and bodies too big for memory are not stored while the disk is over its size.
            t.memory.arena.set_shard_budget(disk.count_index(index_bytes))
            excess = disk.weigh(index_bytes)
            t.memory.arena.set_disk_full(disk.full)
        disk.cull_over(excess, index_bytes)
