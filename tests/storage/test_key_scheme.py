"""Entries stored by an earlier release under other key and Vary matching rules.

Releases before the key scheme record (those whose index needs converting) normalised Accept-*
values in order, case and weights and read an absent cookie as an empty one: an entry they
stored for ``Accept-Language: en;q=0.5, de`` was a HIT, after the upgrade, for ``de, en;q=0.5``,
which this release keeps apart, and one stored without a cookie for ``Cookie: ab=``. The owner
now empties the disk tier at the first start on such a directory (one WARNING line) and records
the scheme (``<path>/keys``). So does it for a directory with no record (the releases between the
index change and the record, whose rules of what may be stored differ too), and for one the
stamp shows another program or build wrote since this release last ran there: a release that
knows neither the record nor the stamp leaves both as they were, whatever it stores.

The earlier release's directory is this release's, with its index rewritten in the earlier
schema (``tests/storage/test_index_conversion.OLD_SCHEMA``) and the record removed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy.lockfile import HeldLock
from proxy.storage.disk import KEY_SCHEME, SCHEME_FILE, STAMP_FILE
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


async def test_a_directory_with_no_record_and_an_index_of_this_release_is_emptied(
        origin: Origin, tmp_path: Path) -> None:
    """The releases between the index change and the record stored what this release's rules
    would not (a cookie named in another case than a bypass rule's): kept, it was served."""
    route(origin)
    await fill(tmp_path, origin)
    # (As the releases between left it: they wrote neither the record nor the stamp.)
    (tmp_path / "cache" / SCHEME_FILE).unlink(missing_ok=True)
    (tmp_path / "cache" / STAMP_FILE).unlink(missing_ok=True)

    proxy = await run(tmp_path, origin)
    try:
        assert await statuses(proxy) == {"MISS"}
        said = [line for line in proxy.lines if SCHEME in line]
        assert len(said) == 1 and "no record" in said[0] and "emptied" in said[0], proxy.lines
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

    assert "(key scheme 1," in str(_foreign_writes(str(tmp_path / "cache"), None)[1])
    UrlTagIndex(str(tmp_path / "cache"), repair=True).close()  # converted; then the start dies

    proxy = await run(tmp_path, origin)
    try:
        assert await statuses(proxy) == {"MISS"}
        assert len([line for line in proxy.lines if SCHEME in line]) == 1, proxy.lines
    finally:
        assert await proxy.stop() == 0


PLANTED = "/p3"
MALLORYS = b"home page of s-mallory"
ANONYMOUS = b"home page of nobody"


async def another_program_stores(tmp_path: Path, origin: Origin) -> None:
    """An earlier release run on the directory stores a page of Mallory's under the anonymous
    key (its rules did not see her cookie). This release's code stands in for it, then the stamp
    and the record, which that release neither knows nor writes, are put back as it left them,
    and the owner's lock file is written as it writes it (its pid, emptied at its clean stop)."""
    cache = tmp_path / "cache"
    kept = {name: (cache / name).read_bytes() for name in (STAMP_FILE, SCHEME_FILE)}
    origin.route(PLANTED, body=MALLORYS, headers={"Cache-Control": "max-age=600"})
    proxy = await run(tmp_path, origin)
    try:
        r = await proxy.get(PLANTED)
        assert (r.status, r.body, r.x_cache) == (200, MALLORYS, "MISS")
    finally:
        assert await proxy.stop() == 0
    for name, data in kept.items():
        (cache / name).write_bytes(data)
    HeldLock(str(cache / ".lock")).release()
    origin.route(PLANTED, body=ANONYMOUS, headers={"Cache-Control": "max-age=600"})


async def served_anew_then_kept(tmp_path: Path, origin: Origin) -> None:
    proxy = await run(tmp_path, origin)
    try:
        r = await proxy.get(PLANTED)
        # Without the check, a HIT with Mallory's page: the record and the stamp vouched for it.
        assert (r.status, r.body, r.x_cache) == (200, ANONYMOUS, "MISS")
        assert await statuses(proxy) == {"MISS"}
        said = [line for line in proxy.lines if SCHEME in line]
        assert len(said) == 1 and "WARNING" in said[0] and "emptied" in said[0], proxy.lines
        assert "another program" in said[0], said
    finally:
        assert await proxy.stop() == 0
    proxy = await run(tmp_path, origin)  # a plain restart of this release keeps what it stored
    try:
        assert await statuses(proxy) == {"HIT"}
        assert (await proxy.get(PLANTED)).x_cache == "HIT"
        assert not [line for line in proxy.lines if SCHEME in line or "emptied" in line], proxy.lines
    finally:
        assert await proxy.stop() == 0


async def test_what_another_program_stored_after_a_clean_stop_is_never_served(
        origin: Origin, tmp_path: Path) -> None:
    """Upgrade, roll back to a release before the record, upgrade again: the record still said
    this release's scheme, and the rollback's entries were served as this release's."""
    route(origin)
    await fill(tmp_path, origin)
    await another_program_stores(tmp_path, origin)
    await served_anew_then_kept(tmp_path, origin)


async def test_what_another_program_stored_after_a_run_that_was_killed_is_never_served(
        origin: Origin, tmp_path: Path) -> None:
    """A run of ours that was killed leaves the mark of its run, not a stamp to compare: the pid
    in the owner's lock file tells whether another program took the directory since."""
    route(origin)
    await fill(tmp_path, origin)
    proxy = await run(tmp_path, origin)
    await proxy.kill()
    await another_program_stores(tmp_path, origin)
    await served_anew_then_kept(tmp_path, origin)


async def test_a_restart_after_a_kill_keeps_the_entries(origin: Origin, tmp_path: Path) -> None:
    route(origin)
    await fill(tmp_path, origin)
    proxy = await run(tmp_path, origin)
    try:
        assert await statuses(proxy) == {"HIT"}
    finally:
        await proxy.kill()
    proxy = await run(tmp_path, origin)
    try:
        assert await statuses(proxy) == {"HIT"}
        assert not [line for line in proxy.lines if SCHEME in line or "emptied" in line], proxy.lines
    finally:
        assert await proxy.stop() == 0
