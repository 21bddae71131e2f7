"""``key: {lowercase_path: true}`` asks the origin for the lower-cased path, so the rules are read on
that path: matched on the client's ``/Account/profile``, a ``bypass`` rule for ``/account/**`` did
not hold while the origin answered ``/account/profile``, stored for everyone under the lower-cased
key (web cache deception: the attacker's ``/ACCOUNT/PROFILE`` was a HIT on the victim's page).
"""

from __future__ import annotations

import textwrap

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.explain import ExplainRequest, explain, explain_trace
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.rules import RuleSet, compile_rule_file
from proxy.yamlsrc import Problems, parse_yaml
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import get, send_raw

RULES = """
    rules:
      - name: personal areas
        match: {path: "/account/**"}
        bypass: true
      - name: docs
        match: {path: "/docs/**"}
        ttl: {200: 1h}
      - name: assets
        match: {path: "/assets/**"}
        ttl: {200: 1d}
        key: {lowercase_path: true}
      - name: pages
        match: {path: "/**", method: GET}
        ttl: {200: 2m}
        key: {lowercase_path: true}
"""


def compiled(text: str = RULES) -> RuleSet:
    problems = Problems()
    root = parse_yaml(textwrap.dedent(text), "t.yaml", problems)
    assert root is not None
    defaults, rules = compile_rule_file(root, problems)
    assert not problems, problems.items
    return RuleSet(defaults, tuple(rules), CacheOptions(), ("t.yaml",))


def head(target: str, *fields: tuple[str, str]) -> RequestHead:
    return RequestHead("GET", "http", "shop.example", target, CIMultiDictProxy(CIMultiDict(fields)))


# (case, target, the deciding rule, bypassed, the rule whose key had the rules read the lower-cased path)
PLANS: list[tuple[str, str, str, bool, str | None]] = [
    ("a lower-case path: the rules read it as it is", "/about", "pages", False, None),
    ("capitals where no other rule cares: the same rule, the same plan", "/About", "pages", False, None),
    ("a bypass rule holds for the lower-cased path the origin gets: bypassed", "/Account/profile",
     "personal areas", True, "pages"),
    ("ALL capitals too", "/ACCOUNT/PROFILE", "personal areas", True, "pages"),
    ("a percent-escaped capital is that capital (the origin decodes it): bypassed", "/%41ccount/profile",
     "personal areas", True, "pages"),
    ("an escaped small letter the rules read decoded already", "/%61ccount/profile", "personal areas", True,
     None),
    ("another lower-casing rule for the lower-cased path: its plan (the key is the same)", "/Assets/a.css",
     "assets", False, "pages"),
    ("a rule that keeps the case for the lower-cased path: bypassed, never decided on two paths",
     "/Docs/intro", "pages", True, "pages"),
    ("the query is not lower-cased", "/Account?Q=1", "pages", False, None),
]


@pytest.mark.parametrize(("case", "target", "rule", "bypass", "lowered_by"), PLANS, ids=[p[0] for p in PLANS])
def test_a_key_that_lower_cases_the_path_has_the_rules_read_the_lower_cased_path(
        case: str, target: str, rule: str, bypass: bool, lowered_by: str | None) -> None:
    plan = compiled().plan(head(target))
    assert plan.rule is not None
    assert (plan.rule.name, plan.bypass) == (rule, bypass)
    assert (plan.lowered_by.name if plan.lowered_by is not None else None) == lowered_by


def test_explain_reads_the_rules_as_the_proxy_does() -> None:
    rules = compiled()
    text = "\n".join(explain(rules, ExplainRequest("http://shop.example/Account/profile"), 0.0))
    assert "RULE-BYPASS:personal areas" in text and "/account/profile" in text
    assert "+ personal areas (t.yaml:3): request conditions hold -> wins" in text
    text = "\n".join(explain(rules, ExplainRequest("http://shop.example/Docs/intro"), 0.0))
    assert "RULE-BYPASS:pages" in text and "'docs' (t.yaml:6) decides instead" in text
    trace = explain_trace(rules, head("/Account/profile"), (), 0.0)
    assert trace["bypass"] and trace["rule"]["name"] == "personal areas"
    assert trace["lowered_by"]["name"] == "pages"


async def test_a_capital_letter_does_not_skip_a_bypass_rule(origin: Origin, make_proxy: MakeProxy) -> None:
    """A case-sensitive origin: only ``/account/profile`` is Alice's page (other spellings: 404)."""
    async def profile(request: web.Request) -> web.Response:
        user = request.cookies.get("sid")
        if user is None:
            return web.Response(status=302, headers={"Location": "/login"})
        return web.Response(text=f"profile of {user}", content_type="text/html")

    origin.route("/account/profile", profile)
    proxy = await make_proxy(rules=RULES)
    lured = await send_raw(proxy, get("/Account/profile", "Cookie: sid=alice"))
    assert lured.x_cache == "BYPASS" and lured.header("Cache-Status") is not None
    assert "RULE-BYPASS:personal areas" in (lured.header("Cache-Status") or "")
    attacker = await send_raw(proxy, get("/ACCOUNT/PROFILE"))
    assert attacker.x_cache == "BYPASS" and b"alice" not in attacker.body
    assert [s.path for s in origin.seen] == ["/Account/profile", "/ACCOUNT/PROFILE"]  # passed as sent


async def test_a_page_with_capitals_is_still_stored_under_the_lower_cased_key(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/about", body=b"about us")
    proxy = await make_proxy(rules=RULES)
    assert (await send_raw(proxy, get("/About"))).x_cache == "MISS"
    assert (await send_raw(proxy, get("/about"))).x_cache == "HIT"
    assert [s.path for s in origin.seen] == ["/about"]
