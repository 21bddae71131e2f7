"""What an operator sees when the disk tier's writes fail: a write-behind batch that fails in a
shard is a `write` failure (``GET /stats``, ``cachegate_storage_errors_total``), said once, in
words that say what the filesystem lacks; and ``failing`` ends once writes stopped failing.

A real tmpfs with few inodes (root on Linux only): the filesystem runs out of files while it
has bytes free, as ext4 made with few inodes does.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.storage.disk import shard_of
from proxy.storage.failures import WriteFailures
from proxy.storage.tiered import Storage
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.tmpfs import mounted_tmpfs

HOST = {"Host": "site.test"}
# Write-behind batches are the test's flushes; bodies up to 256 KB go through the shared memory.
CONFIG = ("cache: {memory: 16MB, memory_max_object: 256KB, disk: {path: cache, size: 16MB, shards: 2}}\n"
          "shutdown_grace: 1s\n")
BIG = os.urandom(100_000)  # a body of 32 KB and more: a file of its own on disk


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs with room for 400 files and folders (root on Linux only)."""
    yield from mounted_tmpfs(tmp_path / "few", "32m", inodes=400)


def use_up_inodes(filesystem: Path) -> Path:
    """Empty files in a folder of ``filesystem`` until it has no inode left; the folder."""
    folder = filesystem / "filler"
    folder.mkdir()
    for i in itertools.count():
        try:
            (folder / str(i)).touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return folder
    raise AssertionError("unreachable")


async def in_memory(storage: Storage, keys: list[str]) -> None:
    """Until every fill of ``keys`` is in the shared memory (a fill's answer may end first)."""
    for _ in range(200):
        if all(storage.memory.peek(k) is not None for k in keys):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not all in memory: {keys}")


async def stats(proxy: object) -> dict[str, object]:
    reply = await proxy.admin("GET", "/stats")  # type: ignore[attr-defined]
    out: dict[str, object] = json.loads(reply.body)["storage"]
    return out


async def test_a_write_behind_shard_that_fails_for_want_of_inodes_is_a_write_failure_said_once(
        origin: Origin, make_proxy: MakeProxy, few_inodes: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A reviewer's cache directory on ext4 with 64 inodes: once they ran out, no body of 32 KB
    and more could be written (a file each), yet /stats said no write failed and not failing,
    ``cachegate_storage_errors_total{operation="write"}`` stayed 0, and the one line logged was
    an error with a traceback ending in FileNotFoundError: the shard's failure was logged inside
    the disk tier and reported nowhere, and a batch whose other shard committed counted as
    writes that succeed. Now the shard's failure is the batch's `write` failure, said once as a
    warning without a traceback, naming what the filesystem lacks; /healthz stays ok (a failing
    write is no degraded state: each fill tries again)."""
    monkeypatch.setenv("CACHEGATE_PERSIST_INTERVAL", "3600")  # the batches are the test's flushes
    proxy = await make_proxy(config=CONFIG, directory=few_inodes / "p")
    storage = proxy.runtime.storage
    cache = Path(proxy.cache_dir)
    origin.route("/big", body=BIG, headers={"Cache-Control": "max-age=600"})
    big_key = "http://site.test/big"
    # Small bodies (in the database: no file) in the shard the big one is not in: that shard
    # commits while the other fails, in the same batch.
    small = [p for p in (f"/s{i}" for i in range(40))
             if shard_of("http://site.test" + p, 2) != shard_of(big_key, 2)][:3]
    for path in small:
        origin.route(path, body=path.encode() * 10, headers={"Cache-Control": "max-age=600"})
    caplog.set_level(logging.INFO, logger="cachegate")
    filler = use_up_inodes(few_inodes)

    for path, body in [("/big", BIG), *((p, p.encode() * 10) for p in small)]:
        reply = await proxy.get(path, headers=HOST)
        assert (reply.status, reply.body == body) == (200, True)
    await in_memory(storage, [big_key, *("http://site.test" + p for p in small)])
    assert await storage.flush() == len(small)  # the small ones' shard committed, the big one's failed
    assert storage.disk is not None and storage.disk.get_variants(big_key) == ()

    shown = await stats(proxy)
    assert shown["write_errors"] == {"write": 1} and shown["failing"] is True, shown
    assert f"no free inodes on the filesystem of {cache}" in str(shown["last_error"]), shown
    assert "No such file or directory" in str(shown["last_error"]), shown  # (what the write said)
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_storage_errors_total{operation="write"} 1.0' in metrics
    health = await proxy.admin("GET", "/healthz")
    assert (health.status, json.loads(health.body)) == (200, {"status": "ok"})
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0] for r in said] == ["storage write failed"], said
    assert "no free inodes" in said[0].getMessage() and said[0].exc_info is None

    assert await storage.flush() == 0  # fails again: counted, not said again
    assert (await stats(proxy))["write_errors"] == {"write": 2}
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1

    shutil.rmtree(filler)  # inodes again: the next batch commits it
    assert await storage.flush() == 1
    assert [e.body_id for e in storage.disk.get_variants(big_key)] != []
    # Writes work again, but the last failure is less than 10 s old: still failing, unsaid.
    assert (await stats(proxy))["failing"] is True
    assert not any("succeed again" in r.getMessage() for r in caplog.records)


def test_failing_ends_once_writes_stopped_failing_even_with_no_write_since(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reviewer remounted a full tmpfs bigger: write-behind worked again, yet /stats said
    ``failing: true`` 45 s later, until a new miss came to write: the streak ended only at a
    write that succeeded ``settle`` seconds after the last failure. ``failing`` is now whether a
    write failed less than ``settle`` seconds ago; the recovery is still logged at the first
    write that succeeds after that, and a failure after it begins a new streak (said again)."""
    writes = WriteFailures()
    writes.settle = 0.3  # (10 s in use)
    full = OSError(errno.ENOSPC, "No space left on device")
    with caplog.at_level(logging.INFO, logger="cachegate.storage"):
        writes.failed("write", "k", full)
        writes.succeeded()  # room again at once: the streak is not over yet
        assert writes.snapshot()["failing"] is True
        time.sleep(0.35)  # no write since
        assert writes.snapshot()["failing"] is False
        writes.succeeded()
        writes.failed("write", "k", full)
        assert writes.snapshot()["failing"] is True
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "storage write failed", "storage writes succeed again, after 1 failed", "storage write failed"]
