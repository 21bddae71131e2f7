"""The rule compiler and matcher without a proxy: first-match semantics, the path index, normalisation."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Listener, Settings
from proxy.policy.keys import normalise_host
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.rules import RequestView, RuleSet, compile_rule_file, normalise_path
from proxy.rules.match import Match
from proxy.web.server import live_settings
from proxy.yamlsrc import Problems, parse_yaml


def compile_text(text: str) -> RuleSet:
    problems = Problems()
    root = parse_yaml(textwrap.dedent(text), "t.yaml", problems)
    assert root is not None
    defaults, rules = compile_rule_file(root, problems)
    assert not problems, problems.items
    return RuleSet(defaults, tuple(rules), CacheOptions(), ("t.yaml",))


def head(target: str, method: str = "GET", host: str = "a.example", **headers: str) -> RequestHead:
    h = CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()})
    return RequestHead(method, "http", host, target, CIMultiDictProxy(h))


RULES = compile_text("""
    defaults:
      ttl: {200: 5m}
      stale_if_error: 1h
      response_headers: {add: {X-Default: "1"}}
    rules:
      - name: api errors
        match: {path: /api/**, status: [500, 503]}
        no_store: true
        response_headers: {add: {X-Error: "1"}}
      - name: api json
        match: {path: /api/**, content_type: application/json}
        ttl: {200: 30s}
      - name: api
        match: {path: /api/**}
        key: {query: ignore}
        client_cache_control: ignore
        stale_if_error: 0s
      - name: late
        match: {path: /api/x}
        bypass: true
""")


def test_request_time_rule_skips_rules_with_response_conditions() -> None:
    plan = RULES.plan(head("/api/x?a=1"))
    assert plan.rule is not None and plan.rule.name == "api"  # "late" is never reached
    assert plan.key.query_ignore and plan.options.client_cache_control == "ignore"
    assert [r.name for r in plan.response_rules] == ["api errors", "api json"]


def test_store_time_rule_is_the_first_whose_request_and_response_conditions_hold() -> None:
    plan = RULES.plan(head("/api/x"))
    error = plan.for_response(503, "application/json")
    assert error.rule is not None and error.rule.name == "api errors" and error.no_store
    json = plan.for_response(200, "application/json; charset=utf-8")
    assert json.rule is not None and json.rule.name == "api json"
    assert json.options.rule_ttl(200) == 30 and json.options.stale_if_error == 3600  # from defaults
    other = plan.for_response(200, "text/plain")
    assert other.rule is plan.rule and other.options.stale_if_error == 0  # the rule's 0s wins
    assert other.options.rule_ttl(200) == 300


def test_response_headers_follow_the_store_time_rule_or_the_defaults() -> None:
    plan = RULES.plan(head("/api/x"))
    assert plan.response_headers_for(503, None).add == (("X-Error", "1"),)  # type: ignore[union-attr]
    assert plan.response_headers_for(200, "text/plain").add == (("X-Default", "1"),)  # type: ignore[union-attr]


def test_no_matching_rule_uses_the_defaults_and_the_default_key() -> None:
    plan = RULES.plan(head("/page"))
    assert plan.rule is None and plan.key.is_default and not plan.bypass
    assert plan.for_response(200, None).options.rule_ttl(200) == 300


def test_plans_without_response_rules_are_built_once() -> None:
    rules = compile_text("""
        rules:
          - {name: a, match: {path: /a}, bypass: true}
    """)
    assert rules.plan(head("/a")) is rules.plan(head("/a?x"))
    assert RULES.plan(head("/api/x")) is RULES.plan(head("/api/y"))  # composed plans are memoised


def test_a_bare_number_where_a_string_is_meant_is_taken_as_written() -> None:
    """YAML reads ``010`` as 8 and ``1.50`` as 1.5: a header value or a condition's value is the
    text as written, not that number's (a rule matching ``v=1.50`` never matched)."""
    rules = compile_text("""
        rules:
          - name: versioned
            match: {path: /v, query: {v: 1.50, w: {equals: 010}, 010: {equals: 2.0}}, header: {X-Id: 0x1F}}
            response_headers: {add: {X-Version: 010, X-Api: 1.50}}
    """)
    plan = rules.plan(head("/v?v=1.50&w=010&010=2.0", x_id="0x1F"))
    assert plan.rule is not None and plan.rule.name == "versioned"
    assert plan.response_headers_for(200, None).add == (  # type: ignore[union-attr]
        ("X-Version", "010"), ("X-Api", "1.50"))
    assert rules.plan(head("/v?v=1.5&w=010&010=2.0", x_id="0x1F")).rule is None
    assert rules.plan(head("/v?v=1.50&w=8&010=2.0", x_id="0x1F")).rule is None
    assert rules.plan(head("/v?v=1.50&w=010&8=2.0", x_id="0x1F")).rule is None


@pytest.mark.parametrize("text", ["match: {path: /s, status: [0404]}", "ttl: {0404: 1m}", "ttl: {4:04: 1m}"])
def test_a_status_code_yaml_reads_as_octal_or_base_60_is_refused(text: str) -> None:
    """``0404`` is YAML's octal 260 (a status code) and ``4:04`` its base-60 244: refused, as
    for counts, durations and sizes."""
    problems = Problems()
    root = parse_yaml(f"rules:\n  - name: s\n    match: {{path: /s}}\n    {text}\n"
                      if text.startswith("ttl") else f"rules:\n  - name: s\n    {text}\n", "t.yaml", problems)
    assert root is not None
    compile_rule_file(root, problems)
    assert any("reads as the number" in p for p in problems.items), problems.items


BRACKETS = "the brackets hold no IPv6 address: no Host field can name it (one that does is answered 400)"


@pytest.mark.parametrize(("host", "why"), [
    ("[1:2:3]", BRACKETS), ("[v1.x]", BRACKETS), ("[2001:db8:1]:8080", BRACKETS),
    ("[", "brackets enclose one whole IPv6 address: [2001:db8::1] or [2001:db8::1]:8080"),
    ("a[::1]", "brackets enclose one whole IPv6 address: [2001:db8::1] or [2001:db8::1]:8080"),
    ("*.[::1]", "an IPv6 address has no names under it: write it without *."),
    ("[::1]:", "no port after the ':': drop it or add the port"),
    ("[::1]x", "only a :PORT may follow the ']'"),
])
def test_a_host_pattern_whose_brackets_hold_no_ipv6_address_is_refused_at_its_line(host: str, why: str) -> None:
    """A Host spelt so is answered 400 before the rules see it: the rule was kept and never applied."""
    problems = Problems()
    root = parse_yaml(f"rules:\n  - name: h\n    match: {{host: '{host}'}}\n    bypass: true\n", "t.yaml", problems)
    assert root is not None
    compile_rule_file(root, problems)
    assert problems.items == [f"t.yaml:3: rules[0].match.host: {host!r}: {why}"]


def test_a_host_pattern_with_an_ipv6_literal_matches_each_spelling_of_it() -> None:
    rules = compile_text("""
        rules:
          - {name: v6, match: {host: ["[0:0::1]", "[::FFFF:7F00:1]:8080"]}, bypass: true}
    """)
    for host in ("[::1]", "[0::0001]", "[::ffff:7f00:1]:8080"):  # as the request reaches the rules
        assert rules.plan(head("/", host=normalise_host(host, "http"))).rule is not None, host


def test_get_in_a_method_list_implies_head() -> None:
    rules = compile_text("""
        rules:
          - {name: a, match: {method: GET}, bypass: true}
    """)
    assert rules.plan(head("/", "HEAD")).bypass and not rules.plan(head("/", "POST")).bypass


@pytest.mark.parametrize(("raw", "normal"), [
    ("/a/b", "/a/b"),
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/../../b", "/b"),
    ("/a/b/..", "/a/"),
    ("/a//b", "/a/b"),
    ("/%61dmin", "/admin"),
    ("/static/..%2Fadmin", "/admin"),
    ("/a%2f..%2fb", "/b"),
    ("/caf%C3%A9", "/café"),
    ("/.hidden/x", "/.hidden/x"),
])
def test_paths_are_matched_decoded_and_without_dot_segments(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal


# -- properties: the fast paths agree with the plain definitions ------------------------------------

SEGMENTS = ["a", "b", "api", "static", "x.css", "%61", "..", ".", "", "a.json", "ab"]
# ``^/a/?`` and ``^/a/*x``: the slash after the first segment is optional, so the segment does
# not index them (``/a.json`` and ``/ab`` match): the index skipped such a bypass rule.
GLOBS = ["/a/**", "/b/*", "/api/**", "/static/*.css", "/**", "/a", "/*/x.css", "regex:^/a/",
         "regex:^/api/|^/b", "regex:css$", "regex:^/static/.+", "regex:^/a/?", "regex:^/a/*x",
         "regex:^/a/{0,1}j"]


def paths() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=4).map(lambda p: "/" + "/".join(p))


@settings(max_examples=300, deadline=None)
@given(globs=st.lists(st.sampled_from(GLOBS), min_size=1, max_size=6), path=paths(),
       cookie=st.booleans(), query=st.sampled_from(["", "q=1", "q=2&p", "%71=1"]))
def test_the_path_index_finds_the_same_rule_as_a_scan_of_every_rule(
        globs: list[str], path: str, cookie: bool, query: str) -> None:
    lines = ["rules:"]
    for i, g in enumerate(globs):
        cond = ", cookie: {s: present}" if i % 3 == 1 else ", query: {q: '1'}" if i % 3 == 2 else ""
        status = ", status: [500]" if i == 1 else ""
        action = "no_store: true" if status else "ttl: {200: 1m}"
        lines.append(f"  - {{name: r{i}, match: {{path: '{g}'{cond}{status}}}, {action}}}")
    rules = compile_text("\n".join(lines) + "\n")
    request = head(path + ("?" + query if query else ""), Cookie="s=1" if cookie else "x=1")
    view = RequestView(request)
    holding = [r for r in rules.rules if r.match.request_mismatch(view) is None]
    expected = next((r for r in holding if not r.match.needs_response), None)
    plan = rules.plan(request)
    assert plan.rule is expected
    before = holding[:holding.index(expected)] if expected is not None else holding
    assert list(plan.response_rules) == [r for r in before if r.match.needs_response]
    for r in rules.rules:  # the compiled predicate and the explaining check agree
        assert r.holds(view) is (r.match.request_mismatch(view) is None)


def test_the_path_index_asks_each_rule_its_first_segment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexing asked every rule its segment once per distinct segment: 5000 one-path rules
    took 25 million calls (seconds of a reload). Counted, not timed."""
    rules = compile_text("rules:\n" + "".join(
        f"  - {{name: r{i}, match: {{path: '/p{i}/**'}}, ttl: {{200: 1m}}}}\n" for i in range(200)))
    calls = 0
    asked = Match.first_segment

    def counting(self: Match) -> str | None:
        nonlocal calls
        calls += 1
        return asked(self)

    monkeypatch.setattr(Match, "first_segment", counting)
    again = rules.rebased(CacheOptions())
    assert calls <= 2 * len(rules.rules)
    plan = again.plan(head("/p7/x"))
    assert plan.rule is not None and plan.rule.name == "r7"


def test_reload_keeps_what_needs_a_restart() -> None:
    old = Settings(source="a", listeners=(Listener("127.0.0.1", 1),), via="old")
    new = Settings(source="a", listeners=(Listener("127.0.0.1", 2),), via="new", rules=RULES)
    merged, restart = live_settings(old, new)
    assert restart == ["listen"]
    assert (merged.listen, merged.via, merged.rules) == (("127.0.0.1", 1), "new", RULES)


def test_a_host_pattern_with_the_default_port_matches_the_host_without_it() -> None:
    """The Host is normalised (``admin.example:80`` and ``admin.example`` are one host) before
    the rules see it, so a pattern naming the scheme's default port never held: the admin
    pages it was to bypass were stored and served to everyone."""
    rules = compile_text("""
        rules:
          - {name: admin, match: {host: "admin.example:80"}, bypass: true}
          - {name: tls admin, match: {host: "secure.example:443"}, bypass: true}
          - {name: other port, match: {host: "admin.example:8080"}, bypass: true}
    """)

    def plan(host: str, scheme: str = "http") -> str | None:
        rule = rules.plan(RequestHead("GET", scheme, host, "/", CIMultiDictProxy(CIMultiDict()))).rule
        return rule.name if rule is not None else None

    assert plan("admin.example") == "admin"
    assert plan("admin.example", "https") is None  # that is admin.example:443
    assert plan("secure.example", "https") == "tls admin"
    assert plan("secure.example") is None
    assert plan("admin.example:8080") == "other port"


def _warnings(text: str) -> list[str]:
    problems = Problems()
    root = parse_yaml(textwrap.dedent(text), "t.yaml", problems)
    assert root is not None
    compile_rule_file(root, problems)
    assert not problems, problems.items
    return problems.warnings


def test_a_rule_that_widens_sharing_on_an_unkeyed_condition_is_warned_about() -> None:
    """One request with ``User-Agent: googlebot`` stored the page with this rule's day-long
    lifetime, and every browser then got it for a day (the origin said 5 s)."""
    (warning,) = _warnings("""
        rules:
          - name: crawlers
            match: {path: "/news/**", header: {User-Agent: {regex: "(?i)googlebot"}}}
            ttl: {200: 1d}
            override_origin: true
    """)
    assert warning.startswith("t.yaml:5: warning: rule 'crawlers': ttl, override_origin is chosen by "
                              "header User-Agent, which the cache key does not hold")
    assert _warnings("""
        rules:
          - name: keyed
            match: {header: {User-Agent: {regex: bot}}}
            key: {headers: [user-agent]}
            ttl: {200: 1d}
          - name: anonymous pages
            match: {cookie: {session: absent}}
            ttl: {200: 2m}
          - name: restrictive
            match: {cookie: {beta: present}}
            no_store: true
          - name: keyed query
            match: {query: {v: "2"}}
            ttl: {200: 1h}
    """) == []
    (warning,) = _warnings("""
        rules:
          - name: ignored query
            match: {query: {preview: "1"}}
            key: {query: ignore}
            stale_if_error: 1d
    """)
    assert "stale_if_error is chosen by query preview" in warning


def test_a_lower_casing_rule_whose_glob_has_capitals_is_warned_about_at_the_glob() -> None:
    """With ``key.lowercase_path`` the rules are read again on the lower-cased path, which
    ``/Low/**`` never matches: every request the rule matched was bypassed, and check said OK."""
    (warning,) = _warnings("""
        rules:
          - name: lower
            match:
              path: "/Low/**"
            ttl: {200: 1m}
            key: {lowercase_path: true}
    """)
    assert warning.startswith("t.yaml:5: warning: rule 'lower': path '/Low/**' has capitals, but "
                              "key.lowercase_path reads the rules again on the lower-cased path")
    assert _warnings("""
        rules:
          - name: lower
            match: {path: "/low/**"}
            key: {lowercase_path: true}
          - name: keeps case
            match: {path: "/Up/**"}
            ttl: {200: 1m}
    """) == []


SHAPED = """
rules:
  - name: mobile
    match: {path: "/m/**", header: {X-Mobile: present}}
    key: {query: ignore, headers: [X-Mobile]}
  - name: search
    match: {path: "/m/**", query: {q: present}, cookie: {ab: present}}
    key: {query: {include: [q]}, cookies: [ab]}
  - name: another host
    match: {host: b.example, path: "/m/**", header: {X-Mobile: present}}
    key: {lowercase_path: true}
  - name: passed
    match: {path: "/m/**", header: {X-Debug: present}}
    bypass: true
"""

# (URL target, the URL parts of every key a GET of it may have)
KEY_SHAPES = [
    ("/m/p?utm=1", {"http://a.example/m/p?utm=1", "http://a.example/m/p"}),
    ("/m/p?q=x&utm=1", {"http://a.example/m/p?q=x&utm=1", "http://a.example/m/p", "http://a.example/m/p?q=x"}),
    ("/other?utm=1", {"http://a.example/other?utm=1"}),
]


@pytest.mark.parametrize(("target", "shapes"), KEY_SHAPES)
def test_a_url_s_key_shapes_include_those_of_rules_that_match_on_fields_and_cookies(
        target: str, shapes: set[str]) -> None:
    # A purge by URL plans a GET with no fields: the rules with a header or cookie condition
    # give the URL key shapes of their own, which the purge must look up too.
    from proxy.purge import url_shapes

    assert url_shapes(f"http://a.example{target}", compile_text(SHAPED)) == shapes


MOBILE = """
rules:
  - name: mobile
    match: {path: "/shop/**", header: {X-Mobile: present}}
    key: {query: ignore, headers: [X-Mobile], lowercase_path: true}
"""
LOWERED = MOBILE + """
  - name: lower-cased
    key: {lowercase_path: true}
"""


@pytest.mark.parametrize(("rules", "target", "shapes"), [
    # /Shop/Item with X-Mobile is lower-cased by the second rule, then keyed by the first.
    (LOWERED, "/Shop/Item?utm=1", {"http://a.example/shop/item?utm=1", "http://a.example/shop/item"}),
    (LOWERED, "/other/X", {"http://a.example/other/x"}),
    # Nothing lower-cases /Shop/Item: no request for it is keyed by the mobile rule.
    (MOBILE, "/Shop/Item?utm=1", {"http://a.example/Shop/Item?utm=1"}),
    (MOBILE, "/shop/Item?utm=1", {"http://a.example/shop/Item?utm=1", "http://a.example/shop/item"}),
], ids=["lowered-into-a-header-rule", "lowered-only", "no-rule-lowers-it", "the-header-rule-itself"])
def test_a_url_s_key_shapes_include_a_rule_its_lower_cased_path_is_read_again_by(
        rules: str, target: str, shapes: set[str]) -> None:
    # ``key.lowercase_path`` reads the rules again on the lower-cased path (RuleSet._lowered): a
    # rule with a header condition matched there keys requests for the URL as sent too.
    from proxy.purge import url_shapes

    assert url_shapes(f"http://a.example{target}", compile_text(rules)) == shapes
