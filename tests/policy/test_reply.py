"""The head of a reply from a stored response: 200, 304, 206, 412 or 416 (RFC 9110 §13-15, RFC 9111 §3.3)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.policy.messages import StoredResponse
from proxy.policy.reply import (
    NotModified,
    PreconditionFailed,
    Send,
    Unsatisfiable,
    reply_head,
    served_headers,
)
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


def test_a_range_beyond_a_stored_200_is_unsatisfiable_rfc_9110_section_15_5_17() -> None:
    answer = reply_head(request(("Range", "bytes=10-")), WHOLE, 10, served(WHOLE), False)
    assert isinstance(answer, Unsatisfiable)
    assert answer.headers[-1] == ("Content-Range", "bytes */10")


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
