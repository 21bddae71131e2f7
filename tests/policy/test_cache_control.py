"""Cache-Control parsing (RFC 9111 §5.2) and targeted fields (RFC 9213, Surrogate-Control)."""

from __future__ import annotations

import pytest

from proxy.policy.cache_control import (
    DELTA_SECONDS_MAX,
    parse_cache_control,
    parse_surrogate_control,
    targeted_cache_control,
)
from proxy.policy.messages import CacheOptions
from proxy.policy.storability import response_cache_control
from tests.policy.build import headers

# (field lines, directive, expected delta-seconds or None for "absent")
DELTAS = [
    ("two field lines are one list (RFC 9110 §5.3)", ["public", "max-age=60"], "max-age", 60),
    ("a duplicated directive uses its first occurrence (RFC 9111 §4.2.1)",
     ["max-age=60, max-age=10"], "max-age", 60),
    ("a duplicated directive across lines uses the first line's", ["max-age=5", "max-age=600"], "max-age", 5),
    ("a quoted argument is unquoted (RFC 9111 §5.2)", ['max-age="60"'], "max-age", 60),
    ("names are case-insensitive (RFC 9111 §5.2)", ["MaX-AgE=60"], "max-age", 60),
    ("a non-numeric argument reads as 0, i.e. stale (RFC 9111 §1.2.2)", ["max-age=a1"], "max-age", 0),
    ("a decimal argument reads as 0", ["max-age=1.5"], "max-age", 0),
    ("a negative argument reads as 0", ["max-age=-1"], "max-age", 0),
    ("an empty argument reads as 0", ["max-age="], "max-age", 0),
    ("a space after = makes the argument invalid", ["max-age= 60"], "max-age", 0),
    ("a space before = makes it another directive", ["max-age =60"], "max-age", None),
    ("2**31 is the largest delta-seconds (RFC 9111 §1.2.2)", ["max-age=2147483648"], "max-age",
     DELTA_SECONDS_MAX),
    ("a huge number is capped at 2**31 (RFC 9111 §1.2.2)", ["max-age=99999999999999999999"], "max-age",
     DELTA_SECONDS_MAX),
    ("leading zeros are allowed", ["max-age=0060"], "max-age", 60),
    ("an absent directive is None", ["public"], "max-age", None),
    ("commas inside a quoted string do not split directives",
     ['ext="max-age=9, s-maxage=9", max-age=60'], "s-maxage", None),
]


@pytest.mark.parametrize(("case", "lines", "name", "expected"), DELTAS, ids=[d[0] for d in DELTAS])
def test_delta_seconds_arguments_are_read_as_rfc_9111_section_1_2_2_says(
    case: str, lines: list[str], name: str, expected: int | None
) -> None:
    assert parse_cache_control(lines).delta(name) == expected


def test_unknown_directives_are_kept_and_change_nothing_rfc_9111_section_5_2_3() -> None:
    cc = parse_cache_control(["nothing-to-see-here, max-age=60"])
    assert "nothing-to-see-here" in cc
    assert cc.delta("max-age") == 60


def test_no_cache_with_field_names_lists_them_lower_cased_rfc_9111_section_5_2_2_4() -> None:
    cc = parse_cache_control(['no-cache="Set-Cookie, X-Foo"'])
    assert "no-cache" in cc
    assert cc.field_names("no-cache") == ("set-cookie", "x-foo")


def test_empty_and_garbage_lines_parse_to_nothing_without_raising() -> None:
    assert not parse_cache_control([",,, ,", "", " "])
    assert parse_cache_control(['"unterminated, max-age=5']).delta("max-age") is None


TARGETED = [
    ("CDN-Cache-Control wins over Cache-Control (RFC 9213 §2.1)",
     [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=60")], "cdn-cache-control", 60),
    ("Cachegate-Cache-Control wins over CDN-Cache-Control (RFC 9213 §2.1: the most specific target first)",
     [("CDN-Cache-Control", "max-age=60"), ("Cachegate-Cache-Control", "max-age=5")],
     "cachegate-cache-control", 5),
    ("an invalid targeted field is ignored and the next one used (RFC 9213 §2.1)",
     [("Cachegate-Cache-Control", "max-age=5, Bad"), ("CDN-Cache-Control", "max-age=60")],
     "cdn-cache-control", 60),
    ("with every targeted field invalid, Cache-Control applies",
     [("CDN-Cache-Control", "max-age=(1 2)"), ("Cache-Control", "max-age=7")], "cache-control", 7),
    ("Surrogate-Control applies when no RFC 9213 field does",
     [("Cache-Control", "max-age=1"), ("Surrogate-Control", "max-age=3600")], "surrogate-control", 3600),
    ("an RFC 9213 field wins over Surrogate-Control",
     [("Surrogate-Control", "max-age=3600"), ("CDN-Cache-Control", "max-age=60")], "cdn-cache-control", 60),
    ("Surrogate-Control targeted at another device is ignored",
     [("Cache-Control", "max-age=1"), ("Surrogate-Control", "max-age=3600;other")], "cache-control", 1),
]


@pytest.mark.parametrize(("case", "fields", "source", "max_age"), TARGETED, ids=[t[0] for t in TARGETED])
def test_targeted_fields_take_precedence_over_cache_control_for_this_cache(
    case: str, fields: list[tuple[str, str]], source: str, max_age: int
) -> None:
    cc, got = response_cache_control(headers(*fields), CacheOptions())
    assert (got, cc.delta("max-age")) == (source, max_age)


def test_targeted_fields_are_structured_dictionaries_rfc_9213_section_2_1() -> None:
    fields = headers(("CDN-Cache-Control", 'max-age=60, private=?1, no-store=?0, ext="a, b";p=1'))
    parsed = targeted_cache_control(["cdn-cache-control"], lambda n: fields.getall(n, ()))
    assert parsed is not None
    cc, name = parsed
    assert name == "cdn-cache-control"
    assert cc.delta("max-age") == 60
    assert "private" in cc and "no-store" not in cc
    assert cc.get("ext") == "a, b"


def test_surrogate_control_can_be_switched_off() -> None:
    fields = headers(("Cache-Control", "max-age=1"), ("Surrogate-Control", "max-age=3600"))
    cc, source = response_cache_control(fields, CacheOptions(surrogate_device=None))
    assert (source, cc.delta("max-age")) == ("cache-control", 1)


SURROGATE = [
    ("untargeted directives apply to every surrogate", ["max-age=30, no-store"],
     {"max-age": "30", "no-store": None}),
    ("directives targeted at us win over untargeted ones", ["max-age=30, max-age=60;cachegate"],
     {"max-age": "60"}),
    ("directives for another device are ignored", ["max-age=30;other"], None),
    ("max-age=A+B is A seconds fresh and B more on error", ["max-age=30+600"],
     {"max-age": "30", "stale-if-error": "600"}),
    ("names are case-insensitive", ["MaX-aGe=3600"], {"max-age": "3600"}),
    ("a device token is case-insensitive", ["max-age=5;CacheGate"], {"max-age": "5"}),
]


@pytest.mark.parametrize(("case", "lines", "expected"), SURROGATE, ids=[s[0] for s in SURROGATE])
def test_surrogate_control_targets_devices_as_the_w3c_edge_architecture_says(
    case: str, lines: list[str], expected: dict[str, str | None] | None
) -> None:
    parsed = parse_surrogate_control(lines)
    assert (dict(parsed.directives) if parsed is not None else None) == expected
