"""The pool of upstreams: which one to use (pure bookkeeping) and sending to it (I/O).

Selection is a pure function of the pool's state (weights, in-flight counts,
health), kept apart from the I/O, so it is unit-testable without sockets (as
httpcore keeps its pool bookkeeping). Sending uses cachegate's own lean
HTTP/1.1 client (``proxy.http_client``: asyncio protocols and aiohttp's C parser;
why not aiohttp's ``ClientSession`` is measured there): one keep-alive pool of
``pool_size`` connections per upstream, no cookie jar, no decompression (bytes and
``Content-Encoding`` pass through unchanged), connect/read timeouts and an optional
total one.

Health:

- active: ``GET health.path`` every ``interval``, on a connection of its own (outside
  ``pool_size``: a pool busy with slow answers is no failed check); ``unhealthy``
  consecutive failures take an upstream out, ``healthy`` consecutive successes bring
  it back; a failed check says why (``CheckResult``, ``check_error``: a status, refused,
  a timeout, the TLS verification failure) in the take-out log line and as
  ``last_error`` in ``GET /upstreams``;
- passive: ``passive.failures`` consecutive passive failures take it out for
  ``passive.cooldown``, once (the failures of requests still in flight then are only counted)
  (by default only in pools of two or more: like nginx's
  max_fails, a single upstream is never taken out unless ``passive:`` is
  configured). ``passive_failure`` sorts an exchange's failure: before the request
  was written (refused, a connect timeout, a TLS handshake that failed: ``CONNECT``)
  the upstream is unreachable, and such failures take it out without a cap; after
  it was written, a failure that looks like the upstream's but could be one URL's
  (``RESPONSE``: no response head within the read or total timeout, an invalid
  response, a new connection closed or reset before any response byte, and
  502/503/504 answers) takes it out only while at least half the pool (rounded
  up) stays up (``_may_take_out``, as Envoy's max_ejection_percent): one URL that
  fails or is dropped cannot take every upstream out, and a lone upstream is never
  taken out by them. Another 5xx, a slow or broken body, bytes after a whole response in
  its read (``UpstreamOverrun``: one handler's framing), a wait for a free pooled connection,
  a pooled connection closed as the request left or a lookup of the upstream's name that
  failed for the resolver's trouble (``DNS_ERRORS``, shared by every named upstream; nothing
  was sent) is no passive failure; a name that does not exist (``UpstreamNoSuchName``) is a
  ``CONNECT`` one.

A request is retried on another upstream only when the connection failed before any response
byte arrived (refused, reset, closed with nothing read, or a connect timeout), only for
idempotent methods (unless ``retry_non_idempotent``), and with a body only when it can be
sent again: one read whole before (bytes: ``client_body_buffer``) always, a streamed one
only while no try has read any of it (``_Watched``: a connection refused or timed out before
the head was written), never twice. A reused connection that closes with nothing read is a
keep-alive connection closed by the upstream as the request left (its idle timeout, not its
answer): it uses up neither that upstream's try nor a retry; the next try prefers another
upstream (the same one when no other is up), and that try and every later one go on a new
connection (the upstream's other idle ones may be closed as well). A new connection closed
so is a failed try like any other (the upstream dropped that request). A 5xx answer, a read
timeout or a connection that closes part-way through the response head is not retried: the
upstream may have acted on the request.

An upstream whose pool is full (``HostPool.free``) is passed over while another has a
connection free, as nginx's max_conns. A request that waited the connect timeout in vain
for a full pool (every one was full) goes at once to an untried upstream with a connection
free by then, never into a second wait ((retries + 1) x connect); none, and it is a 504.
Not a try (nothing was sent), nor a request or failure of the upstream's: its own
``pool_wait`` kind.

A ``206 Partial Content`` to a request without ``Range`` (a fill never sends the client's,
and no request carries the pre-standard ``Request-Range``: ``proxy.policy.request.NEVER_FORWARDED``)
is an invalid response, as Varnish fails such a fetch: a 502, or the stored response under
stale-if-error; never relayed as if it were the whole, nor stored.

A client whose request body breaks off while it is being sent (``ClientBodyError``)
ends the exchange (the upstream connection is dropped) and is never retried, nor
counted against the upstream: not a passive failure, not an upstream error in the
metrics. Counted, a client breaking off a few uploads would take every upstream out.

A connection this process cannot open because it is out of file descriptors or socket memory
(``OutOfResources``: EMFILE, ENFILE, ENOBUFS, ENOMEM from ``socket()`` or ``connect()``) is
cachegate's own failure: 503 "cachegate ran out of file descriptors", never retried, never a
passive failure nor an upstream error kind (``cachegate_out_of_resources_total{where}``), logged
once per streak; an active check that meets it gives no verdict (``CheckResult.own``). Held
against the upstream, a flood of idle client connections at the open-files limit took every
healthy upstream out, and clients got 503 "no origin server is available" for the cool-down.

Timeouts (all 504 for the client, ``detail=UPSTREAM-TIMEOUT``) are told apart in
the error and in ``cachegate_upstream_errors_total{kind}``: ``connect_timeout``
(no connection within ``timeouts.connect``), ``pool_wait`` (no free pooled one within it),
``read_timeout`` (``timeouts.read`` without a byte), ``total_timeout`` (``timeouts.total``
for the whole exchange).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDictProxy
from prometheus_client.core import GaugeMetricFamily, Metric
from yarl import URL

from proxy.errors import (
    NoUpstreamAvailable,
    OutOfResources,
    ProxyStopping,
    UnaskedPartial,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
)
from proxy.http_client import (
    DNS_ERRORS,
    KEEPALIVE_IDLE,
    SMALL_BODY,
    HostPool,
    InterimHook,
    PoolWaitTimeout,
    Response,
    UpstreamBodyError,
    UpstreamConnection,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamNoSuchName,
    UpstreamOverrun,
    UpstreamReadTimeout,
    UpstreamTotalTimeout,
    body_error_kind,
    body_once,
    error_kind,
    exhausted,
    request_head,
)
from proxy.logs import RepeatedFailure
from proxy.policy.fields import body_length, content_length
from proxy.settings import PoolSettings, UpstreamSettings
from proxy.tls import ca_file_problem, client_context

log = logging.getLogger("cachegate.upstream")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


# What passive health makes of a failure (``passive_failure``): before the request was written,
# the upstream cannot be reached (no cap); after, it may be one URL's answer (capped:
# ``UpstreamPool._may_take_out``).
CONNECT = "connect"
RESPONSE = "response"

# The answers held against an upstream by passive health: it says it cannot serve (a gateway's
# failure, unavailable, a gateway's timeout). A 500 (or 501, 505) is the application's answer to
# that request: held against the upstream, any client able to make one URL fail (a
# broken endpoint, a crafted query) took every upstream out for everyone. nginx's max_fails
# counts no status at all by default (proxy_next_upstream error timeout).
UNAVAILABLE = frozenset({502, 503, 504})


@dataclass
class Upstream:
    """One upstream's state. Mutated by the pool; read by the pure selection function."""

    url: URL
    weight: int = 1
    in_flight: int = 0
    healthy: bool = True  # the active checks' verdict
    down_until: float = 0.0  # passive checks: out of rotation until this monotonic time
    passive_failures: int = 0  # consecutive
    check_successes: int = 0  # consecutive active-check results
    check_failures: int = 0
    check_error: str | None = None  # why the last active check failed (None: it succeeded)
    requests: int = 0
    failures: int = 0
    name: str = field(init=False, default="")  # str(url), made once (it is asked for on every request)

    def __post_init__(self) -> None:
        self.name = str(self.url)

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.down_until

    def state(self, now: float) -> str:
        if not self.healthy:
            return "down (health check)"
        if now < self.down_until:
            return f"down (passive, {self.down_until - now:.1f}s left)"
        return "up"


@dataclass
class Selector:
    """Smooth weighted round robin (nginx's algorithm) or least connections per weight, its
    ties broken by that round robin (as nginx's least_conn)."""

    balance: str = "round_robin"
    _current: dict[str, int] = field(default_factory=dict)

    def choose(self, upstreams: list[Upstream], now: float, exclude: frozenset[str] = frozenset(),
               full: frozenset[str] = frozenset()) -> Upstream | None:
        """``full``: upstreams whose connection pool is full (a request would wait for a free
        connection): chosen only when every other is full too, as nginx's max_conns. Chosen by
        turn, a slow upstream's full pool made a request wait the connect timeout for a 504
        while another upstream had connections free."""
        if len(upstreams) == 1:  # the common case, without building lists
            only = upstreams[0]
            return only if only.available(now) and only.name not in exclude else None
        candidates = [u for u in upstreams if u.available(now) and u.name not in exclude]
        if full and len(candidates) > 1:
            candidates = [u for u in candidates if u.name not in full] or candidates
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if self.balance == "least_conn":
            # The fewest in flight per weight; ties (every light load: nothing in flight) go by
            # the smooth weighted round robin below, as nginx's least_conn does. Broken by
            # order alone, every request of a light load went to one upstream, whatever the weights.
            least = min(candidates, key=lambda u: u.in_flight / u.weight)
            candidates = [u for u in candidates if u.in_flight * least.weight == least.in_flight * u.weight]
            if len(candidates) == 1:
                return candidates[0]
        total = sum(u.weight for u in candidates)
        best: Upstream | None = None
        for u in candidates:
            cur = self._current.get(u.name, 0) + u.weight
            self._current[u.name] = cur
            if best is None or cur > self._current[best.name]:
                best = u
        assert best is not None
        self._current[best.name] -= total
        return best


class UpstreamResponse:
    """A response head from an upstream, and its body as an async iterator of chunks."""

    __slots__ = ("_arrived", "_length", "_pool", "_released", "_resp", "close_delimited_tls", "headers",
                 "reason", "status", "stray", "upstream")

    def __init__(self, resp: Response, upstream: Upstream, pool: UpstreamPool) -> None:
        self._resp = resp
        self.upstream = upstream
        self._pool = pool
        self.status = resp.status
        self.reason = resp.reason
        self.headers: CIMultiDictProxy[str] = resp.headers
        # Its body ends with the TLS connection: a truncation looks the same (never stored).
        self.close_delimited_tls = resp.close_delimited_tls
        self.stray = resp.stray  # bytes dropped after it (``Response.stray``)
        self._released = False
        self._length: int | None = -1  # -1: not parsed yet
        self._arrived: int | None = -1  # -1: not asked yet

    @property
    def content_length(self) -> int | None:
        """The Content-Length, parsed once (a fill asks for it twice, the storability decision
        once more: ≈ 8 Python-level calls a parse, ``scripts/bench-calls``)."""
        length = self._length
        if length == -1:
            length = self._length = content_length(self.headers.getall("Content-Length", ()))
        return length

    @property
    def body_length(self) -> int | None:
        """How many bytes of body follow the head (``policy.fields.body_length``): 0 for a 204,
        a 304 or the answer to HEAD whatever their Content-Length says, which describes no
        body that comes (a fill that expected a 204's 5 bytes never stored it)."""
        return body_length(self.status, self.content_length, self._resp.head_method)

    @property
    def arrived_length(self) -> int | None:
        """The length of a body its head does not give (chunked, or ended by the connection's
        close) when all of it arrived with the head; None when it did not, and for an answer to
        HEAD (no body follows it). Asked once: the fill's decision and the head its clients get
        must agree, whatever arrives in between."""
        arrived = self._arrived
        if arrived == -1:
            arrived = self._arrived = None if self._resp.head_method else self._resp.arrived_length()
        return arrived

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived with the head (a small response): no
        waiting, no chunk iteration. None otherwise (then use ``iter_chunks``)."""
        body = self._resp.complete_body()
        if body is not None:
            self.release()
        return body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    chunk = await self._resp.read_chunk()
                except UpstreamError as exc:
                    exc.in_body = True  # (a timeout too: its head was an answer)
                    self._pool._body_error(self.upstream, exc)
                    raise
                except (OSError, RuntimeError) as exc:
                    error = UpstreamConnectError(f"{self.upstream.name}: {exc}")
                    error.in_body = True
                    self._pool._body_error(self.upstream, error)
                    raise error from exc
                if not chunk:
                    return
                yield chunk
        finally:
            self.release()

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_chunks()])

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool when the body was read
        to the end, and is closed otherwise."""
        if not self._released:
            self._released = True
            self._pool._done(self.upstream)
            self._resp.discard()

    def close(self) -> None:
        """Drop the connection (the body was not read to the end)."""
        self.release()


ErrorHook = Callable[[str, str], None]  # (upstream name, error kind)
ExhaustedHook = Callable[[str], None]  # (where: ``EXHAUSTED_WHERE``)

# Where this process ran out of descriptors or socket memory opening a connection to an upstream
# (``OutOfResources``): ``cachegate_out_of_resources_total{where}``, never an upstream error kind.
EXHAUSTED_WHERE = ("upstream_connect", "health_check")


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One active health check: ``ok``, else ``error`` says why in an operator's words (the
    status, the TLS verification failure, refused, timed out), for the log and ``GET /upstreams``."""

    ok: bool
    error: str | None = None
    # The check could not be made: this process is out of descriptors (``OutOfResources``).
    # Neither a success nor a failure of the upstream's: its counts and verdict stay as they are.
    own: bool = False


def check_error(exc: BaseException) -> str:
    """Why a check's exchange failed, from the exception it raised (its cause for a connect error:
    the ``OSError`` or ``ssl.SSLError`` the socket met).

    >>> check_error(ConnectionRefusedError(111, "Connection refused"))
    'connection refused'
    """
    cause = exc.__cause__ if isinstance(exc, UpstreamConnectError) and exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: {cause.reason or 'CERTIFICATE_VERIFY_FAILED'}: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED):  # (each of several addresses)
        return "connection refused"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[:1].lower() + cause.strerror[1:]
    text = str(cause)
    name, sep, rest = text.partition(": ")  # "https://host:port: cannot connect: ..." -> what follows
    return rest if sep and "://" in name else (text or type(cause).__name__)


class UpstreamTLSUnusable(Exception):
    """``upstream.tls.ca_file`` does not load (settings not made by a config load, which checks
    the file and keeps its bytes: ``TLSSettings.ca_data``): the pool cannot check any
    certificate, so it does not start."""


class UpstreamPool:
    def __init__(self, upstreams: tuple[UpstreamSettings, ...], settings: PoolSettings,
                 *, on_error: ErrorHook | None = None, on_exhausted: ExhaustedHook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.upstreams = [Upstream(u.url, u.weight) for u in upstreams]
        self.selector = Selector(settings.balance)
        self._hosts: dict[str, HostPool] = {}
        self._checks: list[asyncio.Task[None]] = []
        self._on_error = on_error
        self._on_exhausted = on_exhausted
        # One warning per streak of connections this process could not open (thousands a
        # second at the open-files limit: one line per miss buried the log), then once a minute.
        self._exhausted = RepeatedFailure(
            log, "opening a connection to an upstream", traceback=False, level=logging.WARNING,
            then="the request answered 503 (or stale, under stale-if-error), nothing held against "
                 "the upstream (cachegate's own limit: raise its open-files limit, or fewer client "
                 "connections)")
        self._clock = clock
        self._closed = False  # ``close`` began: what fails from now on failed because of it
        # Made here, before the caller opens anything else: a ca_file that does not load is said
        # as such, not as whatever the caller was opening (UpstreamTLSUnusable).
        needs_tls = any(u.url.scheme == "https" for u in self.upstreams)
        self._context = self._ssl() if needs_tls else None

    def _ssl(self) -> ssl.SSLContext:
        """Verification on by default (the system's CAs, or ``ca_file``); SNI is the upstream's
        host name (``HostPool``), whatever Host the client sent."""
        tls = self.settings.tls
        if not tls.verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        if tls.ca_file is None:
            return client_context(None)
        data: bytes | OSError
        if tls.ca_data is not None:  # the bytes the config load checked
            data = tls.ca_data
        else:  # settings not made by a load
            try:
                with open(tls.ca_file, "rb") as f:
                    data = f.read()
            except OSError as exc:
                data = exc
        if not isinstance(data, OSError):
            with contextlib.suppress(ssl.SSLError):
                return client_context(data)
        problem = ca_file_problem(tls.ca_file, data) or f"{tls.ca_file} does not load"
        raise UpstreamTLSUnusable(f"upstream.tls.ca_file: {problem}") from None

    async def start(self) -> None:
        context = self._context
        for u in self.upstreams:
            self._hosts[u.name] = HostPool(u.url, self.settings.pool_size, context,
                                           self.settings.timeouts.connect,
                                           total_timeout=self.settings.timeouts.total)
        if self.settings.health is not None:
            loop = asyncio.get_running_loop()
            self._checks = [loop.create_task(self._check_loop(u)) for u in self.upstreams]

    async def close(self) -> None:
        self._closed = True
        for task in self._checks:
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        self._checks = []
        hosts, self._hosts = list(self._hosts.values()), {}
        await asyncio.gather(*(h.close() for h in hosts), return_exceptions=True)

    # -- bookkeeping ---------------------------------------------------------------------

    def _done(self, upstream: Upstream) -> None:
        upstream.in_flight = max(0, upstream.in_flight - 1)

    def _error(self, upstream: Upstream, kind: str) -> None:
        """An upstream error, counted (``failures``, ``cachegate_upstream_errors_total``); on its
        own not held against the upstream's health (``_passive_failure`` does that)."""
        upstream.failures += 1
        if self._on_error is not None:
            self._on_error(upstream.name, kind)

    def _body_error(self, upstream: Upstream, exc: UpstreamError) -> None:
        """A response whose body failed after its head came (``body_error_kind``): counted
        once per exchange, however many clients it cut; not held against the upstream's
        health (its head was an answer)."""
        exc.upstream = upstream.name  # (its warning is summarised by upstream: ``Engine.warn_upstream``)
        if not isinstance(exc, ProxyStopping):
            self._error(upstream, body_error_kind(exc))

    def _passive_failure(self, upstream: Upstream, kind: str, cause: str) -> None:
        """A passive failure (``passive_failure``: ``CONNECT`` or ``RESPONSE``, a 502/503/504 is
        ``RESPONSE``): counted, and ``passive.failures`` in a row take the upstream out, those
        of ``RESPONSE`` only as far as ``_may_take_out`` allows.

        One already out (``down_until`` ahead) is only counted: the requests that were in flight
        when it was taken out fail in turn, and each took it out again (one more warning, the
        cool-down restarted: 9 within a millisecond for one outage)."""
        self._error(upstream, kind)
        passive = self.settings.passive
        if passive.failures <= 0 or (len(self.upstreams) == 1 and not passive.configured):
            return
        now = self._clock()
        if now < upstream.down_until:
            return
        upstream.passive_failures += 1
        if upstream.passive_failures < passive.failures:
            return
        if cause == RESPONSE and not self._may_take_out(upstream, now):
            # Still counted (consecutive): once enough others are up again, the next one takes it out.
            log.debug("upstream %s: %d consecutive failures, but it stays up: failures after the request "
                      "was sent take out at most %d of %d upstreams", upstream.name,
                      upstream.passive_failures, len(self.upstreams) // 2, len(self.upstreams))
            return
        upstream.down_until = now + passive.cooldown
        upstream.passive_failures = 0
        log.warning("upstream %s marked down for %.0fs after %d consecutive failures",
                    upstream.name, passive.cooldown, passive.failures)

    def _may_take_out(self, upstream: Upstream, now: float) -> bool:
        """Whether failures after the request was sent may take ``upstream`` out: only while at
        least half the pool (rounded up) stays up without it, counting every upstream down for
        any reason (refused connections, active checks, these failures). Such a failure may be
        one URL's answer (an app or WAF that drops the connection, answers garbage, hangs or
        says 503 for it), which any client can ask every upstream for: without the cap, three
        such requests took every upstream out and every other URL was a 503. So at most half the
        upstreams (rounded down: one of two, none of one) are taken out by them; an upstream
        already out stays out."""
        if not upstream.available(now):
            return True
        up = sum(1 for u in self.upstreams if u is not upstream and u.available(now))
        return up >= (len(self.upstreams) + 1) // 2

    def _exhausted_failure(self, where: str, exc: Exception) -> None:
        """This process could not open a connection (``OutOfResources``): counted apart
        (``on_exhausted``), logged once per streak; nothing held against the upstream."""
        self._exhausted.failed(exhausted(exc) or exc, traceback=False)
        if self._on_exhausted is not None:
            self._on_exhausted(where)

    def _passive_success(self, upstream: Upstream) -> None:
        upstream.passive_failures = 0

    def snapshot(self) -> list[dict[str, Any]]:
        """Each upstream's state, for the admin API's ``GET /upstreams``."""
        now = self._clock()
        health = self.settings.health
        return [{
            "url": u.name,
            "state": u.state(now),
            "available": u.available(now),
            "weight": u.weight,
            "in_flight": u.in_flight,
            "requests": u.requests,
            "failures": u.failures,
            "passive": {"consecutive_failures": u.passive_failures,
                        "down_for": round(max(0.0, u.down_until - now), 3)},
            "health_check": None if health is None else {
                "path": health.path, "healthy": u.healthy,
                "consecutive_successes": u.check_successes,
                "consecutive_failures": u.check_failures,
                "last_error": u.check_error},
        } for u in self.upstreams]

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        up = GaugeMetricFamily("cachegate_upstream_up", "1 when the upstream takes traffic",
                               labels=["upstream"])
        flying = GaugeMetricFamily("cachegate_upstream_in_flight", "Requests in flight per upstream",
                                   labels=["upstream"])
        for u in self.upstreams:
            up.add_metric([u.name], 1.0 if u.available(now) else 0.0)
            flying.add_metric([u.name], u.in_flight)
        yield up
        yield flying

    # -- active health checks ------------------------------------------------------------

    async def _check_loop(self, upstream: Upstream) -> None:
        health = self.settings.health
        assert health is not None
        while True:
            self.record_check(upstream, await self.check_once(upstream))
            await asyncio.sleep(health.interval)

    async def check_once(self, upstream: Upstream) -> CheckResult:
        """One active check: ``GET health.path``; a 2xx or 3xx within ``health.timeout`` is a success;
        a failure says why (``check_error``): "failed 2 health checks" alone left an operator
        guessing between a refused port, a timeout, a status and a certificate that does not verify.

        The check has a connection of its own, outside the pool's ``pool_size`` and closed after
        it (``Connection: close``), as Varnish's probes do. A check asks whether the upstream
        answers, not whether cachegate has a pooled connection free: waiting for one, a check
        failed whenever every pooled connection was busy with slow but healthy responses for
        longer than ``health.timeout``, so a busy upstream was taken out and every client got a
        503, just when it was working hardest. The cost is one new connection per check (one
        more than ``pool_size`` at most, per worker and upstream), and a check also proves that
        new connections are accepted, which a request on a reused one would not."""
        health = self.settings.health
        assert health is not None
        host = self._hosts.get(upstream.name)
        if host is None:
            return CheckResult(False, "the pool is closed")
        conn: UpstreamConnection | None = None
        try:
            async with asyncio.timeout(health.timeout):
                head, _, _ = request_head("GET", health.path, (("Connection", "close"),),
                                          host.host_header, None)
                conn = await host.connect_apart()
                resp = await conn.request(head, None, False, None, head_method=False,
                                          read_timeout=health.timeout)
                try:
                    while await resp.read_chunk():
                        pass
                finally:
                    resp.discard()
                self._exhausted.succeeded()  # a connection opened: a streak of EMFILEs ended
                if 200 <= resp.status < 400:
                    return CheckResult(True)
                return CheckResult(False, f"answered {resp.status} to GET {health.path}")
        except TimeoutError:
            if host.resolving:  # still waiting for the name's first lookup: say so
                return CheckResult(False, str(host.addresses.timed_out(health.timeout, "health.timeout")))
            return CheckResult(False, f"no answer within {health.timeout:g}s (health.timeout)")
        except (UpstreamError, OSError, RuntimeError) as exc:
            if isinstance(exc, OutOfResources) or exhausted(exc) is not None:
                # Out of descriptors here: no verdict on the upstream (a check failing so took
                # healthy upstreams out).
                self._exhausted_failure("health_check", exc)
                return CheckResult(False, str(exc), own=True)
            return CheckResult(False, check_error(exc))
        finally:
            if conn is not None:
                conn.close()

    def record_check(self, upstream: Upstream, result: CheckResult) -> None:
        """Count a check against the thresholds; the reason goes to the log when the upstream is
        taken out, and again when it changes while the upstream is out (a fix that only moved
        the fault: a refused port now answering with a certificate that does not verify)."""
        health = self.settings.health
        assert health is not None
        if result.own:  # not the upstream's result (``CheckResult.own``)
            return
        previous, upstream.check_error = upstream.check_error, result.error
        if result.ok:
            upstream.check_failures = 0
            upstream.check_successes += 1
            if not upstream.healthy and upstream.check_successes >= health.healthy:
                upstream.healthy = True
                upstream.down_until = 0.0
                log.warning("upstream %s is healthy again", upstream.name)
        else:
            upstream.check_successes = 0
            upstream.check_failures += 1
            if upstream.healthy and upstream.check_failures >= health.unhealthy:
                upstream.healthy = False
                log.warning("upstream %s failed %d health checks: taken out (%s)", upstream.name,
                            upstream.check_failures, result.error)
            elif not upstream.healthy and result.error != previous:
                log.warning("upstream %s is still out: its health check now fails with: %s",
                            upstream.name, result.error)
            else:
                log.debug("upstream %s health check failed: %s", upstream.name, result.error)

    # -- sending ---------------------------------------------------------------------------

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None = None,
        on_interim: InterimHook | None = None,
    ) -> UpstreamResponse:
        """Send a request; retry on another upstream when the connection failed before any byte.
        Interim (1xx) responses go to ``on_interim`` as they arrive (``proxy.http_client``).

        A body as bytes (read whole before: ``client_body_buffer``) is sent anew on each try. A
        streamed one is retried only while nothing of it was read (``_Watched``): a connection
        refused or timed out before the request was written. Once a try has read from it, that
        try is the last: the part read is gone, never sent twice."""
        watched = _Watched(body) if body is not None and not isinstance(body, bytes) else None
        retryable = method in IDEMPOTENT or self.settings.retry_non_idempotent
        attempts = 1 + (self.settings.retries if retryable else 0)
        new = False  # a pooled connection closed as the request left: new connections only since
        avoid: str | None = None  # its upstream: not the next choice while another is up
        waited: PoolWaitTimeout | None = None  # a connect timeout spent waiting for a pool: not twice
        tried: set[str] = set()
        last: UpstreamError | None = None
        try:
            while attempts > 0:
                upstream = self._choose(tried, avoid, waited is not None)
                avoid = None
                if upstream is None:
                    if waited is not None:
                        raise waited
                    if last is not None:
                        raise last
                    raise NoUpstreamAvailable("no upstream is available (all are down)")
                tried.add(upstream.name)
                try:
                    return await self._send_once(upstream, method, target, headers,
                                                 body if watched is None else watched, on_interim,
                                                 new=new, wait=waited is None)
                except UpstreamDisconnected as exc:
                    last = exc
                    if watched is not None and watched.read:
                        attempts = 0  # some of a streamed body was read: it cannot be sent again
                    elif retryable and exc.reused and not new:
                        # A keep-alive connection the upstream closed as the request left (its idle
                        # timeout, not its answer): no try of that upstream nor a retry used up.
                        # The next try prefers another upstream, and every later one goes on a
                        # new connection (the upstream's other idle ones may be closed as well;
                        # with a new one, a drop is the upstream's answer: a try, never repeated).
                        new = True
                        tried.discard(upstream.name)
                        avoid = upstream.name
                        continue
                    attempts -= 1
                except PoolWaitTimeout as exc:
                    # ``pool_size`` busy for the whole connect timeout (nothing was sent): an
                    # untried upstream with a connection free at once is tried, never a second
                    # wait ((retries + 1) x connect); none, and the 504 is now.
                    waited = waited or exc
                except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
                    last = exc
                    if watched is not None and watched.read:
                        attempts = 0  # (as above: a reset after some of the body was sent)
                    else:
                        attempts -= 1
            assert last is not None
            raise last
        except UpstreamError as exc:
            if self._closed and not isinstance(exc, ProxyStopping):
                # The stop closed the pool under it (its deadline passed): not the origin's fault.
                raise ProxyStopping("the request to the origin was cut off at the stop's deadline") from exc
            raise

    def _choose(self, tried: set[str], avoid: str | None, free_only: bool) -> Upstream | None:
        """The next upstream: untried, not ``avoid`` while another is up, one whose pool is not
        full while another's is (``Selector.choose``), and only such a one after a pool wait
        (``free_only``)."""
        now = self._clock()
        full = frozenset(name for name, host in self._hosts.items() if not host.free) if (
            len(self.upstreams) > 1 or free_only) else frozenset()
        exclude = frozenset(tried) | full if free_only else frozenset(tried)
        if avoid is not None:
            # Another upstream with room; else the avoided one if it has room (its dropped
            # connection freed its slot); else as below. "Avoid" put before "full" sent the try
            # to another upstream's full pool to wait timeouts.connect there in vain.
            upstream = self.selector.choose(self.upstreams, now, exclude | {avoid} | full)
            if upstream is None and avoid not in full:
                upstream = self.selector.choose(self.upstreams, now, exclude | (full - {avoid}))
            if upstream is not None:
                return upstream
        return self.selector.choose(self.upstreams, now, exclude, full)

    async def _send_once(
        self,
        upstream: Upstream,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
        on_interim: InterimHook | None = None,
        *,
        new: bool = False,
        wait: bool = True,
    ) -> UpstreamResponse:
        host = self._hosts.get(upstream.name)
        if host is None:
            raise UpstreamConnectError(f"{upstream.name}: pool not started")
        upstream.in_flight += 1  # waiting for a pooled connection too (least_conn avoids it)
        t = self.settings.timeouts
        conn: UpstreamConnection | None = None
        fresh = False  # a new connection (else one reused from the pool)
        try:
            total_deadline = asyncio.get_running_loop().time() + t.total if t.total else None
            head, chunked, expected = request_head(method, target, headers, host.host_header, body)
            stream: AsyncIterable[bytes] | None
            if isinstance(body, bytes):
                stream = body_once(body) if len(body) > SMALL_BODY else None
            else:
                stream = body
            conn = await host.acquire(new=new, wait=wait)
            upstream.requests += 1  # held a connection: not a wait for one in vain (GET /upstreams)
            fresh = conn.exchange == 0
            if fresh:
                self._exhausted.succeeded()  # a connection opened: a streak of EMFILEs ended
            resp = await conn.request(head, stream, chunked, expected, head_method=method == "HEAD",
                                      read_timeout=t.read, total_deadline=total_deadline,
                                      on_interim=on_interim, idempotent=method in IDEMPOTENT,
                                      # (b"": a chunked body of no bytes, sent as Content-Length: 0)
                                      with_body=body is not None and body != b"")
        except UpstreamBodyError as exc:
            # A head whose body failed in the head's own read: its head was an answer (as
            # ``_body_error``: counted as ``body_broke_off``, not held against the upstream).
            exc.upstream = upstream.name
            self._done(upstream)
            self._body_error(upstream, exc)
            raise
        except OutOfResources as exc:
            # This process is out of descriptors (``OutOfResources``): neither a request nor a
            # failure of the upstream's, nor tried on another one (it would fail there too).
            self._done(upstream)
            self._exhausted_failure("upstream_connect", exc)
            raise
        except PoolWaitTimeout as exc:
            # cachegate's own limit, no connection tried: neither a request nor a failure of the
            # upstream's (``GET /upstreams``), counted apart (``kind="pool_wait"``).
            exc.upstream = upstream.name
            self._done(upstream)
            if self._on_error is not None:
                self._on_error(upstream.name, error_kind(exc))
            raise
        except UpstreamError as exc:
            exc.upstream = upstream.name
            if isinstance(exc, UpstreamDisconnected):
                exc.reused = conn is not None and not fresh
            self._done(upstream)
            cause = passive_failure(exc, conn, fresh)
            if cause is not None:
                self._passive_failure(upstream, error_kind(exc), cause)
            else:
                self._error(upstream, error_kind(exc))
            raise
        except BaseException:  # cancelled, or the client's body broke off (ClientBodyError):
            self._done(upstream)  # neither is the upstream's failure
            raise
        if resp.status == 206 and not any(k.lower() == "range" for k, _ in headers):
            # Partial content is the answer to a range request only (RFC 9110 §15.3.7): to any
            # other it is an invalid response (as Varnish fails such a fetch), never relayed
            # as the whole, nor to each client of a coalesced fetch in turn.
            resp.discard()
            self._done(upstream)
            self._passive_failure(upstream, "protocol", RESPONSE)  # an invalid response
            error = UnaskedPartial(f"{upstream.name}: 206 Partial Content to a request without Range",
                                   detail="a 206 Partial Content to a request without Range")
            error.upstream = upstream.name
            raise error
        if resp.status in UNAVAILABLE:
            self._passive_failure(upstream, f"status_{resp.status}", RESPONSE)
        else:
            if resp.status >= 500 and self._on_error is not None:
                self._on_error(upstream.name, f"status_{resp.status}")  # counted, not held against it
            self._passive_success(upstream)
        return UpstreamResponse(resp, upstream, self)


class _Watched:
    """A streamed request body that tells whether a try began reading it (``read``): until then
    (a connection refused, or that timed out, before the request was written: nothing is read
    before the head is) the next try may send it; after, never (the part read is gone)."""

    __slots__ = ("_body", "read")

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._body = body
        self.read = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        self.read = True
        return aiter(self._body)


def passive_failure(exc: UpstreamError, conn: UpstreamConnection | None, fresh: bool) -> str | None:
    """What passive health makes of an exchange's error before the response head: ``CONNECT``,
    ``RESPONSE`` or None (counted as an error, not held against the upstream).

    ``CONNECT``, before the request was written (``conn`` None): refused, unreachable, a TLS
    handshake that failed, a connect timeout, a name the resolver says has no address
    (``UpstreamNoSuchName``: NXDOMAIN, NODATA). Unambiguous: the upstream cannot be reached.

    ``RESPONSE``, after it was written, what a hung or broken upstream does: an invalid
    response (``UpstreamProtocolError``: garbage, a head that breaks off), no response head
    within the read timeout, or within the total one once the whole request was sent (a slow
    upload is the client's), and a new connection (``fresh``) closed or reset before any
    response byte. One URL can cause each of these too (an app or WAF that drops it, a slow
    endpoint), hence the cap (``UpstreamPool._may_take_out``).

    None: a pooled connection that closed as the request left (the upstream's idle timeout, not
    its state: the request is tried again), bytes after a whole response in its read
    (``UpstreamOverrun``: one handler's framing, a response written twice or with too small a
    ``Content-Length``, not the upstream's state: it answered, at once and whole; taken out,
    every URL of that upstream lost it for the cool-down for one endpoint's sake, and the other
    upstreams, running the same application, answer that URL alike), a wait for a free pooled
    connection that timed out (``PoolWaitTimeout``: ``pool_size`` busy, perhaps with slow
    answers to one URL, and no connection tried), a request cachegate refused to send (a CR or
    LF in a field), a lookup of the upstream's name that failed with no address known for the
    resolver's trouble (no answer in time, SERVFAIL, ``EAI_AGAIN``: ``DNS_ERRORS``, which every
    named upstream shares; no connection was tried). Held against none, a name that does not
    exist was never taken out without active checks: every other request went to it and failed."""
    if conn is None:
        if isinstance(exc, UpstreamNoSuchName):
            return CONNECT
        if isinstance(exc, (PoolWaitTimeout, *DNS_ERRORS)):
            return None
        return CONNECT if isinstance(exc, (UpstreamConnectError, UpstreamConnectTimeout)) else None
    if isinstance(exc, UpstreamProtocolError):
        return None if isinstance(exc, UpstreamOverrun) else RESPONSE
    if isinstance(exc, UpstreamReadTimeout):
        return RESPONSE
    if isinstance(exc, UpstreamTotalTimeout):
        return RESPONSE if conn.request_sent else None
    if isinstance(exc, UpstreamConnectError) and fresh and not conn.answering:
        return RESPONSE
    return None


__all__ = ["KEEPALIVE_IDLE", "Selector", "Upstream", "UpstreamConnectTimeout", "UpstreamDisconnected",
           "UpstreamPool", "UpstreamResponse"]
