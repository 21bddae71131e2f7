"""The fill decision: is a fetched response stored, and as what (RFC 9111 §3 with the rules)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from proxy.policy.fill import (
    MAX_TAG_BYTES,
    Exchange,
    Fill,
    FillSettings,
    NoFill,
    decide_fill,
    freshened,
    hit_for_pass,
    shareable_with_followers,
)
from proxy.policy.messages import CacheOptions, RequestHead
from tests.policy.build import T0, date, headers, request, stored

Pairs = list[tuple[str, str]]
FRESH = ("Cache-Control", "max-age=100")
SETTINGS = FillSettings("1.1 cachegate", ("surrogate-key", "cache-tag"))


@dataclass(frozen=True)
class Rules:
    """Store-time rules as ``proxy.rules.StorePlan`` gives them (``policy.fill.StoreRules``)."""

    options: CacheOptions = field(default_factory=CacheOptions)
    no_store_rule: str | None = None
    deception_guard: bool = False
    ttl_jitter: float = 0.0
    tags: tuple[str, ...] = ()


def fill(response: Pairs, *, status: int = 200, rules: Rules | None = None, req: RequestHead | None = None,
         jitter: float = 0.0, part: bool = False) -> Fill | NoFill:
    answer = Exchange(req or request(), status, "OK", headers(*response), T0, T0)
    return decide_fill(answer, rules or Rules(), SETTINGS, jitter=jitter, part=part)


RULE_TTL = CacheOptions(ttl_by_status={200: 60.0}, override_origin=True)

# (case, request, status, response fields, rules, the NoFill detail or None when stored)
CASES: list[tuple[str, RequestHead, int, Pairs, Rules, str | None]] = [
    ("a fresh 200 is stored", request(), 200, [FRESH], Rules(), None),
    ("a HEAD fills with a GET: its answer is stored as the GET's", request(method="HEAD"), 200, [FRESH],
     Rules(), None),
    ("a POST is never stored", request(method="POST"), 200, [FRESH], Rules(), "METHOD"),
    ("a rule's no_store wins over any freshness", request(), 200, [FRESH], Rules(no_store_rule="api"),
     "RULE-NO-STORE:api"),
    ("a rule's no_store is named before RFC 9111's reasons", request(), 200,
     [("Cache-Control", "private")], Rules(no_store_rule="api"), "RULE-NO-STORE:api"),
    ("private is never stored (RFC 9111 §5.2.2.7)", request(), 200, [("Cache-Control", "private, max-age=9")],
     Rules(), "PRIVATE"),
    ("Set-Cookie is not stored unless a rule allows it", request(), 200, [FRESH, ("Set-Cookie", "a=1")],
     Rules(), "SET-COOKIE"),
    ("the deception guard refuses a type the extension contradicts", request(target="/a.css"), 200,
     [FRESH, ("Content-Type", "text/html")], Rules(deception_guard=True), "DECEPTION-GUARD"),
    ("the guard lets an agreeing type through", request(target="/a.css"), 200,
     [FRESH, ("Content-Type", "text/css")], Rules(deception_guard=True), None),
    ("the guard off lets anything through", request(target="/a.css"), 200,
     [FRESH, ("Content-Type", "text/html")], Rules(), None),
    ("under a rule's ttl the guard wants positive proof: no extension is refused", request(target="/a"),
     200, [("Content-Type", "text/html")], Rules(options=RULE_TTL, deception_guard=True), "DECEPTION-GUARD"),
    ("under the origin's freshness no extension proves nothing and is stored", request(target="/a"), 200,
     [FRESH, ("Content-Type", "text/html")], Rules(deception_guard=True), None),
]


@pytest.mark.parametrize(("case", "req", "status", "response", "rules", "detail"), CASES,
                         ids=[c[0] for c in CASES])
def test_the_fill_decision(case: str, req: RequestHead, status: int, response: Pairs, rules: Rules,
                           detail: str | None) -> None:
    decision = fill(response, status=status, rules=rules, req=req)
    if detail is None:
        assert isinstance(decision, Fill), decision
    else:
        assert decision == NoFill(detail)


def test_a_cookie_stored_under_allow_set_cookie_is_dropped_from_what_is_kept() -> None:
    rules = Rules(options=CacheOptions(allow_set_cookie=True))
    decision = fill([FRESH, ("Set-Cookie", "a=1"), ("set-cookie", "b=2")], rules=rules)
    assert isinstance(decision, Fill)
    assert [k for k, _ in decision.response.headers] == ["Cache-Control", "Date", "Via"]


def test_the_filling_request_s_id_echoed_by_the_origin_is_not_kept() -> None:
    decision = fill([FRESH, ("X-Request-Id", "abc")])
    assert isinstance(decision, Fill)
    assert [k for k, _ in decision.response.headers] == ["Cache-Control", "Date", "Via"]


def test_a_part_is_kept_as_its_complete_response_would_be_without_the_cookie() -> None:
    rules = Rules(options=CacheOptions(allow_set_cookie=True))
    decision = fill([FRESH, ("Content-Range", "bytes 0-4/10"), ("Set-Cookie", "a=1")], status=206,
                    rules=rules, part=True)
    assert isinstance(decision, Fill)
    assert decision.response.status == 206
    assert dict(decision.response.headers) == {"Cache-Control": "max-age=100", "Content-Range": "bytes 0-4/10",
                                               "Date": date(0), "Via": "1.1 cachegate"}


@pytest.mark.parametrize(("response", "detail"), [
    ([FRESH], "NO-CONTENT-RANGE"),
    ([FRESH, ("Content-Range", "bytes 0-4/10"), ("Content-Type", "multipart/byteranges; boundary=x")],
     "MULTIPART"),
])
def test_a_part_that_cannot_be_placed_is_not_stored(response: Pairs, detail: str) -> None:
    assert fill(response, status=206, part=True) == NoFill(detail)


def test_this_cache_s_via_is_the_last_member_once() -> None:
    decision = fill([FRESH, ("Via", "1.1 lb")])
    assert isinstance(decision, Fill)
    assert [v for k, v in decision.response.headers if k == "Via"] == ["1.1 lb, 1.1 cachegate"]


def test_tags_come_from_the_configured_fields_then_the_rule_once_each() -> None:
    decision = fill([FRESH, ("Surrogate-Key", "a b"), ("Cache-Tag", "b,c"), ("X-Tags", "x")],
                    rules=Rules(tags=("c", "d")))
    assert isinstance(decision, Fill)
    assert decision.tags == ("a", "b", "c", "d")


@pytest.mark.parametrize(("draw", "lifetime"), [(0.0, 100.0), (0.5, 95.0), (0.999, 90.01)])
def test_ttl_jitter_shortens_the_lifetime_by_the_draw_never_lengthens_it(draw: float, lifetime: float) -> None:
    decision = fill([FRESH], rules=Rules(ttl_jitter=0.1), jitter=draw)
    assert isinstance(decision, Fill)
    assert decision.response.freshness.lifetime == pytest.approx(lifetime)


def test_a_response_without_a_lifetime_is_not_jittered() -> None:
    decision = fill([("ETag", '"a"')], rules=Rules(ttl_jitter=0.5), jitter=0.9)
    assert isinstance(decision, Fill)
    assert decision.response.freshness.lifetime == 0


def test_a_304_freshens_the_stored_response_and_keeps_it_as_a_fill_would() -> None:
    s = stored([("Cache-Control", "max-age=10"), ("ETag", '"a"'), ("Via", "1.1 cachegate")])
    update = Exchange(request(), 304, "", headers(("Cache-Control", "max-age=100"), ("Via", "1.1 origin")),
                      T0 + 50, T0 + 50)
    fresh = freshened(s, update, Rules(ttl_jitter=0.1), SETTINGS, jitter=0.5)
    assert fresh is not None
    assert fresh.freshness.lifetime == pytest.approx(95.0) and fresh.freshness.ttl(T0 + 50) == pytest.approx(95)
    assert [v for k, v in fresh.headers if k == "Via"] == ["1.1 origin, 1.1 cachegate"]


def test_a_304_echoing_the_revalidating_request_s_id_does_not_add_it_to_the_stored_response() -> None:
    s = stored([("Cache-Control", "max-age=10"), ("ETag", '"a"')])
    update = Exchange(request(), 304, "", headers(("X-Request-Id", "abc"), ("X-New", "1")), T0 + 50, T0 + 50)
    fresh = freshened(s, update, Rules(), SETTINGS)
    assert fresh is not None
    assert [k for k, _ in fresh.headers] == ["Cache-Control", "ETag", "X-New", "Date", "Via"]


def test_a_304_saying_private_ends_the_stored_response() -> None:
    s = stored([("Cache-Control", "max-age=10"), ("ETag", '"a"')])
    update = Exchange(request(), 304, "", headers(("Cache-Control", "private")), T0 + 50, T0 + 50)
    assert freshened(s, update, Rules(), SETTINGS) is None


# (case, filled for a request with Authorization, the revalidating request has a cookie, the
# 304's fields, the freshness source after it). (A fill with a cookie and no lifetime is not
# stored at all: COOKIE-NO-FRESHNESS; with Authorization, must-revalidate stores it.)
FRESHENED_CREDENTIALS = [
    ("anonymous fill, anonymous revalidation: the heuristic applies", False, False, [], "heuristic"),
    ("a fill with Authorization, an anonymous revalidation: still no heuristic (whose page it is "
     "stays known)", True, False, [], "none"),
    ("an anonymous fill, a revalidation with a cookie: no heuristic", False, True, [], "none"),
    ("a fill with Authorization, a 304 saying public: the heuristic applies", True, False,
     [("Cache-Control", "public")], "heuristic"),
]


@pytest.mark.parametrize(("case", "filled", "revalidated", "update", "source"), FRESHENED_CREDENTIALS,
                         ids=[c[0] for c in FRESHENED_CREDENTIALS])
def test_a_response_filled_with_credentials_gets_no_heuristic_lifetime_from_a_304(
        case: str, filled: bool, revalidated: bool, update: Pairs, source: str) -> None:
    cookie = [("Cookie", "session=alice")]
    s = stored([("Last-Modified", date(-864_000)), ("Date", date(0)), ("Cache-Control", "must-revalidate")],
               req=request(*[("Authorization", "Bearer alice")] if filled else []))
    assert s.credentials is filled and s.freshness.source == ("none" if filled else "heuristic")
    answer = Exchange(request(*cookie if revalidated else []), 304, "", headers(("Date", date(50)), *update),
                      T0 + 50, T0 + 50)
    fresh = freshened(s, answer, Rules(), SETTINGS)
    assert fresh is not None
    assert fresh.freshness.source == source
    assert fresh.credentials is (filled or revalidated)  # kept for the next revalidation


# (case, response fields, seconds after arrival, a 304 to a revalidation freshened it, shareable)
SHAREABLE = [
    ("fresh on arrival: followers take it", [FRESH], 0, False, True),
    ("stale on arrival (an Age beyond max-age): followers validate for themselves",
     [FRESH, ("Age", "200")], 0, False, False),
    ("no-cache: every use is validated, a follower's too", [("Cache-Control", "no-cache, max-age=100")], 0,
     False, False),
    ("no lifetime, only a validator", [("ETag", '"a"'), ("Date", date(0))], 0, False, False),
    # RFC 9111 §4.3.4: the 304 is the validation the followers of a revalidation waited for.
    ("no-cache, freshened by the 304 they waited for: taken", [("Cache-Control", "no-cache"), ("ETag", '"a"')],
     0, True, True),
    ("stale on arrival, freshened by the 304 they waited for: taken", [FRESH, ("Age", "200"), ("ETag", '"a"')],
     0, True, True),
    ("fresh, freshened by the 304 they waited for: taken", [FRESH, ("ETag", '"a"')], 0, True, True),
]


@pytest.mark.parametrize(("case", "response", "after", "validated", "shareable"), SHAREABLE,
                         ids=[s[0] for s in SHAREABLE])
def test_followers_share_a_fill_only_when_it_is_fresh_on_arrival_and_a_304_whatever_its_freshness(
        case: str, response: Pairs, after: float, validated: bool, shareable: bool) -> None:
    assert shareable_with_followers(stored(response), T0 + after, validated=validated) is shareable


def test_a_response_with_more_than_1024_tags_is_not_stored_rather_than_stored_with_some() -> None:
    # Keeping only some tags would leave the entry out of the purges by the others.
    many = " ".join(f"t{i}" for i in range(1024))
    decision = fill([FRESH, ("Surrogate-Key", many)])
    assert isinstance(decision, Fill) and len(decision.tags) == 1024
    assert isinstance(fill([FRESH, ("Surrogate-Key", many + " t0 t1")]), Fill)  # a tag twice counts once
    assert fill([FRESH, ("Surrogate-Key", many)], rules=Rules(tags=("one-more",))) == NoFill("TOO-MANY-TAGS")
    assert fill([FRESH, ("Surrogate-Key", many + " x")]) == NoFill("TOO-MANY-TAGS")


def test_a_response_with_more_than_16_kb_of_tags_is_not_stored_as_one_with_too_many() -> None:
    """Each tag is kept in the entry's metadata and twice in the index: a few long tags (one of
    15 KB, a comma-less list an origin meant as many) cost what many short ones do."""
    assert MAX_TAG_BYTES == 16 * 1024
    half = "k" * (MAX_TAG_BYTES // 2 - 1)
    assert isinstance(fill([FRESH, ("Surrogate-Key", f"{half}a {half}b")]), Fill)  # 16 KB exactly
    decision = fill([FRESH, ("Surrogate-Key", f"{half}a {half}b")], rules=Rules(tags=("r",)))
    assert decision == NoFill("TOO-MANY-TAGS")  # (the rule's tag counts too)
    # Counted in UTF-8: 900 two-byte characters are 1,800 bytes.
    wide = [f"{'é' * 900}{i}" for i in range(10)]
    assert sum(map(len, wide)) < MAX_TAG_BYTES < 2 * sum(map(len, wide))
    assert fill([FRESH, ("Cache-Tag", ",".join(wide))]) == NoFill("TOO-MANY-TAGS")


# (case, filled for a request with Authorization, the revalidating request's fields, the 304's
# fields, the freshness source after it, or None when the stored response may no longer be kept)
AUTH = ("Authorization", "Bearer alice")
FRESHENED_AUTHORIZATION: list[tuple[str, bool, list[tuple[str, str]], Pairs, str | None]] = [
    ("an anonymous 304: still the origin's freshness only, no rule ttl", True, [], [], "none"),
    ("a 304 to the same user: the same", True, [AUTH], [], "none"),
    ("a 304 saying public: the origin now lets it be shared, the rule applies", True, [],
     [("Cache-Control", "public")], "rule"),
    ("a 304 that drops must-revalidate: nothing lets a shared cache keep it any more", True, [],
     [("Cache-Control", "max-age=60")], None),
    ("an anonymous fill revalidated with Authorization: the rule applies (the 304 does not make it theirs)",
     False, [AUTH], [], "rule"),
]


@pytest.mark.parametrize(("case", "filled", "fields", "update", "source"), FRESHENED_AUTHORIZATION,
                         ids=[c[0] for c in FRESHENED_AUTHORIZATION])
def test_a_response_filled_for_authorization_keeps_the_origins_freshness_only_through_a_304(
        case: str, filled: bool, fields: list[tuple[str, str]], update: Pairs, source: str | None) -> None:
    rules = Rules(options=CacheOptions(ttl_by_status={200: 300.0}, override_origin=True))
    s = stored([("Cache-Control", "must-revalidate"), ("ETag", '"a"'), ("Date", date(0))],
               req=request(*[AUTH] if filled else []), options=rules.options)
    assert s.authorization is filled and s.freshness.source == ("none" if filled else "rule")
    answer = Exchange(request(*fields), 304, "", headers(("Date", date(50)), *update), T0 + 50, T0 + 50)
    fresh = freshened(s, answer, rules, SETTINGS)
    if source is None:
        assert fresh is None
    else:
        assert fresh is not None and fresh.freshness.source == source
        assert fresh.authorization is filled  # kept for the next revalidation


def test_a_body_delimited_by_the_end_of_a_tls_connection_is_never_stored() -> None:
    """RFC 9112 §9.8: its end cannot be told from a truncation. What the response says about
    itself comes first (it says why more plainly), and a part is held to the same rule."""
    def over_tls(response: Pairs, *, part: bool = False, status: int = 200) -> Fill | NoFill:
        answer = Exchange(request(), status, "OK", headers(*response), T0, T0, close_delimited_tls=True)
        return decide_fill(answer, Rules(), SETTINGS, part=part)

    assert over_tls([FRESH]) == NoFill("TLS-CLOSE-DELIMITED")
    assert over_tls([FRESH, ("Content-Range", "bytes 0-1/10")], part=True, status=206) \
        == NoFill("TLS-CLOSE-DELIMITED")
    assert over_tls([("Cache-Control", "private, max-age=100")]) == NoFill("PRIVATE")
    assert isinstance(fill([FRESH]), Fill)


# (case, Cache-Status detail of the answer not stored, its status, the request's fields, marked)
HIT_FOR_PASS: list[tuple[str, str, int, dict[str, str], bool]] = [
    ("a private answer marks, whoever asked", "PRIVATE", 200, {"Cookie": "s=1"}, True),
    ("a Set-Cookie marks", "SET-COOKIE", 200, {}, True),
    ("a 503 without freshness marks", "UNCACHEABLE-STATUS", 503, {}, True),
    ("a 500 without freshness marks", "UNCACHEABLE-STATUS", 500, {}, True),
    ("a 200 with no lifetime and no validator marks", "NO-FRESHNESS", 200, {}, True),
    # The origin refusing one client's request (its huge cookie, its rate limit, its token)
    # says nothing of the key's other requests: no mark (any client could turn coalescing
    # off for everyone every few seconds).
    ("a 400 to one client's request does not mark", "UNCACHEABLE-STATUS", 400, {}, False),
    ("a 401 does not mark", "UNCACHEABLE-STATUS", 401, {}, False),
    ("a 403 does not mark", "UNCACHEABLE-STATUS", 403, {}, False),
    ("a 429 to one client's rate does not mark", "UNCACHEABLE-STATUS", 429, {"X-Rate": "limited"}, False),
    ("a redirect without freshness does not mark", "UNCACHEABLE-STATUS", 302, {}, False),
    ("a 503 to a request with a Cookie does not mark", "UNCACHEABLE-STATUS", 503, {"Cookie": "huge=1"}, False),
    ("a 503 to a request with Authorization does not mark", "UNCACHEABLE-STATUS", 503,
     {"Authorization": "Bearer x"}, False),
    ("a 503 to a request with a Range does not mark", "UNCACHEABLE-STATUS", 503, {"Range": "bytes=0-1"}, False),
    ("a 503 to a conditional request does not mark", "UNCACHEABLE-STATUS", 503, {"If-None-Match": '"a"'}, False),
    ("a 503 to an If-Modified-Since does not mark", "UNCACHEABLE-STATUS", 503,
     {"If-Modified-Since": "Sun, 06 Dec 2026 10:00:00 GMT"}, False),
    ("no lifetime for a request with a Cookie does not mark", "NO-FRESHNESS", 200, {"Cookie": "s=1"}, False),
    ("no lifetime for a range request does not mark", "NO-FRESHNESS", 200, {"Range": "bytes=0-1"}, False),
    ("a 206 answers the request's own range", "NO-FRESHNESS", 206, {}, False),
    ("a 304 answers the request's own preconditions", "UNCACHEABLE-STATUS", 304, {}, False),
    ("too large to keep does not mark", "TOO-LARGE", 200, {}, False),
    ("the request's own Authorization does not mark", "AUTHORIZATION", 200, {"Authorization": "x"}, False),
    ("the request's own Cookie (no lifetime for it) does not mark", "COOKIE-NO-FRESHNESS", 200,
     {"Cookie": "s=1"}, False),
]


@pytest.mark.parametrize(("case", "detail", "status", "fields", "marked"), HIT_FOR_PASS,
                         ids=[c[0] for c in HIT_FOR_PASS])
def test_an_answer_not_stored_marks_the_key_hit_for_pass_only_when_no_request_can_have_caused_it(
        case: str, detail: str, status: int, fields: dict[str, str], marked: bool) -> None:
    assert hit_for_pass(detail, status, headers(*fields.items())) is marked
