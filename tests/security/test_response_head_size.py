"""An upstream response head is at most 64 KB (as Varnish's http_resp_size, nginx's
proxy_buffer_size): a longer one is a 502, whether it ends or never does, and never stored.

Each field line was limited (16 KB) and their number (256), not their total: a 4 MB head was
read, stored and sent again on every hit.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import MakeProxy
from tests.security.misbehaving import Conn, raw_origins

FIELD = b"X-Pad-%d: " + b"p" * 8000 + b"\r\n"  # each line within the per-line limits


def head_of(lines: int) -> bytes:
    pads = b"".join(FIELD % i for i in range(lines))
    return b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 2\r\n" + pads + b"\r\nok"


async def serve(conn: Conn) -> None:
    while True:
        request = await conn.request()
        if request.target == "/endless":  # a head that never ends: no waiting for the read timeout
            await conn.send(head_of(16)[:-4])
            await asyncio.sleep(30)
            return
        await conn.send(head_of(7 if request.target == "/fits" else 16))


async def test_a_head_over_64_kb_is_a_502_and_one_under_is_served(
        make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0, timeouts: {read: 20s}}\n", upstreams=[origin.url])
        fits = await proxy.get("/fits")  # 56 KB of fields
        assert (fits.status, fits.body) == (200, b"ok")
        with caplog.at_level(logging.WARNING):
            for target in ("/big", "/big", "/endless"):  # 128 KB
                reply = await asyncio.wait_for(proxy.get(target), 10)
                assert reply.status == 502, (target, reply.status, reply.body[:200])
                assert b"response head too long" in reply.body
        assert "response head longer than 64 KB" in caplog.text
        assert [t for _, _, t in origin.targets()].count("/big") == 2  # never stored


async def test_interim_heads_count_in_the_64_kb_however_the_bytes_arrive(make_proxy: MakeProxy) -> None:
    """Three 28 KB 103 Early Hints then a small 200: 84 KB of heads. Sent in one write it was
    relayed, in pieces a 502: the interims were counted only while no final head had parsed."""
    hint = (b"HTTP/1.1 103 Early Hints\r\n"
            + b"".join(b"Link: <" + b"h" * 7000 + b">; rel=preload\r\n" for _ in range(4)) + b"\r\n")
    final = b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 2\r\n\r\nok"

    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if request.target == "/pieces":
                for part in (hint, hint, hint, final):
                    await conn.send(part)
                    await asyncio.sleep(0.05)
            else:
                await conn.send(hint * 3 + final)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        for target in ("/whole", "/pieces"):
            reply = await asyncio.wait_for(proxy.get(target), 10)
            assert reply.status == 502, (target, reply.status, reply.body[:200])
