"""The fill decision: is a fetched response stored, and as what? (RFC 9111 §3, with the rules)

``decide_fill`` is the one answer to "why was this (not) stored": the engine asks it
for every fill, whole responses and 206 parts alike, and ``cachegate explain`` /
``GET /explain`` render its answer, so the operator's explanation cannot drift from
what the proxy does. It returns ``Fill`` (the ``StoredResponse`` to keep, with its
tags) or ``NoFill`` with the ``Cache-Status`` detail token, decided in this order:

1. a HEAD is filled with a GET, so its answer is decided as the GET's;
2. a rule's ``no_store``: ``RULE-NO-STORE:<rule>``;
3. RFC 9111 §3 (``storability``): ``PRIVATE``, ``NO-STORE``, ``SET-COOKIE``, ...; then a
   body whose end cannot be verified: ``TLS-CLOSE-DELIMITED`` (``Exchange.close_delimited_tls``);
4. the deception guard (``deception``), when the rule turns it on: ``DECEPTION-GUARD``;
5. what is kept: ``ttl_jitter`` shortens the lifetime by a random share (the draw is a
   parameter: this package reads no clock and no random source), a ``Set-Cookie``
   (storable only under ``allow_set_cookie``) is dropped, since the cookie was for the
   client that caused the fill, and so is an ``X-Request-Id`` (the filling request's id,
   which an origin may echo, is nobody else's); this cache's ``Via`` is appended once, and
   the tags are the configured tag fields' plus the rule's.

``freshened`` is the same last step for a stored response a 304 updated (RFC 9111
§4.3.4), and ``shareable_with_followers`` says whether coalesced followers may take a
fill's response as it arrives, or the response a revalidation they joined freshened
(``stored_for_waiters``: the same rule, for the clients of another worker or node that waited
for that fetch and read what it stored from the store); ``arrived`` is the
head of one that is not stored, which its client's conditionals and range are answered
from all the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.deception import deception_refuses
from proxy.policy.fields import latin1_unless_utf8, split_list
from proxy.policy.freshness import carries_credentials, stale_by_date_alone
from proxy.policy.headers import dated, end_to_end
from proxy.policy.messages import CacheOptions, Freshness, HeaderList, Headers, RequestHead, StoredResponse
from proxy.policy.reuse import Serve, decide_lookup, select_variant
from proxy.policy.storability import DontStore, decide_store, decide_store_part
from proxy.policy.validation import freshen_stored

# Fields of an answer that were for the client that caused the fill alone (step 5).
_FILLER_ONLY = ("set-cookie", "x-request-id")
# Details of a response no follower may share whatever its freshness (hit-for-pass: the
# key's next requests skip waiting for each other's fetches for a while). Only what the
# response says: AUTHORIZATION is the request's (one client's header must not turn the key's
# coalescing off for everyone: any client could do it every few seconds).
PASS_DETAILS = frozenset({"PRIVATE", "NO-STORE", "SET-COOKIE", "VARY-STAR", "VARY-INVALID",
                          "VARY-PER-CLIENT"})
# Not stored since nothing may reuse it (a status with no freshness, a lifetime of 0 and no
# validator): hit-for-pass too, as Varnish's hit-for-miss for a ttl <= 0, or every herd on the
# key waited for one answer, then sent a request each (``hit_for_pass``).
UNREUSABLE_DETAILS = frozenset({"UNCACHEABLE-STATUS", "NO-FRESHNESS"})
# Request fields an answer may be about (a Range, preconditions): an answer not stored to a
# request carrying one says nothing of the key's other requests (``hit_for_pass``).
_REQUEST_SPECIFIC = ("range", "if-range", "if-match", "if-none-match", "if-modified-since",
                     "if-unmodified-since")
# The most surrogate keys (tags) one stored response may carry. Each is a row of the index and a
# key of the purge tables; a response naming more is passed on, not stored: keeping only some
# of its tags would leave it out of the purges by the others (Cloudflare's Cache-Tag holds
# ~1,000 tags at most, in its 16 KB).
MAX_TAGS = 1024
# ... and the most bytes (UTF-8) they may take together, for the same reason and with the same
# answer (TOO-MANY-TAGS): an entry's tags are kept three times over, in its metadata and twice
# in the index (the tag's rows and its key's), so a few long tags cost as much as many short
# ones (Cloudflare's Cache-Tag and Fastly's Surrogate-Key: 16 KB per response).
MAX_TAG_BYTES = 16 * 1024


class StoreRules(Protocol):
    """What the rules say about storing one response (``proxy.rules.StorePlan`` is one)."""

    @property
    def options(self) -> CacheOptions: ...
    @property
    def no_store_rule(self) -> str | None: ...  # the name of the rule that says no_store
    @property
    def deception_guard(self) -> bool: ...
    @property
    def ttl_jitter(self) -> float: ...  # a fraction: 0.1 shortens lifetimes by 0-10%
    @property
    def tags(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class FillSettings:
    """This cache's settings that shape what it stores (from the config)."""

    via: str = "1.1 cachegate"  # this cache's member of Via
    tag_headers: tuple[str, ...] = ("surrogate-key", "cache-tag")  # lower-cased


@dataclass(frozen=True, slots=True)
class Exchange:
    """An origin's answer to a request of this cache, with the times around it (RFC 9111 §4.2.3)."""

    request: RequestHead  # the client's request, normalised (a HEAD is filled with a GET)
    status: int
    reason: str
    headers: Headers
    request_time: float
    response_time: float
    # The body came over TLS delimited only by the connection's end (no Content-Length, not
    # chunked): RFC 9112 §9.8 counts it complete only when a TLS close_notify was received,
    # which the transport cannot tell from a bare (perhaps forged) FIN. Relayed, never stored.
    close_delimited_tls: bool = False


@dataclass(frozen=True, slots=True)
class Fill:
    response: StoredResponse  # as stored: jittered, without Set-Cookie, with this cache's Via
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoFill:
    detail: str  # the Cache-Status detail token: PRIVATE, RULE-NO-STORE:<rule>, DECEPTION-GUARD, ...
    expired_by: str = ""  # NO-FRESHNESS: what gave its lifetime of 0 (``DontStore.expired_by``)


def decide_fill(exchange: Exchange, rules: StoreRules, settings: FillSettings, *, jitter: float = 0.0,
                part: bool = False) -> Fill | NoFill:
    """Is this answer stored (``part``: a 206 as a part of its representation), and as what?

    ``jitter``: a draw in [0, 1) that ``ttl_jitter`` scales (0: the longest lifetime).
    ``rules`` are the store-time rules for this answer (for a part: its complete response's).

    >>> from proxy.policy.messages import EMPTY_HEADERS
    >>> from multidict import CIMultiDict, CIMultiDictProxy
    >>> @dataclass(frozen=True)
    ... class Rules:
    ...     options: CacheOptions = CacheOptions(allow_set_cookie=True)
    ...     no_store_rule: str | None = None
    ...     deception_guard: bool = False
    ...     ttl_jitter: float = 0.5
    ...     tags: tuple[str, ...] = ("mine",)
    >>> head = RequestHead("HEAD", "http", "a.example", "/x", EMPTY_HEADERS)
    >>> answer = CIMultiDictProxy(CIMultiDict([("Cache-Control", "max-age=100"), ("Set-Cookie", "s=1"),
    ...                                        ("Surrogate-Key", "k")]))
    >>> fill = decide_fill(Exchange(head, 200, "OK", answer, 0, 0), Rules(), FillSettings(), jitter=0.5)
    >>> fill.response.freshness.lifetime, fill.tags  # max-age=100 less half of ttl_jitter's 50%
    (75.0, ('k', 'mine'))
    >>> fill.response.headers  # no Set-Cookie; a Date (when it was received); this cache's Via
    ... # doctest: +NORMALIZE_WHITESPACE
    (('Cache-Control', 'max-age=100'), ('Surrogate-Key', 'k'), ('Date', 'Thu, 01 Jan 1970 00:00:00 GMT'),
     ('Via', '1.1 cachegate'))
    >>> decide_fill(Exchange(head, 200, "OK", answer, 0, 0), Rules(no_store_rule="api"), FillSettings())
    NoFill(detail='RULE-NO-STORE:api', expired_by='')
    """
    request = exchange.request
    if request.method == "HEAD":
        request = request._replace(method="GET")
    if rules.no_store_rule is not None:
        return NoFill(f"RULE-NO-STORE:{rules.no_store_rule}")
    headers = exchange.headers
    if part:
        decision = decide_store_part(request, exchange.reason, headers, exchange.request_time,
                                     exchange.response_time, rules.options)
    else:
        decision = decide_store(request, exchange.status, exchange.reason, headers, exchange.request_time,
                                exchange.response_time, rules.options)
    if isinstance(decision, DontStore):
        return NoFill(decision.detail, decision.expired_by)
    if exchange.close_delimited_tls:
        return NoFill("TLS-CLOSE-DELIMITED")
    stored = decision.response
    if rules.deception_guard and deception_refuses(request, stored, headers.get("Content-Type")):
        return NoFill("DECEPTION-GUARD")
    if "set-cookie" in headers or "x-request-id" in headers:  # the module docstring, step 5
        stored = replace(stored, headers=tuple((k, v) for k, v in stored.headers
                                               if k.lower() not in _FILLER_ONLY))
    stored = _as_kept(stored, rules, settings, jitter)
    tags = tuple(dict.fromkeys(tags_from_headers(headers, settings.tag_headers) + tuple(rules.tags)))
    if tags and (len(tags) > MAX_TAGS or tag_bytes(tags) > MAX_TAG_BYTES):
        return NoFill("TOO-MANY-TAGS")
    return Fill(stored, tags)


def tag_bytes(tags: Iterable[str]) -> int:
    """What ``tags`` take together, in UTF-8 (``MAX_TAG_BYTES``; a tag read as Latin-1 is counted
    as the UTF-8 it is stored as).

    >>> tag_bytes(("a", "café"))
    6
    """
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in tags)


def freshened(stored: StoredResponse, update: Exchange, rules: StoreRules, settings: FillSettings, *,
              jitter: float = 0.0) -> StoredResponse | None:
    """``stored`` updated by the 304 ``update`` (RFC 9111 §4.3.4: ``freshen_stored``) and kept as
    a fill is; None when the 304 says it may no longer be kept (no-store, private)."""
    fields = update.headers
    if "x-request-id" in fields:  # the revalidating request's id, echoed: not the stored response's
        fields = CIMultiDictProxy(CIMultiDict((k, v) for k, v in fields.items()
                                              if k.lower() != "x-request-id"))
    updated = freshen_stored(stored, fields, update.request_time, update.response_time,
                             rules.options, credentials=carries_credentials(update.request.headers))
    if updated is None:
        return None
    return _as_kept(updated, rules, settings, jitter)  # a 304's Via replaced ours


def worth_freshening_others(updated: StoredResponse) -> bool:
    """Are the key's other variants with the 304's strong ETag worth freshening with it (RFC
    9111 §4.3.4 allows it)? Only when that lets one be used without asking the origin: fresh
    on arrival, or stale within a window it may be served in (stale-while-revalidate,
    stale-if-error). A ``no-cache`` response, or one stale on arrival that may not be served
    stale, is revalidated before each use, freshened or not: rewriting the siblings gains
    nothing, and for a ``no-cache`` page it would be done on every request.

    >>> from proxy.policy.messages import Freshness as F
    >>> def r(f: F) -> StoredResponse: return StoredResponse(200, "OK", (), 0.0, 0.0, f)
    >>> worth_freshening_others(r(F(60.0, "max-age", 0.0, 0.0)))
    True
    >>> worth_freshening_others(r(F(60.0, "max-age", 0.0, 0.0, no_cache=True)))
    False
    >>> worth_freshening_others(r(F(0.0, "max-age", 0.0, 0.0)))  # stale on arrival
    False
    >>> worth_freshening_others(r(F(10.0, "max-age", 10.0, 0.0)))  # its Age used its lifetime up
    False
    >>> worth_freshening_others(r(F(0.0, "max-age", 0.0, 0.0, stale_if_error=60.0)))
    True
    >>> worth_freshening_others(r(F(0.0, "max-age", 0.0, 0.0, must_revalidate=True, stale_if_error=60.0)))
    False
    """
    f = updated.freshness
    if f.no_cache:
        return False
    if f.ttl(f.response_time) > 0:
        return True
    return f.may_serve_stale() and (f.stale_while_revalidate > 0 or f.stale_if_error > 0)


def hit_for_pass(detail: str, status: int, request_headers: Headers) -> bool:
    """Is the key marked hit-for-pass (``cache.hit_for_pass``) after an answer not stored for
    ``detail``? Its next requests go upstream each at once, rather than wait for one another's
    fetch of an answer that none of them may share. A storable answer among them is still
    stored, and ends the mark (``MissPath.answer_unshared``).

    ``UNREUSABLE_DETAILS`` only when the request cannot have caused them, since one client's
    request must not turn the key's coalescing off for everyone (any client could do it every
    few seconds, a revalidation stampede on a stale key too): an ``UNCACHEABLE-STATUS`` only
    for a 5xx (a 400, 401, 403 or 429 is the origin refusing that request: its huge Cookie,
    its rate limit); a 206 or a 304 answers the client's own range or preconditions; and
    neither when the request carried credentials (a Cookie or Authorization: the answer may be
    about that client, and gets no heuristic lifetime), a Range or preconditions.
    (The request's fields are read only then: most fills are stored.)

    >>> from multidict import CIMultiDict
    >>> plain, cookie = CIMultiDict(), CIMultiDict({"Cookie": "s=1"})
    >>> hit_for_pass("PRIVATE", 200, cookie), hit_for_pass("NO-FRESHNESS", 200, plain)
    (True, True)
    >>> hit_for_pass("NO-FRESHNESS", 200, cookie), hit_for_pass("UNCACHEABLE-STATUS", 304, plain)
    (False, False)
    >>> hit_for_pass("UNCACHEABLE-STATUS", 503, plain), hit_for_pass("TOO-LARGE", 200, plain)
    (True, False)
    >>> [s for s in (400, 401, 403, 429, 500, 502, 503, 504) if hit_for_pass("UNCACHEABLE-STATUS", s, plain)]
    [500, 502, 503, 504]
    >>> ranged = CIMultiDict({"Range": "bytes=0-9"})
    >>> hit_for_pass("UNCACHEABLE-STATUS", 503, cookie), hit_for_pass("UNCACHEABLE-STATUS", 503, ranged)
    (False, False)
    """
    if detail in PASS_DETAILS:
        return True
    if detail == "UNCACHEABLE-STATUS":
        if status < 500:
            return False
    elif detail != "NO-FRESHNESS" or status < 200 or status in (206, 304):
        return False
    return not carries_credentials(request_headers) and not any(
        name in request_headers for name in _REQUEST_SPECIFIC)


def shareable_with_followers(stored: StoredResponse, now: float, *, validated: bool = False) -> bool:
    """May the clients that joined a fetch take its response as it arrives (``now``: on arrival)?
    ``validated``: the fetch was a revalidation the origin answered 304, and ``stored`` the
    response it freshened. The one rule for a fetch's followers in its own worker (the flight's
    head says it) and for the clients of another worker or node that waited for it
    (``stored_for_waiters``).

    A fill's response: when it is fresh then, and not ``no-cache``: a response already stale
    would otherwise be reused without the validation it needs. Also when it is stale on arrival
    only through its Date's apparent age (``stale_by_date_alone``: the origin's clock is behind
    this one by more than its lifetime, while its ``Age`` field and the delay leave it fresh):
    they waited for exactly that fetch, made after they asked, and each fetch of their own
    would arrive just as stale (8 clients of a herd went to the origin one after the other). A
    lifetime of 0 (``max-age=0``), ``no-cache`` or an ``Age`` field that makes it stale still
    send them on.

    A revalidation's 304: always (RFC 9111 §4.3.4). It is the validation their requests waited
    for, made after they asked: a ``no-cache`` response (validated before each use) has had it,
    and one stale on arrival (a lifetime shorter than the 304 took) was just confirmed; each of
    them sending it again gets the same 304 (one conditional request per worker, each waiting
    the origin's time again). Varnish's waiting-list rework takes the same view ("a waiting
    list match is a formal revalidation"). A request that comes after the validation ended
    joined nothing: it is looked up, and a ``no-cache`` response is revalidated for it.

    >>> from proxy.policy.httpdate import format_http_date
    >>> def r(initial_age: float, *fields: tuple[str, str], no_cache: bool = False) -> StoredResponse:
    ...     return StoredResponse(200, "OK", (("Date", format_http_date(93_000.0)), *fields), 100_000.0,
    ...                           100_000.0, Freshness(600.0, "max-age", initial_age, 100_000.0,
    ...                                                no_cache=no_cache))
    >>> shareable_with_followers(r(0.0), 100_000.0), shareable_with_followers(r(7000.0), 100_000.0)
    (True, True)
    >>> shareable_with_followers(r(7000.0, ("Age", "900")), 100_000.0)
    False
    >>> shareable_with_followers(r(0.0, no_cache=True), 100_000.0)
    False
    >>> shareable_with_followers(r(0.0, no_cache=True), 100_000.0, validated=True)
    True
    """
    if validated:
        return True
    freshness = stored.freshness
    if freshness.no_cache:
        return False
    return freshness.ttl(now) > 0 or stale_by_date_alone(stored) > 0


def stored_for_waiters(request: RequestHead, candidates: Sequence[StoredResponse], now: float,
                       options: CacheOptions, since: float | None = None, *, validated: bool = False
                       ) -> int | None:
    """Which of the ``candidates`` (the key's variants, read from the store once another worker
    or node said it stored the key) answers the clients of a flight that did not fetch: a fresh
    hit for ``request`` (``decide_lookup``); else, when the flight waited for that fetch
    (``since``: this clock when its wait began; None: it did not wait), the variant ``request``
    selects when that fetch stored it and this worker's own followers of it would have taken
    it (``shareable_with_followers`` on arrival: stale only through its Date, the origin's
    clock behind; or, ``validated``, whatever its freshness: that fetch was a revalidation the
    origin answered 304, which freshened it). None: fetch (revalidate) as for any stale response.

    "That fetch stored it" is its ``response_time`` (when its head arrived; a 304's, for a
    response it freshened) at or after ``since``: a response stored before the wait began
    is an older one, stale as any, and is never taken so. Not the body id: a 304 keeps it,
    a flight does not keep the ids of what its lookup saw (a stale variant forwarded without
    a validator, another Vary's), and an adopted copy gets this node's own. A head that arrived
    before the wait began, its body after (a slow body), is not taken: fetched, as before.
    Across nodes it compares two machines' clocks (synchronised, as docs/cluster.md asks).

    >>> from proxy.policy.httpdate import format_http_date
    >>> def r(arrival: float, *fields: tuple[str, str]) -> StoredResponse:
    ...     return StoredResponse(200, "OK", (("Date", format_http_date(arrival - 7200)), *fields), arrival,
    ...                           arrival, Freshness(600.0, "max-age", 7200.0, arrival))
    >>> get = RequestHead("GET", "http", "a.example", "/", CIMultiDictProxy(CIMultiDict()))
    >>> options = CacheOptions()
    >>> stored_for_waiters(get, [r(100_000.0)], 100_001.0, options, since=99_998.0)  # stored after: taken
    0
    >>> stored_for_waiters(get, [r(100_000.0)], 100_001.0, options, since=100_000.5)  # before the wait
    >>> stored_for_waiters(get, [r(100_000.0)], 100_001.0, options)  # no wait: a fresh hit only
    >>> stored_for_waiters(get, [r(100_000.0, ("Age", "900"))], 100_001.0, options, since=99_998.0)
    >>> stored_for_waiters(get, [r(100_000.0, ("Age", "900"))], 100_001.0, options, since=99_998.0,
    ...                    validated=True)  # a 304 freshened it: the validation they waited for
    0
    """
    decision = decide_lookup(request, candidates, now, options)
    if isinstance(decision, Serve) and decision.status == "HIT":
        return decision.index
    if since is None:
        return None
    index = select_variant(request, candidates)
    if index is None:
        return None
    stored = candidates[index]
    if stored.response_time < since or stored.invalidated \
            or not shareable_with_followers(stored, stored.response_time, validated=validated):
        return None
    return index


def arrived(status: int, reason: str, headers: Headers, response_time: float) -> StoredResponse:
    """A response that is not stored, as the head its client's conditionals and range are
    answered from (``proxy.policy.reply.reply_on_arrival``): what that answer reads of a stored
    one (its status, ETag, Last-Modified, Date) read the same way, so a response is answered
    alike whether or not it is stored. A fill sends the origin neither (it must get the whole
    response to store it), and a private, too large or ``no-store`` one got the whole 200 to
    an If-None-Match that matched, a failed If-Match, a Range. Nothing reuses it: no freshness.

    >>> r = arrived(200, "OK", CIMultiDict({"ETag": '"a"'}), 7.0)
    >>> r.etag, r.last_modified, r.headers, r.freshness.lifetime
    ('"a"', None, (('ETag', '"a"'), ('Date', 'Thu, 01 Jan 1970 00:00:07 GMT')), 0)
    """
    return StoredResponse(status, reason, dated(end_to_end(headers), response_time), response_time,
                          response_time, Freshness(0, "none", 0, response_time),
                          etag=headers.get("ETag"), last_modified=headers.get("Last-Modified"))


def _as_kept(stored: StoredResponse, rules: StoreRules, settings: FillSettings, jitter: float
             ) -> StoredResponse:
    # This cache's Via goes into the stored head once, so every hit carries it (the fast
    # path's pre-built heads too) at no cost per request.
    # Built field by field: ``dataclasses.replace`` costs ≈ 3 µs per fill (``timeit``), about a
    # tenth of the whole decision; _STORED_FIELDS fails at import if the fields change.
    return StoredResponse(stored.status, stored.reason, with_via(stored.headers, settings.via),
                          stored.request_time, stored.response_time,
                          jittered(stored.freshness, rules.ttl_jitter, jitter), stored.vary, stored.etag,
                          stored.last_modified, stored.invalidated, stored.credentials, stored.authorization)


_STORED_FIELDS = ("status", "reason", "headers", "request_time", "response_time", "freshness", "vary",
                  "etag", "last_modified", "invalidated", "credentials", "authorization")
assert tuple(f.name for f in fields(StoredResponse)) == _STORED_FIELDS, "update _as_kept"


def jittered(freshness: Freshness, fraction: float, draw: float) -> Freshness:
    """``ttl_jitter``: the lifetime shortened by ``draw`` (in [0, 1)) times ``fraction``, never lengthened.

    Entries stored together then expire apart, and an origin's max-age is never exceeded.

    >>> jittered(Freshness(100.0, "max-age", 0.0, 0.0), 0.1, 0.5).lifetime
    95.0
    """
    if not fraction or freshness.lifetime <= 0:
        return freshness
    return replace(freshness, lifetime=freshness.lifetime * (1 - draw * fraction))


def with_via(headers: HeaderList, via: str) -> HeaderList:
    """Stored fields with ``via`` (this cache's Via entry) as the last member of Via, once.

    >>> once = with_via((("Via", "1.1 lb"), ("X", "1")), "1.1 cachegate")
    >>> once, with_via(once, "1.1 cachegate") == once
    ((('X', '1'), ('Via', '1.1 lb, 1.1 cachegate')), True)
    """
    values = [v for k, v in headers if k.lower() == "via"]
    if not values:
        return (*headers, ("Via", via))
    members = split_list(values)
    if members and members[-1] == via:
        return headers
    others = tuple((k, v) for k, v in headers if k.lower() != "via")
    return (*others, ("Via", ", ".join((*members, via))))


def tags_from_headers(headers: Headers, names: Iterable[str]) -> tuple[str, ...]:
    """Surrogate keys from the response fields ``names`` (``cache.tag_headers``), in order, deduplicated.

    ``Surrogate-Key`` is space separated (Fastly), ``Cache-Tag`` comma separated
    (Cloudflare, where a tag may contain spaces); any other configured field is split
    on commas and whitespace both (``X-Magento-Tags: a,b``, ``X-Drupal-Cache-Tags: a b``).

    A field line whose bytes are not UTF-8 is read as Latin-1 (``caf\\xe9`` is the tag
    ``café``, as the UTF-8 ``café`` is): the parser hands such a byte over as a lone
    surrogate, which the tag index cannot hold nor a purge request name.

    >>> from multidict import CIMultiDict
    >>> h = CIMultiDict([("Surrogate-Key", "a  b"), ("Cache-Tag", "c d, e"), ("X-Tags", "f,g h")])
    >>> tags_from_headers(h, ["surrogate-key", "cache-tag", "x-tags"])
    ('a', 'b', 'c d', 'e', 'f', 'g', 'h')
    >>> tags_from_headers(CIMultiDict([("Surrogate-Key", "caf\\udce9 x"), ("Surrogate-Key", "café")]),
    ...                   ["surrogate-key"])
    ('café', 'x')
    """
    tags: list[str] = []
    for name in names:
        lname = name.lower()
        for line in headers.getall(name, ()):
            line = latin1_unless_utf8(line) or line  # (the function's docstring)
            if lname == "surrogate-key":
                parts = line.split()
            elif lname == "cache-tag":
                parts = line.split(",")
            else:
                parts = re.split(r"[,\s]+", line)
            tags.extend(t.strip() for t in parts if t.strip())
    return tuple(dict.fromkeys(tags))
