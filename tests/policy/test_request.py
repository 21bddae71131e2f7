"""The one view of a request (proxy.policy.request), table by table: what normalisation
keeps, changes or refuses, and what the origin receives from a head."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.deception import content_type_agrees, guard_allows
from proxy.policy.freshness import compute_freshness
from proxy.policy.keys import KeySpec, cache_key
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.policy.request import (
    FORWARDING_FIELDS,
    Forwarder,
    LineOpen,
    Listener,
    Message,
    Refusal,
    final_recipient,
    normalise_request,
    simple_request,
    stated_scheme,
    upstream_request,
)
from proxy.policy.storability import DontStore, Store
from tests.policy.build import T0, date, headers, store
from tests.security.test_forwarding_fields import ATTACK_FIELDS

LISTENER = Listener("127.0.0.1:8080", max_head=4096)


def normalise(target: str, *fields: tuple[str, str], method: str = "GET", version: tuple[int, int] = (1, 1),
              secure: bool = False, trusted: bool = False) -> RequestHead | Refusal:
    msg = Message(method, target, version, CIMultiDictProxy(CIMultiDict(fields)))
    return normalise_request(msg, secure=secure, trusted=trusted, listener=LISTENER)


def head_of(target: str, *fields: tuple[str, str], **kw: object) -> RequestHead:
    head = normalise(target, *fields, **kw)  # type: ignore[arg-type]
    assert isinstance(head, RequestHead), head
    return head


HOST = ("Host", "shop.example")

# (case, target, fields, version, expected host, expected target, expected fields)
ACCEPTED = [
    ("plain", "/a?b=1", [HOST, ("Accept", "*/*")], (1, 1), "shop.example", "/a?b=1",
     [("Host", "shop.example"), ("Accept", "*/*")]),
    ("host case, dot, default port", "/a", [("Host", "Shop.Example.:80")], (1, 1), "shop.example", "/a",
     [("Host", "shop.example")]),
    ("zero-padded port", "/a", [("Host", "shop.example:08080")], (1, 1), "shop.example:8080", "/a",
     [("Host", "shop.example:8080")]),
    ("empty port", "/a", [("Host", "shop.example:")], (1, 1), "shop.example", "/a", [("Host", "shop.example")]),
    ("IPv6 literal", "/a", [("Host", "[::1]:80")], (1, 1), "[::1]", "/a", [("Host", "[::1]")]),
    ("absolute-form wins over Host", "http://Victim.Example/a?q", [("Host", "evil.example")], (1, 1),
     "victim.example", "/a?q", [("Host", "victim.example")]),
    ("absolute-form, no path", "HTTP://victim.example?q=1", [HOST], (1, 1), "victim.example", "/?q=1",
     [("Host", "victim.example")]),
    ("absolute-form on HTTP/1.0 without Host", "http://victim.example/a", [], (1, 0), "victim.example", "/a",
     [("Host", "victim.example")]),
    ("HTTP/1.0 without Host: the listen address", "/a", [], (1, 0), "127.0.0.1:8080", "/a",
     [("Host", "127.0.0.1:8080")]),
    ("fragment dropped", "/a?b#frag", [HOST], (1, 1), "shop.example", "/a?b", [("Host", "shop.example")]),
    ("fragment of an absolute-form", "http://victim.example/a#x/y", [HOST], (1, 1), "victim.example", "/a",
     [("Host", "victim.example")]),
    ("OPTIONS *", "*", [HOST], (1, 1), "shop.example", "*", [("Host", "shop.example")]),
    ("Connection-named and hop-by-hop fields removed", "/a",
     [HOST, ("Connection", "keep-alive, X-A , accept-language"), ("X-A", "1"), ("Accept-Language", "de"),
      ("TE", "trailers"), ("Keep-Alive", "5"), ("Proxy-Authorization", "x"), ("X-B", "2")], (1, 1),
     "shop.example", "/a", [("Host", "shop.example"), ("X-B", "2")]),
    ("forwarding fields dropped", "/a",
     [HOST, ("X-Forwarded-Prefix", "/x"), ("X-Real-IP", "6.6.6.6"), ("Forwarded", "for=x"), ("Via", "1.1 x"),
      ("Surrogate-Capability", 'x="Surrogate/1.0"'), ("X-Forwarded", "for=x"), ("Cookie", "a=1")], (1, 1),
     "shop.example", "/a", [("Host", "shop.example"), ("Cookie", "a=1")]),
    ("chunked accepted (the field is hop-by-hop)", "/a", [HOST, ("Transfer-Encoding", "Chunked")], (1, 1),
     "shop.example", "/a", [("Host", "shop.example")]),
    ("a browser's keep-alive", "/a", [HOST, ("Connection", "keep-alive"), ("Accept", "*/*")], (1, 1),
     "shop.example", "/a", [("Host", "shop.example"), ("Accept", "*/*")]),
    ("HTTP/1.0: Expect removed (RFC 9110 §10.1.1)", "/a", [HOST, ("Expect", "100-continue"), ("Accept", "*/*")],
     (1, 0), "shop.example", "/a", [("Host", "shop.example"), ("Accept", "*/*")]),
    ("HTTP/1.1: Expect kept", "/a", [HOST, ("Expect", "100-continue")], (1, 1), "shop.example", "/a",
     [("Host", "shop.example"), ("Expect", "100-continue")]),
    ("repeated fields kept in order, repeated Connection lines all read", "/a",
     [HOST, ("Cookie", "a=1"), ("Connection", "x-a"), ("X-A", "1"), ("Cookie", "b=2"), ("Connection", "X-B"),
      ("X-B", "2")], (1, 1), "shop.example", "/a", [("Host", "shop.example"), ("Cookie", "a=1"),
                                                    ("Cookie", "b=2")]),
]


@pytest.mark.parametrize(("case", "target", "fields", "version", "host", "want_target", "want_fields"),
                         ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_normalise_request_accepts(case: str, target: str, fields: list[tuple[str, str]],
                                   version: tuple[int, int], host: str, want_target: str,
                                   want_fields: list[tuple[str, str]]) -> None:
    head = head_of(target, *fields, version=version, method="OPTIONS" if target == "*" else "GET")
    assert (head.host, head.target, list(head.headers.items())) == (host, want_target, want_fields)
    assert head.headers["Host"] == head.host  # the one Host, as the key names it


# RFC 9112 §3.2.4: an OPTIONS to an absolute-form target with an empty path and no query goes
# on as ``OPTIONS *`` (the last proxy MUST send the asterisk form); (method, target, sent target)
OPTIONS_FORMS = [
    ("OPTIONS", "http://victim.example", "*"),
    ("OPTIONS", "http://victim.example#frag", "*"),
    ("OPTIONS", "http://victim.example?q", "/?q"),
    ("OPTIONS", "http://victim.example/", "/"),
    ("OPTIONS", "http://victim.example/a", "/a"),
    ("GET", "http://victim.example", "/"),
    ("HEAD", "http://victim.example", "/"),
]


@pytest.mark.parametrize(("method", "target", "sent"), OPTIONS_FORMS)
def test_options_to_an_empty_path_is_sent_in_the_asterisk_form(method: str, target: str, sent: str) -> None:
    head = head_of(target, HOST, method=method)
    assert (head.target, head.host, head.headers["Host"]) == (sent, "victim.example", "victim.example")
    assert upstream_request(head, "127.0.0.1", Forwarder()).target == sent


REFUSED = [
    ("HTTP/1.1 without Host", "/a", [], (1, 1), 400, "missing Host"),
    ("absolute-form on HTTP/1.1 without Host", "http://a.example/", [], (1, 1), 400, "missing Host"),
    ("two Hosts", "/a", [HOST, HOST], (1, 1), 400, "more than one Host"),
    ("bad Host", "/a", [("Host", "a b")], (1, 1), 400, "invalid Host"),
    ("Host with userinfo", "/a", [("Host", "u@a")], (1, 1), 400, "invalid Host"),
    ("port out of range", "/a", [("Host", "a:65536")], (1, 1), 400, "invalid Host"),
    ("only a dot", "/a", [("Host", ".")], (1, 1), 400, "invalid Host"),
    ("userinfo in the target", "http://u:p@a.example/", [HOST], (1, 1), 400, "userinfo"),
    ("other scheme", "ftp://a.example/", [HOST], (1, 1), 400, "malformed request target"),
    ("no slash", "a/b", [HOST], (1, 1), 400, "malformed request target"),
    ("empty authority", "http:///a", [HOST], (1, 1), 400, "invalid host in the absolute-form"),
    ("Connection: Host", "/a", [HOST, ("Connection", "close, HOST")], (1, 1), 400, "Connection names Host"),
    ("Connection: Content-Length", "/a", [HOST, ("Connection", "content-length")], (1, 1), 400,
     "Connection names Content-Length"),
    ("Connection: Transfer-Encoding", "/a", [HOST, ("Connection", "Transfer-Encoding")], (1, 1), 400,
     "Connection names Transfer-Encoding"),
    ("unknown coding", "/a", [HOST, ("Transfer-Encoding", "gzip")], (1, 1), 501, "not implemented"),
    ("a list of codings", "/a", [HOST, ("Transfer-Encoding", "gzip, chunked")], (1, 1), 400, "a list"),
    ("chunked twice", "/a", [HOST, ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
     (1, 1), 400, "a list"),
    ("HTTP/1.0 with Transfer-Encoding", "/a", [HOST, ("Transfer-Encoding", "chunked")], (1, 0), 400,
     "HTTP/1.0"),
    ("head over the cap", "/a", [HOST, ("X-Big", "a" * 4096)], (1, 1), 431, "over the 4096"),
]


@pytest.mark.parametrize(("case", "target", "fields", "version", "status", "reason"), REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_normalise_request_refuses(case: str, target: str, fields: list[tuple[str, str]],
                                   version: tuple[int, int], status: int, reason: str) -> None:
    refusal = normalise(target, *fields, version=version)
    assert isinstance(refusal, Refusal), refusal
    assert refusal.status == status
    assert reason in refusal.reason


def test_what_a_connection_line_names_is_remembered_refusals_included() -> None:
    for _ in range(2):
        assert isinstance(normalise("/a", HOST, ("Connection", "x, Host")), Refusal)
        head = normalise("/a", HOST, ("Connection", "x-a"), ("X-A", "1"))
        assert isinstance(head, RequestHead) and "X-A" not in head.headers


def test_the_head_cap_counts_the_request_line_and_every_field() -> None:
    fields = [HOST, ("X-A", "a" * 2000), ("X-B", "b" * 1900)]
    size = len("GET /a HTTP/1.1\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in fields) + 2
    assert size <= 4096 < size + 200
    assert isinstance(normalise("/a", *fields), RequestHead)
    assert isinstance(normalise("/a", *fields, ("X-C", "c" * 200)), Refusal)


def test_a_common_request_keeps_the_parsed_fields_object() -> None:
    """The cheap path: nothing to change, nothing copied."""
    fields = CIMultiDictProxy(CIMultiDict([HOST, ("Accept", "*/*"), ("Cookie", "a=1")]))
    head = normalise_request(Message("GET", "/a", (1, 1), fields), secure=False, trusted=False,
                             listener=LISTENER)
    assert isinstance(head, RequestHead) and head.headers is fields


def test_a_trusted_peer_keeps_its_forwarding_fields_and_sets_the_scheme() -> None:
    fields = [HOST, ("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.9"), ("X-Real-IP", "x")]
    trusted = head_of("/a", *fields, trusted=True)
    assert trusted.scheme == "https" and trusted.trusted
    assert list(trusted.headers.items()) == fields
    untrusted = head_of("/a", *fields)
    assert untrusted.scheme == "http" and list(untrusted.headers.items()) == [HOST]


SCHEMES = [
    # (the trusted peer's fields, the connection secure?, the key's scheme)
    ([("Forwarded", "proto=https")], False, "https"),
    ([("Forwarded", "for=1.2.3.4;Proto=HTTP")], True, "http"),
    ([("Forwarded", 'for="[2001:db8::1]:80";proto="https", proto=http')], False, "https"),  # the first element
    ([("Forwarded", "for=1.2.3.4, proto=https")], False, "http"),  # the first element states none
    ([("Forwarded", "proto=http"), ("Forwarded", "proto=https")], False, "http"),  # the first line
    ([("X-Forwarded-Ssl", "on")], False, "https"),
    ([("X-Forwarded-Ssl", "off")], True, "http"),
    ([("X-Forwarded-Ssl", "yes")], False, "http"),  # unreadable: the connection's
    ([("Front-End-Https", "On")], False, "https"),
    ([("X-Forwarded-Scheme", "https")], False, "https"),
    ([("X-Url-Scheme", "https")], False, "https"),
    ([("X-Scheme", "https")], False, "https"),
    ([("X-Https", "on")], False, "https"),
    ([("CF-Visitor", '{"scheme":"https"}')], False, "https"),
    ([("X-ARR-SSL", "2048|256|C=US, O=CA|CN=shop")], False, "https"),
    ([("X_Forwarded_Proto", "https")], False, "https"),  # the underscore spelling is read too
    # precedence: X-Forwarded-Proto, then Forwarded, then the rest
    ([("Forwarded", "proto=http"), ("X-Forwarded-Proto", "https")], False, "https"),
    ([("X-Forwarded-Ssl", "on"), ("Forwarded", "proto=http")], False, "http"),
    ([("X-Forwarded-Proto", "ftp"), ("Forwarded", "proto=https")], False, "https"),
    ([("X_Forwarded_Proto", "http"), ("X-Forwarded-Proto", "https")], False, "https"),
]


@pytest.mark.parametrize(("fields", "secure", "scheme"), SCHEMES)
def test_a_trusted_peers_scheme_fields_set_the_scheme_and_the_origin_hears_only_that(
        fields: list[tuple[str, str]], secure: bool, scheme: str) -> None:
    head = head_of("/a", HOST, *fields, trusted=True, secure=secure)
    assert head.scheme == scheme
    assert cache_key(head) == f"{scheme}://shop.example/a"
    sent = upstream_request(head, "10.0.0.1", Forwarder()).headers
    assert [v for k, v in sent if k == "X-Forwarded-Proto"] == [scheme]
    stated = [stated_scheme(k.lower(), v) for k, v in sent if k != "X-Forwarded-Proto"]
    assert set(stated) <= {None, scheme}  # nothing the origin reads says another scheme
    untrusted = head_of("/a", HOST, *fields, secure=secure)
    assert untrusted.scheme == ("https" if secure else "http")


def test_a_trusted_forwarded_field_is_rewritten_not_dropped() -> None:
    head = head_of("/a", HOST, ("Forwarded", 'for=1.2.3.4;proto=http;host="a;b", for=5.6.7.8;proto=https'),
                   ("X-Forwarded-Proto", "https"), trusted=True)
    assert dict(upstream_request(head, "p", Forwarder()).headers)["Forwarded"] == \
        'for=1.2.3.4;proto=https;host="a;b", for=5.6.7.8;proto=https'
    agreeing = head_of("/a", HOST, ("Forwarded", "for=1.2.3.4;proto=https"), trusted=True)
    assert dict(upstream_request(agreeing, "p", Forwarder()).headers)["Forwarded"] == "for=1.2.3.4;proto=https"


def test_a_request_without_scheme_fields_pays_nothing_new() -> None:
    fields = CIMultiDictProxy(CIMultiDict([HOST, ("X-Forwarded-For", "203.0.113.9")]))
    head = normalise_request(Message("GET", "/a", (1, 1), fields), secure=True, trusted=True, listener=LISTENER)
    assert isinstance(head, RequestHead) and head.headers is fields and head.scheme == "https"


def test_every_forwarding_field_of_the_policy_is_in_the_attack_tests() -> None:
    assert FORWARDING_FIELDS.issubset(f.lower() for f in ATTACK_FIELDS)
    head = head_of("/a", HOST, *((name, "x") for name in ATTACK_FIELDS))
    assert list(head.headers.items()) == [HOST]


# -- upstream_request -----------------------------------------------------------------------------


def test_the_upstream_request_is_the_head_with_cachegates_forwarding_fields() -> None:
    head = head_of("/s?utm=1&q=a", HOST, ("Accept", "*/*"), ("If-None-Match", '"x"'), ("Range", "bytes=0-1"))
    fill = upstream_request(head, "10.0.0.1", Forwarder("1.1 edge"), fill=KeySpec(query_include=("q",)),
                            validators=(("If-None-Match", '"v1"'),))
    assert (fill.method, fill.target) == ("GET", "/s?q=a")
    assert list(fill.headers) == [
        ("Host", "shop.example"), ("Accept", "*/*"), ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "shop.example"), ("Via", "1.1 edge"),
        ("Surrogate-Capability", 'cachegate="Surrogate/1.0"'), ("If-None-Match", '"v1"')]
    passed = upstream_request(head, "10.0.0.1", Forwarder(preserve_host=False))
    assert (passed.method, passed.target) == ("GET", "/s?utm=1&q=a")
    assert "Host" not in dict(passed.headers)  # the pool sends the upstream's own address
    assert dict(passed.headers)["If-None-Match"] == '"x"'  # passed through: the client's own


def test_a_hit_for_pass_request_keeps_the_client_s_preconditions_and_its_range() -> None:
    """RFC 9110 §13.2.1: a cache that does not evaluate a precondition forwards it; a fill that
    stores never carries one (it must get the full response). A hit-for-pass key's request
    keeps its Range and If-Range too: the origin's 206 is relayed, never stored."""
    conds = (("If-None-Match", '"x"'), ("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT"),
             ("If-Match", '"y"'), ("If-Unmodified-Since", "Mon, 01 Jan 2024 00:00:00 GMT"))
    head = head_of("/s", HOST, *conds, ("Range", "bytes=0-1"), ("If-Range", '"x"'), ("Expect", "100-continue"))
    fill = dict(upstream_request(head, "10.0.0.1", Forwarder(), fill=KeySpec()).headers)
    assert not {"If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "Range",
                "If-Range", "Expect"} & set(fill)
    passing = upstream_request(head, "10.0.0.1", Forwarder(), fill=KeySpec(), preconditions=True).headers
    assert [f for f in passing if f[0].startswith("If-") and f[0] != "If-Range"] == list(conds)
    assert ("Range", "bytes=0-1") in passing and ("If-Range", '"x"') in passing
    assert "Expect" not in dict(passing)


@pytest.mark.parametrize(("value", "kept"), [
    ("bytes=0-1", True), ("bytes=-5", True), ("bytes=7-", True),
    (",".join(["bytes=0-"] + ["0-"] * 49), False),  # RangeAmp's overlapping ranges
    ("bytes=0-1,5-6", False), ("items=0-1", False), ("bytes=x-", False),
])
def test_a_hit_for_pass_request_keeps_one_range_only(value: str, kept: bool) -> None:
    """A passing key's request keeps a Range the proxy would answer itself (one byte range) and
    its If-Range; several ranges, another unit or a malformed one are dropped with their
    If-Range, as a plain range of a passing key's are (the whole 200 answers them): 50
    overlapping ranges went on verbatim when a conditional came with them."""
    head = head_of("/s", HOST, ("If-None-Match", '"x"'), ("Range", value), ("If-Range", '"x"'))
    passing = dict(upstream_request(head, "10.0.0.1", Forwarder(), fill=KeySpec(), preconditions=True).headers)
    assert passing["If-None-Match"] == '"x"'
    assert (passing.get("Range"), passing.get("If-Range")) == ((value, '"x"') if kept else (None, None))


@pytest.mark.parametrize(("name", "preconditions", "dropped"), [
    ("Request-Range", False, True),  # Apache httpd's byterange filter honours it as Range
    ("Request-Range", True, True),
    ("request_range", False, True),
    ("If_None_Match", False, True),  # HTTP_IF_NONE_MATCH to a CGI, WSGI or Rack origin
    ("if_modified_SINCE", False, True),
    ("If_Match", False, True),
    ("If_Unmodified_Since", False, True),
    ("If_Range", False, True),
    ("If_Range", True, False),  # as it keeps If-Range
    ("If_None_Match", True, False),  # a hit-for-pass request keeps the preconditions, as spelled
    ("X_Range", False, False),
    ("If_None_Match", None, False),  # passed through: all the client's fields
    ("Request-Range", None, True),  # but Request-Range, on every request (NEVER_FORWARDED)
    ("REQUEST-RANGE", None, True),
])
def test_a_fill_drops_request_range_and_the_underscore_spellings_of_what_it_drops(
        name: str, preconditions: bool | None, dropped: bool) -> None:
    head = head_of("/s", HOST, (name, '"x"'))
    assert head.underscores == ("_" in name)
    fill = None if preconditions is None else KeySpec()
    sent = upstream_request(head, "10.0.0.1", Forwarder(), fill=fill, preconditions=bool(preconditions)).headers
    assert (name not in dict(sent)) == dropped


def test_the_consoles_session_cookie_never_reaches_the_origin() -> None:
    # Browsers send it to the proxy's port too (cookies are per host, not per port).
    head = head_of("/a", HOST, ("Cookie", "a=1; cachegate_session=s3cret;b=2"), ("Cookie", " cachegate_session =x"))
    fields = upstream_request(head, "10.0.0.1", Forwarder()).headers
    assert [v for k, v in fields if k == "Cookie"] == ["a=1; b=2"]


def test_a_trusted_peers_chain_is_extended() -> None:
    head = head_of("/a", HOST, ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Host", "www.example"),
                   ("Via", "1.1 cdn"), trusted=True)
    fields = upstream_request(head, "10.0.0.1", Forwarder()).headers
    assert ("X-Forwarded-For", "203.0.113.9, 10.0.0.1") in fields
    assert ("X-Forwarded-Host", "www.example") in fields and ("X-Forwarded-Proto", "http") in fields
    assert ("Via", "1.1 cdn, 1.1 cachegate") in fields


def test_a_head_built_by_hand_cannot_carry_forwarding_or_hop_by_hop_fields_upstream() -> None:
    head = RequestHead("GET", "http", "a.example", "/", headers(("X-Forwarded-Host", "evil"),
                                                                 ("Connection", "x"), ("TE", "trailers")))
    assert [k for k, _ in upstream_request(head, "p", Forwarder()).headers] == [
        "Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Via", "Surrogate-Capability"]


# -- what the rest of the policy reads from the head ---------------------------------------------------


def test_key_and_upstream_agree_on_the_host() -> None:
    for spelling in ("SHOP.example", "shop.example.", "shop.example:80", "shop.example:0080"):
        head = head_of("http://" + spelling + "/a", ("Host", "other.example"))
        assert cache_key(head) == "http://shop.example/a"
        assert dict(upstream_request(head, "p", Forwarder()).headers)["Host"] == "shop.example"


GUARD = [
    # (path, content type, forced, stored?)
    ("/a.css", "text/css", False, True),
    ("/a.css", "text/css", True, True),
    ("/a%2ecss", "text/html", False, False),
    ("/a%2Ecss", "text/html", True, False),
    ("/static/..%2Fa.css", "text/html", False, False),
    ("/plain", "text/html", False, True),
    ("/plain", "text/html", True, False),
    ("/x.unknownext", "text/html", False, True),
    ("/x.unknownext", "text/html", True, False),
    ("/x.js", "text/javascript", True, True),
    ("/x.js", "application/javascript", True, True),
    ("/x.css?y=.html", "text/css", True, True),
]


@pytest.mark.parametrize(("path", "ctype", "forced", "stored"), GUARD)
def test_the_deception_guard_reads_the_path_the_rules_match(path: str, ctype: str, forced: bool,
                                                            stored: bool) -> None:
    assert guard_allows(path, ctype, forced=forced) == stored
    assert content_type_agrees("/a.css", None) is False


# -- heuristic freshness and credentials --------------------------------------------------------------

LAST_MODIFIED = ("Last-Modified", date(-10 * 86400))


@pytest.mark.parametrize(("request_field", "response", "lifetime"), [
    (None, [LAST_MODIFIED], 86400.0),
    (("Cookie", "a=1"), [LAST_MODIFIED], None),  # no lifetime: not stored (COOKIE-NO-FRESHNESS)
    (("Authorization", "Bearer x"), [LAST_MODIFIED, ("Cache-Control", "must-revalidate")], 0.0),
    (("Cookie", "a=1"), [LAST_MODIFIED, ("Cache-Control", "public")], 86400.0),
    (("Cookie", "a=1"), [LAST_MODIFIED, ("Cache-Control", "max-age=30")], 30.0),
])
def test_no_heuristic_freshness_for_a_response_to_a_request_with_credentials(
        request_field: tuple[str, str] | None, response: list[tuple[str, str]], lifetime: float | None) -> None:
    from tests.policy.build import request

    req = request(*([request_field] if request_field else []))
    decision = store(response, req=req)
    if lifetime is None:
        assert decision == DontStore("COOKIE-NO-FRESHNESS")
        return
    assert isinstance(decision, Store)  # stored, to be revalidated before each use when lifetime is 0
    assert decision.response.freshness.lifetime == lifetime


def test_a_rule_ttl_applies_whatever_the_request_carried() -> None:
    from proxy.policy.cache_control import parse_cache_control

    options = CacheOptions(ttl_by_status={200: 60.0})
    f = compute_freshness(200, headers(LAST_MODIFIED), parse_cache_control([]), T0, T0, options, credentials=True)
    assert (f.lifetime, f.source) == (60.0, "rule")


# (method, Max-Forwards lines, cachegate's own answer's status or None, what the origin receives)
MAX_FORWARDS: list[tuple[str, tuple[str, ...], int | None, list[str]]] = [
    ("OPTIONS", ("0",), 200, []),
    ("TRACE", ("0",), 405, []),
    ("OPTIONS", ("5",), None, ["4"]),
    ("TRACE", ("1",), None, ["0"]),
    ("OPTIONS", (" 3 ",), None, ["2"]),
    ("GET", ("0",), None, ["0"]),  # other methods: left as they came (RFC 9110 §7.6.2 MAY)
    ("POST", ("7",), None, ["7"]),
    ("OPTIONS", ("x",), None, ["x"]),  # not a number: ignored, passed on
    ("OPTIONS", ("0", "0"), None, ["0", "0"]),  # several lines: ignored
    ("OPTIONS", (), None, []),
]


@pytest.mark.parametrize(("method", "values", "status", "forwarded"), MAX_FORWARDS,
                         ids=[f"{m} {v}" for m, v, _, _ in MAX_FORWARDS])
def test_max_forwards_counts_down_on_options_and_trace_and_zero_is_answered_here(
        method: str, values: tuple[str, ...], status: int | None, forwarded: list[str]) -> None:
    head = head_of("/a", HOST, *(("Max-Forwards", v) for v in values), method=method)
    own = final_recipient(head)
    assert (own[0] if own is not None else None) == status
    if own is not None:
        assert dict(own[2])["Allow"] == "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
        return
    sent = upstream_request(head, "10.0.0.1", Forwarder()).headers
    assert [v for k, v in sent if k == "Max-Forwards"] == forwarded


# (the start of a head, what simple_request says): True once a line without a version has ended
SIMPLE_REQUESTS = [
    (b"GET /page\r\n", True),
    (b"GET /page\n", True),
    (b"\r\n\r\nPOST /p?q=1\r\n", True),
    (b"GET http://a.test/x\r\nHost: a", True),
    (b"GET /page HTTP/1.1\r\n", False),
    (b"GET /page HTTP/1.0\r\nHost: a\r\n", False),
    (b"GET /page H", False),  # a second space: a version follows
    (b"GET /page \r\n", False),  # (the parser refuses it on its own)
    (b"X-Field: a\r\n", False),  # not a request line
    (b"value with spaces\r\n", False),
    (b"a" * 65, False),  # no method is that long
    (b"", LineOpen(b"")),
    (b"\r\n", LineOpen(b"")),
    (b"GE", LineOpen(b"GE")),
    (b"GET ", LineOpen(b"GET ")),
    (b"GET /a-long-target-still-coming", LineOpen(b"GET /")),
    (b"GET /page\r", LineOpen(b"GET /")),
]


@pytest.mark.parametrize(("start", "want"), SIMPLE_REQUESTS)
def test_an_http_0_9_request_is_known_at_the_end_of_its_line(start: bytes, want: bool | LineOpen) -> None:
    assert simple_request(start) == want


@pytest.mark.parametrize(("start", "want"), SIMPLE_REQUESTS)
def test_the_first_line_decided_in_pieces_is_decided_as_a_whole(start: bytes, want: bool | LineOpen) -> None:
    """Fed a byte at a time, keeping only what ``LineOpen`` keeps, the verdict is the same."""
    kept = b""
    found: bool | LineOpen = LineOpen(b"")
    for i in range(len(start)):
        found = simple_request(kept + start[i:i + 1])
        if not isinstance(found, LineOpen):
            break
        kept = found.kept
    assert found == want or (isinstance(want, LineOpen) and isinstance(found, LineOpen))
