"""May a stored response satisfy this request? (RFC 9111 §4, RFC 5861)

``decide_lookup`` returns what the engine must do next:

- ``Serve``: answer from the stored response (``HIT``, ``STALE`` or ``UPDATING``;
  ``refresh`` asks for one background revalidation, for stale-while-revalidate);
- ``Revalidate``: send a conditional request first (§4.3); ``stale_prohibited``
  says the stored response may never be served stale, so an unreachable origin
  means 504 (§5.2.2.2);
- ``Forward``: go to the origin, with ``fwd`` naming why (RFC 9211 vocabulary), and
  ``full_fetch`` why a stored response that matches is not revalidated instead;
- ``OnlyIfCachedMiss``: the client sent ``only-if-cached`` and nothing usable is
  stored: answer 504 (§5.2.1.7), unless a stored part answers its range; its ``detail`` says
  whether a stored response matches (one that needs validation first) or none does.

``decide_part_lookup`` is the same question for a single range no complete response
answers, asked of the stored parts (206 responses, RFC 9111 §3.3) and of the head of the key's
fill in flight: ``FromPart``, ``FetchPart`` or ``FetchWhole``.

Stale responses are never served when the response said ``must-revalidate``,
``proxy-revalidate``, ``s-maxage`` or ``no-cache`` (§4.2.4), whatever the request's
``max-stale`` or the rules' stale-if-error say.

A soft-purged response (``invalidated``) is stale from the purge on: the first request gets it
at once (``UPDATING``) and refreshes it in the background; once such a refresh has failed
(``soft_refresh_failed``) it is served stale only as any stale response is, within its windows.

Request directives (§5.2.1): ``no-cache`` and ``Pragma: no-cache`` (when there is no
Cache-Control) go to the origin; ``max-age``, ``min-fresh`` and ``max-stale`` bound
the age accepted (a ``max-stale`` bound, stale-while-revalidate's stale serving too);
``only-if-cached`` never goes to the origin (504 instead);
unknown directives change nothing. A fresh ``immutable`` response is not
revalidated for a client's ``max-age`` (RFC 8246).

A request carrying a field a stale variant was selected by under another spelling too
(``X_Tenant`` for ``X-Tenant``) never revalidates it (``vouches``): it fetches unconditionally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from proxy.policy.cache_control import EMPTY_CACHE_CONTROL, CacheControl, parse_cache_control
from proxy.policy.fields import split_list
from proxy.policy.freshness import may_be_served_stale
from proxy.policy.httpdate import parse_http_date
from proxy.policy.keys import vary_matches
from proxy.policy.messages import CacheOptions, RequestHead, StoredResponse
from proxy.policy.partial import answerable
from proxy.policy.ranges import RangeSpec, if_range_allows
from proxy.policy.spellings import spelled_otherwise
from proxy.policy.validation import client_not_modified, has_validator

LOOKUP_METHODS = frozenset({"GET", "HEAD"})

ServeStatus = Literal["HIT", "STALE", "UPDATING"]


@dataclass(frozen=True, slots=True)
class Serve:
    index: int  # which candidate
    status: ServeStatus
    age: float
    ttl: float
    refresh: bool = False  # start one background revalidation
    not_modified: bool = False  # the client's own conditional matched: answer 304


@dataclass(frozen=True, slots=True)
class Revalidate:
    index: int
    fwd: str  # "stale" or "request"
    stale_if_error: bool  # the stored response may be served if the origin fails
    stale_prohibited: bool = False  # must-revalidate & co: an unreachable origin means 504


# Why a stored response that matches the request is fetched in full rather than revalidated
# (``Forward.full_fetch``, for ``fwd`` "request" and "stale"): the client's no-cache under
# ``client_cache_control: honor`` (the default: a forced reload goes to the origin whole); the
# stored response has no validator to send; the request spells a field the variant was selected
# by otherwise too (``vouches``).
CLIENT_NO_CACHE = "client-no-cache"
NO_VALIDATOR = "no-validator"
SPELLED_OTHERWISE = "spelled-otherwise"


@dataclass(frozen=True, slots=True)
class Forward:
    fwd: str  # uri-miss, vary-miss, method, request, stale, bypass
    stale_index: int | None = None  # a stored response usable under stale-if-error
    detail: str = ""
    stale_prohibited: bool = False  # must-revalidate & co: an unreachable origin means 504
    full_fetch: str = ""  # CLIENT_NO_CACHE, NO_VALIDATOR or SPELLED_OTHERWISE; "" for a miss


URI_MISS = Forward("uri-miss")  # (frozen: one for every plain miss)


# ``OnlyIfCachedMiss.detail``: nothing stored matches; a stored response does, but needs validation
ONLY_IF_CACHED, ONLY_IF_CACHED_NEEDS_VALIDATION = "ONLY-IF-CACHED", "ONLY-IF-CACHED-NEEDS-VALIDATION"


@dataclass(frozen=True, slots=True)
class OnlyIfCachedMiss:
    """``unmatched``: no complete stored response matches the request (what would otherwise be
    a ``uri-miss`` or ``vary-miss``), so a single range may still be answered by a stored part
    (``decide_part_lookup``), as it is without only-if-cached; a stored response that may not
    be served (stale, the client's no-cache or max-age) leaves no part to look at."""

    unmatched: bool = False

    @property
    def detail(self) -> str:
        """The 504's ``Cache-Status`` detail: ``ONLY-IF-CACHED`` when nothing stored matches the
        request, ``ONLY-IF-CACHED-NEEDS-VALIDATION`` when a stored response does but may not be
        served without the origin (stale, ``no-cache``, or the client's own ``no-cache``,
        ``max-age`` or ``min-fresh``). Why both: a client asking whether something is stored
        (``cachegate warm`` after a chunked fill) read a stored ``no-cache`` response's 504 as
        nothing stored, where the same response with a ``Content-Length`` said stored."""
        return ONLY_IF_CACHED if self.unmatched else ONLY_IF_CACHED_NEEDS_VALIDATION


LookupDecision = Serve | Revalidate | Forward | OnlyIfCachedMiss


def effective_request_cache_control(request: RequestHead) -> CacheControl:
    """Request directives, with ``Pragma: no-cache`` standing in when there is no Cache-Control."""
    values = request.headers.getall("Cache-Control", ())
    if values:
        return parse_cache_control(values)
    pragma = request.headers.getall("Pragma", ())
    if pragma and any(m.lower() == "no-cache" for m in split_list(pragma)):
        return parse_cache_control(["no-cache"])
    return EMPTY_CACHE_CONTROL


def select_variant(request: RequestHead, candidates: Sequence[StoredResponse]) -> int | None:
    """The most recently stored candidate whose Vary values match the request (each of the
    request's selecting fields normalised once, whatever the number of candidates)."""
    best: int | None = None
    mine: dict[str, str] = {}
    for i, stored in enumerate(candidates):
        if (not stored.vary or vary_matches(stored.vary, request.headers, mine)) and (
            best is None or stored.response_time > candidates[best].response_time
        ):
            best = i
    return best


def plain_fresh_hit(
    request: RequestHead, candidates: Sequence[StoredResponse], now: float
) -> tuple[int, float, float, bool] | None:
    """The common case of ``decide_lookup``, decided without building a decision.

    A GET or HEAD without Cache-Control or Pragma, and a matching stored response that is
    fresh (not no-cache, not soft-purged): it is served as a plain HIT, whatever the options
    say (they only bound what a request's own directives may ask). Returns (index, age, ttl,
    not_modified) exactly as ``decide_lookup``'s ``Serve`` would carry them (``not_modified``:
    the client's If-None-Match / If-Modified-Since matched, a 304: ``client_not_modified``, the
    one evaluation, asked only when the request has either); None means "not this case: ask
    ``decide_lookup``".
    """
    headers = request.headers
    if (not candidates or "Cache-Control" in headers or "Pragma" in headers
            or request.method not in LOOKUP_METHODS):
        return None
    if len(candidates) == 1:
        index = 0
        stored = candidates[0]
        if stored.vary and not vary_matches(stored.vary, headers):
            return None
    else:
        found = select_variant(request, candidates)
        if found is None:
            return None
        index = found
        stored = candidates[index]
    f = stored.freshness
    age = f.age(now)
    ttl = f.lifetime - age
    if ttl <= 0 or stored.invalidated or f.no_cache:
        return None
    if "If-None-Match" in headers or "If-Modified-Since" in headers:
        return index, age, ttl, client_not_modified(headers, stored)
    return index, age, ttl, False


def decide_lookup(
    request: RequestHead,
    candidates: Sequence[StoredResponse],
    now: float,
    options: CacheOptions,
    soft_refresh_failed: bool = False,
) -> LookupDecision:
    """``soft_refresh_failed``: a background refresh of the key's soft-purged response has failed
    since the purge (what the engine remembers: ``MissPath.soft_refresh_failed``). Until then a
    soft-purged response is served at once (``UPDATING``) while one request refreshes it, the
    purge's promise; from then on it is an ordinary stale response, served stale only within its
    own stale-while-revalidate / stale-if-error windows or the rules', else revalidated first
    (the origin's error, or a 504, as for a response that was never purged). Without this, it
    was served stale without any bound for as long as the origin failed: more than the same
    response un-purged."""
    if not candidates:
        # Nothing stored, a GET or HEAD without directives: the plain miss, as
        # ``decide_lookup_in_full`` decides it (every fill asks: four Python-level calls fewer
        # than the full decision, ``scripts/bench-calls``; tests/policy compare the two).
        headers = request.headers
        if request.method in LOOKUP_METHODS and "Cache-Control" not in headers and "Pragma" not in headers:
            return URI_MISS
    plain = plain_fresh_hit(request, candidates, now)
    if plain is not None:
        return Serve(plain[0], "HIT", plain[1], plain[2], not_modified=plain[3])
    return decide_lookup_in_full(request, candidates, now, options, soft_refresh_failed)


def decide_lookup_in_full(
    request: RequestHead,
    candidates: Sequence[StoredResponse],
    now: float,
    options: CacheOptions,
    soft_refresh_failed: bool = False,
) -> LookupDecision:
    """``decide_lookup`` without its shortcut for plain fresh hits (the tests compare both)."""
    if request.method not in LOOKUP_METHODS:
        return Forward("method")
    req_cc = effective_request_cache_control(request)
    only_if_cached = "only-if-cached" in req_cc

    index = select_variant(request, candidates) if candidates else None
    if index is None:
        if only_if_cached:
            return OnlyIfCachedMiss(unmatched=True)
        return Forward("vary-miss" if candidates else "uri-miss")

    stored = candidates[index]
    fresh_info = stored.freshness
    age = fresh_info.age(now)
    ttl = stored.ttl(now)
    stale = ttl <= 0 or stored.invalidated
    may_serve_stale = may_be_served_stale(stored.status, fresh_info)  # (not a 5xx, not must-revalidate)
    mode = options.client_cache_control
    validator = has_validator(stored)

    def serve(status: ServeStatus, refresh: bool = False) -> Serve:
        return Serve(index, status, age, ttl, refresh, client_not_modified(request.headers, stored))

    if mode != "ignore" and req_cc:
        if "no-cache" in req_cc:
            if only_if_cached:
                return OnlyIfCachedMiss()
            why = unconditional(request, stored, validator) if mode == "revalidate" else CLIENT_NO_CACHE
            if not why:
                return Revalidate(index, "request", stale_if_error=False)
            return Forward("request", full_fetch=why)
        max_age = req_cc.delta("max-age")
        min_fresh = req_cc.delta("min-fresh")
        if fresh_info.immutable and not stale:
            # RFC 8246 §2.1: a fresh immutable response is not revalidated on a reload
            # (max-age=0); only no-cache (a forced reload) reaches the origin.
            max_age = None
        if (max_age is not None and age > max_age) or (min_fresh is not None and ttl < min_fresh):
            if only_if_cached:
                return OnlyIfCachedMiss()
            why = unconditional(request, stored, validator)
            if not why:
                return Revalidate(index, "request", stale_if_error=False)
            return Forward("request", full_fetch=why)

    if not stale and not fresh_info.no_cache:
        return serve("HIT")

    if stale and may_serve_stale:
        if "max-stale" in req_cc and mode != "ignore":
            # The client accepts a response stale by at most this much (RFC 9111 §5.2.1.1):
            # within it, served; past it, not by stale-while-revalidate either (the request
            # revalidates first, as one past the window does; stale-if-error still applies).
            max_stale = req_cc.get("max-stale")
            limit = float("inf") if max_stale is None else float(req_cc.delta("max-stale") or 0)
            if -ttl <= limit:
                return serve("STALE")
        elif (stored.invalidated and not soft_refresh_failed) \
                or _within(-ttl, fresh_info.stale_while_revalidate):
            return serve("UPDATING", refresh=vouches(request, stored))

    if only_if_cached:
        return OnlyIfCachedMiss()
    stale_if_error = may_serve_stale and (
        _within(-ttl, fresh_info.stale_if_error) or _request_allows_stale_on_error(req_cc, -ttl)
    )
    why = unconditional(request, stored, validator)
    if not why:
        return Revalidate(index, "stale", stale_if_error, stale_prohibited=not fresh_info.may_serve_stale())
    return Forward("stale", stale_index=index if stale_if_error else None,
                   stale_prohibited=not fresh_info.may_serve_stale(), full_fetch=why)


def unconditional(request: RequestHead, stored: StoredResponse, validator: bool) -> str:
    """Why ``stored`` (``validator``: it has one) cannot be revalidated by this request, which
    fetches it in full instead: NO_VALIDATOR, SPELLED_OTHERWISE (``vouches``); "" when it can."""
    if not validator:
        return NO_VALIDATOR
    return "" if vouches(request, stored) else SPELLED_OTHERWISE


def vouches(request: RequestHead, stored: StoredResponse) -> bool:
    """May the origin's answer to this request revalidate ``stored`` (a 304 freshens it)? Not
    when the request also carries a field the variant was selected by under another spelling
    (``policy.spellings``): a CGI-style origin may have judged another value's response (its
    304 about ``X_Tenant: evil``'s page would freshen ``X-Tenant: acme``'s with its headers).
    Such a request fetches unconditionally instead, and its answer is not stored
    (``storability``); it is still served a stored variant, as a client sending the named
    fields alone would be. Asked only of a stale (or refused) response that varies."""
    return not stored.vary or spelled_otherwise([n for n, _ in stored.vary], request.headers) is None


def _within(staleness: float, window: float) -> bool:
    """Inside a stale-serving window; a window of 0 grants nothing."""
    return window > 0 and staleness <= window


# How long a key's stale-while-revalidate refreshes wait after one failed, when the origin's
# answer gave no Retry-After (``refresh_retry_at``).
REFRESH_BACKOFF = 5.0


def refresh_retry_at(stored: StoredResponse, now: float, retry_after: str | None = None) -> float:
    """When the next stale-while-revalidate refresh of ``stored`` may start, after one that
    failed at ``now`` (no answer, or one that leaves it stored: a 5xx, a 304 to a request
    without validators). Meanwhile its clients are still served it stale (UPDATING), and
    only the first request after this time refreshes it again: a failing origin gets one
    request per while, not one per client request. The while is ``REFRESH_BACKOFF``, or the
    answer's ``Retry-After`` (seconds or an HTTP-date), capped by what is left of the
    response's stale-while-revalidate window (past it, requests revalidate in the foreground:
    the mark no longer matters), or by ``REFRESH_BACKOFF`` for a soft-purged one past it.

    >>> from proxy.policy.messages import Freshness
    >>> s = StoredResponse(200, "OK", (), 0, 0, Freshness(10, "max-age", 0, 0, stale_while_revalidate=60))
    >>> refresh_retry_at(s, 20), refresh_retry_at(s, 20, "30"), refresh_retry_at(s, 65, "30")
    (25.0, 50.0, 70.0)
    """
    wait = REFRESH_BACKOFF
    if retry_after is not None:
        text = retry_after.strip()
        given = float(text) if text.isdigit() else None
        if given is None:
            date = parse_http_date(text)
            given = date - now if date is not None else None
        if given is not None and given > 0:
            wait = given
    left = stored.freshness.stale_while_revalidate + stored.ttl(now)
    # (Nothing left: a soft-purged response served stale past any window; the operator wants
    # it replaced, so no Retry-After holds its refresh back longer than the default.)
    return float(now + min(wait, left if left > 0 else REFRESH_BACKOFF))


def _request_allows_stale_on_error(req_cc: CacheControl, staleness: float) -> bool:
    """RFC 5861 §4: a request's own ``stale-if-error=N``."""
    limit = req_cc.delta("stale-if-error")
    return limit is not None and _within(staleness, limit)


@dataclass(frozen=True, slots=True)
class FetchPart:
    """Ask the origin for the range alone, its 206 stored as a part; ``held``: the part held for
    the request's variant, which the new one is combined with when RFC 9111 §3.4 allows."""

    held: int | None


@dataclass(frozen=True, slots=True)
class FetchWhole:
    """Not through a part: the complete response is fetched (or the key's fill in flight joined)
    and answers the range. ``reason``: ``if-range`` (the client's If-Range does not hold for
    what the cache knows the representation to be, the stored part that has the range or the
    head of the fill in flight, or it came on several lines: it wants the whole 200, which that
    fill is) or ``conditional`` (a range with If-Match, If-Unmodified-Since, If-None-Match or
    If-Modified-Since, answered from the complete response's head as it arrives, the range
    sliced from its body)."""

    reason: Literal["if-range", "conditional"]


@dataclass(frozen=True, slots=True)
class FromPart:
    """A fresh stored part holds the range whole (RFC 9111 §3.3): served from it as a HIT;
    ``otherwise`` if it cannot be after all (its body has gone from disk)."""

    serve: Serve
    otherwise: FetchPart | FetchWhole


PartLookup = FromPart | FetchPart | FetchWhole


def decide_part_lookup(request: RequestHead, spec: RangeSpec, parts: Sequence[StoredResponse], now: float,
                       options: CacheOptions, filling: StoredResponse | None = None) -> PartLookup:
    """A GET for the single range ``spec`` that no complete stored response answers (a
    ``uri-miss`` or ``vary-miss``), decided against the key's stored ``parts`` and ``filling``:
    the response of the key's fill in flight, once its head has come and its clients may take
    it (None: no fill, no head yet, or one this request could not be answered from; a status
    other than 200 says nothing of the representation a range is of).

    If-Range only says whether the range applies (RFC 9110 §13.1.5, §14.2): the range is
    fetched as a plain one is, its If-Range sent with it for the origin to evaluate (its 206,
    or the whole 200 when it does not hold: ``proxy.policy.partial.part_fetch_fields``), at
    once (a seek into a cold video was made to wait for the whole download to reach it). Only
    when a part holding the range or the fill's head shows it does not hold is the whole
    response the answer: ``FetchWhole("if-range")``, which joins that fill.

    >>> from proxy.policy.messages import Freshness
    >>> from multidict import CIMultiDict
    >>> def head(*fields: tuple[str, str]) -> RequestHead:
    ...     return RequestHead("GET", "http", "a.example", "/v", CIMultiDict(fields))
    >>> fill = StoredResponse(200, "OK", (), 0, 0, Freshness(60, "max-age", 0, 0), etag='"v2"')
    >>> seek = ("Range", "bytes=5000-")
    >>> [decide_part_lookup(head(seek, ("If-Range", tag)), (5000, None), [], 0, CacheOptions(), filling)
    ...  for tag, filling in (('"v1"', None), ('"v2"', fill), ('"v1"', fill))]
    [FetchPart(held=None), FetchPart(held=None), FetchWhole(reason='if-range')]
    >>> decide_part_lookup(head(seek, ("If-None-Match", '"v1"')), (5000, None), [], 0, CacheOptions())
    FetchWhole(reason='conditional')
    """
    found: Serve | None = None
    held: int | None = None
    if parts:
        decision = decide_lookup(request, parts, now, options)
        if isinstance(decision, Serve) and decision.status == "HIT" \
                and answerable(parts[decision.index], spec) is not None:
            if not if_range_allows(request.headers, parts[decision.index]):
                return FetchWhole("if-range")
            # The part's validators are its representation's (RFC 9111 §3.3): a matching
            # If-None-Match / If-Modified-Since is a 304 before any range (RFC 9110 §13.2.2).
            found = replace(decision, not_modified=client_not_modified(
                request.headers, replace(parts[decision.index], status=200)))
        held = select_variant(request, parts)
    fields = request.headers
    otherwise: FetchPart | FetchWhole = FetchPart(held)
    if "if-match" in fields or "if-unmodified-since" in fields or "if-none-match" in fields \
            or "if-modified-since" in fields:
        # RFC 9110 §13.2.2: the preconditions, then If-None-Match / If-Modified-Since, are
        # evaluated before Range, against the representation: a part's fetch does not carry
        # them, so the whole fill answers them from its head (a 304, a 412, or the range
        # sliced from its body as it arrives: ``proxy.policy.reply.reply_on_arrival``).
        otherwise = FetchWhole("conditional")
    elif "if-range" in fields and (len(fields.getall("If-Range")) > 1
                                   or (filling is not None and filling.status == 200
                                       and not if_range_allows(fields, filling))):
        otherwise = FetchWhole("if-range")
    return otherwise if found is None else FromPart(found, otherwise)
