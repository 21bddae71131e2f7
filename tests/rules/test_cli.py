"""Bad rule files are named FILE:LINE by `cachegate check` and refused by `cachegate run`;
`cachegate explain` shows the rule, the key and the decision."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, rules: str, config_extra: str = "") -> str:
    (tmp_path / "rules.yaml").write_text(textwrap.dedent(rules).lstrip("\n"))
    config = tmp_path / "cachegate.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n"
                      "upstreams: [http://127.0.0.1:9]\ncache: {disk: null}\nrules: [rules.yaml]\n"
                      + config_extra)
    return str(config)


# (rule file, line the problem is on, words the message must contain)
BAD_RULES = [
    ("""
     rules:
       - name: "a\\r\\nX-Evil: 1"
         match: {path: /a}
         no_store: true
     """, 2, "rules[0].name: expected printable ASCII text, got 'a\\r\\nX-Evil: 1'"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         response_headers: {add: {X-A: "1\\x01"}}
     """, 4, "rules[0].response_headers.add.X-A: a header value cannot contain line breaks or other control"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         tll: {200: 5m}
     """, 4, "unknown key 'rules[0].tll' (did you mean 'ttl'?)"),
    ("""
     rules:
       - name: a
         match:
           paht: /a
         bypass: true
     """, 4, "unknown key 'rules[0].match.paht' (did you mean 'path'?)"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         bypass: "yes"
     """, 4, "bypass: expected true or false, got a string"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         ttl:
           200: 5m
           404: five minutes
     """, 6, "ttl.404: bad duration 'five minutes'"),
    ("""
     defaults:
       stale_if_error: 1 hour
     """, 2, "defaults.stale_if_error: bad duration"),
    ("""
     defaults:
       response_headers: {remove: ["a b"]}
     """, 2, "defaults.response_headers: 'a b' is not a valid header name"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         ttl: {200: 1m}
       - name: b
         match: {path: /b, status: [206]}
         no_store: true
     """, 6, "rules[1].match.status: 206 never matches"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         tags: ["x y"]
     """, 4, "rules[0].tags: 'x y' is not a valid name"),
    ("""
     rules:
       - name: a
         match: {path: "regex:^/(a|b"}
         bypass: true
     """, 3, "rules[0].match.path: bad regex '^/(a|b'"),
    ("""
     rules:
       - name: a
         match: {header: {Accept: {regex: "[json"}}}
         bypass: true
     """, 3, "rules[0].match.header.Accept: bad regex"),
    ("""
     rules:
       - name: errors skip the cache
         match: {path: /api/**, status: [500, 503]}
         bypass: true
     """, 4, "rule 'errors skip the cache': bypass is decided before the response exists"),
    ("""
     rules:
       - name: html key
         match: {content_type: text/html}
         key: {query: ignore}
     """, 4, "key is decided before the response exists"),
    ("""
     rules:
       - name: everything
         ttl: {200: 1m}
       - name: never
         match: {path: /x}
         bypass: true
     """, 4, "rule 'never' can never match: rule 'everything' at rules.yaml:2"),
    ("""
     rules:
       - name: posts
         match: {method: POST}
         ttl: {200: 1m}
     """, 4, "ttl never applies: only GET and HEAD are cached"),
    ("""
     rules:
       - name: monitors probe with HEAD
         match: {path: /page, method: [HEAD]}
         ttl: {200: 1h}
     """, 4, "ttl would apply to the GET response a HEAD fills and every GET is answered from"),
    ("""
     rules:
       - name: b
         match: {path: /b}
         bypass: true
         ttl: {200: 1m}
     """, 5, "ttl never applies: bypass: true"),
    ("""
     rules:
       - name: a
         match: {path: static/**}
         bypass: true
     """, 3, "a path glob starts with '/'"),
    ("""
     rules:
       - name: a
         match: {status: [200, 999]}
         no_store: true
     """, 3, "match.status: expected HTTP status codes (100-599), got 999"),
    ("""
     rules:
       - name: parts
         match: {status: [200, 206]}
         no_store: true
     """, 3, "match.status: 206 never matches: a 206 is part of a 200"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         ttl_jitter: 150%
     """, 4, "ttl_jitter: expected a percentage below 100%"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         response_headers: {add: {Transfer-Encoding: chunked}}
     """, 4, "Transfer-Encoding describes the message framing"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         client_cache_control: bust
     """, 4, "client_cache_control: must be one of honor, revalidate, ignore, got 'bust'"),
    ("""
     rules:
       - name: a
         match: {path: /a}
         override_origin: true
     """, 2, "override_origin: true needs a ttl"),
    ("""
     rules:
       - {name: a, match: {path: /a}, bypass: true}
       - {name: a, match: {path: /b}, bypass: true}
     """, 3, "rule 'a': the name is already used at rules.yaml:2"),
    ("""
     rules:
       - name: a
         match: {path: /a
     """, 4, "YAML syntax error"),
    # Rules' regexes run on RE2 (linear in the text): what it cannot run is refused, saying why.
    ("""
     rules:
       - name: a
         match: {path: 'regex:^/(a+)/\\1$'}
         bypass: true
     """, 3, "rules[0].match.path: bad regex '^/(a+)/\\\\1$': invalid escape sequence: \\1: rules' regexes "
             "run on RE2, which matches in time linear in the text"),
    ("""
     rules:
       - name: a
         match:
           header: {Accept: {regex: "^(?!text/)"}}
         bypass: true
     """, 4, "rules[0].match.header.Accept: bad regex '^(?!text/)': invalid perl operator: (?!: rules' "
             "regexes run on RE2"),
    ("""
     rules:
       - name: a
         match: {query: {q: {regex: "a{99999}"}}}
         bypass: true
     """, 3, "bad regex 'a{99999}': invalid repetition size: {99999}"),
    # What RE2 reads otherwise than re is refused at its line, not silently changed: a bypass for
    # ^/account/[0-9]{,8}/ stopped bypassing (RE2 reads "{,8}" as text) and private pages were cached.
    ("""
     rules:
       - name: a
         match: {path: "regex:^/account/[0-9]{,8}/"}
         bypass: true
     """, 3, "rules[0].match.path: bad regex '^/account/[0-9]{,8}/': {,8} is the literal text '{,8}' "
             "in RE2, where Python's re read it as 0 to 8 repeats: write {0,8}"),
    ("""
     rules:
       - name: a
         match: {path: 'regex:^/account/\\d+/'}
         bypass: true
     """, 3, "\\d is ASCII-only in RE2, where Python's re read it over all of Unicode"),
    ("""
     rules:
       - name: a
         match:
           header: {X-A: {regex: "^a\\ud800"}}
         bypass: true
     """, 4, "rules[0].match.header.X-A: bad regex '^a\\ud800': a lone surrogate U+D800 at character 3: "
             "not a character, so RE2 cannot read the pattern; remove it"),
    # The type is matched on its media type alone: with parameters it never matched.
    ("""
     rules:
       - name: a
         match:
           path: /c/**
           content_type: [text/html, "text/plain; charset=utf-8"]
         no_store: true
     """, 5, "rules[0].match.content_type: 'text/plain; charset=utf-8' never matches: a response's type is "
             "matched on its media type alone, without parameters (write 'text/plain')"),
    # Header names are case-insensitive: one written twice is a duplicate, at the second one's line.
    ("""
     rules:
       - name: a
         match:
           path: /x
           header:
             X-A: present
             x-a: absent
         bypass: true
     """, 7, "rules[0].match.header: duplicate header name 'x-a': header names are case-insensitive, and "
             "'X-A' (line 6) names the same field"),
    ("""
     rules:
       - name: a
         match: {path: /y}
         response_headers:
           add:
             X-A: "1"
             x-a: "2"
     """, 7, "rules[0].response_headers.add: duplicate header name 'x-a'"),
    ("""
     rules:
       - name: a
         match: {path: /y}
         response_headers: {add: {X-A: "\\ud800"}}
     """, 4, "rules[0].response_headers.add.X-A: a header value cannot contain a lone surrogate"),
]


@pytest.mark.parametrize(("rules", "line", "message"), BAD_RULES,
                         ids=[m.split(":")[0][:40] for _, _, m in BAD_RULES])
def test_check_names_file_line_and_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, rules: str, line: int,
                                               message: str) -> None:
    monkeypatch.chdir(tmp_path)  # a config named relatively: rule files shown from here too
    write(tmp_path, rules)
    assert main(["check", "--config", "cachegate.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"rules.yaml:{line}: " in err, err
    assert message in err, err
    assert any(f"rules.yaml:{line}: " in e and message in e for e in err.splitlines()), err


def test_check_accepts_the_shipped_rules_and_examples(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    examples = sorted(f"rules/examples/{n}" for n in os.listdir(ROOT / "rules/examples"))
    files = ["rules/default.yaml", *examples]
    assert len(files) >= 4
    for f in files:
        config = tmp_path / "c.yaml"
        config.write_text(f"upstreams: [http://127.0.0.1:9]\ncache: {{disk: null}}\nrules: ['{ROOT / f}']\n")
        assert main(["check", "--strict", "--config", str(config)]) == 0, capsys.readouterr().err
        assert "OK" in capsys.readouterr().out  # and no warning (--strict would exit 2)


def test_run_refuses_to_start_with_a_bad_rule_file(tmp_path: Path) -> None:
    config = write(tmp_path, """
        rules:
          - name: a
            match: {path: /a, status: 500}
            bypass: true
    """)
    proc = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", config],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 2
    assert "rules.yaml:4: rule 'a': bypass is decided before the response exists" in proc.stderr
    assert "listening" not in proc.stdout


# -- explain ------------------------------------------------------------------------------------------

EXPLAIN_RULES = """
    defaults:
      ttl: {200: 5m}
      stale_if_error: 1h
    rules:
      - name: logged-in users
        match: {cookie: {session: present}}
        bypass: true
      - name: api errors
        match: {path: /api/**, status: [500, 503]}
        no_store: true
      - name: search
        match: {path: /api/search}
        key: {query: {include: [q], sort: true}, headers: [Accept-Language]}
        ttl: {200: 1m, 404: 10s}
"""


def explain(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """(Run in ``tmp_path``, the config is named relatively: rule files are shown as ``rules.yaml``.)"""
    config = write(tmp_path, EXPLAIN_RULES)
    if Path.cwd() == tmp_path:
        config = os.path.basename(config)
    assert main(["explain", "--config", config, *args]) == 0
    return capsys.readouterr().out


def test_explain_shows_rule_key_and_ttl(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = explain(tmp_path, capsys, "http://shop.example/api/search?utm=1&q=shoes",
                  "-H", "Accept-Language: de", "--status", "200", "--status", "404", "--status", "503")
    assert "request-time rule   'search' (rules.yaml:11)" in out
    assert "cache key           http://shop.example/api/search?q=shoes  + header accept-language='de'" in out
    assert "fresh for 1m (rule ttl; used because the origin gave no freshness)" in out
    assert "fresh for 10s" in out
    assert "store-time rule     'api errors' (rules.yaml:8)" in out
    assert "not stored: RULE-NO-STORE:api errors" in out
    assert "- logged-in users (rules.yaml:5): cookie: not session present" in out


def test_explain_shows_a_bypass_and_origin_freshness(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = explain(tmp_path, capsys, "http://shop.example/home", "-H", "Cookie: session=1")
    assert "BYPASS: neither looked up nor stored (Cache-Status detail RULE-BYPASS:logged-in users)" in out
    # An ambiguous session cookie under that present bypass rule: the rule's bypass stands (docs/rules.md).
    for cookie in ("theme=dark,session=alice", 'p="x; session=y"', "session =x"):
        out = explain(tmp_path, capsys, "http://shop.example/home", "-H", f"Cookie: {cookie}")
        assert "(Cache-Status detail RULE-BYPASS:logged-in users)" in out, cookie
    out = explain(tmp_path, capsys, "http://shop.example/home", "-R", "Cache-Control: max-age=30")
    assert "request-time rule   none (defaults only)" in out
    assert "fresh for 30s (from the origin's max-age)" in out
    out = explain(tmp_path, capsys, "http://shop.example/home", "-R", "Cache-Control: private")
    assert "not stored: PRIVATE (the origin sent Cache-Control: private" in out
    out = explain(tmp_path, capsys, "http://shop.example/home", "-R", "Cache-Control: max-age=500",
                  "-R", "CDN-Cache-Control: No-Store")  # the targeted field decides: it is named
    assert "not stored: NO-STORE (the origin sent CDN-Cache-Control: no-store)" in out


@pytest.mark.parametrize(("url", "response", "why"), [
    ("http://a.example/x", [], "the origin gave no freshness (max-age, s-maxage, Expires), no validator"),
    ("http://a.example/x", ["-R", "Cache-Control: max-age=0"],
     "the origin's Cache-Control: max-age=0 gives it a lifetime of 0: it is expired at once"),
    ("http://a.example/x", ["-R", "Expires: -1"],
     "the origin's Expires (a date not after its Date, or invalid: 0, -1) gives it a lifetime of 0"),
    ("http://a.example/zero/x", [], "the rule's ttl for this status is 0s: it is expired at once"),
], ids=["none", "max-age=0", "Expires: -1", "rule ttl 0s"])
def test_explain_tells_a_lifetime_of_0_from_no_freshness(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, response: list[str], why: str) -> None:
    """Each said "the origin gave no freshness ... and no rule ttl applies; add a ttl for this
    status in a rule": false for max-age=0 (a rule ttl does not override it) and a ttl of 0s."""
    config = write(tmp_path, """
        rules:
          - name: zero
            match: {path: /zero/**}
            ttl: {200: 0s}
    """)
    assert main(["explain", "--config", config, "--brief", url, *response]) == 0
    out = capsys.readouterr().out
    assert f"not stored: NO-FRESHNESS ({why}" in out, out
    assert ("add a ttl for this status in a rule" in out) == (not response and "zero" not in url), out


def stored_lines(out: str) -> str:
    return out[out.index("\nresponse "):]


@pytest.mark.parametrize(("response", "revalidated", "why"), [
    ("max-age=100, no-cache, stale-while-revalidate=30", True, "no-cache"),
    ("max-age=100, must-revalidate, stale-if-error=60", False, "must-revalidate"),
    ("max-age=100, proxy-revalidate", False, "proxy-revalidate"),
    ("s-maxage=100", False, "s-maxage"),
])
def test_explain_never_promises_stale_serving_the_origin_forbids(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], response: str, revalidated: bool, why: str) -> None:
    """The engine never serves these stale (RFC 9111 4.2.4) and revalidates no-cache before every
    use; explain printed "fresh for 1m40s" and "if error 1h" next to "never served stale"."""
    out = stored_lines(explain(tmp_path, capsys, "http://shop.example/home", "-R", f"Cache-Control: {response}"))
    assert f"never served stale: the origin requires revalidation ({why})" in out
    assert "while revalidating" not in out and "if error" not in out
    assert ("revalidated with the origin before every use (the origin's no-cache)" in out) == revalidated
    assert ("fresh for 1m40s" in out) == (not revalidated)


@pytest.mark.parametrize("response", ["Expires: -1", "Expires: 0", "Cache-Control: max-age=0"])
def test_explain_says_the_rules_stale_windows_skip_a_page_expired_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], response: str) -> None:
    out = stored_lines(explain(tmp_path, capsys, "http://shop.example/home", "-R", response, "-R", 'ETag: "a"'))
    assert "stale               while revalidating 0s, if error 0s\n" in out
    assert "the rules' stale_while_revalidate / stale_if_error apply only to a response with a lifetime" in out


@pytest.mark.parametrize(("response", "given"), [
    (["-R", "Cache-Control: max-age=0, must-revalidate"], "the origin's Cache-Control: max-age=0"),
    (["-R", "Cache-Control: no-cache, max-age=60"], "the origin's Cache-Control: no-cache has every use revalidated"),
    (["-R", "Expires: -1"], "the origin's Expires is not after its Date, or invalid"),
    (["-R", "Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT"], None),  # the defaults' ttl of 5m
], ids=["max-age=0", "no-cache", "Expires: -1", "a rule ttl"])
def test_explain_says_why_a_response_to_a_cookie_without_a_lifetime_is_not_stored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], response: list[str], given: str | None) -> None:
    """Stored only to be revalidated, the next client's revalidation would carry this one's
    validators, and an origin comparing only them answers 304 for this user's page. A rule's
    ttl where the origin gave none is the operator's word: stored."""
    out = stored_lines(explain(tmp_path, capsys, "http://shop.example/home", "-H", "Cookie: theme=dark",
                               *response, "-R", 'ETag: "article-7"'))
    if given is None:
        assert "stored, fresh for 5m" in out and "COOKIE-NO-FRESHNESS" not in out, out
        return
    assert (f"not stored: COOKIE-NO-FRESHNESS (the request has a Cookie and the response is not public and "
            f"has no lifetime above 0 ({given}): stored, it would be reused only after asking") in out, out


def test_explain_names_where_each_stale_window_comes_from(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = stored_lines(explain(tmp_path, capsys, "http://shop.example/home",
                               "-R", "Cache-Control: max-age=30, stale-while-revalidate=5"))
    assert ("stale               while revalidating 5s (the origin's stale-while-revalidate), "
            "if error 1h (the rules' stale_if_error)") in out
    assert "apply only to a response with a lifetime" not in out
    out = stored_lines(explain(tmp_path, capsys, "http://shop.example/home",
                               "-R", "Cache-Control: max-age=0, stale-if-error=60"))
    assert "while revalidating 0s, if error 1m (the origin's stale-if-error)" in out


@pytest.mark.parametrize("fields", [
    ["X-Requested-With: XMLHttpRequest", "X-Requested-With: XMLHttpRequest"],
    ["X_Requested_With: XMLHttpRequest"],
])
def test_explain_gives_the_reason_of_an_ambiguous_header_bypass(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: list[str]) -> None:
    config = write(tmp_path, """
        rules:
          - name: ajax
            match: {header: {X-Requested-With: {equals: XMLHttpRequest}}}
            bypass: true
    """)
    args = [a for f in fields for a in ("-H", f)]
    assert main(["explain", "--config", config, "http://a.example/page", *args]) == 0
    out = capsys.readouterr().out
    assert "Cache-Status detail AMBIGUOUS-HEADER:X-Requested-With" in out
    assert "the rules read field 'X-Requested-With', which came as several lines" in out
    assert "cookie" not in out.lower()
    assert "lower-cases" not in out


def test_explain_gives_the_reason_of_a_keyed_header_spelled_otherwise_and_of_a_vary_on_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, """
        rules:
          - name: dashboards
            match: {path: /dash}
            key: {headers: [X-Tenant]}
    """)
    fields = ["-H", "X-Tenant: acme", "-H", "X_Tenant: evil"]
    assert main(["explain", "--config", config, "http://a.example/dash", *fields]) == 0
    out = capsys.readouterr().out
    assert "Cache-Status detail AMBIGUOUS-HEADER:x-tenant" in out
    assert "the rule's key reads field 'x-tenant', which came spelled with '_' for '-' too" in out
    assert main(["explain", "--config", config, "http://a.example/other", *fields,
                 "-R", "Cache-Control: max-age=60", "-R", "Vary: X-Tenant"]) == 0
    out = capsys.readouterr().out
    assert "not stored: AMBIGUOUS-HEADER:x-tenant (the response varies on a field the request also " \
           "carried spelled with '_'" in out


def test_explain_gives_the_reason_of_an_ambiguous_query_bypass(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, """
        rules:
          - name: editing
            match: {query: {mode: {equals: edit}}}
            bypass: true
    """)
    assert main(["explain", "--config", config, "http://a.example/page?mode=view&mode=edit"]) == 0
    out = capsys.readouterr().out
    assert "Cache-Status detail AMBIGUOUS-QUERY:mode" in out
    assert "the rules read query parameter 'mode', which came more than once" in out


def test_explain_without_rules_adds_no_ttl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstreams: [http://127.0.0.1:9]\ncache: {disk: null}\n")
    assert main(["explain", "--config", str(config), "http://a.example/x"]) == 0
    out = capsys.readouterr().out
    assert "not stored: NO-FRESHNESS" in out
    assert "(no rules: RFC 9111 behaviour, nothing added)" in out


def test_explain_rejects_a_relative_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, EXPLAIN_RULES)
    assert main(["explain", "--config", config, "/relative"]) == 1
    assert "give an absolute http:// or https:// URL" in capsys.readouterr().err


def test_explain_shows_the_response_header_edits_a_bypassed_reply_gets_for_each_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bypassed reply is edited by the first rule whose request and response conditions hold
    (here the status rule before the bypass): explain printed the bypass rule's edits, and only
    for the first --status."""
    config = write(tmp_path, """
        rules:
          - name: x200
            match: {path: "/x/**", status: [200]}
            response_headers: {add: {X-From: x200}}
            ttl: {200: 1m}
          - name: xbyp
            match: {path: "/x/**"}
            bypass: true
            response_headers: {add: {X-From: xbyp}}
    """)
    assert main(["explain", "--config", config, "http://a.example/x/1", "--status", "200",
                 "--status", "404"]) == 0
    out = capsys.readouterr().out
    assert "BYPASS: neither looked up nor stored (Cache-Status detail RULE-BYPASS:xbyp)" in out
    assert "  response headers    set X-From: x200 (response 200)" in out
    assert "  response headers    set X-From: xbyp (response 404)" in out
    assert main(["explain", "--config", config, "http://a.example/x/1", "--status", "200"]) == 0
    assert "  response headers    set X-From: x200\n" in capsys.readouterr().out


@pytest.mark.parametrize(("response", "stored"), [
    ("max-age=60, stale-while-revalidate=600, stale-if-error=600", True),
    ("max-age=0, stale-if-error=600", False),
])
def test_explain_never_promises_stale_serving_of_a_stored_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], response: str, stored: bool) -> None:
    """A stored 503 is never served stale (revalidated first: the client gets the origin's
    answer); a 503 with max-age=0, stale-if-error=600 was stored on every request for windows
    that never applied, and explain told the origin to send the stale-if-error it sent."""
    out = explain(tmp_path, capsys, "http://shop.example/home", "--status", "503", "-R", f"Cache-Control: {response}")
    if stored:
        out = stored_lines(out)
        assert "never served stale: a stored error is revalidated first" in out, out
        assert "while revalidating" not in out and "if error" not in out
    else:
        assert "not stored: NO-FRESHNESS (the origin's Cache-Control: max-age=0 gives it a lifetime of 0" in out
        assert "does nothing for an error" in out and "or its own stale-if-error" not in out, out
