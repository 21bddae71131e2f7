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
  the fill (its response may be from before the purge).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable
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


@dataclass(eq=False)
class InProgress:
    """This process's work in progress (see the module docstring)."""

    spools: set[BodySpool] = field(default_factory=set)
    writes: dict[int, tuple[Entry, asyncio.Future[None]]] = field(default_factory=dict)
    write_counts: dict[str, int] = field(default_factory=dict)  # writes in progress per key
    recent: collections.deque[tuple[Entry, float]] = field(default_factory=collections.deque)
    epoch: int = 0
    purges: collections.deque[tuple[int, PurgeMatch]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_PURGES))

    def purged(self, match: PurgeMatch) -> None:
        """A local purge begins: the next epoch, remembered with what it covers."""
        self.epoch += 1
        self.purges.append((self.epoch, match))

    def purged_since(self, epoch: int, entry: Entry) -> bool:
        """Whether a local purge after ``epoch`` (``Storage.epoch`` when a fill's request went
        to the origin) covers ``entry``; True when those purges are no longer all remembered."""
        if epoch == self.epoch:
            return False
        purges = self.purges
        if not purges or purges[0][0] > epoch + 1:
            return True
        return any(at > epoch and match.covers(entry) for at, match in purges)

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
    """The tiers and what goes with them, as every role of the store sees them."""

    memory: MemoryTier
    disk: DiskTier | None
    index: UrlTagIndex | None
    bans: BanList
    executor: ThreadPoolExecutor
    work: InProgress = field(default_factory=InProgress)
    closed: bool = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread pool (every diskcache and SQLite call blocks)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
