"""Upstream pool desync: bytes an origin sends after a response whose end cachegate inferred
(the answer to a HEAD, a 204 or a 304 whose head announces a body) must never be read as the
response to the next request sent on that connection, and never be stored.

Each origin here owes the announced body and sends it only when the next request arrives on
the same connection: the worst moment, and a deterministic one. That late "body" is itself a
cacheable response (``POISON``): on a connection put back in the pool, it would answer an
innocent client's request and be stored for everyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import MakeProxy
from tests.harness import Clock
from tests.security.misbehaving import Conn, Request, raw_origins, response

POISON = response("200 OK", {"Cache-Control": "max-age=600", "Content-Type": "text/html"}, b"POISON")
VICTIM = response("200 OK", {"Cache-Control": "max-age=600", "Content-Type": "text/html"}, b"victim")
BYPASS_HEAD = "rules:\n  - {name: pass, match: {path: /pass}, bypass: true}\n"

# What the first response announces: a length, or a transfer coding (bytes that may follow).
ANNOUNCED = {"content-length": {"Content-Length": str(len(POISON))},
             "transfer-encoding": {"Transfer-Encoding": "chunked"}}


def owes_poison(answer: Callable[[Request], bytes], owes: Callable[[Request], bool]
                ) -> Callable[[Conn], Awaitable[None]]:
    """An origin that answers each request with ``answer(req)``; after a request that ``owes``,
    the next request on the same connection gets ``POISON`` (the late body) instead."""
    async def serve(conn: Conn) -> None:
        owed = False
        while True:
            req = await conn.request()
            if owed:
                await conn.send(POISON)
                owed = False
            else:
                await conn.send(answer(req))
                owed = owes(req)

    return serve


@pytest.mark.parametrize("announced", ["content-length", "transfer-encoding", "nothing"])
async def test_late_body_of_a_head_response_never_answers_the_next_client(
    make_proxy: MakeProxy, announced: str
) -> None:
    fields = {"Content-Type": "text/html", **ANNOUNCED.get(announced, {})}
    head_answer = response("200 OK", fields, length=False)

    serve = owes_poison(lambda req: head_answer if req.method == "HEAD" else VICTIM,
                        lambda req: req.method == "HEAD")

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(rules=BYPASS_HEAD, config="upstream: {retries: 0}\n", upstreams=[origin.url])
        head = await proxy.request("HEAD", "/pass")
        assert head.status == 200 and head.body == b""
        first = await proxy.get("/victim")
        assert (first.status, first.body) == (200, b"victim")
        again = await proxy.get("/victim")
        assert (again.status, again.body, again.x_cache) == (200, b"victim", "HIT")
        # The GET went on a new connection: the one that carried the HEAD was closed.
        assert origin.targets() == [(0, "HEAD", "/pass"), (1, "GET", "/victim")]


@pytest.mark.parametrize("announced", ["content-length", "transfer-encoding"])
async def test_late_body_of_a_304_never_answers_the_next_client(
    make_proxy: MakeProxy, clock: Clock, announced: str
) -> None:
    stored = response("200 OK", {"Cache-Control": "max-age=10", "ETag": '"v1"'}, b"page")
    not_modified = response("304 Not Modified", {"Cache-Control": "max-age=10", "ETag": '"v1"',
                                                 **ANNOUNCED[announced]}, length=False)

    def revalidation(req: Request) -> bool:
        return req.target == "/page" and "if-none-match" in req.headers

    serve = owes_poison(
        lambda req: not_modified if revalidation(req) else stored if req.target == "/page" else VICTIM,
        revalidation)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        proxy.runtime.engine.clock = clock
        assert (await proxy.get("/page")).body == b"page"
        clock.advance(20)
        revalidated = await proxy.get("/page")
        assert (revalidated.status, revalidated.body, revalidated.x_cache) == (200, b"page", "REVALIDATED")
        first = await proxy.get("/victim")
        assert (first.status, first.body) == (200, b"victim")
        again = await proxy.get("/victim")
        assert (again.body, again.x_cache) == (b"victim", "HIT")
        assert [t for t in origin.targets() if t[2] == "/victim"] == [(1, "GET", "/victim")]


@pytest.mark.parametrize("announced", ["content-length", "transfer-encoding"])
async def test_late_body_of_a_204_never_answers_the_next_client(make_proxy: MakeProxy, announced: str) -> None:
    no_content = response("204 No Content", {"Cache-Control": "max-age=600", **ANNOUNCED[announced]},
                          length=False)

    serve = owes_poison(lambda req: no_content if req.target == "/empty" else VICTIM,
                        lambda req: req.target == "/empty")

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        empty = await proxy.get("/empty")
        assert (empty.status, empty.body) == (204, b"")
        first = await proxy.get("/victim")
        assert (first.status, first.body) == (200, b"victim")
        again = await proxy.get("/victim")
        assert (again.body, again.x_cache) == (b"victim", "HIT")
        assert origin.targets() == [(0, "GET", "/empty"), (1, "GET", "/victim")]


async def test_bytes_on_an_idle_pooled_connection_kill_it(make_proxy: MakeProxy) -> None:
    sent_stray = asyncio.Event()

    async def serve(conn: Conn) -> None:
        while True:
            req = await conn.request()
            await conn.send(VICTIM if req.target == "/victim" else response("200 OK", {}, b"first"))
            if req.target == "/first":
                await asyncio.sleep(0.05)  # the connection is idle in the pool by now
                await conn.send(POISON)
                sent_stray.set()

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        assert (await proxy.get("/first")).body == b"first"
        await sent_stray.wait()
        await asyncio.sleep(0.05)  # the stray bytes reach cachegate's idle connection
        first = await proxy.get("/victim")
        assert (first.status, first.body) == (200, b"victim")
        assert (await proxy.get("/victim")).body == b"victim"
        assert origin.targets() == [(0, "GET", "/first"), (1, "GET", "/victim")]
