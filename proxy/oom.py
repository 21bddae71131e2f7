"""Who the kernel's OOM killer ends when the memory of cachegate's cgroup runs out, and saying so.

At a cgroup's memory limit the kernel kills the process with the highest badness: its resident
memory (the shared memory tier's pages it touched included) plus ``oom_score_adj`` thousandths of
the limit. The supervisor touches the memory tier's pages too (its write-behind thread copies
bodies to the disk tier), so it was as big as a worker, and it was the one killed: its workers
died with it (``PR_SET_PDEATHSIG``), nothing was logged, nothing restarted. A worker is the one
to end, as the supervisor restarts it: each worker's score is raised above the supervisor's
(``raise_worker_score``: raising needs no privilege), by the supervisor as soon as the worker
runs (one still starting, killed before it raised its own, left the supervisor the biggest) and
by the worker itself; and the supervisor lowers its own where it may (``lower_supervisor_score``:
that needs ``CAP_SYS_RESOURCE``; a unit's ``OOMScoreAdjust=`` does it without). A score set
higher already (by a unit, a container runtime) is kept: they only raise a worker's, and only
lower the supervisor's.

When a worker dies by SIGKILL, its cgroup's OOM-kill counter (``proxy.cpus.cgroup_oom_kills``:
v2 ``memory.events``, v1 ``memory.oom_control``) says whether the kernel's OOM killer likely sent
it (``oom_death``). The counter is the cgroup's, not the worker's: any process of the cgroup that
the OOM killer ended counts (another program of the container, a sibling worker), and an
operator's ``kill -9`` looks the same as the OOM killer's. So a death is put down to the OOM killer
only when the counter rose since the worker was last seen alive (its start, or the last ping it
answered: the counter is read before each ping, a small file read every few seconds) by a kill
no other death took. Compared with the supervisor's start alone, a kill of another process at
any time before made every later ``kill -9`` an OOM kill, and a kill counted with no worker's
death (two processes ended at once, one a worker) did so for ever.
"""

from __future__ import annotations

import errno
import logging
import signal

log = logging.getLogger("cachegate.oom")

OOM_SCORE_ADJ = "/proc/{}/oom_score_adj"
WORKER_SCORE = 500  # at least this, and 500 more than the supervisor's (at most 1000)
SUPERVISOR_LOWER_BY = 500  # its own score less this, at least -999 (-1000: never killed at all)
MIN_SCORE, MAX_SCORE = -999, 1000


def read_score(pid: int | str = "self") -> int | None:
    try:
        with open(OOM_SCORE_ADJ.format(pid)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _write_score(value: int, pid: int | str) -> bool:
    path = OOM_SCORE_ADJ.format(pid)
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS):
            log.warning("cannot set %s to %d: %s", path, value, exc)
        return False
    return True


def worker_score(supervisor: int, current: int) -> int:
    """The score a worker whose own is ``current`` takes, its supervisor's being ``supervisor``:
    higher, never lower (the same however often it is asked).

    >>> worker_score(0, 0), worker_score(-500, -500), worker_score(-997, -997), worker_score(700, 700)
    (500, 500, 500, 1000)
    >>> worker_score(0, 800), worker_score(0, 500), worker_score(1000, 1000)
    (800, 500, 1000)
    """
    return max(current, min(MAX_SCORE, max(WORKER_SCORE, supervisor + WORKER_SCORE)))


def supervisor_score(current: int) -> int:
    """The score the supervisor tries to take: lower, never higher.

    >>> supervisor_score(0), supervisor_score(-800), supervisor_score(-1000)
    (-500, -999, -1000)
    """
    return min(current, max(MIN_SCORE, current - SUPERVISOR_LOWER_BY))


def raise_worker_score(worker: int | str = "self", supervisor: int | str | None = None) -> int | None:
    """Raise a worker's ``oom_score_adj`` above its supervisor's (``worker_score``): done by the
    supervisor as soon as it started it, and by the worker at its start (``worker`` "self"), in
    case (the supervisor's pid: None where unknown, then the worker's own score is the base).
    The worker's score now; None unknown."""
    current = read_score(worker)
    if current is None:
        return None
    base = read_score(supervisor) if supervisor is not None else None
    target = worker_score(current if base is None else base, current)
    return target if target != current and _write_score(target, worker) else current


def lower_supervisor_score() -> int | None:
    """Lower the supervisor's ``oom_score_adj`` where it may (``supervisor_score``; without
    ``CAP_SYS_RESOURCE`` the kernel refuses, and it stays as it is, quietly); its score now."""
    current = read_score()
    if current is None:
        return None
    target = supervisor_score(current)
    return target if target != current and _write_score(target, "self") else current


def oom_death(now: int | None, alive_at: int | None, accounted: int | None) -> tuple[bool, int | None]:
    """Whether a worker's SIGKILL death is put down to the kernel's OOM killer, from its cgroup's
    count of OOM kills: ``now`` (read at the death), ``alive_at`` (read when the worker was last
    seen alive: before its start, before a ping it answered) and ``accounted`` (the kills counted
    at the supervisor's start, and those already put down to other deaths). A kill counted after
    the worker was last seen alive and not taken by another death may be its own; then it
    takes one (two workers killed at once are both told). The answer, and ``accounted`` after.
    None (no counter to read): never.

    >>> oom_death(1, 0, 0)  # the count rose while it ran: likely the OOM killer
    (True, 1)
    >>> oom_death(1, 1, 0)  # it rose before the worker started (another process): a plain kill
    (False, 0)
    >>> oom_death(2, 0, 0), oom_death(2, 0, 1)  # two workers killed at once: both told
    ((True, 1), (True, 2))
    >>> oom_death(1, 0, 1)  # the one kill was another worker's death: a plain kill
    (False, 1)
    >>> oom_death(None, 0, 0), oom_death(3, None, 0)
    ((False, 0), (False, 0))
    """
    if now is None or alive_at is None or accounted is None:
        return False, accounted
    floor = max(alive_at, accounted)
    if now > floor:
        return True, floor + 1
    return False, accounted


def signal_name(code: int | None) -> str | None:
    """The signal that ended a process whose exit status (asyncio's) is ``code``, or None.

    >>> signal_name(-9), signal_name(-15), signal_name(1), signal_name(None)
    ('SIGKILL', 'SIGTERM', None, None)
    """
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
