"""An origin's 304 with Set-Cookie: the cookie goes to the client whose request the 304
answered, never into the store, never to anyone else.

A 304 never adds its Set-Cookie to the stored response (it would be replayed to every user),
but the client whose own request made the revalidation was not given it either: its 200
REVALIDATED (or its 304, to its own If-None-Match) was made from the freshened stored head
alone, and a session's refresh or a logout the origin sent on a 304 was silently lost. The
clients coalesced on that revalidation, and those a background refresh answers, did not ask
for it: they get none.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin, Proxy, Reply
from tests.security.misbehaving import flight_with
from tests.test_coalescing import wait_until

COOKIE_RULES = """
rules:
  - name: cookies allowed
    match: {path: "/sc/**"}
    allow_set_cookie: true
  - name: cookies removed
    match: {path: "/rm/**"}
    response_headers: {remove: [Set-Cookie]}
  - name: shared downstream
    match: {path: "/cdn/**"}
    response_headers: {add: {Cache-Control: "public, max-age=600"}}
"""
INM = {"If-None-Match": '"k1"'}


class Page:
    """A page that lives one second (``max-age=1``, ETag "k1") and whose 304 lives 300 and
    renews the session cookie; its 200 sets one too when ``fill_cookie``. A 304 waits for
    ``release`` once ``hold`` is set, so others can join its revalidation."""

    def __init__(self, clock: Clock, fill_cookie: bool, extra: str = "") -> None:
        self.clock, self.fill_cookie, self.extra = clock, fill_cookie, extra
        self.fills = self.validations = 0
        self.hold = False
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fields = {"Date": format_http_date(self.clock()), "ETag": '"k1"'}
        if request.headers.get("If-None-Match") == '"k1"':
            self.validations += 1
            if self.hold:
                await self.release.wait()
            return web.Response(status=304, headers=fields | {
                "Cache-Control": "max-age=300" + self.extra,
                "Set-Cookie": f"session=renewed-{self.validations}; Path=/"})
        self.fills += 1
        cookie = {"Set-Cookie": f"session=first-{self.fills}; Path=/"} if self.fill_cookie else {}
        return web.Response(body=b"page", headers=fields | cookie | {"Cache-Control": "max-age=1" + self.extra})


def cookies(reply: Reply) -> list[str]:
    return reply.headers.getall("Set-Cookie", [])


async def stale_page(origin: Origin, make_proxy: MakeProxy, clock: Clock, path: str,
                     fill_cookie: bool, extra: str = "") -> tuple[Proxy, Page]:
    page = Page(clock, fill_cookie, extra)
    origin.route(path, page.handle)
    proxy = await clocked(make_proxy, clock, rules=COOKIE_RULES)
    fill = await proxy.get(path)
    assert (fill.status, fill.x_cache) == (200, "MISS")
    assert cookies(fill) == (["session=first-1; Path=/"] if fill_cookie else [])
    assert cookies(await proxy.get(path)) == []  # a hit: stored without it
    clock.advance(5)
    return proxy, page


@pytest.mark.parametrize(("path", "fill_cookie"), [("/sc/p", True), ("/plain", False)],
                         ids=["allow_set_cookie", "no rule, a 304 alone sets it"])
@pytest.mark.parametrize("conditional", [False, True], ids=["plain GET", "If-None-Match"])
async def test_the_client_whose_revalidation_got_a_304_with_set_cookie_gets_the_cookie_and_no_one_else(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, path: str, fill_cookie: bool,
        conditional: bool) -> None:
    """Its 200 REVALIDATED (or its 304 to its own If-None-Match) carries the 304's Set-Cookie;
    a client coalesced on the same revalidation gets none, and neither does the next hit."""
    proxy, page = await stale_page(origin, make_proxy, clock, path, fill_cookie)
    headers = INM if conditional else {}
    page.hold = True
    leader = asyncio.ensure_future(proxy.get(path, headers=headers))
    await wait_until(lambda: page.validations == 1)
    follower = asyncio.ensure_future(proxy.get(path, headers=headers))
    await flight_with(proxy, 1)  # it joins the revalidation in flight
    page.release.set()
    first, second = await leader, await follower
    status = 304 if conditional else 200
    assert (first.status, first.x_cache) == (status, "REVALIDATED")
    assert cookies(first) == ["session=renewed-1; Path=/"]
    assert (second.status, second.x_cache) == (status, "REVALIDATED")
    assert "collapsed" in second.cache_status and cookies(second) == []
    assert (page.fills, page.validations) == (1, 1)
    hit = await proxy.get(path)
    assert (hit.status, hit.x_cache, cookies(hit)) == (200, "HIT", [])
    assert cookies(await proxy.get(path, headers=INM)) == []


@pytest.mark.parametrize("conditional", [False, True], ids=["plain GET", "If-None-Match"])
async def test_a_rule_removing_set_cookie_removes_the_304s_too(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, conditional: bool) -> None:
    proxy, page = await stale_page(origin, make_proxy, clock, "/rm/p", False)
    reply = await proxy.get("/rm/p", headers=INM if conditional else {})
    assert (reply.status, reply.x_cache) == (304 if conditional else 200, "REVALIDATED")
    assert cookies(reply) == [] and page.validations == 1


async def test_a_background_refresh_answered_304_with_set_cookie_gives_it_to_no_one(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """stale-while-revalidate: the client served the stale response did not wait for the
    refresh, and no later client made it."""
    proxy, page = await stale_page(origin, make_proxy, clock, "/sc/swr", True, ", stale-while-revalidate=60")
    stale = await proxy.get("/sc/swr")
    assert (stale.x_cache, cookies(stale)) == ("UPDATING", [])
    await wait_until(lambda: page.validations == 1)
    await asyncio.sleep(0.2)  # (the refresh freshens the stored response)
    hit = await proxy.get("/sc/swr")
    assert (hit.x_cache, cookies(hit)) == ("HIT", [])


async def test_a_rules_caching_fields_are_withheld_from_the_reply_that_carries_the_304s_cookie(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """The cookie is part of the reply the rules' edits see: a reply that sets one is personal,
    so an edit telling caches after this one to share it is withheld (``reply_edits``), as on
    a fill's 200 with its cookie; the next hit, without it, gets the edit."""
    proxy, _ = await stale_page(origin, make_proxy, clock, "/cdn/p", False)
    reply = await proxy.get("/cdn/p")
    assert (reply.x_cache, cookies(reply)) == ("REVALIDATED", ["session=renewed-1; Path=/"])
    assert reply.headers["Cache-Control"] == "max-age=300"
    hit = await proxy.get("/cdn/p")
    assert (hit.x_cache, cookies(hit), hit.headers["Cache-Control"]) == ("HIT", [], "public, max-age=600")
