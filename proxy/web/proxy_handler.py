"""The client-facing handler (the general path): aiohttp request -> ``ClientRequest`` -> engine
-> ``Reply`` -> bytes. What it adds to the request and the reply is the front end's
(``proxy.web.frontend``, shared with the fast hit path), and every head it writes comes
from the one writer (``proxy.web.heads``).

It runs on aiohttp's low-level server (no router, no middleware chain: every
request goes to the engine). Errors are mapped to responses in one place,
``handle``: a ``CachegateError`` becomes its ``status_hint``; anything else is a
logged 500 and the proxy keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, assert_never

from aiohttp import web
from aiohttp.helpers import must_be_empty_body
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError
from multidict import CIMultiDict

from proxy.engine import ClientRequest, Reply
from proxy.errors import (
    BadRequest,
    CachegateError,
    ClientBodyError,
    ClientGone,
    ResponseAborted,
    UpstreamError,
    drop_traceback,
    first_report,
)
from proxy.logs import REQUEST, RequestInfo
from proxy.policy.cache_status import cache_status, cut_short
from proxy.policy.fields import ends_at_head
from proxy.policy.messages import HeaderList, RequestHead
from proxy.policy.request import ALLOW, Message, Refusal
from proxy.replies import Planned, upstream_detail
from proxy.runtime import Runtime
from proxy.storage.bodyfiles import BodyCutShort, BodyFile
from proxy.web.admin import purge_method
from proxy.web.bodyreader import BodyReader
from proxy.web.frontend import Front, FrontEnd
from proxy.web.heads import ReplyResponse, from_response, plain_reply, serialise, version_refusal
from proxy.web.refusals import refusal_logged

log = logging.getLogger("cachegate.proxy")

FILE_CHUNK = 256 * 1024
# An interim (1xx) response is dropped, not written, while more than this many bytes wait in
# the client's write buffer: it is informational, and a client that does not read must not
# make the proxy hold every one an origin sends.
INTERIM_HIGH_WATER = 64 * 1024
# cachegate's member on its answer to a PURGE (carried out or refused: its status says which).
PURGE_STATUS = cache_status(detail="PURGE")


def client_head(request: web.BaseRequest, front: FrontEnd, trusted: bool
                ) -> tuple[RequestHead | Refusal, Planned | None]:
    """The one normalised view of this request (``proxy.policy.request``), or its refusal, with
    its plan and key when they are known: the fast path's when it normalised this very message
    under the same config and trust (``fastpath.Declined``), else made here (without a plan)."""
    declined = getattr(request.protocol, "declined", None)  # kept by the connection's handler
    # aiohttp's parsed message (``Request.message`` is deprecated; without ``_message`` the
    # request is simply normalised here)
    if (declined is not None and declined.msg is getattr(request, "_message", None)
            and declined.front is front and declined.trusted is trusted
            and declined.secure is request.secure):
        head: RequestHead = declined.head
        planned: Planned | None = declined.planned
        return head, planned
    message = Message(request.method, request.raw_path, request.version, request.headers)
    return front.head(message, request.secure, trusted), None


def interim_sender(request: web.BaseRequest, continued: bool = False
                   ) -> Callable[[int, str, HeaderList], None] | None:
    """Writes the origin's interim (1xx) responses to the client, before the final response.

    aiohttp's server has no public way to send a 1xx: ``StreamResponse`` writes one head,
    the final one. What aiohttp itself does for ``100 Continue`` (its default expect
    handler) is write the bytes on the connection before the response is prepared; this
    does the same, on the transport, synchronously as the upstream client parses each
    1xx, so they go out in order and always before the final head (which ``prepare``
    writes later on the same transport). Never to an HTTP/1.0 client (RFC 9110 §15.2),
    and not while the client's write buffer holds more than ``INTERIM_HIGH_WATER`` bytes:
    a 1xx is informational, so one a client is not reading is dropped. The origin's ``100`` is
    dropped when cachegate sent its own (``continued``): the client is already sending.
    """
    if request.version < HttpVersion11:
        return None

    def send(status: int, reason: str, fields: HeaderList) -> None:
        if continued and status == 100:
            return
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        writer = request._payload_writer
        if writer is not None and writer.output_size:
            return  # the final response has begun: a 1xx now would land inside its body
        if transport.get_write_buffer_size() > INTERIM_HIGH_WATER:
            return  # the client is not reading: informational, so dropped rather than queued
        kept = [(k, v) for k, v in fields if k.lower() not in ("content-length", "transfer-encoding")]
        try:  # (a 1xx has no body: framing fields on one could make a lenient client read one)
            head = serialise(HttpVersion11, status, reason, CIMultiDict(kept))
        except (ValueError, TypeError):  # a field aiohttp refuses to write: send none of it
            return
        transport.write(head)

    return send


async def client_body(request: web.BaseRequest, silence: float, min_rate: int, buffer: int
                      ) -> bytes | AsyncIterator[bytes] | None:
    """The client's request body as it will go upstream: its first ``buffer`` bytes (all of a
    smaller body) read now, before the engine takes an upstream connection for it, the rest as
    it arrives (``BodyReader``'s limits on both). A body that trickles in then holds only its
    own client connection, not a pooled one (nginx reads the whole body first by default). An
    ``Expect: 100-continue`` client is sent cachegate's own ``100`` first, as nginx and Varnish
    do: otherwise it holds a pooled connection having sent nothing (``continued_here``).

    A body read whole so is handed over as bytes: it can be sent again, so the pool retries
    it as it does a bodiless request (on a refused or reset connection, or a keep-alive one
    the upstream closed as it left). As a stream, any failed try was the last, and a write
    with a body failed with 502 where a GET was retried (nginx buffers the body and resends it)."""
    if not request.body_exists:
        return None
    reader = BodyReader(request, silence, min_rate)
    first: list[bytes] = []
    if buffer > 0:
        if continued_here(request, buffer):
            send_continue(request)
        while reader.received < buffer:
            chunk = await reader.read(buffer - reader.received)
            if not chunk:
                return b"".join(first)
            first.append(chunk)
        if reader.at_eof():  # exactly ``buffer`` bytes: whole too
            return b"".join(first)
    return _body_stream(reader, first)


def continued_here(request: web.BaseRequest, buffer: int) -> bool:
    """Whether cachegate answers the client's ``Expect: 100-continue`` itself (it reads the
    start of the body before going upstream: ``buffer``); the origin's own ``100`` is then not
    relayed (``interim_sender``). An HTTP/1.0 request's expectation is ignored (RFC 9110 §10.1.1)."""
    return (buffer > 0 and request.version >= HttpVersion11 and request.body_exists
            and "100-continue" in request.headers.get("Expect", "").lower())


def send_continue(request: web.BaseRequest) -> None:
    """``100 Continue`` on the connection, before the final head (as aiohttp's expect handler)."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def _body_stream(reader: BodyReader, first: list[bytes]) -> AsyncIterator[bytes]:
    """What was read before, then the rest as it arrives."""
    if first:
        yield b"".join(first)
    while chunk := await reader.read(64 * 1024):
        yield chunk


class _ClientErrorFilter(logging.Filter):
    """aiohttp logs every malformed client request at ERROR with a traceback.

    Hostile or broken clients must not be able to flood the log with tracebacks:
    their requests are answered 400 and noted in one line at INFO, in words of our own
    (``refusal_logged``): the parser's message quotes the refused line, and a header's value
    (a Cookie, an Authorization) or a query's token was written to the log with it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        text = f"{record.getMessage()}: {refusal_logged(exc)}"
        record.msg, record.args = "%s", (text,)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return logging.getLogger("cachegate").isEnabledFor(logging.INFO)


_CLIENT_ERROR_FILTER = _ClientErrorFilter()


class UnbuildableRequest(web.BaseRequest):
    """What the client listener's request factory (``fastpath.ProxyServer``) makes of a message
    aiohttp could not build a request from (``BaseRequest`` decoding the host of an
    absolute-form target raised UnicodeError: ``http://xn--/``): aiohttp's placeholder
    message, with the exception. ``handle`` answers it 400 and the connection closes, where
    the exception used to end the connection's request loop (no answer, nothing logged, the
    connection left open for good)."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception, *args: Any) -> None:
        super().__init__(*args)
        self.exc = exc


def make_handler(front: Front) -> Callable[[web.BaseRequest], object]:
    """The general path's handler, for the runtime of ``front``."""
    server_log = logging.getLogger("aiohttp.server")
    if _CLIENT_ERROR_FILTER not in server_log.filters:
        server_log.addFilter(_CLIENT_ERROR_FILTER)
    runtime = front.runtime

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.__class__ is UnbuildableRequest:  # (a class test: no call on every request)
            return _unbuildable(request)
        started = time.perf_counter()
        fe = front.current()
        remote = request.remote or ""
        trusted = fe.trusted(remote)
        info = RequestInfo(fe.ids.take(request.headers, trusted))
        token = REQUEST.set(info)  # error log lines about this request carry its id
        resp: web.StreamResponse | None = None
        cut = False
        try:
            resp, sent = await _respond(request, runtime, fe, info, remote, trusted)
        except asyncio.CancelledError:
            # Cut off (the stop's deadline): its line all the same, as the counter has it (499,
            # the bytes handed over so far); the cancellation goes on.
            cut, sent = True, info.sent
            raise
        finally:
            REQUEST.reset(token)
            # The request's duration and top-URL count, and its access-log line: answered, or cut
            # off (any other exception is aiohttp's 500, with no line of ours). Here, not in a
            # helper of its own: that was one call more per request (pass-through and fill).
            if resp is not None or cut:
                done = time.perf_counter()
                # The one place an answer at hand's bytes are decided, for the counter and the
                # line alike (a streamed one's: ``write_reply``, as they go).
                tier = info.at_hand
                if tier is not None:
                    if request.transport is None:  # the client is gone: nothing of it is written
                        info.client_left, sent = True, 0
                    fe.sent(tier).inc(sent)
                if request.method not in ("PURGE", "CONNECT"):  # client requests the cache answered
                    runtime.metrics.answered(info.url, info.x_cache, done - started)
                # The access log's status, counted by class as logged: 499 when the client left
                # before its answer was whole (streamed: noticed at its end, ``write_reply``; at
                # hand: when the handler returned, above), or the stop cut it off.
                status = CLIENT_CLOSED if resp is None or info.client_left else resp.status
                fe.responses[status // 100] += 1
                access = front.current().access_log  # a reload meanwhile may have opened another
                if access is not None:
                    access.add((done, done - started, info.request_id, remote, request.method,
                                info.host or request.host, info.target or request.raw_path,
                                request.version, status, sent,
                                info.x_cache, info.cache_status, info.key, info.upstream,
                                info.upstream_time, request.headers if access.wants_fields else None))
        return resp

    return handle


# nginx's "client closed request": the access log's status for a request whose client left
# before its answer was complete. Logged only, never sent.
CLIENT_CLOSED = 499


def client_left(request: web.BaseRequest) -> bool:
    """The client's connection is gone (reset, or closed and noticed by a failed write). A
    half-closed client (a FIN) is not: it is answered (RFC 9112 §9.6) and logged with what it
    was answered, as TCP does not tell a close from a half-close until a write fails."""
    return request.transport is None


def client_reset(request: web.BaseRequest) -> bool:
    """The client's connection is gone, or was reset: asked between writes by a body that reads
    bytes it does not send (a beat). A client that closed its socket answers the head written
    after its FIN with a reset, and asyncio, which reads nothing more once it has kept a
    half-closed connection open (``ProxyRequestHandler.eof_received``), only notices at the
    next write: the reset is the socket's pending error (read, it is cleared; the connection is
    aborted then). A half-closed client that still reads has none, and goes on being answered."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except OSError:
        return True


def _unbuildable(request: web.BaseRequest) -> web.StreamResponse:
    """A 400 for a request aiohttp could not build (``UnbuildableRequest``), by the connection's
    own answer to a malformed request (``ProxyRequestHandler.handle_error``: Server, request id,
    access log), which closes the connection."""
    assert isinstance(request, UnbuildableRequest)
    err = InvalidURLError("invalid host in the request target")
    return request.protocol.handle_error(request, 400, err, err.message)


async def _respond(request: web.BaseRequest, runtime: Runtime, fe: FrontEnd, info: RequestInfo, remote: str,
                   trusted: bool) -> tuple[web.StreamResponse, int]:
    """The response to a client request and the body bytes sent (a body at hand goes out with
    the head when aiohttp ends the response, after the handler returns: ``heads.ReplyResponse``)."""
    try:
        if request.version[0] != 1 and (version := version_refusal(request.version)) is not None:
            fe.requests("ERROR", request.method).inc()
            log.info("refused %s %s from %s: %d %s", request.method, request.raw_path[:200],
                     request.remote, *version)
            refused = _plain(version[0], version[1], "ERROR", fe, info, request)
            refused.force_close()  # nothing more on this connection is read as HTTP/1.x
            return _own(refused, info, request.method)
        if request.method == "CONNECT":
            fe.requests("ERROR", request.method).inc()  # refused, as the version refusals above
            info.x_cache = "ERROR"
            refused = _plain(405, "CONNECT is not supported by a reverse proxy", "ERROR", fe, info, request)
            refused.headers["Allow"] = ALLOW  # a MUST on a 405 (RFC 9110 §15.5.6), as TRACE's has
            # The parser reads nothing after a CONNECT (it would be the tunnel's bytes, whatever
            # Content-Length said): read on, those bytes would be taken for the next request,
            # which a front end framing by Content-Length never sent (request smuggling).
            refused.force_close()
            return _own(refused, info, request.method)
        head, planned = client_head(request, fe, trusted)
        match head:
            case RequestHead():
                pass
            case Refusal():
                fe.requests("ERROR", request.method).inc()
                log.info("refused %s %s from %s: %d %s", request.method, request.raw_path[:200],
                         request.remote, head.status, head.reason)
                refused = _plain(head.status, head.reason, "ERROR", fe, info, request)
                refused.force_close()  # the body's framing may be what was wrong
                return _own(refused, info, request.method)
            case _:
                assert_never(head)
        info.host, info.target, info.url = head.host, head.target, head.url
        if request.method == "PURGE":  # never forwarded: allowed callers purge, others 403
            purged = from_response(await purge_method(request, runtime, head), request.method)
            # Carried out or refused, cachegate's own answer: it says so in both fields, as every
            # response does, and is counted as every client request is.
            info.x_cache = "PURGE"
            info.cache_status = purged.headers["Cache-Status"] = PURGE_STATUS
            purged.headers["X-Cache-Status"] = "PURGE"
            fe.own_fields(purged.headers, None, info.request_id)
            fe.requests("PURGE", request.method).inc()
            return _own(purged, info, request.method)
        fe.saw_host(head.host)
        settings = fe.settings
        body = None
        continued = False
        if request.body_exists:  # (most requests have none: two calls fewer, measured, without)
            body = await client_body(request, settings.client_body_timeout, settings.client_body_min_rate,
                                     settings.client_body_buffer)
            continued = continued_here(request, settings.client_body_buffer)
        interim = interim_sender(request, continued)
        reply = await runtime.engine.handle(ClientRequest(head, remote, body, interim,
                                                          request_id=info.request_id, planned=planned))
        # A body read whole is bytes (resent on a retry: ``client_body``): not kept while the
        # reply is written, for as long as a slow reader takes (40 readers of 4 MB uploads
        # held 155 MB more, measured).
        body = None
    except ClientBodyError as exc:
        # The client broke off its own upload (it is most likely gone): a 400 if it still
        # listens, and one line at DEBUG; nothing about the upstream, which did no wrong. Or
        # the stop's deadline cut the upload off (``BodyCutOff``): a 503 saying so.
        log.debug("%s %s from %s: %s", request.method, request.raw_path, request.remote, exc)
        fe.requests("ERROR", request.method).inc()
        refused = _plain(exc.status_hint, exc.public_text(), "ERROR", fe, info, request, exc.cache_detail)
        # The rest of its body, if any, is not worth reading: closed once the answer is out, by a
        # lingering close that drops what the client still sends, never parsing it
        # (``LimitedHandler.closed_after``), not aiohttp's read of the rest through the parser.
        refused.force_close()
        return _own(refused, info, request.method)
    except CachegateError as exc:
        if isinstance(exc, UpstreamError):  # (one line per while, as the engine's own)
            runtime.engine.warn_upstream(log, exc, "%s %s failed: %s", request.method, request.raw_path, exc)
        elif not isinstance(exc, BadRequest):
            log.warning("%s %s failed: %s", request.method, request.raw_path, exc)
        fe.requests("ERROR", request.method).inc()
        return _own(_plain(exc.status_hint, exc.public_text(), "ERROR", fe, info, request,
                           upstream_detail(exc) if isinstance(exc, UpstreamError) else "PROXY-ERROR"),
                    info, request.method)
    except asyncio.CancelledError:
        fe.requests(info.x_cache, request.method).inc()  # cut off before its answer: as logged
        raise
    except Exception:
        log.exception("unhandled error for %s %s", request.method, request.raw_path)
        fe.requests("ERROR", request.method).inc()
        return _own(_plain(500, "internal error", "ERROR", fe, info, request), info, request.method)
    info.x_cache = reply.x_cache
    try:
        return await write_reply(request, reply, fe, info, runtime)
    finally:
        # Counted once written: a body the origin broke off is counted as the error it was
        # (``write_reply``), whatever its head said.
        fe.requests(info.x_cache, request.method).inc()


def _own(resp: ReplyResponse, info: RequestInfo, method: str) -> tuple[ReplyResponse, int]:
    """cachegate's own answer (a refusal, an error page, a PURGE's answer) and its body bytes,
    counted as tier "none" once written (``handle``): neither the store's nor the origin's.
    Never a hit's path."""
    info.at_hand = "none"
    return resp, 0 if must_be_empty_body(method, resp.status) else len(resp.body or b"")


def _plain(status: int, text: str, x_cache: str, fe: FrontEnd, info: RequestInfo,
           request: web.BaseRequest, detail: str = "PROXY-ERROR") -> ReplyResponse:
    cs = cache_status(detail=detail)
    headers = CIMultiDict({"Cache-Status": cs, "X-Cache-Status": x_cache})
    fe.own_fields(headers, None, info.request_id)
    headers["Content-Type"] = "text/plain; charset=utf-8"
    info.cache_status = cs
    return plain_reply(status, None, headers, (text + "\n").encode(), request.method)


async def write_reply(request: web.BaseRequest, reply: Reply, fe: FrontEnd, info: RequestInfo,
                      runtime: Runtime) -> tuple[web.StreamResponse, int]:
    """Write ``reply``; the response and the body bytes sent."""
    headers = CIMultiDict(reply.headers)
    fe.own_fields(headers, reply.tier, info.request_id)
    # cachegate's own member: the engine adds it last, after any the origin (or a cache between)
    # sent (RFC 9211 lists caches from the origin's side); the first was the origin's own, of
    # any length, and not what the fast path logs for the same hit.
    own = headers.getall("Cache-Status", ())
    info.cache_status = own[-1] if own else None
    body = reply.body
    if isinstance(body, bytes) and not reply.head_only:
        info.at_hand = reply.tier  # counted once written (``handle``)
        # An answer to HEAD (an error page's too: it is not ``head_only``) sends its head only
        # (``ends_at_head``: the one place that decides it, one call per plain answer).
        size = 0 if ends_at_head(reply.status, request.method == "HEAD") else len(body)
        return plain_reply(reply.status, reply.reason, headers, body, request.method), size
    counted = fe.sent(reply.tier)
    length = reply.length if reply.status not in (204, 304) and reply.status >= 200 else None
    resp = ReplyResponse(reply.status, reply.reason, headers, length)
    # Bytes handed to the connection so far, kept on ``info`` as they go: an answer that ends
    # early (a write fails, the stop cancels it) is logged and counted with what went out.
    info.sent = 0
    try:
        await resp.prepare(request)
        if body is not None and not reply.head_only:
            if isinstance(body, bytes):
                await resp.write(body)
                info.sent = len(body)
            elif hasattr(body, "__anext__"):
                async for chunk in body:  # type: ignore[union-attr]
                    if not chunk:  # a beat (``Body``): the body reads on without sending
                        if client_reset(request):
                            raise ConnectionResetError("the client reset the connection")
                        continue
                    await resp.write(chunk)
                    info.sent += len(chunk)
            else:
                await _send_file(request, resp, body, reply.offset, reply.length, info)
        await resp.write_eof()
        info.client_left = client_left(request)
        if reply.settle is not None:  # (a fill's: what became of it, once its body went out)
            info.cache_status = reply.settle(info.cache_status)
    except BodyCutShort as exc:
        # The stored body file ended early: the client must not take what it got for the whole
        # body, and the variant is forgotten so the next request refetches it.
        _abort(request)
        if exc.entry is not None:
            runtime.engine.body_file_cut_short(exc.entry)
    except (UpstreamError, ResponseAborted, ClientBodyError) as exc:
        # The upstream broke off mid-body, or the body cannot be completed for this client
        # (proxy.coalescer: it fell too far behind; or the upstream answered before the
        # client's upload broke off): end the connection so the client sees an incomplete
        # response, never a truncated "complete" one.
        if isinstance(exc, UpstreamError):
            # Its head (HIT, stored, ...) has gone out and cannot be taken back; the access log
            # and the request counter say what happened: an error, and why, nothing stored.
            info.x_cache = "ERROR"
            info.cache_status = cut_short(info.cache_status, upstream_detail(exc))
            if first_report(exc):  # (a coalesced fetch's clients all get this one error)
                runtime.engine.warn_upstream(log, exc, "aborting client response: %s", exc, body=True)
            else:
                log.debug("aborting client response to %s: %s", request.remote, exc)
        else:
            if isinstance(exc, ClientGone):  # its upload broke off: the client left (499)
                info.client_left = True
            log.debug("aborting client response to %s: %s", request.remote, exc)
        _abort(request)
    except ConnectionError as exc:
        # The client went away mid-response: one line, nothing for anyone else to see.
        info.client_left = True
        _client_gone(request, exc)
        _abort(request)
        drop_traceback(exc)
    finally:
        counted.inc(info.sent)
        await _close_body(body)
    return resp, info.sent


def _client_gone(request: web.BaseRequest, exc: BaseException) -> None:
    """Log a client gone mid-response once per connection (its protocol's ``connection_lost``
    may have noticed first: ``ProxyRequestHandler.gone_logged``)."""
    from proxy.web.fastpath import ProxyRequestHandler  # it imports this module

    protocol = request.protocol
    if isinstance(protocol, ProxyRequestHandler):
        if protocol.gone_logged:
            return
        protocol.gone_logged = True
    log.debug("client %s went away during %s %s: %s", request.remote, request.method, request.raw_path,
              exc)


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


async def _send_file(request: web.BaseRequest, resp: web.StreamResponse, f: IO[bytes], offset: int,
                     length: int | None, info: RequestInfo) -> None:
    """Send a file body: ``os.sendfile`` into the socket as far as it takes it at once (an
    open body file: ``proxy.storage.bodyfiles``), the rest read in the thread pool. A file that
    ends before ``length`` raises (``BodyCutShort`` from a body file's ``read``; else
    ``ResponseAborted``): the head announced the whole length. The bytes sent go to
    ``info.sent`` as they go, so a write that fails leaves the count of those before it."""
    sent = 0
    if isinstance(f, BodyFile):
        end = f.size if length is None else min(f.size, offset + length)
        sent = info.sent = sendfile_now(request.transport, f.fileno(), offset, end - offset)
        if sent == end - offset:
            return
        length = end - offset - sent
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, f.seek, offset + sent)
    remaining = length if length is not None else -1
    while remaining != 0:
        size = FILE_CHUNK if remaining < 0 else min(FILE_CHUNK, remaining)
        chunk = await loop.run_in_executor(None, f.read, size)
        if not chunk:
            if remaining > 0:
                raise ResponseAborted(f"body file ended {remaining} bytes early")
            break
        await resp.write(chunk)
        sent += len(chunk)
        info.sent = sent
        if remaining > 0:
            remaining -= len(chunk)


def sendfile_now(transport: asyncio.BaseTransport | None, fd: int, offset: int, count: int) -> int:
    """``os.sendfile`` as much of ``fd`` as the socket takes now; the bytes sent (0 when the
    transport still holds unsent data, whose order the file must not overtake, and always 0 on
    a TLS connection: the kernel would put the file's plaintext into the TLS stream, and the
    callers then write it through the transport, which encrypts it)."""
    if transport is None or transport.is_closing() or count <= 0:
        return 0
    if transport.get_write_buffer_size() != 0:  # type: ignore[attr-defined]
        return 0
    if transport.get_extra_info("sslcontext") is not None:
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return os.sendfile(sock.fileno(), fd, offset, count)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return 0  # a broken connection: the write that follows meets it as aiohttp expects


async def _close_body(body: object) -> None:
    """Close a file, or finish an async generator so its cleanup (leaving a broadcast) runs."""
    if body is None or isinstance(body, bytes):
        return
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    close = getattr(body, "close", None)
    if close is not None:
        close()
