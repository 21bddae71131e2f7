"""Write-behind: what fills put in the machine's shared memory reaches the disk tier later, in
large batches, written by one process.

Why: a fill used to wait for its own SQLite transactions (an index row, a body and a metadata
record), queued behind the others' in each worker's writer thread; with two workers the
commit threads were busy 91 % of the time and fought the event loops for the GIL (py-spy of a
``zipf`` worker), and a fill cost 770-1,040 µs of CPU. Now a fill is answered and visible to
every worker as soon as its record is in the shared memory (``MemoryTier.put``), and the
process that owns the cache directory (the only process, or the supervisor: never a worker)
walks the ring behind the writers and commits what it has not yet: one index transaction and
one diskcache transaction per shard for all that accumulated, in a thread of its own.

Each record says what the disk lacks (``entry.ON_DISK`` / ``META_TO_WRITE`` after a
revalidation / ``ALL_TO_WRITE`` after a fill) and carries ``arena.F_PERSISTED`` once committed.
A record that died before its turn (replaced by a newer one, which is committed instead, or
purged) is skipped; one the ring dropped before its turn is lost for the disk tier and counted
(``Arena.lost``: the ring outran write-behind), but not one a batch had copied (``F_TAKEN``)
and then committed.

**What a crash may lose.** A kill -9 of every process of the machine (the shared memory is gone
with them) loses the records not committed yet: at most what accumulated since the last batch
(``PERSIST_INTERVAL`` plus a batch's commit time; the supervisor of ``--workers N`` survives a
worker's crash, and so do the records). It never leaves a corrupt entry: a batch is one
transaction per shard, each entry's index row (its new sequence number) is written before it
and an index row without its entry is dropped by the upkeep, and a body that went in as a file
is written before the transaction that refers to it. After a restart the lost entries are
simply misses (tested: ``tests/storage/test_integrity.py``).

**One record's data** (a key or tag the index cannot hold) must not cost the other records of
its batch their place on disk: a batch that raised for anything but the disk or the database
(``_environmental``) is written again in halves until that record is alone.

**Bodies kept apart** (a key with several variants: ``proxy.storage.memory``) are read from
their own records as the key's record names them, and those records are marked persisted with
it. One the ring dropped before its turn is lost for the disk: the key's record is then written
again without that variant (its others as on disk), rather than marked persisted, which would
have said the disk has it (a hit would then find its body nowhere and forget the whole key).

**Purges** hold ``paused`` while they act on the shared memory and the disk, so no batch is in
flight meanwhile, and what a purge killed in the shared memory is never committed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from proxy.logs import RepeatedFailure
from proxy.settings import SIZE_SLACK
from proxy.storage.arena import CHANGED, F_BODY, F_PERSISTED, Arena, Record
from proxy.storage.bans import GONE, BanList
from proxy.storage.disk import DiskTier, index_cost
from proxy.storage.entry import (
    ALL_TO_WRITE,
    APART,
    META_TO_WRITE,
    ON_DISK,
    Entry,
    body_key,
    decode_record,
    encode_record,
)
from proxy.storage.failures import WriteFailures
from proxy.storage.index import UrlTagIndex

log = logging.getLogger("cachegate.storage")

MAX_VARIANTS = 32
# Seconds between looks at what the writers added: the most a kill -9 of the whole machine can
# lose, against the fixed cost of each batch (an index transaction and one per shard, touching
# pages that a bigger batch shares). Measured side by side (``scripts/bench-pair``, 2 workers,
# 8 pairs): 0.05 -> 0.2 s gave fill 1.06x req/s (all 8 pairs above 1) at 0.95x CPU per
# request, zipf 1.02x at 0.98x; 0.2 -> 0.5 s gave fill 1.02x but zipf 0.92x (6 pairs).
PERSIST_INTERVAL = 0.2
# Between batches the owner looks every PERSIST_POLL seconds how much the writers added, and
# commits at once when it is more than 1 / EARLY_COMMIT_SHARE of the ring: a small ring under
# fast fills must not wrap over records write-behind has not reached (``Arena.lost``).
PERSIST_POLL = 0.05
EARLY_COMMIT_SHARE = 8
# A batch is committed in parts of at most BATCH_BYTES (a batch holds its bodies in memory) and
# at most SIZE_SLACK of cache.disk.size, bodies, metadata and index rows counted together: what
# one part adds to the disk before its culls take as much again and the next part is weighed
# (``DiskTier.weigh``). Parts counted in bodies alone let a flood of responses with 30 KB of tags
# and tiny bodies commit 500 of them at once (30 MB, a third of a 100 MB size).
BATCH_BYTES = 16 << 20
MAX_ATTEMPTS = 3  # batches that may fail (a shard's lock timed out) on a record before it is left out
# Variants of keys with Vary whose bodies the last batches committed, remembered by the owner
# (``Persister._recent``): a record written meanwhile may list one as not on disk yet (copied
# while its batch was in the thread), and the ring may drop its body record before the next
# batch. A few hundred KB at most; past it, the oldest are forgotten.
RECENT_BODIES = 4096
RELIST_TRIES = 3  # rewrites of a key's newer record (``_mark_on_disk``) another process may beat

Merge = Callable[[tuple[Entry, ...]], tuple[tuple[Entry, ...], list[str]]]


@dataclass
class PersistStats:
    batches: int = 0
    entries: int = 0  # variants committed
    failed: int = 0  # variants a batch could not commit (a shard's lock timed out; tried again)
    held_back: int = 0  # new keys' variants kept in memory only: the disk was over its size


def merge_variant(current: tuple[Entry, ...], new: Entry) -> tuple[tuple[Entry, ...], list[str]]:
    """``new`` replaces the variant with the same Vary values; at most MAX_VARIANTS are kept.
    Returns the variants and the body ids no longer used (never ``new``'s own: committing the
    same variant twice must not delete the body it has just written)."""
    kept = [e for e in current if e.response.vary != new.response.vary]
    dropped = [e.body_id for e in current if e.response.vary == new.response.vary
               and e.body_id != new.body_id]
    kept.append(new)
    while len(kept) > MAX_VARIANTS:
        dropped.append(kept.pop(0).body_id)
    return tuple(kept), dropped


def unbanned(bans: BanList, current: tuple[Entry, ...], dropped: list[str]) -> tuple[Entry, ...]:
    """Variants minus the hard-banned ones (their bodies go to ``dropped``); soft-banned made stale."""
    out: list[Entry] = []
    for e in current:
        v = bans.verdict(e)
        if v == GONE:
            dropped.append(e.body_id)
        elif v is None:
            out.append(e)
        else:
            out.append(e if e.response.invalidated else e.invalidated())
    return tuple(out)


def adding(bans: BanList, new: Entry, kept: list[tuple[Entry, ...]]) -> Merge:
    """The merge that adds ``new`` to a key's variants (run under the shard's lock)."""
    def merge(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
        banned: list[str] = []
        out, replaced = merge_variant(unbanned(bans, current, banned), new)
        kept.append(out)
        return out, replaced + banned

    return merge


def updating(bans: BanList, new: Sequence[Entry], kept: list[tuple[Entry, ...]]) -> Merge:
    """The merge that puts each of ``new``'s metadata on the variant with its body (a
    revalidation, and the variants it freshened)."""
    by_body = {e.body_id: e for e in new}

    def merge(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
        dropped: list[str] = []
        current = unbanned(bans, current, dropped)
        out = tuple(by_body.get(e.body_id, e) for e in current)
        kept.append(out)
        return out, dropped

    return merge


def committed_tags(written: Entry, kept: list[tuple[Entry, ...]]) -> tuple[str, ...]:
    """The tags of a key's variants once ``written`` was committed (``kept``: what the merge
    left, when it ran), for ``UrlTagIndex.retag``."""
    if not kept:
        return written.tags
    return tuple(sorted({t for e in kept[-1] for t in e.tags}))


def _environmental(exc: Exception) -> bool:
    """Whether a batch's failure is the disk's or the database's (full, locked, damaged,
    unreadable), which writing it in smaller parts cannot help, rather than one record's."""
    return isinstance(exc, (OSError, sqlite3.OperationalError)) or type(exc) is sqlite3.DatabaseError


@dataclass
class _Item:
    pos: int
    entry: Entry
    body: bytes | None  # the body to write with it (ALL_TO_WRITE), None: metadata only
    whole: bool  # ALL_TO_WRITE (else META_TO_WRITE)
    body_pos: int = 0  # the record its body was read from when kept apart (marked persisted with it)


class Persister:
    """Commits the shared memory's new records to the disk tier, behind the writers."""

    def __init__(self, arena: Arena, disk: DiskTier, index: UrlTagIndex | None, bans: BanList) -> None:
        self.arena = arena
        self.disk = disk
        self.index = index
        self.bans = bans
        self.stats = PersistStats()
        self._cursor = 0
        self._committing = 0  # records of the batch the thread is committing now
        # That batch's job (``flush``): a flush cancelled meanwhile leaves it to finish there.
        self._inflight: asyncio.Future[tuple[list[int], list[tuple[int, Exception]]]] | None = None
        self._inflight_round = (0, 0)  # that batch's (first position, ``stats.entries`` before it)
        # Where the oldest batch not seen to its end began: one whose flush was cancelled (a
        # clean stop cancels the loop) goes on in the thread, and what it leaves is unwritten too.
        self._taken_from: int | None = None
        # A stop's deadline (``time.monotonic``): no batch, part of one or shard begins past it.
        self._until: float | None = None
        self._written: set[int] = set()  # positions the batch in the thread committed so far
        self._broken: set[int] = set()  # and those it failed otherwise than by a lock's timeout
        self._retry: dict[int, int] = {}  # position of a record a batch failed to commit -> attempts
        # Records of the batch in the thread with variants whose bodies the ring dropped before
        # they were written (position -> their body ids): written again without them (``_relist``).
        self._lost: dict[int, tuple[Record, set[str]]] = {}
        # (key, body id) -> the entry committed with that body, for keys with Vary (RECENT_BODIES).
        self._recent: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._lock = asyncio.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persist")
        self.closed = False
        # The owner's write failures (``GET /stats``, logged once per streak): a batch that
        # raised (a full disk) counts as a ``write`` failure there.
        self.failures: WriteFailures | None = None

    def close(self) -> None:
        """Waits for the batch in the thread: past ``flush``'s deadline it begins nothing more."""
        self.closed = True
        self._thread.shutdown(wait=True)

    def _out_of_time(self) -> bool:
        return self._until is not None and time.monotonic() >= self._until

    def unwritten(self) -> int:
        """Records the shared memory holds that the disk does not (after a stop's ``flush``):
        those a deadline or a lock's timeout left out, a cancelled batch's included, and those
        given up on after ``MAX_ATTEMPTS`` failed batches (behind the cursor: a full disk's were
        not counted, and a stop said nothing of them)."""
        if self.closed:  # (the shared memory may be closed too)
            return 0
        start = self._cursor if self._taken_from is None else min(self._cursor, self._taken_from)
        arena = self.arena
        given_up = sum(1 for p in self._retry if p < start and arena.alive(p) and not arena.persisted(p))
        return arena.count(start, arena.head, skip=F_PERSISTED | F_BODY) + given_up

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No batch in flight while inside (a purge acting on memory and disk together)."""
        async with self._lock:
            yield

    @property
    def pending(self) -> bool:
        """Whether the writers added anything since the last look."""
        return self.arena.head > self._cursor

    def backlog(self) -> int:
        """Records the shared memory holds that are not on disk yet: those added since the last
        batch (or left by a failed one to retry) and the batch being committed. Read from the
        records' headers (``Arena.count``): at scrape time, never on a request."""
        return self._committing + self.arena.count(self._cursor, self.arena.head, skip=F_PERSISTED | F_BODY)

    async def run_forever(self, interval: float = PERSIST_INTERVAL) -> None:
        """The owner's background loop."""
        failures = RepeatedFailure(log, "writing behind to the disk tier")
        while not self.closed:
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()
            await self._wait(interval)

    async def _wait(self, interval: float) -> None:
        """``interval`` seconds, or less once the writers added more than 1 / EARLY_COMMIT_SHARE
        of the ring since the last batch. (Growth since then, not what is pending: records a
        failed batch left to retry wait for the interval, never in a tight loop.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + interval
        early = self.arena.head + self.arena.capacity // EARLY_COMMIT_SHARE
        while not self.closed:
            left = deadline - loop.time()
            if left <= 0 or self.arena.head > early:
                return
            await asyncio.sleep(min(left, PERSIST_POLL))

    async def flush(self, until: float | None = None) -> int:
        """Commit what the shared memory holds that the disk tier does not (up to now); how
        many variants were committed. The lock is taken even with nothing new: a batch the
        background loop took first is committed before this returns (a flush that saw nothing
        pending returned while that batch was still in the thread: the disk had none of it).

        ``until`` (a stop's deadline, ``time.monotonic``): nothing begins past it, in this flush
        or in a batch already in the thread; a shard's transaction begun ends as it would (its
        COMMIT or its lock's timeout), never cut off. Why: with every shard locked by another
        program, each part of each batch waited the lock's timeout per shard, and a clean stop
        took 18 s where shutdown_grace was 10 (``unwritten`` says what was left)."""
        if until is not None:
            self._until = until
        if not self.closed and self.arena.disk_gone:
            # The cache directory is gone (``Tiers.lose_disk``): nothing is written there any
            # more, and what the shared memory holds stays there alone (not pending, not
            # unwritten: a stop says nothing of it; the error said it once).
            self._cursor, self._taken_from = self.arena.head, None
            self._retry.clear()
            return 0
        committed = 0
        while not self.closed and not self._out_of_time():
            async with self._lock:
                n, again = 0, list[int]()
                if self._inflight is not None:
                    # The batch of a flush cancelled while it was in the thread (a stop cancels
                    # the write-behind loop): committed before this goes on, and its result
                    # settled as this flush's own would be. Else a stop's flush found nothing
                    # pending and returned at once, and ``unwritten`` counted that batch's
                    # records as left out (a false WARNING of 573 entries lost that were all on
                    # disk after the restart); and what it failed to commit (a shard's lock
                    # timed out) was neither tried again nor reported (143 entries lost by a
                    # stop with 6.7 of its 8 s left).
                    n, again = await self._finish()
                    committed += n
                if not again:
                    if not self.pending or self._out_of_time():
                        break
                    start, end = self._cursor, self.arena.head
                    records = list(self.arena.scan(start, end, skip=F_PERSISTED | F_BODY))
                    self._cursor = end
                    if not records:
                        continue
                    if self._taken_from is None:
                        self._taken_from = start
                    self._committing = len(records)
                    self._inflight_round = (start, self.stats.entries)
                    self._inflight = asyncio.get_running_loop().run_in_executor(
                        self._thread, self._commit, records)
                    n, again = await self._finish()
                    committed += n
                if again:  # a shard's lock timed out: those records are tried again
                    self._cursor = min(self._cursor, *again)
                    if self._until is None:
                        break  # (next time: the background loop's interval)
                    # A stop's flush tries them again until its deadline (the lock may be let
                    # go meanwhile), not more than once per PERSIST_POLL when nothing was written.
                    if not n:
                        await asyncio.sleep(PERSIST_POLL)
        return committed

    async def _finish(self) -> tuple[int, list[int]]:
        """Await the batch in the thread and settle its result; (variants committed, positions
        to try again). Shielded: a cancelled flush (a clean stop cancels the loop) must not take
        back a batch still queued in the thread, which the next flush settles here."""
        assert self._inflight is not None
        start, before = self._inflight_round
        try:
            failed, errors = await asyncio.shield(self._inflight)
        except asyncio.CancelledError:
            if self._inflight.cancelled():  # (else this flush was: the next one settles the batch)
                self._inflight = None
            raise
        except BaseException:
            self._inflight = None
            raise
        finally:
            self._committing = 0
        self._inflight = None
        if self._taken_from == start and not self._out_of_time():
            self._taken_from = None  # (seen to its end: what it left is behind the cursor)
        committed = self.stats.entries - before
        self._report(errors, committed)
        # A stop's flush tries a shard whose lock timed out again until its deadline (the lock
        # may be let go meanwhile); a record whose write failed otherwise (a full disk: it fails
        # at once, in the index or in its shard) has MAX_ATTEMPTS as the loop's, else a stop on
        # a full disk spun to its deadline.
        stop, broken = self._until is not None, self._broken
        again = [p for p in failed if (stop and p not in broken) or self._retry.get(p, 0) < MAX_ATTEMPTS]
        for p in again:
            self._retry[p] = self._retry.get(p, 0) + 1
        return committed, again

    def _report(self, errors: list[tuple[int, Exception]], committed: int) -> None:
        if self.failures is None:
            return
        for n, exc in errors:
            self.failures.failed("write", f"a write-behind batch of {n} entries", exc)
        if committed and not errors:
            self.failures.succeeded()

    def _commit(self, records: list[Record]) -> tuple[list[int], list[tuple[int, Exception]]]:
        """``_commit_taken`` with the records marked ``F_TAKEN`` while the batch has them: one
        the ring drops meanwhile counts as lost only when this batch did not commit it
        (``Arena.untake``), not when it did (``Arena.lost`` overcounted 2.5x)."""
        records = [r for r in records if not r.flags & F_BODY]  # (written with their key's record)
        taken = set(self.arena.take([r.pos for r in records]))
        self._written.clear()
        self._broken.clear()
        try:
            return self._commit_taken([r for r in records if r.pos in taken])
        finally:
            self.arena.untake([(r.pos, r.key) for r in records
                               if r.pos in taken and r.pos not in self._written])

    def _commit_taken(self, records: list[Record]) -> tuple[list[int], list[tuple[int, Exception]]]:
        """In the persist thread: read the records' new variants (bodies copied out and checked),
        then commit them: an index transaction, then one transaction per shard. The positions
        of the records a shard failed to take (or whose part of the batch raised: a full disk),
        and those errors with how many entries each cost."""
        items: list[_Item] = []
        batch_bytes = 0
        part_bytes = min(BATCH_BYTES, int(self.disk.size_limit * SIZE_SLACK))
        self._lost.clear()
        done_positions: list[int] = []
        failed: list[int] = []
        errors: list[tuple[int, Exception]] = []
        for record in records:
            if self._out_of_time():  # a stop's deadline: the rest stays unwritten (``unwritten``)
                return failed, errors
            if record.flags & F_BODY:
                continue  # a body kept apart: written with its key's record
            decoded = decode_record(record.key, record.meta)
            if decoded is None:
                continue
            at = record.body_at
            found: list[_Item] = []
            lost: set[str] = set()
            for e, body_len, state in decoded:
                body = None
                if body_len == APART:
                    if state == ALL_TO_WRITE:
                        item = self._apart(record, e)
                        if item is not None:
                            found.append(item)
                            continue
                        committed = self._recent.get((record.key, e.body_id))
                        if committed is None:
                            lost.add(e.body_id)
                        elif committed != e:  # (on disk with older metadata)
                            found.append(_Item(record.pos, e, None, False))
                    elif state == META_TO_WRITE:
                        found.append(_Item(record.pos, e, None, False))
                    continue
                if body_len >= 0:
                    if state == ALL_TO_WRITE:
                        body = self.arena.mm[at:at + body_len]
                    at += body_len
                if state == ALL_TO_WRITE and body is not None:
                    found.append(_Item(record.pos, e, body, True))
                elif state == META_TO_WRITE:
                    found.append(_Item(record.pos, e, None, False))
                elif state == ALL_TO_WRITE:  # pragma: no cover (a writer's mistake): never a body-less entry
                    log.error("a record of %s holds no body to write for %s; skipped", record.key, e.body_id)
            if not self.arena.alive(record.pos):
                continue  # replaced (the newer record comes later), purged, or dropped by the ring
            if lost:
                self._lost[record.pos] = (record, lost)
                if not found:
                    self._relist(record.pos)
                    continue
            items.extend(found)
            done_positions.append(record.pos)
            batch_bytes += sum(len(i.body) for i in found if i.body is not None) + len(record.meta) \
                + index_cost(record.key, tuple(i.entry for i in found))
            if batch_bytes > part_bytes:
                failed += self._write_part(items, done_positions, errors)
                items, done_positions, batch_bytes = [], [], 0
        if not self._out_of_time():
            failed += self._write_part(items, done_positions, errors)
        return failed, errors

    def _apart(self, record: Record, e: Entry) -> _Item | None:
        """The item of a variant whose body is kept apart, its body copied from its own record
        (None: the ring dropped it, or it changed while it was copied)."""
        bkey = body_key(record.key, e.body_id)
        found = self.arena.find(bkey)  # (one being moved round the ring too: ``Arena.find``)
        if found is None or not found.flags & F_BODY or found.body_len != e.body_size:
            return None
        body = self.arena.body(found)
        return None if body is None else _Item(record.pos, e, body, True, found.pos)

    def _relist(self, pos: int) -> None:
        """Write the key's record at ``pos`` again without its variants whose bodies the ring
        dropped before they were written (``_lost``), the others as on disk (they were all
        committed: ``_write``); or drop it when none is left. Only over that record: a newer
        one of the key is written behind in its turn."""
        record, lost = self._lost.pop(pos)
        decoded = decode_record(record.key, record.meta) or []
        if any(body_len >= 0 for _, body_len, _ in decoded):  # pragma: no cover (never with bodies apart)
            return
        kept = [(e, body_len, ON_DISK) for e, body_len, _ in decoded if e.body_id not in lost]
        if kept:
            done = self.arena.put(record.key, encode_record(kept), b"", F_PERSISTED, expect=pos) > 0
        else:
            done = self.arena.delete(record.key, pos)
        if done:  # (else replaced meanwhile: the newer record is written behind in its turn)
            log.info("%d variant(s) of %s left the shared memory before they were written to disk: "
                     "misses from now on", len(decoded) - len(kept), record.key)

    def _remember(self, committed: list[Entry]) -> None:
        """Note the variants of keys with Vary just committed with their bodies (``_recent``),
        and mark them on disk in a record of their key written since their batch took its own
        (``_mark_on_disk``)."""
        recent = self._recent
        by_key: dict[str, dict[str, Entry]] = {}
        for e in committed:
            recent[(e.key, e.body_id)] = e
            recent.move_to_end((e.key, e.body_id))
            by_key.setdefault(e.key, {})[e.body_id] = e
        while len(recent) > RECENT_BODIES:
            recent.popitem(last=False)
        for key, bodies in by_key.items():
            self._mark_on_disk(key, bodies)

    def _mark_on_disk(self, key: str, bodies: dict[str, Entry]) -> None:
        """Rewrite the key's record written while the batch that committed ``bodies`` was in the
        thread (a worker's fill of another variant copied them as not on disk yet, their body
        records not marked persisted then) with them on disk. Why: the ring may drop their body
        records before the next batch, and a variant not on disk with no body record is left out
        when the record is read (a miss, though the disk has it)."""
        for _ in range(RELIST_TRIES):
            record = self.arena.find(key)
            if record is None or record.flags & F_PERSISTED:
                return
            decoded = decode_record(key, record.meta)
            if not decoded or any(body_len >= 0 for _, body_len, _ in decoded):
                return  # (a key's one variant: its body in the record, written behind with it)
            variants, changed = [], False
            for e, body_len, state in decoded:
                done = bodies.get(e.body_id)
                if state == ALL_TO_WRITE and done is not None:
                    state, changed = (ON_DISK if done == e else META_TO_WRITE), True
                variants.append((e, body_len, state))
            if not changed:
                return
            persisted = all(state == ON_DISK for _, _, state in variants)
            if self.arena.put(key, encode_record(variants), b"", F_PERSISTED if persisted else 0,
                              expect=record.pos) != CHANGED:
                return

    def _write_part(self, items: list[_Item], positions: list[int], errors: list[tuple[int, Exception]]
                    ) -> list[int]:
        try:
            return self._write(items, positions, errors)
        except Exception as exc:  # tried again with the next batches (MAX_ATTEMPTS)
            if len(positions) > 1 and not _environmental(exc):
                # One record's data (a key or tag the index cannot hold) must not cost the
                # others their place on disk: written in halves until it is alone.
                half = positions[len(positions) // 2]
                first, second = [p for p in positions if p < half], [p for p in positions if p >= half]
                return (self._write_part([i for i in items if i.pos < half], first, errors)
                        + self._write_part([i for i in items if i.pos >= half], second, errors))
            for pos in positions:
                self._lost.pop(pos, None)  # (tried again with the record)
            if self.index is not None:
                self.index.noticed(exc)  # a damaged index: marked for the next start
            self._broken.update(positions)
            errors.append((len(items), exc))
            self.stats.failed += len(items)
            return list(positions)

    def _weigh(self) -> None:
        """Count the index against the shards' budgets and the whole against cache.disk.size
        (``DiskTier.count_index``, ``weigh``), as the upkeep does every round, and publish both
        for every process: before a batch (is the disk over its size?), and once its index rows
        are in (the culls after its commits see what they added to the index)."""
        disk = self.disk
        index_bytes = self.index.size() if self.index is not None and self.index.damage is None else 0
        self.arena.set_shard_budget(disk.count_index(index_bytes))
        disk.weigh(index_bytes)
        self.arena.set_disk_full(disk.full)

    def _hold_back(self, items: list[_Item], positions: list[int]) -> tuple[list[_Item], list[int]]:
        """While the disk tier is over cache.disk.size (``DiskTier.full``): the records of keys
        the disk does not hold are left out of the batch, kept in memory only (not marked
        persisted: purges find them there; a later record of the key is written behind as any
        other). Keys the disk holds are written: their new variants replace the ones there,
        which must not come back once memory lets the new ones go. (Keys the directory of disk
        keys cannot tell, not built yet or a crowded bucket, are asked of the disk.)"""
        on_disk = self.arena.on_disk
        known = {i.entry.key: on_disk(i.entry.key) for i in items}
        unsure = [k for k, there in known.items() if there is None]
        there = self.disk.present(unsure) if unsure else set()
        held = {i.pos for i in items if known[i.entry.key] is False
                or (known[i.entry.key] is None and i.entry.key not in there)}
        if not held:
            return items, positions
        for pos in held:
            self._lost.pop(pos, None)
        kept = [i for i in items if i.pos not in held]
        self.stats.held_back += len(items) - len(kept)
        return kept, [p for p in positions if p not in held]

    def _write(self, items: list[_Item], positions: list[int], errors: list[tuple[int, Exception]]
               ) -> list[int]:
        """Commit ``items`` (the records at ``positions``): the index, then the shards; the
        positions not committed. A shard that failed (a full disk) adds its error to ``errors``
        with how many entries it cost, for ``_report``, as a whole part that raised does."""
        if not items and not positions:
            return []
        disk = self.disk
        self._weigh()
        if disk.full:
            items, positions = self._hold_back(items, positions)
            if not items and not positions:
                return []
        # Keys the directory says the disk does not have: nothing of theirs to read or delete
        # first (a body too big for memory, written by a worker into a key this batch also
        # writes at the same moment, could be left out of its metadata: a later miss).
        on_disk = self.arena.on_disk
        seen: set[str] = set()
        absent = []
        for i in items:  # the key's first item of the batch only: the next ones merge with it
            absent.append(i.entry.key not in seen and on_disk(i.entry.key) is False)
            seen.add(i.entry.key)
        if self.index is not None and items:
            seqs = self.index.add_many([(i.entry.key, i.entry.tags) for i in items])
            self._weigh()  # (the culls after the commits see the rows just added)
        else:
            seqs = [0] * len(items)
        kept: list[list[tuple[Entry, ...]]] = [[] for _ in items]
        jobs: list[tuple[str, Merge, str, bytes | None]] = []
        for item, seq, k in zip(items, seqs, kept, strict=True):
            new = item.entry.with_seq(seq)
            merge = adding(self.bans, new, k) if item.whole else updating(self.bans, (new,), k)
            jobs.append((new.key, merge, new.body_id, item.body))
        raised: list[tuple[list[int], Exception]] = []
        ok = disk.commit_many(jobs, absent, out_of_time=self._out_of_time, raised=raised) if jobs else []
        for failed_items, exc in raised:
            self._broken.update(items[i].pos for i in failed_items)
            errors.append((len(failed_items), exc))
        stored: list[str] = []
        retags: list[tuple[str, tuple[str, ...]]] = []
        failed_positions: set[int] = set()
        for item, k, good, new_key in zip(items, kept, ok, absent, strict=True):
            if good:
                stored.append(item.entry.key)
                tags = committed_tags(item.entry, k)
                if not new_key or set(tags) != set(item.entry.tags):  # (a new key's rows are these already)
                    retags.append((item.entry.key, tags))
            else:
                failed_positions.add(item.pos)
                self.stats.failed += 1
        if self.index is not None:
            self.index.retag(retags)
        self.stats.entries += len(stored)
        self.stats.batches += 1
        committed = [pos for pos in positions if pos not in failed_positions]
        for pos in [p for p in committed if p in self._lost]:
            committed.remove(pos)
            self._relist(pos)
        for pos in failed_positions:
            self._lost.pop(pos, None)
        bodies = [i.body_pos for i, good in zip(items, ok, strict=True) if good and i.body_pos]
        self.arena.set_flags_many(committed + bodies, F_PERSISTED)
        varied = [i.entry for i, good in zip(items, ok, strict=True)
                  if good and i.whole and i.entry.response.vary]
        if varied:  # (after the marks: a record written from now on finds its body records on disk)
            self._remember(varied)
        self._written.update(committed)
        for pos in committed:
            self._retry.pop(pos, None)
        self.arena.disk_add(sorted(set(stored)))
        return sorted(failed_positions)
