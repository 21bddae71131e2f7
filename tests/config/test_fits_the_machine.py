"""Configs that read well but that this machine cannot run as written: found by ``cachegate
check`` (and at start), at the line concerned, rather than by the running proxy."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from proxy import config
from proxy.config import Overrides, base_cache_options, load_config
from proxy.errors import ConfigError
from proxy.room import MEMINFO, human_size, machine_memory
from proxy.runtime import open_storage
from proxy.storage.arena import Arena
from proxy.web.server import open_runtime
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config


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
    assert warnings(tmp_path, "cache:\n  max_object: 50KB\n  disk:\n    path: cache\n    size: 1MB\n") == []


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
    monkeypatch.setattr(config, "cgroup_memory_limit", lambda: None)
    assert warnings(tmp_path, "cache:\n  memory: 1GB\n") == []
    assert warnings(tmp_path, "cache:\n  memory: 3GB\n") == [
        "3: warning: cache.memory 3 GB is more than this machine has 1 GB of memory and 2 GB of swap: the "
        "memory tier would live in swap, or be ended when it fills; set it lower"]
    assert problems(tmp_path, "cache:\n  memory: 3073MB\n")[0].startswith("3: cache.memory 3.001 GB is more than")


def test_cache_memory_beyond_the_limit_of_the_process_cgroup_is_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container limited to less than the machine's memory: the shared memory maps, and the
    kernel ends the process once the memory tier fills it."""
    monkeypatch.setattr(config, "machine_memory", lambda: (8 << 30, 0))
    monkeypatch.setattr(config, "cgroup_memory_limit", lambda: 512 << 20)
    assert warnings(tmp_path, "cache:\n  memory: 256MB\n") == []
    assert warnings(tmp_path, "cache:\n  memory: 1GB\n") == [
        "3: warning: cache.memory 1 GB is more than the memory limit of this process's cgroup (512 MB: a "
        "container's, a unit's MemoryMax=): the kernel would end cachegate once the memory tier fills; set "
        "it lower"]
    monkeypatch.setattr(config, "machine_memory", lambda: None)  # no /proc/meminfo: the cgroup still
    assert len(warnings(tmp_path, "cache:\n  memory: 1GB\n")) == 1


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


@pytest.mark.parametrize(("listen", "admin"), [("127.0.0.1:18555", "127.0.0.1:18555"),
                                               ("0.0.0.0:18555", "127.0.0.1:18555"),
                                               ("'[::]:18555'", "'[::1]:18555'")])
def test_admin_listen_on_a_client_listeners_address_is_refused_at_its_line(
        tmp_path: Path, listen: str, admin: str) -> None:
    """It passed check, and run failed with "address already in use"."""
    found = problems(tmp_path, f"listen: {listen}\nadmin:\n  listen: {admin}\n")
    assert len(found) == 1 and found[0].startswith("4: admin.listen ") and "is the address of a client " \
        "listener" in found[0] and found[0].endswith("give the admin API a port of its own"), found
    assert warnings(tmp_path, "listen: 127.0.0.1:18555\nadmin: {listen: 127.0.0.1:18556}\n") == []
    assert warnings(tmp_path, "listen: 127.0.0.1:0\nadmin: {listen: 127.0.0.1:0}\n") == []  # each its own port
    assert warnings(tmp_path, "listen: 127.0.0.1:18555\nadmin: {listen: '[::1]:18555'}\n") == []


def test_admin_listen_given_on_the_command_line_is_refused_there(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: [http://127.0.0.1:9]\nlisten: 127.0.0.1:18555\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), Overrides(admin_listen="127.0.0.1:18555"))
    assert [p.split(": admin.listen")[0] for p in info.value.problems] == ["<command line>:0"]


@pytest.mark.parametrize(("cache", "expected"), [
    ("cache:\n  memory: 0\n  disk: null\n", "4: cache.memory 0 B with no disk tier (cache.disk: null) stores "
     "nothing: every response would be passed through unstored; give it a size, or a disk tier (to cache "
     "nothing on purpose, say so with a rule: bypass: true)"),
    ("cache:\n  memory: 1\n  disk: null\n", "4: cache.memory 1 B with no disk tier"),
    ("cache:\n  disk: null\n  memory_max_object: 0\n", "5: cache.memory_max_object 0 B with no disk tier"),
    ("cache:\n  disk:\n    size: 0\n", "5: cache.disk.size 0 B (half a shard is the biggest body it keeps) "
     "stores nothing: every response would be passed through unstored; give it a size (to cache"),
    ("cache:\n  max_object: 0\n", "4: cache.max_object 0 B stores nothing"),
])
def test_sizes_that_leave_room_for_no_body_are_refused(tmp_path: Path, cache: str, expected: str) -> None:
    """memory: 0 with disk: null passed check and stored nothing, while the start said responses
    over 4096 bytes were passed through (nginx refuses a zone of size 0 too)."""
    found = problems(tmp_path, "listen: 127.0.0.1:0\n" + cache)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_the_config_warns_of_the_limit_it_sets(tmp_path: Path) -> None:
    """A small memory-only cache with max_object written: the warning gives the limit the rules
    refuse by (half of cache.memory), not one of the shared memory's rounded-up size."""
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: [http://127.0.0.1:9]\ncache: {memory: 1KB, disk: null, max_object: 1MB}\n")
    settings = load_config(str(path))
    assert settings.warnings == (
        f"{path}:2: warning: cache.max_object 1 MB is more than the store can keep (without a disk tier: "
        "cache.memory_max_object, half of cache.memory, and what one record of the shared memory holds): "
        "responses over 512 B (512 bytes) are passed through unstored; lower cache.max_object, or give "
        "cache.memory_max_object (or cache.memory) more room",)
    storage = open_storage(settings)
    try:
        assert storage.writes.max_object == 512 == base_cache_options(settings).max_object
    finally:
        storage.close()
    path.write_text("upstreams: [http://127.0.0.1:9]\ncache: {memory: 1KB, disk: null}\n")
    assert load_config(str(path)).warnings == ()  # memory-only: memory_max_object is the limit


@pytest.mark.slow
async def test_a_max_object_over_half_a_disk_shard_is_one_warning_at_its_line(
        origin: Origin, tmp_path: Path) -> None:
    """disk.size 1GB (8 shards) with the default max_object: check --strict said OK, and the start
    logged "cache.max_object 104857600 is more than the store can keep" once a process (the
    supervisor and each worker) without FILE:LINE. Now it is a config warning: check --strict
    refuses it, run logs it once."""
    import asyncio

    from proxy.cli import main

    config = write_config(str(tmp_path), origin.url,
                          f"cache:\n  memory: 16MB\n  disk:\n    path: {tmp_path}/cache\n    size: 1GB\n")
    expected = (f"{config}:9: warning: cache.max_object 100 MB is more than the store can keep (half a disk "
                "shard: cache.disk.size 1 GB in 8 shard(s)")
    assert await asyncio.to_thread(main, ["check", "--strict", "--config", config]) == 2
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        await proxy.wait_for(lambda: any("started:" in line for line in proxy.lines))
        assert (await proxy.admin("GET", "/healthz")).status == 200
    finally:
        await proxy.stop()
    said = [line for line in proxy.lines if "more than the store can keep" in line]
    assert len(said) == 1 and expected in said[0], said


def test_a_reload_or_a_worker_does_not_refuse_what_the_machine_no_longer_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cache.memory is mapped once, at the start of the supervisor (or single process): a reload
    does not map it again (what would refuse a start only warns), and a worker maps the
    supervisor's (nothing checked)."""
    monkeypatch.setattr(config, "machine_memory", lambda: (1 << 20, 0))
    path = tmp_path / "c.yaml"
    path.write_text("upstreams: [http://127.0.0.1:9]\ncache: {memory: 16MB}\n")
    with pytest.raises(ConfigError):
        load_config(str(path))
    (warning,) = load_config(str(path), machine="reload").warnings
    assert "cache.memory 16 MB is more than this machine has 1 MB of memory and 0 B of swap: its shared " \
           "memory could not be mapped at the next start" in warning, warning
    assert load_config(str(path), machine="no").warnings == ()


def _meminfo(path: Path, ram: int) -> None:
    path.write_text(f"MemTotal:       {ram // 1024} kB\nSwapTotal:             0 kB\n")


async def test_workers_start_again_on_a_machine_that_reports_less_memory_since(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A swapoff (a balloon, lxcfs) after the supervisor mapped cache.memory: a worker restarted
    then still starts (it exited 2 at every restart, with backoff, forever), and a reload is
    accepted with a warning."""
    meminfo = tmp_path / "meminfo"
    _meminfo(meminfo, 16 << 30)
    monkeypatch.setenv(MEMINFO, str(meminfo))
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    proxy = ProxyProcess(str(tmp_path), write_config(
        str(tmp_path), origin.url, "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        _meminfo(meminfo, 1 << 20)  # 1 MB now
        old = proxy.workers[1]
        os.kill(old, signal.SIGKILL)
        await proxy.wait_for(lambda: proxy.workers[1] != old, wait=15)
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 200, reply.body
        assert any("could not be mapped at the next start" in w for w in json.loads(reply.body)["warnings"])
        assert (await proxy.get("/h")).status == 200
    finally:
        assert await proxy.stop() == 0
