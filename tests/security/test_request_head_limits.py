"""What a request head may be, checked against the bytes as they arrive, on both paths (the fast
hit path, and a listener without it), over raw sockets.

- A host that yarl cannot decode (an IDNA label such as ``xn--``: the reg-name grammar admits
  it) is 400 and the connection closes, in an absolute-form target as in the Host field. Such a
  target used to make aiohttp's request factory raise where nothing caught it: no answer,
  nothing logged, the connection left open for good (client_header_timeout and keep-alive no
  longer applied) and the requests pipelined behind it never answered.
- ``max_request_head`` bounds the raw bytes of one head as they arrive, as nginx's header
  buffers do: a head that passes it is refused with 431 before it is whole (it used to be
  buffered up to the parser's own limits, about 1 MB a connection, and checked only once
  whole), whitespace the parser strips included (a head padded with it used to be answered);
  heads pipelined in one read are counted one by one, and a body is not head bytes.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.test_fastpath import Pair, pair, req

CAP = 8 * 1024
CONFIG = f"max_request_head: {CAP}\n"
HOST = "example.test"


async def stored(origin: Origin, make_proxy: MakeProxy, config: str = "") -> Pair:
    """Both listeners, with /p stored (so that the fast path would answer it)."""
    origin.route("/p", body=b"page", headers={"Cache-Control": "max-age=300"})
    p = await pair(make_proxy, config=config) if config else await pair(make_proxy)
    got = await until_close(p.fast_port, req("GET", "/p", "Connection: close"))
    assert got.startswith(b"HTTP/1.1 200 "), got
    assert origin.count("/p") == 1
    return p


async def until_close(port: int, *pieces: bytes, pause: float = 0.0) -> bytes:
    """Send ``pieces`` on a new connection, then read every byte the server sends up to its close
    (the test fails if it does not close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def statuses(data: bytes) -> list[bytes]:
    """The statuses of the answers in ``data``, without the version their lines say (bodies here
    never hold a status line)."""
    return re.findall(rb"HTTP/1\.[01] ([0-9]{3} [^\r]*)", data)


def padded(size: int, path: str = "/p", *extra: str) -> bytes:
    """A GET of exactly ``size`` bytes of head (with the fields ``extra``), padded with whitespace
    the parser strips (each line under its 8,190-byte limit)."""
    fields = list(extra)
    while (short := size - len(req("GET", path, *fields, host=HOST))) > 0:
        name = f"X-Pad-{len(fields)}:"
        fields.append(name + " " * max(0, min(short, 4000) - len(name) - 3) + "a")
    out = req("GET", path, *fields, host=HOST)
    assert len(out) == size, (len(out), size)
    return out


BAD_TARGETS = {
    "xn--": req("GET", "http://xn--/p"),
    "xn--a": req("GET", "http://xn--a/p"),
    "a.xn--": req("GET", "http://a.xn--/p"),
    "xn--zz-": req("GET", "http://xn--zz-/p"),
    "Host: xn--": req("GET", "/p", host="xn--"),
    "Host: a.xn--:80": req("GET", "/p", host="a.xn--:80"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
async def test_a_host_that_does_not_decode_is_400_and_the_connection_closes(
        origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    p = await stored(origin, make_proxy)
    for port in (p.fast_port, p.general_port):
        # a stored page's request pipelined behind it: never answered (the connection closes)
        got = await until_close(port, BAD_TARGETS[case] + req("GET", "/p"))
        assert statuses(got) == [b"400 Bad Request"], (port, got)
    assert origin.count("/p") == 1  # nothing forwarded


async def test_an_unfinished_head_over_the_cap_is_refused_with_431_before_it_ends(
        origin: Origin, make_proxy: MakeProxy) -> None:
    p = await stored(origin, make_proxy, CONFIG)
    line = f"X-Filler: {'a' * 1000}\r\n".encode()
    for port in (p.fast_port, p.general_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(req("GET", "/p", host=HOST)[:-2])  # the request line and Host, no end
            for _ in range(CAP // len(line) + 1):
                writer.write(line)
                await writer.drain()
                await asyncio.sleep(0.01)
            # The head is still open (never ended): it is answered, and the connection closed.
            got = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert statuses(got) == [b"431 Request Header Fields Too Large"], (port, got)
        assert f"over the {CAP} this proxy accepts".encode() in got
    assert origin.count("/p") == 1


async def test_every_byte_of_the_head_counts_whitespace_too(origin: Origin, make_proxy: MakeProxy) -> None:
    p = await stored(origin, make_proxy, CONFIG)
    for port in (p.fast_port, p.general_port):
        # exactly the cap (then a request that closes the connection)
        got = await until_close(port, padded(CAP) + req("GET", "/p", "Connection: close", host=HOST))
        assert statuses(got) == [b"200 OK"] * 2, (port, got)
        for path in ("/p", "/other"):  # one byte over: stored (the fast path's), and not
            got = await until_close(port, padded(CAP + 1, path))
            assert statuses(got) == [b"431 Request Header Fields Too Large"], (port, path, got)
            assert got.startswith(b"HTTP/1.1 431 "), got[:40]  # (not aiohttp's placeholder's 1.0)
        one_zero = padded(CAP + 1).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        assert (await until_close(port, one_zero)).startswith(b"HTTP/1.0 431 ")
    # Ten times the cap, which the parser takes (every line under its limit).
    got = await until_close(p.fast_port, padded(10 * CAP))
    assert statuses(got) == [b"431 Request Header Fields Too Large"], got
    assert origin.count("/p") == 1 and origin.count("/other") == 0


async def test_heads_are_counted_one_by_one_and_bodies_not_at_all(
        origin: Origin, make_proxy: MakeProxy) -> None:
    async def upload(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    origin.route("/upload", upload)
    p = await stored(origin, make_proxy, CONFIG)
    small = padded(CAP // 4)
    body = b"b" * (4 * CAP)
    post = req("POST", "/upload", f"Content-Length: {len(body)}", host=HOST) + body
    fast_answered = p.fast.answered
    for port in (p.fast_port, p.general_port):
        # Eight heads of a quarter of the cap in one write (twice the cap in all), an upload of
        # four times the cap, two heads of just under the cap: all answered. Then a head that
        # passes the cap, never ended: 431 once it does, and the connection closes.
        batch = small * 8 + post + padded(CAP) * 2
        more = [f"X-More-{i}: {'m' * 1000}\r\n".encode() for i in range(CAP // 1000 + 1)]
        got = await until_close(port, batch, req("GET", "/p", host=HOST)[:-2], *more, pause=0.02)
        assert statuses(got) == [b"200 OK"] * 11 + [
            b"431 Request Header Fields Too Large"], (port, got[-400:])
        assert str(len(body)).encode() in got
        if port == p.fast_port:
            assert p.fast.answered > fast_answered  # (hits among them answered on the fast path)
        # A head whose CRLF CRLF is split between two reads, then more than the cap of heads
        # pipelined in the second: the first head ends there, each is counted on its own.
        first = padded(CAP - 100)
        got = await until_close(port, first[:-1], first[-1:] + padded(CAP // 2) * 2
                                + req("GET", "/p", "Connection: close", host=HOST), pause=0.05)
        assert statuses(got) == [b"200 OK"] * 4, (port, got[-400:])
