"""May this response be stored? (RFC 9111 §3, for a shared cache)

``decide_store`` returns ``Store`` with the complete ``StoredResponse`` to keep,
or ``DontStore`` with the ``Cache-Status`` detail token naming why not. Safety
first: a shared cache never stores ``private``, ``no-store``, responses to
requests with ``Authorization`` (unless ``public``, ``s-maxage`` or
``must-revalidate`` allow it; with ``must-revalidate`` alone, with the origin's freshness
only: ``freshness.origin_freshness_only``), nor ``Set-Cookie`` responses unless a rule says so.

A response to a request with a ``Cookie`` that would be reused only after asking the origin
(no lifetime above 0: no ``Cache-Control`` at all, ``max-age=0``, ``Expires: -1``; or
``no-cache``) is not stored unless it says ``public`` (``COOKIE-NO-FRESHNESS``), whatever
validators or ``stale-if-error=`` / ``stale-while-revalidate=`` it carries. It is often that
user's page, personalised by the cookie, with a validator that names the article, not the
page (a constant ``Last-Modified``): stored, the next client's request (another cookie, or
none) was revalidated with the first one's ``If-None-Match`` / ``If-Modified-Since``, and an
origin comparing only the validator answered 304, so the first user's page went to everyone
(and, with a stale window, to everyone while the origin failed). nginx and Varnish keep no
response with a lifetime of 0 at all. A lifetime the origin gives (``max-age``, ``s-maxage``,
``Expires``) lets every shared cache reuse the page without asking, and a rule's ``ttl`` is the
operator's choice: both are stored as before (no heuristic is given to such a request:
``freshness``). ``Authorization`` keeps RFC 9111 §3.5's permission: ``s-maxage`` or
``must-revalidate`` store it (to be revalidated) as ``public`` does, the origin's explicit word
to a shared cache (with a ``Cookie`` too, the ``Cookie`` decides). ``Vary: Cookie`` changes
nothing: it would keep one entry per visitor, each asked about at every use. Not hit-for-pass
(``fill.hit_for_pass``): it is the request's cookie, and the next anonymous request fills the
key as usual.

A response whose ``Vary`` names a field the request also carried under another spelling
(``X_Tenant`` beside or instead of ``X-Tenant``: ``policy.spellings``) is not stored either
(``AMBIGUOUS-HEADER:<name>``): a CGI, WSGI or Rack origin reads both spellings as one field,
the later line winning, so it may have chosen the response for the other spelling's value
while the variant would record the named field's, for every client sending that. Not
hit-for-pass (``fill.hit_for_pass``): it is the request's doing, and the next clean request
fills the key as usual.

``must-understand`` (§5.2.2.3): a response with a status code whose caching rules
this cache does not know is never stored. The RFC adds that a cache which knows the
status code SHOULD ignore a ``no-store`` beside it; cachegate keeps obeying
``no-store`` (never storing what no-store forbids is a promise of its defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.cache_control import (
    CacheControl,
    parse_cache_control,
    parse_surrogate_control,
    targeted_cache_control,
)
from proxy.policy.fields import body_length, content_length
from proxy.policy.freshness import (
    carries_credentials,
    compute_freshness,
    may_be_served_stale,
    origin_freshness_only,
)
from proxy.policy.headers import dated, end_to_end
from proxy.policy.keys import variant_of, vary_names, vary_refusal
from proxy.policy.messages import CacheOptions, Freshness, Headers, RequestHead, StoredResponse
from proxy.policy.partial import parse_content_range
from proxy.policy.spellings import spelled_otherwise
from proxy.policy.statuses import HEURISTICALLY_CACHEABLE

# Final status codes whose caching semantics RFC 9110 §15 defines: what "understands
# the status code" means for must-understand (RFC 9111 §5.2.2.3).
UNDERSTOOD_STATUSES = frozenset({
    200, 201, 202, 203, 204, 205, 206,
    300, 301, 302, 303, 304, 305, 307, 308,
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417,
    421, 422, 426,
    500, 501, 502, 503, 504, 505,
})  # fmt: skip


# Request fields cachegate itself sets on the way to the origin, per client or per request
# (``proxy.policy.request.upstream_request``: the peer's address, the request's id). A response
# that varies on one was chosen for what the origin saw, which is not what the client sent:
# stored, it would be served to every other client (their own values are not in the variant).
PER_CLIENT_FIELDS = frozenset({"x-forwarded-for", "x-request-id"})


@dataclass(frozen=True, slots=True)
class Store:
    response: StoredResponse


@dataclass(frozen=True, slots=True)
class DontStore:
    detail: str  # the Cache-Status detail token: PRIVATE, NO-STORE, SET-COOKIE, ...
    # NO-FRESHNESS and COOKIE-NO-FRESHNESS only: what gave the lifetime of 0 that expired it at
    # once (``max-age``, ``s-maxage``, ``expires``, ``rule``), ``no-cache`` (COOKIE-NO-FRESHNESS:
    # a lifetime, but every use revalidated), "" when nothing gave one. One detail token for
    # each (Cache-Status stays stable); explain tells them apart, as their fixes differ.
    expired_by: str = ""


def response_cache_control(headers: Headers, options: CacheOptions) -> tuple[CacheControl, str]:
    """The directives this cache obeys, and the field they came from.

    The first targeted field present and valid (RFC 9213: Cachegate-Cache-Control,
    then CDN-Cache-Control), else Surrogate-Control directives for this device,
    else Cache-Control. With a targeted field, Cache-Control and Expires are ignored.
    """
    targeted = targeted_cache_control(options.targeted_fields, lambda n: headers.getall(n, ()))
    if targeted is not None:
        return targeted
    if options.surrogate_device is not None:
        values = headers.getall("Surrogate-Control", ())
        surrogate = parse_surrogate_control(values, options.surrogate_device) if values else None
        if surrogate is not None:
            return surrogate, "surrogate-control"
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
    """May a shared cache store this response (RFC 9111 §3), and as what?"""
    if request.method != "GET":
        return DontStore("METHOD")
    if status < 200 or status in (206, 304):
        return DontStore("UNCACHEABLE-STATUS")
    return _decide(request, status, status, reason, headers, request_time, response_time, options)


def decide_store_part(
    request: RequestHead,
    reason: str,
    headers: Headers,
    request_time: float,
    response_time: float,
    options: CacheOptions,
) -> Store | DontStore:
    """May this 206 be stored as a part of its representation (RFC 9111 §3.3), and as what?

    Only a single range with a known total length (a ``multipart/byteranges`` answer or a
    ``Content-Range`` of ``*`` cannot be placed); everything else is decided as for the
    complete (200) response it is a part of: its freshness, privacy and rules.
    """
    content_type = headers.get("Content-Type", "")
    if content_type.lower().startswith("multipart/byteranges"):
        return DontStore("MULTIPART")
    values = headers.getall("Content-Range", ())
    if len(values) != 1 or parse_content_range(values[0]) is None:
        return DontStore("NO-CONTENT-RANGE")
    return _decide(request, 206, 200, reason, headers, request_time, response_time, options)


def _decide(
    request: RequestHead,
    status: int,
    semantics: int,  # the status whose caching rules apply: 200 for a part of a 200
    reason: str,
    headers: Headers,
    request_time: float,
    response_time: float,
    options: CacheOptions,
) -> Store | DontStore:
    if request.method != "GET":
        return DontStore("METHOD")
    if "no-store" in request_cache_control(request.headers):
        return DontStore("REQUEST-NO-STORE")

    cc, source = response_cache_control(headers, options)
    # Its directives' mapping, asked directly: ``name in cc`` is a Python-level call each time
    # (CacheControl.__contains__), ten of them on every fill.
    directives = cc.directives
    must_understand = "must-understand" in directives
    if must_understand and semantics not in UNDERSTOOD_STATUSES:
        return DontStore("MUST-UNDERSTAND")  # §5.2.2.3: an unknown status code is never stored
    if "no-store" in directives:
        return DontStore("NO-STORE")  # even beside must-understand (see the module docstring)
    if "private" in directives:
        return DontStore("PRIVATE")  # qualified private="f" too: stricter than §5.2.2.7 requires
    authorization = "authorization" in request.headers
    if authorization and not ("public" in directives or "s-maxage" in directives
                              or "must-revalidate" in directives):
        return DontStore("AUTHORIZATION")
    # Kept only by must-revalidate: the origin's freshness alone, no rule ttl (§3.5; freshness)
    options = origin_freshness_only(options, cc, authorization=authorization)
    if "set-cookie" in headers and not options.allow_set_cookie:
        return DontStore("SET-COOKIE")
    names = vary_names(headers)
    if names is None:
        return DontStore(vary_refusal(headers))  # VARY-STAR, VARY-INVALID
    if not PER_CLIENT_FIELDS.isdisjoint(names):
        return DontStore("VARY-PER-CLIENT")
    spelled = spelled_otherwise(names, request.headers) if names else None
    if spelled is not None:
        return DontStore(f"AMBIGUOUS-HEADER:{spelled}")  # see the module docstring
    length = body_length(status, content_length(headers.getall("Content-Length", ())))  # none for a 204
    if too_large(length, options.max_object):
        return DontStore("TOO-LARGE")

    has_explicit = (
        "max-age" in directives or "s-maxage" in directives or "public" in directives
        or (source == "cache-control" and "expires" in headers)
    )
    if not (
        has_explicit
        or semantics in HEURISTICALLY_CACHEABLE
        or options.rule_ttl(semantics) is not None
    ):
        return DontStore("UNCACHEABLE-STATUS")

    credentials = carries_credentials(request.headers)
    freshness = compute_freshness(semantics, headers, cc, request_time, response_time, options,
                                  cc_source=source, credentials=credentials)
    etag = headers.get("ETag")
    last_modified = headers.get("Last-Modified")
    reusable = (
        freshness.lifetime > 0
        or etag is not None
        or last_modified is not None
        # (stale windows only for a response that may be served stale: not a 5xx)
        or (may_be_served_stale(status, freshness)
            and (freshness.stale_if_error > 0 or freshness.stale_while_revalidate > 0))
    )
    if not reusable:
        return DontStore("NO-FRESHNESS", _unfresh_by(freshness))
    if "cookie" in request.headers and "public" not in directives and revalidate_only(freshness):
        # (After NO-FRESHNESS: one with nothing to revalidate by is never stored, cookie or not.)
        return DontStore("COOKIE-NO-FRESHNESS",  # see the module docstring
                         "no-cache" if freshness.no_cache else _unfresh_by(freshness))
    return Store(
        StoredResponse(
            status=status,
            reason=reason,
            headers=dated(end_to_end(headers), response_time),  # a Date, the origin's or ours
            request_time=request_time,
            response_time=response_time,
            freshness=freshness,
            vary=variant_of(names, request.headers),
            etag=etag,
            last_modified=last_modified,
            credentials=credentials,
            authorization=authorization,
        )
    )


def revalidate_only(freshness: Freshness) -> bool:
    """Would a stored response with this freshness be reused only after asking the origin (no
    lifetime above 0, or ``no-cache``)? For a request with a Cookie it is then not stored
    (``COOKIE-NO-FRESHNESS``: see the module docstring).

    >>> zero, minute = Freshness(0.0, "max-age", 0.0, 0.0), Freshness(60.0, "max-age", 0.0, 0.0)
    >>> no_cache = Freshness(60.0, "max-age", 0.0, 0.0, no_cache=True)
    >>> revalidate_only(zero), revalidate_only(minute), revalidate_only(no_cache)
    (True, False, True)
    """
    return freshness.lifetime <= 0 or freshness.no_cache


def _unfresh_by(freshness: Freshness) -> str:
    """What left a response without a lifetime above 0 (``DontStore.expired_by``): ``no-cache``,
    the source of a lifetime of 0 (``max-age``, ``s-maxage``, ``expires``, ``rule``), or ""
    when nothing gave one."""
    if freshness.lifetime > 0:
        return "no-cache" if freshness.no_cache else ""
    return "" if freshness.source == "none" else freshness.source


def too_large(length: int | None, room: int) -> bool:
    """Is a response of Content-Length ``length`` refused up front (detail ``TOO-LARGE``)?

    ``room`` is the biggest body the store keeps: the rules' ``max_object`` here, and for an
    entry the engine is about to store, what its store has room for (``Writer.room``: without a
    disk tier, one record of the shared memory beside the entry's key and metadata). Refused
    before the body streams, not said ``stored`` and dropped at the put. A response without a
    Content-Length is measured as it streams instead (``flight``).

    >>> too_large(None, 10), too_large(10, 10), too_large(11, 10)
    (False, False, True)
    """
    return length is not None and length > room
