"""Paths some origins read as another path: a servlet container drops a segment's ``;``
parameters (``/cart;x`` is its ``/cart``), IIS and ASP.NET read ``\\`` as ``/`` and drop a
segment's trailing dots and spaces. A ``bypass`` rule for ``/cart`` did not hold for
``/cart;x``, and such an origin's answer (the victim's cart) was stored for everyone under that
URL (web cache deception, with the shipped ``rules/examples/mixed-app.yaml``). The rules are now
also read on that other path, and a bypass there bypasses (``RuleSet._read_otherwise``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.explain import ExplainRequest, explain
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.rules import RuleSet, compile_rule_file
from proxy.yamlsrc import Problems, parse_yaml
from tests.conftest import MakeProxy
from tests.harness import Origin

MIXED_APP = Path(__file__).resolve().parents[2] / "rules" / "examples" / "mixed-app.yaml"


def compiled(text: str) -> RuleSet:
    problems = Problems()
    root = parse_yaml(text, "t.yaml", problems)
    assert root is not None
    defaults, rules = compile_rule_file(root, problems)
    assert not problems, problems.items
    return RuleSet(defaults, tuple(rules), CacheOptions(), ("t.yaml",))


def mixed_app() -> RuleSet:
    return compiled(MIXED_APP.read_text())


def head(target: str) -> RequestHead:
    return RequestHead("GET", "http", "shop.example", target, CIMultiDictProxy(CIMultiDict()))


# (case, target, the deciding rule, bypassed, the other reading that decided it)
PLANS: list[tuple[str, str, str, bool, str | None]] = [
    ("a plain personal path: its own rule bypasses", "/cart", "personal areas", True, None),
    ("a ';' parameter on it: a servlet's /cart", "/cart;x", "anonymous pages", True, "/cart"),
    ("escaped ';' too", "/cart%3Bx", "anonymous pages", True, "/cart"),
    ("a parameter on an inner segment", "/account;jsessionid=1/profile", "anonymous pages", True,
     "/account/profile"),
    ("Tomcat's '..;' climbs out of another folder", "/static/..;/admin", "static assets", True, "/admin"),
    ("a backslash is IIS's slash", "/x%5C..%5Ccheckout", "anonymous pages", True, "/checkout"),
    ("a trailing dot, IIS's /cart", "/cart.", "anonymous pages", True, "/cart"),
    ("a trailing space, escaped", "/cart%20", "anonymous pages", True, "/cart"),
    ("a NUL cuts the segment", "/cart%00.css", "anonymous pages", True, "/cart"),
    ("a parameter where the other reading decides the same: not bypassed", "/about;x", "anonymous pages",
     False, None),
    ("a parameter in the query is not the path's", "/about?a=1;cart", "anonymous pages", False, None),
    ("a dotted file name is no trailing dot", "/about.html", "anonymous pages", False, None),
]


@pytest.mark.parametrize(("case", "target", "rule", "bypass", "read_as"), PLANS, ids=[p[0] for p in PLANS])
def test_the_rules_are_read_on_the_path_some_origins_act_on(
        case: str, target: str, rule: str, bypass: bool, read_as: str | None) -> None:
    plan = mixed_app().plan(head(target))
    assert plan.rule is not None
    assert (plan.rule.name, plan.bypass, plan.read_as) == (rule, bypass, read_as)
    if read_as is not None:
        assert plan.bypass_detail == "RULE-BYPASS:personal areas"


def test_a_no_store_rule_on_the_other_reading_bypasses_too() -> None:
    rules = compiled("""
rules:
  - {name: private api, match: {path: "/api/me/**"}, no_store: true}
  - {name: everything, match: {path: "/**"}, ttl: {200: 1h}}
""")
    plan = rules.plan(head("/api/me;x/orders"))
    assert (plan.bypass, plan.read_as, plan.bypass_detail) == (True, "/api/me/orders", "RULE-BYPASS:private api")
    assert not rules.plan(head("/api/you;x/orders")).bypass


def test_explain_says_which_reading_bypassed_it() -> None:
    lines = explain(mixed_app(), ExplainRequest("http://shop.example/cart;x"), 0.0)
    text = "\n".join(lines)
    assert "BYPASS" in text and "RULE-BYPASS:personal areas" in text
    assert "some origins read this path as /cart" in text


async def test_a_servlet_s_cart_behind_a_parameter_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The reviewer's case with the shipped example: the victim's /cart;r, then the attacker's."""
    async def cart(request: web.Request) -> web.Response:
        return web.Response(text=f"cart of {request.cookies.get('cart_id', 'nobody')}",
                            content_type="text/html")

    origin.route("/cart;r", cart)  # (what a servlet container routes to /cart)
    proxy = await make_proxy(rules=MIXED_APP.read_text())
    victim = await proxy.get("/cart;r", headers={"Cookie": "cart_id=VICTIM"})
    attacker = await proxy.get("/cart;r")
    assert victim.x_cache == "BYPASS" and "RULE-BYPASS" in victim.cache_status
    assert (attacker.x_cache, attacker.body) == ("BYPASS", b"cart of nobody")
