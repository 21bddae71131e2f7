"""A body framed by the connection's end (no Content-Length, not chunked) that ends with a
reset rather than a close was cut short: it is never stored, and its client sees the
connection aborted rather than a truncated body passed off as complete."""

from __future__ import annotations

import asyncio
import socket
import struct

import aiohttp
import pytest

from tests.conftest import MakeProxy
from tests.security.misbehaving import Conn, raw_origins


async def test_a_close_framed_body_cut_by_a_reset_is_never_stored(make_proxy: MakeProxy) -> None:
    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Type: text/plain\r\n\r\n"
                        + b"partial " * 1000)
        await asyncio.sleep(0.05)
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()  # RST, not FIN

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        with pytest.raises(aiohttp.ClientPayloadError):
            await proxy.get("/cut")
        with pytest.raises(aiohttp.ClientPayloadError):
            await proxy.get("/cut")  # not stored: fetched (and cut) again
        assert len(origin.requests) == 2
