"""The pool of upstreams: which one to use (pure bookkeeping) and sending to it (I/O).

Selection is a pure function of the pool's state (weights, in-flight counts,
health), kept apart from the I/O, so it is unit-testable without sockets (as
httpcore keeps its pool bookkeeping). Sending uses one long-lived aiohttp
``ClientSession`` per pool: keep-alive, no cookie jar (``DummyCookieJar``), no
decompression (bytes and ``Content-Encoding`` pass through unchanged), and
connect/read timeouts instead of aiohttp's 5-minute total timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.config import PoolSettings, UpstreamSettings
from proxy.errors import (
    NoUpstreamAvailable,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CHUNK = 64 * 1024


@dataclass
class Upstream:
    url: URL
    weight: int = 1
    in_flight: int = 0
    healthy: bool = True
    down_until: float = 0.0  # passive health: cool-down after consecutive failures
    consecutive_failures: int = 0
    requests: int = 0
    failures: int = 0

    @property
    def name(self) -> str:
        return str(self.url)

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.down_until


@dataclass
class Selector:
    """Smooth weighted round robin (nginx's algorithm) or least connections."""

    balance: str = "round_robin"
    _current: dict[str, int] = field(default_factory=dict)

    def choose(self, upstreams: list[Upstream], now: float, exclude: frozenset[str] = frozenset()
               ) -> Upstream | None:
        candidates = [u for u in upstreams if u.available(now) and u.name not in exclude]
        if not candidates:
            return None
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
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{self.upstream.name}: read timed out mid-body") from exc
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


class UpstreamPool:
    def __init__(self, upstreams: tuple[UpstreamSettings, ...], settings: PoolSettings) -> None:
        self.settings = settings
        self.upstreams = [Upstream(u.url, u.weight) for u in upstreams]
        self.selector = Selector(settings.balance)
        self._session: aiohttp.ClientSession | None = None
        self._rr = itertools.count()

    async def start(self) -> None:
        t = self.settings.timeouts
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self.settings.pool_size, ttl_dns_cache=60,
            enable_cleanup_closed=False,
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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _done(self, upstream: Upstream) -> None:
        upstream.in_flight = max(0, upstream.in_flight - 1)

    def _failed(self, upstream: Upstream) -> None:
        upstream.failures += 1
        upstream.consecutive_failures += 1
        if upstream.consecutive_failures >= 3:
            upstream.down_until = time.monotonic() + 10.0
            upstream.consecutive_failures = 0

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None = None,
        *,
        retry: bool | None = None,
    ) -> UpstreamResponse:
        """Send a request; retry idempotent ones on another upstream when the connection failed."""
        assert self._session is not None, "pool not started"
        can_retry = (method in IDEMPOTENT and not isinstance(body, AsyncIterable)) if retry is None else retry
        attempts = 1 + (self.settings.retries if can_retry else 0)
        tried: set[str] = set()
        last: UpstreamError | None = None
        for _ in range(attempts):
            upstream = self.selector.choose(self.upstreams, time.monotonic(), frozenset(tried))
            if upstream is None:
                if last is not None:
                    raise last
                raise NoUpstreamAvailable("no upstream is available")
            tried.add(upstream.name)
            try:
                return await self._send_once(upstream, method, target, headers, body)
            except UpstreamConnectError as exc:
                last = exc
                continue
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
        assert self._session is not None
        upstream.in_flight += 1
        upstream.requests += 1
        url = URL(str(upstream.url) + target, encoded=True)
        try:
            resp = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False,
                compress=None, chunked=None,
            )
        except TimeoutError as exc:
            self._done(upstream)
            self._failed(upstream)
            raise UpstreamTimeout(f"{upstream.name}: timed out") from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError) as exc:
            self._done(upstream)
            self._failed(upstream)
            raise UpstreamConnectError(f"{upstream.name}: {exc}") from exc
        except aiohttp.ClientResponseError as exc:
            self._done(upstream)
            self._failed(upstream)
            raise UpstreamProtocolError(f"{upstream.name}: {exc.message}") from exc
        except aiohttp.ClientError as exc:
            self._done(upstream)
            self._failed(upstream)
            raise UpstreamConnectError(f"{upstream.name}: {exc}") from exc
        except asyncio.CancelledError:
            self._done(upstream)
            raise
        upstream.consecutive_failures = 0
        return UpstreamResponse(resp, upstream, self)
