"""A real memory cgroup for a test (cgroup v2 or v1), made as a child of the hierarchy's root and
removed after: the test's cachegate is started in it (``enter``), its limit set and read.

A test skips, saying why, where none can be made: not root, no memory controller, a read-only
``/sys/fs/cgroup`` (a container)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path("/sys/fs/cgroup")


class MemoryCgroup:
    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    def _file(self, v2: str, v1: str) -> Path:
        return self.path / (v2 if self.version == 2 else v1)

    def set_limit(self, limit: int | None) -> None:
        if self.version == 2:
            (self.path / "memory.max").write_text("max" if limit is None else str(limit))
            swap = self.path / "memory.swap.max"
            if swap.exists():  # the limit is the memory's: nothing goes to swap instead
                swap.write_text("0")
        else:  # with swap, memory and swap together too (memsw: never below the memory's limit)
            value = "-1" if limit is None else str(limit)
            memory, swap = self.path / "memory.limit_in_bytes", self.path / "memory.memsw.limit_in_bytes"
            raising = limit is None or limit > int(memory.read_text())
            if swap.exists() and raising:
                swap.write_text(value)
            memory.write_text(value)
            if swap.exists() and not raising:
                swap.write_text(value)

    def usage(self) -> int:
        return int(self._file("memory.current", "memory.usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in self._file("memory.events", "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise AssertionError("no oom_kill counter (Linux 4.13 and later have one)")

    def procs(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def enter(self) -> tuple[str, ...]:
        """A program prefix that starts the rest of its command line in this cgroup."""
        return ("/bin/sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh")

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            for pid in self.procs():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _made() -> tuple[Path, int] | str:
    """Where a test's memory cgroup goes and its version, or why there is none."""
    if sys.platform != "linux":
        return "memory cgroups are Linux's"
    if os.geteuid() != 0:
        return "making a cgroup needs root"
    v1 = ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        return v1, 1
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        try:
            (ROOT / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            return f"cannot enable the memory controller for child cgroups: {exc}"
        return ROOT, 2
    return "no memory controller (neither cgroup v1's memory hierarchy nor v2's memory controller)"


@contextlib.contextmanager
def memory_cgroup(limit: int | None = None) -> Iterator[MemoryCgroup]:
    where = _made()
    if isinstance(where, str):
        pytest.skip(where)
    parent, version = where
    path = parent / f"cachegate-test-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup under {parent}: {exc}")
    cgroup = MemoryCgroup(path, version)
    try:
        cgroup.set_limit(limit)
        yield cgroup
    finally:
        cgroup.remove()
