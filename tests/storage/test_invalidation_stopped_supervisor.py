"""An unsafe method through a worker while its supervisor is stopped (``SIGSTOP``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
HOLD = 3.0  # consistency_wait (10 s by default): how long the worker waits for the supervisor
HELD = f"consistency_wait: {HOLD:g}s\n"


async def test_an_invalidation_answers_within_the_hold_while_the_supervisor_is_stopped(
        origin: Origin, tmp_path: Path) -> None:
    """The POST reaches the origin at once; its answer waited for the stopped supervisor's
    fan-out for as long as the supervisor was stopped (30-47 s measured), while a GET waits at
    most ``consistency_wait``. Now the worker waits that long, applies the invalidation to the disk and
    the shared memory itself (every worker reads them: the next GET is a miss), answers, and
    says so in its log and in ``cachegate_storage_errors_total{operation="invalidate"}``; the
    supervisor, when it runs again, makes the invalidation as before."""
    version = {"n": 1}

    async def page(request: web.Request) -> web.Response:
        if request.method == "POST":
            version["n"] += 1
            return web.Response(body=b"posted")
        return web.Response(body=b"v%d" % version["n"], headers={"Cache-Control": "max-age=300"})

    origin.route("/p", page)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, HELD))
    await proxy.start("--workers", "2", with_log=True)
    assert proxy.process is not None
    supervisor = proxy.process.pid
    stopped = False
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        assert (await proxy.get("/p")).body == b"v1"
        for _ in range(50):
            if (await proxy.get("/p")).x_cache == "HIT":
                break
        else:
            raise AssertionError("/p never became a hit")

        os.kill(supervisor, signal.SIGSTOP)
        stopped = True

        # The supervisor stays stopped three times the hold: the answer must come meanwhile.
        answer = await post_within(proxy, 3 * HOLD)
        assert answer is not None, "the POST was not answered while the supervisor was stopped"
        assert answer == (200, b"posted")
        # Still stopped: no worker serves the invalidated v1 (the disk and shared memory lost it).
        for _ in range(4):
            r = await proxy.get("/p")
            assert r.body == b"v2", (r.body, r.x_cache, r.worker)

        os.kill(supervisor, signal.SIGCONT)
        stopped = False
        warning = "the supervisor did not answer an invalidation"
        await proxy.wait_for(lambda: any(warning in line for line in proxy.lines))
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert 'cachegate_storage_errors_total{operation="invalidate"} 1.0' in metrics, [
            x for x in metrics.splitlines() if "storage_errors" in x]
        # The supervisor made the queued invalidation too: a purge now answers as ever.
        reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}/p"]})
        assert reply.status == 200, reply.body
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGCONT)
        await proxy.stop(signal.SIGTERM)


async def post_within(proxy: ProxyProcess, wait: float) -> tuple[int, bytes] | None:
    """POST /p: its status and body, or None when no answer came within ``wait`` seconds (the
    request is left running: the supervisor, once resumed, answers it)."""
    async def post() -> tuple[int, bytes]:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s, \
                s.post(proxy.url + "/p", data=b"x", headers={"Host": HOST}) as r:
            return r.status, await r.read()

    posted = asyncio.ensure_future(post())
    done, _ = await asyncio.wait({posted}, timeout=wait)
    return posted.result() if posted in done else None


def _disk_keys(cache: Path, path: str) -> list[str]:
    """The metadata keys of ``path`` on disk, read as another process would (WAL: a reader is not
    held up by a writer)."""
    found: list[str] = []
    for db in sorted(cache.glob("*/cache.db")):
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            found += [k for (k,) in con.execute("SELECT key FROM Cache WHERE key LIKE 'm:%'")
                      if k.endswith(path)]
    return found


async def test_an_invalidation_answers_while_the_stopped_supervisor_holds_a_shards_write_lock(
        origin: Origin, tmp_path: Path) -> None:
    """The supervisor stopped in the middle of a write-behind commit holds a disk shard's write
    lock (held here by the test, for every shard, while the supervisor is stopped). The worker's
    own invalidation then waited for that lock without end (its deletion retried), the client's
    answer with it, and every other invalidation after it queued for the worker's disk threads:
    52 of 60 POSTs were answered only once the supervisor ran again. Now the worker answers, and
    no worker reads the disk's old copy meanwhile; the supervisor deletes it once it runs."""
    version = {"n": 1}

    async def page(request: web.Request) -> web.Response:
        if request.method == "POST":
            version["n"] += 1
            return web.Response(body=b"posted")
        if version["n"] > 1:  # not stored: what the disk holds for /p is v1's only
            return web.Response(body=b"v%d" % version["n"], headers={"Cache-Control": "no-store"})
        return web.Response(body=b"v1", headers={"Cache-Control": "max-age=300"})

    origin.route("/p", page)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, HELD))
    await proxy.start("--workers", "2", with_log=True)
    assert proxy.process is not None
    supervisor = proxy.process.pid
    cache = tmp_path / "cache"
    stopped = False
    locks: list[sqlite3.Connection] = []
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        assert (await proxy.get("/p")).body == b"v1"
        await proxy.wait_for(lambda: bool(_disk_keys(cache, "/p")))  # written behind

        # Every shard's write lock taken (as the supervisor's commit holds one), then the
        # supervisor stopped: the lock is held for as long as it is stopped.
        for db in sorted(cache.glob("*/cache.db")):
            con = sqlite3.connect(db, timeout=30, isolation_level=None)
            con.execute("BEGIN IMMEDIATE")
            locks.append(con)
        os.kill(supervisor, signal.SIGSTOP)
        stopped = True

        answer = await post_within(proxy, 3 * HOLD)
        assert answer is not None, "the POST waited for the shard's write lock"
        assert answer == (200, b"posted")
        # The lock still held, the supervisor still stopped: no worker serves the disk's v1.
        assert _disk_keys(cache, "/p"), "the disk's copy was deleted: the lock was not held"
        seen: set[str] = set()
        for _ in range(40):
            r = await proxy.get("/p")
            assert r.body == b"v2", (r.body, r.x_cache, r.tier, r.worker)
            seen.add(r.worker)
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen

        for con in locks:
            con.execute("ROLLBACK")
            con.close()
        locks.clear()
        os.kill(supervisor, signal.SIGCONT)
        stopped = False
        # The supervisor's queued invalidation deletes the disk's copy.
        await proxy.wait_for(lambda: not _disk_keys(cache, "/p"))
        assert (await proxy.get("/p")).body == b"v2"
    finally:
        for con in locks:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            con.close()
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGCONT)
        await proxy.stop(signal.SIGTERM)
