"""Misbehaving origins on loopback: raw asyncio servers that write exactly the bytes a test
scripts, per connection, when it scripts them (late bodies, stray bytes, bodies a slow client
or a full disk must not break). Nothing here is a mock: cachegate talks to them over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.ports import Ports

if TYPE_CHECKING:
    from proxy.coalescer import Flight
    from tests.harness import Proxy

Serve = Callable[["Conn"], Awaitable[None]]


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names


@dataclass
class Conn:
    """One connection the origin accepted: read requests from it, write bytes to it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    origin: RawOrigin

    async def request(self, *, read_body: bool = True) -> Request:
        """The next request head (its body, if any, is read and dropped; left unread when not
        ``read_body``: an origin that answers without reading it)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ": " in line:
                k, v = line.split(": ", 1)
                headers[k.lower()] = v
        length = int(headers.get("content-length", "0"))
        if length and read_body:
            await self.reader.readexactly(length)
        request = Request(method, target, headers)
        self.origin.requests.append((self.index, request))
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


@dataclass
class RawOrigin:
    serve: Serve
    server: asyncio.Server | None = None
    connections: int = 0
    requests: list[tuple[int, Request]] = field(default_factory=list)  # (connection, request)
    ports: Ports | None = None  # where ``stop(hold_port=True)`` holds the port (``raw_origins``'s)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def targets(self) -> list[tuple[int, str, str]]:
        return [(i, r.method, r.target) for i, r in self.requests]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self.connections, reader, writer, self)
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                await self.serve(conn)
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def stop(self, hold_port: bool = False) -> None:
        """Stop; with ``hold_port`` keep the port till ``raw_origins`` ends: its connections are
        refused, and no other test's server is given it meanwhile (tests/ports.py)."""
        if self.server is not None:
            port = self.server.sockets[0].getsockname()[1] if self.server.sockets else 0
            self.server.close()
            if hold_port and port and self.ports is not None:
                self.ports.hold(port)
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


StartOrigin = Callable[[Serve], Awaitable[RawOrigin]]


@contextlib.asynccontextmanager
async def raw_origins() -> AsyncIterator[StartOrigin]:
    started: list[RawOrigin] = []
    with Ports() as ports:  # those of origins stopped with ``hold_port``, till the end
        async def start(serve: Serve) -> RawOrigin:
            origin = RawOrigin(serve, ports=ports)
            origin.server = await asyncio.start_server(origin._handle, "127.0.0.1", 0)
            started.append(origin)
            return origin

        try:
            yield start
        finally:
            for origin in started:
                await origin.stop()


def response(status: str, fields: dict[str, str], body: bytes = b"", *, length: bool = True) -> bytes:
    """A response's bytes: status line, fields (plus Content-Length of ``body`` when ``length``), body."""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in fields.items())]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def unread_connection(url: str) -> socket.socket:
    """A non-blocking connection with a tiny receive buffer, for a client that stops reading."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock


async def flight_with(proxy: Proxy, followers: int) -> Flight:
    """The one flight in progress in ``proxy``, once ``followers`` clients have joined it."""
    for _ in range(1000):
        flights = list(proxy.runtime.engine.coalescer._flights.values())
        if flights and flights[0].followers >= followers:
            return flights[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no flight with {followers} followers")
