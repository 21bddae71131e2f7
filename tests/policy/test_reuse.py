"""May a stored response satisfy this request? (RFC 9111 §4, §5.2.1, RFC 5861, RFC 8246)

Every stored response below arrived at T0; ``now`` is T0 plus the seconds in the table.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.policy.messages import CacheOptions, RequestHead, StoredResponse
from proxy.policy.ranges import request_range
from proxy.policy.reuse import (
    CLIENT_NO_CACHE,
    NO_VALIDATOR,
    SPELLED_OTHERWISE,
    Forward,
    FromPart,
    LookupDecision,
    OnlyIfCachedMiss,
    Revalidate,
    Serve,
    decide_lookup,
    decide_part_lookup,
    refresh_retry_at,
)
from proxy.policy.storability import Store, decide_store_part
from tests.policy.build import T0, date, headers, request, stored

Pairs = list[tuple[str, str]]
ETAG = ("ETag", '"v1"')


def lookup(response: Pairs, after: float, *req_fields: tuple[str, str],
           options: CacheOptions | None = None, method: str = "GET") -> LookupDecision:
    s = stored(response)
    return decide_lookup(request(*req_fields, method=method), [s], T0 + after, options or CacheOptions())


def kind(decision: LookupDecision) -> str:
    match decision:
        case Serve():
            return f"serve {decision.status}" + (" refresh" if decision.refresh else "")
        case Revalidate():
            return f"revalidate {decision.fwd}" + (" sie" if decision.stale_if_error else "")
        case Forward():
            return f"forward {decision.fwd}" + (" sie" if decision.stale_index is not None else "")
        case OnlyIfCachedMiss():
            return "504"
    raise AssertionError(decision)


# (case, response fields, seconds after storing, request fields, expected decision)
CASES: list[tuple[str, Pairs, float, Pairs, str]] = [
    ("a fresh response is served (RFC 9111 §4.2)", [("Cache-Control", "max-age=60")], 10, [], "serve HIT"),
    ("a stale response with a validator is revalidated (RFC 9111 §4.3.1)",
     [("Cache-Control", "max-age=60"), ETAG], 61, [], "revalidate stale"),
    ("a stale response without a validator is fetched again",
     [("Cache-Control", "max-age=60")], 61, [], "forward stale"),
    ("age equal to the lifetime is already stale (fresh means lifetime > age)",
     [("Cache-Control", "max-age=60")], 60, [], "forward stale"),
    ("stored while the clock was a day ahead (it went back since): stale, revalidated",
     [("Cache-Control", "max-age=60"), ETAG], -86400, [], "revalidate stale"),
    ("stored while the clock was a day ahead, no validator: fetched again",
     [("Cache-Control", "max-age=60")], -86400, [], "forward stale"),
    ("stored 30 s ahead of the clock (within CLOCK_SLACK): fresh, as stored",
     [("Cache-Control", "max-age=60")], -30, [], "serve HIT"),
    ("an unknown request directive changes nothing (RFC 9111 §5.2.3)",
     [("Cache-Control", "max-age=60")], 10, [("Cache-Control", "nothing-to-see-here"), ("Pragma", "foo")],
     "serve HIT"),
    ("request no-cache goes to the origin (RFC 9111 §5.2.1.4)",
     [("Cache-Control", "max-age=60"), ETAG], 10, [("Cache-Control", "no-cache")], "forward request"),
    ("Pragma: no-cache counts when there is no Cache-Control (RFC 9111 §5.4)",
     [("Cache-Control", "max-age=60")], 10, [("Pragma", "no-cache")], "forward request"),
    ("Pragma: no-cache is ignored beside a Cache-Control",
     [("Cache-Control", "max-age=60")], 10, [("Pragma", "no-cache"), ("Cache-Control", "max-stale")],
     "serve HIT"),
    ("request max-age=0 revalidates a fresh response (RFC 9111 §5.2.1.1)",
     [("Cache-Control", "max-age=60"), ETAG], 10, [("Cache-Control", "max-age=0")], "revalidate request"),
    ("request max-age above the age is satisfied (RFC 9111 §5.2.1.1)",
     [("Cache-Control", "max-age=60")], 10, [("Cache-Control", "max-age=20")], "serve HIT"),
    ("request min-fresh asks for that much freshness left (RFC 9111 §5.2.1.3)",
     [("Cache-Control", "max-age=60")], 10, [("Cache-Control", "min-fresh=55")], "forward request"),
    ("request min-fresh within the lifetime is satisfied",
     [("Cache-Control", "max-age=60")], 10, [("Cache-Control", "min-fresh=30")], "serve HIT"),
    ("request max-stale accepts a stale response within its bound (RFC 9111 §5.2.1.2)",
     [("Cache-Control", "max-age=60")], 70, [("Cache-Control", "max-stale=20")], "serve STALE"),
    ("request max-stale beyond its bound does not",
     [("Cache-Control", "max-age=60")], 100, [("Cache-Control", "max-stale=20")], "forward stale"),
    ("max-stale without a value accepts any staleness",
     [("Cache-Control", "max-age=60")], 10_000, [("Cache-Control", "max-stale")], "serve STALE"),
    ("must-revalidate overrides max-stale (RFC 9111 §5.2.2.2)",
     [("Cache-Control", "max-age=60, must-revalidate"), ETAG], 70, [("Cache-Control", "max-stale")],
     "revalidate stale"),
    ("s-maxage overrides max-stale (RFC 9111 §5.2.2.10)",
     [("Cache-Control", "s-maxage=60")], 70, [("Cache-Control", "max-stale")], "forward stale"),
    ("only-if-cached with a fresh response serves it (RFC 9111 §5.2.1.7)",
     [("Cache-Control", "max-age=60")], 10, [("Cache-Control", "only-if-cached")], "serve HIT"),
    ("only-if-cached with only a stale response answers 504 (RFC 9111 §5.2.1.7)",
     [("Cache-Control", "max-age=60"), ETAG], 70, [("Cache-Control", "only-if-cached")], "504"),
    ("only-if-cached with no-cache answers 504",
     [("Cache-Control", "max-age=60")], 10, [("Cache-Control", "only-if-cached, no-cache")], "504"),
    ("response no-cache is revalidated even when fresh (RFC 9111 §5.2.2.4)",
     [("Cache-Control", "max-age=60, no-cache"), ETAG], 10, [], "revalidate stale"),
    ("stale-while-revalidate serves stale and refreshes once (RFC 5861 §3)",
     [("Cache-Control", "max-age=60, stale-while-revalidate=30"), ETAG], 80, [], "serve UPDATING refresh"),
    ("a request's max-stale bounds stale-while-revalidate too (RFC 9111 §5.2.1.1)",
     [("Cache-Control", "max-age=60, stale-while-revalidate=600"), ETAG], 63, [("Cache-Control", "max-stale=1")],
     "revalidate stale"),
    ("max-stale=0 refuses any stale response, stale-while-revalidate's too",
     [("Cache-Control", "max-age=60, stale-while-revalidate=600")], 63, [("Cache-Control", "max-stale=0")],
     "forward stale"),
    ("a max-stale bound still keeps the response for stale-if-error",
     [("Cache-Control", "max-age=60, stale-while-revalidate=600, stale-if-error=600"), ETAG], 63,
     [("Cache-Control", "max-stale=1")], "revalidate stale sie"),
    ("within a max-stale bound it is served stale (no refresh: the client accepts it)",
     [("Cache-Control", "max-age=60, stale-while-revalidate=600"), ETAG], 63, [("Cache-Control", "max-stale=5")],
     "serve STALE"),
    ("past stale-while-revalidate the response is revalidated first",
     [("Cache-Control", "max-age=60, stale-while-revalidate=30"), ETAG], 100, [], "revalidate stale"),
    ("stale-if-error keeps the stale response for an origin failure (RFC 5861 §4)",
     [("Cache-Control", "max-age=60, stale-if-error=100"), ETAG], 100, [], "revalidate stale sie"),
    ("past stale-if-error an origin failure passes through",
     [("Cache-Control", "max-age=60, stale-if-error=100"), ETAG], 200, [], "revalidate stale"),
    ("stale-if-error without a validator keeps the stale response too",
     [("Cache-Control", "max-age=60, stale-if-error=100")], 100, [], "forward stale sie"),
    ("a request's own stale-if-error allows it (RFC 5861 §4)",
     [("Cache-Control", "max-age=60"), ETAG], 100, [("Cache-Control", "stale-if-error=60")],
     "revalidate stale sie"),
    ("must-revalidate is never served stale on error, whatever stale-if-error says",
     [("Cache-Control", "max-age=60, must-revalidate, stale-if-error=100"), ETAG], 100, [],
     "revalidate stale"),
    ("a fresh immutable response ignores a reload's max-age=0 (RFC 8246 §2.1)",
     [("Cache-Control", "max-age=60, immutable")], 10, [("Cache-Control", "max-age=0")], "serve HIT"),
    ("a fresh immutable response still honours no-cache",
     [("Cache-Control", "max-age=60, immutable")], 10, [("Cache-Control", "no-cache")], "forward request"),
    ("a stale immutable response is revalidated",
     [("Cache-Control", "max-age=60, immutable"), ETAG], 70, [], "revalidate stale"),
    ("a Date far in the future does not make the response fresher",
     [("Cache-Control", "max-age=60"), ("Date", "Tue, 01 Jan 2999 00:00:00 GMT")], 61, [], "forward stale"),
]


@pytest.mark.parametrize(("case", "response", "after", "req", "expected"), CASES, ids=[c[0] for c in CASES])
def test_stored_responses_are_reused_only_as_rfc_9111_section_4_allows(
    case: str, response: Pairs, after: float, req: Pairs, expected: str
) -> None:
    assert kind(lookup(response, after, *req)) == expected


def test_a_hit_reports_age_and_remaining_freshness() -> None:
    d = lookup([("Cache-Control", "max-age=60"), ("Age", "5")], 10)
    assert isinstance(d, Serve)
    assert (d.age, d.ttl) == (15, 45)


def test_unsafe_methods_are_never_looked_up_rfc_9111_section_4() -> None:
    assert kind(lookup([("Cache-Control", "max-age=60")], 1, method="POST")) == "forward method"


def test_head_is_answered_from_a_stored_get_rfc_9110_section_9_3_2() -> None:
    assert kind(lookup([("Cache-Control", "max-age=60")], 1, method="HEAD")) == "serve HIT"


def test_nothing_stored_is_a_uri_miss_and_only_if_cached_gets_504() -> None:
    options = CacheOptions()
    assert decide_lookup(request(), [], T0, options) == Forward("uri-miss")
    assert decide_lookup(request(("Cache-Control", "only-if-cached")), [], T0, options) == OnlyIfCachedMiss(unmatched=True)


def test_only_if_cached_says_whether_a_stored_response_needs_validation_or_none_matches() -> None:
    """The 504's detail tells "nothing stored" from "stored, but it needs the origin first"
    (RFC 9111 §5.2.1.7 allows neither to be served): a client asking whether something is
    stored (``cachegate warm``) read a stored ``no-cache`` response as nothing stored."""
    oic = request(("Cache-Control", "only-if-cached"))
    nothing = decide_lookup(oic, [], T0, CacheOptions())
    assert isinstance(nothing, OnlyIfCachedMiss) and nothing.detail == "ONLY-IF-CACHED"
    for cc, now in (("no-cache, max-age=60", T0 + 1), ("max-age=60", T0 + 61)):
        decision = decide_lookup(oic, [stored([("Cache-Control", cc)])], now, CacheOptions())
        assert decision == OnlyIfCachedMiss(unmatched=False)
        assert isinstance(decision, OnlyIfCachedMiss) and decision.detail == "ONLY-IF-CACHED-NEEDS-VALIDATION"


VARY = [
    ("the same selecting value matches (RFC 9111 §4.1)", [("Foo", "1")], 0),
    ("unlisted fields do not matter", [("Foo", "1"), ("Bar", "a")], 0),
    ("an empty line beside the value is another value", [("Foo", "1"), ("Foo", "")], None),
    ("another value does not match", [("Foo", "2")], None),
    ("an absent field matches only an absent field", [], 1),
]


@pytest.mark.parametrize(("case", "req", "index"), VARY, ids=[v[0] for v in VARY])
def test_vary_selects_the_stored_variant_whose_selecting_fields_match_rfc_9111_section_4_1(
    case: str, req: Pairs, index: int | None
) -> None:
    response = [("Cache-Control", "max-age=60"), ("Vary", "Foo")]
    with_foo = stored(response, req=request(("Foo", "1")))
    without = stored(response, req=request())
    decision = decide_lookup(request(*req), [with_foo, without], T0 + 1, CacheOptions())
    if index is None:
        assert decision == Forward("vary-miss")
    else:
        assert isinstance(decision, Serve) and decision.index == index


def test_the_most_recently_stored_matching_variant_wins_rfc_9111_section_4_1() -> None:
    older = stored([("Cache-Control", "max-age=600")])
    newer = replace(older, response_time=T0 + 5, freshness=replace(older.freshness, response_time=T0 + 5))
    decision = decide_lookup(request(), [older, newer], T0 + 10, CacheOptions())
    assert isinstance(decision, Serve) and decision.index == 1


def test_a_client_conditional_that_matches_is_answered_304_rfc_9110_section_13_2_2() -> None:
    d = lookup([("Cache-Control", "max-age=60"), ETAG], 1, ("If-None-Match", 'W/"v1", "v9"'))
    assert isinstance(d, Serve) and d.not_modified
    d = lookup([("Cache-Control", "max-age=60"), ETAG], 1, ("If-None-Match", '"v9"'))
    assert isinstance(d, Serve) and not d.not_modified


# (case, seconds after storing, request fields, expected decision): a variant stored for
# ``X-Tenant: acme`` (Vary: X-Tenant, max-age=60, an ETag, stale-while-revalidate=30 when "swr")
SPELLED: list[tuple[str, float, Pairs, str]] = [
    ("fresh: served, as to a client sending the field alone", 1,
     [("X-Tenant", "acme"), ("X_Tenant", "evil")], "serve HIT"),
    ("stale, a clean request: revalidated", 61, [("X-Tenant", "acme")], "revalidate stale"),
    ("stale, the field spelled with _ too: fetched without validators, never revalidated", 61,
     [("X-Tenant", "acme"), ("X_Tenant", "evil")], "forward stale"),
    ("a client max-age, the field spelled with _ too: fetched without validators", 10,
     [("X-Tenant", "acme"), ("x_tenant", "evil"), ("Cache-Control", "max-age=0")], "forward request"),
    ("within stale-while-revalidate: served stale without a refresh by this request", 70,
     [("X-Tenant", "acme"), ("X_Tenant", "evil")], "serve UPDATING swr"),
    ("within stale-while-revalidate, a clean request: served stale and refreshed", 70,
     [("X-Tenant", "acme")], "serve UPDATING refresh swr"),
    ("another _ field changes nothing", 61, [("X-Tenant", "acme"), ("X_Other", "1")], "revalidate stale"),
]


@pytest.mark.parametrize(("case", "after", "req", "expected"), SPELLED, ids=[c[0] for c in SPELLED])
def test_a_request_carrying_a_selecting_field_spelled_otherwise_never_revalidates_the_variant(
        case: str, after: float, req: Pairs, expected: str) -> None:
    swr = expected.endswith(" swr")
    cc = "max-age=60, stale-while-revalidate=30" if swr else "max-age=60"
    s = stored([("Cache-Control", cc), ("Vary", "X-Tenant"), ETAG], req=request(("X-Tenant", "acme")))
    decision = decide_lookup(request(*req), [s], T0 + after, CacheOptions())
    assert kind(decision) == expected.removesuffix(" swr")


def test_a_no_cache_turned_into_a_revalidation_is_not_one_for_a_field_spelled_otherwise() -> None:
    s = stored([("Cache-Control", "max-age=60"), ("Vary", "X-Tenant"), ETAG], req=request(("X-Tenant", "acme")))
    options = CacheOptions(client_cache_control="revalidate")
    clean = request(("X-Tenant", "acme"), ("Cache-Control", "no-cache"))
    spelled = request(("X-Tenant", "acme"), ("X_Tenant", "evil"), ("Cache-Control", "no-cache"))
    assert kind(decide_lookup(clean, [s], T0 + 1, options)) == "revalidate request"
    assert decide_lookup(spelled, [s], T0 + 1, options) == Forward("request", full_fetch=SPELLED_OTHERWISE)


# (case, response fields, seconds after storing, request fields, client_cache_control, why):
# a stored response that matches, fetched in full rather than revalidated.
FULL_FETCHES: list[tuple[str, Pairs, float, Pairs, str, str]] = [
    ("a client no-cache under honor, though it has a validator", [("Cache-Control", "max-age=60"), ETAG], 1,
     [("Cache-Control", "no-cache")], "honor", CLIENT_NO_CACHE),
    ("Pragma: no-cache under honor", [("Cache-Control", "max-age=60"), ETAG], 1, [("Pragma", "no-cache")],
     "honor", CLIENT_NO_CACHE),
    ("a client no-cache under revalidate, no validator", [("Cache-Control", "max-age=60")], 1,
     [("Cache-Control", "no-cache")], "revalidate", NO_VALIDATOR),
    ("a client max-age=0, no validator", [("Cache-Control", "max-age=60")], 1, [("Cache-Control", "max-age=0")],
     "honor", NO_VALIDATOR),
    ("stale, no validator", [("Cache-Control", "max-age=60")], 61, [], "honor", NO_VALIDATOR),
]


@pytest.mark.parametrize(("case", "response", "after", "req", "mode", "why"), FULL_FETCHES,
                         ids=[c[0] for c in FULL_FETCHES])
def test_a_full_fetch_of_a_stored_response_says_why_it_is_not_a_revalidation(
        case: str, response: Pairs, after: float, req: Pairs, mode: str, why: str) -> None:
    options = CacheOptions(client_cache_control=mode)  # type: ignore[arg-type]
    d = lookup(response, after, *req, options=options)
    assert isinstance(d, Forward) and d.full_fetch == why


MODES = [
    ("honor", "forward request"),
    ("revalidate", "revalidate request"),
    ("ignore", "serve HIT"),
]


@pytest.mark.parametrize(("mode", "expected"), MODES)
def test_rules_decide_what_a_client_no_cache_does(mode: str, expected: str) -> None:
    options = CacheOptions(client_cache_control=mode)  # type: ignore[arg-type]
    d = lookup([("Cache-Control", "max-age=60"), ETAG], 1, ("Cache-Control", "no-cache"), options=options)
    assert kind(d) == expected


def test_a_soft_purged_response_is_served_while_it_refreshes() -> None:
    s: StoredResponse = replace(stored([("Cache-Control", "max-age=60"), ETAG]), invalidated=True)
    d = decide_lookup(request(), [s], T0 + 1, CacheOptions())
    assert kind(d) == "serve UPDATING refresh"
    assert isinstance(d, Serve) and d.ttl == 0  # stale since the purge, whatever max-age had left
    assert s.ttl(T0 + 1) == 0
    already_stale = replace(s, freshness=replace(s.freshness, lifetime=0.5))
    assert already_stale.ttl(T0 + 1) == -0.5


def test_a_soft_purged_must_revalidate_response_is_revalidated_first() -> None:
    s = replace(stored([("Cache-Control", "max-age=60, must-revalidate"), ETAG]), invalidated=True)
    assert kind(decide_lookup(request(), [s], T0 + 1, CacheOptions())) == "revalidate stale"


RULES_SIE = CacheOptions(stale_if_error=3600)
# (case, response fields, rules' options, seconds after storing, refresh failed, expected): the
# response was soft-purged some time after it was stored.
SOFT: list[tuple[str, Pairs, CacheOptions, float, bool, str]] = [
    ("before any refresh failed: served at once, refreshed (the purge's promise)",
     [("Cache-Control", "max-age=60"), ETAG], CacheOptions(), 1, False, "serve UPDATING refresh"),
    ("however stale, before any refresh failed", [("Cache-Control", "max-age=60"), ETAG], CacheOptions(),
     30 * 86400, False, "serve UPDATING refresh"),
    ("max-age=0 too, before any refresh failed", [("Cache-Control", "max-age=0"), ETAG], RULES_SIE,
     1, False, "serve UPDATING refresh"),
    ("its refresh failed, no window: revalidated first, the origin's error passes",
     [("Cache-Control", "max-age=60"), ETAG], CacheOptions(), 1, True, "revalidate stale"),
    ("its refresh failed, no validator: fetched, the origin's error passes",
     [("Cache-Control", "max-age=60")], CacheOptions(), 1, True, "forward stale"),
    ("its refresh failed, 30 days stale: as an un-purged response", [("Cache-Control", "max-age=60"), ETAG],
     CacheOptions(), 30 * 86400, True, "revalidate stale"),
    ("its refresh failed, within the rules' stale_if_error: stale on an origin error",
     [("Cache-Control", "max-age=60"), ETAG], RULES_SIE, 100, True, "revalidate stale sie"),
    ("its refresh failed, past the rules' stale_if_error", [("Cache-Control", "max-age=60"), ETAG], RULES_SIE,
     60 + 3601, True, "revalidate stale"),
    ("its refresh failed, max-age=0: the rules' windows never apply", [("Cache-Control", "max-age=0"), ETAG],
     RULES_SIE, 1, True, "revalidate stale"),
    ("its refresh failed, within its own stale-if-error", [("Cache-Control", "max-age=60, stale-if-error=100"),
                                                           ETAG], CacheOptions(), 150, True, "revalidate stale sie"),
    ("its refresh failed, within its own stale-while-revalidate: still served at once",
     [("Cache-Control", "max-age=60, stale-while-revalidate=100"), ETAG], CacheOptions(), 150, True,
     "serve UPDATING refresh"),
    ("its refresh failed, past its own stale-while-revalidate",
     [("Cache-Control", "max-age=60, stale-while-revalidate=100"), ETAG], CacheOptions(), 161, True,
     "revalidate stale"),
    ("its refresh failed, a client's max-stale still holds", [("Cache-Control", "max-age=60"), ETAG],
     CacheOptions(), 100, True, "serve STALE"),
]


@pytest.mark.parametrize(("case", "response", "options", "after", "failed", "expected"), SOFT,
                         ids=[c[0] for c in SOFT])
def test_a_soft_purged_response_is_an_ordinary_stale_one_once_its_refresh_failed(
        case: str, response: Pairs, options: CacheOptions, after: float, failed: bool, expected: str) -> None:
    """A soft-purged response was served UPDATING however stale for as long as its refresh
    failed, whatever its own windows (max-age=60 then an origin 500: UPDATING after 30 days,
    where the same response un-purged got the origin's 500): more than not purging."""
    s = replace(stored(response, options=options), invalidated=True)
    req = [("Cache-Control", "max-stale")] if "max-stale" in case else []
    assert kind(decide_lookup(request(*req), [s], T0 + after, options, soft_refresh_failed=failed)) == expected


def test_a_failed_soft_refresh_changes_nothing_for_a_response_not_soft_purged() -> None:
    s = stored([("Cache-Control", "max-age=60"), ETAG])
    for after, expected in ((1, "serve HIT"), (61, "revalidate stale")):
        assert kind(decide_lookup(request(), [s], T0 + after, CacheOptions(), soft_refresh_failed=True)) == expected


# (case, status, response fields, seconds after storing, request fields, expected): RULES_SIE applies
STORED_ERRORS: list[tuple[str, int, Pairs, float, Pairs, str]] = [
    ("a stale 503 never hides the origin's new error", 503, [("Cache-Control", "max-age=2")], 3, [],
     "forward stale"),
    ("nor with a validator", 503, [("Cache-Control", "max-age=2"), ETAG], 3, [], "revalidate stale"),
    ("nor under its own stale-if-error", 500, [("Cache-Control", "max-age=2, stale-if-error=60")], 3, [],
     "forward stale"),
    ("nor a request's stale-if-error", 503, [("Cache-Control", "max-age=2")], 3,
     [("Cache-Control", "stale-if-error=60")], "forward stale"),
    ("nor within its stale-while-revalidate: revalidated first", 503,
     [("Cache-Control", "max-age=2, stale-while-revalidate=600"), ETAG], 3, [], "revalidate stale"),
    ("nor fetched again in the background without a validator", 500,
     [("Cache-Control", "max-age=2, stale-while-revalidate=600")], 3, [], "forward stale"),
    ("nor to a client's max-stale", 503, [("Cache-Control", "max-age=2")], 3,
     [("Cache-Control", "max-stale=60")], "forward stale"),
    ("a stale 404 does (not an error)", 404, [("Cache-Control", "max-age=2")], 3, [], "forward stale sie"),
    ("a 404 within its stale-while-revalidate is served", 404,
     [("Cache-Control", "max-age=2, stale-while-revalidate=600")], 3, [], "serve UPDATING refresh"),
    ("a stale 200 does", 200, [("Cache-Control", "max-age=2")], 3, [], "forward stale sie"),
]


@pytest.mark.parametrize(("case", "status", "response", "after", "req", "expected"), STORED_ERRORS,
                         ids=[c[0] for c in STORED_ERRORS])
def test_only_a_stored_non_error_response_is_kept_for_an_origin_error(
        case: str, status: int, response: Pairs, after: float, req: Pairs, expected: str) -> None:
    """A stored 503 with a lifetime was served STALE (its old body, no Retry-After) in place of
    the origin's new 503 for the rules' whole stale_if_error hour: the lookup's stale-if-error
    lacked the stored-status test the validation had (``may_hide_errors``, now both). Within
    its stale-while-revalidate it was served UPDATING, the origin's new 503 (Retry-After) only
    refreshing it in the background, and with the origin down it stood in for the 502."""
    s = stored(response, status=status, options=RULES_SIE)
    assert kind(decide_lookup(request(*req), [s], T0 + after, RULES_SIE)) == expected


def test_request_heads_are_plain_data() -> None:
    head: RequestHead = request(("Cache-Control", "max-age=5"), target="/x?y=1")
    assert head.url == "http://example.com/x?y=1"


PROHIBITED = [
    ("must-revalidate", "max-age=60, must-revalidate", True),
    ("proxy-revalidate", "max-age=60, proxy-revalidate", True),
    ("s-maxage", "s-maxage=60", True),
    ("no-cache", "max-age=60, no-cache", True),
    ("plain max-age", "max-age=60", False),
]


@pytest.mark.parametrize(("case", "cc", "prohibited"), PROHIBITED, ids=[p[0] for p in PROHIBITED])
def test_a_stale_response_that_may_never_be_served_stale_says_so_rfc_9111_section_5_2_2_2(
    case: str, cc: str, prohibited: bool
) -> None:
    """The engine then answers 504 when the origin cannot be reached."""
    with_validator = lookup([("Cache-Control", cc), ETAG], 70)
    without = lookup([("Cache-Control", cc)], 70)
    assert isinstance(with_validator, Revalidate) and isinstance(without, Forward)
    assert with_validator.stale_prohibited is without.stale_prohibited is prohibited


# -- a single range against the stored parts (RFC 9111 §3.3) ----------------------------------------

PART_FIELDS: Pairs = [("Cache-Control", "max-age=60"), ETAG, ("Content-Range", "bytes 2-6/10")]


def stored_part(fields: Pairs) -> StoredResponse:
    """The StoredResponse ``decide_store_part`` makes of a 206 (its Content-Range kept)."""
    decision = decide_store_part(request(), "Partial Content", headers(*fields), T0, T0, CacheOptions())
    assert isinstance(decision, Store), decision
    return decision.response


def part_lookup(after: float, *req_fields: tuple[str, str], parts: int = 1) -> str:
    part = stored_part(PART_FIELDS)
    head = request(*req_fields)
    spec = request_range(head.headers)
    assert spec is not None
    match decide_part_lookup(head, spec, [part] * parts, T0 + after, CacheOptions()):
        case FromPart(serve=found, otherwise=otherwise):
            return f"part {found.index}, else {otherwise}"
        case decision:
            return str(decision)


@pytest.mark.parametrize(("after", "fields", "parts", "expected"), [
    (10, [("Range", "bytes=3-5")], 1, "part 0, else FetchPart(held=0)"),
    (10, [("Range", "bytes=2-6")], 1, "part 0, else FetchPart(held=0)"),
    (10, [("Range", "bytes=0-3")], 1, "FetchPart(held=0)"),  # reaches before the part
    (10, [("Range", "bytes=3-5")], 0, "FetchPart(held=None)"),  # no part stored
    (100, [("Range", "bytes=3-5")], 1, "FetchPart(held=0)"),  # the part is stale: not a HIT
    # If-Range says only whether the range applies (RFC 9110 §13.1.5): the range's fetch carries it
    (10, [("Range", "bytes=3-5"), ("If-Range", '"v1"')], 1, "part 0, else FetchPart(held=0)"),
    (10, [("Range", "bytes=3-5"), ("If-Range", '"v2"')], 1, "FetchWhole(reason='if-range')"),
    (10, [("Range", "bytes=0-3"), ("If-Range", '"v2"')], 1, "FetchPart(held=0)"),  # not the part's range
    (10, [("Range", "bytes=3-5"), ("If-Range", '"v1"')], 0, "FetchPart(held=None)"),
    (10, [("Range", "bytes=3-5"), ("If-Range", '"v1"'), ("If-Range", '"v1"')], 0,
     "FetchWhole(reason='if-range')"),  # several lines: the whole response, as from a stored one
    (10, [("Range", "bytes=0-3"), ("If-Range", '"v1"'), ("If-None-Match", '"v0"')], 0,
     "FetchWhole(reason='conditional')"),
    (10, [("Range", "bytes=0-3"), ("If-Match", '"v1"')], 1, "FetchWhole(reason='conditional')"),
    (10, [("Range", "bytes=3-5"), ("If-Match", '"v2"')], 1, "part 0, else FetchWhole(reason='conditional')"),
    # If-None-Match / If-Modified-Since come before Range (RFC 9110 §13.2.2): not a part's fetch
    (10, [("Range", "bytes=0-3"), ("If-None-Match", '"v1"')], 1, "FetchWhole(reason='conditional')"),
    (10, [("Range", "bytes=0-3"), ("If-None-Match", '"v1"')], 0, "FetchWhole(reason='conditional')"),
    (10, [("Range", "bytes=0-3"), ("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT")], 0,
     "FetchWhole(reason='conditional')"),
])
def test_a_range_is_answered_by_a_fresh_part_that_holds_it_else_fetched_alone_or_whole(
        after: float, fields: Pairs, parts: int, expected: str) -> None:
    assert part_lookup(after, *fields, parts=parts) == expected


# (case, If-Range, the fill's response fields (None: no fill, or its head has not come), decision)
FILLING: list[tuple[str, str, Pairs | None, str]] = [
    ("no fill: the range's fetch carries it", '"v0"', None, "FetchPart(held=None)"),
    ("the fill's ETag: a plain range", '"v1"', [("Cache-Control", "max-age=60"), ETAG], "FetchPart(held=None)"),
    ("another ETag: the whole 200 from the fill", '"v0"', [("Cache-Control", "max-age=60"), ETAG],
     "FetchWhole(reason='if-range')"),
    ("a weak ETag never holds (strong comparison)", 'W/"v1"', [("Cache-Control", "max-age=60"), ETAG],
     "FetchWhole(reason='if-range')"),
    ("the fill's Last-Modified (a second before its Date): a plain range", date(-60),
     [("Cache-Control", "max-age=60"), ("Last-Modified", date(-60))], "FetchPart(held=None)"),
    ("another date: the whole 200", date(-120), [("Cache-Control", "max-age=60"), ("Last-Modified", date(-60))],
     "FetchWhole(reason='if-range')"),
    ("a date, and a fill without Last-Modified: the whole 200", date(-60), [("Cache-Control", "max-age=60"), ETAG],
     "FetchWhole(reason='if-range')"),
]


@pytest.mark.parametrize(("case", "if_range", "filling", "expected"), FILLING, ids=[c[0] for c in FILLING])
def test_an_if_range_seek_is_a_plain_range_unless_the_fills_head_shows_it_does_not_hold(
        case: str, if_range: str, filling: Pairs | None, expected: str) -> None:
    """RFC 9110 §13.1.5, §14.2: If-Range decides only whether Range applies. A fill in flight
    whose head is known is the representation: a seek it holds for is decided as a plain range
    (at once, when far from what the fill has), one it does not gets the whole 200 from the fill."""
    head = request(("Range", "bytes=5000-"), ("If-Range", if_range))
    fill = stored(filling) if filling is not None else None
    assert str(decide_part_lookup(head, (5000, None), [], T0 + 1, CacheOptions(), fill)) == expected


def test_a_fill_whose_head_is_not_a_200_says_nothing_of_a_ranges_if_range() -> None:
    """(Its 404 or 500 is the answer whichever way the range goes.)"""
    head = request(("Range", "bytes=5000-"), ("If-Range", '"v0"'))
    error = replace(stored([("Cache-Control", "max-age=60"), ETAG]), status=404)
    assert str(decide_part_lookup(head, (5000, None), [], T0 + 1, CacheOptions(), error)) == "FetchPart(held=None)"


@pytest.mark.parametrize(("inm", "not_modified"), [('"v1"', True), ('W/"v1"', True), ('"v2"', False)])
def test_a_part_answers_a_matching_if_none_match_304_before_its_range(inm: str, not_modified: bool) -> None:
    """RFC 9110 §13.2.2: If-None-Match (weak comparison) before Range; a part carries its
    representation's validators."""
    part = stored_part(PART_FIELDS)
    head = request(("Range", "bytes=3-5"), ("If-None-Match", inm))
    decision = decide_part_lookup(head, (3, 5), [part], T0 + 10, CacheOptions())
    assert isinstance(decision, FromPart) and decision.serve.not_modified is not_modified


SWR = [("Cache-Control", "max-age=10, stale-while-revalidate=60")]  # stored at T0: its window ends at T0 + 70
RETRIES = [
    ("the default while", SWR, False, 20, None, 25),
    ("retry-after in seconds", SWR, False, 20, "30", 50),
    ("retry-after as a date", SWR, False, 20, date(40), 40),
    ("capped by what is left of the window", SWR, False, 20, "120", 70),
    ("the default capped too", SWR, False, 68, None, 70),
    ("retry-after 0: the default", SWR, False, 20, "0", 25),
    ("a past date: the default", SWR, False, 20, date(10), 25),
    ("not a delay: the default", SWR, False, 20, "soon", 25),
    ("soft-purged past any window: at most the default", [("Cache-Control", "max-age=60")], True, 1, "3600", 6),
]


@pytest.mark.parametrize(("case", "response", "purged", "failed", "retry_after", "retry"), RETRIES,
                         ids=[r[0] for r in RETRIES])
def test_a_failed_refresh_holds_the_next_one_back_for_a_while(
        case: str, response: Pairs, purged: bool, failed: float, retry_after: str | None, retry: float) -> None:
    """Every request a stale response answered started another refresh of it while the origin
    failed: one origin request per client request for the whole stale-while-revalidate window."""
    s = replace(stored(response), invalidated=purged)
    assert refresh_retry_at(s, T0 + failed, retry_after) == T0 + retry
