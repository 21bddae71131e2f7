"""Bodies being received: kept in memory while small, spilled to a temp file past a threshold.

Each process spools into its own folder under ``<cache>/tmp/`` and holds an
exclusive ``flock`` on a lock file inside it for as long as it lives. The kernel
drops the lock when the process dies, even by SIGKILL, so ``sweep_dead_spools``
can tell a dead process's leftovers (remove them) from a live one's (leave them)
without trusting PIDs, which a container restart reuses.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import IO

log = logging.getLogger("cachegate.storage")

LOCK_NAME = ".owner.lock"


class SpoolDir:
    """This process's spool folder, locked for the process's lifetime."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = root
        self.path = os.path.join(root, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.path)
        self._lock_fd: int | None = os.open(os.path.join(self.path, LOCK_NAME),
                                            os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def make_file(self) -> IO[bytes]:
        return tempfile.NamedTemporaryFile(dir=self.path, prefix="spool-", delete=False)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def sweep_dead_spools(root: str) -> int:
    """Remove the spool folders of processes that are gone; return how many."""
    removed = 0
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
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
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            if fd >= 0:
                os.close(fd)
    if removed:
        log.info("removed %d spool folder(s) of dead processes", removed)
    return removed
