"""A body framed by the connection's end (no Content-Length, not chunked) that ends with a
reset rather than a close was cut short: it is never stored, and its client sees the
connection aborted rather than a truncated body passed off as complete."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from pathlib import Path

import aiohttp
import pytest

from proxy.web.fastpath import FAST_FILE_MAX, ProxyServer
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.misbehaving import Conn, raw_origins


async def test_a_close_framed_body_cut_by_a_reset_is_never_stored(make_proxy: MakeProxy) -> None:
    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Type: text/plain\r\n\r\n"
                        + b"partial " * 1000)
        await asyncio.sleep(0.05)
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()  # RST, not FIN

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        with pytest.raises(aiohttp.ClientPayloadError):
            await proxy.get("/cut")
        with pytest.raises(aiohttp.ClientPayloadError):
            await proxy.get("/cut")  # not stored: fetched (and cut) again
        assert len(origin.requests) == 2


# -- a stored body file cut short on disk --------------------------------------------------------

def body_files(root: Path, size: int) -> list[Path]:
    return [p for p in root.rglob("*.val") if p.stat().st_size == size]


async def raw_get(port: int, path: str) -> tuple[int, int, bool]:
    """(Content-Length announced, body bytes received, whether the proxy ended the connection);
    never waits on a connection left open with the body unfinished for longer than 10 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        got = 0
        try:
            while got < length:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    return length, got, True
                got += len(chunk)
        except ConnectionError:  # aborted with a reset
            return length, got, True
        except TimeoutError:
            return length, got, False
        return length, got, False
    finally:
        writer.close()


@pytest.mark.parametrize(("size", "memory_max_object"), [(2 * 1024 * 1024, "1MB"), (512 * 1024, "256KB")],
                         ids=["general", "fast"])
async def test_a_body_file_cut_short_on_disk_aborts_its_client_and_is_refetched(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        size: int, memory_max_object: str) -> None:
    """A big body held on disk only is sent from its file kept open after the first hit
    (``proxy.storage.bodyfiles``). Cut on disk in place (the same inode), the head already says
    the whole length: the client's connection is aborted rather than left waiting for bytes
    that never come, the file is dropped and the variant forgotten, and the next request
    refetches. "fast": a body of at most FAST_FILE_MAX, answered by the fast path."""
    caplog.set_level(logging.WARNING, logger="cachegate")
    body = os.urandom(size)
    origin.route("/big", body=body, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config=f"cache: {{memory: 64MB, memory_max_object: {memory_max_object}, "
                                    "disk: {path: cache, size: 512MB, shards: 2}}\n")
    port = int(proxy.url.rsplit(":", 1)[1])
    assert (await proxy.get("/big")).body == body
    files = body_files(tmp_path, size)
    for _ in range(50):  # the disk commit follows the client's answer
        if files:
            break
        await asyncio.sleep(0.05)
        files = body_files(tmp_path, size)
    assert len(files) == 1, files
    for _ in range(2):  # the first hit opens the file and keeps it open; the second is sent from it
        assert await raw_get(port, "/big") == (size, size, False)
    storage = proxy.runtime.storage
    assert len(storage.body_files) == 1
    fast = proxy.listeners.runners[0].server
    assert isinstance(fast, ProxyServer) and fast.fast is not None
    before = fast.fast.answered

    os.truncate(files[0], 1000)
    length, got, ended = await raw_get(port, "/big")
    assert (length, ended) == (size, True) and got < size
    assert (fast.fast.answered > before) == (size <= FAST_FILE_MAX)
    for _ in range(50):
        if len(storage.body_files) == 0 and proxy.runtime.engine._forgetting == set():
            break
        await asyncio.sleep(0.05)
    assert len(storage.body_files) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cut short" in warnings[0], warnings
    again = await proxy.get("/big")
    assert (again.x_cache, again.body == body) == ("MISS", True)
    assert origin.count("/big") == 2


async def test_a_big_body_file_cut_short_before_it_was_opened_is_said_and_counted(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A body bigger than memory_max_object whose file was cut on disk before any hit opened
    it was a silent miss: no warning, no cachegate_storage_errors_total{operation="read"},
    where one cut short while open is both. Now it is said (once a minute at most) and
    counted, and the next request refetches it."""
    size = 2 * 1024 * 1024
    bodies = {f"/big{i}": os.urandom(size) for i in range(2)}
    for path, body in bodies.items():
        origin.route(path, body=body, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config="cache: {memory: 64MB, memory_max_object: 1MB, "
                                    "disk: {path: cache, size: 512MB, shards: 2}}\n")
    for path in bodies:
        assert (await proxy.get(path)).x_cache == "MISS"
    files = body_files(tmp_path, size)
    for _ in range(100):  # the disk commits follow the clients' answers
        if len(files) == len(bodies):
            break
        await asyncio.sleep(0.05)
        files = body_files(tmp_path, size)
    assert len(files) == len(bodies), files
    storage = proxy.runtime.storage
    assert len(storage.body_files) == 0  # none opened yet
    caplog.set_level(logging.WARNING, logger="cachegate")
    for f in files:
        os.truncate(f, 1000)

    for path, body in bodies.items():
        again = await proxy.get(path)
        assert (again.x_cache, again.body == body) == ("MISS", True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cut short" in warnings[0] and "before it was opened" in warnings[0], warnings
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_storage_errors_total{operation="read"} 2.0' in metrics
    assert all(origin.count(path) == 2 for path in bodies)
