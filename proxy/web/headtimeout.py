"""A time limit on request heads, for both listeners (nginx: ``client_header_timeout``).

aiohttp closes a connection whose handler waits for a request only when its keep-alive timer
runs out, and nothing bounds how long one request head may take to arrive: a client that
opens connections and sends a head a few bytes at a time (slowloris), or never finishes it,
holds a file descriptor each for as long as that timer lets it. ``HeadTimedHandler`` closes
the connection when a head is not whole ``head_timeout`` seconds after it began: after the
connection opened, for the first request; after its first byte, for the next ones (the time
in between is the keep-alive timeout's; empty lines there begin no head, RFC 9112 §2.2:
``empty_lines``). Nothing is answered (as nginx: the client never
finished asking); the proxy listener logs a head begun that way as nginx does, 408
(``head_timed_out``). The timer is armed only when a chunk leaves a head unfinished: a request
that arrives whole in one read, the common case, costs a counter comparison.

A head begun behind pipelined requests (in the read that ends the one before it, or while
those are being answered) is timed from its first byte too: the timer does not close the
connection while requests before the head are queued or being answered, it looks again a
timeout later, so the head has at most one more timeout once the handler is idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("cachegate.server")


class HeadTimedHandler(RequestHandler):
    """aiohttp's ``RequestHandler`` with a limit on how long one request head may take."""

    __slots__ = ("_head_handle", "_head_timeout")

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.head_begun()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_ended()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        body = bool(data) and self._reading_body()
        super().data_received(data)
        self.head_checked(before, data, body)

    async def finish_response(self, request: Any, resp: web.StreamResponse, start_time: float | None
                              ) -> tuple[web.StreamResponse, bool]:
        if self._upgraded and not self._messages and self._payload_parser is None:
            self.upgrade_refused(resp)
        return await super().finish_response(request, resp, start_time)

    def upgrade_refused(self, resp: web.StreamResponse) -> None:
        """The answer ``resp`` to a request the parser took for a protocol switch (a ``CONNECT``,
        or an ``Upgrade: websocket`` asked by ``Connection``), which cachegate never makes, on
        either listener: the parser stopped at its head, what came after it is dropped unparsed,
        and the connection closes after this answer.

        aiohttp parses those bytes as the next requests once the switch is declined. After a
        ``CONNECT`` they were the tunnel's, or a body llhttp does not read (it ignores the
        ``Content-Length`` of a CONNECT): a request hidden there was answered (fetched and
        stored) as if the client had sent it, and a front end that frames by Content-Length
        and reuses its connection gave that answer to the next client (request smuggling)."""
        self._message_tail = b""
        if isinstance(resp, web.StreamResponse):  # (aiohttp answers 500 for anything else)
            resp.force_close()  # its head says Connection: close, if not written yet
        self.close()  # nothing more is read

    def head_checked(self, before: int, data: bytes, body: bool) -> None:
        """After a chunk ``data`` was parsed (``before``: the request count before it; ``body``:
        a request body was still coming when it arrived)."""
        if self._request_count != before:
            if not data:
                # aiohttp parsing again what it held while its queue was full: requests read
                # before a head being timed, never that head (its end has not been read).
                return
            self.head_ended()
            messages = self._messages
            # The next head begun in the same read, behind a request without a body.
            if messages and messages[-1][1] is EMPTY_PAYLOAD and unfinished_head(data):
                self.head_begun()
        elif data and not body and not self._reading_body() and not empty_lines(data):
            # (a read that ends a body is not a head: where the body ends in it is not known;
            # nor are empty lines, which a server ignores before a request line)
            self.head_begun()

    def _reading_body(self) -> bool:
        """The last request parsed has a body not yet whole (what is read goes to it)."""
        if self._messages:
            payload = self._messages[-1][1]
        elif self._current_request is not None:
            payload = self._current_request.content
        else:
            return False
        return payload is not EMPTY_PAYLOAD and not payload.is_eof()

    def waiting_for_head(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def head_idle(self) -> bool:
        """Nothing is queued or being answered: only the unfinished head is left."""
        return self.waiting_for_head()

    def head_begun(self) -> None:
        if self._head_handle is None and self._head_timeout > 0 and not self._force_close:
            self._head_handle = self._loop.call_later(self._head_timeout, self._head_expired)

    def head_ended(self) -> None:
        handle = self._head_handle
        if handle is not None:
            handle.cancel()
            self._head_handle = None

    def _head_expired(self) -> None:
        self._head_handle = None
        if self._force_close:
            return
        if not self.head_idle():
            self.head_begun()  # requests before the head are still being answered: again later
            return
        log.debug("a request head from %s was not whole within %gs (client_header_timeout): "
                  "connection closed", self.peername, self._head_timeout)
        self.head_timed_out(self._head_timeout)
        self.force_close()

    def head_timed_out(self, timeout: float) -> None:
        """A head was not whole within ``timeout`` seconds: its connection closes next, with
        nothing answered. The proxy listener logs and counts it; here, nothing more."""


def empty_lines(data: bytes) -> bool:
    r"""Whether ``data`` is only CR and LF bytes: before a request line, no head begun (RFC 9112
    §2.2: a server SHOULD ignore at least one empty line received before the request-line; some
    clients send a CRLF after a request's body). The first byte decides at once for a head.

    >>> empty_lines(b"\r\n"), empty_lines(b"\n"), empty_lines(b"GET /"), empty_lines(b"\r\nGET")
    (True, True, False, False)
    """
    return data[:1] in (b"\r", b"\n") and not data.strip(b"\r\n")


def unfinished_head(data: bytes) -> bool:
    """Whether ``data``, read after requests without a body, ends in a head not whole yet:
    anything but empty lines after its last head's end (``data`` may end one begun before)."""
    end = data.rfind(b"\r\n\r\n")
    return bool((data if end < 0 else data[end + 4:]).strip(b"\r\n"))


class LimitedHandler(HeadTimedHandler):
    """A connection of a listener that keeps at most ``max_connections`` open and aborts replies
    its client does not read (both listeners: the client one with ``max_connections`` and
    ``send_timeout`` from the config, the admin one with its own fixed limits).

    When one more connection comes than ``max_connections``, the oldest one that is only waiting
    for its client (``waits_for_client``: idle, a head unfinished, a body still coming, a reply
    the client does not read) is closed to make room, else the new one. So connections someone
    opens by the thousand cannot run the process out of file descriptors, nor lock out a client
    that comes later: only a request that arrived whole and is being answered (or queued to be)
    to a client that reads keeps its place. A reply whose writes stay paused (the transport's
    buffer over its high-water mark, the client reading nothing) for ``send_timeout`` seconds
    has its connection aborted (nginx: ``send_timeout``): without it, each such connection held
    what its reply had left to send for as long as the client kept it open.

    Cost: a timer only when the transport pauses writing; at each new connection a length
    comparison, and a walk over the connections only once over the cap. ``limited`` says what
    happened (the listener logs and counts it)."""

    __slots__ = ("_finished", "_max_connections", "_send_handle", "_send_timeout", "_started")

    def __init__(self, manager: web.Server, *, max_connections: int, send_timeout: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._max_connections = max_connections
        self._send_timeout = send_timeout
        self._send_handle: asyncio.TimerHandle | None = None
        # Requests aiohttp's loop took from its queue (``LimitedServer``'s request factory) and
        # whose handling ended; the fast path's answers are neither.
        self._started = 0
        self._finished = 0

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_handle is None and self._send_timeout > 0:
            self._send_handle = self._loop.call_later(self._send_timeout, self._send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_ended()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._send_ended()
        super().connection_lost(exc)

    def _send_ended(self) -> None:
        handle = self._send_handle
        if handle is not None:
            handle.cancel()
            self._send_handle = None

    def _send_expired(self) -> None:
        self._send_handle = None
        if not self.not_reading():
            return
        log.debug("a reply to %s could not be sent for %gs (the client reads nothing; send_timeout): "
                  "connection aborted", self.peername, self._send_timeout)
        self.limited("send_timeout")
        self.drop()

    def not_reading(self) -> bool:
        """Replies are waiting for the client to read: the transport paused writing, or holds
        more than its high-water mark."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self.writing_paused:
            return True
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    def drop(self) -> None:
        """Close the connection now. One whose client reads nothing is aborted: a plain close
        waits for the write buffer to drain, which would keep its file descriptor for good."""
        if self.not_reading() and self.transport is not None:
            self.transport.abort()
        self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is None or len(manager._connections) <= self._max_connections:
            return
        # Closed ones stay listed until their connection_lost, which comes later: a burst of
        # connections accepted at once would otherwise pick the same one again and again.
        live = [c for c in manager._connections if isinstance(c, LimitedHandler) and not c._force_close]
        if len(live) <= self._max_connections:
            return
        for other in live:  # oldest first (a dict keeps the order they came)
            if other is not self and other.waits_for_client():
                log.debug("more than %d connections: the oldest waiting for its client, from %s, "
                          "closed", self._max_connections, other.peername)
                self.limited("cap_oldest")
                other.drop()
                return
        log.debug("more than %d connections, all busy: %s closed", self._max_connections, self.peername)
        self.limited("cap_refused")
        self.force_close()

    def limited(self, what: str) -> None:
        """A limit closed a connection: ``send_timeout`` (this one's reply unread), ``cap_oldest``
        (an older one, to admit this one), ``cap_refused`` (this one, all others busy). The
        admin listener only logs it (at DEBUG, above); the client listener counts it too."""

    def waits_for_client(self) -> bool:
        """Nothing to answer yet, or nothing more to answer: no request, or one whose body is
        still coming (a login whose body never comes, too), or replies the client does not read
        (pipelined requests from a client that reads nothing: a reply stuck writing is not being
        answered, it waits for the client). Not a request that arrived whole and is being
        answered (a purge, a reload, a miss), nor one queued to be."""
        if self.not_reading():
            return True
        if self._request_in_progress:  # (set from the handler's call to the reply's end)
            request = self._current_request
            return request is not None and not request.content.is_eof()
        # A request taken from the queue, its handler not begun yet (a task that starts on the
        # next turn of the loop), is being answered as much as one whose handler runs: closing
        # its connection made it lose its answer, not its action.
        if self._started != self._finished:
            return False
        messages = self._messages
        return not messages or not messages[0][1].is_eof()  # (the next one's body is still coming)

    async def _handle_request(self, request: web.BaseRequest, start_time: float | None,
                              request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                              ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._finished += 1


class CappedHandler(LimitedHandler):
    """A connection of the admin listener (``LimitedHandler``'s limits). A request aiohttp's
    parser refuses is answered like every admin error, ``{"error": "..."}`` (``handle_error``);
    one on a connection closed before its handler began is not handled."""

    __slots__ = ("_server_header",)

    def __init__(self, manager: web.Server, *, server_header: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server_header = server_header  # the operator's Server field, not aiohttp's

    async def _handle_request(self, request: web.BaseRequest, start_time: float | None,
                              request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                              ) -> tuple[web.StreamResponse, bool]:
        """Run the handler, unless the connection was closed (``drop``, ``force_close``) after
        the request was queued: aiohttp still takes it from the queue and runs it, so a reload
        or a purge was done with no one to tell (the client saw its connection closed with
        nothing answered, and may send it again)."""
        if self._force_close:
            self._finished += 1
            raise ConnectionResetError("connection closed before its request was handled")
        return await super()._handle_request(request, start_time, request_handler)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request the parser refused: JSON saying why, the connection closed, one DEBUG line
        (aiohttp's own answer is text with a traceback in the log). Its own 500s stay aiohttp's."""
        if status == 500 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        text = str(exc.message)
        if isinstance(exc, LineTooLong) and f"more than {self.max_line_size} bytes" in text:
            status, why = 414, (f"the request line (method, URL, version) is over {self.max_line_size:,} "
                                "bytes, the admin listener's limit")
        elif isinstance(exc, LineTooLong):
            status, why = 431, (f"a header field is over {self.max_field_size:,} bytes, the admin "
                                "listener's limit")
        else:
            first = text.strip().strip("'\"").splitlines()[0].rstrip(":") if text.strip() else repr(exc)
            why = f"the request could not be parsed: {first}"
        log.debug("admin request from %s refused by the parser: %s", self.peername, text)
        response = web.json_response({"error": why}, status=status,
                                     headers={"Server": self._server_header()})
        response.force_close()
        return response


class LimitedServer(web.Server):
    """``web.Server`` whose connections are ``LimitedHandler``s: each request aiohttp's loop
    takes from a connection's queue is noted on it (``LimitedHandler.waits_for_client``), by
    the request factory (the general path only: the fast path's answers never get there). A
    subclass's own ``_make_request`` counts it itself (no call more per request)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        factory: Callable[..., web.BaseRequest] | None = kwargs.get("request_factory")
        if factory is None:
            return

        def taken(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
            if isinstance(protocol, LimitedHandler):
                protocol._started += 1
            return factory(message, payload, protocol, writer, task)

        self.request_factory = taken

    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
                      ) -> web.BaseRequest:
        if isinstance(protocol, LimitedHandler):
            protocol._started += 1
        return super()._make_request(message, payload, protocol, writer, task)


class CappedServer(LimitedServer):
    """``LimitedServer`` whose connections are ``CappedHandler``s; ``head_timeout`` and
    ``server_header`` are read at each new connection (or answer), so a reload applies."""

    def __init__(self, handler: Any, *, head_timeout: Callable[[], float], max_connections: int,
                 server_header: Callable[[], str], send_timeout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._head_timeout_of = head_timeout
        self._max = max_connections
        self._server_header = server_header
        self._send_timeout = send_timeout

    def __call__(self) -> RequestHandler:
        return CappedHandler(self, loop=self._loop, head_timeout=float(self._head_timeout_of()),
                             max_connections=self._max, server_header=self._server_header,
                             send_timeout=self._send_timeout, **self._kwargs)


__all__ = ["CappedHandler", "CappedServer", "HeadTimedHandler", "LimitedHandler", "LimitedServer",
           "empty_lines", "unfinished_head"]
