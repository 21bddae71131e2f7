"""The one reply-head writer (proxy.web.heads) frames replies as aiohttp's own responses did
before it took them over (``web.Response`` for a body at hand, ``StreamResponse`` with a
length or streamed), byte for byte apart from Date and aiohttp's default Content-Type (``application/octet-stream``
for a body without one, which this writer never adds: a relayed response keeps the origin's
type or its lack of one, RFC 9110 §8.3): tests/test_fastpath.py compares the fast path with
the general path, which now share this writer, so this table is what guards the framing itself
(Content-Length, chunked, Connection).

Both kinds of reply are served by one aiohttp server on loopback and read as raw bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict

from proxy.web.heads import ReplyResponse, frame, plain_reply, serialise
from tests.harness import Origin, Proxy

# (status, body, how): "whole" a body at hand, "length" streamed with its length said,
# "stream" streamed with no length.
REPLIES = [
    (200, b"hello", "whole"), (200, b"", "whole"), (404, b"nope", "whole"), (204, b"", "whole"),
    (304, b"", "whole"), (200, b"hello", "length"), (200, b"", "length"), (200, b"hello", "stream"),
    (204, b"", "stream"), (304, b"", "stream"), (500, b"x", "stream"),
]
REQUESTS = [  # (method, version, Connection field of the request)
    ("GET", "1.1", None), ("GET", "1.1", "close"), ("HEAD", "1.1", None), ("GET", "1.0", None),
    ("GET", "1.0", "keep-alive"), ("HEAD", "1.0", "keep-alive"),
]


def fields() -> CIMultiDict[str]:
    return CIMultiDict([("X-Cache-Status", "HIT"), ("Server", "cachegate")])


async def handler(request: web.BaseRequest) -> web.StreamResponse:
    status, body, how, ours = (request.query["status"], request.query["body"].encode(), request.query["how"],
                               request.query["ours"] == "1")
    code = int(status)
    if how == "whole":
        if ours:
            return plain_reply(code, None, fields(), body, request.method)
        return web.Response(status=code, body=body, headers=fields())
    length = len(body) if how == "length" and code not in (204, 304) else None
    resp: web.StreamResponse
    if ours:
        resp = ReplyResponse(code, None, fields(), length)
    else:
        resp = web.StreamResponse(status=code, headers=fields())
        if length is not None:
            resp.content_length = length
    await resp.prepare(request)
    if body and request.method != "HEAD" and code not in (204, 304):
        await resp.write(body)
    await resp.write_eof()
    return resp


@pytest.fixture
async def server() -> AsyncIterator[int]:
    srv = web.Server(handler)
    runner = web.ServerRunner(srv)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port
    await runner.cleanup()


async def raw_exchange(port: int, request: bytes, wait: float = 0.15) -> tuple[bytes, bool]:
    """The bytes of one reply (up to the server's close or a pause of ``wait`` seconds), and
    whether the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        data = b""
        closed = False
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            data += chunk
        return data, closed
    finally:
        writer.close()


def masked(data: bytes) -> bytes:
    """The reply with its Date masked and without aiohttp's default Content-Type."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = [b"Date: *" if line.lower().startswith(b"date:") else line for line in head.split(b"\r\n")
             if line != b"Content-Type: application/octet-stream"]
    return b"\r\n".join(lines) + sep + body


@pytest.mark.parametrize(("status", "body", "how"), REPLIES)
async def test_replies_are_framed_as_aiohttp_framed_them(server: int, status: int, body: bytes,
                                                         how: str) -> None:
    def request(method: str, version: str, connection: str | None, ours: str) -> bytes:
        target = f"/?status={status}&body={body.decode()}&how={how}"
        lines = [f"{method} {target}&ours={ours} HTTP/{version}", "Host: t"]
        if connection:
            lines.append(f"Connection: {connection}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    # Every exchange on a connection of its own, all at once: each ends with a pause of its
    # own (raw_exchange's wait), which one after the other cost a second a case.
    replies = await asyncio.gather(*(raw_exchange(server, request(*r, ours)) for r in REQUESTS for ours in "10"))
    for i, (method, version, connection) in enumerate(REQUESTS):
        (ours, ours_closed), (theirs, theirs_closed) = replies[2 * i], replies[2 * i + 1]
        assert ours, (method, version, connection)
        assert b"content-type" not in ours.partition(b"\r\n\r\n")[0].lower()
        assert masked(ours) == masked(theirs), (method, version, connection)
        if version == "1.0" and how == "stream" and method == "GET" and status not in (204, 304):
            # A body of unknown length to HTTP/1.0 ends with the connection: aiohttp said so
            # (no keep-alive field) but kept the connection open, and the client waited for
            # its idle timeout (test_an_http_1_0_client_of_a_streamed_reply_is_not_left_hanging).
            assert ours_closed, (method, version, connection)
        else:
            assert ours_closed == theirs_closed, (method, version, connection)


async def test_an_http_1_0_client_of_a_streamed_reply_is_not_left_hanging(origin: Origin,
                                                                           proxy: Proxy) -> None:
    """An origin's reply without a length (chunked), to an HTTP/1.0 client that asked for
    keep-alive: the body can only end with the connection, so the proxy closes it."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "no-store"})
        await resp.prepare(request)
        await resp.write(b"streamed")
        await resp.write_eof()
        return resp

    origin.route("/chunked", chunked)
    port = int(proxy.url.rsplit(":", 1)[1])
    data, closed = await raw_exchange(port, b"GET /chunked HTTP/1.0\r\nHost: example.test\r\n"
                                      b"Connection: keep-alive\r\n\r\n", wait=2.0)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and body == b"streamed"
    assert b"content-length" not in head.lower() and b"keep-alive" not in head.lower()
    assert closed


def test_frame_says_what_delimits_the_body() -> None:
    h: CIMultiDict[str] = CIMultiDict()
    framing = frame(h, 200, "GET", (1, 1), None, True, "D")
    assert framing.chunked and framing.keep_alive and h["Transfer-Encoding"] == "chunked"
    h = CIMultiDict()
    framing = frame(h, 200, "GET", (1, 0), None, True, "D")
    assert not framing.chunked and not framing.keep_alive  # HTTP/1.0: the close ends the body
    h = CIMultiDict()
    framing = frame(h, 304, "GET", (1, 1), 10, True, "D")
    assert "Content-Length" not in h and "Content-Type" not in h and framing.keep_alive
    assert serialise((1, 1), 200, "OK", CIMultiDict([("A", "b")])) == b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"


@pytest.mark.parametrize(("reason", "value"), [
    ("OK", "caf\xe9"),  # UTF-8 (é as it came in two bytes): aiohttp's own bytes
    ("Fine", "a\tb \U0001f600"),
    ("Fine \udce9t\udce9", "caf\udce9"),  # obs-text as the parser decodes it (surrogateescape)
    ("OK", "\udcff\udc80"),
])
def test_a_head_that_is_not_ascii_keeps_every_octet_as_the_upstream_parser_read_it(reason: str, value: str) -> None:
    """RFC 9110 §5.5: obs-text is opaque data. aiohttp's serialiser leaves a lone surrogate out
    (``caf\\xe9`` became ``caf``): ``serialise`` writes each byte as it came, and any other head
    as aiohttp does."""
    head = serialise((1, 1), 200, reason, CIMultiDict({"X-Value": value, "X-Plain": "a"}))
    expected = f"HTTP/1.1 200 {reason}\r\nX-Value: {value}\r\nX-Plain: a\r\n\r\n".encode("utf-8", "surrogateescape")
    assert head == expected
    if not any("\udc80" <= c <= "\udcff" for c in reason + value):
        assert head == _serialize_headers(f"HTTP/1.1 200 {reason}", CIMultiDict({"X-Value": value, "X-Plain": "a"}))


@pytest.mark.parametrize("value", ["caf\udce9\r\nX-Injected: 1", "caf\udce9\x00", "caf\udce9\x7f", "\x01caf\udce9"])
def test_a_head_that_is_not_ascii_refuses_what_aiohttp_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        serialise((1, 1), 200, "OK", CIMultiDict({"X-Value": value}))
    with pytest.raises(ValueError):
        _serialize_headers("HTTP/1.1 200 OK", CIMultiDict({"X-Value": value.replace("\udce9", "")}))
