"""Reads of the store that keep failing are answered as misses and said once a minute, not once
per request.

Before: each request whose read failed logged its own traceback ("storage read failed for
KEY"): a shard whose reads failed without being damage (seen with its write-ahead log removed
while running; a failing read that ``PRAGMA quick_check`` does not confirm is not set aside)
logged a traceback per request under load. What makes SQLite fail that way cannot be made to
happen here on demand, so the store's read is made to raise as SQLite does; everything else
is real (the origin, the disk tier, the proxy)."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin

REQUESTS = 20


def said(caplog: pytest.LogCaptureFixture, words: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if words in r.getMessage()]


async def test_reads_that_keep_failing_are_misses_logged_once_with_their_count_and_when_they_work_again(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(REQUESTS + 1):
        origin.route(f"/r{i}", body=f"body {i}".encode(), headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config="cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n")
    engine, storage = proxy.runtime.engine, proxy.runtime.storage
    get, absent = storage.get, storage.absent

    async def failing(key: str, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    caplog.set_level(logging.INFO, logger="cachegate")
    # (The directory of the disk tier's keys would answer these unknown keys without a read.)
    storage.get, storage.absent = failing, lambda key: False  # type: ignore[method-assign]
    try:
        for i in range(REQUESTS):
            r = await proxy.get(f"/r{i}")
            assert (r.status, r.body) == (200, f"body {i}".encode())
    finally:
        storage.get = get  # type: ignore[method-assign]
    failed = said(caplog, "reading the cache's storage failed")
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert failed[0].exc_info is not None and "answered as a miss" in failed[0].getMessage()
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert f'cachegate_storage_errors_total{{operation="read"}} {float(REQUESTS)}' in metrics

    engine.read_failures.settle = 0.0  # (60 s: one failing shard among working ones would flap)
    r = await proxy.get(f"/r{REQUESTS}")  # (read, and found nowhere)
    storage.absent = absent  # type: ignore[method-assign]
    assert (r.status, r.x_cache) == (200, "MISS")
    assert len(said(caplog, "reading the cache's storage works again")) == 1
    again = await proxy.get(f"/r{REQUESTS}")
    assert again.x_cache == "HIT"


async def test_body_reads_that_keep_failing_are_logged_once_too(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """A big body's read from disk fails the same way (another path: ``Engine.open_body``): it
    logged a traceback per request as well."""
    bodies = {f"/big{i}": bytes([i]) * 100_000 for i in range(4)}
    for path, body in bodies.items():
        origin.route(path, body=body, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config="cache: {memory: 16MB, memory_max_object: 16KB, "
                                    "disk: {path: cache, size: 64MB, shards: 2}}\n")
    storage = proxy.runtime.storage
    for path in bodies:
        assert (await proxy.get(path)).x_cache == "MISS"
    await storage.flush()  # (on disk, not in memory: the reads below go to the disk tier)
    open_body = storage.open_body

    async def failing(cached: Any) -> Any:
        raise sqlite3.OperationalError("unable to open database file")

    caplog.set_level(logging.INFO, logger="cachegate")
    storage.open_body = failing  # type: ignore[method-assign]
    try:
        for path, body in bodies.items():
            for _ in range(2):
                r = await proxy.get(path)
                assert (r.status, r.body) == (200, body)
    finally:
        storage.open_body = open_body  # type: ignore[method-assign]
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    failures = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith('cachegate_storage_errors_total{operation="read"}')]
    assert failures and failures[0] >= 2, failures
    assert len(said(caplog, "reading the cache's storage failed")) == 1
    assert not said(caplog, "storage body read failed")
