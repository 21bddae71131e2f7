"""A lean HTTP/1.1 client for the upstream pool: asyncio protocols and aiohttp's C parser (llhttp).

Why not aiohttp's ``ClientSession``: measured on the pass-through path (``scripts/bench
--only pass-1k --profile``, ``scripts/benchlib/bench_micro.py client``), its per-request
machinery (ClientRequest/ClientResponse objects, tracing, cookie and redirect handling,
timer contexts, a head write and an EOF write) costs 82-93 µs of CPU per request, against
6 µs for a minimal asyncio protocol client; it was a third of a pass-through request's CPU.
This client keeps what a reverse proxy needs and nothing else:

- one ``UpstreamConnection`` (an asyncio protocol) per TCP/TLS connection, one request at a
  time; the request head (and a small body) leaves in one write;
- responses are parsed by aiohttp's own C parser (``aiohttp._http_parser``, llhttp) in its
  *strict* mode (aiohttp's client runs it lenient: bare LF line ends, control characters
  in field values and spaces after a chunk size are accepted there, refused here), with no
  decompression: bytes and ``Content-Encoding`` pass through unchanged;
- bodies arrive in the parser's ``StreamReader``, which stops reading the socket past
  ``limit`` unread bytes (flow control: a 1 GiB download is never held in memory);
- ``HostPool`` keeps up to ``pool_size`` connections per upstream, reuses idle ones (most
  recently used first) and closes those idle for ``KEEPALIVE_IDLE`` (before the origin's own
  keep-alive timeout closes them under a request);
- a new connection goes to the upstream's addresses (``proxy.resolver.Addresses``: an upstream
  given by name is looked up once in flight, refreshed in the background, kept through a
  resolver outage, its addresses taken in turn, one that failed last) by Happy Eyeballs (RFC
  8305: the next address tried ``HAPPY_EYEBALLS_DELAY`` after the last, or sooner so that every
  one is tried within the connect timeout; the first to connect wins); a connection to an
  address its name no longer lists is not reused (``HostPool._readdressed``).

A connection is reused only when its request carried no body (*Request bodies*, below), its
response was read to the end by the parser, the response did not ask to close, and nothing
followed the response: bytes after the end of a response (a second response, more body than
``Content-Length`` said) are a framing error. They close the connection when the response's
head was delivered before they came (bytes on an idle pooled connection abort it:
they are never read as the next request's response). Those in the very read that brought the
head (the whole response and more, written together: ``_overrun``) must not be processed,
cached or forwarded as a response, and may be discarded (RFC 9112 §6.3); what becomes of the
response depends on its request:

- an idempotent one (GET, OPTIONS, TRACE, PUT, DELETE: ``proxy.upstream.IDEMPOTENT``; HEAD:
  see *Pool desync*): refused (502, ``UpstreamOverrun``). A GET's response may be stored and
  shared, and its ``Content-Length`` may be the one too small, its body cut short; the client
  may ask again, nothing was done twice. No passive failure though: the upstream answered, at
  once and whole; the framing is one handler's, and held against the upstream, one URL took it
  out for every other URL (``passive_failure``);
- any other (POST, PATCH): relayed, the bytes dropped, the connection closed, a WARNING naming
  the upstream and how many bytes came (``N or more``: only those in the response's read are
  seen; ``Response.stray``, one line a while: ``Engine.warn_stray``); no error, no passive
  failure. The origin has acted on the request: told 502, its client would likely repeat it,
  and repeat what it did. Nothing of it is stored (only a GET's answer is). nginx and Varnish
  relay it too.

A response that is not read to the end is never followed by another request on its
connection.

Request bodies: a connection that carried a request body (a POST, PUT or PATCH, or a GET or any
other method with one; a body of 0 bytes is none) is closed after its response, never reused
(``UpstreamConnection.request`` marks it ``retired``). The origin may have answered without
reading that body, or before reading all of it, and kept the connection open (RFC 9112 §9.3:
it MUST read the whole body or close, "otherwise, the remaining data on a persistent connection
would be misinterpreted as the next request"); it then reads the body as its next request and
answers that too, a moment later. Nothing in the answer it did give tells such an origin apart
from one that read the body: its response is whole and well framed, and the connection looks
idle. HTTP/1.1 pairs responses with requests by their order alone (RFC 9112 §9.2), so the stray
answer, coming after the next request left on a reused connection, would be read as that
request's response, and a GET's is stored for everyone: a client that chooses the body (a
``GET /victim`` inside a POST's body) picks what another client's URL serves ("CL.0" desync).
A body that was not sent whole never lets its connection be reused either: the exchange fails
(aborted), or its answer came first and the rest is never sent (``_message_done``).

nginx's ``keepalive`` is laxer: it keeps a connection whose request body was sent whole
(``u->request_body_sent``) and closes it only when bytes arrive while it is idle; a late answer
that arrives after the next request left is taken as that request's response there. Safety
first: a new connection per request with a body costs one TCP (or TLS) handshake, on requests
that are never stored and seldom the bulk of the traffic; a request without a body (every GET
and HEAD of the hot path) reuses connections as before: what it runs for this is one false flag
passed and tested. Such a request says ``Connection: close`` (``request_head``) and its
connection is closed with a reset (``UpstreamConnection.close``): no local port waits 60 s in
TIME_WAIT per request with a body.

Whatever the request, after a response that ends at its head (RFC 9112 §6.3): a body an
origin writes after a 204 or a 304 (which must have none) is dropped unread, the 204/304 is
the answer (a 304 to a revalidation freshens the stored response as any other does), the
connection is closed, and a WARNING names the upstream; no error, nor a passive failure: as
nginx does, which warns that the upstream sent more data than specified and keeps no such
connection. Refused, one client's request for such a URL was a 502 and a passive failure of
an upstream every client shares. The same read is searched for the head's end only when its
status line shows a 204, a 304 or an interim response, or is not whole yet (``_feed_head``).

Pool desync: a response whose end was not read from its own framing but inferred — the
answer to a HEAD, or a 204/304 whose head announces a body (``Content-Length`` other than
0, or ``Transfer-Encoding``) — is never followed by another request either
(``reusable_after``). An origin that sends that announced body anyway, a moment later,
would otherwise have it read as the next client's response, and stored for everyone. A
response to HEAD is fed to the parser only up to the end of its final head
(``_feed_head``): the GET's body that a naive origin writes after it, in the same read or
later, is dropped unparsed rather than refused as a second response.

Transfer codings (RFC 9112 §6.1): a response whose ``Transfer-Encoding`` names chunked
anywhere but alone (``gzip, chunked``: a coding inside the chunks that cachegate does not
decode; ``chunked, gzip`` or chunked twice: framing that parsers disagree on), or any
``Transfer-Encoding`` in an HTTP/1.0 response (faulty framing, §6.1), is refused with a 502
and never stored. A coding list without chunked frames the body by the connection's end
(§6.3): those bytes are relayed and stored as they came, the hop-by-hop field dropped, as
nginx 1.22 does (measured) and as the public cache tests require
(``headers-store-Transfer-Encoding``).

A body delimited only by the connection's end (no ``Content-Length``, not chunked) over TLS
is relayed but never stored (``Response.close_delimited_tls``): RFC 9112 §9.8 counts it
complete only when the TLS closure alert (close_notify) was received, and asyncio and uvloop
give a protocol no reliable way to tell that alert from a bare TCP FIN: a FIN forged on the
path would have a truncated body stored as complete, and served to everyone.

A status code outside 100-599 (RFC 9110 §15: three digits; llhttp reads "099" or "999"), or a
status line of a version other than HTTP/1.0 and HTTP/1.1 (llhttp reads "HTTP/2.0"; HTTP/2
has no status line), is refused like any invalid response: a 502, never relayed nor stored.

Errors are ``proxy.errors`` types whose ``kind`` names them for the metrics: ``connect``
(refused, reset, TLS), ``connect_timeout``, ``dns`` (no address of the upstream's name known:
its lookup failed or did not answer in time, ``UpstreamDNSError``), ``pool_wait`` (no pooled
connection came free within ``connect``: cachegate's limit, not the upstream's failure),
``read_timeout`` (no byte for ``read`` seconds while waiting for one), ``total_timeout`` (the
whole exchange), ``protocol`` (unparseable, or closed part-way through the head).
``UpstreamDisconnected`` means the connection closed after the request left and before any
response byte: most often a keep-alive connection the upstream had just closed, which the pool
may retry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import importlib
import logging
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterable, Callable, Sequence
from http import HTTPStatus
from typing import Any

from aiohappyeyeballs import start_connection
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import (
    BodyCutOff,
    BodyRefused,
    BodyTimedOut,
    ClientBodyError,
    ClientGone,
    OutOfResources,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.paused import PAUSE_GRACE, PAUSE_LATE, late
from proxy.policy.fields import content_length, ends_at_head
from proxy.resolver import Addresses, LookupFailed, Peer, peer_of

NO_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, no TIME_WAIT
CHUNK = 64 * 1024  # the StreamReader's limit: reading stops past twice this many unread bytes
MAX_LINE = 16 * 1024  # the longest status line or header field accepted
MAX_HEADERS = 256
# The longest response head accepted (status line and fields; interim responses before it
# count too): Varnish's http_resp_size is 32 KB, nginx's proxy_buffer_size 4-8 KB. A longer one
# is an invalid response (502): every byte of it would be held, stored and sent on every hit.
MAX_HEAD = 64 * 1024
# Interim (1xx) responses accepted before the final one: each restarts the read timeout, so
# an origin sending them without end would hold the exchange (and the client) forever.
MAX_INTERIMS = 16
# Idle keep-alive connections are closed after this long: shorter than the 5 s that
# Node.js and Apache servers use by default, so cachegate closes an idle connection
# before the origin does. Otherwise a request can take a connection the origin has
# just closed and fail (a body that was streamed cannot be resent).
KEEPALIVE_IDLE = 4.0
# Happy Eyeballs (RFC 8305 §5): with several addresses, the next is tried this long after the
# last attempt began if none has connected yet (aiohttp's own client waits as long); less when
# the connect timeout would end before every address was tried (``HostPool._connect``).
HAPPY_EYEBALLS_DELAY = 0.25
SMALL_BODY = 64 * 1024  # a request body up to this size leaves with the head, in one write
# Methods whose request carries a body by definition: sent with "Content-Length: 0" when
# there is none (RFC 9110 §8.6), as aiohttp's client did.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FRAMING = ("content-length", "transfer-encoding")
# The final statuses whose response ends at its head (RFC 9112 §6.3), as their status line reads.
_ENDS_AT_HEAD = (b"204", b"304")
# aiohttp's C parser (cachegate refuses to start without it: proxy.web.server).
_http_parser: Any = importlib.import_module("aiohttp._http_parser")


# Told of each interim (1xx) response before the final one: (status, reason, fields).
InterimHook = Callable[[int, str, CIMultiDictProxy[str]], None]


class UpstreamConnectTimeout(UpstreamTimeout):
    """The TCP (or TLS) connection was not established in time: safe to retry elsewhere."""

    kind = "connect_timeout"
    public = "the origin server could not be reached in time (connect timed out)"


class PoolWaitTimeout(UpstreamConnectTimeout):
    """No pooled connection came free within the connect timeout (every one of ``pool_size`` is
    busy): cachegate's own limit was reached and no connection was tried, so it says nothing of
    the upstream's state (passive health does not hold it against the upstream, nor do
    ``GET /upstreams``' ``failures``), and no second wait follows (the wait already lasted a
    connect timeout: only an upstream with a connection free at once is tried then). The client
    is told so, not that a connect timed out: a 504, counted under its own ``kind``
    (``pool_wait``), not as a connect timeout of the upstream's."""

    kind = "pool_wait"
    public = "no free connection to the origin server within the connect timeout (every pooled one was busy)"


class UpstreamDNSError(UpstreamConnectError):
    """No address of the upstream's name is known: its lookup failed (``proxy.resolver``). The
    resolver's failure, not the upstream's: not held against it by passive health (an active
    check does fail: the upstream cannot be reached), tried on another upstream, and counted as
    ``kind="dns"``. The pool warns once per streak (``Addresses``): no warning per request."""

    kind = "dns"
    public = "the origin server could not be reached (its name did not resolve)"
    reported = True  # (``first_report``: said once per streak by the pool, not per request)


class UpstreamNoSuchName(UpstreamDNSError):
    """As ``UpstreamDNSError``, for the resolver's definite answer that the name has no address
    (NXDOMAIN, NODATA): the upstream cannot be reached, whatever the resolver's state, and passive
    health holds it against the upstream as a refused connection (``passive_failure``)."""


class UpstreamDNSTimeout(UpstreamConnectTimeout):
    """As ``UpstreamDNSError``, for a lookup that did not answer within the connect timeout (told
    as a lookup timed out, not as a connect: no connection was tried)."""

    kind = "dns"
    public = "the origin server could not be reached in time (looking up its name timed out)"
    reported = True


# The failures of an upstream's name lookup (``passive_failure``: not held against the upstream,
# except ``UpstreamNoSuchName``).
DNS_ERRORS = (UpstreamDNSError, UpstreamDNSTimeout)


class UpstreamDisconnected(UpstreamConnectError):
    """The connection closed after the request was sent, before any response byte. On a reused
    keep-alive connection (``reused``, set by the sender) most often one the upstream had just
    closed: one more try, even on the same upstream, is safe for a request that may be retried
    at all. On a new one the upstream read the request and dropped it: an ordinary failure."""

    reused = False


class UpstreamReadTimeout(UpstreamTimeout):
    kind = "read_timeout"
    public = "the origin server did not answer in time (read timed out)"


class UpstreamTotalTimeout(UpstreamTimeout):
    kind = "total_timeout"
    public = "the origin server did not answer in time (total timeout)"


class UpstreamBodyError(UpstreamProtocolError):
    """The response body broke off or was malformed (raised by the body reader). Its head was
    an answer: the client is told of the body (``detail=UPSTREAM-BROKE-OFF``), not of an
    invalid response."""

    public = "the origin server's response body broke off (cut short, malformed or reset)"
    in_body = True  # (in the read that brought its head too: a malformed body behind a valid head)


class UpstreamOverrun(UpstreamProtocolError):
    """Bytes followed a whole response in the read that brought its head (more body than its
    ``Content-Length``, or a second response): the answer to an idempotent request is refused
    (a 502: its body may be cut short, and it may be stored; the client may ask again). One
    handler's framing, not the upstream's state: no passive failure (``passive_failure``). The
    answer to any other request is relayed instead (module docstring)."""


# What ``socket()`` or ``connect()`` says when this process or machine is out of descriptors
# (EMFILE: the open-files limit; ENFILE: the system's) or of socket memory: cachegate's own
# condition, whatever the upstream's state (``OutOfResources``).
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def exhausted(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` saying this process ran out of descriptors or memory, in ``exc`` or its
    causes (an ``UpstreamConnectError`` raised from it, say); None for any other error.

    >>> exhausted(OSError(errno.EMFILE, "Too many open files")).errno == errno.EMFILE
    True
    >>> exhausted(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) is None
    True
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED:
            return exc
        exc = exc.__cause__
        seen += 1
    return None


def out_of_resources(name: str, exc: OSError) -> OutOfResources:
    """The error for a connection to upstream ``name`` that this process could not open."""
    why = (exc.strerror or os.strerror(exc.errno or 0))
    return OutOfResources(f"{name}: cannot connect: cachegate's own limit: {exc}",
                          detail=why[:1].lower() + why[1:],
                          descriptors=exc.errno in (errno.EMFILE, errno.ENFILE))


def error_kind(exc: UpstreamError) -> str:
    """The ``cachegate_upstream_errors_total{kind}`` label of an error."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str):
        return kind
    return "protocol" if isinstance(exc, UpstreamProtocolError) else "connect"


# Every kind ``error_kind`` and ``body_error_kind`` give (a 5xx answer's ``status_5NN`` aside):
# exported at 0 for each upstream from the start (``proxy.metrics.KNOWN_LABELS`` says why).
UPSTREAM_ERROR_KINDS = ("connect", "connect_timeout", "dns", "pool_wait", "read_timeout", "total_timeout",
                        "protocol", "body_broke_off", "body_read_timeout", "body_total_timeout")


def body_error_kind(exc: UpstreamError) -> str:
    """The ``cachegate_upstream_errors_total{kind}`` label of an error in a response's body,
    after its head: ``body_`` and a timeout's own kind (``body_read_timeout``: it fell silent),
    else ``body_broke_off`` (it ended short of its length or final chunk, was malformed or was
    reset). Apart from the kinds of exchanges that got no head: these got one, so they are in
    ``cachegate_upstream_requests_total`` too (the error rate counts them once).

    >>> body_error_kind(UpstreamReadTimeout("x")), body_error_kind(UpstreamBodyError("x"))
    ('body_read_timeout', 'body_broke_off')
    """
    return f"body_{error_kind(exc)}" if isinstance(exc, UpstreamTimeout) else "body_broke_off"


def head_size(message: Any) -> int:
    """The bytes of a parsed response head: its status line and fields, as received but for
    whitespace (``message.raw_headers``: the fields as bytes)."""
    return 15 + len(message.reason or "") + sum(len(k) + len(v) + 4 for k, v in message.raw_headers)


def strict_response_parser(protocol: BaseProtocol, loop: asyncio.AbstractEventLoop, *, head: bool,
                           name: str) -> Any:
    """aiohttp's C response parser with llhttp's lenient flags off.

    aiohttp turns them on for its client unless in debug mode, reading its module global
    ``DEBUG`` when a parser is made; it is set for the duration of this call only (the
    event loop's thread makes every parser, so nothing else sees it changed)."""
    before = _http_parser.DEBUG
    _http_parser.DEBUG = True
    try:
        return _http_parser.HttpResponseParser(
            protocol, loop, CHUNK, max_line_size=MAX_LINE, max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS, payload_exception=_payload_error(name),
            response_with_body=not head, read_until_eof=True, auto_decompress=False)
    finally:
        _http_parser.DEBUG = before


_payload_errors: dict[str, type[UpstreamBodyError]] = {}


def _payload_error(name: str) -> type[UpstreamBodyError]:
    """An exception class whose message names the upstream (the parser builds it from a string)."""
    cls = _payload_errors.get(name)
    if cls is None:
        def init(self: UpstreamBodyError, message: str = "") -> None:
            UpstreamBodyError.__init__(self, f"{name}: body broke off: {message}")

        cls = type("UpstreamBodyError", (UpstreamBodyError,), {"__init__": init})
        _payload_errors[name] = cls
    return cls


_BAD_REASON = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def reason_phrase(status: int, reason: str) -> str:
    """The origin's reason phrase, or the status code's standard one when it holds a control
    character (RFC 9112 §4: HTAB, SP, VCHAR and obs-text only): the parser lets \\x01 or DEL
    through, and a strict client would refuse the response that relayed it, or the stored one
    served to everyone after it."""
    if not _BAD_REASON.search(reason):
        return reason
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class Response:
    """A response head, and its body as the parser's stream."""

    __slots__ = ("_conn", "_exchange", "_payload", "close_delimited_tls", "head_method", "headers", "reason",
                 "status", "stray")

    def __init__(self, message: Any, payload: StreamReader, conn: UpstreamConnection, exchange: int) -> None:
        self.status: int = message.code
        self.reason: str = reason_phrase(message.code, message.reason or "")
        headers: CIMultiDictProxy[str] = message.headers
        self.headers = headers
        self._payload = payload
        self._conn = conn
        self._exchange = exchange
        self.head_method: bool = conn._head_method  # the answer to a HEAD: no body (``ends_at_head``)
        # Bytes the upstream wrote after this response had ended, dropped (``_feed_head``,
        # ``_overrun``; the connection is closed): warned of by ``Engine.warn_stray``, summarised.
        self.stray: int = conn._stray
        # A body over TLS that only the connection's end delimits (no Content-Length, not
        # chunked): its end cannot be told from a truncation (module docstring).
        self.close_delimited_tls: bool = (
            conn._pool.ssl is not None and not message.chunked
            and not ends_at_head(message.code, conn._head_method)
            and ("Content-Length" not in headers or "Transfer-Encoding" in headers))

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived (no waiting); else None."""
        payload = self._payload
        if payload is EMPTY_PAYLOAD:
            return b""
        if not payload.is_eof() or payload.exception() is not None:
            return None
        return payload.read_nowait(-1)

    def arrived_length(self) -> int | None:
        """The length of the body when all of it has arrived (none read yet: asked at the
        head); else None."""
        payload = self._payload
        if payload is EMPTY_PAYLOAD:
            return 0
        if not payload.is_eof() or payload.exception() is not None:
            return None
        return payload.total_bytes

    async def read_chunk(self) -> bytes:
        """The next bytes of the body (all that are buffered); b"" at its end."""
        return await self._payload.readany()

    def discard(self) -> None:
        """Give up on the rest of the body: the connection is closed unless it was already
        read to the end (and went back to the pool)."""
        conn = self._conn
        if conn.exchange == self._exchange and conn.busy:
            conn.abort()


class UpstreamConnection(BaseProtocol):
    """One keep-alive connection to an upstream; one exchange (request + response) at a time."""

    __slots__ = (
        "_after_head", "_body_task", "_broke", "_carried_body", "_closed_waiter", "_failed", "_got_bytes",
        "_head", "_head_bytes", "_head_carry", "_head_method", "_idempotent", "_interim_bytes", "_interims",
        "_last_read", "_message", "_on_interim", "_payload", "_pool", "_read_timeout", "_read_timer",
        "_sent", "_stray", "_total_timer", "busy", "exchange", "idle_since", "peer", "retired",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: HostPool) -> None:
        super().__init__(loop)
        self._pool = pool
        self.busy = False
        self.exchange = 0
        self.idle_since = 0.0
        self.peer: Peer | None = None  # the address connected to (``HostPool._connect``)
        # Closed when its exchange ends, never pooled again: its address is no longer the
        # upstream's (``HostPool._readdressed``), or its request carried a body (``request``).
        self.retired = False
        self._head: asyncio.Future[Response] | None = None
        self._on_interim: InterimHook | None = None
        self._interims = 0
        self._head_bytes = 0
        self._interim_bytes = 0  # the interim responses' heads so far (they count in MAX_HEAD)
        self._message: Any = None
        self._payload: StreamReader | None = None
        self._got_bytes = False
        self._sent = False
        self._failed = False
        self._head_method = False
        self._head_carry = b""  # the last bytes fed up to a head's end, where that end may start
        self._stray = 0  # bytes dropped after a 204/304's head (``_feed_head``), or after a
        # whole response to a request that is not idempotent (``_overrun``): never reused
        self._idempotent = True  # the exchange's request may be repeated (``_overrun``)
        self._carried_body = False  # a request with a body went out on it (``close``)
        self._after_head = -1  # the bytes after the final head in its read, when ``_feed_head`` split it
        # The parser's error in what followed the final head, in the head's read (``_feed_head``):
        # the body's, told to its reader once the head is delivered.
        self._broke: Exception | None = None
        self._read_timeout = 0.0
        self._last_read = 0.0
        self._read_timer: asyncio.TimerHandle | None = None
        self._total_timer: asyncio.TimerHandle | None = None
        self._body_task: asyncio.Task[None] | None = None
        self._closed_waiter: asyncio.Future[None] | None = None

    # -- the exchange ----------------------------------------------------------------------

    @property
    def answering(self) -> bool:
        """Whether a byte of the current exchange's response has arrived."""
        return self._got_bytes

    @property
    def request_sent(self) -> bool:
        """Whether the current exchange's request was written whole (its head, and its body)."""
        return self._sent

    def alive(self) -> bool:
        t = self.transport
        return t is not None and not t.is_closing()

    async def request(self, head: bytes, body: AsyncIterable[bytes] | None, chunked: bool,
                      expected: int | None, *, head_method: bool, read_timeout: float,
                      total_deadline: float | None = None, on_interim: InterimHook | None = None,
                      idempotent: bool = True, with_body: bool = False) -> Response:
        """Send a request (head, then a streamed body if any) and wait for the response head.

        Interim responses (1xx but 101) that come before it go to ``on_interim`` as they
        arrive, in order: (status, reason, fields). ``idempotent`` false (a POST, a PATCH): a
        whole response followed by stray bytes in its read is answered all the same
        (``_overrun``). ``with_body``: the request carries a body, streamed as ``body`` or
        within ``head``: the connection is never reused after it (module docstring, *Request
        bodies*)."""
        loop = self._loop
        transport = self.transport
        if transport is None or transport.is_closing() or self.busy:
            raise UpstreamDisconnected(f"{self._pool.name}: the pooled connection has closed")
        self.busy = True
        self.exchange += 1
        self._message = self._payload = None
        self._on_interim = on_interim
        self._interims = self._head_bytes = self._interim_bytes = 0
        self._got_bytes = self._failed = False
        self._sent = body is None
        self._head_method = head_method
        self._head_carry = b""
        self._stray = 0
        self._idempotent = idempotent
        self._after_head = -1
        self._broke = None
        self._parser = strict_response_parser(self, loop, head=head_method, name=self._pool.name)
        head_future: asyncio.Future[Response] = loop.create_future()
        self._head = head_future
        self._read_timeout = read_timeout
        self._last_read = loop.time()
        if read_timeout and self._read_timer is None:
            self._read_timer = loop.call_at(self._last_read + read_timeout, self._check_read)
        if total_deadline is not None:
            self._total_timer = loop.call_at(total_deadline, self._on_total_timeout)
        if with_body or body is not None:
            self.retired = True  # the origin may answer the body later, as a request of its own
            self._carried_body = True  # (closed with a reset: ``close``)
        transport.write(head)
        if body is not None:
            self._body_task = loop.create_task(self._send_body(body, chunked, expected))
        try:
            response = await head_future
        except BaseException:
            self.abort()  # cancelled, or failed: the connection is in an unknown state
            raise
        return response

    async def _send_body(self, body: AsyncIterable[bytes], chunked: bool, expected: int | None) -> None:
        """Stream a request body (chunked, or exactly ``expected`` bytes), minding the socket's
        write buffer; a failure ends the exchange.

        A failure of the client's body (reading it raised, or it was shorter or longer than its
        ``Content-Length``) is a ``ClientBodyError``, told apart from a failure of this
        connection (an ``UpstreamError``): a client that breaks off its upload must not count
        against the upstream's health."""
        sent = 0
        chunks = aiter(body)
        try:
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except (asyncio.CancelledError, BodyCutOff, BodyTimedOut, BodyRefused):
                    raise  # (the stop cut the body off, it came too slowly or was malformed: its
                    # client is told so)
                except Exception as exc:  # the client's body broke off (closed, reset, malformed)
                    # (ClientGone stays itself: the client left, which its access-log line says)
                    error = ClientGone if isinstance(exc, ClientGone) else ClientBodyError
                    raise error(f"{self._pool.name}: the client's request body broke off "
                                f"after {sent} bytes: {exc!r}") from exc
                if not chunk:
                    continue
                transport = self.transport
                if transport is None or self._failed:
                    return
                sent += len(chunk)
                if expected is not None and sent > expected:
                    raise ClientBodyError(f"{self._pool.name}: request body longer than its "
                                          "Content-Length")
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._paused:
                    await self._drain_helper()
            if expected is not None and sent != expected:
                raise ClientBodyError(f"{self._pool.name}: the client's request body ended after "
                                      f"{sent} of {expected} bytes")
            if chunked and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
            self._sent = not self._failed and self.transport is not None
        except asyncio.CancelledError:
            raise
        except (UpstreamError, ClientBodyError) as exc:
            self._fail(exc)
        except Exception as exc:  # this connection broke (writing to it, or waiting to)
            self._fail(UpstreamConnectError(f"{self._pool.name}: sending the request body failed: "
                                            f"{exc!r}"))
        finally:
            self._body_task = None
            self._last_read = self._loop.time()  # the upstream's silence starts now
            if self._message is not None and self._payload is not None and self._payload.is_eof():
                self._finish()  # the response ended before the body was sent

    # -- protocol callbacks ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if data:
            self._last_read = self._loop.time()
            if not self.busy:
                self._violation()  # bytes nobody asked for: never reuse this connection
                return
            self._got_bytes = True
        parser = self._parser
        if parser is None:
            return
        if self._message is None:
            self._head_bytes += len(data)
            # Fed up to the head's end first (``_feed_head``) where the response may end at its
            # head: to HEAD, or when its first read does not show a final status other than 204
            # and 304 (an interim 1xx first, a status line not whole yet, a later read of the
            # head). Any other response goes to the parser at once, unsearched: per response,
            # a slice and three comparisons.
            status = data[9:12]
            bounded = (self._head_method or self._head_bytes != len(data) or len(status) < 3
                       or status[0] == 0x31 or status in _ENDS_AT_HEAD)
        else:
            bounded = self._head_method
        try:
            if bounded:
                messages, upgraded = self._feed_head(parser, data)
            else:
                messages, upgraded, _tail = parser.feed_data(data)
        except Exception as exc:
            # (The error path alone: the common one is as above.)
            if self._message is not None:  # in the body, after the final head (delivered)
                self._fail(_payload_error(self._pool.name)(_describe(exc)))
                return
            if bounded:  # an error after the final head is not raised (``_feed_head``)
                self._fail(UpstreamProtocolError(f"{self._pool.name}: invalid response: "
                                                 f"{_describe(exc)}"))
                return
            # The head's first read, fed whole: the parser raised on the first bad byte, its
            # head or its body's, and dropped the head with it. Fed again, up to the head's end
            # first: a malformed body is the body's failure (UPSTREAM-BROKE-OFF, shared by the
            # fetch's clients, not held against the upstream), not an invalid response.
            parser = self._parser = strict_response_parser(self, self._loop, head=False,
                                                           name=self._pool.name)
            try:
                messages, upgraded = self._feed_head(parser, data)
            except Exception as again:
                self._fail(UpstreamProtocolError(f"{self._pool.name}: invalid response: "
                                                 f"{_describe(again)}"))
                return
        for message, payload in messages:
            if self._message is None:
                code = message.code
                if not 100 <= code <= 599:
                    # RFC 9110 §15: a status code is three digits, 100-599; llhttp reads any
                    # number ("000", "099", "999"). Relayed, a client reads it in its own way;
                    # stored, it would be served to everyone and replace a good copy.
                    self._fail(UpstreamProtocolError(f"{self._pool.name}: invalid status code {code}",
                                                     detail="an invalid status code"))
                    return
                version = message.version
                if version != (1, 1) and version != (1, 0):
                    # llhttp refuses HTTP/1.2 but reads any other major version ("HTTP/2.0",
                    # "HTTP/9.9"): no HTTP/1.1 response, which was relayed and stored as one.
                    self._fail(UpstreamProtocolError(
                        f"{self._pool.name}: invalid response: HTTP/{version[0]}.{version[1]} status line",
                        detail="a status line that is not HTTP/1.x"))
                    return
                if 100 <= code < 200 and code != 101:
                    # An interim response (100 Continue, 102 Processing, 103 Early Hints).
                    self._interims += 1
                    if self._interims > MAX_INTERIMS:
                        self._fail(UpstreamProtocolError(
                            f"{self._pool.name}: more than {MAX_INTERIMS} interim (1xx) responses",
                            detail="too many interim (1xx) responses"))
                        return
                    self._interim_bytes += head_size(message)
                    if self._interim_bytes > MAX_HEAD:
                        self._head_too_long()
                        return
                    hook = self._on_interim
                    if hook is not None:
                        try:
                            hook(code, reason_phrase(code, message.reason or ""), message.headers)
                        except Exception:  # the client's side is not this exchange's concern
                            logging.getLogger("cachegate.upstream").exception("interim response hook")
                    continue
                if code == 101 or upgraded:
                    self._fail(UpstreamProtocolError(f"{self._pool.name}: unexpected protocol switch",
                                                     detail="an unexpected protocol switch"))
                    return
                coding = unsupported_coding(message, self._head_method)
                if coding is not None:
                    self._fail(UpstreamProtocolError(f"{self._pool.name}: unsupported Transfer-Encoding "
                                                     f"{coding!r} (only chunked is decoded)",
                                                     detail=f"an unsupported Transfer-Encoding {coding!r}"))
                    return
                # (A head within the bytes read so far: measured only when they exceed the cap.)
                if self._head_bytes > MAX_HEAD and self._interim_bytes + head_size(message) > MAX_HEAD:
                    self._head_too_long()
                    return
                self._message, self._payload = message, payload
                self._on_interim = None
            else:  # a second response to one request
                if self._head is None:  # (the first one's head was delivered: it is whole)
                    self._fail(UpstreamProtocolError(f"{self._pool.name}: more data after the response"))
                    return
                if not self._overrun(data):
                    return
                break
        response_payload = self._payload
        if self._message is None or response_payload is None:
            if self._head_bytes > MAX_HEAD:  # still no end of the head: it is too long already
                self._head_too_long()
            return
        payload = response_payload
        head = self._head
        if head is not None and self._broke is not None:  # the body failed in the head's read
            broke, self._broke = self._broke, None  # (``_feed_head``)
            if not payload.is_eof():
                # Known to have failed before any of it was handed over: the head waiter gets
                # the body's error (UPSTREAM-BROKE-OFF), not a head it would relay and then cut
                # off. Then the flight serves a stored response stale (stale-if-error) or a 502.
                self._fail(_payload_error(self._pool.name)(_describe(broke)))
                return
            if not self._overrun(data):  # a whole response, and bytes after it
                return
        if payload.is_eof():
            # The whole response has arrived: anything that followed it is a framing error.
            if self._parser is None:
                if self._stray:  # dropped after it (``_overrun``)
                    self._message_done(reuse=False)
            elif self._leftovers():
                if head is not None and not self._overrun(data):
                    return
                self._message_done(reuse=False)
            else:  # (bytes dropped after a 204/304: ``Response.stray``, warned of by ``Engine.warn_stray``)
                self._message_done(reuse=not self._stray and reusable_after(self._message, self._head_method))
        if head is not None:
            self._head = None
            if not head.done():
                head.set_result(Response(self._message, payload, self, self.exchange))

    def _feed_head(self, parser: Any, data: bytes) -> tuple[list[Any], bool]:
        """Feed a response to the parser up to the end of its final head; then, when that
        response ends at its head whatever its fields say (RFC 9112 §6.3: to HEAD, a 204, a
        304), drop what follows, and feed it on otherwise.

        A naive origin writes the GET's body after its answer to HEAD, and some write a body
        after a 204 or 304: the parser would read it as a second response (a 502, and a passive
        failure of the upstream). The client gets the head alone, as from nginx, and the
        connection is closed, never reused (``reusable_after``; for a 204/304 ``_stray`` counts
        the bytes dropped, and a WARNING names the upstream).

        Each head ends at its first CRLF CRLF (the strict parser refuses bare LF line ends and
        folded fields); interim (1xx) heads are fed one at a time until the final one."""
        messages: list[Any] = []
        upgraded = False
        carry = self._head_carry
        while data:
            joined = carry + data
            at = joined.find(b"\r\n\r\n")
            if at < 0:
                self._head_carry = joined[-3:]
                got, upgraded, _tail = parser.feed_data(data)
                messages += got
                break
            end = at + 4 - len(carry)
            carry = self._head_carry = b""
            got, upgraded, _tail = parser.feed_data(data[:end])
            messages += got
            data = data[end:]
            final = next((m.code for m, _ in got if not 100 <= m.code < 200 or m.code == 101), None)
            if upgraded or final is not None:  # the final head
                self._after_head = len(data)
                if upgraded or self._head_method:
                    pass  # the rest is dropped
                elif final in (204, 304):
                    self._stray = len(data)  # dropped
                elif data:
                    try:
                        more, upgraded, _tail = parser.feed_data(data)
                    except Exception as exc:
                        # After the final head: its body's error (``data_received`` delivers the
                        # head, then fails its body), not an invalid response.
                        self._broke = exc
                        self._parser = None
                    else:
                        messages += more
                break
        return messages, upgraded

    def _overrun(self, data: bytes) -> bool:
        """Bytes followed the whole response in ``data``, the read that brought its final head
        (more body than its ``Content-Length`` said, a second response): RFC 9112 §6.3, they
        must not be processed as a response; discarding them is allowed. Whether the response
        is still answered: to a request that is not idempotent (a POST, a PATCH), yes, and the
        bytes are dropped (``_stray`` counts them: ``Response.stray``) and the connection is
        closed; to another, no: the exchange fails (``UpstreamOverrun``, a 502).

        Refused, an origin's answer to a POST it had acted on was a 502 that its client would
        likely repeat (nginx and Varnish relay it). A GET's answer may be stored and shared,
        with a ``Content-Length`` perhaps too small for its body; refused, its client may ask
        again: nothing was done."""
        self._parser = None
        message = self._message
        after = self._after_head
        if after < 0:  # the whole response in the exchange's first read, fed whole
            after = len(data) - data.find(b"\r\n\r\n") - 4
        body = data[len(data) - after:]
        if message.chunked:
            end = chunked_end(body)
        else:
            end = content_length(message.headers.getall("Content-Length", ())) or 0
        stray = after - end if end is not None and end < after else 1
        if self._idempotent:
            self._fail(UpstreamOverrun(f"{self._pool.name}: {stray} or more bytes after the end of the "
                                       f"{message.code} response (bad framing)"))
            return False
        self._stray = stray
        return True

    def _head_too_long(self) -> None:
        self._fail(UpstreamProtocolError(
            f"{self._pool.name}: response head longer than {MAX_HEAD // 1024} KB (status line and "
            "fields, with any interim responses): refused", detail="a response head too long"))

    def _leftovers(self) -> bool:
        """Whether the parser holds the start of another message (after a complete one)."""
        parser: Any = self._parser
        self._parser = None
        try:
            return parser.feed_eof() is not None
        except Exception:
            return True

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._cancel_timers()
        self._pool.forget(self)
        waiter = self._closed_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self.busy or self._failed:
            self.busy = False
            return
        name = self._pool.name
        parser, self._parser = self._parser, None
        if self._message is None:
            head = self._head
            self._head = None
            if head is not None and not head.done():
                if self._got_bytes:
                    # It got the request and may have acted on it: never retried.
                    head.set_exception(UpstreamProtocolError(
                        f"{name}: closed the connection in the middle of the response head"))
                else:
                    head.set_exception(UpstreamDisconnected(
                        f"{name}: closed the connection before answering"
                        + (f" ({exc})" if exc is not None else "")))
            self.busy = False
            return
        payload = self._payload
        if parser is not None and payload is not None and exc is not None:
            # A reset is no end of a body, not even of one framed by the connection's end:
            # a truncated body must never be stored (or relayed) as complete.
            payload.set_exception(UpstreamBodyError(f"{name}: body broke off: {_describe(exc)}"))
        elif parser is not None and payload is not None:
            try:
                parser.feed_eof()  # ends a body framed by the connection's end
            except Exception as err:
                payload.set_exception(UpstreamBodyError(f"{name}: body broke off: {_describe(err)}"))
            else:
                if not payload.is_eof() and payload.exception() is None:
                    payload.set_exception(UpstreamBodyError(f"{name}: body broke off"))
        self.busy = False

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The StreamReader asks after every read; only a real pause needs the work.
        if self._reading_paused:
            self._last_read = self._loop.time()  # silence while paused was ours, not the peer's
            super().resume_reading(resume_parser)

    # -- ends ------------------------------------------------------------------------------

    def _message_done(self, reuse: bool) -> None:
        """The parser has the whole response: hand the connection back, or close it."""
        if self._total_timer is not None:
            self._total_timer.cancel()
            self._total_timer = None
        if self._body_task is not None:
            # The origin answered before the request body was all sent: it has not read (and
            # may never read) the rest, and would take what follows as its next request. That
            # rest was the client's to choose: on a reused connection it made the next
            # client's request part of a request of its own, and the answer to that was stored
            # under the next client's URL. RFC 9112 §9.5: stop sending the body and close; an
            # abort, so that nothing of it still buffered goes out either. Whether or not the
            # answer closes the connection: when it did, the body's task read on, and the
            # client's connection, answered meanwhile, read the same body to its end (aiohttp's
            # read of a body its handler left), two readers of one stream: "readany() called
            # while another coroutine is already waiting", an ERROR line per such upload.
            self._parser = None
            self.busy = False
            self.abort()  # (cancels the body's task)
            return
        if not reuse or (self._message is not None and self._message.should_close):
            self._parser = None
            self.busy = False
            self.close()
            return
        self._finish()

    def _finish(self) -> None:
        self._parser = None
        self.busy = False
        if self._failed or not self.alive():
            self.close()
            return
        self._pool.release(self)

    def _fail(self, exc: UpstreamError | ClientBodyError) -> None:
        """End the exchange with an error: the head waiter or the body reader gets it, and the
        connection is aborted (never reused)."""
        if self._failed:
            return
        self._failed = True
        self._parser = None
        head = self._head
        self._head = None
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(exc)
        self.abort()

    def _violation(self) -> None:
        self._failed = True
        self.abort()

    def _check_read(self) -> None:
        timer = self._read_timer
        self._read_timer = None
        if not self.busy or self._failed or not self._read_timeout:
            return
        now = self._loop.time()
        if self._reading_paused or self._body_task is not None:
            # Paused by us, or still sending the request body: the upstream is not the silent one.
            due = now + self._read_timeout
        else:
            due = self._last_read + self._read_timeout
            if now >= due:
                # (uvloop arms a deadline under half a millisecond away as a plain Handle, with no
                # ``when``: run at once, on time. Asked for it, the timer failed with AttributeError
                # and no read timeout ever came: the request waited for the origin's 30 s.)
                when = getattr(timer, "when", None)
                armed = when() if when is not None else now
                if armed < due + PAUSE_LATE and late(armed, now):
                    # The process was paused past the timeout: the answer may be waiting unread
                    # (the loop runs its timers before it reads). One more pass of reads first,
                    # once per deadline (a grace's timer is armed past due + PAUSE_LATE: late in
                    # its turn, the loop is busy, not paused, and the timeout ends it).
                    self._read_timer = self._loop.call_at(now + PAUSE_GRACE, self._check_read)
                    return
                where = "" if self._message is None else " mid-body"
                self._fail(UpstreamReadTimeout(f"{self._pool.name}: read timed out{where} (no byte for "
                                               f"{self._read_timeout:g}s)"))
                return
        self._read_timer = self._loop.call_at(due, self._check_read)

    def _on_total_timeout(self) -> None:
        self._total_timer = None
        if self.busy and not self._failed:
            where = "" if self._message is None else " mid-body"
            total = self._pool.total_timeout or 0
            self._fail(UpstreamTotalTimeout(f"{self._pool.name}: total timeout ({total:g}s) exceeded{where}"))

    def _cancel_timers(self) -> None:
        for timer in (self._read_timer, self._total_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._total_timer = None

    def close(self) -> None:
        """Close it; one that carried a request body (*Request bodies*) with a reset, which
        leaves no TIME_WAIT here: closing such connections gracefully, one per request with a
        body, left each local port unusable for 60 s, and 470 POSTs a second to one origin
        address used up the 28,000 ports (``Cannot assign requested address``: 502s). Its
        exchange is over, its response read whole; the origin was told ``Connection: close``
        (``request_head``) and has mostly closed first (then nothing is left to reset). HAProxy
        closes its server connections so (``option nolinger``)."""
        transport = self.transport
        if transport is not None:
            if self._carried_body:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, NO_LINGER)
            transport.close()
        self._pool.forget(self)

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.abort()
        self._pool.forget(self)
        if self._body_task is not None:
            self._body_task.cancel()

    async def wait_closed(self) -> None:
        if self.transport is None:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self._loop.create_future()
        await self._closed_waiter


def reusable_after(message: Any, head_method: bool) -> bool:
    """Whether a connection may carry another request once this response has ended.

    A response to HEAD, and a 204 or 304, ends with its head by rule (RFC 9110 §6.4.1,
    RFC 9112 §6.3), whatever its fields say; the parser infers that end rather than reading
    it. A HEAD response's fields describe the GET's body, and a naive origin writes that body
    too (dropped unparsed: ``_feed_head``), so a connection is never reused after a HEAD (an
    upstream HEAD is rare here: a HEAD miss fills with a GET). A 204/304 is reused only when
    its head announces no body: a ``Content-Length`` other than 0 or any ``Transfer-Encoding``
    says bytes may follow, and late ones would be read as the next request's response. Closing
    costs one new connection; waiting a while for bytes instead would still lose to an origin
    that waits longer.
    """
    if message.should_close or head_method:
        return False
    if message.code in (204, 304):
        headers = message.headers
        length = headers.get("Content-Length")
        return "Transfer-Encoding" not in headers and (length is None or length.strip() == "0")
    return True


def chunked_end(data: bytes) -> int | None:
    """Where the chunked body that ``data`` starts with ends (its last chunk and trailer section
    included); None when ``data`` holds no whole one. For a body the parser has read whole
    already: only the stray bytes after it are measured so (``UpstreamConnection._overrun``).

    >>> chunked_end(b"7;x=1\\r\\ncreated\\r\\n0\\r\\n\\r\\nXYZ"), chunked_end(b"0\\r\\nA: b\\r\\n\\r\\nXYZ")
    (21, 11)
    >>> chunked_end(b"7\\r\\ncrea") is None
    True
    """
    at = 0
    try:
        while True:
            eol = data.index(b"\r\n", at)
            size = int(data[at:eol].partition(b";")[0], 16)
            at = eol + 2
            if not size:
                break
            at += size + 2
        while True:  # the trailer section: fields, each on its line, then an empty line
            eol = data.index(b"\r\n", at)
            empty, at = eol == at, eol + 2
            if empty:
                return at
    except ValueError:
        return None


def unsupported_coding(message: Any, head_method: bool) -> str | None:
    """The ``Transfer-Encoding`` of a response body that is framed by anything but exactly
    ``chunked`` (RFC 9112 §6.1), or by a transfer coding in an HTTP/1.0 response (which
    RFC 9112 §6.1 says to treat as faulty framing); None when the body can be relayed. A
    response without a body (to HEAD, 1xx, 204, 304) is framed by its status, not its fields."""
    coding: str | None = message.headers.get("Transfer-Encoding")
    if coding is None or ends_at_head(message.code, head_method):
        return None
    if message.version < (1, 1):
        return coding
    tokens = [t.strip().lower() for t in coding.split(",")]
    if tokens == ["chunked"] or "chunked" not in tokens:
        # Without chunked the body is framed by the connection's end (RFC 9112 §6.3): relayed
        # and stored as it came, the hop-by-hop field dropped, as nginx and Varnish relay it.
        return None
    return coding


DESCRIBED = 200  # characters of a parser's error in a message (it quotes the origin's bytes)


def _describe(exc: BaseException) -> str:
    """The parser's error in one line: what was wrong, and the line it quotes (the origin's
    bytes, which may echo what a client sent: its path), cut to ``DESCRIBED`` characters with
    the length it had. Its warnings are told apart without what it quotes
    (``proxy.logs.failure_text``).

    >>> _describe(ValueError("Invalid header token:\\n\\n  b'X-Bad: " + 300 * "a" + "'\\n    ^"))[-36:]
    'aaaaaaaaaaaaaaaa... (332 characters)'
    """
    message = getattr(exc, "message", None)
    text = " ".join((message if isinstance(message, str) else str(exc)).split())
    text = text.removesuffix(" ^")  # llhttp's caret under the quoted line: a line joined cannot show it
    return text if len(text) <= DESCRIBED else f"{text[:DESCRIBED]}... ({len(text)} characters)"


class HostPool:
    """Up to ``limit`` keep-alive connections to one upstream (``scheme://host:port``)."""

    def __init__(self, url: URL, limit: int, ssl_context: ssl.SSLContext | None, connect_timeout: float,
                 *, total_timeout: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.name = str(url)
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.host_header = url.host_port_subcomponent or self.host
        # An IPv6 literal's zone (``[fe80::1%25eth0]``) names an interface of this machine: never
        # sent (RFC 6874 §4), neither in Host (a strict server answers 400: the upstream was taken
        # out by its own health checks) nor as the TLS server name.
        self.sni = self.host
        if "%" in self.host:
            self.sni = self.host.partition("%")[0]
            self.host_header = self.host_header.replace(self.host, self.sni, 1)
        self.limit = max(1, limit)
        self.ssl = ssl_context if url.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout  # for error messages (the deadline is per request)
        self._clock = clock
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._conns: set[UpstreamConnection] = set()  # open (busy or idle)
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[UpstreamConnection | None]] = collections.deque()
        self.addresses = Addresses(self.name, self.host, self.port, self._readdressed, clock=clock)
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def size(self) -> int:
        return len(self._conns) + self._connecting

    @property
    def idle(self) -> int:
        return len(self._idle)

    # -- taking and giving back ------------------------------------------------------------

    @property
    def free(self) -> bool:
        """A request would get a connection without waiting: one idle, or room for a new one
        (``UpstreamPool`` prefers an upstream whose pool is not full, as nginx's max_conns)."""
        return bool(self._idle) or (self.size < self.limit and not self._waiters)

    async def acquire(self, *, new: bool = False, wait: bool = True) -> UpstreamConnection:
        """An idle live connection, a new one, or (at the limit) the next one given back.

        Waiting for a free connection and connecting share the connect timeout. ``new``: never
        an idle pooled connection (an idle one is closed for the slot): the try after a pooled
        connection closed as the request left, whose siblings the upstream may have closed too.
        ``wait``: False when the request already waited a connect timeout for another pool
        (``PoolWaitTimeout`` at once when none is free)."""
        conn = self._take_idle()
        if conn is not None:
            if not new:
                return conn
            self._trade(conn)
            return await self._connect_reserved(None)
        if self.size < self.limit and not self._waiters:
            self._connecting += 1  # the slot is ours
            return await self._connect_reserved(None)
        if not wait:
            raise PoolWaitTimeout(f"{self.name}: no free pooled connection (all {self.limit} busy)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                given = await waiter
        except TimeoutError:
            self._give_back(waiter)
            raise PoolWaitTimeout(f"{self.name}: no free pooled connection within the connect "
                                  f"timeout ({self.connect_timeout:g}s; all {self.limit} busy)") from None
        except BaseException:
            self._give_back(waiter)
            raise
        if given is not None:
            if not new or given.exchange == 0:
                return given
            self._trade(given)
        return await self._connect_reserved(deadline)

    def _trade(self, conn: UpstreamConnection) -> None:
        """Close a pooled connection and keep its slot for a new one (``_connect_reserved``)."""
        self._conns.discard(conn)  # not ``forget``: the slot is not woken for another waiter
        self._connecting += 1
        conn.close()

    def _give_back(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        """A waiter that gave up: what it was handed (a connection, or a slot) goes on."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            conn = waiter.result()
            if conn is not None:
                self.release(conn)
            else:
                self._connecting -= 1
                self._wake()

    def _take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: its TCP window is warm
            if conn.alive() and self._clock() - conn.idle_since < KEEPALIVE_IDLE:
                return conn
            conn.close()
        return None

    async def connect_apart(self) -> UpstreamConnection:
        """A new connection outside the pool: not counted in ``limit``, never given to another
        request (``release`` closes it), for an exchange that must not wait for a free pooled
        connection (an active health check: ``UpstreamPool.check_once``). The caller closes it."""
        if self._closed:
            raise UpstreamConnectError(f"{self.name}: the pool is closed")
        conn = await self._connect(None)
        if not conn.alive():
            raise UpstreamConnectError(f"{self.name}: the connection closed as it opened")
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """A connection whose exchange ended cleanly: to a waiter, or idle (one made apart from
        the pool, or to an address the name no longer lists, is closed)."""
        if self._closed or conn.retired or not conn.alive() or conn not in self._conns:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self._clock()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE_IDLE / 2, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed (or closing): its slot is free."""
        if conn in self._conns:
            self._conns.discard(conn)
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
            self._wake()

    def _wake(self) -> None:
        """A slot is free: the first waiter may connect (the slot is reserved for it)."""
        while self._waiters and self.size < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._connecting += 1
                waiter.set_result(None)
                return

    def _readdressed(self, listed: frozenset[Peer]) -> None:
        """The name's addresses changed (``Addresses``): a connection to one no longer ``listed``
        is closed when idle, and not pooled again when its exchange ends (``retired``). Reused
        most recently first, the pool kept sending steady traffic to the old address for as
        long as it accepted (a connection never idled ``KEEPALIVE_IDLE``), while health checks,
        on new connections, checked the new one; nginx reuses a keep-alive connection only when
        its address is the peer chosen now."""
        for conn in list(self._conns):
            if conn.peer not in listed:
                conn.retired = True
        for conn in [c for c in self._idle if c.retired]:
            conn.close()

    def _sweep(self) -> None:
        """Close connections idle for KEEPALIVE_IDLE (oldest first)."""
        self._sweeper = None
        now = self._clock()
        idle = self._idle
        while idle and now - idle[0].idle_since >= KEEPALIVE_IDLE:
            idle.popleft().close()
        if idle:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE_IDLE / 2, self._sweep)

    # -- connecting ------------------------------------------------------------------------

    async def _connect_reserved(self, deadline: float | None) -> UpstreamConnection:
        """Connect in a slot already counted in ``_connecting``."""
        try:
            conn = await self._connect(deadline)
            if not conn.alive():
                raise UpstreamConnectError(f"{self.name}: the connection closed as it opened")
        except BaseException:
            self._connecting -= 1
            self._wake()
            raise
        self._connecting -= 1
        self._conns.add(conn)
        return conn

    async def _connect(self, deadline: float | None) -> UpstreamConnection:
        """A new connection: the upstream's addresses (``Addresses``: looked up only when none is
        known), then Happy Eyeballs over them (RFC 8305: the next address is tried
        ``HAPPY_EYEBALLS_DELAY`` after the last began, the first to connect wins), all within the
        connect timeout. Tried one after another instead, a first address that drops packets (an
        IPv6 route that goes nowhere, a host that is down) took the whole timeout, and the next
        one, alive, was never tried: every request was a 504. The addresses tried and the one that
        connected are told to ``Addresses.tried``: one that failed is tried last for a while."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.connect_timeout
        step = "lookup"  # then "connect"; "handshake" once TCP is connected, TLS under way
        addresses = self.addresses
        attempted: list[Peer] = []  # the addresses tried, in order (several only)
        try:
            async with asyncio.timeout_at(deadline):
                infos = addresses.known if addresses.fixed is not None else await addresses.get()
                assert infos is not None
                step = "connect"
                if len(infos) == 1:
                    sock = await start_connection(infos, loop=loop)
                else:
                    # Every address gets its try within the connect timeout: with 0.25 s between
                    # tries, a 100 ms timeout never reached the second address.
                    delay = min(HAPPY_EYEBALLS_DELAY, max(0.0, deadline - loop.time()) / len(infos))

                    def opened(info: Any) -> socket.socket:
                        attempted.append(peer_of(info[4]))
                        return socket.socket(info[0], info[1], info[2])

                    try:
                        sock = await start_connection(infos, happy_eyeballs_delay=delay, interleave=1,
                                                      loop=loop, socket_factory=opened)
                    except (OSError, RuntimeError):  # every address failed
                        addresses.tried(attempted, None)
                        raise
                    except BaseException:  # cancelled (the connect timeout, or the caller's)
                        addresses.tried(attempted[:-1], None)  # (the last one was still under way)
                        raise
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    peer = peer_of(sock.getpeername())
                except BaseException:
                    sock.close()
                    raise
                if attempted:
                    addresses.tried(attempted, peer)
                # TCP first, then TLS: a plain-HTTP server behind an https:// URL waits for a
                # request head that never comes, and was reported as a connect that timed out.
                # (The loop owns the socket now: it closes it if the handshake fails.)
                if self.ssl is None:
                    _, conn = await loop.create_connection(lambda: UpstreamConnection(loop, self), sock=sock)
                else:
                    step = "handshake"
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(loop, self), sock=sock, ssl=self.ssl,
                        server_hostname=self.sni)
                conn.peer = peer
                return conn
        except LookupFailed as exc:
            if exc.timeout:
                raise UpstreamDNSTimeout(f"{self.name}: {exc}") from None
            raise (UpstreamNoSuchName if exc.definite else UpstreamDNSError)(f"{self.name}: {exc}") from None
        except TimeoutError:
            if step == "lookup":
                why = self.addresses.timed_out(self.connect_timeout, "timeouts.connect")
                raise UpstreamDNSTimeout(f"{self.name}: {why}") from None
            if step == "handshake":
                raise UpstreamConnectTimeout(f"{self.name}: TLS handshake timed out (connected; is it "
                                             "an https server?)") from None
            raise UpstreamConnectTimeout(f"{self.name}: connect timed out") from None
        except (OSError, RuntimeError) as exc:  # refused, unreachable, TLS verification (ssl.SSLError)
            # (uvloop raises RuntimeError for some socket failures)
            mine = exhausted(exc)
            if mine is not None:  # out of descriptors here: not the upstream's failure
                raise out_of_resources(self.name, mine) from exc
            if step == "handshake":
                raise UpstreamConnectError(f"{self.name}: TLS handshake failed: {exc}") from exc
            raise UpstreamConnectError(f"{self.name}: cannot connect: {exc}") from exc

    @property
    def resolving(self) -> bool:
        """A new connection now waits for the name's first lookup (no address known yet)."""
        return self.addresses.waiting

    async def close(self) -> None:
        self._closed = True
        self.addresses.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError(f"{self.name}: the pool is closed"))
        self._waiters.clear()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=1.0)


def request_head(method: str, target: str, headers: Sequence[tuple[str, str]], default_host: str,
                 body: bytes | AsyncIterable[bytes] | None) -> tuple[bytes, bool, int | None]:
    """The request head as bytes, with the framing this client decides: (head, chunked,
    expected body length). The caller's Content-Length and Transfer-Encoding are dropped
    and set for the body really sent, except that a streamed body keeps its Content-Length
    (sent exactly, or the exchange fails); no body means no framing fields (or
    ``Content-Length: 0`` for POST, PUT, PATCH). A CR or LF anywhere is refused."""
    # Two comprehensions, not a loop of appends: one Python-level call per field fewer on every
    # request sent upstream (``scripts/bench-calls``); the fields' order is kept.
    names = [k.lower() for k, _ in headers]
    length: str | None = None
    if "content-length" in names or "transfer-encoding" in names:  # (a client's framing: rare)
        for (_, v), lk in zip(headers, names, strict=True):
            if lk == "content-length":
                length = v
        fields = [f"{k}: {v}" for (k, v), lk in zip(headers, names, strict=True) if lk not in _FRAMING]
    else:
        fields = [f"{k}: {v}" for k, v in headers]
    lines = [f"{method} {target} HTTP/1.1"] if "host" in names \
        else [f"{method} {target} HTTP/1.1", f"Host: {default_host}"]
    lines += fields
    chunked = False
    expected: int | None = None
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}")
        if body:
            lines.append("Connection: close")  # (*Request bodies*: never reused)
    elif body is not None:
        lines.append("Connection: close")
        if length is not None and length.isascii() and length.isdigit():  # not '²' or '٥'
            expected = int(length)
            lines.append(f"Content-Length: {expected}")
        else:
            chunked = True
            lines.append("Transfer-Encoding: chunked")
    elif method in BODY_METHODS:
        lines.append("Content-Length: 0")
    text = "\r\n".join(lines)
    separators = len(lines) - 1
    if text.count("\n") != separators or text.count("\r") != separators or " " in target:
        raise UpstreamProtocolError("refusing to send a request with CR, LF or space inside a field "
                                    "or the target")
    data = (text + "\r\n\r\n").encode("utf-8", "surrogateescape")
    if isinstance(body, bytes) and len(body) <= SMALL_BODY:
        data += body
    return data, chunked, expected


async def body_once(body: bytes) -> AsyncIterable[bytes]:
    yield body


__all__ = [
    "KEEPALIVE_IDLE",
    "HostPool",
    "InterimHook",
    "PoolWaitTimeout",
    "Response",
    "UpstreamConnectTimeout",
    "UpstreamConnection",
    "UpstreamDisconnected",
    "error_kind",
    "request_head",
]
