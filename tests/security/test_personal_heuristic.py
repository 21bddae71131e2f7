"""A personal page cached by heuristic freshness: the origin personalises by cookie, sends
``Last-Modified`` and no ``Cache-Control`` (a common oversight). RFC 9111 §4.2.2 would let a
cache keep it for 10% of its age; shared with the next client, that is the victim's page.

A response to a request with ``Cookie`` or ``Authorization`` gets no heuristic freshness
unless it says ``public`` or a rule gives it a ``ttl``: with a ``Cookie`` it is then not
stored at all (``COOKIE-NO-FRESHNESS``: tests/security/test_cookie_no_lifetime.py); with
``Authorization`` and ``must-revalidate`` (RFC 9111 §3.5) it is stored to be revalidated
before each use, and this origin (which answers every request in full) is asked again.
"""

from __future__ import annotations

import time

import pytest
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy
from tests.harness import Handler, Origin
from tests.security.util import get, send_raw

LAST_MODIFIED = format_http_date(time.time() - 30 * 86400)


def personal(extra: dict[str, str]) -> Handler:
    async def page(request: web.Request) -> web.Response:
        who = request.cookies.get("session") or ("bearer" if "Authorization" in request.headers else "stranger")
        return web.Response(text=f"hello {who}", headers={"Last-Modified": LAST_MODIFIED, **extra})
    return page


@pytest.mark.parametrize("credentials", ["Cookie: session=alice", "Authorization: Bearer alice"])
async def test_heuristic_freshness_never_shares_a_response_to_a_request_with_credentials(
        origin: Origin, make_proxy: MakeProxy, credentials: str) -> None:
    # Authorization is stored at all only with public, s-maxage or must-revalidate (RFC 9111 §3.5)
    origin.route("/me", personal({"Cache-Control": "must-revalidate"}))
    proxy = await make_proxy()
    victim = await send_raw(proxy, get("/me", credentials))
    assert victim.body in (b"hello alice", b"hello bearer")
    attacker = await send_raw(proxy, get("/me"))
    assert attacker.body == b"hello stranger"
    assert origin.count("/me") == 2


async def test_an_anonymous_revalidation_gives_a_personal_page_no_heuristic_freshness(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The origin validates by Last-Modified alone (as static and CMS servers do) and answers
    a request with credentials in full: one anonymous revalidation answered 304 must not make
    the page stored for Alice (``must-revalidate`` lets a shared cache keep a response to
    Authorization: RFC 9111 §3.5) fresh for a day, or Bob gets it without the origin being asked."""
    async def page(request: web.Request) -> web.Response:
        who = request.headers.get("Authorization", "").removeprefix("Bearer ") or None
        fields = {"Last-Modified": LAST_MODIFIED, "Cache-Control": "must-revalidate"}
        if who is None and "If-Modified-Since" in request.headers:
            return web.Response(status=304, headers=fields)
        return web.Response(text=f"hello {who}", headers=fields)
    origin.route("/me", page)
    proxy = await make_proxy()
    assert (await send_raw(proxy, get("/me", "Authorization: Bearer alice"))).body == b"hello alice"
    anonymous = await send_raw(proxy, get("/me"))
    assert anonymous.x_cache == "REVALIDATED" and origin.count("/me") == 2
    bob = await send_raw(proxy, get("/me", "Authorization: Bearer bob"))
    assert (bob.x_cache, bob.body) != ("HIT", b"hello alice")
    assert bob.body == b"hello bob" and origin.count("/me") == 3


async def test_public_or_a_rule_ttl_still_shares_it(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/public", personal({"Cache-Control": "public"}))
    origin.route("/ruled", personal({}))
    proxy = await make_proxy(rules="""
        rules:
          - {name: ruled, match: {path: "/ruled"}, ttl: {200: 1m}}
    """)
    for path in ("/public", "/ruled"):
        await send_raw(proxy, get(path, "Cookie: session=alice"))
        again = await send_raw(proxy, get(path))
        assert (again.x_cache, again.body) == ("HIT", b"hello alice"), path


async def test_without_credentials_the_heuristic_still_applies(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/anon", personal({}))
    proxy = await make_proxy()
    await send_raw(proxy, get("/anon"))
    assert (await send_raw(proxy, get("/anon", "Cookie: session=alice"))).x_cache == "HIT"


def test_explain_says_why_no_heuristic_applies() -> None:
    from proxy.explain import NO_HEURISTIC, ExplainRequest, explain
    from proxy.rules import RuleSet

    req = ExplainRequest("http://shop.example/me", headers=(("Authorization", "Bearer alice"),),
                         response_headers=(("Last-Modified", LAST_MODIFIED), ("Cache-Control", "must-revalidate")))
    text = "\n".join(explain(RuleSet(), req, time.time()))
    assert "stored, fresh for 0s" in text and NO_HEURISTIC in text
    anonymous = "\n".join(explain(RuleSet(), ExplainRequest(req.url, response_headers=req.response_headers),
                                  time.time()))
    assert NO_HEURISTIC not in anonymous and "heuristic: 10%" in anonymous
    cookie = ExplainRequest(req.url, headers=(("Cookie", "session=alice"),),
                            response_headers=(("Last-Modified", LAST_MODIFIED),))
    text = "\n".join(explain(RuleSet(), cookie, time.time()))
    assert ("not stored: COOKIE-NO-FRESHNESS (the request has a Cookie and the response is not public and has "
            "no lifetime above 0 (no max-age, s-maxage or Expires, and no heuristic for a request with a "
            "Cookie)") in text, text
