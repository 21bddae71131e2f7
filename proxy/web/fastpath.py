"""Fresh memory hits answered below aiohttp's ``web.Response``: one pre-serialised head per
stored variant, and one transport write per request, straight from ``data_received``.

Why: aiohttp's server spends ≈ 20 µs of CPU per request on machinery a cache hit does not
need: a ``BaseRequest``, a ``StreamWriter``, a task per request (Python 3.11 has no eager
tasks), ``web.Response`` with a ``CIMultiDict`` of headers serialised anew each time. A
raw protocol writing pre-built bytes costs ≈ 7.5 µs for the whole request. So a fresh hit
is answered here, in the protocol, as soon as aiohttp's C parser hands over the request;
everything else goes on to aiohttp's request handler exactly as before.

What a fast answer is, and why it is the same answer: the request is normalised by the
same ``normalise_request`` (``proxy.policy.request``) as on the general path, with the same
front end (``proxy.web.frontend``: the trust verdict, the default Host, the hosts-seen
accounting, the counters, the debug fields), and
``Engine.fresh_hit`` runs on that head the very rule match, key, memory lookup and
``decide_lookup`` that ``Engine.handle`` runs, and says yes only for a plain fresh HIT
from a body held in memory, or a disk body of at most
FAST_FILE_MAX bytes whose file is already open (sendfile; no refresh, no disk read).
A client's own If-None-Match / If-Modified-Since is decided there too, by the general
path's one evaluation (``plain_fresh_hit`` asks ``client_not_modified``, as
``decide_lookup`` does): when it matches a fresh stored 200, the answer is that variant's
304 (no body needed, wherever it is), else its 200. Browsers and CDNs revalidate this way
on every reload and every expired copy: a matching conditional under ``ab -k`` went from
≈ 6k to ≈ 34k req/s, the 200 hit's rate (docs/performance.md). A fresh stored 204 is
answered here too when its empty body is in memory (its head is the whole answer).
The head is built once per variant (and per rule edits, HTTP version, GET/HEAD, or 304) by
the same steps the general path takes: ``served_headers`` and ``response_edits`` from the
engine, for a 304 the fields ``proxy.policy.reply.not_modified_fields`` keeps (the debug
fields of tier "none", as the general path's reply without a body), the front end's own
fields (debug fields, X-Request-Id, Server), then the one
reply-head writer (``proxy.web.heads``: ``frame`` adds Content-Length, Date when the
stored response has none, Connection for HTTP/1.0 keep-alive;
``serialise`` makes the bytes), once per shape of head and then filled in per variant
(``proxy.web.fastheads``). Per request only Age, the ``ttl`` of Cache-Status, the
X-Request-Id (``proxy.logs``) and, when the stored response had no Date, the Date are
filled in. With an access log, each answer leaves a tuple for the log's batch writer.
tests/test_fastpath.py compares both paths field by field for a table of requests.

Left to the general path (by construction, not by guess): any method but GET and HEAD;
a request with a body (a chunked one too, even empty: the parser gives it a payload; its
answer then closes the connection, ``heads.ends_connection``), an upgrade, a ``Range``, an
``If-Match`` or ``If-Unmodified-Since`` (checked before the normalisation, so never on a
remembered request's way: ``Known``); one that asks to close the connection (HTTP/1.0
without keep-alive, ``Connection: close``);
anything ``decide_lookup`` does not answer as a plain fresh HIT (``Cache-Control``/``Pragma``,
even those that would not ask for the origin, stale or soft-purged entries, Vary misses); a
stored 304, a stored 204 whose body is not in memory, or a reason with control characters;
a request the normalisation refuses (a bad Host, ``Connection`` naming Host, an oversized
head, ...: the general path answers the refusal). Pipelined requests are answered in order:
once one request of a batch goes to the general path, every later one does too, and the
fast path only runs while aiohttp's handler is idle (nothing queued, no response being
written) and the transport accepts writes (a client that does not read gets aiohttp's own
back-pressure). Idle includes the
moment between a general response written whole (on a connection that stays open, nothing
queued behind it) and aiohttp's loop coming back to wait for the next request: a task and a
few steps later, and under uvloop a client that asks again at once lands there after nearly
every miss (``ProxyRequestHandler._answered``). A request the fast path leaves goes on with
its normalised head, rule plan and cache key (``Declined``). The request is
parsed by aiohttp's C parser either way: its refusals (CL+TE, bad framing) still answer
400 (501 for a transfer coding it does not know: ``ProxyRequestHandler.handle_error``).

A request whose exact bytes were answered here before (a whole chunk holding one GET/HEAD
without a body, read between two requests) is answered again without aiohttp's parser,
``normalise_request``, the rule match or the key: they are pure functions of those bytes,
the listener, the peer's trust and the config, remembered per listener (``Known``). Only
the parse is skipped, and only where the parser stands between two requests
(``ProxyRequestHandler._boundary``); the lookup, freshness, Age and request id are done anew.

For the console (``proxy.live``), one answer in FAST_SAMPLE is timed and its URL recorded,
each counted FAST_SAMPLE times; the others pay a bit test. Measured with ``timeit``: 70–130 ns
per answer on the shared machine (about 1% of an answer), where timing every answer and
counting every URL would cost 0.4–0.6 µs each.
"""

from __future__ import annotations

import logging
import os
import re
import resource
from collections.abc import Sequence
from time import perf_counter
from typing import Any, NamedTuple

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import ERROR, RequestHandler, RequestPayloadError, _ErrInfo

from proxy.engine import response_edits
from proxy.errors import BodyRefused, drop_traceback
from proxy.live import FAST_SAMPLE, FAST_SAMPLE_MASK
from proxy.logs import Summarised
from proxy.metrics import REFUSED_METHOD, FastPathState
from proxy.policy.cache_status import cache_status
from proxy.policy.messages import RequestHead
from proxy.policy.request import MAX_HEADERS, TOO_MANY_FIELDS, normalise_request
from proxy.replies import Planned
from proxy.room import store_files
from proxy.rules import RequestPlan, RuleSet
from proxy.settings import Settings
from proxy.storage.bodyfiles import SharedFile
from proxy.storage.entry import Entry
from proxy.storage.memory import Cached
from proxy.web.fastheads import HEAD_ONLY, NOT_MODIFIED, HeadShapes
from proxy.web.frontend import Front, FrontEnd
from proxy.web.heads import asks_to_close, from_response
from proxy.web.headtimeout import (
    Discarding,
    LimitedHandler,
    LimitedServer,
    UnsentBudget,
    empty_lines,
    unfinished_head,
)
from proxy.web.proxy_handler import UnbuildableRequest, sendfile_now
from proxy.web.refusals import refusal_reason

log = logging.getLogger("cachegate.proxy")

# The head and body in one block; head and body; head and body file; head, body file and the
# variant whose memory holds the same body (see ``_send_file``).
FastAnswer = bytes | tuple[bytes, bytes] | tuple[bytes, SharedFile] | tuple[bytes, SharedFile, Cached]
LARGE_BODY = 16 * 1024  # bigger bodies are written beside the head, not copied after it
# Bigger disk bodies take the general path: what sendfile leaves is read here on the event
# loop and buffered whole in the transport, with no back-pressure (the general path streams
# it in the thread pool, waiting for the client).
FAST_FILE_MAX = 1024 * 1024
# What aiohttp's request parser lets escape besides its own refusals (HttpProcessingError): yarl's
# IndexError for some request targets (``http://[::1]@``); ValueError to be safe.
PARSER_FAULTS = (IndexError, ValueError)


class Known:
    """What the fast path decided about one request's exact bytes: its normalised head, the
    rules' plan and the cache key (all pure functions of the bytes, the listener, the
    peer's trust and the config), so that the same bytes again skip aiohttp's parser,
    ``normalise_request``, the rule match and the key.

    Why: a client asking for the same object again sends the very same bytes (a browser,
    a benchmark, a health check, a CDN's edge). Measured in-process on a 1 KiB hit
    (``timeit``), the normalisation, rule match and key are ≈ 5 µs of the ≈ 10 µs
    ``answer`` takes, and aiohttp's parse another ≈ 2 µs. Only a chunk that held exactly one
    complete GET/HEAD without a body, read while aiohttp's parser stood between two
    requests, is remembered, and it is used only where the parser stands between two
    requests again (``ProxyRequestHandler._boundary``): the same bytes then parse to the same
    message, so skipping the parse changes nothing. The storage lookup, the freshness
    decision, Age and the request id are done anew for every request."""

    __slots__ = ("front", "head", "key", "msg", "plan", "rules", "secure", "trusted")

    def __init__(self, front: FrontEnd, rules: RuleSet, secure: bool, trusted: bool, msg: Any,
                 head: RequestHead, plan: RequestPlan, key: str) -> None:
        self.front = front
        self.rules = rules
        self.secure = secure
        self.trusted = trusted
        self.msg = msg
        self.head = head
        self.plan = plan
        self.key = key


class Declined(NamedTuple):
    """A request the fast path normalised and left to the general path, which takes this view
    of it rather than normalising the same message again (``proxy_handler.client_head``)."""

    msg: Any
    front: FrontEnd
    trusted: bool
    secure: bool
    head: RequestHead
    planned: Planned | None  # its plan and key (None: the rules bypass it)


PROXY_ERROR = cache_status(detail="PROXY-ERROR")  # the Cache-Status of a refusal
REQUEST_TIMEOUT = 408  # the access log's status for a head not whole in time (never sent)
KNOWN_MAX = 2048  # requests remembered per listener (then forgotten all at once)
KNOWN_BYTES = 2048  # longer requests are not remembered


class FastPath:
    """Answers fresh memory hits for the protocol (``ProxyRequestHandler``), with the front
    end the general path uses (``proxy.web.frontend``)."""

    def __init__(self, front: Front) -> None:
        self._front = front
        storage = front.runtime.storage
        # Bound once: the engine and the storage facade of a runtime are never replaced.
        self._engine = front.runtime.engine
        self._planned = self._engine.planned
        self._fresh_hit = self._engine.fresh_hit_of
        self._keep_head = storage.keep_head
        self._alive = storage.alive
        self._shapes = HeadShapes()
        self._known: dict[bytes, Known] = {}
        self.declined: Declined | None = None  # the last request normalised and not answered here
        self.answered = 0  # requests answered here (tests check that the fast path ran)
        self.known_answered = 0  # of which from a remembered request's bytes (``Known``)

    def answer(self, msg: Any, remote: str, secure: bool, started: float,
               raw: bytes | None = None) -> FastAnswer | None:
        """The whole response to a parsed GET/HEAD ``msg`` (whose bytes arrived at ``started``,
        a ``time.perf_counter()`` reading), or None for the general path. ``raw``: the
        message's exact bytes, when it may be remembered (``Known``)."""
        fields = msg.headers
        if "Range" in fields or "If-Match" in fields or "If-Unmodified-Since" in fields:
            return None  # (a 412 is the general path's: ``reply_head``; a remembered request has none)
        fe = self._front.current()
        trusted = fe.trusted(remote)
        head = normalise_request(msg, secure=secure, trusted=trusted, listener=fe.listener)
        if not isinstance(head, RequestHead):
            return None  # a Refusal: the general path answers it
        planned = self._planned(head)
        out = None
        if planned is not None:
            known = Known(fe, self._engine.rules, secure, trusted, msg, head, *planned)
            out = self._serve(fe, known, remote, started)
        if out is None:
            # The general path takes it from here, with this view of it (``Declined``).
            self.declined = Declined(msg, fe, trusted, secure, head,
                                     None if planned is None else Planned(self._engine.rules, *planned))
            return None
        if raw is not None and len(raw) <= KNOWN_BYTES:
            if len(self._known) >= KNOWN_MAX:
                self._known.clear()
            self._known[raw] = known
        return out

    def answer_known(self, raw: bytes, remote: str, secure: bool, started: float) -> FastAnswer | None:
        """``answer`` for bytes remembered whole (``Known``) under this config and trust, else None."""
        known = self._known.get(raw)
        if known is None:
            return None
        fe = self._front.current()
        if (known.front is not fe or known.rules is not self._engine.rules or known.secure is not secure
                or known.trusted is not fe.trusted(remote)):
            del self._known[raw]
            return None
        out = self._serve(fe, known, remote, started)
        if out is not None:
            self.known_answered += 1
        return out

    def _serve(self, fe: FrontEnd, known: Known, remote: str, started: float) -> FastAnswer | None:
        if self._front.runtime.state == "stopping":
            return None  # its heads are keep-alive ones: the general path says Connection: close
        head = known.head
        found = self._fresh_hit(head, known.plan, known.key, FAST_FILE_MAX)
        if found is None:
            return None
        plan, key, cached, age, ttl, shared, not_modified = found
        msg = known.msg
        method = msg.method
        version = msg.version
        stored = cached.entry.response
        edits = response_edits(plan, stored.status, stored.headers)
        head_only = method == "HEAD"
        body = cached.body
        if not_modified:
            # The client's own If-None-Match / If-Modified-Since matched: the 304 head, the same
            # for GET and HEAD, with the general path's debug tier for it ("none": no body).
            flavor = NOT_MODIFIED + (version == HttpVersion10)
            extras = fe.extras["none"]
        else:
            flavor = (HEAD_ONLY if head_only else 0) + (version == HttpVersion10)
            extras = fe.extras["memory" if body is not None else "disk"]
        ready = None
        heads = cached.heads
        if heads is not None:
            for h, _ in heads.items:
                if h.edits is edits and h.flavor == flavor and h.extras is extras:
                    ready = h
                    break
        if ready is None:
            ready = self._shapes.head(cached, edits, flavor, extras, version)
            self._keep_head(key, cached, ready, ready.size)
        if ready.fmt is None:
            return None
        fe.saw_host(head.host)
        headers = msg.headers
        trusted = known.trusted
        request_id = fe.ids.new_bytes() if not trusted or "X-Request-Id" not in headers \
            else fe.ids.take(headers, True).encode()
        block = ready.render(age, ttl, request_id)
        out: FastAnswer
        if not_modified or head_only:  # (a 304's 0 bytes: no byte counter moves, as on the general path)
            out, size = block, 0
        elif body is None:
            assert shared is not None
            size = shared.size
            fe.bytes_sent["disk"].value += size
            out = block, shared
        else:
            size = len(body)
            if shared is not None:
                # Sent from its disk file (sendfile); memory is read only for what the socket
                # did not take at once (``rest``).
                out = block, shared, cached
            else:
                # A body in the shared memory is copied out here (into the answer, or the bytes
                # written beside it), then its record is checked: still there, or the general path.
                out = (block, bytes(body)) if size > LARGE_BODY else block + body
                if not self._alive(cached):
                    return None
            fe.bytes_sent["memory"].value += size
        fe.hit_counters[method].value += 1
        fe.responses[3 if not_modified else stored.status // 100] += 1
        self.answered += 1
        if not self.answered & FAST_SAMPLE_MASK:  # one answer in FAST_SAMPLE: the console's (proxy.live)
            fe.metrics.answered(head.url, "HIT", perf_counter() - started, FAST_SAMPLE)
        access = fe.access_log
        if access is not None:  # a tuple now; formatted and written with its batch (proxy.logs)
            done = perf_counter()
            access.add((done, done - started, request_id, remote, method, head.host, head.target, version,
                        304 if not_modified else stored.status, size, "HIT", ttl, cached.entry.key, None,
                        None, headers if access.wants_fields else None))
        return out

    def cut_short(self, entry: Entry) -> None:
        """A body file found cut short (``ProxyRequestHandler._send_file``)."""
        self._engine.body_file_cut_short(entry)

    def rest(self, cached: Cached, start: int) -> bytes | None:
        """The memory-held body of ``cached`` from ``start`` on, copied out of the shared memory
        (None: memory no longer holds it)."""
        body = cached.body
        if body is None:
            return None
        data = bytes(memoryview(body)[start:])
        return data if self._alive(cached) else None


class ProxyRequestHandler(LimitedHandler):
    """aiohttp's ``RequestHandler`` that answers fresh hits itself (see the module docstring)."""

    __slots__ = ("_answered", "_begun", "_body", "_boundary", "_fast", "_front",
                 "_head_bytes", "_head_max", "_late", "_parser_args", "_refused_version", "_taken",
                 "declined", "gone_logged")

    def __init__(self, manager: web.Server, *, fast: FastPath | None, front: Front, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # How aiohttp made this connection's parser (its defaults), for ``_parsed_until_refused``.
        self._parser_args = {"max_line_size": kwargs.get("max_line_size", 8190),
                             "max_field_size": kwargs.get("max_field_size", 8190),
                             "max_headers": kwargs.get("max_headers", MAX_HEADERS),
                             "auto_decompress": kwargs.get("auto_decompress", True)}
        self._fast = fast
        # Every request handed to aiohttp's handler has had its whole response written, on a
        # connection that stays open (none was handed yet, at first). Then the fast path may
        # answer even before aiohttp's loop is back waiting for a request (``_waiter`` None):
        # see ``data_received``.
        self._answered = True
        # aiohttp's parser stands between two requests (nothing of a next one read yet): only
        # then may a remembered request's bytes be answered without parsing them (``Known``).
        self._boundary = True
        self.declined: Declined | None = None  # the fast path's view of the request it left
        self.gone_logged = False  # "client went away" was logged (here, or by ``write_reply``)
        self._front = front
        # max_request_head, in raw bytes as they arrive (``data_received``): the bytes of the
        # head not whole yet, and the body of the last request handed over while it may still
        # be coming (its bytes are not head bytes). Read per connection, as the head timeout.
        self._head_max = front.current().listener.max_head
        self._head_bytes = 0
        self._body: Any = None
        # The bytes after a body's end that began the next head in the same read (``body_ended``).
        self._begun = b""
        # The version of the request line of a request the parser refused (``_refusal``): the
        # message aiohttp hands ``handle_error`` for it says HTTP/1.0 whatever the client sent.
        self._refused_version: tuple[int, int] = HttpVersion11
        self._taken: Any = EMPTY_PAYLOAD  # the body of the request aiohttp's loop took last
        # The body of a request aiohttp's loop took before it had all come (``_late_ended``).
        self._late: Any = None

    def head_idle(self) -> bool:
        """``HeadTimedHandler``'s, and the moment after a general answer written whole
        (``_answered``) before aiohttp's loop is back waiting."""
        return self.waiting_for_head() or (self._waiter is None and self._answered and not self._messages)

    @property
    def stopping(self) -> bool:
        """The process is stopping: every reply closes its connection (``heads.closing``)."""
        return self._front.runtime.state == "stopping"

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it refused (bad framing, a 500 of its own), with the
        status that says why (``parser_refusal``), under the operator's Server name rather
        than aiohttp's (which names its and Python's versions), with a request id, and in the
        access log. A request the parser refused is counted here, as ERROR with the method
        ``REFUSED_METHOD`` (cachegate's handler, which counts every other request, never saw
        it); a 500 of aiohttp's own follows a request the handler has counted already."""
        refused = isinstance(exc, HttpProcessingError)
        version = None
        if isinstance(exc, HttpProcessingError):
            self._unread = True  # nothing after a refused request is parsed: the close lingers
            version = self._refused_version  # (aiohttp's placeholder message says HTTP/1.0)
            if status == 400:
                status, message = parser_refusal(exc)
        # aiohttp's text and status, written by the one head writer (a refusal in the version
        # of its request line), and the connection closed.
        resp = from_response(super().handle_error(request, status, exc, message), request.method, version)
        resp.force_close()
        fe = self._front.current()
        request_id = fe.ids.new()
        resp.headers[hdrs.SERVER] = fe.server
        resp.headers["X-Request-Id"] = request_id
        # As every answer cachegate gives in place of the origin's (``proxy_handler._plain``),
        # and as the access log and cachegate_requests_total count it.
        resp.headers["Cache-Status"] = PROXY_ERROR
        resp.headers["X-Cache-Status"] = "ERROR"
        if refused:
            fe.requests("ERROR", REFUSED_METHOD).inc()
        # Every answer given here, refused or aiohttp's 500 after a handler's exception (which
        # had no answer of the handler's own: ``proxy_handler.make_handler`` counts those).
        fe.responses[status // 100] += 1
        body = resp.body
        size = len(body) if isinstance(body, bytes) else 0
        fe.sent("none").inc(size)  # cachegate's own body (a refused request: never a hit)
        access = fe.access_log
        if access is not None:
            # A request the parser refused has no method or target to tell (aiohttp hands a
            # placeholder "GET /" message here).
            peer = self.peername
            remote = str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer or "")
            access.add((perf_counter(), 0.0, request_id, remote, None if refused else request.method,
                        None, None if refused else request.raw_path,
                        self._refused_version if refused else request.version,
                        status, size, "ERROR", PROXY_ERROR, None, None, None, None))
        return resp

    def limited(self, what: str, *, lingering: bool = False) -> None:
        """A connection closed by ``send_timeout``, ``max_connections`` or ``max_unsent``:
        counted, and the cap's closings logged, a line a minute at most for each kind
        (``ProxyServer.capped``; the budget's once a walk: ``UnsentBudget``)."""
        self._front.runtime.metrics.client_closed.labels(what).inc()
        manager = self._manager
        if what.startswith("cap_") and isinstance(manager, ProxyServer):
            manager.capped(self._max_connections, what, lingering=lingering)

    def head_timed_out(self, timeout: float) -> None:
        """A head begun (some of its bytes came) and not whole within ``timeout``: logged 408 with
        no request line, as nginx logs its client_header_timeout, and counted as a request the
        parser refused. A connection that sent nothing of a head is closed without a line, as
        nginx's is: an idle connection asked nothing. Nothing is sent either way."""
        if self._head_bytes <= 0:
            return
        fe = self._front.current()
        fe.requests("ERROR", REFUSED_METHOD).inc()
        fe.responses[REQUEST_TIMEOUT // 100] += 1  # as logged (nothing is sent)
        access = fe.access_log
        if access is not None:
            access.add((perf_counter(), timeout, fe.ids.new(), self._remote(), None, None, None,
                        self._refused_version, REQUEST_TIMEOUT, 0, "ERROR", None, None, None, None, None))

    async def finish_response(self, request: Any, resp: web.StreamResponse, start_time: float | None
                              ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, then wait while the transport is paused for writing, then note whether the
        connection is back between requests (``_answered``): the response is whole, the
        connection stays open, and nothing else was handed over.

        The wait is what bounds the memory a client that never reads can take: a response
        without a body (HEAD, 304, 204) writes its head at ``prepare`` and ``write_eof`` then
        finds nothing to write, so nothing in aiohttp waits for the transport to drain, and its
        loop would take the next pipelined request (and read on) while the replies piled up in
        the transport's buffer (300,000 pipelined HEADs from one connection: +268 MB). Waiting
        here holds the queue, so aiohttp pauses reading once it is full, and ``data_received``
        leaves the paused connection to aiohttp (the fast path answers nothing meanwhile)."""
        if self._half_closed and not self._messages:
            self.close()  # the last answer to a half-closed client: it says Connection: close
        out = await super().finish_response(request, resp, start_time)  # (``upgrade_refused``)
        if not out[1] and self.transport is not None and self._paused:
            try:
                await self._drain_helper()
            except ConnectionError as exc:  # the client went away while its replies waited
                drop_traceback(exc)  # (the drain waiter's: a cycle through this frame)
                return out[0], True
        if self._half_closed and not self._messages:
            self.close()  # (the client half-closed while this one was answered)
        self._answered = (not out[1] and bool(out[0].keep_alive) and not self._messages
                          and request.content.is_eof() and not self._close)
        return out

    def eof_received(self) -> bool:  # type: ignore[override]  # (asyncio.Protocol: bool | None)
        """The client shut its sending side (``shutdown(SHUT_WR)``, an HTTP/1.0 client that sends
        its request and waits): a half-close is not a close (RFC 9112 §9.6), so the requests it
        sent are answered, then the connection closes (``finish_response``); nothing more is read.

        aiohttp returns None here, and the transport then closed at once: only a fast hit,
        written before, was answered; a miss was fetched and stored, and its answer dropped.
        With nothing to answer (or a request whose body can now never be whole, or over TLS,
        where asyncio cannot keep a half-closed connection), the transport closes as before."""
        if self._force_close or self.transport is None or self.ssl_context is not None:
            return False
        if not self._answers_pending():
            return False
        self._half_closed = True
        return True

    def _answers_pending(self) -> bool:
        """Requests are queued or being answered, and none waits for body bytes."""
        messages = self._messages
        if messages:
            return not _body_pending(messages[-1][1])
        request = self._current_request
        if request is not None:
            return bool(request.content.is_eof())
        if self._request_in_progress:  # (its handler is done with the body: the reply is going out)
            return True
        # A request taken from the queue and not yet handed to its task (``_taken``, noted by the
        # request factory): pending only if its body is whole, else the client can never send
        # the rest and the handler would wait for it until client_body_timeout.
        return self._waiter is None and not self._answered and not _body_pending(self._taken)

    def data_received(self, data: bytes) -> None:
        """Count the bytes of the request head they belong to, then hand them on (``_received``).

        ``max_request_head`` bounds the raw bytes of a head, as nginx's header buffers do, and
        as they arrive: the parser only caps each line and the number of fields, and the cap on
        the whole head was checked once the head was whole, on the fields as parsed (without
        the whitespace the parser strips): a client could make each connection hold a head of
        up to 1 MB, and have a head of 800 KB of padding answered. A read whose bytes would take
        the current head over the cap goes the slow way (``_received_capped``), where a head
        over it is refused with 431 before the parser buffers more of it; every other read
        costs an addition and a comparison (and, when it ends a request whole, a store)."""
        if self._head_bytes + len(data) > self._head_max:
            self._received_capped(data)
            return
        body = self._body
        before = self._request_count
        self._received(data)
        if self._boundary:
            self._head_bytes = 0  # between two requests: no head begun
        else:
            self._count(data, before, body)

    def _late_ended(self) -> None:
        """The body of a request aiohttp's loop took before it had all come has ended: take it
        off the parser's count of requests waiting in the queue.

        aiohttp's C parser counts a request into that queue when its body ends, and aiohttp
        counts it out (``message_consumed``) when its loop takes it: taken first, it was counted
        out of nothing (the count stays at 0), then in, and stayed one too high for the rest of
        the connection. At 32 the parser stops with what follows held back, and nothing feeds
        it again while aiohttp's own queue is short: one upload with its body in a read of its
        own, then 32 pipelined requests in one write, and the 32nd was never answered (plain
        aiohttp 3.14.5 too). The requests it held back in this read are parsed now."""
        self._late = None
        parser = self._parser
        if parser is None or self.transport is None or not COUNTS_AT_BODY_END:
            return
        parser.message_consumed()
        super().data_received(b"")

    def _count(self, data: bytes, before: int, body: Any) -> None:
        """After a read that did not end between two requests: the bytes it leaves of a head
        not whole yet. ``before``: the request count before it; ``body``: the body that may have
        been coming then (``_body``). Where that head is known to begin, its request line is
        looked at until it is settled (``first_line``)."""
        line = self._line
        self._line = None
        begun, self._begun = self._begun, b""
        if self._buffer_paused:
            # The queue of pipelined requests is full: the parser holds back the rest of what
            # it was given, which was not parsed yet (so not known to be head bytes).
            self._head_bytes = 0
        elif self._request_count != before:  # heads ended in this read: what follows the last one
            self._head_bytes = after = self._after_head(data)
            if after:
                rest = data[len(data) - after:]
                if empty_lines(rest):  # (empty lines after a request begin no head: RFC 9112 §2.2)
                    self._head_bytes = 0
                else:
                    self.first_line(rest)
        elif body is not None:
            # Body bytes. If the body ended in this read, what followed its end, when a head
            # begun (``body_ended``), is that head's.
            if body.is_eof():
                self._body = None
            self._head_bytes = len(begun)
            if begun:
                self.first_line(begun)
        elif self._upgraded:
            pass
        elif self._head_bytes or not empty_lines(data):
            self._head_bytes += len(data)
            if line is not None:
                self.first_line(line + data)
        else:
            # Empty lines before a request line begin no head (RFC 9112 §2.2): a head would
            # still start at the next byte.
            self._line = line

    def body_ended(self, rest: bytes) -> None:
        """``HeadTimedHandler``'s, and a head begun in ``rest`` kept for ``_count``: its bytes
        count towards max_request_head, its request line is looked at, and it is logged 408 if
        it is not whole in time (``head_timed_out``)."""
        super().body_ended(rest)
        if self._head_open:
            self._begun = rest

    def _after_head(self, data: bytes) -> int:
        """The bytes of ``data`` after the end of the last head it ended (a request was handed
        over or answered): the next head's, unless that request has a body, which comes first."""
        queued = self._messages
        payload = queued[-1][1] if queued else EMPTY_PAYLOAD
        if payload is not EMPTY_PAYLOAD or self._upgraded:
            self._body = payload if _body_pending(payload) else None
            return 0
        self._body = None
        end = data.rfind(b"\r\n\r\n")
        if end != -1:
            return len(data) - end - 4
        if not data:
            return 0  # requests the parser held back (``_count``), parsed now
        # The head's CRLF CRLF began in the read before (llhttp accepts nothing else).
        return len(data) - (3 if data[:3] == b"\n\r\n" else 2 if data[:2] == b"\r\n" else 1)

    def _received_capped(self, data: bytes) -> None:
        """A read that would take the current head over ``max_request_head`` if it were all
        head bytes: handed on a head at a time (each piece ends where a head ends, the
        parser's CRLF CRLF), so that pipelined heads are each counted on their own and a
        body is not counted; a head that passes the cap is refused (``_refuse_head``)."""
        # A reload's cap, at once (read here, off the hot path; the parsed head is checked
        # against the current one in any case: ``normalise_request``).
        self._head_max = self._front.current().listener.max_head
        start, size = 0, len(data)  # (offsets: a batch of small heads is not copied once a head)
        while start < size:
            rest = data[start:] if start else data
            if self._head_bytes + size - start <= self._head_max:
                self.data_received(rest)  # (all of it may be head bytes: under the cap)
                return
            if (self._body is not None or self._upgraded or self._force_close or self._close
                    or self._parser is None or isinstance(self._parser, Discarding)):
                self._received_counted(rest)  # not head bytes (a body), or nothing to refuse
                return
            if self._buffer_paused:
                # aiohttp's queue of pipelined requests is full: the parser holds back what
                # follows until the queue drains, and pieces fed now would be taken out of turn.
                # The rest goes to it whole; it is counted from the next read on (``_count``).
                self._received_counted(rest)
                return
            have = self._head_bytes
            head = data[start:start + 3]
            if have and head[:1] in (b"\n", b"\r"):
                # Perhaps the CRLF CRLF began in the read before: a piece up to where it would
                # end here (if it did not, the parser takes that piece as more of the head).
                end = start + (3 if head == b"\n\r\n" else 2 if head[:2] == b"\r\n" else 1)
            else:
                end = data.find(b"\r\n\r\n", start)
                if end != -1:
                    end += 4
            if end == -1 or have + end - start > self._head_max:
                self._refuse_head(have + (size if end == -1 else end) - start,
                                  b"" if have else data[start:])
                return
            piece, start = data[start:end], end
            self.data_received(piece)  # (under the cap: not back here)

    def _received_counted(self, data: bytes) -> None:
        before = self._request_count
        body = self._body
        self._received(data)
        self._count(data, before, body)

    def _refuse_head(self, size: int, piece: bytes) -> None:
        """A head over ``max_request_head`` (``size``: its bytes so far): 431 (after the requests
        before it, if any), then the connection closes; what else comes is read and dropped,
        never buffered."""
        log.debug("a request head from %s is over max_request_head (%d bytes): 431, connection "
                  "closed", self.peername, self._head_max)
        # (as ``normalise_request`` words it; the head may not be whole, so "at least")
        why = f"the request head is at least {size} bytes, over the {self._head_max} this proxy accepts"
        err = HttpProcessingError(code=431, message=why)
        # (the request line's version when this read began the head; else HTTP/1.1)
        self._refused_version = _line_version(piece) if piece else HttpVersion11
        self._enqueue([(_ErrInfo(status=431, exc=err, message=why + "\n"), EMPTY_PAYLOAD)], False, b"")
        self.discard_rest()
        self._head_bytes = 0
        self.head_ended()

    def _received(self, data: bytes) -> None:
        waiter = self._waiter
        # aiohttp's handler is idle when its loop waits for a request (``waiter`` set), but also
        # from the moment a response it wrote is whole until that loop comes back round (a task
        # and a few steps later: ``_answered``). A client that sends its next request at once
        # used to land in that gap after every miss, and its hit then took the general path too
        # (measured in ``zipf``: 78 % of requests, with 65 % hits, arrived there).
        if (self._fast is None or (waiter.done() if waiter is not None else not self._answered)
                or self._messages or self._force_close or self._close or self._payload_parser is not None
                or self._upgraded or self._paused or self._parser is None or self.transport is None):
            boundary = self._boundary
            if boundary:
                self._line = b""  # a head starts with this read (``first_line``)
            count = self._request_count
            self._answered = False
            self._boundary = False
            try:
                super().data_received(data)  # aiohttp's handler is busy (or never idle yet)
                if self._late is not None and self._late.is_eof():
                    self._late_ended()
            except PARSER_FAULTS as exc:
                self._refuse_unparsable(exc)
                return
            queued = self._messages
            if self._body is not None and queued and isinstance(queued[-1][0], _ErrInfo):
                self._fail_body(queued[-1][0].exc)  # (a refusal in the body being read)
            refused = queued[-1][0] if boundary and queued else None
            if isinstance(refused, _ErrInfo) and isinstance(refused.exc, HttpProcessingError):
                # aiohttp queued its 400 in place of the requests before: answer them first.
                queued.pop()
                self._request_count -= 1
                self._answer_before_refusal(data, refused.exc)
                return
            # The parser stands between two requests again when this read ended requests that
            # have no body, and nothing of a next one (so a refusal in the next read is parsed
            # again from its start, whichever path answered the ones before).
            self._boundary = (self._request_count != count and bool(queued) and not self._buffer_paused
                              and data[-4:] == b"\r\n\r\n" and queued[-1][1] is EMPTY_PAYLOAD
                              and not self._upgraded)
            return
        boundary = self._boundary
        if boundary and len(data) <= KNOWN_BYTES and self._answer_known(data):
            if self._head_handle is not None:
                self.head_ended()
            return  # (a longer chunk is never a remembered request: not even hashed)
        parser = self._parser
        feed = data
        # Bytes that may be remembered (``Known``): a whole chunk read between two requests.
        raw: bytes | None = data if boundary and data[-4:] == b"\r\n\r\n" else None
        self._boundary = False
        while True:
            try:
                messages, upgraded, tail = parser.feed_data(feed)
            except HttpProcessingError as exc:
                if boundary and feed is data:
                    self._answer_before_refusal(data, exc)
                else:
                    self._refuse(exc, None)
                return
            except PARSER_FAULTS as exc:
                self._refuse_unparsable(exc)
                return
            if not messages:
                if (feed is data and not empty_lines(data)) or unfinished_head(data):
                    self.head_begun()  # a head not whole yet (``headtimeout``)
                    if boundary and feed is data:
                        self._line = b""  # it starts with this read (``first_line``)
                return
            if self._head_handle is not None:
                self.head_ended()
            done = self._answer(messages, raw if len(messages) == 1 and not upgraded else None)
            if done < len(messages) or upgraded:
                # A full batch means the parser stopped and holds more requests: aiohttp's
                # handler re-feeds it once it has drained the queue (read paused till then).
                self._enqueue(messages[done:], upgraded, tail,
                              full=len(messages) >= self._max_msg_queue_size)
                # Between two requests (the rest declined to aiohttp's handler), as below.
                self._boundary = (not upgraded and len(messages) < self._max_msg_queue_size
                                  and feed[-4:] == b"\r\n\r\n" and messages[-1][1] is EMPTY_PAYLOAD)
                if not upgraded and messages[-1][1] is EMPTY_PAYLOAD and unfinished_head(data):
                    self.head_begun()  # the next head begun in the same read (``headtimeout``)
                return
            if len(messages) < self._max_msg_queue_size or self._force_close:
                # Between two requests when the chunk ends a request that has no body.
                self._boundary = between = (feed[-4:] == b"\r\n\r\n" and messages[-1][1] is EMPTY_PAYLOAD)
                if not between and unfinished_head(data):
                    self.head_begun()  # the next head begun in the same read (``headtimeout``)
                return
            feed = b""  # the parser stopped after a full queue's worth: it holds more requests

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not self.gone_logged:
            # The client reset the connection, most often mid-response: one line, whichever
            # notices first (here, or ``write_reply`` when a streamed reply meets it).
            self.gone_logged = True
            request = self._current_request
            log.debug("client %s went away%s: %s", self.peername,
                      "" if request is None else f" during {request.method} {request.raw_path}", exc)
        super().connection_lost(exc)

    def _remote(self) -> str:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer or "")

    def _answer_known(self, data: bytes) -> bool:
        """Answer ``data`` if it is a request remembered whole (``Known``), without parsing it."""
        fast = self._fast
        assert fast is not None
        try:
            out = fast.answer_known(data, self._remote(), self.ssl_context is not None, perf_counter())
        except Exception:
            log.exception("fast path failed for a remembered request; answering on the general path")
            out = None
        if out is None:
            return False
        self._send(out)  # (aborted or not, the request was answered)
        return True

    def _answer(self, messages: Sequence[Any], raw: bytes | None) -> int:
        """Answer the leading fast-path requests of ``messages``; how many were answered.
        ``raw``: the bytes of the one message, when it may be remembered."""
        fast = self._fast
        assert fast is not None and self._parser is not None
        if self.transport is None:
            return len(messages)  # the client is gone: nobody to answer
        started = perf_counter()
        remote = self._remote()
        secure = self.ssl_context is not None
        for i, (msg, payload) in enumerate(messages):
            if (payload is not EMPTY_PAYLOAD or msg.should_close or msg.upgrade or self._paused
                    or (msg.method != "GET" and msg.method != "HEAD")
                    or (msg.version != HttpVersion11
                        and (msg.version != HttpVersion10 or asks_to_close(msg.version, msg.headers)))):
                return i
            try:
                out = fast.answer(msg, remote, secure, started, raw)
            except Exception:
                log.exception("fast path failed for %s %s; answering on the general path",
                              msg.method, msg.path)
                out = None
            if out is None:
                declined = fast.declined
                self.declined = declined if declined is not None and declined.msg is msg else None
                return i
            self._parser.message_consumed()
            if not self._send(out):
                return len(messages)  # aborted (a body file cut short): nobody to answer
        return len(messages)

    def _send(self, out: FastAnswer) -> bool:
        """Write a fast answer, and count the request as aiohttp's loop does; False when the
        connection was aborted instead (a body file cut short: ``_send_file``)."""
        transport = self.transport
        assert transport is not None  # checked before the request was answered
        sent = True
        if isinstance(out, bytes):
            transport.write(out)
        elif isinstance(out[1], SharedFile):
            sent = self._send_file(transport, out[0], out[1], out[2] if len(out) == 3 else None)
            if not sent:
                transport.abort()
        else:
            transport.writelines(out)
        self._request_count += 1
        manager = self._manager
        if manager is not None:
            manager.requests_count += 1
        if sent:
            self._kept_alive()
            if self._raw is not None:  # (TLS: a reply its TLS layer never pauses for, ``tls_written``)
                self.tls_written()
        return sent

    def _send_file(self, transport: Any, head: bytes, shared: SharedFile, cached: Cached | None) -> bool:
        """The head, then the body file with ``os.sendfile`` as far as the socket takes it at
        once; the rest from memory when it holds the body too (``cached``), else read with
        ``os.pread`` and handed to the transport (at most FAST_FILE_MAX bytes: bigger
        disk-only bodies take the general path). A file never read is never sent from here
        (the general path, or ``Storage.sendable_file``, opens it in the thread pool first).
        False when the file held less than its size (cut on disk after it was opened): the
        head announced the whole length, so the caller aborts the connection, and the
        variant is forgotten (``Engine.body_file_cut_short``), as on the general path."""
        transport.write(head)
        sent = sendfile_now(transport, shared.fd, 0, shared.size)
        if sent < shared.size:
            rest = None
            if cached is not None and self._fast is not None:
                rest = self._fast.rest(cached, sent)
            if rest is None:
                rest = os.pread(shared.fd, shared.size - sent, sent)
                if len(rest) < shared.size - sent:
                    if shared.entry is not None and self._fast is not None:
                        self._fast.cut_short(shared.entry)
                    return False
            transport.write(rest)
        return True

    def _kept_alive(self) -> None:
        """What aiohttp's loop does after a kept-alive response: restart the idle timer."""
        if self._keepalive_timeout > 0:
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _answer_before_refusal(self, data: bytes, exc: HttpProcessingError) -> None:
        """The requests of ``data`` before one aiohttp's parser refused, then the refusal; or up
        to one that closes the connection, when bytes followed it (RFC 9112 §9.6: the server
        answers up to and including that request, then closes, ignoring the rest).

        aiohttp's parser raises for the whole chunk and drops every request it parsed from it
        before the bad one: the client got a lone 400 for a batch of pipelined requests, and
        would take it for the answer to the first (RFC 9112 §9.3.2: responses come in order).
        So ``data`` is parsed again by a parser of its own (only from where the connection's
        parser stood between two requests: ``_boundary``), and the requests before the refusal
        are queued for aiohttp's handler, then the 400 (``handle_error``), which closes the
        connection; the connection's parser then discards what comes. Without a boundary (or
        when the parse again goes otherwise), the 400 alone, as before."""
        parsed = self._parsed_until_refused(data)
        if parsed is None:
            self._refuse(exc, None)
            return
        messages, refused, piece = parsed
        if not (_data_after_close(refused) and messages
                and (messages[-1][0].should_close or asks_to_close(messages[-1][0].version,
                                                                   messages[-1][0].headers))):
            messages.append(self._refusal(refused, piece))
        self.discard_rest()
        self._enqueue(messages, False, b"")

    def _parsed_until_refused(self, data: bytes
                              ) -> tuple[list[tuple[Any, Any]], HttpProcessingError, bytes] | None:
        """The requests of ``data`` (which starts a request) before the parser's refusal, parsed
        anew, with the refusal and the piece of ``data`` it came in: fed in pieces ending at
        each head's end, so the piece it meets holds no request of its own; None when the parse
        does not end in a refusal (or upgrades, or fills aiohttp's queue first)."""
        parser = HttpRequestParser(self, self._loop, self._read_bufsize,
                                   payload_exception=RequestPayloadError,
                                   max_msg_queue_size=self._max_msg_queue_size, **self._parser_args)
        out: list[tuple[Any, Any]] = []
        head = b""  # the piece holding the last parsed request's head
        start = 0
        while start < len(data):
            end = data.find(b"\r\n\r\n", start)
            end = len(data) if end == -1 else end + 4
            try:
                messages, upgraded, _ = parser.feed_data(data[start:end])
            except HttpProcessingError as exc:
                if out and _body_pending(out[-1][1]):
                    # The refusal is of the last request's body (bad chunking): that request
                    # is the one refused, not one after it (answered, it would wait for a body
                    # that never comes).
                    out.pop()
                    return out, exc, head
                return out, exc, data[start:end]
            except PARSER_FAULTS:
                return None
            if upgraded or len(out) + len(messages) >= self._max_msg_queue_size:
                return None
            if messages:
                head = data[start:end]
            out.extend(messages)
            start = end
        return None

    def refuse_simple_request(self, exc: HttpProcessingError) -> None:
        """``HeadTimedHandler.first_line``'s refusal, after the requests before it (``_refuse``)."""
        self._refuse(exc, None)

    def _refusal(self, exc: HttpProcessingError, piece: bytes | None) -> tuple[Any, Any]:
        """The queue entry for a request the parser refused (answered by ``handle_error``), in
        the version of its request line when ``piece`` shows it (else HTTP/1.1)."""
        self._refused_version = _line_version(piece) if piece is not None else HttpVersion11
        return _ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD

    def _refuse(self, exc: HttpProcessingError, piece: bytes | None) -> None:
        """The 400 alone; the connection's parser then discards what comes (the reply closes)."""
        self._fail_body(exc)
        self.discard_rest()
        self._enqueue([self._refusal(exc, piece)], False, b"")

    def _fail_body(self, exc: BaseException) -> None:
        """The parser refused what came of a request body not yet whole (a malformed chunk, a
        trailer with too many fields): that body's stream fails with the refusal
        (``BodyRefused``: the status and words of ``parser_refusal``), so its request is
        answered so at once, its upload to the origin is aborted, and the connection closes.
        The refusal queued behind it is never reached. Before, the stream was never told: the
        handler waited ``client_body_timeout`` for more body and answered 408, holding the
        upstream connection with half a body all that time.

        aiohttp never reads a refused body after its answer: its own read of the rest of a body
        the handler left (up to its ``lingering_time``, through the parser) met the refusal and
        logged "Unhandled exception" at ERROR with a traceback, one per refused request, which
        any client could send. The connection closes after the answer instead (a lingering close
        that drops what still comes unparsed: ``LimitedHandler.closed_after``), and a body whose
        handler has already returned (aiohttp may be reading it so) is ended, not failed."""
        if not isinstance(exc, HttpProcessingError):
            return
        status, text = parser_refusal(exc)
        self._lingering_time = 0.0  # (the connection closes after the answer: nothing to parse)
        for body in {id(p): p for p in (self._late, self._body) if p is not None}.values():
            if _body_pending(body) and body.exception() is None:
                if body is self._handled:
                    body.feed_eof()  # its handler is done: aiohttp's lingering read ends quietly
                else:
                    body.set_exception(BodyRefused(status, text.rstrip("\n")))

    def _refuse_unparsable(self, exc: Exception) -> None:
        """A request the parser failed on with something other than its own refusal: yarl raises
        IndexError for a request target such as ``http://[::1]@``, which aiohttp lets through
        (the transport then died with no answer, and a traceback in the log). A 400, as for any
        malformed request, and the connection closes after it."""
        log.debug("request target refused by the URL parser: %r", exc)
        self._refuse(InvalidURLError("malformed request target"), None)

    def _enqueue(self, messages: Sequence[Any], upgraded: bool, tail: bytes, full: bool = False) -> None:
        """Hand parsed messages to aiohttp's handler, as ``RequestHandler.data_received`` does."""
        self._answered = False
        for msg, payload in messages:
            self._request_count += 1
            self._messages.append((msg, payload))
        waiter = self._waiter
        if messages and waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._buffer_paused and (full or len(self._messages) >= self._max_msg_queue_size):
            self._pause_reading_for_buffer()
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail


_VERSION = re.compile(r"HTTP/(\d+)\.\d+'")  # the refused version, in the parser's quote of the line
# A method token (RFC 9110 §9.1, §5.6.2: tchar), at the start of the parser's quote of the line.
_METHOD = re.compile(r"\n\n  b['\"]([!#$%&'*+.^_`|~0-9A-Za-z-]+) ")


def _data_after_close(refused: object) -> bool:
    """Is this aiohttp's refusal of bytes after a request that closes the connection (as the
    exception, or as the 400 its handler queued)?"""
    if isinstance(refused, _ErrInfo):
        refused = refused.exc
    return isinstance(refused, HttpProcessingError) and "Data after `Connection: close`" in str(
        refused.message)


def parser_refusal(exc: HttpProcessingError) -> tuple[int, str]:
    """The status and text for a request aiohttp's parser refused (it says 400 for all), in
    fixed words: never the parser's own message, which quotes the request line (a session
    token in its query, say) back to the client and every proxy and log on the way.

    llhttp refuses a ``Transfer-Encoding`` whose last coding is not ``chunked`` before
    cachegate sees the request: that is a coding this proxy does not implement, 501 as
    nginx answers (a list ending in ``chunked`` parses, and ``proxy.policy.request``
    refuses it with 400). Too many fields is 431 (RFC 6585). A version llhttp does not parse
    whose major is not 1 (``HTTP/3.0``) is 505, as the general path answers ``HTTP/2.0``
    (``heads.version_refusal``); a 1.x one it refuses (``HTTP/1.2``) stays 400.
    llhttp refuses a method it does not know (``BREW``, ``get``: methods are case-sensitive)
    as "Invalid method", and one that begins with a method it knows (``GETX``, ``POSTS``,
    ``PURGEX``: it matches known names letter by letter) as "Expected space after method": a
    well-formed method token this server does not implement is 501 (RFC 9110 §9.1, §15.6.2)
    either way, anything else in its place (``G@T``, ``GET@``) stays 400.
    """
    text = str(exc.message)
    first = text.split("\n\n", 1)[0]  # llhttp's reason (what follows the blank line quotes the request)
    if "Invalid method" in first or "Expected space after method" in first:
        found = _METHOD.search(text)
        if found is not None:
            return 501, (f"501 Not Implemented: the method {found.group(1)[:40]} is not implemented "
                         "by this server\n")
    if "Invalid HTTP version" in first:
        found = _VERSION.search(text)
        if found is not None and found.group(1) != "1":
            return 505, "505 HTTP Version Not Supported: this server speaks HTTP/1.1\n"
    if "invalid `Transfer-Encoding`" in first:
        return 501, ("501 Not Implemented: a transfer coding other than 'chunked'; only a single "
                     "'chunked' is accepted\n")
    if "Too many headers" in first:
        return 431, f"431 Request Header Fields Too Large: {TOO_MANY_FIELDS}\n"
    return 400, f"400 Bad Request: {refusal_reason(exc)}\n"


# aiohttp's C request parser counts a request into its queue when its body ends; its pure-Python
# one (AIOHTTP_NO_EXTENSIONS) when its head ends, which ``message_consumed`` always finds.
COUNTS_AT_BODY_END = HttpRequestParser.__module__ == "aiohttp._http_parser"

_LINE_VERSION = re.compile(rb"[^\r\n]* HTTP/(\d)\.(\d)\r?\n")


def _body_pending(payload: Any) -> bool:
    """A request's body (its payload, or ``EMPTY_PAYLOAD``) that has not all come yet."""
    return payload is not EMPTY_PAYLOAD and not payload.is_eof()


def _line_version(piece: bytes) -> tuple[int, int]:
    """The version of the request line ``piece`` starts with (after any empty lines), as a
    reply to it is framed (``heads.reply_version``): HTTP/1.0 for 1.0, else HTTP/1.1."""
    found = _LINE_VERSION.match(piece.lstrip(b"\r\n"))
    return HttpVersion10 if found is not None and found.group(1, 2) == (b"1", b"0") else HttpVersion11


# What the fast path reads of aiohttp's ``RequestHandler`` (its ``__slots__``) and calls.
HANDLER_FIELDS = ("_waiter", "_messages", "_max_msg_queue_size", "_payload_parser", "_message_tail",
                  "_keepalive_handle", "_next_keepalive_close_time", "_request_count", "_force_close",
                  "_current_request", "_read_bufsize", "_lingering_time")
HANDLER_METHODS = ("_pause_reading_for_buffer", "finish_response")  # (the latter: ``_answered``)
PARSER_METHODS = ("message_consumed",)  # of aiohttp's C request parser


def probe() -> FastPathState:
    """Whether this aiohttp has the handler and parser internals the fast path relies on
    (3.14's), and if not, what is missing (the start-up line, a metric and ``/stats`` say it)."""
    try:
        from aiohttp._http_parser import (  # type: ignore[import-not-found]
            HttpRequestParser as CParser,
        )
    except ImportError:
        return FastPathState(False, "no-c-parser", "aiohttp's C HTTP parser cannot be imported")
    slots = set(getattr(RequestHandler, "__slots__", ()))
    missing = [f"RequestHandler.{n}" for n in HANDLER_FIELDS if n not in slots]
    missing += [f"RequestHandler.{n}()" for n in HANDLER_METHODS
                if not callable(getattr(RequestHandler, n, None))]
    if missing:
        return FastPathState(False, "handler-internals", "aiohttp lacks " + ", ".join(missing))
    missing = [f"HttpRequestParser.{n}()" for n in PARSER_METHODS if not hasattr(CParser, n)]
    if missing:
        return FastPathState(False, "parser-internals", "aiohttp lacks " + ", ".join(missing))
    return FastPathState(True, "ok")


def fast_path_supported() -> bool:
    """Whether this aiohttp has the handler internals the fast path relies on (3.14's)."""
    return probe().enabled


# max_connections when the config leaves it null: nginx's worker_connections is 512 by default
# (counting its upstream connections too) and is raised to thousands in practice; Varnish caps
# its threads, not its connections. 10,000 idle connections cost a worker about 40 MB (4 KB each, measured)
# beside what their replies hold (docs/requests.md#limits), and a cap below the open-files limit
# is what keeps a flood from making the accept fail (EMFILE, where new connections are closed
# unanswered and unlogged): the cap leaves room for what else a worker opens.
DEFAULT_MAX_CONNECTIONS = 10_000


def connection_cap(settings: Settings, nofile: int | None = None) -> int:
    """The client connections one worker keeps open at once: ``max_connections``, or when it is
    null DEFAULT_MAX_CONNECTIONS lowered below the open-files limit (``nofile``: the soft
    RLIMIT_NOFILE) by what else a worker may have open: what its store keeps open (the disk
    shards' files, ``SHARD_FILES`` each, and OTHER_FILES: ``store_files``), always, and each
    upstream's pool, at most. The pools' share is a most, seldom all open: the cap never goes
    below a quarter of what the store leaves (a start refuses shards that leave too little:
    ``proxy.config``)."""
    if settings.max_connections is not None:
        return settings.max_connections
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile <= 0:
        return DEFAULT_MAX_CONNECTIONS
    disk = settings.cache.disk
    room = nofile - store_files(disk.shards if disk is not None else 0)
    pools = settings.pool.pool_size * len(settings.upstreams)
    return max(min(DEFAULT_MAX_CONNECTIONS, max(room - pools, room // 4)), 1)


class ProxyServer(LimitedServer):
    """aiohttp's low-level server whose connections answer fresh hits on the fast path, at most
    ``max_connections`` of them at once (``LimitedHandler``)."""

    def __init__(self, handler: Any, *, front: Front, fast: FastPath | None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._front = front
        self._capped_by: Settings | None = None  # the settings ``max_connections`` was taken from
        self._max_connections = DEFAULT_MAX_CONNECTIONS
        self._capped = Summarised(window=60.0)  # (``capped``)
        if front.unsent is None:  # max_unsent: one budget for the worker, all its client listeners
            front.unsent = UnsentBudget(self._loop, lambda: front.runtime.settings.max_unsent, log)
        self.unsent_budget = front.unsent
        state = probe()
        front.runtime.metrics.fast_path = state  # cachegate_fast_path_enabled, /stats
        self._fast = fast if state.enabled else None
        if fast is not None and self._fast is None:
            log.warning("the fast hit path is off (%s); every hit takes the general path", state.detail)

    @property
    def fast(self) -> FastPath | None:
        return self._fast

    @property
    def max_connections(self) -> int:
        """The cap, from the live settings (a reload's applies to the next connections); read at
        each connection, and by a TLS listener's acceptor at each accept."""
        settings = self._front.runtime.settings
        if settings is not self._capped_by:
            self._capped_by = settings
            self._max_connections = connection_cap(settings)
        return self._max_connections

    def capped(self, limit: int, what: str, *, lingering: bool = False) -> None:
        """The cap closed a connection (``what``: ``cap_oldest``, one waiting for its client, to
        admit a new one; ``cap_refused``, the new one, every other busy): a line saying which when
        it begins, then one a minute at most while it goes on, for each kind, with how many
        there were meanwhile. A lingering close closed so is INFO: its reply is out, it only
        drops what its client still sends, the cheapest to close (the line said "admitting
        client connections failed" for it, when nothing had failed)."""
        capped, busy = self._capped, "max_connections (%d) reached in this worker"
        if what == "cap_refused":
            capped.log(logging.WARNING, log, "refused", f"{busy} with every connection busy: new connections "
                       "are closed", limit)
        elif lingering:
            capped.log(logging.INFO, log, "lingering", f"{busy}: connections in their lingering close (reply "
                       "sent, dropping what their client still sends) are closed to make room for new ones",
                       limit)
        else:
            capped.log(logging.WARNING, log, "waiting", f"{busy}: connections waiting for their client "
                       "(idle, a request or TLS handshake unfinished, a reply unread, a close unanswered) "
                       "are closed to make room for new ones", limit)

    def closed_before_handshake(self) -> None:
        """A TLS listener closed its oldest connection not yet handshaken, to stay within
        ``max_connections`` (``TLSAcceptor``): counted and logged as the cap's other closings."""
        self._front.runtime.metrics.client_closed.labels("cap_oldest").inc()
        self.capped(self.max_connections, "cap_oldest")

    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
                      ) -> web.BaseRequest:
        """aiohttp's request factory, which its request loop calls outside any ``try``: an
        exception here ended that loop, and the connection stayed open answering nothing
        (``BaseRequest`` raised UnicodeError for an absolute-form target whose host does not
        decode, ``http://xn--/``; normalisation refuses those hosts, but only once a request
        exists). Whatever the message, a request comes out: one that ``handle`` answers 400,
        closing the connection (``proxy_handler.UnbuildableRequest``). The request's body is noted
        on its connection (``ProxyRequestHandler._taken``) until its task takes it over."""
        if isinstance(protocol, ProxyRequestHandler):
            protocol._started += 1  # (``LimitedServer``)
            protocol._taken = payload
            if _body_pending(payload):
                protocol._late = payload
        try:
            return web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        except Exception as exc:  # any of them would end the loop silently
            log.info("a request from %s could not be built (%r): answered 400, connection closed",
                     getattr(protocol, "peername", None), exc)
            return UnbuildableRequest(exc, ERROR, payload, protocol, writer, task, self._loop)

    def __call__(self) -> RequestHandler:
        # Read per connection: a reload's client_header_timeout, send_timeout, keepalive_timeout
        # and lingering times apply to the next ones. keepalive_timeout 0 (no keep-alive): every
        # reply says Connection: close (``heads.closing``), so none is the fast path's (its
        # heads keep the connection).
        settings = self._front.runtime.settings
        keepalive = settings.keepalive_timeout
        return ProxyRequestHandler(self, loop=self._loop, fast=self._fast if keepalive > 0 else None,
                                   front=self._front, head_timeout=settings.client_header_timeout,
                                   send_timeout=settings.send_timeout, keepalive_timeout=keepalive,
                                   lingering=(settings.lingering_time, settings.lingering_timeout),
                                   max_connections=self.max_connections, **self._kwargs)


__all__ = ["DEFAULT_MAX_CONNECTIONS", "FastPath", "ProxyRequestHandler", "ProxyServer", "connection_cap",
           "fast_path_supported", "probe"]
