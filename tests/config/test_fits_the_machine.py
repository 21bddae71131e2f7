"""Configs that read well but that this machine cannot run as written: found by ``cachegate
check`` (and at start), at the line concerned, rather than by the running proxy."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from proxy import config
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.storage.arena import Arena
from proxy.storage.room import human_size, machine_memory
from proxy.web.server import open_runtime


def warnings(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: [http://127.0.0.1:9]\n" + text)
    prefix = f"{path}:"
    return [w.removeprefix(prefix) for w in load_config(str(path)).warnings]


def test_a_disk_budget_bigger_than_its_whole_filesystem_is_a_warning_naming_both_sizes(tmp_path: Path) -> None:
    total = shutil.disk_usage(tmp_path).total
    found = warnings(tmp_path, "cache:\n  disk:\n    path: not/made/yet\n    size: 1024TB\n")
    assert len(found) == 1 and found[0].startswith("5: warning: cache.disk.size 1024 TB is more than the "
                                                   f"whole filesystem of {tmp_path / 'not/made/yet'} "
                                                   f"({human_size(total)})"), found
    assert warnings(tmp_path, "cache:\n  disk:\n    path: cache\n    size: 1MB\n") == []


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: [http://127.0.0.1:9]\n" + text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return [p.removeprefix(f"{path}:") for p in info.value.problems]


def test_cache_memory_beyond_the_machines_memory_and_swap_is_refused(tmp_path: Path) -> None:
    """Accepted by check, it failed at start with "cannot open the cache directory": the shared
    memory of cache.memory is one mapping, and more than memory and swap cannot be mapped."""
    machine = machine_memory()
    if machine is None:
        pytest.skip("no /proc/meminfo")
    assert problems(tmp_path, "cache:\n  memory: 1024TB\n") == [
        f"3: cache.memory 1024 TB is more than this machine has {human_size(machine[0])} of memory and "
        f"{human_size(machine[1])} of swap: its shared memory cannot be mapped; set it lower"]


def test_cache_memory_between_the_machines_memory_and_memory_and_swap_is_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_memory", lambda: (1 << 30, 2 << 30))
    assert warnings(tmp_path, "cache:\n  memory: 1GB\n") == []
    assert warnings(tmp_path, "cache:\n  memory: 3GB\n") == [
        "3: warning: cache.memory 3 GB is more than this machine has 1 GB of memory and 2 GB of swap: the "
        "memory tier would live in swap, or be ended when it fills; set it lower"]
    assert problems(tmp_path, "cache:\n  memory: 3073MB\n")[0].startswith("3: cache.memory 3.001 GB is more than")


async def test_shared_memory_that_cannot_be_mapped_is_blamed_on_cache_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Where the check could not tell (no /proc/meminfo, memory taken meanwhile): the one line at
    start names cache.memory and its size, not the cache directory."""
    path = tmp_path / "c.yaml"
    path.write_text(f"upstreams: [http://127.0.0.1:9]\ncache: {{memory: 64MB, disk: {{path: {tmp_path}/c}}}}\n")
    settings = load_config(str(path))

    def no_memory(*args: object) -> Arena:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(Arena, "create", no_memory)
    assert await open_runtime(settings, owner=True) is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("cachegate: cannot map the shared memory of cache.memory (64 MB): Cannot allocate "
                           "memory"), line
