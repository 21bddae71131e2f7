"""A clean stop while another program holds every disk shard's write lock (a backup, a long
transaction): the last commit to disk ends by the stop's deadline, says what it could not write,
and leaves nothing half written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest

from proxy.config import Overrides, load_config
from proxy.runtime import LAST_FLUSH_MIN
from proxy.storage import persist
from proxy.web.server import open_runtime
from tests.storage.helpers import entry, open_store, read_body, store

KEY = "http://h.test/busy"
SHARDS = 2


async def test_a_stop_behind_locked_shards_ends_by_its_deadline_and_says_what_stays_unwritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Each part of each write-behind batch waited the lock's timeout (2 s) per shard: with
    SIGTERM, workers were gone in 0.16 s and the supervisor took 18 s, past shutdown_grace (10 s)
    and its margin; the lock's timeout was logged with an empty text."""
    monkeypatch.setattr(persist, "BATCH_BYTES", 4096)  # many parts, as many megabytes of fills make
    cache = tmp_path / "cache"
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nupstreams: ['http://127.0.0.1:9']\nadmin: {listen: off}\n"
                      f"cache: {{memory: 16MB, disk: {{path: '{cache}', size: 64MB, shards: {SHARDS}}}}}\n")
    runtime = await open_runtime(load_config(str(config), Overrides()), owner=True)
    assert runtime is not None
    before = {f"{KEY}/before/{i}": os.urandom(1500) for i in range(10)}
    for k, b in before.items():
        assert await store(runtime.storage, entry(k), b, flush=False)
    await runtime.storage.flush()  # on disk before the lock is taken
    blockers = [sqlite3.connect(cache / f"{i:03d}" / "cache.db", isolation_level=None) for i in range(SHARDS)]
    during = {f"{KEY}/during/{i}": os.urandom(1500) for i in range(40)}
    try:
        for blocker in blockers:
            blocker.execute("BEGIN EXCLUSIVE")
        for k, b in during.items():  # answered from memory; the disk would get them behind
            assert await store(runtime.storage, entry(k), b, flush=False)
        await asyncio.sleep(persist.PERSIST_INTERVAL * 2)  # write-behind has a batch in its thread
        grace = 0.5
        lock_wait = 2.0  # DiskTier's: one shard's transaction begun before the deadline ends by then
        bound = grace + LAST_FLUSH_MIN + 2 * lock_wait + 3.0  # (a margin for a loaded machine)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            # Without the bound: ~20 parts, each waiting 2 s per shard. (Also timed by hand: the
            # store's close waits for its thread without the event loop, out of wait_for's reach.)
            await asyncio.wait_for(runtime.close(grace), bound)
        assert time.monotonic() - started < bound
    finally:
        for blocker in blockers:
            with contextlib.suppress(sqlite3.Error):
                blocker.execute("ROLLBACK")
            blocker.close()
    said = [r.getMessage() for r in caplog.records]
    unwritten = [m for m in said if "were not written to disk before the stop's deadline" in m]
    assert len(unwritten) == 1, said
    assert int(unwritten[0].split()[1]) > 0, unwritten
    timed_out = [m for m in said if "under a shard's lock (timed out" in m]
    assert timed_out and all("stayed locked by another connection for 2s" in m for m in timed_out), timed_out

    reopened = open_store(str(cache), shards=SHARDS)  # the next start: what was written, nothing corrupt
    try:
        for k, b in before.items():
            assert await read_body(reopened, k) == b, k
        served = [await read_body(reopened, k) for k in during]
        assert all(body in (None, b) for body, b in zip(served, during.values(), strict=True))
    finally:
        reopened.close()
