"""A time limit on request heads, for both listeners (nginx: ``client_header_timeout``).

aiohttp closes a connection whose handler waits for a request only when its keep-alive timer
runs out, and nothing bounds how long one request head may take to arrive: a client that
opens connections and sends a head a few bytes at a time (slowloris), or never finishes it,
holds a file descriptor each for as long as that timer lets it. ``HeadTimedHandler`` closes
the connection when a head is not whole ``head_timeout`` seconds after it began: after the
connection opened, for the first request; after its first byte, for the next ones (the time
in between is the keep-alive timeout's; empty lines there begin no head, RFC 9112 §2.2:
``empty_lines``; once a byte of the next head has come, the keep-alive timer leaves the
connection to this one: ``head_pending``). Nothing is answered (as nginx: the client never
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
import contextlib
import fcntl
import gc
import logging
import socket
import struct
import termios
from collections.abc import Awaitable, Callable, Iterable
from operator import attrgetter
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.logs import Summarised
from proxy.paused import PAUSE_GRACE, late
from proxy.policy.request import LineOpen, simple_request
from proxy.room import human_size
from proxy.web.heads import from_response
from proxy.web.lingering import Lingering
from proxy.web.refusals import refusal_logged
from proxy.web.tlsslices import SlicedTLS

log = logging.getLogger("cachegate.server")

# The parser's words for an HTTP/0.9 request (``first_line``), as ``refusal_reason`` knows them.
SIMPLE_REQUEST = "HTTP/0.9 request: a request line without a version"


class Discarding:
    """A connection's parser once a request closing it was parsed with bytes after it: those and
    whatever else arrives are ignored (RFC 9112 §9.6), never answered 400."""

    def feed_data(self, data: bytes) -> tuple[tuple[()], bool, bytes]:
        return (), False, b""

    def feed_eof(self) -> None:
        return None

    def message_consumed(self) -> None:
        pass

    def set_upgraded(self, value: bool) -> None:
        pass

    def pause_reading(self) -> None:
        pass


class HeadTimedHandler(RequestHandler):
    """aiohttp's ``RequestHandler`` with a limit on how long one request head may take."""

    __slots__ = ("_head_handle", "_head_open", "_head_timeout", "_line", "_unread")

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_handle: asyncio.TimerHandle | None = None
        # Bytes of a request head came since the last request (``head_begun``): the connection
        # is not idle, its head timer governs it, not the keep-alive one (``head_pending``).
        self._head_open = False
        # Bytes the client sent were dropped unparsed (a refused upgrade's, a refused request's
        # and what follows it): it may still be sending when the connection closes, which then
        # lingers (``LimitedHandler.input_pending``).
        self._unread = False
        # The start of an unfinished head's request line, while it may still be an HTTP/0.9 one
        # (``first_line``); b"": a head starts at the next byte; None: settled, or not known.
        self._line: bytes | None = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timed()  # (the first head is timed from the opening, before any byte of it)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_ended()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        body = self._body_coming() if data else None
        had = 0 if body is None else body[1].total_bytes
        super().data_received(data)
        self.head_checked(before, data, body, had)

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
        self._unread = True  # (the tunnel's bytes may still be coming: the close lingers)
        if isinstance(resp, web.StreamResponse):  # (aiohttp answers 500 for anything else)
            resp.force_close()  # its head says Connection: close, if not written yet
        self.close()  # nothing more is read

    def head_checked(self, before: int, data: bytes, body: tuple[Any, Any] | None = None,
                     had: int = 0) -> None:
        """After a chunk ``data`` was parsed (``before``: the request count before it; ``body``:
        the request (message, payload) whose body was still coming when it arrived, ``had``:
        the bytes of that body read before it)."""
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
        elif not data or self._reading_body():
            return
        elif body is None:
            if not empty_lines(data):  # (empty lines begin no head: a server ignores them)
                self.head_begun()
        else:
            # The read ended the body: the next head begun behind it, after pipelined bytes
            # (a head begun there was left to the keep-alive timer, which closed it unanswered).
            self.body_ended(after_body(data, *body, had))

    def first_line(self, start: bytes) -> None:
        """``start``, the beginning of a head not whole yet: refused at once if its request line
        has ended without a version (an HTTP/0.9 simple request: ``simple_request``), else kept
        in ``_line`` while that is not settled. Each listener's handler calls it where it knows
        a head begins and only for reads that leave a head unfinished (the client listener's
        ``ProxyRequestHandler._count``, the admin one's ``CappedHandler.head_checked``)."""
        if self._close or self._force_close or self._parser is None or self._unread:
            return  # (``_unread``: nothing more is parsed on this connection)
        found = simple_request(start)
        if isinstance(found, LineOpen):
            self._line = found.kept
        elif found:
            log.debug("an HTTP/0.9 request from %s: 400, connection closed", self.peername)
            self.refuse_simple_request(BadHttpMessage(SIMPLE_REQUEST))
            self.head_ended()

    def refuse_simple_request(self, exc: HttpProcessingError) -> None:
        """The 400 for ``exc`` queued after the requests before it, as aiohttp queues a request
        its parser refused (``handle_error`` answers it and closes the connection), and nothing
        more parsed (``discard_rest``)."""
        self.discard_rest()
        self._messages.append((_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD))
        self._request_count += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def discard_rest(self) -> None:
        """Nothing more on this connection is parsed: what comes is dropped (``Discarding``), and
        the connection's close after its refusal lingers (``LimitedHandler.input_pending``)."""
        self._parser = Discarding()  # type: ignore[assignment]
        self._unread = True

    def body_ended(self, rest: bytes) -> None:
        """A read ended the body being read; ``rest``: its bytes after that body's end (b"" when
        not known). Unless empty lines, they begin the next head."""
        if rest and not empty_lines(rest):
            self.head_begun()

    def _body_coming(self) -> tuple[Any, Any] | None:
        """The request (its message, its payload) whose body is not whole yet, if the last one
        parsed has one: what is read goes to it."""
        if self._messages:
            message, payload = self._messages[-1]
        elif self._current_request is not None:
            request = self._current_request
            message, payload = request._message, request.content
        else:
            return None
        return None if payload is EMPTY_PAYLOAD or payload.is_eof() else (message, payload)

    def _reading_body(self) -> bool:
        """The last request parsed has a body not yet whole (what is read goes to it)."""
        return self._body_coming() is not None

    def waiting_for_head(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def head_idle(self) -> bool:
        """Nothing is queued or being answered: only the unfinished head is left."""
        return self.waiting_for_head()

    def head_begun(self) -> None:
        """Bytes of a request head came, and it is not whole yet: timed from the first of them."""
        self._head_open = True
        self._head_timed()

    def _head_timed(self) -> None:
        if self._head_handle is None and self._head_timeout > 0 and not self._force_close:
            self._head_handle = self._loop.call_later(self._head_timeout, self._head_expired)

    def head_pending(self) -> bool:
        """A head begun (some of its bytes came) is being timed: the keep-alive timer leaves the
        connection to the head timer (nginx: once bytes of the next request arrive, it is
        client_header_timeout's, not keepalive_timeout's)."""
        return self._head_open and self._head_handle is not None

    def head_ended(self) -> None:
        self._head_open = False
        handle = self._head_handle
        if handle is not None:
            handle.cancel()
            self._head_handle = None

    def _head_expired(self) -> None:
        self._head_handle = None
        if self._force_close:
            return
        if not self.head_idle():
            self._head_timed()  # requests before the head are still being answered: again later
            return
        log.debug("a request head from %s was not whole within %gs (client_header_timeout): "
                  "connection closed", self.peername, self._head_timeout)
        self.head_timed_out(self._head_timeout)
        self.timed_out()

    def head_timed_out(self, timeout: float) -> None:
        """A head was not whole within ``timeout`` seconds: its connection closes next, with
        nothing answered. The proxy listener logs and counts it; here, nothing more."""

    def timed_out(self) -> None:
        """Close the connection a timeout ended (client_header_timeout; keepalive_timeout too,
        in ``LimitedHandler``, which decides how)."""
        self.force_close()


def empty_lines(data: bytes) -> bool:
    r"""Whether ``data`` is only CR and LF bytes: before a request line, no head begun (RFC 9112
    §2.2: a server SHOULD ignore at least one empty line received before the request-line; some
    clients send a CRLF after a request's body). The first byte decides at once for a head.

    >>> empty_lines(b"\r\n"), empty_lines(b"\n"), empty_lines(b"GET /"), empty_lines(b"\r\nGET")
    (True, True, False, False)
    """
    return data[:1] in (b"\r", b"\n") and not data.strip(b"\r\n")


def after_body(data: bytes, message: Any, payload: Any, had: int) -> bytes:
    r"""The bytes of ``data``, a read that ended the body of ``message`` (``payload``, which had
    ``had`` bytes before it), after that body's end: pipelined bytes of the next request.
    Chunked, the body ends with its last chunk and trailers, a CRLF CRLF (the last in ``data``:
    a head not whole has none); by Content-Length, at the bytes it lacked. b"" when not known
    (a body aiohttp decodes, ``Content-Encoding``: it counts the decoded bytes).

    >>> class P: total_bytes = 5
    >>> class M: chunked, compression = False, None
    >>> after_body(b"cdeGET /", M, P, 2)
    b'GET /'
    >>> M.chunked = True
    >>> after_body(b"a\r\n\r\n0\r\n\r\nGET /", M, P, 0)
    b'GET /'
    """
    if message.chunked:
        end = data.rfind(b"\r\n\r\n")
        return data if end < 0 else data[end + 4:]
    if getattr(message, "compression", None):
        return b""
    return data[payload.total_bytes - had:]


def unfinished_head(data: bytes) -> bool:
    """Whether ``data``, read after requests without a body, ends in a head not whole yet:
    anything but empty lines after its last head's end (``data`` may end one begun before)."""
    end = data.rfind(b"\r\n\r\n")
    return bool((data if end < 0 else data[end + 4:]).strip(b"\r\n"))


# How long a paused reply must have made no progress (nothing its client acknowledged) for the
# cap to count it as waiting for its client. A client that reads acknowledges within a round
# trip, and TCP's own timers (delayed ACK 40-200 ms, retransmission at least 200 ms) are well
# under it; a second gives a client that reads a few KB a few times a second its place, while a
# connection that stopped reading is closable a second after it stopped (send_timeout still
# bounds it on its own).
CAP_STALLED = 1.0

# How long after ``CAP_STALLED`` the cap looks again at a connection it held over
# ``max_connections`` (``LimitedHandler._hold``): past the found replies' second of samples.
HOLD_MARGIN = 0.05

# The bytes of a socket's send queue not sent yet (linux/sockios.h; ``termios`` has only
# ``TIOCOUTQ``, which counts those in flight too).
SIOCOUTQNSD = 0x894B


class LimitedHandler(HeadTimedHandler):
    """A connection of a listener that keeps at most ``max_connections`` open and aborts replies
    its client does not read (both listeners: the client one with ``max_connections`` and
    ``send_timeout`` from the config, the admin one with its own fixed limits).

    When one more connection comes than ``max_connections``, the oldest one that is only waiting
    for its client (``waits_for_client``: idle, a head unfinished, a body still coming) is
    closed to make room, else the oldest whose reply its client stopped reading
    (``reply_stalled``: nothing acknowledged for ``CAP_STALLED`` seconds), else the new one. So
    connections someone opens by the thousand cannot run the process out of file descriptors,
    nor lock out a client that comes later: a request that arrived whole and is being answered
    (or queued to be), and a reply its client read some of within the last ``CAP_STALLED``
    second, keep their place (the last second counts, not the pace: a client reading in bursts
    further apart has stalled between two). A
    paused reply that made no progress (``unsent`` did not shrink) for ``send_timeout`` seconds
    has its connection reset (nginx: ``send_timeout``, between two successive writes): without
    it, each such connection held what its reply had left to send for as long as the client
    kept it open.

    A reply small enough to sit whole in the kernel's send queue (1 MB and more on loopback)
    never pauses the writes: the transport's buffer empties at once. Unread, it was neither
    timed out nor seen by the cap as a reply: the cap closed it as idle, with a plain close
    whose FIN waits behind the unsent bytes, an orphan socket holding them in the host's TCP
    memory for as long as the client kept its end (15 such connections: 14.9 MB). So a
    connection whose kernel queue holds bytes it could not send (its client's window full)
    has a reply in progress (``reply_pending``): the cap closes it only as a stalled one, and
    every close of such a connection by a limit is a reset (``drop``). Such a queue is found
    by the keep-alive timer, which fires every ``check_every`` (half ``send_timeout``) rather
    than only at the keep-alive timeout, and looks at it once (``_process_keepalive``); by the
    cap, which looks at a connection it would close as idle; and once a paused reply resumes,
    its sampling goes on until the queue is empty. Only a queue found so is sampled, as a
    paused reply is: its ``send_timeout`` counts from when it is found (so it is reset about
    ``1.5 × send_timeout`` after its last progress at most), and the keep-alive timeout's close
    of a connection whose queue did not move over the last sample is a reset too (a client
    still reading gets the graceful close once its reply is read, nothing lost).

    A reply found in the kernel's queue only by the cap's walk (or the keep-alive timer less
    than ``CAP_STALLED`` before) has just begun its samples: its client may have stopped reading
    long ago, yet it looks moved for a second, and the new connection was refused although
    every slot was held by replies unread for seconds. So when the walk closes nothing but such
    replies are there, the new connection is held (served as usual) and the cap decides again
    ``CAP_STALLED`` later (``_hold``, ``_held_expired``): the oldest waiting then, else the new
    one (reset if mid-reply). A reply still read keeps its place (its queue moved between the
    two looks). At most as many connections are held at once as there are such replies, never
    more than the cap (``LimitedServer.held``); past that, new ones are refused at once.

    Cost: while a reply is pending (the writes paused, or the kernel queue not empty), a timer
    every ``CAP_STALLED / 2`` seconds and a measure (two ioctl-cheap calls) when it fires;
    per connection, the keep-alive timer every ``check_every`` seconds instead of once per
    keep-alive timeout, with one ``SIOCOUTQNSD`` ioctl each time; nothing per request: none of
    this runs within one, nor when a reply the client reads at once leaves the queue empty
    (``scripts/bench_calls.py``, calls per request, two runs before / three after: hit-1k
    45.80, 45.81 / 45.72, 45.96, 45.68; pass-1k 415.8, 418.3 / 420.2, 419.6, 416.6, the
    spread of the runs); at each new connection a length comparison and the keep-alive timer
    armed again, and a walk over the connections only once over the cap (with one ioctl for
    each it would close as idle, or that is being sampled; when it closes nothing, one pass
    more counting the replies just found, and a timer for a connection held). On a TLS
    connection, whose writes its TLS layer does not pause for a reply waiting in the TCP
    transport under it, a look at that transport's buffer after each reply (``tls_written``:
    past its high-water mark, the reply is sampled as a paused one; the TCP transport found
    once, at the connection's start: ``tcp_under``); hit-1k, plain, 45.61 calls a request
    before and after. ``limited`` says what happened (the listener logs and counts it).

    A reply that closes the connection while its client may still be sending (``input_pending``)
    is followed by a lingering close (``proxy.web.lingering``: ``closed_after``, ``linger``), so
    that the client's next bytes are read and dropped rather than answered with a reset that can
    take the reply with it. Such a connection stays listed and counted (``counted``), and is the
    cap's first pick (``lingers``): its exchange is over.

    So does a connection whose close waits for its client (``force_close``: a TLS one's for its
    close_notify, up to ``send_timeout``), until its descriptor is freed: the cap picks it next
    once its reply is out (``close_under_way``). A timeout's close with nothing left to send
    does not wait: over TLS it is an abort (``timed_out``), as nginx closes a timed-out one."""

    __slots__ = ("_closing", "_finished", "_found_at", "_graced", "_half_closed", "_handled",
                 "_hold_handle", "_linger_for", "_lingering", "_max_connections", "_moved_at", "_opened",
                 "_raw", "_raw_high", "_send_handle", "_send_timeout", "_started", "_tls", "_unsent")

    def __init__(self, manager: web.Server, *, max_connections: int, send_timeout: float = 0.0,
                 lingering: tuple[float, float] = (0.0, 0.0), **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._max_connections = max_connections
        self._send_timeout = send_timeout
        # The keep-alive deadline a late timer's grace set (``_process_keepalive``): one grace per
        # deadline, not one more each time the grace's own timer is late too.
        self._graced = -1.0
        # lingering_time and lingering_timeout (either 0: no lingering close), and the close
        # under way (``linger``).
        self._linger_for = lingering
        self._lingering: Lingering | None = None
        self._half_closed = False  # the client shut its sending side (the client listener's ``eof_received``)
        self._send_handle: asyncio.TimerHandle | None = None
        # Requests aiohttp's loop took from its queue (``LimitedServer``'s request factory) and
        # whose handling ended; the fast path's answers are neither.
        self._started = 0
        self._finished = 0
        # The body of the last request whose handling ended: aiohttp may be reading the rest
        # of it in its lingering close (the client listener's ``_fail_body``). Noted here, in
        # the one wrapper of aiohttp's ``_handle_request``: a second one cost every request on
        # the general path two calls more.
        self._handled: Any = None
        # What the paused reply had left to send when last measured (``unsent``), and when it
        # was last seen to shrink (or the writes paused): its progress (``reply_moved``).
        self._unsent = 0
        self._moved_at = 0.0
        self._opened = self._loop.time()  # (a TLS connection's accept, near enough: its handshake's end)
        # When its reply was found in the kernel's queue alone (``reply_pending``): for
        # ``CAP_STALLED`` after, whether its client stopped reading is not known yet.
        self._found_at = -CAP_STALLED
        # The cap's second look at this connection, held over ``max_connections`` (``_hold``).
        self._hold_handle: asyncio.TimerHandle | None = None
        # The transport of a close under way that waits for the client (``force_close``).
        self._closing: asyncio.Transport | None = None
        # A TLS connection's TCP transport, under its TLS one (``connection_made``), and its
        # high-water mark: None for a plain one.
        self._raw: Any = None
        self._raw_high = 0
        # A TLS connection's transport, which hands large writes to its TLS layer in slices
        # (``proxy.web.tlsslices``): the handler's ``transport`` itself. None for a plain one.
        self._tls: SlicedTLS | None = None

    def pause_writing(self) -> None:
        tls = self._tls
        if tls is not None:
            tls.held = True
            if self._paused:
                return  # (paused still: the TLS layer paused again while the rest of a reply was fed)
        super().pause_writing()
        self._sampled(self.unsent())
        budget = self.unsent_budget()
        if budget is not None:
            budget.paused(self)

    def resume_writing(self) -> None:
        tls = self._tls
        if tls is not None:
            tls.held = False
            if tls.feed() or tls.held:
                return  # (the rest of a reply paused the TLS layer again: the writes stay paused)
        super().resume_writing()
        budget = self.unsent_budget()
        if budget is not None and not self.raw_held():  # (a TLS one: ``tls_written``)
            budget.resumed(self)

    def tls_written(self) -> None:
        """A TLS connection's reply was handed to its transport (the fast path's ``_send``, the
        end of a general one: ``finish_response``; only when ``_raw`` is set). The loop's TLS
        layer encrypts what it is given and hands it all to the TCP transport under it at once,
        and pauses the writes only for what it holds itself (past 512 KB): a reply handed over
        whole waits in the TCP transport's buffer (~1 MB of a 1 MB hit to a client that reads
        nothing) and the writes never pause. So a reply that left the TCP transport's buffer
        past its high-water mark counts as a paused one does (``pause_writing``): its progress
        sampled, what it holds in ``max_unsent``'s budget, until that buffer is back under the
        mark (``_send_expired``) or the connection is lost. A reply that leaves at once costs
        a buffer size here."""
        if self._paused or self._raw.get_write_buffer_size() <= self._raw_high:
            return
        if self._send_handle is None:  # (else sampled already: its progress is known)
            self._sampled(self.unsent())
        budget = self.unsent_budget()
        if budget is not None:
            budget.paused(self)

    def raw_held(self) -> bool:
        """A TLS connection's TCP transport holds more than its high-water mark."""
        raw = self._raw
        return raw is not None and raw.get_write_buffer_size() > self._raw_high

    def unsent_budget(self) -> UnsentBudget | None:
        """The listener's ``max_unsent`` (the client listeners'; the admin listener has none):
        asked only when the writes pause or resume, and at the connection's loss."""
        manager = self._manager
        return manager.unsent_budget if isinstance(manager, LimitedServer) else None

    def _sampled(self, unsent: int) -> None:
        """Progress is measured from now on (``unsent`` left to send), every ``sample_every``."""
        self._unsent = unsent
        self._moved_at = self._loop.time()
        if self._send_handle is None:
            self._send_handle = self._loop.call_later(self.sample_every(), self._send_expired)

    def sample_every(self) -> float:
        """How often a paused reply's progress is measured: half ``CAP_STALLED``, so the cap
        knows within that when its client last read (a measure finds only that it did, since
        the one before); at most ``send_timeout``."""
        every = CAP_STALLED / 2
        return min(every, self._send_timeout) if self._send_timeout > 0 else every

    def connection_lost(self, exc: BaseException | None) -> None:
        self._send_ended()
        self._hold_ended()
        budget = self.unsent_budget()
        if budget is not None:
            budget.resumed(self)
        super().connection_lost(exc)
        self._closing = None  # (gone from the server's list: counted no more)
        self._raw = self._tls = None

    def _send_ended(self) -> None:
        handle = self._send_handle
        if handle is not None:
            handle.cancel()
            self._send_handle = None

    def _send_expired(self) -> None:
        # Runs on after the writes resume: what the transport handed the kernel is still the
        # reply's until acknowledged (a client that stops reading then held it, unsent, as an
        # orphan once closed). The sampling ends when nothing is left to send.
        self._send_handle = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        moved = self.reply_moved(self.sample_every())
        if self._raw is not None and not self._paused and not self.raw_held():
            budget = self.unsent_budget()  # (a TLS reply counted since it was handed over: ``tls_written``)
            if budget is not None:
                budget.resumed(self)
        if self._unsent <= 0:
            return
        timeout = self._send_timeout
        if moved or timeout <= 0 or self._loop.time() - self._moved_at < timeout:
            # The client read some of it within send_timeout: it keeps its connection (nginx:
            # the timeout is between two successive writes, not for the whole reply).
            self._send_handle = self._loop.call_later(self.sample_every(), self._send_expired)
            return
        log.debug("a reply to %s could not be sent for %gs (the client reads nothing; send_timeout): "
                  "connection reset", self.peername, timeout)
        self.limited("send_timeout")
        self.drop()

    def check_every(self) -> float:
        """How often the keep-alive timer looks at the kernel's send queue (``_process_keepalive``):
        half ``send_timeout``, at most the keep-alive timeout (once per timeout, as aiohttp's)."""
        every = self._keepalive_timeout
        return min(every, self._send_timeout / 2) if self._send_timeout > 0 else every

    def _process_keepalive(self) -> None:
        """aiohttp's keep-alive timer, which also looks at the kernel's send queue every
        ``check_every`` seconds: a reply found there has its progress sampled (``reply_pending``),
        so ``send_timeout`` and the cap see it. At the keep-alive timeout, an idle connection
        whose queue did not move over the last sample is reset (``drop``): closed gracefully,
        its FIN waited behind the unsent bytes, an orphan socket holding them for as long as the
        client kept its end. One whose client is still reading (or whose queue was only just
        found) is looked at again a sample later: closed gracefully once its reply is read,
        nothing lost. One whose next head has begun (``head_pending``) is not idle: its head
        timer (client_header_timeout) governs it from its first byte."""
        self._keepalive_handle = None
        if self._force_close or not self._keepalive:
            return
        loop = self._loop
        now = loop.time()
        close_time = self._next_keepalive_close_time
        sampled = self._send_handle is not None  # (measured before this look)
        pending = self.reply_pending()
        waiter = self._waiter
        if now < close_time:
            self._keepalive_handle = loop.call_at(min(close_time, now + self.check_every()),
                                                  self._process_keepalive)
            return
        if waiter is None or waiter.done():
            # Busy: aiohttp's timer stops here (it is armed again after the reply).
            self._keepalive_handle = loop.call_at(now + self.check_every(), self._process_keepalive)
            return
        if self.head_pending():
            # Not idle: bytes of its next request came (a head straddling the timeout, e.g. a load
            # balancer's just sent). client_header_timeout bounds that head (and logs 408 if it
            # never ends); closed here, the request was lost with no answer and no log line.
            self._keepalive_handle = loop.call_at(now + self.check_every(), self._process_keepalive)
            return
        if pending:
            if sampled and not self.reply_moved(self.sample_every()):
                log.debug("an idle connection from %s closed at the keep-alive timeout with a reply "
                          "its client stopped reading: reset", self.peername)
                self.drop()
                return
            # Just found (its progress is known a sample later), or still read: looked at again
            # a sample later (closed gracefully once read, reset once its client stops).
            self._keepalive_handle = loop.call_at(now + self.sample_every(), self._process_keepalive)
            return
        if close_time != self._graced and late(close_time, now):
            # The process was paused past the timeout: a next request may be waiting unread (the
            # loop runs its timers before it reads); closed now, it would be lost. A pass first
            # (once: a loop late again at the grace's end, busy, not paused, closes it then).
            self._next_keepalive_close_time = self._graced = now + PAUSE_GRACE
            self._keepalive_handle = loop.call_at(now + PAUSE_GRACE, self._process_keepalive)
            return
        self.timed_out()

    def timed_out(self) -> None:
        """Close the connection a timeout ended (client_header_timeout, keepalive_timeout): with
        nothing left to send (``reply_pending``), as a limit closes one (``drop``): a TLS one is
        aborted, with no close_notify, as nginx shuts down a timed-out connection (quietly); a
        plain one is closed (its FIN goes at once, as before). Closed gracefully, a TLS one waited
        up to ``send_timeout`` (the loop's ``ssl_shutdown_timeout``) for the close_notify of a
        client that had said nothing for a timeout already, holding its descriptor: clients that
        handshake and go silent (or stay idle after a reply) made a worker with a cap of 50 hold
        539 connections, then fail its accepts at the open-files limit. A reply still going out
        (a head timed out behind a reply its client has not read yet) closes gracefully, its
        end handed over as before: such a close counts against the cap until its transport is
        gone (``counted``, ``_closing``), and the cap closes it first once its reply is out."""
        if self.reply_pending():
            self.force_close()
        else:
            self.drop()

    def unsent(self, queue: int = termios.TIOCOUTQ) -> int:
        """Bytes the reply has left to send: the transport's buffers and, when its socket is
        reachable, the kernel's queue (sent but not acknowledged, or not sent: ``TIOCOUTQ``;
        ``SIOCOUTQNSD``: not sent, ``reply_pending``).

        Linux reports a socket writable again only once about a third of its send buffer is
        free (~1 MB of a large one), so the transport's buffer alone stays still for minutes
        under a client that reads steadily but slowly; the kernel's queue shrinks with each
        acknowledgement. Measured only when a timer fires or the cap looks: no cost per request.
        A connection whose close is under way is measured on its closing transport (``_closing``)."""
        transport = self.transport or self._closing
        if transport is None:
            return 0
        size = self.buffered(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # (closed: the buffers alone)
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), queue, b"\0" * 4))[0]
        return size

    def buffered(self, transport: asyncio.Transport | None = None) -> int:
        """Bytes the reply has left in the worker's memory: its transport's buffers (``unsent``
        without the kernel's queue; no system call), those of ``transport`` when given."""
        if transport is None:
            transport = self.transport or self._closing
            if transport is None:
                return 0
        size = transport.get_write_buffer_size()
        # A TLS transport's buffer is its own; the encrypted bytes wait in the TCP one's (``_raw``).
        raw = self._raw
        if raw is not None:
            size += raw.get_write_buffer_size()
        return size

    def reply_moved(self, within: float) -> bool:
        """The paused reply's client read some of it within the last ``within`` seconds, as far
        as measuring now tells (what it has left to send shrank since the last measure)."""
        unsent = self.unsent()
        now = self._loop.time()
        if unsent < self._unsent:
            self._moved_at = now
        self._unsent = unsent
        return now - self._moved_at < within

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
        """Close the connection now, its file descriptor and buffers freed at once.

        One with a reply unsent is reset (``SO_LINGER`` 0, nginx: ``reset_timedout_connection``):
        a plain close waits for the write buffer to drain, which would keep its file descriptor
        for good, and an abort alone left the kernel the unsent bytes (an orphan socket holding
        megabytes for as long as the client kept its end); the client sees a reset, never a
        short body that looks complete. A TLS connection is aborted too: its close would wait
        up to ``SSL_SHUTDOWN_TIMEOUT`` for the client's close_notify, holding its descriptor.
        So is one whose graceful close is under way (``_closing``): it is no longer counted."""
        transport = self.transport or self._closing
        if transport is not None:
            unsent = self.not_reading() or self.unsent(SIOCOUTQNSD) > 0  # (``reply_pending``)
            if unsent:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError, ValueError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if unsent or transport.get_extra_info("ssl_object") is not None:
                transport.abort()
        self.force_close()
        self._closing = None  # (gone at once: its descriptor is freed before the loop's next turn)

    def force_close(self) -> None:
        """aiohttp's (its transport closed, and forgotten: ``transport`` None from now on), the
        transport kept as ``_closing`` when its close waits for the client: a TLS one's for its
        close_notify and what its TLS layer still holds (up to ``send_timeout``), a plain one's
        for what its buffer holds. Such a connection still holds its descriptor, and aiohttp's
        server still lists it: the cap counts it (``counted``) and can close it (``drop``).
        Forgotten, connections closed so were uncounted while they waited, and piled up past
        ``max_connections`` to the open-files limit."""
        transport = self.transport
        if transport is not None and (transport.get_extra_info("ssl_object") is not None
                                      or transport.get_write_buffer_size() > 0):
            self._closing = transport
        super().force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        raw = tcp_under(transport)
        if raw is not None:
            self._raw, self._raw_high = raw, raw.get_write_buffer_limits()[1]
            self.transport = self._tls = SlicedTLS(cast(asyncio.Transport, transport))
        handle, every = self._keepalive_handle, self.check_every()
        if handle is not None and every < self._keepalive_timeout:  # (aiohttp's: at the timeout)
            handle.cancel()
            self._keepalive_handle = self._loop.call_later(every, self._process_keepalive)
        manager = self._manager
        if manager is None or len(manager._connections) <= self._max_connections:
            return
        live = live_connections(manager._connections)
        if len(live) <= self._max_connections:
            return
        if self._close_oldest_waiting(live):
            return
        if self._hold(live):
            return
        log.debug("more than %d connections, all busy: %s closed", self._max_connections, self.peername)
        self.limited("cap_refused")
        self.drop()  # (a TLS one aborted: no close_notify wait)

    def _hold(self, live: list[LimitedHandler]) -> bool:
        """Whether this new connection, over ``max_connections`` with nothing to close for it, is
        held (served as usual) for the cap's decision ``CAP_STALLED`` later (``_held_expired``):
        so when replies were just found in the kernel's queue alone (by this walk or the
        keep-alive timer) whose clients may have stopped reading long ago, their first sample
        only now begun. Refusing at once, new clients were refused for a second although every
        slot was held by replies unread for seconds. At most as many held at once as there are
        such replies, never more than the cap: past that, refused at once."""
        manager = self._manager
        if not isinstance(manager, LimitedServer):
            return False
        now = self._loop.time()
        found = sum(1 for c in live if c._send_handle is not None and now - c._found_at < CAP_STALLED)
        held = manager.held
        # (and never past the cap and those held: ``_close_oldest_waiting`` keeps it so)
        if len(held) >= min(found, self._max_connections) or \
                len(live) > self._max_connections + len(held) + 1:
            return False
        held.add(self)
        # (just after the found replies' next sample: a stopped one is then stalled for sure)
        self._hold_handle = self._loop.call_later(CAP_STALLED + HOLD_MARGIN, self._held_expired)
        log.debug("more than %d connections, %d replies just found unsent: %s held for %gs",
                  self._max_connections, found, self.peername, CAP_STALLED)
        return True

    def _close_oldest_waiting(self, live: list[LimitedHandler]) -> bool:
        """Close the oldest connection waiting for its client to make room for this one, if any
        (``oldest_waiting``). One held over the cap (``_hold``) hands this one its place among
        those held and its second look: else each such closing admitted one connection more for
        good (a held connection served, then idle, was the oldest waiting for the next: a
        worker with a cap of 10 kept 135 open under 200 new connections a second)."""
        other = oldest_waiting(live, self)
        if other is None:
            return False
        hold = other._hold_handle
        self.limited("cap_oldest", lingering=_close_waiting(other, self._max_connections))
        if hold is not None:
            when = hold.when()
            other._hold_ended()
            manager = self._manager
            if isinstance(manager, LimitedServer) and self._hold_handle is None:
                manager.held.add(self)
                self._hold_handle = self._loop.call_at(when, self._held_expired)
        return True

    def _hold_ended(self) -> None:
        handle = self._hold_handle
        if handle is not None:
            handle.cancel()
            self._hold_handle = None
            manager = self._manager
            if isinstance(manager, LimitedServer):
                manager.held.discard(self)

    def _held_expired(self) -> None:
        """The cap's decision on a held connection, taken again: close the oldest one waiting
        for its client (a reply found unsent, if its queue did not move since), else this one
        (reset if mid-reply, as ``drop`` does)."""
        self._hold_handle = None
        manager = self._manager
        if isinstance(manager, LimitedServer):
            manager.held.discard(self)
        if manager is None or self._force_close:
            return
        live = live_connections(manager._connections)
        held = len(manager.held) if isinstance(manager, LimitedServer) else 0
        if len(live) <= self._max_connections + held:
            return  # (others ended meanwhile; those still held have their own second look)
        if self._close_oldest_waiting(live):
            return
        log.debug("more than %d connections, all busy a second later: %s closed", self._max_connections,
                  self.peername)
        self.limited("cap_refused")
        self.drop()

    def limited(self, what: str, *, lingering: bool = False) -> None:
        """A limit closed a connection: ``send_timeout`` (this one's reply unread), ``cap_oldest``
        (an older one, to admit this one; ``lingering``: one in its lingering close), ``cap_refused``
        (this one, all others busy), ``max_unsent`` (this one's reply unread, past the listener's
        ``UnsentBudget``). The admin listener only logs it (at DEBUG, above); the client listener
        counts it too."""

    def reply_stalled(self) -> bool:
        """A reply (or pipelined ones) its client has not read any of for ``CAP_STALLED``
        seconds: it waits for the client as much as an idle connection. One the client read
        some of within that second is being answered: the cap does not close it (one read in
        bursts further apart has stalled between two). (Only a reply being sampled can have
        stalled: the walk looks at no other's kernel queue.)"""
        return (self._send_handle is not None or self.not_reading()) and not self.reply_moved(CAP_STALLED)

    def reply_pending(self) -> bool:
        """A reply is waiting for its client: the writes paused, or bytes in the kernel's send
        queue it could not send yet (``SIOCOUTQNSD``: the client's receive window is full, as
        under a client that stopped reading). One found so in the kernel's queue alone has its
        progress sampled from now on (``unsent``, as a paused reply's): it has made some, as
        far as known. Bytes only in flight are not a reply waiting: they are acknowledged within
        a round trip (a delayed ACK: up to 40 ms on loopback), and a close then loses nothing
        nor leaves an orphan (a TLS connection's session tickets, a reply just written whole).
        Measured each time it is asked (a walk of the cap's, the keep-alive timer)."""
        if self.not_reading():
            return True
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self.unsent(SIOCOUTQNSD) <= 0:
            return False
        self._found()
        return True

    def _found(self) -> None:
        """A reply found in the kernel's queue: its progress is sampled from now on (``unsent``),
        unless it is already."""
        if self._send_handle is None:
            self._sampled(self.unsent())
            self._found_at = self._moved_at

    def waits_for_client(self) -> bool:
        """Nothing to answer yet, or nothing more to answer: no request, or one whose body is
        still coming (a login whose body never comes, too). Not a request that arrived whole and
        is being answered (a purge, a reload, a miss), nor one queued to be, nor a reply being
        sent (``reply_stalled`` says whether its client stopped reading it)."""
        if self.not_reading():
            return False
        if self._request_in_progress:  # (set from the handler's call to the reply's end)
            request = self._current_request
            return request is not None and not request.content.is_eof() and not self.reply_pending()
        # A request taken from the queue, its handler not begun yet (a task that starts on the
        # next turn of the loop), is being answered as much as one whose handler runs: closing
        # its connection made it lose its answer, not its action.
        if self._started != self._finished:
            return False
        messages = self._messages
        if messages and messages[0][1].is_eof():
            return False
        # (the next one's body is still coming) Nothing left of a reply in the kernel's queue
        # either: one there is in progress (``reply_stalled`` says whether its client stopped).
        return not self.reply_pending()

    async def _handle_request(self, request: web.BaseRequest, start_time: float | None,
                              request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                              ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._finished += 1
            self._handled = request._payload

    async def finish_response(self, request: Any, resp: web.StreamResponse, start_time: float | None
                              ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's (a refused upgrade first: ``upgrade_refused``); then, when the reply closes
        the connection, a client that may still be sending gets a lingering close rather than a
        reset (``closed_after``)."""
        if self._upgraded and not self._messages and self._payload_parser is None:
            self.upgrade_refused(resp)
        out = await super().finish_response(request, resp, start_time)
        if self._raw is not None:
            self.tls_written()
        if not out[1] and (self._close or not out[0].keep_alive) and not self._force_close:
            self.closed_after(request._payload)
        return out

    def close(self) -> None:
        """aiohttp's: close once the requests being answered are. When aiohttp calls it for a body
        its handler left unread and it gave up reading (its own ``lingering_time``, to keep the
        connection: "Uncompleted request"), the client is still sending that body: a lingering
        close (``linger``). A stop's (``pre_shutdown``) never lingers."""
        if (not (self._request_in_progress or self._force_close or self._close) and self._handled is not None
                and not self._handled.is_eof() and self.linger()):
            return
        super().close()

    def closed_after(self, payload: Any) -> None:
        """A reply that closes the connection was handed over (``payload``: its request's body):
        the one place such a close is decided. Nothing more can come (``input_pending``): aiohttp
        closes it as usual. Else a lingering close, or when there can be none, a close now: never
        aiohttp's reading of the rest of the body through the parser (up to its
        ``lingering_time``, 10 s, for a client that may have stopped sending long ago)."""
        if self.input_pending(payload) and not self.linger():
            self.force_close()

    def input_pending(self, payload: Any) -> bool:
        """Whether the client may still be sending: its request's body (``payload``) is not whole,
        bytes it sent were dropped unparsed (``_unread``: a refused request and what followed, a
        refused upgrade), requests are queued behind that will not be answered, or the kernel
        holds bytes nobody read yet (nginx: its lingering close's reasons). Not once the client
        has shut its sending side."""
        if self._half_closed:
            return False
        return self._unread or bool(self._messages) or not payload.is_eof() or self.received() > 0

    def received(self) -> int:
        """Bytes in the socket's receive queue (``FIONREAD``); 0 when it cannot be asked."""
        transport = self.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])
        return 0

    def linger(self) -> bool:
        """Begin this connection's lingering close (``proxy.web.lingering``), if it can have one:
        half-closed once its reply is out, then what the client still sends read and dropped by
        ``Lingering`` until it closes or the times run out (``lingered``). aiohttp's loop is done
        with the connection (``_force_close``: it parses, answers and closes nothing more), which
        stays listed by its server: counted against the cap (``counted``), closed by a stop.
        False when it cannot: already closing, lingering off (a time of 0), the listener
        stopping. (A TLS connection is not half-closed: asyncio's TLS transports cannot.)"""
        transport = self.transport
        time, timeout = self._linger_for
        if (transport is None or transport.is_closing() or time <= 0 or timeout <= 0
                or self.listener_stopping()):
            return False
        self._force_close = True
        if self._waiter is not None:
            self._waiter.cancel()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self.head_ended()
        self._messages.clear()  # (never answered: the connection is closing)
        self._lingering = lingering = Lingering(self, self._loop, time, timeout)
        transport.set_protocol(lingering)
        try:
            if transport.can_write_eof():  # (not TLS: asyncio's TLS transports cannot half-close)
                transport.write_eof()  # (the FIN goes after what the transport still holds of the reply)
            transport.resume_reading()  # (paused when the handler left the body unread)
        except (OSError, RuntimeError) as exc:  # the connection broke meanwhile
            log.debug("lingering close of %s not begun: %r", self.peername, exc)
            self.lingered()
        else:
            log.debug("lingering close of %s: at most %gs, %gs of silence, once its reply is out",
                      self.peername, time, timeout)
            lingering.begin()
        return True

    def reply_out(self) -> bool:
        """The reply has left: nothing of it in the transport's buffers, nor unsent in the
        kernel's queue (its lingering close's clocks start then: ``Lingering``). One still there
        has its progress sampled (``reply_pending``), so that ``send_timeout`` resets the
        connection of a client that stopped reading it."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.unsent(SIOCOUTQNSD) <= 0:
            return True
        self._found()
        return False

    def lingered(self) -> None:
        """The lingering close is over (nothing heard for lingering_timeout, or lingering_time
        past, both from the reply's end): closed as a limit closes a connection (``drop``: a
        plain close, the reply being out, its FIN already sent)."""
        lingering = self._lingering
        if lingering is not None:
            lingering.cancel()
        self.drop()

    def lingers(self) -> bool:
        """In its lingering close with its reply out: its exchange is over, the cap's first pick."""
        return self._lingering is not None and self.counted() and self.waits_for_client()

    def counted(self) -> bool:
        """Counted against the cap: not closed yet (a lingering close is not closed), or closed
        and waiting for its client (``_closing``: its descriptor is not freed yet)."""
        return (not self._force_close or self._closing is not None
                or (self._lingering is not None and self.transport is not None))

    def close_under_way(self) -> bool:
        """Closed by cachegate (``force_close``, or aiohttp after a reply that closes it), its
        transport not gone yet, and nothing left to send: it only waits for its client (a TLS
        one for its close_notify, up to ``send_timeout``). Its exchange is over: the cap closes
        it first, with a lingering close (``oldest_waiting``). One still handing its reply over
        is closed as an idle one is (``waits_for_client``), after them."""
        transport = self._closing or self.transport
        if transport is None or self._lingering is not None or not transport.is_closing():
            return False
        return self.unsent(SIOCOUTQNSD) <= 0

    def listener_stopping(self) -> bool:
        """The listener is stopping (``LimitedServer.pre_shutdown``): no close lingers then."""
        manager = self._manager
        return isinstance(manager, LimitedServer) and manager.stopping


def tcp_under(transport: asyncio.BaseTransport) -> Any:
    """The TCP transport under a TLS one (``transport``), where its encrypted bytes wait for the
    socket; None for a plain one, or when it cannot be found. asyncio's TLS transport holds its
    ``SSLProtocol`` (``_ssl_protocol``), which holds it (``_transport``); uvloop's, in C, hands
    its ``SSLProtocol`` out (``get_extra_info("uvloop.sslproto")``) but not its fields: the TCP
    transport is the one among what it refers to (``gc.get_referents``) that is a transport
    other than ``transport``. Asked once per connection (``LimitedHandler.connection_made``)."""
    protocol = getattr(transport, "_ssl_protocol", None)
    if protocol is not None:
        raw = getattr(protocol, "_transport", None)
        return raw if callable(getattr(raw, "get_write_buffer_size", None)) else None
    protocol = transport.get_extra_info("uvloop.sslproto")
    if protocol is None:
        return None
    for found in gc.get_referents(protocol):
        if (found is not transport and callable(getattr(found, "get_write_buffer_size", None))
                and callable(getattr(found, "get_write_buffer_limits", None))):
            return found
    return None


def live_connections(connections: Iterable[Any]) -> list[LimitedHandler]:
    """The connections the cap counts: not closed (closed ones stay listed until their
    ``connection_lost``, which comes later: a burst of connections accepted at once would
    otherwise pick the same one again and again), lingering ones included (``counted``)."""
    return [c for c in connections if isinstance(c, LimitedHandler) and c.counted()]


def oldest_waiting(live: list[LimitedHandler], new: LimitedHandler | None) -> LimitedHandler | None:
    """The oldest of ``live`` (but ``new``) that waits for its client, if any (a dict keeps the
    order they came): one in its lingering close with its reply out, else one closed with its
    reply out (``close_under_way``: a TLS one waiting for its client's close_notify) — their
    exchange is over —, else one with nothing sent to its client (idle, a head or a body still
    coming), else one whose reply its client stopped reading."""
    for waits in (LimitedHandler.lingers, LimitedHandler.close_under_way, LimitedHandler.waits_for_client,
                  LimitedHandler.reply_stalled):
        for other in live:
            if other is not new and waits(other):
                return other
    return None


def close_oldest_waiting(live: list[LimitedHandler], new: LimitedHandler | None, cap: int
                         ) -> LimitedHandler | None:
    """Close ``oldest_waiting``, if any: the one closed."""
    other = oldest_waiting(live, new)
    if other is not None:
        _close_waiting(other, cap)
    return other


def _close_waiting(other: LimitedHandler, cap: int) -> bool:
    """Close ``other``, picked by ``oldest_waiting``: whether it was in its lingering close."""
    lingering = other.lingers()
    log.debug("more than %d connections: the oldest %s, from %s, closed", cap,
              "in its lingering close" if lingering else "closing" if other.close_under_way()
              else "waiting for its client", other.peername)
    other.drop()
    return lingering


class UnsentBudget:
    """``max_unsent``: a bound on the bytes replies hold in the worker's memory while their
    clients do not read them, one for all of a worker's client listeners (the admin listener has
    none: it keeps ADMIN_MAX_CONNECTIONS connections at most, and its replies are tens of KB).

    A reply is handed to its transport whole (a memory hit, copied out of the shared memory;
    aiohttp's handler writing a body it holds): what the kernel's send queue does not take
    waits in the transport's buffer until the client reads it. So each connection that asked
    for a 1 MB object and read nothing held about 1 MB of the worker's memory until
    ``send_timeout`` reset it (300 such connections: +302 MB), up to ``max_connections`` ×
    ``memory_max_object`` × 2 per worker: a kilobyte sent pinned a megabyte for a minute.
    nginx holds tens of kilobytes per such connection (sendfile, ``proxy_buffers``).

    The bookkeeping follows the transports' own flow control, nothing per request: when a
    connection's writes pause (its buffers past their high-water mark: ``pause_writing``), what
    its buffers hold then is added to ``total`` (``LimitedHandler.buffered``: no system call);
    when they resume, or the connection is lost, it is taken off (``resumed``). A reply the
    kernel takes at once never pauses, and costs nothing here. ``total`` overstates as clients
    read (each is measured at its pause only). A TLS connection's writes pause only for what
    its TLS layer holds (512 KB), not for what waits in the TCP transport under it, where a
    reply handed over whole goes: it counts from when a reply leaves that buffer past its
    high-water mark (``LimitedHandler.tls_written``, a buffer size per reply on TLS, nothing on
    plain HTTP) until a sample finds it back under it (``_send_expired``). Without that, 40 TLS
    clients reading nothing of a 1 MB hit past a 1 MB budget: none reset, ``total`` 0.

    When a pause takes ``total`` past the budget, each paused connection is measured again; if
    it is still over, the connections whose client has read none of its reply for
    ``CAP_STALLED`` (``reply_stalled``, as the connection cap decides it) are reset (``drop``),
    the longest unread first, until it is met: counted (``limited("max_unsent")``), and logged
    once a walk, the lines summarised (one a minute at most, as the cap's). A reply whose client
    read some of it within the last ``CAP_STALLED`` is never reset for the budget; one read in
    bursts further apart (64 KB every 1.5 s, ~43 KB/s) is reset between two of them while the
    budget is exceeded. If it is still over, the budget looks again
    when the first of those not read could have stalled (``CAP_STALLED`` after its pause at
    most): one timer for the worker, and pauses meanwhile only add to ``total``. So beyond the
    budget a worker holds up to its transport's high-water mark on each connection that
    stopped reading, for up to ``CAP_STALLED`` (and a sample) what the replies not yet found
    stalled hold, and on the general path a second copy of a body its handler holds while its
    reply waits.

    Cost: a dict update at each pause and at each resume; once over the budget, a walk over the
    paused connections (a buffer size each, a sort, and a measure of the kernel's queue for each
    one looked at as stalled) at a pause that finds it over with no look pending, at most one
    every ``GAP`` seconds."""

    # The least time between two walks: pauses past the budget within it wait for a timer at
    # its end. Once a walk has brought the total under the budget, the next connection that reads
    # nothing takes it over again: a flood would cost a walk over every paused connection (slow
    # readers' too) per connection it opens, and costs one per GAP at most instead.
    GAP = 0.1

    __slots__ = ("_held", "_limit", "_log", "_loop", "_said", "_timer", "_walked", "total")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: Callable[[], int | None],
                 logger: logging.Logger) -> None:
        self._loop = loop
        self._limit = limit  # the budget, read at each look (a reload's applies at once); None: none
        self._log = logger
        self._said = Summarised(window=60.0)  # (``_over``'s line: as the connection cap's)
        self._held: dict[LimitedHandler, int] = {}  # paused connections, what each held when measured
        self.total = 0
        self._timer: asyncio.TimerHandle | None = None
        self._walked = -self.GAP  # when the last walk was (``_over``)

    def paused(self, conn: LimitedHandler) -> None:
        """``conn``'s writes paused: what its buffers hold counts from now on."""
        held = conn.buffered()
        self.total += held - self._held.get(conn, 0)
        self._held[conn] = held
        if self._timer is None:
            limit = self._limit()
            if limit is not None and self.total > limit:
                now = self._loop.time()
                if now - self._walked >= self.GAP:
                    self._over(limit)
                else:
                    self._timer = self._loop.call_at(self._walked + self.GAP, self._again)

    def resumed(self, conn: LimitedHandler) -> None:
        """``conn``'s writes resumed, or it is lost: it holds nothing the budget counts."""
        held = self._held.pop(conn, None)
        if held is not None:
            self.total -= held

    def _again(self) -> None:
        self._timer = None
        limit = self._limit()
        if limit is not None and self.total > limit:
            self._over(limit)

    def _over(self, limit: int) -> None:
        """Past ``limit`` as last counted: measured again, then the stalled reset as needed."""
        self._walked = now = self._loop.time()
        held = self._held
        total = 0
        for conn in held:
            held[conn] = size = conn.buffered()
            total += size
        self.total = before = total
        if total <= limit:
            return
        reset = 0
        for conn in sorted(held, key=attrgetter("_moved_at")):
            if now - conn._moved_at < CAP_STALLED:
                break  # (a measure only moves it later: this one and those after it were read lately)
            if not conn.reply_stalled():
                continue
            self.total -= held.pop(conn)
            log.debug("a reply to %s unread for %gs reset: max_unsent (%d bytes) exceeded",
                      conn.peername, now - conn._moved_at, limit)
            conn.limited("max_unsent")
            conn.drop()
            reset += 1
            if self.total <= limit:
                break
        if reset:
            # A line when it begins, then one a minute at most while it goes on (``Summarised``).
            self._said.log(logging.WARNING, self._log, "max_unsent",
                           "max_unsent (%s) exceeded in this worker: replies waiting for their client "
                           "held %s; %d connection(s) whose client had read nothing for %gs reset, %s left",
                           human_size(limit), human_size(before), reset, CAP_STALLED, human_size(self.total))
        if self.total > limit and held:
            first = min(c._moved_at for c in held) + CAP_STALLED + HOLD_MARGIN
            self._timer = self._loop.call_at(max(first, now + self.GAP), self._again)


class CappedHandler(LimitedHandler):
    """A connection of the admin listener (``LimitedHandler``'s limits). A request aiohttp's
    parser refuses is answered like every admin error, ``{"error": "..."}`` (``handle_error``);
    one on a connection closed before its handler began is not handled."""

    __slots__ = ("_server_header",)

    def __init__(self, manager: web.Server, *, server_header: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server_header = server_header  # the operator's Server field, not aiohttp's

    def head_checked(self, before: int, data: bytes, body: tuple[Any, Any] | None = None,
                     had: int = 0) -> None:
        """``HeadTimedHandler``'s, and a head's request line looked at where this read shows
        where the head begins (``first_line``: an HTTP/0.9 line is answered 400 at once, as on
        the client listener, not left to client_header_timeout): at the start of the connection
        or after a read that ended between two requests (``_line`` b""), behind a request
        without a body in the same read, or after a body's end (``body_ended``). Admin requests
        are few: this costs a slice per read, where the client listener counts raw head bytes."""
        line, self._line = self._line, None
        super().head_checked(before, data, body, had)
        if not data or self._unread:
            self._line = line
        elif self._request_count != before:
            messages = self._messages
            last = messages[-1][1] if messages else EMPTY_PAYLOAD
            if last is EMPTY_PAYLOAD:
                end = data.rfind(b"\r\n\r\n")
                rest = data[end + 4:] if end != -1 else b""
                if unfinished_head(data) and end != -1:
                    self.first_line(rest)
                elif not rest.strip(b"\r\n"):
                    self._line = b""  # between two requests: a head starts at the next byte
        elif body is None and line is not None and not self._reading_body():
            self.first_line(line + data)

    def body_ended(self, rest: bytes) -> None:
        """``HeadTimedHandler``'s, and the request line of a head begun in ``rest`` looked at."""
        super().body_ended(rest)
        if self._head_open:
            self.first_line(rest)

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
        self._unread = True  # nothing after a refused request is parsed: the close lingers
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
        log.debug("admin request from %s refused by the parser: %s", self.peername, refusal_logged(exc))
        # In HTTP/1.1 (``heads.reply_version``): aiohttp hands a placeholder message that says
        # HTTP/1.0 whatever the client sent.
        response = from_response(web.json_response({"error": why}, status=status,
                                                   headers={"Server": self._server_header()}),
                                 request.method, HttpVersion11)
        response.force_close()
        return response


class LimitedServer(web.Server):
    """``web.Server`` whose connections are ``LimitedHandler``s: each request aiohttp's loop
    takes from a connection's queue is noted on it (``LimitedHandler.waits_for_client``), by
    the request factory (the general path only: the fast path's answers never get there). A
    subclass's own ``_make_request`` counts it itself (no call more per request)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # Connections held over ``max_connections`` for the cap's second look (``LimitedHandler._hold``).
        self.held: set[LimitedHandler] = set()
        self.stopping = False  # (``pre_shutdown``)
        self.unsent_budget: UnsentBudget | None = None  # (a listener with ``max_unsent``: the client one)
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

    def pre_shutdown(self) -> None:
        """A stop begins (aiohttp's cleanup, once the listener stopped accepting): no close lingers
        from now on, and the lingering ones close with the idle ones (aiohttp's ``shutdown``)."""
        self.stopping = True
        super().pre_shutdown()

    def make_room(self, pending: int, oldest_pending: float) -> bool:
        """For a TLS listener's acceptor, which holds ``pending`` connections before their
        handshake's end (the oldest accepted at ``oldest_pending``, loop time) and has just
        accepted one more: whether it is within ``max_connections`` with them, or was made so
        by closing the oldest served connection waiting for its client when that one is older
        (else the acceptor closes its oldest)."""
        cap = getattr(self, "max_connections", 0)
        if not isinstance(cap, int) or cap <= 0:
            return True
        live = live_connections(self._connections)
        if len(live) + pending + 1 <= cap:
            return True
        other = oldest_waiting(live, None)
        if other is None or (pending and other._opened > oldest_pending):
            return False
        other.limited("cap_oldest", lingering=_close_waiting(other, cap))
        return True


class CappedServer(LimitedServer):
    """``LimitedServer`` whose connections are ``CappedHandler``s; ``head_timeout`` and
    ``server_header`` and ``lingering`` (lingering_time, lingering_timeout) are read at each new
    connection (or answer), so a reload applies."""

    def __init__(self, handler: Any, *, head_timeout: Callable[[], float], max_connections: int,
                 server_header: Callable[[], str], send_timeout: float = 0.0,
                 lingering: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0), **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._head_timeout_of = head_timeout
        self._max = self.max_connections = max_connections  # (read by a TLS listener's acceptor)
        self._server_header = server_header
        self._send_timeout = send_timeout
        self._lingering_of = lingering

    def __call__(self) -> RequestHandler:
        return CappedHandler(self, loop=self._loop, head_timeout=float(self._head_timeout_of()),
                             max_connections=self._max, server_header=self._server_header,
                             send_timeout=self._send_timeout, lingering=self._lingering_of(), **self._kwargs)


__all__ = ["CappedHandler", "CappedServer", "HeadTimedHandler", "LimitedHandler", "LimitedServer",
           "UnsentBudget", "after_body", "close_oldest_waiting", "empty_lines", "live_connections",
           "oldest_waiting", "tcp_under", "unfinished_head"]
