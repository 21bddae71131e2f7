"""Running out of file descriptors is no shard damage: the supervisor (it owns the cache
directory and carries out purges) run with its open-files limit lowered, as a reviewer did it.

Before: a purge's storage thread that had not opened a shard yet met "unable to open database
file" (EMFILE), took three healthy shards for damaged (the mark failing with EMFILE too), and
answered 200 without deleting anything from them: after a restart every purged URL was a HIT
again (the old content). Now such an error is transient: the purge answers 503 ("purge
again"), nothing is marked, and a purge that answered 200 stays purged after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from proxy.storage.disk import DAMAGED_MARK, DiskTier, ShardUnavailable
from tests.harness import Origin
from tests.storage.procs import HOST
from tests.storage.test_shard_damage_running import body, damaged_logged, fill, routes, rows, started

pytestmark = pytest.mark.slow

KEYS = 60
PURGES = 6


async def answer(admin_url: str, spec: dict[str, object]) -> tuple[int, str]:
    """The purge's status and body (0: no answer, the admin API could not take the connection)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, \
                s.post(admin_url + "/purge", json=spec) as r:
            return r.status, (await r.read()).decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


async def test_purges_out_of_file_descriptors_mark_nothing_and_what_answered_200_stays_purged(
        origin: Origin, tmp_path: Path) -> None:
    routes(origin, KEYS)
    proxy = await started(origin, tmp_path, shards=4)
    cache = tmp_path / "cache"
    assert proxy.process is not None
    pid = proxy.process.pid
    groups = [list(range(k, KEYS, PURGES)) for k in range(PURGES)]
    try:
        await fill(proxy, range(KEYS))
        await proxy.wait_for(lambda: rows(cache) >= KEYS)  # written behind
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        opened = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (opened + 3, hard))
        try:
            # Concurrent purges: storage threads that have not opened every shard yet.
            answers = await asyncio.gather(*(
                answer(proxy.admin_url, {"urls": [f"http://{HOST}/k{i}" for i in group]})
                for group in groups))
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert not list(cache.glob("*/cache.db.damaged"))
        assert not damaged_logged(proxy), "\n".join(proxy.lines[-30:])
        for status, text in answers:
            assert status in (0, 200, 503), text
            if status == 503:
                assert "purge again" in text, text
        assert any(status != 200 for status, _ in answers), answers  # (the limit was met)
        assert await proxy.stop() == 0
        await proxy.start("--workers", "2", with_log=True)
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        for (status, _), group in zip(answers, groups, strict=True):
            if status == 200:
                for i in group:
                    r = await proxy.get(f"/k{i}")
                    assert (r.x_cache, r.body) == ("MISS", body(i)), (i, answers)
        # The limit restored, every purge is carried out, and stays so after a restart.
        for group in groups:
            status, text = await answer(proxy.admin_url,
                                        {"urls": [f"http://{HOST}/k{i}" for i in group]})
            assert status == 200, text
        assert await proxy.stop() == 0
        await proxy.start("--workers", "2", with_log=True)
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        for i in range(KEYS):
            assert (await proxy.get(f"/k{i}")).x_cache != "HIT", i
    finally:
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop()


def test_a_damaged_shard_whose_mark_cannot_be_written_fails_purges_until_it_can(tmp_path: Path) -> None:
    """A purge gives up a damaged shard's keys (answers 200) only once its mark is on disk: the
    next start sets it aside. Before: given up when the mark failed too, and after a restart
    the shard, never set aside, served what the purge had answered 200 for."""
    disk = DiskTier(str(tmp_path / "cache"), 40 * 2**20, shards=1)
    db = tmp_path / "cache" / "000" / "cache.db"
    mark = tmp_path / "cache" / "000" / DAMAGED_MARK
    keys = [f"k{i}" for i in range(300)]
    try:
        shard = disk._shard("k0")
        for k in keys:
            shard.set("m:" + k, os.urandom(3000))
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        os.truncate(db, db.stat().st_size // 3)  # damaged while running
        mark.symlink_to(tmp_path / "nowhere" / "mark")  # (cannot be written: as under EMFILE)
        lost: list[str] = []
        with pytest.raises(ShardUnavailable, match="cannot be marked"):
            disk.delete_keys(keys, lost=lost)
        assert lost == []
        with pytest.raises(ShardUnavailable, match="cannot be marked"):  # (tried again)
            disk.delete_keys(keys, lost=lost)
        assert disk.get_variants("k1") == ()  # (this process no longer reads it meanwhile)
        mark.unlink()
        assert disk.delete_keys(keys, lost=lost) == []
        assert sorted(lost) == sorted(keys) and mark.is_file()
    finally:
        disk.close()
