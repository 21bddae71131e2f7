"""A chunked request's trailer must never become a field of the next request on its connection.

aiohttp's C request parser (3.14.5, the latest release) keeps the last trailer field of a
chunked body pending and adds it to the next request it parses on the same connection
(``cb_on_message_begin`` does not reset the field being built). Behind a front proxy that
shares its connections to cachegate between clients, one client would choose a ``Cookie``
of another's request, or the ``Host`` of an HTTP/1.0 request that has none (and so its
cache key). cachegate closes the connection after any request whose body was chunked
(``heads.ends_connection``): that reply says ``Connection: close``, and nothing after the body
is answered or forwarded. The requests go byte for byte on a socket; the origin is a real
aiohttp app on loopback that records what it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
from unittest import mock

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.util import echo_origin, get, port_of, request, send_raw


def chunked(method: str, target: str, trailer: str, body: bytes = b"3\r\nabc\r\n") -> bytes:
    """A chunked request whose last chunk carries ``trailer`` as its one trailer field."""
    head = request(method, target, "Host: shop.example", "Transfer-Encoding: chunked")
    return head + body + b"0\r\n" + trailer.encode() + b"\r\n\r\n"


async def exchange(proxy: Proxy, first: bytes, then: bytes, *, together: bool, admin: bool = False) -> bytes:
    """Send ``first`` and ``then`` on one connection (in one write, or ``then`` once the answer
    to ``first`` was read) to the client listener (or the admin one); everything the server
    sent until it closed the connection."""
    address = proxy.listeners.admin_addresses[0] if admin else ("127.0.0.1", port_of(proxy))
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(first + then if together else first)
        received = b""
        if not together:
            received = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(then)  # (into a connection that may be closing: the point of the test)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        return received + await asyncio.wait_for(reader.read(), 10)  # up to the close
    finally:
        writer.close()


# (case, the chunked request, the request after it, what the origin must never receive)
LEAKS = {
    "a Cookie for a pipelined GET": (chunked("POST", "/upload", "Cookie: session=ATTACKER"),
                                     get("/next", "User-Agent: victim"), ("cookie", "session=ATTACKER")),
    "a Host for an HTTP/1.0 GET without one": (chunked("POST", "/upload", "Host: evil.example"),
                                               request("GET", "/next", "Connection: keep-alive", version="1.0"),
                                               ("host", "evil.example")),
    "an Origin after a GET with a chunked body": (chunked("GET", "/page", "Origin: https://evil.example", b""),
                                                  get("/next", "User-Agent: victim"),
                                                  ("origin", "https://evil.example")),
}


@pytest.mark.parametrize("together", [True, False], ids=["one write", "after the answer"])
@pytest.mark.parametrize("case", list(LEAKS))
async def test_a_trailer_never_reaches_the_next_request_on_the_connection(
        origin: Origin, make_proxy: MakeProxy, case: str, together: bool) -> None:
    echo_origin(origin, "/upload", "/page", "/next")
    proxy = await make_proxy()
    await send_raw(proxy, get("/page"))  # stored: a GET with a body must not be a fast hit either
    first, then, (name, value) = LEAKS[case]
    seen_before = len(origin.seen)
    answered = await exchange(proxy, first, then, together=together)
    assert answered.count(b"HTTP/1.1 ") == 1, answered  # the chunked request's answer, no other
    head = answered.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nconnection: close" in head, head  # said, so a client sends nothing more into it
    assert "/next" not in [s.path for s in origin.seen[seen_before:]]
    assert all(value not in s.headers.getall(name, []) for s in origin.seen)
    innocent = await send_raw(proxy, get("/next", "User-Agent: victim"))
    assert innocent.status == 200 and b"ATTACKER" not in innocent.body and b"evil" not in innocent.body


async def test_the_admin_api_closes_the_connection_after_a_chunked_request(proxy: Proxy) -> None:
    body = b'{"all": true}'
    host = "Host: 127.0.0.1"
    purge = (request("POST", "/purge", host, "Content-Type: application/json", "Transfer-Encoding: chunked")
             + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nOrigin: https://evil.example\r\n\r\n")
    answered = await exchange(proxy, purge, request("GET", "/stats", host), together=True, admin=True)
    assert answered.count(b"HTTP/1.1 ") == 1, answered
    assert answered.startswith(b"HTTP/1.1 200 ") and b"\r\nconnection: close" in answered.lower()


async def test_a_request_with_a_content_length_body_keeps_its_connection(
        origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/upload", "/next")
    proxy = await make_proxy()
    answered = await exchange(proxy, request("POST", "/upload", "Host: shop.example", "Content-Length: 3") + b"abc",
                              get("/next", "Connection: close"), together=True)
    assert answered.count(b"HTTP/1.1 200 ") == 2


async def test_aiohttp_s_request_parser_still_carries_a_trailer_into_the_next_request() -> None:
    # The parser bug cachegate works around. When this fails, the aiohttp in use fixed it:
    # the workaround (heads.ends_connection, and the note in docs/deploy.md, "Upgrading
    # aiohttp") may go, with this test; the tests above stay.
    from aiohttp._http_parser import HttpRequestParser  # type: ignore[import-not-found]

    parser = HttpRequestParser(mock.Mock(), asyncio.get_running_loop(), 2**16, max_line_size=8190,
                               max_field_size=8190)
    messages, _, _ = parser.feed_data(chunked("POST", "/a", "Cookie: session=ATTACKER")
                                      + get("/b", host="shop.example"))
    assert [m.path for m, _ in messages] == ["/a", "/b"]
    assert messages[1][0].headers.getall("Cookie", []) == ["session=ATTACKER"], (
        "aiohttp's C parser no longer leaks a trailer into the next request: see docs/deploy.md")


@pytest.mark.parametrize("protocol", ["h2c", "websocket", "foo"])
async def test_a_request_asking_to_switch_protocols_is_answered_and_its_connection_closed(
        origin: Origin, make_proxy: MakeProxy, protocol: str) -> None:
    """aiohttp's parser reads nothing as a request after one with ``Upgrade``: a GET pipelined
    behind it was never answered and the connection stayed open (a client waiting for ever).
    cachegate does not switch protocols: it answers the request and closes."""
    echo_origin(origin, "/up", "/next")
    proxy = await make_proxy()
    first = request("GET", "/up", "Host: shop.example", f"Upgrade: {protocol}", "Connection: Upgrade")
    answered = await exchange(proxy, first, get("/next"), together=True)
    assert answered.startswith(b"HTTP/1.1 200 ") and answered.count(b"HTTP/1.1 ") == 1, answered
    assert b"\r\nconnection: close" in answered.split(b"\r\n\r\n", 1)[0].lower()
    assert all(s.headers.get("Upgrade") is None for s in origin.seen)  # hop-by-hop: never forwarded
