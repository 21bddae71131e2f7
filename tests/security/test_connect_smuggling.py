"""Front-side request smuggling through a CONNECT: the parser (llhttp) stops at a CONNECT's head
and ignores its ``Content-Length`` (what follows would be the tunnel's bytes). cachegate, a
reverse proxy, refuses the tunnel with 405; it used to keep the connection open and read those
bytes as the next request, so a request hidden in a CONNECT's body was fetched, stored and
answered. A front end that frames by ``Content-Length`` and reuses its backend connection
then handed that answer to the next client, for the page that client asked for.

Now the 405 closes the connection, and nothing after the CONNECT is parsed or answered, on the
fast hit path's listener and on the general one, whether those bytes come in the same read or
later."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.test_connection_ends import HANG, answers, proxies
from tests.test_fastpath import req

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"
FOLLOW = req("GET", "/a")

CONNECTS = {
    "authority-form, the request as its Content-Length body": (
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\nContent-Length: %d\r\n\r\n"
        % len(SMUGGLED)),
    "authority-form, no Content-Length": b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    "origin-form": b"CONNECT /a HTTP/1.1\r\nHost: example.test\r\n\r\n",
}


async def until_close(port: int, *writes: bytes) -> bytes:
    """Send each of ``writes`` (a moment apart); every byte the server sends up to its close (the
    test fails if it does not close). A write after the server closed may meet a reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, data in enumerate(writes):
            if i:
                await asyncio.sleep(0.2)
            writer.write(data)
            try:
                await writer.drain()
            except ConnectionError:
                break
        out = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), HANG):
                out += chunk
        except ConnectionResetError:
            pass
        return out
    finally:
        writer.close()


@pytest.mark.parametrize("case", list(CONNECTS))
async def test_nothing_after_a_connect_is_answered_and_the_connection_closes(
        origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    origin.route("/smuggled", body=b"attacker's choice", headers={"Cache-Control": "max-age=300"})
    p = await proxies(origin, make_proxy)
    connect = CONNECTS[case]
    for port in (p.fast_port, p.general_port):
        for writes in ((connect + SMUGGLED + FOLLOW,), (connect, SMUGGLED + FOLLOW),
                       (FOLLOW + connect + SMUGGLED + FOLLOW,)):
            data = await until_close(port, *writes)
            got = answers(data)
            before = [("HTTP/1.1 200 OK", b"a")] if writes[0].startswith(b"GET") else []
            assert [(a[0], a[2]) for a in got] == [
                *before, ("HTTP/1.1 405 Method Not Allowed", b"CONNECT is not supported by a reverse proxy\n")
            ], (port, writes, data)
            assert got[-1][1]["connection"] == "close"
            # a 405 MUST name the methods allowed (RFC 9110 §15.5.6): those TRACE's 405 names
            assert got[-1][1]["allow"] == "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
    assert origin.count("/smuggled") == 0


async def test_a_front_end_reusing_its_connection_never_hands_on_a_smuggled_answer(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """End to end: what a front end framing by Content-Length sees on one backend connection.
    It forwards the attacker's CONNECT (with its body), reads one response, then forwards the
    next client's request on the same connection: that client must never get the response to
    the request hidden in the CONNECT's body. (The connection closes instead: the front end
    opens another for the next client.)"""
    origin.route("/victim", body=b"the victim's page")
    origin.route("/smuggled", body=b"attacker's choice")
    p = await proxies(origin, make_proxy)
    attack = CONNECTS["authority-form, the request as its Content-Length body"] + SMUGGLED
    for port in (p.fast_port, p.general_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(attack)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG)
            assert head.startswith(b"HTTP/1.1 405 ")
            # A refusal, as every other: ERROR in both cache fields (it said BYPASS beside
            # Cache-Status detail=PROXY-ERROR).
            assert b"\r\nx-cache-status: error\r\n" in head.lower(), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), HANG)
            writer.write(req("GET", "/victim"))
            try:
                rest = await asyncio.wait_for(reader.read(), HANG)
            except ConnectionResetError:
                rest = b""
        finally:
            writer.close()
        assert b"attacker's choice" not in rest, port
        assert rest == b"", port  # closed: the next client's request goes on a new connection
    assert origin.count("/smuggled") == 0


async def test_the_admin_listener_reads_nothing_after_a_connect_either(make_proxy: MakeProxy) -> None:
    """The admin listener answered the request in a CONNECT's body as well (a 403 for the
    CONNECT's Host, then a 200 for the hidden request)."""
    proxy = await make_proxy()
    port = proxy.listeners.admin_addresses[0][1]
    hidden = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    connect = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(hidden)
    data = await until_close(port, connect + hidden)
    assert data.count(b"HTTP/1.1 ") == 1, data
    assert b'"status"' not in data
    assert b"\r\nConnection: close\r\n" in data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
