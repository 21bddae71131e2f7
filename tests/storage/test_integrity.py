"""Crash safety: kill -9 while writing, upstreams that break off, restarts that come back warm."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Origin, Proxy
from tests.storage.procs import HOST, ProxyProcess, write_config

CACHE = ("cache: {memory: 8MB, memory_max_object: 256KB, max_object: 16MB,\n"
         "        disk: {path: cache, size: 256MB, shards: 4}}\n")


def _bodies(n: int, seed: int = 7) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {f"/big/{i}": rnd.randbytes(rnd.choice((40_000, 300_000, 1_500_000, 3_000_000)))
            for i in range(n)}


def _serve_bodies(origin: Origin, bodies: dict[str, bytes], chunk: int = 64 * 1024,
                  pause: float = 0.0) -> None:
    for path, body in bodies.items():
        async def handler(request: web.Request, body: bytes = body) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Cache-Control": "max-age=600",
                                               "Content-Type": "application/octet-stream"})
            resp.content_length = len(body)
            await resp.prepare(request)
            for i in range(0, len(body), chunk):
                await resp.write(body[i:i + chunk])
                if pause:
                    await asyncio.sleep(pause)
            await resp.write_eof()
            return resp

        origin.route(path, handler)


async def _fetch_all(proxy: ProxyProcess, paths: list[str], done: list[str]) -> None:
    async def one(session: aiohttp.ClientSession, path: str) -> None:
        try:
            async with session.get(proxy.url + path, headers={"Host": HOST}) as r:
                await r.read()
                done.append(path)
        except (aiohttp.ClientError, TimeoutError):
            pass  # the proxy was killed under us

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, p) for p in paths))


def _committed(cache: str) -> int:
    """Entries (metadata rows) diskcache holds over every shard (read-only; 0 while none is
    committed)."""
    total = 0
    for shard in sorted(os.listdir(cache)) if os.path.isdir(cache) else ():
        db_path = os.path.join(cache, shard, "cache.db")
        if not os.path.exists(db_path):
            continue
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)
            try:
                total += db.execute("SELECT COUNT(*) FROM Cache WHERE key LIKE 'm:%'").fetchone()[0]
            finally:
                db.close()
        except sqlite3.OperationalError:  # being created: not yet
            continue
    return total


def _referenced_files(cache: str) -> tuple[set[str], set[str]]:
    """Files diskcache's rows refer to, and the .val files that exist, over every shard."""
    referenced, present = set(), set()
    for shard in sorted(os.listdir(cache)):
        db_path = os.path.join(cache, shard, "cache.db")
        if not os.path.exists(db_path):
            continue
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            referenced |= {os.path.join(cache, shard, r[0]) for r in
                           db.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        finally:
            db.close()
        for dirpath, _, files in os.walk(os.path.join(cache, shard)):
            present |= {os.path.join(dirpath, f) for f in files if f.endswith(".val")}
    return referenced, present


@pytest.mark.slow
async def test_kill_9_while_writing_large_entries_then_every_served_entry_is_byte_identical(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEGATE_PERSIST_INTERVAL", "0.05")  # batches while the big writes go on
    bodies = _bodies(24)
    digests = {p: hashlib.sha256(b).hexdigest() for p, b in bodies.items()}
    _serve_bodies(origin, bodies, pause=0.01)  # slow enough that many writes are in progress
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start()
    done: list[str] = []
    fetch = asyncio.ensure_future(_fetch_all(proxy, list(bodies), done))
    # Kill once some bodies went through and write-behind committed some of them to disk (a
    # fill is answered from memory first: only committed ones are hits after the restart),
    # while others are half-way.
    cache = str(tmp_path / "cache")
    for _ in range(1000):
        if len(done) >= 8 and _committed(cache):
            break
        await asyncio.sleep(0.01)
    assert 8 <= len(done) < len(bodies) and _committed(cache)
    proxy.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    await proxy.process.wait()  # type: ignore[union-attr]
    await fetch
    spool_dirs = os.listdir(os.path.join(cache, "tmp"))
    assert spool_dirs, "the killed process left its spool folder"

    restarted = ProxyProcess(str(tmp_path), proxy.config_path)
    await restarted.start()  # opens the same cache directory without any repair step
    try:
        first_round = []
        for _round in range(2):
            for path, digest in digests.items():
                r = await restarted.get(path)
                assert r.status == 200
                assert hashlib.sha256(r.body).hexdigest() == digest, (path, r.x_cache, r.tier)
                if _round == 0:
                    first_round.append(r.x_cache)
        # Entries committed before the kill are served from disk; the others were refetched.
        assert "HIT" in first_round and "MISS" in first_round, first_round
        # The restarted process swept what the killed one left: its spool folder ...
        for _ in range(100):
            if not set(os.listdir(os.path.join(cache, "tmp"))) & set(spool_dirs):
                break
            await asyncio.sleep(0.05)
        assert not set(os.listdir(os.path.join(cache, "tmp"))) & set(spool_dirs)
    finally:
        assert await restarted.stop() == 0
    # ... and no body file is left that no row refers to.
    referenced, present = _referenced_files(cache)
    assert present <= referenced


@pytest.mark.slow
async def test_kill_9_with_writes_queued_behind_loses_only_those_and_never_corrupts_an_entry(
        origin: Origin, tmp_path: Path) -> None:
    """Write-behind's guarantee: fills answered but not yet on disk when every process is
    killed are lost (a miss after the restart), never stored half or wrong."""
    rnd = random.Random(11)
    before = {f"/w/a{i}": rnd.randbytes(rnd.choice((100, 3_000, 40_000, 200_000))) for i in range(40)}
    queued = {f"/w/b{i}": rnd.randbytes(rnd.choice((100, 3_000, 40_000, 200_000))) for i in range(40)}
    for path, body in {**before, **queued}.items():
        origin.route(path, body=body, headers={"Cache-Control": "max-age=600"})
    # Memory enough that the queued fills stay under the share of it that commits at once.
    config = write_config(str(tmp_path), origin.url, CACHE.replace("memory: 8MB", "memory: 64MB"))
    first = ProxyProcess(str(tmp_path), config)
    await first.start()
    for path in before:  # committed: a clean stop writes what is still queued
        assert (await first.get(path)).x_cache == "MISS"
    assert await first.stop(signal.SIGTERM) == 0

    os.environ["CACHEGATE_PERSIST_INTERVAL"] = "3600"  # nothing written behind before the kill
    try:
        second = ProxyProcess(str(tmp_path), config)
        await second.start("--workers", "2")
    finally:
        del os.environ["CACHEGATE_PERSIST_INTERVAL"]
    await second.wait_for(lambda: len(second.workers) == 2)
    for path, body in queued.items():
        r = await second.get(path)
        assert (r.x_cache, r.body) == ("MISS", body)
        assert (await second.get(path)).x_cache == "HIT"  # held in the shared memory
    for path, body in before.items():  # read from disk into the shared memory, and revalidated nowhere
        assert (await second.get(path)).body == body
    await second.kill()  # SIGKILL: the supervisor (and the shared memory) and both workers

    third = ProxyProcess(str(tmp_path), config)
    await third.start()
    try:
        for path, body in before.items():
            r = await third.get(path)
            assert (r.status, r.x_cache, r.body) == (200, "HIT", body), path
        for path, body in queued.items():
            r = await third.get(path)
            assert (r.status, r.x_cache, r.body) == (200, "MISS", body), path  # lost, not corrupt
            assert (await third.get(path)).x_cache == "HIT"
    finally:
        assert await third.stop() == 0
    referenced, present = _referenced_files(str(tmp_path / "cache"))
    assert present <= referenced


@pytest.mark.slow
async def test_kill_9_while_write_behind_commits_then_every_entry_is_whole(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches every 50 ms (the default is 200), and fills that take 0.2 s each, 100 at a time
    # (the client's connection limit): several batches are committed before the 400 are through.
    monkeypatch.setenv("CACHEGATE_PERSIST_INTERVAL", "0.05")
    rnd = random.Random(12)
    bodies = {f"/s/{i}": rnd.randbytes(rnd.choice((200, 5_000, 40_000, 150_000))) for i in range(400)}
    for path, body in bodies.items():
        origin.route(path, body=body, headers={"Cache-Control": "max-age=600"}, delay=0.2)
    config = write_config(str(tmp_path), origin.url, CACHE)
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2")
    await proxy.wait_for(lambda: len(proxy.workers) == 2)
    done: list[str] = []
    fetch = asyncio.ensure_future(_fetch_all(proxy, list(bodies), done))
    # Kill while fills keep coming and batches are being written, once at least one batch is
    # committed (on a loaded machine 200 fills can be answered before the first commit).
    cache = str(tmp_path / "cache")
    try:
        for _ in range(3000):
            if len(done) >= 200 and _committed(cache):
                break
            await asyncio.sleep(0.01)
        assert _committed(cache) and len(done) < len(bodies)
    finally:  # killed whatever happened: a failure here leaves no processes to the next tests
        await proxy.kill()
        await fetch
    for path, body in bodies.items():  # the refetches after the restart need not wait
        origin.route(path, body=body, headers={"Cache-Control": "max-age=600"})

    restarted = ProxyProcess(str(tmp_path), config)
    await restarted.start()
    try:
        said = []
        for path, body in bodies.items():
            r = await restarted.get(path)
            assert (r.status, r.body == body) == (200, True), (path, r.x_cache, r.tier)
            said.append(r.x_cache)
        assert "HIT" in said and "MISS" in said, said
    finally:
        assert await restarted.stop() == 0
    referenced, present = _referenced_files(str(tmp_path / "cache"))
    assert present <= referenced


@pytest.mark.slow
async def test_a_stopped_and_restarted_proxy_answers_from_disk(origin: Origin, tmp_path: Path) -> None:
    bodies = {"/small": b"s" * 1000, "/large": os.urandom(2_000_000)}
    for path, body in bodies.items():
        origin.route(path, body=body, headers={"Cache-Control": "max-age=600"})
    config = write_config(str(tmp_path), origin.url, CACHE)
    first = ProxyProcess(str(tmp_path), config)
    await first.start()
    for path in bodies:
        assert (await first.get(path)).x_cache == "MISS"
        assert (await first.get(path)).x_cache == "HIT"
    assert await first.stop(signal.SIGTERM) == 0

    second = ProxyProcess(str(tmp_path), config)
    await second.start()
    try:
        for path, body in bodies.items():
            r = await second.get(path)
            assert (r.status, r.x_cache, r.tier) == (200, "HIT", "disk")
            assert r.body == body
        # The small one enters memory on its second read from disk (not on the first:
        # proxy.storage.reads.Promotions); the large one stays on disk.
        assert (await second.get("/small")).tier == "disk"
        assert (await second.get("/small")).tier == "memory"
        assert (await second.get("/large")).tier == "disk"
        assert origin.count("/small") == origin.count("/large") == 1
    finally:
        assert await second.stop() == 0


async def _broken(request: web.Request, declared: int, sent: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Cache-Control": "max-age=600"})
    if declared:
        resp.content_length = declared
    else:
        resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(b"x" * sent)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()  # break off mid-body
    return resp


@pytest.mark.parametrize("declared", [1_000_000, 0], ids=["content-length", "chunked"])
async def test_an_upstream_that_breaks_off_mid_body_leaves_no_entry_and_the_client_sees_it(
        origin: Origin, proxy: Proxy, declared: int) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _broken(request, declared, 300_000)

    origin.route("/cut", handler)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientPayloadError):
            await proxy.get("/cut")
    assert origin.count("/cut") == 2  # nothing was stored: the second request went upstream again
    assert await proxy.runtime.storage.get(await _key(proxy, "/cut")) == ()


async def _key(proxy: Proxy, path: str) -> str:
    return proxy.url + path


async def test_a_response_over_max_object_is_streamed_whole_not_stored_and_counted(
        origin: Origin, make_proxy: object) -> None:
    body = os.urandom(3_000_000)
    origin.route("/huge", body=body, headers={"Cache-Control": "max-age=600"})
    origin.route("/chunked", _chunked_handler(body))
    proxy: Proxy = await make_proxy(  # type: ignore[operator]
        config="cache: {memory: 8MB, max_object: 1MB, disk: {path: cache, size: 64MB, shards: 2}}\n")
    for path in ("/huge", "/chunked"):
        for _ in range(2):
            r = await proxy.get(path)
            assert (r.status, r.body == body, r.x_cache) == (200, True, "MISS")
        assert origin.count(path) == 2
    assert "detail=TOO-LARGE" in (await proxy.get("/huge")).cache_status  # known up front
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_not_stored_total{reason="TOO-LARGE"}' in metrics


async def test_max_object_is_capped_at_half_a_disk_shard(origin: Origin, make_proxy: object) -> None:
    body = os.urandom(3_000_000)
    origin.route("/big", body=body, headers={"Cache-Control": "max-age=600"})
    origin.route("/fits", body=body[:1_000_000], headers={"Cache-Control": "max-age=600"})
    # 8 MB over 2 shards: diskcache gets 3.6 MB per shard, so 1.8 MB is the most one body may be
    # (diskcache would cull a body bigger than its shard at once, or flush the shard for it).
    proxy: Proxy = await make_proxy(  # type: ignore[operator]
        config="cache: {memory: 8MB, max_object: 100MB, disk: {path: cache, size: 8MB, shards: 2}}\n")
    first, second = await proxy.get("/big"), await proxy.get("/big")
    assert first.body == second.body == body
    assert (first.x_cache, second.x_cache) == ("MISS", "MISS")
    assert "detail=TOO-LARGE" in second.cache_status
    await proxy.get("/fits")
    assert (await proxy.get("/fits")).x_cache == "HIT"


def _chunked_handler(body: bytes):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=600"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 100_000):
            await resp.write(body[i:i + 100_000])
        await resp.write_eof()
        return resp

    return handler
