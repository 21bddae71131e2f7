"""The purge stream's pure bookkeeping: where a node resumes, and merging a backlog."""

from __future__ import annotations

import doctest
import sqlite3

import pytest

import proxy.cluster.node
import proxy.cluster.shared
import proxy.cluster.stream
from proxy.cluster.stream import (
    START,
    Flush,
    Recatch,
    Resume,
    Saved,
    Tip,
    apply_failure,
    caught_up_when_lost,
    check_epoch,
    decode_entry,
    merge_specs,
    outcome,
    plan_resume,
)
from proxy.purge import PurgeSpec


@pytest.mark.parametrize("module", [proxy.cluster.stream, proxy.cluster.shared, proxy.cluster.node])
def test_docstring_examples_hold(module: object) -> None:
    assert doctest.testmod(module).failed == 0  # type: ignore[arg-type]


TIP = Tip("e1", 10, "10-0")


@pytest.mark.parametrize(("saved", "next_seq", "keep", "expected"), [
    # A node that joins: from the stream's end (its cache was never under this cluster).
    (None, None, False, Resume("10-0")),
    # Nothing new since it stopped.
    (Saved("e1", 10, "10-0"), None, False, Resume("10-0")),
    # Behind, and the next entry it needs is still there.
    (Saved("e1", 4, "4-0"), 5, False, Resume("4-0")),
    # Behind, and the next entry it needs was trimmed (or every entry after it was).
    (Saved("e1", 4, "4-0"), 7, False, Flush("10-0", "trimmed")),
    (Saved("e1", 4, "4-0"), None, False, Flush("10-0", "trimmed")),
    # Redis lost its data: a node that was stopped cannot know what it missed...
    (Saved("e0", 4, "4-0"), None, False, Flush("10-0", "redis-lost-data")),
    # ... one that was running and up to date when Redis went reads the new stream from its start.
    (Saved("e0", 4, "4-0"), None, True, Resume(START)),
    # The same epoch going backwards is a Redis that lost data too.
    (Saved("e1", 12, "12-0"), None, True, Flush("10-0", "redis-lost-data")),
])
def test_where_a_node_resumes(saved: Saved | None, next_seq: int | None, keep: bool,
                              expected: Resume | Flush) -> None:
    assert plan_resume(saved, TIP, next_seq, keep_unknown=keep) == expected


@pytest.mark.parametrize(("saved", "epoch", "at_tip", "expected"), [
    # The entries just read are the next ones of the stream it follows: applied.
    (Saved("e1", 4, "4-0"), "e1", True, None),
    (Saved("e1", 4, "4-0"), "e1", False, None),
    # Redis emptied (FLUSHALL) under a connected node that had read everything: the new stream
    # from its start, cache kept, its record now the new epoch's.
    (Saved("e0", 4, "4-0"), "e1", True, Resume(START)),
    # ... no epoch yet (emptied between the read and the check): the same.
    (Saved("e0", 4, "4-0"), None, True, Resume(START)),
    # ... one that was a full batch behind cannot know what it missed.
    (Saved("e0", 4, "4-0"), "e1", False, Flush("10-0", "redis-lost-data")),
])
def test_what_a_connected_node_does_when_redis_lost_its_data_under_it(
        saved: Saved, epoch: str | None, at_tip: bool, expected: Resume | Flush | None) -> None:
    recatch = check_epoch(saved, epoch, at_tip=at_tip)
    if expected is None:
        assert recatch is None
        return
    assert recatch == Recatch(keep_unknown=at_tip)
    assert plan_resume(saved, TIP, None, keep_unknown=recatch.keep_unknown) == expected


@pytest.mark.parametrize(("state", "tip_read", "saved", "before", "expected"), [
    # Following the stream, up to date or behind.
    ("ready", True, Saved("e1", 10, "10-0"), False, True),
    ("ready", True, Saved("e1", 9, "9-0"), True, False),
    # Reconnecting: it read the tip and had applied up to it (nothing new while it was away),
    # or it was still applying the backlog.
    ("catching-up", True, Saved("e1", 10, "10-0"), False, True),
    ("catching-up", True, Saved("e1", 8, "8-0"), True, False),
    ("catching-up", True, None, True, False),
    # The session failed before it learnt anything: what the last one knew stands.
    ("catching-up", False, Saved("e1", 8, "8-0"), True, True),
    ("catching-up", False, Saved("e1", 10, "10-0"), False, False),
    ("disconnected", False, Saved("e1", 8, "8-0"), True, True),
    ("starting", False, None, False, False),
])
def test_whether_a_node_was_caught_up_when_it_lost_redis(state: str, tip_read: bool, saved: Saved | None,
                                                         before: bool, expected: bool) -> None:
    assert caught_up_when_lost(state, tip_read, saved, 10, before) is expected


def test_a_backlog_merges_into_one_hard_and_one_soft_purge() -> None:
    backlog = [PurgeSpec(urls=("http://h/a",)), PurgeSpec(tags=("t",), soft=True),
               PurgeSpec(prefixes=("http://h/p/",)), PurgeSpec(urls=("http://h/a", "http://h/b")),
               PurgeSpec(keys=("http://h/k",), invalidation=True), PurgeSpec(all=True, soft=True)]
    hard, soft = merge_specs(backlog)
    assert (hard.urls, hard.prefixes, hard.keys, hard.soft, hard.all) == (
        ("http://h/a", "http://h/b"), ("http://h/p/",), ("http://h/k",), False, False)
    assert not hard.invalidation  # counted as an operator's purge: not all of them were invalidations
    assert (soft.tags, soft.all, soft.soft) == (("t",), True, True)


def test_a_hard_purge_of_everything_makes_what_came_before_it_moot() -> None:
    merged = merge_specs([PurgeSpec(tags=("a",), soft=True), PurgeSpec(all=True), PurgeSpec(tags=("b",))])
    assert [(s.all, s.tags, s.soft) for s in merged] == [(True, ("b",), False)]
    assert merge_specs([]) == []


def test_the_answer_names_the_live_nodes_that_did_not_acknowledge() -> None:
    result = outcome(["a", "b", "c"], {"a": 2, "c": 0, "d": 1})
    assert (result.purged, result.missing, result.complete) == (3, ("b",), False)
    assert outcome(["a"], {"a": 0}).complete


@pytest.mark.parametrize(("fields", "tags"), [
    ({"seq": "3", "node": "a", "spec": '{"tags":["t"],"all":false}'}, ("t",)),
    ({"seq": "3", "node": "a", "spec": '{"tags":["t"],"from_a_newer_release":1}'}, ("t",)),
    ({"seq": "3", "node": "a", "spec": '{"urls":[1]}'}, None),
    ({"seq": "3", "node": "a", "spec": '{"keys":[1]}'}, None),
    ({"seq": "3", "node": "a", "spec": '{"prefixes":[null]}'}, None),
    ({"seq": "3", "node": "a", "spec": '{"tags":[{"a":1}]}'}, None),
    ({"seq": "3", "node": "a", "spec": '{"tags":[""]}'}, None),
    ({"seq": "3", "node": "a", "spec": '{"tags":["\\ud800"]}'}, None),  # no UTF-8, no SQLite text
    ({"seq": "3", "node": "a", "spec": '{"all":"false"}'}, None),  # not read as a purge of everything
    ({"seq": "3", "node": "a", "spec": '{"soft":"no","tags":["t"]}'}, None),
    ({"seq": "3", "node": "a", "spec": '{"urls":"http://x/"}'}, None),  # not purged letter by letter
    ({"seq": "3", "node": "a", "spec": '["tags"]'}, None),
    ({"seq": "3", "node": "a", "spec": "[" * 100_000}, None),  # RecursionError
    ({"seq": "3", "node": "\udcff\udcfe", "spec": '{"tags":["t"]}'}, None),  # not UTF-8 (surrogateescape)
    ({"seq": "3", "node": "a", "spec": '{"tags":["\udcff"]}'}, None),
    ({"seq": "3", "node": "a"}, None),
])
def test_an_entry_is_read_only_as_the_purge_a_node_writes(fields: dict[str, str], tags: tuple[str, ...] | None) -> None:
    entry = decode_entry("5-0", fields)
    assert (entry.spec.tags if entry else None) == tags


@pytest.mark.parametrize(("exc", "expected"), [
    # What the entry's content makes the store refuse: the same each time, never applied.
    (TypeError("unhashable type: 'dict'"), "damaged"),
    (ValueError("Invalid IPv6 URL"), "damaged"),
    (UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"), "damaged"),
    (KeyError("urls"), "damaged"),
    (RecursionError("maximum recursion depth exceeded"), "damaged"),
    (sqlite3.IntegrityError("NOT NULL constraint failed: bans.value"), "damaged"),
    (sqlite3.DataError("string or blob too big"), "damaged"),
    (sqlite3.ProgrammingError("Error binding parameter 1: type 'dict' is not supported"), "damaged"),
    (sqlite3.OperationalError("too many SQL variables"), "damaged"),
    # What this node cannot do now: the session ends before the entry's position, and retries.
    (sqlite3.OperationalError("database is locked"), "retry"),
    (sqlite3.OperationalError("database table is locked"), "retry"),
    (sqlite3.OperationalError("database or disk is full"), "retry"),
    (sqlite3.OperationalError("disk I/O error"), "retry"),
    (sqlite3.OperationalError("unable to open database file"), "retry"),
    (sqlite3.DatabaseError("database disk image is malformed"), "retry"),
    (sqlite3.ProgrammingError("Cannot operate on a closed database."), "retry"),
    (OSError(28, "No space left on device"), "retry"),
    (PermissionError(13, "Permission denied"), "retry"),
    (TimeoutError(), "retry"),
    (ConnectionResetError(), "retry"),
    (MemoryError(), "retry"),
    (RuntimeError("worker call failed"), "retry"),
    (Exception("unknown"), "retry"),
])
def test_only_what_an_entry_holds_makes_it_damaged_what_the_moment_does_is_retried(
        exc: BaseException, expected: str) -> None:
    assert apply_failure(exc) == expected
