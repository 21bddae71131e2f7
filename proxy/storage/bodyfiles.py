"""Open files of big bodies held on disk, kept open for the next hits (an LRU of descriptors).

Why: a disk-tier hit used to cost four trips to the thread pool (a SQLite lookup and an
open, a seek, a read, a read that found the end) and a copy of the body through Python:
≈ 240-300 µs against ≈ 30 µs for the same body from memory. With the body's file already
open, a hit is ``os.sendfile`` from the page cache straight into the socket, on the event
loop (the kernel reads the file; the event loop is not held by a Python-level read).

A body file never changes once written (a new body gets a new id and a new file), so a
descriptor kept for (key, body id) always reads the right bytes, even after diskcache
has removed the file (the descriptor keeps the inode until it is closed). Descriptors are
bounded (``limit``) and a descriptor that is evicted while a response still streams from
it is closed only when that response is done (``BodyFile`` holds it). A file cut short in
place all the same (by hand, a failing disk) keeps its inode but not its length: a read that
ends early raises ``BodyCutShort`` instead of passing off the rest as the end.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import IO

from proxy.errors import ResponseAborted
from proxy.storage.entry import Entry


class BodyCutShort(ResponseAborted):
    """A body file held fewer bytes than its entry says once it was being sent: cut on disk
    after it was opened (a descriptor keeps the inode, not its length). The web layer aborts
    the response, as for an upstream body that breaks off, and the variant is forgotten
    (``Engine.body_file_cut_short``), so the next request refetches."""

    def __init__(self, entry: Entry | None, size: int, held: int) -> None:
        super().__init__(f"body file cut short: {held} of {size} bytes")
        self.entry = entry


class SharedFile:
    """One open body file, shared by the responses that stream from it."""

    __slots__ = ("entry", "evicted", "fd", "file", "size", "users")

    def __init__(self, file: IO[bytes], size: int, entry: Entry | None = None) -> None:
        self.file = file
        self.entry = entry  # whose body it is (a purge closes the files of what it removes)
        self.fd = file.fileno()
        self.size = size
        self.users = 0
        self.evicted = False

    def release(self) -> None:
        self.users -= 1
        if self.evicted and self.users <= 0:
            with contextlib.suppress(OSError):
                self.file.close()


class BodyFile:
    """A response's handle on a shared body file: ``read``/``seek`` like a file (with
    ``os.pread``, so handles never move each other's position), ``fileno`` for sendfile."""

    def __init__(self, shared: SharedFile) -> None:
        self._shared = shared
        self._pos = 0
        self._closed = False
        shared.users += 1

    @property
    def size(self) -> int:
        return self._shared.size

    @property
    def entry(self) -> Entry | None:
        return self._shared.entry

    def fileno(self) -> int:
        return self._shared.fd

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else self.size + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes; raises ``BodyCutShort`` when the file ends before ``size``."""
        wanted = max(min(self.size - self._pos, self.size if n < 0 else n), 0)
        data = os.pread(self._shared.fd, wanted, self._pos)
        if len(data) < wanted:
            raise BodyCutShort(self._shared.entry, self.size, self._pos + len(data))
        self._pos += len(data)
        return data

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._shared.release()

    def __enter__(self) -> BodyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenBodies:
    """(key, body id) -> an open ``SharedFile``, least recently used evicted beyond ``limit``
    files or ``max_bytes`` of bodies (the newest file is kept whatever its size).

    Why a byte bound: a file diskcache has culled or a purge has deleted keeps its disk
    space while it is open here, outside the disk budget."""

    def __init__(self, limit: int = 256, max_bytes: int | None = None) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.bytes = 0  # the bodies of the files kept open
        self._files: OrderedDict[tuple[str, str], SharedFile] = OrderedDict()

    def __len__(self) -> int:
        return len(self._files)

    def get(self, key: str, body_id: str) -> SharedFile | None:
        shared = self._files.get((key, body_id))
        if shared is not None:
            self._files.move_to_end((key, body_id))
        return shared

    def add(self, key: str, body_id: str, file: IO[bytes], size: int, entry: Entry | None = None
            ) -> SharedFile:
        """Keep ``file`` (open, ``size`` bytes) for the next hits; it is ours to close."""
        old = self._files.pop((key, body_id), None)
        if old is not None:
            self._evict(old)
        shared = self._files[(key, body_id)] = SharedFile(file, size, entry)
        self.bytes += size
        while len(self._files) > 1 and (len(self._files) > self.limit or (
                self.max_bytes is not None and self.bytes > self.max_bytes)):
            _, victim = self._files.popitem(last=False)
            self._evict(victim)
        return shared

    def drop(self, covered: Callable[[Entry], bool]) -> int:
        """Close (once unused) the files of the entries ``covered`` says are gone: a deleted
        file's disk space is freed only when its last descriptor closes. How many."""
        gone = [k for k, shared in self._files.items()
                if shared.entry is not None and covered(shared.entry)]
        for k in gone:
            self._evict(self._files.pop(k))
        return len(gone)

    def close(self) -> None:
        while self._files:
            _, victim = self._files.popitem()
            self._evict(victim)

    def _evict(self, shared: SharedFile) -> None:
        self.bytes -= shared.size
        shared.evicted = True
        if shared.users <= 0:
            with contextlib.suppress(OSError):
                shared.file.close()
