"""Writing: bodies received, stored in the shared memory at once (the disk gets them behind,
``persist``), big ones written to disk by this process, and revalidated metadata.

A body is collected by a ``BodySpool`` while it streams to the client and stored only when
complete (an upstream that breaks off leaves no entry). A body the memory tier holds (up to
``memory_max_object``) becomes visible to every process as soon as its record is in the
shared memory; a bigger one is written to disk here, and becomes visible once it is there
(with its metadata in the shared memory beside the key's other variants).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Sequence
from typing import IO

from proxy.room import no_room
from proxy.settings import ring_body_limit
from proxy.storage.disk import INLINE_LIMIT, new_body_id, with_checksum
from proxy.storage.entry import ALL_TO_WRITE, META_TO_WRITE, Entry, body_key, encode_record
from proxy.storage.memory import PUT_TRIES, Cached, record_of
from proxy.storage.persist import adding, committed_tags, merge_variant, updating
from proxy.storage.spool import SpoolDir
from proxy.storage.work import Tiers

SPOOL_IN_MEMORY = 64 * 1024  # a body being received stays in memory up to this (or memory_max_object)
# The share of cache.disk.size the machine's spool files (bodies being received, bigger than
# the above) may take, split evenly between the serving processes: each spool reserves its
# expected length (or what it has received, when longer or unknown). Past its process's part, a
# new body is passed on unstored, but one spool is always let in when the process has none, so
# any object up to max_object can still be stored. The spools were not counted at all: 20 fills
# of 95 MB with a 256 MB budget put 1.9 GB in the cache directory; then each process had a
# quarter, and 16 workers could spool 4 times the budget.
SPOOL_SHARE = 4  # one quarter


class BodySpool:
    """A body being received: bytes in memory up to a threshold, then a temp file.

    ``write`` returns False once the body grew past the store's ``max_object``; the
    spool is then abandoned (the response still streams to the client, it is just
    not stored).
    """

    def __init__(self, writer: Writer, entry: Entry, expected_length: int | None) -> None:
        self._writer = writer
        self.entry = entry  # what this body will be stored as (key, url, tags)
        self.doomed = False  # a purge covered it while it was being received: never store it
        self.expected_length = expected_length
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        # The biggest body it may be stored with (``Writer.room``: without a disk tier, what a
        # record of the shared memory holds beside its key and metadata).
        self.limit = writer.room(entry)
        self.too_large = expected_length is not None and expected_length > self.limit
        self.body_id = new_body_id()
        self.in_memory = False  # its body went into the shared memory (the disk gets it behind)
        self.reserved = 0  # bytes of the process's spool room this spool holds (``Writer.spooled``)
        self.no_room = False  # given up: the process's spools hold their share of the disk
        self._crc = 0  # zlib.crc32 of what went into the file (``_write_file``)
        self.refused = ""  # why the shared memory did not take it (``Writer.put_memory``): TOO-LARGE

    async def write(self, chunk: bytes) -> bool:
        if self.too_large:
            return False
        self.size += len(chunk)
        writer = self._writer
        if self.size > self.limit:
            self.too_large = True
            self.discard()
            return False
        if self._file is None and self.size <= writer.spill_threshold:
            self._chunks.append(chunk)
            return True
        if self.size > self.reserved and not writer.reserve(self, max(self.size, self.expected_length or 0)):
            self.too_large = self.no_room = True
            self.discard()
            return False
        try:
            if self._file is None:
                self._file = await writer.t.run(writer.spools.make_file)
                pending, self._chunks = b"".join(self._chunks), []
                await writer.t.run(self._write_file, pending)
            await writer.t.run(self._write_file, chunk)
        except OSError as exc:  # (said now: the caller removes the spool file, which frees room)
            room = no_room(writer.spools.root, exc)
            if room is None:
                raise
            raise room from exc
        return True

    def _write_file(self, data: bytes) -> None:
        """Append ``data`` to the spool file, flushed, and to its CRC, in the thread pool (zlib
        lets go of the GIL while it sums a buffer). Flushed: what the flight has pushed to its
        readers is in the file, for a late client that reads it from there (``follow``)."""
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self._crc = zlib.crc32(data, self._crc)

    def checksum(self) -> int | None:
        """The CRC-32 of a complete body the disk tier keeps as a file (INLINE_LIMIT and more:
        ``disk.with_checksum``); None for a smaller one (in the database, not checked)."""
        if self.size < INLINE_LIMIT:
            return None
        if self._file is not None:
            return self._crc
        body = self.body_bytes()
        return None if body is None else zlib.crc32(body)

    def follow(self) -> int | None:
        """A descriptor that reads the spool file (for a client that joins the fill late:
        ``coalescer.SpoolFollower``), or None when the body is not in a file (any more)."""
        f = self._file
        if f is None or self.too_large or self.doomed:
            return None
        try:
            return os.open(f.name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    @property
    def complete(self) -> bool:
        return not self.too_large and (
            self.expected_length is None or self.expected_length == self.size
        )

    def body_bytes(self) -> bytes | None:
        if self._file is not None:
            return None
        if len(self._chunks) != 1:  # joined once: the checksum, memory and disk take the same bytes
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def file(self) -> IO[bytes] | None:
        return self._file

    def discard(self) -> None:
        self._writer.t.work.spools.discard(self)
        self._writer.release(self)
        self._chunks = []
        if self._file is not None:
            f, self._file = self._file, None
            name = f.name
            with contextlib.suppress(OSError):  # a full disk fails the flush of what is buffered
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(name)


class Writer:
    def __init__(self, tiers: Tiers, max_object: int, spools: SpoolDir) -> None:
        self.t = tiers
        # What can be stored at all (Storage works it out); with a disk tier, less while the
        # shards' budget is lowered (``limit``).
        self.max_object = max_object
        self.spill_threshold = max(tiers.memory.max_object, SPOOL_IN_MEMORY)
        self.spools = spools
        self.failed_writes = 0  # this process's own disk commits (big bodies) that failed
        disk = tiers.disk
        # The machine's spools hold at most SPOOL_SHARE of the disk budget: each serving
        # process its part of it (a process's only spool may still take max_object).
        processes = tiers.memory.arena.processes
        self.spool_room = disk.size_limit // SPOOL_SHARE // processes if disk is not None else 0
        self.spooled = 0  # bytes the process's spools hold or expect (``BodySpool.reserved``)

    def limit(self) -> int:
        """The biggest body stored now: ``max_object``, and with a disk tier no more than half a
        shard's budget in force (``DiskTier.max_body``), which the owner lowers while the URL
        index takes more than its share of ``cache.disk.size`` and raises again as it shrinks
        (``DiskTier.count_index``); every process follows what it published in the shared
        memory (one read of it: no system call, no lock). Why: a worker kept taking bodies up
        to half the configured budget, answered them stored, and the owner's cull took them
        within seconds."""
        disk = self.t.disk
        if disk is None:  # (memory only, or its directory found gone: what one record holds)
            return min(self.max_object, self.t.memory.max_object)
        disk.follow_budget(self.t.memory.arena.shard_budget)
        return min(self.max_object, disk.max_body)

    def room(self, entry: Entry) -> int:
        """The biggest body ``entry`` can be stored with: ``limit``; without a disk tier, no
        more than one record of the shared memory's ring holds beside the entry's key and
        metadata (``ring_body_limit``). Why: a body in between was refused by the ring at the
        put, after its MISS had said ``stored``, and the next request missed again. (Its
        metadata is measured with the longest body id and the largest size it may carry: a
        few bytes more, never less.)"""
        limit = self.limit()
        if self.t.disk is not None:
            return limit
        probe = entry.with_body(with_checksum(new_body_id(), 0), limit)
        meta = encode_record([(probe, limit, ALL_TO_WRITE)])
        key = len(entry.key.encode("utf-8", "surrogatepass"))
        return max(0, min(limit, ring_body_limit(self.t.memory.arena.capacity) - key - len(meta)))

    def reserve(self, spool: BodySpool, total: int) -> bool:
        """Let ``spool`` hold ``total`` bytes of spool room: yes within the room, or when it is
        the process's only spool (then it may grow to ``max_object``)."""
        more = total - spool.reserved
        if more <= 0:
            return True
        others = self.spooled - spool.reserved
        if others > 0 and self.spooled + more > self.spool_room:
            return False
        self.spooled += more
        spool.reserved = total
        return True

    def release(self, spool: BodySpool) -> None:
        self.spooled -= spool.reserved
        spool.reserved = 0

    def spool(self, entry: Entry, expected_length: int | None, since: int | None = None) -> BodySpool:
        """Start receiving a body for ``entry``; a purge that covers it from now on dooms it, and
        so does one since ``since`` (the store's epoch when its request went to the origin: the
        response may have been made before that purge)."""
        spool = BodySpool(self, entry, expected_length)
        if expected_length is not None and expected_length > self.spill_threshold \
                and not spool.too_large and not self.reserve(spool, expected_length):
            # A length known to need a spool file is given its room now, before the response's
            # head goes out, so that the head can say it will not be stored (reserved at the
            # first spill, the head had said "stored" of a response then given up SPOOLS-FULL).
            spool.too_large = spool.no_room = True
            return spool  # (holds nothing: nothing to discard)
        if since is not None and self.t.work.purged_since(since, entry.key, entry.tags):
            spool.doomed = True
        self.t.work.spools.add(spool)
        return spool

    def finalize(self, entry: Entry, spool: BodySpool) -> Entry | None:
        """The entry with its body's id and size; None when incomplete or purged meanwhile, or
        bigger than the store has room for now (``limit``; ``spool.refused`` says TOO-LARGE).
        Why again at the end: the room was read when the spool began (its ``limit``), and the
        disk shards' budget may have been lowered while the body streamed (``limit``): a 900 KB
        fill was said stored, then its own disk write's cull took it at once, uncounted. Held
        here, before the shared memory takes it, so no tier keeps what the disk cannot."""
        if not spool.complete or spool.doomed:
            spool.discard()
            return None
        if self.t.disk is not None and spool.size > self.limit():  # (without one, the room never moves)
            spool.refused = "TOO-LARGE"
            spool.discard()
            return None
        memory = self.t.memory
        if self.t.disk is not None and spool.size > memory.max_object and memory.arena.disk_full:
            # Written to disk by this process, and the disk is over cache.disk.size (the owner's
            # ``DiskTier.weigh``): not stored, as write-behind keeps new keys in memory only.
            spool.refused = "DISK-OVER-SIZE"
            spool.discard()
            return None
        crc = spool.checksum()
        if crc is not None:
            spool.body_id = with_checksum(spool.body_id, crc)
        return entry.with_body(spool.body_id, spool.size)

    def put_memory(self, entry: Entry, spool: BodySpool) -> bool:
        """Make a finalized entry visible at once, to every process of the machine (bodies up to
        ``memory_max_object``); the disk tier gets it behind (``persist``)."""
        memory = self.t.memory
        body = spool.body_bytes()
        if body is None or entry.body_size > memory.max_object or spool.doomed:
            return False
        done = self._put_variant(Cached(entry, body, state=ALL_TO_WRITE))
        spool.in_memory = done is True
        if done is False:
            spool.refused = "TOO-LARGE"
        return spool.in_memory

    def _put_variant(self, new: Cached) -> bool | None:
        """Put ``new`` in the shared memory beside the key's other variants there (replacing the
        one with its Vary values); a key memory did not hold goes through this process's
        doorkeeper (``MemoryTier.put``'s ``admit``).

        The key's record is replaced only while it is the one the variants were read from
        (``expect``), else read and merged again. Why: two workers filling two variants of a key
        at the same moment read the same record, and the second write dropped the first one's
        variant, with its body when write-behind had not committed it yet: a fill answered as
        stored, lost. False when the record can never fit the ring; None after ``PUT_TRIES``
        (``put_disk`` then commits a body itself)."""
        memory = self.t.memory
        entry = new.entry
        for _ in range(PUT_TRIES):
            current = memory.peek(entry.key)
            if current:
                merged, dropped = merge_variant(tuple(c.entry for c in current), entry)
                held = {c.entry.body_id: c for c in current}
                variants = tuple(new if e.body_id == entry.body_id else held[e.body_id] for e in merged)
            else:
                # A key memory does not hold (most fills): the variant alone, what the merge
                # gives (its comprehensions and generators were seven Python-level calls a fill,
                # ``scripts/bench-calls``).
                variants, dropped = (new,), []
            done = memory.put(entry.key, variants, admit=not current, expect=record_of(current))
            if done is not None:
                for body_id in dropped:  # (a refill's older body, kept apart: no variant names it)
                    if held[body_id].apart:
                        memory.arena.delete(body_key(entry.key, body_id))
                return done
        return None

    async def put_disk(self, entry: Entry, spool: BodySpool) -> bool:
        """The disk tier's part of a finalized entry: nothing now for a body the shared memory
        holds (written behind, by the owner); a big body is committed here, and becomes
        visible once it is on disk."""
        t = self.t
        if spool.doomed:
            spool.discard()
            return False
        if t.disk is None or spool.in_memory:
            # Without a disk tier, stored only when the shared memory took it (a body it
            # refused is nowhere: said stored, the next request missed).
            ok = spool.in_memory
            spool.discard()
            return ok
        token = t.work.begin_write(entry)
        try:
            stored = await t.run(self._commit_to_disk, entry, spool.body_bytes(), spool.file())
        finally:
            t.work.end_write(token)
            spool.discard()
        if stored is None:
            self.failed_writes += 1
            return False
        t.work.committed(stored)
        t.memory.arena.disk_add([entry.key])
        if not spool.doomed:
            # Its metadata in the shared memory too (the body stays on disk).
            self._put_variant(Cached(stored, None))
        return True

    def _commit_to_disk(self, entry: Entry, body: bytes | None, file: IO[bytes] | None) -> Entry | None:
        """A body the shared memory does not hold (too big), then index (a new seq), then
        metadata; the stored entry, or None on failure."""
        t = self.t
        disk, index = t.disk, t.index
        if disk is None:  # (its directory found gone since the caller looked: memory only)
            return None
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
        seq = index.add(entry.key, entry.tags) if index else 0
        new = entry.with_seq(seq)
        kept: list[tuple[Entry, ...]] = []
        committed = disk.commit(entry.key, adding(t.bans, new, kept))
        if not committed:
            disk.delete_body(entry.key, entry.body_id)
        self.spools.settle(entry.body_id)
        if not committed:
            return None
        if index is not None:
            index.retag([(entry.key, committed_tags(new, kept))])
        return new

    async def update(self, entries: Sequence[Entry]) -> None:
        """Replace the metadata of variants of one key (after a 304: the variant it answered and
        those freshened with it), keeping their bodies: in the shared memory at once, and on
        disk behind it (or now, for those memory does not hold). All of them in one new record
        of the key, and in one disk commit: each variant written on its own rewrote the key's
        record, every variant's body with it, once per variant."""
        if not entries:
            return
        t = self.t
        key = entries[0].key
        assert all(e.key == key for e in entries), "variants of one key"
        new = {e.body_id: e for e in entries}
        held: set[str] = set()
        for _ in range(PUT_TRIES):  # (another process may write the key meanwhile: ``_put_variant``)
            current = t.memory.peek(key) or ()
            held = {c.entry.body_id for c in current} & new.keys()
            if not held:
                break
            updated = tuple(c.with_entry(new[c.entry.body_id], max(c.state, META_TO_WRITE))
                            if c.entry.body_id in held else c for c in current)
            if t.memory.put(key, updated, expect=record_of(current)) is not None:
                break
        else:
            held = set()  # memory keeps the older metadata; the disk gets the new now
        rest = [e for e in entries if e.body_id not in held]
        if rest and t.disk is not None:
            await t.run(self._update_on_disk, rest)

    def _update_on_disk(self, entries: list[Entry]) -> None:
        t = self.t
        disk, index = t.disk, t.index
        if disk is None:  # (its directory found gone since the caller looked: memory only)
            return
        key = entries[0].key
        tags = tuple(sorted({tag for e in entries for tag in e.tags}))
        # A new seq: a soft purge that covered the old copy does not cover the revalidated one.
        seq = index.add(key, tags) if index else 0
        kept: list[tuple[Entry, ...]] = []
        if disk.commit(key, updating(t.bans, [e.with_seq(seq) for e in entries], kept)) \
                and index is not None:
            index.retag([(key, committed_tags(entries[0], kept) if kept else tags)])
