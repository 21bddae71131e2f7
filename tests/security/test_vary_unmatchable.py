"""A ``Vary`` no request can be matched on is never served across clients.

A real origin answers each client with a page for its cookie. A ``Vary`` member that is not
a field name (``"Cookie"``, ``Cookie;x=1``, ``Coo kie``), taken as written, named a field no
request carries, so every request matched the variant stored for the first client. Such a
``Vary`` is now refused as ``Vary: *`` is (``VARY-INVALID``).

Checked on connections kept alive, where the fast path answers hits from the stored records.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
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
