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
