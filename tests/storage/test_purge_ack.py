"""A worker that does not acknowledge a purge: the supervisor's log says why it kills it; one
still starting is not waited for, and applies the purge before it serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, alive, on_disk, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def test_a_worker_silent_through_a_purge_is_killed_with_the_reason_in_the_log(
        origin: Origin, tmp_path: Path) -> None:
    """A stopped worker answers no purge: after the acknowledgement's limit (10 s) the
    supervisor kills it, and its log line names the reason (a timeout's text is empty: the line
    said "did not acknowledge a purge ()")."""
    origin.route("/p", body=b"p", headers={"Cache-Control": "max-age=300"})
    # The ping's limit longer than the purge's, so that the purge is what finds it silent.
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE,
                                                     "worker_timeout: 120s\n"))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        assert (await proxy.get("/p")).status == 200
        stopped = proxy.workers[0]
        os.kill(stopped, signal.SIGSTOP)
        reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}/p"]})
        assert reply.status == 200, reply.body
        await proxy.wait_for(lambda: proxy.workers[0] != stopped, wait=30)
        line = next(x for x in proxy.lines if "did not acknowledge a purge" in x)
        assert "worker 0 did not acknowledge a purge (no answer within 10 s); killing it" in line, line
    finally:
        await proxy.stop(signal.SIGTERM)


async def test_a_purge_does_not_wait_for_a_worker_still_starting_which_applies_it_before_it_serves(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 0 is killed and its replacement held in its start (CACHEGATE_START_HOLD), once its
    store is open, with the ban list it read from the disk's index, and its control channel: a
    purge by tag (the disk's copies are banned, not deleted) answers while it is still held, and
    it is not killed for that. Once it serves, what it answers is from after the purge: the ban
    reached it before its listeners opened. The purge waited for the start (up to 10 s, then it
    killed the worker), and in cluster mode answered 202 meanwhile."""
    # The shards' write locks are held here (as a long commit would) from the purge until the
    # checks: the supervisor's upkeep would otherwise turn the ban into deletions within a
    # second, and a worker that never got the ban would find nothing on disk to serve anyway.
    version = {"v": 1}

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.path} v{version['v']}", headers={
            "Cache-Control": "max-age=300", "Surrogate-Key": "pages"})

    paths = [f"/t/{i}" for i in range(40)]
    for p in paths:
        origin.route(p, page)
    hold = tmp_path / "hold"  # made once the first workers are ready: the replacement alone waits
    monkeypatch.setenv("CACHEGATE_START_HOLD", str(hold))
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2", with_log=True)
    blockers = [sqlite3.connect(tmp_path / "cache" / f"{i:03d}" / "cache.db", isolation_level=None)
                for i in range(2)]
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        for p in paths:
            assert (await proxy.get(p)).body == f"{p} v1".encode()
        for p in paths:  # on disk (written behind by the supervisor), where a ban covers them
            await on_disk(proxy, f"http://{HOST}{p}")
        hold.mkdir()
        old = proxy.workers[0]
        os.kill(old, signal.SIGKILL)
        for _ in range(600):
            held = [int(f.name.split(".")[0]) for f in hold.glob("*.held")]
            if held:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the replacement of worker 0 never reached its start's hold")
        replacement = held[0]
        for blocker in blockers:
            blocker.execute("BEGIN IMMEDIATE")
        version["v"] = 2
        reply = await proxy.admin("POST", "/purge", json={"tags": ["pages"]})
        assert reply.status == 200, reply.body
        # Answered while the replacement is still held, not after its start, and not killed.
        assert (hold / f"{replacement}.held").exists() and alive(replacement)
        assert not any("did not acknowledge a purge" in line for line in proxy.lines), proxy.lines
        (hold / f"{replacement}.held").unlink()
        await proxy.wait_for(lambda: proxy.workers[0] == replacement)
        # Each path's first request since the purge: those the replacement takes (about half of
        # them, spread by the kernel) find no copy in the shared memory, only the disk's.
        by_replacement = 0
        for p in paths:
            r = await proxy.get(p)
            assert r.body == f"{p} v2".encode(), (p, r.worker, r.x_cache, r.tier, r.body)
            by_replacement += r.worker == "0"
        assert by_replacement > 0
    finally:
        for blocker in blockers:
            with contextlib.suppress(sqlite3.Error):
                blocker.execute("ROLLBACK")
            blocker.close()
        await proxy.stop()

