"""An origin failure that stale-if-error hides from the clients is still an origin failure:
one warning in the error log naming the upstream and what failed (one per failed fetch,
however many clients it served stale, in one worker or two), and the access log's
``upstream`` names the upstream the request went to. Before, the client's STALE answer was
all there was: no log line, ``"upstream": null``, only ``cachegate_upstream_errors_total``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeProxy
from tests.harness import Clock
from tests.security.misbehaving import Conn, raw_origins, response
from tests.storage.procs import ProxyProcess, write_config

STORED = response("200 OK", {"Cache-Control": "max-age=1, stale-if-error=600", "ETag": '"e1"'}, b"original")
FAILURES = {
    "status-999": response("999 X", {"Cache-Control": "max-age=60"}, b"hello"),
    "206-without-range": response("206 Partial Content", {"Content-Range": "bytes 0-2/8"}, b"EVI"),
}
WARNING = "upstream failed, stale response served (stale-if-error)"


def failing_after_first(answer: bytes, hold: asyncio.Event | None = None) -> Callable[[Conn], Awaitable[None]]:
    """An origin whose first answer is ``STORED``, and every later one ``answer`` (after
    ``hold`` is set, when given)."""
    served = 0

    async def serve(conn: Conn) -> None:
        nonlocal served
        while True:
            await conn.request()
            served += 1
            if served > 1 and hold is not None:
                await hold.wait()
            await conn.send(STORED if served == 1 else answer)

    return serve


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("cachegate")]


def access(proxy: Any, path: Path) -> list[dict[str, Any]]:
    proxy.runtime.access_log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("failure", [*FAILURES, "refused"])
async def test_a_failure_hidden_by_stale_if_error_is_one_warning_and_names_its_upstream(
        make_proxy: MakeProxy, clock: Clock, caplog: pytest.LogCaptureFixture, tmp_path: Path,
        failure: str) -> None:
    caplog.set_level(logging.WARNING)
    hold = asyncio.Event()
    log_file = tmp_path / "access.log"
    async with raw_origins() as start:
        origin = await start(failing_after_first(FAILURES.get(failure, b""), hold))
        url = origin.url  # (asked once: a stopped origin has no address)
        proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n"
                                        "upstream: {retries: 0}\n", upstreams=[url])
        proxy.runtime.engine.clock = clock
        assert (await proxy.get("/page")).body == b"original"
        if failure == "refused":
            await origin.stop(hold_port=True)
        clock.advance(5)
        caplog.clear()
        herd = [asyncio.ensure_future(proxy.get("/page")) for _ in range(5)]  # one fetch, five clients
        await asyncio.sleep(0.2)
        hold.set()
        replies = await asyncio.gather(*herd)
        assert {(r.status, r.body, r.x_cache) for r in replies} == {(200, b"original", "STALE")}
        assert all(r.cache_status.endswith("detail=ORIGIN-UNREACHABLE") for r in replies)
        # Each failed fetch counted (a refused connection's herd may make two: not held)
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        fetches = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("cachegate_upstream_errors_total{") and url in line)
        assert fetches >= 1 and (failure == "refused" or len(origin.requests) - 1 == fetches == 1)
        # One line per failed fetch; a second fetch within the while is counted on the line
        # that says what was not logged (at the end of the while, or at the stop: now).
        proxy.runtime.engine.upstream_warnings.close()
        records = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("cachegate")]
        told = sum((0 if getattr(r, "summary", False) else 1) + getattr(r, "suppressed", 0) for r in records)
        assert told == fetches and len(records) <= 2, warnings(caplog)
        assert all(r.getMessage().startswith(WARNING) and url in r.getMessage() for r in records), warnings(caplog)
        lines = [r for r in access(proxy, log_file) if r["cache"] == "STALE"]
        assert len(lines) == 5
        # The request of each fetch names its upstream; the clients collapsed on it none.
        assert [r["upstream"] for r in lines].count(url) == fetches, lines
        assert all(r["upstream"] in (url, None) for r in lines)


@pytest.mark.slow
async def test_two_workers_log_one_warning_per_failed_fetch_they_hid_with_stale_if_error(tmp_path: Path) -> None:
    """The other worker's clients waited on the lease and were told of the failure: served
    stale, with no second warning for the fetch they did not make."""
    hold = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(failing_after_first(FAILURES["status-999"], hold))
        cache = "cache: {memory: 64MB, lock_timeout: 30s, disk: {path: cache, size: 256MB, shards: 2}}\n"
        proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache,
                                                         "upstream: {retries: 0}\n"))
        await proxy.start("--workers", "2", with_log=True)
        try:
            await proxy.wait_for(lambda: len(proxy.workers) == 2)
            assert (await proxy.get("/page")).body == b"original"
            await asyncio.sleep(1.2)  # max-age=1: stale (a process's clock: not settable)
            herd = [asyncio.ensure_future(proxy.get("/page")) for _ in range(20)]
            await asyncio.sleep(0.5)
            hold.set()
            replies = await asyncio.gather(*herd)
            assert {(r.status, r.body, r.headers["X-Cache-Status"]) for r in replies} == {
                (200, b"original", "STALE")}
            workers = {r.headers.get("X-Cachegate-Worker") for r in replies}
            fetches = len(origin.requests) - 1
            await asyncio.sleep(0.3)  # the workers' stderr reaches the pipe
            warned = [line for line in proxy.lines if WARNING in line]
            # One line per failed fetch: none before (the failure was silent); two for one
            # fetch when the worker that waited on the lease warned of it too.
            assert fetches >= 1 and len(warned) == fetches, (workers, fetches, warned)
            assert all(origin.url in line for line in warned)
        finally:
            await proxy.stop()
