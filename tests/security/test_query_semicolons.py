"""A query some origins split at ``;`` as well as ``&``: ``?x=1;edit_mode=1``.

Rack 2 (``Rack::Utils::DEFAULT_SEP = /[&;] */``, Rails before Rack 3), Go before 1.17 and
Python's ``parse_qsl`` before 3.9.2 read ``;`` as a separator; aiohttp, Rack 3, PHP and the rules
read only ``&``. A ``bypass`` rule on ``edit_mode: "1"`` did not hold for
``?x=1;edit_mode=1`` while a Rack 2 origin answered its editor form, stored under that URL and
served to the next client. Now a query with a ``;`` is also read split there (first values and
last values), and when that decides otherwise the request is neither looked up nor stored
(``AMBIGUOUS-QUERY:<name>``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.rules.test_compile import compile_text
from tests.security.util import assert_plan, get, send_raw

RULES = """
defaults:
  ttl: {200: 5m}
rules:
  - name: the editor is never cached
    match: {path: /page, query: {edit_mode: "1"}}
    bypass: true
"""


async def rack2_page(request: web.Request) -> web.Response:
    """An origin reading the query as Rack 2 does: split at ``&`` or ``;`` (and the spaces after
    it), names and values unescaped, the last value winning."""
    params = {}
    for pair in re.split(r"[&;] *", request.rel_url.raw_query_string):
        name, _, value = pair.partition("=")
        if name:
            params[unquote_plus(name)] = unquote_plus(value)
    if params.get("edit_mode") == "1":
        return web.Response(text="editor form, token for " + request.headers.get("X-Session", "?"))
    return web.Response(text="public page")


@pytest.mark.parametrize("query", ["x=1;edit_mode=1", "edit_mode=0;edit_mode=1", "x=1&y=2;edit_mode=1",
                                   "x=1;edit%5Fmode=1"])
async def test_a_parameter_only_a_semicolon_reading_sees_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy, query: str) -> None:
    origin.route("/page", rack2_page)
    proxy = await make_proxy(rules=RULES)
    for who in ("mallory", "alice"):
        reply = await send_raw(proxy, get("/page?" + query, "X-Session: " + who))
        assert reply.body == b"editor form, token for " + who.encode()
        assert reply.x_cache == "BYPASS", reply.header("Cache-Status")
        assert "AMBIGUOUS-QUERY:edit_mode" in (reply.header("Cache-Status") or "")


async def test_a_semicolon_no_rule_reading_cares_about_is_cached_as_usual(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", rack2_page)
    proxy = await make_proxy(rules=RULES)
    for _ in range(2):
        reply = await send_raw(proxy, get("/page?a=1;b=2&edit_mode=0"))
        assert reply.body == b"public page"
    assert reply.x_cache == "HIT"


PLAN_RULES = compile_text("""
    rules:
      - name: editor
        match: {query: {edit_mode: "1"}}
        bypass: true
      - name: first mode
        match: {query: {mode: "edit"}}
        bypass: true
      - name: pages
        match: {path: "/page"}
        ttl: {200: 1m}
""")

# (case, target, the plan's rule name, its bypass detail or None)
CASES: list[tuple[str, str, str | None, str | None]] = [
    ("no semicolon", "/page?x=1&edit_mode=0", "pages", None),
    ("after a semicolon", "/page?x=1;edit_mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("a space after it is Rack's separator too", "/page?x=1; edit_mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("the last value after one (Rack 2)", "/page?edit_mode=0;edit_mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("the first value before one (Go before 1.17)", "/page?mode=edit;x&mode=view", "pages",
     "AMBIGUOUS-QUERY:mode"),
    ("an array after one (Rack)", "/page?x=1;edit_mode[]=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("split, no reading holds", "/page?x=1;edit_mode=0", "pages", None),
    ("a semicolon in a value no rule reads", "/page?q=a;b", "pages", None),
    ("the rule's own reading holds: its bypass stands", "/page?edit_mode=1&x=1;y=2", "editor",
     "RULE-BYPASS:editor"),
]


@pytest.mark.parametrize(("case", "target", "rule", "detail"), CASES, ids=[c[0] for c in CASES])
def test_the_rules_read_a_query_split_at_semicolons_too(
        case: str, target: str, rule: str | None, detail: str | None) -> None:
    assert_plan(PLAN_RULES, target, [], rule, detail)
