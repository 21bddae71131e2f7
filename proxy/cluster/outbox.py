"""The outbox's file: the invalidations a node made that Redis has not taken yet, kept across restarts.

An unsafe method's invalidation (RFC 9111 §4.4) cannot be retried by anyone (the client already
has the origin's answer), so one that Redis cannot take (it is away, or refuses writes) is applied
on the node at once and queued in its outbox (``proxy.cluster.node``), sent once Redis takes it.
Kept in memory alone, the queue died with the process: a node restarted meanwhile (to repoint
``cluster.redis`` after a failover, say, which takes a restart) dropped it, and the other nodes
served what the invalidations covered, as hits, until it expired, with nothing logged or counted.

So the queue is kept in the cache directory beside ``cluster-state.json`` (``OUTBOX_FILE``): read
at start and sent after the start's catch-up, in order, to whatever Redis and namespace the node
is configured with then (another Redis after a failover: that is the point). Written

- whole: a temporary file, flushed to the disk (``fsync``), then renamed over the old one, so a
  crash leaves the old file or the new one, never part of one; by a thread (a full outbox is
  about 2 MB of JSON: too much for the event loop);
- when the queue changes (an invalidation queued or sent): at once, then at most every
  ``WRITE_EVERY`` seconds while it keeps changing, so a burst of invalidations costs a few writes
  a second, not one each. A ``kill -9`` loses what was queued after the last write began (the
  last ``WRITE_EVERY`` seconds, plus that write's own time, at most); a stop writes it last;
- and removed once the queue is empty.

A file that cannot be read, whole or in part, is moved aside to ``OUTBOX_FILE + BAD_SUFFIX``
once the start has said so (and, for the part that can be read, written back): left in place it
was said lost at every start.

No age limit: an old invalidation sent late costs the other nodes one origin fetch for each object
it covers, while one dropped leaves them serving the copy it invalidated for as long as that lives,
which nothing bounds (``max-age``, a rule's ``ttl`` and ``stale-if-error`` may be days). The queue
is bounded by its length alone (``OUTBOX_MAX`` in the node), in the file as in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.purge import PurgeSpec

log = logging.getLogger("cachegate.cluster")

OUTBOX_FILE = "cluster-outbox.json"
BAD_SUFFIX = ".bad"  # a file that could not be read (whole or in part) is moved to OUTBOX_FILE + this
WRITE_EVERY = 0.25  # seconds between two writes of the file at most, while the queue keeps changing
VERSION = 1


@dataclass(frozen=True, slots=True)
class Queued:
    """An invalidation waiting for Redis."""

    spec: PurgeSpec
    at: float  # when it was made (Unix time)


def encode(node: str, entries: Sequence[Queued]) -> str:
    """The file's text.

    >>> encode("a", [Queued(PurgeSpec(urls=("http://h/x",), invalidation=True), 1.5)])[:60]
    '{"version":1,"node":"a","invalidations":[{"at":1.5,"spec":{"'
    """
    return json.dumps({"version": VERSION, "node": node,
                       "invalidations": [{"at": q.at, "spec": q.spec.to_json()} for q in entries]},
                      separators=(",", ":"))


def decode(text: str) -> tuple[list[Queued], int]:
    """The queue a file holds, in order, and how many of its entries could not be read (each is
    skipped: another's is no reason to lose the rest). ValueError when the file as a whole is not
    an outbox.

    >>> entries, bad = decode(encode("a", [Queued(PurgeSpec(urls=("http://h/x",)), 1.5)]))
    >>> [(q.spec.urls, q.at) for q in entries], bad
    ([(('http://h/x',), 1.5)], 0)
    >>> decode('{"version":1,"invalidations":[{"at":1,"spec":{"urls":"http://h/x"}}, 3]}')
    ([], 2)
    """
    data: Any = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != VERSION \
            or not isinstance(data.get("invalidations"), list):
        raise ValueError(f"not an outbox of version {VERSION}")
    entries: list[Queued] = []
    bad = 0
    for item in data["invalidations"]:
        try:
            at = item["at"]
            if type(at) not in (int, float):
                raise TypeError("'at' is not a number")
            entries.append(Queued(PurgeSpec.from_json(item["spec"]), float(at)))
        except Exception:  # (what a hand or a disk did to one entry: KeyError, TypeError, BadPurge)
            bad += 1
    return entries, bad


def write_whole(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` whole: a crash leaves the old file or the new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class OutboxFile:
    """Where a node keeps its outbox between runs: ``changed`` after each change of the queue
    (``snapshot`` gives it as it is then), ``close`` at stop."""

    def __init__(self, path: str, node: str, snapshot: Callable[[], Sequence[Queued]]) -> None:
        self.path = path
        self._node = node
        self._snapshot = snapshot
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # ends the writer's wait between two writes
        self._lock = asyncio.Lock()  # one write at a time, in the order of their snapshots
        self._failing = False  # the last write failed (logged once)

    def read(self) -> tuple[list[Queued], int]:
        """The queue the last run left (``decode``); none without a file. OSError, ValueError."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return [], 0
        return decode(text)

    def set_aside(self) -> str:
        """Move the file as it is to ``BAD_SUFFIX`` (over an earlier one), for whoever wants to
        see what it held: the next start does not read it again (and say so again). What the
        log line says of it: where it went, or why it could not be moved."""
        bad = self.path + BAD_SUFFIX
        try:
            os.replace(self.path, bad)
        except OSError as exc:
            return f"it could not be moved aside ({exc})"
        return f"the file is kept as {bad}"

    def store_now(self, entries: Sequence[Queued]) -> None:
        """Write ``entries`` at once, in this thread (at start, before anything else writes it);
        a failure is logged, and the next change writes it again."""
        try:
            self._store(list(entries))
        except OSError as exc:
            log.error("cluster: cannot keep the outbox in %s (%s): the invalidations it holds are "
                      "lost if this node stops before Redis takes them", self.path, exc)

    def changed(self) -> None:
        """The queue changed: written at once, then at most every ``WRITE_EVERY`` seconds."""
        self._dirty = True
        if (self._writer is None or self._writer.done()) and not self._closing.is_set():
            self._writer = asyncio.ensure_future(self._write_soon())

    async def _write_soon(self) -> None:
        while self._dirty and not self._closing.is_set():
            await self.write()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), WRITE_EVERY)

    async def write(self) -> bool:
        """Write the queue as it is now (the file removed when it is empty); whether that worked."""
        async with self._lock:
            self._dirty = False
            entries = list(self._snapshot())
            try:
                await asyncio.to_thread(self._store, entries)
            except OSError as exc:
                if not self._failing:
                    log.error("cluster: cannot keep the outbox in %s (%s): the invalidations it holds "
                              "are lost if this node stops before Redis takes them", self.path, exc)
                self._failing = True
                return False
        if self._failing:
            log.warning("cluster: the outbox is kept in %s again", self.path)
        self._failing = False
        return True

    def _store(self, entries: list[Queued]) -> None:
        if entries:
            write_whole(self.path, encode(self._node, entries))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    async def close(self) -> bool:
        """The last write, at stop (after a write under way); whether the queue is kept."""
        self._closing.set()
        if self._writer is not None:
            # (Not cancelled: a write under way finishes, in its thread, whatever its caller does.)
            await asyncio.wait([self._writer])
        return await self.write()
