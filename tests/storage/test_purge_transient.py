"""A purge meeting a disk failure of the moment answers 503 "purge again", not a bare 500.

Before: a purge by URL whose index lookup ran in a storage thread that had not opened the index
yet, with no file descriptors left (EMFILE: "unable to open database file"), answered 500
"internal error" although nothing was purged and purging again later works. Real SQLite errors
on a real store; the thread's connection is made to fail by pointing it at a missing folder."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from proxy.errors import PurgeUnavailable
from proxy.storage.purging import transient
from tests.storage.helpers import entry, open_store, store


def test_failures_of_the_moment_are_told_from_bugs(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError) as cantopen:
        sqlite3.connect(tmp_path / "missing" / "x.db")
    db = sqlite3.connect(":memory:")
    with pytest.raises(sqlite3.OperationalError) as no_table:
        db.execute("SELECT * FROM nowhere")
    db.close()
    assert transient(cantopen.value)
    assert transient(OSError(24, "Too many open files"))
    assert not transient(no_table.value)  # (a bug: stays a 500)
    assert not transient(ValueError("x"))


async def test_an_index_lookup_that_cannot_open_the_index_is_a_503(tmp_path: Path) -> None:
    s = open_store(str(tmp_path / "cache"))
    try:
        key = "http://h/k"
        assert await store(s, entry(key), b"body")
        assert await s.purges.keys_for_urls([key]) == {key}
        index = s.tiers.index
        assert index is not None
        file = index.file
        index._local = threading.local()  # (every storage thread opens the index afresh...)
        index.file = str(tmp_path / "gone" / "index.sqlite3")  # (...and cannot: as under EMFILE)
        with pytest.raises(PurgeUnavailable, match="purge again") as failed:
            await s.purges.keys_for_urls([key])
        assert "unable to open database file" in str(failed.value)
        assert index.damage is None  # (no damage either)
        index.file = file
        assert await s.purges.keys_for_urls([key]) == {key}
    finally:
        s.close()
