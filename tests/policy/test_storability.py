"""May a shared cache store this response? (RFC 9111 §3)"""

from __future__ import annotations

import pytest

from proxy.policy.messages import CacheOptions, RequestHead
from proxy.policy.storability import DontStore, Store, too_large
from tests.policy.build import T0, date, request, store, stored

Pairs = list[tuple[str, str]]
FRESH = ("Cache-Control", "max-age=60")

COOKIE = ("Cookie", "session=alice")
ETAG = ("ETag", '"article-7"')  # names the article, not the page rendered for one user
LAST_MODIFIED = ("Last-Modified", date(-86400))
RULE_TTL = CacheOptions(ttl_by_status={200: 60.0})

# A response to a request with a Cookie that would be reused only after asking the origin (no
# lifetime above 0, or no-cache) is not stored unless public: the next client's revalidation
# would carry this one's validators, and an origin comparing only them answers 304 for this
# user's page. (case, request, status, response fields, options, detail)
COOKIE_CASES: list[tuple[str, RequestHead, int, Pairs, CacheOptions, str | None]] = [
    ("a Cookie, no Cache-Control, a constant Last-Modified: no heuristic, not stored", request(COOKIE), 200,
     [LAST_MODIFIED, ("Date", date(0))], CacheOptions(), "COOKIE-NO-FRESHNESS"),
    ("a Cookie, max-age=0 and an ETag", request(COOKIE), 200, [("Cache-Control", "max-age=0"), ETAG],
     CacheOptions(), "COOKIE-NO-FRESHNESS"),
    ("a Cookie, no-cache and an ETag", request(COOKIE), 200, [("Cache-Control", "no-cache"), ETAG],
     CacheOptions(), "COOKIE-NO-FRESHNESS"),
    ("a Cookie, no-cache beside a max-age: every use asks the origin all the same", request(COOKIE), 200,
     [("Cache-Control", "no-cache, max-age=600"), ETAG], CacheOptions(), "COOKIE-NO-FRESHNESS"),
    ("a Cookie, max-age=0, must-revalidate", request(COOKIE), 200,
     [("Cache-Control", "max-age=0, must-revalidate"), LAST_MODIFIED], CacheOptions(), "COOKIE-NO-FRESHNESS"),
    ("a Cookie, s-maxage=0", request(COOKIE), 200, [("Cache-Control", "s-maxage=0"), ETAG], CacheOptions(),
     "COOKIE-NO-FRESHNESS"),
    ("a Cookie, Expires: -1", request(COOKIE), 200, [("Date", date(0)), ("Expires", "-1"), ETAG],
     CacheOptions(), "COOKIE-NO-FRESHNESS"),
    ("a Cookie, the origin's own stale-if-error beside max-age=0: it would serve that page on an error",
     request(COOKIE), 200, [("Cache-Control", "max-age=0, stale-if-error=3600"), ETAG], CacheOptions(),
     "COOKIE-NO-FRESHNESS"),
    ("a Cookie, stale-while-revalidate beside max-age=0: it would serve that page at once",
     request(COOKIE), 200, [("Cache-Control", "max-age=0, stale-while-revalidate=60")], CacheOptions(),
     "COOKIE-NO-FRESHNESS"),
    ("a Cookie, no freshness and no validator: nothing to revalidate by, cookie or not", request(COOKIE), 200,
     [("Date", date(0))], CacheOptions(), "NO-FRESHNESS"),
    ("a Cookie and Vary: Cookie: not stored either", request(COOKIE), 200,
     [("Cache-Control", "no-cache"), ETAG, ("Vary", "Cookie")], CacheOptions(), "COOKIE-NO-FRESHNESS"),
    ("a Cookie, a rule ttl of 0s", request(COOKIE), 200, [ETAG], CacheOptions(ttl_by_status={200: 0.0}),
     "COOKIE-NO-FRESHNESS"),
    ("a Cookie, a rule ttl beside the origin's max-age=0 (no override_origin): the origin's 0 decides",
     request(COOKIE), 200, [("Cache-Control", "max-age=0"), ETAG], RULE_TTL, "COOKIE-NO-FRESHNESS"),
    ("a Cookie, a rule ttl beside the origin's no-cache (no override_origin): every use asks the origin",
     request(COOKIE), 200, [("Cache-Control", "no-cache"), ETAG], RULE_TTL, "COOKIE-NO-FRESHNESS"),
    ("a Cookie and Authorization, must-revalidate without a lifetime: the Cookie decides",
     request(COOKIE, ("Authorization", "Bearer alice")), 200, [("Cache-Control", "must-revalidate"), ETAG],
     CacheOptions(), "COOKIE-NO-FRESHNESS"),
    # Stored: a lifetime, public, or the operator's rule ttl.
    ("a Cookie and max-age: stored", request(COOKIE), 200, [FRESH, ETAG], CacheOptions(), None),
    ("a Cookie and Expires in the future: stored", request(COOKIE), 200,
     [("Date", date(0)), ("Expires", date(60))], CacheOptions(), None),
    ("a Cookie and public, max-age=0: stored to be revalidated (the origin says it is everyone's)",
     request(COOKIE), 200, [("Cache-Control", "public, max-age=0"), ETAG], CacheOptions(), None),
    ("a Cookie and public, no-cache: stored to be revalidated", request(COOKIE), 200,
     [("Cache-Control", "public, no-cache"), ETAG], CacheOptions(), None),
    ("a Cookie, public and a Last-Modified: stored with a heuristic lifetime", request(COOKIE), 200,
     [("Cache-Control", "public"), LAST_MODIFIED, ("Date", date(0))], CacheOptions(), None),
    ("a Cookie, a rule ttl where the origin gave none: stored (the operator's choice)", request(COOKIE), 200,
     [ETAG], RULE_TTL, None),
    ("a Cookie, an override_origin rule ttl over max-age=0, no-cache: stored", request(COOKIE), 200,
     [("Cache-Control", "max-age=0, no-cache"), ETAG],
     CacheOptions(ttl_by_status={200: 60.0}, override_origin=True), None),
    ("a targeted CDN-Cache-Control lifetime beside Cache-Control: no-cache, with a Cookie: stored",
     request(COOKIE), 200, [("Cache-Control", "no-cache"), ("CDN-Cache-Control", "max-age=60"), ETAG],
     CacheOptions(targeted_fields=("cdn-cache-control",)), None),
    # Authorization keeps RFC 9111 §3.5's permission: the origin's explicit word to a shared cache.
    ("Authorization with max-age=0, must-revalidate: stored to be revalidated (RFC 9111 §3.5)",
     request(("Authorization", "Bearer alice")), 200, [("Cache-Control", "max-age=0, must-revalidate"), ETAG],
     CacheOptions(), None),
    ("Authorization with s-maxage=0: stored to be revalidated (RFC 9111 §3.5)",
     request(("Authorization", "Bearer alice")), 200, [("Cache-Control", "s-maxage=0"), ETAG], CacheOptions(),
     None),
    # Without a Cookie, as before: stored to be revalidated.
    ("no Cookie, max-age=0 and an ETag: stored to be revalidated", request(), 200,
     [("Cache-Control", "max-age=0"), ETAG], CacheOptions(), None),
    ("no Cookie, no-cache and an ETag: stored to be revalidated", request(), 200,
     [("Cache-Control", "no-cache"), ETAG], CacheOptions(), None),
]

# (case, request, status, response fields, options, None when stored or the DontStore detail)
CASES: list[tuple[str, RequestHead, int, Pairs, CacheOptions, str | None]] = [
    ("a 200 with max-age is stored", request(), 200, [FRESH], CacheOptions(), None),
    ("no-store is never stored (RFC 9111 §5.2.2.5)", request(), 200,
     [("Cache-Control", "max-age=60, no-store")], CacheOptions(), "NO-STORE"),
    ("no-store in any field line counts", request(), 200,
     [FRESH, ("Cache-Control", "no-store")], CacheOptions(), "NO-STORE"),
    ("NO-STORE in capitals counts (names are case-insensitive)", request(), 200,
     [("Cache-Control", "NO-STORE, max-age=60")], CacheOptions(), "NO-STORE"),
    ("a request's no-store forbids storing its response (RFC 9111 §5.2.1.5)",
     request(("Cache-Control", "no-store")), 200, [FRESH], CacheOptions(), "REQUEST-NO-STORE"),
    ("private is never stored by a shared cache (RFC 9111 §5.2.2.7)", request(), 200,
     [("Cache-Control", "private, max-age=60")], CacheOptions(), "PRIVATE"),
    ('private="field" is handled as strictly as private', request(), 200,
     [("Cache-Control", 'private="Set-Cookie", max-age=60')], CacheOptions(), "PRIVATE"),
    ("a request with Authorization is not stored (RFC 9111 §3.5)",
     request(("Authorization", "Basic x")), 200, [FRESH], CacheOptions(), "AUTHORIZATION"),
    ("Authorization with public is stored (RFC 9111 §3.5)", request(("Authorization", "Basic x")), 200,
     [("Cache-Control", "max-age=60, public")], CacheOptions(), None),
    ("Authorization with s-maxage is stored (RFC 9111 §3.5)", request(("Authorization", "Basic x")), 200,
     [("Cache-Control", "s-maxage=60")], CacheOptions(), None),
    ("Authorization with must-revalidate is stored (RFC 9111 §3.5)",
     request(("Authorization", "Basic x")), 200,
     [("Cache-Control", "max-age=60, must-revalidate")], CacheOptions(), None),
    ("Set-Cookie is not stored by default", request(), 200, [FRESH, ("Set-Cookie", "a=b")],
     CacheOptions(), "SET-COOKIE"),
    ("Set-Cookie is stored when a rule allows it", request(), 200, [FRESH, ("Set-Cookie", "a=b")],
     CacheOptions(allow_set_cookie=True), None),
    ("Vary: * is never stored: it could never be reused (RFC 9111 §4.1)", request(), 200,
     [FRESH, ("Vary", "Accept, *")], CacheOptions(), "VARY-STAR"),
    ("a Vary member that is not a field name is as Vary: * (RFC 9110 §5.1: a token)", request(), 200,
     [FRESH, ("Vary", 'Accept, "Cookie"')], CacheOptions(), "VARY-INVALID"),
    ("so is one with a parameter", request(), 200, [FRESH, ("Vary", "Cookie;x=1")], CacheOptions(),
     "VARY-INVALID"),
    ("so is one with a space inside", request(), 200, [FRESH, ("Vary", "Coo kie")], CacheOptions(),
     "VARY-INVALID"),
    ("a * beside an invalid member is VARY-STAR", request(), 200, [FRESH, ("Vary", '"a", *')], CacheOptions(),
     "VARY-STAR"),
    ("a response varying on X-Forwarded-For is not stored: cachegate sets it per client",
     request(), 200, [FRESH, ("Vary", "Accept, x-forwarded-for")], CacheOptions(), "VARY-PER-CLIENT"),
    ("nor one varying on X-Request-Id (cachegate sends each request's own)",
     request(), 200, [FRESH, ("Vary", "X-Request-Id")], CacheOptions(), "VARY-PER-CLIENT"),
    ("a response varying on a forwarding field cachegate does not set per client is stored",
     request(), 200, [FRESH, ("Vary", "X-Forwarded-Proto")], CacheOptions(), None),
    ("a response varying on a field the request also sent spelled with _ is not stored: a CGI, "
     "WSGI or Rack origin may have answered for that line's value",
     request(("X-Tenant", "acme"), ("X_Tenant", "evil")), 200, [FRESH, ("Vary", "Accept, X-Tenant")],
     CacheOptions(), "AMBIGUOUS-HEADER:x-tenant"),
    ("nor when the request sent the _ spelling alone (the variant would record the field absent)",
     request(("x_tenant", "evil")), 200, [FRESH, ("Vary", "X-Tenant")], CacheOptions(),
     "AMBIGUOUS-HEADER:x-tenant"),
    ("a field the response does not vary on may come spelled with _",
     request(("X-Tenant", "acme"), ("X_Other", "1")), 200, [FRESH, ("Vary", "X-Tenant")], CacheOptions(),
     None),
    ("a response without Vary is stored whatever the request's spellings",
     request(("X-Tenant", "acme"), ("X_Tenant", "evil")), 200, [FRESH], CacheOptions(), None),
    ("a HEAD response is not stored as a GET", request(method="HEAD"), 200, [FRESH], CacheOptions(),
     "METHOD"),
    ("a POST response is not stored", request(method="POST"), 200, [FRESH], CacheOptions(), "METHOD"),
    ("a 206 is not stored (no partial storage)", request(), 206, [FRESH], CacheOptions(),
     "UNCACHEABLE-STATUS"),
    ("a 304 is not stored", request(), 304, [FRESH], CacheOptions(), "UNCACHEABLE-STATUS"),
    ("a 1xx is not a final response (RFC 9111 §3)", request(), 103, [FRESH], CacheOptions(),
     "UNCACHEABLE-STATUS"),
    ("a 302 without explicit freshness is not stored (RFC 9111 §3)", request(), 302,
     [("Last-Modified", date(-100)), ("ETag", '"a"')], CacheOptions(), "UNCACHEABLE-STATUS"),
    ("a 302 with max-age is stored", request(), 302, [FRESH], CacheOptions(), None),
    ("a 500 with Expires is stored", request(), 500, [("Date", date(0)), ("Expires", date(60))],
     CacheOptions(), None),
    ("must-understand with an unknown status is never stored (RFC 9111 §5.2.2.3)", request(), 599,
     [("Cache-Control", "max-age=60, must-understand")], CacheOptions(), "MUST-UNDERSTAND"),
    ("must-understand with a known status is stored", request(), 200,
     [("Cache-Control", "max-age=60, must-understand")], CacheOptions(), None),
    ("must-understand does not override no-store here", request(), 200,
     [("Cache-Control", "max-age=60, must-understand, no-store")], CacheOptions(), "NO-STORE"),
    ("an unknown status without must-understand follows the usual rules", request(), 599,
     [("Cache-Control", "max-age=60")], CacheOptions(), None),
    ("no freshness, no validator and no stale permission: nothing to reuse", request(), 200,
     [("Date", date(0))], CacheOptions(stale_if_error=3600), "NO-FRESHNESS"),
    ("max-age=0 and no validator: the rules' stale windows do not make it reusable", request(), 200,
     [("Cache-Control", "max-age=0")], CacheOptions(stale_if_error=3600, stale_while_revalidate=30),
     "NO-FRESHNESS"),
    ("Expires: -1 and no validator: nothing to reuse either", request(), 200,
     [("Date", date(0)), ("Expires", "-1")], CacheOptions(stale_if_error=3600), "NO-FRESHNESS"),
    ("max-age=0 with the origin's own stale-if-error: stored", request(), 200,
     [("Cache-Control", "max-age=0, stale-if-error=60")], CacheOptions(), None),
    ("a 503 with max-age=0 and its own stale-if-error: never served stale, not stored", request(), 503,
     [("Cache-Control", "max-age=0, stale-if-error=60")], CacheOptions(), "NO-FRESHNESS"),
    ("a 500 with max-age=0 and its own stale-while-revalidate: not stored", request(), 500,
     [("Cache-Control", "max-age=0, stale-while-revalidate=60")], CacheOptions(), "NO-FRESHNESS"),
    ("a 404 with max-age=0 and its own stale-if-error: stored (not an error)", request(), 404,
     [("Cache-Control", "max-age=0, stale-if-error=60")], CacheOptions(), None),
    ("no freshness but a validator: stored, to be revalidated (RFC 9111 §4.3)", request(), 200,
     [("ETag", '"v1"')], CacheOptions(), None),
    ("no-cache is stored, to be revalidated before each use (RFC 9111 §5.2.2.4)", request(), 200,
     [("Cache-Control", "no-cache, max-age=60")], CacheOptions(), None),
    ("Content-Length above max_object is not stored", request(), 200,
     [FRESH, ("Content-Length", "2000")], CacheOptions(max_object=1000), "TOO-LARGE"),
    ("a 204's Content-Length announces no body: never too large (RFC 9112 §6.3)", request(), 204,
     [FRESH, ("Content-Length", "2000")], CacheOptions(max_object=1000), None),
    ("an unknown request directive does not switch caching off",
     request(("Cache-Control", "nothing-to-see-here"), ("Pragma", "foo")), 200, [FRESH], CacheOptions(),
     None),
    ("CDN-Cache-Control: no-store wins over a fresh Cache-Control (RFC 9213)", request(), 200,
     [FRESH, ("CDN-Cache-Control", "no-store")], CacheOptions(), "NO-STORE"),
    ("Surrogate-Control: no-store wins over a fresh Cache-Control", request(), 200,
     [FRESH, ("Surrogate-Control", "no-store")], CacheOptions(), "NO-STORE"),
    # A restrictive directive the list grammar does not deliver still restricts (fresh by Expires,
    # the rest of the line unreadable): stored, each of these was a personal page served to all.
    *((f"malformed Cache-Control {value!r} is {detail}", request(), 200,
       [("Cache-Control", value), ("Date", date(0)), ("Expires", date(600))], CacheOptions(), detail)
      for value, detail in [
          ("private; max-age=600", "PRIVATE"),
          ('"private, max-age=600"', "PRIVATE"),
          ("private max-age=600", "PRIVATE"),
          ("max-age=600, private =1", "PRIVATE"),
          ("Private;max-age=600", "PRIVATE"),
          ("no-store; max-age=600", "NO-STORE"),
          ("public, no-store max-age=600", "NO-STORE"),
      ]),
    ("a longer token containing private is not private", request(), 200,
     [("Cache-Control", "max-age=60, x-private, private-ext=1")], CacheOptions(), None),
    ("a garbled request no-store still forbids storing its response",
     request(("Cache-Control", "no-store; x")), 200, [FRESH], CacheOptions(), "REQUEST-NO-STORE"),
    *COOKIE_CASES,
]


@pytest.mark.parametrize(("case", "req", "status", "pairs", "options", "detail"), CASES,
                         ids=[c[0] for c in CASES])
def test_a_shared_cache_stores_only_what_rfc_9111_section_3_allows(
    case: str, req: RequestHead, status: int, pairs: Pairs, options: CacheOptions, detail: str | None
) -> None:
    decision = store(pairs, status=status, req=req, options=options)
    if detail is None:
        assert isinstance(decision, Store), decision
    else:
        assert isinstance(decision, DontStore) and decision.detail == detail, decision


@pytest.mark.parametrize(("pairs", "options", "expired_by"), [
    ([("Date", date(0))], CacheOptions(stale_if_error=3600), ""),
    ([("Cache-Control", "max-age=0")], CacheOptions(stale_if_error=3600), "max-age"),
    ([("Cache-Control", "s-maxage=0, max-age=60")], CacheOptions(), "s-maxage"),
    ([("Date", date(0)), ("Expires", "-1")], CacheOptions(), "expires"),
    ([("Date", date(0)), ("Expires", date(0))], CacheOptions(), "expires"),
    ([("Date", date(0))], CacheOptions(ttl_by_status={200: 0.0}), "rule"),
    ([("Cache-Control", "max-age=0")], CacheOptions(ttl_by_status={200: 60.0}), "max-age"),  # origin's wins
], ids=["nothing", "max-age=0", "s-maxage=0", "Expires: -1", "Expires: Date", "rule ttl 0s",
        "max-age=0 beside a rule ttl"])
def test_no_freshness_tells_a_lifetime_of_0_from_none(pairs: Pairs, options: CacheOptions,
                                                      expired_by: str) -> None:
    """One detail token (NO-FRESHNESS) for both, but their fixes differ: explain said "no rule
    ttl applies; add a ttl" for max-age=0, which a rule ttl does not override."""
    assert store(pairs, options=options) == DontStore("NO-FRESHNESS", expired_by)


@pytest.mark.parametrize(("pairs", "options", "expired_by"), [
    ([LAST_MODIFIED, ("Date", date(0))], CacheOptions(), ""),
    ([("Cache-Control", "max-age=0"), ETAG], CacheOptions(), "max-age"),
    ([("Cache-Control", "s-maxage=0, max-age=60"), ETAG], CacheOptions(), "s-maxage"),
    ([("Date", date(0)), ("Expires", "-1"), ETAG], CacheOptions(), "expires"),
    ([ETAG], CacheOptions(ttl_by_status={200: 0.0}), "rule"),
    ([("Cache-Control", "no-cache, max-age=60"), ETAG], CacheOptions(), "no-cache"),
], ids=["nothing", "max-age=0", "s-maxage=0", "Expires: -1", "rule ttl 0s", "no-cache"])
def test_a_response_to_a_cookie_says_what_left_it_without_a_lifetime(pairs: Pairs, options: CacheOptions,
                                                                     expired_by: str) -> None:
    """explain names it: a rule ttl fixes "nothing"; a lifetime of 0 or no-cache the origin gave
    needs override_origin."""
    assert store(pairs, req=request(COOKIE), options=options) == DontStore("COOKIE-NO-FRESHNESS", expired_by)


@pytest.mark.parametrize("value", ["no-cache; max-age=600", "max-age=600, no-cache =1", '"no-cache, max-age=600"'])
def test_a_malformed_no_cache_is_stored_only_to_be_revalidated_before_each_use(value: str) -> None:
    response = stored([("Cache-Control", value), ("Date", date(0)), ("Expires", date(600))])
    assert response.freshness.no_cache


def test_hop_by_hop_and_connection_listed_fields_are_not_stored_rfc_9111_section_3_1() -> None:
    decision = store([FRESH, ("Connection", "X-A"), ("X-A", "1"), ("X-B", "2"), ("Keep-Alive", "5"),
                      ("Proxy-Authenticate", "Basic"), ("Proxy-Authentication-Info", "a"),
                      ("Transfer-Encoding", "chunked")])
    assert isinstance(decision, Store)
    names = {k.lower() for k, _ in decision.response.headers}
    assert names == {"cache-control", "x-b", "date"}  # (a Date: the time it was received)


# (case, the response's fields, received at, the stored Date)
STORED_DATES = [
    ("the origin's Date is stored as it is", [FRESH, ("Date", date(-5))], T0, [date(-5)]),
    ("a response without Date is stored with the time it was received (RFC 9110 §6.6.1)", [FRESH], T0 + 7,
     [date(7)]),
    ("an invalid Date is the origin's: kept (RFC 9111 §4.2.3 reads it as absent)", [FRESH, ("Date", "soon")], T0,
     ["soon"]),
]


@pytest.mark.parametrize(("case", "response", "received", "dates"), STORED_DATES, ids=[d[0] for d in STORED_DATES])
def test_a_stored_response_always_has_a_date(case: str, response: Pairs, received: float, dates: list[str]) -> None:
    decision = store(response, request_time=received, response_time=received)
    assert isinstance(decision, Store)
    assert [v for k, v in decision.response.headers if k.lower() == "date"] == dates


def test_the_variant_records_the_normalised_selecting_fields_rfc_9111_section_4_1() -> None:
    decision = store([FRESH, ("Vary", "Accept-Language, Foo"), ("Vary", "bar")],
                     req=request(("Accept-Language", "EN , De"), ("Foo", "1"), ("Foo", "2")))
    assert isinstance(decision, Store)
    # (Foo is no list field: its two lines are kept as written, apart)
    assert decision.response.vary == (("accept-language", "EN, De"), ("bar", "\n"), ("foo", "1\n2\n"))


# A rule's ttl default (``default:`` or a lone duration) against every class of status: it never
# gives a lifetime to an error status RFC 9110 §15.1 does not call heuristically cacheable (a
# CPDoS: one client's rejected request stored for everyone); naming the status does.
RULE_DEFAULT = CacheOptions(ttl_default=60.0)


@pytest.mark.parametrize("status, stored", [
    (200, True), (203, True), (204, True), (301, True), (302, True), (307, True), (308, True),
    (404, True), (405, True), (410, True), (414, True), (501, True),
    (400, False), (401, False), (403, False), (408, False), (418, False), (429, False),
    (431, False), (500, False), (502, False), (503, False), (504, False),
])
def test_a_rule_ttl_default_never_stores_an_error_status_it_does_not_name(status: int, stored: bool) -> None:
    decision = store([("Date", date(0))], status=status, options=RULE_DEFAULT)
    if stored:
        assert isinstance(decision, Store), decision
        assert (decision.response.freshness.lifetime, decision.response.freshness.source) == (60.0, "rule")
    else:
        assert decision == DontStore("UNCACHEABLE-STATUS")


@pytest.mark.parametrize("status", [400, 431, 500, 503])
def test_an_error_status_named_in_the_rule_table_is_stored(status: int) -> None:
    options = CacheOptions(ttl_by_status={status: 10.0}, ttl_default=60.0)
    decision = store([("Date", date(0))], status=status, options=options)
    assert isinstance(decision, Store), decision
    assert decision.response.freshness.lifetime == 10.0


def test_the_origins_own_freshness_on_an_error_status_is_still_obeyed() -> None:
    """Only the rule's default is limited: an origin that says max-age on its 503 decides."""
    decision = store([("Cache-Control", "max-age=5")], status=503, options=RULE_DEFAULT)
    assert isinstance(decision, Store) and decision.response.freshness.lifetime == 5.0


# A response to a request with Authorization that only must-revalidate lets a shared cache keep
# (RFC 9111 §3.5) has the origin's freshness and nothing else: a rule's ttl or override_origin
# would serve one user's response to everyone without asking the origin.
# (case, request fields, response fields, options, lifetime, freshness source, must_revalidate)
AUTH = ("Authorization", "Bearer alice")
RULE_TTL = CacheOptions(ttl_by_status={200: 300.0})
OVERRIDE = CacheOptions(ttl_by_status={200: 3600.0}, override_origin=True)
AUTHORIZATION_FRESHNESS: list[tuple[str, list[tuple[str, str]], Pairs, CacheOptions, float, str, bool]] = [
    ("must-revalidate alone: a rule ttl does not give it a lifetime", [AUTH],
     [("Cache-Control", "must-revalidate"), ("ETag", '"a"')], RULE_TTL, 0.0, "none", True),
    ("max-age=0, must-revalidate: override_origin neither gives a lifetime nor drops must-revalidate",
     [AUTH], [("Cache-Control", "max-age=0, must-revalidate"), ("ETag", '"a"')], OVERRIDE, 0.0, "max-age",
     True),
    ("the origin's own max-age beside must-revalidate is obeyed, not the rule's", [AUTH],
     [("Cache-Control", "max-age=60, must-revalidate")], OVERRIDE, 60.0, "max-age", True),
    ("public: the origin lets it be shared, so the rule applies", [AUTH],
     [("Cache-Control", "public, must-revalidate")], RULE_TTL, 300.0, "rule", True),
    ("s-maxage: the origin lets it be shared, so override_origin applies", [AUTH],
     [("Cache-Control", "s-maxage=10")], OVERRIDE, 3600.0, "rule", False),
    ("a cookie, not Authorization: the rule ttl applies (the operator's choice)", [("Cookie", "s=alice")],
     [("Cache-Control", "must-revalidate")], RULE_TTL, 300.0, "rule", True),
]


@pytest.mark.parametrize(("case", "fields", "response", "options", "lifetime", "source", "must_revalidate"),
                         AUTHORIZATION_FRESHNESS, ids=[c[0] for c in AUTHORIZATION_FRESHNESS])
def test_a_response_to_authorization_kept_by_must_revalidate_alone_gets_the_origins_freshness_only(
        case: str, fields: list[tuple[str, str]], response: Pairs, options: CacheOptions, lifetime: float,
        source: str, must_revalidate: bool) -> None:
    decision = store(response, req=request(*fields), options=options)
    assert isinstance(decision, Store), decision
    f = decision.response.freshness
    assert (f.lifetime, f.source, f.must_revalidate) == (lifetime, source, must_revalidate)
    assert decision.response.authorization is (AUTH in fields)


# override_origin overrides the origin only where the rule's ttl is the lifetime: a status the
# ttl table does not name keeps the origin's freshness and its no-cache / must-revalidate.
# (case, response fields, status, lifetime, source, no_cache, must_revalidate)
ONLY_404 = CacheOptions(ttl_by_status={404: 60.0}, override_origin=True)
OVERRIDE_SCOPE: list[tuple[str, Pairs, int, float, str, bool, bool]] = [
    ("200 no-cache, ttl names only 404: revalidated every use", [("Cache-Control", "no-cache"),
     ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")], 200, 0.0, "none", True, False),
    ("200 no-cache, max-age=3600, ttl names only 404", [("Cache-Control", "no-cache, max-age=3600")],
     200, 3600.0, "max-age", True, False),
    ("200 max-age=1, must-revalidate, ttl names only 404", [("Cache-Control", "max-age=1, must-revalidate")],
     200, 1.0, "max-age", False, True),
    ("200 proxy-revalidate", [("Cache-Control", "max-age=1, proxy-revalidate")], 200, 1.0, "max-age",
     False, True),
    ("404 no-cache, must-revalidate: the rule's ttl is the lifetime, so it wins", [
     ("Cache-Control", "no-cache, must-revalidate, max-age=5")], 404, 60.0, "rule", False, False),
]


@pytest.mark.parametrize(("case", "response", "status", "lifetime", "source", "no_cache", "must_revalidate"),
                         OVERRIDE_SCOPE, ids=[c[0] for c in OVERRIDE_SCOPE])
def test_override_origin_overrides_only_where_the_rules_ttl_applies(
        case: str, response: Pairs, status: int, lifetime: float, source: str, no_cache: bool,
        must_revalidate: bool) -> None:
    decision = store(response, status=status, options=ONLY_404)
    assert isinstance(decision, Store), decision
    f = decision.response.freshness
    assert (f.lifetime, f.source, f.no_cache, f.must_revalidate) == (lifetime, source, no_cache,
                                                                     must_revalidate)


@pytest.mark.parametrize("length, room, refused", [
    (None, 0, False),  # no Content-Length: measured as the body streams, not up front
    (0, 0, False),
    (1000, 1000, False),  # exactly the room fits
    (1001, 1000, True),
    (1, 0, True),  # a store with no room (memory only, a key longer than a ring record)
])
def test_too_large_compares_a_content_length_with_the_room(length: int | None, room: int, refused: bool) -> None:
    assert too_large(length, room) is refused
