"""The HTTP version of a request line and of the answer (RFC 9110 §6.2, RFC 9112 §2.3), on both
paths (the fast hit path, and a listener without it): cachegate speaks HTTP/1.1 and answers a
1.0 client in 1.0; it never labels an answer in a version it does not speak."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.test_fastpath import exchange, pair, req


async def until_close(port: int, data: bytes) -> bytes:
    """Every byte the server sends for ``data``, up to its close (the test fails without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


# (request bytes, status line, text in the body)
REFUSED = {
    "HTTP/2.0": (req("GET", "/v", version="2.0"), "HTTP/1.1 505 HTTP Version Not Supported", b"HTTP/2.0"),
    "HTTP/3.0": (req("GET", "/v", version="3.0"), "HTTP/1.1 505 HTTP Version Not Supported", b"HTTP/1.1"),
    "HTTP/0.9": (req("GET", "/v", version="0.9"), "HTTP/1.1 400 Bad Request", b"HTTP/0.9"),
    "no version (0.9)": (b"GET /v\r\n\r\n", "HTTP/1.1 400 Bad Request", b"HTTP/0.9"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_another_major_version_is_505_and_0_9_is_400_then_the_connection_closes(
        origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    origin.route("/v", body=b"hello", headers={"Cache-Control": "max-age=300"})
    p = await pair(make_proxy)
    (stored,), _ = await exchange(p.fast_port, req("GET", "/v"), ["GET"])
    assert stored.status_line == "HTTP/1.1 200 OK"
    data, status_line, text = REFUSED[case]
    for port in (p.fast_port, p.general_port):
        got = await until_close(port, data)  # (read to the close: the connection must end)
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == status_line, (port, got)
        assert "Transfer-Encoding: chunked" not in lines
        assert text in body
        assert got.count(b"HTTP/") == 1 + body.count(b"HTTP/")  # one answer
    assert origin.count("/v") == 1  # nothing was forwarded, nothing answered from the cache


async def test_a_1_0_client_is_answered_in_1_0_and_a_1_1_client_in_1_1(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/v", body=b"hello", headers={"Cache-Control": "max-age=300"})
    p = await pair(make_proxy)
    for port in (p.general_port, p.fast_port):
        for version, line in (("1.1", "HTTP/1.1 200 OK"), ("1.0", "HTTP/1.0 200 OK")):
            (answer,), _ = await exchange(port, req("GET", "/v", "Connection: keep-alive", version=version),
                                          ["GET"])
            assert (answer.status_line, answer.body) == (line, b"hello")


ADMIN_REFUSED = {
    "HTTP/2.0": (b"HTTP/2.0", "HTTP/1.1 505 HTTP Version Not Supported", b"HTTP/2.0 is not supported"),
    "HTTP/0.9": (b"HTTP/0.9", "HTTP/1.1 400 Bad Request", b"HTTP/0.9 requests are not supported"),
}


@pytest.mark.parametrize("case", list(ADMIN_REFUSED))
@pytest.mark.parametrize("path", ["/stats", "/metrics", "/nowhere"])
async def test_the_admin_listener_refuses_other_versions_as_the_client_listener_does(
        make_proxy: MakeProxy, case: str, path: str) -> None:
    """The admin listener answered ``GET /stats HTTP/2.0`` with ``HTTP/2.0 200 OK`` and an
    HTTP/1 head (``HTTP/0.9 200 OK`` for 0.9): now the same refusal as the client listener's,
    in HTTP/1.1, before any route, and the connection closes."""
    proxy = await make_proxy()
    port = proxy.listeners.admin_addresses[0][1]
    version, status_line, text = ADMIN_REFUSED[case]
    got = await until_close(port, b"GET %s %s\r\nHost: 127.0.0.1\r\n\r\n" % (path.encode(), version))
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == status_line, got
    assert "Connection: close" in lines and "Transfer-Encoding: chunked" not in lines
    assert text in body
    ok = await until_close(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")  # (1.x is served as before)
