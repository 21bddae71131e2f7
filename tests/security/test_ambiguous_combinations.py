"""A rule that reads a query parameter and a header, both sent ambiguously: every combination.

An origin may read a repeated query parameter's last value (PHP, Rails, Django) and a repeated
field's first line (aiohttp, Go). A ``bypass`` rule on ``mode: edit`` and ``X-Mode: edit`` held
for ``?mode=view&mode=edit`` with ``X-Mode: edit`` then ``X-Mode: view`` only in that
combination, which no reading tried: the query was read again with the fields joined, the fields
with the query's first values, and the field the query's reading reached was never looked at.
The origin's editor form was stored and served to the next client of that URL. Now each reading
of the query is combined with each reading of the fields, and a field (or parameter) only
another reading reached adds its readings too.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.messages import RequestHead
from proxy.rules.plan import RuleSet
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.rules.test_compile import compile_text
from tests.security.util import get, send_raw

RULES = """
defaults:
  ttl: {200: 5m}
rules:
  - name: the editor is never cached
    match: {path: /page, query: {mode: edit}, header: {X-Mode: edit}}
    bypass: true
"""


async def page(request: web.Request) -> web.Response:
    mode = request.query.getall("mode", ["view"])[-1]  # the last value, as PHP, Rails and Django
    x_mode = request.headers.get("X-Mode", "view")  # the first line, as aiohttp and Go
    if mode == "edit" and x_mode == "edit":
        return web.Response(text="editor form, token for " + request.headers.get("X-Session", "?"))
    return web.Response(text="public page")


@pytest.mark.parametrize("lines", [
    ["X-Mode: edit", "X-Mode: view"],  # the query's last value with the field's first line
    ["X-Mode: view", "X-Mode: edit"],  # ... with its last line
])
async def test_a_query_and_a_header_both_repeated_never_store_the_editor_for_everyone(
        origin: Origin, make_proxy: MakeProxy, lines: list[str]) -> None:
    origin.route("/page", page)
    proxy = await make_proxy(rules=RULES)
    attack = await send_raw(proxy, get("/page?mode=view&mode=edit", "X-Session: mallory", *lines))
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    assert "AMBIGUOUS-QUERY:mode" in (attack.header("Cache-Status") or "")
    for _ in range(2):
        victim = await send_raw(proxy, get("/page?mode=view&mode=edit"))
        assert victim.body == b"public page"
    assert victim.x_cache == "HIT"


PLAN_RULES = compile_text("""
    rules:
      - name: editor
        match: {query: {mode: edit}, header: {X-Mode: edit}}
        bypass: true
      - name: pages
        match: {path: "/page"}
        ttl: {200: 1m}
""")

EDIT_VIEW = [("X-Mode", "edit"), ("X-Mode", "view")]
# (case, target, header lines, the plan's rule name, its bypass detail or None)
CASES: list[tuple[str, str, list[tuple[str, str]], str | None, str | None]] = [
    ("both once: the rule's bypass", "/page?mode=edit", [("X-Mode", "edit")], "editor", "RULE-BYPASS:editor"),
    ("last value, first line", "/page?mode=view&mode=edit", EDIT_VIEW, "pages", "AMBIGUOUS-QUERY:mode"),
    ("last value, last line", "/page?mode=view&mode=edit", EDIT_VIEW[::-1], "pages", "AMBIGUOUS-QUERY:mode"),
    ("last value, the field spelled with _", "/page?mode=view&mode=edit", [("X_Mode", "edit")],
     "pages", "AMBIGUOUS-QUERY:mode"),
    ("first value, first line (as before)", "/page?mode=edit&mode=view", EDIT_VIEW,
     "pages", "AMBIGUOUS-HEADER:X-Mode"),
    ("last value, one line: the query alone decides", "/page?mode=view&mode=edit", [("X-Mode", "edit")],
     "pages", "AMBIGUOUS-QUERY:mode"),
    ("no combination holds", "/page?mode=view&mode=edit", [("X-Mode", "a"), ("X-Mode", "b")], "pages", None),
    ("no combination holds either way", "/page?mode=a&mode=b", EDIT_VIEW, "pages", None),
    ("both repeated, neither read", "/page?x=1&x=2", [("X-Other", "1"), ("X-Other", "2")], "pages", None),
]


def head(target: str, lines: list[tuple[str, str]]) -> RequestHead:
    fields = CIMultiDict([("Host", "a.example"), *lines])
    return RequestHead("GET", "http", "a.example", target, CIMultiDictProxy(fields))


@pytest.mark.parametrize(("case", "target", "lines", "rule", "detail"), CASES, ids=[c[0] for c in CASES])
def test_every_reading_of_the_query_is_combined_with_every_reading_of_the_fields(
        case: str, target: str, lines: list[tuple[str, str]], rule: str | None, detail: str | None) -> None:
    plan = PLAN_RULES.plan(head(target, lines))
    assert (plan.rule.name if plan.rule else None) == rule
    assert plan.bypass is (detail is not None)
    if detail is not None:
        assert plan.bypass_detail == detail


def test_the_readings_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A query with several repeated parameters and every kind of ambiguous field is read at
    most 3 x 6 times (first, last and PHP's query; the fields as sent, first, last, and with the
    other spellings first, last and joined) when no reading decides otherwise; 5 x 6 with a ``;``
    in the query (split there, first and last values)."""
    rules = compile_text("""
        rules:
          - name: editor
            match: {query: {a: {regex: "."}, b: {regex: "."}}, header: {X-A: "1", X-B: "1"}}
            bypass: true
    """)
    scans = 0
    scan = RuleSet._scan

    def counted(self: RuleSet, view: object) -> object:
        nonlocal scans
        scans += 1
        return scan(self, view)  # type: ignore[arg-type]

    monkeypatch.setattr(RuleSet, "_scan", counted)
    lines = [("X-A", "0"), ("X-A", "2"), ("X_A", "3"), ("X-B", "0"), ("x_b", "2")]
    plan = rules.plan(head("/p?a=0&a=2&a.=3&b=0&b=2&c.d=1", lines))
    assert not plan.bypass
    assert 1 < scans <= 18
    scans = 0
    assert not rules.plan(head("/p?a=0&a=2&a.=3&b=0&b=2;c=1", lines)).bypass
    assert 18 < scans <= 30
