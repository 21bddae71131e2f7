"""Transfer codings beside chunked: never relayed, never stored (RFC 9112 §6.1).

``Transfer-Encoding`` is hop-by-hop: cachegate drops it on the way to the client, so a body
with another coding inside the chunks (``gzip, chunked``) would reach clients, and the store,
as bytes no field explains, and chunked that is not the only coding (``chunked, gzip``,
chunked twice) is framing that parsers read differently. Such a response is a 502; so is a
transfer coding in an HTTP/1.0 response, whose framing RFC 9112 §6.1 says to treat as faulty.
A coding list without chunked frames the body by the connection's end: relayed and stored
as it came, the field dropped (as nginx does, and as the public cache tests require).
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
    "chunked-not-last": ("1.1", "chunked, gzip", PACKED, True),
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
async def test_chunked_beside_another_coding_or_in_http_1_0_is_a_502_and_never_stored(
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


# Codings without chunked: the body is framed by the connection's end.
BY_CLOSE = {"gzip-by-close": ("gzip", PACKED), "identity": ("identity", BODY),
            "unknown-token": ("x-store-value-1f3a", BODY)}


@pytest.mark.parametrize("case", list(BY_CLOSE))
async def test_a_coding_without_chunked_is_relayed_as_it_came_without_the_field_and_stored(
    make_proxy: MakeProxy, case: str
) -> None:
    coding, sent = BY_CLOSE[case]
    async with raw_origins() as start:
        origin = await start(coded_origin("1.1", coding, sent, True))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        first = await proxy.get("/coded")
        assert (first.status, first.body) == (200, sent)
        assert first.headers.get("Transfer-Encoding") in (None, "chunked")  # cachegate's own framing
        again = await proxy.get("/coded")
        assert (again.status, again.body, again.x_cache) == (200, sent, "HIT")
        assert again.headers.get("Transfer-Encoding") in (None, "chunked")
        assert len(origin.requests) == 1


@pytest.mark.parametrize("coding", ["chunked", "Chunked", " chunked "])
async def test_a_chunked_response_is_relayed_and_stored(make_proxy: MakeProxy, coding: str) -> None:
    async with raw_origins() as start:
        origin = await start(coded_origin("1.1", coding, chunked(BODY), False))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        first = await proxy.get("/coded")
        assert (first.status, first.body) == (200, BODY)
        again = await proxy.get("/coded")
        assert (again.body, again.x_cache) == (BODY, "HIT")
