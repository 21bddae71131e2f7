"""A damaged SQLite database in the cache directory at start (a shard, or the URL and tag
index): cachegate starts anyway, with the damaged one set aside beside it and made anew, empty,
and one warning naming it. A lost shard's entries are misses; a lost index empties the disk
tier too (entries it no longer lists would escape purges)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

CONFIG = "cache: {memory: 64MB, disk: {path: cache, size: 512MB, shards: 2}}\n"
KEYS = 20
HOST = {"Host": "site.test"}  # the same keys after a restart on another port


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if how == "garbage":
            f.write(os.urandom(size))  # "file is not a database"
        else:
            f.truncate(size // 2)  # "disk I/O error"
    for journal in ("-wal", "-shm"):
        Path(f"{path}{journal}").unlink(missing_ok=True)


async def filled(origin: Origin, make_proxy: MakeProxy, directory: Path, config: str = CONFIG) -> None:
    for i in range(KEYS):
        origin.route(f"/k{i}", body=b"x" * 100 + str(i).encode(), headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=config, directory=directory)
    for i in range(KEYS):
        assert (await proxy.get(f"/k{i}", headers=HOST)).status == 200
    await proxy.runtime.storage.flush()
    await proxy.session.close()
    await proxy.close()


async def x_caches(proxy: Proxy) -> list[str]:
    out = []
    for i in range(KEYS):
        reply = await proxy.get(f"/k{i}", headers=HOST)
        assert (reply.status, reply.body) == (200, b"x" * 100 + str(i).encode())
        out.append(reply.x_cache)
    return out


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("how", ["garbage", "truncated"])
async def test_a_damaged_shard_is_set_aside_and_its_entries_are_misses(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    directory = tmp_path / "p"
    await filled(origin, make_proxy, directory)
    shard = directory / "cache" / "000"
    damage(shard / "cache.db", how)
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="cachegate")

    proxy = await make_proxy(config=CONFIG, directory=directory)
    found = warnings(caplog)
    assert len(found) == 1 and str(shard) in found[0] and "moved aside" in found[0], found
    aside = [p for p in (directory / "cache").iterdir() if p.name.startswith("000.corrupt-")]
    assert len(aside) == 1 and (aside[0] / "cache.db").exists()
    first = await x_caches(proxy)
    # The other shard's entries are still hits; the damaged one's are misses, stored anew.
    assert "HIT" in first and "MISS" in first
    assert await x_caches(proxy) == ["HIT"] * KEYS
    assert await proxy.runtime.storage.flush() >= 0
    purged = await proxy.admin("POST", "/purge", json={"all": True})
    assert purged.status == 200
    assert await x_caches(proxy) == ["MISS"] * KEYS


async def test_a_damaged_index_is_set_aside_and_the_disk_tier_emptied(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "p"
    await filled(origin, make_proxy, directory)
    index = directory / "cache" / "index.sqlite3"
    damage(index, "garbage")
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="cachegate")

    proxy = await make_proxy(config=CONFIG, directory=directory)
    found = warnings(caplog)
    assert len(found) == 1 and str(index) in found[0] and "moved aside" in found[0], found
    assert len([p for p in (directory / "cache").iterdir() if p.name.startswith("index.sqlite3.corrupt-")]) == 1
    # Every entry was dropped with the index: none escapes a purge unlisted.
    assert await x_caches(proxy) == ["MISS"] * KEYS
    assert await x_caches(proxy) == ["HIT"] * KEYS
    purged = await proxy.admin("POST", "/purge", json={"urls": ["http://site.test/k3"]})
    assert purged.status == 200
    assert (await proxy.get("/k3", headers=HOST)).x_cache == "MISS"
