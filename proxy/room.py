"""How much room the machine has: its memory and swap (``cache.memory`` against them), the
cache directory's filesystem, and whether an error says that filesystem has none.

A full filesystem (or a user's quota) is not damage: what is stored there is sound and can be
read again once there is room, so nothing is ever set aside or emptied for it (``disk``,
``index``). Light on imports: the config check asks it too (``cache.disk.size`` against the
filesystem's size).
"""

from __future__ import annotations

import errno
import os
import resource

SQLITE_IOERR, SQLITE_FULL = 10, 13
# Free bytes under which an I/O error of SQLite counts as the filesystem being full: opening a
# database in WAL mode makes its shared-memory file (32 KiB, written page by page) and appends
# to its log, and where that fails for want of room SQLite says "disk I/O error", not "full".
LOW_SPACE = 4 << 20


def space(path: str) -> tuple[int, int] | None:
    """(free bytes for this user, total bytes) of the filesystem ``path`` is on (or would be:
    its nearest existing parent); None when that cannot be told."""
    where = os.path.abspath(path)
    while True:
        try:
            st = os.statvfs(where)
        except FileNotFoundError:
            parent = os.path.dirname(where)
            if parent == where:
                return None
            where = parent
            continue
        except OSError:
            return None
        if st.f_files and st.f_favail == 0:  # no inode left: as full as no block left
            return 0, st.f_blocks * st.f_frsize
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def filesystem_full(path: str, exc: BaseException) -> bool:
    """Whether ``exc`` (met opening or writing a database under ``path``) says the filesystem
    is full, not that the database is damaged: ENOSPC or a quota (EDQUOT), SQLITE_FULL, or an
    I/O error while the filesystem has less than LOW_SPACE free. What is stored there is sound
    and readable again once there is room, so it must never be set aside for it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    if code & 0xFF == SQLITE_FULL:
        return True
    if code & 0xFF == SQLITE_IOERR:
        room = space(path)
        return room is not None and room[0] < LOW_SPACE
    return False


class NoRoom(OSError):
    """A write under the cache directory failed because its filesystem has no room, said with
    what it lacks (inodes, bytes, the user's quota) and what ``df`` shows: ENOSPC, so a full
    filesystem (``filesystem_full``), never damage, and no bug (no traceback)."""

    def __init__(self, lacks: str, cause: OSError) -> None:
        super().__init__(errno.ENOSPC, f"{lacks} (the write said: {cause.strerror or cause})",
                         cause.filename)


def no_room(path: str, exc: BaseException) -> NoRoom | None:
    """``exc``, an error writing a file under ``path`` (the cache directory), as ``NoRoom`` when
    it comes of the filesystem having no room; None for any other error. Asked where the write
    failed, before the files it had made are removed (which gives room back: asked later, the
    filesystem seemed to have some).

    ENOSPC and a quota's EDQUOT say it themselves, but not which: on a filesystem out of inodes
    ``df -h`` shows bytes free, so "No space left on device" read as a mistake. And a
    ``FileNotFoundError`` of a file under ``path`` while ``path`` is there says it too when the
    filesystem has no inode (or block) left: diskcache makes a body file's folders with
    ``os.makedirs``' error suppressed, so no inode for a folder showed as the file's folder
    missing ("No such file or directory", with a traceback)."""
    if not isinstance(exc, OSError) or isinstance(exc, NoRoom):
        return None
    if exc.errno == errno.EDQUOT:
        return NoRoom(f"the disk quota of this user on the filesystem of {path} is used up (quota -s)", exc)
    full = exc.errno == errno.ENOSPC
    if not full:
        if not isinstance(exc, FileNotFoundError) or not isinstance(exc.filename, str):
            return None
        where = os.path.abspath(path)
        if os.path.commonpath([where, os.path.abspath(exc.filename)]) != where or not os.path.isdir(where):
            return None
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_files and st.f_favail == 0:
        return NoRoom(f"no free inodes on the filesystem of {path} (all {st.f_files} used: df -i)", exc)
    if full or st.f_bavail == 0:
        return NoRoom(f"no space left on the filesystem of {path} ({human_size(st.f_bavail * st.f_frsize)} "
                      f"free of {human_size(st.f_blocks * st.f_frsize)}: df -h)", exc)
    return None


class FilesystemFull(OSError):
    """The cache directory cannot be opened because its filesystem is full (or over a quota).
    Nothing in it was changed: cachegate starts again once there is room."""

    def __init__(self, path: str, cause: BaseException) -> None:
        room = space(path)
        free = (f" ({human_size(room[0])} free of {human_size(room[1])})" if room is not None else "")
        super().__init__(errno.ENOSPC, f"its filesystem is full{free}: {cause}; nothing in it was "
                                       "changed: free some space there, then start cachegate again")
        self.path = path


class NoRoomToConvert(FilesystemFull):
    """Converting the index of an earlier release (``UrlTagIndex._convert``) ran out of room: it
    builds the new file beside the old one, in the cache directory, so it needs about the old
    one's size free there. The half-made file is removed and the old one is as it was."""

    def __init__(self, path: str, index: str, needed: int, cause: BaseException) -> None:
        room = space(path)
        free = f"; its filesystem has {human_size(room[0])} free of {human_size(room[1])}" if room else ""
        OSError.__init__(self, errno.ENOSPC,
                         f"converting the cache index {index} of an earlier release needs about "
                         f"{human_size(needed)} free beside it{free}: {cause}; the index is as it "
                         "was (the half-made copy is removed): free some space there, then start "
                         "cachegate again (or delete the index and its journals: the disk tier "
                         "starts empty then)")
        self.path = path


SQLITE_READONLY, SQLITE_CANTOPEN = 8, 14
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)  # a mode, an owner, chattr +i, a read-only mount


class NotWritable(OSError):
    """A file or folder of the cache directory cannot be written (or opened, or made) where it
    is: read-only for this user, owned by another, immutable (``chattr +i``) or on a read-only
    mount. An operator's setting, not damage (nothing is set aside) and not a full filesystem:
    said in one line at start, naming the file and the fix (``proxy.web.server.open_runtime``
    prints an ``OSError``), as a full one is. ``cause``: SQLite's error opening a database (a
    shard, the index), or the ``OSError`` of a file or folder (``denied``)."""

    def __init__(self, path: str, cause: BaseException) -> None:
        code = getattr(cause, "sqlite_errorcode", None)
        if code is not None:
            what = "cannot be written" if int(code) & 0xFF == SQLITE_READONLY else "cannot be opened"
            detail = str(cause)
        else:
            what = "cannot be written" if os.path.lexists(path) else "cannot be made"
            detail = getattr(cause, "strerror", None) or str(cause)
        super().__init__(errno.EROFS if what == "cannot be written" else errno.EACCES,
                         f"{path} {what} ({detail}): make it and its folder writable by the user "
                         "cachegate runs as (their modes and owner, an immutable flag: lsattr, a "
                         "read-only mount); nothing in it was changed")
        self.filename = path


def denied(exc: BaseException) -> bool:
    """Whether ``exc`` is a file or folder this user may not write or make (it names one)."""
    return isinstance(exc, OSError) and not isinstance(exc, NotWritable) and exc.errno in DENIED \
        and isinstance(exc.filename, str | bytes)


def human_size(n: int) -> str:
    """``n`` bytes as a person reads them: 1.5 MB, 20 KB, 512 B."""
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


MEMINFO = "CACHEGATE_MEMINFO"  # for tests, as CACHEGATE_READY_TIMEOUT: another /proc/meminfo


def machine_memory(meminfo: str | None = None) -> tuple[int, int] | None:
    """(RAM, swap) of this machine in bytes, from ``/proc/meminfo``; None where there is none.
    It is the machine's, not a cgroup's limit (``memory.max``): a container's may be lower."""
    found: dict[str, int] = {}
    try:
        with open(meminfo or os.environ.get(MEMINFO) or "/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "SwapTotal"):
                    found[name] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    if "MemTotal" not in found:
        return None
    return found["MemTotal"], found.get("SwapTotal", 0)


class MemoryUnavailable(Exception):
    """The shared memory ``cache.memory`` asks for cannot be mapped."""

    def __init__(self, budget: int, cause: OSError) -> None:
        machine = machine_memory()
        has = (f"; this machine has {human_size(machine[0])} of memory and {human_size(machine[1])} of swap"
               if machine is not None else "")
        super().__init__(f"cannot map the shared memory of cache.memory ({human_size(budget)}): "
                         f"{cause.strerror or cause}{has}; set cache.memory lower")


# -- open files ------------------------------------------------------------------------------

# The soft open-files limit a start raises itself to, at most (the hard limit bounds it:
# ``proxy.startup.raise_open_files``).
OPEN_FILES_WANTED = 1 << 20
# Threads of a process that read and write the disk shards: the store's pool (its ``disk``
# threads, ``proxy.storage.tiered``) and, beside them, the thread that opened the shards and
# the owner's persister. diskcache gives each thread its own SQLite connection to each shard.
DISK_THREADS = 4
SHARD_THREADS = DISK_THREADS + 2
# Files one shard keeps open in a process that uses it from SHARD_THREADS threads: each
# connection its database and its write-ahead log, and the shard its shared-memory file and a
# database descriptor SQLite keeps for the locks of a connection it closed. Measured under
# load: 14 a shard in a lone process, 11 in a worker, 10 in a supervisor (3 idle in a worker,
# 8 idle in an owner); 2,000 shards held 8,000 files in every process before a request came.
SHARD_FILES = 2 + 2 * SHARD_THREADS
# What else a serving process may have open: logs, listeners, the loop's own, Redis, and the
# disk bodies being read (``proxy.storage.bodyfiles.OpenBodies``).
OTHER_FILES = 64 + 256
# The fewest connections (clients' and upstreams' together) a process must be able to open
# beside what its store keeps open, for the open-files limit to be worth starting under.
MIN_CONNECTIONS = 128


def store_files(shards: int) -> int:
    """The files a process's store keeps open at most, for ``shards`` disk shards (0: memory only)."""
    return shards * SHARD_FILES + OTHER_FILES


def open_files_limit() -> int | None:
    """The soft open-files limit a start runs with (None: unlimited): the current soft limit
    raised towards the hard one, as ``raise_open_files`` does before the workers start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    return max(soft, target)


def most_shards(limit: int) -> int:
    """The most disk shards that leave MIN_CONNECTIONS under an open-files ``limit`` (0: none)."""
    return max((limit - OTHER_FILES - MIN_CONNECTIONS) // SHARD_FILES, 0)


class OutOfFiles(OSError):
    """The storage could not open a file (a shard's database: SQLite says only "unable to open
    database file") because this process has reached its open-files limit: said as that, with
    what to do, in one line and no traceback (the failure is the machine's state, not a bug)."""

    def __init__(self, cause: BaseException) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        super().__init__(errno.EMFILE, f"this process has reached its open-files limit, {soft} ({cause}): "
                                       "new client connections are closed unanswered meanwhile; lower "
                                       "max_connections or cache.disk.shards, or raise the limit "
                                       "(LimitNOFILE= of the unit, ulimit -n)")


def out_of_files(exc: BaseException) -> bool:
    """Whether ``exc`` is this process having reached its open-files limit: an ``EMFILE`` or
    ``ENFILE``, or SQLite's "unable to open database file" (SQLITE_CANTOPEN, which is what
    EMFILE becomes inside SQLite) while no file can be opened here."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None or int(code) & 0xFF != SQLITE_CANTOPEN:
        return False
    try:
        os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as probe:
        return probe.errno in (errno.EMFILE, errno.ENFILE)
    return False
