"""The machine's shared memory: a ring of records every process maps, its index, and the
directory of the keys the disk tier holds.

Why: with N worker processes, a per-process memory tier holds every hot body N times and a
fill made by one worker is a miss in the others until it reaches the disk (measured: two
workers kept 686 MB for a 256 MB budget each, and the other worker's first request for a key
just filled paid a SQLite read). One mapping shared by all of them is the budget of the whole
machine, holds a body once, and what one worker writes the others read at once. It lives in
a ``memfd`` (RAM, no file in the cache directory, gone when the last process holding it
exits), made by the process that owns the cache directory and handed to the workers.

Layout: a header page, the index (``BUCKET_SLOTS``-way buckets of (fingerprint, position)),
the directory of disk keys (buckets of fingerprints), then the ring.

**The ring** is a log of records written at ``head`` (a logical position that only grows;
the byte offset is ``position % capacity``). To make room, the writer takes the oldest
records at ``tail``: one that was read since it was written (readers ``mark`` it, once per
process) goes round again, written anew at the head; the others are dropped (CLOCK's second
chance: what is read stays, what is not goes first). A record that does not fit before the
end of the mapping starts the next lap; the gap left is a filler record (or, when too short
for a header, simply skipped by everyone alike). Record header (``_HEAD``)::

    pos u64 | fp u64 | size u32 | meta u32 | body u32 | key u16 | flags u8 | accessed u8 | crc u32 | spare u32

**Writes** hold the ring's lock: a POSIX record lock on a byte of the memfd (``lockf``: per
process, released by the kernel when a holder dies, even by SIGKILL) plus a thread lock (POSIX
locks do not exclude threads of one process). The lease table and the directory have locks of
their own (other bytes), so that none of the three waits for the others. A holder stopped or
hung holds up every process that asks for its lock; the supervisor's watchdog finds it in
``/proc/locks`` and kills it, not its waiters (``proxy.storage.lockwait``). A record is written
whole, its ``pos`` field last; then ``head`` moves past it; only then does the index point to
it. A record's ``pos`` is zeroed when it dies (dropped, replaced, deleted) and before its bytes
are overwritten. A key's index slot goes from its old record to its new one in one store, before
the old one dies; a record read since it was written that goes round the ring keeps its slot,
naming it dead, until its copy at the head is written and the slot names that. A write may
name the record it replaces (``put``'s ``expect``, checked under the lock): a process that
read a key's variants and merges its own in then never drops what another process wrote in
between (it reads again and merges anew).

**Reads** take no lock: a reader copies what it needs, then checks that the record's ``pos``
field still holds the record's position (a seqlock). A record overwritten meanwhile reads
as gone, never as another key's bytes. A lookup whose slot named a record that died while it
read it reads the bucket again: changed, it follows the slot; unchanged (a writer is between
killing that record and pointing the slot at its new copy: one going round), or changed
``FIND_TRIES`` times (the key rewritten faster than this reader reads), it looks once more
under the ring's lock, so that a key being written anew is never a miss. There a slot of its
fingerprint still naming a dead record is the leftover of a writer killed halfway (SIGKILL):
it is unlinked (and a write of the key takes such a slot), so its later lookups and misses do
not take the lock each time. This relies on stores becoming visible in program order, which
x86-64 guarantees (TSO); on other CPUs ``CHECK_BODIES`` makes readers check a body's CRC after
copying it as well.

**Words read without the lock** (a slot's fields, a record's ``pos``, the header's) are written
with one 8-byte store each, through ``words`` (the mapping as native u64s), never with
``struct.pack_into``: that zeroes its target before writing the value, and a reader in
between saw a key's slot name position 0 while it was pointed at the key's new record (a miss;
or, read as the dead record at the ring's first byte, an older copy, and every later check of
it passed while other records were written there). Native byte order throughout (``=``): the
arena lives in RAM, never on disk.

**The directory** holds a fingerprint per key the disk tier has, so a request for a key no
process ever stored costs no disk I/O: the owner fills it from the disk tier's index at
start (``ready`` once done: until then a miss asks the disk), and every commit and deletion
keeps it current. A bucket that overflowed is flagged: its keys are asked on disk.

Fingerprints are a keyed BLAKE2b (the key is random per arena, in its header): clients pick
URLs, and an unkeyed hash would let them aim many keys at one bucket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import platform
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

MAGIC = 0xCA_C4_E6_A7_E0_00_00_01
PAGE = 4096
BUCKET_SLOTS = 8
SLOT = 16  # index slot: fingerprint u64, position u64
DIR_SLOT = 8  # directory slot: fingerprint u64
RECORD_BYTES_PER_SLOT = 512  # index size: one slot per this many bytes of ring (8-way buckets)
DISK_BYTES_PER_SLOT = 4096  # directory size: one slot per this many bytes of disk budget
MIN_BUCKETS = 64
LEASE_BYTES = 128 + 512 * 8 * 40  # the cross-worker lease table (proxy.leases): 4,096 leases
FLAGS_PER_LOCK = 64  # records write-behind marks persisted per taking of the ring's lock
FIND_TRIES = 4  # readings of a key's bucket that changed under a lookup before it looks under the lock
MAX_SECOND_CHANCES = 16  # records read since written that go round again per write (bounds its work)

# The bytes of the memfd whose POSIX record locks guard the three regions (``_Locked``), and
# their names in the supervisor's log (``proxy.storage.lockwait``).
RING_LOCK, LEASE_LOCK, DIR_LOCK = 0, 1, 2
LOCK_NAMES = {RING_LOCK: "ring", LEASE_LOCK: "lease-table", DIR_LOCK: "directory"}

# Header fields (u64 each, at these offsets of page 0).
H_MAGIC, H_HEAD, H_TAIL, H_CAPACITY, H_ENTRIES, H_EVICTIONS, H_LOST, H_READY = (8 * i for i in range(8))
H_INDEX_BUCKETS, H_DIR_BUCKETS, H_DIR_ENTRIES, H_WRITES, H_BYTES = (8 * i for i in range(8, 13))
H_PROCESSES = 8 * 13  # the serving processes sharing the arena (at least 1)
# The disk shards' budget in force, as the owner last counted it beside the URL index
# (``DiskTier.count_index``); 0: none counted yet, the configured one holds (as an arena made
# before the field read it). What every process's storable limit follows (``Writer.limit``).
H_SHARD_BUDGET = 8 * 14
# Non-zero once the owner found the cache directory gone under the running processes (removed,
# moved away, another in its place: ``proxy.storage.upkeep``): every process then keeps to the
# shared memory (``proxy.storage.work.Tiers.disk``), and writes nothing there any more.
H_DISK_GONE = 8 * 15
# 1 while the owner finds the disk tier over cache.disk.size (``DiskTier.full``): bodies too big
# for memory are not written to disk by any process meanwhile (``Writer.finalize``).
H_DISK_FULL = 144  # (after H_SECRET's 16 bytes: the words before it are all taken)
H_SECRET = 128  # 16 bytes

_HEAD = struct.Struct("=QQIIIHBBII")
HEADER = _HEAD.size  # 40
F_PERSISTED = 1  # the disk tier has this record's content
CHANGED = -1  # ``Arena.put(expect=...)``: the key's record is not the one expected; nothing written
F_FILLER = 2  # not a record: the unused end of a lap
F_SOFT = 4  # soft-purged: its variants read as stale
# Copied by a write-behind batch not settled yet: dropped meanwhile, it is not counted lost by
# the drop (that batch may commit it; if it does not, write-behind counts it: ``untake``).
F_TAKEN = 8
# A Vary variant's body in a record of its own (``proxy.storage.memory``: ``body_key``), apart
# from its key's record; F_PERSISTED on it: the disk tier has that body.
F_BODY = 16
_Q = struct.Struct("=Q")
_QQ = struct.Struct("=QQ")  # a record's pos and fp
_COUNTS = struct.Struct("=QQQ")  # H_ENTRIES, H_EVICTIONS, H_LOST (adjacent)
_SIZES = struct.Struct("=QQ")  # H_WRITES, H_BYTES (adjacent)
FINGERPRINTS_KEPT = 1024  # keys whose fingerprint a process remembers (then forgets all at once)
_BUCKET = struct.Struct(f"={2 * BUCKET_SLOTS}Q")
_DIR_BUCKET = struct.Struct(f"={BUCKET_SLOTS}Q")
# Only x86-64 orders stores as the lock-free readers assume (see the module docstring).
CHECK_BODIES = platform.machine().lower() not in ("x86_64", "amd64")


def _align(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True, slots=True)
class Record:
    """A record as a reader copied it: its key, metadata and where its body lies."""

    pos: int
    key: str
    meta: bytes
    body_at: int  # byte offset of the body in the mapping
    body_len: int
    flags: int
    crc: int


class _Locked:
    """One of the arena's locks (``Arena.locked``, ``lease_locked``, ``dir_locked``): a threading
    lock (this process's threads), then a POSIX record lock on one byte of the memfd (the
    processes; the kernel drops it when its holder dies). A class rather than
    ``@contextlib.contextmanager``: 0.4 against 2.6 µs a use (``timeit``), and a fill takes
    locks three times (its lease, its record, the lease's release)."""

    __slots__ = ("_byte", "_fd", "_thread_lock")

    def __init__(self, fd: int, byte: int) -> None:
        self._fd = fd
        self._byte = byte
        self._thread_lock = threading.Lock()

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._byte)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._byte)
        finally:
            self._thread_lock.release()


class Arena:
    """One shared mapping: the ring, its index and the disk directory (see the module docstring).

    Open one with ``Arena.create`` (the owner) or ``Arena.attach`` (a worker, given the fd)."""

    def __init__(self, fd: int, size: int, *, owner_fd: bool) -> None:
        self.fd = fd
        self._owns_fd = owner_fd
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        # The mapping as u64s: ``words[at >> 3] = v`` is one 8-byte store (see the docstring).
        self.words = self.view.cast("Q")
        mm = self.mm
        if _Q.unpack_from(mm, H_MAGIC)[0] != MAGIC:
            raise ValueError("not a cachegate arena")
        self.capacity = int(_Q.unpack_from(mm, H_CAPACITY)[0])
        self.index_buckets = int(_Q.unpack_from(mm, H_INDEX_BUCKETS)[0])
        self.dir_buckets = int(_Q.unpack_from(mm, H_DIR_BUCKETS)[0])
        self._index_at = PAGE
        self._dir_flags_at = self._index_at + self.index_buckets * BUCKET_SLOTS * SLOT
        self._dir_at = _align(self._dir_flags_at + self.dir_buckets)
        self._lease_at = _align(self._dir_at + self.dir_buckets * BUCKET_SLOTS * DIR_SLOT)
        self._ring_at = _align(self._lease_at + LEASE_BYTES)
        self.size = size
        self._keyed = hashlib.blake2b(key=bytes(mm[H_SECRET:H_SECRET + 16]), digest_size=8)
        self._fps: dict[str, int] = {}  # ``fingerprint``'s last keys
        # Three locks, one per region, so that what guards one does not wait for another: a
        # fill's lease is taken and released beside other workers' record writes, and the
        # supervisor's directory updates beside both (measured: with one lock, a worker under
        # fill load spent 13 % of its samples waiting for it, py-spy).
        self._locked = _Locked(fd, RING_LOCK)  # the ring, its index and the header's counters
        self._lease_locked = _Locked(fd, LEASE_LOCK)  # the lease table (proxy.leases)
        self._dir_locked = _Locked(fd, DIR_LOCK)  # the directory of disk keys
        # What a write under the ring's lock changes in the header's statistics (entries, live
        # bytes, evictions, lost), summed and written once before the lock is let go
        # (``_tally``). Measured: read-modify-writing each counter as it changed was 9 header
        # reads and 9 writes per put of a full ring, a quarter of its 11.6 µs under the lock.
        self._entries = self._bytes = self._evictions = self._lost = 0
        self.closed = False

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def layout(capacity: int, disk_budget: int = 0) -> tuple[int, int, int]:
        """(index buckets, directory buckets, total bytes) for a ring of ``capacity`` bytes and a
        disk tier of ``disk_budget`` bytes (0: no directory)."""
        index_buckets = max(MIN_BUCKETS, capacity // RECORD_BYTES_PER_SLOT // BUCKET_SLOTS)
        dir_buckets = max(MIN_BUCKETS, disk_budget // DISK_BYTES_PER_SLOT // BUCKET_SLOTS) \
            if disk_budget else 0
        at = PAGE + index_buckets * BUCKET_SLOTS * SLOT
        at = _align(at + dir_buckets) + dir_buckets * BUCKET_SLOTS * DIR_SLOT
        return index_buckets, dir_buckets, _align(at) + _align(LEASE_BYTES) + _align(capacity)

    @classmethod
    def create(cls, capacity: int, disk_budget: int = 0, processes: int = 1) -> Arena:
        """A new, empty arena in a memfd (an unlinked temporary file where there is no memfd),
        for ``processes`` serving processes (what is shared per process, the spool room)."""
        index_buckets, dir_buckets, size = cls.layout(capacity, disk_budget)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("cachegate-arena", os.MFD_CLOEXEC)
        else:  # pragma: no cover (not Linux)
            import tempfile

            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, size)
            head = bytearray(PAGE)
            for at, value in ((H_MAGIC, MAGIC), (H_CAPACITY, _align(capacity)),
                              (H_INDEX_BUCKETS, index_buckets), (H_DIR_BUCKETS, dir_buckets),
                              (H_HEAD, 8), (H_TAIL, 8),  # 0: a dead record
                              (H_PROCESSES, max(1, processes))):
                _Q.pack_into(head, at, value)
            head[H_SECRET:H_SECRET + 16] = os.urandom(16)
            os.pwrite(fd, bytes(head), 0)
            return cls(fd, size, owner_fd=True)
        except BaseException:  # too big to map (ENOMEM): the memfd must not stay open
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> Arena:
        """The arena another process made (its memfd, inherited)."""
        return cls(fd, os.fstat(fd).st_size, owner_fd=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.words.release()
        self.view.release()
        with contextlib.suppress(BufferError):
            self.mm.close()
        if self._owns_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    # -- header ----------------------------------------------------------------------------

    def _get(self, at: int) -> int:
        return int(_Q.unpack_from(self.mm, at)[0])

    def _set(self, at: int, value: int) -> None:
        self.words[at >> 3] = value

    @property
    def entries(self) -> int:
        return self._get(H_ENTRIES)

    @property
    def processes(self) -> int:
        """How many serving processes share this arena (as its owner made it)."""
        return max(1, self._get(H_PROCESSES))

    @property
    def shard_budget(self) -> int:
        """The disk shards' budget the owner has in force (``H_SHARD_BUDGET``; 0: the configured
        one): one read of the shared header, no system call, no lock."""
        return int(_Q.unpack_from(self.mm, H_SHARD_BUDGET)[0])

    def set_shard_budget(self, budget: int) -> None:
        """The owner's, after each ``DiskTier.count_index``: the other processes follow it."""
        self._set(H_SHARD_BUDGET, budget)

    @property
    def disk_gone(self) -> bool:
        """Whether the owner found the cache directory gone (``H_DISK_GONE``): one read of the
        shared header, no system call, no lock."""
        return self.words[H_DISK_GONE >> 3] != 0

    def set_disk_gone(self) -> None:
        """The owner's, once (``proxy.storage.upkeep``): every process follows it."""
        self._set(H_DISK_GONE, 1)

    @property
    def disk_full(self) -> bool:
        """Whether the owner found the disk tier over cache.disk.size (``H_DISK_FULL``): one read
        of the shared header."""
        return bool(_Q.unpack_from(self.mm, H_DISK_FULL)[0])

    def set_disk_full(self, full: bool) -> None:
        """The owner's, after each ``DiskTier.weigh``."""
        self._set(H_DISK_FULL, int(full))

    @property
    def used(self) -> int:
        """Ring bytes between tail and head: what the records (live or not yet reclaimed) take."""
        return self._get(H_HEAD) - self._get(H_TAIL)

    @property
    def live_bytes(self) -> int:
        """Bytes of the records the index points to."""
        return self._get(H_BYTES)

    @property
    def evictions(self) -> int:
        return self._get(H_EVICTIONS)

    @property
    def lost(self) -> int:
        """Records dropped before the disk tier had them (the ring outran write-behind)."""
        return self._get(H_LOST)

    @property
    def head(self) -> int:
        return self._get(H_HEAD)

    @property
    def tail(self) -> int:
        return self._get(H_TAIL)

    # -- locking ---------------------------------------------------------------------------

    def locked(self) -> _Locked:
        """The lock of the ring and its index, for a ``with``: this process's threads, then the
        other processes."""
        return self._locked

    def lease_locked(self) -> _Locked:
        """The lock of the lease table (``proxy.leases``)."""
        return self._lease_locked

    def dir_locked(self) -> _Locked:
        """The lock of the directory of disk keys."""
        return self._dir_locked

    # -- keys ------------------------------------------------------------------------------

    def fingerprint(self, key: str) -> int:
        """The key's 64-bit keyed hash (its index and directory slot). The last keys' are
        remembered: a request looks its key up three or four times (the fast path, the engine,
        the read, the directory), and the hash is most of a lookup's cost (≈ 0.6 µs of blake2
        against ≈ 50 ns for a dict hit, ``timeit``)."""
        fp = self._fps.get(key)
        if fp is None:
            h = self._keyed.copy()
            h.update(key.encode("utf-8", "surrogatepass"))
            fp = int.from_bytes(h.digest(), "little") or 1
            if len(self._fps) >= FINGERPRINTS_KEPT:
                self._fps.clear()
            self._fps[key] = fp
        return fp

    def _bucket_at(self, fp: int) -> int:
        return self._index_at + (fp % self.index_buckets) * BUCKET_SLOTS * SLOT

    def _phys(self, pos: int) -> int:
        return self._ring_at + pos % self.capacity

    # -- reading (no lock) -----------------------------------------------------------------

    def alive(self, pos: int) -> bool:
        """Whether the record at ``pos`` is still there (checked after copying from it)."""
        return bool(_Q.unpack_from(self.mm, self._phys(pos))[0] == pos)

    def persisted(self, pos: int) -> bool:
        """Whether the record at ``pos`` is still there and the disk tier has its content."""
        return self.alive(pos) and bool(self._flags_at(pos) & F_PERSISTED)

    def find(self, key: str, fp: int | None = None) -> Record | None:
        """The live record of ``key``, copied (its body stays in place: ``body_at``), or None."""
        if fp is None:
            fp = self._fps.get(key) or self.fingerprint(key)  # (``fingerprint``'s, one call fewer)
        bucket = self._index_at + (fp % self.index_buckets) * _BUCKET.size  # (``_bucket_at``, inline)
        slots = _BUCKET.unpack_from(self.mm, bucket)
        if fp not in slots:  # (in C) a miss, most often: a fill looks its key up four times
            return None
        for _ in range(FIND_TRIES):
            for i in range(0, 2 * BUCKET_SLOTS, 2):
                if slots[i] == fp:
                    found = self.read(slots[i + 1], key)
                    if found is not None:
                        return found
            # The record the slot named died while it was read. A writer that replaced it has
            # pointed the slot at the new one first (``_link``): the bucket read again finds it.
            again = _BUCKET.unpack_from(self.mm, bucket)
            if again == slots:
                break  # a writer is between killing it and pointing the slot on (see below)
            if fp not in again:
                return None  # dropped or deleted since
            slots = again
        # The slot still names a record that died (one going round the ring: its copy at the
        # head is not written yet; a bucket's oldest being dropped), or the key was rewritten
        # each time this reader read it: once more under the lock, where no writer is halfway.
        # (Rare: a hit and a plain miss never come here.)
        with self._locked:
            return self._find_locked(key, fp)

    def _find_locked(self, key: str, fp: int) -> Record | None:
        """``find``, for a caller holding the ring's lock (nothing changes under it). A slot of
        this fingerprint naming a record that is not there is a writer's leftover (one killed
        between taking a record going round out of the ring and pointing its slot at the copy,
        or between dropping a full bucket's oldest and pointing the slot at the new record):
        under the lock no writer is halfway, so it is unlinked here, else every lookup of the
        key would look again under the lock until the bucket overflowed."""
        at = self._bucket_at(fp)
        slots = _BUCKET.unpack_from(self.mm, at)
        for i in range(0, 2 * BUCKET_SLOTS, 2):
            if slots[i] == fp:
                found = self.read(slots[i + 1], key)
                if found is not None:
                    return found
                if self._stale(fp, slots[i + 1]):
                    self._unlink_slot(at + i * 8, self._dead_size(fp, slots[i + 1]))
                    self._tally()
        return None

    def _stale(self, fp: int, pos: int) -> bool:
        """Whether the record a slot of ``fp`` names at ``pos`` is not there (dead, or another
        fingerprint's): under the lock, a leftover of a writer killed halfway."""
        rpos, rfp = _QQ.unpack_from(self.mm, self._phys(pos))
        return rpos != pos or rfp != fp or not pos

    def _dead_size(self, fp: int, pos: int) -> int:
        """The size of the dead record of ``fp`` at ``pos`` as the live bytes counted it, if its
        header is still its own (else 0: the counters are statistics, ``_tally``)."""
        return self._size_at(pos) if _QQ.unpack_from(self.mm, self._phys(pos))[1] == fp else 0

    def find_copy(self, key: str) -> tuple[Record, bytes] | None:
        """``find``, and a copy of the record's body taken at once: bytes no later write changes.
        A record replaced while it was copied is looked up again (the key's new one is there),
        past ``FIND_TRIES`` copies under the lock. For a reader whose view of a body was
        overwritten: a view of the new record could be in its turn (``MemoryTier.get_copied``)."""
        fp = self._fps.get(key) or self.fingerprint(key)
        for _ in range(FIND_TRIES):
            found = self.find(key, fp)
            if found is None:
                return None
            body = self.body(found)
            if body is not None:
                return found, body
        with self._locked:
            found = self._find_locked(key, fp)
            return None if found is None else (found, self.mm[found.body_at:found.body_at + found.body_len])

    def read(self, pos: int, key: str | None = None) -> Record | None:
        """The record at ``pos`` (None when it is gone, damaged, or another key's)."""
        mm = self.mm
        at = self._phys(pos)
        try:
            rpos, _, size, meta_len, body_len, key_len, flags, _, crc, _ = _HEAD.unpack_from(mm, at)
        except struct.error:
            return None
        # (No record is at position 0: it is what a dead record's ``pos`` holds.)
        if rpos != pos or not pos or flags & F_FILLER or HEADER + key_len + meta_len + body_len > size:
            return None
        start = at + HEADER
        raw = mm[start:start + key_len + meta_len]
        if zlib.crc32(raw) != crc or not self.alive(pos):
            return None
        try:
            rkey = raw[:key_len].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
        if key is not None and rkey != key:
            return None
        return Record(pos, rkey, raw[key_len:], start + key_len + meta_len, body_len, flags, crc)

    def body(self, record: Record) -> bytes | None:
        """A copy of the record's body; None when it was overwritten while being copied."""
        data = self.mm[record.body_at:record.body_at + record.body_len]
        return data if self.alive(record.pos) else None

    def scan(self, start: int = 0, end: int | None = None, skip: int = 0) -> Iterator[Record]:
        """The live records from ``start`` (a position; 0: the tail) to ``end`` (default: the
        head when the scan began), oldest first, but those with any of the ``skip`` flags (not
        read at all). Records written or dropped meanwhile may be missed or skipped; each one
        yielded was alive when it was copied."""
        for pos in self._live(start, end, skip):
            found = self.read(pos)
            if found is not None:
                yield found

    def walk(self, start: int = 0, end: int | None = None, skip: int = 0) -> Iterator[Record | None]:
        """``scan``, with a None for each record passed over (one with a ``skip`` flag, or gone
        when read), so that a caller may let the event loop run between any two items. Why:
        the records ``scan`` skips are not yielded, and a pass that skips nearly all (those
        written to disk) held the loop for 0.17 s per 250,000 records before its first item."""
        for pos in self._live(start, end, skip, passed=True):
            yield self.read(pos) if pos else None

    def count(self, start: int = 0, end: int | None = None, skip: int = 0) -> int:
        """How many records ``scan`` would yield, read from their headers only (no copy)."""
        return sum(1 for _ in self._live(start, end, skip))

    def _live(self, start: int, end: int | None, skip: int, passed: bool = False) -> Iterator[int]:
        """The positions of the live records from ``start`` to ``end`` but those with any of
        the ``skip`` flags (``scan``); with ``passed``, a 0 for each of those (``walk``)."""
        mm = self.mm
        pos = max(start, self._get(H_TAIL))
        stop = self._get(H_HEAD) if end is None else end
        while pos < stop:
            pos = self._lap(pos)
            if pos >= stop:
                break
            at = self._phys(pos)
            rpos, _, size, _, _, _, flags, _, _, _ = _HEAD.unpack_from(mm, at)
            tail = self._get(H_TAIL)
            if pos < tail:  # overwritten under us: go on from the tail
                pos = tail
                continue
            if size < HEADER or size % 8:
                return  # unreadable (should not happen): stop rather than loop
            if rpos == pos and not flags & (skip | F_FILLER):  # (``read`` returns nothing for a filler)
                yield pos
            elif passed:
                yield 0
            pos += size

    def _lap(self, pos: int) -> int:
        """``pos``, or the start of the next lap when no record header fits before the end."""
        if self.capacity - pos % self.capacity < HEADER:
            return pos + self.capacity - pos % self.capacity
        return pos

    # -- writing (under the lock) ------------------------------------------------------------

    def put(self, key: str, meta: bytes, body: bytes | memoryview | Sequence[bytes | memoryview] = b"",
            flags: int = 0, fp: int | None = None, expect: int | None = None) -> int:
        """Write a record for ``key`` (replacing the one it had); its position, or 0 when it can
        never fit (more than half the ring). ``expect``: only while the key's record is the one
        at that position (0: while the key has none), checked under the lock, else ``CHANGED``
        and nothing written. Why: a process that read the key's variants and writes them back
        with its own merged in must not replace a record another process wrote in between (that
        one's variant would be lost, its body too when not on disk yet), and a promotion from
        disk (0) must not replace a fill written since it looked (newer, maybe not on disk yet)."""
        parts = (body,) if isinstance(body, (bytes, memoryview)) else body
        # Each length taken once, in C (a fill's put took eleven ``len`` calls and a generator's
        # steps: ``scripts/bench-calls``).
        lengths = [*map(len, parts)]
        body_len = sum(lengths)
        kb = key.encode("utf-8", "surrogatepass")
        key_len, meta_len = len(kb), len(meta)
        size = _align(HEADER + key_len + meta_len + body_len)
        if size > self.capacity // 2 or key_len > 0xFFFF:
            return 0
        if fp is None:
            fp = self._fps.get(key) or self.fingerprint(key)  # (``fingerprint``'s, one call fewer)
        crc = zlib.crc32(meta, zlib.crc32(kb))
        with self._locked:  # (``locked()``)
            if expect is not None:
                found = self._find_locked(key, fp)
                if (0 if found is None else found.pos) != expect:
                    return CHANGED
            written = 0
            try:
                pos = self._reserve(size)
                at = self._phys(pos)
                mm = self.mm
                _HEAD.pack_into(mm, at, 0, fp, size, meta_len, body_len, key_len, flags, 0, crc, 0)
                off = at + HEADER
                mm[off:off + key_len] = kb
                off += key_len
                mm[off:off + meta_len] = meta
                off += meta_len
                for p, n in zip(parts, lengths, strict=True):
                    mm[off:off + n] = p
                    off += n
                self.words[at >> 3] = pos  # complete: readers may take it from now on
                self._set(H_HEAD, pos + size)
                self._link(key, fp, pos, size)
                written = 1
            finally:
                self._tally(written)  # what room-making changed, even if the write failed after
        return pos

    def _tally(self, writes: int = 0) -> None:
        """Add the statistics a write summed up to the header's counters (under the ring's lock,
        before it is let go). A process killed in the middle of a write leaves that write's
        share uncounted: the counters are statistics (entries, live bytes, evictions, lost),
        never read to decide anything, and are kept from going below zero."""
        mm, words = self.mm, self.words
        if self._entries or self._evictions or self._lost:
            entries, evictions, lost = _COUNTS.unpack_from(mm, H_ENTRIES)
            at = H_ENTRIES >> 3  # (H_EVICTIONS and H_LOST follow: a word each, as ``_set``)
            words[at] = max(0, entries + self._entries)
            words[at + 1] = evictions + self._evictions
            words[at + 2] = lost + self._lost
            self._entries = self._evictions = self._lost = 0
        if writes or self._bytes:
            done, live = _SIZES.unpack_from(mm, H_WRITES)
            words[H_WRITES >> 3] = done + writes
            words[H_BYTES >> 3] = max(0, live + self._bytes)
            self._bytes = 0

    def _reserve(self, size: int, chances: int = MAX_SECOND_CHANCES) -> int:
        """Make room for ``size`` bytes at the head; where they go. Records read since they were
        written that had to make room go round again first (at most ``chances`` of them)."""
        mm = self.mm
        head = self._get(H_HEAD)
        if self.capacity - head % self.capacity < size:
            # Not before the end of the mapping: the rest of this lap is a filler.
            gap = self.capacity - head % self.capacity
            self._make_room(head, gap, 0)
            if gap >= HEADER:
                at = self._phys(head)
                _HEAD.pack_into(mm, at, 0, 0, gap, 0, 0, 0, F_FILLER, 0, 0, 0)
                self.words[at >> 3] = head
            head += gap
            self._set(H_HEAD, head)
        survivors = self._make_room(head, size, chances)
        if not survivors:
            return head
        words = self.words
        for key, fp, raw, old in survivors:  # round again, without a second chance this lap
            pos = self._reserve(len(raw), 0)
            at = self._phys(pos)
            words[at >> 3] = 0  # (its ``pos`` last, as any record's)
            mm[at + 8:at + len(raw)] = memoryview(raw)[8:]
            mm[at + 30] &= ~F_TAKEN  # (a new record: no batch has taken it)
            mm[at + 31] = 0
            words[at >> 3] = pos
            self._set(H_HEAD, pos + len(raw))
            # Its slot still names the copy that died at the tail (a reader finding it so looks
            # again under the lock): now the new one. (Out of the index meanwhile, the key was a
            # miss in the other processes, a fill from the origin.)
            if not self._repoint(fp, old, pos):  # pragma: no cover (nothing else moves a slot meanwhile)
                self._link(key, fp, pos, len(raw))
        return self._reserve(size, 0)

    def _make_room(self, head: int, size: int, chances: int) -> list[tuple[str, int, bytes, int]]:
        """Drop the oldest records until ``size`` bytes at ``head`` are free. Up to ``chances``
        of them that were read since they were written are taken out instead, to be written
        again: (key, fingerprint, bytes, position) each; they die here, and their slots keep
        naming them until ``_reserve`` points them at their copies."""
        mm = self.mm
        tail = self._get(H_TAIL)
        survivors: list[tuple[str, int, bytes, int]] = []
        while head + size - tail > self.capacity:
            tail = self._lap(tail)
            if head + size - tail <= self.capacity:
                break
            at = self._phys(tail)
            rpos, fp, rsize, _, _, key_len, flags, accessed, _, _ = _HEAD.unpack_from(mm, at)
            slot = self._slot_of(fp, tail) if rpos == tail and not flags & F_FILLER else None
            if slot is not None:
                if accessed and len(survivors) < chances:
                    key = bytes(mm[at + HEADER:at + HEADER + key_len]).decode("utf-8", "surrogatepass")
                    survivors.append((key, fp, mm[at:at + rsize], tail))
                else:
                    self._unlink_slot(slot, rsize)
                    self._evictions += 1
                    # (a body record: its key's record counts)
                    if not flags & (F_PERSISTED | F_TAKEN | F_BODY):
                        self._lost += 1
            if rpos == tail:
                self.words[at >> 3] = 0
            if rsize < HEADER or rsize % 8:  # pragma: no cover (a damaged ring): start it afresh
                self._reset()
                return []
            tail += rsize
            self._set(H_TAIL, tail)
        return survivors

    def mark(self, pos: int) -> None:
        """Note that the record at ``pos`` was read: when it reaches the tail, it goes round the
        ring once more instead of out (readers mark a record once, not on every read). Written
        under the lock, if the record is still there: another process may have reused its place
        since the reader looked, and the byte would land in another record's body. A record
        some process marked already costs no lock (a lock per hit of a key read from the ring
        anew cost ``keys-1k`` 1.18x the CPU per request, side by side)."""
        at = self._phys(pos)
        mm = self.mm
        if mm[at + 31] and _Q.unpack_from(mm, at)[0] == pos:
            return
        with self.locked():
            if _Q.unpack_from(mm, at)[0] == pos:
                mm[at + 31] = 1

    def body_at(self, pos: int, key_len: int, meta_len: int) -> int:
        """Where the body of the record at ``pos`` starts in the mapping (its key and metadata
        ``key_len`` and ``meta_len`` bytes long, as written)."""
        return self._phys(pos) + HEADER + key_len + meta_len

    def _reset(self) -> None:
        """Empty the ring and its index: every record dies (readers holding one see it gone)."""
        head = self._get(H_HEAD)
        mm = self.mm
        self.mm[self._index_at:self._dir_flags_at] = bytes(self._dir_flags_at - self._index_at)
        pos = self._get(H_TAIL)
        while pos < head:
            pos = self._lap(pos)
            if pos >= head:
                break
            at = self._phys(pos)
            size = _HEAD.unpack_from(mm, at)[2]
            if size < HEADER or size % 8:  # damage: no walking on, wipe the ring's headers
                mm[self._ring_at:self._ring_at + self.capacity] = bytes(self.capacity)
                break
            self.words[at >> 3] = 0
            pos += size
        self._set(H_TAIL, head)
        self._set(H_ENTRIES, 0)
        self._set(H_BYTES, 0)
        self._entries = self._bytes = 0

    def _slot_of(self, fp: int, pos: int) -> int | None:
        at = self._bucket_at(fp)
        slots = _BUCKET.unpack_from(self.mm, at)
        for i in range(0, 2 * BUCKET_SLOTS, 2):
            if slots[i] == fp and slots[i + 1] == pos:
                return at + i * 8
        return None

    def _repoint(self, fp: int, old: int, new: int) -> bool:
        """Point the slot naming ``old`` at ``new`` (one store); whether there was one."""
        slot = self._slot_of(fp, old)
        if slot is None:
            return False
        self.words[(slot >> 3) + 1] = new
        return True

    def _unlink(self, fp: int, pos: int, size: int) -> None:
        slot = self._slot_of(fp, pos)
        if slot is not None:
            self._unlink_slot(slot, size)

    def _unlink_slot(self, slot: int, size: int) -> None:
        self.words[slot >> 3] = 0  # the fingerprint first: no reader then takes its position
        self.words[(slot >> 3) + 1] = 0
        self._entries -= 1
        self._bytes -= size

    def _link(self, key: str, fp: int, pos: int, size: int) -> None:
        """Point the index at the new record ``pos`` of ``key``: in place of the key's older
        record (which dies), else of a slot of its fingerprint naming a record that is not there
        (a writer's leftover: ``_find_locked``), else in a free slot, else in place of the
        bucket's oldest."""
        words = self.words
        at = self._bucket_at(fp)
        slots = _BUCKET.unpack_from(self.mm, at)
        free = oldest = stale = -1
        for i in range(0, 2 * BUCKET_SLOTS, 2):
            sfp, spos = slots[i], slots[i + 1]
            if sfp == fp and spos != pos:
                if self._key_at(spos) == key:
                    # The slot first (one store), then the old record dies: killed first, a
                    # reader in another process that came between found the key gone (a miss
                    # for a key being replaced).
                    words[(at >> 3) + i + 1] = pos
                    self._bytes += size - self._size_at(spos)
                    self._kill(spos)
                    return
                if stale < 0 and self._stale(fp, spos):
                    stale = i
            if sfp == 0:
                if free < 0:
                    free = i
            elif oldest < 0 or spos < slots[oldest + 1]:
                oldest = i
        if stale >= 0:  # (counted in ``entries`` already)
            words[(at >> 3) + stale + 1] = pos
            self._bytes += size - self._dead_size(fp, slots[stale + 1])
            return
        if free < 0:  # a full bucket: its oldest record leaves memory early
            victim = slots[oldest + 1]
            self._bytes -= self._size_at(victim)
            self._evictions += 1
            if not self._flags_at(victim) & (F_PERSISTED | F_TAKEN | F_BODY):
                self._lost += 1
            self._kill(victim)
            self._entries -= 1
            free = oldest
        words[(at >> 3) + free + 1] = pos  # its position first: a reader that sees the fingerprint
        words[(at >> 3) + free] = fp  # finds the record (a victim's key finds another key's)
        self._entries += 1
        self._bytes += size

    def _key_at(self, pos: int) -> str | None:
        at = self._phys(pos)
        rpos, _, _, _, _, key_len, *_ = _HEAD.unpack_from(self.mm, at)
        if rpos != pos:
            return None
        return bytes(self.mm[at + HEADER:at + HEADER + key_len]).decode("utf-8", "surrogatepass")

    def _size_at(self, pos: int) -> int:
        return int(_HEAD.unpack_from(self.mm, self._phys(pos))[2])

    def _flags_at(self, pos: int) -> int:
        return int(self.mm[self._phys(pos) + 30])

    def _kill(self, pos: int) -> None:
        at = self._phys(pos)
        if _Q.unpack_from(self.mm, at)[0] == pos:
            self.words[at >> 3] = 0

    def delete(self, key: str, pos: int | None = None) -> bool:
        """Drop ``key``'s record (only the one at ``pos``, when given); whether one was dropped."""
        fp = self.fingerprint(key)
        with self.locked():
            found = self._find_locked(key, fp) if pos is None else self.read(pos, key)
            if found is None:
                return False
            try:
                self._unlink(fp, found.pos, self._size_at(found.pos))
                self._kill(found.pos)
            finally:
                self._tally()
            return True

    def set_flags_many(self, positions: Iterable[int], add: int) -> list[int]:
        """Set flag bits of the live records at ``positions``, ``FLAGS_PER_LOCK`` of them per
        taking of the lock (write-behind marks whole batches: a lock per record cost ≈ 6 % of
        its thread, py-spy; one lock per batch held it for thousands of records while every
        worker's fill waited to write its own); the positions of those still there."""
        mm = self.mm
        done: list[int] = []
        todo = list(positions)
        for start in range(0, len(todo), FLAGS_PER_LOCK):
            with self.locked():
                for pos in todo[start:start + FLAGS_PER_LOCK]:
                    at = self._phys(pos)
                    if _Q.unpack_from(mm, at)[0] == pos:
                        mm[at + 30] |= add
                        done.append(pos)
        return done

    def take(self, positions: Iterable[int]) -> list[int]:
        """Write-behind copies these records for a batch: ``F_TAKEN`` on those still there
        (which). Why: a record the ring dropped after a batch copied it was counted lost, though
        the batch committed it (1,073 counted where 428 were misses after the restart)."""
        return self.set_flags_many(positions, F_TAKEN)

    def untake(self, records: Sequence[tuple[int, str]]) -> int:
        """A batch did not commit these taken records ((position, key) each): ``F_TAKEN`` off
        those still there (a drop counts them again), and those the ring dropped meanwhile
        counted lost (but where the key has a newer record: that one is committed instead);
        how many."""
        mm = self.mm
        lost = 0
        for start in range(0, len(records), FLAGS_PER_LOCK):
            with self.locked():
                for pos, key in records[start:start + FLAGS_PER_LOCK]:
                    at = self._phys(pos)
                    if _Q.unpack_from(mm, at)[0] == pos:
                        mm[at + 30] &= ~F_TAKEN
                        continue
                    found = self._find_locked(key, self.fingerprint(key))
                    if found is None or found.pos < pos:
                        self._lost += 1
                        lost += 1
                self._tally()
        return lost

    def clear(self) -> int:
        """Drop every record; how many there were."""
        with self.locked():
            n = self.entries
            self._reset()
            return n

    @property
    def lease_region(self) -> tuple[int, int]:
        """(offset, size) of the region the cross-worker lease table lives in (``proxy.leases``)."""
        return self._lease_at, LEASE_BYTES

    # -- the directory of disk keys ------------------------------------------------------------

    @property
    def directory(self) -> bool:
        """Whether this arena keeps a directory (a disk tier exists)."""
        return self.dir_buckets > 0

    @property
    def directory_ready(self) -> bool:
        return self.dir_buckets > 0 and self._get(H_READY) == 1

    def set_directory_ready(self, ready: bool = True) -> None:
        self._set(H_READY, 1 if ready else 0)

    @property
    def directory_entries(self) -> int:
        return self._get(H_DIR_ENTRIES)

    def on_disk(self, key: str, fp: int | None = None) -> bool | None:
        """Whether the disk tier holds ``key``: True, False, or None (not known: ask the disk)."""
        if not self.dir_buckets or _Q.unpack_from(self.mm, H_READY)[0] != 1:  # (``directory_ready``)
            return None
        if fp is None:
            fp = self._fps.get(key) or self.fingerprint(key)
        b = fp % self.dir_buckets
        if fp in _DIR_BUCKET.unpack_from(self.mm, self._dir_at + b * BUCKET_SLOTS * DIR_SLOT):
            return True
        return None if self.mm[self._dir_flags_at + b] else False

    def disk_add(self, keys: list[str]) -> None:
        """Note keys the disk tier now holds."""
        if not self.dir_buckets or not keys:
            return
        fps = [self.fingerprint(k) for k in keys]
        mm = self.mm
        with self.dir_locked():
            added = 0
            for fp in fps:
                b = fp % self.dir_buckets
                at = self._dir_at + b * BUCKET_SLOTS * DIR_SLOT
                slots = _DIR_BUCKET.unpack_from(mm, at)
                if fp in slots:
                    continue
                try:
                    i = slots.index(0)
                except ValueError:
                    mm[self._dir_flags_at + b] = 1  # overflowed: its keys are asked on disk
                    continue
                self.words[(at >> 3) + i] = fp
                added += 1
            self._set(H_DIR_ENTRIES, self._get(H_DIR_ENTRIES) + added)

    def disk_remove(self, keys: list[str]) -> None:
        """Note keys the disk tier no longer holds."""
        if not self.dir_buckets or not keys:
            return
        fps = [self.fingerprint(k) for k in keys]
        mm = self.mm
        with self.dir_locked():
            removed = 0
            for fp in fps:
                at = self._dir_at + (fp % self.dir_buckets) * BUCKET_SLOTS * DIR_SLOT
                slots = _DIR_BUCKET.unpack_from(mm, at)
                if fp in slots:
                    self.words[(at >> 3) + slots.index(fp)] = 0
                    removed += 1
            self._set(H_DIR_ENTRIES, self._get(H_DIR_ENTRIES) - removed)

    def disk_clear(self) -> None:
        if not self.dir_buckets:
            return
        with self.dir_locked():
            self.mm[self._dir_flags_at:self._lease_at] = bytes(self._lease_at - self._dir_flags_at)
            self._set(H_DIR_ENTRIES, 0)
