"""``cache.disk.shards`` against the open-files limit: each shard keeps files open in every
process (``proxy.room.SHARD_FILES``), so a count the limit cannot hold beside connections is
refused at its line by ``check`` and by the start, and ``shards`` has a ceiling. Before, 300
shards under ``ulimit -n 1024`` passed ``check``, the start said it listened, then closed every
client connection unanswered (EMFILE at the accept) and the storage upkeep logged a traceback
each round."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import diskcache
import pytest

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.room import MIN_CONNECTIONS, OTHER_FILES, SHARD_FILES, OutOfFiles, most_shards, out_of_files
from proxy.settings import MAX_SHARDS
from tests.harness import Origin, spawn_cachegate

LIMIT = 1024  # the soft and hard open-files limit the subprocesses run under


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def _config(folder: Path, shards: int, upstream: str = "http://127.0.0.1:9") -> Path:
    path = folder / "c.yaml"
    path.write_text("listen: 127.0.0.1:0\nadmin: {listen: null}\n"
                    f"upstreams: [{upstream}]\n"
                    f"cache:\n  memory: 16MB\n  max_object: 1MB\n  disk:\n    path: dsk\n    size: 1GB\n    shards: {shards}\n")
    return path


def _cachegate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=60, preexec_fn=_low_limit)


def test_shards_past_the_most_are_refused_at_their_line(tmp_path: Path) -> None:
    for shards in (MAX_SHARDS + 1, 100_000):
        path = _config(tmp_path, shards)
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert info.value.problems == [f"{path}:10: cache.disk.shards: must be at most {MAX_SHARDS} (each shard "
                                       f"keeps up to {SHARD_FILES} files open in every process and is opened "
                                       "at each start; more than a few a worker lets no more writes run at "
                                       f"once), got {shards}"]


def test_check_and_run_refuse_shards_the_open_files_limit_cannot_hold(tmp_path: Path) -> None:
    most = most_shards(LIMIT)
    assert most == (LIMIT - OTHER_FILES - MIN_CONNECTIONS) // SHARD_FILES > 8
    path = _config(tmp_path, most + 1)
    need = (most + 1) * SHARD_FILES + OTHER_FILES + MIN_CONNECTIONS
    expected = (f"{path}:10: cache.disk.shards {most + 1}: its shards keep up to {(most + 1) * SHARD_FILES} "
                f"files open in every process ({SHARD_FILES} each), and with {OTHER_FILES} more for logs, "
                f"listeners and bodies being read and {MIN_CONNECTIONS} for connections that is {need}, over "
                f"this machine's open-files limit, {LIMIT} (RLIMIT_NOFILE: the hard limit, which a start "
                f"raises to): set cache.disk.shards to at most {most}, or raise the hard limit (LimitNOFILE= "
                "of the unit, ulimit -Hn)")
    check = _cachegate("check", "--no-lookup", "-c", str(path))
    assert (check.returncode, check.stderr.splitlines()) == (2, [expected])
    run = _cachegate("run", "-c", str(path))
    assert (run.returncode, run.stderr.splitlines()) == (2, [expected])
    assert not (tmp_path / "dsk").exists()  # refused before the cache directory was touched


async def test_the_most_shards_the_limit_holds_start_and_serve_under_it(tmp_path: Path, origin: Origin) -> None:
    origin.route("/x", body=b"hello", headers={"Cache-Control": "max-age=60"})
    path = _config(tmp_path, most_shards(LIMIT), origin.url)
    check = await asyncio.to_thread(_cachegate, "check", "--no-lookup", "-c", str(path))
    assert check.returncode == 0, check.stderr
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", str(path)], expect_admin=False,
                                   preexec=_low_limit)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"{proc.proxy_url}/x") as reply:
                    assert (reply.status, await reply.read()) == (200, b"hello")
    finally:
        await asyncio.to_thread(proc.stop)
    text = "".join(proc.output)
    assert "ERROR" not in text, text[-3000:]


def test_a_shard_that_cannot_open_at_the_limit_is_said_as_the_limit(tmp_path: Path) -> None:
    """SQLite says "unable to open database file" when the process has no descriptor left: the
    upkeep logged that with a traceback every round. It is now known for the limit, and said
    with what to do."""
    shard = diskcache.Cache(str(tmp_path / "000"))
    shard.set("k", b"v")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    failed: list[BaseException] = []

    def another_thread() -> None:  # a thread of its own opens its own connection (its own files)
        try:
            shard.get("k")
        except Exception as exc:
            failed.append(exc)

    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1, hard))
        with contextlib.suppress(OSError):  # every descriptor below the limit taken
            for _ in range(100_000):
                held.append(os.open(os.devnull, os.O_RDONLY))
        thread = threading.Thread(target=another_thread)
        thread.start()
        thread.join()
        assert failed and out_of_files(failed[0]), failed
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not out_of_files(failed[0])  # a file opens again: not the limit now
    said = str(OutOfFiles(failed[0]))
    assert "open-files limit" in said and "lower max_connections or cache.disk.shards" in said, said
    shard.close()


def test_a_reload_warns_of_shards_the_next_start_would_refuse(tmp_path: Path) -> None:
    """A reload opens no shard (shards change at a restart): what a start refuses, it warns of."""
    from proxy.config import _check_open_files
    from proxy.yamlsrc import Problems, load_yaml

    path = _config(tmp_path, 100)
    settings = load_config(str(path), machine="no")
    root = load_yaml(str(path), Problems())
    assert root is not None
    for machine in ("start", "reload"):
        found = Problems()
        _check_open_files(settings, found, root, machine, limit=LIMIT)
        said = found.items if machine == "start" else found.warnings
        assert [line.split(": ", 1)[0] for line in said] == [f"{path}:10"], said
        assert "set cache.disk.shards to at most 41" in said[0], said
        assert (machine == "reload") == ("a restart would be refused" in said[0]), said
    found = Problems()
    _check_open_files(settings, found, root, "start", limit=100 * SHARD_FILES + OTHER_FILES + MIN_CONNECTIONS)
    assert not found.items and not found.warnings
