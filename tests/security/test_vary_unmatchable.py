"""A ``Vary`` no request can be matched on is never served across clients.

A real origin answers each client with a page for its cookie. Two ways it used to be served
to every client from the first one's fill:

- a ``Vary`` member that is not a field name (``"Cookie"``, ``Cookie;x=1``, ``Coo kie``): taken
  as written, it named a field no request carries, so every request matched the variant stored
  for the first. Such a ``Vary`` is now refused as ``Vary: *`` is (``VARY-INVALID``).
- a 304 that adds or changes ``Vary`` (``Vary: *``, ``Vary: Cookie``) on a response stored
  without it: the stored headers took the new ``Vary`` but the variant stayed matched on the
  fields of its fill (none), so every client got it as a HIT. Such a 304 now ends the stored
  response: the client that revalidated gets a full response of its own, and the next ones too.

Both are checked on connections kept alive, where the fast path answers hits from the stored
records.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Clock, Origin
from tests.test_fastpath import Raw, read_response, req


class Client:
    """One keep-alive connection, one request at a time (hits on it take the fast path)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str, *fields: str) -> Raw:
        self.writer.write(req("GET", path, *fields))
        await self.writer.drain()
        return await asyncio.wait_for(read_response(self.reader, "GET"), 10)

    def close(self) -> None:
        self.writer.close()


def for_cookie(vary: str) -> web.RequestHandler:
    async def page(request: web.Request) -> web.Response:
        who = request.headers.get("Cookie", "anonymous")
        return web.Response(body=f"page for {who}".encode(),
                            headers={"Cache-Control": "max-age=100", "Vary": vary})
    return page


@pytest.mark.parametrize("vary", ['"Cookie"', "Cookie;x=1", "Coo kie", 'Accept, "Cookie"'])
async def test_a_vary_member_that_is_not_a_field_name_is_never_shared(
        origin: Origin, make_proxy: MakeProxy, vary: str) -> None:
    origin.route("/page", for_cookie(vary))
    proxy = await make_proxy()
    port = proxy.listeners.proxy_addresses[0][1]
    alice, bob = await Client.open(port), await Client.open(port)
    try:
        first = await alice.get("/page", "Cookie: session=alice")
        assert first.body == b"page for session=alice"
        assert first.header("Cache-Status") == "cachegate; fwd=uri-miss; fwd-status=200; detail=VARY-INVALID"
        for _ in range(3):  # (a second request on a kept connection is the fast path's, were it stored)
            reply = await bob.get("/page", "Cookie: session=bob")
            assert (reply.body, reply.header("X-Cache-Status")) == (b"page for session=bob", "MISS")
    finally:
        alice.close()
        bob.close()
    assert origin.count("/page") == 4


def changing_vary(vary: str) -> web.RequestHandler:
    """Pages per cookie (u=A and u=B share one, ETag "x"); the first answer has no Vary, every
    later one (a 200 or a 304 to a matching If-None-Match) says ``Vary: <vary>``."""
    answered = 0

    async def page(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        cookie = request.headers.get("Cookie", "anonymous")
        body, etag = (b"shared page", '"x"') if cookie in ("u=A", "u=B") else (f"page for {cookie}".encode(),
                                                                              f'"{cookie}"')
        fields = {"Cache-Control": "max-age=10", "ETag": etag}
        if answered > 1:
            fields["Vary"] = vary
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={**fields, "Cache-Control": "max-age=100"})
        return web.Response(body=body, headers=fields)
    return page


@pytest.mark.parametrize("vary", ["*", "Cookie", "cookie, Accept", '"Cookie"', "X-Forwarded-For"])
async def test_a_304_that_changes_vary_is_not_served_across_clients(
        origin: Origin, make_proxy: MakeProxy, vary: str) -> None:
    origin.route("/page", changing_vary(vary))
    proxy = await make_proxy()
    clock = Clock()
    proxy.runtime.engine.clock = clock
    port = proxy.listeners.proxy_addresses[0][1]
    alice, bob, carol = await Client.open(port), await Client.open(port), await Client.open(port)
    try:
        assert (await alice.get("/page", "Cookie: u=A")).body == b"shared page"
        assert (await alice.get("/page", "Cookie: u=A")).header("X-Cache-Status") == "HIT"
        clock.advance(20)  # stale: bob's request revalidates it, and the origin's 304 adds Vary
        revalidated = await bob.get("/page", "Cookie: u=B")
        assert revalidated.status_line.split(" ")[1] == "200" and revalidated.body == b"shared page"
        assert revalidated.header("X-Cache-Status") == "EXPIRED"  # fetched anew, not REVALIDATED
        asked = [(s.headers.get("Cookie"), s.headers.get("If-None-Match")) for s in origin.seen]
        assert asked[-2:] == [("u=B", '"x"'), ("u=B", None)]  # the 304, then bob's full response
        for client, cookie in ((carol, "u=C"), (carol, "u=C"), (bob, "u=D")):
            reply = await client.get("/page", f"Cookie: {cookie}")
            assert reply.body == f"page for {cookie}".encode(), reply.fields
        assert (await carol.get("/page")).body == b"page for anonymous"
    finally:
        for client in (alice, bob, carol):
            client.close()
