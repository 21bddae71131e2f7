"""The memory and disk tiers as one store: lookup, promotion, streamed writes, purge, upkeep.

Reads look in memory first (synchronously: the hit path awaits nothing), then on
disk in the executor. A disk hit is promoted into memory in two halves: the
metadata at once (so freshness checks, HEAD and 304s never read a body), the body
when it is first sent, if it is small enough for the memory tier. Every variant
read from disk passes the ban list first, so a purge by tag or prefix is in force
at once.

Writes: a body is collected by a ``BodySpool`` while it streams to the client and
committed only when complete (an upstream that breaks off leaves no entry). A
small body becomes visible in memory first, then the disk copy follows; a big
one becomes visible once it is on disk.

Purges have two halves, so that several worker processes can share the disk:

- ``purge_shared`` acts once on the shared disk tier and index (URL keys are
  deleted at once; tags, prefixes and "all" become bans);
- ``purge_local`` acts in one process: its ban list, its memory tier, and the
  fills it has in flight (a fill that was running when the purge arrived is not
  stored; one being written to disk is waited for and removed again).

A process that answers ``purge_local`` cannot serve a purged object afterwards:
disk reads that were running during the purge are done again (``epoch``).

``maintain`` is the upkeep one process runs (the only process, or the
supervisor): it sweeps the bans into real deletions, drops index rows of
entries diskcache evicted, and removes orphans a crash left behind.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import IO, Any, TypeVar, cast

from proxy.policy.keys import url_of_key
from proxy.storage.bans import GONE, BanList, PurgeMatch
from proxy.storage.bodyfiles import BodyFile, OpenBodies, SharedFile
from proxy.storage.disk import INLINE_LIMIT, ORPHAN_AGE, DiskTier, new_body_id
from proxy.storage.entry import Entry
from proxy.storage.index import Ban, UrlTagIndex
from proxy.storage.memory import Cached, MemoryTier
from proxy.storage.spool import SpoolDir, sweep_dead_spools

T = TypeVar("T")
log = logging.getLogger("cachegate.storage")

MAX_VARIANTS = 32
RECENT_COMMITS_WINDOW = 60.0  # seconds a disk commit is remembered, for purges that raced it
SPOOL_IN_MEMORY = 64 * 1024  # a body being received stays in memory up to this (or memory_max_object)
SWEEP_BATCH = 1000
GC_BATCH = 2000
COMMIT_WAIT = 5.0  # seconds a read waits for this process's disk write of the same key
COMMIT_BATCH = 128  # small-body commits written in one go (one transaction per shard and batch)
LOOKUP_PARALLEL = 3  # groups of disk lookups read at the same time (of the 4 executor threads)
LOOKUP_BATCH = 16  # keys per group: a group waits for its slowest read
OPENING_LIMIT = 8  # body files being opened for sendfile at once (see sendable_file)
GC_SEQ_LAG = 10.0  # seconds: index rows younger than this may belong to a commit in progress


class BodySpool:
    """A body being received: bytes in memory up to a threshold, then a temp file.

    ``write`` returns False once the body grew past the store's ``max_object``; the
    spool is then abandoned (the response still streams to the client, it is just
    not stored).
    """

    def __init__(self, storage: Storage, entry: Entry, expected_length: int | None) -> None:
        self._storage = storage
        self.entry = entry  # what this body will be stored as (key, url, tags)
        self.doomed = False  # a purge covered it while it was being received: never store it
        self.expected_length = expected_length
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.too_large = expected_length is not None and expected_length > storage.max_object
        self.body_id = new_body_id()

    async def write(self, chunk: bytes) -> bool:
        if self.too_large:
            return False
        self.size += len(chunk)
        if self.size > self._storage.max_object:
            self.too_large = True
            self.discard()
            return False
        if self._file is None and self.size <= self._storage.spill_threshold:
            self._chunks.append(chunk)
            return True
        if self._file is None:
            self._file = await self._storage.run(self._storage.make_tempfile)
            pending, self._chunks = b"".join(self._chunks), []
            await self._storage.run(self._file.write, pending)
        await self._storage.run(self._file.write, chunk)
        return True

    @property
    def complete(self) -> bool:
        return not self.too_large and (
            self.expected_length is None or self.expected_length == self.size
        )

    def body_bytes(self) -> bytes | None:
        return b"".join(self._chunks) if self._file is None else None

    def file(self) -> IO[bytes] | None:
        return self._file

    def discard(self) -> None:
        self._storage._spools.discard(self)
        self._chunks = []
        if self._file is not None:
            f, self._file = self._file, None
            name = f.name
            with contextlib.suppress(OSError):  # a full disk fails the flush of what is buffered
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(name)


@dataclass
class UpkeepStats:
    bans_swept: int = 0
    entries_swept: int = 0
    index_rows_dropped: int = 0
    orphans_removed: int = 0


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
    ) -> None:
        self.memory = memory
        self.disk = disk
        self.index = index
        self.configured_max_object = max_object
        # What can be stored at all: a body bigger than half a disk shard would be culled at
        # once (or flush the shard); memory-only, it must be small enough for the memory tier.
        self.max_object = min(max_object, disk.max_body if disk is not None
                              else min(memory.max_object, memory.budget // 2))
        if self.max_object < max_object:
            log.warning("cache.max_object %d is more than the store can keep (half a disk shard; "
                        "without a disk tier, memory_max_object): responses over %d bytes are "
                        "passed through",
                        max_object, self.max_object)
        self.spill_threshold = max(memory.max_object, SPOOL_IN_MEMORY)
        self._executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="disk")
        self._own_executor = executor is None
        root = spool_root or (os.path.join(disk.path, "tmp") if disk is not None
                              else os.path.join(tempfile.gettempdir(), "cachegate-spool"))
        self.spools = SpoolDir(root)
        self.failed_writes = 0
        self.bans = BanList(index.bans() if index is not None else ())
        self.epoch = 0  # local purges so far
        self._spools: set[BodySpool] = set()  # bodies being received, not yet stored
        self._recent: collections.deque[tuple[Entry, float]] = collections.deque()  # recent disk commits
        self._committing: dict[int, tuple[Entry, asyncio.Future[None]]] = {}
        self._committing_keys: dict[str, int] = {}  # how many of them per key (lookups ask)
        # Small-body commits go to one writer thread, which takes all that queued up while it
        # wrote the previous batch (group commit).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-commit")
        self._commit_queue: list[tuple[Entry, bytes, asyncio.Future[Entry | None]]] = []
        self._committing_batch = False
        self._lookups: list[tuple[str, bool, asyncio.Future[tuple[Cached, ...]]]] = []  # see _lookup
        self._lookups_running = 0
        self._gc_cursor = ""
        self._gc_seq_marks: collections.deque[tuple[float, int]] = collections.deque()
        self._gc_dropped_since_vacuum = 0
        self.upkeep = UpkeepStats()
        # The hit path: one call straight into the memory tier.
        self.memory_get: Callable[[str], tuple[Cached, ...] | None] = memory.get
        # Big bodies on disk: their files stay open for the next hits (sendfile), holding at
        # most a twentieth of the disk budget (deleted files among them hold their space).
        self.body_files = OpenBodies(max_bytes=disk.size_limit // 20 if disk is not None else None)
        # Body files being opened for sendable_file, and whether close() ran (it closes what
        # they opened that the event loop has not taken yet).
        self._opening: dict[tuple[str, str], concurrent.futures.Future[bytes | IO[bytes] | None]] = {}
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def make_tempfile(self) -> IO[bytes]:
        return self.spools.make_file()

    def close(self) -> None:
        self._closed = True
        self._writer.shutdown(wait=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)
        for job in self._opening.values():
            concurrent.futures.wait([job])
            opened = _opened_file(job)
            if opened is not None:
                opened.close()
        self._opening.clear()
        if self.disk is not None:
            self.disk.close()
        if self.index is not None:
            self.index.close()
        self.spools.close()
        self.body_files.close()

    # -- reading ------------------------------------------------------------------------

    async def get(self, key: str, *, bodies: bool = False) -> tuple[Cached, ...]:
        """The key's variants: from memory, else from disk (promoted into memory). ``bodies``:
        the caller will send a body, so a key's single variant with a body small enough for
        the memory tier comes with its body, read in the same trip to the thread pool (a
        disk hit of a small object then costs one trip instead of two)."""
        variants = self.memory.get(key)
        if variants is not None:
            return variants
        if self.disk is None:
            return ()
        writing = self._writes_of(key)
        if writing:
            # This process is writing the key to disk right now (a big body, which memory
            # does not hold): read our own write rather than miss and fetch it again.
            await asyncio.wait(writing, timeout=COMMIT_WAIT)
        for _ in range(3):
            epoch = self.epoch
            variants = await self._lookup(key, bodies)
            if epoch == self.epoch:
                break
            # A purge arrived while we read: what we read may be purged. Read again.
        else:
            return ()
        if variants:
            current = self.memory.peek(key)
            if current is not None:
                return current  # promoted meanwhile by another request
            # Promotion (big bodies stay on disk); memory's copy is not marked as read from disk.
            self.memory.put(key, tuple(Cached(c.entry, c.body) if c.from_disk else c for c in variants))
        return variants

    async def _lookup(self, key: str, bodies: bool) -> tuple[Cached, ...]:
        """``_load_from_disk`` in the executor, grouped: lookups that queue up while
        LOOKUP_PARALLEL groups are being read go together in the next one (one thread hop
        for many misses, as commits are grouped; alone, a lookup goes at once)."""
        done: asyncio.Future[tuple[Cached, ...]] = asyncio.get_running_loop().create_future()
        self._lookups.append((key, bodies, done))
        if self._lookups_running < LOOKUP_PARALLEL:
            self._read_group()
        return await done

    def _read_group(self) -> None:
        group = self._lookups[:LOOKUP_BATCH]
        del self._lookups[:LOOKUP_BATCH]
        self._lookups_running += 1
        job = asyncio.get_running_loop().run_in_executor(
            self._executor, self._load_group, [(k, b) for k, b, _ in group])
        job.add_done_callback(lambda f: self._group_read(f, group))

    def _load_group(self, keys: list[tuple[str, bool]]) -> list[tuple[Cached, ...] | BaseException]:
        out: list[tuple[Cached, ...] | BaseException] = []
        for key, bodies in keys:
            try:
                out.append(self._load_from_disk(key, bodies))
            except Exception as exc:  # that key fails alone
                out.append(exc)
        return out

    def _group_read(self, job: asyncio.Future[list[tuple[Cached, ...] | BaseException]],
                    group: list[tuple[str, bool, asyncio.Future[tuple[Cached, ...]]]]) -> None:
        self._lookups_running -= 1
        _settle(job, [done for _, _, done in group])
        while self._lookups and self._lookups_running < LOOKUP_PARALLEL:
            self._read_group()

    async def reread(self, key: str) -> tuple[Cached, ...]:
        """The key's variants as the shared disk has them now, in memory instead of this
        process's copy: another worker may have stored or freshened the key since this
        process read it (multi-worker coalescing answers from what it stored). Bodies held
        in memory are kept for variants whose body did not change."""
        if self.disk is None:
            return self.memory.peek(key) or ()
        for _ in range(3):
            epoch = self.epoch
            variants = await self.run(self._load_from_disk, key)
            if epoch == self.epoch:
                break
        else:
            return ()
        if variants:
            bodies = {c.entry.body_id: c.body for c in self.memory.peek(key) or () if c.body is not None}
            variants = tuple(Cached(c.entry, bodies.get(c.entry.body_id)) for c in variants)
            self.memory.put(key, variants)
        return variants

    def _load_from_disk(self, key: str, bodies: bool = False) -> tuple[Cached, ...]:
        """The key's variants from disk, metadata only: freshness decisions, HEAD, 304s and
        inspection never read a body. ``open_body`` reads it when a body is really sent;
        ``bodies`` reads a single small one now (see ``get``)."""
        assert self.disk is not None
        entries = self.bans.apply(self.disk.get_variants(key))
        if bodies and len(entries) == 1 and entries[0].body_size <= self.memory.max_object:
            body = self._read_small_body(entries[0])
            return (Cached(entries[0], body, from_disk=body is not None),)
        return tuple(Cached(e, None) for e in entries)

    async def open_body(self, cached: Cached) -> bytes | IO[bytes] | None:
        """The body of a variant: bytes from memory, else from disk (an open file when big).

        A body small enough for the memory tier is read whole and kept in memory beside
        its metadata (the second half of a promotion)."""
        if cached.body is not None:
            return cached.body
        if self.disk is None:
            return None
        e = cached.entry
        if e.body_size > self.memory.max_object:
            shared = self.body_files.get(e.key, e.body_id)
            if shared is None:
                opened = await self.run(self._open_big_body, e)
                if opened is None or isinstance(opened, bytes):
                    return opened
                shared = self.body_files.get(e.key, e.body_id)
                if shared is None:
                    shared = self.body_files.add(e.key, e.body_id, opened, e.body_size, e)
                else:  # another hit opened it meanwhile: keep one
                    opened.close()
            return cast(IO[bytes], BodyFile(shared))  # read/seek/close/fileno like a file
        epoch = self.epoch
        body = await self.run(self._read_small_body, e)
        if body is None:
            return None
        current = self.memory.peek(e.key)
        if current is not None and epoch == self.epoch:
            self.memory.replace(e.key, tuple(
                Cached(c.entry, body) if c.entry.body_id == e.body_id and c.body is None else c
                for c in current))
        return body

    def sendable_file(self, e: Entry) -> SharedFile | None:
        """The open disk file of a body that memory holds too, for ``os.sendfile``; None
        until it is open. The first hit asks the thread pool to open it and is answered
        from memory meanwhile.

        Why: a body of more than INLINE_LIMIT bytes is also a file on disk, and sent from
        the page cache it costs the kernel no copy on the sending side (the pages are lent
        to the socket): 100 KiB hits measured ≈ 1.1-1.3× faster than writing the same bytes
        from memory, which is what it takes to keep up with Varnish on big objects."""
        shared = self.body_files.get(e.key, e.body_id)
        if shared is not None or self.disk is None or e.body_size <= INLINE_LIMIT:
            return shared
        ident = (e.key, e.body_id)
        if ident not in self._opening and len(self._opening) < OPENING_LIMIT and not self._closed:
            loop = asyncio.get_running_loop()
            epoch = self.epoch
            job = self._executor.submit(self._open_big_body, e)
            self._opening[ident] = job

            def done(f: concurrent.futures.Future[bytes | IO[bytes] | None]) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: close() closes it
                    loop.call_soon_threadsafe(self._opened, e, epoch, f)

            job.add_done_callback(done)
        return None

    def _opened(self, e: Entry, epoch: int, job: concurrent.futures.Future[bytes | IO[bytes] | None]
                ) -> None:
        ident = (e.key, e.body_id)
        if self._opening.get(ident) is job:
            del self._opening[ident]
        opened = _opened_file(job)
        if opened is None:
            return  # gone, cut short, held in the database (sent from memory), or closed
        if self._closed or epoch != self.epoch or self.body_files.get(*ident) is not None:
            opened.close()  # a purge came meanwhile (it may have removed it), or another hit opened it
        else:
            self.body_files.add(e.key, e.body_id, opened, e.body_size, e)

    def _open_big_body(self, e: Entry) -> bytes | IO[bytes] | None:
        """A big body's file, open, when it holds exactly the body (else None: gone or cut)."""
        assert self.disk is not None
        raw = self.disk.get_body(e.key, e.body_id, e.body_size)
        if raw is None or isinstance(raw, bytes):
            return raw
        if os.fstat(raw.fileno()).st_size != e.body_size:
            raw.close()
            return None
        return raw

    def _read_small_body(self, e: Entry) -> bytes | None:
        assert self.disk is not None
        raw = self.disk.get_body(e.key, e.body_id, e.body_size)
        if raw is None:
            return None
        body = raw if isinstance(raw, bytes) else _read_all(raw)
        return body if len(body) == e.body_size else None

    # -- writing ------------------------------------------------------------------------

    def spool(self, entry: Entry, expected_length: int | None) -> BodySpool:
        """Start receiving a body for ``entry``; a purge that covers it from now on dooms it."""
        spool = BodySpool(self, entry, expected_length)
        self._spools.add(spool)
        return spool

    def finalize(self, entry: Entry, spool: BodySpool) -> Entry | None:
        """The entry with its body's id and size; None when incomplete or purged meanwhile."""
        if not spool.complete or spool.doomed:
            spool.discard()
            return None
        return replace(entry, body_id=spool.body_id, body_size=spool.size)

    def put_memory(self, entry: Entry, spool: BodySpool) -> bool:
        """Make a finalized entry visible in memory at once (small bodies only)."""
        body = spool.body_bytes()
        if body is None or entry.body_size > self.memory.max_object:
            return False
        if spool.doomed:
            return False
        current = self.memory.peek(entry.key) or ()
        merged, _ = _merge_variant(tuple(c.entry for c in current), entry)
        bodies = {c.entry.body_id: c.body for c in current}
        bodies[entry.body_id] = body
        return self.memory.put(entry.key, tuple(Cached(e, bodies.get(e.body_id)) for e in merged))

    async def put_disk(self, entry: Entry, spool: BodySpool) -> bool:
        """Write a finalized entry to the disk tier; big bodies become visible here."""
        if spool.doomed:
            spool.discard()
            return False
        if self.disk is None:
            ok = spool.body_bytes() is not None
            spool.discard()
            return ok
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        token = id(done)
        self._committing[token] = (entry, done)
        keys = self._committing_keys
        keys[entry.key] = keys.get(entry.key, 0) + 1
        try:
            body = spool.body_bytes()
            if body is not None and len(body) < INLINE_LIMIT:
                stored = await self._commit_small(entry, body)
            else:
                stored = await self.run(self._commit_to_disk, entry, body, spool.file())
        finally:
            del self._committing[token]
            if keys[entry.key] == 1:
                del keys[entry.key]
            else:
                keys[entry.key] -= 1
            done.set_result(None)
            spool.discard()
        if stored is None:
            self.failed_writes += 1
            return False
        now = time.monotonic()
        self._recent.append((stored, now))
        while self._recent and self._recent[0][1] < now - RECENT_COMMITS_WINDOW:
            self._recent.popleft()
        if entry.body_size > self.memory.max_object and not spool.doomed:
            current = self.memory.peek(entry.key)
            if current is not None:  # keep memory's view of the key consistent
                merged, _ = _merge_variant(tuple(c.entry for c in current), stored)
                bodies = {c.entry.body_id: c.body for c in current}
                self.memory.replace(entry.key, tuple(Cached(e, bodies.get(e.body_id)) for e in merged))
        return True

    async def commit(self, entry: Entry, spool: BodySpool) -> bool:
        """Store ``entry`` with the spooled body, replacing the variant with the same Vary values."""
        final = self.finalize(entry, spool)
        if final is None:
            return False
        in_memory = self.put_memory(final, spool)
        return await self.put_disk(final, spool) or (in_memory and self.disk is None)

    def _writes_of(self, key: str) -> list[asyncio.Future[None]]:
        """This process's disk writes of ``key`` in progress (a dict lookup when there are none)."""
        if key not in self._committing_keys:
            return []
        return [fut for e, fut in self._committing.values() if e.key == key]

    async def _commit_small(self, entry: Entry, body: bytes) -> Entry | None:
        """Queue a small-body commit for the writer thread; the stored entry, or None."""
        done: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._commit_queue.append((entry, body, done))
        if not self._committing_batch:
            self._write_batch()
        return await done

    def _write_batch(self) -> None:
        batch = self._commit_queue[:COMMIT_BATCH]
        del self._commit_queue[:COMMIT_BATCH]
        self._committing_batch = True
        job = asyncio.get_running_loop().run_in_executor(
            self._writer, self._commit_batch, [(e, b) for e, b, _ in batch])
        job.add_done_callback(lambda f: self._batch_written(f, batch))

    def _batch_written(self, job: asyncio.Future[list[Entry | None]],
                       batch: list[tuple[Entry, bytes, asyncio.Future[Entry | None]]]) -> None:
        self._committing_batch = False
        _settle(job, [done for _, _, done in batch])
        if self._commit_queue:
            self._write_batch()

    def _commit_batch(self, items: list[tuple[Entry, bytes]]) -> list[Entry | None]:
        """Small bodies with their metadata, many at once (in the writer thread): one index
        transaction for the batch, then one transaction per shard. Each entry is as safe as
        when written alone: its index row (new seq) first, then its body and metadata
        together (a crash in between leaves an index row the upkeep drops)."""
        disk = self.disk
        assert disk is not None
        if self.index is not None:
            seqs = self.index.add_many([(e.key, url_of_key(e.key), e.tags) for e, _ in items])
        else:
            seqs = [0] * len(items)
        news = [replace(e, seq=seq) for (e, _), seq in zip(items, seqs, strict=True)]
        kept: list[list[tuple[Entry, ...]]] = [[] for _ in items]
        jobs = [(e.key, self._merger(new, k), e.body_id, body)
                for (e, body), new, k in zip(items, news, kept, strict=True)]
        committed = disk.commit_many(jobs)
        out: list[Entry | None] = []
        for (e, _), new, k, ok in zip(items, news, kept, committed, strict=True):
            if ok:
                self._index_other_tags(e.key, e.tags, k)
            out.append(new if ok else None)
        return out

    def _merger(self, new: Entry, kept: list[tuple[Entry, ...]]) -> Callable[
            [tuple[Entry, ...]], tuple[tuple[Entry, ...], list[str]]]:
        """The merge that adds ``new`` to a key's variants (run under the shard's lock)."""
        def merge(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
            banned: list[str] = []
            out, replaced = _merge_variant(self._unbanned(current, banned), new)
            kept.append(out)
            return out, replaced + banned

        return merge

    def _commit_to_disk(self, entry: Entry, body: bytes | None, file: IO[bytes] | None) -> Entry | None:
        """A big body (a file of its own; small ones go by ``_commit_small``), then index (a new
        seq), then metadata; the stored entry, or None on failure."""
        disk = self.disk
        assert disk is not None
        payload: bytes | IO[bytes]
        if body is not None:
            payload = body
        else:
            assert file is not None
            file.flush()
            file.seek(0)
            payload = file
        self.spools.intend(entry.key, entry.body_id)
        if not disk.put_body(entry.key, entry.body_id, payload):
            disk.delete_body(entry.key, entry.body_id)  # a partial write may have left it
            self.spools.settle(entry.body_id)
            return None
        seq = self.index.add(entry.key, url_of_key(entry.key), entry.tags) if self.index else 0
        new = replace(entry, seq=seq)
        kept: list[tuple[Entry, ...]] = []
        committed = disk.commit(entry.key, self._merger(new, kept))
        if not committed:
            disk.delete_body(entry.key, entry.body_id)
        self.spools.settle(entry.body_id)
        if not committed:
            return None
        self._index_other_tags(entry.key, entry.tags, kept)
        return new

    def _unbanned(self, current: tuple[Entry, ...], dropped: list[str]) -> tuple[Entry, ...]:
        """Variants minus the hard-banned ones (their bodies go to ``dropped``); soft-banned made stale."""
        out: list[Entry] = []
        for e in current:
            v = self.bans.verdict(e)
            if v == GONE:
                dropped.append(e.body_id)
            elif v is None:
                out.append(e)
            else:
                out.append(e if e.response.invalidated else e.invalidated())
        return tuple(out)

    def _index_other_tags(self, key: str, written: tuple[str, ...], kept: list[tuple[Entry, ...]]) -> None:
        if self.index is None or not kept:
            return
        extra = {t for e in kept[-1] for t in e.tags} - set(written)
        if extra:
            self.index.add_tags(key, sorted(extra))

    async def update(self, entry: Entry) -> None:
        """Replace a variant's metadata (after a 304), keeping its body."""
        current = self.memory.peek(entry.key)
        if current is not None:
            self.memory.replace(entry.key, tuple(
                Cached(entry, c.body) if c.entry.body_id == entry.body_id else c for c in current
            ))
        if self.disk is not None:
            await self.run(self._update_on_disk, entry)

    def _update_on_disk(self, entry: Entry) -> None:
        disk = self.disk
        assert disk is not None
        # A new seq: a soft purge that covered the old copy does not cover the revalidated one.
        seq = self.index.add(entry.key, url_of_key(entry.key), entry.tags) if self.index else 0
        new = replace(entry, seq=seq)
        kept: list[tuple[Entry, ...]] = []

        def merge(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
            dropped: list[str] = []
            current = self._unbanned(current, dropped)
            out = tuple(new if e.body_id == entry.body_id else e for e in current)
            kept.append(out)
            return out, dropped

        disk.commit(entry.key, merge)
        self._index_other_tags(entry.key, entry.tags, kept)

    # -- purging ------------------------------------------------------------------------

    async def keys_for_urls(self, urls: Iterable[str]) -> set[str]:
        """Every key of these URLs (all key shapes: header and cookie parts), in both tiers."""
        urls = list(urls)
        keys = {k for u in urls for k in self.memory.keys_for_url(u)}
        if self.index is not None and urls:
            index = self.index
            keys.update(await self.run(lambda: [k for u in urls for k in index.keys_for_url(u)]))
        return keys

    async def keys_for(self, urls: Iterable[str] = (), prefixes: Iterable[str] = (),
                       tags: Iterable[str] = (), memory_only: bool = False) -> set[str]:
        """Every stored key for these URLs, prefixes and tags (small purges and inspection)."""
        urls, prefixes, tags = list(urls), list(prefixes), list(tags)
        keys = {k for u in urls for k in self.memory.keys_for_url(u)}
        keys.update(k for p in prefixes for k in self.memory.keys_with_prefix(p))
        keys.update(k for t in tags for k in self.memory.keys_for_tag(t))
        if self.index is not None and not memory_only:
            index = self.index

            def lookup() -> set[str]:
                found = {k for u in urls for k in index.keys_for_url(u)}
                found.update(k for p in prefixes for k in index.keys_for_prefix(p))
                found.update(k for t in tags for k in index.keys_for_tag(t))
                return found

            keys.update(await self.run(lookup))
        return keys

    async def purge_shared(self, keys: Iterable[str], prefixes: Iterable[str] = (),
                           tags: Iterable[str] = (), all: bool = False, soft: bool = False
                           ) -> tuple[int, list[Ban]]:
        """The shared half of a purge (once per cache directory): delete (or mark stale) the
        keys on disk now; record tags, prefixes and "all" as bans. Returns (entries, bans)."""
        if self.disk is None:
            return 0, []
        return await self.run(self._purge_shared, list(keys), list(prefixes), list(tags), all, soft)

    def _purge_shared(self, keys: list[str], prefixes: list[str], tags: list[str], all_: bool,
                      soft: bool) -> tuple[int, list[Ban]]:
        disk, index = self.disk, self.index
        assert disk is not None
        count = 0
        bans: list[Ban] = []
        if index is not None:
            if all_:
                bans.append(index.add_ban("all", "", soft))
                count += index.count()
            for t in tags:
                bans.append(index.add_ban("tag", t, soft))
                count += index.count_tag(t)
            for p in prefixes:
                bans.append(index.add_ban("prefix", p, soft))
                count += index.count_prefix(p)
        elif all_:
            count += len(disk.iter_keys())
            disk.clear()
        if keys:
            if soft:
                found = disk.update_many(keys, _mark_stale)
            else:
                found = disk.delete_keys(keys)
                if index is not None:
                    index.remove(keys)
            count += len(found)
        return count, bans

    async def purge_local(self, match: PurgeMatch, bans: Iterable[Ban] = ()) -> int:
        """This process's half of a purge: bans, memory tier, and fills in flight. Returns the
        number of keys dropped (or marked stale) from memory."""
        self.bans.add(bans)
        self.epoch += 1
        for spool in self._spools:
            if match.covers(spool.entry):
                spool.doomed = True
        count = self._purge_memory(match)
        if not match.soft:
            self.body_files.drop(match.covers)
        waits = [(e, fut) for e, fut in self._committing.values() if match.covers(e)]
        if waits:
            # Fills being written to disk right now: let them finish, then undo them.
            await asyncio.gather(*(fut for _, fut in waits))
        # ... and fills that reached the disk after the purge began (after its shared half
        # looked): they carry responses from before the purge.
        late = {e.key for e, at in self._recent if match.since and at >= match.since and match.covers(e)}
        if waits or late:
            keys = sorted({e.key for e, _ in waits} | late)
            if self.disk is not None:
                disk = self.disk
                if match.soft:
                    await self.run(disk.update_many, keys, _mark_stale)
                else:
                    await self.run(disk.delete_keys, keys)
            for k in keys:
                self.forget_in_memory(k, match.soft)
        return count

    def _purge_memory(self, match: PurgeMatch) -> int:
        m = self.memory
        if match.all:
            if not match.soft:
                return m.clear()
            keys: set[str] = set(m.keys())
        else:
            keys = {k for k in match.keys if k in m}
            keys.update(k for u in match.urls for k in m.keys_for_url(u))
            keys.update(k for t in match.tags for k in m.keys_for_tag(t))
            keys.update(k for p in match.prefixes for k in m.keys_with_prefix(p))
        return sum(self.forget_in_memory(k, match.soft) for k in keys)

    def forget_in_memory(self, key: str, soft: bool) -> bool:
        if not soft:
            return self.memory.delete(key)
        current = self.memory.peek(key)
        if current is None:
            return False
        self.memory.replace(key, tuple(
            c if c.entry.response.invalidated else Cached(c.entry.invalidated(), c.body) for c in current
        ))
        return True

    async def delete(self, keys: Iterable[str], soft: bool = False) -> int:
        """Remove (or mark stale) these keys in this process and on disk."""
        keys = set(keys)
        local = await self.purge_local(PurgeMatch(keys=frozenset(keys), soft=soft))
        shared, _ = await self.purge_shared(keys, soft=soft)
        return max(local, shared)

    async def delete_all(self, soft: bool = False) -> int:
        shared, bans = await self.purge_shared((), all=True, soft=soft)
        local = await self.purge_local(PurgeMatch(all=True, soft=soft), bans)
        return max(shared, local)

    # -- upkeep (one process per cache directory) ----------------------------------------

    async def maintain(self, *, orphans_before: float | None = None) -> UpkeepStats:
        """One round of upkeep: sweep bans, a step of index GC, and (when asked) orphans."""
        if self.index is None or self.disk is None:
            return self.upkeep
        index = self.index
        bans = await self.run(index.bans)
        self.bans.replace(bans)
        for ban in bans:
            await self._sweep_ban(ban)
        if bans:
            self.bans.replace(await self.run(index.bans))
        await self.run(self._gc_step)
        await self.run(self._checkpoint)
        if orphans_before is not None:
            disk = self.disk
            removed = await self.run(disk.sweep_stray_files, orphans_before)

            def sweep_dead() -> int:
                orphans = 0

                def check(intents: list[tuple[str, str]]) -> None:
                    nonlocal orphans
                    orphans += disk.sweep_intents(intents)

                folders = sweep_dead_spools(self.spools.root, check)
                return folders + orphans

            removed += await self.run(sweep_dead)
            if removed:
                log.info("removed %d orphan(s) left by an earlier crash", removed)
            self.upkeep.orphans_removed += removed
        return self.upkeep

    async def _sweep_ban(self, ban: Ban) -> None:
        index, disk = self.index, self.disk
        assert index is not None and disk is not None
        pages: dict[str, Callable[[str, int], list[str]]] = {
            "tag": lambda after, n: index.keys_for_tag(ban.value, after, n),
            "prefix": lambda after, n: index.keys_for_prefix(ban.value, after, n),
            "all": index.all_keys,
        }
        page = pages[ban.kind]
        after = ""
        while True:
            keys = await self.run(page, after, SWEEP_BATCH)
            if not keys:
                break
            await self.run(self._apply_ban, ban, keys)
            after = keys[-1]
        await self.run(index.remove_ban, ban.id)
        self.upkeep.bans_swept += 1

    def _apply_ban(self, ban: Ban, keys: list[str]) -> None:
        disk, index = self.disk, self.index
        assert disk is not None and index is not None
        one = BanList([ban])
        emptied: list[str] = []
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
                emptied.append(current[0].key)
            return tuple(out), dropped

        found = set(disk.update_many(keys, merge))
        index.remove(emptied + [k for k in keys if k not in found])
        self.upkeep.entries_swept += swept

    def _gc_step(self) -> None:
        """Check the next batch of index rows; drop those whose entry diskcache evicted."""
        index, disk = self.index, self.disk
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
        dead = [k for k, seq in rows if seq <= cutoff and not disk.has(k)]
        if dead:
            index.remove(dead)
            self.upkeep.index_rows_dropped += len(dead)
            self._gc_dropped_since_vacuum += len(dead)
        if self._gc_cursor == "" and self._gc_dropped_since_vacuum:
            index.vacuum()
            self._gc_dropped_since_vacuum = 0

    def _checkpoint(self) -> None:
        assert self.disk is not None and self.index is not None
        self.disk.checkpoint()
        self.index.checkpoint()

    async def reload_bans(self) -> None:
        if self.index is not None:
            self.bans.replace(await self.run(self.index.bans))


def _mark_stale(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
    return tuple(e if e.response.invalidated else e.invalidated() for e in current), []


def _merge_variant(current: tuple[Entry, ...], new: Entry) -> tuple[tuple[Entry, ...], list[str]]:
    """``new`` replaces the variant with the same Vary values; at most MAX_VARIANTS are kept.
    Returns the variants and the body ids no longer used."""
    kept = [e for e in current if e.response.vary != new.response.vary]
    dropped = [e.body_id for e in current if e.response.vary == new.response.vary]
    kept.append(new)
    while len(kept) > MAX_VARIANTS:
        dropped.append(kept.pop(0).body_id)
    return tuple(kept), dropped


def _read_all(f: IO[bytes]) -> bytes:
    with f:
        return f.read()


__all__ = ["ORPHAN_AGE", "BodySpool", "Cached", "Storage"]


def _opened_file(job: concurrent.futures.Future[bytes | IO[bytes] | None]) -> IO[bytes] | None:
    """The open file a finished ``_open_big_body`` job holds, if it holds one not yet closed."""
    if job.cancelled() or job.exception() is not None:
        return None
    opened = job.result()
    if opened is None or isinstance(opened, bytes) or opened.closed:
        return None
    return opened


def _settle(job: asyncio.Future[list[Any]], waiters: list[asyncio.Future[Any]]) -> None:
    """Hand each waiter of a grouped thread-pool job its item of the job's result list: the
    job's cancellation or exception goes to all of them; an exception as an item to its own."""
    error = None if job.cancelled() else job.exception()
    results = job.result() if not job.cancelled() and error is None else []
    for i, done in enumerate(waiters):
        if done.done():
            continue
        if job.cancelled():
            done.cancel()
        elif error is not None:
            done.set_exception(error)
        elif isinstance(results[i], BaseException):
            done.set_exception(results[i])
        else:
            done.set_result(results[i])
