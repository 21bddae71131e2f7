"""An index that does not list every entry of the disk tier: missing (deleted, lost), or older
than the shards (a power loss before its write-ahead log reached the disk, a restored copy).

The shards' entries past it would be served (a crowded directory of the disk's keys asks the
disk for them) and escape every purge: a purge by URL or tag finds keys through the index, and a
ban takes its sequence number from the index's numbering, which restarted below theirs. The
owner empties the disk tier at start in both cases, as it does for a damaged index; and a purge
of everything reaches every entry on disk whatever the index lists."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.storage.helpers import close_proxy, x_caches

# A small disk tier, one shard: 64 directory buckets of 8 keys, so most of the keys below are in
# buckets that overflowed, whose keys are asked on disk (an unlisted entry there is served).
CONFIG = "cache: {memory: 4MB, max_object: 512KB, disk: {path: cache, size: 2MB, shards: 1}}\n"
KEYS = 600
HOST = {"Host": "site.test"}


def body(i: int) -> bytes:
    return b"x" * 100 + str(i).encode()


def route(origin: Origin, keys: range) -> None:
    for i in keys:
        origin.route(f"/k{i}", body=body(i), headers={"Cache-Control": "max-age=600",
                                                       "Surrogate-Key": "t new" if i >= KEYS // 2 else "t"})


async def fill(proxy: Proxy, keys: range) -> None:
    for i in keys:
        assert (await proxy.get(f"/k{i}", headers=HOST)).status == 200
    await proxy.runtime.storage.flush()




def lost_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "does not list every entry" in r.getMessage()]


def remove_index(cache: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache / 'index.sqlite3'}{suffix}").unlink(missing_ok=True)


async def purges_reach_everything(proxy: Proxy) -> None:
    for spec in ({"tags": ["t"]}, {"urls": [f"http://site.test/k{i}" for i in range(0, KEYS, 7)]},
                 {"all": True}):
        assert (await proxy.admin("POST", "/purge", json=spec)).status == 200
    await proxy.runtime.storage.maintain()
    assert "HIT" not in await x_caches(proxy, range(KEYS), body, HOST)


async def test_a_missing_index_empties_the_disk_tier(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    route(origin, range(KEYS))
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    await fill(proxy, range(KEYS))
    await close_proxy(proxy)
    remove_index(tmp_path / "cache")
    caplog.set_level(logging.WARNING, logger="cachegate")

    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    # Without the emptying, a few hundred of them were HITs here, and stayed HITs after purges
    # by tag, URL and of everything.
    assert await x_caches(proxy, range(KEYS), body, HOST) == ["MISS"] * KEYS
    found = lost_warnings(caplog)
    assert len(found) == 1 and "missing" in found[0], found
    await purges_reach_everything(proxy)


async def test_an_index_older_than_the_shards_empties_the_disk_tier(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    route(origin, range(KEYS))
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    await fill(proxy, range(KEYS // 2))
    index = tmp_path / "cache" / "index.sqlite3"
    snapshot = tmp_path / "snapshot.sqlite3"
    src, dst = sqlite3.connect(index), sqlite3.connect(snapshot)
    src.backup(dst)
    src.close()
    dst.close()
    await fill(proxy, range(KEYS // 2, KEYS))  # committed on disk, past the snapshot
    await close_proxy(proxy)
    remove_index(tmp_path / "cache")
    snapshot.rename(index)  # the index comes back as it was before the last fills
    caplog.set_level(logging.WARNING, logger="cachegate")

    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    assert await x_caches(proxy, range(KEYS), body, HOST) == ["MISS"] * KEYS
    found = lost_warnings(caplog)
    assert len(found) == 1 and "older than the disk tier" in found[0], found
    await purges_reach_everything(proxy)


async def test_a_shard_from_before_the_sequence_table_is_not_read_whole_and_notes_its_next_commit(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A shard written before shards noted their highest sequence number starts without one
    (decoding every record for it held the first start after an upgrade about a minute at a
    million entries), keeps its entries, and notes the number at its next commit."""
    route(origin, range(KEYS))
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    await fill(proxy, range(KEYS // 2))
    await close_proxy(proxy)
    db = tmp_path / "cache" / "000" / "cache.db"
    shard = sqlite3.connect(db, isolation_level=None)
    shard.execute("DROP TABLE cachegate_seq")
    shard.close()
    caplog.set_level(logging.WARNING, logger="cachegate")
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    assert lost_warnings(caplog) == []
    assert await x_caches(proxy, range(KEYS // 2), body, HOST) == ["HIT"] * (KEYS // 2)
    shard = sqlite3.connect(db, isolation_level=None)
    assert shard.execute("SELECT seq FROM cachegate_seq").fetchall() == []
    shard.close()
    await fill(proxy, range(KEYS // 2, KEYS))
    await close_proxy(proxy)
    shard = sqlite3.connect(db, isolation_level=None)
    assert [int(r[0]) > 0 for r in shard.execute("SELECT seq FROM cachegate_seq")] == [True]
    shard.close()


async def test_an_index_as_new_as_the_shards_keeps_them(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    route(origin, range(KEYS))
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    await fill(proxy, range(50))
    await close_proxy(proxy)
    caplog.set_level(logging.WARNING, logger="cachegate")
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    assert lost_warnings(caplog) == []
    assert await x_caches(proxy, range(50), body, HOST) == ["HIT"] * 50


async def test_a_purge_of_everything_reaches_entries_the_index_lost(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """While running: the index's rows gone and its numbering below the disk's (as a rolled-back index
    would have it). A purge of everything still hides every entry at once (its ban covers the
    disk's highest sequence number), sweeps every key on disk (not the index's), and a fill
    after it is not covered by it."""
    route(origin, range(KEYS))
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    await fill(proxy, range(100))
    storage = proxy.runtime.storage
    disk = storage.disk
    assert disk is not None
    db = sqlite3.connect(tmp_path / "cache" / "index.sqlite3", isolation_level=None)
    db.execute("DELETE FROM entries")
    db.execute("DELETE FROM tags")
    db.execute("UPDATE sqlite_sequence SET seq = 10 WHERE name = 'entries'")
    db.close()
    assert (await proxy.admin("POST", "/purge", json={"all": True})).status == 200
    assert await x_caches(proxy, range(100, 110), body, HOST) == ["MISS"] * 10  # fills after the purge
    await storage.flush()
    await storage.maintain()  # the ban's sweep, then the ban is dropped
    assert storage.index is not None and storage.index.bans() == []
    # Only the fills after the purge are left on disk (a metadata and a body row each): the
    # sweep went through the disk's keys, and the fills numbered past the ban.
    assert await storage.run(disk.count) == 2 * 10
    assert "HIT" not in await x_caches(proxy, range(100), body, HOST)
    assert await x_caches(proxy, range(100, 110), body, HOST) == ["HIT"] * 10
