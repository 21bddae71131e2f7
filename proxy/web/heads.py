"""One writer for every reply head cachegate writes to a client: the status line, the fields
and the message framing (Content-Length or chunked, Connection, Date), for both request paths.

- the general path (``proxy.web.proxy_handler``) answers with ``ReplyResponse``: aiohttp's
  ``StreamResponse`` whose head ``frame`` decides (aiohttp still moves the bytes: its writer
  buffers the head, chunks the body, ends the message);
- the fast hit path (``proxy.web.fastpath``) pre-builds one head per stored variant with
  ``frame`` and ``serialise`` and keeps the bytes (``Head``), with holes for what changes
  per request (Age, the ttl of Cache-Status, X-Request-Id, Date).

So the framing exists once and both paths write the same bytes for the same reply
(tests/test_fastpath.py compares them field by field). The rules are those aiohttp 3.14
applied to cachegate's replies before this writer took them over (``StreamResponse.
_prepare_headers`` and ``Response._start`` in web_response.py), which clients have seen:
RFC 9112 §6.1-6.3 (no Content-Length for 1xx/204/304, none and no Transfer-Encoding for a
body that must be empty) and §9.3 (HTTP/1.0 keep-alive is said, HTTP/1.1 close is said).
A head that is not ASCII keeps an origin's obs-text byte for byte (``serialise_octets``),
which aiohttp's serialiser would drop; an ASCII head, nearly every one, costs a flag check.

No Content-Type is added: an origin's response without one is relayed and stored without
one (RFC 9110 §8.3: a sender that does not know the type may leave it out, and the recipient
may then sniff it; a proxy that wrote ``application/octet-stream`` would change what the
origin said, and a browser would download an HTML page instead of showing it). cachegate's
own replies name their type (``from_response`` gives aiohttp's default to a
``web.Response`` that has none). The Server name and
X-Request-Id are the front end's (``proxy.web.frontend.FrontEnd.own_fields``); no reply
field may describe the framing (``proxy.rules.compile.FRAMING_FIELDS``; the engine drops the
origin's), so this writer owns those fields alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter, _serialize_headers
from multidict import CIMultiDict


@dataclass(frozen=True, slots=True)
class Framing:
    """How a reply's body is delimited, as ``frame`` decided it."""

    chunked: bool  # the body goes in chunks (HTTP/1.1, its length unknown)
    keep_alive: bool  # the connection stays open after this reply


def frame(fields: CIMultiDict[str], status: int, method: str, version: tuple[int, int], length: int | None,
          keep_alive: bool, date: str) -> Framing:
    """Add the framing fields of a reply to ``fields`` (in place): ``length`` is the body's
    length (None: unknown, sent chunked to HTTP/1.1, to the connection's end to HTTP/1.0),
    ``keep_alive`` whether the connection may stay open, ``date`` the Date when the reply has
    none."""
    empty = must_be_empty_body(method, status)
    if length is not None and not should_remove_content_length(method, status):
        fields[hdrs.CONTENT_LENGTH] = str(length)
    chunked = False
    if length is None and not empty:
        if version >= HttpVersion11:
            chunked = True
            fields[hdrs.TRANSFER_ENCODING] = "chunked"
        else:
            keep_alive = False
    if hdrs.DATE not in fields:
        fields[hdrs.DATE] = date
    if hdrs.CONNECTION not in fields:
        if keep_alive:
            if version == HttpVersion10:
                fields[hdrs.CONNECTION] = "keep-alive"
        elif version == HttpVersion11:
            fields[hdrs.CONNECTION] = "close"
    return Framing(chunked, keep_alive)


def reply_version(version: tuple[int, int]) -> tuple[int, int]:
    """The version a reply to a request of ``version`` is framed and labelled in: HTTP/1.0 to a
    1.0 client, else HTTP/1.1, the highest this server speaks (RFC 9110 §6.2: never an echo
    of a version it does not implement, such as a request line's ``HTTP/2.0`` or ``HTTP/0.9``,
    which are refused: ``version_refusal``)."""
    return HttpVersion10 if version == HttpVersion10 else HttpVersion11


def version_refusal(version: tuple[int, int]) -> tuple[int, str] | None:
    """The answer to a request line in a version cachegate does not speak, or None (1.0, 1.1).

    aiohttp's parser takes ``HTTP/2.0`` and ``HTTP/0.9`` (a request line without a version
    too) and used to have them answered as if they were spoken, labelled in their version:
    ``HTTP/2.0 200 OK`` with a chunked body, ``HTTP/0.9 200 OK`` with fields. Another major
    version is 505 (RFC 9110 §15.6.6; an HTTP/2 client uses the preface or ALPN, never an
    HTTP/1 request line); HTTP/0.9 is 400 (RFC 9112 §2.3: its simple requests are not HTTP/1.x
    and have no head to answer in). Either way the connection closes after the answer. Both
    listeners ask this (the client one in ``proxy_handler``, the admin one in a middleware:
    ``admin.version_middleware``).

    >>> version_refusal((1, 1)), version_refusal((2, 0))[0], version_refusal((0, 9))[0]
    (None, 505, 400)
    """
    if version[0] != 1:
        if version == (0, 9):
            return 400, "HTTP/0.9 requests are not supported"
        return 505, f"HTTP/{version[0]}.{version[1]} is not supported: this server speaks HTTP/1.1"
    return None


def status_line(version: tuple[int, int], status: int, reason: str) -> str:
    version = reply_version(version)
    return f"HTTP/{version[0]}.{version[1]} {status} {reason}"


def serialise(version: tuple[int, int], status: int, reason: str, fields: CIMultiDict[str]) -> bytes:
    """The head's bytes (aiohttp's serialiser, in C: it refuses a control character but HTAB
    in any field with ValueError); a head holding an origin's obs-text goes through
    ``serialise_octets``."""
    line = status_line(version, status, reason)
    if ascii_head(line, fields):
        return _serialize_headers(line, fields)
    return serialise_octets(line, fields)


def ascii_head(line: str, fields: CIMultiDict[str]) -> bool:
    """Whether a head is ASCII throughout (``str.isascii`` is a flag read: O(1) per string),
    as nearly every head is: aiohttp's serialiser writes it as it is."""
    return line.isascii() and all(map(str.isascii, fields.values()))


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def serialise_octets(line: str, fields: CIMultiDict[str]) -> bytes:
    """A head that is not ASCII, with each field's octets as they came (RFC 9110 §5.5: a value
    may hold obs-text, bytes 0x80-0xFF, which a recipient treats as opaque data).

    The upstream parser (llhttp, through aiohttp) decodes a field's bytes as UTF-8 with
    ``surrogateescape``: a byte that is not part of UTF-8 becomes a lone surrogate, which
    aiohttp's serialiser silently leaves out (``caf\xe9`` went out as ``caf``). Encoded back
    the same way, every byte goes out as it came; the control characters aiohttp refuses are
    refused here the same way (ValueError). A surrogate no parser made (not an escaped byte)
    cannot be written: left out, as aiohttp's serialiser leaves it."""
    parts = [line, *(f"{k}: {v}" for k, v in fields.items())]
    if any(_CONTROL.search(p) for p in parts):
        raise ValueError("Forbidden control character detected in headers")
    text = "\r\n".join(parts) + "\r\n\r\n"
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return _serialize_headers(line, fields)


def closing(protocol: Any) -> bool:
    """The connection ends after this response whatever the request asked: aiohttp's handler
    was told to close (``close``, or ``shutdown`` of a graceful stop, which forces it), the
    connection keeps none alive (``keepalive_timeout`` 0), or the process is stopping
    (``ProxyRequestHandler.stopping``, before aiohttp is told). The head then says
    ``Connection: close``, so a client does not send its next request into it."""
    if protocol is None:
        return False
    return bool(protocol._force_close or protocol._close or protocol._keepalive_timeout <= 0
                or getattr(protocol, "stopping", False))


def ends_connection(fields: Any) -> bool:
    """The connection ends after the reply to this request whatever it asked: its body was
    chunked (its ``fields``, as parsed, have a ``Transfer-Encoding``: any other than a single
    ``chunked`` is refused before, and the refusal closes the connection too).

    Why: aiohttp's C request parser (3.14.5, the latest) keeps the last trailer field of a
    chunked body pending and adds it to the next request parsed on the connection
    (``cb_on_message_begin`` does not reset ``_raw_name``/``_raw_value``/``_has_value``): a
    client, or one of many behind a front proxy that shares connections, would choose a
    field (a ``Cookie``; the ``Host`` of an HTTP/1.0 request without one) of the request
    after its own. So nothing after a chunked body is read as a request (RFC 9112 §9.6 lets
    a server close; the head says ``Connection: close``). See docs/deploy.md, *Upgrading
    aiohttp*: the workaround can go once aiohttp resets those fields.

    Or it asked to switch protocols (``Upgrade``, which cachegate never does: the field is
    hop-by-hop and dropped, the request answered as HTTP/1.1): aiohttp's parser stops parsing
    requests after one that asks, so a request pipelined behind it was never answered and the
    connection stayed open, a client or a front proxy waiting on it for ever."""
    return hdrs.TRANSFER_ENCODING in fields or hdrs.UPGRADE in fields


def asks_to_close(version: Any, fields: Any) -> bool:
    """An HTTP/1.0 request whose ``Connection`` lists ``close`` (beside ``keep-alive``): the
    connection ends after its reply, as RFC 9112 §9.3 has it ("close" first, whatever the
    version). llhttp looks at ``close`` for HTTP/1.1 only, so aiohttp said such a request kept
    the connection and answered what was pipelined behind it.

    >>> from multidict import CIMultiDict
    >>> asks_to_close(HttpVersion10, CIMultiDict(Connection="keep-alive, Close"))
    True
    >>> asks_to_close(HttpVersion10, CIMultiDict(Connection="keep-alive")), asks_to_close(HttpVersion10, {})
    (False, False)
    """
    if version != HttpVersion10 or hdrs.CONNECTION not in fields:
        return False
    return any(token.strip(" \t").lower() == "close"
               for line in fields.getall(hdrs.CONNECTION) for token in line.split(","))


class ReplyResponse(web.StreamResponse):
    """aiohttp's ``StreamResponse`` with its head from ``frame`` (the general path's every
    reply). ``length`` is the body's (None: unknown); a ``body`` given here is sent with the
    head in one write when aiohttp ends the response (``write_eof``), as ``web.Response``
    sends it; without one the head goes out at ``prepare`` and the caller writes the body.
    ``version``: the request's version when ``request.version`` is not it (a request aiohttp's
    parser refused is handed over as a placeholder message that says HTTP/1.0)."""

    def __init__(self, status: int, reason: str | None, headers: CIMultiDict[str], length: int | None,
                 body: bytes | None = None, version: tuple[int, int] | None = None) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._reply_length = length
        self._reply_body = body
        self._reply_version = version
        if body is not None:
            self._send_headers_immediately = False

    @property
    def body(self) -> bytes | None:
        return self._reply_body

    # (``self._status`` and ``self._reason``, as aiohttp's own ``_write_headers`` reads them: its
    # ``status`` and ``reason`` are properties, three Python calls a reply, measured.)

    async def _prepare_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        # The connection ends after this reply when it must (``closing``), when the client asks,
        # and when the request's body has not all come (an origin answered an upload without
        # reading it: nginx closes then too, by a lingering close, as it does whenever it
        # answers while still reading a body). Kept open, the rest of the body was read through
        # the parser (aiohttp's read of a body its handler left, up to 10 s) for nothing, and
        # the client waited on an open connection once it had sent it.
        if keep_alive and (closing(request.protocol) or ends_connection(request.headers)
                           or asks_to_close(request.version, request.headers)
                           or not request.content.is_eof()):
            keep_alive = False
        version = request.version if self._reply_version is None else self._reply_version
        framing = frame(self._headers, self._status, request.method, reply_version(version),
                        self._reply_length, keep_alive, rfc822_formatted_time())
        self._keep_alive = framing.keep_alive
        if framing.chunked:
            writer.enable_chunking()
        else:
            writer.length = self._reply_length

    async def _write_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        line = status_line(request.version if self._reply_version is None else self._reply_version,
                           self._status, self._reason)
        if ascii_head(line, self._headers):
            # aiohttp's writer serialises with ``_serialize_headers`` too (``serialise``), and buffers.
            await writer.write_headers(line, self._headers)
        else:
            # An origin's obs-text: buffered as aiohttp's ``write_headers`` buffers its own bytes
            # (a server's writer has no on_headers_sent hook to call first).
            assert isinstance(writer, StreamWriter) and writer._on_headers_sent is None
            writer._headers_buf = serialise_octets(line, self._headers)
            writer._headers_written = False
        if self._send_headers_immediately:
            writer.send_headers()

    async def write_eof(self, data: bytes = b"") -> None:
        body = self._reply_body
        if body and not data and not self._eof_sent and not self._must_be_empty_body:
            data = body
        # Handed over, the body is the transport's: aiohttp's loop keeps a connection's last
        # reply (its ``resp``) until the next request comes, and a kept-alive idle connection
        # held a whole copy of it (50 after a 1 MB memory hit's Range each: +51 MB of RSS).
        self._reply_body = None
        await super().write_eof(data)


def reply_length(method: str, status: int, body: bytes) -> int | None:
    """The Content-Length of a reply whose whole body is ``body`` (None for an empty body that
    a HEAD or a 304 leaves unsaid, as ``web.Response`` did)."""
    if not body and (status == 304 or method == hdrs.METH_HEAD):
        return None
    return len(body)


def plain_reply(status: int, reason: str | None, headers: CIMultiDict[str], body: bytes,
                method: str, version: tuple[int, int] | None = None) -> ReplyResponse:
    """A reply with its whole body at hand (``version``: see ``ReplyResponse``)."""
    return ReplyResponse(status, reason, headers, reply_length(method, status, body), body, version)


def from_response(resp: web.StreamResponse, method: str, version: tuple[int, int] | None = None
                  ) -> ReplyResponse:
    """The same reply, written by this writer (a ``web.Response`` that aiohttp or the admin
    module built, its whole body at hand). It is cachegate's own: a body without a type is
    ``application/octet-stream``, as aiohttp would have said. ``version``: see ``ReplyResponse``."""
    body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b""
    headers = CIMultiDict(resp.headers)
    if body:
        headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    return plain_reply(resp.status, resp.reason, headers, body, method, version)


__all__ = ["Framing", "ReplyResponse", "closing", "ends_connection", "frame", "from_response", "plain_reply",
           "reply_version", "serialise", "status_line", "version_refusal"]
