"""The owner's SQLite statements with an ``IN (...)`` list come in a few shapes (``in_list``), not
one per list length: Python's sqlite3 keeps the last 128 statements of each connection prepared,
and an IN list of 500 values costs SQLite about 100 KB prepared. With one text per length, a load
of new keys (the index GC's presence checks, the cull's deletes) filled each of the supervisor's
connections with such statements: its memory grew by tens of MB and stayed there."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from proxy.storage import disk as disk_module
from proxy.storage.disk import DiskTier
from proxy.storage.index import UrlTagIndex

MB = 1024 * 1024


def _prepared() -> int:
    """The sqlite3 statements alive in this process (each connection's cache holds them)."""
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "Statement"
               and type(o).__module__ == "sqlite3")


def test_the_presence_checks_of_many_list_lengths_keep_a_few_statements_prepared(tmp_path: Path) -> None:
    """300 lists of keys of every length from 1 to 300 (the index GC asks the disk, a relayout
    asks the index): before, each length was a statement of its own, kept prepared up to 128
    per connection (here 3 connections: 384, about 20 MB of SQLite's memory)."""
    path = str(tmp_path / "cache")
    disk, index = DiskTier(path, 64 * MB, 2), UrlTagIndex(path)
    try:
        keys = [f"http://h.test/k/{i}?pad={'x' * 200}" for i in range(300)]
        index.add_many([(k, ()) for k in keys[:150]])
        disk.present(keys[:1])
        assert index.listed(keys[:1]) == {keys[0]}
        before = _prepared()
        for n in range(1, 301):
            assert disk.present(keys[:n]) == set()
            assert index.listed(keys[:n]) == set(keys[:min(n, 150)])
        # Lengths 1..300 take 10 shapes (1, 2, 4, ... 256, 500) per place and connection.
        assert _prepared() - before <= 3 * 10
    finally:
        disk.close()
        index.close()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 255, 256, 257, 499, 500])
def test_an_in_list_rounds_the_count_up_and_repeats_the_last_value(n: int) -> None:
    values = list(range(n))
    marks, bound = disk_module.in_list(values)
    size = marks.count("?")
    assert size >= n and size == len(bound) and size <= disk_module.IN_LIST_MAX
    assert size in {1 << i for i in range(9)} | {disk_module.IN_LIST_MAX}
    assert bound[:n] == values and set(bound[n:]) <= {n - 1}
