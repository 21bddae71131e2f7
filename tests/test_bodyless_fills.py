"""A 204 whose head announces a body (``Content-Length: 5``) ends at its head all the same
(RFC 9112 §6.3): the fill that stores it expects no body, so it is kept as the head said
("stored"), served as a HIT, and never answered with the announced length (RFC 9110 §8.6: no
Content-Length in a 204; a client would wait for five bytes that never come).

Before, the spool expected the five bytes, the fill ended "INCOMPLETE" after the head had
said "stored": every request went to the origin, and other workers' lease waiters were told
the fill failed and each fetched."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from proxy.policy.fields import body_length, ends_at_head
from tests.conftest import MakeProxy
from tests.harness import Clock
from tests.security.misbehaving import Conn, raw_origins, response
from tests.storage.procs import ProxyProcess, write_config

# What a sloppy origin sends: a 204 that says five bytes follow, and the five bytes.
NO_CONTENT_5 = response("204 No Content", {"Cache-Control": "max-age=300", "Content-Length": "5"},
                        length=False) + b"hello"


async def sloppy(conn: Conn) -> None:
    while True:
        await conn.request()
        await conn.send(NO_CONTENT_5)


def test_a_bodyless_status_has_no_body_whatever_its_content_length_says() -> None:
    assert [body_length(s, 5) for s in (200, 204, 304, 103)] == [5, 0, 0, 0]
    assert body_length(200, 5, head_method=True) == 0 and body_length(404, None) is None
    assert [ends_at_head(s) for s in (200, 204, 206, 304)] == [False, True, False, True]


async def test_a_204_announcing_a_body_is_stored_and_hit(make_proxy: MakeProxy) -> None:
    async with raw_origins() as start:
        origin = await start(sloppy)
        proxy = await make_proxy(upstreams=[origin.url])
        replies = [await proxy.get("/nc") for _ in range(3)]
        assert [(r.status, r.body, r.x_cache) for r in replies] == [(204, b"", "MISS"), (204, b"", "HIT"),
                                                                    (204, b"", "HIT")]
        assert replies[0].cache_status.endswith("fwd-status=204; stored")
        # RFC 9110 §8.6: no Content-Length in a 204, neither relayed nor from the store.
        assert not any("Content-Length" in r.headers for r in replies)
        head = await proxy.request("HEAD", "/nc")
        assert (head.status, head.x_cache, "Content-Length" in head.headers) == (204, "HIT", False)
        assert len(origin.requests) == 1
        stored = json.loads((await proxy.admin("GET", f"/cache?url={proxy.url}/nc")).body)
        assert [v["status"] for v in stored["variants"]] == [204]
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert re.search(r'^cachegate_flights_total\{outcome="filled"\} 1\.0$', metrics, re.M)
        assert not re.search(r'^cachegate_flights_total\{outcome="passed"\} [1-9]', metrics, re.M)
        # Two requests on one connection: a client that trusted a relayed ``Content-Length: 5``
        # would wait for five bytes, or read the second answer's first bytes as the 204's body.
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /nc HTTP/1.1\r\nHost: a\r\n\r\nGET /nc HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert raw.count(b"HTTP/1.1 204 No Content") == 2 and raw.endswith(b"\r\n\r\n"), raw
        assert b"content-length" not in raw.lower()


async def test_a_revalidation_answered_by_a_204_announcing_a_body_replaces_the_stored_response(
        make_proxy: MakeProxy, clock: Clock) -> None:
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if "if-none-match" in request.headers:
                await conn.send(NO_CONTENT_5)
            else:
                await conn.send(response("200 OK", {"Cache-Control": "max-age=10", "ETag": '"v1"'}, b"page"))

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(upstreams=[origin.url])
        proxy.runtime.engine.clock = clock
        assert (await proxy.get("/page")).body == b"page"
        clock.advance(20)
        replaced = await proxy.get("/page")
        assert (replaced.status, replaced.body) == (204, b"")
        assert replaced.cache_status.endswith("stored"), replaced.cache_status
        again = await proxy.get("/page")
        assert (again.status, again.x_cache) == (204, "HIT"), again.cache_status
        assert len(origin.requests) == 2


@pytest.mark.slow
async def test_a_204_announcing_a_body_is_fetched_once_for_two_workers(tmp_path: Path) -> None:
    """The other worker's clients wait on the lease: told the fill is stored, they read it (told
    "failed" before, each fetched for itself)."""
    async with raw_origins() as start:
        origin = await start(sloppy)
        cache = "cache: {memory: 64MB, lock_timeout: 30s, disk: {path: cache, size: 256MB, shards: 2}}\n"
        proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache))
        await proxy.start("--workers", "2")
        try:
            await proxy.wait_for(lambda: len(proxy.workers) == 2)
            results = await asyncio.gather(*(proxy.get("/nc") for _ in range(30)))
            assert {r.status for r in results} == {204}
            workers = Counter(r.headers.get("X-Cachegate-Worker") for r in results)
            later = [await proxy.get("/nc") for _ in range(10)]
            assert {(r.status, r.headers["X-Cache-Status"]) for r in later} == {(204, "HIT")}
            workers.update(r.headers.get("X-Cachegate-Worker") for r in later)
            assert set(workers) == {"0", "1"}, workers  # both workers answered
            assert len(origin.requests) == 1, origin.targets()
            metrics = (await proxy.admin("GET", "/metrics")).body.decode()
            assert not re.search(r'^cachegate_flights_total\{outcome="passed"\} [1-9]', metrics, re.M)
        finally:
            await proxy.stop()
