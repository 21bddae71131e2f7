"""What the engine takes and gives: a ``ClientRequest`` in, a ``Reply`` out.

The web layer builds the one and writes out the other; the engine (``proxy.engine``) and its
miss path (``proxy.flight``) speak only these, never aiohttp's server side.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO

from multidict import CIMultiDictProxy

from proxy.errors import UpstreamError
from proxy.http_client import InterimHook, UpstreamBodyError
from proxy.policy.headers import end_to_end
from proxy.policy.messages import HeaderList, RequestHead
from proxy.rules import RequestPlan, RuleSet

# Sends an interim (1xx) response to the client, before the final one: (status, reason, fields).
InterimSink = Callable[[int, str, HeaderList], None]


@dataclass(frozen=True, slots=True)
class Planned:
    """A request's rule plan and cache key, as ``Engine.planned`` made them under ``rules``: the
    fast path's, for a request it left to the general path, which takes them rather than
    matching the rules again while its rules are still those."""

    rules: RuleSet
    plan: RequestPlan
    key: str


@dataclass(slots=True)
class ClientRequest:
    head: RequestHead  # normalised (proxy.policy.request): all that may reach the origin
    remote: str  # the peer's IP address (X-Forwarded-For)
    # None when the request has no body; bytes when it was read whole before going upstream
    # (``client_body_buffer``: it can be sent again, on a retry), else a stream.
    body: AsyncIterable[bytes] | bytes | None = None
    # Where the origin's interim responses go (RFC 9110 §15.2); None: nowhere (an HTTP/1.0
    # client, or a caller without a client connection).
    interim: InterimSink | None = None
    request_id: str = ""  # X-Request-Id (proxy.logs): sent upstream in place of the client's
    planned: Planned | None = None  # the fast path's plan and key of this request, if it made them


# A streamed body (an async iterator) may yield b"", a beat: it is reading bytes it does not
# send (a range's skip to its offset), and its writer checks the client is still there, and
# closes the body if not (``proxy_handler.write_reply``).
Body = bytes | IO[bytes] | AsyncIterator[bytes] | None


@dataclass(slots=True)
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: Body = None
    length: int | None = None  # Content-Length, when known
    x_cache: str = "MISS"
    tier: str = "upstream"  # where the body comes from: memory, disk, upstream, none
    offset: int = 0  # for a file body: where to start
    head_only: bool = False
    # A streamed fill's: what the access log says once the body has gone out, from the member
    # its head said (``proxy.policy.cache_status.settled``: stored or not, and why).
    settle: Callable[[str | None], str | None] | None = None


def error_reply(status: int, reason: str, text: str, x_cache: str, cs: str) -> Reply:
    """A short plain-text reply of cachegate's own (an origin error, only-if-cached, ...)."""
    body = (text + "\n").encode()
    return Reply(status, reason, [("Content-Type", "text/plain; charset=utf-8"),
                                  ("Cache-Status", cs), ("X-Cache-Status", x_cache)],
                 body, len(body), x_cache, "none")


def upstream_detail(exc: UpstreamError) -> str:
    """The Cache-Status ``detail`` of the error reply for an upstream failure (docs/admin-api.md):
    UPSTREAM-UNREACHABLE (refused, reset before any response byte), UPSTREAM-TIMEOUT,
    NO-UPSTREAM, UPSTREAM-INVALID (a response that is not valid HTTP/1.1: its head, its framing,
    too many 1xx), or UPSTREAM-BROKE-OFF (the response's body broke off: an invalid response's
    body too, told apart from an invalid head)."""
    if isinstance(exc, UpstreamBodyError):
        return "UPSTREAM-BROKE-OFF"
    return exc.cache_detail


def relay(sink: InterimSink | None) -> InterimHook | None:
    """The upstream client's hook for one client's interim responses: their end-to-end fields
    only (RFC 9110 §15.2: a proxy forwards 1xx responses, hop-by-hop fields aside)."""
    if sink is None:
        return None

    def forward(status: int, reason: str, fields: CIMultiDictProxy[str]) -> None:
        sink(status, reason, end_to_end(fields))

    return forward


def close_body(body: Body) -> None:
    if body is not None and not isinstance(body, bytes) and hasattr(body, "close"):
        body.close()
