"""A TCP relay in front of a Redis server for cluster tests: what each test's relay does to the
bytes (delay them, hold answers, drop a flow) is its subclass's ``_handle``."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Relay:
    """Listens on a free loopback port; ``start`` gives the ``redis://`` URL that reaches Redis
    through it, ``close`` stops it and every task it started (``_spawn``)."""

    def __init__(self, port: int) -> None:
        self.port = port  # Redis's
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @staticmethod
    async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction's bytes as they come, until its end (then the other side is closed)."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
