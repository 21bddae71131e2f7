"""Transfer codings other than chunked: never relayed, never stored (RFC 9112 §6.1).

``Transfer-Encoding`` is hop-by-hop: cachegate drops it on the way to the client, so a body
still in another transfer coding (``gzip, chunked``: gzip inside the chunks; ``gzip`` alone or
``chunked, gzip``: gzip, framed by the connection's end) would reach clients, and the store,
as bytes no field explains. cachegate decodes only chunked, so such a response is a 502; so
is a transfer coding in an HTTP/1.0 response, whose framing RFC 9112 §6.1 says to treat as
faulty.
"""

from __future__ import annotations

import gzip

import pytest

from tests.conftest import MakeProxy
from tests.security.misbehaving import Conn, Serve, raw_origins

BODY = b"hello, coded world " * 20
PACKED = gzip.compress(BODY)


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


# (status line version, Transfer-Encoding, body as sent, whether the origin then closes)
CODED = {
    "gzip-then-chunked": ("1.1", "gzip, chunked", chunked(PACKED), False),
    "gzip-by-close": ("1.1", "gzip", PACKED, True),
    "chunked-not-last": ("1.1", "chunked, gzip", PACKED, True),
    "identity": ("1.1", "identity", BODY, True),
    "chunked-twice": ("1.1", "chunked, chunked", chunked(chunked(BODY)), False),
    "http-1.0-chunked": ("1.0", "chunked", chunked(BODY), True),
}


def coded_origin(version: str, coding: str, sent: bytes, close: bool) -> Serve:
    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(f"HTTP/{version} 200 OK\r\nCache-Control: max-age=600\r\n"
                            f"Content-Type: text/plain\r\nTransfer-Encoding: {coding}\r\n\r\n".encode() + sent)
            if close:
                return

    return serve


@pytest.mark.parametrize("case", list(CODED))
async def test_a_response_in_a_transfer_coding_other_than_chunked_is_a_502_and_never_stored(
    make_proxy: MakeProxy, case: str
) -> None:
    async with raw_origins() as start:
        origin = await start(coded_origin(*CODED[case]))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        for _ in range(2):
            reply = await proxy.get("/coded")
            assert reply.status == 502, (reply.status, reply.body[:60])
            assert b"Transfer-Encoding" in reply.body
        assert len(origin.requests) == 2  # nothing stored: each request went to the origin


@pytest.mark.parametrize("coding", ["chunked", "Chunked", " chunked "])
async def test_a_chunked_response_is_relayed_and_stored(make_proxy: MakeProxy, coding: str) -> None:
    async with raw_origins() as start:
        origin = await start(coded_origin("1.1", coding, chunked(BODY), False))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        first = await proxy.get("/coded")
        assert (first.status, first.body) == (200, BODY)
        again = await proxy.get("/coded")
        assert (again.body, again.x_cache) == (BODY, "HIT")
