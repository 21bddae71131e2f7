"""A far range of a response that is not stored, and a client that goes away meanwhile.

The 206 is sliced from the origin's 200 as it arrives, its head held back for the range's
first bytes (so that an origin failure before them is a clean 502). A client that closed its
socket meanwhile sent a FIN, which cachegate takes for a half-close (RFC 9112 §9.6: it answers
a client that shut its sending side and waits), and nothing wrote to it: the origin's body was
downloaded for nobody up to the range's offset (a 20 GB object's far range: 20 GB). Now the
head goes out after ``SLICE_HEAD_WAIT`` without them; a closed client answers it with a reset,
which the skip to the offset notices at its next chunk, and the origin's connection is closed.

The origin is a raw one on loopback that sends a private (or ``no-store``) 200 slowly and
records how many bytes it had sent when cachegate closed the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeProxy
from tests.harness import Proxy
from tests.security.misbehaving import Conn, RawOrigin, Serve, raw_origins

SIZE = 6 * 1024 * 1024
BODY = (bytes(range(251)) * (SIZE // 251 + 1))[:SIZE]
CHUNK = 64 * 1024
FAR = 5_500_000  # ≈ 4 s of the origin's body: well after the head's wait
NEAR = 2_000_000  # ≈ 1.5 s: the head goes out before the range's bytes arrive
FIELDS = {"private": "private, max-age=60", "no-store": "no-store"}


class Slow:
    """The origin's side: each connection's bytes of body sent when cachegate closed it."""

    def __init__(self) -> None:
        self.cut: list[int] = []
        self.closed = asyncio.Event()

    def serve(self, cache_control: str) -> Serve:
        async def serve(conn: Conn) -> None:
            while True:
                await conn.request()
                head = (f"HTTP/1.1 200 OK\r\nCache-Control: {cache_control}\r\nETag: \"s\"\r\n"
                        f"Content-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\n\r\n")
                sent = 0
                try:
                    await conn.send(head.encode())
                    while sent < SIZE:
                        await conn.send(BODY[sent:sent + CHUNK])
                        sent += CHUNK
                        await asyncio.sleep(0.05)
                except ConnectionError:
                    self.cut.append(sent)
                    self.closed.set()
                    raise
        return serve


async def ranged(proxy: Proxy, path: str, first: int, last: int) -> tuple[asyncio.StreamReader,
                                                                           asyncio.StreamWriter]:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nRange: bytes={first}-{last}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in head[1:] if ": " in line)}
    body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 30)
    return head[0], fields, body


def records(proxy: Proxy, log_file: Path, path: str) -> list[dict[str, Any]]:
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    return [line for line in lines if line["path"] == path]


async def started(make_proxy: MakeProxy, tmp_path: Path, start: Any, slow: Slow, kind: str
                  ) -> tuple[RawOrigin, Proxy, Path]:
    origin = await start(slow.serve(FIELDS[kind]))
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n", upstreams=[origin.url])
    return origin, proxy, log_file


@pytest.mark.parametrize("kind", ["private", "no-store"])
@pytest.mark.parametrize("passing", [False, True], ids=["fill", "hit-for-pass"])
async def test_a_client_gone_before_its_far_range_stops_the_origins_download(
        make_proxy: MakeProxy, tmp_path: Path, kind: str, passing: bool) -> None:
    """The client asks a far range and closes its socket 0.3 s later: cachegate closes the
    origin's connection long before the range's offset (it downloaded it all for nobody), and
    logs the request once, as a client that left (499, nothing of the range sent). ``passing``:
    the key is marked hit-for-pass first (a range near its start), so the far range is the
    client's own fetch; else it leads a fill whose response turns out not to be stored."""
    slow = Slow()
    async with raw_origins() as start:
        origin, proxy, log_file = await started(make_proxy, tmp_path, start, slow, kind)
        if passing:
            reader, writer = await ranged(proxy, "/obj", 0, 9)
            status, _, body = await answer(reader)
            assert (status, body) == ("HTTP/1.1 206 Partial Content", BODY[:10])
            writer.close()
            await asyncio.wait_for(slow.closed.wait(), 30)  # (the rest was not read: closed)
            slow.closed.clear()
        reader, writer = await ranged(proxy, "/obj", FAR, FAR + 10)
        await asyncio.sleep(0.3)
        writer.close()  # a FIN, as a client that half-closes sends
        await asyncio.wait_for(slow.closed.wait(), 30)
        assert slow.cut[-1] < FAR, f"the origin sent {slow.cut[-1]} bytes for a client gone"
        assert len(origin.requests) == 1 + passing
        await asyncio.sleep(0.1)
        lines = records(proxy, log_file, "/obj")
        assert [(line["status"], line["bytes"]) for line in lines[passing:]] == [(499, 0)]


async def test_a_half_closed_client_gets_its_far_range_whole(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A client that shuts its sending side after its request and reads (an HTTP/1.0 client's
    way) is not a client gone: its 206, whose head went out before the range's bytes
    arrived, comes whole and byte-exact, and the connection closes after it."""
    slow = Slow()
    async with raw_origins() as start:
        _, proxy, log_file = await started(make_proxy, tmp_path, start, slow, "private")
        reader, writer = await ranged(proxy, "/obj", NEAR, NEAR + 10)
        sock = writer.get_extra_info("socket")
        sock.shutdown(socket.SHUT_WR)
        status, fields, body = await answer(reader)
        assert status == "HTTP/1.1 206 Partial Content"
        assert fields["content-range"] == f"bytes {NEAR}-{NEAR + 10}/{SIZE}"
        assert body == BODY[NEAR:NEAR + 11]
        assert await asyncio.wait_for(reader.read(), 30) == b""  # then closed
        writer.close()
        await asyncio.sleep(0.1)
        lines = records(proxy, log_file, "/obj")
        assert [(line["status"], line["bytes"]) for line in lines] == [(206, 11)]


@pytest.mark.parametrize("kind", ["private", "no-store"])
async def test_a_client_that_stays_gets_its_far_range_and_its_connection_goes_on(
        make_proxy: MakeProxy, tmp_path: Path, kind: str) -> None:
    """The head goes out before the range's bytes: they follow byte-exact, framed by its
    Content-Length (the next request on the connection is answered)."""
    slow = Slow()
    async with raw_origins() as start:
        _, proxy, log_file = await started(make_proxy, tmp_path, start, slow, kind)
        reader, writer = await ranged(proxy, "/obj", NEAR, NEAR + 10)
        status, fields, body = await answer(reader)
        assert (status, fields["content-range"]) == ("HTTP/1.1 206 Partial Content",
                                                     f"bytes {NEAR}-{NEAR + 10}/{SIZE}")
        assert body == BODY[NEAR:NEAR + 11]
        writer.write(b"GET /obj HTTP/1.1\r\nHost: t\r\nRange: bytes=0-4\r\n\r\n")
        status, _, body = await answer(reader)
        assert (status, body) == ("HTTP/1.1 206 Partial Content", BODY[:5])
        writer.close()
        await asyncio.sleep(0.1)
        lines = records(proxy, log_file, "/obj")
        assert [(line["status"], line["bytes"]) for line in lines] == [(206, 11), (206, 5)]


async def test_an_origin_that_breaks_off_after_the_head_went_out_cuts_the_206_short(
        make_proxy: MakeProxy, tmp_path: Path) -> None:
    """Once the head has gone out without the range's bytes, an origin that breaks off before
    them can no longer be a 502: the 206 ends short of its Content-Length and its connection
    is closed (never framed as complete), as any streamed response's."""
    async def breaks_off(conn: Conn) -> None:
        await conn.request()
        await conn.send((f"HTTP/1.1 200 OK\r\nCache-Control: private\r\nContent-Length: {SIZE}\r\n\r\n").encode())
        for sent in range(0, NEAR - CHUNK, CHUNK):
            await conn.send(BODY[sent:sent + CHUNK])
            await asyncio.sleep(0.05)
        conn.writer.transport.abort()

    async with raw_origins() as start:
        origin = await start(breaks_off)
        log_file = tmp_path / "access.log"
        proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n"
                                        "upstream: {retries: 0}\n", upstreams=[origin.url])
        reader, writer = await ranged(proxy, "/obj", NEAR, NEAR + 10)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 206 ")
        assert b"Content-Length: 11\r\n" in head
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed, nothing of the range
        writer.close()
        await asyncio.sleep(0.1)
        lines = records(proxy, log_file, "/obj")
        assert [(line["status"], line["bytes"], line["cache"]) for line in lines] == [(206, 0, "ERROR")]
