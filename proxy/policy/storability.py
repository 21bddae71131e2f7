"""May this response be stored? (RFC 9111 §3, for a shared cache)

``decide_store`` returns ``Store`` with the complete ``StoredResponse`` to keep,
or ``DontStore`` with the ``Cache-Status`` detail token naming why not. Safety
first: a shared cache never stores ``private``, ``no-store``, responses to
requests with ``Authorization`` (unless ``public``, ``s-maxage`` or
``must-revalidate`` allow it), nor ``Set-Cookie`` responses unless a rule says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.cache_control import CacheControl, parse_cache_control, targeted_cache_control
from proxy.policy.freshness import HEURISTICALLY_CACHEABLE, compute_freshness
from proxy.policy.headers import end_to_end
from proxy.policy.keys import variant_of, vary_names
from proxy.policy.messages import CacheOptions, Headers, RequestHead, StoredResponse


@dataclass(frozen=True, slots=True)
class Store:
    response: StoredResponse


@dataclass(frozen=True, slots=True)
class DontStore:
    detail: str  # the Cache-Status detail token: PRIVATE, NO-STORE, SET-COOKIE, ...


def response_cache_control(headers: Headers, options: CacheOptions) -> tuple[CacheControl, str]:
    """The directives this cache obeys: a targeted field (RFC 9213) if present, else Cache-Control."""
    targeted = targeted_cache_control(options.targeted_fields, lambda n: headers.getall(n, ()))
    if targeted is not None:
        return targeted
    return parse_cache_control(headers.getall("Cache-Control", ())), "cache-control"


def request_cache_control(headers: Headers) -> CacheControl:
    return parse_cache_control(headers.getall("Cache-Control", ()))


def decide_store(
    request: RequestHead,
    status: int,
    reason: str,
    headers: Headers,
    request_time: float,
    response_time: float,
    options: CacheOptions,
) -> Store | DontStore:
    if request.method != "GET":
        return DontStore("METHOD")
    if status < 200 or status in (206, 304):
        return DontStore("UNCACHEABLE-STATUS")
    if "no-store" in request_cache_control(request.headers):
        return DontStore("REQUEST-NO-STORE")

    cc, _source = response_cache_control(headers, options)
    if "no-store" in cc:
        return DontStore("NO-STORE")
    if "private" in cc:
        return DontStore("PRIVATE")
    if "authorization" in request.headers and not (
        "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    ):
        return DontStore("AUTHORIZATION")
    if "set-cookie" in headers and not options.allow_set_cookie:
        return DontStore("SET-COOKIE")
    names = vary_names(headers)
    if names is None:
        return DontStore("VARY-STAR")
    length = headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > options.max_object:
        return DontStore("TOO-LARGE")

    has_explicit = (
        "max-age" in cc or "s-maxage" in cc or "public" in cc or "expires" in headers
    )
    if not (
        has_explicit
        or status in HEURISTICALLY_CACHEABLE
        or options.rule_ttl(status) is not None
    ):
        return DontStore("UNCACHEABLE-STATUS")

    freshness = compute_freshness(status, headers, cc, request_time, response_time, options)
    etag = headers.get("ETag")
    last_modified = headers.get("Last-Modified")
    reusable = (
        freshness.lifetime > 0
        or etag is not None
        or last_modified is not None
        or freshness.stale_if_error > 0
        or freshness.stale_while_revalidate > 0
    )
    if not reusable:
        return DontStore("NO-FRESHNESS")
    return Store(
        StoredResponse(
            status=status,
            reason=reason,
            headers=end_to_end(headers),
            request_time=request_time,
            response_time=response_time,
            freshness=freshness,
            vary=variant_of(names, request.headers),
            etag=etag,
            last_modified=last_modified,
        )
    )
