"""Each compiled condition: whether it holds, and the sentence explain prints when it does not.

The hot predicate and explain's first failing condition come from one list of checks
(``proxy.rules.match``): this table pins both, condition kind by condition kind.
"""

from __future__ import annotations

import pytest

from proxy.rules import RequestView
from tests.rules.test_compile import compile_text, head

# (match, request target, request fields, method, the first failing condition; None: all hold)
CASES: list[tuple[str, str, dict[str, str], str, str | None]] = [
    ("{method: [POST]}", "/x", {}, "GET", "method GET not in ['POST']"),
    ("{method: GET}", "/x", {}, "HEAD", None),
    ("{host: [b.example, '*.c.example']}", "/x", {}, "GET", "host a.example not in ['b.example', '*.c.example']"),
    ("{host: a.example}", "/x", {}, "GET", None),
    ("{path: /static/**}", "/%73tatic/a", {}, "GET", None),
    ("{path: /static/**}", "/other/a", {}, "GET", "path /other/a does not match '/static/**'"),
    ("{path: 'regex:^/v[0-9]/'}", "/vx/a", {}, "GET", "path /vx/a does not match 'regex:^/v[0-9]/'"),
    ("{query: {q: present}}", "/x?p=1", {}, "GET", "query: not q present"),
    ("{query: {q: absent}}", "/x?q", {}, "GET", "query: not q absent"),
    ("{query: {q: shoe}}", "/x?q=boot", {}, "GET", "query: not q = 'shoe'"),
    ("{query: {q: {regex: '^sh'}}}", "/x?q=boot", {}, "GET", "query: not q ~ /^sh/"),
    ("{query: {q: {regex: '^sh'}}}", "/x?q=sh%6Fe", {}, "GET", None),
    ("{header: {X-A: present}}", "/x", {}, "GET", "header: not X-A present"),
    ("{header: {X-A: absent}}", "/x", {"X-A": "1"}, "GET", "header: not X-A absent"),
    ("{header: {X-A: '1'}}", "/x", {"X-A": "2"}, "GET", "header: not X-A = '1'"),
    ("{header: {Accept: {regex: json}}}", "/x", {"Accept": "text/html"}, "GET", "header: not Accept ~ /json/"),
    ("{cookie: {s: present}}", "/x", {"Cookie": "t=1"}, "GET", "cookie: not s present"),
    ("{cookie: {s: absent}}", "/x", {"Cookie": "s=1"}, "GET", "cookie: not s absent"),
    ("{cookie: {s: '1'}}", "/x", {"Cookie": "s=2"}, "GET", "cookie: not s = '1'"),
    ("{cookie: {s: {regex: '^a'}}}", "/x", {"Cookie": "s=b"}, "GET", "cookie: not s ~ /^a/"),
    # The first that fails, in the order the predicate checks them: method, host, path, query, header, cookie.
    ("{method: GET, path: /a, cookie: {s: present}}", "/b", {}, "POST", "method POST not in ['GET', 'HEAD']"),
    ("{path: /a, header: {X-A: present}}", "/b", {}, "GET", "path /b does not match '/a'"),
    ("{header: {X-A: present}, query: {q: present}}", "/a", {}, "GET", "query: not q present"),
]


@pytest.mark.parametrize(("match", "target", "fields", "method", "why"), CASES, ids=[c[0] + " " + c[1] for c in CASES])
def test_a_condition_holds_or_says_why_not(match: str, target: str, fields: dict[str, str], method: str,
                                           why: str | None) -> None:
    rules = compile_text(f"""
        rules:
          - {{name: r, match: {match}, bypass: true}}
    """)
    [rule] = rules.rules
    view = RequestView(head(target, method, **fields))
    assert rule.match.request_mismatch(view) == why
    assert rule.holds(view) is (why is None)
    assert rules.plan(head(target, method, **fields)).bypass is (why is None)


@pytest.mark.parametrize(("status", "content_type", "why"), [
    (503, "application/json; charset=utf-8", None),
    (200, "application/json", "status 200 not in [500, 503]"),
    (500, "text/html", "content type 'text/html' not in ['application/*']"),
    (500, None, "content type '(none)' not in ['application/*']"),
])
def test_a_response_condition_holds_or_says_why_not(status: int, content_type: str | None,
                                                    why: str | None) -> None:
    rules = compile_text("""
        rules:
          - {name: r, match: {status: [500, 503], content_type: "application/*"}, no_store: true}
    """)
    [rule] = rules.rules
    assert rule.match.response_mismatch(status, content_type) == why
    assert rule.match.response_holds(status, content_type) is (why is None)
