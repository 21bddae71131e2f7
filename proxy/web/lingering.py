"""The lingering close of a client connection, for both listeners (nginx: ``lingering_close on``,
``lingering_time``, ``lingering_timeout``).

Why: cachegate answers some requests while their client is still sending, then closes the
connection: a body that came too slowly (408), one the parser refused mid-upload (400, 431), one
over the admin API's limit (413), a head over ``max_request_head`` (431), bytes after a refused
request. Closed at once, the socket still had the client's unread bytes in its receive queue, or
got more after: the kernel answers either with a TCP reset. The reset drops whatever of the reply
the kernel had not sent yet, and at the client it fails the next send (curl: "Send failure:
Connection reset by peer") or the read (asyncio: ConnectionResetError, and what was read with
it), so the client saw a reset instead of the answer that says why (a stalled upload's 408 in
tests/security/test_stalled_upload.py, on a loaded machine).

What: once such a reply is handed to the transport, the connection is half-closed (its FIN goes
out after the reply: ``write_eof``), and its transport is handed to ``Lingering``, which reads
what the client still sends and drops it at once (never parsed, never kept: a read's bytes are
freed as soon as they are counted as heard), until the client closes its side (its FIN; then the
close is clean, and the client has its whole reply), nothing arrives for ``lingering_timeout``
(5 s), or ``lingering_time`` (30 s) has passed; then the connection is closed as a limit closes
one (``LimitedHandler.drop``: a plain close, the reply being out). Both count from when the reply
is out (``LimitedHandler.reply_out``: nothing of it in the transport, nor unsent in the kernel's
queue), as nginx lingers only once its whole response is written: from the hand-over, a long
reply read slowly by a client that sends nothing outlasted them, and the close reset it with
megabytes unsent. Until then the reply is bounded as any other: ``send_timeout`` resets the
connection of a client that stops reading it.
``LimitedHandler`` decides when (``input_pending``: a body not whole, bytes dropped unparsed,
requests queued behind, bytes unread in the kernel) and begins it (``linger``); every close of
a connection whose client may still be sending after a reply goes through there.

Bounds: a lingering connection keeps its place among the listener's connections (aiohttp's
server lists it until the transport is lost): it counts against ``max_connections``, and the
cap closes it first when it needs room (its reply is out, it only waits for its client). A stop
closes it at once, as an idle connection (aiohttp's shutdown closes every connection whose
request is done), and none begins once the listener is stopping. Memory: this object and a
timer; the bytes of one read at a time.

Over TLS there is no TCP half-close (asyncio's TLS transports have none): once the reply is
out, the connection says its ``close_notify`` (``close_notify``: the TLS layer's close), as
nginx does before it lingers, so that a client reading to the end of the connection has a clean
end at once; the TLS layer then reads and drops what the client still sends until the client's
own close_notify or the end of its connection, and the lingering close's clocks bound it as
over TCP, the client's silence as the kernel counts it (``heard_ago``: the TLS layer keeps its
reads). Before the lingering close, the ``close_notify`` closed the connection and a client
still sending met a closed one ("EOF occurred in violation of protocol" on its send); the first
lingering close said none and ended with an abort, so a client reading to the end got that
error after ``lingering_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.web.headtimeout import LimitedHandler


class Lingering(asyncio.Protocol):
    """The protocol of a connection in its lingering close: it hears what the client sends and
    drops it; ``handler`` (the connection's ``LimitedHandler``) still owns the connection, hears
    its writes pause and resume (the reply may still be going out) and its loss, says when the
    reply is out (``reply_out``), and is told when the time is up (``lingered``).

    The clocks start once the reply is out (``begin``, ``_out``): not when it was handed to the
    transport, with megabytes of it still in the kernel's send queue for a client that reads
    slowly and sends nothing. Started then, they ran out while the reply was still being read,
    and the close reset the connection with the end of the reply unsent. Until it is out, the
    reply is bounded as any other (``send_timeout``: a client that stops reading it)."""

    __slots__ = ("_deadline", "_handler", "_heard", "_loop", "_time", "_timeout", "_timer", "_unheard")

    def __init__(self, handler: LimitedHandler, loop: asyncio.AbstractEventLoop, time: float,
                 timeout: float) -> None:
        self._handler = handler
        self._loop = loop
        self._time = time
        self._timeout = timeout
        self._deadline = self._heard = 0.0  # (from when the reply is out: ``_out``)
        # What the client sends is read by the TLS layer, which drops it after its close_notify:
        # when it last came is the kernel's to say (``heard_ago``).
        self._unheard = False
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """The transport is this protocol's: the clocks start once the reply is out."""
        self._out()

    def _out(self) -> None:
        """Whether the reply is out; if so the clocks start (and a TLS connection says its
        close_notify: ``close_notify``), else looked at again a sample later."""
        self._timer = None
        handler = self._handler
        if not handler.reply_out():
            self._timer = self._loop.call_later(handler.sample_every(), self._out)
            return
        now = self._loop.time()
        self._deadline = now + self._time
        self._heard = now  # (the reply's end, at first)
        transport = handler.transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            close_notify(transport)
            self._unheard = True
        self._timer = self._loop.call_at(min(self._deadline, now + self._timeout), self._expired)

    def data_received(self, data: bytes) -> None:
        self._heard = self._loop.time()  # (and ``data`` dropped: never parsed, never kept)

    def eof_received(self) -> bool:
        return False  # the client closed its side: the transport closes, cleanly

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.cancel()
        self._handler.connection_lost(exc)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        """Nothing heard for ``lingering_timeout``, or ``lingering_time`` over: the connection
        closes. Else looked at again when the later of the two can first run out (one timer,
        not one per read)."""
        self._timer = None
        now = self._loop.time()
        if self._unheard:
            ago = heard_ago(self._handler.transport)
            if ago is not None:
                self._heard = max(self._heard, now - ago)
        end = min(self._deadline, self._heard + self._timeout)
        if now < end:
            self._timer = self._loop.call_at(end, self._expired)
            return
        self._handler.lingered()


def close_notify(transport: asyncio.BaseTransport) -> None:
    """End a TLS connection whose reply is out as nginx does before it lingers: its close_notify
    (the TLS layer's close), so that a client reading to the end of the connection has a clean
    end at once. The loop's TLS layer then waits for the client's close_notify or the end of its
    connection (at most its shutdown timeout, the listener's ``send_timeout``), reading and
    dropping what application data the client still sends, so its bytes never meet a closed
    socket (uvloop's does so; asyncio's own, in Python, ended the connection with an error,
    "application data after close notify", at the first such record: made to drop it too).

    Before, the lingering connection was aborted when it ended, with no close_notify: a client
    reading to the end got its reply, then "EOF occurred in violation of protocol" after
    ``lingering_timeout``."""
    protocol = getattr(transport, "_ssl_protocol", None)  # (asyncio's own TLS; uvloop's is C)
    shutdown = getattr(protocol, "_do_shutdown", None)
    if protocol is not None and callable(shutdown) and hasattr(protocol, "_sslobj"):

        def dropping_first() -> None:
            tls = protocol._sslobj
            if tls is not None and not getattr(protocol, "_eof_received", False):
                with contextlib.suppress(ssl.SSLError):  # (the client's close_notify ends it, too)
                    while tls.read(TLS_READ):
                        pass
            shutdown()

        protocol._do_shutdown = dropping_first
    transport.close()


TLS_READ = 64 * 1024  # a read of what the client sends after cachegate's close_notify (dropped)

# ``struct tcp_info`` (linux/tcp.h): ``tcpi_last_data_recv``, milliseconds since data last came.
TCP_INFO_SIZE = 56
LAST_DATA_RECV = 52


def heard_ago(transport: asyncio.BaseTransport | None) -> float | None:
    """Seconds since the client last sent anything, as the kernel counts (``TCP_INFO``); None
    when it cannot be asked."""
    sock = None if transport is None else transport.get_extra_info("socket")
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, TCP_INFO_SIZE)
    except (OSError, ValueError):
        return None
    if len(info) < TCP_INFO_SIZE:
        return None
    return float(struct.unpack_from("I", info, LAST_DATA_RECV)[0]) / 1000


__all__ = ["Lingering", "close_notify", "heard_ago"]
