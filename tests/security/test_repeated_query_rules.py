"""A query parameter a rule compares sent twice: the rules and the origin must not part.

A ``query:`` value condition reads a parameter's first value (as aiohttp, Go and Flask do), PHP,
Rails and Django its last. With a ``bypass`` rule on ``mode: {equals: edit}``,
``?mode=view&mode=edit`` read ``view`` to the rules (no bypass) while such an origin answered its
edit form (a session's CSRF token), stored under that URL for whoever asked for it next. Now the
rules are read with each such parameter's last value too, and when the outcome differs the
request is neither looked up nor stored (``AMBIGUOUS-QUERY:<name>``).
"""

from __future__ import annotations

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
  - name: editing skips the cache
    match: {query: {mode: {equals: edit}}}
    bypass: true
"""


async def page(request: web.Request) -> web.Response:
    modes = request.query.getall("mode", [])
    if modes and modes[-1] == "edit":  # the last value, as PHP, Rails and Django read it
        return web.Response(text="edit form, token for " + request.headers.get("X-Session", "?"))
    return web.Response(text="public page")


async def test_a_parameter_sent_twice_a_bypass_rule_reads_is_never_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", page)
    proxy = await make_proxy(rules=RULES)
    victim = await send_raw(proxy, get("/page?mode=view&mode=edit", "X-Session: alice"))
    assert victim.body == b"edit form, token for alice"
    assert victim.x_cache == "BYPASS", victim.header("Cache-Status")
    assert "AMBIGUOUS-QUERY:mode" in (victim.header("Cache-Status") or "")
    attacker = await send_raw(proxy, get("/page?mode=view&mode=edit", "X-Session: mallory"))
    assert attacker.body == b"edit form, token for mallory"
    assert attacker.x_cache == "BYPASS"
    for _ in range(2):
        plain = await send_raw(proxy, get("/page?mode=view&mode=view"))
        assert plain.body == b"public page"
    assert plain.x_cache == "HIT"


PLAN_RULES = compile_text("""
    rules:
      - name: edit
        match: {query: {mode: {equals: edit}}}
        bypass: true
      - name: articles
        match: {path: /article, query: {id: present}}
        key: {query: {include: [id, mode], sort: true}}
""")

CASES: list[tuple[str, str, str | None, str | None]] = [
    ("once", "/a?mode=edit", "edit", "RULE-BYPASS:edit"),
    ("twice, the last holds", "/a?mode=view&mode=edit", None, "AMBIGUOUS-QUERY:mode"),
    ("twice, the first holds: the rule's bypass stands", "/a?mode=edit&mode=view", "edit", "RULE-BYPASS:edit"),
    ("twice, the same value", "/a?mode=view&mode=view", None, None),
    ("twice, no value holds", "/a?mode=a&mode=b", None, None),
    ("escaped", "/a?mode=view&mode=%65dit", None, "AMBIGUOUS-QUERY:mode"),
    ("another parameter twice", "/a?x=1&x=2&mode=view", None, None),
    ("present does not depend on the value", "/article?id=1&id=2", "articles", None),
    ("the last value picks another rule", "/article?id=1&mode=view&mode=edit", "articles",
     "AMBIGUOUS-QUERY:mode"),
]


@pytest.mark.parametrize(("case", "target", "rule", "detail"), CASES, ids=[c[0] for c in CASES])
def test_the_rules_read_a_repeated_parameter_first_and_last(
        case: str, target: str, rule: str | None, detail: str | None) -> None:
    assert_plan(PLAN_RULES, target, [], rule, detail)
