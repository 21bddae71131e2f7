"""Properties of the policy that must hold for any input (Hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.cache_control import (
    parse_cache_control,
    parse_surrogate_control,
    targeted_cache_control,
)
from proxy.policy.freshness import compute_freshness
from proxy.policy.httpdate import format_http_date, parse_http_date
from proxy.policy.keys import normalise_field, vary_names
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.policy.ranges import parse_range
from proxy.policy.reuse import decide_lookup
from proxy.policy.storability import DontStore, Store, decide_store, response_cache_control
from tests.policy.build import T0

field_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=60)
lines = st.lists(field_text, max_size=4)
DIRECTIVES = ["max-age=60", "s-maxage=30", "public", "must-revalidate", "no-cache", 'no-cache="a"',
              "stale-if-error=10", "stale-while-revalidate=5", "immutable", "must-understand",
              "proxy-revalidate", "max-age=abc", "max-age=99999999999", "x-ext", 'ext="a, b"']
directive_lines = st.lists(st.lists(st.sampled_from(DIRECTIVES), max_size=4).map(", ".join), max_size=3)
OTHER_FIELDS = ["Date", "Expires", "Age", "Last-Modified", "ETag", "Vary", "Content-Type", "Pragma", "X-Any"]
other_fields = st.lists(st.tuples(st.sampled_from(OTHER_FIELDS), field_text), max_size=6)
statuses = st.sampled_from([200, 203, 204, 300, 301, 302, 307, 404, 410, 500, 503, 599])
times = st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False)


def headers(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@given(lines)
def test_cache_control_parsing_never_raises(values: list[str]) -> None:
    cc = parse_cache_control(values)
    for name in cc.directives:
        cc.delta(name)
        cc.field_names(name)
    parse_surrogate_control(values)
    targeted_cache_control(["cdn-cache-control"], lambda _n: values)


@given(field_text)
def test_date_and_range_parsing_never_raise(value: str) -> None:
    parsed = parse_http_date(value)
    if parsed is not None:
        assert parse_http_date(format_http_date(parsed)) == float(int(parsed))
    result = parse_range(value, 1000)
    assert result is None or result == "unsatisfiable" or 0 <= result[0] <= result[1] < 1000
    vary_names(headers([("Vary", value)]))
    normalise_field([value])


@settings(max_examples=200)
@given(directive_lines, other_fields, statuses, st.sampled_from(["", "no-store", "NO-STORE"]),
       st.booleans(), st.booleans())
def test_no_store_private_set_cookie_and_authorization_are_never_stored(
    cc_lines: list[str], others: list[tuple[str, str]], status: int, extra: str, private: bool,
    authorization: bool,
) -> None:
    """Whatever else the response says (RFC 9111 §3, §3.5, §5.2.2.5, §5.2.2.7)."""
    forbidden = [f"{extra}, max-age=60"] if extra else []
    if private:
        forbidden.append("private")
    response = [*(("Cache-Control", v) for v in [*cc_lines, *forbidden]), *others]
    req_fields = [("Authorization", "Basic x")] if authorization else []
    req = RequestHead("GET", "http", "h", "/", headers(req_fields))
    decision = decide_store(req, status, "", headers(response), T0, T0, CacheOptions())
    cc, _ = response_cache_control(headers(response), CacheOptions())
    if extra or private:
        assert isinstance(decision, DontStore)
    if authorization and not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
        assert isinstance(decision, DontStore)
    with_cookie = decide_store(req, status, "", headers([*response, ("Set-Cookie", "a=b")]), T0, T0,
                               CacheOptions())
    assert isinstance(with_cookie, DontStore)
    no_store_request = RequestHead("GET", "http", "h", "/", headers([("Cache-Control", "no-store")]))
    assert isinstance(decide_store(no_store_request, status, "", headers(response), T0, T0, CacheOptions()),
                      DontStore)


@given(directive_lines, other_fields, statuses, st.booleans(), st.sampled_from([None, 0.0, 60.0]), st.booleans())
def test_a_response_to_a_request_with_a_cookie_is_stored_only_with_a_lifetime_or_public(
    cc_lines: list[str], others: list[tuple[str, str]], status: int, authorization: bool,
    rule_ttl: float | None, override: bool,
) -> None:
    """Stored only to be revalidated, the next client's request would carry its validators, and
    an origin comparing only them would answer 304 for this user's page (COOKIE-NO-FRESHNESS)."""
    response = headers([*(("Cache-Control", v) for v in cc_lines), *others])
    req_fields = [("Cookie", "session=alice"), *([("Authorization", "Basic x")] if authorization else [])]
    req = RequestHead("GET", "http", "h", "/", headers(req_fields))
    options = CacheOptions(ttl_by_status={} if rule_ttl is None else {status: rule_ttl}, override_origin=override)
    decision = decide_store(req, status, "", response, T0, T0, options)
    if isinstance(decision, Store):
        f = decision.response.freshness
        assert (f.lifetime > 0 and not f.no_cache) or "public" in response_cache_control(response, options)[0]


@settings(max_examples=200)
@given(directive_lines, other_fields, statuses, times, st.floats(0, 100), st.floats(0, 10**6),
       st.floats(0, 10**6))
def test_age_is_never_negative_and_never_decreases_with_time(
    cc_lines: list[str], others: list[tuple[str, str]], status: int, request_time: float, delay: float,
    later: float, more: float,
) -> None:
    h = headers([*(("Cache-Control", v) for v in cc_lines), *others])
    response_time = request_time + delay
    cc = parse_cache_control(cc_lines)
    f = compute_freshness(status, h, cc, request_time, response_time, CacheOptions())
    first = f.age(response_time + later)
    second = f.age(response_time + later + more)
    assert 0 <= f.age(response_time) <= first <= second
    assert f.lifetime >= 0
    assert f.age(request_time) >= 0  # a clock that went backwards does not make it negative


@settings(max_examples=200)
@given(directive_lines, other_fields, statuses, lines, st.floats(0, 10**6))
def test_a_lookup_never_raises_and_never_serves_a_no_cache_response_unvalidated(
    cc_lines: list[str], others: list[tuple[str, str]], status: int, req_cc: list[str], after: float
) -> None:
    h = headers([*(("Cache-Control", v) for v in cc_lines), *others])
    req = RequestHead("GET", "http", "h", "/", headers([("Cache-Control", v) for v in req_cc]))
    decision = decide_store(req, status, "", h, T0, T0, CacheOptions())
    if not isinstance(decision, Store):
        return
    stored = decision.response
    result = decide_lookup(req, [stored], T0 + after, CacheOptions())
    if stored.freshness.no_cache:
        assert type(result).__name__ != "Serve"


REQUEST_FIELDS = [
    *(("Cache-Control", v) for v in ("no-cache", "max-age=0", "max-age=5", "min-fresh=100", "max-stale",
                                     "max-stale=10", "only-if-cached", "x")),
    ("Pragma", "no-cache"), ("Pragma", "x"), ("If-None-Match", '"a"'), ("If-None-Match", "*"),
    ("If-None-Match", '"b"'), ("If-Modified-Since", "Tue, 14 Nov 2023 22:13:20 GMT"),
    ("If-Modified-Since", "Tue, 14 Nov 2023 22:13:19 GMT"), ("Accept-Encoding", "gzip"),
    ("Accept-Encoding", "br"), ("Accept-Language", "en"), ("Authorization", "x"), ("Range", "bytes=0-1"),
]
RESPONSE_DIRECTIVES = ["max-age=60", "max-age=0", "s-maxage=10", "no-cache", "must-revalidate",
                       "stale-while-revalidate=30", "stale-if-error=30", "immutable", "public"]


@settings(max_examples=400)
@given(st.lists(st.tuples(st.lists(st.sampled_from(RESPONSE_DIRECTIVES), max_size=3).map(", ".join),
                          st.sampled_from(["", "Accept-Encoding", "Accept-Language"]),
                          st.sampled_from(["", "gzip", "br"]),
                          st.booleans(), st.booleans()), min_size=1, max_size=3),
       st.lists(st.sampled_from(REQUEST_FIELDS), max_size=3),
       st.sampled_from(["GET", "HEAD", "POST"]), st.floats(min_value=0, max_value=200),
       st.sampled_from(["honor", "revalidate", "ignore"]))
def test_the_plain_hit_shortcut_decides_as_the_full_lookup(
    variants: list[tuple[str, str, str, bool, bool]], req_fields: list[tuple[str, str]], method: str,
    elapsed: float, mode: str,
) -> None:
    """decide_lookup's shortcut for plain fresh hits (which the fast path uses) never
    disagrees with the full decision, whatever the request and the stored variants."""
    from dataclasses import replace

    from proxy.policy.reuse import decide_lookup_in_full, plain_fresh_hit

    candidates = []
    for i, (cc, vary, encoding, etag, invalidated) in enumerate(variants):
        response = [("Cache-Control", cc or "max-age=60"), ("Date", format_http_date(T0))]
        if vary:
            response.append(("Vary", vary))
        if etag:
            response.append(("ETag", '"a"'))
        fill = RequestHead("GET", "http", "h", "/", headers([("Accept-Encoding", encoding)] if encoding else []))
        decision = decide_store(fill, 200, "OK", headers(response), T0 + i, T0 + i, CacheOptions())
        if isinstance(decision, Store):
            candidates.append(replace(decision.response, invalidated=invalidated))
    req = RequestHead(method, "http", "h", "/", headers(req_fields))
    options = CacheOptions(client_cache_control=mode)  # type: ignore[arg-type]
    now = T0 + elapsed
    full = decide_lookup_in_full(req, candidates, now, options)
    plain = plain_fresh_hit(req, candidates, now)
    if plain is not None:
        assert (full.index, full.status, full.age, full.ttl, full.refresh, full.not_modified) == (  # type: ignore[union-attr]
            plain[0], "HIT", plain[1], plain[2], False, plain[3])
    assert decide_lookup(req, candidates, now, options) == full
