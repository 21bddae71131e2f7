"""Reading: the shared memory first, then the disk tier (grouped lookups), promotion, bodies.

Reads look in memory first (synchronously: the hit path awaits nothing), then on disk,
unless the directory of the disk's keys says the key is not there (no disk read at all).
A disk read runs in the event loop while the OS page cache answers such reads quickly, and in
the thread pool while it does not, or when the disk's eviction makes every read a write
(``ReadPlace``). Concurrent lookups of one key in the thread pool share one disk read (a herd
on a key that is only on disk reads it once). A key's second disk read in a while promotes
it into the shared memory (``Promotions``: not its first), in two halves: the metadata at
once (so freshness checks, HEAD and 304s never read a body), the body when it is first sent,
if it is small enough for the memory tier. Every variant
read from disk passes the ban list first, so a purge by tag or prefix is in force at once; a
read in the thread pool that overlapped a local purge is done again (``epoch``).

Big bodies on disk are sent from their files (``bodyfiles``): the files stay open for
the next hits, and a big body memory holds too is sent from its file once it is open
(``sendable_file``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import IO, Any, TypeVar, cast

from proxy.storage.bodyfiles import BodyFile, OpenBodies, SharedFile
from proxy.storage.disk import INLINE_LIMIT, body_checksum
from proxy.storage.entry import Entry
from proxy.storage.memory import Cached, record_of
from proxy.storage.work import Tiers

log = logging.getLogger("cachegate.storage")
T = TypeVar("T")

COMMIT_WAIT = 5.0  # seconds a read waits for this process's disk write of the same key
# Where disk reads run: the rule is ``ReadPlace``'s.
INLINE_READ_LIMIT = 0.001  # s: the moving average of a read in the loop, at most
INLINE_READ_WEIGHT = 0.1  # of each read in that average
INLINE_READ_SHARE = 0.2  # s of each second spent reading in the loop, at most
INLINE_READ_BACKOFF = 5.0  # s in the thread pool before the loop is tried again
SWITCH_LOG_EVERY = 600.0  # seconds: a disk that keeps being slow is logged once in this long
LOOKUP_PARALLEL = 3  # groups of disk lookups read at the same time (of the 4 executor threads)
LOOKUP_BATCH = 16  # keys per group: a group waits for its slowest read
OPENING_LIMIT = 8  # body files being opened for sendfile at once (see sendable_file)
PROMOTION_DOORKEEPER = 8192  # keys read from disk once that a process remembers (``Promotions``)
CUT_SHORT_EVERY = 60.0  # seconds: body files found cut short are said at most this often
DAMAGED_REMEMBERED = 4096  # body files found damaged that sendable_file no longer opens


class _ClockBack:
    """Whether this process logged an entry stored by a clock ahead of its own (once only)."""

    seen = False


def note_clock_back(entries: Sequence[Entry], now: float) -> bool:
    """Log, once per process, an entry read from disk that was stored while the clock was
    ahead (``Freshness.stamped_ahead``: the clock has gone back since), or one from memory that
    a lookup found stale (``Engine.handle``: not on a hit). The policy treats such an entry as
    stale (``Freshness.age``); this says why so many entries are revalidated at once. After the
    first, it costs one attribute read per disk read or stale lookup. Whether it logged."""
    if _ClockBack.seen:
        return False
    for e in entries:
        f = e.response.freshness
        if f.stamped_ahead(now):
            _ClockBack.seen = True
            log.warning("entry %s was stored %.0f s ahead of this machine's clock: the clock has "
                        "gone back since; such entries are stale and revalidated at their next use "
                        "(logged once)", e.key, f.response_time - now)
            return True
    return False


class Promotions:
    """Which disk hits are promoted into the shared memory: a key's second disk read in a while
    (the last ``PROMOTION_DOORKEEPER`` keys this process read from disk once), not its first.
    Each worker keeps its own: with N workers a key may be read from disk up to N + 1 times
    before one of them promotes it.

    Why: under a long tail most keys read from disk are not asked again before the ring's
    next lap, and promoting each of them cost its put into the ring and pushed out keys that
    are asked again (the ring is the machine's memory budget: what a promotion writes, another
    key leaves), as nginx's ``proxy_cache_min_uses`` keeps one-off responses out. Measured side
    by side with every disk hit promoted (``scripts/bench-pair --workloads zipf``, 2 workers
    each; ratios of req/s, medians of the pairs): remembering 8,192 keys, 1.035 (6 pairs) and
    1.031 (8 pairs; 1.02-1.08 once the cache was warm), 0.97 of the CPU per request; 2,048
    keys, 0.98; 32,768, 1.02; never promoting, 0.85 (0.74 once warm: the keys that come back
    must reach memory). A fill always goes into memory (write-behind reads it there), and so
    does what another worker stored (``reread``).

    A key whose variants vary (``Vary``) is promoted on its first read: a fill of another of
    its variants merges with what memory holds (``Writer._put_variant``), and with the key
    not there its variants on disk would be hidden behind the new one until memory dropped
    it (each asked again of the origin)."""

    __slots__ = ("_once", "limit")

    def __init__(self, limit: int = PROMOTION_DOORKEEPER) -> None:
        self.limit = limit
        self._once: dict[str, None] = {}

    def admit(self, key: str) -> bool:
        """Whether a key just read from disk goes into memory (the second sighting: then it is
        forgotten here); else it is remembered (forgotten all at once at ``limit``)."""
        once = self._once
        if not self.limit:
            return True  # (0: every disk hit is promoted)
        if key in once:
            del once[key]
            return True
        if len(once) >= self.limit:
            once.clear()
        once[key] = None
        return False


class ReadPlace:
    """Whether this process reads the disk tier in its event loop or in its thread pool.

    Why in the loop: a read the OS page cache answers (a metadata row, a small body) costs
    tens of µs, but in a thread it waited for the GIL, which a busy event loop gives up only
    every switch interval (5 ms), once per SQLite call: in ``zipf``'s warm phase the hits
    read from disk took 8 ms at the median in the server (access log), and were its p99.
    Read in the loop, side by side (2 workers each, 12 s runs alternated, medians of 6): warm
    7,302 against 6,718 req/s, p99 40.7 against 48.5 ms (always in the loop, in an earlier
    pair: 7,949 against 6,541, p99 31.5 against 51.5).

    Why not always: a disk that makes reads wait (a cold page cache on a spinning or networked
    disk) would stall every connection of the loop meanwhile, as nginx's blocking reads do.
    So each read in the loop is timed; when the moving average passes INLINE_READ_LIMIT, or
    reads took more than INLINE_READ_SHARE of the second (each quick enough, but many: a
    networked disk), reads go to the thread pool for INLINE_READ_BACKOFF seconds, then are
    tried in the loop again. A single read made slow by the process being preempted (by less
    than 10 ms) moves the average by a tenth of its time and does not switch. The time of a read includes
    winning the GIL back from the process's other threads after each SQLite call: where one of
    them keeps it busy (the write-behind thread of a single-process cache), reads may go to
    the thread pool more often, never less safely. A body of up to ``memory_max_object`` is
    read whole with it (from its file when 32 KiB or more; opening a bigger one for
    ``sendfile`` stays in the thread pool). Under the least-recently-used disk eviction every
    read stays in the thread pool (``Reader._inline``): each is a write transaction there,
    which can wait for another process's write lock. Times are ``perf_counter`` seconds."""

    __slots__ = ("_logged_at", "_second", "_second_busy", "average", "switches", "threads_until")

    def __init__(self) -> None:
        self.average = 0.0
        self.threads_until = 0.0  # 0: reads run in the loop
        self.switches = 0  # times reads went to the thread pool
        self._logged_at: float | None = None
        self._second = 0.0  # when the current second of reads began
        self._second_busy = 0.0  # time spent reading in it

    def inline(self, now: float) -> bool:
        """Whether a read starting ``now`` runs in the event loop."""
        if not self.threads_until:
            return True
        if now < self.threads_until:
            return False
        self.threads_until = 0.0
        self.average = 0.0
        return True

    def took(self, seconds: float, now: float) -> bool:
        """Count a read in the loop that took ``seconds`` and ended ``now``; whether reads
        go to the thread pool from now on."""
        self.average += (seconds - self.average) * INLINE_READ_WEIGHT
        if now - self._second >= 1.0:
            self._second, self._second_busy = now, 0.0
        self._second_busy += seconds
        if self.average <= INLINE_READ_LIMIT and self._second_busy <= INLINE_READ_SHARE:
            return False
        self.threads_until = now + INLINE_READ_BACKOFF
        self.switches += 1
        return True

    def should_log(self, now: float) -> bool:
        """Whether a switch ``now`` is logged (the first, then one in SWITCH_LOG_EVERY)."""
        if self._logged_at is not None and now - self._logged_at < SWITCH_LOG_EVERY:
            return False
        self._logged_at = now
        return True


class Reader:
    def __init__(self, tiers: Tiers) -> None:
        self.t = tiers
        self.place = ReadPlace()
        self.promotions = Promotions()
        self._lookups: list[tuple[str, bool, asyncio.Future[tuple[Cached, ...]]]] = []  # see _lookup
        self._lookups_running = 0
        self._pending: dict[str, asyncio.Future[tuple[Cached, ...]]] = {}  # lookups in progress, by key
        # Big bodies on disk: their files stay open for the next hits (sendfile), holding at
        # most a twentieth of the disk budget (deleted files among them hold their space).
        disk = tiers.disk
        self.body_files = OpenBodies(max_bytes=disk.size_limit // 20 if disk is not None else None)
        # Body files being opened for sendable_file (close() closes what they opened that the
        # event loop has not taken yet).
        self._opening: dict[tuple[str, str], concurrent.futures.Future[bytes | IO[bytes] | None]] = {}
        # Body files whose bytes did not match their checksum when opened for a body memory
        # holds (``_open_big_body``): memory's verified copy is sent, the file is not opened again.
        self._damaged: set[tuple[str, str]] = set()
        # Big body files found cut short as a hit opened them (``_cut_short_before_open``):
        # counted by ``read_failed`` (the engine's metric), said at most once a minute.
        self.read_failed: Callable[[], None] = lambda: None
        self._cut_short_said: float | None = None
        self._cut_short_unsaid = 0

    def close(self) -> None:
        for job in self._opening.values():
            concurrent.futures.wait([job])
            opened = _opened_file(job)
            if opened is not None:
                opened.close()
        self._opening.clear()
        self.body_files.close()

    # -- the fast hit path -------------------------------------------------------------------

    def open_file(self, key: str, cached: Cached, max_file: int) -> tuple[bool, SharedFile | None]:
        """The fast path's body file for ``cached``: (whether it can be served now, the open file
        to send, if any). A body memory does not hold is served only from a file already open
        (and of at most ``max_file`` bytes); a big one memory holds goes by its file once open."""
        body = cached.body
        if body is None:
            if cached.entry.body_size > max_file:
                return False, None
            shared = self.body_files.get(key, cached.entry.body_id)
            return shared is not None, shared
        if len(body) > INLINE_LIMIT:
            return True, self.sendable_file(cached.entry)
        return True, None

    # -- lookups -----------------------------------------------------------------------------

    def absent(self, key: str) -> bool:
        """Whether the key is known to be nowhere: memory has looked (the caller), no disk
        tier or the directory of the disk's keys does not list it, and this process is not
        writing it. ``get`` would answer () without a disk read; this answers without a
        coroutine, a shared future and a second look in memory (a miss's most common case)."""
        t = self.t
        if t.disk is None:
            return True
        try:
            return not t.work.writing(key) and t.memory.arena.on_disk(key) is False
        except Exception:  # not known: ``get`` reads, and its failures degrade to a miss
            return False

    async def get(self, key: str, *, bodies: bool = False) -> tuple[Cached, ...]:
        """The key's variants: from memory, else from disk (promoted into memory). ``bodies``:
        the caller will send a body, so a key's single variant with a body small enough for
        the memory tier comes with its body, in the same read (in the thread pool: one trip
        instead of two).

        Concurrent lookups of one key in the thread pool share one read; the first caller
        starts it in its own step (no task in between), and the others step aside once when it
        is done, so that the first one's flight is under way before the rest of a herd joins
        it. A read in the event loop is over before another request is read."""
        t = self.t
        variants = t.memory.get(key)
        if variants is not None:
            return variants
        if t.disk is None:
            return ()
        pending = self._pending.get(key)
        if pending is not None:
            await asyncio.wait((pending,))
            if not pending.cancelled():
                await asyncio.sleep(0)
                return pending.result()
        shared: asyncio.Future[tuple[Cached, ...]] = asyncio.get_running_loop().create_future()
        self._pending[key] = shared
        try:
            variants = await self._read(key, bodies)
            shared.set_result(variants)
        finally:
            if self._pending.get(key) is shared:
                del self._pending[key]
            if not shared.done():
                shared.cancel()  # this caller was cancelled: the others read for themselves
        return variants

    async def _read(self, key: str, bodies: bool) -> tuple[Cached, ...]:
        t = self.t
        writing = t.work.writing(key)
        if writing:
            # This process is writing the key to disk right now (a big body, which memory
            # does not hold): read our own write rather than miss and fetch it again.
            await asyncio.wait(writing, timeout=COMMIT_WAIT)
        elif t.memory.arena.on_disk(key) is False:
            return ()  # the directory of the disk's keys says it is not there: no disk read
        for _ in range(3):
            epoch = t.work.epoch
            variants = await self._lookup(key, bodies)
            if epoch == t.work.epoch:
                break
            # A purge arrived while we read: what we read may be purged. Read again.
        else:
            return ()
        if variants:
            current = t.memory.peek(key)
            if current is not None:
                return current  # promoted meanwhile by another request
            # Promotion (big bodies stay on disk); memory's copy is not marked as read from disk.
            if not any(c.entry.response.vary for c in variants) and not self.promotions.admit(key):
                return variants  # read from disk once in a while: served, not promoted
            t.memory.put(key, tuple(Cached(c.entry, c.body) if c.from_disk else c for c in variants),
                         admit=True, expect=0)  # (another worker's fill since the peek is newer)
        return variants

    def _inline(self) -> bool:
        """Whether the next disk read runs in the event loop (``ReadPlace``)."""
        disk = self.t.disk
        return disk is not None and disk.reads_are_plain and self.place.inline(perf_counter())

    def _in_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` here, in the event loop, timed for ``ReadPlace``."""
        if self.t.closed:  # as the thread pool, shut down, would refuse it
            raise RuntimeError("the store is closed")
        start = perf_counter()
        try:
            return fn(*args)
        finally:
            end = perf_counter()
            if self.place.took(end - start, end) and self.place.should_log(end):
                log.info("disk reads took %.1f ms on average in the event loop: they go to the "
                         "thread pool for %.0f s (then the loop is tried again; logged once in "
                         "%.0f minutes)", self.place.average * 1000, INLINE_READ_BACKOFF,
                         SWITCH_LOG_EVERY / 60)

    async def _disk(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a disk read: in the event loop or in the thread pool (``ReadPlace``)."""
        if self._inline():
            return self._in_loop(fn, *args)
        return await self.t.run(fn, *args)

    async def _lookup(self, key: str, bodies: bool) -> tuple[Cached, ...]:
        """``_load_from_disk``: in the event loop (``ReadPlace``), or in the executor, grouped:
        lookups that queue up while LOOKUP_PARALLEL groups are being read go together in the
        next one (one thread hop for many misses; alone, a lookup goes at once)."""
        if self._inline():
            return self._in_loop(self._load_from_disk, key, bodies)
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
            self.t.executor, self._load_group, [(k, b) for k, b, _ in group])
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
        settle(job, [done for _, _, done in group])
        while self._lookups and self._lookups_running < LOOKUP_PARALLEL:
            self._read_group()

    async def reread(self, key: str) -> tuple[Cached, ...]:
        """The key's variants as the machine has them now: another worker may have stored or
        freshened the key since this process looked (multi-worker coalescing answers from
        what it stored). The shared memory holds what any worker stored lately (the disk gets
        it behind); else the disk tier is read, and what it has goes into memory."""
        t = self.t
        current = t.memory.peek(key)
        if current is not None or t.disk is None or t.memory.arena.on_disk(key) is False:
            return current or ()
        for _ in range(3):
            epoch = t.work.epoch
            variants = await self._disk(self._load_from_disk, key)
            if epoch == t.work.epoch:
                break
        else:
            return ()
        if variants:
            current = t.memory.peek(key)
            if current is not None:
                return current  # stored or promoted meanwhile: newer than what the disk had
            t.memory.put(key, variants, admit=True, expect=0)
        return variants

    def _load_from_disk(self, key: str, bodies: bool = False) -> tuple[Cached, ...]:
        """The key's variants from disk, metadata only: freshness decisions, HEAD, 304s and
        inspection never read a body. ``open_body`` reads it when a body is really sent;
        ``bodies`` reads a single small one now (see ``get``)."""
        t = self.t
        disk = t.disk
        if disk is None:  # (its directory found gone since the caller looked: memory only)
            return ()
        entries = t.bans.apply(disk.get_variants(key))
        if not _ClockBack.seen:
            note_clock_back(entries, time.time())
        if bodies and len(entries) == 1 and entries[0].body_size <= t.memory.max_object:
            body = self._read_small_body(entries[0])
            return (Cached(entries[0], body, from_disk=body is not None),)
        return tuple(Cached(e, None) for e in entries)

    # -- bodies ------------------------------------------------------------------------------

    async def open_body(self, cached: Cached) -> bytes | IO[bytes] | None:
        """The body of a variant: bytes from memory, else from disk (an open file when big).

        A body small enough for the memory tier is read whole and kept in memory beside
        its metadata (the second half of a promotion), when the key's record keeps it
        (``_stays``)."""
        t = self.t
        if cached.body is not None:
            body = t.memory.body_bytes(cached)
            if body is not None:
                if cached.apart:
                    t.memory.use_body(cached)
                return body
            # The arena reclaimed it while it was copied: its current copy, if memory has one.
            for c in t.memory.peek(cached.entry.key) or ():
                if c.entry.body_id == cached.entry.body_id and c.body is not None:
                    body = t.memory.body_bytes(c)
                    if body is not None:
                        return body
        e = cached.entry
        if cached.apart and e.body_size <= t.memory.max_object:
            # Its body in a record of its own: another process may have put it back since.
            body = t.memory.body_apart(e.key, e)
            if body is not None:
                return body
        if t.disk is None:
            return None
        if e.body_size > t.memory.max_object:
            shared = self.body_files.get(e.key, e.body_id)
            if shared is None:
                opened = await t.run(self._open_big_body, e, True)
                if opened is None or isinstance(opened, bytes):
                    return opened
                shared = self.body_files.get(e.key, e.body_id)
                if shared is None:
                    shared = self.body_files.add(e.key, e.body_id, opened, e.body_size, e)
                else:  # another hit opened it meanwhile: keep one
                    opened.close()
            return cast(IO[bytes], BodyFile(shared))  # read/seek/close/fileno like a file
        epoch = t.work.epoch
        body = await self._disk(self._read_small_body, e)
        if body is None:
            return None
        memory = t.memory
        current = memory.peek(e.key)
        if current is None or epoch != t.work.epoch:
            return body
        if any(c.apart and c.body is None and c.entry.body_id == e.body_id for c in current):
            # A variant of a key with several: its body goes back in a record of its own, and the
            # key's record (metadata only) stays as it is.
            memory.put_body(e.key, e, body, on_disk=True)
        elif _stays(current, e, len(body), memory.max_object):
            # Only over the record it was read from (a record another worker wrote meanwhile
            # may hold a variant this one lacks): else it is simply not put back this time.
            memory.put(e.key, tuple(
                Cached(c.entry, body, state=c.state) if c.entry.body_id == e.body_id and c.body is None
                else c for c in current), expect=record_of(current))
        return body

    def sendable_file(self, e: Entry) -> SharedFile | None:
        """The open disk file of a body that memory holds too, for ``os.sendfile``; None
        until it is open. The first hit asks the thread pool to open it and is answered
        from memory meanwhile.

        Why: a body of more than INLINE_LIMIT bytes is also a file on disk, and sent from
        the page cache it costs the kernel no copy on the sending side (the pages are lent
        to the socket): 100 KiB hits measured ≈ 1.1-1.3× faster than writing the same bytes
        from memory, which is what it takes to keep up with Varnish on big objects."""
        t = self.t
        shared = self.body_files.get(e.key, e.body_id)
        if shared is not None or t.disk is None or e.body_size <= INLINE_LIMIT:
            return shared
        ident = (e.key, e.body_id)
        if ident not in self._opening and len(self._opening) < OPENING_LIMIT and not t.closed \
                and ident not in self._damaged:
            loop = asyncio.get_running_loop()
            epoch = t.work.epoch
            job = t.executor.submit(self._open_big_body, e)
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
            return  # gone, cut short, damaged, held in the database (sent from memory), or closed
        if self.t.closed or epoch != self.t.work.epoch or self.body_files.get(*ident) is not None:
            opened.close()  # a purge came meanwhile (it may have removed it), or another hit opened it
        else:
            self.body_files.add(e.key, e.body_id, opened, e.body_size, e)

    def _open_big_body(self, e: Entry, missed: bool = False) -> bytes | IO[bytes] | None:
        """A big body's file, open, when it holds exactly the body (else None: gone, cut, or
        its bytes do not match its checksum: then remembered, and not opened again).

        A body memory may hold (up to ``memory_max_object``: ``sendable_file`` sends such a
        body from its file, in place of memory's copy) is read and summed first, once per
        open (the file then stays open for the next hits): memory's copy is right (a fill, or a
        promotion that ``_read_small_body`` checked), the file may not be. A bigger body's file
        is not: it goes out by ``sendfile``, which Python never sees, and summing it at each
        open would hold its first byte back (see docs/storage.md).

        ``missed``: no copy in memory (``open_body``): a file cut short is then a miss, said
        and counted (``cut_short_before_open``), as one cut short while open is."""
        disk = self.t.disk
        raw = disk.get_body(e.key, e.body_id, e.body_size) if disk is not None else None
        if raw is None or isinstance(raw, bytes):
            return raw
        size = os.fstat(raw.fileno()).st_size
        if size != e.body_size:
            raw.close()
            if missed:
                self._cut_short_before_open(e, size)
            return None
        expected = body_checksum(e.body_id)
        if expected is not None and e.body_size <= self.t.memory.max_object \
                and zlib.crc32(os.pread(raw.fileno(), e.body_size, 0)) != expected:
            raw.close()
            self._found_damaged(e)
            return None
        return raw

    def _cut_short_before_open(self, e: Entry, size: int) -> None:
        """A big body's file found cut short (by hand, a failing disk) when a hit opened it:
        the variant is forgotten and refetched (``Engine.open_body``). Counted
        (``cachegate_storage_errors_total{operation="read"}``, through ``read_failed``) and
        said in one warning, then at most once a minute with how many more: before, it was a
        silent miss, where a file cut short while open was said and counted."""
        self.read_failed()
        now = time.monotonic()
        if self._cut_short_said is not None and now - self._cut_short_said < CUT_SHORT_EVERY:
            self._cut_short_unsaid += 1
            return
        more = f" ({self._cut_short_unsaid} more since the last warning)" if self._cut_short_unsaid else ""
        self._cut_short_said, self._cut_short_unsaid = now, 0
        log.warning("stored body of %s is cut short on disk (%d of %d bytes) before it was opened: "
                    "not served, the next request refetches it%s", e.key, size, e.body_size, more)

    def _found_damaged(self, e: Entry) -> None:
        """A body file whose bytes do not match its checksum: said once, and remembered, so that
        neither reader reads and sums it again (a hit read it in ``_load_from_disk`` and again in
        ``open_body``: twice the read, twice the warning)."""
        _damaged_body(e)
        if len(self._damaged) >= DAMAGED_REMEMBERED:
            self._damaged.clear()
        self._damaged.add((e.key, e.body_id))  # (a thread's set.add: one step under the GIL)

    def _read_small_body(self, e: Entry) -> bytes | None:
        """A body memory may hold, read whole from disk (to be promoted into memory, or sent):
        None when it is gone, not its length, or a file whose bytes do not match the checksum
        its id carries (``disk.body_checksum``): the caller forgets the variant, as for a body
        the disk no longer has, and the next request refetches it."""
        disk = self.t.disk
        if disk is None or (e.key, e.body_id) in self._damaged:
            return None
        raw = disk.get_body(e.key, e.body_id, e.body_size)
        if raw is None:
            return None
        body = raw if isinstance(raw, bytes) else _read_all(raw)
        if len(body) != e.body_size:
            return None
        expected = body_checksum(e.body_id)
        if expected is not None and zlib.crc32(body) != expected:
            self._found_damaged(e)
            return None
        return body


def _damaged_body(e: Entry) -> None:
    log.warning("stored body of %s does not match its checksum on disk (%d bytes, body %s): not "
                "served, the next request refetches it", e.key, e.body_size, e.body_id)


def _stays(current: tuple[Cached, ...], e: Entry, size: int, limit: int) -> bool:
    """Whether a body of ``e`` just read from disk goes back into the key's record (a key of
    one variant: the bodies of a key with several go back in records of their own): when the
    record lacks it and its bodies and this one stay within ``limit``."""
    held = 0
    lacks = False
    for c in current:
        if c.body is not None:
            held += len(c.body)
        elif c.entry.body_id == e.body_id:
            lacks = True
    return lacks and held + size <= limit


def _read_all(f: IO[bytes]) -> bytes:
    with f:
        return f.read()


def _opened_file(job: concurrent.futures.Future[bytes | IO[bytes] | None]) -> IO[bytes] | None:
    """The open file a finished ``_open_big_body`` job holds, if it holds one not yet closed."""
    if job.cancelled() or job.exception() is not None:
        return None
    opened = job.result()
    if opened is None or isinstance(opened, bytes) or opened.closed:
        return None
    return opened


def settle(job: asyncio.Future[list[Any]], waiters: list[asyncio.Future[Any]]) -> None:
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
