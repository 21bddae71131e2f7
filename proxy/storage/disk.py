"""The disk tier: diskcache shards shared by every worker process.

This is the only module that imports diskcache. Every method blocks; callers run
them in a thread executor, but for the reads a worker makes in its event loop while the page
cache answers them quickly (``proxy.storage.reads.ReadPlace``; ``reads_are_plain``).

Layout: ``cache.disk.shards`` ``diskcache.Cache`` databases in ``<path>/000``,
``<path>/001``, ... (the layout of a ``FanoutCache``), each with
``0.9 * size / shards`` bytes of budget (the index and SQLite's journal files
live in the rest) and the configured eviction policy. Unlike
``FanoutCache``, a key's records are placed by our own stable hash of the
*primary key*, so a key's metadata and its bodies live in the same shard: a
commit of a small body is one SQLite transaction (body and metadata together,
atomic), and a purge batch is one transaction per shard.
The count is recorded in ``<path>/shards``; a start with another count moves the entries
whose shard changed first (``DiskTier.relayout``). A directory another program wrote since our
last clean stop (``STAMP_FILE``) has its placement checked (``foreign_placement``); the key scheme
its entries were stored under is recorded in ``<path>/keys`` (``KEY_SCHEME``), trusted only when
the stamp shows no other program wrote the directory since our last run (``unknown_writer``).

Records in a shard:

- ``m:<key>``: the metadata of every Vary variant of the key (a compact JSON
  array per variant, see ``entry``); rewritten under the shard lock, so two
  processes storing two variants of one key keep both;
- ``b:<body id>``: one body; diskcache keeps values of 32 KiB and more as files,
  read back as open files so big bodies stream instead of loading whole.

Facts of diskcache respected here:

- keys are ``str`` and values ``bytes`` or files, never pickles;
- a write can time out on the shard lock (``diskcache.Timeout``): it is caught,
  counted in ``failed_writes`` and reported as False, never raised to a client;
- eviction is ours (``_cull``: whole entries, only until the shard is under its budget, never
  the entries just written while others are left, in rounds of at most ``CULL_BATCH`` rows),
  not diskcache's ``cull`` (10 rows a pass whatever their size); an object bigger than a
  shard's budget would still be evicted as soon as it is stored, after everything else:
  ``max_body`` is half a shard's budget in force (lowered while the URL index takes more than
  its share: ``count_index``, followed by every process: ``follow_budget``), and bigger bodies
  are not stored on disk at all; what a write adds counts its metadata as written and its index
  rows (``_meta_cost``), and the entries a cull takes leave the index at once (``on_evicted``);
- the owner holds the whole directory (shards, index, journals) against ``cache.disk.size``
  (``weigh``): past it by more than SIZE_SLACK, new entries stay off the disk until culls, aimed
  at the whole excess (``cull_over``), bring it back within;
- ``least-recently-used`` turns every read into a write; the memory tier keeps
  the recency of hot objects, so only memory misses reach the disk;
- a big body is written before its metadata (outside the lock, since copying it
  takes time), so a crash in between leaves an orphan body, never metadata that
  points at a missing or partial body. The writer notes the body in its intent
  log first (``spool.SpoolDir.intend``); ``sweep_intents`` removes what a dead
  process left pending, ``sweep_stray_files`` the files diskcache wrote but never
  committed, and ``sweep_orphans`` is the full (slow) repair;
- diskcache removes the file of a value a write replaced or deleted when its *own* transaction
  block ends, which inside ``Cache.transact`` is before the outer COMMIT: a kill -9 (or a
  rollback) in between left a row whose file was gone. ``_Disk`` holds those removals until
  the outer transaction has committed (``_transaction``) and forgets them when it rolled back.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import IO, Any, TypeVar

import diskcache

from proxy.logs import RepeatedFailure
from proxy.policy.messages import CLOCK_SLACK
from proxy.room import (
    SQLITE_CANTOPEN,
    SQLITE_READONLY,
    FilesystemFull,
    NotWritable,
    filesystem_full,
    human_size,
    no_room,
)
from proxy.settings import (  # the budget split is what cache.disk.size means
    SIZE_SLACK,
    DiskEviction,
    shard_budget,
    shard_budget_beside,
)
from proxy.storage.entry import Entry, body_refs, decode_variants, encode_variants, refs_and_seq
from proxy.storage.failures import SETTLE

log = logging.getLogger("cachegate.storage")

INLINE_LIMIT = 32 * 1024  # diskcache's disk_min_file_size: smaller values live in the database
SQLITE_MMAP = 0  # bytes of each database SQLite memory-maps per connection (diskcache: 64 MB)
SQLITE_CACHE_PAGES = 256  # SQLite's page cache per connection: 1 MB (diskcache: 8192 pages, 32 MB)
ORPHAN_AGE = 600.0  # seconds: an unreferenced body or file younger than this may be a write in progress

# The layout of diskcache's ``Cache`` table (5.6), into which ``_insert_new`` writes new rows
# itself, as ``Cache.set`` would (``_row_insert``: the table's triggers keep diskcache's count
# and size). Checked per shard when it opens; a shard with another layout goes through ``set``.
CACHE_COLUMNS = ("rowid", "key", "raw", "store_time", "expire_time", "access_time", "access_count",
                 "tag", "size", "mode", "filename", "value")
_INSERT = ("INSERT OR IGNORE INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
           " tag, size, mode, filename, value) VALUES (?, ?, ?, NULL, ?, 0, NULL, 0, ?, NULL, ?)")
# ``present``: the live metadata rows among some names, as ``Cache.__contains__`` asks for one
# (str keys are stored raw). PRESENT_CHUNK stays under SQLite's bound-parameter limit.
_PRESENT = ("SELECT key FROM Cache WHERE raw = 1 AND (expire_time IS NULL OR expire_time > ?)"
            " AND key IN ({})")
PRESENT_CHUNK = 500
# The highest commit sequence number (``UrlTagIndex``) each shard holds, raised in the same
# transaction as every commit: at start the owner compares it with the index's, which must be
# at least as high (an index made anew, or come back older, lists none of the entries past
# it), in one read per shard (``DiskTier.high_seq``).
_SEQ_TABLE = ("CREATE TABLE IF NOT EXISTS cachegate_seq (id INTEGER PRIMARY KEY CHECK (id = 0),"
              " seq INTEGER NOT NULL)")
_SEQ_RAISE = ("INSERT INTO cachegate_seq (id, seq) VALUES (0, ?)"
              " ON CONFLICT(id) DO UPDATE SET seq = max(seq, excluded.seq)")

T = TypeVar("T")
Merge = Callable[[tuple[Entry, ...]], tuple[tuple[Entry, ...], list[str]]]


def wal_limit(budget: int) -> int:
    """How big a database's write-ahead log may grow: 1/32 of its budget, 64 KiB to 4 MiB."""
    return min(max(budget // 32, 64 * 1024), 4 << 20)


class _Disk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's ``Disk`` whose file removals wait, inside ``_transaction``, for the COMMIT,
    and which notes the files it writes, so that a write that fails takes them back.

    A removal held and then dropped by a rollback leaves nothing behind (the row still refers to
    the file); one held and then lost to a kill -9 after the COMMIT leaves a file no row refers
    to, which ``sweep_stray_files`` removes, as it does a crash inside ``set``.

    Why note the files written: diskcache writes a big value's file before its row, and leaves
    the file where the write fails after it (a full filesystem: the row's INSERT, a later
    statement of the batch, the COMMIT) or while writing it (a truncated file). Such a file is
    outside the disk budget and keeps a full filesystem full; the sweeps would take it only
    after ``ORPHAN_AGE``, and a retried batch writes new files beside it."""

    def __init__(self, directory: str, **settings: Any) -> None:
        super().__init__(directory, **settings)
        self._held = threading.local()  # one diskcache connection per thread: one hold per thread

    def remove(self, file_path: str) -> None:
        held: list[str] | None = getattr(self._held, "files", None)
        if held is None:
            super().remove(file_path)
        else:
            held.append(file_path)

    def filename(self, key: Any = diskcache.core.UNKNOWN, value: Any = diskcache.core.UNKNOWN
                 ) -> tuple[str, str]:
        name, full_path = super().filename(key, value)
        self._held.naming = name  # (for ``store``: the file it was writing when it failed)
        return name, full_path

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[Any, ...]:
        self._held.naming = None
        try:
            stored: tuple[Any, ...] = super().store(value, read, key=key)
        except BaseException:
            if self._held.naming is not None:  # a file half written (ENOSPC): never referred to
                super().remove(self._held.naming)
            raise
        written: list[str] | None = getattr(self._held, "written", None)
        if written is not None and stored[2] is not None:
            written.append(stored[2])
        return stored

    @contextlib.contextmanager
    def holding(self) -> Iterator[list[str] | None]:
        """Hold this thread's removals; the caller removes them (``release``) after its COMMIT.
        Inside another hold (a nested ``_transaction``): None, the outer one's COMMIT releases
        them (diskcache nests transactions the same way)."""
        if getattr(self._held, "files", None) is not None:
            yield None
            return
        files: list[str] = []
        self._held.files = files
        try:
            yield files
        finally:
            self._held.files = None

    @contextlib.contextmanager
    def taking_back(self) -> Iterator[None]:
        """Remove the files this thread writes inside the block if the block raises: no row
        refers to them then (its transaction rolled back, or the write never got to its row).
        Inside another such block: the outer one takes them back."""
        if getattr(self._held, "written", None) is not None:
            yield
            return
        written: list[str] = []
        self._held.written = written
        try:
            yield
        except BaseException:
            self._held.written = None
            self.release(written)
            raise
        finally:
            self._held.written = None

    def release(self, files: list[str]) -> None:
        for f in files:
            super().remove(f)


def _roll_back(shard: diskcache.Cache) -> None:
    """End a transaction a failed COMMIT left open (SQLite keeps it open after SQLITE_BUSY, and
    may after SQLITE_FULL): nothing of it was committed, and nothing of it may be later."""
    con = getattr(shard._local, "con", None)
    if con is not None and con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")


# How long a call that retries (``retry=True`` here, never diskcache's own) waits for a shard's
# write lock before it gives up with ``diskcache.Timeout`` (``ShardBusy`` from ``update_many``).
BUSY_PATIENCE = 60.0
SQLITE_BUSY, SQLITE_LOCKED = 5, 6


def busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite waiting for a lock ("database is locked"), not a failure."""
    code = _code(exc)
    if code is not None:
        return code in (SQLITE_BUSY, SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _unwrapped(exc: diskcache.Timeout) -> BaseException | None:
    """The SQLite error behind a diskcache ``Timeout`` when it is not a held lock (diskcache
    raises ``Timeout`` for any OperationalError of BEGIN IMMEDIATE: a "disk I/O error" too)."""
    cause = exc.__context__
    if isinstance(cause, sqlite3.Error) and not busy(cause):
        return cause
    return None


def patiently(call: Callable[[], T], patience: float | None = None,
              stopping: threading.Event | None = None) -> T:
    """``call()`` (a diskcache call made with ``retry=False``), again while a shard's write lock
    is held, for at most ``patience`` seconds (BUSY_PATIENCE); any other SQLite error is raised
    as itself.

    Why not diskcache's ``retry=True``: it retries BEGIN IMMEDIATE on *any* OperationalError,
    so a lasting "disk I/O error" (a shard's -wal removed while running) kept a purge's thread
    spinning forever: the purge never answered and the process never exited on SIGTERM.
    ``stopping`` (``DiskTier.stop_waiting``): once set, a held lock is no longer waited for.
    Why: a purge behind another process's lock kept the stopping supervisor alive for as long
    as the lock was held, then ran on the shared memory already closed."""
    deadline = time.monotonic() + (BUSY_PATIENCE if patience is None else patience)
    while True:
        try:
            return call()
        except diskcache.Timeout as exc:
            cause = _unwrapped(exc)
            if cause is not None:
                raise cause from None
            if time.monotonic() >= deadline or (stopping is not None and stopping.is_set()):
                raise


@contextlib.contextmanager
def _begun(shard: diskcache.Cache, retry: bool) -> Iterator[None]:
    """``shard.transact()``; with ``retry``, BEGIN is tried again while the write lock is held
    (``patiently``), and a failure that is not a held lock is raised as itself."""
    with contextlib.ExitStack() as stack:
        if retry:
            patiently(lambda: stack.enter_context(shard.transact(retry=False)),
                      stopping=getattr(shard.disk, "stopping", None))
        else:
            stack.enter_context(shard.transact(retry=False))
        yield


@contextlib.contextmanager
def _transaction(shard: diskcache.Cache, retry: bool = False) -> Iterator[None]:
    """``shard.transact()`` whose writes remove the files they replaced only once it committed,
    and the files they wrote at once when it did not (nothing refers to them then). ``retry``:
    a held write lock is waited for up to BUSY_PATIENCE seconds (``patiently``)."""
    disk: _Disk = shard.disk
    with disk.taking_back(), disk.holding() as files:
        try:
            with _begun(shard, retry):
                yield
        except BaseException as exc:
            if files is not None:  # (the outermost: a nested one's caller is still inside it)
                _roll_back(shard)
            room = no_room(os.path.dirname(shard.directory), exc)
            if room is not None:  # (asked now: the files the write made are not taken back yet)
                raise room from exc
            hidden = exc.__context__
            if isinstance(exc, sqlite3.OperationalError) and "no transaction is active" in str(exc) \
                    and isinstance(hidden, Exception):
                # SQLite ended the transaction itself (SQLITE_FULL: the disk is full), and
                # diskcache's ROLLBACK after it raised "cannot rollback - no transaction is
                # active" in place of the error that says why: that error, as itself.
                raise hidden from None
            raise
    if files is not None:  # (not reached when the transaction rolled back: its rows keep their files)
        disk.release(files)


def _noting_seq(merge: Merge, top: list[int]) -> Merge:
    """``merge``, noting in ``top[0]`` the highest sequence number of the variants it keeps."""
    def noted(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
        variants, dropped = merge(current)
        for e in variants:
            if e.seq > top[0]:
                top[0] = e.seq
        return variants, dropped

    return noted


def _raise_seq(shard: diskcache.Cache, top: list[int]) -> None:
    """Inside the commit's transaction: the shard's highest sequence number is at least ``top``."""
    if top[0]:
        shard._sql(_SEQ_RAISE, (top[0],))


class BodyGone(Exception):
    """A new variant's body is no longer on disk when its metadata is to be committed."""


_HAS_ROW = "SELECT 1 FROM Cache WHERE raw = 1 AND key = ?"


def _with_bodies(shard: diskcache.Cache, merge: Merge) -> Merge:
    """``merge``, raising ``BodyGone`` when a variant it adds names a body the shard does not hold
    (one indexed lookup each). Why: a big body is put before its metadata, outside the lock, and
    may be culled meanwhile (by another process, or beyond ORPHAN_AGE); its metadata committed
    anyway read as stored, then as a miss, with a record naming a missing body."""
    def checked(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
        variants, dropped = merge(current)
        had = {e.body_id for e in current}
        for e in variants:
            if e.body_id not in had and shard._sql(_HAS_ROW, ("b:" + e.body_id,)).fetchone() is None:
                raise BodyGone(e.body_id)
        return variants, dropped
    return checked


class ShardBusy(Exception):
    """A shard's write lock stayed held (``update_many(retry=False)``): nothing of that batch was
    written."""


class ShardUnavailable(Exception):
    """A purge could not be carried out on a shard for a transient reason (no file descriptors
    left, no memory, a damage mark that cannot be written): nothing of it is given up; the
    purge answers 503, to be purged again."""


def _cut_short(db_file: str) -> str | None:
    """Whether a database file is shorter than its own header says (its page size times its
    page count, when the header's count is valid: SQLite's "version-valid-for" equals its
    change counter), and by how much (None: not, or no such file). Why: a shard cut in half
    while stopped opened without an error when the pages its open reads were in the first
    half, and was found damaged only by the reads after it (a start's check had depended on
    what the write-ahead log still held)."""
    try:
        with open(db_file, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00") or header[24:28] != header[92:96]:
        return None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    expected = page_size * int.from_bytes(header[28:32], "big")
    return f"its database file is cut short ({size} of {expected} bytes)" if size < expected else None


def _confirmed(db_file: str) -> str | None:
    """What ``PRAGMA quick_check`` on a connection of its own finds wrong with a shard's
    database (None: nothing, or it could not be asked: not damage then). Why: an error code
    alone is no proof (the index checks the same way: ``UrlTagIndex.noticed``)."""
    try:
        db = sqlite3.connect(f"file:{db_file}?mode=rw", uri=True, timeout=5, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        rows = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.Error as again:
        return f"quick_check: {again}" if damaged(again) else None
    finally:
        db.close()
    if rows == ["ok"]:
        return None
    return "quick_check: " + "; ".join(line.strip() for r in rows for line in r.splitlines())


# Eviction (``DiskTier._cull``). The row order of each policy; an entry goes by its metadata
# row's place (its bodies go with it, wherever theirs is).
_EVICTION_ORDER = {"least-recently-stored": "store_time", "least-recently-used": "access_time",
                   "least-frequently-used": "access_count"}
_CULL_SCAN = ("SELECT rowid, key, size, filename, CASE WHEN substr(key, 1, 2) = 'm:' THEN value END,"
              " ifnull(length(value), 0) FROM Cache WHERE raw = 1{spare} ORDER BY {order}")
# The upkeep cull's spared entries, left out by SQLite rather than skipped row by row under the
# lock (20,000 young rows held it 140-250 ms a round); an entry "stored" ahead of the clock (the
# clock stepped back) is not spared.
_SPARE = " AND NOT (key >= 'm:' AND key < 'm;' AND store_time > ? AND store_time < ?)"
# The time orders scan twice, each a range of the order's index as before: first the rows stamped
# more than CLOCK_SLACK ahead of the clock, then the others. Why: after the clock stepped back,
# the entries stamped while it was ahead sorted as the newest, so the cull took every entry
# stored since the step first (60 new of 60 gone, 60 old kept); stamped ahead, they are older
# than anything stored since. (The time a row was stamped cannot be told otherwise: a sort on
# "ahead or not" would give up the index and sort the whole table.)
_STAMPED = frozenset({"store_time", "access_time"})
_AHEAD = " AND {order} > ?"
_NOT_AHEAD = " AND {order} <= ?"
IN_LIST_MAX = 500  # values in one statement's IN (...) at most: callers send longer lists in parts


def in_list(values: Sequence[T]) -> tuple[str, list[T]]:
    """The placeholders of an ``IN (...)`` for ``values`` (1 to IN_LIST_MAX of them) and the
    values to bind: the count rounded up to a power of two (or IN_LIST_MAX), the last value
    repeated (a value twice in an IN list changes nothing).

    Why: Python's sqlite3 keeps the last 128 statements of each connection prepared, keyed by
    their text, and an IN list of 500 values costs SQLite about 100 KB prepared. With one text
    per list length, the supervisor's connections (a shard's per thread, the index's) each
    filled their cache with such statements: its memory grew by tens of MB under a load of
    new keys (the cull, the index GC's presence checks), and kept it. Now each place has at
    most 10 texts."""
    n = len(values)
    size = min(IN_LIST_MAX, 1 << (n - 1).bit_length()) if n > 1 else 1
    return ",".join("?" * size), [*values, *[values[-1]] * (size - n)]


_BODY_ROWS = "SELECT rowid, filename FROM Cache WHERE raw = 1 AND key IN ({})"
ROW_OVERHEAD = 100  # bytes a row costs in the database besides its key and value (columns, indexes)
BODY_NAME = 40  # about the length of a body's row name ("b:" and its id)
# About what a row of the URL index takes besides its text (``index_cost``): its cell in its
# table's b-tree and in its index's, and the pages' slack.
INDEX_ROW = 24
# Evicted beyond the excess (at most a 512th of the budget): volume counts database pages, which
# deleting one small row rarely frees; a cull of exactly the excess took a round per small entry.
CULL_SLACK = 64 * 1024
# One round (one transaction, the shard's write lock held) deletes at most CULL_BATCH rows and
# aims at no more than an eighth of the budget; the volume is measured again after each. Why:
# a round that took a whole excess at once held the lock for seconds (155,000 small entries:
# 2.8 s, another process's write timed out), and its estimate of the bytes freed is below what
# the pages really free, so a shard far over its budget (a smaller cache.disk.size at restart)
# was emptied. Now a cull stops at most about one round's worth under the budget.
CULL_BATCH = 500
CULL_STEP = 8  # a round aims at most at budget // CULL_STEP bytes
# Rounds one cull may take before it leaves the rest to the next write (the lock is released
# between rounds): 256 rounds of CULL_BATCH rows work off 128,000 small entries, or 32 budgets.
CULL_ROUNDS = 256
# A cull stops after CULL_TIME (its pauses included) and leaves the rest to the next writes: culls
# run on the write-behind thread,
# under the lock purges wait for, and 256 rounds with pauses took seconds per shard (a purge
# waited 9 s, the write-behind queue stopped draining and fills answered "stored" were lost, a
# stop overran its grace). A round aims at least at CULL_FLOOR bytes: a small budget's eighth
# (15 KB: 7 small entries) spent the rounds on their overhead.
CULL_TIME = 0.05
# A cull that has not yet freed what its write added goes on past CULL_TIME, up to CULL_DEBT_TIME:
# without a bound, storing a 50 MB body into a shard full of small entries culled 69 rounds
# (1.7-2.5 s) on the thread a stop waits for, and the stop overran a 1 s grace.
CULL_DEBT_TIME = 0.5
CULL_SPARE = 5.0  # seconds: entries this young are not taken by the owner's upkeep cull
CULL_FLOOR = 256 * 1024
# Between two rounds the lock stays free as long as the round held it (at most CULL_PAUSE s):
# another process waiting for it polls (SQLite's busy handler sleeps up to 100 ms between
# tries), and a lock taken again at once was seldom free when it looked (waits up to 0.9 s).
CULL_PAUSE = 0.02
# The stages of a cull, each taken once the one before found nothing more to evict:
# 0: entries other than the ones just written; 1: bodies no entry names (a crash's leftovers),
# only those older than ORPHAN_AGE (a younger one may be another process's write whose metadata
# is not committed yet), never the one just put; 2: the entries just written, once nothing else
# is left and the shard is still over its budget (not checked to be theirs: a budget under an
# empty shard's size would take them too, which ``shard_budget_beside``'s floor keeps from
# happening but for a cache of a few hundred KB).
LAST_STAGE = 2
_META_ROWS = "SELECT key, value FROM Cache WHERE raw = 1 AND key >= 'm:' AND key < 'm;'"
_JOURNAL_FILES = ("cache.db-wal", "cache.db-shm")
FULL_TELL_EVERY = 60.0  # seconds: episodes of the disk over cache.disk.size are warned of at most this often


def _evict(shard: diskcache.Cache, over: int, keep: frozenset[str], keep_body: str | None,
           stage: int, spare_after: float | None = None, evicted: list[tuple[str, int]] | None = None) -> int:
    """Inside the cull's transaction: delete the first rows in the policy's order that free about
    ``over`` bytes, at most CULL_BATCH rows (past it only to finish the entry it is in), in one
    statement per 500 rows; the estimate of bytes freed (0: nothing left to evict at this stage).
    Metadata goes with the bodies it names. ``evicted`` gets each entry taken: its key and the
    highest sequence number of its variants (for ``UrlTagIndex.remove_stale``)."""
    sql = shard._sql
    order = _EVICTION_ORDER.get(shard.eviction_policy)
    if order is None:
        return 0  # ("none": nothing is evicted)
    rowids: list[int] = []
    files: list[str] = []
    freed = 0
    spared: set[str] = {"b:" + keep_body} if keep_body is not None else set()
    young = time.time() - ORPHAN_AGE
    if stage == 1:  # the bodies any entry names, read under the lock: not leftovers
        for name, value in sql(_META_ROWS).fetchall():
            if isinstance(name, str):
                spared.update("b:" + body for body, _ in _bodies_of(shard, name, value)[0])
    taken: set[str] = set()
    named: list[str] = []  # the bodies of the entries taken
    spare, window = ("", ()) if spare_after is None else \
        (_SPARE, (spare_after, spare_after + 2 * CULL_SPARE))  # (now - CULL_SPARE, now + CULL_SPARE)
    if order in _STAMPED:
        ahead = time.time() + CLOCK_SLACK
        scans = [(spare + _AHEAD.format(order=order), (*window, ahead)),
                 (spare + _NOT_AHEAD.format(order=order), (*window, ahead))]
    else:
        scans = [(spare, window)]
    scanned = _scan(sql, order, scans)
    try:
        while freed < over and len(taken) < CULL_BATCH:
            rows = list(islice(scanned, 256))
            if not rows:
                break
            for rowid, name, size, filename, value, length in rows:
                if not isinstance(name, str) or name in taken:
                    continue
                if name.startswith("m:"):
                    if stage == 1 or (stage == 0 and name[2:] in keep):
                        continue
                    bodies, seq = _bodies_of(shard, name, value)
                    if evicted is not None:
                        evicted.append((name[2:], seq))
                    for body_id, body_size in bodies:
                        body = "b:" + body_id
                        if body not in taken:  # (its row is found below, with the others')
                            taken.add(body)
                            named.append(body)
                            freed += body_size + len(body) * 2 + ROW_OVERHEAD
                elif stage != 1 or name in spared or not name.startswith("b:") \
                        or body_time(name[2:]) >= young:
                    continue  # (a body goes with its entry)
                taken.add(name)
                rowids.append(rowid)
                if filename is not None:
                    files.append(filename)
                freed += size + length + len(name) * 2 + ROW_OVERHEAD
                if freed >= over or len(taken) >= CULL_BATCH:
                    break
    finally:
        scanned.close()
    for start in range(0, len(named), IN_LIST_MAX):
        marks, names = in_list(named[start:start + IN_LIST_MAX])
        for rowid, filename in sql(_BODY_ROWS.format(marks), names).fetchall():
            rowids.append(rowid)
            if filename is not None:
                files.append(filename)
    for start in range(0, len(rowids), IN_LIST_MAX):
        marks, part = in_list(rowids[start:start + IN_LIST_MAX])
        sql(f"DELETE FROM Cache WHERE rowid IN ({marks})", part)
    for f in files:
        shard.disk.remove(f)  # (held until the COMMIT: ``_transaction``)
    return freed


def _scan(sql: Any, order: str, scans: list[tuple[str, tuple[float, ...]]]) -> Generator[tuple[Any, ...]]:
    """The cull's candidate rows: each scan's (its conditions, their values) in turn, in the
    policy's order; closing it closes the cursor open."""
    for where, values in scans:
        cursor = sql(_CULL_SCAN.format(order=order, spare=where), values)
        try:
            while rows := cursor.fetchmany(256):
                yield from rows
        finally:
            cursor.close()


def _journals(shard: diskcache.Cache) -> int:
    """The bytes of a shard's journals: its write-ahead log and its shared-memory file."""
    total = 0
    for name in _JOURNAL_FILES:
        with contextlib.suppress(OSError):
            total += os.stat(os.path.join(shard.directory, name)).st_size
    return total


def _body_cost(body: bytes | None) -> int:
    """About what a small ``body`` the database holds adds to a shard (as ``_evict`` estimates
    what deleting its row frees)."""
    return len(body) + BODY_NAME * 2 + ROW_OVERHEAD if body is not None else 0


def _meta_cost(key: str, blob: bytes, variants: tuple[Entry, ...]) -> int:
    """About what committing a key's metadata ``blob`` adds to the disk: its row in the shard (as
    ``_evict`` estimates what deleting it frees: the value as written, with every variant's head
    fields and tags) and the key's rows in the URL index beside the shards (``index_cost``),
    which its eviction drops too (``DiskTier.on_evicted``). Why the real figures: a fixed 200
    bytes and the URL stood for metadata that held 30 KB of tags and Cache-Tag field, so a
    write's cull stopped after 50 ms having repaid a fiftieth of what the write added, and the
    shards grew past their budget batch after batch (877 MB against 5.9 MB)."""
    return len(blob) + (len(key) + 2) * 2 + ROW_OVERHEAD + index_cost(key, variants)


def index_cost(key: str, variants: tuple[Entry, ...]) -> int:
    """About what a key's rows take in the URL index: its entry (the key, in its table and its
    UNIQUE index) and a row per tag of its variants (the tag and the key, in the tags' table and
    in the key's index of it). Most entries have no tag: two lengths and a test."""
    cost = 2 * (len(key) + INDEX_ROW)
    if any(e.tags for e in variants):
        row = len(key) + INDEX_ROW
        cost += sum(2 * (len(t) + row) for t in {t for e in variants for t in e.tags})
    return cost


def _bodies_of(shard: diskcache.Cache, name: str, value: bytes | None) -> tuple[list[tuple[str, int]], int]:
    """The bodies (id, size) a metadata row names (``value``: its bytes when the database holds
    them), and the highest sequence number of its variants (``refs_and_seq``)."""
    if not isinstance(value, bytes):
        value = shard.get(name, default=None)
    return refs_and_seq(value) if isinstance(value, bytes) else ([], 0)


def drop_all(current: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], list[str]]:
    return (), [e.body_id for e in current]


def new_body_id(now: float | None = None) -> str:
    """A unique body id that starts with its creation time (hex ns), so sweeps can tell its age.

    The 64 random bits come from ``random`` (seeded from the OS, and again in a forked child),
    not ``uuid4``: a body id needs to be unique, not secret, and uuid4 costs a system call."""
    ns = time.time_ns() if now is None else int(now * 1e9)
    return f"{ns:x}-{random.getrandbits(64):016x}"


def with_checksum(body_id: str, crc: int) -> str:
    """``body_id`` carrying the CRC-32 of its body (``zlib.crc32``), for a body kept as a file.

    Why in the id: it names the body wherever its metadata goes (the disk record, the shared
    memory, a cluster peer), a new body gets a new id, and every cachegate takes the id as an
    opaque name: records keep their format (an older cachegate reads them as before, and
    ``body_time`` reads the id's first part), and a body whose id has no CRC (stored before,
    or small) is simply not checked (``body_checksum``)."""
    return f"{body_id}-{crc:08x}"


def body_checksum(body_id: str) -> int | None:
    """The CRC-32 ``with_checksum`` put in ``body_id``; None when it has none.

    >>> body_checksum(with_checksum("18b2-00ff", 0xDEADBEEF)) == 0xDEADBEEF, body_checksum("18b2-00ff")
    (True, None)
    """
    parts = body_id.split("-")
    if len(parts) != 3 or len(parts[2]) != 8:
        return None
    try:
        return int(parts[2], 16)
    except ValueError:
        return None


def body_time(body_id: str) -> float:
    """When a body id was made (0 for ids of another shape: old enough to sweep)."""
    try:
        return int(body_id.split("-", 1)[0], 16) / 1e9
    except ValueError:
        return 0.0


def _plain_layout(shard: diskcache.Cache) -> bool:
    """Whether the shard's ``Cache`` table is the layout ``_insert_new`` writes."""
    try:
        return tuple(r[1] for r in shard._sql("PRAGMA table_info(Cache)").fetchall()) == CACHE_COLUMNS
    except sqlite3.Error:
        return False


def _inline(value: bytes | None) -> bool:
    """Whether diskcache keeps ``value`` in its database (not in a file of its own)."""
    return value is not None and len(value) < INLINE_LIMIT


# SQLite's primary result codes for a database that cannot be read: an I/O error, a malformed
# image, not a database at all. Not "locked" or "cannot open" (a busy or unreadable but sound
# database must never be set aside).
DAMAGED_CODES = (10, 11, 26)  # SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_NOTADB
# Beside a shard's database: a process found it damaged while running (``DiskTier.noticed``);
# the next start sets the shard aside (as ``index.sqlite3.damaged`` for the index).
DAMAGED_MARK = "cache.db.damaged"
# Another process's mark is looked for at most once a second per shard, not at every read (a
# stat per disk lookup). A purge that marked it has already taken its keys out of the shared
# directory of disk keys, so the second in between serves none of them.
MARK_EVERY = 1.0


def damaged(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the database itself is damaged (ask ``filesystem_full`` first: an
    I/O error on a full filesystem is no damage)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in DAMAGED_CODES


def _describe(exc: sqlite3.Error) -> str:
    """The SQLite error's name (SQLITE_CANTOPEN...): "unable to open database file" is EMFILE too."""
    return str(getattr(exc, "sqlite_errorname", None) or type(exc).__name__)


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def not_writable(exc: BaseException) -> bool:  # (the shards' and the index's; ``NotWritable``)
    """Whether ``exc`` (met opening a database) says it is read-only or cannot be opened for
    writing (SQLITE_READONLY, SQLITE_CANTOPEN)."""
    return _code(exc) in (SQLITE_READONLY, SQLITE_CANTOPEN)


def set_aside(path: str) -> str:
    """Move a damaged database (a shard's folder, the index file) to ``<path>.corrupt-<time>``
    beside it, for inspection (it is outside the disk budget: delete it when done); where."""
    aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
    os.rename(path, aside)
    return aside


def _seq_table(shard: diskcache.Cache) -> None:
    """Make the shard's table of its highest sequence number. A shard written before it existed
    starts without a row (0: nothing noted) and gets one at its next commit: reading its
    metadata for the number would decode every record at the first start after an upgrade
    (about a minute at a million entries, with the start held), and an index that came back
    older than such a shard is the one case it would catch."""
    if shard._sql("SELECT 1 FROM sqlite_master WHERE name = 'cachegate_seq'").fetchone():
        return
    try:
        with _begun(shard, retry=True):  # (IF NOT EXISTS: another process may have made it since)
            shard._sql(_SEQ_TABLE)
    except (sqlite3.OperationalError, diskcache.Timeout) as exc:  # its commits fail too
        log.warning("disk shard %s: cannot note its highest sequence number (%s)", shard.directory, exc)


LAYOUT_FILE = "shards"  # the shard count the folders are laid out for (``DiskTier.relayout``)
# Present while a relayout moves entries: a start killed midway and the next start at the old
# count (recorded, no folder past it any more) found nothing to do, and the entries already moved
# stayed in shards no lookup or purge reads.
MOVING_FILE = "shards.moving"
REMOVING = ".removing"  # a folder past the count being removed (renamed first)
MOVE_BATCH = 256  # entries read at a time by a relayout


@dataclass
class Relayout:
    """What ``DiskTier.relayout`` did."""

    recorded: int | None  # the count the directory was laid out for (None: never recorded)
    shards: int
    moved: int = 0
    dropped: int = 0
    removed: int = 0  # folders past the count
    unreadable: int = 0  # of those, the ones whose entries could not be read (dropped)
    seq: int = 0
    seconds: float = 0.0


def shard_folders(path: str) -> list[int]:
    """The shard folders under a cache directory (``000``, ``001``...), whatever their count."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    # (Only folders holding a shard's database: a folder of the operator's named "2024" or
    # "123" in the cache directory was taken for a shard past the count and deleted.)
    return sorted(int(n) for n in names if n.isascii() and n.isdigit() and f"{int(n):03d}" == n
                  and os.path.isfile(os.path.join(path, n, "cache.db")))


def _recorded_number(path: str, name: str) -> int | None:
    """The number a record file of the cache directory holds (None: none, or unreadable)."""
    try:
        with open(os.path.join(path, name), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def recorded_shards(path: str) -> int | None:
    """The shard count ``record_shards`` wrote (None: none, or unreadable)."""
    return _recorded_number(path, LAYOUT_FILE)


def record_shards(path: str, count: int) -> None:
    """Note that the folders are laid out for ``count`` shards (written whole or not at all)."""
    _write_whole(os.path.join(path, LAYOUT_FILE), f"{count}\n")


# Written by the owner at a clean stop (``stamp_stop``): this release's ``KEY_SCHEME`` and the size
# and modification time of every database file of the directory then, and the state of the owner's
# lock file; replaced at the owner's start, before it writes anything, by a mark of its run
# (``mark_running``: the scheme, its pid and the lock file's state once it wrote its pid there).
# Compared at the owner's next start before anything is opened (``stamp_matches``): when the files
# are as it says, no other program wrote them since and the layout record is trusted; otherwise
# (another writer, or a kill: the run's mark) the placement of the entries is checked
# (``foreign_placement``). Why: an earlier release, which knows neither the record nor this stamp,
# run on the directory with another cache.disk.shards, looked keys up in other shards than ours:
# its purges missed entries (its bans swept the wrong shards and were dropped) and its fills went
# where we never look, and our next start, trusting the record, served what it had purged. The
# key scheme record is trusted only on the same grounds (``unknown_writer``): an earlier release
# never rewrites a record it does not know, so what it stored (under its own rules) sat under
# ours.
STAMP_FILE = "stopped"
# The key scheme the entries were stored under (``KEY_SCHEME``): the rules that decide what may be
# stored under a request's key (the key and Vary values, and what a response must not be stored
# for, such as a request the rules cannot tell to be anonymous). Every fix that changes what may
# be stored under a key bumps it, so that an entry stored under the old rules is never served to
# a request the new rules keep apart from the one that stored it (or would not have stored).
SCHEME_FILE = "keys"
# 3: cookies read as ambiguous (never stored, never served from the shared cache) when an origin
# may read them otherwise than the rules: a name in another case, a value with % or +, a raw
# 0xA0/0x85 byte before a name. 2: Accept-* values normalised in whitespace only (never order,
# case or weights), cookies read as origins read them (an absent cookie is not an empty one); the
# first releases with the record (and, with no record but a current index, the releases between
# the index change and the record). 1: before those (the releases whose index needs conversion).
# A directory with no record is of an earlier scheme: its disk tier is emptied.
KEY_SCHEME = 3
# The shard budget our last start opened the shards with, and while a start opens them, the one
# before beside it, one a line (``note_budget``, then ``opened_with``). diskcache writes the budget into each
# shard as it opens it, so a start that failed or was killed midway after a change of
# cache.disk.size left shards of two budgets, as a program with fewer shards does: taken for
# one, it emptied an operator's cache it had written itself (``foreign_placement``).
BUDGETS_FILE = "budgets"


def _files_state(path: str) -> dict[str, list[int] | None]:
    """The size and modification time (ns) of each database file of a cache directory."""
    names = ["index.sqlite3", "index.sqlite3-wal"]
    for i in shard_folders(path):
        names += [f"{i:03d}/cache.db", f"{i:03d}/cache.db-wal"]
    state: dict[str, list[int] | None] = {}
    for name in names:
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            state[name] = None
        else:
            # An empty write-ahead log is as none: SQLite removes it when the process's last
            # connection closes, after the stamp (a single process's reader threads keep theirs
            # open until it exits), and the stamp of every clean stop failed to match.
            state[name] = None if name.endswith("-wal") and st.st_size == 0 else [st.st_size, st.st_mtime_ns]
    return state


def _write_whole(file: str, text: str) -> None:
    """Write a small file whole or not at all."""
    with open(file + ".tmp", "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(file + ".tmp", file)


def _read_stamp(path: str) -> dict[str, Any] | None:
    """The stamp (``STAMP_FILE``) as written (None: none, unreadable, or not an object)."""
    try:
        with open(os.path.join(path, STAMP_FILE), encoding="ascii") as f:
            noted = json.load(f)
    except (OSError, ValueError):
        return None
    return noted if isinstance(noted, dict) else None


def stamp_stop(path: str, lock: list[int] | None) -> None:
    """The owner, at a clean stop, with its databases closed: note their state (``STAMP_FILE``).
    Each database's
    write-ahead log is folded in and emptied first: connections other threads of this process
    still hold (a single process's readers) close at its exit, and the last one folded what was
    left into the database then, after the stamp, which then never matched (one run in three).
    A database another process holds a read open on is not waited for (50 ms: a backup's reader
    held a stop 9 s at 1 s a database): its stamp does not match, and the next start scans.
    ``lock``: the state of the owner's lock file (``HeldLock.found``; the owner never writes it)."""
    for name in ["index.sqlite3", *(f"{i:03d}/cache.db" for i in shard_folders(path))]:
        with contextlib.suppress(sqlite3.Error), \
                contextlib.closing(sqlite3.connect(os.path.join(path, name), timeout=0.05)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    try:
        _write_whole(os.path.join(path, STAMP_FILE),
                     json.dumps({"scheme": KEY_SCHEME, "files": _files_state(path), "lock": lock},
                                sort_keys=True) + "\n")
    except OSError as exc:  # (the mark of the run stays: the next start checks the placement)
        log.warning("cannot note the state of the cache directory %s at stop (%s)", path, exc)


def mark_running(path: str, lock: list[int] | None) -> None:
    """The owner, at start, once it has checked the stamp and before it writes anything: replace
    the stamp by the mark of this run (``STAMP_FILE``: this release's scheme, its pid, which a
    second instance's refusal names, and ``lock``, the state of the owner's lock file:
    ``HeldLock.found``), so that a stamp of a clean stop is never left to a run that changes the
    files. Its clean stop writes the stamp again; a kill, or a start that fails, leaves the mark
    (``unknown_writer``). Not written (a full filesystem): the stamp before stays, which notes
    the same lock file, and the files' own open says why it cannot go on."""
    with contextlib.suppress(OSError):
        _write_whole(os.path.join(path, STAMP_FILE),
                     json.dumps({"scheme": KEY_SCHEME, "running": os.getpid(), "lock": lock},
                                sort_keys=True) + "\n")


def _our_budgets(path: str) -> set[int]:
    """The budgets ``note_budget`` noted (none: no file, or unreadable)."""
    try:
        with open(os.path.join(path, BUDGETS_FILE), encoding="ascii") as f:
            return {int(line) for line in f.read().split()}
    except (OSError, ValueError):
        return set()


def opened_with(path: str, budget: int) -> None:
    """The owner, once every shard is open with ``budget``: the budgets noted before
    (``note_budget``) are no one's any more. Why: kept until the next clean stop, a run that was
    killed kept every budget it had used, and a rollback to an earlier release whose budget was
    among them (its count at the same size, or half the size at half the count) went unseen."""
    with contextlib.suppress(OSError):
        _write_whole(os.path.join(path, BUDGETS_FILE), f"{budget}\n")


def note_budget(path: str, budget: int) -> None:
    """The owner, at start, before it opens the shards with ``budget``: note it beside the one
    the last start opened them with (``BUDGETS_FILE``). Not written: the
    shards' own open says why (a directory that cannot be written)."""
    ours = _our_budgets(path)
    if budget not in ours:
        with contextlib.suppress(OSError):
            _write_whole(os.path.join(path, BUDGETS_FILE), "".join(f"{b}\n" for b in sorted(ours | {budget})))


def stamp_matches(path: str) -> bool:
    """The owner, at start, before it opens anything: whether the databases are as a clean stop
    of this release left them (``stamp_stop``), so no other program wrote them since. (After a
    kill, the mark of the run is there instead: ``mark_running``.)"""
    noted = _read_stamp(path)
    return (noted is not None and noted.get("scheme") == KEY_SCHEME
            and noted.get("files") == _files_state(path))


def running_pid(path: str) -> int | None:
    """The pid the mark of a run names (``mark_running``; None: no mark)."""
    noted = _read_stamp(path)
    pid = noted.get("running") if noted is not None else None
    return pid if isinstance(pid, int) and pid > 0 else None


def unknown_writer(path: str, lock: list[int] | None) -> str | None:
    """The owner, at start, before it writes anything: why a program other than a run of this
    release may have written the cache directory since our last run (None: the stamp, of a clean
    stop of this release or the mark of a run of it that was killed or failed, notes the owner's
    lock file as ``lock`` says the owner found it, ``HeldLock.found``). The owner never writes
    that file; every release since before the index change writes its pid into it when it takes
    the lock, so another one run since changed it; a kill, a damaged database or a backup's
    reader does not. Then what the directory's entries were stored under is not known: a
    release that knows neither the stamp nor the key scheme record leaves both as they were,
    whatever it stores."""
    noted = _read_stamp(path)
    if noted is None:
        exists = os.path.exists(os.path.join(path, STAMP_FILE))
        return "its stamp cannot be read" if exists else "no stamp of a run of this release"
    if noted.get("scheme") != KEY_SCHEME:
        scheme = noted.get("scheme")
        if isinstance(scheme, int):
            return f"the stamp of a release of key scheme {scheme}"
        return f"the stamp of an earlier release (key scheme {KEY_SCHEME - 1} or before)"
    if noted.get("lock") != lock:
        return "another program took the owner's lock since this release last ran there"
    return None


def foreign_placement(path: str) -> str | None:
    """Why the entries of a cache directory are not where the recorded shard count
    (``LAYOUT_FILE``) puts them, when no interrupted move of ours (``MOVING_FILE``) explains it:
    another program wrote them with another count (None: every entry in its place, or nothing
    recorded to check against). A shard folder past the recorded count is such a program's too,
    even empty: it ran with more shards, so it looked our entries up in other shards than theirs;
    so are shards last opened with another budget than the others (diskcache records it in each
    shard it opens): a program with fewer shards opened only the first ones, and its purges
    missed what we placed in the others, even when it stored nothing.
    Read with plain SELECTs, nothing written; measured at 60,000 entries at about 0.05 s."""
    recorded = recorded_shards(path)
    if recorded is None or os.path.exists(os.path.join(path, MOVING_FILE)):
        return None
    budgets: dict[int, list[int]] = {}  # the budget each shard was last opened with -> shards
    for i in shard_folders(path):
        if i >= recorded:
            return f"shard folder {i:03d}, past the {recorded} shards recorded"
        try:
            db = sqlite3.connect(os.path.join(path, f"{i:03d}", "cache.db"), timeout=5)
        except sqlite3.Error:
            continue  # (damage: the shard's own open deals with it)
        try:
            row = db.execute("SELECT value FROM Settings WHERE key = 'size_limit'").fetchone()
            if row is not None and isinstance(row[0], int):
                budgets.setdefault(row[0], []).append(i)
            rows = db.execute("SELECT key FROM Cache WHERE raw = 1 AND key > 'm:' AND key < 'm;'")
            for (name,) in rows:
                if not isinstance(name, str):
                    continue
                if shard_of(name[2:], recorded) != i:
                    return (f"entries in shard {i:03d} that {recorded} shards place in "
                            f"{shard_of(name[2:], recorded):03d}")
        except sqlite3.Error:
            continue
        finally:
            db.close()
    if len(budgets) > 1 and not set(budgets) <= _our_budgets(path):
        # diskcache writes the budget it is given into each shard it opens: every run of ours
        # opens all of them alike, a program run with fewer shards only the first ones (budgets
        # our own starts noted: one that failed or was killed midway opening them).
        few = min(budgets.values(), key=len)
        return (f"shards {', '.join(f'{i:03d}' for i in few)} were last opened with another "
                f"budget than the other {recorded - len(few)}: by a program with fewer shards")
    return None


def mark_moving(path: str, recorded: int | None, count: int) -> None:
    """Note that the directory is being brought from ``recorded`` shards to ``count``
    (``MOVING_FILE``). The owner writes it before it opens the shards at a new count (which makes
    the folders past the recorded one), so that folders or entries a start killed then left are
    never taken for another program's (``foreign_placement``)."""
    _write_whole(os.path.join(path, MOVING_FILE), f"{recorded} -> {count}\n")


def recorded_scheme(path: str) -> int | None:
    """The key scheme ``record_scheme`` wrote (None: none, or unreadable)."""
    return _recorded_number(path, SCHEME_FILE)


def record_scheme(path: str, scheme: int) -> None:
    """Note the key scheme the directory's entries were stored under (if not noted yet). A
    record that cannot be written is logged: the start goes on (its entries are of ``scheme``
    or were just emptied), and the next start tries again."""
    if recorded_scheme(path) == scheme:
        return
    try:
        _write_whole(os.path.join(path, SCHEME_FILE), f"{scheme}\n")
    except OSError as exc:
        log.warning("cannot record the key scheme of the cache directory %s (%s)", path, exc)


def forget_scheme(path: str) -> None:
    """Remove the key scheme record (a directory with none is emptied at start): the owner, at
    start, before it marks its run (``mark_running``), when the stamp does not vouch for the
    record (``unknown_writer``), so that a start killed before it emptied the disk tier still
    leaves a directory the next one empties."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, SCHEME_FILE))


def _delete_entry(shard: diskcache.Cache, key: str) -> None:
    """Inside a transaction: delete a key's metadata with every body it names."""
    meta = shard.get("m:" + key, default=None)
    if isinstance(meta, bytes):
        for body_id, _ in body_refs(meta):
            shard.delete("b:" + body_id)
    shard.delete("m:" + key)


def identity(path: str) -> tuple[int, int]:
    """A file's or folder's device and inode: the same while it is the same one."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def shard_of(key: str, shards: int) -> int:
    """A hash that every process computes alike (``hash()`` is salted per process)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % shards


class DiskTier:
    def __init__(
        self,
        path: str,
        size_limit: int,
        shards: int = 8,
        eviction_policy: DiskEviction = "least-recently-stored",
        timeout: float = 2.0,
        repair: bool = False,
        empty: bool = False,
    ) -> None:
        """``repair`` (the process that owns the cache directory, at start): a shard SQLite
        cannot read is set aside and made anew, empty (its entries are misses, as if culled;
        the index rows left for them are dropped by the upkeep), so a damaged file never keeps
        cachegate from starting. ``empty``: start with every shard emptied (the index was
        lost: entries it no longer lists would escape purges)."""
        os.makedirs(path, exist_ok=True)
        self._opened = identity(path)  # the directory opened (``directory_gone``)
        if empty:  # (every folder: those past a smaller count too)
            for i in sorted(set(shard_folders(path)) | set(range(shards))):
                shutil.rmtree(os.path.join(path, f"{i:03d}"), ignore_errors=True)
        self.path = path
        self.size_limit = size_limit
        self.lock_wait = timeout  # how long a write waits for a shard's lock held elsewhere
        # diskcache counts its database pages and value files; the index and the SQLite
        # journals (WAL, shared memory) live in the remaining RESERVE of the budget.
        self.shard_limit = shard_budget(size_limit, shards)  # the configured budget
        # The budget in force (lower while the URL index takes more than its share:
        # ``count_index``), and the biggest body stored: half of it (``use_budget``).
        self.budget = self.shard_limit
        self.max_body = self.shard_limit // 2
        self._followed = 0  # the owner's budget this process last followed (``follow_budget``)
        self._told_budget = self.shard_limit  # the budget in force last logged (``_tell_budget``)
        # Each shard's volume and its journals' bytes as last measured (its culls measure them:
        # after every write, and every upkeep round), by folder: with the index's bytes, what
        # ``weigh`` holds against cache.disk.size without a query per shard.
        self._measured: dict[str, tuple[int, int]] = {}
        # The owner's: the shards, the index and their journals are past cache.disk.size by
        # more than SIZE_SLACK of it, and not back within it yet (``weigh``): new entries stay
        # off the disk.
        self.full = False
        self._full_told = -FULL_TELL_EVERY  # when an episode was last warned of (monotonic)
        self._full_untold = 0  # episodes begun since, not warned of
        self._full_said = False  # this episode was warned of (its end is said then)
        # Told of each entry a cull took (its key and newest sequence number), once its
        # transaction committed: ``Storage`` drops its index rows at once (``Upkeep.evicted``;
        # the index GC would only after GC_SEQ_LAG and a lap of the index).
        self.on_evicted: Callable[[list[tuple[str, int]]], None] | None = None
        self.failed_writes = 0
        # A lock held long times out write after write: logged once, then once a minute with a
        # count, and once when writes have worked for SETTLE seconds (``RepeatedFailure``). Any
        # other failure of a commit is the caller's to report (``commit_many``'s ``raised``).
        self._lock_timeouts = RepeatedFailure(log, "storing on disk under a shard's lock (timed out: "
                                              "not stored)", settle=SETTLE, traceback=False,
                                              level=logging.WARNING)
        wal = wal_limit(self.shard_limit)

        def anew(directory: str, found: str, why: object) -> diskcache.Cache:
            """The shard moved aside, said once, and made anew, empty."""
            aside = set_aside(directory)
            log.warning("disk shard %s %s (%s): moved aside to %s and started empty; its entries are "
                        "misses", directory, found, why, aside)
            return make_shard(directory)

        def open_shard(directory: str) -> diskcache.Cache:
            if repair and os.path.exists(os.path.join(directory, DAMAGED_MARK)):
                why = "no detail"
                with contextlib.suppress(OSError), open(os.path.join(directory, DAMAGED_MARK),
                                                        encoding="utf-8", errors="replace") as f:
                    why = f.read().strip() or why
                return anew(directory, "was found damaged while running", why)
            cut = _cut_short(os.path.join(directory, "cache.db")) if repair else None
            if cut is not None:
                return anew(directory, "is damaged", cut)
            try:
                return make_shard(directory)
            except (sqlite3.Error, OSError) as exc:
                if filesystem_full(directory, exc):
                    self.close()
                    raise FilesystemFull(path, exc) from exc
                if isinstance(exc, sqlite3.Error) and not_writable(exc):
                    self.close()
                    raise NotWritable(os.path.join(directory, "cache.db"), exc) from exc
                if not repair or not isinstance(exc, sqlite3.Error) or not damaged(exc):
                    raise
                return anew(directory, "is damaged", exc)

        def make_shard(directory: str) -> diskcache.Cache:
            return diskcache.Cache(
                directory=directory,
                timeout=timeout,
                size_limit=self.shard_limit,
                eviction_policy=eviction_policy,
                disk=_Disk,
                statistics=False,
                # No culling inside every set (3 more queries each): writes cull once
                # afterwards, when the shard is over its budget (``_cull``).
                cull_limit=0,
                # Bound the WAL file: by default it grows to ~4 MB per shard before a
                # checkpoint and is never truncated, outside diskcache's size accounting.
                sqlite_wal_autocheckpoint=max(wal // 4096, 16),
                sqlite_journal_size_limit=wal,
                # diskcache keeps one SQLite connection per thread and shard, and by default
                # each maps up to 64 MB of its database and caches up to 32 MB of pages: with
                # 4 reader threads x 8 shards that was 340+ MB of RSS per worker at 100k keys
                # (the event loop's thread reads too now: ``proxy.storage.reads.ReadPlace``).
                # Reads go through the OS page cache instead (a metadata read is one pread).
                sqlite_mmap_size=SQLITE_MMAP,
                sqlite_cache_size=SQLITE_CACHE_PAGES,
            )

        self._make_shard = make_shard
        self._shards: list[diskcache.Cache] = []
        # Set when the process stops: a held write lock is no longer waited for (``patiently``).
        self._stopping = threading.Event()
        # Shards found damaged while running (``noticed``): index -> why.
        self._damaged: dict[int, str] = {}
        # Of those, the ones whose mark could not be written (EMFILE...): index -> why.
        self._unmarked: dict[int, str] = {}
        self._marks = [os.path.join(path, f"{i:03d}", DAMAGED_MARK) for i in range(shards)]
        self._marks_seen = [-MARK_EVERY] * shards  # when each mark was last looked for (monotonic)
        for i in range(shards):
            self._shards.append(open_shard(os.path.join(path, f"{i:03d}")))
        for shard in self._shards:  # (the owner opens first: the workers find it there)
            shard.disk.stopping = self._stopping
            _seq_table(shard)
        self._bulk = [_plain_layout(s) for s in self._shards]
        # Whether a read is one SELECT: under least-recently-used every ``get`` is a write
        # transaction too (its access time), which can wait seconds for another process's
        # write lock, so those reads never run in an event loop.
        self.reads_are_plain = diskcache.core.EVICTION_POLICY[eviction_policy]["get"] is None

    def directory_gone(self) -> str | None:
        """Why ``path`` is no longer the directory this process opened, else None: one stat,
        compared with the one at open (its device and inode). The databases stay open and
        working when their directory is removed or moved away, so no error says it."""
        try:
            now = identity(self.path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                return "is gone (removed, moved away or unmounted)"
            return None  # (not known now: the next round looks again)
        if now != self._opened:
            return ("is another directory than the one cachegate opened (removed and made again, "
                    "or a filesystem mounted over it)")
        return None

    def _held(self, shard: diskcache.Cache, exc: diskcache.Timeout) -> ShardBusy:
        """A lock's timeout with words: diskcache raises ``Timeout`` with none, and the log read
        "storing on disk under a shard's lock (timed out: not stored) failed: ; retrying"."""
        db = os.path.join(shard.directory, "cache.db")
        cause = _unwrapped(exc)  # (diskcache raises it for any error of BEGIN: say which)
        held = ShardBusy(f"{db}: {cause}" if cause is not None
                         else f"{db} stayed locked by another connection for {self.lock_wait:g}s")
        held.__cause__ = exc
        return held

    def stop_waiting(self) -> None:
        """From now on a shard's held write lock is given up at once (``ShardBusy``, a purge's
        503), not waited for up to BUSY_PATIENCE: the process is stopping."""
        self._stopping.set()

    def _patiently(self, call: Callable[[], T]) -> T:
        return patiently(call, stopping=self._stopping)

    def close(self) -> None:
        self._stopping.set()
        for s in self._shards:
            s.close()

    def marked(self, index: int) -> bool:
        """Whether shard ``index`` was found damaged while running, by this process or another
        (its mark beside its database): its entries are misses until the next start sets it
        aside, so an entry a purge could not delete from it is never served."""
        if index in self._damaged:
            return True
        now = time.monotonic()
        if now - self._marks_seen[index] < MARK_EVERY:
            return False
        self._marks_seen[index] = now
        if os.path.exists(self._marks[index]):
            self._damaged[index] = "marked by another process"
            return True
        return False

    def noticed(self, index: int, exc: BaseException) -> bool:
        """Whether ``exc``, raised by shard ``index``, is damage to that shard: an I/O error, a
        malformed image or not a database (DAMAGED_CODES) that ``PRAGMA quick_check`` on a
        connection of its own confirms, or a database that cannot be opened because its file
        or folder is gone (removed while running). The first time: marked (``DAMAGED_MARK``;
        the next start sets the shard aside and makes it anew) and logged once, as an error.

        Anything else is transient and not damage (``transient`` says why): a held lock, a full
        filesystem, a read-only database, no file descriptors or memory left (EMFILE, ENFILE,
        SQLITE_NOMEM, a "cannot open" of a file that is there), a locking protocol error.
        Why: running out of file descriptors was taken for damage; healthy shards were marked
        (or not, the mark failing with EMFILE too) and purges answered 200 without deleting
        anything: after a restart the purged URLs were HITs again.

        Why at all: a shard cut short or missing its write-ahead log while running made every
        purge of a key on it fail with a 500 (its memory copy kept being served) or loop forever."""
        if self.marked(index):
            return True
        if not isinstance(exc, sqlite3.Error) or busy(exc) or _code(exc) == SQLITE_READONLY \
                or filesystem_full(self.path, exc):
            return False
        directory = self._shards[index].directory
        db_file = os.path.join(directory, "cache.db")
        code = _code(exc)
        if code == SQLITE_CANTOPEN and self.directory_gone() is not None:
            # The cache directory itself is gone (moved away, unmounted, another made in its
            # place): no damage of this shard, and writing its mark re-created a folder where the
            # directory had been (it could not be moved back). The owner's upkeep says it once.
            return False
        if code == SQLITE_CANTOPEN and not os.path.exists(db_file):
            problem: str | None = "its database file is gone"
        elif code is not None and code in DAMAGED_CODES:
            problem = _confirmed(db_file)
        else:
            problem = None
        if problem is None:
            return False
        self._damaged[index] = f"{exc}; {problem}"
        try:
            os.makedirs(directory, exist_ok=True)
            with open(self._marks[index], "w", encoding="utf-8") as f:
                f.write(f"{exc}; {problem}\n")
        except OSError as mark_error:
            self._unmarked[index] = str(mark_error)
            log.error("cannot mark disk shard %s damaged (%s): only this process stops reading "
                      "it; purges of its entries answer 503 until the mark can be written",
                      directory, mark_error)
        log.error("disk shard %s is damaged (%s; %s): its entries are misses from now on (purges "
                  "of them are complete: they are no longer read); the next start moves it "
                  "aside and starts it empty, or stop cachegate and delete it", directory, exc,
                  problem)
        return True

    def damaged_shards(self) -> dict[str, str]:
        """The shards found damaged while running (folder -> why), by this process or, as far as
        ``marked`` has looked, another: for /healthz and the metrics (no I/O)."""
        return {self._shards[i].directory: why for i, why in sorted(self._damaged.items())}

    def look_for_damage(self) -> dict[str, str]:
        """``damaged_shards`` after looking for other processes' marks (a stat per shard, at
        most once a second each)."""
        for i in range(len(self._shards)):
            self.marked(i)
        return self.damaged_shards()

    def lost_for_purges(self, index: int) -> bool:
        """Whether shard ``index`` may be given up by a purge (``update_many``'s ``lost``): it is
        marked on disk, so the next start sets it aside and nothing of it is ever served again.
        A shard found damaged whose mark could not be written is tried again here; while it
        cannot be, ``ShardUnavailable`` (the purge's 503): its entries would come back after a
        restart, and a purge that answered 200 must never come back."""
        if index not in self._unmarked:
            return True
        directory = self._shards[index].directory
        try:
            os.makedirs(directory, exist_ok=True)
            with open(self._marks[index], "w", encoding="utf-8") as f:
                f.write(f"{self._damaged.get(index, 'damaged')}\n")
        except OSError as mark_error:
            raise ShardUnavailable(
                f"the disk shard {directory} was found damaged ({self._damaged.get(index)}) but "
                f"cannot be marked so ({mark_error}): its entries could come back after a "
                "restart") from mark_error
        del self._unmarked[index]
        return True

    def _shard(self, key: str) -> diskcache.Cache:
        return self._shards[shard_of(key, len(self._shards))]

    # -- metadata ----------------------------------------------------------------------------

    def get_variants(self, key: str) -> tuple[Entry, ...]:
        index = shard_of(key, len(self._shards))
        if self.marked(index):  # (its entries are misses until the next start sets it aside)
            return ()
        shard = self._shards[index]
        blob = self._patiently(lambda: shard.get("m:" + key, default=None))
        if blob is None:
            return ()
        return decode_variants(blob)

    def has(self, key: str) -> bool:
        return ("m:" + key) in self._shard(key)

    def present(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` the disk holds: ``has`` for many, one query per shard and
        PRESENT_CHUNK keys (what ``Cache.__contains__`` asks: a live metadata row).

        Why: the index GC asks this of GC_BATCH keys every upkeep round; one ``has`` each took
        6.6 µs of the owner's CPU a key, this 1.3 (40,000 keys on disk over 8 shards, half of
        the 2,000 asked gone)."""
        names: dict[int, list[str]] = {}
        for k in keys:
            names.setdefault(shard_of(k, len(self._shards)), []).append("m:" + k)
        found: set[str] = set()
        now = time.time()
        for index, shard_names in names.items():
            if self.marked(index):
                continue  # (not read any more: as gone)
            execute = self._shards[index]._sql
            try:
                for i in range(0, len(shard_names), PRESENT_CHUNK):
                    marks, part = in_list(shard_names[i:i + PRESENT_CHUNK])
                    rows = execute(_PRESENT.format(marks), (now, *part))
                    found.update(row[0][2:] for row in rows)
            except sqlite3.Error as exc:
                if not self.noticed(index, exc):
                    raise
                found.difference_update(n[2:] for n in shard_names)
        return found

    def put_body(self, key: str, body_id: str, body: bytes | IO[bytes]) -> bool:
        """Copy a big body in, outside any transaction (the copy takes time); False when it timed
        out. A copy that fails (a full filesystem) leaves no file behind."""
        shard = self._shard(key)
        try:
            with shard.disk.taking_back():
                try:
                    ok = bool(shard.set("b:" + body_id, body, read=not isinstance(body, bytes), retry=False))
                except OSError as exc:  # (said now: the file is not taken back yet)
                    room = no_room(self.path, exc)
                    if room is None:
                        raise
                    raise room from exc
        except diskcache.Timeout as exc:
            self._lock_timeouts.failed(self._held(shard, exc))
            ok = False
        else:
            self._lock_timeouts.succeeded()
        # (A copy that timed out added nothing; a file copied was read to its end.)
        added = 0 if not ok else len(body) if isinstance(body, bytes) else body.tell()
        self._cull(shard, keep_body=body_id, added=added)
        if not ok:
            self.failed_writes += 1
        return ok

    def commit(self, key: str, merge: Merge) -> bool:
        """Rewrite a key's metadata in one transaction (``commit_many`` stores small bodies too).

        ``merge`` gets the key's current variants and returns the variants to keep and
        the body ids they no longer use; it runs under the shard's lock, so two
        processes storing different variants of one key do not lose one of them.
        False (counted in ``failed_writes``) when the shard lock timed out.
        """
        if self.marked(shard_of(key, len(self._shards))):
            return False  # (damaged: not read any more, so not written either)
        shard = self._shard(key)
        top = [0]
        cost = [0]
        try:
            with _transaction(shard):
                self._merge_locked(shard, key, _noting_seq(_with_bodies(shard, merge), top), cost=cost)
                _raise_seq(shard, top)
        except diskcache.Timeout as exc:
            self.failed_writes += 1
            self._lock_timeouts.failed(self._held(shard, exc))
            return False
        except BodyGone:
            self.failed_writes += 1  # (rolled back: nothing of it was written)
            return False
        self._lock_timeouts.succeeded()
        self._cull(shard, keep=(key,), added=cost[0])
        return True

    def commit_many(self, items: Sequence[tuple[str, Merge, str, bytes | None]],
                    new: Sequence[bool] | None = None, out_of_time: Callable[[], bool] | None = None,
                    raised: list[tuple[list[int], Exception]] | None = None) -> list[bool]:
        """``commit`` for many keys: one transaction per shard (``(key, merge, body id, small
        body)`` each, merged in order). Whether each was committed: a shard whose lock timed
        out (or whose merge failed) commits none of its items. ``new``: which keys are known
        not to be on disk (their metadata is not read first). ``out_of_time`` (a stop's
        deadline passed): the shards not begun yet are left out, uncommitted; one begun ends
        as it would (its COMMIT, or its lock's timeout), never cut off midway. ``raised``
        gets each shard that failed otherwise than by its lock's timeout (a full disk): the
        indexes of its items and its error, for the caller to report (write-behind: a `write`
        failure, ``Persister._report``); nothing here logs it. A stop retries only a lock's
        timeout until its deadline. Why: logged here on its own and reported nowhere, a shard
        that failed left ``/stats`` and ``cachegate_storage_errors_total`` silent, and a batch
        whose other shards committed counted as writes that succeed."""
        by_shard: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_shard.setdefault(shard_of(item[0], len(self._shards)), []).append(i)
        done = [False] * len(items)
        for index, positions in by_shard.items():
            if out_of_time is not None and out_of_time():
                break
            if self.marked(index):
                # Damaged (``noticed``): not read any more, so not written either. Why: every
                # write-behind batch failed on it, an error and a retry each time.
                continue
            shard = self._shards[index]
            # Keys known not to be on disk, with a body the database holds: inserted in bulk,
            # first (a later item of the same key in the batch merges with what they wrote).
            fresh = [i for i in positions if new is not None and new[i] and _inline(items[i][3])] \
                if self._bulk[index] else []
            taken = set(fresh)
            rest = [i for i in positions if i not in taken]
            top = [0]
            cost = [0]  # what the metadata written adds, there and in the index (``_meta_cost``)
            try:
                with _transaction(shard):
                    if fresh:
                        self._insert_new(shard, [(k, _noting_seq(m, top), b, v)
                                                 for k, m, b, v in (items[i] for i in fresh)], cost)
                    for i in rest:
                        key, merge, body_id, body = items[i]
                        if body is not None:
                            shard.set("b:" + body_id, body)
                        self._merge_locked(shard, key, _noting_seq(merge, top), new is not None and new[i],
                                           cost)
                    _raise_seq(shard, top)
            except diskcache.Timeout as exc:
                self.failed_writes += len(positions)
                self._lock_timeouts.failed(self._held(shard, exc))
                continue
            except Exception as exc:
                self.failed_writes += len(positions)
                if raised is not None:
                    raised.append((positions, exc))
                continue
            self._lock_timeouts.succeeded()
            self._cull(shard, keep=[items[i][0] for i in positions],
                       added=cost[0] + sum(_body_cost(items[i][3]) for i in positions))
            for i in positions:
                done[i] = True
        return done

    @staticmethod
    def _insert_new(shard: diskcache.Cache, items: Sequence[tuple[str, Merge, str, bytes | None]],
                    cost: list[int]) -> None:
        """``_merge_locked`` for keys the disk does not hold, with their small bodies: two
        ``executemany`` INSERTs instead of a SELECT and an INSERT per row through ``Cache.set``.
        Measured: ``commit_many`` of 10,000 new 1 KiB entries in batches of 200 over 8 shards,
        100 -> 55 µs of CPU per entry; the owner's CPU per fill under 2 workers' fill load,
        200 -> 155 µs. A key that was on disk after all (a worker wrote a big variant of it
        just now) is rewritten through ``set``, as before: its metadata row is replaced."""
        now = time.time()
        raw = diskcache.core.MODE_RAW
        bodies = []
        metas = []
        big: list[tuple[str, bytes]] = []
        dropped: list[str] = []  # bodies the merges give up (none expected: the keys held nothing)
        for key, merge, body_id, body in items:
            assert body is not None  # only items with a body the database holds come here
            bodies.append(("b:" + body_id, True, now, now, raw, body))
            variants, gone = merge(())
            dropped += gone
            if variants:
                blob = encode_variants(variants)
                cost[0] += _meta_cost(key, blob, variants)
                if _inline(blob):
                    metas.append(("m:" + key, True, now, now, raw, blob))
                else:
                    big.append(("m:" + key, blob))
        con = shard._con  # the connection of this thread, inside ``transact``
        con.executemany(_INSERT, bodies)
        if con.executemany(_INSERT, metas).rowcount != len(metas):
            big += [(row[0], row[5]) for row in metas]
        for name, blob in big:
            shard.set(name, blob)
        for old in dropped:
            shard.delete("b:" + old)

    def _cull(self, shard: diskcache.Cache, keep: Iterable[str] = (), keep_body: str | None = None,
              added: int = 0, spare_after: float | None = None, last_stage: int = LAST_STAGE,
              target: int | None = None) -> None:
        """Evict by the shard's policy while it is over its budget (after a write): whole
        entries (a key's metadata with every body it names, ``_evict``), never ``keep`` (the
        keys just written) nor ``keep_body`` (the body just put, its metadata not yet written)
        while anything else can go.

        Why not diskcache's ``cull``: it deletes 10 rows a pass whatever their size until the
        shard is under its budget, bodies and metadata alike: storing a 30 MB body beside two
        others in a 90 MB shard emptied the shard, the new entry with it (answered ``stored``,
        then a miss), and a body could go without its metadata (a variant that reads as a
        miss). Checking once per write (or batch) costs two queries; diskcache's culling inside
        every ``set`` cost three per set. Each round is one transaction of at most CULL_BATCH
        rows aiming at min(excess, budget / CULL_STEP), the volume measured again after it: a
        whole excess in one round held the lock for seconds and, its estimate below the pages
        freed, emptied a shard far over its budget. After CULL_TIME (or CULL_ROUNDS) the next
        write goes on, but not before the cull has freed ``added`` (about what the write put in,
        there and in the index: ``_meta_cost``) or CULL_DEBT_TIME has passed:
        a batch of 32 fills (1.5 MB) took three rounds, and a cull cut at 50 ms after two let the
        excess grow batch after batch (8 MB budget: 14 MB left after a flood on a slower
        machine). The owner's upkeep culls too (``cull_over``), for an excess no write
        added. ``target``: a volume to bring the shard under, below its budget (its share of the
        directory's excess over cache.disk.size: ``cull_over``). Each entry taken is told to
        ``on_evicted`` once its round committed."""
        def limit() -> int:
            budget = int(shard.size_limit)
            return budget if target is None else min(budget, target)

        try:
            over = self._volume(shard) - limit()
            if over <= 0:
                return
            kept = frozenset(keep)
            stage = 0
            start = time.monotonic()
            owed = added
            for n in range(CULL_ROUNDS):
                if n and time.monotonic() - start >= (CULL_TIME if owed <= 0 else CULL_DEBT_TIME):
                    return  # (the rest: the next writes, and the owner's upkeep)
                began = time.monotonic()
                evicted: list[tuple[str, int]] = []
                with _transaction(shard):
                    # Measured again under the lock: another process's cull may have freed it
                    # meanwhile, and two culls aiming at one stale excess emptied a shard.
                    budget = shard.size_limit
                    over = self._volume(shard) - limit()
                    if over <= 0:
                        return
                    aim = min(over + min(budget // 512, CULL_SLACK), max(budget // CULL_STEP, CULL_FLOOR, 1))
                    freed = _evict(shard, aim, kept, keep_body, stage, spare_after, evicted)
                if evicted:
                    self._tell_evicted(evicted)
                owed -= freed
                held = time.monotonic() - began
                over = self._volume(shard) - limit()
                if over <= 0:
                    return
                if freed == 0:
                    stage += 1
                    if stage > last_stage:
                        return
                else:
                    time.sleep(min(held, CULL_PAUSE))
        except diskcache.Timeout:
            pass  # busy: the next write culls

    def _volume(self, shard: diskcache.Cache) -> int:
        """The shard's volume (diskcache's: its database pages and value files), noted for
        ``weigh`` with its journals' bytes (its write-ahead log and its shared-memory file: two
        stats; a small cache's logs were a twentieth of it)."""
        volume = int(shard.volume())
        self._measured[shard.directory] = (volume, _journals(shard))
        return volume

    def _tell_evicted(self, evicted: list[tuple[str, int]]) -> None:
        """``on_evicted``; a failure there (the index locked or damaged) leaves the rows to the
        index GC, as before the hook, and never fails the cull, whose round has committed."""
        hook = self.on_evicted
        if hook is None:
            return
        try:
            hook(evicted)
        except (sqlite3.Error, OSError) as exc:
            log.debug("the index rows of %d entries culled from disk are left to the index GC (%s)",
                      len(evicted), exc)

    def delete_body(self, key: str, body_id: str) -> None:
        # Without retries: a shard whose lock is held would keep this thread forever (the write
        # that failed met the same lock); the body is then an orphan the sweep removes.
        with contextlib.suppress(diskcache.Timeout):
            self._shard(key).delete("b:" + body_id, retry=False)

    @staticmethod
    def _merge_locked(shard: diskcache.Cache, key: str, merge: Merge, absent: bool = False,
                      cost: list[int] | None = None) -> bool:
        """``merge`` applied to the key's metadata, under the shard's lock; whether it had any.
        ``cost`` gets what the metadata written adds (``_meta_cost``)."""
        current = None if absent else shard.get("m:" + key, default=None)
        before = decode_variants(current) if current is not None else ()
        variants, dropped = merge(before)
        if variants != before:
            if variants:
                blob = encode_variants(variants)
                shard.set("m:" + key, blob)
                if cost is not None:
                    cost[0] += _meta_cost(key, blob, variants)
            else:
                shard.delete("m:" + key)
        for old in dropped:
            shard.delete("b:" + old)
        return bool(before)

    def update_many(self, keys: Iterable[str], merge: Merge, retry: bool = True,
                    lost: list[str] | None = None) -> list[str]:
        """Apply ``merge`` to many keys, one transaction per shard and batch; return the keys found.

        ``retry=False``: ``ShardBusy`` once a shard's write lock stayed held for the shards'
        ``timeout`` (the batches before it are committed); with retries, for BUSY_PATIENCE
        seconds. ``lost``: the keys of shards found damaged (``noticed``, or marked before) go
        there instead of raising: they are no longer read."""
        by_shard: dict[int, list[str]] = {}
        for k in keys:
            by_shard.setdefault(shard_of(k, len(self._shards)), []).append(k)
        found: list[str] = []
        for i, ks in by_shard.items():
            shard = self._shards[i]
            if lost is not None and self.marked(i) and self.lost_for_purges(i):
                lost += ks
                continue
            for start in range(0, len(ks), 500):  # bounded lock hold time
                try:
                    with _transaction(shard, retry=retry):
                        for k in ks[start:start + 500]:
                            if self._merge_locked(shard, k, merge):
                                found.append(k)
                except diskcache.Timeout as exc:
                    raise ShardBusy(os.path.join(shard.directory, "cache.db")) from exc
                except sqlite3.Error as exc:
                    if lost is None:
                        raise
                    if filesystem_full(self.path, exc):
                        raise  # (the purge's 503 naming the full filesystem)
                    if not self.noticed(i, exc):
                        raise ShardUnavailable(
                            f"the disk shard {shard.directory} could not be written: {exc} "
                            f"({_describe(exc)})") from exc
                    self.lost_for_purges(i)
                    lost += ks
                    break
        return found

    def delete_keys(self, keys: Iterable[str], retry: bool = True,
                    lost: list[str] | None = None) -> list[str]:
        """Remove keys with all their variants and bodies; return those found (``lost``: as
        ``update_many``)."""
        return self.update_many(keys, drop_all, retry, lost)

    # -- bodies ------------------------------------------------------------------------------

    def get_body(self, key: str, body_id: str, size: int | None = None) -> bytes | IO[bytes] | None:
        """The body: bytes when small, an open file when stored as a file, None when gone."""
        shard = self._shard(key)
        if size is not None and size < INLINE_LIMIT:  # kept in the database: no file to open
            small = self._patiently(lambda: shard.get("b:" + body_id, default=None))
            return small if small is None or isinstance(small, bytes) else None
        value = self._patiently(lambda: shard.get("b:" + body_id, default=None, read=True))
        if isinstance(value, io.BytesIO):
            return value.getvalue()
        return value  # type: ignore[no-any-return]

    # -- whole tier --------------------------------------------------------------------------

    def clear(self) -> None:
        """Empty every shard; a damaged one (``noticed``) is left as it is: it is no longer read."""
        for i, s in enumerate(self._shards):
            if self.marked(i):
                continue
            try:
                self._patiently(lambda: s.clear(retry=False))  # noqa: B023 (called at once)
            except sqlite3.Error as exc:
                if not self.noticed(i, exc):
                    raise

    def high_seq(self) -> int:
        """The highest commit sequence number stored in any shard (0: none noted; a damaged
        shard's is not read)."""
        top = 0
        for i, shard in enumerate(self._shards):
            if self.marked(i):
                continue
            try:
                row = shard._sql("SELECT seq FROM cachegate_seq WHERE id = 0").fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table: cachegate_seq" in str(exc):
                    continue  # (a worker, before the owner made it)
                if not self.noticed(i, exc):
                    raise
                continue
            except sqlite3.Error as exc:
                if not self.noticed(i, exc):
                    raise
                continue
            if row:
                top = max(top, int(row[0]))
        return top

    def has_entries(self) -> bool:
        """Whether any shard holds a row (diskcache's own count: no scan)."""
        return any(len(s) for s in self._shards)

    def keys_page(self, after: str, limit: int) -> list[str]:
        """The disk's keys (metadata records) after ``after``, in key order, at most ``limit``:
        a sweep of every entry that does not go by the index (a purge of everything)."""
        found: list[str] = []
        for i, shard in enumerate(self._shards):
            if self.marked(i):
                continue  # damaged: not read (its entries miss; set aside at the next start)
            try:
                rows = shard._sql("SELECT key FROM Cache WHERE raw = 1 AND key > ? AND key < 'm;'"
                                  " ORDER BY key LIMIT ?", ("m:" + after, limit)).fetchall()
            except sqlite3.Error as exc:
                if not self.noticed(i, exc):
                    raise
                continue
            found += [r[0][2:] for r in rows if isinstance(r[0], str)]
        return sorted(found)[:limit]

    def count_index(self, index_bytes: int) -> int:
        """Take the index's bytes (``index_bytes``: its file and journals) and the shards'
        journals (as last measured) past their share off each shard's budget
        (``shard_budget_beside``); the shard budget now. The owner's upkeep calls this every
        round, then ``cull_over``, and write-behind before and after each part's index rows;
        the culls drop their entries' index rows. Only this process's view: the owner is the
        one that writes and culls."""
        journals = sum(j for _, j in self._measured.values())
        limit = shard_budget_beside(self.size_limit, len(self._shards), index_bytes + journals)
        self.use_budget(limit)
        self._tell_budget(index_bytes)
        return limit

    def _tell_budget(self, index_bytes: int) -> None:
        """Log the budget in force when it changed much since last said (by an eighth of the
        configured one, or to the configured one or the floor): once per change, not every
        round while a growing index lowers it a little each time. Why: operators saw big fills
        TOO-LARGE under a max_object far above them, with nothing saying the limit had moved."""
        budget, told, usual = self.budget, self._told_budget, self.shard_limit
        if budget == told:
            return
        floor = shard_budget_beside(self.size_limit, len(self._shards), 1 << 62)
        if abs(budget - told) < max(1, usual // 8) and budget not in (usual, floor):
            return
        self._told_budget = budget
        if budget < usual:
            log.info("disk shards' budget now %s of %s configured (the URL index takes %s): bodies over %s "
                     "are not stored", human_size(budget), human_size(usual), human_size(index_bytes),
                     human_size(self.max_body))
        else:
            log.info("disk shards' budget back to the configured %s (the URL index takes %s): the disk tier "
                     "takes bodies up to %s again (within cache.max_object)", human_size(usual),
                     human_size(index_bytes), human_size(self.max_body))

    def use_budget(self, limit: int) -> None:
        """Each shard's budget in force (never past the configured one), and with it
        ``max_body``, half of it. Why: a body stored under a budget lowered since was over half a
        shard, and the owner's next cull took it with the rest of its shard (a 900 KB fill
        answered stored was gone 5 s later, once the index had lowered 1.8 MB shards to 256
        KB); a budget raised again (the index shrank) raises it again."""
        limit = max(1, min(limit, self.shard_limit))
        self.budget = limit
        self.max_body = limit // 2
        for shard in self._shards:
            shard.size_limit = limit

    def follow_budget(self, published: int) -> None:
        """A budget the owner published (``Arena.shard_budget``; 0: none yet) is this process's
        too: the writes' storable limit and their culls follow it. Only a change of what was
        published is followed: the owner counts its own first (``count_index``), and the value
        published a moment later must not take it back meanwhile. Cheap when unchanged (a fill
        asks each time)."""
        if published != self._followed:
            self._followed = published
            if published:
                self.use_budget(published)

    def cull_over(self, excess: int = 0, index_bytes: int = 0) -> None:
        """Cull each shard over its budget, CULL_TIME each (the owner's upkeep, every round),
        and while the directory is over cache.disk.size (``excess``: what ``weigh`` found) each
        shard past its budget by its share of that excess too, as long as freeing it takes (up
        to CULL_DEBT_TIME a shard), sparing entries stored in the last CULL_SPARE seconds:
        other processes' writes cull for
        themselves, and an upkeep cull taking the newest entries lost fills answered `stored`
        (2 workers, a shard far over budget after a restart with a smaller size). A shard whose
        filesystem is full or whose lock is held is left for the next round.
        Why: a write's cull repays what it added, and only then works on an older excess for
        what is left of CULL_TIME; an excess no write added (the budget lowered as the index
        grew, a smaller ``cache.disk.size`` at a restart) stayed once writes stopped (4 MB of
        long-key entries on a loaded machine: 12.9 MB on disk for good). Possible since the
        budget floor (``shard_budget_beside``): a budget is never below what an empty shard
        takes; bodies not yet named by their entry are never taken (stage 0 takes whole
        entries only). The entries taken for the excess drop their index rows too
        (``on_evicted``), so the excess is shared by the shards' volumes last measured and the
        index's (``index_bytes``): culling a slice of the shards frees about as large a slice of
        the index, and the whole excess taken from the shards alone would be several times too
        much beside an index several times their size. (A round that frees less is followed by
        the next.)"""
        spare_after = time.time() - CULL_SPARE
        measured = sum(volume for volume, _ in self._measured.values())
        for i, shard in enumerate(self._shards):
            if self.marked(i):
                continue  # (damaged: set aside at the next start)
            share = target = None
            if excess > 0 and measured > 0:
                volume = self._measured.get(shard.directory, (0, 0))[0]
                share = -(-excess * volume // (measured + index_bytes))  # (rounded up)
                target = volume - share
            try:
                self._cull(shard, spare_after=spare_after, last_stage=0, added=share or 0, target=target)
            except sqlite3.Error as exc:
                if busy(exc) or filesystem_full(self.path, exc):
                    continue  # (the next round; a full filesystem ended every round's upkeep)
                if not self.noticed(i, exc):
                    raise

    def excess(self, index_bytes: int) -> int:
        """How far the shards with their journals (as last measured) and the URL index
        (``index_bytes``: its file and journals) are past cache.disk.size (0 or less: within)."""
        return sum(v + j for v, j in self._measured.values()) + index_bytes - self.size_limit

    def weigh(self, index_bytes: int) -> int:
        """The owner (every upkeep round and write-behind part): ``excess``, and ``full`` from
        it: set once the shards, the index and their journals pass cache.disk.size by more than
        SIZE_SLACK of it (new entries stay off the disk: write-behind keeps them in memory
        only, and bodies too big for memory are not stored), cleared once they are back within
        the size. Said once an episode, as a warning (at most once a minute, with the episodes
        begun since: culls that only just keep up end one and begin another every few seconds),
        and its end at INFO. Cheap: a sum of a few numbers."""
        size = self.size_limit
        excess = self.excess(index_bytes)
        if not self.full and excess > size * SIZE_SLACK:
            self.full = True
            now = time.monotonic()
            self._full_said = now - self._full_told >= FULL_TELL_EVERY
            if not self._full_said:
                self._full_untold += 1
                return excess
            since = (f"; {self._full_untold} more time(s) in the last {now - self._full_told:.0f}s"
                     if self._full_untold else "")
            self._full_told, self._full_untold = now, 0
            log.warning("disk tier over cache.disk.size (%s): its shards, the URL index and their journals "
                        "take %s (the index %s); new entries are kept in memory only, not written to disk, "
                        "and bodies too big for memory are not stored (DISK-OVER-SIZE), until culls bring "
                        "it back within%s", human_size(size), human_size(size + excess),
                        human_size(index_bytes), since)
        elif self.full and excess <= 0:
            self.full = False
            if self._full_said:
                log.info("disk tier back within cache.disk.size (%s): its shards, the URL index and their "
                         "journals take %s; new entries are written to disk again", human_size(size),
                         human_size(size + excess))
        return excess

    def capacity(self) -> int:
        """The bytes the shards may hold now (``volume`` is culled to this): each shard's budget
        in force times the shards; the rest of cache.disk.size is the index's and the journals'
        (RESERVE)."""
        return self.budget * len(self._shards)

    def volume(self) -> int:
        """Bytes on disk as diskcache counts them (database pages and value files); a damaged
        shard's are not read (they made /metrics and /stats a 500 once one was found)."""
        return sum(self._per_shard(lambda s: int(s.volume())))

    def count(self) -> int:
        return sum(self._per_shard(len))

    def _per_shard(self, read: Callable[[diskcache.Cache], int]) -> list[int]:
        """``read`` of each shard not found damaged (``noticed``: one that fails now is, or the
        error is raised)."""
        values: list[int] = []
        for i, s in enumerate(self._shards):
            if self.marked(i):
                continue
            try:
                values.append(read(s))
            except sqlite3.Error as exc:
                if not self.noticed(i, exc):
                    raise
        return values

    def iter_keys(self) -> list[str]:
        """Every key on disk (a damaged shard's, ``noticed``, are not read)."""
        found: list[str] = []
        for i, s in enumerate(self._shards):
            if self.marked(i):
                continue
            try:
                found += [k[2:] for k in s.iterkeys() if isinstance(k, str) and k.startswith("m:")]
            except sqlite3.Error as exc:
                if not self.noticed(i, exc):
                    raise
        return found

    def checkpoint(self) -> None:
        """Fold each shard's write-ahead log back into its database and truncate it.

        SQLite's automatic checkpoints cannot restart the log while another connection
        reads an older snapshot, so under steady traffic the WAL outgrows its limit;
        the owner's upkeep calls this every round (a no-op when the log is empty).
        """
        for i, shard in enumerate(self._shards):
            if self.marked(i):
                continue  # (damaged: set aside at the next start)
            # A folder gone (moved away, unmounted) raises here: the upkeep logs it once and says
            # when it works again (``RepeatedFailure``); skipped, nothing said it at all.
            db = sqlite3.connect(os.path.join(shard.directory, "cache.db"), timeout=0.2,
                                 isolation_level=None)
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError:
                pass  # busy: the next round tries again
            finally:
                db.close()
            if shard.directory in self._measured:  # (its journals as they are now: ``weigh``)
                self._measured[shard.directory] = (self._measured[shard.directory][0], _journals(shard))

    def disk_usage(self) -> int:
        """Every byte under the cache directory (what ``du`` would say, roughly)."""
        total = 0
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, f))
        return total

    # -- a new shard count ---------------------------------------------------------------------

    def relayout(self, listed: Callable[[list[str]], set[str]]) -> Relayout | None:
        """Bring a cache directory laid out for another shard count (``cache.disk.shards`` changed
        since it was written) to this one: the owner, at start, before anything is served.

        Each entry (its metadata with every body it names) whose shard changed is copied into
        its new shard in one transaction, then deleted from the old one in another, and the
        folders past the count are removed; an entry that cannot be moved (a body missing or
        over half the new shard, a write that fails, a key the index (``listed``) does not
        list, which a purge would not find) is dropped whole. The count done is recorded last
        (``LAYOUT_FILE``), so a start that dies meanwhile leaves it unrecorded and the next
        start does the rest: an entry found in both shards is the copy that was made (the one
        in its new shard is kept unless the old one was stored later). None when the
        directory was already laid out for this count (nothing read beyond one small file).

        Why: the shard of a key is ``crc32 % shards``: with a new count half the entries (or
        more) were looked for in another shard than theirs (misses), and folders past the
        count stayed on disk for good, outside the budget, /stats, the culls and every purge,
        so a purged URL came back when the count was changed back."""
        try:
            return self._relayout(listed)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            # Not recorded as done: the next start goes on with it. Meanwhile the entries not
            # moved yet are misses, and a purge drops their index rows: then they are dropped,
            # never moved back in.
            log.error("cannot bring the cache directory %s to cache.disk.shards: %d (%s): the "
                      "entries not moved yet are misses; the next start tries again",
                      self.path, len(self._shards), exc)
            return None

    def _relayout(self, listed: Callable[[list[str]], set[str]]) -> Relayout | None:
        count = len(self._shards)
        recorded = recorded_shards(self.path)
        surplus = [i for i in shard_folders(self.path) if i >= count]
        moving = os.path.join(self.path, MOVING_FILE)
        interrupted = os.path.exists(moving)
        for name in os.listdir(self.path):  # (folders a killed relayout was removing)
            if name.endswith(REMOVING) and name[:-len(REMOVING)].isdigit():
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        if recorded == count and not surplus and not interrupted:
            return None
        began = time.monotonic()
        done = Relayout(recorded, count)
        if recorded != count or interrupted:  # (None: never recorded: from before the record)
            mark_moving(self.path, recorded, count)
            for i, shard in enumerate(self._shards):
                if not self.marked(i):
                    self._move_out(shard, i, listed, done)
        for i in surplus:
            directory = os.path.join(self.path, f"{i:03d}")
            try:
                if os.path.exists(os.path.join(directory, DAMAGED_MARK)):
                    raise sqlite3.DatabaseError(f"marked damaged ({DAMAGED_MARK})")
                source = self._make_shard(directory)
            except (sqlite3.Error, OSError) as exc:
                log.warning("disk shard %s (past cache.disk.shards: %d) cannot be read (%s): "
                            "removed with its entries", directory, count, exc)
                done.unreadable += 1
            else:
                try:
                    self._move_out(source, i, listed, done)
                finally:
                    source.close()
            # Renamed first: a start killed inside rmtree (cache.db goes first) left a folder no
            # longer a shard's, and no later start removed it; a renamed one goes at the next.
            doomed = directory + REMOVING
            os.replace(directory, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            done.removed += 1
        for shard in self._shards:
            if done.seq:
                with _transaction(shard, retry=True):
                    _raise_seq(shard, [done.seq])
            over = shard.volume() - shard.size_limit
            if over > 0:  # (the entries over the new budget go as eviction would take them)
                self._cull(shard, added=over)
        record_shards(self.path, count)
        with contextlib.suppress(FileNotFoundError):
            os.remove(moving)
        done.seconds = time.monotonic() - began
        if recorded in (None, count) and not done.moved and not done.dropped and not surplus:
            return None  # (first start since the record, or nothing left to do: this layout)
        if recorded != count:
            what = (f"cache.disk.shards changed ({recorded if recorded is not None else 'unrecorded'}"
                    f" -> {count})")
        elif interrupted:
            what = f"an interrupted move of the cache directory to {recorded} shards finished"
        else:  # (folders past the count that no move of ours left: another program made them)
            what = (f"shard folders past cache.disk.shards: {count} were found, made by another "
                    f"program (an earlier release run with more shards?)")
        log.warning("%s: %d entries moved to their new shard, %d dropped (unmovable or unlisted), "
                    "%d folders past %d removed, in %.1f s", what, done.moved, done.dropped,
                    done.removed, count - 1, done.seconds)
        return done

    def _move_out(self, source: diskcache.Cache, index: int,
                  listed: Callable[[list[str]], set[str]], done: Relayout) -> None:
        """Move the entries of ``source`` (folder ``index``) whose shard is another one now."""
        count = len(self._shards)
        with contextlib.suppress(sqlite3.OperationalError):  # (no table: none noted)
            row = source._sql("SELECT seq FROM cachegate_seq WHERE id = 0").fetchone()
            done.seq = max(done.seq, int(row[0]) if row else 0)  # (``high_seq``: they come along)
        after = "m:"
        while True:
            rows = source._sql("SELECT key, store_time, access_time, access_count FROM Cache"
                               " WHERE raw = 1 AND key > ? AND key < 'm;' ORDER BY key LIMIT ?",
                               (after, MOVE_BATCH)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            away = [r for r in rows if isinstance(r[0], str)
                    and (index >= count or shard_of(r[0][2:], count) != index)]
            if not away:
                continue
            known = listed([r[0][2:] for r in away])
            by_shard: dict[int, list[tuple[str, float, float, int]]] = {}
            for name, stored, accessed, uses in away:
                key = name[2:]
                if key in known:
                    by_shard.setdefault(shard_of(key, count), []).append((key, stored, accessed, uses))
                else:
                    done.dropped += 1
            gone: list[str] = [r[0][2:] for r in away]
            for target, items in by_shard.items():
                if self.marked(target):
                    done.dropped += len(items)
                    continue
                try:
                    with _transaction(self._shards[target], retry=True):
                        moved = sum(self._copy_in(source, self._shards[target], item, done)
                                    for item in items)
                except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
                    log.warning("moving %d entries into disk shard %s failed (%s): dropped",
                                len(items), self._shards[target].directory, exc)
                    done.dropped += len(items)
                    continue
                done.moved += moved
                done.dropped += len(items) - moved
            with _transaction(source, retry=True):
                for key in gone:
                    _delete_entry(source, key)

    def _copy_in(self, source: diskcache.Cache, target: diskcache.Cache,
                 item: tuple[str, float, float, int], done: Relayout) -> bool:
        """Inside ``target``'s transaction: copy one entry from ``source`` unless ``target``
        holds it already from as late (a move a crash cut short); whether it is there now."""
        key, stored, accessed, uses = item
        name = "m:" + key
        there = target._sql("SELECT store_time FROM Cache WHERE raw = 1 AND key = ?", (name,)).fetchone()
        if there is not None and there[0] >= stored:
            return True
        meta = source.get(name, default=None)
        if not isinstance(meta, bytes):
            return False
        refs = body_refs(meta)
        if any(size > self.max_body for _, size in refs):
            return False  # (as big a body is not stored in a shard this size)
        bodies: list[tuple[str, Any]] = []
        try:
            for body_id, _ in refs:
                value = source.get("b:" + body_id, default=None, read=True)
                if value is None:
                    return False  # (an entry without its body is no entry: dropped whole)
                bodies.append(("b:" + body_id, value))
            if there is not None:
                _delete_entry(target, key)
            for body_name, value in bodies:
                if isinstance(value, io.BytesIO):
                    value = value.getvalue()
                target.set(body_name, value, read=not isinstance(value, bytes))
            target.set(name, meta)
        finally:
            for _, value in bodies:
                if hasattr(value, "close"):
                    value.close()
        marks, names = in_list([name] + [b for b, _ in bodies])
        target._sql(f"UPDATE Cache SET store_time = ?, access_time = ?, access_count = ?"
                    f" WHERE raw = 1 AND key IN ({marks})", (stored, accessed, uses, *names))
        return True

    def sweep_intents(self, intents: list[tuple[str, str]]) -> int:
        """Remove the bodies of a dead process's intent log that no metadata refers to."""
        removed = 0
        for key, body_id in intents:
            shard = self._shard(key)
            if ("b:" + body_id) not in shard:
                continue
            if any(e.body_id == body_id for e in self.get_variants(key)):
                continue
            with contextlib.suppress(diskcache.Timeout):
                if self._patiently(lambda: shard.delete("b:" + body_id)):  # noqa: B023 (called at once)
                    removed += 1
        return removed

    def sweep_stray_files(self, before: float) -> int:
        """Remove value files older than ``before`` that no row refers to (a crash inside diskcache's set)."""
        return sum(self._sweep_files(shard, before) for shard in self._shards)

    def sweep_orphans(self, before: float) -> int:
        """Remove bodies no metadata refers to and files no row refers to; return how many.

        A full repair: it decodes every metadata record, so upkeep does not run it
        (intent logs find a crash's orphans; see ``sweep_intents``). An orphan is what
        a crash between "body written" and "metadata written" leaves behind. Only what
        was created before ``before`` is considered: pass the start-up time when no
        other process writes yet, or a time well in the past (``ORPHAN_AGE``) while
        other processes may be writing.
        """
        removed = 0
        for shard in self._shards:
            removed += self._sweep_bodies(shard, before)
            removed += self._sweep_files(shard, before)
        return removed

    def _sweep_bodies(self, shard: diskcache.Cache, before: float) -> int:
        bodies: list[str] = []
        metas: list[str] = []
        for k in shard.iterkeys():
            if isinstance(k, str):
                if k.startswith("b:"):
                    bodies.append(k[2:])
                elif k.startswith("m:"):
                    metas.append(k)
        candidates = {b for b in bodies if body_time(b) < before}
        if not candidates:
            return 0
        for m in metas:
            blob = self._patiently(lambda: shard.get(m, default=None))  # noqa: B023 (called at once)
            if blob is not None:
                candidates.difference_update(e.body_id for e in decode_variants(blob))
        for b in candidates:
            self._patiently(lambda: shard.delete("b:" + b))  # noqa: B023 (called at once)
        return len(candidates)

    def _sweep_files(self, shard: diskcache.Cache, before: float) -> int:
        old: list[str] = []
        for dirpath, _, files in os.walk(shard.directory):
            for f in files:
                if not f.endswith(".val"):
                    continue
                full = os.path.join(dirpath, f)
                try:
                    if os.path.getmtime(full) < before:
                        old.append(full)
                except OSError:
                    pass
        if not old:
            return 0
        # Read diskcache's own table (read-only) for the files its rows refer to; listed
        # after the walk, so a file committed in between counts as referenced.
        db = sqlite3.connect(f"file:{os.path.join(shard.directory, 'cache.db')}?mode=ro", uri=True,
                             timeout=30)
        try:
            referenced = {os.path.join(shard.directory, r[0]) for r in
                          db.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        finally:
            db.close()
        removed = 0
        for full in old:
            if full not in referenced:
                with contextlib.suppress(OSError):
                    os.remove(full)
                    removed += 1
        return removed
