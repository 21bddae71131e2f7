"""The head of a reply from a stored response: 200, 304, 206, 412 or 416 (RFC 9110 §13-15, RFC 9111 §3.3)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.policy.messages import StoredResponse
from proxy.policy.reply import (
    AsArrives,
    NotModified,
    PreconditionFailed,
    Send,
    Unsatisfiable,
    reply_head,
    reply_on_arrival,
    served_headers,
)
from proxy.policy.validation import client_not_modified
from tests.policy.build import date, request, stored

FIELDS: list[tuple[str, str]] = [("Date", date(0)), ("Cache-Control", "max-age=60"), ("ETag", '"a"'),
                                 ("Content-Type", "text/plain"),
                                 ("Content-Length", "10"), ("Age", "3"), ("Server", "origin"),
                                 ("X-Request-Id", "old"), ("X-Other", "1")]
WHOLE = stored(FIELDS)
# A stored part (decide_store_part makes one the same way; only its status and range differ).
PART = replace(WHOLE, status=206, reason="Partial Content",
               headers=(*WHOLE.headers, ("Content-Range", "bytes 2-6/10")))


def served(s: StoredResponse) -> list[tuple[str, str]]:
    return served_headers(s.headers, "5", "cachegate; hit", "HIT")


def test_served_fields_drop_the_stored_age_length_server_and_request_id_and_add_this_cache_s() -> None:
    names = [k for k, _ in served(WHOLE)]
    assert names == ["Date", "Cache-Control", "ETag", "Content-Type", "X-Other", "Age", "Cache-Status",
                     "X-Cache-Status"]
    assert dict(served(WHOLE))["Age"] == "5"


def test_a_304_keeps_only_the_fields_that_describe_the_representation_rfc_9110_section_15_4_5() -> None:
    answer = reply_head(request(), WHOLE, 10, served(WHOLE), True)
    assert answer == NotModified([("Date", date(0)), ("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Age", "5"),
                                  ("Cache-Status", "cachegate; hit"), ("X-Cache-Status", "HIT")])


def test_a_304_carries_the_via_its_200_would_rfc_9110_section_7_6_3() -> None:
    """The stored Via (the origin's path, this cache last: ``fill.with_via``) goes on the 304 too,
    from the store or from a head as it arrives."""
    via = stored([*FIELDS, ("Via", "1.1 lb, 1.1 cachegate")])
    fields = served(via)
    hit = reply_head(request(), via, 10, fields, True)
    assert isinstance(hit, NotModified) and ("Via", "1.1 lb, 1.1 cachegate") in hit.headers
    arriving = reply_on_arrival(request(("If-None-Match", '"a"')), via, 10, fields)
    assert isinstance(arriving, NotModified) and ("Via", "1.1 lb, 1.1 cachegate") in arriving.headers


# (case, method, request fields, the stored response, status, Content-Range, length, offset; None: cannot answer)
CASES: list[tuple[str, str, list[tuple[str, str]], str, tuple[int, str | None, int, int] | None]] = [
    ("no Range: the whole body", "GET", [], "whole", (200, None, 10, 0)),
    ("a HEAD: the whole body's head", "HEAD", [], "whole", (200, None, 10, 0)),
    ("one range of a stored 200 (RFC 9110 §14.2)", "GET", [("Range", "bytes=2-4")], "whole", (206, "bytes 2-4/10", 3, 2)),
    ("a suffix range", "GET", [("Range", "bytes=-3")], "whole", (206, "bytes 7-9/10", 3, 7)),
    ("a range to the end, clipped", "GET", [("Range", "bytes=8-20")], "whole", (206, "bytes 8-9/10", 2, 8)),
    ("several ranges: the whole body (a server may ignore Range)", "GET", [("Range", "bytes=0-1,4-5")], "whole",
     (200, None, 10, 0)),
    ("an If-Range that does not match: the whole body (RFC 9110 §13.1.5)", "GET",
     [("Range", "bytes=2-4"), ("If-Range", '"b"')], "whole", (200, None, 10, 0)),
    ("an If-Range that matches: the range", "GET", [("Range", "bytes=2-4"), ("If-Range", '"a"')], "whole",
     (206, "bytes 2-4/10", 3, 2)),
    ("a stored part answers a range within it (RFC 9111 §3.3)", "GET", [("Range", "bytes=3-5")], "part",
     (206, "bytes 3-5/10", 3, 1)),
    ("a stored part answers its whole range", "GET", [("Range", "bytes=2-6")], "part", (206, "bytes 2-6/10", 5, 0)),
    ("a stored part never answers a range beyond it", "GET", [("Range", "bytes=0-4")], "part", None),
    ("a stored part never answers a request without Range", "GET", [], "part", None),
    ("a stored part never answers a HEAD", "HEAD", [("Range", "bytes=3-5")], "part", None),
]


@pytest.mark.parametrize(("case", "method", "fields", "which", "expected"), CASES, ids=[c[0] for c in CASES])
def test_the_reply_to_a_request_from_a_stored_response(
        case: str, method: str, fields: list[tuple[str, str]], which: str,
        expected: tuple[int, str | None, int, int] | None) -> None:
    s = WHOLE if which == "whole" else PART
    answer = reply_head(request(*fields, method=method), s, 10 if which == "whole" else 5, served(s), False)
    if expected is None:
        assert answer is None
        return
    assert isinstance(answer, Send), answer
    status, content_range, length, offset = expected
    assert (answer.status, answer.length, answer.offset) == (status, length, offset)
    ranges = [v for k, v in answer.headers if k.lower() == "content-range"]
    assert ranges == ([content_range] if content_range else [])


def test_a_suffix_range_of_an_empty_200_is_answered_with_the_200_rfc_9110_section_14_1_1() -> None:
    """Satisfiable (the only form that is on an empty representation) but no byte to send, which
    no Content-Range can state: the whole (empty) 200, as nginx answers; ``bytes=0-`` stays 416."""
    answer = reply_head(request(("Range", "bytes=-5")), WHOLE, 0, served(WHOLE), False)
    assert isinstance(answer, Send) and (answer.status, answer.length, answer.offset) == (200, 0, 0), answer
    assert not [v for k, v in answer.headers if k.lower() == "content-range"]
    answer = reply_head(request(("Range", "bytes=0-")), WHOLE, 0, served(WHOLE), False)
    assert isinstance(answer, Unsatisfiable) and answer.headers[-1] == ("Content-Range", "bytes */0")


def test_a_range_beyond_a_stored_200_is_unsatisfiable_rfc_9110_section_15_5_17() -> None:
    answer = reply_head(request(("Range", "bytes=10-")), WHOLE, 10, served(WHOLE), False)
    assert isinstance(answer, Unsatisfiable)
    assert answer.headers[-1] == ("Content-Range", "bytes */10")


# -- Content-Range: only this cache's own, only on a 206 or a 416 (RFC 9110 §14.4) ---------------------

STRAY = [*FIELDS, ("Content-Range", "bytes 0-9/1000")]  # an origin's, on its 200: stored as all fields are

# (case, request fields, status, the reply's Content-Range fields: one, cachegate's own, or none)
STRAY_CASES: list[tuple[str, list[tuple[str, str]], int, list[str]]] = [
    ("no Range: the 200 as stored (RFC 9111 §3.1)", [], 200, ["bytes 0-9/1000"]),
    ("a range: the 206 has this cache's only", [("Range", "bytes=5-9")], 206, ["bytes 5-9/10"]),
    ("a range beyond it: the 416 has this cache's only", [("Range", "bytes=5000-")], 416, ["bytes */10"]),
]


@pytest.mark.parametrize(("case", "fields", "status", "ranges"), STRAY_CASES, ids=[c[0] for c in STRAY_CASES])
@pytest.mark.parametrize("source", ["stored", "headed"])
def test_a_reply_from_a_200_that_held_a_content_range_carries_only_this_cache_s_own(
        case: str, fields: list[tuple[str, str]], status: int, ranges: list[str], source: str) -> None:
    """``stored``: the 200's own (``served_headers`` keeps it); ``headed``: one among the fields
    ``reply_head`` is given (a rule's, or a fill's relayed head): every 206 and 416 carried it
    ahead of this cache's own."""
    s = replace(WHOLE, headers=tuple(STRAY))
    headers = served(s) if source == "stored" else [*served(WHOLE), ("Content-Range", "bytes 0-9/1000")]
    answer = reply_head(request(*fields), s, 10, headers, False)
    if status == 416:
        assert isinstance(answer, Unsatisfiable), answer
    else:
        assert isinstance(answer, Send) and answer.status == status, answer
    if source == "stored" or status != 200:  # (``headed``'s 200 is the fields given)
        assert [v for k, v in answer.headers if k.lower() == "content-range"] == ranges


def test_a_part_s_reply_has_one_content_range_whatever_its_fields_hold() -> None:
    answer = reply_head(request(("Range", "bytes=3-5")), PART, 5,
                        [*served(PART), ("Content-Range", "bytes 2-6/10")], False)
    assert isinstance(answer, Send)
    assert [v for k, v in answer.headers if k.lower() == "content-range"] == ["bytes 3-5/10"]


@pytest.mark.parametrize("which", ["whole", "part"])
def test_a_206_this_cache_makes_never_says_accept_ranges_none_rfc_9110_section_14_3(which: str) -> None:
    base = WHOLE if which == "whole" else PART
    s = replace(base, headers=(*base.headers, ("Accept-Ranges", "none"), ("Accept-Ranges", "none")))
    answer = reply_head(request(("Range", "bytes=3-5")), s, 10 if which == "whole" else 5, served(s), False)
    assert isinstance(answer, Send) and answer.status == 206, answer
    assert [v for k, v in answer.headers if k == "Accept-Ranges"] == ["bytes"]
    whole = reply_head(request(), s, 10, served(s), False) if which == "whole" else None
    assert whole is None or [v for k, v in whole.headers if k == "Accept-Ranges"] == ["none", "none"]


# (case, request fields, not_modified: the client's If-None-Match/If-Modified-Since matched, status)
PRECEDENCE: list[tuple[str, list[tuple[str, str]], bool, int]] = [
    ("a failed If-Match is 412, even where If-None-Match matched (RFC 9110 §13.2.2)",
     [("If-Match", '"z"'), ("If-None-Match", '"a"')], True, 412),
    ("a failed If-Match is 412, not a 206", [("If-Match", '"z"'), ("Range", "bytes=2-4")], False, 412),
    ("a failed If-Match is 412, not a 416", [("If-Match", '"z"'), ("Range", "bytes=20-")], False, 412),
    ("If-Unmodified-Since is ignored without a stored Last-Modified",
     [("If-Unmodified-Since", "Mon, 01 Jan 2001 00:00:00 GMT")], False, 200),
    ("a true If-Match goes on to If-None-Match: 304", [("If-Match", '"a"'), ("If-None-Match", '"a"')], True, 304),
    ("a true If-Match goes on to Range: 206", [("If-Match", '"a"'), ("Range", "bytes=2-4")], False, 206),
    ("If-Match: *", [("If-Match", "*")], False, 200),
]


@pytest.mark.parametrize(("case", "fields", "not_modified", "status"), PRECEDENCE, ids=[c[0] for c in PRECEDENCE])
def test_preconditions_come_first_rfc_9110_section_13_2_2(
        case: str, fields: list[tuple[str, str]], not_modified: bool, status: int) -> None:
    answer = reply_head(request(*fields), WHOLE, 10, served(WHOLE), not_modified)
    got = {PreconditionFailed: 412, NotModified: 304, Unsatisfiable: 416}.get(type(answer))
    if isinstance(answer, Send):
        got = answer.status
    assert got == status


def test_a_412_carries_none_of_the_stored_response_s_fields() -> None:
    answer = reply_head(request(("If-Match", '"z"')), WHOLE, 10, served(WHOLE), False)
    assert answer == PreconditionFailed([("Cache-Status", "cachegate; hit"), ("X-Cache-Status", "HIT")])


# -- a fill's response, from its head as it arrives (reply_on_arrival) -------------------------------

LM = ("Last-Modified", date(-3600))
ARRIVING = stored([*FIELDS, LM])

# (case, method, request fields, Content-Length known, what the client gets: "as arrives",
# 304, 412, 416, or (206, Content-Range, length, offset))
ARRIVAL: list[tuple[str, str, list[tuple[str, str]], bool, object]] = [
    ("no conditions: the response itself", "GET", [], True, "as arrives"),
    ("If-None-Match that matches: 304 from the head", "GET", [("If-None-Match", '"a"')], True, 304),
    ("If-None-Match, weakly: 304", "GET", [("If-None-Match", 'W/"a"')], True, 304),
    ("If-None-Match *: 304", "GET", [("If-None-Match", "*")], True, 304),
    ("If-None-Match of another tag: the response", "GET", [("If-None-Match", '"b"')], True, "as arrives"),
    ("If-Modified-Since at Last-Modified: 304", "GET", [("If-Modified-Since", date(-3600))], True, 304),
    ("If-Modified-Since before Last-Modified: the response", "GET", [("If-Modified-Since", date(-7200))],
     True, "as arrives"),
    ("a 304 without a known length too (it has no body)", "GET", [("If-None-Match", '"a"')], False, 304),
    ("a HEAD's matching If-None-Match: 304", "HEAD", [("If-None-Match", '"a"')], True, 304),
    ("If-Match of another tag: 412", "GET", [("If-Match", '"b"')], True, 412),
    ("If-Match that holds: the response", "GET", [("If-Match", '"a"')], True, "as arrives"),
    ("If-Unmodified-Since before Last-Modified: 412", "GET", [("If-Unmodified-Since", date(-7200))], True, 412),
    ("412 before 304 (RFC 9110 §13.2.2)", "GET", [("If-Match", '"b"'), ("If-None-Match", '"a"')], True, 412),
    ("a range: 206 sliced from the body", "GET", [("Range", "bytes=2-4")], True, (206, "bytes 2-4/10", 3, 2)),
    ("a suffix range", "GET", [("Range", "bytes=-3")], True, (206, "bytes 7-9/10", 3, 7)),
    ("a range of a body of unknown length: the response", "GET", [("Range", "bytes=2-4")], False, "as arrives"),
    ("a range beyond the end: 416", "GET", [("Range", "bytes=20-")], True, 416),
    ("If-None-Match before Range (RFC 9110 §13.2.2)", "GET", [("Range", "bytes=0-3"), ("If-None-Match", '"a"')],
     True, 304),
    ("If-None-Match that fails, then the range", "GET", [("Range", "bytes=0-3"), ("If-None-Match", '"b"')], True,
     (206, "bytes 0-3/10", 4, 0)),
    ("If-Range that matches the head's ETag: 206", "GET", [("Range", "bytes=2-4"), ("If-Range", '"a"')], True,
     (206, "bytes 2-4/10", 3, 2)),
    ("If-Range of another ETag: the whole response", "GET", [("Range", "bytes=2-4"), ("If-Range", '"b"')], True,
     "as arrives"),
    ("If-Range at Last-Modified (strong: an hour before Date): 206", "GET",
     [("Range", "bytes=2-4"), ("If-Range", date(-3600))], True, (206, "bytes 2-4/10", 3, 2)),
    ("several ranges: the whole response", "GET", [("Range", "bytes=0-1,4-5")], True, "as arrives"),
    ("a HEAD's range: the response's head", "HEAD", [("Range", "bytes=2-4")], True, "as arrives"),
]


@pytest.mark.parametrize(("case", "method", "fields", "known", "expected"), ARRIVAL, ids=[c[0] for c in ARRIVAL])
def test_a_fill_s_clients_are_answered_from_its_head_as_it_arrives(
        case: str, method: str, fields: list[tuple[str, str]], known: bool, expected: object) -> None:
    answer = reply_on_arrival(request(*fields, method=method), ARRIVING, 10 if known else None,
                              served(ARRIVING))
    match answer:
        case AsArrives():
            got: object = "as arrives"
        case NotModified():
            got = 304
        case PreconditionFailed():
            got = 412
        case Unsatisfiable():
            got = 416
            assert ("Content-Range", "bytes */10") in answer.headers
        case Send():
            got = (answer.status, dict(answer.headers).get("Content-Range"), answer.length, answer.offset)
    assert got == expected


def test_the_head_s_answers_are_those_the_stored_response_gives_later() -> None:
    """What a client of the fill gets from its head is what it would get from the store once
    the fill is complete (the same decision, ``reply_head``), the 200 aside."""
    for _case, method, fields, known, _expected in ARRIVAL:
        if not known:
            continue
        req = request(*fields, method=method)
        early = reply_on_arrival(req, ARRIVING, 10, served(ARRIVING))
        later = reply_head(req, ARRIVING, 10, served(ARRIVING), client_not_modified(req.headers, ARRIVING))
        if isinstance(early, AsArrives):
            assert isinstance(later, Send) and later.status == 200
        else:
            assert early == later
