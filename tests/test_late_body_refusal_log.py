"""A request body the parser refuses after it began is answered 400/431 and closes its
connection with no ERROR and no traceback in the log (the refusal is a DEBUG line, as an
upload that breaks off is). Before, aiohttp's lingering close read the refused body after the
answer, met the refusal and logged "Unhandled exception" at ERROR with a traceback: one per
request, which any client could send to flood the log and fire alerts."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import port_of
from tests.test_late_body_errors import BIG, CONFIG, HEAD, exchange

TRAILER = b"0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(200)) + b"\r\n"
CASES = [
    ("buffered bad chunk", HEAD + b"1\r\nA\r\n", b"zz\r\nAAAA\r\n0\r\n\r\n", b"400"),
    ("streamed bad chunk", HEAD + BIG, b"zz\r\nAAAA\r\n0\r\n\r\n", b"400"),
    ("chunk without CRLF", HEAD + BIG, b"4\r\nAAAAXX0\r\n\r\n", b"400"),
    ("buffered trailer", HEAD + b"1\r\nA\r\n", TRAILER, b"431"),
    ("streamed trailer", HEAD + BIG, TRAILER, b"431"),
    ("bad chunk then a pipelined GET", HEAD + b"1\r\nA\r\n",
     b"zz\r\n\r\nGET /small HTTP/1.1\r\nHost: shop.example\r\n\r\n", b"400"),
]


async def sink(request: web.Request) -> web.Response:
    """Reads the body to its end; a connection cut under it is the expected end, not logged."""
    try:
        while await request.content.read(4096):
            pass
    except ConnectionError:
        return web.Response(status=499)
    return web.Response(text="stored")


def problems(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [(r.name, r.levelname, r.getMessage()) for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info]


async def test_late_refusals_log_no_error_and_no_traceback(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    origin.route("/sink", sink)
    proxy = await make_proxy(config=CONFIG)
    with caplog.at_level(logging.DEBUG):
        for name, first, late, status in CASES:
            answer = await asyncio.wait_for(exchange(port_of(proxy), first, late), 8)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), (name, answer[:200])
        await asyncio.sleep(0.3)  # (aiohttp's loop ends each connection after its answer)
    assert not problems(caplog)


async def test_a_late_refusal_of_a_body_its_handler_left_unread_logs_no_error(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    """The answer went out before the body ended (aiohttp then lingers, reading the rest): the
    refusal that comes meanwhile ends that read quietly."""

    async def early(request: web.Request) -> web.Response:
        return web.Response(text="early")  # the body is never read here

    origin.route("/early", early)
    proxy = await make_proxy(config=CONFIG)
    with caplog.at_level(logging.DEBUG):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
        try:
            writer.write(HEAD.replace(b"/sink", b"/early") + BIG)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"early"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head[:200]
            await asyncio.sleep(0.2)
            writer.write(b"zz\r\nAAAA\r\n0\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        await asyncio.sleep(0.3)
    assert not problems(caplog)
