"""Purging: which keys a purge covers, and removing (or marking stale) them in every tier.

Purges have two halves, so that several worker processes can share the store:

- the shared half, once (the only process, or the supervisor): ``purge_shared`` acts on
  the disk tier and index (URL keys are deleted at once; tags, prefixes and "all" become
  bans), and ``purge_memory`` on the machine's shared memory;
- ``purge_local`` acts in each process: its ban list, the fills it has in flight (a fill
  that was running when the purge arrived is not stored; one being written to disk is
  waited for and removed again), and what reached the shared memory since the purge began
  (before it looked up any key: a fill that completes while the purge looks keys up, after
  its URL was looked up, is found there).

A process that answers ``purge_local`` cannot serve a purged object afterwards: disk reads
that were running during the purge are done again (``InProgress.epoch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from proxy.errors import PurgeUnavailable
from proxy.policy.keys import url_of_key
from proxy.room import filesystem_full, human_size, space
from proxy.storage.arena import F_BODY, Record
from proxy.storage.bans import PurgeMatch
from proxy.storage.bodyfiles import OpenBodies
from proxy.storage.disk import BUSY_PATIENCE, ShardBusy, ShardUnavailable, drop_all
from proxy.storage.entry import Entry, record_tags
from proxy.storage.index import Ban
from proxy.storage.memory import PUT_TRIES, record_of
from proxy.storage.persist import Persister
from proxy.storage.work import Tiers

# The event loop's time a purge's work on the shared memory takes between two turns of the loop
# (``Turns``): a purge by tag decodes each record's metadata (~40 µs), so a pass over 40,000
# records held the loop for 1.6 s; in slices, other clients are answered meanwhile.
SLICE_SECONDS = 0.005

log = logging.getLogger("cachegate.storage")
T = TypeVar("T")


# SQLite's primary result codes of a failure of the moment: BUSY, LOCKED, NOMEM, IOERR, CANTOPEN.
_TRANSIENT_SQLITE = frozenset((5, 6, 7, 10, 14))


def transient(exc: BaseException) -> bool:
    """Whether a disk failure met by a purge is one of the moment rather than a bug: an
    operating-system error (no file descriptors or memory left: EMFILE, ENFILE, ENOMEM) or
    SQLite's "unable to open database file", "disk I/O error", "database is locked", "out of
    memory". Damage is told apart before this (``UrlTagIndex.noticed``, ``DiskTier.noticed``);
    "no such table" and the like stay bugs (500)."""
    if isinstance(exc, OSError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _TRANSIENT_SQLITE


class Turns:
    """Slices of a purge's long passes (records looked at, keys dropped), each ending once it has
    taken ``SLICE_SECONDS`` of the event loop: ``if turns.due(): await turns.take()`` after
    each piece of work. By the time spent, not by a count of records: a record costs 1 µs when
    the purge names URLs and 40 µs when it names tags; a key dropped costs more than one looked
    at, and a soft purge rewrites each. A slice of 256 records made by count was 10 ms for one
    purge and a second for another; 10,000 keys dropped with no turn held clients for a second."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due = time.perf_counter() + SLICE_SECONDS

    def due(self) -> bool:
        return time.perf_counter() >= self._due

    async def take(self) -> None:
        await asyncio.sleep(0)
        self._due = time.perf_counter() + SLICE_SECONDS

    async def collect(self, found: Iterable[T | None]) -> list[T]:
        """The items of ``found`` but the Nones (each a record or URL looked at in vain: a pass
        over the shared memory such as ``MemoryTier.find_url_keys``), with a turn of the event
        loop whenever one is due. The one way purges and inspection look through the memory."""
        out: list[T] = []
        for item in found:
            if item is not None:
                out.append(item)
            if self.due():
                await self.take()
        return out


class Purging:
    def __init__(self, tiers: Tiers, persister: Persister | None, body_files: OpenBodies) -> None:
        self.t = tiers
        self._persister = persister
        self._body_files = body_files
        # The disk deletion of an unanswered purge, while it runs (``purge_unheard``).
        self._unheard_disk: asyncio.Future[list[str]] | None = None

    def paused(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held by a purge while it acts on the shared memory and the disk: no write-behind batch
        is in flight meanwhile, and none commits what the purge removed."""
        if self._persister is None:
            return contextlib.nullcontext()
        return self._persister.paused()

    # -- which keys ----------------------------------------------------------------------------

    async def keys_for_urls(self, urls: Iterable[str], exact: bool = False) -> set[str]:
        """``url_keys`` for a purge: an index that cannot be read is the purge's 503
        (``_unrecorded``)."""
        try:
            return await self.url_keys(urls, exact)
        except (sqlite3.Error, OSError) as exc:  # a full filesystem: the purge's 503
            raise self._unrecorded(exc) from exc

    async def url_keys(self, urls: Iterable[str], exact: bool = False) -> set[str]:
        """Every key of these URLs (all key shapes: header and cookie parts), in both tiers.
        ``exact``: no key of theirs has header or cookie parts (``MemoryTier.find_url_keys``).
        Raises what reading the index raised (sqlite3.Error, OSError)."""
        t = self.t
        urls = list(urls)
        # The index knows every key shape of what reached the disk; memory is asked for the
        # plain keys (and, without an index that answers, looked through for the others).
        # One pass over the memory for all of them, in slices (``Turns``): a pass over 250,000
        # records held every worker's loop for 2-4 s when inspection made it in one go.
        found: list[str] = []
        if t.index is not None and urls:
            index = t.index
            found = await self._ask_index(lambda: [k for u in urls for k in index.keys_for_url(u)], [])
        keys: set[str] = set(found)
        keys.update(await Turns().collect(t.memory.find_url_keys(urls, not self.index_answers, exact)))
        return keys

    async def hosts_in_memory(self, hosts: Iterable[str]) -> set[str]:
        """Which of ``hosts`` (``name[:port]``) a key in the shared memory names, in slices
        (``Turns``), the pass ending once all are found. With an index that answers, only the
        records not yet written to disk are looked at: ask the index first."""
        return set(await Turns().collect(self.t.memory.find_hosts(hosts, scan=not self.index_answers)))

    @property
    def index_answers(self) -> bool:
        """Whether there is an index, and it is not damaged (``UrlTagIndex.noticed``)."""
        return self.t.index is not None and self.t.index.damage is None

    async def _ask_index(self, lookup: Callable[[], T], otherwise: T) -> T:
        """``lookup`` in the index; ``otherwise`` when it finds the index damaged (a purge then
        empties the disk tier: ``_purge_shared``)."""
        index = self.t.index
        assert index is not None
        if index.damage is not None:
            return otherwise
        try:
            return await self.t.run(lookup)
        except sqlite3.DatabaseError as exc:
            if not await self.t.run(index.noticed, exc):
                raise
            return otherwise

    # -- the shared half -----------------------------------------------------------------------

    async def purge_shared(self, keys: Iterable[str], prefixes: Iterable[str] = (),
                           tags: Iterable[str] = (), all: bool = False, soft: bool = False
                           ) -> tuple[int, list[Ban]]:
        """The disk's part of a purge's shared half (once per cache directory): delete (or mark
        stale) the keys on disk now; record tags, prefixes and "all" as bans. Returns (entries,
        bans)."""
        if self.t.disk is None:
            return 0, []
        try:
            return await self.t.run(self._purge_shared, list(keys), list(prefixes), list(tags), all, soft)
        except (sqlite3.Error, OSError) as exc:
            raise self._unrecorded(exc) from exc
        except ShardBusy as exc:  # (its write lock held for BUSY_PATIENCE seconds)
            raise PurgeUnavailable(
                f"the purge could not take the write lock of the disk shard {exc}: another "
                f"process held it (waited for up to {BUSY_PATIENCE:.0f} s, less when cachegate began "
                "to stop meanwhile; stopped or hung?); it was not carried out, or only in part: "
                "purge again") from exc
        except ShardUnavailable as exc:  # (no file descriptors left, a mark not written...)
            message = f"{exc}; the purge was not carried out, or only in part: purge again"
            log.warning("%s", message)
            raise PurgeUnavailable(message) from exc

    def _unrecorded(self, exc: sqlite3.Error | OSError) -> Exception:
        """What a purge's disk read or write that failed with ``exc`` raises: ``PurgeUnavailable``
        (the admin API's 503, naming the cause) when the cache directory's filesystem is full or
        the failure is one of the moment (``transient``), ``exc`` itself otherwise (a bug: the
        admin API's 500, logged).

        Why: on a full filesystem a purge's bans and deletions cannot be committed; it failed
        safe (nothing answered as purged) but the answer was a bare 500 "internal error". The
        same 500 met an index lookup that could not open a file (no file descriptors left): the
        purge was not carried out and purging again, later, is what works."""
        disk = self.t.disk
        path = disk.path if disk is not None else None
        if path is not None and filesystem_full(path, exc):
            room = space(path)
            free = f" ({human_size(room[0])} free of {human_size(room[1])})" if room is not None else ""
            message = (f"the purge could not be written to the cache directory {path} "
                       f"(cache.disk.path): its filesystem is full{free}: {exc}; it was not carried "
                       "out, or only in part: free some space there, then purge again")
        elif transient(exc):
            message = (f"the purge could not read or write the cache directory {path} "
                       f"(cache.disk.path): {exc}; it was not carried out, or only in part: "
                       "purge again")
        else:
            return exc
        log.warning("%s", message)
        return PurgeUnavailable(message)

    def _purge_shared(self, keys: list[str], prefixes: list[str], tags: list[str], all_: bool,
                      soft: bool) -> tuple[int, list[Ban]]:
        t = self.t
        disk, index = t.disk, t.index
        if disk is None:  # (its directory found gone since the caller looked: memory only)
            return 0, []
        if index is not None and index.damage is None:
            try:
                return self._purge_indexed(keys, prefixes, tags, all_, soft)
            except sqlite3.DatabaseError as exc:
                if not index.noticed(exc):
                    raise
        if index is not None:
            # The index is damaged: it cannot say which entries on disk a purge covers, nor
            # number a ban. Everything goes (more than asked, never less: they are misses, as
            # they will be anyway once the next start has set the index aside).
            count = len(disk.iter_keys())
            disk.clear()
            t.memory.arena.disk_clear()
            return count, []
        return self._purge_indexed(keys, prefixes, tags, all_, soft)

    def _purge_indexed(self, keys: list[str], prefixes: list[str], tags: list[str], all_: bool,
                       soft: bool) -> tuple[int, list[Ban]]:
        t = self.t
        disk, index = t.disk, t.index
        if disk is None:
            return 0, []
        count = 0
        bans: list[Ban] = []
        if index is not None:
            # Every ban covers what the disk holds, whatever the index numbered (``add_ban``).
            floor = disk.high_seq() if all_ or tags or prefixes else 0
            if all_:
                bans.append(index.add_ban("all", "", soft, floor))
                count += index.count()
            for tag in tags:
                bans.append(index.add_ban("tag", tag, soft, floor))
                count += index.count_tag(tag)
            for p in prefixes:
                bans.append(index.add_ban("prefix", p, soft, floor))
                count += index.count_prefix(p)
        elif all_:
            count += len(disk.iter_keys())
            disk.clear()
            t.memory.arena.disk_clear()
        if keys:
            # A damaged shard (``DiskTier.noticed``) gives its keys up instead of failing the
            # purge: it is no longer read, and they leave the directory of disk keys too.
            lost: list[str] = []
            if soft:
                found = disk.update_many(keys, mark_stale, lost=lost)
                t.memory.arena.disk_remove(lost)
            else:
                found = disk.delete_keys(keys, lost=lost)
                if index is not None:
                    index.remove(keys)
                t.memory.arena.disk_remove(keys)
            count += len(found)
        return count, bans

    def mark(self) -> int:
        """Where the shared memory stands now (its head): a purge takes this as it begins, before
        it looks anything up (``purge_memory``'s ``start``)."""
        return self.t.memory.arena.head

    async def purge_memory(self, match: PurgeMatch, start: int | None = None) -> tuple[int, int]:
        """The shared memory's part of a purge's shared half, once: (keys dropped or marked
        stale, ``start``: the processes finishing the purge look from there on,
        ``PurgeMatch.arena_from``). ``start`` is where the purge began (``mark``, taken before
        the keys were looked up: what a fill wrote after its key's lookup lies past it); by
        default, now. Returns once the whole pass is done; the event loop runs between its
        slices (``Turns``), and what is written meanwhile lies past ``start`` too, where
        ``purge_local`` looks."""
        m = self.t.memory
        if start is None:
            start = m.arena.head
        if match.all and not match.soft:
            return m.clear(), start
        turns = Turns()
        count = await self._forget_all(match.keys, match.soft, turns)
        # URLs need no pass here: their keys in the memory up to ``start`` are ``match.keys``
        # already (``url_keys``: looked up, or looked for in a pass when a rule keys them on
        # fields or cookies). A second pass for them cost an invalidation without a disk tier
        # 0.7 s of the loop's CPU per 250,000 records.
        if match.all or match.tags or match.prefixes:
            count += await self._purge_arena(match, 0, start, turns)
        return count, start

    async def _forget_all(self, keys: Iterable[str], soft: bool, turns: Turns) -> int:
        """``forget_in_memory`` of each key, in slices (``Turns``)."""
        count = 0
        for key in keys:
            count += self.forget_in_memory(key, soft)
            if turns.due():
                await turns.take()
        return count

    async def _purge_arena(self, match: PurgeMatch, start: int, end: int | None = None,
                           turns: Turns | None = None) -> int:
        """Drop (or mark stale) the records from ``start`` to ``end`` that ``match`` covers, in
        slices (``Turns``), letting the event loop run in between."""
        turns = turns or Turns()
        count = 0
        for record in self.t.memory.arena.scan(start, end, skip=F_BODY):
            if record_covered(match, record):
                count += self.forget_in_memory(record.key, match.soft)
            if turns.due():
                await turns.take()
        return count

    # -- each process's half -------------------------------------------------------------------

    async def purge_local(self, match: PurgeMatch, bans: Iterable[Ban] = (),
                          within: float | None = None) -> int:
        """This process's half of a purge: bans, fills in flight, and what reached the shared
        memory since the purge's pass over it (``match.arena_from``; all of it when 0). Returns
        the number of keys dropped (or marked stale) from memory. ``within``: the disk deletion of
        this process's late fills does not retry a held write lock and is waited for at most that
        long (``purge_unheard``; they leave the directory of disk keys all the same)."""
        t = self.t
        t.bans.add(bans)
        t.work.purged(match)
        for spool in t.work.spools:
            if match.covers(spool.entry):
                spool.doomed = True
        count = await self._purge_arena(match, match.arena_from)
        if not match.soft:
            self._body_files.drop(match.covers)
        waits = [(e, fut) for e, fut in t.work.writes.values() if match.covers(e)]
        if waits:
            # Fills being written to disk right now: let them finish, then undo them.
            await asyncio.gather(*(fut for _, fut in waits))
        # ... and fills that reached the disk after the purge began (after its shared half
        # looked): they carry responses from before the purge.
        late = {e.key for e, at in t.work.recent if match.since and at >= match.since and match.covers(e)}
        if waits or late:
            keys = sorted({e.key for e, _ in waits} | late)
            if t.disk is not None:
                disk = t.disk
                if within is not None:
                    t.memory.arena.disk_remove(keys)
                    job = asyncio.ensure_future(
                        t.run(disk.update_many, keys, mark_stale if match.soft else drop_all, False))
                    job.add_done_callback(_retrieved)
                    with contextlib.suppress(TimeoutError, ShardBusy, sqlite3.Error, OSError):
                        await asyncio.wait_for(asyncio.shield(job), within)
                else:
                    try:
                        if match.soft:
                            await t.run(disk.update_many, keys, mark_stale)
                        else:
                            await t.run(disk.delete_keys, keys)
                            t.memory.arena.disk_remove(keys)
                    except (sqlite3.Error, OSError) as exc:
                        raise self._unrecorded(exc) from exc
            await self._forget_all(keys, match.soft, Turns())
        return count

    async def purge_unheard(self, match: PurgeMatch, within: float) -> tuple[int, bool]:
        """A purge of ``match.keys`` that the process owning the cache directory did not carry out
        (stopped or stalled, maybe holding a shard's write lock: ``proxy.web.server.
        invalidate_unheard``): (entries removed, whether the disk's copies are gone too).

        First what takes no SQLite lock, so that no process serves a covered entry any more: the
        keys leave the directory of disk keys (the other processes' reads then miss instead of
        reading the disk's copy), then the shared memory and this process's half. Then the disk's
        copies, without retrying a held write lock and waited for at most ``within`` seconds (one
        such deletion at a time in this process: a stopped holder would otherwise take every
        disk thread); the owner's purge, queued for when it runs again, deletes what is left and
        the index rows. Why not simply the whole purge: a shard's write lock held by a stopped
        process kept it waiting, and the client's answer with it, until that process ran again."""
        t = self.t
        keys = sorted(match.keys)
        t.memory.arena.disk_remove(keys)
        in_memory, _ = await self.purge_memory(match, start=match.arena_from)
        local = await self.purge_local(match, within=within)
        disk = t.disk
        if disk is None or not keys:
            return in_memory + local, True
        if self._unheard_disk is not None and not self._unheard_disk.done():
            return in_memory + local, False  # the one before still waits for the lock
        merge = mark_stale if match.soft else drop_all
        job = asyncio.ensure_future(t.run(disk.update_many, keys, merge, False))
        self._unheard_disk = job
        try:
            found = await asyncio.wait_for(asyncio.shield(job), within)
        except (TimeoutError, ShardBusy, sqlite3.Error, OSError) as exc:
            job.add_done_callback(_retrieved)
            log.warning("the disk's copies of %d key(s) of an unanswered invalidation were not "
                        "deleted (%r): they are no longer read (the directory of disk keys does "
                        "not list them), and the owner's purge deletes them when it runs again",
                        len(keys), exc)
            return in_memory + local, False
        return max(len(found), in_memory + local), True

    def forget_in_memory(self, key: str, soft: bool) -> bool:
        memory = self.t.memory
        if not soft:
            return memory.delete(key)
        for _ in range(PUT_TRIES):  # (over the record read only: ``Writer._put_variant``)
            current = memory.peek(key)
            if current is None:
                return False
            if memory.put(key, tuple(
                c if c.entry.response.invalidated else c.with_entry(c.entry.invalidated(), c.state)
                for c in current
            ), expect=record_of(current)) is not None:
                return True
        return memory.delete(key)  # other processes kept rewriting it: dropped, never left fresh

    # -- both halves, in this process ------------------------------------------------------------

    async def delete(self, keys: Iterable[str], soft: bool = False) -> int:
        """Remove (or mark stale) these keys in this process, the shared memory and on disk."""
        keys = set(keys)
        match = PurgeMatch(keys=frozenset(keys), soft=soft)
        async with self.paused():
            # The disk first, as ``delete_all`` and the purger do: with memory emptied first, a
            # read meanwhile found the disk's copy (the epoch already moved on: no reread) and
            # promoted it, and the deleted entry was served again.
            shared, _ = await self.purge_shared(keys, soft=soft)
            in_memory, start = await self.purge_memory(match)
            local = await self.purge_local(replace(match, arena_from=start))
        return max(in_memory + local, shared)

    async def delete_all(self, soft: bool = False) -> int:
        async with self.paused():
            shared, bans = await self.purge_shared((), all=True, soft=soft)
            match = PurgeMatch(all=True, soft=soft)
            in_memory, start = await self.purge_memory(match)
            local = await self.purge_local(replace(match, arena_from=start), bans)
        return max(shared, in_memory + local)


def _retrieved(job: asyncio.Future[Any]) -> None:
    """Its outcome read, so that one nobody waited for any more is not logged as never retrieved."""
    if not job.cancelled():
        job.exception()


def record_covered(match: PurgeMatch, record: Record) -> bool:
    """Whether a purge covers the variants in an arena record (their tags are decoded only
    when the purge names tags)."""
    key = record.key
    if match.all or key in match.keys or (match.urls and url_of_key(key) in match.urls):
        return True
    if match.prefix_set.matches(key):
        return True
    if match.tags:  # the tags alone: an Entry built for each record made it 3x slower
        return any(not match.tags.isdisjoint(tags) for tags in record_tags(record.meta) or ())
    return False


def mark_stale(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
    return tuple(e if e.response.invalidated else e.invalidated() for e in current), []
