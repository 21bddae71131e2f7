"""Interim (1xx) responses from the origin reach the client in order, before the final one.

RFC 9110 §15.2: a proxy forwards 1xx responses (100 Continue, 102 Processing, 103 Early
Hints), except to an HTTP/1.0 client; they are never stored, and their fields belong to
them alone: the final response and the stored one never carry a 103's ``Link``.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.misbehaving import Conn, flight_with, raw_origins

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"


async def early_hints_page(request: web.Request) -> web.Response:
    await request.writer.write(EARLY_HINTS)  # what aiohttp's own 100-continue handler does
    request.writer.output_size = 0
    await asyncio.sleep(0.05)
    return web.Response(text="<html>page</html>", headers={"Cache-Control": "max-age=60",
                                                           "Content-Type": "text/html"})


async def open_exchange(proxy: Proxy, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


async def read_heads(reader: asyncio.StreamReader, until: bytes) -> list[bytes]:
    """Response heads as they arrive, up to (and with) the first whose status line starts ``until``."""
    heads = []
    while True:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        heads.append(head)
        if head.startswith(until):
            return heads


def field(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


async def test_a_103_reaches_the_client_before_the_200_and_is_neither_stored_nor_merged(
        origin: Origin, proxy: Proxy) -> None:
    origin.route("/page", early_hints_page)
    reader, writer = await open_exchange(proxy, b"GET /page HTTP/1.1\r\nHost: site.example\r\n\r\n")
    try:
        heads = await read_heads(reader, b"HTTP/1.1 200")
    finally:
        writer.close()
    assert [h.split(b"\r\n", 1)[0] for h in heads] == [b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 200 OK"]
    assert field(heads[0], b"Link") == b"</style.css>; rel=preload; as=style"
    assert field(heads[1], b"Link") is None  # the 103's fields are its own
    assert field(heads[1], b"X-Cache-Status") == b"MISS"
    # Stored without the 103, and a hit has no interim response to give.
    hit = await proxy.get("/page", headers={"Host": "site.example"})
    assert (hit.x_cache, "Link" in hit.headers) == ("HIT", False)
    reader, writer = await open_exchange(proxy, b"GET /page HTTP/1.1\r\nHost: site.example\r\n\r\n")
    try:
        (head,) = await read_heads(reader, b"HTTP/1.1")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200") and field(head, b"X-Cache-Status") == b"HIT"


async def test_100_continue_102_and_103_are_relayed_in_order_for_a_request_body(
        origin: Origin, proxy: Proxy) -> None:
    """The client waits for 100 Continue before it sends its body (it never gives up here):
    the origin's 100 must come through, or the exchange hangs."""
    async def upload(request: web.Request) -> web.Response:
        body = await request.read()  # the 100 Continue went out before the handler ran
        await request.writer.write(PROCESSING)
        await request.writer.write(EARLY_HINTS)
        request.writer.output_size = 0
        return web.Response(text=f"got {len(body)} bytes")

    origin.route("/upload", upload)
    reader, writer = await open_exchange(proxy, (
        b"POST /upload HTTP/1.1\r\nHost: site.example\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"))
    try:
        (first,) = await read_heads(reader, b"HTTP/1.1 100")
        writer.write(b"hello")
        await writer.drain()
        heads = await read_heads(reader, b"HTTP/1.1 200")
        body = await reader.readexactly(int(field(heads[-1], b"Content-Length") or 0))
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 100 Continue")
    assert [h.split(b" ", 2)[1] for h in heads] == [b"102", b"103", b"200"]
    assert body == b"got 5 bytes"
    assert field(heads[-1], b"Link") is None


async def test_an_http_1_0_requests_100_continue_is_not_forwarded(origin: Origin, proxy: Proxy) -> None:
    """RFC 9110 §10.1.1: a server ignores a 100-continue expectation in an HTTP/1.0 request, and
    HTTP/1.0 has no Expect field. cachegate forwards over HTTP/1.1, where the origin acts on it:
    the field does not go on. An HTTP/1.1 client's does."""
    seen: list[str | None] = []

    async def upload(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Expect"))
        body = await request.read()
        return web.Response(text=f"got {len(body)} bytes", headers={"Cache-Control": "no-store"})

    origin.route("/upload", upload)
    reader, writer = await open_exchange(proxy, (
        b"POST /upload HTTP/1.0\r\nHost: site.example\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\nhello"))
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert data.split(b"\r\n", 1)[0].endswith(b" 200 OK") and data.endswith(b"got 5 bytes"), data
    assert b" 100 Continue" not in data
    reader, writer = await open_exchange(proxy, (
        b"POST /upload HTTP/1.1\r\nHost: site.example\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"))
    try:
        await read_heads(reader, b"HTTP/1.1 100")
        writer.write(b"hello")
        await writer.drain()
        heads = await read_heads(reader, b"HTTP/1.1 200")
        body = await reader.readexactly(int(field(heads[-1], b"Content-Length") or 0))
    finally:
        writer.close()
    assert body == b"got 5 bytes"
    assert seen == [None, "100-continue"]


async def test_an_http_1_0_client_gets_no_interim_response(origin: Origin, proxy: Proxy) -> None:
    origin.route("/page", early_hints_page)
    reader, writer = await open_exchange(proxy, b"GET /page HTTP/1.0\r\nHost: site.example\r\n\r\n")
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.0 200 OK") or data.startswith(b"HTTP/1.1 200 OK"), data[:80]
    assert b"103" not in data.split(b"\r\n", 1)[0] and b"Early Hints" not in data


LEAK_BODY = bytes(i % 251 for i in range(1 << 20))
LEAK_HEAD = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: %d\r\n\r\n" % len(LEAK_BODY)


async def _raw_get(url: str, delay: float) -> bytes:
    await asyncio.sleep(delay)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /slow HTTP/1.1\r\nHost: site.example\r\n\r\n")
    data = b""
    with contextlib.suppress(TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 3.0):
            data += chunk
    writer.close()
    return data


async def test_a_client_that_gave_up_on_a_flight_is_not_sent_its_late_1xx(make_proxy: MakeProxy) -> None:
    # B joins A's flight, gives up after lock_timeout and fetches for itself; A's origin then
    # sends a 103, which must not be written into B's response (its body would be desynced).
    async def serve(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:  # A's flight: slow, a late 103
            await asyncio.sleep(1.5)
            await conn.send(EARLY_HINTS)
            await asyncio.sleep(0.5)
            await conn.send(LEAK_HEAD + LEAK_BODY)
        else:  # B's own fetch: head and half the body at once, the rest after A's 103
            await conn.send(LEAK_HEAD + LEAK_BODY[:len(LEAK_BODY) // 2])
            await asyncio.sleep(1.5)
            await conn.send(LEAK_BODY[len(LEAK_BODY) // 2:])
        await asyncio.sleep(5)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="cache: {memory: 64MB, lock_timeout: 0.5s}\n", upstreams=[origin.url])
        _, b = await asyncio.gather(_raw_get(proxy.url, 0.0), _raw_get(proxy.url, 0.1))
        _, _, body = b.partition(b"\r\n\r\n")
        assert body == LEAK_BODY


async def test_a_1xx_is_relayed_without_framing_fields(origin: Origin, proxy: Proxy) -> None:
    # RFC 9110 §8.6: a 1xx has no content; a Content-Length on one could make a lenient client
    # read the next bytes as its body.
    async def page(request: web.Request) -> web.Response:
        await request.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                                   b"Content-Length: 5\r\n\r\n")
        request.writer.output_size = 0
        return web.Response(text="page", headers={"Cache-Control": "max-age=60"})

    origin.route("/framed", page)
    reader, writer = await open_exchange(proxy, b"GET /framed HTTP/1.1\r\nHost: site.example\r\n\r\n")
    heads = await read_heads(reader, b"HTTP/1.1 200")
    writer.close()
    early = heads[0]
    assert early.startswith(b"HTTP/1.1 103") and field(early, b"Link") == b"</a.css>; rel=preload"
    assert field(early, b"Content-Length") is None and field(early, b"Transfer-Encoding") is None


async def test_an_origin_sending_interims_without_end_gets_a_502_after_16(make_proxy: MakeProxy) -> None:
    # Each 1xx restarted the read timeout, and each was relayed: an origin sending them without
    # end held the exchange forever and filled the memory of a proxy whose client did not read.
    async def serve(conn: Conn) -> None:
        while True:  # (a kept-alive connection's next request is served: /endless may come on it)
            request = await conn.request()
            count = 16 if request.target == "/sixteen" else 1000
            for _ in range(count):
                await conn.send(EARLY_HINTS)
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: no-store\r\n\r\nok")

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(upstreams=[origin.url])
        for target, status, interims in ((b"/sixteen", b"200", 16), (b"/endless", b"502", 16)):
            reader, writer = await open_exchange(proxy, b"GET %s HTTP/1.1\r\nHost: site.example\r\n\r\n" % target)
            try:
                heads = await read_heads(reader, b"HTTP/1.1 " + status)
            finally:
                writer.close()
            assert len(heads) == interims + 1
            assert all(h.startswith(b"HTTP/1.1 103") for h in heads[:-1])


async def test_clients_coalesced_on_a_fetch_get_only_the_link_fields_of_its_103(
        origin: Origin, proxy: Proxy) -> None:
    # A 103's fields were sent for the request that went upstream: its Set-Cookie (a session
    # made for that client) must not reach the other clients waiting for the same fetch.
    go = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        await go.wait()  # once the followers have joined the flight
        await request.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                                   b"Set-Cookie: session=LEADERS-SECRET\r\n\r\n")
        await request.writer.write(b"HTTP/1.1 102 Processing\r\nX-Step: 1\r\n\r\n")
        request.writer.output_size = 0
        await asyncio.sleep(0.05)
        return web.Response(text="page", headers={"Cache-Control": "max-age=60"})

    origin.route("/page", page)
    exchanges = []
    for who in (b"alice", b"bob", b"carol"):
        exchanges.append(await open_exchange(
            proxy, b"GET /page HTTP/1.1\r\nHost: site.example\r\nCookie: user=%s\r\n\r\n" % who))
        if who == b"alice":
            await flight_with(proxy, 0)
    await flight_with(proxy, 2)
    go.set()
    try:
        leader, *followers = [await read_heads(reader, b"HTTP/1.1 200") for reader, _ in exchanges]
    finally:
        for _, writer in exchanges:
            writer.close()
    assert origin.count("/page") == 1
    assert [h.split(b" ", 2)[1] for h in leader] == [b"103", b"102", b"200"]
    assert field(leader[0], b"Set-Cookie") == b"session=LEADERS-SECRET"
    for heads in followers:  # the 103's Link only; a 1xx with no Link field not at all
        assert [h.split(b" ", 2)[1] for h in heads] == [b"103", b"200"]
        assert field(heads[0], b"Link") == b"</a.css>; rel=preload"
        assert field(heads[0], b"Set-Cookie") is None and b"SECRET" not in b"".join(heads)


class _Transport:
    """A client transport whose write buffer holds ``buffered`` bytes (a client not reading)."""

    def __init__(self, buffered: int) -> None:
        self.buffered = buffered
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffered += len(data)


def _request_on(transport: _Transport) -> web.BaseRequest:
    from types import SimpleNamespace

    from aiohttp.test_utils import make_mocked_request
    return make_mocked_request("GET", "/page", transport=transport,
                               writer=SimpleNamespace(output_size=0, transport=transport))


def test_interims_are_dropped_while_the_client_does_not_read() -> None:
    from proxy.web.proxy_handler import interim_sender

    for buffered, relayed in ((0, 1), (1 << 20, 0)):
        transport = _Transport(buffered)
        send = interim_sender(_request_on(transport))
        assert send is not None
        send(103, "Early Hints", (("Link", "</a.css>; rel=preload"),))
        assert len(transport.written) == relayed
    # A client that stops reading gets interims up to a mark (64 KB), and no more.
    transport = _Transport(0)
    send = interim_sender(_request_on(transport))
    assert send is not None
    for _ in range(10_000):
        send(103, "Early Hints", (("Link", "<" + "a" * 1000 + ">"),))
    assert 32 * 1024 < transport.buffered <= 64 * 1024 + 1100
