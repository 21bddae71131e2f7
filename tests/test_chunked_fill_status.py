"""What ``Cache-Status`` says of a fill whose length its head does not give (chunked).

Its head goes out before the body's length is known, and a body that outgrows
``cache.max_object`` is given up while it streams (passed through unstored). So the head does
not say ``stored`` (RFC 9211 §2.8: "a true value indicates that it did"), its clients' nor
the followers'; the access log says what became of it once the body has gone out: ``stored``,
or ``detail=TOO-LARGE`` as for a ``Content-Length`` over the limit. A chunked body that came
whole with its head is known at the head: said as one with a ``Content-Length`` is.

A raw origin on loopback (chunked bodies written as the test says), one in-process proxy."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.misbehaving import Conn, Serve, flight_with, raw_origins
from tests.storage.procs import ProxyProcess, write_config

HEAD = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nTransfer-Encoding: chunked\r\n\r\n"
PIECE = b"x" * 50_000
MAX_OBJECT = 100_000  # (100KB: bodies over it are not stored)
CONFIG = f"cache: {{memory: 64MB, max_object: {MAX_OBJECT}, disk: {{path: cache, size: 512MB, shards: 2}}}}\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked_origin(go: asyncio.Event) -> Serve:
    """``/big``: 5 pieces of 50,000 bytes (over max_object), ``/fits``: 1 piece, each written
    a while apart once ``go`` is set (never whole with the head); ``/no-cache``: as ``/fits``,
    ``no-cache`` (stored, revalidated before each use); ``/small-*``: the head and a body of the
    size the path says, in one write (whole with the head)."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            path = request.target
            if path.startswith("/small-"):
                await conn.send(HEAD + chunk(b"s" * int(path.removeprefix("/small-"))) + b"0\r\n\r\n")
                continue
            await go.wait()
            await conn.send(HEAD.replace(b"max-age=600", b"no-cache, max-age=600") if path == "/no-cache" else HEAD)
            for _ in range(5 if path == "/big" else 1):
                await asyncio.sleep(0.05)
                await conn.send(chunk(PIECE))
            await asyncio.sleep(0.05)
            await conn.send(b"0\r\n\r\n")

    return serve


def logged(proxy: Proxy, log_file: Path) -> list[dict[str, Any]]:
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    return [json.loads(line) for line in log_file.read_text().splitlines()]


async def test_a_chunked_fill_that_outgrows_max_object_never_says_stored(
        make_proxy: MakeProxy, tmp_path: Path) -> None:
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(chunked_origin(go))
        log_file = tmp_path / "access.log"
        proxy = await make_proxy(config=CONFIG + f"access_log: {{format: json, path: {log_file}}}\n",
                                 upstreams=[origin.url])
        leader = asyncio.ensure_future(proxy.get("/big"))
        await flight_with(proxy, 0)
        follower = asyncio.ensure_future(proxy.get("/big"))
        await flight_with(proxy, 1)
        go.set()
        first, second = await leader, await follower
        assert first.body == second.body == PIECE * 5
        # Neither head says stored: it was not (the body outgrew max_object after them).
        assert (first.x_cache, first.cache_status) == ("MISS", "cachegate; fwd=uri-miss; fwd-status=200")
        # The follower got the shared fetch's bytes: collapsed (as a follower of any fetch that
        # did not store its response says), never stored.
        assert (second.x_cache, second.cache_status) == ("HIT", "cachegate; fwd=uri-miss; fwd-status=200; collapsed")
        # The log says what became of it, as a Content-Length over the limit says in its head.
        assert sorted(r["cache_status"] for r in logged(proxy, log_file)) == [
            "cachegate; fwd=uri-miss; fwd-status=200; collapsed; detail=TOO-LARGE",
            "cachegate; fwd=uri-miss; fwd-status=200; detail=TOO-LARGE"]
        assert len(origin.requests) == 1  # one shared fetch
        again = await proxy.get("/big")  # not stored: a miss again
        assert again.x_cache == "MISS" and len(origin.requests) == 2


async def test_a_chunked_fill_that_fits_says_stored_in_the_log_and_is_a_hit_next(
        make_proxy: MakeProxy, tmp_path: Path) -> None:
    go = asyncio.Event()
    go.set()
    async with raw_origins() as start:
        origin = await start(chunked_origin(go))
        log_file = tmp_path / "access.log"
        proxy = await make_proxy(config=CONFIG + f"access_log: {{format: json, path: {log_file}}}\n",
                                 upstreams=[origin.url])
        first = await proxy.get("/fits")
        assert (first.x_cache, first.cache_status) == ("MISS", "cachegate; fwd=uri-miss; fwd-status=200")
        assert [r["cache_status"] for r in logged(proxy, log_file)] == [
            "cachegate; fwd=uri-miss; fwd-status=200; stored"]
        hit = await proxy.get("/fits")
        assert (hit.x_cache, hit.body) == ("HIT", PIECE)
        assert len(origin.requests) == 1


async def test_a_chunked_body_whole_with_its_head_is_said_as_one_with_a_content_length(
        make_proxy: MakeProxy) -> None:
    async with raw_origins() as start:
        origin = await start(chunked_origin(asyncio.Event()))
        # (a max_object small enough for a body over it to come in the head's read)
        proxy = await make_proxy(config=CONFIG.replace(str(MAX_OBJECT), "4KB"), upstreams=[origin.url])
        small = await proxy.get("/small-1000")
        assert (small.x_cache, small.cache_status) == ("MISS", "cachegate; fwd=uri-miss; fwd-status=200; stored")
        assert (await proxy.get("/small-1000")).x_cache == "HIT"
        over = "/small-5000"
        large = await proxy.get(over)
        assert large.body == b"s" * 5000
        assert (large.x_cache, large.cache_status) == ("MISS", "cachegate; fwd=uri-miss; fwd-status=200; detail=TOO-LARGE")
        assert (await proxy.get(over)).x_cache == "MISS"


async def test_warm_asks_the_store_whether_a_chunked_fill_was_stored(make_proxy: MakeProxy) -> None:
    """``cachegate warm`` read ``stored`` from the head: without it, a chunked fill that was
    stored counted as not storable. It asks the store (HEAD, only-if-cached) instead. A stored
    ``no-cache`` response is stored too (its 504 says it needs validation), as the head of one
    with a ``Content-Length`` says: it counted NOT-STORED."""
    from tests.console.test_warm import warm

    go = asyncio.Event()
    go.set()
    async with raw_origins() as start:
        origin = await start(chunked_origin(go))
        proxy = await make_proxy(config=CONFIG, upstreams=[origin.url])
        code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                    stdin=b"/fits\n/big\n/no-cache\n")
        assert code == 0, (out, err)
        lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
        assert lines["stored"].split()[1] == "2", out  # /fits, /no-cache
        assert "(NOT-STORED 1)" in lines["not"], out  # /big: over max_object
        # (the checks never reached it)
        assert sorted(r.target for _, r in origin.requests) == ["/big", "/fits", "/no-cache"]


@pytest.mark.slow
async def test_warm_finds_a_chunked_fill_stored_on_disk_by_either_of_two_workers(
        origin: Origin, tmp_path: Path) -> None:
    """With ``--workers 2`` a body too big for the shared memory is written to disk by the worker
    that received it, after its last byte went out, and only that worker's reads wait for the
    write: warm's check went out on whichever connection its pool gave it, and when that one led
    to the other worker it was a 504 and the stored fill counted NOT-STORED (3 runs in 8 of 11
    URLs). Each of warm's workers keeps a connection of its own now: the check goes where the
    fill went, and every fill is counted stored."""
    body = b"b" * (1 << 20)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Cache-Control": "max-age=600"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(body), 1 << 16):
            await response.write(body[i:i + (1 << 16)])
        await response.write_eof()
        return response

    paths = [f"/c/{i}" for i in range(80)]
    for path in paths:
        origin.route(path, chunked)
    proxy = ProxyProcess(str(tmp_path), write_config(
        str(tmp_path), origin.url, "cache: {memory: 32MB, memory_max_object: 256KB, max_object: 8MB, "
        "disk: {path: cache, size: 256MB, shards: 2}}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        from tests.console.test_warm import warm

        code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--concurrency", "16",
                                    "--progress", "none", stdin="\n".join(paths).encode())
        assert code == 0, (out, err)
        lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
        assert lines["stored"].split()[1] == str(len(paths)), out
        assert lines["not"].split()[2] == "0", out
    finally:
        await proxy.stop()
