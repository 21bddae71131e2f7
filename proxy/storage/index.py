"""The URL and tag index beside the disk tier, and the bans that make big purges O(1).

A small SQLite database (stdlib ``sqlite3``, WAL) in the cache directory, shared by
every worker process:

- ``entries``: the keys, each with a commit sequence number (``seq``, AUTOINCREMENT:
  strictly increasing across processes, never reused). Every commit of a variant
  takes a new ``seq`` and stores it in the variant's metadata.
- ``tags``: (tag, key) pairs, for purge by tag without a scan.
- ``bans``: a purge by tag, prefix or "all" is recorded as a ban ``(kind, value,
  soft, seq)``: it hides every variant with that tag (or URL prefix, or any) whose
  ``seq`` is at most the ban's. Recording a ban is one INSERT, whatever the number
  of entries it covers, and a sweeper deletes the covered entries afterwards in
  batches (Varnish's "ban lurker"). Deleting 100k entries synchronously costs one
  metadata read and two diskcache deletes each: seconds, not the 2 s budget. A ban's
  ``seq`` is at least the highest the disk holds (``DiskTier.high_seq``), whatever this
  index numbered, and the index's numbering is raised to it.

A key's URL is not stored: it is the key up to its first ``\x1f`` (``url_of_key``), so the keys
of a URL are a range of the key's own index (``keys_for_url``). A column of its own, indexed,
held each URL twice more: with 8,000-byte query strings, 32 KB of index per entry.

An index missing, or older than the shards (restored from a copy, or brought back older by a
power loss: it commits with ``synchronous=NORMAL``, as the shards do, so two files keep no order
then), lists none of the entries past it: the owner empties the disk tier at start
(``unlisted``), as it does when the index is damaged. Not ``FULL``: its fsync per write-behind
batch cost 16-23 µs of the owner's CPU per fill (1 KiB fills, 2 workers, per-process CPU over
8 s: 84-95 against 65-69 µs), about 5 % of a fill, to keep the cache through a power loss.

The index may hold rows for entries the disk tier has since culled (diskcache
evicts without telling anyone); ``live_keys`` lets the sweeper drop them, so the
index does not grow forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from proxy.room import FilesystemFull, NoRoomToConvert, NotWritable, filesystem_full, human_size
from proxy.storage.disk import IN_LIST_MAX, damaged, identity, in_list, not_writable, set_aside

log = logging.getLogger("cachegate.storage")

BanKind = Literal["tag", "prefix", "all"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tag, key))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_key ON tags (key);
CREATE TABLE IF NOT EXISTS bans (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, value TEXT NOT NULL,
    soft INTEGER NOT NULL, seq INTEGER NOT NULL);
"""

_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
_JOURNALS = ("-journal", "-wal", "-shm")
# The conversion's page cache (KiB): 64 MB took a million entries' copy from 8.2 s to 4.0 s.
_CONVERT_CACHE_KIB = 64 << 10
VACUUM_STEP = 1024  # pages given back between two checkpoints (4 MB of WAL at most)
BUSY_TIMEOUT = 30.0  # seconds a statement waits for the database's lock
# Tag rows one transaction of ``remove_stale`` deletes at most (then it commits and goes on): each
# takes a page or two of the write-ahead log, which only a checkpoint between transactions lets
# SQLite reuse. In one transaction, the rows of a cull round's 7 entries of 1,000 tags each put
# 2.5 MB in the log beside a 32 MB cache.disk.size (a GC batch of 2,000 such keys: hundreds).
REMOVE_ROWS = 1024
CHECKPOINT_WAIT = 0.02  # seconds ``checkpoint`` waits for it (then the next round tries again)

_ADD_TAG = "INSERT OR IGNORE INTO tags (tag, key) VALUES (?, ?)"


def _quick_check(db: sqlite3.Connection) -> str | None:
    """What ``PRAGMA quick_check`` finds wrong with the database (None: nothing). It reads every
    page of the index (not the schema alone, as opening it does): measured at 100,000 entries
    with two tags each (a 42 MB file), 0.1 s (40 ms of CPU) with the file in the page cache,
    0.7 s out of it."""
    rows = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)").fetchall()]
    # (one line: a row says "*** in database main ***" and its pages on lines of its own)
    return None if rows == ["ok"] else "; ".join(line.strip() for r in rows for line in r.splitlines())


def _needs_conversion(db: sqlite3.Connection) -> bool:
    """Whether an index is of an earlier release (``UrlTagIndex._convert``): a URL column, or
    made without auto_vacuum."""
    columns = {str(r[1]) for r in db.execute("PRAGMA table_info(entries)").fetchall()}
    return "url" in columns or db.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL


def of_earlier_release(file: str) -> bool:
    """Whether the index at ``file`` is of a release from before the key scheme record
    (``proxy.storage.disk.KEY_SCHEME``), the one whose index ``_convert`` converts: its entries'
    keys and Vary values follow older matching rules. Read before it is converted (False: no
    file, or one SQLite cannot read: the repair of a damaged index empties the disk tier)."""
    if not os.path.exists(file):
        return False
    try:
        with contextlib.closing(sqlite3.connect(file, timeout=30, isolation_level=None)) as db:
            return _needs_conversion(db)
    except sqlite3.Error:
        return False


def _probe_write(db: sqlite3.Connection) -> None:
    """A write, to learn now whether the file can be written: SQLite opens a read-only file
    read-only without a word, and only every commit failed after the start."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    db.execute(f"PRAGMA user_version = {int(version)}")


def _remove(file: str) -> None:
    """Remove a database file and its journals, those that exist."""
    for suffix in ("", *_JOURNALS):
        with contextlib.suppress(FileNotFoundError):
            os.remove(file + suffix)


def _keep_owner(old: str, new: str) -> None:
    """Give ``new`` the mode (and, as root, the owner) of the file it replaces."""
    st = os.stat(old)
    os.chmod(new, stat.S_IMODE(st.st_mode))
    if os.geteuid() == 0:
        os.chown(new, st.st_uid, st.st_gid)


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back what a failed transaction began, if SQLite has not already: on a full disk it
    rolls back by itself, and a ROLLBACK then raised "cannot rollback - no transaction is
    active" in place of the error that says why ("database or disk is full")."""
    if db.in_transaction:
        db.execute("ROLLBACK")


@dataclass(frozen=True, slots=True)
class Ban:
    id: int
    kind: BanKind
    value: str  # the tag or URL prefix; "" for all
    soft: bool  # mark stale instead of removing
    seq: int  # hides variants with seq <= this

    def to_json(self) -> list[object]:
        return [self.id, self.kind, self.value, self.soft, self.seq]

    @classmethod
    def from_json(cls, v: list[Any]) -> Ban:
        kind: BanKind = v[1]
        return cls(int(v[0]), kind, str(v[2]), bool(v[3]), int(v[4]))


class UrlTagIndex:
    def __init__(self, path: str, wal_limit: int = 1 << 20, repair: bool = False) -> None:
        """``repair`` (the process that owns the cache directory, at start): an index SQLite
        cannot read is set aside and made anew, empty, and ``recreated`` says so: the disk
        tier's entries are then emptied too (``DiskTier(empty=True)``), since entries the index
        does not list would escape purges by URL or tag, and their sequence numbers would
        escape the bans of the new numbering."""
        os.makedirs(path, exist_ok=True)
        self._wal_limit = wal_limit
        self.file = os.path.join(path, "index.sqlite3")
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.recreated = False
        # Made at this open (no file before it): the shards may hold entries it does not list.
        self.created = not os.path.exists(self.file)
        # Why this index is damaged, once a process found it so (``noticed``): it can no longer
        # say which entries a purge covers (``proxy.storage.purging`` then empties the disk
        # tier), and the next start sets it aside (its mark: ``damaged_mark``).
        self.damage: str | None = None
        self.damaged_mark = self.file + ".damaged"
        self._marked_by_other: str | None = None  # ``known_damage``: the mark another process left
        problem: str | None = None
        try:
            if repair and not self.created and self._marked() is None:
                self._convert()
            self._create()
            if repair:
                problem = self._marked() or _quick_check(self._db())
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, FilesystemFull):  # the conversion's: it says what needs the room
                self.close()
                raise
            if filesystem_full(path, exc):  # sound, only without room: never set aside for that
                self.close()
                raise FilesystemFull(path, exc) from exc
            if isinstance(exc, sqlite3.Error) and not_writable(exc):  # a setting: nor that
                self.close()
                raise NotWritable(self.file, exc) from exc
            if not repair or not isinstance(exc, sqlite3.Error) or not damaged(exc):
                raise
            problem = str(exc)
        if problem is not None:
            self.close()
            aside = set_aside(self.file)
            for journal in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.file + journal, aside + journal)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.damaged_mark)
            log.warning("cache index %s is damaged (%s): moved aside to %s and started empty, "
                        "with the disk tier emptied too (its entries are misses)", self.file, problem, aside)
            self.recreated = self.created = True
            self._create()
        self._opened = identity(self.file)  # the file opened (``file_gone``)

    def file_gone(self) -> bool:
        """Whether ``file`` is no longer the file this process opened (removed, or another in
        its place): one stat. Its connections go on working on the removed file, so no error
        says it."""
        try:
            return identity(self.file) != self._opened
        except FileNotFoundError:
            return True
        except OSError:
            return False  # (not known now: the next round looks again)

    def _marked(self) -> str | None:
        """What a process noted when it found this index damaged while running (``noticed``)."""
        try:
            with open(self.damaged_mark, encoding="utf-8", errors="replace") as f:
                return f"found damaged while running: {f.read().strip() or 'no detail'}"
        except FileNotFoundError:
            return None

    def look_for_damage(self) -> str | None:
        """Why this index is damaged, when this process found it so (``damage``) or another
        process did (its mark, looked for here: a stat, so in a storage thread, at each upkeep
        round and scrape), else None. The supervisor rarely reads the index itself while its
        workers find the damage; /healthz reads ``known_damage``, which does no I/O."""
        if self.damage is None and self._marked_by_other is None and os.path.exists(self.damaged_mark):
            self._marked_by_other = self._marked()
        return self.known_damage

    @property
    def known_damage(self) -> str | None:
        """What ``look_for_damage`` last found (no I/O: for /healthz on the event loop)."""
        return self.damage if self.damage is not None else self._marked_by_other

    def noticed(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by this index) is the index being damaged, checked with
        ``PRAGMA quick_check`` on a connection of its own (an I/O error that passes, or a busy
        database, is not). The first time: noted in ``damage`` and in a mark beside the file, so
        that the next start sets it aside and empties the disk tier; logged once, as an error.
        Not repaired at once: every worker holds connections to the file, and would go on
        numbering commits in the one set aside."""
        if self.damage is not None:
            return True
        if not isinstance(exc, sqlite3.DatabaseError) or not damaged(exc) \
                or filesystem_full(os.path.dirname(self.file), exc):
            return False
        try:
            db = sqlite3.connect(self.file, timeout=5, isolation_level=None)
        except sqlite3.Error:
            return False
        try:
            problem = _quick_check(db)
        except sqlite3.Error as again:
            problem = str(again) if isinstance(again, sqlite3.DatabaseError) and damaged(again) else None
        finally:
            db.close()
        if problem is None:
            return False
        self.damage = f"{exc}; quick_check: {problem}"
        try:
            with open(self.damaged_mark, "w", encoding="utf-8") as f:
                f.write(self.damage + "\n")
        except OSError as mark_error:
            log.error("cannot mark the cache index %s damaged (%s): it is checked at the next start",
                      self.file, mark_error)
        log.error("cache index %s is damaged (%s): it cannot say which entries a purge covers, so "
                  "every purge empties the whole disk tier until cachegate restarts; the restart "
                  "sets it aside and starts with the disk tier empty", self.file, self.damage)
        return True

    def _create(self) -> None:
        db = self._db()
        db.executescript(_SCHEMA)
        _probe_write(db)

    def _convert(self) -> None:
        """Convert an index of an earlier release, once, at the owner's start (no other process
        has it open): its URL column goes (the module docstring), and auto_vacuum, which only a
        file's first page can take, comes on (``journal_mode=WAL`` writes that page before any
        ``PRAGMA auto_vacuum`` ran, so every index was made without it and never shrank).

        Built as a new file beside it, ``index.sqlite3.new``, then renamed over it: the room it
        needs is in the cache directory alone. ``ALTER TABLE DROP COLUMN`` and ``VACUUM`` wrote a
        whole copy to SQLite's temporary directory (``$TMPDIR``, else ``/var/tmp`` or ``/tmp``),
        which a container's small ``/tmp`` could not hold, and every restart failed, blaming the
        cache directory; and DROP COLUMN needs SQLite 3.35. Rows go in the order of the new
        file's indexes (``entries`` by its key index; ``tags``, of the same shape, by SQLite's
        transfer optimisation, each of its b-trees in its own order): an index built after
        the rows, or rows in another order, are sorted in temporary files there too. A kill at
        any point leaves the old file (converted at the next start; a half-made new one is
        removed then) or the new one, whole."""
        new = self.file + ".new"
        _remove(new)  # half made by a start that was killed
        with contextlib.closing(sqlite3.connect(self.file, timeout=30, isolation_level=None)) as old:
            if not _needs_conversion(old):
                return
            _probe_write(old)  # a read-only index stays one (``NotWritable``), not replaced
            tables = {str(r[0]) for r in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = int(old.execute("PRAGMA user_version").fetchone()[0])
        before = self.size()
        folder = os.path.dirname(self.file)
        log.info("cache index %s is of an earlier release: converting it (once; it needs about %s "
                 "free in %s meanwhile)", self.file, human_size(before), folder)
        began = time.monotonic()
        try:
            with contextlib.closing(sqlite3.connect(new, isolation_level=None)) as db:
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before its first page
                db.execute("PRAGMA journal_mode=OFF")  # a half-made file is removed, not rolled back
                db.execute("PRAGMA synchronous=OFF")  # fsynced once, whole, before the rename
                db.execute(f"PRAGMA cache_size=-{_CONVERT_CACHE_KIB}")
                db.executescript(_SCHEMA)
                db.execute("ATTACH DATABASE ? AS old", (self.file,))
                # Each statement its own transaction: none needs a statement journal (a temp file).
                if "entries" in tables:
                    db.execute("INSERT INTO entries (seq, key) SELECT seq, key FROM old.entries ORDER BY key")
                if "tags" in tables:
                    db.execute("INSERT INTO tags SELECT * FROM old.tags")
                if "bans" in tables:
                    db.execute("INSERT INTO bans (id, kind, value, soft, seq) "
                               "SELECT id, kind, value, soft, seq FROM old.bans ORDER BY id")
                # The numbering as it was: a purge or a culled entry took numbers no row keeps.
                db.execute("DELETE FROM sqlite_sequence")
                if "sqlite_sequence" in tables:
                    db.execute("INSERT INTO sqlite_sequence (name, seq) "
                               "SELECT name, seq FROM old.sqlite_sequence")
                db.execute(f"PRAGMA user_version = {version}")
                # The old file's log folded into it and emptied: a log left beside the new file
                # would be replayed onto it at its first open.
                busy = db.execute("PRAGMA old.wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy:
                    raise sqlite3.OperationalError(f"{self.file} is in use by another process")
                db.execute("DETACH DATABASE old")
            _keep_owner(self.file, new)
            _fsync(new)
        except (sqlite3.Error, OSError) as exc:
            full = filesystem_full(folder, exc)
            _remove(new)
            if full:
                raise NoRoomToConvert(folder, self.file, before, exc) from exc
            raise
        for journal in ("-wal", "-shm"):  # emptied by the checkpoint above
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.file + journal)
        os.replace(new, self.file)
        _fsync(folder)
        log.info("cache index %s converted in %.1f s (%s, %s before)", self.file,
                 time.monotonic() - began, human_size(self.size()), human_size(before))

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.file, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
            if self.created and not self._all:
                # The file's first connection, before journal_mode=WAL writes its first page:
                # only then it takes. Never on a later one: on a full filesystem the pragma
                # fails even where it changes nothing, and a purge's lookup in a new thread was
                # a 500 for it.
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL, as the shards: an index a power loss brings back older than the shards is
            # caught at start (``unlisted``: the disk tier emptied); see the module docstring.
            db.execute("PRAGMA synchronous=NORMAL")
            # Keep the WAL file small: checkpoint often, truncate it after each checkpoint.
            db.execute(f"PRAGMA wal_autocheckpoint={max(self._wal_limit // 4096, 16)}")
            db.execute(f"PRAGMA journal_size_limit={self._wal_limit}")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def _write(self, statements: Iterable[tuple[str, Iterable[object]]]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                db.execute(sql, tuple(params))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    # -- entries ---------------------------------------------------------------------------

    def add(self, key: str, tags: tuple[str, ...]) -> int:
        """Record a commit of ``key``; return its new sequence number."""
        return self.add_many([(key, tags)])[0]

    def add_many(self, rows: list[tuple[str, tuple[str, ...]]]) -> list[int]:
        """``add`` for many (key, tags) rows in one transaction; their new sequence numbers.

        Tags are only added here, before the disk commit they index: a key's tag rows are made
        exact by ``retag`` once that commit has succeeded. Deleting the key's old rows here hid
        its other variants (still on disk) from a purge by their tags whenever the commit then
        failed (a shard's lock timed out, a full disk). Rows a failed commit leaves too many
        cost a purge by that tag one look at the key: each variant's own tags decide."""
        db = self._db()
        seqs: list[int] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, tags in rows:
                cur = db.execute("INSERT OR REPLACE INTO entries (key) VALUES (?)", (key,))
                seqs.append(int(cur.lastrowid or 0))
                if tags:
                    db.executemany(_ADD_TAG, [(t, key) for t in tags])
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return seqs

    def retag(self, rows: Iterable[tuple[str, tuple[str, ...]]]) -> None:
        """After their commits: each key's tag rows are exactly these tags (those of the
        variants the disk now holds under it), in one transaction.

        The rows to delete are found in Python, not with ``NOT IN (?, ?, ...)``: one SQL
        variable per tag failed past SQLite's limit ("too many SQL variables"), taking the
        whole write-behind batch with it."""
        rows = list(rows)
        if not rows:
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, tags in rows:
                if not tags:
                    db.execute("DELETE FROM tags WHERE key = ?", (key,))
                    continue
                wanted = set(tags)
                stale = [(t, key) for (t,) in db.execute("SELECT tag FROM tags WHERE key = ?", (key,))
                         if t not in wanted]
                if stale:
                    db.executemany("DELETE FROM tags WHERE tag = ? AND key = ?", stale)
                db.executemany(_ADD_TAG, [(t, key) for t in tags])
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def scan(self, after: str, limit: int) -> list[tuple[str, int]]:
        """(key, seq) pairs in key order after ``after``: the index GC's cursor."""
        rows = self._db().execute(
            "SELECT key, seq FROM entries WHERE key > ? ORDER BY key LIMIT ?", (after, limit))
        return [(r[0], int(r[1])) for r in rows]

    def remove(self, keys: list[str]) -> None:
        if not keys:
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
            db.executemany("DELETE FROM tags WHERE key = ?", [(k,) for k in keys])
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def remove_stale(self, rows: list[tuple[str, int]]) -> list[str]:
        """``remove`` for the keys whose row is still at most the sequence number given (the one
        the caller saw before it found the key gone from disk); the keys removed. A newer row
        is a commit made meanwhile (write-behind's thread, another worker): its entry is on
        disk, or will be, and must stay findable and purgeable. Committed every REMOVE_ROWS tag
        rows or so."""
        if not rows:
            return []
        db = self._db()
        removed: list[str] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = 0
            for key, seq in rows:
                if db.execute("DELETE FROM entries WHERE key = ? AND seq <= ?", (key, seq)).rowcount:
                    removed.append(key)
                    deleted += db.execute("DELETE FROM tags WHERE key = ?", (key,)).rowcount
                    if deleted >= REMOVE_ROWS:  # (each key whole in one transaction)
                        db.execute("COMMIT")
                        db.execute("BEGIN IMMEDIATE")
                        deleted = 0
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return removed

    def listed(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` the index lists (a disk relayout moves only entries a purge finds)."""
        found: set[str] = set()
        db = self._db()
        for start in range(0, len(keys), IN_LIST_MAX):
            marks, part = in_list(keys[start:start + IN_LIST_MAX])
            rows = db.execute(f"SELECT key FROM entries WHERE key IN ({marks})", part)
            found.update(r[0] for r in rows)
        return found

    def keys_for_url(self, url: str) -> list[str]:
        """The keys whose URL is ``url``: ``url`` itself and ``url`` + ``\x1f`` + its other parts
        (``url_of_key``), a range of the key's index."""
        rows = self._db().execute(
            "SELECT key FROM entries WHERE key = ? UNION ALL "
            "SELECT key FROM entries WHERE key >= ? AND key < ?", (url, url + "\x1f", url + "\x20"))
        return [r[0] for r in rows]

    def keys_for_prefix(self, prefix: str, after: str = "", limit: int = -1) -> list[str]:
        """Keys whose URL starts with ``prefix``, in key order, after ``after`` (for paging)."""
        if not prefix:
            return self.all_keys(after, limit)
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = self._db().execute(
            "SELECT key FROM entries WHERE key >= ? AND key < ? AND key > ? ORDER BY key LIMIT ?",
            (prefix, upper, after, limit),
        )
        return [r[0] for r in rows]

    def keys_for_tag(self, tag: str, after: str = "", limit: int = -1) -> list[str]:
        rows = self._db().execute(
            "SELECT key FROM tags WHERE tag = ? AND key > ? ORDER BY key LIMIT ?", (tag, after, limit)
        )
        return [r[0] for r in rows]

    def all_keys(self, after: str = "", limit: int = -1) -> list[str]:
        rows = self._db().execute(
            "SELECT key FROM entries WHERE key > ? ORDER BY key LIMIT ?", (after, limit)
        )
        return [r[0] for r in rows]

    def count_tag(self, tag: str) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM tags WHERE tag = ?", (tag,)).fetchone()[0])

    def count_prefix(self, prefix: str) -> int:
        if not prefix:
            return self.count()
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        row = self._db().execute("SELECT COUNT(*) FROM entries WHERE key >= ? AND key < ?",
                                 (prefix, upper)).fetchone()
        return int(row[0])

    def count(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def current_seq(self) -> int:
        row = self._db().execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        return int(row[0]) if row else 0

    # -- bans ------------------------------------------------------------------------------

    def add_ban(self, kind: BanKind, value: str, soft: bool, floor: int = 0) -> Ban:
        """Record a ban covering every variant committed so far: those the index numbered, and
        up to ``floor`` (the highest sequence number the disk holds, ``DiskTier.high_seq``),
        whatever the index says. The index's numbering is raised to the ban's, so no later
        commit takes a number the ban covers."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
            seq = max(int(row[0]) if row else 0, floor)
            if row is None and seq:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('entries', ?)", (seq,))
            elif row is not None and seq > int(row[0]):
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'entries'", (seq,))
            cur = db.execute("INSERT INTO bans (kind, value, soft, seq) VALUES (?, ?, ?, ?)",
                             (kind, value, int(soft), seq))
            ban_id = int(cur.lastrowid or 0)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return Ban(ban_id, kind, value, soft, seq)

    def unlisted(self, disk_seq: int, disk_has_entries: bool) -> str | None:
        """Why the disk tier may hold entries this index does not list (None: it cannot): the
        index was made at this start while the shards hold rows, or its numbering stops below
        the highest sequence number on disk (``disk_seq``: it came back older, a power loss
        before its WAL reached the disk, a restored copy). Such entries would be served (a
        crowded directory of disk keys asks the disk) and escape every purge by URL or tag and
        every ban of the lower numbering: the owner empties the disk tier, as for a damaged
        index."""
        if not disk_has_entries:
            return None
        if self.created:
            return "it was missing and is made anew, empty"
        seq = self.current_seq()
        if seq < disk_seq:
            return (f"it is older than the disk tier (its sequence numbers stop at {seq}, "
                    f"the disk's at {disk_seq})")
        return None

    def bans(self) -> list[Ban]:
        rows = self._db().execute("SELECT id, kind, value, soft, seq FROM bans ORDER BY id")
        return [Ban(int(r[0]), r[1], str(r[2]), bool(r[3]), int(r[4])) for r in rows]

    def remove_ban(self, ban_id: int) -> None:
        self._db().execute("DELETE FROM bans WHERE id = ?", (ban_id,))

    # -- housekeeping ----------------------------------------------------------------------

    def clear(self) -> None:
        self._write([("DELETE FROM entries", ()), ("DELETE FROM tags", ()), ("DELETE FROM bans", ())])

    def vacuum(self) -> None:
        """Give freed pages back to the file system (the index shrinks after sweeps), a step
        at a time with a checkpoint after each: every page it moves goes through the WAL, and
        freeing 800 MB at once grew the WAL by hundreds of MB before the checkpoint. A step is
        at most what the WAL is kept to (``wal_limit``): a small cache's is a few dozen pages."""
        db = self._db()
        step = min(VACUUM_STEP, max(self._wal_limit // 4096, 16))
        for _ in range(1 << 20):
            # Through sqlite3_exec: a cursor steps the pragma once, and each step frees one page.
            db.executescript(f"PRAGMA incremental_vacuum({step});")
            self.checkpoint()
            if not db.execute("PRAGMA freelist_count").fetchone()[0]:
                break

    def checkpoint(self) -> None:
        """Fold the WAL back into the database and truncate it (see ``DiskTier.checkpoint``),
        waiting at most CHECKPOINT_WAIT for the writers and readers in the way (the next round
        tries again; meanwhile each commit's own checkpoint folds the log back). Why not the
        connection's 30 s: while this one waited, the commits' could not, and under a flood of
        fills with many tags the log grew by 19 MB in the 0.9 s it waited (4 MB in 0.2 s),
        beside a 32 MB cache.disk.size."""
        db = self._db()
        wait = int(db.execute("PRAGMA busy_timeout").fetchone()[0])  # the connection's own, put back
        db.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT * 1000)}")
        try:
            with contextlib.suppress(sqlite3.OperationalError):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute(f"PRAGMA busy_timeout = {wait}")

    def free_bytes(self) -> int:
        """The bytes of the file's pages that hold nothing (given back by ``vacuum``)."""
        db = self._db()
        pages = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        return pages * int(db.execute("PRAGMA page_size").fetchone()[0]) if pages else 0

    def size(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.file + suffix)
        return total

    def close(self) -> None:
        with self._lock:
            dbs, self._all = self._all, []
        for db in dbs:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._local = threading.local()
