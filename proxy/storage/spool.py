"""Bodies being received: kept in memory while small, spilled to a temp file past a threshold.

Each process spools into its own folder under ``<cache>/tmp/`` and holds an
exclusive ``flock`` on a lock file inside it for as long as it lives. The kernel
drops the lock when the process dies, even by SIGKILL, so ``sweep_dead_spools``
can tell a dead process's leftovers (remove them) from a live one's (leave them)
without trusting PIDs, which a container restart reuses.

The folder also holds the process's intent log: a line ``key<US>body id`` before
each big body is written to the disk tier, settled once its metadata commit (or
the clean-up after a failed one) is done. A crash between the two can only orphan
the bodies still pending there, so the sweep of a dead process's folder checks
exactly those, instead of decoding every metadata record in the cache (minutes of
CPU at a million entries).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import IO

log = logging.getLogger("cachegate.storage")

SPOOLS = "tmp"  # the spool folders' folder in the cache directory
LOCK_NAME = ".owner.lock"
INTENTS_NAME = ".intents"
SHARED_NAME = "cachegate-spool"  # a memory-only instance's: <temp dir>/cachegate-spool-<uid>
INTENTS_COMPACT = 256 * 1024  # rewrite the log with only the pending lines past this size
SEP = "\x1f"


def _unsafe(path: str) -> str | None:
    """Why the folder at ``path`` is not this user's alone (None when it is): looked at through
    the folder itself, opened without following a symbolic link, so what was judged is what is
    used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            return "it is a symbolic link"
        if exc.errno == errno.ENOTDIR:
            return "it is not a folder"
        return exc.strerror or str(exc)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"others may use it (mode {stat.S_IMODE(st.st_mode):o}, not 700)"
    return None


def private_spool_root(warn: bool = True) -> tuple[str, bool]:
    """Where a process with no cache directory spools: ``<temp dir>/cachegate-spool-<uid>``,
    made mode 700, the same across restarts (so the sweep finds a dead process's folders there),
    and whether it is a fresh one of this process's own instead (to remove at its close).

    Why not one folder for every user: another local user could make it first and own it, then
    rename this user's folders, plant links or read the bodies (or, leaving it unwritable, stop
    every other user's cachegate from starting). When the per-user folder is not this user's
    alone (someone else's, a link, open to others), a fresh private one is made instead
    (``tempfile.mkdtemp``), and said once (``warn``: the owner process; its workers are quiet)."""
    base = tempfile.gettempdir()
    root = os.path.join(base, f"{SHARED_NAME}-{os.geteuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    why = _unsafe(root)
    if why is None:
        return root, False
    fallback = tempfile.mkdtemp(prefix=f"{SHARED_NAME}-{os.geteuid()}-", dir=base)
    if warn:
        log.warning("the spool folder %s is not safe to use (%s): another local user may have "
                    "made it; spooling in a private one instead: %s", root, why, fallback)
    return fallback, True


class SpoolDir:
    """This process's spool folder, locked for the process's lifetime."""

    def __init__(self, root: str, *, own_root: bool = False) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = root
        self._own_root = own_root  # a folder made for this process alone: removed at its close
        self._lock_fd: int | None = None
        # Between the lock file's creation and its flock, a sweep (``sweep_dead_spools``: at
        # start, hourly, and whenever the supervisor sees a worker die, as siblings restart)
        # can take the lock itself and remove the folder as a dead process's: then this takes
        # another folder, rather than spool into a removed one for the rest of its life.
        for _ in range(16):
            path = os.path.join(root, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.makedirs(path)
            fd = os.open(os.path.join(path, LOCK_NAME),
                         os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a sweep holds it now: the folder is going
                os.close(fd)
                continue
            if os.fstat(fd).st_nlink == 0:  # swept before this took the lock
                os.close(fd)
                continue
            self.path, self._lock_fd = path, fd
            break
        else:
            raise OSError(f"cannot make a spool folder in {root}: each was swept as it was made")
        self._intents_path = os.path.join(self.path, INTENTS_NAME)
        self._pending: dict[str, str] = {}  # body id -> key
        self._intents_lock = threading.Lock()  # disk writes run in several executor threads
        self._intents_size = 0

    def intend(self, key: str, body_id: str) -> None:
        """Note a big body about to be written, before its metadata exists."""
        line = f"{key}{SEP}{body_id}\n".encode()
        with self._intents_lock:
            self._pending[body_id] = key
            with open(self._intents_path, "ab") as f:
                f.write(line)
            self._intents_size += len(line)

    def settle(self, body_id: str) -> None:
        """The body is referenced by committed metadata, or gone: nothing to sweep."""
        with self._intents_lock:
            self._pending.pop(body_id, None)
            if self._intents_size > INTENTS_COMPACT:
                text = "".join(f"{k}{SEP}{b}\n" for b, k in self._pending.items()).encode()
                tmp = self._intents_path + ".new"
                with open(tmp, "wb") as f:
                    f.write(text)
                os.replace(tmp, self._intents_path)
                self._intents_size = len(text)

    def make_file(self) -> IO[bytes]:
        return tempfile.NamedTemporaryFile(dir=self.path, prefix="spool-", delete=False)

    def close(self) -> None:
        shutil.rmtree(self.root if self._own_root else self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def read_intents(folder: str) -> list[tuple[str, str]]:
    """The (key, body id) lines of a spool folder's intent log (settled ones included)."""
    try:
        with open(os.path.join(folder, INTENTS_NAME), "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        key, sep, body_id = line.rpartition(SEP)
        if sep and key and body_id:
            out.append((key, body_id))
    return out


@contextlib.contextmanager
def _dead_folders(root: str) -> Iterator[Iterator[str]]:
    """The spool folders under ``root`` of processes that are gone, each locked while it is
    handed out (a process that is alive holds its folder's lock)."""

    def folders() -> Generator[str, None, None]:
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(root, name)
            if not os.path.isdir(path):
                continue
            try:
                fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR)
            except FileNotFoundError:
                # No lock file: a crash before the lock existed, or a folder being created now.
                try:
                    if time.time() - os.path.getmtime(path) < 60:
                        continue
                except OSError:
                    continue
                fd = -1
            except OSError:
                continue
            try:
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its owner is alive
                yield path
            finally:
                if fd >= 0:
                    os.close(fd)

    found = folders()
    try:
        yield found
    finally:
        found.close()


def sweep_dead_spools(root: str, on_intents: Callable[[list[tuple[str, str]]], None] | None = None
                      ) -> int:
    """Remove the spool folders of processes that are gone; return how many.

    ``on_intents`` gets each dead folder's intent log first, so the bodies a crash
    may have orphaned can be checked before the log is deleted with the folder.
    """
    removed = 0
    with _dead_folders(root) as dead:
        for path in dead:
            if on_intents is not None:
                intents = read_intents(path)
                if intents:
                    on_intents(intents)
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d spool folder(s) of dead processes", removed)
    return removed


def empty_dead_spools(root: str) -> int:
    """Remove the spool files (half-received bodies) of processes that are gone, keeping each
    folder's lock and intent log for ``sweep_dead_spools``; how many bytes they held.

    Why, before the owner opens the databases: on a full filesystem they may hold the room
    SQLite needs to open them (a write-ahead log and a shared-memory file each), and judging
    them needs no database. The value files no row refers to do (the shard's table), and SQLite
    cannot open a table, even read-only, on a full filesystem: they wait for the start-up sweep."""
    freed = 0
    with _dead_folders(root) as dead:
        for path in dead:
            for name in os.listdir(path):
                if name in (LOCK_NAME, INTENTS_NAME):
                    continue
                full = os.path.join(path, name)
                with contextlib.suppress(OSError):
                    size = os.lstat(full).st_size
                    os.remove(full)
                    freed += size
    if freed:
        log.info("removed %d bytes of spool files of dead processes", freed)
    return freed
