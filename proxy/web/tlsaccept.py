"""A TLS listener's accepting: plain HTTP told from a handshake, and the handshake's time limit.

A TLS listener accepts its connections itself rather than through ``create_server(ssl=...)``,
for things that must happen before the handshake:

- The first bytes are peeked at (``MSG_PEEK``: nothing is consumed, the TLS layer then reads
  them as it would have). A handshake starts with a TLS record (0x16); a connection whose first
  byte is a letter sends a plain HTTP request line (an ``http://`` URL for an ``https://``
  port). It used to get an empty reply (curl: "Empty reply from server") and no log line at
  all; it now gets a plain ``400 Bad Request``, "The plain HTTP request was sent to HTTPS port"
  (nginx's words), is closed, and is logged at INFO (at most ``PLAIN_LINES`` a minute, the rest
  counted). Anything else goes to the TLS layer, which refuses it as before.
- The handshake's time limit is ``client_header_timeout`` read from the live settings at each
  accept (nginx bounds its handshakes by it too), counted from the accept: a reload that
  lowers it applies to the next connections. ``create_server`` fixes it when the listener
  starts.

- Connections before their handshake's end count against the listener's ``max_connections``
  (``TLSAcceptor._make_room``): the oldest of them is closed when one more would pass it.

The handshake itself and everything after are the event loop's own TLS
(``connect_accepted_socket``: uvloop's, in C, under ``cachegate run``). What this adds is a
peek and two callbacks per connection; nothing per request.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger("cachegate.tls")

_PLAIN_HTTP_BODY = b"400 Bad Request: the plain HTTP request was sent to HTTPS port\n"

# How long a TLS connection cachegate closes may take to hand a slow reader what is still
# buffered and exchange close_notify. The loop's TLS counts this from the close (default 30 s)
# and then drops what its buffers hold: a large response to a client reading ~40 KB/s lost its
# last ~400 KB over TLS, where plain HTTP (no limit on a slow reader) got all of it. 60 s, as
# nginx's send_timeout: a connection closed gracefully waits this long at most for the client's
# close_notify, holding a descriptor and ~57 KB, counted against max_connections meanwhile
# (``LimitedHandler.force_close``). A timeout's close with nothing left to send is an abort
# (``LimitedHandler.timed_out``, as nginx's quiet shutdown of a timed-out connection): silent
# clients closed by client_header_timeout waited here, uncounted, past the cap to the
# open-files limit. Telling that nothing is left to send needs the kernel's send queue too:
# uvloop's TLS transport does not count the TCP transport's buffer under it (an abort on its
# count cut responses to slow readers: ``LimitedHandler.unsent``). The listener's
# ``send_timeout`` (read at each accept; this is the acceptor's own default): the same bound on
# a client that reads nothing, before or after the close.
SSL_SHUTDOWN_TIMEOUT = 60.0


def plain_http_reply(server: str) -> bytes:
    """The 400 a plain HTTP request on a TLS port gets (``server``: the Server field, as every
    response carries it: printable ASCII, ``server_header``)."""
    return (b"HTTP/1.1 400 Bad Request\r\nServer: %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (server.encode("ascii", "replace"), len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY))
PLAIN_LINES = 10  # log lines a minute about plain HTTP on a TLS port (the rest counted)
ACCEPT_PAUSE = 1.0  # seconds accepting pauses when the process is out of descriptors (as asyncio)
# accept() errors that are about one connection (it went away before it was accepted).
_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


def first_bytes(head: bytes) -> Literal["http", "tls"]:
    """What a connection's first bytes start: an HTTP request line (a method is a token: a
    letter first), or anything else, for the TLS layer to take or refuse (a handshake record
    starts with 0x16, SSLv2's hello with a set high bit).

    >>> first_bytes(b"GET / HTTP/1.1"), first_bytes(b"\\x16\\x03\\x01"), first_bytes(b"\\x00")
    ('http', 'tls', 'tls')
    """
    return "http" if head[:1].isalpha() and head[:1].isascii() else "tls"


class PlainHTTPLog:
    """At most ``lines`` INFO lines a minute about plain HTTP sent to a TLS port; what is left
    out is counted and said on the next line logged."""

    def __init__(self, lines: int = PLAIN_LINES, clock: Callable[[], float] = time.monotonic) -> None:
        self.lines, self._clock = lines, clock
        self._since, self._left, self._skipped = -60.0, 0, 0

    def note(self, peer: str, port: int) -> None:
        now = self._clock()
        if now - self._since >= 60.0:
            self._since, self._left = now, self.lines
        if self._left <= 0:
            self._skipped += 1
            return
        self._left -= 1
        more = f" ({self._skipped} more left out of the log)" if self._skipped else ""
        self._skipped = 0
        log.info("plain HTTP from %s sent to the TLS listener on port %d: answered 400%s", peer, port, more)


class TLSAcceptor:
    """Accepts on ``socks`` (bound and listening: one address each), peeks, then hands each TLS
    connection to the loop's TLS with ``protocol_factory``; looks like an ``asyncio.Server`` to
    aiohttp's site (``sockets``, ``close``, ``wait_closed``)."""

    def __init__(self, socks: list[socket.socket], protocol_factory: Callable[[], asyncio.BaseProtocol],
                 context: ssl.SSLContext, handshake_timeout: Callable[[], float],
                 server_header: Callable[[], str] = lambda: "cachegate",
                 plain_log: PlainHTTPLog | None = None,
                 shutdown_timeout: Callable[[], float] = lambda: SSL_SHUTDOWN_TIMEOUT) -> None:
        self._loop = asyncio.get_running_loop()
        self._socks, self._factory, self._context = socks, protocol_factory, context
        self._timeout = handshake_timeout
        self._shutdown_timeout = shutdown_timeout
        self._plain_log = plain_log or PlainHTTPLog()
        self._server_header = server_header
        self._port = int(socks[0].getsockname()[1]) if socks else 0
        # Connections waiting for their first bytes: their deadline and the timer that closes them.
        self._waiting: dict[socket.socket, tuple[float, asyncio.TimerHandle]] = {}
        # Every connection before its handshake ends (its task, once it began), oldest first:
        # counted against the listener's ``max_connections`` (``_make_room``).
        self._pending: dict[socket.socket, tuple[float, asyncio.Task[None] | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        for sock in socks:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else tuple(self._socks)

    def close(self) -> None:
        """Stop accepting; connections still before their handshake are closed (as a stopping
        listener's queue is): they sent nothing a server could answer yet."""
        if self._closed:
            return
        self._closed = True
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for conn in list(self._waiting):
            self._drop(conn)

    async def wait_closed(self) -> None:
        return None

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(64):  # then let the loop run: other listeners, requests
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                # EMFILE and the like: retrying at once would spin; asyncio pauses a second too.
                log.error("TLS listener on port %d cannot accept: %s; pausing %gs", self._port, exc,
                          ACCEPT_PAUSE)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_PAUSE, self._resume, sock)
                return
            conn.setblocking(False)
            self._make_room()
            self._pending[conn] = (self._loop.time(), None)
            timeout = self._timeout()
            self._waiting[conn] = (self._loop.time() + timeout,
                                   self._loop.call_later(timeout, self._drop, conn))
            self._loop.add_reader(conn.fileno(), self._first_bytes, conn)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _forget(self, conn: socket.socket) -> float:
        deadline, timer = self._waiting.pop(conn)
        timer.cancel()
        self._loop.remove_reader(conn.fileno())
        return deadline

    def _drop(self, conn: socket.socket) -> None:
        if conn in self._waiting:
            self._forget(conn)
        self._pending.pop(conn, None)
        conn.close()

    def _make_room(self) -> None:
        """A connection was accepted: when it makes more than the listener's ``max_connections``
        (those served and those before their handshake ends), the oldest before its handshake's
        end is closed, as the cap closes the oldest waiting for its client (a handshake waits for
        the client). Without it a TLS listener's cap counted only handshaken connections, and
        raw TCP connections that never begin one held a descriptor each for
        ``client_header_timeout`` whatever the cap (100 of them: +100 descriptors). A served
        connection waiting for its client (idle, ...: ``LimitedServer.make_room``) goes instead
        when it is the older. When neither is left, the new one is let through (its handler
        refuses it if need be)."""
        room = getattr(self._factory, "make_room", None)
        oldest = next(iter(self._pending.values()))[0] if self._pending else 0.0
        if not callable(room) or room(len(self._pending), oldest) or not self._pending:
            return
        conn, (_, task) = next(iter(self._pending.items()))
        log.debug("more than max_connections on port %d: the oldest before its TLS handshake's end "
                  "closed", self._port)
        closed = getattr(self._factory, "closed_before_handshake", None)
        if callable(closed):
            closed()
        if task is None:
            self._drop(conn)
        else:
            del self._pending[conn]
            task.cancel()  # (the loop's TLS aborts a connection closed mid-handshake)

    def _first_bytes(self, conn: socket.socket) -> None:
        try:
            head = conn.recv(8, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not head:  # closed before it sent anything
            self._drop(conn)
            return
        deadline = self._forget(conn)
        if first_bytes(head) == "http":
            self._plain_http(conn)
            return
        task = self._loop.create_task(self._handshake(conn, max(deadline - self._loop.time(), 0.001)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._pending[conn] = (self._pending.get(conn, (self._loop.time(), None))[0], task)
        task.add_done_callback(functools.partial(self._handshaken, conn))

    def _handshaken(self, conn: socket.socket, _: asyncio.Task[None]) -> None:
        self._pending.pop(conn, None)

    def _plain_http(self, conn: socket.socket) -> None:
        """Answer 400 and close. What the client sent is read first (as much as has come): a
        close with unread bytes would reset the connection, and the client might never see the
        answer."""
        self._pending.pop(conn, None)
        try:
            peer = conn.getpeername()
            conn.recv(64 * 1024)
            # A few bytes into an empty send buffer: never partial.
            conn.send(plain_http_reply(self._server_header()))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            peer = None
        if peer is not None:
            self._plain_log.note(str(peer[0]), self._port)
        conn.close()

    async def _handshake(self, conn: socket.socket, within: float) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._context,
                                                     ssl_handshake_timeout=within,
                                                     ssl_shutdown_timeout=self._shutdown_timeout())
        except (OSError, TimeoutError) as exc:
            # Refused or cut by the TLS layer (not TLS, no common cipher, too slow): it closed
            # the connection. Logged as asyncio's own server does: at debug.
            log.debug("TLS handshake on port %d failed: %r", self._port, exc)
