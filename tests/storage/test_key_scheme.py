"""Entries stored by an earlier release under other key and Vary matching rules.

Releases before the key scheme record (those whose index needs converting) normalised Accept-*
values in order, case and weights and read an absent cookie as an empty one: an entry they
stored for ``Accept-Language: en;q=0.5, de`` was a HIT, after the upgrade, for ``de, en;q=0.5``,
which this release keeps apart, and one stored without a cookie for ``Cookie: ab=``. The owner
now empties the disk tier at the first start on such a directory (one WARNING line) and records
the scheme (``<path>/keys``); a directory with no record but an index of this release (the
releases between) keeps its entries.

The earlier release's directory is this release's, with its index rewritten in the earlier
schema (``tests/storage/test_index_conversion.OLD_SCHEMA``) and the record removed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy.storage.disk import KEY_SCHEME, SCHEME_FILE
from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config
from tests.storage.test_index_conversion import OLD_SCHEMA

pytestmark = pytest.mark.slow

PATHS = [f"/s{i}" for i in range(10)]
VARIED = {"Accept-Language": "en;q=0.5, de"}
SCHEME = "key scheme"
CONFIG = "cache: {memory: 8MB, max_object: 1MB, disk: {path: cache, size: 16MB, shards: 2}}\n"


def body(path: str) -> bytes:
    return (path.encode() + b"|") * 20


def route(origin: Origin) -> None:
    for p in PATHS:
        origin.route(p, body=body(p), headers={"Cache-Control": "max-age=600", "Surrogate-Key": "t"})
    origin.route("/v", body=body("/v"), headers={"Cache-Control": "max-age=600", "Vary": "Accept-Language"})


async def run(tmp_path: Path, origin: Origin) -> ProxyProcess:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CONFIG))
    await proxy.start(with_log=True)
    return proxy


async def statuses(proxy: ProxyProcess) -> set[str]:
    found = set()
    for p in PATHS:
        r = await proxy.get(p)
        assert (r.status, r.body) == (200, body(p)), p
        found.add(r.x_cache)
    r = await proxy.get("/v", headers=dict(VARIED))
    assert (r.status, r.body) == (200, body("/v"))
    return found | {r.x_cache}


async def fill(tmp_path: Path, origin: Origin) -> None:
    proxy = await run(tmp_path, origin)
    try:
        assert await statuses(proxy) == {"MISS"}
    finally:
        assert await proxy.stop() == 0


def as_earlier_release(directory: Path) -> None:
    """Rewrite the index in the earlier release's schema (a URL column, no auto_vacuum), every
    row and the numbering kept, and remove the scheme record, which it did not write."""
    file = directory / "index.sqlite3"
    db = sqlite3.connect(file)
    entries = db.execute("SELECT seq, key FROM entries").fetchall()
    tags = db.execute("SELECT tag, key FROM tags").fetchall()
    numbering = db.execute("SELECT name, seq FROM sqlite_sequence").fetchall()
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{file}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(file, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(OLD_SCHEMA)
    db.executemany("INSERT INTO entries (seq, key, url) VALUES (?, ?, ?)",
                   [(seq, key, key.split("\x1f")[0]) for seq, key in entries])
    db.executemany("INSERT INTO tags (tag, key) VALUES (?, ?)", tags)
    db.execute("DELETE FROM sqlite_sequence")
    db.executemany("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", numbering)
    db.close()
    (directory / SCHEME_FILE).unlink(missing_ok=True)


async def test_entries_of_a_release_with_other_matching_rules_are_dropped_once(
        origin: Origin, tmp_path: Path) -> None:
    route(origin)
    await fill(tmp_path, origin)
    as_earlier_release(tmp_path / "cache")

    proxy = await run(tmp_path, origin)
    try:
        # Without the record, each was a HIT: the variant of /v too, matched by the old rules.
        assert await statuses(proxy) == {"MISS"}
        said = [line for line in proxy.lines if SCHEME in line]
        assert len(said) == 1 and "WARNING" in said[0] and "emptied" in said[0], proxy.lines
    finally:
        assert await proxy.stop() == 0
    assert (tmp_path / "cache" / SCHEME_FILE).read_text() == f"{KEY_SCHEME}\n"

    proxy = await run(tmp_path, origin)  # stored under this release's rules: kept from now on
    try:
        assert await statuses(proxy) == {"HIT"}
        assert not [line for line in proxy.lines if SCHEME in line], proxy.lines
    finally:
        assert await proxy.stop() == 0


async def test_a_directory_with_no_record_and_an_index_of_this_release_keeps_its_entries(
        origin: Origin, tmp_path: Path) -> None:
    route(origin)
    await fill(tmp_path, origin)
    (tmp_path / "cache" / SCHEME_FILE).unlink(missing_ok=True)  # (as the releases between left it)

    proxy = await run(tmp_path, origin)
    try:
        assert await statuses(proxy) == {"HIT"}
        assert not [line for line in proxy.lines if SCHEME in line or "emptied" in line], proxy.lines
    finally:
        assert await proxy.stop() == 0
    assert (tmp_path / "cache" / SCHEME_FILE).read_text() == f"{KEY_SCHEME}\n"


async def test_a_start_killed_after_the_conversion_still_drops_them(origin: Origin, tmp_path: Path) -> None:
    """The scheme is noted as the earlier one before the index is converted: a start that dies
    after the conversion (a current index, then) leaves that note, not a directory that looks
    like the releases between."""
    from proxy.storage.index import UrlTagIndex

    route(origin)
    await fill(tmp_path, origin)
    as_earlier_release(tmp_path / "cache")
    from proxy.runtime import _foreign_writes

    assert _foreign_writes(str(tmp_path / "cache"))[1] == KEY_SCHEME - 1
    UrlTagIndex(str(tmp_path / "cache"), repair=True).close()  # converted; then the start dies

    proxy = await run(tmp_path, origin)
    try:
        assert await statuses(proxy) == {"MISS"}
        assert len([line for line in proxy.lines if SCHEME in line]) == 1, proxy.lines
    finally:
        assert await proxy.stop() == 0
