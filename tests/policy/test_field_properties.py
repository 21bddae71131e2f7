"""No field value makes the policy raise (RFC 9110 §5.6: a recipient parses what it gets).

Every field the policy reads, from the response and from the request, takes any
value a parser can hand over (any character but CR, LF and NUL; obs-text; several
field lines), and every policy entry point runs on it: storing, freshening, the
lookup, validation, conditionals, ranges, Vary, keys and invalidation. The answer
may be anything; an exception is the one wrong answer.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.invalidation import invalidated_urls
from proxy.policy.keys import KeySpec, cache_key, variant_of, vary_matches, vary_names
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.policy.ranges import if_range_allows, parse_range
from proxy.policy.reuse import decide_lookup
from proxy.policy.storability import Store, decide_store
from proxy.policy.validation import (
    client_not_modified,
    conditional_headers,
    decide_on_validation,
    freshen_stored,
)
from tests.policy.build import T0

# What aiohttp's parsers hand over: no CR, LF or NUL; anything else, obs-text included.
value_chars = st.characters(min_codepoint=0x01, max_codepoint=0x2FF, blacklist_characters="\r\n")
SAMPLES = ["0", "7200", "-1", "1.5", "abc", "max-age=60", "2147483648", "99999999999999999999", '"a"',
           'W/"a"', "*", "Sun, 06 Nov 1994 08:49:37 GMT", "bytes=0-1", "bytes=-5", "bytes 0-4/10", "gzip",
           "en;q=0.5", "no-cache", "²", "٣", "q=1.0", ";", ",", '"', "\\", "=", " ", "\t"]
values = st.one_of(st.sampled_from(SAMPLES), st.text(value_chars, max_size=40),
                   st.lists(st.sampled_from(SAMPLES), max_size=4).map(", ".join),
                   st.lists(st.sampled_from(SAMPLES), max_size=4).map("".join))
RESPONSE_FIELDS = ["Age", "Cache-Control", "CDN-Cache-Control", "Cachegate-Cache-Control", "Surrogate-Control",
                   "Expires", "Date", "Last-Modified", "ETag", "Vary", "Content-Length", "Content-Range",
                   "Pragma", "Content-Type", "Location", "Content-Location", "Set-Cookie", "Connection"]
REQUEST_FIELDS = ["Cache-Control", "Pragma", "Range", "If-Range", "If-None-Match", "If-Modified-Since",
                  "Accept-Encoding", "Accept-Language", "Accept", "Accept-Charset", "Authorization", "Cookie",
                  "Foo"]
response_fields = st.lists(st.tuples(st.sampled_from(RESPONSE_FIELDS), values), max_size=8)
request_fields = st.lists(st.tuples(st.sampled_from(REQUEST_FIELDS), values), max_size=6)
statuses = st.sampled_from([200, 203, 204, 206, 301, 304, 404, 410, 500, 503])
FILL = [("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Vary", "Accept-Encoding, Accept-Language, Foo")]


def headers(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(RESPONSE_FIELDS), st.lists(values, min_size=1, max_size=3),
       st.sampled_from(REQUEST_FIELDS), st.lists(values, min_size=1, max_size=3), statuses)
def test_no_value_of_any_one_field_makes_the_policy_raise(
    response_field: str, response_values: list[str], request_field: str, request_values: list[str],
    status: int,
) -> None:
    """One field at a time, as one line or several, beside fields that make the response storable."""
    run_policy([(response_field, v) for v in response_values], [(request_field, v) for v in request_values],
               status, 30.0, 10)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(response_fields, request_fields, statuses, st.floats(0, 10**7), st.integers(0, 10**6))
def test_no_combination_of_field_values_makes_the_policy_raise(
    response: list[tuple[str, str]], request: list[tuple[str, str]], status: int, later: float, size: int
) -> None:
    run_policy(response, request, status, later, size)


def run_policy(response: list[tuple[str, str]], request: list[tuple[str, str]], status: int, later: float,
               size: int) -> None:
    req = RequestHead("GET", "http", "example.com", "/p?q=1", headers(request))
    options = CacheOptions(stale_if_error=60)
    # The response as the origin sent it, and the same with fields that make it storable.
    for pairs in (response, [*response, *FILL]):
        h = headers(pairs)
        decision = decide_store(req, status, "OK", h, T0, T0 + 1, options)
        if not isinstance(decision, Store):
            continue
        stored = decision.response
        now = T0 + later
        decide_lookup(req, [stored], now, options)
        client_not_modified(req.headers, stored)
        if_range_allows(req.headers, stored)
        conditional_headers(stored)
        vary_matches(stored.vary, req.headers)
        for answer in (200, 304, 500):
            decide_on_validation(stored, answer, h, now)
            decide_on_validation(stored, answer, h, now, conditional=False)
        freshen_stored(stored, h, now, now, options)
    for line in req.headers.getall("Range", ()):
        parse_range(line, size)
    names = vary_names(headers(response))
    if names is not None:
        variant_of(names, req.headers)
    cache_key(req, KeySpec(headers=("Accept-Language", "Foo"), cookies=("a",), query_sort=True))
    invalidated_urls(RequestHead("POST", "http", "example.com", "/p", req.headers), 201, headers(response))
