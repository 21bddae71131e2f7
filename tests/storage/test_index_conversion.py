"""The owner's one-time conversion of an earlier release's index (a URL column, no auto_vacuum).

It used to be ``ALTER TABLE DROP COLUMN`` and ``VACUUM`` in place: VACUUM writes a whole copy of
the index to SQLite's temporary directory (``$SQLITE_TMPDIR``, ``$TMPDIR``, ``/var/tmp``,
``/tmp``), not the cache directory, and where that is smaller than the index (the Kubernetes
manifest's 64 Mi ``/tmp`` beside a read-only root) every start failed, saying the cache
directory's filesystem was full and that nothing in it was changed, though the column was
already gone. Now the new index is built beside the old one and renamed over it: it needs room
in the cache directory only, a full one is named as such, and a kill at any point leaves the
old index (converted again at the next start) or the new one, whole.

Real SQLite files of the earlier release's schema, real tmpfs mounts (root on Linux only) and
real subprocesses killed with SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.room import FilesystemFull
from proxy.storage.index import UrlTagIndex
from tests.storage.test_full_filesystem import fill
from tests.tmpfs import mounted_tmpfs

ROOT = str(Path(__file__).resolve().parents[2])

# The index schema of the earlier release (1e438bf), as its ``_SCHEMA`` made it.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, url TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_url ON entries (url);
CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tag, key))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_key ON tags (key);
CREATE TABLE IF NOT EXISTS bans (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, value TEXT NOT NULL,
    soft INTEGER NOT NULL, seq INTEGER NOT NULL);
"""

Contents = tuple[list[tuple[int, str]], list[tuple[str, str]], list[tuple[object, ...]], list[tuple[str, int]]]


def old_index(cache: Path, n: int, pad: int = 0) -> Contents:
    """An earlier release's index of ``n`` entries (every fifth a second variant of a URL, two
    tags each, a ban that raised the numbering past the rows, a culled row), as it leaves it
    killed: its last rows only in its WAL. What it holds (``contents``)."""
    source = cache.parent / f"{cache.name}.src"
    source.mkdir(parents=True)
    db = sqlite3.connect(source / "index.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.executescript(OLD_SCHEMA)

    def add(lo: int, hi: int) -> None:
        db.execute("BEGIN")
        for i in range(lo, hi):
            url = f"http://site.test/k{i}?{'p' * pad}"
            key = url + "\x1fh:accept=x" if i % 5 == 4 else url
            db.execute("INSERT INTO entries (key, url) VALUES (?, ?)", (key, url))
            db.executemany("INSERT INTO tags (tag, key) VALUES (?, ?)", [(f"t{i % 3}", key), ("all", key)])
        db.execute("COMMIT")

    add(0, n - n // 10)
    db.execute("DELETE FROM entries WHERE seq = 2")
    db.execute("DELETE FROM tags WHERE key = 'http://site.test/k1?' || ?", ("p" * pad,))
    db.execute("INSERT INTO bans (kind, value, soft, seq) VALUES ('tag', 't1', 1, ?)", (n + 50,))
    db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'entries'", (n + 50,))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    add(n - n // 10, n)  # only in the WAL
    cache.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):  # copied as the kill left them (no writer in between)
        shutil.copyfile(source / f"index.sqlite3{suffix}", cache / f"index.sqlite3{suffix}")
    assert os.path.getsize(cache / "index.sqlite3-wal") > 0
    db.close()
    shutil.rmtree(source)
    found = contents(cache / "index.sqlite3")
    assert len(found[0]) == n - 1 and found[3] == [("bans", 1), ("entries", n + 50 + n // 10)]
    return found


def contents(file: Path) -> Contents:
    """Every row an index holds (its keys with their numbers, tags, bans, numbering), read from
    a copy: a read leaves the file as it is."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = os.path.join(scratch, "index.sqlite3")
        for suffix in ("", "-wal"):
            if os.path.exists(f"{file}{suffix}"):
                shutil.copyfile(f"{file}{suffix}", f"{copy}{suffix}")
        db = sqlite3.connect(copy)
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            return (db.execute("SELECT seq, key FROM entries ORDER BY seq").fetchall(),
                    db.execute("SELECT tag, key FROM tags ORDER BY tag, key").fetchall(),
                    db.execute("SELECT id, kind, value, soft, seq FROM bans ORDER BY id").fetchall(),
                    db.execute("SELECT name, seq FROM sqlite_sequence ORDER BY name").fetchall())
        finally:
            db.close()


def columns(file: Path) -> list[str]:
    db = sqlite3.connect(file)
    try:
        return [r[1] for r in db.execute("PRAGMA table_info(entries)")]
    finally:
        db.close()


def assert_converted(cache: Path, expected: Contents) -> None:
    """The owner's start found (or made) the converted index: every row kept, the URL column
    gone, auto_vacuum on, and nothing half-made left beside it."""
    index = UrlTagIndex(str(cache), repair=True)
    try:
        assert not index.recreated and not index.created
        db = index._db()
        assert [r[1] for r in db.execute("PRAGMA table_info(entries)")] == ["seq", "key"]
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert index.current_seq() == expected[3][1][1]
        variant = next(k for _, k in expected[0] if k.startswith("http://site.test/k4?"))
        assert index.keys_for_url(variant.split("\x1f")[0]) == [variant]
        assert index.add("http://site.test/new", ()) == expected[3][1][1] + 1
        index.remove(["http://site.test/new"])
        index.checkpoint()
    finally:
        index.close()
    assert contents(cache / "index.sqlite3")[:3] == expected[:3]
    assert not [p.name for p in cache.iterdir() if ".new" in p.name or ".corrupt-" in p.name]


def test_the_conversion_keeps_every_row_and_drops_the_url_column(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    expected = old_index(cache, 500)
    os.chmod(cache / "index.sqlite3", 0o640)
    assert_converted(cache, expected)
    assert (cache / "index.sqlite3").stat().st_mode & 0o777 == 0o640  # the operator's mode kept
    assert columns(cache / "index.sqlite3") == ["seq", "key"]


def test_an_index_of_this_release_is_not_converted_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    index = UrlTagIndex(str(cache), repair=True)  # made anew: auto_vacuum from its first page
    index.add_many([("http://h/a", ("t",))])
    index.close()
    inode = (cache / "index.sqlite3").stat().st_ino
    index = UrlTagIndex(str(cache), repair=True)
    try:
        assert index._db().execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert index.keys_for_tag("t") == ["http://h/a"]
    finally:
        index.close()
    assert (cache / "index.sqlite3").stat().st_ino == inode  # the same file: not rebuilt


@pytest.fixture
def small_tmpdir(tmp_path: Path) -> Iterator[Path]:
    """SQLite's temporary directory for a child process: a 1 MiB tmpfs (root on Linux only)."""
    yield from mounted_tmpfs(tmp_path / "tmp", "1m")


def convert_in_child(cache: Path, tmpdir: Path | None = None, point: str = "") -> subprocess.Popen[str]:
    """The owner's start as a real process: ``UrlTagIndex(repair=True)`` on ``cache``, with
    SQLite's temporary directory at ``tmpdir``; ``point``: it kills itself with SIGKILL right
    before or right after the new file is renamed over the old one."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    if tmpdir is not None:
        env.update(SQLITE_TMPDIR=str(tmpdir), TMPDIR=str(tmpdir))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cache), point], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


CHILD = """
import os, signal, sys
from proxy.storage.index import UrlTagIndex
point = sys.argv[2]
replace = os.replace
def replace_then(src, dst):
    if point == "before-rename":
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
    if point == "after-rename":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then
UrlTagIndex(sys.argv[1], repair=True).close()
print("converted")
"""


def test_the_conversion_needs_no_room_in_the_temporary_directory(tmp_path: Path, small_tmpdir: Path) -> None:
    cache = tmp_path / "cache"
    expected = old_index(cache, 3000, pad=200)
    assert (cache / "index.sqlite3").stat().st_size > 4 << 20  # four times the temporary room
    child = convert_in_child(cache, small_tmpdir)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out
    assert "database or disk is full" not in out, out
    assert columns(cache / "index.sqlite3") == ["seq", "key"]
    assert_converted(cache, expected)


@pytest.mark.parametrize("point", ["copying-entries", "copying-tags", "before-rename", "after-rename"])
def test_a_conversion_killed_at_any_point_leaves_the_old_index_or_the_new_one(tmp_path: Path, point: str) -> None:
    cache = tmp_path / "cache"
    expected = old_index(cache, 20000, pad=200)
    new = cache / "index.sqlite3.new"
    copying = point.startswith("copying")
    child = convert_in_child(cache, point="" if copying else point)
    if copying:  # killed once the new file has its schema (the keys next), or its keys too
        past = 0 if point == "copying-entries" else 1 << 20
        deadline = time.monotonic() + 60
        while not (new.exists() and new.stat().st_size > past) and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, out
    # Killed: the old index, whole (its rows in its WAL too), or the new one, whole.
    assert contents(cache / "index.sqlite3")[:3] == expected[:3]
    old = columns(cache / "index.sqlite3") == ["seq", "key", "url"]
    assert old == (point != "after-rename")
    assert new.exists() == (point != "after-rename")  # half made, or made and not renamed yet
    # The next start converts it (removing the half-made file), or finds it converted.
    assert_converted(cache, expected)


@pytest.fixture
def small_cache_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for the cache directory (root on Linux only)."""
    yield from mounted_tmpfs(tmp_path / "small", "16m")


def test_no_room_for_the_conversion_names_the_cache_directory_and_changes_nothing(
        tmp_path: Path, small_cache_fs: Path) -> None:
    cache = small_cache_fs / "cache"
    expected = old_index(cache, 3000, pad=200)
    before = (cache / "index.sqlite3").stat().st_size
    filler = fill(small_cache_fs, 1 << 20)  # far less than the new index needs
    with pytest.raises(FilesystemFull) as raised:
        UrlTagIndex(str(cache), repair=True)
    said = str(raised.value)
    assert f"converting the cache index {cache / 'index.sqlite3'}" in said, said
    assert "free beside it" in said and "the index is as it was" in said, said
    assert "nothing in it was changed" not in said, said
    assert not [p for p in cache.iterdir() if ".new" in p.name or ".corrupt-" in p.name]
    assert columns(cache / "index.sqlite3") == ["seq", "key", "url"]
    assert contents(cache / "index.sqlite3") == expected
    assert (cache / "index.sqlite3").stat().st_size >= before

    filler.unlink()  # room again: it converts
    assert_converted(cache, expected)
