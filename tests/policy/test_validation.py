"""Our conditional requests, 304 freshening and the client's conditionals (RFC 9111 §4.3, RFC 9110 §13)."""

from __future__ import annotations

import pytest

from proxy.policy.httpdate import parse_http_date
from proxy.policy.messages import CacheOptions
from proxy.policy.validation import (
    Freshen,
    Refetch,
    Replace,
    ServeStale,
    UnstoredAnswer,
    ValidationOutcome,
    asks_validation,
    client_not_modified,
    conditional_headers,
    decide_on_validation,
    error_keeps_stored,
    freshen_stored,
    merge_headers,
    precondition_failed,
    supersedes_stored,
)
from tests.policy.build import T0, date, headers, request, stored

Pairs = list[tuple[str, str]]
LM = date(-10_000)


def test_a_revalidation_sends_every_validator_it_has_rfc_9111_section_4_3_1() -> None:
    s = stored([("Cache-Control", "max-age=1"), ("ETag", '"v1"'), ("Last-Modified", LM)])
    assert conditional_headers(s) == (("If-None-Match", '"v1"'), ("If-Modified-Since", LM))
    assert conditional_headers(stored([("Cache-Control", "max-age=1"), ("ETag", 'W/"w"')])) == (
        ("If-None-Match", 'W/"w"'),
    )


def name(outcome: ValidationOutcome) -> str:
    return type(outcome).__name__


# (case, stored validators, answer status, answer fields, stale_if_error allowed, outcome): the
# outcome is what the engine carries out (a 304 about another response is fetched again).
ANSWERS: list[tuple[str, Pairs, int, Pairs, bool, str]] = [
    ("a 304 with the stored strong ETag freshens it (RFC 9111 §4.3.4)",
     [("ETag", '"a"')], 304, [("ETag", '"a"')], False, "Freshen"),
    ("a 304 with another strong ETag must not update it: fetched again (RFC 9111 §4.3.4)",
     [("ETag", '"a"')], 304, [("ETag", '"b"')], False, "Refetch"),
    ("a 304 with the strong form of the weak ETag sent freshens it: the origin compared weakly "
     "(RFC 9110 §13.1.2; nginx's 304 to a gzip response's W/ tag)",
     [("ETag", 'W/"a"')], 304, [("ETag", '"a"')], False, "Freshen"),
    ("a 304 with another strong ETag than the weak one sent does not",
     [("ETag", 'W/"a"')], 304, [("ETag", '"b"')], False, "Refetch"),
    ("a 304 with another weak ETag does not either",
     [("ETag", 'W/"a"')], 304, [("ETag", 'W/"b"')], False, "Refetch"),
    ("a 304 with a weak ETag selects by weak comparison",
     [("ETag", '"a"')], 304, [("ETag", 'W/"a"')], False, "Freshen"),
    ("a 304 with an ETag does not select a response stored without one",
     [("Last-Modified", LM)], 304, [("ETag", '"a"'), ("Last-Modified", LM)], False, "Refetch"),
    ("a 304 with only the stored Last-Modified freshens it",
     [("Last-Modified", LM)], 304, [("Last-Modified", LM)], False, "Freshen"),
    ("a 304 with another Last-Modified does not",
     [("Last-Modified", LM)], 304, [("Last-Modified", date(-5))], False, "Refetch"),
    ("a 304 without validators answers our conditional about this response",
     [("ETag", '"a"')], 304, [], False, "Freshen"),
    ("a 200 replaces the stored response (RFC 9111 §4.3.3)", [("ETag", '"a"')], 200, [], False, "Replace"),
    ("a 404 replaces it too", [("ETag", '"a"')], 404, [], True, "Replace"),
    ("a 5xx within stale-if-error serves the stale response (RFC 5861 §4)",
     [("ETag", '"a"')], 503, [], True, "ServeStale"),
    ("a 5xx otherwise is decided as any response: passed to the client, stored only if storable "
     "(RFC 9111 §4.3.3)",
     [("ETag", '"a"')], 502, [], False, "Replace"),
]


@pytest.mark.parametrize(("case", "validators", "status", "answer", "sie", "expected"), ANSWERS,
                         ids=[a[0] for a in ANSWERS])
def test_the_origin_s_answer_to_a_revalidation_is_handled_as_rfc_9111_section_4_3_3_says(
    case: str, validators: Pairs, status: int, answer: Pairs, sie: bool, expected: str
) -> None:
    cc = "max-age=1, stale-if-error=60" if sie else "max-age=1"
    s = stored([("Cache-Control", cc), *validators])
    assert name(decide_on_validation(s, status, headers(*answer), T0 + 30)) == expected
    assert expected in {c.__name__ for c in (Freshen, Refetch, ServeStale, Replace)}


ASKED = [
    ("a stored response's etag", [("ETag", '"a"')], True),
    ("its last-modified", [("Last-Modified", "Sat, 05 Dec 2026 10:00:00 GMT")], True),
    ("both", [("ETag", '"a"'), ("Last-Modified", "Sat, 05 Dec 2026 10:00:00 GMT")], True),
    ("none: a refresh of a response without validators is unconditional", [], False),
]


@pytest.mark.parametrize(("case", "validators", "conditional"), ASKED, ids=[a[0] for a in ASKED])
def test_a_request_is_conditional_by_the_validators_it_was_sent_with(
        case: str, validators: list[tuple[str, str]], conditional: bool) -> None:
    """A revalidation of a stored response without validators went out unconditional, yet was
    taken for conditional (it was made for a stored response): its 304 freshened it."""
    s = stored([("Cache-Control", "max-age=1"), *validators])
    sent = (("Host", "a.example"), ("Accept", "*/*"), *conditional_headers(s))
    assert asks_validation(sent) is conditional
    assert asks_validation(tuple((k.lower(), v) for k, v in sent)) is conditional
    assert not asks_validation((("If-Match", '"a"'), ("If-Unmodified-Since", "x")))  # no 304 for those


@pytest.mark.parametrize(("status", "expected"), [(304, "Replace"), (200, "Replace"), (503, "ServeStale")])
def test_the_answer_to_a_full_fetch_made_while_a_stale_response_is_kept_never_freshens_it(
    status: int, expected: str
) -> None:
    """A full fetch (the stale response has no validator) carries no conditional: its 304 is
    no answer about the stored response, but a 5xx hides behind it within stale-if-error."""
    s = stored([("Cache-Control", "max-age=1, stale-if-error=60"), ("ETag", '"a"')])
    outcome = decide_on_validation(s, status, headers(("ETag", '"a"')), T0 + 30, conditional=False)
    assert name(outcome) == expected


# (why, the answer not stored, does it supersede the stored response?). The fetch carries the
# request of the client that set it off: an answer that client's request can have caused says
# nothing of the resource, and must not take the stored response from every other client.
SUPERSEDES: list[tuple[str, UnstoredAnswer, bool]] = [
    # RFC 9111 §4.3.3: the full response is used, the stored one no longer is.
    ("no-store", UnstoredAnswer(200, "NO-STORE", False, False), True),
    # An answer for one client, whatever credential of its own (an API key field) it sent.
    ("private", UnstoredAnswer(200, "PRIVATE", False, False), False),
    ("a Set-Cookie to a request without one", UnstoredAnswer(200, "SET-COOKIE", False, False), False),
    ("no freshness", UnstoredAnswer(200, "NO-FRESHNESS", False, False), True),
    ("a rule's no_store", UnstoredAnswer(200, "RULE-NO-STORE:api", False, False), True),
    ("too large", UnstoredAnswer(200, "TOO-LARGE", False, False), True),
    # Statuses the origin gives for the resource itself.
    *[(f"{s} is the resource's", UnstoredAnswer(s, "UNCACHEABLE-STATUS", False, False), True)
      for s in (203, 204, 300, 301, 308, 404, 410)],
    # Statuses a request provokes (its method, fields, preconditions, range), temporary
    # redirects, and the origin's errors (stale-if-error keeps the stored one).
    *[(f"{s} is the request's or the origin's", UnstoredAnswer(s, "UNCACHEABLE-STATUS", False, False), False)
      for s in (206, 302, 303, 307, 400, 401, 403, 405, 406, 411, 412, 413, 414, 415, 416, 421, 422, 428,
                429, 431, 451, 500, 501, 502, 503, 504, 505)],
    # The request carried credentials: the answer may be that client's alone.
    ("a Set-Cookie to a Cookie", UnstoredAnswer(200, "SET-COOKIE", True, False), False),
    ("private to an Authorization (PRIVATE is said before AUTHORIZATION)",
     UnstoredAnswer(200, "PRIVATE", True, False), False),
    ("no-store to a Cookie", UnstoredAnswer(200, "NO-STORE", True, False), False),
    ("no lifetime for a Cookie: about the request's cookie",
     UnstoredAnswer(200, "COOKIE-NO-FRESHNESS", True, False), False),
    ("a 404 to a Cookie", UnstoredAnswer(404, "UNCACHEABLE-STATUS", True, False), False),
    # The stored response varies: the whole key, every client's variant, would go.
    ("no-store for one variant", UnstoredAnswer(200, "NO-STORE", False, True), False),
    ("a 404 for one variant", UnstoredAnswer(404, "UNCACHEABLE-STATUS", False, True), False),
    # The request kept it out of the store, not the resource.
    ("the request's no-store", UnstoredAnswer(200, "REQUEST-NO-STORE", False, False), False),
    ("the request's Authorization", UnstoredAnswer(200, "AUTHORIZATION", False, False), False),
    ("a field spelled two ways", UnstoredAnswer(200, "AMBIGUOUS-HEADER:X_Tenant", False, False), False),
    # The client's own directives sent it (max-age=0, no-cache on a response still fresh).
    ("no-store to a client's max-age=0", UnstoredAnswer(200, "NO-STORE", False, False, True), False),
    ("a 404 to a client's no-cache", UnstoredAnswer(404, "UNCACHEABLE-STATUS", False, False, True), False),
]


@pytest.mark.parametrize(("why", "answer", "supersedes"), SUPERSEDES, ids=[row[0] for row in SUPERSEDES])
def test_a_full_answer_that_is_not_stored_supersedes_the_stored_response_only_when_no_client_can_have_caused_it(
    why: str, answer: UnstoredAnswer, supersedes: bool
) -> None:
    """What the engine drops the stored response on (kept, stale-while-revalidate served it
    at every request of its window, each one refreshing it again); never on what one
    client's request can have caused (else its headers drop the entry for every client)."""
    assert supersedes_stored(answer) is supersedes, why
    s = stored([("Cache-Control", "max-age=1"), ("ETag", '"a"')])
    if answer.status < 500:  # (a full answer other than an origin error is a Replace, to store or not)
        assert decide_on_validation(s, answer.status, headers(), T0 + 30) == Replace()


# (field, updated by a 304?) — RFC 9111 §3.2 and the suite's update304 list.
UPDATES = [
    ("Test-Header", True),
    ("Cache-Control", True),
    ("Content-Type", True),
    ("Content-Location", True),
    ("Expires", True),
    ("X-Frame-Options", True),
    ("Set-Cookie2", True),
    ("Content-Length", False),
    ("Content-Encoding", False),
    ("Content-Range", False),
    ("Content-MD5", False),
    ("Content-Digest", False),
    ("Transfer-Encoding", False),
    ("Keep-Alive", False),
    ("Proxy-Authenticate", False),
    ("Set-Cookie", False),
]


@pytest.mark.parametrize(("field", "updated"), UPDATES)
def test_a_304_updates_stored_fields_except_those_rfc_9111_section_3_2_excludes(
    field: str, updated: bool
) -> None:
    merged = dict(merge_headers(((field, "old"), ("Keep", "1")), headers((field, "new"))))
    assert merged[field] == ("new" if updated else "old")
    assert merged["Keep"] == "1"


def test_fields_listed_in_the_304_s_connection_are_not_merged_rfc_9110_section_7_6_1() -> None:
    merged = merge_headers((("X-A", "old"),), headers(("Connection", "x-a"), ("X-A", "new")))
    assert merged == (("X-A", "old"),)


def test_a_304s_set_cookie_is_never_stored_even_where_a_rule_allows_set_cookie() -> None:
    # (It is the revalidating client's; a rule's allow_set_cookie stores fills without theirs.)
    assert merge_headers((("ETag", '"a"'),), headers(("Set-Cookie", "a=2"))) == (("ETag", '"a"'),)
    options = CacheOptions(allow_set_cookie=True)
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"')])
    update = headers(("Set-Cookie", "session=bob"), ("Cache-Control", "max-age=60"), ("Date", date(0)))
    fresh = freshen_stored(s, update, T0, T0, options)
    assert fresh is not None and not any(k.lower() == "set-cookie" for k, _ in fresh.headers)


def test_freshening_takes_age_and_date_from_the_304_only_rfc_9111_section_4_3_4() -> None:
    s = stored([("Cache-Control", "max-age=60"), ("Age", "50"), ("Date", date(-50)), ("ETag", '"a"')])
    assert s.freshness.ttl(T0 + 20) < 0
    later = T0 + 100
    fresh = freshen_stored(s, headers(("ETag", '"a"'), ("Date", date(100))), later, later, CacheOptions())
    assert fresh is not None
    assert fresh.freshness.age(later) == 0
    assert fresh.freshness.ttl(later + 30) == 30
    assert dict(fresh.headers)["Date"] == date(100)
    assert "Age" in dict(fresh.headers)  # kept as stored; the engine writes the current Age on use


# (case, the stored response's fields, the 304's, the stored Date after it; the 304 arrives at T0 + 100)
DATES = [
    ("the 304's Date replaces the stored one", [("Date", date(-50))], [("Date", date(99))], date(99)),
    ("a 304 without Date is dated when it was received (RFC 9110 §6.6.1)", [("Date", date(-50))], [],
     date(100)),
    ("so is a freshened response stored without one", [], [], date(100)),
]


@pytest.mark.parametrize(("case", "fields", "update", "stored_date"), DATES, ids=[d[0] for d in DATES])
def test_a_freshened_response_s_date_is_the_304_s_or_the_time_it_was_received(
        case: str, fields: Pairs, update: Pairs, stored_date: str) -> None:
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"'), *fields])
    fresh = freshen_stored(s, headers(*update), T0 + 100, T0 + 100, CacheOptions())
    assert fresh is not None
    assert [v for k, v in fresh.headers if k.lower() == "date"] == [stored_date]
    assert fresh.freshness.age(T0 + 100) == T0 + 100 - parse_http_date(stored_date)  # Date and age agree


# (case, the stored ETag, the 304's, the stored ETag after it)
ETAG_KEPT = [
    ("a 304 never makes a stored weak ETag strong: the strong tag is the uncompressed bytes' "
     "(nginx gzip)", 'W/"a"', '"a"', 'W/"a"'),
    ("a weak one replaces a strong stored one, as any field: it claims less", '"a"', 'W/"a"', 'W/"a"'),
    ("the same tag stays", 'W/"a"', 'W/"a"', 'W/"a"'),
    ("a 304 without ETag keeps the stored one (RFC 9111 §3.2)", 'W/"a"', None, 'W/"a"'),
]


@pytest.mark.parametrize(("case", "mine", "theirs", "after"), ETAG_KEPT, ids=[e[0] for e in ETAG_KEPT])
def test_the_etag_a_freshened_response_keeps(case: str, mine: str, theirs: str | None, after: str) -> None:
    s = stored([("Cache-Control", "max-age=60"), ("ETag", mine), ("Content-Encoding", "gzip")])
    update = [("Cache-Control", "max-age=120")] + ([("ETag", theirs)] if theirs else [])
    fresh = freshen_stored(s, headers(*update), T0 + 100, T0 + 100, CacheOptions())
    assert fresh is not None and fresh.freshness.lifetime == 120  # (the rest merged as any 304)
    assert fresh.etag == after
    assert [v for k, v in fresh.headers if k.lower() == "etag"] == [after]
    assert conditional_headers(fresh) == (("If-None-Match", after),)  # what the next revalidation sends


def test_a_304_with_a_new_max_age_changes_the_lifetime() -> None:
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"')])
    fresh = freshen_stored(s, headers(("Cache-Control", "max-age=600")), T0 + 70, T0 + 70, CacheOptions())
    assert fresh is not None and fresh.freshness.lifetime == 600
    assert fresh.response_time == T0 + 70


@pytest.mark.parametrize("directive", ["no-store", "private"])
def test_a_304_that_forbids_storing_ends_the_stored_response(directive: str) -> None:
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"')])
    assert freshen_stored(s, headers(("Cache-Control", directive)), T0, T0, CacheOptions()) is None


# (case, the stored response's Vary (None: none), the 304's Vary lines, kept?) The stored response
# was filled for a request with Cookie: u=A and Accept-Language: de.
VARY_304: list[tuple[str, str | None, list[str], bool]] = [
    ("a 304 without Vary keeps the stored one (RFC 9111 §3.2)", "Cookie", [], True),
    ("the same fields, spelt otherwise, keep it", "Cookie, Accept-Language", ["accept-language", "COOKIE"], True),
    ("Vary: * ends it: it could never be matched (RFC 9111 §4.1)", None, ["*"], False),
    ("a field added ends it: the fill's value of it was never recorded", None, ["Cookie"], False),
    ("so does one more field", "Cookie", ["Cookie, Accept-Language"], False),
    ("and one gone: the variant would still be matched on it", "Cookie, Accept-Language", ["Cookie"], False),
    ("a member that is not a field name ends it", "Cookie", ['"Cookie"'], False),
    ("an empty Vary on a response stored without one keeps it", None, [""], True),
]


@pytest.mark.parametrize(("case", "vary", "update", "kept"), VARY_304, ids=[v[0] for v in VARY_304])
def test_a_304_whose_vary_names_other_fields_ends_the_stored_response(
        case: str, vary: str | None, update: list[str], kept: bool) -> None:
    fill = request(("Cookie", "u=A"), ("Accept-Language", "de"))
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"'), *([("Vary", vary)] if vary else [])], req=fill)
    fresh = freshen_stored(s, headers(("ETag", '"a"'), *(("Vary", v) for v in update)), T0, T0, CacheOptions())
    assert (fresh is not None) is kept
    if fresh is not None:
        assert fresh.vary == s.vary


# (case, stored fields, request fields, 304?)
CONDITIONALS: list[tuple[str, Pairs, Pairs, bool]] = [
    ("If-None-Match with the stored ETag (RFC 9110 §13.1.2)", [("ETag", '"a"')],
     [("If-None-Match", '"a"')], True),
    ("If-None-Match uses weak comparison", [("ETag", '"a"')], [("If-None-Match", 'W/"a"')], True),
    ("one of several entity-tags", [("ETag", '"b"')], [("If-None-Match", '"a", "b"')], True),
    ("If-None-Match: * matches any stored representation", [("ETag", '"a"')], [("If-None-Match", "*")], True),
    ("another ETag does not match", [("ETag", '"a"')], [("If-None-Match", '"z"')], False),
    ("If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2)", [("ETag", '"a"'), ("Last-Modified", LM)],
     [("If-None-Match", '"z"'), ("If-Modified-Since", date(0))], False),
    ("If-Modified-Since equal to Last-Modified (RFC 9110 §13.1.3)", [("Last-Modified", LM)],
     [("If-Modified-Since", LM)], True),
    ("If-Modified-Since before Last-Modified", [("Last-Modified", LM)],
     [("If-Modified-Since", date(-20_000))], False),
    ("an invalid If-Modified-Since is ignored", [("Last-Modified", LM)],
     [("If-Modified-Since", "soon")], False),
    ("an RFC 850 date is understood", [("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT")],
     [("If-Modified-Since", "Sunday, 06-Nov-94 08:49:37 GMT")], True),
    ("without Last-Modified the stored Date stands in (RFC 9111 §4.3.2)", [("Date", date(-100))],
     [("If-Modified-Since", date(-50))], True),
    ("without Last-Modified or Date, the arrival time stands in", [],
     [("If-Modified-Since", date(-1))], False),
    ("no conditional, no 304", [("ETag", '"a"')], [], False),
]


@pytest.mark.parametrize(("case", "fields", "req", "expected"), CONDITIONALS,
                         ids=[c[0] for c in CONDITIONALS])
def test_a_client_s_conditional_request_is_evaluated_against_the_stored_response(
    case: str, fields: Pairs, req: Pairs, expected: bool
) -> None:
    s = stored([("Cache-Control", "max-age=60"), *fields])
    assert client_not_modified(headers(*req), s) is expected


@pytest.mark.parametrize("status", [203, 204, 300, 301, 404])
def test_only_a_stored_200_answers_a_conditional_with_304(status: int) -> None:
    # RFC 9110 §15.4.5: a 304 stands for the 200 the request would otherwise get (nginx and
    # Varnish answer 304 only for a 200 too); a 203 or a 404 is sent whole.
    s = stored([("Cache-Control", "max-age=60"), ("ETag", '"a"'), ("Last-Modified", LM)], status=status)
    assert not client_not_modified(headers(("If-None-Match", '"a"')), s)
    assert not client_not_modified(headers(("If-Modified-Since", date(0))), s)


# (case, stored fields, stored status, request fields, 412?): RFC 9110 §13.1.1, §13.1.4, §13.2
PRECONDITIONS: list[tuple[str, Pairs, int, Pairs, bool]] = [
    ("If-Match with the stored strong ETag holds", [("ETag", '"a"')], 200, [("If-Match", '"a"')], False),
    ("one of several listed tags", [("ETag", '"b"')], 200, [("If-Match", '"a", "b"')], False),
    ("tags over several lines", [("ETag", '"b"')], 200, [("If-Match", '"a"'), ("If-Match", '"b"')], False),
    ("another ETag fails", [("ETag", '"a"')], 200, [("If-Match", '"z"')], True),
    ("strong comparison: a weak listed tag never matches", [("ETag", '"a"')], 200,
     [("If-Match", 'W/"a"')], True),
    ("strong comparison: a weak stored ETag never matches", [("ETag", 'W/"a"')], 200,
     [("If-Match", '"a"')], True),
    ("no stored ETag: a listed tag fails", [("Last-Modified", LM)], 200, [("If-Match", '"a"')], True),
    ("If-Match: * holds for any stored 2xx", [], 200, [("If-Match", "*")], False),
    ("ignored on a stored non-2xx (§13.2.1)", [("ETag", '"a"')], 404, [("If-Match", '"z"')], False),
    ("If-Unmodified-Since before Last-Modified fails", [("Last-Modified", LM)], 200,
     [("If-Unmodified-Since", date(-20_000))], True),
    ("If-Unmodified-Since equal to Last-Modified holds", [("Last-Modified", LM)], 200,
     [("If-Unmodified-Since", LM)], False),
    ("If-Unmodified-Since after Last-Modified holds", [("Last-Modified", LM)], 200,
     [("If-Unmodified-Since", date(0))], False),
    ("If-Unmodified-Since without a stored Last-Modified is ignored", [("ETag", '"a"')], 200,
     [("If-Unmodified-Since", date(-20_000))], False),
    ("an invalid If-Unmodified-Since is ignored", [("Last-Modified", LM)], 200,
     [("If-Unmodified-Since", "yesterday")], False),
    ("If-Unmodified-Since on two lines is ignored", [("Last-Modified", LM)], 200,
     [("If-Unmodified-Since", date(-20_000)), ("If-Unmodified-Since", date(-20_000))], False),
    ("If-Match wins over If-Unmodified-Since (§13.2.2): it holds", [("ETag", '"a"'), ("Last-Modified", LM)],
     200, [("If-Match", '"a"'), ("If-Unmodified-Since", date(-20_000))], False),
    ("If-Match wins over If-Unmodified-Since (§13.2.2): it fails", [("ETag", '"a"'), ("Last-Modified", LM)],
     200, [("If-Match", '"z"'), ("If-Unmodified-Since", date(0))], True),
    ("If-None-Match and If-Modified-Since are not preconditions that fail", [("ETag", '"a"')], 200,
     [("If-None-Match", '"z"'), ("If-Modified-Since", date(-20_000))], False),
    ("no precondition", [("ETag", '"a"')], 200, [], False),
]


@pytest.mark.parametrize(("case", "fields", "status", "req", "expected"), PRECONDITIONS,
                         ids=[c[0] for c in PRECONDITIONS])
def test_a_client_s_precondition_is_evaluated_against_the_stored_response(
    case: str, fields: Pairs, status: int, req: Pairs, expected: bool
) -> None:
    s = stored([("Cache-Control", "max-age=60"), *fields], status=status)
    assert precondition_failed(headers(*req), s) is expected


# (case, stored Cache-Control, stored status, answer status, seconds after storing, keep the stored one?)
ERRORS = [
    ("a 5xx within stale-if-error leaves the stored response in place (RFC 5861 §4)",
     "max-age=10, stale-if-error=60", 200, 503, 30, True),
    ("a 5xx while the stored response is still fresh leaves it too", "max-age=10", 200, 500, 5, True),
    ("past the window the 5xx replaces it", "max-age=10, stale-if-error=60", 200, 503, 100, False),
    ("a stored error is replaced by the new error", "max-age=10, stale-if-error=60", 503, 503, 30, False),
    ("must-revalidate is never kept for stale serving (RFC 9111 §5.2.2.2)",
     "max-age=10, must-revalidate, stale-if-error=60", 200, 503, 30, False),
    ("a non-error answer always replaces", "max-age=10, stale-if-error=60", 200, 404, 30, False),
    ("a 500, 502 or 504 is an error as a 503 is (RFC 5861 §4)", "max-age=10, stale-if-error=60", 200, 504, 30,
     True),
    ("a 501 is the origin's answer, not an error stale-if-error hides (RFC 5861 §4)",
     "max-age=10, stale-if-error=60", 200, 501, 30, False),
    ("nor is a 505", "max-age=10, stale-if-error=60", 200, 505, 30, False),
    ("nor a 5xx RFC 5861 does not name (507)", "max-age=10, stale-if-error=60", 200, 507, 30, False),
]


@pytest.mark.parametrize(("case", "cc", "status", "answer", "after", "keep"), ERRORS,
                         ids=[e[0] for e in ERRORS])
def test_an_origin_error_does_not_replace_a_response_that_may_hide_it(
    case: str, cc: str, status: int, answer: int, after: float, keep: bool
) -> None:
    s = stored([("Cache-Control", cc)], status=status)
    assert error_keeps_stored(s, answer, T0 + after) is keep
