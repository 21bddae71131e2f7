"""The control channel between the supervisor and one worker: JSON lines, named calls, both ways.

Each worker gets one end of a ``socketpair`` at spawn. Either side may call a
named function of the other and await its result::

    {"id": 7, "call": "purge_local", "args": {...}}     ->
    {"id": 7, "result": 3}   or   {"id": 7, "error": "..."}

Calls are served concurrently (a worker's "purge" call to the supervisor makes
the supervisor call "purge_local" back on the same channel while the first call
is still open). Handlers are plain ``async def f(**args)`` registered by name, so
later features add calls (metrics aggregation, cross-worker coalescing) without
touching the transport. When the peer goes away every pending call fails with
``ChannelClosed`` and ``closed`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.errors import CachegateError

log = logging.getLogger("cachegate.control")

Handler = Callable[..., Awaitable[Any]]
LINE_LIMIT = 64 * 1024 * 1024  # a purge of many URL keys is one line


class ChannelClosed(ConnectionError):
    pass


class RemoteError(RuntimeError):
    """The other side's handler raised; the message is its error text."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handlers: dict[str, Handler] | None = None, name: str = "peer") -> None:
        self._reader = reader
        self._writer = writer
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.name = name
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._reading = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def open(cls, sock: socket.socket, handlers: dict[str, Handler] | None = None,
                   name: str = "peer") -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer, handlers, name)

    async def call(self, name: str, wait: float | None = None, **args: Any) -> Any:
        """Call ``name`` on the other side (at most ``wait`` seconds); its result, or RemoteError,
        ChannelClosed or TimeoutError."""
        if self.closed.is_set():
            raise ChannelClosed(f"{self.name}: channel closed")
        self._next_id += 1
        call_id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        try:
            self._send({"id": call_id, "call": name, "args": args})
            return await asyncio.wait_for(asyncio.shield(fut), wait)
        finally:
            self._pending.pop(call_id, None)

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise ChannelClosed(f"{self.name}: channel closed")
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    message = json.loads(line)
                except ValueError:
                    log.error("%s: unreadable control message dropped", self.name)
                    continue
                if "call" in message:
                    task = asyncio.ensure_future(self._serve(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    fut = self._pending.get(message.get("id"))
                    if fut is None or fut.done():
                        continue
                    if "error" in message:
                        fut.set_exception(RemoteError(message["error"]))
                    else:
                        fut.set_result(message.get("result"))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.debug("%s: control channel broke: %s", self.name, exc)
        finally:
            self._fail_pending()

    async def _serve(self, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        handler = self.handlers.get(message["call"])
        try:
            if handler is None:
                raise LookupError(f"no such call: {message['call']!r}")
            result = await handler(**message.get("args", {}))
            reply: dict[str, Any] = {"id": call_id, "result": result}
        except asyncio.CancelledError:
            raise
        except CachegateError as exc:
            # A failure its caller answers and its message names (a purge on a full filesystem:
            # the client's 503), not a bug: no traceback (a full disk logged one per PURGE).
            log.warning("%s: control call %s failed: %s", self.name, message.get("call"), exc)
            reply = {"id": call_id, "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            log.exception("%s: control call %s failed", self.name, message.get("call"))
            reply = {"id": call_id, "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(ChannelClosed, ConnectionError):
            self._send(reply)

    def _fail_pending(self) -> None:
        self.closed.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.name}: channel closed"))

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reading
        for t in list(self._tasks):
            t.cancel()
        self._fail_pending()
