"""Storage write failures (a full disk, an I/O error): counted, logged once per streak, shown.

A write that fails only abandons storing that response: the clients of the fill still get
the whole body, and the next fill tries again. A full disk (``ENOSPC``) fails every fill
until space is freed, so a log line per failure (let alone a traceback) would flood the log
at the request rate and tell the operator nothing new. The first failure of a streak is
logged at WARNING with its error (with a traceback only when it is not an ``OSError`` or
SQLite's I/O error or "disk is full": then it is a bug, not the disk); the ones after it are
only counted. A streak is over once no write failed for SETTLE seconds (on the monotonic
clock: a step of the system clock neither ends nor prolongs it): ``failing`` in ``GET /stats``
is false from then on, whether or not a write came since (it stayed true after the disk
recovered, until a new miss came to write), and the first write that succeeds after it is
logged at INFO with how many failed meanwhile. Not at any success: on a full disk the small
writes that still fit succeed between the big ones that fail, and a streak that ended at any
success began again at the next failure (37 warnings and 34 recoveries in 3 s). Every failure
counts in ``cachegate_storage_errors_total{operation}`` and in ``GET /stats`` (``storage``).

A write that failed for want of room on the cache directory's filesystem says what it lacks
(``proxy.room.NoRoom``, decided where the write failed): a filesystem out of inodes failed a
body file's folder as "No such file or directory" (diskcache makes the folders with mkdir's
errors suppressed), and its free bytes, which ``df -h`` shows, made "No space left on device"
read as a mistake too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from proxy.room import NoRoom

log = logging.getLogger("cachegate.storage")

SETTLE = 10.0  # seconds without a failed write before a streak of failures is over


class WriteFailures:
    """This process's storage write failures, by operation (``spool``: receiving a body;
    ``write``: committing one, or freshening stored headers)."""

    def __init__(self, count: Callable[[str], None] | None = None, settle: float = SETTLE) -> None:
        self._count = count  # the metric: called with the operation
        self.settle = settle
        self.counts: dict[str, int] = {}
        self.streak = 0  # failures since the last write that succeeded
        self.last_error = ""
        self.last_failed_at: float | None = None  # the wall clock's: shown in /stats
        # The monotonic clock's, for the settle test: a clock stepped back an hour (NTP, a VM
        # resumed) kept ``failing: true`` in /stats for that hour after writes recovered, and a
        # new streak meanwhile was never logged (the old one had not ended).
        self.failed_monotonic = 0.0

    def failed(self, operation: str, key: str, exc: BaseException) -> None:
        self.counts[operation] = self.counts.get(operation, 0) + 1
        if self._count is not None:
            self._count(operation)
        self.last_error = f"{operation} of {key}: {_describe(exc)}"
        now = time.monotonic()
        if self.streak and not self._failing(now):
            self.streak = 0  # the last streak is over (no write came to end it): a new one
        self.last_failed_at = time.time()
        self.failed_monotonic = now
        self.streak += 1
        if self.streak == 1:
            log.warning("storage write failed (%s); responses are passed on unstored while writes "
                        "fail (further failures are counted in /stats and /metrics, not logged)",
                        self.last_error, exc_info=None if _of_the_disk(exc) else exc)

    def _failing(self, now: float) -> bool:
        """Whether a streak is on: a write failed less than ``settle`` seconds ago (the one test
        of ``failing``, of a streak's end and of a new streak's start)."""
        return self.streak > 0 and now - self.failed_monotonic < self.settle

    def succeeded(self) -> None:
        if self.streak and not self._failing(time.monotonic()):
            log.info("storage writes succeed again, after %d failed", self.streak)
            self.streak = 0

    def snapshot(self) -> dict[str, Any]:
        """For ``GET /stats``: failures by operation, whether writes are failing now (a write
        failed less than ``settle`` seconds ago), the last error."""
        return {"write_errors": dict(self.counts), "failing": self._failing(time.monotonic()),
                "last_error": self.last_error or None, "last_failed_at": self.last_failed_at}


def merge_snapshots(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' snapshots as one (sums, any failing, the latest error)."""
    counts: dict[str, int] = {}
    for p in parts:
        for op, n in p["write_errors"].items():
            counts[op] = counts.get(op, 0) + int(n)
    failed = [p for p in parts if p.get("last_failed_at") is not None]
    last = max(failed, key=lambda p: float(p["last_failed_at"])) if failed else None
    return {"write_errors": counts, "failing": any(p["failing"] for p in parts),
            "last_error": last["last_error"] if last else None,
            "last_failed_at": last["last_failed_at"] if last else None}


def _of_the_disk(exc: BaseException) -> bool:
    """An error of the disk, not a bug: an OSError, or SQLite's I/O error or "disk is full"."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, OSError) or (code is not None and code & 0xFF in (10, 13))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, NoRoom):  # (what the filesystem lacks, and what the write said)
        return str(exc.strerror)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return f"{type(exc).__name__}: {exc}"
