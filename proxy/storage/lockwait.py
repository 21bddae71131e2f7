"""Who holds the shared memory's locks, and who waits for them: for the supervisor's watchdog.

The arena's three locks (``proxy.storage.arena``: the ring, the lease table, the directory)
are POSIX record locks on single bytes of its memfd. A worker stopped or hung while it holds
one freezes every process that then asks for it: their event loops block in ``fcntl`` and
answer no ping either. Killing those waiters (what a watchdog that only sees silence does)
cuts their requests and frees nothing; killing the holder frees the lock at once (the kernel
drops a dead process's locks) and the waiters carry on. So when a worker leaves its ping
unanswered, the supervisor asks the kernel, from ``/proc/locks``, whether that worker waits
for one of these locks and which process holds it (``blocker``).

Why ``/proc/locks`` rather than ``fcntl(F_GETLK)`` on the memfd: F_GETLK names a holder but
not the waiters (whether the silent worker waits for the lock, or is stuck elsewhere while a
healthy one happens to hold it for a microsecond), and it never reports the asking process's
own locks (the supervisor's write-behind thread). ``/proc/locks`` lists both, as pids of the
reader's pid namespace, keyed by the file's device and inode. Read only when a ping timed
out: nothing here touches the request path. Linux only; elsewhere (or when it cannot be
read) ``read_locks`` gives None and the watchdog kills the silent worker, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC_LOCKS = "/proc/locks"


@dataclass(frozen=True, slots=True)
class Lock:
    """One line of ``/proc/locks`` on the arena's file: a held lock, or a request waiting."""

    pid: int
    start: int
    end: int  # inclusive; ``EOF`` (to the end of the file) reads as a very large number
    waiting: bool

    def overlaps(self, other: Lock) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True, slots=True)
class Locks:
    """The POSIX locks on one file, held and waited for, as ``/proc/locks`` listed them."""

    entries: tuple[Lock, ...]

    def held_by(self, pid: int) -> list[int]:
        """The first bytes of the locks ``pid`` holds."""
        return [e.start for e in self.entries if e.pid == pid and not e.waiting]

    def waiters_for(self, pid: int) -> set[int]:
        """The processes waiting for a lock ``pid`` holds."""
        held = [e for e in self.entries if e.pid == pid and not e.waiting]
        return {e.pid for e in self.entries
                if e.waiting and e.pid != pid and any(e.overlaps(h) for h in held)}

    def blocker(self, pid: int) -> tuple[int, int] | None:
        """(holder pid, first byte of its lock) when ``pid`` waits for a lock on this file: the
        process at the end of the chain (a holder that waits in turn for another lock is
        followed to that one's holder), the one that has to go for ``pid`` to go on. None when
        ``pid`` waits for none."""
        seen = {pid}
        found: tuple[int, int] | None = None
        current = pid
        while True:
            nxt = self._holder_of_wait(current)
            if nxt is None or nxt[0] in seen:
                return found
            found = nxt
            current = nxt[0]
            seen.add(current)

    def _holder_of_wait(self, pid: int) -> tuple[int, int] | None:
        for w in self.entries:
            if w.pid != pid or not w.waiting:
                continue
            for h in self.entries:
                if not h.waiting and h.pid != pid and h.overlaps(w):
                    return h.pid, h.start
        return None


def parse(text: str, device: tuple[int, int], inode: int) -> Locks:
    """The POSIX locks on the file ``device`` (major, minor) ``inode`` in ``/proc/locks``'s text::

        1: POSIX  ADVISORY  WRITE 1234 00:01:5678 0 0
        1: -> POSIX  ADVISORY  WRITE 1240 00:01:5678 0 0

    (the second waits for the first). Lines of other kinds or files are skipped."""
    want = f"{device[0]:02x}:{device[1]:02x}:{inode}"
    entries: list[Lock] = []
    for line in text.splitlines():
        fields = line.split()
        waiting = len(fields) > 1 and fields[1] == "->"
        if waiting:
            del fields[1]
        if len(fields) < 8 or fields[1] != "POSIX" or fields[5] != want:
            continue
        try:
            pid, start = int(fields[4]), int(fields[6])
            end = (1 << 63) if fields[7] == "EOF" else int(fields[7])
        except ValueError:
            continue
        entries.append(Lock(pid, start, end, waiting))
    return Locks(tuple(entries))


def read_locks(fd: int) -> Locks | None:
    """The POSIX locks on the file open at ``fd``, now; None when ``/proc/locks`` cannot be read."""
    try:
        st = os.fstat(fd)
        with open(PROC_LOCKS) as f:
            text = f.read()
    except OSError:
        return None
    return parse(text, (os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)
