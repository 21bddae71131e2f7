"""A request whose rules read a cookie that origins may read differently is not cached.

``policy.fields.cookies`` reads a cookie as ``AMBIGUOUS`` when common origin parsers disagree
about it (a comma or whitespace inside a pair, a quote, a name twice with other values, two
``Cookie`` lines). ``RuleSet.plan`` then turns the plan into a bypass (``Cache-Status`` detail
``AMBIGUOUS-COOKIE:<name>``) when a rule's condition or the chosen rule's key reads that cookie:
no answer is safe for every rule (a "present: bypass" rule fails one way, an "absent: cache"
rule the other, and a key cannot name a value the origin may not have read). A cookie the rules
never read changes nothing, and the engine, the fast path (``Engine.planned``) and explain all
get this from ``plan``.
"""

from __future__ import annotations

import time

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.explain import ExplainRequest, explain, explain_trace
from proxy.policy.messages import RequestHead
from tests.rules.test_compile import compile_text

RULES = compile_text("""
    rules:
      - name: logged in
        match: {cookie: {session: present}}
        bypass: true
      - name: beta
        match: {path: "/beta/**", cookie: {beta: absent}}
        ttl: {200: 1m}
      - name: pages
        match: {path: "/**"}
        ttl: {200: 2m}
        key: {cookies: [ab_bucket]}
""")

# (case, target, Cookie lines, the plan's bypass detail; None: looked up and stored as usual)
CASES: list[tuple[str, str, list[str], str | None]] = [
    ("no cookie", "/a", [], None),
    ("plain cookies", "/a", ["theme=dark; ab_bucket=A"], None),
    ("a plain session: the rule's bypass", "/a", ["session=x"], "RULE-BYPASS:logged in"),
    ("a session a comma hides from ;-only readers: still the rule's bypass", "/a",
     ["theme=dark, session=x"], "RULE-BYPASS:logged in"),
    ("the keyed cookie sent twice with other values", "/a", ["ab_bucket=A; ab_bucket=B"],
     "AMBIGUOUS-COOKIE:ab_bucket"),
    ("the keyed cookie after a comma", "/a", ["ab_bucket=A; x=1, ab_bucket=B"], "AMBIGUOUS-COOKIE:ab_bucket"),
    ("the keyed cookie with a space inside its pair", "/a", ["ab_bucket =A"], "AMBIGUOUS-COOKIE:ab_bucket"),
    ("the keyed cookie twice with one value", "/a", ["ab_bucket=A; ab_bucket=A"], None),
    ("a comma in a cookie no rule reads", "/a", ["prefs=a,b; ab_bucket=A"], None),
    ("a quote anywhere: every name is ambiguous", "/a", ['prefs="a"; ab_bucket=A'],
     "AMBIGUOUS-COOKIE:ab_bucket"),
    ("two Cookie lines", "/a", ["ab_bucket=A", "x=1"], "AMBIGUOUS-COOKIE:ab_bucket"),
    ("an absent-condition's cookie, ambiguous", "/beta/x", ["a=1, beta=1"], "AMBIGUOUS-COOKIE:beta"),
    ("an absent-condition's cookie, plain", "/beta/x", ["beta=1"], None),
    ("the session cookie in another case (ASP.NET, nginx read it)", "/a", ["SESSION=x"],
     "AMBIGUOUS-COOKIE:session"),
    ("an absent-condition's cookie in another case", "/beta/x", ["Beta=1"], "AMBIGUOUS-COOKIE:beta"),
    ("the keyed cookie beside another case of it", "/a", ["ab_bucket=A; AB_BUCKET=B"], "AMBIGUOUS-COOKIE:ab_bucket"),
    ("a raw 0xA0 byte before the session", "/a", ["a=1;\udca0session=x"], "RULE-BYPASS:logged in"),
    ("a percent-escape in a value only present reads", "/a", ["theme=%31; ab_bucket=A%42"], None),
]


def head(target: str, cookie_lines: list[str]) -> RequestHead:
    fields = CIMultiDict([("Host", "a.example"), *(("Cookie", v) for v in cookie_lines)])
    return RequestHead("GET", "http", "a.example", target, CIMultiDictProxy(fields))


@pytest.mark.parametrize(("case", "target", "lines", "detail"), CASES, ids=[c[0] for c in CASES])
def test_a_cookie_the_rules_read_and_origins_read_differently_is_a_bypass(
        case: str, target: str, lines: list[str], detail: str | None) -> None:
    plan = RULES.plan(head(target, lines))
    assert plan.bypass is (detail is not None)
    if detail is not None:
        assert plan.bypass_detail == detail


def test_explain_says_why_the_request_is_not_cached() -> None:
    req = ExplainRequest("http://a.example/a", "GET", (("Cookie", "ab_bucket=A, ab_bucket=B"),), (200,), ())
    lines = explain(RULES, req, time.time())
    assert any("BYPASS" in line and "AMBIGUOUS-COOKIE:ab_bucket" in line for line in lines), lines
    trace = explain_trace(RULES, head("/a", ["ab_bucket=A, ab_bucket=B"]), [], time.time(), [])
    assert trace["decision"]["x_cache_status"] == "BYPASS"
    assert "AMBIGUOUS-COOKIE:ab_bucket" in trace["decision"]["cache_status"]


PREVIEW = compile_text("""
    rules:
      - name: preview
        match: {cookie: {preview: "1"}}
        bypass: true
      - name: beta
        match: {cookie: {beta: {regex: "^on$"}}}
        ttl: {200: 1m}
      - name: analytics consent
        match: {path: "/consented/**", cookie: {OptanonConsent: {regex: "C0004%3A1"}}}
        ttl: {200: 5m}
        key: {cookies: [OptanonConsent]}
      - name: consent either way
        match: {path: "/either/**", cookie: {OptanonConsent: {regex: "C0004(%3A|:)1"}}}
        bypass: true
      - name: admin drafts
        match: {path: "/drafts/**", cookie: {role: {regex: "^\\\\%61dmin$"}}}
        bypass: true
      - name: twice
        match: {path: "/twice/**", cookie: {n: {regex: "^x{%32}$"}}}
        bypass: true
      - name: pages
        match: {path: "/**"}
        ttl: {200: 2m}
""")

# A OneTrust consent cookie as browsers send it: its value always holds % and +.
ONETRUST = ("OptanonConsent=isGpcEnabled=0&datestamp=Sun+Dec+06+2026+12%3A00%3A00+GMT%2B0000"
            "&version=202409.1.0&groups=C0001%3A1%2CC0002%3A1%2CC0003%3A0%2CC0004%3A1")


# A compared value with % or + is read on the raw value, percent-decoded (ASP.NET Core,
# Express, Rack) and with + as a space too (PHP): only a condition whose verdicts differ makes
# the request ambiguous. (target, Cookie lines, the plan's bypass detail or the rule that holds)
@pytest.mark.parametrize(("target", "lines", "detail"), [
    ("/a", ["preview=1"], "RULE-BYPASS:preview"),
    ("/a", ["preview=%31"], "AMBIGUOUS-COOKIE:preview"),   # ASP.NET Core, PHP, Express, Rack read 1
    ("/a", ["preview=1+"], "pages"),                       # "1+" and PHP's "1 " are not "1" either
    ("/a", ["preview=%30"], "pages"),                      # "0" on every reading
    ("/a", ["beta=o%6E"], "AMBIGUOUS-COOKIE:beta"),        # a regex condition compares the value too
    ("/a", ["beta=on+"], "pages"),                         # "on+", "on ": no reading holds ^on$
    ("/a", ["preview=0"], "pages"),
    ("/consented/x", [ONETRUST], "analytics consent"),      # the regex holds on the raw value only...
    ("/either/x", [ONETRUST], "RULE-BYPASS:consent either way"),  # ...this one on every reading
    ("/either/x", [ONETRUST.replace("C0004%3A1", "C0004%3A0")], "pages"),
    ("/consented/x", [ONETRUST.replace("C0004%3A1", "C0004%3A0")], "pages"),  # no reading holds
    # The escapes in a condition stand for what they encode: these are consent to the origin...
    ("/consented/x", ["OptanonConsent=groups=C0004%3a1"], "AMBIGUOUS-COOKIE:OptanonConsent"),
    ("/consented/x", ["OptanonConsent=groups=C0004:1"], "AMBIGUOUS-COOKIE:OptanonConsent"),
    ("/either/x", ["OptanonConsent=groups=C0004:1"], "RULE-BYPASS:consent either way"),
    # ...and this is not ("C0004%3A1" once decoded) on any reading.
    ("/consented/x", ["OptanonConsent=groups=C0004%253A1"], "pages"),
    # Escapes a rewrite cannot decode safely (after a backslash, ``\\%61`` became ``\\a``, BEL,
    # and the readings agreed on "no": adm%69n, "admin" to the origin, was stored for everyone;
    # in a count): every value an origin may decode is ambiguous under them.
    ("/drafts/x", ["role=adm%69n"], "AMBIGUOUS-COOKIE:role"),
    ("/drafts/x", ["role=%61dmin"], "RULE-BYPASS:admin drafts"),
    ("/twice/x", ["n=x%78"], "AMBIGUOUS-COOKIE:n"),
])
def test_a_compared_cookie_value_is_ambiguous_only_when_a_decoded_reading_decides_otherwise(
        target: str, lines: list[str], detail: str) -> None:
    plan = PREVIEW.plan(head(target, lines))
    if detail.startswith(("RULE-BYPASS:", "AMBIGUOUS-COOKIE:")):
        assert (plan.bypass, plan.bypass_detail) == (True, detail)
    else:
        assert not plan.bypass
        assert plan.rule is not None and plan.rule.name == detail
