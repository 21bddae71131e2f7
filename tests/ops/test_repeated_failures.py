"""A background job that keeps failing (the storage upkeep, when the process is at its
open-files limit) logs its traceback once, then at most once a minute, and says when it works
again: before, a traceback every second buried the log. (The cache directory moved away is no
failure of the upkeep any more: ``tests/storage/test_directory_gone.py``.)"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

import proxy.runtime
from proxy.logs import RepeatedFailure, Summarised
from tests.conftest import MakeProxy


def _wait_for(output: Callable[[], str], text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in output():
            return True
        time.sleep(0.05)
    return False


def test_the_same_failure_is_summed_once_a_minute_and_another_is_logged_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("cachegate.test")
    failures = RepeatedFailure(log, "the job", every=0.2)
    with caplog.at_level(logging.WARNING, "cachegate.test"):
        for name in ("/a", "/b", "/c"):  # one errno, a different file each time: one failure
            failures.failed(OSError(24, "Too many open files", name))
        assert [r.getMessage() for r in caplog.records] == ["the job failed; retrying"]
        time.sleep(0.25)
        failures.failed(OSError(24, "Too many open files", "/d"))
        assert caplog.records[-1].getMessage() == (
            "the job still failing (3 more times in 0s): OSError: [Errno 24] Too many open files: '/d'")
        failures.failed(ValueError("another"))  # another failure: at once, with its traceback
        assert caplog.records[-1].exc_info is not None and len(caplog.records) == 3
        failures.succeeded()
        failures.succeeded()
        assert [r.getMessage() for r in caplog.records][-1] == "the job works again" and len(caplog.records) == 4


def test_the_same_error_raised_by_another_step_is_another_failure(caplog: pytest.LogCaptureFixture) -> None:
    """Keyed by type and errno alone, a second problem (another step, another file) while the
    first kept failing was folded into it: never its traceback, only a count a minute later."""
    log = logging.getLogger("cachegate.test")
    failures = RepeatedFailure(log, "the job")

    def journal() -> None:
        raise OSError(2, "No such file or directory", "journal")

    def shard() -> None:
        raise OSError(2, "No such file or directory", "shard")

    with caplog.at_level(logging.WARNING, "cachegate.test"):
        for step in (journal, journal, shard):
            try:
                step()
            except OSError as exc:
                failures.failed(exc)
    assert [r.getMessage() for r in caplog.records] == ["the job failed; retrying"] * 2
    assert all(r.exc_info is not None for r in caplog.records)


def test_steps_that_fail_in_turn_are_each_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """The upkeep failed at its index one round and at a shard the next (whichever thread ran it
    had a connection open or not): remembering only the last failure logged a traceback every
    round."""
    log = logging.getLogger("cachegate.test")
    failures = RepeatedFailure(log, "the job")

    def index() -> None:
        raise OSError(14, "unable to open database file", "index")

    def shard() -> None:
        raise OSError(14, "unable to open database file", "shard")

    with caplog.at_level(logging.WARNING, "cachegate.test"):
        for step in (index, shard, index, shard, index):
            try:
                step()
            except OSError as exc:
                failures.failed(exc)
        assert [r.getMessage() for r in caplog.records] == ["the job failed; retrying"] * 2
        failures.succeeded()
        assert caplog.records[-1].getMessage() == "the job works again"
        shard_failure = OSError(14, "unable to open database file", "shard")
        failures.failed(shard_failure)  # failing again after it worked: logged again
        assert caplog.records[-1].getMessage() == "the job failed; retrying"


def test_failures_between_successes_are_one_streak_until_writes_work_for_a_while(
        caplog: pytest.LogCaptureFixture) -> None:
    """On a full disk small writes still fit between the big ones that fail: a streak that ended
    at any success logged a failure and a recovery at every turn (37 and 34 in 3 s). Both the
    storage write failures and a background job's end only once nothing failed for ``settle``."""
    from proxy.storage.failures import WriteFailures

    log = logging.getLogger("cachegate.test")
    writes = WriteFailures()
    job = RepeatedFailure(log, "the job")
    writes.settle = job.settle = 0.3  # (10 s in use)
    with caplog.at_level(logging.INFO):
        for _ in range(20):
            writes.failed("spool", "k", OSError(28, "No space left on device"))
            writes.succeeded()
            job.failed(OSError(28, "No space left on device"))
            job.succeeded()
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["storage write failed",
                                                                          "the job failed; retrying"]
        assert writes.snapshot()["failing"]
        time.sleep(0.35)
        writes.succeeded()
        job.succeeded()
        assert [r.getMessage() for r in caplog.records][2:] == ["storage writes succeed again, after 20 failed",
                                                               "the job works again"]
        assert not writes.snapshot()["failing"]


async def test_an_upkeep_that_fails_and_works_in_turn_is_one_streak(
        make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A reviewer deleted the cache directory under a running cachegate with traffic: the
    upkeep's rounds failed and worked in turn (its index GC failed in a storage thread whose
    shard connection was new, "no such table: Cache"; other rounds worked), and each round that
    worked ended the streak, so "failed; retrying" with a full traceback came back every 1 to 5 s
    with a "works again" between (8 tracebacks in 30 s). Like the disk tier's writes, the upkeep
    works again only once nothing failed for 10 s. (The alternation is the reviewer's: here the
    real upkeep fails every other round, which a deleted directory does not do on cue.)"""
    monkeypatch.setattr(proxy.runtime, "UPKEEP_INTERVAL", 0.01)
    running = await make_proxy()
    storage = running.runtime.storage
    real = storage.maintain
    rounds = 0

    async def every_other(**kwargs: Any) -> Any:
        nonlocal rounds
        rounds += 1
        if rounds % 2:
            raise sqlite3.OperationalError("no such table: Cache")
        return await real(**kwargs)

    caplog.set_level(logging.INFO, logger="cachegate")
    monkeypatch.setattr(storage, "maintain", every_other)
    for _ in range(2000):
        if rounds >= 40:
            break
        await asyncio.sleep(0.01)
    assert rounds >= 40
    said = [r.getMessage() for r in caplog.records if "storage upkeep" in r.getMessage()]
    assert said == ["storage upkeep failed; retrying"], said


def test_a_streak_of_write_failures_ends_on_time_when_the_clock_steps_back(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The settle time was measured on the wall clock: a step back of an hour (NTP, a VM
    resumed) right after a failure kept /stats' ``storage.failing: true`` that hour after writes
    recovered, and a new streak meanwhile was not logged. The wall clock only dates the error."""
    import proxy.storage.failures as failures

    class Stepped:
        wall, mono = 1_000_000.0, 50.0

        def time(self) -> float:
            return self.wall

        def monotonic(self) -> float:
            return self.mono

    clock = Stepped()
    monkeypatch.setattr(failures, "time", clock)
    writes = failures.WriteFailures()
    with caplog.at_level(logging.INFO, logger="cachegate.storage"):
        writes.failed("write", "k", OSError(28, "No space left on device"))
        clock.wall -= 3600  # the clock is stepped back an hour
        clock.mono += failures.SETTLE
        writes.succeeded()
        assert not writes.snapshot()["failing"]
        writes.failed("write", "k", OSError(28, "No space left on device"))  # a new streak: logged
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "storage write failed", "storage writes succeed again, after 1 failed", "storage write failed"]
    assert writes.snapshot()["last_failed_at"] == clock.wall  # (shown: the wall clock's)


async def test_summarised_lines_keep_each_kinds_level_and_say_a_count_when_its_window_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    """The connection cap's lines (``ProxyServer.capped``): a lingering close closed is INFO,
    the others WARNING, each kind at once and then its count when its window ends, with no
    later line needed (a flood that stops)."""
    lines = Summarised(window=0.2)
    log = logging.getLogger("cachegate.test")
    with caplog.at_level(logging.INFO, "cachegate.test"):
        for _ in range(4):
            lines.log(logging.INFO, log, "a", "cap reached (%d): a closed", 5)
        lines.log(logging.WARNING, log, "b", "cap reached (%d): b closed", 5)  # another kind: at once
        await asyncio.sleep(0.4)
    assert [(r.levelname, r.getMessage().split(" in the last")[0]) for r in caplog.records] == [
        ("INFO", "cap reached (5): a closed"), ("WARNING", "cap reached (5): b closed"),
        ("INFO", "cap reached (5): a closed (3 more like it")]
