"""A GET or HEAD that carries a body is passed through: not looked up, coalesced or stored.

The key is the URL (and the Vary fields), never the body, and a fill sends none: a search
API's ``GET /_search`` with a JSON query used to reach the origin without its query, and
every later query, different or not, got the first one's stored or coalesced answer. Real
origin on loopback that answers with the body it received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Handler, Origin, Proxy

BYPASS = "cachegate; fwd=bypass; fwd-status=200; detail=REQUEST-BODY"


def echo(delay: float = 0.0) -> Handler:
    """Answers with the body it received, cacheable for a minute."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=b"result-for:" + body, headers={"Cache-Control": "max-age=60"})

    return handle


def bodies(origin: Origin, path: str) -> list[bytes]:
    return [s.body for s in origin.seen if s.path == path]


async def search(proxy: Proxy, path: str, query: str, method: str = "GET") -> tuple[int, str, str, bytes]:
    r = await proxy.request(method, path, data=json.dumps({"q": query}).encode(),
                            headers={"Content-Type": "application/json"})
    return r.status, r.x_cache, r.cache_status, r.body


async def test_two_gets_with_different_bodies_get_two_answers_and_nothing_is_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/_search", echo())
    proxy = await make_proxy()
    alpha = await search(proxy, "/_search", "alpha")
    beta = await search(proxy, "/_search", "beta")
    assert alpha == (200, "BYPASS", BYPASS, b'result-for:{"q": "alpha"}')
    assert beta == (200, "BYPASS", BYPASS, b'result-for:{"q": "beta"}')
    assert bodies(origin, "/_search") == [b'{"q": "alpha"}', b'{"q": "beta"}']
    # the origin saw the client's framing and type
    assert origin.seen[0].headers["Content-Length"] == str(len(b'{"q": "alpha"}'))
    assert origin.seen[0].headers["Content-Type"] == "application/json"
    # nothing was stored under the URL: a GET without a body is a miss, then a hit
    plain = await proxy.get("/_search")
    assert (plain.x_cache, plain.body) == ("MISS", b"result-for:")
    again = await proxy.get("/_search")
    assert (again.x_cache, again.body) == ("HIT", b"result-for:")
    assert origin.count("/_search") == 3


async def test_a_get_with_a_body_is_not_answered_from_the_store(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/_search", echo())
    proxy = await make_proxy()
    assert (await proxy.get("/_search")).x_cache == "MISS"
    assert (await proxy.get("/_search")).x_cache == "HIT"
    assert await search(proxy, "/_search", "alpha") == (200, "BYPASS", BYPASS, b'result-for:{"q": "alpha"}')
    assert bodies(origin, "/_search") == [b"", b'{"q": "alpha"}']
    assert (await proxy.get("/_search")).x_cache == "HIT"  # the stored entry was left as it was


async def test_concurrent_gets_with_bodies_are_not_coalesced(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/_search", echo(delay=0.3))
    proxy = await make_proxy()
    answers = await asyncio.gather(*(search(proxy, "/_search", str(i)) for i in range(20)))
    for i, (status, x_cache, _, body) in enumerate(answers):
        assert (status, x_cache, body) == (200, "BYPASS", b'result-for:{"q": "%d"}' % i)
    assert origin.count("/_search") == 20
    assert sorted(bodies(origin, "/_search")) == sorted(b'{"q": "%d"}' % i for i in range(20))


async def test_a_chunked_get_body_is_forwarded(origin: Origin, make_proxy: MakeProxy) -> None:
    seen: list[tuple[bytes, str | None]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((body, request.headers.get("Transfer-Encoding")))
        return web.Response(body=b"result-for:" + body, headers={"Cache-Control": "max-age=60"})

    origin.route("/_search", handle)
    proxy = await make_proxy()

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"q":'
        yield b'"chunked"}'

    r = await proxy.get("/_search", data=chunks())
    assert (r.status, r.x_cache, r.cache_status, r.body) == (200, "BYPASS", BYPASS,
                                                               b'result-for:{"q":"chunked"}')
    # Whole before it went upstream (the end chunk in the same read): sent with Content-Length,
    # as nginx sends a buffered body; else streamed, chunked (docs/upstreams.md). Either way once.
    [(body, coding)] = seen
    assert body == b'{"q":"chunked"}' and coding in (None, "chunked"), seen
    assert (await proxy.get("/_search")).x_cache == "MISS"


async def test_a_head_with_a_body_is_passed_through(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/_search", echo())
    proxy = await make_proxy()
    status, x_cache, cache_status, body = await search(proxy, "/_search", "alpha", method="HEAD")
    assert (status, x_cache, cache_status, body) == (200, "BYPASS", BYPASS, b"")
    assert [(s.method, s.body) for s in origin.seen] == [("HEAD", b'{"q": "alpha"}')]
    assert (await proxy.request("HEAD", "/_search")).x_cache == "MISS"


async def test_a_get_with_content_length_0_is_an_ordinary_get(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/_search", echo())
    proxy = await make_proxy()
    address, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    replies = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(address, int(port))
        writer.write(b"GET /_search HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")
        replies.append(await reader.read())
        writer.close()
        await writer.wait_closed()
    assert b"X-Cache-Status: MISS" in replies[0]
    assert b"X-Cache-Status: HIT" in replies[1]
    assert origin.count("/_search") == 1
