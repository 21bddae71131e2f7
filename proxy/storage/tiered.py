"""The store: the memory tier (the machine's shared memory) and the disk tier behind one small
facade, over roles that each do one job.

- ``reads``    memory, then disk (grouped lookups, the directory of the disk's keys), promotion,
  bodies and the open body files (sendfile); ``fresh_view`` for the fast hit path;
- ``writes``   bodies received, stored in the shared memory at once, big ones on disk here,
  revalidated metadata;
- ``persist``  write-behind: the owner commits what the shared memory holds to disk in batches;
- ``purging``  which keys a purge covers, and its shared and local halves;
- ``upkeep``   the owner's background work: ban sweeps, index GC, checkpoints, orphans, and the
  directory of the disk's keys at start.

The facade owns what is in progress in this process (``work.InProgress``: bodies being
received, disk writes in progress by key, recent commits, the purge epoch) once; the roles,
the engine and the coalescer ask it instead of keeping their own. Its methods are the store's
whole interface: callers never reach into a role or a tier's internals.

A seam for a shared tier in front of the disk (a Redis L2, say) is in ``reads.Reader._read``
(a read-through on a local miss, before the disk) and ``writes.Writer.put_memory`` (a
write-through of what a fill stores); nothing else needs to know of it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import IO, Any, TypeVar

from proxy.room import DISK_THREADS
from proxy.storage.bans import BanList, PurgeMatch
from proxy.storage.bodyfiles import OpenBodies, SharedFile
from proxy.storage.disk import ORPHAN_AGE, DiskTier
from proxy.storage.entry import Entry
from proxy.storage.index import Ban, UrlTagIndex
from proxy.storage.memory import Cached, MemoryTier, Slot
from proxy.storage.persist import Persister
from proxy.storage.purging import Purging
from proxy.storage.reads import Reader
from proxy.storage.spool import SPOOLS, SpoolDir, private_spool_root
from proxy.storage.upkeep import Upkeep, UpkeepStats
from proxy.storage.work import InProgress, Tiers
from proxy.storage.writes import BodySpool, Writer

T = TypeVar("T")


class Storage:
    def __init__(
        self,
        memory: MemoryTier,
        disk: DiskTier | None,
        index: UrlTagIndex | None,
        *,
        max_object: int,
        executor: ThreadPoolExecutor | None = None,
        spool_root: str | None = None,
        spool_warn: bool = True,
        configured_limit: int | None = None,
    ) -> None:
        """``configured_limit``: what the config's sizes let the store keep (``storable_limit``,
        which the rules refuse bigger responses by)."""
        self.configured_max_object = max_object
        # What can be stored at all: a body bigger than half a disk shard would be culled at
        # once (or flush the shard); memory-only, it must be small enough for the memory tier
        # (its ``max_object`` is within what one record of the ring holds). The ceiling: with a
        # disk tier, less while the shards' budget is lowered (``Writer.limit``).
        storable = min(max_object, disk.max_body if disk is not None else memory.max_object)
        if configured_limit is not None:
            storable = min(storable, configured_limit)
        # Over max_object: a config warning at FILE:LINE (proxy.config), not logged here by
        # every process.
        self._own_executor = executor is None
        pool = executor or ThreadPoolExecutor(max_workers=DISK_THREADS, thread_name_prefix="disk")
        self.tiers = Tiers(memory, disk, index, BanList(index.bans() if index is not None else ()), pool)
        # Without a cache directory: this user's own folder in the temp dir, never one that
        # every user shares (``private_spool_root``).
        own = False
        if spool_root is None:
            if disk is not None:
                spool_root = os.path.join(disk.path, SPOOLS)
            else:
                spool_root, own = private_spool_root(warn=spool_warn)
        self.spools = SpoolDir(spool_root, own_root=own)
        self.reads = Reader(self.tiers)
        self.writes = Writer(self.tiers, storable, self.spools)
        # What fills put in the shared memory reaches the disk behind them, written by the
        # process that owns the cache directory (``Persister.run_forever``).
        self.persister = Persister(memory.arena, disk, index, self.tiers.bans) if disk is not None else None
        self.purges = Purging(self.tiers, self.persister, self.reads.body_files)
        self.upkeeping = Upkeep(self.tiers, self.spools)
        if disk is not None and index is not None:
            disk.on_evicted = self.upkeeping.evicted  # (a cull's entries leave the index at once)
        # The hit paths' first look: one call straight into the memory tier (no wrapper: each
        # level of call is ≈ 0.1 µs of a ≈ 25 µs hit).
        self.memory_get: Callable[[str], tuple[Cached, ...] | None] = memory.get
        self.memory_copied: Callable[[str], tuple[Cached, ...] | None] = memory.get_copied
        self.fresh_view: Callable[[str], Slot | None] = memory.slot
        self.alive: Callable[[Cached], bool] = memory.alive
        # A fill's steps, bound the same way to the role that does each: a method here that
        # only forwarded was a Python-level call more per step, seven per fill
        # (``scripts/bench-calls``).
        # After memory missed: whether the disk tier is known not to hold the key either.
        self.absent = self.reads.absent
        # The key's variants as the machine has them now (another worker may have stored them).
        self.reread = self.reads.reread
        # The biggest body an entry can be stored with: what the engine refuses a response by
        # up front, when its Content-Length says it is bigger.
        self.room = self.writes.room
        # Storing a body: received into a spool, finalized, made visible in the shared memory,
        # then the disk's part (``writes.Writer``; ``commit`` does the four at once).
        self.spool = self.writes.spool
        self.finalize = self.writes.finalize
        self.put_memory = self.writes.put_memory
        self.put_disk = self.writes.put_disk

    # -- what the store is made of -----------------------------------------------------------

    @property
    def memory(self) -> MemoryTier:
        return self.tiers.memory

    @property
    def disk(self) -> DiskTier | None:
        return self.tiers.disk

    @property
    def index(self) -> UrlTagIndex | None:
        return self.tiers.index

    @property
    def disk_gone(self) -> str | None:
        """Why the disk tier was given up while running (its cache directory is gone:
        ``Tiers.disk``), else None; ``disk`` and ``index`` are None from then on."""
        return self.tiers.gone

    @property
    def bans(self) -> BanList:
        return self.tiers.bans

    @property
    def work(self) -> InProgress:
        """This process's work in progress (see ``work``)."""
        return self.tiers.work

    @property
    def memory_only(self) -> bool:
        """No disk tier: what the shared memory refuses is not stored at all."""
        return self.tiers.disk is None

    @property
    def epoch(self) -> int:
        return self.tiers.work.epoch

    def joining(self, since: int, key: str) -> int | None:
        """The epoch a client joins a fill of ``key`` at, whose request went out at ``since``
        and whose head has not come; None: a local purge (or invalidation) since names the key
        (or they are no longer all remembered), so the client must not join it. A purge of all
        or by tag is told at the head, from its tags (``purged_since`` up to this epoch)."""
        work = self.tiers.work
        epoch = work.epoch
        if epoch == since:
            return epoch
        return None if work.purged_since(since, key, None) else epoch

    def purged_since(self, since: int, key: str, tags: Collection[str], until: int | None = None) -> bool:
        """Whether a local purge after ``since`` (up to ``until``) covers the response under
        ``key`` with ``tags`` (``InProgress.purged_since``: the one purge log)."""
        return self.tiers.work.purged_since(since, key, tags, until)

    @property
    def max_object(self) -> int:
        """The biggest body the store keeps now (``cache.max_object``, within what the tiers
        take: half a disk shard's budget in force, ``Writer.limit``)."""
        return self.writes.limit()

    @max_object.setter
    def max_object(self, value: int) -> None:
        self.writes.max_object = value

    @property
    def spool_in_memory(self) -> int:
        """The biggest body a fill keeps in memory while it streams (``BodySpool.body_bytes``; a
        bigger one goes to a spool file)."""
        return self.writes.spill_threshold

    @property
    def body_files(self) -> OpenBodies:
        return self.reads.body_files

    @property
    def upkeep(self) -> UpkeepStats:
        return self.upkeeping.stats

    @property
    def failed_writes(self) -> int:
        """Disk writes that failed (a shard's lock timed out): this process's own, and write-behind's."""
        return self.writes.failed_writes + (self.persister.stats.failed if self.persister is not None else 0)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.tiers.run(fn, *args)

    def stop_waiting(self) -> None:
        """The process stops: disk calls give up a shard's held write lock at once rather than
        keep the stop waiting (the executor is drained before the shared memory is closed)."""
        if self.tiers.opened_disk is not None:
            self.tiers.opened_disk.stop_waiting()

    def close(self) -> None:
        t = self.tiers
        t.closed = True
        self.stop_waiting()
        if self.persister is not None:
            self.persister.close()
        if self._own_executor:
            t.executor.shutdown(wait=True)
        self.reads.close()
        if t.opened_disk is not None:  # (closed, gone or not: closing writes nothing)
            t.opened_disk.close()
        if t.opened_index is not None:
            t.opened_index.close()
        self.spools.close()
        t.memory.close()

    # -- reading -----------------------------------------------------------------------------

    async def get(self, key: str, *, bodies: bool = False) -> tuple[Cached, ...]:
        """The key's variants: from memory, else from disk (see ``reads.Reader.get``)."""
        return await self.reads.get(key, bodies=bodies)

    def serve_from(self, key: str, slot: Slot, cached: Cached, max_file: int | None
                   ) -> tuple[bool, SharedFile | None]:
        """The fast hit path serves ``cached`` (of ``slot``): whether its body is at hand (in
        memory, or in a file already open of at most ``max_file`` bytes; None: no body is sent,
        a HEAD) and the open file to send it from, if any; when it is, the use is counted."""
        ok, shared = (True, None) if max_file is None else self.reads.open_file(key, cached, max_file)
        if ok:
            self.tiers.memory.use(slot)
            if cached.apart:  # (a variant's body in a record of its own: marked read too)
                self.tiers.memory.use_body(cached)
        return ok, shared

    def keep_head(self, key: str, cached: Cached, head: Any, size: int) -> None:
        """Keep a pre-serialised head of ``cached`` with its decoded entry (counted in memory)."""
        self.tiers.memory.keep_head(key, cached, head, size)

    async def open_body(self, cached: Cached) -> bytes | IO[bytes] | None:
        return await self.reads.open_body(cached)

    def drop_body_file(self, e: Entry) -> None:
        """Close (once unused) the open file of ``e``'s body and keep it no more: it turned out
        cut short (``proxy.storage.bodyfiles.BodyCutShort``)."""
        self.reads.body_files.drop(lambda x: x.key == e.key and x.body_id == e.body_id)

    def sendable_file(self, e: Entry) -> SharedFile | None:
        return self.reads.sendable_file(e)

    def writing(self, key: str) -> list[Any]:
        """This process's disk writes of ``key`` in progress (futures, done when they are)."""
        return self.tiers.work.writing(key)

    def writing_urls(self, urls: Iterable[str]) -> list[Any]:
        return self.tiers.work.writing_urls(urls)

    # -- writing -----------------------------------------------------------------------------

    async def commit(self, entry: Entry, spool: BodySpool) -> bool:
        """Store ``entry`` with the spooled body at once, as a fill does in steps (``finalize``,
        ``put_memory``, ``put_disk``): a range's part (``proxy.engine``)."""
        final = self.writes.finalize(entry, spool)
        if final is None:
            return False
        in_memory = self.writes.put_memory(final, spool)
        return await self.writes.put_disk(final, spool) or (in_memory and self.disk is None)

    async def update_many(self, entries: Sequence[Entry]) -> None:
        """New heads and freshness for stored variants of one key, written together: one record
        in the shared memory, one disk commit (``Writer.update``)."""
        await self.writes.update(entries)

    async def flush(self, until: float | None = None) -> int:
        """Commit to the disk tier what the shared memory holds that it does not yet (the owner's
        write-behind, done now: tests, and a clean stop); how many variants. ``until``: a stop's
        deadline (``time.monotonic``), past which nothing more begins (``Persister.flush``)."""
        return await self.persister.flush(until) if self.persister is not None else 0

    def unwritten(self) -> int:
        """After a stop's ``flush``: the records it left out (the deadline, a shard's lock)."""
        return self.persister.unwritten() if self.persister is not None else 0

    # -- purging -----------------------------------------------------------------------------

    def purging(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.purges.paused()

    async def keys_for_urls(self, urls: Iterable[str], exact: bool = False) -> set[str]:
        return await self.purges.keys_for_urls(urls, exact)

    async def url_keys(self, urls: Iterable[str], exact: bool = False) -> set[str]:
        return await self.purges.url_keys(urls, exact)

    async def hosts_in_memory(self, hosts: Iterable[str]) -> set[str]:
        return await self.purges.hosts_in_memory(hosts)

    async def purge_shared(self, keys: Iterable[str], prefixes: Iterable[str] = (),
                           tags: Iterable[str] = (), all: bool = False, soft: bool = False
                           ) -> tuple[int, list[Ban]]:
        return await self.purges.purge_shared(keys, prefixes, tags, all, soft)

    def purge_mark(self) -> int:
        """Where the shared memory stands as a purge begins (``Purging.mark``)."""
        return self.purges.mark()

    async def purge_memory(self, match: PurgeMatch, start: int | None = None) -> tuple[int, int]:
        return await self.purges.purge_memory(match, start)

    async def purge_local(self, match: PurgeMatch, bans: Iterable[Ban] = ()) -> int:
        return await self.purges.purge_local(match, bans)

    async def purge_unheard(self, match: PurgeMatch, within: float) -> tuple[int, bool]:
        return await self.purges.purge_unheard(match, within)

    def forget_in_memory(self, key: str, soft: bool) -> bool:
        return self.purges.forget_in_memory(key, soft)

    async def delete(self, keys: Iterable[str], soft: bool = False) -> int:
        return await self.purges.delete(keys, soft)

    async def forget_gone(self, key: str) -> None:
        """Forget a variant whose disk body is gone (culled, cut short), so that the next
        request refetches it: an internal delete, not a purge. The directory of disk keys stops
        listing it first (no read finds it whatever the disk does next), then the disk and the
        index are tried once (no retries on a busy shard), then the memory record goes. Raises
        the disk's failure (a full filesystem) after all that, for the caller to count; unlike
        ``delete``, it is not a purge that could not be written (none was asked for)."""
        t = self.tiers
        match = PurgeMatch(keys=frozenset((key,)))
        failure: Exception | None = None
        async with self.purges.paused():
            disk, index = t.disk, t.index
            if disk is not None:
                await t.run(t.memory.arena.disk_remove, [key])

                def on_disk() -> None:
                    disk.delete_keys([key], retry=False)
                    if index is not None and index.damage is None:
                        index.remove([key])

                try:
                    await t.run(on_disk)
                except Exception as exc:  # a full filesystem, a busy shard: counted by the caller
                    failure = exc
            _, start = await self.purges.purge_memory(match)
            await self.purges.purge_local(replace(match, arena_from=start))
        if failure is not None:
            raise failure

    async def delete_all(self, soft: bool = False) -> int:
        return await self.purges.delete_all(soft)

    # -- upkeep (one process per cache directory) --------------------------------------------

    async def maintain(self, *, orphans_before: float | None = None) -> UpkeepStats:
        return await self.upkeeping.maintain(orphans_before=orphans_before)

    async def sweep_dead_spools(self) -> int:
        return await self.upkeeping.sweep_dead_spools()

    async def reload_bans(self) -> None:
        await self.upkeeping.reload_bans()

    async def rebuild_directory(self, page: int = 10_000) -> int:
        return await self.upkeeping.rebuild_directory(page)


__all__ = ["ORPHAN_AGE", "BodySpool", "Cached", "Storage"]
