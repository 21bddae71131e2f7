"""Vary normalisation (RFC 9111 §4.1), ranges (RFC 9110 §14) and invalidation (RFC 9111 §4.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.invalidation import invalidated_urls
from proxy.policy.keys import (
    KeySpec,
    cache_key,
    ip_literal,
    literal_in,
    normalise_host,
    normalise_selecting,
    vary_matches,
    vary_names,
)
from proxy.policy.ranges import if_range_allows, parse_range
from proxy.policy.request import normal_host
from tests.policy.build import date, headers, request, stored

Pairs = list[tuple[str, str]]

# (case, field name, first request's lines, second request's lines, same variant?)
NORMALISE: list[tuple[str, str, list[str], list[str], bool]] = [
    ("field lines stay apart (an origin may read the first only)", "Cache-Control", ["no-cache, max-age=0"],
     ["no-cache", "max-age=0"], False),
    ("whitespace around list items is removed", "Cache-Control", ["no-cache,max-age=0"],
     [" no-cache ,  max-age=0 "], True),
    ("an empty list member is not nothing (an origin may read it)", "Cache-Control", ["no-cache"],
     ["no-cache,"], False),
    ("a field not known to be a list is compared as written", "Foo", ["1,2"], ["1, 2"], False),
    ("whitespace around parameters is removed", "Accept", ["a/b;q=0.5"], ["a/b ; q=0.5"], True),
    # RFC 4647 and RFC 9110 §8.4.1 ignore their case, but an origin's string comparison does not.
    ("Accept-Language keeps its case", "Accept-Language", ["en, de"], ["eN, De"], False),
    ("Accept-Encoding keeps its case", "Accept-Encoding", ["gzip"], ["GZIP"], False),
    ("other fields keep their case", "Foo", ["a"], ["A"], False),
    ("order is significant in general", "Accept-Language", ["en, de"], ["de, en"], False),
    ("different values differ", "Foo", ["1"], ["2"], False),
]


@pytest.mark.parametrize(("case", "field", "first", "second", "same"), NORMALISE,
                         ids=[n[0] for n in NORMALISE])
def test_selecting_fields_match_after_rfc_9111_section_4_1_normalisation(
    case: str, field: str, first: list[str], second: list[str], same: bool
) -> None:
    assert (normalise_selecting(field, first) == normalise_selecting(field, second)) is same


def test_vary_names_are_lower_cased_combined_and_star_is_none() -> None:
    names = vary_names(headers(("Vary", "Accept-Encoding, FOO"), ("Vary", "bar")))
    assert names == ("accept-encoding", "bar", "foo")
    assert vary_names(headers(("Vary", "foo, *"))) is None
    assert vary_names(headers()) == ()


def test_an_absent_selecting_field_matches_only_an_absent_one() -> None:
    s = stored([("Cache-Control", "max-age=60"), ("Vary", "Foo")], req=request())
    assert vary_matches(s.vary, headers())
    assert not vary_matches(s.vary, headers(("Foo", "")))


RANGES = [
    ("a first-last range", "bytes=0-99", 1000, (0, 99)),
    ("a suffix range (RFC 9110 §14.1.2)", "bytes=-100", 1000, (900, 999)),
    ("an open range", "bytes=900-", 1000, (900, 999)),
    ("a last position past the end is clipped", "bytes=990-5000", 1000, (990, 999)),
    ("a suffix longer than the body is the whole body", "bytes=-5000", 1000, (0, 999)),
    ("a first position past the end is unsatisfiable (RFC 9110 §15.5.17)", "bytes=1000-", 1000,
     "unsatisfiable"),
    ("a zero-length suffix is unsatisfiable", "bytes=-0", 1000, "unsatisfiable"),
    ("several ranges are ignored: the full 200 is allowed", "bytes=0-1,5-6", 1000, None),
    ("another unit is ignored", "items=0-1", 1000, None),
    ("last before first is invalid and ignored", "bytes=5-1", 1000, None),
    ("garbage is ignored", "bytes=abc", 1000, None),
    ("units are case-insensitive", "Bytes=0-0", 10, (0, 0)),
]


@pytest.mark.parametrize(("case", "value", "size", "expected"), RANGES, ids=[r[0] for r in RANGES])
def test_single_byte_ranges_are_answered_from_a_stored_200_rfc_9110_section_14(
    case: str, value: str, size: int, expected: object
) -> None:
    assert parse_range(value, size) == expected


IF_RANGE = [
    ("no If-Range: the range applies", [], True),
    ("If-Range with the stored strong ETag (RFC 9110 §13.1.5)", [("If-Range", '"a"')], True),
    ("If-Range with another ETag: the full response", [("If-Range", '"b"')], False),
    ("a weak ETag never matches If-Range", [("If-Range", 'W/"a"')], False),
    ("If-Range with the stored Last-Modified", [("If-Range", date(-100))], True),
    ("If-Range with another date", [("If-Range", date(-5))], False),
]


@pytest.mark.parametrize(("case", "req", "expected"), IF_RANGE, ids=[r[0] for r in IF_RANGE])
def test_if_range_needs_a_strong_match_rfc_9110_section_13_1_5(case: str, req: Pairs, expected: bool) -> None:
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Last-Modified", date(-100))])
    assert if_range_allows(headers(*req), s) is expected


# (case, method, status, response fields, invalidated URLs)
INVALIDATIONS: list[tuple[str, str, int, Pairs, tuple[str, ...]]] = [
    ("a successful POST invalidates its target URI (RFC 9111 §4.4)", "POST", 201, [], ("http://example.com/r",)),
    ("PUT, DELETE and PATCH do too", "PATCH", 204, [], ("http://example.com/r",)),
    ("an unknown method is not known to be safe: it invalidates", "M-SEARCH", 200, [], ("http://example.com/r",)),
    ("a 3xx answer counts as non-error", "DELETE", 302, [], ("http://example.com/r",)),
    ("an error answer invalidates nothing", "POST", 500, [], ()),
    ("a 4xx answer invalidates nothing", "PUT", 409, [], ()),
    ("safe methods invalidate nothing", "GET", 200, [], ()),
    ("a same-origin Location is invalidated too", "POST", 201, [("Location", "/new")],
     ("http://example.com/r", "http://example.com/new")),
    ("a same-origin absolute Content-Location too", "PUT", 200,
     [("Content-Location", "http://example.com/c?x=1")], ("http://example.com/r", "http://example.com/c?x=1")),
    ("another origin's URI is left alone", "POST", 201,
     [("Location", "http://other.example/x"), ("Content-Location", "https://example.com/x")],
     ("http://example.com/r",)),    ("the scheme's default port is the same origin (RFC 9110 §4.2.3): the key's URL is invalidated", "POST",
     201, [("Location", "http://example.com:80/new"), ("Content-Location", "http://EXAMPLE.com.:080/c")],
     ("http://example.com/r", "http://example.com/new", "http://example.com/c")),
    ("a fragment is not part of what is stored", "POST", 201, [("Location", "/new?a=1#top")],
     ("http://example.com/r", "http://example.com/new?a=1")),
    ("an empty query is kept, as the key keeps it (RFC 3986 §5.2.2, §6.2.3)", "POST", 201,
     [("Location", "/new?"), ("Content-Location", "http://example.com/c?#top")],
     ("http://example.com/r", "http://example.com/new?", "http://example.com/c?")),
    ("a bare '?' is the target's path with an empty query (RFC 3986 §5.2.2)", "PUT", 200,
     [("Content-Location", "?")], ("http://example.com/r", "http://example.com/r?")),
    ("another port is another origin", "POST", 201, [("Location", "http://example.com:8080/new")],
     ("http://example.com/r",)),
    ("an authority with user info is not taken for ours", "POST", 201, [("Location", "http://u@example.com/new")],
     ("http://example.com/r",)),
    ("a byte that is not UTF-8 (read as a lone surrogate) is percent-encoded, as a browser follows it", "POST",
     201, [("Location", "/new\udcff"), ("Content-Location", "/c?q=\udce9")],
     ("http://example.com/r", "http://example.com/new%FF", "http://example.com/c?q=%E9")),
    ("what browsers encode in a path or query is encoded as they ask for it (WHATWG URL)", "POST", 201,
     [("Location", '/my report.pdf'), ("Content-Location", '/p/{id}?q=a b&x="<y>"')],
     ("http://example.com/r", "http://example.com/my%20report.pdf",
      "http://example.com/p/%7Bid%7D?q=a%20b&x=%22%3Cy%3E%22")),
    ("a query keeps the braces and backquote a browser keeps there", "POST", 201,
     [("Location", "/s?f={a}`b'c")], ("http://example.com/r", "http://example.com/s?f={a}`b%27c")),
    ("UTF-8 that is not ASCII is percent-encoded byte by byte", "PUT", 200, [("Location", "/caf\u00e9")],
     ("http://example.com/r", "http://example.com/caf%C3%A9")),
    ("what no header's bytes decode to is dropped alone: the target is still invalidated", "POST", 201,
     [("Location", "/x\ud800"), ("Content-Location", "/c")], ("http://example.com/r", "http://example.com/c")),
    ("a reference that is no URL is dropped alone", "POST", 201,
     [("Location", "http://[x/new"), ("Content-Location", "/c")], ("http://example.com/r", "http://example.com/c")),
    ("a host that is not ASCII is not ours", "POST", 201, [("Location", "http://example.com\udcff/x")],
     ("http://example.com/r",)),
]


@pytest.mark.parametrize(("case", "method", "status", "fields", "urls"), INVALIDATIONS,
                         ids=[i[0] for i in INVALIDATIONS])
def test_unsafe_requests_invalidate_the_target_and_same_origin_locations_rfc_9111_section_4_4(
    case: str, method: str, status: int, fields: Pairs, urls: tuple[str, ...]
) -> None:
    assert invalidated_urls(request(method=method), status, headers(*fields)) == urls


# (cookie field lines, a request's lines that must share its key, lines that must not; None: no check)
# A cookie origins may read differently (policy.fields.cookies: AMBIGUOUS) never reaches the key:
# the rules bypass such a request (tests/rules/test_ambiguous_cookies.py).
COOKIE_KEYS: list[tuple[list[str], list[str] | None, list[str] | None]] = [
    (["lang=de"], ["a=1; lang=de"], ["lang=en"]),
    (["lang=de"], ["x=y;lang=de; lang=de"], ["lang=de-x"]),  # a name twice with one value is that value
    ([], ["theme=x"], ["lang="]),  # an absent cookie is not an empty one: an origin may tell them apart
]


@pytest.mark.parametrize(("cookie", "same", "other"), COOKIE_KEYS)
def test_a_keyed_cookie_is_read_as_the_origin_reads_it(
        cookie: list[str], same: list[str] | None, other: list[str] | None) -> None:
    spec = KeySpec(cookies=("lang",))
    key = cache_key(request(*(("Cookie", v) for v in cookie)), spec)
    if same is not None:
        assert cache_key(request(*(("Cookie", v) for v in same)), spec) == key
    if other is not None:
        assert cache_key(request(*(("Cookie", v) for v in other)), spec) != key


# (keyed Accept-Language bytes, as the parser hands them over: UTF-8 with surrogateescape)
KEYED_OCTETS = [b"de", b"d\xe9", "dé".encode(), b"d\xc3", b"d\xc3\xa9\xe9", "dÃ©".encode(), b"d\\xe9"]


def test_a_keyed_value_s_bytes_each_give_a_key_of_their_own_that_an_index_can_hold() -> None:
    # A byte that is not UTF-8 (a lone surrogate) failed the disk's write of the whole batch;
    # read as Latin-1 it must not meet the UTF-8 text it spells (d\xc3\xa9 is "dé", d\xe9 too).
    spec = KeySpec(headers=("Accept-Language",))
    keys = [cache_key(request(("Accept-Language", raw.decode("utf-8", "surrogateescape"))), spec)
            for raw in KEYED_OCTETS]
    assert len(set(keys)) == len(keys)
    for key in keys:
        key.encode("utf-8")  # no lone surrogate


@given(st.binary(max_size=8), st.binary(max_size=8))
def test_two_keyed_byte_values_share_a_key_only_when_equal(a: bytes, b: bytes) -> None:
    spec = KeySpec(headers=("X-Tenant",))
    ka, kb = (cache_key(request(("X-Tenant", v.decode("utf-8", "surrogateescape"))), spec) for v in (a, b))
    assert (ka == kb) == (a == b)
    ka.encode("utf-8")


REFERENCE = st.builds(str.__add__, st.sampled_from(["", "/", "?", "#", "//", "http://", "http://[", "http://example.com"]),
                      st.text(max_size=30))


@given(REFERENCE, REFERENCE)
def test_every_invalidated_url_is_ascii_whatever_location_holds(location: str, content_location: str) -> None:
    # A URL the store's keys cannot hold (a lone surrogate) failed the target's invalidation too.
    fields = [("Location", location), ("Content-Location", content_location)]
    urls = invalidated_urls(request(method="POST"), 201, headers(*fields))
    assert urls[0] == "http://example.com/r" and all(u.isascii() for u in urls)


@pytest.mark.parametrize(("value", "scheme", "want"), [
    ("[::1]", "http", "[::1]"),
    ("[0:0::1]", "http", "[::1]"),
    ("[0:0:0:0:0:0:0:1]", "http", "[::1]"),
    ("[::0001]", "http", "[::1]"),
    ("[0000::1]:80", "http", "[::1]"),
    ("[::0:1]:0443", "https", "[::1]"),
    ("[::A]", "http", "[::a]"),
    ("[2001:DB8:0:0:1:0:0:1]:8080", "http", "[2001:db8::1:0:0:1]:8080"),
    ("[2001:db8::0:1]", "https", "[2001:db8::1]"),
    ("[::ffff:127.0.0.1]", "http", "[::ffff:127.0.0.1]"),  # RFC 5952 §5, on every Python version
    ("[::FFFF:7F00:1]", "http", "[::ffff:127.0.0.1]"),
    ("[0:0:0:0:0:ffff:7f00:0001]:81", "http", "[::ffff:127.0.0.1]:81"),
    ("[::127.0.0.1]", "http", "[::7f00:1]"),
    # IPv4 not in plain dotted decimal: a reg-name to RFC 3986, read differently by origins
    ("127.0.0.01", "http", "127.0.0.01"),
    ("2130706433", "http", "2130706433"),
    ("0x7f.1", "http", "0x7f.1"),
    ("127.0.0.1.", "http", "127.0.0.1"),
])
def test_every_spelling_of_one_host_gives_one_normalised_host(value: str, scheme: str, want: str) -> None:
    assert normalise_host(value, scheme) == want
    assert normal_host(value, scheme) == want


@pytest.mark.parametrize("value", ["[1:2:3]", "[::::]", "[1::2::3]", "[::1.2.3]", "[12345::1]", "[::g]",
                                   "[fe80::1%25eth0]", "[v1.x]"])
def test_brackets_that_hold_no_ipv6_address_are_no_host(value: str) -> None:
    assert normal_host(value, "http") is None
    assert normal_host(f"{value}:8080", "http") is None
    assert ip_literal(value) is None


@pytest.mark.parametrize(("pattern", "want"), [
    ("[0:0::1]", "[::1]"), ("[0:0::1]:8080", "[::1]:8080"), ("[::A]", "[::a]"), ("[1:2:3]", "[1:2:3]"),
    ("*.a.example", "*.a.example"), ("a.example:80", "a.example:80"),
])
def test_a_configured_host_is_written_as_requests_are(pattern: str, want: str) -> None:
    assert literal_in(pattern) == want
