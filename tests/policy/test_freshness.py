"""Freshness lifetime, heuristics and age (RFC 9111 §4.2), with ``now`` as a number."""

from __future__ import annotations

import pytest

from proxy.policy.cache_control import DELTA_SECONDS_MAX, parse_cache_control
from proxy.policy.freshness import compute_freshness, corrected_initial_age
from proxy.policy.messages import CLOCK_SLACK, CacheOptions, Freshness
from tests.policy.build import T0, date, headers

Pairs = list[tuple[str, str]]


def freshness(pairs: Pairs, *, status: int = 200, options: CacheOptions | None = None,
              cc_source: str = "cache-control", request_time: float = T0) -> Freshness:
    h = headers(*pairs)
    return compute_freshness(status, h, parse_cache_control(h.getall("Cache-Control", ())), request_time,
                             T0, options or CacheOptions(), cc_source=cc_source)


LIFETIMES = [
    ("s-maxage wins over max-age for a shared cache (RFC 9111 §4.2.1)",
     [("Cache-Control", "max-age=10, s-maxage=99")], 99, "s-maxage"),
    ("max-age wins over Expires (RFC 9111 §4.2.1)",
     [("Cache-Control", "max-age=10"), ("Date", date(0)), ("Expires", date(500))], 10, "max-age"),
    ("Expires minus Date when there is no max-age (RFC 9111 §4.2.1)",
     [("Date", date(-100)), ("Expires", date(200))], 300, "expires"),
    ("an invalid Expires means already expired (RFC 9111 §5.3)",
     [("Date", date(0)), ("Expires", "0")], 0, "expires"),
    ("two Expires lines mean stale (RFC 9111 §4.2.1)",
     [("Date", date(0)), ("Expires", date(100)), ("Expires", date(200))], 0, "expires"),
    ("an Expires before Date is a lifetime of zero",
     [("Date", date(0)), ("Expires", date(-50))], 0, "expires"),
    ("Expires without Date is measured from when the response arrived",
     [("Expires", date(120))], 120, "expires"),
    ("Expires with an invalid Date is measured from when the response arrived",
     [("Date", "foo"), ("Expires", date(60))], 60, "expires"),
    ("a Date in the future still gives Expires minus Date (the origin's own clock)",
     [("Date", date(1000)), ("Expires", date(1100))], 100, "expires"),
    ("a malformed max-age means stale, not 'ignore it' (RFC 9111 §4.2.1)",
     [("Cache-Control", "max-age=1.5"), ("Date", date(0)), ("Expires", date(500))], 0, "max-age"),
    ("max-age=2**31 is the largest lifetime (RFC 9111 §1.2.2)",
     [("Cache-Control", "max-age=99999999999")], DELTA_SECONDS_MAX, "max-age"),
    ("a far Expires is capped as delta-seconds are (RFC 9111 §1.2.2)",
     [("Date", date(0)), ("Expires", "Fri, 31 Dec 9999 23:59:59 GMT")], DELTA_SECONDS_MAX, "expires"),
    ("a far Expires without Date is capped alike",
     [("Expires", "Fri, 31 Dec 9999 23:59:59 GMT")], DELTA_SECONDS_MAX, "expires"),
    ("no freshness information and no Last-Modified: a lifetime of zero, no default TTL",
     [("Date", date(0))], 0, "none"),
]


@pytest.mark.parametrize(("case", "pairs", "lifetime", "source"), LIFETIMES, ids=[x[0] for x in LIFETIMES])
def test_freshness_lifetime_follows_rfc_9111_section_4_2_1(
    case: str, pairs: Pairs, lifetime: float, source: str
) -> None:
    f = freshness(pairs)
    assert (f.lifetime, f.source) == (lifetime, source)


def test_a_targeted_field_ignores_expires_rfc_9213_section_2_1() -> None:
    h = headers(("Date", date(0)), ("Expires", date(500)), ("CDN-Cache-Control", "public"))
    f = compute_freshness(200, h, parse_cache_control(["public"]), T0, T0, CacheOptions(),
                          cc_source="cdn-cache-control")
    assert f.source != "expires"


HEURISTICS = [
    ("10% of the time since Last-Modified (RFC 9111 §4.2.2)", 200,
     [("Date", date(0)), ("Last-Modified", date(-10_000))], 1000.0),
    ("capped at heuristic_max", 200, [("Date", date(0)), ("Last-Modified", date(-10_000_000))], 86400.0),
    ("404 is heuristically cacheable (RFC 9110 §15.1)", 404,
     [("Date", date(0)), ("Last-Modified", date(-100))], 10.0),
    ("a 302 is not heuristically cacheable", 302, [("Date", date(0)), ("Last-Modified", date(-100))], 0.0),
    ("public makes any status heuristically cacheable (RFC 9111 §5.2.2.9)", 302,
     [("Cache-Control", "public"), ("Date", date(0)), ("Last-Modified", date(-100))], 10.0),
    ("a Last-Modified in the future gives nothing", 200,
     [("Date", date(0)), ("Last-Modified", date(100))], 0.0),
    ("an invalid Last-Modified gives nothing", 200, [("Date", date(0)), ("Last-Modified", "yesterday")], 0.0),
]


@pytest.mark.parametrize(("case", "status", "pairs", "lifetime"), HEURISTICS, ids=[x[0] for x in HEURISTICS])
def test_heuristic_freshness_applies_only_without_an_explicit_lifetime_rfc_9111_section_4_2_2(
    case: str, status: int, pairs: Pairs, lifetime: float
) -> None:
    assert freshness(pairs, status=status).lifetime == lifetime


# (case, response fields, request_time, expected corrected_initial_age); the response arrives at T0.
AGES = [
    ("no Age and a Date equal to the arrival time: age 0", [("Date", date(0))], T0, 0.0),
    ("apparent_age = response_time - date_value (RFC 9111 §4.2.3)", [("Date", date(-10))], T0, 10.0),
    ("corrected_age_value = age_value + response_delay", [("Date", date(0)), ("Age", "30")], T0 - 2, 32.0),
    ("the larger of apparent and corrected age wins", [("Date", date(-100)), ("Age", "30")], T0, 100.0),
    ("a Date in the future gives an apparent age of 0", [("Date", date(100))], T0 - 1, 1.0),
    ("without Date, only Age and the response delay count", [("Age", "5")], T0 - 1, 6.0),
    ("a huge Age is capped at 2**31 (RFC 9111 §1.2.2)", [("Age", "99999999999999")], T0,
     float(DELTA_SECONDS_MAX)),
    ("an invalid Age is ignored, as if absent (RFC 9111 §5.1)", [("Date", date(-10)), ("Age", "abc")], T0,
     10.0),
    ("a list-based Age counts by its first member (RFC 9111 §5.1)", [("Age", "0, 7200")], T0, 0.0),
    ("two Age lines count by the first", [("Age", "7200"), ("Age", "0")], T0, 7200.0),
    ("surrounding whitespace is allowed", [("Age", " 12 ")], T0, 12.0),
]


@pytest.mark.parametrize(("case", "pairs", "request_time", "expected"), AGES, ids=[x[0] for x in AGES])
def test_corrected_initial_age_uses_the_full_rfc_9111_section_4_2_3_formula(
    case: str, pairs: Pairs, request_time: float, expected: float
) -> None:
    assert corrected_initial_age(headers(*pairs), request_time, T0) == expected


def test_current_age_adds_the_resident_time_rfc_9111_section_4_2_3() -> None:
    f = freshness([("Cache-Control", "max-age=100"), ("Age", "10"), ("Date", date(0))])
    assert f.age(T0) == 10
    assert f.age(T0 + 50) == 60
    assert f.ttl(T0 + 50) == 40
    assert f.ttl(T0 + 95) < 0


FLAGS = [
    ("must-revalidate forbids serving stale (RFC 9111 §5.2.2.2)", "max-age=1, must-revalidate", True, False),
    ("proxy-revalidate does the same for a shared cache (RFC 9111 §5.2.2.8)", "proxy-revalidate",
     True, False),
    ("s-maxage implies proxy-revalidate (RFC 9111 §5.2.2.10)", "s-maxage=5", True, False),
    ("no-cache asks for validation before every use (RFC 9111 §5.2.2.4)", "max-age=60, no-cache",
     False, True),
    ('no-cache="field" is handled as strictly as plain no-cache', 'max-age=60, no-cache="Set-Cookie"',
     False, True),
    ("plain max-age sets neither", "max-age=60", False, False),
]


@pytest.mark.parametrize(("case", "value", "must_revalidate", "no_cache"), FLAGS, ids=[x[0] for x in FLAGS])
def test_revalidation_directives_are_recorded_on_the_stored_freshness(
    case: str, value: str, must_revalidate: bool, no_cache: bool
) -> None:
    f = freshness([("Cache-Control", value)])
    assert (f.must_revalidate, f.no_cache) == (must_revalidate, no_cache)


def test_the_origin_s_stale_directives_win_over_the_rule_defaults_rfc_5861() -> None:
    options = CacheOptions(stale_if_error=3600, stale_while_revalidate=30)
    f = freshness([("Cache-Control", "max-age=5, stale-if-error=10, stale-while-revalidate=2")],
                  options=options)
    assert (f.stale_if_error, f.stale_while_revalidate) == (10, 2)
    f = freshness([("Cache-Control", "max-age=5")], options=options)
    assert (f.stale_if_error, f.stale_while_revalidate) == (3600, 30)


def test_rule_default_stale_serving_never_applies_to_a_response_without_freshness() -> None:
    options = CacheOptions(stale_if_error=3600, stale_while_revalidate=30)
    f = freshness([("Date", date(0)), ("ETag", '"a"')], options=options)
    assert (f.source, f.stale_if_error, f.stale_while_revalidate) == ("none", 0, 0)
    f = freshness([("Cache-Control", "stale-if-error=60"), ("ETag", '"a"')], options=options)
    assert f.stale_if_error == 60  # the origin's own permission still counts


RULE_STALE = CacheOptions(stale_if_error=3600, stale_while_revalidate=30)
PAST = "Thu, 19 Nov 1981 08:52:00 GMT"  # PHP's session_cache_limiter("nocache")
# (case, response fields, options, (stale_while_revalidate, stale_if_error))
STALE_WINDOWS = [
    ("max-age=0: expired at once, stored only to be revalidated: none of the rules' windows",
     [("Cache-Control", "max-age=0")], RULE_STALE, (0, 0)),
    ("Expires: -1 (ASP.NET): none", [("Date", date(0)), ("Expires", "-1")], RULE_STALE, (0, 0)),
    ("Expires: 0: none", [("Date", date(0)), ("Expires", "0")], RULE_STALE, (0, 0)),
    ("Expires: 0 without Date: none", [("Expires", "0")], RULE_STALE, (0, 0)),
    ("Expires: 0 and Pragma: no-cache: none", [("Date", date(0)), ("Expires", "0"), ("Pragma", "no-cache")],
     RULE_STALE, (0, 0)),
    ("a past Expires (PHP's 1981 date): none", [("Date", date(0)), ("Expires", PAST)], RULE_STALE, (0, 0)),
    ("s-maxage=0: none", [("Cache-Control", "s-maxage=0")], RULE_STALE, (0, 0)),
    ("a rule ttl of 0: none", [("ETag", '"a"')], CacheOptions(stale_if_error=3600, stale_while_revalidate=30,
                                                              ttl_default=0.0), (0, 0)),
    ("no freshness information: none", [("Date", date(0)), ("ETag", '"a"')], RULE_STALE, (0, 0)),
    ("max-age=0 with the origin's own windows: the origin's (RFC 5861)",
     [("Cache-Control", "max-age=0, stale-while-revalidate=5, stale-if-error=60")], RULE_STALE, (5, 60)),
    ("max-age=0 with the origin's stale-if-error only: that one, no rule swr",
     [("Cache-Control", "max-age=0, stale-if-error=60")], RULE_STALE, (0, 60)),
    ("max-age=1: a lifetime, so the rules' windows", [("Cache-Control", "max-age=1")], RULE_STALE, (30, 3600)),
    ("a future Expires: the rules' windows", [("Date", date(0)), ("Expires", date(60))], RULE_STALE, (30, 3600)),
    ("a rule ttl: the rules' windows", [("ETag", '"a"')],
     CacheOptions(stale_if_error=3600, stale_while_revalidate=30, ttl_default=60.0), (30, 3600)),
    ("a heuristic lifetime: the rules' windows", [("Date", date(0)), ("Last-Modified", date(-86400))],
     RULE_STALE, (30, 3600)),
]


@pytest.mark.parametrize(("case", "pairs", "options", "windows"), STALE_WINDOWS, ids=[x[0] for x in STALE_WINDOWS])
def test_the_rules_stale_windows_apply_only_to_a_response_with_a_lifetime(
    case: str, pairs: Pairs, options: CacheOptions, windows: tuple[float, float]
) -> None:
    """A personal page the origin marked expired at once is stored only to be revalidated: with the
    rules' stale_if_error it went to another user while the origin was down, and with their
    stale_while_revalidate at once."""
    f = freshness(pairs, options=options)
    assert (f.stale_while_revalidate, f.stale_if_error) == windows


def test_immutable_is_recorded_rfc_8246() -> None:
    assert freshness([("Cache-Control", "max-age=60, immutable")]).immutable


# (case, seconds the clock is behind the stored response_time, expected age, expected ttl) for
# a max-age=100 response that arrived with Age: 10 at T0. A response_time ahead of `now` by more
# than CLOCK_SLACK was stamped by a clock that has gone back since: its age is its lifetime.
CLOCK_BACK = [
    ("a clock a moment behind the stamp (another process, a slewing NTP): resident time 0", 0.5, 10.0, 90.0),
    ("up to CLOCK_SLACK behind: still resident time 0, as RFC 9111's max(0, ...)", CLOCK_SLACK, 10.0, 90.0),
    ("just past CLOCK_SLACK: the clock went back, stale by 0 s", CLOCK_SLACK + 1, 100.0, 0.0),
    ("a day behind (stored with a clock a day ahead): stale, not fresh for a day", 86400.0, 100.0, 0.0),
]


@pytest.mark.parametrize(("case", "behind", "age", "ttl"), CLOCK_BACK, ids=[x[0] for x in CLOCK_BACK])
def test_a_response_stored_while_the_clock_was_ahead_is_stale(
        case: str, behind: float, age: float, ttl: float) -> None:
    f = freshness([("Cache-Control", "max-age=100"), ("Age", "10"), ("Date", date(0))])
    assert (f.age(T0 - behind), f.ttl(T0 - behind)) == (age, ttl)
    assert f.stamped_ahead(T0 - behind) == (behind > CLOCK_SLACK)


def test_a_response_older_than_its_lifetime_keeps_its_age_when_the_clock_went_back() -> None:
    f = freshness([("Cache-Control", "max-age=100"), ("Age", "500"), ("Date", date(0))])
    assert f.age(T0 - 86400) == 500 and f.ttl(T0 - 86400) == -400
