"""A client that aborts a download mid-body costs one line at DEBUG, never a traceback: on
the general path (a fill streamed to it, a big body sent from disk) and on the fast hit path.
A hostile client could otherwise fill the log at will."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

import pytest

from tests.conftest import MakeProxy
from tests.harness import Proxy, directory_ready
from tests.security.misbehaving import Conn, raw_origins, response, unread_connection

SMALL = b"s" * (512 * 1024)  # in memory: a hit is answered on the fast path
BIG = b"b" * (3 * 1024 * 1024)  # on disk only, over the fast path's 1 MiB: the general path


async def serve(conn: Conn) -> None:
    while True:
        req = await conn.request()
        body = SMALL if req.target.startswith("/small") else BIG
        await conn.send(response("200 OK", {"Cache-Control": "max-age=600"}, body))


async def abort_download(proxy: Proxy, path: str) -> None:
    """Ask for ``path``, read a little of the answer, then reset the connection."""
    sock = unread_connection(proxy.url)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode())
    got = 0
    while got < 64 * 1024:
        got += len(await loop.sock_recv(sock, 16 * 1024))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, mid-body


async def lines_after_abort(caplog: pytest.LogCaptureFixture, proxy: Proxy, path: str) -> list[logging.LogRecord]:
    caplog.clear()
    await abort_download(proxy, path)
    for _ in range(200):  # until the proxy has noticed
        if any(r.name.startswith("cachegate") for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # anything else it would log about it
    return [r for r in caplog.records if r.name.startswith(("cachegate", "aiohttp", "asyncio"))]


@pytest.mark.parametrize("path", ["/big-miss", "/big-hit", "/small-hit"])
async def test_an_aborted_download_logs_one_debug_line(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    caplog.set_level(logging.DEBUG)
    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        await directory_ready(proxy)  # the start-up line about the disk's keys is not about the abort
        if path.endswith("-hit"):
            assert (await proxy.get(path, headers={"Host": "shop.example"})).body in (SMALL, BIG)
            assert (await proxy.get(path, headers={"Host": "shop.example"})).x_cache == "HIT"
        fast_before = proxy.listeners.runners[0].server.fast.answered  # type: ignore[union-attr]
        records = await lines_after_abort(caplog, proxy, path)
        assert [(r.levelname, r.exc_info) for r in records] == [("DEBUG", None)], \
            [(r.name, r.levelname, r.getMessage()) for r in records]
        assert "went away" in records[0].getMessage()
        fast = proxy.listeners.runners[0].server.fast.answered - fast_before  # type: ignore[union-attr]
        assert fast == (1 if path == "/small-hit" else 0)  # the path each case means to test
