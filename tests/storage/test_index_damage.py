"""The URL and tag index damaged past its schema page (a table's pages overwritten), as a
reviewer did it: opening it reads only the schema, so it was not noticed; every purge then
answered 500 and the entries stayed cached, across restarts, and the upkeep failed every round.

At start the owner checks the whole index (``PRAGMA quick_check``) and sets a damaged one aside,
emptying the disk tier with it; damage found while running is noted beside the file for the next
start, and until then every purge empties the whole disk tier (the index cannot say which entries
it covers)."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.storage.helpers import close_proxy, x_caches

CONFIG = "cache: {memory: 8MB, max_object: 1MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
KEYS = 60
HOST = {"Host": "site.test"}
PAGE = 4096


def body(i: int) -> bytes:
    return b"x" * 500 + str(i).encode()


def tag(i: int) -> str:
    return f"t{i % 3}"


async def filled(origin: Origin, make_proxy: MakeProxy, directory: Path) -> Proxy:
    for i in range(KEYS):
        origin.route(f"/k{i}", body=body(i), headers={"Cache-Control": "max-age=600", "Surrogate-Key": tag(i)})
    proxy = await make_proxy(config=CONFIG, directory=directory)
    for i in range(KEYS):
        assert (await proxy.get(f"/k{i}", headers=HOST)).status == 200
    await proxy.runtime.storage.flush()
    return proxy




def damage(index: Path, how: str) -> None:
    """``tags``: the tags table's root page overwritten (repro_index_damage.py); ``pages``:
    pages 3 and 4 overwritten with random bytes (corrupt.py garble_index, seeded here)."""
    if how == "tags":
        db = sqlite3.connect(index)
        page = dict(db.execute("SELECT name, rootpage FROM sqlite_master"))["tags"]
        db.close()
        at, garbage = (page - 1) * PAGE, b"\xa5" * PAGE
    else:
        at, garbage = 2 * PAGE, random.Random(7).randbytes(2 * PAGE)
    with open(index, "r+b") as f:
        f.seek(at)
        f.write(garbage)


def marked(index: Path) -> bool:
    """Whether a process noted the index damaged, for the next start."""
    return Path(f"{index}.damaged").exists()


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


@pytest.mark.parametrize("how", ["tags", "pages"])
async def test_an_index_damaged_past_its_schema_is_set_aside_at_start(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    await close_proxy(await filled(origin, make_proxy, tmp_path))
    index = tmp_path / "cache" / "index.sqlite3"
    damage(index, how)
    caplog.set_level(logging.WARNING, logger="cachegate")

    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    # Without the check, a purge by tag answered 500 here and its entries stayed HITs.
    purged = await proxy.admin("POST", "/purge", json={"tags": ["t1"]})
    assert purged.status == 200, purged.body
    found = messages(caplog, logging.WARNING, "moved aside")
    assert len(found) == 1 and str(index) in found[0], found
    assert [p.name.startswith("index.sqlite3.corrupt-") for p in index.parent.iterdir()].count(True) == 1
    # The disk tier was emptied with it: nothing it held escapes a purge unlisted.
    assert await x_caches(proxy, list(range(KEYS)), body, HOST) == ["MISS"] * KEYS
    await proxy.runtime.storage.flush()
    assert await x_caches(proxy, list(range(KEYS)), body, HOST) == ["HIT"] * KEYS
    assert (await proxy.admin("POST", "/purge", json={"tags": ["t1"]})).status == 200
    assert (await proxy.admin("POST", "/purge", json={"urls": ["http://site.test/k0"]})).status == 200
    after = await x_caches(proxy, list(range(KEYS)), body, HOST)
    assert [i for i, x in enumerate(after) if x == "HIT"] == [i for i in range(1, KEYS) if tag(i) != "t1"]


async def test_an_index_damaged_while_running_is_noted_and_purges_empty_the_disk(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await filled(origin, make_proxy, tmp_path)
    storage = proxy.runtime.storage
    assert storage.index is not None and storage.disk is not None
    index = tmp_path / "cache" / "index.sqlite3"
    storage.index.checkpoint()
    damage(index, "tags")
    storage.index.close()  # its connections cached the pages: the next ones read the file
    caplog.set_level(logging.WARNING, logger="cachegate")

    # The purge's count reads the tags table: the damage is found (checked with quick_check).
    # The index cannot say which entries the purge covers: the whole disk tier goes.
    purged = await proxy.admin("POST", "/purge", json={"tags": ["t1"]})
    assert purged.status == 200, purged.body
    found = messages(caplog, logging.ERROR, "is damaged")
    assert len(found) == 1 and str(index) in found[0], found
    assert marked(index)
    assert await storage.run(storage.disk.count) == 0
    assert "HIT" not in await x_caches(proxy, [i for i in range(KEYS) if tag(i) == "t1"], body, HOST)
    # Until the restart: the upkeep leaves the index alone, other purges empty the disk too.
    await storage.maintain()
    await storage.flush()
    assert (await proxy.admin("POST", "/purge", json={"urls": ["http://site.test/k0"]})).status == 200
    assert (await proxy.get("/k0", headers=HOST)).x_cache == "MISS"
    assert len(messages(caplog, logging.ERROR, "is damaged")) == 1
    await close_proxy(proxy)

    caplog.clear()
    proxy = await make_proxy(config=CONFIG, directory=tmp_path)
    found = messages(caplog, logging.WARNING, "moved aside")
    assert len(found) == 1 and "found damaged while running" in found[0], found
    assert not marked(index)
    assert await x_caches(proxy, list(range(KEYS)), body, HOST) == ["MISS"] * KEYS
    assert (await proxy.admin("POST", "/purge", json={"tags": ["t2"]})).status == 200


def entries_root(index: Path) -> int:
    db = sqlite3.connect(index)
    try:
        return int(dict(db.execute("SELECT name, rootpage FROM sqlite_master"))["entries"])
    finally:
        db.close()


def damage_page(index: Path, page: int) -> None:
    with open(index, "r+b") as f:
        f.seek((page - 1) * PAGE)
        f.write(b"\xa5" * PAGE)


def gauge(metrics: bytes, name: str) -> float:
    lines = [ln for ln in metrics.decode().splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{")]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


async def test_metrics_stats_and_healthz_answer_while_the_index_cannot_be_counted(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reviewer damaged the index while cachegate ran: once the count cache (10 s) ran out,
    GET /metrics and /stats answered 500 (the count raised "database disk image is
    malformed") while /healthz said ok: monitoring went dark when the disk tier was in trouble.
    Now the last count stands (said so), the damage is a gauge, and /healthz says degraded,
    naming the index and what to do."""
    import proxy.inspection

    monkeypatch.setattr(proxy.inspection, "DISK_COUNT_MAX_AGE", 0.0)  # count at every scrape
    running = await filled(origin, make_proxy, tmp_path)
    storage = running.runtime.storage
    assert storage.index is not None
    index = tmp_path / "cache" / "index.sqlite3"
    before = await running.admin("GET", "/metrics")
    assert before.status == 200
    assert gauge(before.body, 'cachegate_cache_entries{tier="disk"}') == KEYS
    assert gauge(before.body, "cachegate_disk_index_damaged") == 0
    assert (await running.admin("GET", "/healthz")).body == b'{"status": "ok"}'

    storage.index.checkpoint()
    damage_page(index, entries_root(index))  # the entries table's root page: COUNT(*) reads it
    storage.index.close()  # its connections cached the pages: the next ones read the file
    caplog.set_level(logging.WARNING, logger="cachegate")

    for _ in range(3):
        metrics = await running.admin("GET", "/metrics")
        assert metrics.status == 200, metrics.body[-2000:]
        assert gauge(metrics.body, 'cachegate_cache_entries{tier="disk"}') == KEYS  # the last count
        assert gauge(metrics.body, "cachegate_disk_entries_stale") == 1
        assert gauge(metrics.body, "cachegate_disk_index_damaged") == 1
        stats = await running.admin("GET", "/stats")
        assert stats.status == 200, stats.body[-2000:]
        disk = json.loads(stats.body)["tiers"]["disk"]
        assert disk["entries"] == KEYS and "counting failed" in disk["entries_stale"], disk
        assert "quick_check" in disk["index_damaged"], disk
    health = await running.admin("GET", "/healthz")
    assert health.status == 200  # it serves: a load balancer keeps sending traffic
    answer = json.loads(health.body)
    assert answer["status"] == "degraded" and str(index) in answer["reason"], answer
    assert "restart" in answer["reason"], answer
    assert marked(index)  # set aside at the next start
    # Logged once: the count's failure (a warning) and the damage (an error).
    assert len(messages(caplog, logging.WARNING, "counting the disk tier's entries")) == 1
    assert len(messages(caplog, logging.ERROR, "is damaged")) == 1
    await close_proxy(running)


async def test_healthz_says_degraded_when_another_process_found_the_index_damaged(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """With --workers N the workers find the damage and mark it beside the file; the
    supervisor, which answers /healthz and /metrics, reads the mark at its upkeep rounds."""
    running = await filled(origin, make_proxy, tmp_path)
    storage = running.runtime.storage
    index = tmp_path / "cache" / "index.sqlite3"
    assert (await running.admin("GET", "/healthz")).body == b'{"status": "ok"}'
    Path(f"{index}.damaged").write_text(  # noqa: ASYNC240 (a small file, in a test)
        "database disk image is malformed; quick_check: bad\n")
    await storage.maintain()
    answer = json.loads((await running.admin("GET", "/healthz")).body)
    assert answer["status"] == "degraded" and "found damaged while running" in answer["reason"], answer
    assert gauge((await running.admin("GET", "/metrics")).body, "cachegate_disk_index_damaged") == 1
    await close_proxy(running)
