"""Partial content (RFC 9111 §3.3-3.4): storing a 206, the ranges it answers, combining parts."""

from __future__ import annotations

import pytest

from proxy.policy.messages import CacheOptions, StoredResponse
from proxy.policy.partial import (
    JOIN_AHEAD,
    ByteRange,
    Combine,
    FetchRange,
    JoinFill,
    RangeFetch,
    Refuse,
    answerable,
    decide_combine,
    decide_range_fetch,
    other_representation,
    parse_content_range,
    part_fetch_fields,
    whole_follows,
)
from proxy.policy.ranges import RangeSpec
from proxy.policy.storability import DontStore, Store, decide_store_part
from tests.policy.build import T0, headers, request

Pairs = list[tuple[str, str]]


def part(content_range: str, etag: str | None = '"v1"', extra: Pairs | None = None) -> StoredResponse:
    fields = [("Cache-Control", "max-age=3600"), ("Content-Range", content_range), *(extra or [])]
    if etag is not None:
        fields.append(("ETag", etag))
    decision = decide_store_part(request(("Range", "bytes=0-0")), "Partial Content", headers(*fields), T0, T0,
                                 CacheOptions())
    assert isinstance(decision, Store), decision
    return decision.response


STORE: list[tuple[str, Pairs, str]] = [
    ("a single range with a known length is stored",
     [("Cache-Control", "max-age=60"), ("Content-Range", "bytes 0-4/10")], ""),
    ("multipart/byteranges is not", [("Cache-Control", "max-age=60"), ("Content-Type",
                                      "multipart/byteranges; boundary=x")], "MULTIPART"),
    ("an unknown total length is not", [("Cache-Control", "max-age=60"), ("Content-Range", "bytes 0-4/*")],
     "NO-CONTENT-RANGE"),
    ("no Content-Range is not", [("Cache-Control", "max-age=60")], "NO-CONTENT-RANGE"),
    ("private parts are not stored either", [("Cache-Control", "private, max-age=60"),
                                             ("Content-Range", "bytes 0-4/10")], "PRIVATE"),
    ("a part without freshness or validator is not", [("Content-Range", "bytes 0-4/10")], "NO-FRESHNESS"),
]


@pytest.mark.parametrize(("case", "fields", "detail"), STORE, ids=[s[0] for s in STORE])
def test_a_206_is_stored_as_a_part_as_its_200_would_be(case: str, fields: Pairs, detail: str) -> None:
    decision = decide_store_part(request(), "Partial Content", headers(*fields), T0, T0, CacheOptions())
    assert (decision.detail if isinstance(decision, DontStore) else "") == detail
    if isinstance(decision, Store):
        assert decision.response.status == 206


def test_a_part_for_a_request_with_a_cookie_is_decided_as_its_200() -> None:
    """Without a lifetime above 0 it is not stored (COOKIE-NO-FRESHNESS), whatever its validator."""
    part = [("Cache-Control", "max-age=0"), ("ETag", '"a"'), ("Content-Range", "bytes 0-4/10")]
    cookie = request(("Cookie", "session=alice"), ("Range", "bytes=0-4"))
    assert decide_store_part(cookie, "Partial Content", headers(*part), T0, T0, CacheOptions()) \
        == DontStore("COOKIE-NO-FRESHNESS", "max-age")
    assert isinstance(decide_store_part(request(("Range", "bytes=0-4")), "Partial Content", headers(*part),
                                        T0, T0, CacheOptions()), Store)


ANSWERS: list[tuple[str, RangeSpec, ByteRange | None]] = [
    ("the stored range itself", (4, 9), ByteRange(4, 9, 10)),
    ("a range inside it", (6, 8), ByteRange(6, 8, 10)),
    ("an open range inside it", (6, None), ByteRange(6, 9, 10)),
    ("a suffix inside it", (None, 1), ByteRange(9, 9, 10)),
    ("a suffix as long as the part", (None, 6), ByteRange(4, 9, 10)),
    ("a range reaching before it", (3, 5), None),
    ("a suffix longer than the part", (None, 7), None),
    ("past the end", (10, None), None),
]


@pytest.mark.parametrize(("case", "spec", "expected"), ANSWERS, ids=[a[0] for a in ANSWERS])
def test_a_stored_part_answers_only_ranges_wholly_within_it_rfc_9111_section_3_3(
    case: str, spec: RangeSpec, expected: ByteRange | None
) -> None:
    assert answerable(part("bytes 4-9/10"), spec) == expected


COMBINE: list[tuple[str, str, str | None, str, str | None, object]] = [
    ("adjoining parts with one strong ETag combine", "bytes 0-4/10", '"v1"', "bytes 5-9/10", '"v1"',
     ByteRange(0, 9, 10)),
    ("overlapping parts too, in either order", "bytes 3-9/10", '"v1"', "bytes 0-5/10", '"v1"', ByteRange(0, 9, 10)),
    ("another strong ETag: refused (RFC 9111 §3.4)", "bytes 0-4/10", '"v1"', "bytes 5-9/10", '"v2"',
     "VALIDATOR-MISMATCH"),
    ("a weak ETag: refused", "bytes 0-4/10", 'W/"v1"', "bytes 5-9/10", 'W/"v1"', "NO-STRONG-VALIDATOR"),
    ("no ETag: refused", "bytes 0-4/10", None, "bytes 5-9/10", None, "NO-STRONG-VALIDATOR"),
    ("another total length: refused", "bytes 0-4/10", '"v1"', "bytes 5-10/11", '"v1"', "OTHER-LENGTH"),
    ("a gap: refused", "bytes 0-3/10", '"v1"', "bytes 5-9/10", '"v1"', "NOT-CONTIGUOUS"),
]


@pytest.mark.parametrize(("case", "a", "tag_a", "b", "tag_b", "expected"), COMBINE, ids=[c[0] for c in COMBINE])
def test_parts_combine_only_under_one_strong_validator_rfc_9111_section_3_4(
    case: str, a: str, tag_a: str | None, b: str, tag_b: str | None, expected: object
) -> None:
    decision = decide_combine(part(a, tag_a), part(b, tag_b))
    if isinstance(expected, str):
        assert isinstance(decision, Refuse) and decision.detail == expected
    else:
        assert isinstance(decision, Combine) and decision.range == expected
        assert decision.range.complete


LM0, LM1 = "Mon, 07 Dec 2026 05:00:00 GMT", "Mon, 07 Dec 2026 06:00:00 GMT"
OTHER: list[tuple[str, str | None, Pairs, str | None, Pairs, bool]] = [
    ("one strong ETag: the same", '"v1"', [], '"v1"', [], False),
    ("another ETag", '"v1"', [], '"v0"', [], True),
    ("a weak ETag cannot show it (other bytes may share it)", 'W/"v1"', [], 'W/"v1"', [], True),
    ("a strong ETag against its weak form", '"v1"', [], 'W/"v1"', [], True),
    ("the served part's ETag, none on the other", '"v1"', [], None, [], True),
    ("no ETag, another Last-Modified", None, [("Last-Modified", LM1)], None, [("Last-Modified", LM0)], True),
    ("no ETag, one Last-Modified: two versions in one second share it", None, [("Last-Modified", LM1)],
     None, [("Last-Modified", LM1)], True),
    ("nothing to compare: taken for another", None, [], '"v0"', [], True),
]


@pytest.mark.parametrize(("case", "tag_a", "more_a", "tag_b", "more_b", "expected"), OTHER,
                         ids=[c[0] for c in OTHER])
def test_a_stored_copy_is_the_parts_version_only_when_one_strong_etag_says_so(
    case: str, tag_a: str | None, more_a: Pairs, tag_b: str | None, more_b: Pairs, expected: bool
) -> None:
    served, found = part("bytes 0-4/10", tag_a, more_a), part("bytes 0-9/10", tag_b, more_b)
    assert other_representation(served, found) is expected


def test_content_range_is_read_strictly() -> None:
    assert parse_content_range("bytes 0-4/10") == ByteRange(0, 4, 10)
    assert parse_content_range("Bytes 0-4/10") == ByteRange(0, 4, 10)
    for bad in ("bytes 0-4/*", "bytes */10", "bytes 5-4/10", "bytes 0-10/10", "items 0-4/10", "bytes 0-²/10", ""):
        assert parse_content_range(bad) is None, bad


# (case, spec, range_fill whole, bytes the fill in flight received (None: none), passing,
#  Authorization, decision)
RANGE_FETCHES: list[tuple[str, RangeSpec, bool, int | None, bool, bool, RangeFetch]] = [
    ("bytes=0- asks for the whole: the key's fill", (0, None), True, None, False, False, JoinFill("whole")),
    ("bytes=0- under range_fill: none too", (0, None), False, None, False, False, JoinFill("whole")),
    ("a range near a fill in flight joins it", (100, 199), True, 0, False, False, JoinFill("in-flight")),
    ("a range up to a MiB past what it received", (5000 + JOIN_AHEAD, None), False, 5000, False, False,
     JoinFill("in-flight")),
    ("a seek further on is asked of the origin", (5001 + JOIN_AHEAD, None), True, 5000, False, False,
     FetchRange(lead=False)),
    ("a suffix does not wait for a fill", (None, 100), True, 0, False, False, FetchRange(lead=False)),
    ("a cold range holds the fill (range_fill: whole)", (100, 199), True, None, False, False,
     FetchRange(lead=True)),
    ("a cold suffix too", (None, 100), True, None, False, False, FetchRange(lead=True)),
    ("never under range_fill: none", (100, 199), False, None, False, False, FetchRange(lead=False)),
    ("never with Authorization", (100, 199), True, None, False, True, FetchRange(lead=False)),
    ("bytes=0- with Authorization is its own request", (0, None), True, None, False, True, JoinFill("whole")),
    ("hit-for-pass: the range alone", (100, 199), True, None, True, False, FetchRange(lead=False)),
    ("hit-for-pass: bytes=0- too", (0, None), True, None, True, False, FetchRange(lead=False)),
    ("hit-for-pass: never a fill in flight", (100, 199), True, 0, True, False, FetchRange(lead=False)),
]

# (case, spec, range_fill whole, passing, decision) with another worker fetching the object
ELSEWHERE: list[tuple[str, RangeSpec, bool, bool, RangeFetch]] = [
    ("a range near the start waits for the other worker's fill", (100, 200), True, False,
     JoinFill("elsewhere")),
    ("under range_fill: none too", (100, 200), False, False, JoinFill("elsewhere")),
    ("bytes=0- too", (0, None), True, False, JoinFill("elsewhere")),
    ("up to a MiB in", (JOIN_AHEAD, None), True, False, JoinFill("elsewhere")),
    ("a seek further on is asked of the origin, not held", (JOIN_AHEAD + 1, None), True, False,
     FetchRange(lead=False)),
    ("a suffix is asked of the origin", (None, 100), True, False, FetchRange(lead=False)),
    ("hit-for-pass: the range alone", (100, 200), True, True, FetchRange(lead=False)),
]


@pytest.mark.parametrize(("case", "spec", "whole", "passing", "expected"), ELSEWHERE,
                         ids=[r[0] for r in ELSEWHERE])
def test_a_range_miss_waits_for_another_workers_fill_of_the_key_as_a_plain_miss_does(
        case: str, spec: RangeSpec, whole: bool, passing: bool, expected: RangeFetch) -> None:
    assert decide_range_fetch(spec, fill_whole=whole, fill_received=None, passing=passing,
                              authorization=False, filling_elsewhere=True) == expected


@pytest.mark.parametrize(("case", "spec", "whole", "received", "passing", "authorization", "expected"),
                         RANGE_FETCHES, ids=[r[0] for r in RANGE_FETCHES])
def test_a_range_miss_shares_the_whole_fill_or_asks_for_its_range(
        case: str, spec: RangeSpec, whole: bool, received: int | None, passing: bool, authorization: bool,
        expected: RangeFetch) -> None:
    assert decide_range_fetch(spec, fill_whole=whole, fill_received=received, passing=passing,
                              authorization=authorization) == expected


# (case, the client's range, its fields, what the part's fetch adds to the fill request)
PART_FETCHES: list[tuple[str, RangeSpec, Pairs, Pairs]] = [
    ("a range", (100, 199), [], [("Range", "bytes=100-199")]),
    ("open-ended", (100, None), [], [("Range", "bytes=100-")]),
    ("a suffix", (None, 16384), [], [("Range", "bytes=-16384")]),
    ("with If-Range: the origin evaluates it", (100, None), [("If-Range", '"v1"')],
     [("Range", "bytes=100-"), ("If-Range", '"v1"')]),
    ("If-Range as a date, as sent", (100, None), [("If-Range", "Mon, 01 Jan 2024 00:00:00 GMT")],
     [("Range", "bytes=100-"), ("If-Range", "Mon, 01 Jan 2024 00:00:00 GMT")]),
    ("several If-Range lines are not sent (decide_part_lookup: the whole response)", (100, None),
     [("If-Range", '"v1"'), ("If-Range", '"v2"')], [("Range", "bytes=100-")]),
]


@pytest.mark.parametrize(("case", "spec", "fields", "expected"), PART_FETCHES, ids=[c[0] for c in PART_FETCHES])
def test_a_parts_fetch_asks_for_the_range_with_the_clients_if_range(
        case: str, spec: RangeSpec, fields: Pairs, expected: Pairs) -> None:
    """RFC 9110 §13.1.5: the origin answers the range when the validator holds, else the whole 200."""
    assert list(part_fetch_fields(spec, headers(*fields))) == expected


@pytest.mark.parametrize(("total", "room", "follows"), [
    (1000, 1000, True), (1001, 1000, False), (19_185_895, 100 << 20, True), (19_185_895, 5 << 20, False)])
def test_the_whole_object_follows_a_stored_part_only_when_the_store_may_keep_it(
        total: int, room: int, follows: bool) -> None:
    """range_fill: whole: an object over max_object is never stored; its whole fetch was started
    behind each of its ranges and dropped at its head."""
    assert whole_follows(ByteRange(0, 99, total), room) is follows
