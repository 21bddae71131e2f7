"""Paths some origins read as another path: a servlet container drops a segment's ``;``
parameters (``/cart;x`` is its ``/cart``), IIS and ASP.NET read ``\\`` as ``/`` and drop a
segment's trailing dots and spaces. A ``bypass`` rule for ``/cart`` did not hold for
``/cart;x``, and such an origin's answer (the victim's cart) was stored for everyone under that
URL (web cache deception, with the shipped ``rules/examples/mixed-app.yaml``). The rules are now
also read on that other path, and a bypass there bypasses (``RuleSet._read_otherwise``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.explain import ExplainRequest, explain
from proxy.policy.messages import CacheOptions, RequestHead
from proxy.rules import RuleSet, compile_rule_file
from proxy.yamlsrc import Problems, parse_yaml
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, start_proxy
from tests.security.util import get, send_raw

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
    ("a trailing dot before a query: IIS's /cart all the same", "/cart.?a=1", "anonymous pages", True, "/cart"),
    ("a trailing space before a query", "/cart%20?a=1", "anonymous pages", True, "/cart"),
    ("a dotted file name before a query is no trailing dot", "/about.html?a=1", "anonymous pages", False, None),
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


# README.md's example rules: "static assets" (override_origin) before "logged-in users skip the cache".
README_RULES = """
rules:
  - name: static assets
    match: {path: "/static/**", method: [GET, HEAD]}
    ttl: {200: 7d, 404: 1m}
    override_origin: true
  - name: logged-in users skip the cache
    match: {cookie: {session: present}}
    bypass: true
  - name: search results keyed by the params that matter
    match: {path: "/search"}
    key: {query: {include: [q, page], sort: true}, headers: [Accept-Language]}
"""
JSON_API = Path(__file__).resolve().parents[2] / "rules" / "examples" / "json-api.yaml"
LURE = "/account;%2f%2e%2e%2fstatic%2fpage.html"
API_LURE = "/api/auth/me;%2f%2e%2e%2f%2e%2e%2fv1%2fproducts%2fx"

# (case, rules, target, cookie, the deciding rule, Cache-Status detail (None: not bypassed), read as)
ESCAPED_PLANS: list[tuple[str, str, str, str, str | None, str | None, str | None]] = [
    ("the victim: a servlet's /account, where the session bypasses", README_RULES, LURE, "session=V",
     "static assets", "RULE-BYPASS:logged-in users skip the cache", "/account"),
    ("the attacker: /account is no static asset there", README_RULES, LURE, "",
     "static assets", "AMBIGUOUS-PATH", "/account"),
    ("a static path reads the same everywhere", README_RULES, "/static/page.html", "", "static assets", None, None),
    ("a raw router's /static/..%2Fsearch is the static rule, not the search's key", README_RULES,
     "/static/..%2Fsearch", "", "search results keyed by the params that matter", "AMBIGUOUS-PATH",
     "/static/..%2Fsearch"),
    ("%2e%2e is no dot segment to a raw router", README_RULES, "/static/%2e%2e/search", "",
     "search results keyed by the params that matter", "AMBIGUOUS-PATH", "/static/%2e%2e/search"),
    ("...nor before a query", README_RULES, "/static/%2e%2e/search?a=1", "",
     "search results keyed by the params that matter", "AMBIGUOUS-PATH", "/static/%2e%2e/search"),
    ("json-api: the auth endpoints pass on the servlet's reading", JSON_API.read_text(), API_LURE, "",
     "product catalogue", "RULE-BYPASS:auth endpoints pass", "/api/auth/me"),
    ("json-api: a product read the same everywhere", JSON_API.read_text(), "/api/v1/products/x", "",
     "product catalogue", None, None),
]


@pytest.mark.parametrize(("case", "rules", "target", "cookie", "rule", "detail", "read_as"), ESCAPED_PLANS,
                         ids=[p[0] for p in ESCAPED_PLANS])
def test_escaped_slashes_and_dots_are_read_as_each_origin_reads_them(
        case: str, rules: str, target: str, cookie: str, rule: str, detail: str | None,
        read_as: str | None) -> None:
    request = RequestHead("GET", "http", "shop.example", target,
                          CIMultiDictProxy(CIMultiDict({"Cookie": cookie} if cookie else {})))
    plan = compiled(rules).plan(request)
    assert plan.rule is not None
    assert (plan.rule.name, plan.bypass, plan.read_as) == (rule, detail is not None, read_as)
    if detail is not None:
        assert plan.bypass_detail == detail


def test_explain_says_a_path_reads_ambiguously() -> None:
    text = "\n".join(explain(compiled(README_RULES), ExplainRequest(f"http://shop.example{LURE}"), 0.0))
    assert "Cache-Status detail AMBIGUOUS-PATH" in text and "read this path as /account" in text, text


class ServletOrigin(Origin):
    """An origin that routes as Tomcat and Spring do: each segment's ``;`` parameters dropped up
    to the next raw ``/``, then the path decoded."""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path.partition("?")[0]
        path = unquote("/".join(s.split(";", 1)[0] for s in raw.split("/")))
        self.counts[path] += 1
        handler = self.routes.get(path)
        if handler is None:
            return web.Response(status=404, text="no such route")
        return await handler(request)


async def account(request: web.Request) -> web.Response:
    """The logged-in user's page, with nothing said about caching (as most pages are)."""
    return web.Response(text=f"<html>account of {request.cookies.get('session', 'nobody')}</html>",
                        content_type="text/html")


@pytest.fixture
async def servlet_origin() -> AsyncIterator[ServletOrigin]:
    o = ServletOrigin()
    await o.start()
    yield o
    await o.stop()


async def proxy_before(origin: Origin, directory: Path, rules: str) -> Proxy:
    return await start_proxy(str(directory), origin.url, "", rules)


@pytest.mark.parametrize(("rules", "lure", "page"), [
    (README_RULES, LURE, "/account"),
    (JSON_API.read_text(), API_LURE, "/api/auth/me"),
], ids=["README's static rule", "json-api's catalogue"])
async def test_a_victims_page_behind_escaped_slashes_is_never_served_to_the_attacker(
        servlet_origin: ServletOrigin, tmp_path: Path, rules: str, lure: str, page: str) -> None:
    """The reviewer's case: the victim is lured to the URL (their page, to the servlet), then the
    attacker asks for it without a cookie. It was stored for everyone (7 days, or 5 minutes)."""
    servlet_origin.route(page, account)
    proxy = await proxy_before(servlet_origin, tmp_path, rules)
    try:
        victim = await send_raw(proxy, get(lure, "Cookie: session=VICTIM"))
        assert victim.body == b"<html>account of VICTIM</html>"
        attacker = await send_raw(proxy, get(lure))
        assert attacker.body == b"<html>account of nobody</html>", attacker.header("Cache-Status")
        assert attacker.x_cache == "BYPASS"
        assert servlet_origin.count(page) == 2
    finally:
        await proxy.session.close()
        await proxy.close()


async def test_the_deception_guard_reads_the_servlets_path_too(
        servlet_origin: ServletOrigin, tmp_path: Path) -> None:
    """Every reading falls to one forcing rule, so the plans agree; the guard then judges each
    reading's extension: the servlet's ``/account`` has none, so the page is not stored."""
    servlet_origin.route("/account", account)
    proxy = await proxy_before(servlet_origin, tmp_path, """
rules:
  - {name: everything for a day, match: {path: "/**"}, ttl: {200: 1d}, override_origin: true}
""")
    try:
        lure = "/account;%2f%2e%2e%2fpage.html"
        victim = await send_raw(proxy, get(lure, "Cookie: session=VICTIM"))
        assert "detail=DECEPTION-GUARD" in (victim.header("Cache-Status") or "")
        attacker = await send_raw(proxy, get(lure))
        assert (attacker.x_cache, attacker.body) == ("MISS", b"<html>account of nobody</html>")
    finally:
        await proxy.session.close()
        await proxy.close()
