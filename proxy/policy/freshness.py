"""Freshness lifetime, heuristic freshness and current age (RFC 9111 §4.2).

Computed once when a response is stored or freshened, never on the hit path.

Lifetime precedence for a shared cache (§4.2.1): ``s-maxage``, then ``max-age``,
then ``Expires`` minus ``Date``; an invalid ``Expires`` means already expired.
With none of them, a rule TTL (the operator's explicit choice) applies, else a
heuristic of 10% of the time since ``Last-Modified`` for heuristically cacheable
statuses (§4.2.2), else zero. ``override_origin`` makes the rule TTL win.

No heuristic for a response to a request with credentials (``Cookie`` or
``Authorization``) unless the response says ``public``: the origin said nothing about
sharing a response that may be personal, and a heuristic would hand it to everyone
for up to a day. Without a lifetime it is not stored for a request with a ``Cookie``
(``storability``: ``COOKIE-NO-FRESHNESS``), and stored for one with ``Authorization`` that
``s-maxage`` or ``must-revalidate`` lets a shared cache keep (RFC 9111 §3.5) only to be
revalidated with the origin before every reuse (a rule's ``ttl`` still applies: the
operator's choice).

A response to a request with ``Authorization`` that a shared cache may keep only because
it says ``must-revalidate`` (no ``public``, no ``s-maxage``: RFC 9111 §3.5) gets the
origin's freshness and nothing else (``origin_freshness_only``): §3.5 allows storing it
only in a cache that obeys ``must-revalidate``, and a rule's ``ttl`` (or
``override_origin``, which would drop ``must-revalidate``) would hand one user's response
to everyone without asking the origin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from types import MappingProxyType

from proxy.policy.cache_control import CacheControl
from proxy.policy.fields import DELTA_SECONDS_MAX, delta_seconds, first_member
from proxy.policy.httpdate import parse_http_date
from proxy.policy.messages import CacheOptions, Freshness, Headers, StoredResponse
from proxy.policy.statuses import HEURISTICALLY_CACHEABLE


def parse_age(headers: Headers) -> float:
    """The ``Age`` field value in seconds, as RFC 9111 §5.1 reads it: 0 when absent or invalid.

    A list (``0, 7200``) or several field lines count by their first member; a value
    that is not a non-negative integer (``abc``, ``-7200``, ``7200.0``, ``7200;x=1``) is
    ignored, as if absent; 2**31 and more read as 2**31 (stale for any lifetime).
    """
    return _age_value(headers.getall("Age", ()))


def _age_value(values: Sequence[str]) -> float:
    first = first_member(values)
    value = delta_seconds(first) if first is not None else None
    return 0.0 if value is None else float(value)


def corrected_initial_age(
    headers: Headers, request_time: float, response_time: float, *, apparent_age: bool = True
) -> float:
    """RFC 9111 §4.2.3 ``corrected_initial_age``: the age when the response arrived.

    ``apparent_age = max(0, response_time - date_value)`` (a Date in the future
    gives 0), ``corrected_age_value = age_value + (response_time - request_time)``,
    and the larger of the two wins. With ``apparent_age`` False (``cache.apparent_age``)
    the Date is not used: ``corrected_age_value`` alone, the alternative §4.2.3 allows
    ("corrected_initial_age = corrected_age_value" where every cache on the way is
    HTTP/1.1 or later), as Varnish and nginx count age: an origin whose clock is behind
    does not make every response arrive stale.
    """
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = parse_age(headers) + response_delay
    if not apparent_age:
        return corrected_age_value
    date_values = headers.getall("Date", ())
    date_value = parse_http_date(date_values[0]) if date_values else None
    if date_value is None:
        date_value = response_time
    apparent = max(0.0, response_time - date_value)
    return max(apparent, corrected_age_value)


# How far behind this clock an origin's Date must be, besides more than the response's lifetime,
# for ``origin_date_behind`` to say so: below it, a Date of a response that took a while or an
# origin's clock a little off (NTP keeps clocks far closer), never worth a warning.
DATE_BEHIND_SLACK = 60.0


def stale_by_date_alone(stored: StoredResponse) -> float:
    """How many seconds the Date of ``stored`` was behind this clock when it arrived, when that
    alone made it arrive stale (RFC 9111 §4.2.3's apparent age over its lifetime, while its
    ``Age`` field plus the response delay leave it fresh: an origin whose clock is behind, no
    cache on the way saying it aged); 0.0 when it arrived fresh, or stale by its lifetime (0:
    ``max-age=0``), its ``Age`` field or its delay as well. Read from what is stored (the Date
    and Age it arrived with, its request and response times); only a response stale on arrival
    is looked at further (one comparison for the others).

    >>> from proxy.policy.httpdate import format_http_date
    >>> def r(lifetime: float, initial_age: float, *fields: tuple[str, str]) -> StoredResponse:
    ...     return StoredResponse(200, "OK", fields, 99_999.0, 100_000.0,
    ...                           Freshness(lifetime, "max-age", initial_age, 100_000.0))
    >>> behind = ("Date", format_http_date(100_000.0 - 7200))
    >>> stale_by_date_alone(r(600.0, 7200.0, behind))
    7200.0
    >>> stale_by_date_alone(r(600.0, 7200.0, behind, ("Age", "700")))  # its Age made it stale too
    0.0
    >>> stale_by_date_alone(r(0.0, 7200.0, behind)), stale_by_date_alone(r(600.0, 1.0, behind))
    (0.0, 0.0)
    """
    freshness = stored.freshness
    if freshness.initial_age < freshness.lifetime:
        return 0.0  # fresh on arrival
    arrival = stored.response_time
    ages = [v for k, v in stored.headers if k.lower() == "age"]
    if _age_value(ages) + max(0.0, arrival - stored.request_time) >= freshness.lifetime:
        return 0.0
    dates = [v for k, v in stored.headers if k.lower() == "date"]
    date = parse_http_date(dates[0]) if dates else None
    return max(0.0, arrival - date) if date is not None else 0.0


def origin_date_behind(stored: StoredResponse) -> float:
    """``stale_by_date_alone`` when it is more than ``DATE_BEHIND_SLACK`` too: the origin's clock
    is behind this one by more than the response's lifetime, and every response it sends of
    that lifetime arrives stale (the operator is told: ``Engine.fill_decision``); else 0.0. Not
    for a ``no-cache`` response: it is revalidated before every use whatever its age.

    >>> from proxy.policy.httpdate import format_http_date
    >>> def r(behind: float) -> StoredResponse:
    ...     return StoredResponse(200, "OK", (("Date", format_http_date(100_000.0 - behind)),), 100_000.0,
    ...                           100_000.0, Freshness(10.0, "max-age", behind, 100_000.0))
    >>> origin_date_behind(r(30.0)), origin_date_behind(r(3600.0))
    (0.0, 3600.0)
    """
    behind = 0.0 if stored.freshness.no_cache else stale_by_date_alone(stored)
    return behind if behind > DATE_BEHIND_SLACK else 0.0


def explicit_lifetime(
    headers: Headers, cc: CacheControl, *, use_expires: bool = True
) -> tuple[float, str] | None:
    """The origin's explicit freshness lifetime and which field gave it, or None.

    ``use_expires`` is False when the directives come from a targeted field
    (RFC 9213 §2.1: the cache then ignores Cache-Control *and* Expires).
    """
    s_maxage = cc.delta("s-maxage")
    if s_maxage is not None:
        return float(s_maxage), "s-maxage"
    max_age = cc.delta("max-age")
    if max_age is not None:
        return float(max_age), "max-age"
    expires_values = headers.getall("Expires", ()) if use_expires else ()
    if expires_values:
        if len(expires_values) > 1:
            return 0.0, "expires"  # §4.2.1: multiple Expires lines: treat as stale
        expires = parse_http_date(expires_values[0])
        if expires is None:
            return 0.0, "expires"  # §5.3: an invalid Expires means "already expired"
        date_values = headers.getall("Date", ())
        date = parse_http_date(date_values[0]) if date_values else None
        if date is None:
            return None  # the caller measures from response_time instead of Date
        # Capped as delta-seconds are (RFC 9111 §1.2.2): a far Expires says no more than a
        # huge max-age does, and the Cache-Status ttl of both is the same.
        return min(float(DELTA_SECONDS_MAX), max(0.0, expires - date)), "expires"
    return None


def carries_credentials(request_headers: Headers) -> bool:
    """Did the request carry a cookie or credentials (its response may be personal)?"""
    return "cookie" in request_headers or "authorization" in request_headers


def origin_freshness_only(options: CacheOptions, cc: CacheControl, *, authorization: bool) -> CacheOptions:
    """``options`` without the rule's ``ttl`` and ``override_origin`` for a response to a request
    with Authorization that only ``must-revalidate`` lets a shared cache keep (RFC 9111 §3.5:
    no ``public``, no ``s-maxage``); ``options`` as they are otherwise.

    >>> from proxy.policy.cache_control import parse_cache_control
    >>> ruled = CacheOptions(ttl_by_status={200: 300.0}, ttl_default=60.0, override_origin=True)
    >>> mine = origin_freshness_only(ruled, parse_cache_control(["must-revalidate"]), authorization=True)
    >>> mine.rule_ttl(200), mine.override_origin
    (None, False)
    >>> origin_freshness_only(ruled, parse_cache_control(["public"]), authorization=True) is ruled
    True
    """
    if not authorization or "public" in cc or "s-maxage" in cc:
        return options
    return replace(options, ttl_by_status=MappingProxyType({}), ttl_default=None, override_origin=False)


def heuristic_lifetime(
    status: int, headers: Headers, cc: CacheControl, response_time: float, options: CacheOptions
) -> float | None:
    """10% of the time since Last-Modified, capped (RFC 9111 §4.2.2); None when not allowed."""
    if status not in HEURISTICALLY_CACHEABLE and "public" not in cc:
        return None
    lm_values = headers.getall("Last-Modified", ())
    if not lm_values:
        return None
    last_modified = parse_http_date(lm_values[0])
    if last_modified is None:
        return None
    date_values = headers.getall("Date", ())
    date = parse_http_date(date_values[0]) if date_values else None
    reference = date if date is not None else response_time
    if last_modified >= reference:
        return None
    return min((reference - last_modified) * options.heuristic_fraction, options.heuristic_max)


def heuristic_withheld(status: int, headers: Headers, cc: CacheControl, request_headers: Headers,
                       response_time: float, options: CacheOptions) -> bool:
    """Would a heuristic lifetime apply, but for the request's credentials? (For ``explain``.)"""
    return (carries_credentials(request_headers) and "public" not in cc
            and heuristic_lifetime(status, headers, cc, response_time, options) is not None)


def may_be_served_stale(status: int, freshness: Freshness) -> bool:
    """May a stored response of this ``status`` and ``freshness`` ever be served stale: stand in
    for an origin error (stale-if-error, RFC 5861 §4), be served while it refreshes
    (stale-while-revalidate, a soft purge) or to a client's max-stale? Not when it is an error
    itself (5xx: a stale 503 is never preferred over the origin's new one, which may say more, a
    Retry-After, nor over the proxy's own 502/504; it is revalidated first and the client gets
    the origin's answer), nor when it may never be served stale (RFC 9111 §4.2.4). The one test
    of it: for keeping it over an error (``proxy.policy.validation.error_keeps_stored``), for
    serving it stale (``proxy.policy.reuse``), for whether its stale windows make it worth
    storing or keeping (``proxy.policy.storability``, ``proxy.cluster.shared``) and for what
    ``cachegate explain`` says of them.

    >>> f = Freshness(2, "max-age", 0, 0, stale_if_error=3600)
    >>> [may_be_served_stale(s, f) for s in (200, 404, 500, 503)]
    [True, True, False, False]
    """
    return status < 500 and freshness.may_serve_stale()


def rule_stale_windows_apply(lifetime: float) -> bool:
    """Do the rules' ``stale_if_error`` / ``stale_while_revalidate`` apply to a response of this
    lifetime? Only when it is above 0. A response with no freshness information, or one the
    origin marked expired at once (``max-age=0``, ``Expires: 0``, ``Expires: -1``, a date in the
    past), may be one user's page, stored only to be revalidated: served stale it would go to
    everyone while the origin is down (or at once, with stale-while-revalidate). Varnish and
    nginx keep nothing with a lifetime of 0 either. (The origin's own ``stale-if-error=`` and
    ``stale-while-revalidate=`` are its word that sharing it stale is fine: they apply.)

    >>> rule_stale_windows_apply(0.0), rule_stale_windows_apply(1.0)
    (False, True)
    """
    return lifetime > 0.0


def compute_freshness(
    status: int,
    headers: Headers,
    cc: CacheControl,
    request_time: float,
    response_time: float,
    options: CacheOptions,
    *,
    cc_source: str = "cache-control",
    credentials: bool = False,
) -> Freshness:
    """Everything the reuse decision needs, from the response headers and the rule.

    ``cc_source`` names the field ``cc`` came from; with a targeted field
    (CDN-Cache-Control, ...) Expires is ignored (RFC 9213 §2.1). ``credentials``: the
    request carried Cookie or Authorization, so no heuristic unless ``public``.

    The rules' ``stale_if_error`` / ``stale_while_revalidate`` apply only to a response
    with a lifetime (``rule_stale_windows_apply``); the origin's own ``stale-if-error=`` /
    ``stale-while-revalidate=`` always do (RFC 5861).
    """
    lifetime: float
    source: str
    use_expires = cc_source == "cache-control"
    explicit = explicit_lifetime(headers, cc, use_expires=use_expires)
    expires_values: list[str] = list(headers.getall("Expires", ())) if use_expires else []
    if explicit is None and expires_values:
        # Expires without a valid Date: measure from when the response arrived.
        expires = parse_http_date(expires_values[0])
        explicit = (min(float(DELTA_SECONDS_MAX), max(0.0, (expires or 0.0) - response_time)), "expires")
    rule_ttl = options.rule_ttl(status)
    if rule_ttl is not None and (options.override_origin or explicit is None):
        lifetime, source = rule_ttl, "rule"
    elif explicit is not None:
        lifetime, source = explicit
    else:
        heuristic = heuristic_lifetime(status, headers, cc, response_time, options) \
            if not credentials or "public" in cc else None
        lifetime, source = (heuristic, "heuristic") if heuristic is not None else (0.0, "none")

    # override_origin drops the origin's no-cache and must-revalidate only where the rule's ttl
    # is the lifetime: for a status the ttl does not name, the origin's freshness and its
    # directives decide, as without the rule (§5.2.2.4, §4.2.4).
    overridden = options.override_origin and source == "rule"
    directives = cc.directives  # asked directly: ``name in cc`` is a Python-level call each time
    must_revalidate = (
        "must-revalidate" in directives or "proxy-revalidate" in directives or "s-maxage" in directives
    ) and not overridden
    swr = cc.delta("stale-while-revalidate") if "stale-while-revalidate" in directives else None
    sie = cc.delta("stale-if-error") if "stale-if-error" in directives else None
    ruled = rule_stale_windows_apply(lifetime)
    default_swr = options.stale_while_revalidate if ruled else 0.0
    default_sie = options.stale_if_error if ruled else 0.0
    return Freshness(
        lifetime=lifetime,
        source=source,
        initial_age=corrected_initial_age(headers, request_time, response_time,
                                          apparent_age=options.apparent_age),
        response_time=response_time,
        must_revalidate=must_revalidate,
        # no-cache="field" is treated as strictly as plain no-cache: revalidate every use.
        no_cache="no-cache" in directives and not overridden,
        stale_while_revalidate=float(swr) if swr is not None else default_swr,
        stale_if_error=float(sie) if sie is not None else default_sie,
        immutable="immutable" in directives,
    )
