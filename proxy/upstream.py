"""The pool of upstreams: which one to use (pure bookkeeping) and sending to it (I/O).

Selection is a pure function of the pool's state (weights, in-flight counts,
health), kept apart from the I/O, so it is unit-testable without sockets (as
httpcore keeps its pool bookkeeping). Sending uses one long-lived aiohttp
``ClientSession`` per pool: keep-alive, no cookie jar (``DummyCookieJar``), no
decompression (bytes and ``Content-Encoding`` pass through unchanged), and
connect/read timeouts instead of aiohttp's 5-minute total timeout.

Health:

- active: ``GET health.path`` every ``interval``; ``unhealthy`` consecutive
  failures take an upstream out, ``healthy`` consecutive successes bring it back;
- passive: ``passive.failures`` consecutive connection failures or 5xx answers
  take it out for ``passive.cooldown`` (by default only in pools of two or more:
  like nginx's max_fails, a single upstream is never taken out unless ``passive:``
  is configured).

A request is retried on another upstream only when the connection failed before
any response byte arrived (refused, reset, closed with nothing read, or a connect
timeout), only for idempotent methods (unless ``retry_non_idempotent``), and never
when the request body was streamed. A connection that closes with nothing read
gets one more try besides, on any upstream (the same one when it is alone): that is
a keep-alive connection closed by the upstream as the request left, and aiohttp's
own silent retry (which also resends after part of a response head) is off. A 5xx
answer, a read timeout or a connection that closes part-way through the response
head is not retried: the upstream may have acted on the request.

Timeouts (all 504 for the client, ``detail=UPSTREAM-TIMEOUT``) are told apart in
the error and in ``cachegate_upstream_errors_total{kind}``: ``connect_timeout``
(no connection within ``timeouts.connect``), ``read_timeout`` (``timeouts.read``
without a byte), ``total_timeout`` (``timeouts.total`` for the whole exchange).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from prometheus_client.core import GaugeMetricFamily, Metric
from yarl import URL

from proxy.config import PoolSettings, UpstreamSettings
from proxy.errors import (
    NoUpstreamAvailable,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

log = logging.getLogger("cachegate.upstream")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CHUNK = 64 * 1024
# Idle keep-alive connections are closed after this long: shorter than the 5 s that
# Node.js and Apache servers use by default, so cachegate closes an idle connection
# before the origin does. Otherwise a request can take a connection the origin has
# just closed and fail with "Server disconnected" (a body that was streamed cannot
# be resent).
KEEPALIVE_IDLE = 4.0


class UpstreamConnectTimeout(UpstreamTimeout):
    """The TCP (or TLS) connection was not established in time: safe to retry elsewhere."""


class UpstreamDisconnected(UpstreamConnectError):
    """The connection closed after the request was sent, before any response byte: most often
    a keep-alive connection the upstream had just closed. One more try, even on the same
    upstream, is safe for a request that may be retried at all."""


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
    requests: int = 0
    failures: int = 0

    @property
    def name(self) -> str:
        return str(self.url)

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
    """Smooth weighted round robin (nginx's algorithm) or least connections per weight."""

    balance: str = "round_robin"
    _current: dict[str, int] = field(default_factory=dict)

    def choose(self, upstreams: list[Upstream], now: float, exclude: frozenset[str] = frozenset()
               ) -> Upstream | None:
        candidates = [u for u in upstreams if u.available(now) and u.name not in exclude]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if self.balance == "least_conn":
            return min(candidates, key=lambda u: (u.in_flight / u.weight, -u.weight))
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

    def __init__(self, resp: aiohttp.ClientResponse, upstream: Upstream, pool: UpstreamPool) -> None:
        self._resp = resp
        self.upstream = upstream
        self._pool = pool
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers: CIMultiDictProxy[str] = resp.headers
        self._released = False

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except aiohttp.SocketTimeoutError as exc:
            raise UpstreamTimeout(f"{self.upstream.name}: read timed out mid-body") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{self.upstream.name}: total timeout exceeded mid-body") from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamProtocolError(f"{self.upstream.name}: body broke off: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(f"{self.upstream.name}: {exc}") from exc
        finally:
            self.release()

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_chunks()])

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._done(self.upstream)
            self._resp.release()

    def close(self) -> None:
        """Drop the connection (the body was not read to the end)."""
        if not self._released:
            self._released = True
            self._pool._done(self.upstream)
            self._resp.close()


ErrorHook = Callable[[str, str], None]  # (upstream name, error kind)


class UpstreamPool:
    def __init__(self, upstreams: tuple[UpstreamSettings, ...], settings: PoolSettings,
                 *, on_error: ErrorHook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.upstreams = [Upstream(u.url, u.weight) for u in upstreams]
        self.selector = Selector(settings.balance)
        self._session: aiohttp.ClientSession | None = None
        self._checks: list[asyncio.Task[None]] = []
        self._on_error = on_error
        self._clock = clock

    def _ssl(self) -> ssl.SSLContext | bool:
        tls = self.settings.tls
        if not tls.verify:
            return False
        return ssl.create_default_context(cafile=tls.ca_file)

    async def start(self) -> None:
        t = self.settings.timeouts
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self.settings.pool_size, ttl_dns_cache=60, ssl=self._ssl(),
            keepalive_timeout=KEEPALIVE_IDLE,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=t.read),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            read_bufsize=CHUNK,
            max_line_size=16 * 1024,
            max_field_size=16 * 1024,
        )
        # aiohttp resends an idempotent request once when the connection closes, even after part
        # of the response head arrived; retries are decided here instead (see send).
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False
        if self.settings.health is not None:
            loop = asyncio.get_running_loop()
            self._checks = [loop.create_task(self._check_loop(u)) for u in self.upstreams]

    async def close(self) -> None:
        for task in self._checks:
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        self._checks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- bookkeeping ---------------------------------------------------------------------

    def _done(self, upstream: Upstream) -> None:
        upstream.in_flight = max(0, upstream.in_flight - 1)

    def _passive_failure(self, upstream: Upstream, kind: str) -> None:
        upstream.failures += 1
        if self._on_error is not None:
            self._on_error(upstream.name, kind)
        passive = self.settings.passive
        if passive.failures <= 0 or (len(self.upstreams) == 1 and not passive.configured):
            return
        upstream.passive_failures += 1
        if upstream.passive_failures >= passive.failures:
            upstream.down_until = self._clock() + passive.cooldown
            upstream.passive_failures = 0
            log.warning("upstream %s marked down for %.0fs after %d consecutive failures",
                        upstream.name, passive.cooldown, passive.failures)

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
                "consecutive_failures": u.check_failures},
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
            ok = await self.check_once(upstream)
            self.record_check(upstream, ok)
            await asyncio.sleep(health.interval)

    async def check_once(self, upstream: Upstream) -> bool:
        health = self.settings.health
        assert health is not None and self._session is not None
        url = URL(str(upstream.url) + health.path, encoded=True)
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=health.timeout),
                                         allow_redirects=False) as resp:
                await resp.read()
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def record_check(self, upstream: Upstream, ok: bool) -> None:
        health = self.settings.health
        assert health is not None
        if ok:
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
                log.warning("upstream %s failed %d health checks: taken out", upstream.name,
                            upstream.check_failures)

    # -- sending ---------------------------------------------------------------------------

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None = None,
    ) -> UpstreamResponse:
        """Send a request; retry on another upstream when the connection failed before any byte."""
        streamed = body is not None and not isinstance(body, bytes)
        retryable = not streamed and (method in IDEMPOTENT or self.settings.retry_non_idempotent)
        attempts = 1 + (self.settings.retries if retryable else 0)
        reconnect = retryable  # one try more after a connection closed with nothing read
        tried: set[str] = set()
        last: UpstreamError | None = None
        while attempts > 0:
            upstream = self.selector.choose(self.upstreams, self._clock(), frozenset(tried))
            if upstream is None:
                if last is not None:
                    raise last
                raise NoUpstreamAvailable("no upstream is available (all are down)")
            tried.add(upstream.name)
            try:
                return await self._send_once(upstream, method, target, headers, body)
            except UpstreamDisconnected as exc:
                last = exc
                if reconnect:
                    reconnect = False
                    tried.discard(upstream.name)
                    continue
                attempts -= 1
            except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
                last = exc
                attempts -= 1
        assert last is not None
        raise last

    async def _send_once(
        self,
        upstream: Upstream,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
    ) -> UpstreamResponse:
        assert self._session is not None, "pool not started"
        upstream.in_flight += 1
        upstream.requests += 1
        url = URL(str(upstream.url) + target, encoded=True)
        error: UpstreamError
        try:
            resp = await self._session.request(method, url, headers=headers, data=body,
                                               allow_redirects=False, compress=None, chunked=None)
        except aiohttp.ConnectionTimeoutError as exc:
            error, kind = UpstreamConnectTimeout(f"{upstream.name}: connect timed out"), "connect_timeout"
            cause: BaseException = exc
        except aiohttp.SocketTimeoutError as exc:
            error, kind, cause = (UpstreamTimeout(f"{upstream.name}: read timed out (no byte for "
                                                  f"{self.settings.timeouts.read:g}s)"), "read_timeout", exc)
        except TimeoutError as exc:
            error, kind, cause = (UpstreamTimeout(f"{upstream.name}: total timeout "
                                                  f"({self.settings.timeouts.total or 0:g}s) exceeded"),
                                  "total_timeout", exc)
        except aiohttp.ServerDisconnectedError as exc:
            if exc.message is not None and not isinstance(exc.message, str):
                # It closed part-way through a response head: it got the request, and may
                # have acted on it. Never retried.
                error, kind, cause = (UpstreamProtocolError(f"{upstream.name}: closed the connection "
                                                            "in the middle of the response head"),
                                      "protocol", exc)
            else:
                error, kind, cause = UpstreamDisconnected(f"{upstream.name}: {exc}"), "connect", exc
        except (aiohttp.ClientConnectorError, aiohttp.ClientOSError) as exc:
            error, kind, cause = UpstreamConnectError(f"{upstream.name}: {exc}"), "connect", exc
        except aiohttp.ClientResponseError as exc:
            error, kind, cause = UpstreamProtocolError(f"{upstream.name}: {exc.message}"), "protocol", exc
        except aiohttp.ClientError as exc:
            error, kind, cause = UpstreamConnectError(f"{upstream.name}: {exc}"), "connect", exc
        except BaseException:
            self._done(upstream)
            raise
        else:
            if resp.status >= 500:
                self._passive_failure(upstream, f"status_{resp.status}")
            else:
                self._passive_success(upstream)
            return UpstreamResponse(resp, upstream, self)
        self._done(upstream)
        self._passive_failure(upstream, kind)
        raise error from cause
