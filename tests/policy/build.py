"""Literal builders for policy tests: headers, requests and stored responses with ``now`` as a number."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.httpdate import format_http_date
from proxy.policy.messages import DEFAULT_OPTIONS, CacheOptions, Headers, RequestHead, StoredResponse
from proxy.policy.storability import DontStore, Store, decide_store

T0 = 1_700_000_000.0  # "now" when a response arrives, in every table below
Pairs = list[tuple[str, str]] | tuple[tuple[str, str], ...]


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def date(offset: float) -> str:
    """An HTTP-date ``offset`` seconds after T0."""
    return format_http_date(T0 + offset)


def request(*pairs: tuple[str, str], method: str = "GET", target: str = "/r") -> RequestHead:
    return RequestHead(method, "http", "example.com", target, headers(*pairs))


def store(
    response: Pairs,
    *,
    status: int = 200,
    req: RequestHead | None = None,
    options: CacheOptions = DEFAULT_OPTIONS,
    request_time: float = T0,
    response_time: float = T0,
) -> Store | DontStore:
    return decide_store(req or request(), status, "OK", headers(*response), request_time,
                        response_time, options)


def stored(response: Pairs, **kwargs: object) -> StoredResponse:
    """The StoredResponse decide_store makes, failing the test when it refuses."""
    decision = store(response, **kwargs)  # type: ignore[arg-type]
    assert isinstance(decision, Store), decision
    return decision.response


def as_headers(pairs: Pairs) -> Headers:
    return headers(*pairs)
