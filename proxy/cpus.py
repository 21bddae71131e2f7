"""How many CPUs this process may really use: ``--workers auto`` / ``workers: auto``.

``os.cpu_count()`` counts the host's CPUs: a container limited to 2 CPUs on a 64-core host
would start 64 workers, each throttled by the CFS quota they share (and each with its own
memory tier). The CPUs a process may use are the fewest of

- its affinity mask (``os.sched_getaffinity``: ``taskset``, ``docker --cpuset-cpus``,
  systemd's ``CPUAffinity=``), and
- its cgroup's CPU quota, and the quota of every cgroup above it: cgroup v2 ``cpu.max``
  (``"200000 100000"`` = 2 CPUs, ``"max 100000"`` = no limit), or cgroup v1
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1 = no limit).

A fractional quota is rounded down (at least 1), as Go's automaxprocs does: 2.5 CPUs run
2 workers. One worker more than the quota would be throttled in every CFS period, which
shows up as latency spikes rather than throughput.

Nothing here raises: a file that is missing or unreadable means "no limit from it".

The cgroup's memory limit is read the same way (``cgroup_memory_limit``), for the config's
check of ``cache.memory``: v2 ``memory.max`` (``"max"`` = no limit), v1
``memory.limit_in_bytes`` (a huge number = no limit); and so is its count of the processes the
kernel's OOM killer ended (``cgroup_oom_kills``): v2 ``memory.events``, v1 ``memory.oom_control``
(``oom_kill N``: Linux 4.13 and later).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all of the host's where there is no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus(cgroup_root: str | None = None, proc_cgroup: str | None = None,
                   affinity: Callable[[], int] | None = None) -> int:
    """The number of workers ``auto`` means: min(affinity mask, cgroup quota), at least 1.
    The defaults are this module's globals, read at each call (tests point them at a fake tree)."""
    cpus = max(1, (affinity or affinity_cpus)())
    quota = cgroup_cpu_limit(cgroup_root or CGROUP_ROOT, proc_cgroup or PROC_SELF_CGROUP)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return cpus


def cgroup_cpu_limit(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup and its ancestors, v2 or v1;
    None when none is set."""
    limits = [q for q in _quotas(Path(cgroup_root), _read(proc_cgroup) or "") if q is not None]
    return min(limits) if limits else None


def _quotas(root: Path, membership: str) -> Iterator[float | None]:
    for line in membership.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: "0::/path"
            for d in _dirs(root, path):
                yield _v2_quota(_read(d / "cpu.max"))
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                if mount.is_dir():
                    for d in _dirs(mount, path):
                        yield _v1_quota(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
                    break


def cgroup_memory_limit(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_SELF_CGROUP) -> int | None:
    """The tightest memory limit (bytes) over this process's cgroup and its ancestors, v2 or
    v1; None when none is set."""
    limits = [n for n in _memory_limits(Path(cgroup_root), _read(proc_cgroup) or "") if n is not None]
    return min(limits) if limits else None


NO_MEMORY_LIMIT = 1 << 62  # v1 says "none" with 2**63 - 1 rounded down to a page


def _memory_limits(root: Path, membership: str) -> Iterator[int | None]:
    for line in membership.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2
            for d in _dirs(root, path):
                yield _bytes(_read(d / "memory.max"))
        elif "memory" in controllers.split(","):  # cgroup v1: "4:memory:/path"
            mount = root / "memory"
            if mount.is_dir():
                for d in _dirs(mount, path):
                    yield _bytes(_read(d / "memory.limit_in_bytes"))


def cgroup_oom_kills(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = PROC_SELF_CGROUP) -> int | None:
    """How many processes of this process's cgroup the kernel's OOM killer ended so far (the
    kills in the cgroup itself: its limit's, or an ancestor's), v2 or v1; None where no counter
    can be read."""
    root = Path(cgroup_root)
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: memory.events "oom_kill N"
            where, name = root, "memory.events"
        elif "memory" in controllers.split(","):  # cgroup v1: memory.oom_control "oom_kill N"
            where, name = root / "memory", "memory.oom_control"
        else:
            continue
        text = _read(next(_dirs(where, path)) / name) if where.is_dir() else None
        for field in (text or "").splitlines():
            key, _, value = field.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _bytes(text: str | None) -> int | None:
    try:
        n = int(text or "")
    except ValueError:  # "max", or nothing
        return None
    return n if 0 < n < NO_MEMORY_LIMIT else None


def _dirs(mount: Path, path: str) -> Iterator[Path]:
    """The cgroup's directory under ``mount`` and every ancestor up to ``mount`` itself.

    In a container with its own cgroup namespace the path (``/``) is the mount itself; with
    a host path that the container's mount does not show (``/docker/<id>``, cgroup v1), only
    the mount is there, and it is the container's own cgroup."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    seen = False
    for n in range(len(parts), -1, -1):
        d = mount.joinpath(*parts[:n])
        if d.is_dir():
            seen = True
            yield d
    if not seen:
        yield mount


def _v2_quota(text: str | None) -> float | None:
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(quota_text: str | None, period_text: str | None) -> float | None:
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: str | Path) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
