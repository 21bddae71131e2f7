"""What the store's roles share: the tiers, the bans, the thread pool, and the work in progress.

The roles (``reads``, ``writes``, ``purging``, ``upkeep``, ``persist``) each do one job over the
same ``Tiers``. What is in progress in this process is kept here once, by the store, and every
role and caller asks it (the engine no longer keeps its own list of disk writes, nor the
coalescer its own list of keys the store did not have):

- bodies being received (``spools``): a purge dooms the ones it covers;
- disk writes of this process in progress (big bodies: memory does not hold them), by key:
  a read of the key waits for its own write, an invalidation for the URL's;
- disk commits of this process in the last minute (``recent``): a purge that began before
  one landed undoes it;
- local purges so far (``epoch``): a disk read that overlapped one is done again;
- the last local purges, with their epochs (``purges``): a fill whose request went to the
  origin before one of them, and whose body began after it, is not stored when it covers
  the fill (its response may be from before the purge). At most ``RECENT_PURGES`` of them,
  and at most ``PURGE_LOG_BYTES`` of what they name: a purge by URL can name 20,000 URLs
  (1 MB of JSON), and keeping 1,024 of those whole took ~3 GB in every worker. The oldest
  are forgotten first, and a fill whose request went out before a forgotten purge is not
  stored (it cannot be told), so a purge too big for the log alone empties it: every fill in
  flight before it is dropped, which costs a refetch, never a purged response served.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.policy.keys import url_of_key
from proxy.storage.bans import BanList, PurgeMatch
from proxy.storage.disk import DiskTier
from proxy.storage.entry import Entry
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import MemoryTier

if TYPE_CHECKING:
    from proxy.storage.writes import BodySpool

T = TypeVar("T")

RECENT_COMMITS_WINDOW = 60.0  # seconds a disk commit is remembered, for purges that raced it
# Local purges remembered for fills that were waiting for their response's head meanwhile; a
# fill that began before the oldest one remembered is not stored (it cannot be told).
RECENT_PURGES = 1024
# ... and at most this much of what they name (``purge_cost``).
PURGE_LOG_BYTES = 4 * 1024 * 1024
PER_NAME = 64  # a str object and its set slot, beside its characters


def purge_cost(match: PurgeMatch) -> int:
    """Roughly the bytes a remembered purge holds: its keys, URLs, prefixes and tags."""
    names = (match.keys, match.urls, match.prefixes, match.tags)
    return sum(len(s) + PER_NAME for group in names for s in group) + PER_NAME


@dataclass(eq=False)
class InProgress:
    """This process's work in progress (see the module docstring)."""

    spools: set[BodySpool] = field(default_factory=set)
    writes: dict[int, tuple[Entry, asyncio.Future[None]]] = field(default_factory=dict)
    write_counts: dict[str, int] = field(default_factory=dict)  # writes in progress per key
    recent: collections.deque[tuple[Entry, float]] = field(default_factory=collections.deque)
    epoch: int = 0
    purges: collections.deque[tuple[int, PurgeMatch, int]] = field(default_factory=collections.deque)
    purge_bytes: int = 0  # the sum of the remembered purges' ``purge_cost``

    def purged(self, match: PurgeMatch) -> None:
        """A local purge begins: the next epoch, remembered with what it covers (the oldest
        forgotten past ``RECENT_PURGES`` or ``PURGE_LOG_BYTES``; this one too when it alone
        is bigger: then every fill in flight before it counts as covered)."""
        self.epoch += 1
        cost = purge_cost(match)
        purges = self.purges
        purges.append((self.epoch, match, cost))
        self.purge_bytes += cost
        while purges and (len(purges) > RECENT_PURGES or self.purge_bytes > PURGE_LOG_BYTES):
            self.purge_bytes -= purges.popleft()[2]

    def purged_since(self, epoch: int, key: str, tags: Collection[str] | None,
                     until: int | None = None) -> bool:
        """Whether a local purge after ``epoch`` (``Storage.epoch`` when a fill's request went
        to the origin), up to ``until`` when given (the epoch a client joined the fill at),
        covers the response under ``key`` with ``tags`` (``None``: its head has not come, so
        only a purge that names the key: ``PurgeMatch.may_cover``); True when those purges are
        no longer all remembered. Asked of a fill's body as it begins (``Writes.spool``), of a
        flight by a client that would join it before its head (``Storage.joining``) and by one
        that joined it after a purge, at its head (``MissPath.answer``), and of a failed
        refresh's wait (``MissPath.refresh_held_back``): one answer for all."""
        if epoch == self.epoch or (until is not None and until <= epoch):
            return False
        purges = self.purges
        if not purges or purges[0][0] > epoch + 1:
            return True
        if until is None:
            return any(at > epoch and match.may_cover(key, tags) for at, match, _ in purges)
        return any(epoch < at <= until and match.may_cover(key, tags) for at, match, _ in purges)

    def begin_write(self, entry: Entry) -> int:
        """Note a disk write of ``entry`` starting; its token for ``end_write``."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        token = id(done)
        self.writes[token] = (entry, done)
        self.write_counts[entry.key] = self.write_counts.get(entry.key, 0) + 1
        return token

    def end_write(self, token: int) -> None:
        entry, done = self.writes.pop(token)
        if self.write_counts[entry.key] == 1:
            del self.write_counts[entry.key]
        else:
            self.write_counts[entry.key] -= 1
        done.set_result(None)

    def writing(self, key: str) -> list[asyncio.Future[None]]:
        """This process's disk writes of ``key`` in progress (a dict lookup when there are none)."""
        if key not in self.write_counts:
            return []
        return [fut for e, fut in self.writes.values() if e.key == key]

    def writing_urls(self, urls: Iterable[str]) -> list[asyncio.Future[None]]:
        """This process's disk writes in progress of any key of these URLs."""
        if not self.writes:
            return []
        targets = set(urls)
        return [fut for e, fut in self.writes.values() if url_of_key(e.key) in targets]

    def committed(self, entry: Entry) -> None:
        """Remember a disk commit (for a purge that began before it landed)."""
        now = time.monotonic()
        self.recent.append((entry, now))
        while self.recent and self.recent[0][1] < now - RECENT_COMMITS_WINDOW:
            self.recent.popleft()


@dataclass(eq=False)
class Tiers:
    """The tiers and what goes with them, as every role of the store sees them.

    ``disk`` and ``index`` are the disk tier and its index as opened (``opened_disk``,
    ``opened_index``) until the cache directory is found gone under the running processes
    (removed, moved away, another in its place: ``proxy.storage.upkeep``); from then on None,
    in every process (the shared memory's flag, ``Arena.disk_gone``), so that every role takes
    its memory-only path and nothing is read from or written to that directory any more. Why:
    a directory removed by hand went unnoticed, the databases kept open (their space held,
    invisibly), diskcache made body files again in a directory of the same name with no
    database to name them, and the stop wrote an empty index there."""

    memory: MemoryTier
    opened_disk: DiskTier | None
    opened_index: UrlTagIndex | None
    bans: BanList
    executor: ThreadPoolExecutor
    work: InProgress = field(default_factory=InProgress)
    closed: bool = False
    # Why the cache directory is gone, as the owner found it (``lose_disk``); in another process
    # that only saw the shared memory's flag, a word of that.
    gone: str | None = None

    @property
    def disk(self) -> DiskTier | None:
        """The disk tier, None without one or once its directory is gone (one read of the
        shared memory's header until then: no system call)."""
        disk = self.opened_disk
        if disk is None or self.gone is not None:
            return None
        if not self.closed and self.memory.arena.disk_gone:
            self.gone = "the process that owns the cache directory found it gone"
            return None
        return disk

    @property
    def index(self) -> UrlTagIndex | None:
        """The URL and tag index, None as ``disk`` is."""
        return self.opened_index if self.disk is not None else None

    def lose_disk(self, why: str) -> None:
        """The cache directory is gone (the owner's upkeep found it): memory only from now on,
        in every process."""
        self.gone = why
        self.memory.arena.set_disk_gone()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread pool (every diskcache and SQLite call blocks)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
