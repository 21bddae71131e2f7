"""Every field the policy reads, table by table: valid, invalid, repeated, one line or several,
whitespace and case (RFC 9110 §5.6, RFC 9111 §1.2.2 and §5, RFC 9213, RFC 8941).

Each table row is read through the policy's own entry points (what is stored, how fresh,
what a lookup answers), not through the helpers alone.
"""

from __future__ import annotations

import pytest

from proxy.policy.cache_control import DELTA_SECONDS_MAX
from proxy.policy.fields import (
    AMBIGUOUS,
    ambiguous_cookie,
    content_length,
    cookies,
    decoded_readings,
    first_member,
    split_list,
    split_outside_quotes,
)
from proxy.policy.freshness import parse_age
from proxy.policy.keys import vary_names
from proxy.policy.messages import CacheOptions
from proxy.policy.ranges import if_range_allows, parse_range, request_range
from proxy.policy.reuse import Forward, Serve, decide_lookup, effective_request_cache_control
from proxy.policy.storability import DontStore, Store, response_cache_control
from proxy.policy.validation import client_not_modified
from tests.policy.build import T0, date, headers, request, store, stored

Pairs = list[tuple[str, str]]


def test_list_members_split_on_commas_outside_quotes_and_empty_members_are_dropped() -> None:
    assert split_list(['a,b', ' c ,, ', '"d, e" ,f', ""]) == ["a", "b", "c", '"d, e"', "f"]
    assert first_member([" , 3", "4"]) == "3"
    assert first_member([",", "4"]) == "4"


# Age (RFC 9111 §5.1): (case, Age field lines, age in seconds as read)
AGE = [
    ("a non-negative integer", ["7200"], 7200.0),
    ("surrounding whitespace is not part of the value", ["  12\t"], 12.0),
    ("leading zeros", ["0030"], 30.0),
    ("absent: 0", [], 0.0),
    ("non-numeric: ignored, as if absent", ["abc"], 0.0),
    ("negative: ignored", ["-7200"], 0.0),
    ("a decimal: ignored", ["7200.0"], 0.0),
    ("an alphabetic parameter: ignored", ["7200;foo=bar"], 0.0),
    ("a numeric parameter: ignored", ["7200;foo=111"], 0.0),
    ("non-ASCII digits are not digits", ["²"], 0.0),
    ("Arabic-Indic digits are not digits either", ["٣٠"], 0.0),
    ("a list in one line: the first member counts (0, old)", ["0, 7200"], 0.0),
    ("a list in one line: the first member counts (old, 0)", ["7200,0"], 7200.0),
    ("two lines: the first counts (0, old)", ["0", "7200"], 0.0),
    ("two lines: the first counts (old, 0)", ["7200", "0"], 7200.0),
    ("an empty first member is no member", [", 5"], 5.0),
    ("an invalid first member makes the field invalid, not the second one valid", ["x, 5"], 0.0),
    ("2**31 - 1 as is", ["2147483647"], 2147483647.0),
    ("2**31 and more read as 2**31 (RFC 9111 §1.2.2)", ["2147483649"], float(DELTA_SECONDS_MAX)),
    ("a huge number never overflows", ["9" * 5000], float(DELTA_SECONDS_MAX)),
]


@pytest.mark.parametrize(("case", "lines", "age"), AGE, ids=[a[0] for a in AGE])
def test_age_is_read_as_rfc_9111_section_5_1_says(case: str, lines: list[str], age: float) -> None:
    assert parse_age(headers(*(("Age", v) for v in lines))) == age


# (case, Age lines, served fresh a few seconds later under max-age=3600?)
AGE_REUSE = [
    ("an ignored Age leaves the response fresh", ["abc"], True),
    ("0, 7200: fresh (the first member)", ["0, 7200"], True),
    ("7200, 0: stale", ["7200, 0"], False),
    ("0 then 7200 on two lines: fresh", ["0", "7200"], True),
    ("Age: 2**31 + 1: stale, stored all the same", ["2147483649"], False),
]


@pytest.mark.parametrize(("case", "lines", "fresh"), AGE_REUSE, ids=[a[0] for a in AGE_REUSE])
def test_an_age_is_never_a_reason_not_to_store_and_decides_freshness(
    case: str, lines: list[str], fresh: bool
) -> None:
    s = stored([("Date", date(0)), ("Cache-Control", "max-age=3600"), *(("Age", v) for v in lines)])
    decision = decide_lookup(request(), [s], T0 + 2, CacheOptions())
    assert isinstance(decision, Serve if fresh else Forward)


# Content-Length (RFC 9110 §8.6): (case, lines, value)
CONTENT_LENGTH = [
    ("a number", ["10"], 10),
    ("identical list members are one value", ["10, 10"], 10),
    ("identical values on two lines too", ["10", "10"], 10),
    ("different values: invalid", ["10, 11"], None),
    ("not a number", ["ten"], None),
    ("non-ASCII digits", ["²"], None),
    ("negative", ["-1"], None),
    ("absent", [], None),
]


@pytest.mark.parametrize(("case", "lines", "value"), CONTENT_LENGTH, ids=[c[0] for c in CONTENT_LENGTH])
def test_content_length_is_read_as_rfc_9110_section_8_6_says(case: str, lines: list[str], value: int | None
                                                             ) -> None:
    assert content_length(lines) == value


def test_a_too_large_content_length_is_refused_up_front_and_a_malformed_one_is_not_a_crash() -> None:
    options = CacheOptions(max_object=100)
    for lines, detail in ((["101"], "TOO-LARGE"), (["101, 101"], "TOO-LARGE"), (["9" * 5000], "TOO-LARGE")):
        decision = store([("Cache-Control", "max-age=60"), *(("Content-Length", v) for v in lines)],
                         options=options)
        assert isinstance(decision, DontStore) and decision.detail == detail
    decision = store([("Cache-Control", "max-age=60"), ("Content-Length", "²")], options=options)
    assert isinstance(decision, Store)


# Targeted fields (RFC 9213 §2.1, RFC 8941): (case, response fields, field obeyed, max-age it gives)
TARGETED: list[tuple[str, Pairs, str, int | None]] = [
    ("a valid CDN-Cache-Control wins over Cache-Control",
     [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=60")], "cdn-cache-control", 60),
    ("two field lines are one dictionary", [("CDN-Cache-Control", "public"), ("CDN-Cache-Control", "max-age=60")],
     "cdn-cache-control", 60),
    ("whitespace around members is allowed", [("CDN-Cache-Control", "  max-age=60 ,\tpublic ")],
     "cdn-cache-control", 60),
    ("a duplicated key: the last one counts (RFC 8941 §4.2.2)", [("CDN-Cache-Control", "max-age=5, max-age=60")],
     "cdn-cache-control", 60),
    ("parameters are ignored", [("CDN-Cache-Control", "max-age=60;foo=bar")], "cdn-cache-control", 60),
    ("max-age=abc (a token, not an integer): the field is ignored, Cache-Control applies",
     [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=abc")], "cache-control", 5),
    ("max-age=1.5 (a decimal): ignored", [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=1.5")],
     "cache-control", 5),
    ("max-age=-5 (a negative integer): ignored", [("Cache-Control", "max-age=5"),
                                                  ("CDN-Cache-Control", "max-age=-5")], "cache-control", 5),
    ('max-age="60" (a string): ignored', [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", 'max-age="60"')],
     "cache-control", 5),
    ("max-age with no value (a boolean): ignored", [("Cache-Control", "max-age=5"),
                                                    ("CDN-Cache-Control", "max-age")], "cache-control", 5),
    ("s-maxage=abc beside a valid max-age: only s-maxage is dropped",
     [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=60, s-maxage=abc")], "cdn-cache-control", 60),
    ("an upper-case key is not a dictionary key: the field is ignored",
     [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "Max-Age=60")], "cache-control", 5),
    ("an empty member (a,,b) is a parse error: ignored",
     [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "max-age=60,,public")], "cache-control", 5),
    ("an empty field is ignored", [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "")], "cache-control", 5),
    ("a field of unknown directives is valid and not empty (RFC 9213 §3.1's 'none')",
     [("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "none")], "cdn-cache-control", None),
    ("an invalid Cachegate-Cache-Control falls back to CDN-Cache-Control",
     [("Cachegate-Cache-Control", "max-age=x"), ("CDN-Cache-Control", "max-age=60")], "cdn-cache-control", 60),
    ("Surrogate-Control applies when no RFC 9213 field is valid",
     [("CDN-Cache-Control", "max-age=x"), ("Surrogate-Control", "max-age=30")], "surrogate-control", 30),
    ("a huge integer is capped at 2**31", [("CDN-Cache-Control", "max-age=999999999999999")],
     "cdn-cache-control", DELTA_SECONDS_MAX),
]


@pytest.mark.parametrize(("case", "fields", "source", "max_age"), TARGETED, ids=[t[0] for t in TARGETED])
def test_targeted_fields_are_structured_dictionaries_with_typed_directives(
    case: str, fields: Pairs, source: str, max_age: int | None
) -> None:
    cc, got = response_cache_control(headers(*fields), CacheOptions())
    assert (got, cc.delta("max-age")) == (source, max_age)


RESTRICTIVE = [
    ("no-store=1 still forbids storing", "no-store=1, max-age=60", "NO-STORE"),
    ('private="x" is private', 'private="set-cookie", max-age=60', "PRIVATE"),
    ("private=?1 is private", "private=?1, max-age=60", "PRIVATE"),
    ("no-store=?0 is no no-store", "no-store=?0, max-age=60", ""),
    ("public=1 is no public: a response to Authorization is not stored", "public=1, max-age=60",
     "AUTHORIZATION"),
]


@pytest.mark.parametrize(("case", "value", "detail"), RESTRICTIVE, ids=[r[0] for r in RESTRICTIVE])
def test_a_wrong_typed_restrictive_directive_still_restricts_and_a_permissive_one_permits_nothing(
    case: str, value: str, detail: str
) -> None:
    req = request(("Authorization", "Basic x")) if "public" in value else request()
    decision = store([("CDN-Cache-Control", value)], req=req)
    assert (decision.detail if isinstance(decision, DontStore) else "") == detail


SURROGATE = [
    ("s-maxage has no meaning in Surrogate-Control: ignored", "max-age=30, s-maxage=600", 30, False),
    ("s-maxage alone gives nothing", "s-maxage=600", None, False),
]


@pytest.mark.parametrize(("case", "value", "max_age", "must_revalidate"), SURROGATE,
                         ids=[s[0] for s in SURROGATE])
def test_surrogate_control_keeps_only_what_means_something_there(
    case: str, value: str, max_age: int | None, must_revalidate: bool
) -> None:
    cc, source = response_cache_control(headers(("Cache-Control", "no-cache"), ("Surrogate-Control", value)),
                                        CacheOptions())
    if max_age is None:
        assert source == "cache-control"
    else:
        assert (source, cc.delta("max-age"), "s-maxage" in cc) == ("surrogate-control", max_age,
                                                                    must_revalidate)


# Pragma (RFC 9111 §5.4): (case, request fields, goes to the origin?)
PRAGMA = [
    ("Pragma: no-cache without Cache-Control", [("Pragma", "no-cache")], True),
    ("case-insensitive", [("Pragma", "No-Cache")], True),
    ("a member of a list", [("Pragma", "x, no-cache")], True),
    ("on a second line", [("Pragma", "x"), ("Pragma", "no-cache")], True),
    ("another pragma changes nothing", [("Pragma", "no-cache-please")], False),
    ("ignored beside Cache-Control", [("Pragma", "no-cache"), ("Cache-Control", "max-stale")], False),
]


@pytest.mark.parametrize(("case", "fields", "forward"), PRAGMA, ids=[p[0] for p in PRAGMA])
def test_pragma_no_cache_counts_only_without_cache_control(case: str, fields: Pairs, forward: bool) -> None:
    assert ("no-cache" in effective_request_cache_control(request(*fields))) is forward


# Vary (RFC 9110 §12.5.5): (case, Vary lines, names)
VARY = [
    ("names are case-insensitive, combined over lines and sorted", ["Accept-Encoding, FOO", "bar"],
     ("accept-encoding", "bar", "foo")),
    ("empty members are dropped", [" , foo ,, "], ("foo",)),
    ("duplicates count once", ["foo, Foo"], ("foo",)),
    ("* anywhere is *", ["foo", "bar, *"], None),
    ("an empty Vary varies on nothing", [""], ()),
    ("a quoted member is not a field name: no request could be matched on it", ['"Cookie"'], None),
    ("nor is one with a parameter", ["Accept, Cookie;x=1"], None),
    ("nor one with a space inside", ["Coo kie"], None),
    ("nor one past ASCII (the Kelvin sign is no K)", ["Coo\u212aie"], None),
    ("every tchar is allowed", ["!#$%&'*+-.^_`|~09azAZ"], ("!#$%&'*+-.^_`|~09azaz",)),
]


@pytest.mark.parametrize(("case", "lines", "names"), VARY, ids=[v[0] for v in VARY])
def test_vary_names_are_a_list_of_field_names(case: str, lines: list[str], names: tuple[str, ...] | None
                                              ) -> None:
    assert vary_names(headers(*(("Vary", v) for v in lines))) == names


# Range (RFC 9110 §14.1.1): (case, Range lines, size, result)
RANGE: list[tuple[str, list[str], int, object]] = [
    ("one range", ["bytes=0-4"], 10, (0, 4)),
    ("the unit is case-insensitive", ["BYTES=0-4"], 10, (0, 4)),
    ("whitespace around the range is allowed", ["bytes= 2-3 "], 10, (2, 3)),
    ("an empty list member is dropped", ["bytes=2-3,"], 10, (2, 3)),
    ("two ranges: the full representation", ["bytes=0-1,3-4"], 10, None),
    ("two Range lines: ignored", ["bytes=0-1", "bytes=3-4"], 10, None),
    ("non-ASCII digits are not digits", ["bytes=²-3"], 10, None),
    ("a huge last position is clipped, never a crash", ["bytes=1-" + "9" * 5000], 10, (1, 9)),
    ("a huge first position is unsatisfiable", ["bytes=" + "9" * 5000 + "-"], 10, "unsatisfiable"),
    ("no dash", ["bytes=5"], 10, None),
]


@pytest.mark.parametrize(("case", "lines", "size", "result"), RANGE, ids=[r[0] for r in RANGE])
def test_range_is_read_as_rfc_9110_section_14_1_says(case: str, lines: list[str], size: int, result: object
                                                     ) -> None:
    spec = request_range(headers(*(("Range", v) for v in lines)))
    got = None if spec is None else parse_range(lines[0], size)
    assert got == result


# If-Range (RFC 9110 §13.1.5): (case, If-Range lines, the range applies?)
IF_RANGE = [
    ("the strong ETag", ['"a"'], True),
    ("surrounding whitespace", [' "a" '], True),
    ("the same instant in another date format", ["Sunday, 12-Nov-23 22:11:40 GMT"], True),
    ("a weak ETag never", ['W/"a"'], False),
    ("an invalid date", ["yesterday"], False),
    ("two lines", ['"a"', '"a"'], False),
]


@pytest.mark.parametrize(("case", "lines", "applies"), IF_RANGE, ids=[i[0] for i in IF_RANGE])
def test_if_range_is_a_strong_comparison(case: str, lines: list[str], applies: bool) -> None:
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Last-Modified", "Sun, 12 Nov 2023 22:11:40 GMT"),
                ("Date", date(0))])
    assert if_range_allows(headers(*(("If-Range", v) for v in lines)), s) is applies


def test_if_range_with_a_weak_last_modified_does_not_match() -> None:
    """A Last-Modified less than a second before Date is weak (RFC 9110 §8.8.2.2)."""
    s = stored([("Cache-Control", "max-age=60"), ("Last-Modified", date(0)), ("Date", date(0))])
    assert not if_range_allows(headers(("If-Range", date(0))), s)


# If-Modified-Since (RFC 9110 §13.1.3): (case, lines, answered 304?)
IMS = [
    ("a valid date after Last-Modified", [date(0)], True),
    ("an invalid date is ignored", ["yesterday"], False),
    ("two lines are ignored", [date(0), date(0)], False),
]


@pytest.mark.parametrize(("case", "lines", "not_modified"), IMS, ids=[i[0] for i in IMS])
def test_if_modified_since_is_a_single_valid_date(case: str, lines: list[str], not_modified: bool) -> None:
    s = stored([("Cache-Control", "max-age=60"), ("Last-Modified", date(-100))])
    assert client_not_modified(headers(*(("If-Modified-Since", v) for v in lines)), s) is not_modified


# Expires, Date, Last-Modified (RFC 9110 §5.6.7, RFC 9111 §5.3): (case, fields, lifetime)
DATES = [
    ("Expires on two lines: stale (RFC 9111 §4.2.1)", [("Date", date(0)), ("Expires", date(60)),
                                                       ("Expires", date(60))], 0.0),
    ("Expires of another format", [("Date", date(0)), ("Expires", "Sunday, 12-Nov-23 22:11:40 GMT")], None),
    ("Expires: 0 is already expired", [("Date", date(0)), ("Expires", "0")], 0.0),
    ("Date on two lines: the first counts", [("Date", date(0)), ("Date", date(-50)), ("Expires", date(60))],
     60.0),
    ("an invalid Date: Expires is measured from arrival", [("Date", "soon"), ("Expires", date(60))], 60.0),
]


@pytest.mark.parametrize(("case", "fields", "lifetime"), DATES, ids=[d[0] for d in DATES])
def test_dates_are_read_as_rfc_9110_section_5_6_7_says(case: str, fields: Pairs, lifetime: float | None
                                                       ) -> None:
    decision = store([*fields, ("ETag", '"x"')])
    assert isinstance(decision, Store)
    if lifetime is not None:
        assert decision.response.freshness.lifetime == lifetime


@pytest.mark.parametrize(("text", "sep", "maxsplit", "parts"), [
    ("a;b;c", ";", -1, ["a", "b", "c"]),
    ("a;b;c", ";", 1, ["a", "b;c"]),
    ('a;"b;c";d', ";", -1, ["a", '"b;c"', "d"]),
    ('"x\\";y";z', ";", -1, ['"x\\";y"', "z"]),  # an escaped quote does not close the string
    ('max-age=1;"dev;ice"', ";", 1, ["max-age=1", '"dev;ice"']),
    ("", ",", -1, [""]),
    ('a,"b', ",", -1, ["a", '"b']),  # an unclosed quote runs to the end
])
def test_split_outside_quotes_is_str_split_that_respects_quoted_strings(
    text: str, sep: str, maxsplit: int, parts: list[str]
) -> None:
    assert split_outside_quotes(text, sep, maxsplit) == parts


# Cookie (RFC 6265): (case, field lines, what the rules and the key read; A: ambiguous). Origins agree
# only on plain pairs; a name any common parser may read otherwise is AMBIGUOUS, never a guess.
A = AMBIGUOUS
COOKIES: list[tuple[str, list[str], dict[str, str]]] = [
    ("what browsers send", ["a=1; b=2; c=x=y"], {"a": "1", "b": "2", "c": "x=y"}),
    ("no space after ;, empty pairs", ["a=1;b=2;;"], {"a": "1", "b": "2"}),
    ("a name twice with one value is that value", ["a=1; a=1"], {"a": "1"}),
    ("a name twice with other values: first or last, by framework", ["a=1; a=2"], {"a": A}),
    ("a comma ends a cookie to Rack 2, not to others", ["theme=dark, session=x"], {"theme": A, "session": A}),
    ("without a space too", ["theme=dark,session=x"], {"theme": A, "session": A}),
    ("whitespace ends a cookie to http.cookies and aiohttp", ["theme=dark session=x"],
     {"theme": A, "session": A}),
    ("a tab too", ["theme=dark\tsession=x"], {"theme": A, "session": A}),
    ("only the pair with a comma is ambiguous", ["lang=de; theme=a,b"], {"lang": "de", "theme": A, "b": A}),
    ("unless it names a plain pair's cookie again", ["lang=de; x=1, lang=en"], {"lang": A, "x": A}),
    ("whitespace around = : Go drops the name, aiohttp reads it, PHP reads session_", ["session =x"],
     {"session": A, "session_": A}),
    ("whitespace at a pair's ends is no part of it", [" a=1 ;b=2 "], {"a": "1", "b": "2"}),
    ("a pair without = is a name to Go and aiohttp", ["a=1; session"], {"a": "1", "session": A}),
    ("a quoted value is one to aiohttp, split to others", ['p="x; session=y"; lang=de'],
     {"p": A, "session": A, "lang": A}),
    ("a backslash", ["p=a\\b; lang=de"], {"p": A, "lang": A}),
    ("two lines: aiohttp reads the first, WSGI servers join them", ["a=1", "session=x"],
     {"a": A, "session": A}),
    ("no Cookie", [], {}),
    ("an empty name is no cookie", ["=x; a=1"], {"a": "1"}),
    ("a no-break space that aiohttp and Django strip around a name", ["theme=dark;\u00a0session=x"],
     {"theme": A, "session": A}),
    ("before the =", ["session\u00a0=x"], {"session": A}),
    ("a name twice, one behind a no-break space", ["ab=A;\u00a0ab=B"], {"ab": A}),
    ("a raw 0xA0 byte (not UTF-8: a lone surrogate here, U+00A0 to a WSGI origin, which Django strips)",
     ["a=1;\udca0session=x"], {"a": A, "session": A, "\udca0session": A}),
    ("a raw 0x85 byte (NEL to a WSGI origin)", ["a=1;\udc85session=x"], {"a": A, "session": A, "\udc85session": A}),
    ("a raw 0xA0 byte before the =", ["session\udca0=x"], {"session": A, "session\udca0": A}),
    ("a U+0085 before a name", ["a=1;\u0085session=x"], {"a": A, "session": A}),
    ("a name past ASCII stays one too (for case-folding)", ["a=1;\u017fession=x"],
     {"a": A, "ession": A, "\u017fession": A}),
    ("Rack decodes a percent-escaped name", ["sess%69on=x; a=1"], {"sess%69on": A, "session": A, "a": "1"}),
    ("a percent-escape in a value is the value's", ["prefs=a%2Cb; session=1"], {"prefs": "a%2Cb", "session": "1"}),
    ("PHP reads a dot as _", ["logged.in=x"], {"logged.in": "x", "logged_in": A}),
    ("PHP's first value wins: the dotted one", ["ab.bucket=B; ab_bucket=A"], {"ab.bucket": "B", "ab_bucket": A}),
    ("after the plain one too", ["ab_bucket=A; ab.bucket=B"], {"ab_bucket": A, "ab.bucket": "B"}),
    ("PHP reads a space as _", ["a=1; logged in=x"], {"a": "1", "logged": A, "in": A, "logged_in": A}),
    ("PHP reads an array under its name", ["logged_in[x]=1"], {"logged_in[x]": "1", "logged_in": A}),
    ("PHP 7 decoded names first", ["logged%2Ein=x"], {"logged%2Ein": A, "logged.in": A, "logged_in": A}),
    ("a pair without = is PHP's empty cookie", ["logged.in"], {"logged.in": A, "logged_in": A}),
]


@pytest.mark.parametrize(("case", "lines", "jar"), COOKIES, ids=[c[0] for c in COOKIES])
def test_cookies_read_as_every_origin_reads_them_or_as_ambiguous(case: str, lines: list[str],
                                                                 jar: dict[str, str]) -> None:
    assert cookies(lines) == jar
    names = tuple(jar)
    assert (ambiguous_cookie(cookies(lines), names) is None) is (A not in jar.values())


# What ``ambiguous_cookie`` says beyond ``AMBIGUOUS``: (case, Cookie lines, the names rules read,
# the ambiguous one or None).
AMBIGUOUS_NAMES: list[tuple[str, list[str], tuple[str, ...], str | None]] = [
    ("plain", ["session=x; bucket=A"], ("session", "bucket"), None),
    ("no Cookie", [], ("session",), None),
    ("another case alone: ASP.NET and nginx read it as the name", ["SESSION=x"], ("session",), "session"),
    ("beside the exact spelling: ASP.NET's last pair wins", ["bucket=A; Bucket=EVIL"], ("bucket",), "bucket"),
    ("before it", ["Bucket=EVIL; bucket=A"], ("bucket",), "bucket"),
    ("a rule naming it in upper case", ["phpsessid=x"], ("PHPSESSID",), "PHPSESSID"),
    ("case-folded past ASCII: more ambiguous, never less", ["a=1;\u017fession=x"], ("session",), "session"),
    ("another case of a cookie no rule reads", ["Theme=a; theme=b; session=x"], ("session",), None),
    ("two names that fold alike, neither read", ["Theme=a; theme=b"], ("bucket",), None),
    ("a percent-escape in a value: the conditions comparing it decide (decoded_readings)",
     ["preview=%31"], ("preview",), None),
]


@pytest.mark.parametrize(("case", "lines", "names", "name"), AMBIGUOUS_NAMES, ids=[c[0] for c in AMBIGUOUS_NAMES])
def test_a_cookie_origins_match_ignoring_case_is_ambiguous_to_the_rules_reading_it(
        case: str, lines: list[str], names: tuple[str, ...], name: str | None) -> None:
    assert ambiguous_cookie(cookies(lines), names) == name


@pytest.mark.parametrize(("value", "readings"), [
    ("%31", ("1", "1")),                                  # ASP.NET Core, Express, Rack; PHP
    ("1+", ("1+", "1 ")),                                 # + is a space to PHP alone
    ("a%2Bb+c", ("a+b+c", "a+b c")),                      # an escaped + stays a +
    ("C0004%3A1%2CC0002%3A0", ("C0004:1,C0002:0",) * 2),  # OneTrust's consent groups
])
def test_a_cookie_value_reads_as_origins_that_decode_it_read_it(value: str, readings: tuple[str, str]) -> None:
    assert decoded_readings(value) == readings


@pytest.mark.timeout(20)
@pytest.mark.parametrize("run", ["\udc80", " ", "\u00a0", "\t"])
def test_a_long_run_of_characters_past_printable_ascii_is_read_in_linear_time(run: str) -> None:
    """``X*=X*`` over a long run of such characters with no ``=`` was quadratic: a 24 KB
    Cookie line held a worker 2 s (every client of it waiting). 200,000 of them: an hour and
    more that way, milliseconds now; the names read are the same."""
    jar = cookies(["a=1;b" + run * 200_000 + "c=2; session=x"])
    assert {"a", "b", "c", "session"} <= set(jar) and jar["c"] == AMBIGUOUS
