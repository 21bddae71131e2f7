"""Web cache deception: the victim is lured to a static-looking URL that the origin answers
with their personal page; a rule caches that URL by force; the attacker fetches it.

The origin here is the careless kind: it maps ``/account.css``, ``/account%2ecss``,
``/static/profile.zzz`` and ``/static/..;/account`` to the logged-in user's page (as
frameworks that ignore suffixes or path parameters do) and says nothing about caching.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from aiohttp import web

from proxy.explain import ExplainRequest, explain
from proxy.policy.messages import CacheOptions
from proxy.rules import load_rules
from proxy.yamlsrc import Problems
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import get, send_raw

RULES = """
rules:
  - name: stylesheets
    match: {path: "regex:\\\\.css$"}
    ttl: {200: 1h}
    override_origin: true
  - name: static
    match: {path: "/static/**"}
    ttl: {200: 1h}
    override_origin: true
  - name: plain ttl
    match: {path: "/assets/**"}
    ttl: {200: 1h}
    deception_guard: true
  - name: guarded, the origin decides
    match: {path: "/pages/**"}
    deception_guard: true
"""


async def account(request: web.Request) -> web.Response:
    user = request.cookies.get("session", "stranger")
    return web.Response(text=f"<h1>account of {user}</h1>", content_type="text/html")


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(text="body{}", content_type="text/css")


def careless_origin(origin: Origin) -> None:
    # aiohttp's router sees the decoded path: /account%2ecss arrives as /account.css
    for path in ("/account.css", "/static/profile.zzz", "/static/..;/account", "/static/account",
                 "/assets/account.zzz", "/assets/account"):
        origin.route(path, account)
    origin.route("/static/site.css", stylesheet)
    origin.route("/site.css", stylesheet)


LURES = ["/account%2ecss", "/account%2Ecss", "/static/profile.zzz",
         "/static/account", "/assets/account.zzz", "/assets/account"]


@pytest.mark.parametrize("lure", LURES)
async def test_a_personal_page_behind_a_static_looking_url_is_not_stored(
        origin: Origin, make_proxy: MakeProxy, lure: str) -> None:
    careless_origin(origin)
    proxy = await make_proxy(rules=RULES)
    victim = await send_raw(proxy, get(lure, "Cookie: session=alice"))
    assert victim.body == b"<h1>account of alice</h1>"
    assert "detail=DECEPTION-GUARD" in (victim.header("Cache-Status") or "")
    attacker = await send_raw(proxy, get(lure))
    assert attacker.body == b"<h1>account of stranger</h1>", lure
    assert attacker.x_cache == "MISS"


async def test_a_path_a_servlet_reads_as_another_path_is_not_looked_up_or_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """``/static/..;/account`` is the rules' ``/static/..;/account`` but a servlet's ``/account``,
    where no rule caches by force: the plans differ, so it is neither looked up nor stored."""
    careless_origin(origin)
    proxy = await make_proxy(rules=RULES)
    victim = await send_raw(proxy, get("/static/..;/account", "Cookie: session=alice"))
    assert victim.body == b"<h1>account of alice</h1>"
    assert "detail=AMBIGUOUS-PATH" in (victim.header("Cache-Status") or "")
    attacker = await send_raw(proxy, get("/static/..;/account"))
    assert (attacker.x_cache, attacker.body) == ("BYPASS", b"<h1>account of stranger</h1>")


@pytest.mark.parametrize("path", ["/static/site.css", "/site.css"])
async def test_a_response_whose_type_fits_its_extension_is_still_stored(
        origin: Origin, make_proxy: MakeProxy, path: str) -> None:
    careless_origin(origin)
    proxy = await make_proxy(rules=RULES)
    await send_raw(proxy, get(path))
    assert (await send_raw(proxy, get(path))).x_cache == "HIT"


async def test_without_a_forced_ttl_a_path_without_extension_proves_nothing(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The origin itself said the page may be shared: the guard only refuses a mismatch."""
    origin.route("/pages/about", body=b"<h1>about</h1>", headers={
        "Content-Type": "text/html", "Cache-Control": "public, max-age=60"})
    origin.route("/pages/x.css", body=b"<h1>x</h1>", headers={
        "Content-Type": "text/html", "Cache-Control": "public, max-age=60"})
    proxy = await make_proxy(rules=RULES)
    await send_raw(proxy, get("/pages/about"))
    assert (await send_raw(proxy, get("/pages/about"))).x_cache == "HIT"
    refused = await send_raw(proxy, get("/pages/x%2ecss"))
    assert "detail=DECEPTION-GUARD" in (refused.header("Cache-Status") or "")


def test_explain_gives_the_deception_guard_verdict_the_proxy_gives(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(RULES))
    problems = Problems()
    rules = load_rules([(str(path), "rules.yaml")], CacheOptions(), problems)
    assert not problems
    html = (("Content-Type", "text/html"),)
    for lure in LURES:
        text = "\n".join(explain(rules, ExplainRequest(f"http://shop.example{lure}", response_headers=html), 0.0))
        assert "not stored: DECEPTION-GUARD" in text, (lure, text)
    text = "\n".join(explain(rules, ExplainRequest("http://shop.example/static/..;/account",
                                                   response_headers=html), 0.0))
    assert "detail AMBIGUOUS-PATH" in text and "read this path as /account" in text, text
    css = (("Content-Type", "text/css"),)
    text = "\n".join(explain(rules, ExplainRequest("http://shop.example/static/site.css", response_headers=css), 0.0))
    assert "stored, fresh for 1h" in text, text
