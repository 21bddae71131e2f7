"""A request body's framing error that arrives after the body began (a malformed chunk-size
line, a trailer with too many fields, in a read after the head's) is answered at once, as the
same error in the head's own read is: 400 (431 for the trailer), the upstream request aborted
(the origin sees its connection closed, never held with half a body), the connection closed.

Before: the refusal was queued behind the running request, whose body reader was never told:
it waited ``client_body_timeout`` (60 s by default) for more body and answered 408, and the
upstream connection stayed open with half a body all that time (50 such uploads held 50
origin connections for a minute)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import port_of

CONFIG = "client_body_timeout: 30s\nclient_body_buffer: 1KB\nupstream: {retries: 0}\n"
HEAD = b"POST /sink HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
BIG = b"%x\r\n" % 100_000 + b"A" * 100_000 + b"\r\n"  # past client_body_buffer: forwarded at once


class Sink:
    """An origin route that reads a request body slowly to its end, and records whether its
    connection was closed under it (``broken``) or the whole body came (``whole``)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.broken = asyncio.Event()
        self.whole = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.started.set()
        try:
            while await request.content.read(4096):
                pass
        except Exception:
            self.broken.set()
            raise
        self.whole.set()
        return web.Response(text="stored")


async def exchange(port: int, first: bytes, late: bytes) -> bytes:
    """``first``, then ``late`` in a later read; the answer, read to the close (a connection
    kept open, or an answer that waits ``client_body_timeout``, times out here)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(late)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def late_error(make_proxy: MakeProxy, origin: Origin, first: bytes, late: bytes) -> tuple[bytes, Sink]:
    sink = Sink()
    origin.route("/sink", sink.handle)
    proxy = await make_proxy(config=CONFIG)
    answer = await asyncio.wait_for(exchange(port_of(proxy), first, late), 8)
    return answer, sink


async def test_a_malformed_chunk_size_after_the_body_began_is_a_400_at_once_and_aborts_the_upload(
        make_proxy: MakeProxy, origin: Origin) -> None:
    answer, sink = await late_error(make_proxy, origin, HEAD + BIG, b"zz\r\nAAAA\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.endswith(b"\r\n\r\n400 Bad Request: malformed request: invalid chunked body\n"), answer
    assert b"connection: close" in answer.lower(), answer[:300]
    assert sink.started.is_set()
    await asyncio.wait_for(sink.broken.wait(), 5)  # the origin's connection closed under it
    assert not sink.whole.is_set()


async def test_a_trailer_with_too_many_fields_after_the_body_began_is_a_431_at_once(
        make_proxy: MakeProxy, origin: Origin) -> None:
    trailer = b"0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(200)) + b"\r\n"
    answer, sink = await late_error(make_proxy, origin, HEAD + BIG, trailer)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert answer.endswith(b"431 Request Header Fields Too Large: too many header fields\n"), answer
    await asyncio.wait_for(sink.broken.wait(), 5)
    assert not sink.whole.is_set()


async def test_a_late_chunk_error_in_a_small_buffered_body_is_a_400_at_once(
        make_proxy: MakeProxy, origin: Origin) -> None:
    """Within client_body_buffer: nothing went upstream yet, and nothing goes."""
    answer, sink = await late_error(make_proxy, origin, HEAD + b"1\r\nA\r\n", b"zz\r\nAAAA\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert not sink.started.is_set() and not sink.whole.is_set()
