"""A client that stalls mid-upload does not hold an upstream connection for as long as it likes.

A request body goes upstream as it arrives, on a pooled connection, and the upstream's read
timeout is put off while the body is still being sent (the upstream is not the silent one).
Without a limit on the client's silence, a POST announcing a big body and then sending nothing
held its connection forever, and pool_size of them made every other client's miss a 504.
``client_body_timeout`` bounds the silence between two reads of the body: then the client gets
a 400 and its connection is closed, the upstream connection is dropped (never reused half-sent),
and nothing is counted against the upstream.
"""

from __future__ import annotations

import asyncio

from tests.conftest import MakeProxy
from tests.harness import Proxy
from tests.security.misbehaving import Conn, raw_origins, response

ANNOUNCED = 100_000


async def stalled_upload(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST that announces ANNOUNCED body bytes, sends one, and then nothing."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {ANNOUNCED}\r\n\r\nx"
                 .encode())
    await writer.drain()
    return reader, writer


async def test_stalled_uploads_are_cut_off_and_free_the_pool_for_other_clients(make_proxy: MakeProxy) -> None:
    heads: list[int] = []  # the upstream connections that got a POST head
    ended: list[int] = []  # those cachegate dropped while the body was being sent on them
    ok = response("200 OK", {"Cache-Control": "no-store"}, b"fine")

    async def serve(conn: Conn) -> None:
        while True:
            head = await conn.reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                heads.append(conn.index)
                try:
                    await conn.reader.readexactly(ANNOUNCED)
                except asyncio.IncompleteReadError:
                    ended.append(conn.index)
                    return
            await conn.send(ok)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {pool_size: 2, retries: 0}\nclient_body_timeout: 1s\n",
                                 upstreams=[origin.url])
        uploads = [await stalled_upload(proxy) for _ in range(2)]
        for _ in range(500):  # both bodies are going upstream: the pool is taken
            if len(heads) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(heads) == 2
        try:
            for reader, _ in uploads:
                # A 400 to a client that still listens, then the connection closed (once aiohttp's
                # lingering read of the rest of the body, at most 10 s, is over). Without the
                # limit no answer ever comes: the bound is only there so the test ends.
                answer = await asyncio.wait_for(reader.read(), 60)
                assert answer.startswith(b"HTTP/1.1 400 "), answer
                assert b"the request body broke off" in answer
        finally:
            for _, writer in uploads:
                writer.close()
        for _ in range(500):  # the upstream connections the bodies were going to were dropped
            if len(ended) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(ended) == sorted(heads)
        # Another client's miss gets an upstream connection.
        after = await proxy.get("/miss", headers={"Host": "shop.example"})
        assert (after.status, after.body) == (200, b"fine")
        for u in proxy.runtime.pool.upstreams:
            assert (u.passive_failures, u.failures) == (0, 0)
