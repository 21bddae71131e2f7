"""A client that aborts a download mid-body costs one line at DEBUG, never a traceback: on
the general path (a fill streamed to it, a big body sent from disk) and on the fast hit path.
A hostile client could otherwise fill the log at will. A client that breaks off an upload is
not an upstream failure: it could otherwise take every upstream out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
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


# -- a request body that breaks off ----------------------------------------------------------

async def abort_upload(proxy: Proxy, seen: list[int], how: str) -> bytes:
    """POST announcing 1000 body bytes, send 10, and once the origin has the request head (so the
    body is being streamed to it) ``close``, ``reset`` or ``half``-close the connection (and
    then read what comes back)."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    before = len(seen)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /form HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    for _ in range(500):
        if len(seen) > before:
            break
        await asyncio.sleep(0.01)
    assert len(seen) > before, "the POST never reached an upstream"
    answer = b""
    if how == "half":
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 5)
    elif how == "reset":
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return answer


async def test_a_request_body_that_breaks_off_is_not_an_upstream_failure(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that announces a body and goes away part-way through it is the client's failure,
    not the upstream's: were it counted against the upstream (passive health: 3 failures, out
    for 10 s), a few such POSTs would take every upstream out and everyone would get a 503."""
    heads: list[int] = []  # the connections that got a POST head
    ended: list[int] = []  # the connections cachegate dropped while sending a body on them
    ok = response("200 OK", {"Cache-Control": "no-store"}, b"fine")

    async def serve(conn: Conn) -> None:
        while True:
            head = await conn.reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                heads.append(conn.index)
                try:
                    await conn.reader.readexactly(1000)
                except asyncio.IncompleteReadError:
                    ended.append(conn.index)
                    return
            await conn.send(ok)

    caplog.set_level(logging.INFO)
    async with raw_origins() as start:
        a, b = await start(serve), await start(serve)
        # Passive checks on (3 failures, 10 s); each body goes upstream from its first byte (a
        # body's first 64 KB are otherwise read before an upstream connection is taken).
        proxy = await make_proxy(config="client_body_buffer: 0\n", upstreams=[a.url, b.url])
        for i in range(9):
            answer = await abort_upload(proxy, heads, ("close", "reset", "half")[i % 3])
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer  # never a 5xx
        for _ in range(500):  # the proxy dropped each upstream connection the body was going to
            if len(ended) == len(heads):
                break
            await asyncio.sleep(0.01)
        assert len(ended) == len(heads) == 9
        for _ in range(2):
            after = await proxy.get("/after", headers={"Host": "shop.example"})
            assert (after.status, after.body) == (200, b"fine")
        for u in proxy.runtime.pool.upstreams:
            assert (u.available(proxy.runtime.pool._clock()), u.passive_failures, u.failures) == (True, 0, 0)
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        counted = re.findall(r"^cachegate_upstream_errors_total\{.*\} (\S+)$", metrics, re.M)
        assert counted and set(counted) == {"0.0"}, counted  # each kind exported, at 0 (KNOWN_LABELS)
        loud = [(r.name, r.levelname, r.getMessage()) for r in caplog.records
                if r.name.startswith("cachegate") and r.levelno >= logging.WARNING]
        assert loud == []
