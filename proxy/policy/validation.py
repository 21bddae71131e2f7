"""Conditional requests: ours to the origin, and the client's to us (RFC 9111 §4.3, RFC 9110 §13).

- ``conditional_headers``: the validators a revalidation sends (§4.3.1).
- ``decide_on_validation``: what the origin's answer means for the stored
  response, as the engine carries it out: ``Freshen`` (a 304 about it: update its
  headers, keep the body, §4.3.4, done by ``freshen_stored``; its ETag compared weakly
  with the one sent, ``validates_stored``), ``Refetch`` (a 304
  about something else: ask again without validators), ``ServeStale`` (a 500, 502,
  503 or 504 the stored response may hide, RFC 5861 §4: it stays) or ``Replace`` (a new response,
  decided as any fill by ``proxy.policy.fill``; when it is not stored, the stored one is
  dropped only when nothing client-specific can have caused the answer: ``supersedes_stored``).
- ``client_not_modified``: may we answer the client's own conditional GET with 304?
- ``precondition_failed``: must we answer the client's If-Match or If-Unmodified-Since
  with 412?
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from multidict import CIMultiDict

from proxy.policy.fields import split_list
from proxy.policy.freshness import compute_freshness, may_be_served_stale, origin_freshness_only
from proxy.policy.headers import HOP_BY_HOP, dated, end_to_end
from proxy.policy.httpdate import parse_http_date
from proxy.policy.keys import vary_names
from proxy.policy.messages import CacheOptions, HeaderList, Headers, StoredResponse
from proxy.policy.storability import response_cache_control

# Fields a 304 must not overwrite in the stored response (RFC 9111 §3.2): fields not
# stored at all (§3.1: hop-by-hop, Proxy-*), Content-Length, and the fields "that the
# cache's stored response depends upon": the stored body's encoding, range and digests
# describe the bytes we hold, not whatever the 304 says.
NOT_UPDATED_BY_304 = HOP_BY_HOP | {
    "content-length", "content-encoding", "content-range", "content-md5", "content-digest",
}


@dataclass(frozen=True, slots=True)
class Freshen:
    """The 304 refers to the stored response: its head is updated (``fill.freshened``), its body kept."""


@dataclass(frozen=True, slots=True)
class Refetch:
    """A 304 that refers to another response may not be used (§4.3.4): ask again, unconditionally."""


@dataclass(frozen=True, slots=True)
class ServeStale:
    """The origin failed and the stored response may hide it (``error_keeps_stored``): it stays as
    it is, the error is not stored, and clients allowed stale-if-error are served it stale."""

    detail: str  # the Cache-Status detail of the answer that is not stored: ORIGIN-ERROR


@dataclass(frozen=True, slots=True)
class Replace:
    """A new response: decided as any fill (``fill.decide_fill``), stored over the old one if stored,
    else the old one dropped when the answer supersedes it (``supersedes_stored``)."""


ValidationOutcome = Freshen | Refetch | ServeStale | Replace


def has_validator(stored: StoredResponse) -> bool:
    return stored.etag is not None or stored.last_modified is not None


def asks_validation(fields: HeaderList) -> bool:
    """Whether a request sent with ``fields`` is one a 304 may answer (RFC 9110 §15.4.5: a
    conditional GET or HEAD, with If-None-Match or If-Modified-Since). Decided from what was
    sent, not from what the request was made for: a refresh of a stored response without
    validators goes out unconditional, and a 304 to it is the origin's fault, not a freshening.

    >>> asks_validation((("If-None-Match", '"a"'),)), asks_validation((("Accept", "*/*"),))
    (True, False)
    """
    return any(k.lower() in ("if-none-match", "if-modified-since") for k, _ in fields)


def conditional_headers(stored: StoredResponse) -> HeaderList:
    headers: list[tuple[str, str]] = []
    if stored.etag is not None:
        headers.append(("If-None-Match", stored.etag))
    if stored.last_modified is not None:
        headers.append(("If-Modified-Since", stored.last_modified))
    return tuple(headers)


def merge_headers(stored: HeaderList, update: Headers, keep: tuple[str, ...] = ()) -> HeaderList:
    """Stored headers with every field present in ``update`` replaced (RFC 9111 §3.2).

    Never replaced: ``NOT_UPDATED_BY_304``, the fields the 304's Connection lists, and those
    in ``keep`` (lower-case: a stored weak ETag, ``freshen_stored``).
    A Set-Cookie arriving on a 304 is never stored, whatever the rules allow: it is the
    revalidating client's, and would be replayed to everyone who gets the stored response
    (a rule's ``allow_set_cookie`` stores a fill without its Set-Cookie, for the same reason).
    """
    fresh = end_to_end(update)
    # (Set-Cookie2, RFC 2965, is obsolete: ignored by user agents)
    skip = {*NOT_UPDATED_BY_304, "set-cookie", *keep}
    replaced = {k.lower() for k, _ in fresh if k.lower() not in skip}
    kept = [(k, v) for k, v in stored if k.lower() not in replaced]
    added = [(k, v) for k, v in fresh if k.lower() in replaced]
    return (*kept, *added)


def freshen_stored(
    stored: StoredResponse,
    update: Headers,
    request_time: float,
    response_time: float,
    options: CacheOptions,
    *,
    credentials: bool = False,
) -> StoredResponse | None:
    """The stored response freshened by a 304 (RFC 9111 §4.3.4); None when it may no longer be kept.

    Headers are merged as §3.2 says; freshness is computed afresh from the merged
    headers, except that ``Age`` and ``Date`` are the 304's own (a stored Age or
    Date describes the old exchange, not this one): a 304 without Date is dated
    ``response_time`` (``headers.dated``), so the stored Date agrees with the new age.
    A 304 that adds ``no-store`` or ``private`` ends the stored response's life, and so does
    one whose ``Vary`` names other fields than those the stored variant was selected by
    (``Vary: *``, a member that is not a field name, a field added or gone: ``vary_names``):
    the stored response would say ``Vary: Cookie`` while still matching every request as filled
    without it (RFC 9111 §4.1: a response with Vary is used only for requests whose nominated
    fields match those of the request that stored it, which for the new fields were never
    recorded). The key is then fetched anew, its response stored (or not) by its own Vary.
    ``credentials``: the revalidating request carried Cookie or Authorization. No heuristic
    freshness then, nor when the stored response was filled (or freshened) for such a
    request (``StoredResponse.credentials``, kept): an anonymous revalidation says nothing
    about whose page it is (see ``freshness``). A response filled for a request with
    Authorization (``StoredResponse.authorization``) is kept only while it says public,
    s-maxage or must-revalidate, with must-revalidate alone with the origin's freshness only
    (RFC 9111 §3.5), whoever's request the 304 answered. (A 304 to a request with
    Authorization about a response filled without it says that the shared response is valid
    for that client too; it does not make it theirs.)
    A 304 never makes the stored ETag strong: a stored ``W/"x"`` stays so when the 304 says
    ``"x"`` (nginx's 304 to a gzip response it sent as ``W/"x"``, ``validates_stored``: the
    strong tag names the uncompressed bytes, not the gzip ones held, and a client's If-Range
    or If-Match would take it for theirs). A weak ETag on the 304 replaces a strong stored one,
    as any field (it claims less).
    """
    credentials = credentials or stored.credentials
    authorization = stored.authorization
    merged = merge_headers(stored.headers, update, ("etag",) if _strengthens(stored.etag, update) else ())
    if "date" not in update:
        merged = dated(tuple([(k, v) for k, v in merged if k.lower() != "date"]), response_time)
    view: CIMultiDict[str] = CIMultiDict((k, v) for k, v in merged if k.lower() not in ("age", "date"))
    for name in ("Age", "Date"):
        for value in update.getall(name, ()):
            view.add(name, value)
    if vary_names(view) != tuple(name for name, _ in stored.vary):
        return None  # a Vary the stored variant is not matched on (see the docstring)
    cc, source = response_cache_control(view, options)
    if "no-store" in cc or "private" in cc:
        return None
    if authorization and not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
        return None
    options = origin_freshness_only(options, cc, authorization=authorization)
    freshness = compute_freshness(stored.status, view, cc, request_time, response_time, options,
                                  cc_source=source, credentials=credentials)
    return replace(
        stored,
        headers=merged,
        request_time=request_time,
        response_time=response_time,
        freshness=freshness,
        etag=view.get("ETag"),
        last_modified=view.get("Last-Modified"),
        invalidated=False,
        credentials=credentials,
    )


def _strong(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def _strengthens(stored: str | None, update: Headers) -> bool:
    """Would the 304's ETag turn the stored weak one strong (``freshen_stored`` keeps it)?"""
    new = update.get("ETag")
    return stored is not None and new is not None and stored.strip().startswith("W/") \
        and not new.strip().startswith("W/")


def validates_stored(stored: StoredResponse, headers: Headers) -> bool:
    """Does this 304, the answer to the conditional request made with ``stored``'s own
    validators, refer to it (RFC 9111 §4.3.4)?

    An ETag in the 304 must match the stored one, which is the one sent, by the weak
    comparison (the same opaque tag, ``W/`` on either side or none): the origin evaluated our
    If-None-Match so (RFC 9110 §13.1.2), and its 304 says the response we hold is current
    (§15.4.5). nginx with ``gzip on`` sends a compressed response as ``W/"x"`` and its 304 to
    ``If-None-Match: W/"x"`` as ``"x"`` (its gzip filter does not run on a 304): taken
    strictly, every revalidation of a gzip copy was a wasted 304 and a full 200. (nginx's own
    proxy_cache_revalidate refreshes the entry it asked about on any 304.) The stored ETag
    stays weak (``freshen_stored``). The key's other variants are selected strictly, by the
    304's strong ETag alone (§4.3.4, ``Engine._freshen_siblings``): this rule is for the one
    response whose validator was sent.

    A 304 without an ETag but with a Last-Modified must carry the stored one. A 304 with no
    validator at all answers the conditional request we made about this very response, so it
    refers to it.
    """
    etag = headers.get("ETag")
    if etag is not None:
        return stored.etag is not None and _strong(stored.etag.strip()) == _strong(etag.strip())
    last_modified = headers.get("Last-Modified")
    if last_modified is not None and stored.last_modified is not None:
        new, old = parse_http_date(last_modified), parse_http_date(stored.last_modified)
        return new is not None and new == old
    return True


def decide_on_validation(
    stored: StoredResponse, status: int, headers: Headers, now: float, *, conditional: bool = True
) -> ValidationOutcome:
    """What the origin's answer to a fetch made while holding ``stored`` means for it.

    ``conditional``: the request carried ``stored``'s validators (a revalidation); else it
    was a full fetch, and ``stored`` is only kept for stale-if-error. ``now``: when the
    answer arrived. A 304 to a revalidation ``Freshen``s when it refers to the stored
    response, else ``Refetch`` (§4.3.4 forbids using it); an origin error the stored response
    may hide (``error_keeps_stored``) is ``ServeStale``; anything else ``Replace``s (§4.3.3).

    >>> from proxy.policy.messages import EMPTY_HEADERS, Freshness
    >>> s = StoredResponse(200, "OK", (), 0, 0, Freshness(10, "max-age", 0, 0, stale_if_error=60), etag='"a"')
    >>> [type(decide_on_validation(s, status, EMPTY_HEADERS, 30)).__name__ for status in (304, 503, 200)]
    ['Freshen', 'ServeStale', 'Replace']
    """
    if status == 304 and conditional:
        return Freshen() if validates_stored(stored, headers) else Refetch()
    if error_keeps_stored(stored, status, now):
        return ServeStale("ORIGIN-ERROR")
    return Replace()


@dataclass(frozen=True, slots=True)
class UnstoredAnswer:
    """A full answer that is not stored, to a fetch made for a stored response (revalidation,
    refresh, refetch): what ``supersedes_stored`` decides on."""

    status: int
    not_stored: str  # why it is not stored: the fill's Cache-Status detail
    credentials: bool  # the request that fetched it carried Cookie or Authorization
    stored_varies: bool  # the stored response has Vary (its key holds other clients' variants)
    forced: bool = False  # the client's own directives sent it (fwd=request: max-age=0, no-cache)


def supersedes_stored(answer: UnstoredAnswer) -> bool:
    """Does a full answer (anything but a 304 to a revalidation) that is not stored leave the
    stored response it was fetched for unfit to serve, for every client? Then the engine drops
    it rather than serve it again: kept, stale-while-revalidate served it (and refreshed it) at
    every request of its window, and stale-if-error at the next origin error, long after the
    origin had replaced or withdrawn it (RFC 9111 §4.3.3: the full response is used, the stored
    one no longer is).

    The fetch carries the request of the client that set it off, so the answer can be that
    client's alone; and nothing a client sends may change what another client receives unless
    it is part of the cache key. So it supersedes only when nothing client-specific can have
    caused it:

    - the request carried no credentials (Cookie, Authorization): an answer to them (a
      Set-Cookie, ``private``, an account page) is about that client, not the resource;
    - its status is one the origin gives for the resource itself (``SUPERSEDING_STATUSES``),
      not one the request provoked (a 406 to its Accept, a 412 to its If-Match, a 416 to its
      Range, a 400 or 431 to its fields) nor an origin error (500, 502, 503, 504 says nothing
      of the resource: the stored response stays for stale-if-error);
    - the stored response has no Vary: the store drops whole keys, so one client's variant
      would take every other client's with it;
    - it was not the request that kept the answer out of the store (``REQUEST_REFUSALS``: its
      own no-store, its Authorization, its Cookie, a field spelled two ways), nor an answer
      meant for one client (``private``, a ``Set-Cookie``: whatever credential of its own, a
      custom API key field too, the client sent);
    - the cache sent the fetch (the stored response stale, or refreshed in the background),
      not the client's own directives (``max-age=0``, ``no-cache``: fwd=request), which any
      client may send for a response every other client is still served fresh.

    >>> def answer(status=200, not_stored="NO-STORE", credentials=False, stored_varies=False, forced=False):
    ...     return supersedes_stored(UnstoredAnswer(status, not_stored, credentials, stored_varies, forced))
    >>> [s for s in (200, 206, 301, 302, 404, 406, 410, 412, 500, 501, 503) if answer(s)]
    [200, 301, 404, 410]
    >>> answer(), answer(credentials=True), answer(stored_varies=True), answer(not_stored="REQUEST-NO-STORE")
    (True, False, False, False)
    >>> answer(not_stored="PRIVATE"), answer(not_stored="SET-COOKIE")
    (False, False)
    >>> answer(404, "UNCACHEABLE-STATUS", forced=True)
    False
    """
    return (answer.status in SUPERSEDING_STATUSES and not answer.credentials and not answer.stored_varies
            and not answer.forced and answer.not_stored.partition(":")[0] not in REQUEST_REFUSALS)


# Statuses that say something of the resource whoever asks (the heuristically cacheable ones,
# RFC 9110 §15.1, but those a request provokes): 200, 203 and 204 (its content now), 300, 301
# and 308 (it is elsewhere, for good), 404 and 410 (it is gone). Not 206 (a Range asked for
# it), 405 and 501 (the method did), any other 4xx (400, 406, 411-431: the request's fields,
# its preconditions, its range), 302/303/307 (for now, often for this client) nor any 5xx (the
# origin's trouble, not the resource's: stale-if-error keeps the stored one).
SUPERSEDING_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 410})

# Why a fill is not stored that is about the request, not the resource (``supersedes_stored``),
# as ``proxy.policy.storability`` says them (AMBIGUOUS-HEADER is followed by ":<field>").
# PRIVATE and SET-COOKIE: an answer for one client (``supersedes_stored``).
REQUEST_REFUSALS = frozenset({"REQUEST-NO-STORE", "AUTHORIZATION", "COOKIE-NO-FRESHNESS", "AMBIGUOUS-HEADER",
                              "PRIVATE", "SET-COOKIE"})


# RFC 5861 §4: "an error is any situation that would result in a 500, 502, 503, or 504 HTTP
# response status code being returned". Any other answer, a 501 (the method is not implemented)
# or a 505 too, is the origin's answer to relay, never hidden behind a stale response.
ORIGIN_ERRORS = frozenset({500, 502, 503, 504})


def origin_error(status: int) -> bool:
    """Is this origin answer a failure that stale-if-error may hide (RFC 5861 §4)? The one test
    of it: here for the stored response (``error_keeps_stored``), and for a client falling
    back on a stale response (``proxy.flight.after_head``).

    >>> [s for s in (500, 501, 502, 503, 504, 505, 507, 404) if origin_error(s)]
    [500, 502, 503, 504]
    """
    return status in ORIGIN_ERRORS


def error_keeps_stored(stored: StoredResponse, status: int, now: float) -> bool:
    """Must this origin error leave the stored response in place rather than replace it (RFC 5861 §4)?

    True when ``status`` is an ``origin_error``, the stored response may hide it
    (``may_be_served_stale``) and is still fresh or within its stale-if-error window: an
    origin's failure then hides behind the stored response instead of being cached over it.
    """
    if not origin_error(status) or not may_be_served_stale(stored.status, stored.freshness):
        return False
    return -stored.freshness.ttl(now) <= stored.freshness.stale_if_error


def etag_list(values: list[str] | tuple[str, ...]) -> list[str]:
    return split_list(values)


def client_not_modified(request_headers: Headers, stored: StoredResponse) -> bool:
    """May the client's own conditional GET/HEAD be answered 304 (RFC 9110 §13.2.2)?

    If-None-Match (weak comparison) wins over If-Modified-Since. Without a stored
    Last-Modified, the stored Date stands in, then the time it was received
    (RFC 9111 §4.3.2).

    Only for a stored 200: a 304 says the request "would have resulted in a 200 (OK)" and
    tells the client to use its copy "as if it were the content of a 200" (RFC 9110 §15.4.5).
    A stored 203 (content a proxy transformed), 204, 300, 301 or 404 is sent whole, as nginx
    (``ngx_http_not_modified_filter``: status 200 only) and Varnish (``RFC2616_Do_Cond``: 200
    only) do: a correct answer, only not the shortest one. (A failing If-Match or
    If-Unmodified-Since does give a stored 2xx its 412: ``precondition_failed``.)
    """
    if stored.status != 200:
        return False
    inm = request_headers.getall("If-None-Match", ())
    if inm:
        tags = etag_list(inm)
        if "*" in tags:
            return True
        if stored.etag is None:
            return False
        mine = _strong(stored.etag)
        return any(_strong(t) == mine for t in tags)
    ims = request_headers.getall("If-Modified-Since", ())
    since = parse_http_date(ims[0]) if len(ims) == 1 else None
    if since is None:
        return False  # invalid, or several lines: the condition is ignored (RFC 9110 §13.1.3)
    modified: float | None = None
    if stored.last_modified is not None:
        modified = parse_http_date(stored.last_modified)
    else:
        date = next((v for k, v in stored.headers if k.lower() == "date"), None)
        modified = parse_http_date(date) if date is not None else stored.response_time
    return modified is not None and modified <= since


def precondition_failed(request_headers: Headers, stored: StoredResponse) -> bool:
    """Does the client's If-Match, or else its If-Unmodified-Since, evaluate false against the
    stored response (RFC 9110 §13.2.2 steps 1-2): a 412, whatever else the request asks?

    Evaluated as the origin would on a GET or HEAD, and only on a stored 2xx: a server ignores
    preconditions where its answer without them would not be 2xx (§13.2.1). If-Match
    (§13.1.1) uses the strong comparison: ``*`` holds for any stored 2xx, a weak or missing
    stored ETag matches no listed tag. If-Unmodified-Since (§13.1.4) counts only without
    If-Match, needs a stored Last-Modified (without one it is ignored) and one valid date (an
    invalid one, or several lines, is ignored, as for If-Modified-Since). When both hold (or
    are absent), If-None-Match and If-Modified-Since decide next (``client_not_modified``).

    >>> from proxy.policy.messages import Freshness
    >>> from multidict import CIMultiDict
    >>> s = StoredResponse(200, "OK", (), 0, 0, Freshness(10, "max-age", 0, 0), etag='"v1"',
    ...                    last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
    >>> tags = ('"v1"', '"a", "v1"', "*", '"v2"', 'W/"v1"')
    >>> [precondition_failed(CIMultiDict({"If-Match": m}), s) for m in tags]
    [False, False, False, True, True]
    >>> precondition_failed(CIMultiDict({"If-Unmodified-Since": "Sun, 01 Jan 2023 00:00:00 GMT"}), s)
    True
    """
    if not 200 <= stored.status < 300:
        return False
    if_match = request_headers.getall("If-Match", ())
    if if_match:
        tags = etag_list(if_match)
        if "*" in tags:
            return False
        etag = stored.etag.strip() if stored.etag is not None else None
        if etag is None or etag.startswith("W/"):
            return True
        return etag not in tags
    values = request_headers.getall("If-Unmodified-Since", ())
    if len(values) != 1 or stored.last_modified is None:
        return False
    since = parse_http_date(values[0])
    modified = parse_http_date(stored.last_modified)
    return since is not None and modified is not None and modified > since
