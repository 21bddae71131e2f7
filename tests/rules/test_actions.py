"""Every rule action through the running proxy: a real origin, cachegate in front, a real disk cache."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from tests.harness import Origin, Proxy, Reply
from tests.rules.util import settle, shift_clock, ttl

MakeProxy = Callable[..., Awaitable[Proxy]]


async def twice(proxy: Proxy, path: str, **kwargs: object) -> tuple[str, str]:
    first = await proxy.get(path, **kwargs)  # type: ignore[arg-type]
    second = await proxy.get(path, **kwargs)  # type: ignore[arg-type]
    return first.x_cache, second.x_cache


# -- ttl ------------------------------------------------------------------------------------


async def test_rule_ttl_is_used_only_when_the_origin_gives_no_freshness(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: site
            match: {path: "/**"}
            ttl: {200: 1h, 404: 2m, 500: 10s}
    """)
    origin.route("/none", body=b"plain")
    origin.route("/fresh", body=b"fresh", headers={"Cache-Control": "max-age=30"})
    origin.route("/gone", status=404, body=b"nope")
    origin.route("/teapot", status=418, body=b"tea")
    origin.route("/error", status=500, body=b"boom")
    assert await twice(proxy, "/none") == ("MISS", "HIT")
    assert 3590 <= ttl(await proxy.get("/none")) <= 3600
    assert await twice(proxy, "/fresh") == ("MISS", "HIT")
    assert ttl(await proxy.get("/fresh")) <= 30  # the origin's max-age wins over the rule
    assert await twice(proxy, "/gone") == ("MISS", "HIT")
    assert 110 <= ttl(await proxy.get("/gone")) <= 120
    assert await twice(proxy, "/error") == ("MISS", "HIT")
    assert await twice(proxy, "/teapot") == ("MISS", "MISS")  # not in the table, no default
    assert origin.count("/teapot") == 2


async def test_ttl_default_covers_statuses_not_listed_but_no_unnamed_error(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: all, match: {path: "/**"}, ttl: {200: 1h, default: 30s}}
    """)
    origin.route("/moved", status=307, body=b"elsewhere", headers={"Location": "/x"})
    origin.route("/gone", status=410, body=b"gone")
    origin.route("/teapot", status=418, body=b"tea")
    assert await twice(proxy, "/moved") == ("MISS", "HIT")
    assert 20 <= ttl(await proxy.get("/moved")) <= 30
    assert await twice(proxy, "/gone") == ("MISS", "HIT")  # 410 is heuristically cacheable
    # An error status is stored only when the table names it (a CPDoS guard: tests/security).
    assert await twice(proxy, "/teapot") == ("MISS", "MISS")


async def test_defaults_ttl_applies_to_requests_no_rule_matches(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        defaults: {ttl: {200: 5m}}
        rules:
          - {name: api, match: {path: "/api/**"}, ttl: {200: 10s}}
    """)
    origin.route("/page", body=b"p")
    origin.route("/api/x", body=b"x")
    await twice(proxy, "/page")
    await twice(proxy, "/api/x")
    assert 290 <= ttl(await proxy.get("/page")) <= 300
    assert ttl(await proxy.get("/api/x")) <= 10  # the rule's table replaces the defaults'


# -- override_origin ----------------------------------------------------------------------------


async def test_override_origin_replaces_the_origins_freshness_but_never_its_privacy(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: static
            match: {path: "/static/**"}
            ttl: {200: 1h}
            override_origin: true
    """)
    origin.route("/static/short.js", body=b"s", headers={
        "Cache-Control": "max-age=5, must-revalidate", "Content-Type": "text/javascript"})
    origin.route("/static/nocache.js", body=b"n", headers={
        "Cache-Control": "no-cache", "Content-Type": "text/javascript"})
    origin.route("/static/private.js", body=b"p", headers={
        "Cache-Control": "private, max-age=60", "Content-Type": "text/javascript"})
    origin.route("/static/cookie.js", body=b"c", headers={
        "Set-Cookie": "id=1", "Content-Type": "text/javascript"})
    assert await twice(proxy, "/static/short.js") == ("MISS", "HIT")
    assert ttl(await proxy.get("/static/short.js")) > 3500
    assert await twice(proxy, "/static/nocache.js") == ("MISS", "HIT")
    private = await proxy.get("/static/private.js")
    assert (private.x_cache, (await proxy.get("/static/private.js")).x_cache) == ("MISS", "MISS")
    assert "detail=PRIVATE" in private.cache_status
    cookie = await proxy.get("/static/cookie.js")
    assert "detail=SET-COOKIE" in cookie.cache_status
    assert origin.count("/static/cookie.js") == 1 and (await proxy.get("/static/cookie.js")).x_cache == "MISS"


async def test_override_origin_leaves_the_statuses_its_ttl_does_not_name_to_the_origin(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The rule's ttl names 404 only: a 200's no-cache was dropped all the same (an hour of hits
    never revalidated), and its must-revalidate too (served stale when the origin failed)."""
    proxy = await make_proxy(rules="""
        rules:
          - name: static
            match: {path: "/static/**"}
            ttl: {404: 1m}
            override_origin: true
            stale_if_error: 1h
    """)
    origin.route("/static/nocache.js", body=b"n", headers={
        "Cache-Control": "no-cache, max-age=3600", "ETag": '"n1"', "Content-Type": "text/javascript"})
    first, second = await twice(proxy, "/static/nocache.js")
    assert (first, second) != ("MISS", "HIT"), (first, second)
    assert origin.count("/static/nocache.js") == 2  # revalidated on its second use
    origin.route("/static/strict.js", body=b"s", headers={
        "Cache-Control": "max-age=1, must-revalidate", "Content-Type": "text/javascript"})
    assert (await proxy.get("/static/strict.js")).x_cache == "MISS"
    await settle(proxy)
    shift_clock(proxy, 5)  # its max-age runs out
    origin.route("/static/strict.js", status=503, body=b"down")
    stale = await proxy.get("/static/strict.js")
    assert stale.status == 503 and stale.body == b"down", (stale.status, stale.cache_status)


# -- bypass ---------------------------------------------------------------------------------------


async def test_bypass_neither_looks_up_nor_stores(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: logged-in users
            match: {cookie: {session: present}}
            bypass: true
            response_headers: {add: {X-Bypassed: "yes"}}
    """)
    origin.route("/page", body=b"page", headers={"Cache-Control": "max-age=60"})
    user = await proxy.get("/page", headers={"Cookie": "theme=dark; session=abc"})
    assert (user.status, user.body, user.x_cache) == (200, b"page", "BYPASS")
    assert user.cache_status == 'cachegate; fwd=bypass; fwd-status=200; detail="RULE-BYPASS:logged-in users"'
    assert user.headers["X-Bypassed"] == "yes"
    assert (await proxy.get("/page")).x_cache == "MISS"  # the bypassed response was not stored
    assert (await proxy.get("/page")).x_cache == "HIT"
    again = await proxy.get("/page", headers={"Cookie": "session=abc"})
    assert again.x_cache == "BYPASS"  # nor is the stored one served to a bypassed request
    assert origin.count("/page") == 3


# -- no_store -------------------------------------------------------------------------------------


async def test_no_store_with_a_status_condition(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: api errors
            match: {path: "/api/**", status: [500, 502, 503, 504]}
            no_store: true
    """)
    origin.route("/api/broken", status=503, body=b"down", headers={"Cache-Control": "max-age=60"})
    origin.route("/api/ok", body=b"ok", headers={"Cache-Control": "max-age=60"})
    origin.route("/other/broken", status=503, body=b"down", headers={"Cache-Control": "max-age=60"})
    broken = await proxy.get("/api/broken")
    assert broken.status == 503
    assert 'detail="RULE-NO-STORE:api errors"' in broken.cache_status
    assert (await proxy.get("/api/broken")).x_cache == "MISS"
    assert await twice(proxy, "/api/ok") == ("MISS", "HIT")
    assert await twice(proxy, "/other/broken") == ("MISS", "HIT")  # the origin said max-age=60


# -- key ----------------------------------------------------------------------------------------


async def echo(request: web.Request) -> web.Response:
    return web.Response(text=f"{request.path_qs} {request.headers.get('Accept-Language', '-')}",
                        headers={"Cache-Control": "max-age=60"})


async def test_key_query_include_and_sort(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: search
            match: {path: "/search"}
            key: {query: {include: [q, page], sort: true}}
    """)
    origin.route("/search", echo)
    first = await proxy.get("/search?page=2&q=shoes&utm_source=mail")
    same = await proxy.get("/search?q=shoes&page=2&ref=x")
    other = await proxy.get("/search?q=boots&page=2")
    assert (first.x_cache, same.x_cache, other.x_cache) == ("MISS", "HIT", "MISS")
    # The origin is asked for the URL as keyed, so an unkeyed parameter cannot change
    # what is stored for everyone.
    assert [s.path for s in origin.seen] == ["/search?page=2&q=shoes", "/search?page=2&q=boots"]
    assert same.body == first.body == b"/search?page=2&q=shoes -"


async def test_key_query_exclude_and_ignore(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: products, match: {path: "/p/**"}, key: {query: {exclude: [utm_source, gclid]}}}
          - {name: images, match: {path: "/img/**"}, key: {query: ignore}}
    """)
    origin.route("/p/1", echo)
    origin.route("/img/a.png", echo)
    assert (await proxy.get("/p/1?id=7&utm_source=x")).x_cache == "MISS"
    assert (await proxy.get("/p/1?gclid=1&id=7")).x_cache == "HIT"
    assert (await proxy.get("/p/1?id=8")).x_cache == "MISS"
    assert (await proxy.get("/img/a.png?v=1")).x_cache == "MISS"
    assert (await proxy.get("/img/a.png?v=2")).x_cache == "HIT"
    assert [s.path for s in origin.seen] == ["/p/1?id=7", "/p/1?id=8", "/img/a.png"]


async def test_key_request_headers_and_cookies(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: pages
            match: {path: "/**"}
            key: {headers: [Accept-Language], cookies: [ab_bucket]}
    """)
    origin.route("/home", echo)
    de = await proxy.get("/home", headers={"Accept-Language": "de"})
    en = await proxy.get("/home", headers={"Accept-Language": "en"})
    de2 = await proxy.get("/home", headers={"Accept-Language": "de", "Cookie": "theme=x"})
    b = await proxy.get("/home", headers={"Accept-Language": "de", "Cookie": "ab_bucket=b"})
    b2 = await proxy.get("/home", headers={"Accept-Language": "de", "Cookie": "x=1; ab_bucket=b"})
    assert [r.x_cache for r in (de, en, de2, b, b2)] == ["MISS", "MISS", "HIT", "MISS", "HIT"]
    assert (de2.body, en.body) == (b"/home de", b"/home en")


async def test_key_lowercase_path(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: files, match: {path: "/files/**"}, key: {lowercase_path: true}}
    """)
    origin.route("/files/logo.png", echo)
    assert (await proxy.get("/files/Logo.PNG")).x_cache == "MISS"
    assert (await proxy.get("/files/logo.png")).x_cache == "HIT"
    assert [s.path for s in origin.seen] == ["/files/logo.png"]


async def test_purge_by_url_finds_an_entry_stored_under_a_rule_key(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: search, match: {path: "/search"}, key: {query: {include: [q], sort: true}}}
    """)
    origin.route("/search", echo)
    await proxy.get("/search?q=a&utm_source=x")
    await settle(proxy)
    host = proxy.url.removeprefix("http://")
    reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{host}/search?utm_source=y&q=a"]})
    assert reply.status == 200 and b'"purged": 1' in reply.body
    assert (await proxy.get("/search?q=a")).x_cache == "MISS"


# -- stale_while_revalidate / stale_if_error ----------------------------------------------------


async def test_stale_while_revalidate_default_serves_stale_and_refreshes(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        defaults: {stale_while_revalidate: 30s}
    """)
    origin.route("/news", body=b"v1", headers={"Cache-Control": "max-age=1"})
    assert (await proxy.get("/news")).x_cache == "MISS"
    await settle(proxy)
    shift_clock(proxy, 5)
    origin.route("/news", body=b"v2", headers={"Cache-Control": "max-age=60"})
    stale = await proxy.get("/news")
    assert (stale.x_cache, stale.body) == ("UPDATING", b"v1")
    await settle(proxy)
    fresh = await proxy.get("/news")
    assert (fresh.x_cache, fresh.body) == ("HIT", b"v2")
    assert origin.count("/news") == 2


async def test_stale_if_error_from_a_rule_serves_stale_when_the_origin_fails(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: resilient, match: {path: "/r"}, stale_if_error: 1m}
          - {name: fragile, match: {path: "/f"}, stale_if_error: 0s}
    """)
    for path in ("/r", "/f"):
        origin.route(path, body=b"old", headers={"Cache-Control": "max-age=1"})
        assert (await proxy.get(path)).x_cache == "MISS"
    await settle(proxy)
    shift_clock(proxy, 5)
    for path in ("/r", "/f"):
        origin.route(path, status=500, body=b"boom")
    resilient = await proxy.get("/r")
    assert (resilient.status, resilient.body, resilient.x_cache) == (200, b"old", "STALE")
    fragile = await proxy.get("/f")
    assert (fragile.status, fragile.body) == (500, b"boom")


# -- tags -----------------------------------------------------------------------------------------


async def test_rule_tags_are_purgeable(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: catalogue, match: {path: "/products/**"}, tags: [catalogue, shop]}
    """)
    origin.route("/products/1", body=b"1", headers={"Cache-Control": "max-age=60", "Surrogate-Key": "p1"})
    origin.route("/other", body=b"o", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/products/1")
    await proxy.get("/other")
    await settle(proxy)
    reply = await proxy.admin("POST", "/purge", json={"tags": ["catalogue"]})
    assert (reply.status, reply.body) == (200, b'{"purged": 1, "soft": false}')
    assert (await proxy.get("/products/1")).x_cache == "MISS"
    assert (await proxy.get("/other")).x_cache == "HIT"
    await settle(proxy)
    reply = await proxy.admin("POST", "/purge", json={"tags": ["p1"]})  # the origin's own tag too
    assert b'"purged": 1' in reply.body


# -- response_headers --------------------------------------------------------------------------


async def test_response_headers_rewrite_what_clients_see_not_what_is_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: missing pages
            match: {path: "/**", status: [404]}
            response_headers: {add: {Cache-Control: "no-store"}}
          - name: pages
            match: {path: "/**"}
            response_headers:
              add: {Cache-Control: "public, max-age=60", X-Served-By: cachegate}
              remove: [X-Powered-By]
    """)
    origin.route("/page", body=b"p", headers={"Cache-Control": "max-age=300", "X-Powered-By": "PHP/5"})
    origin.route("/gone", status=404, body=b"g", headers={"Cache-Control": "max-age=300",
                                                          "X-Powered-By": "PHP/5"})
    for expected in ("MISS", "HIT"):
        page = await proxy.get("/page")
        assert page.x_cache == expected
        assert page.headers.getall("Cache-Control") == ["public, max-age=60"]
        assert page.headers["X-Served-By"] == "cachegate"
        assert "X-Powered-By" not in page.headers
    assert ttl(await proxy.get("/page")) > 290  # stored with the origin's max-age=300
    for expected in ("MISS", "HIT"):
        gone = await proxy.get("/gone")
        assert (gone.status, gone.x_cache) == (404, expected)
        assert gone.headers.getall("Cache-Control") == ["no-store"]
        assert gone.headers["X-Powered-By"] == "PHP/5"  # first match wins: the 404 rule


async def test_a_304_206_or_416_from_the_cache_takes_the_edits_of_the_stored_200(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The edits are chosen by the stored response's status and type, as for its 200: a 304
    must carry the Cache-Control and Expires the 200 would (RFC 9110 §15.4.5), and was given
    the origin's instead (picked by 304 and the Content-Type a 304 no longer carries)."""
    proxy = await make_proxy(rules="""
        rules:
          - name: html
            match: {path: "/html/**", content_type: ["text/html"]}
            response_headers: {add: {Cache-Control: "no-cache", X-Rule: html}}
          - name: ok-only
            match: {path: "/st/**", status: [200]}
            response_headers: {add: {Cache-Control: "private, max-age=10", Expires: "0"}}
    """)
    origin.route("/html/page", body=b"<html>page</html>", headers={
        "Cache-Control": "max-age=3600", "ETag": '"p1"', "Content-Type": "text/html; charset=utf-8"})
    origin.route("/st/a", body=b"aaa", headers={
        "Cache-Control": "max-age=3600", "ETag": '"a1"', "Content-Type": "text/plain"})
    for path, tag, cc in (("/html/page", '"p1"', "no-cache"), ("/st/a", '"a1"', "private, max-age=10")):
        assert (await proxy.get(path)).x_cache == "MISS"
        await settle(proxy)
        hit = await proxy.get(path)
        assert (hit.status, hit.x_cache, hit.headers.getall("Cache-Control")) == (200, "HIT", [cc])
        part = await proxy.get(path, headers={"Range": "bytes=0-1"})
        assert (part.status, part.x_cache, part.headers.getall("Cache-Control")) == (206, "HIT", [cc])
        beyond = await proxy.get(path, headers={"Range": "bytes=500-"})
        assert (beyond.status, beyond.headers.getall("Cache-Control")) == (416, [cc])
        same = await proxy.get(path, headers={"If-None-Match": tag})
        assert (same.status, same.x_cache, same.headers.getall("Cache-Control")) == (304, "HIT", [cc])
        assert "X-Rule" not in same.headers  # not a field a 304 carries (§15.4.5), as before
    assert (await proxy.get("/st/a", headers={"If-None-Match": '"a1"'})).headers["Expires"] == "0"
    assert origin.count("/html/page") == origin.count("/st/a") == 1


async def test_every_206_takes_the_edits_of_its_200_whether_from_the_origin_a_stored_part_or_the_200(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A 206 is part of a 200 (RFC 9110 §15.3.7) and is edited as that 200, from any source: the
    range miss's own 206 and a 206 from a stored part (stored status 206) were edited as 206,
    so the same Range request got the rule's fields or the origin's by what happened to be
    stored."""
    proxy = await make_proxy(config="cache: {range_fill: none}\n", rules="""
        rules:
          - name: ok
            match: {path: "/**", status: [200]}
            response_headers: {add: {Cache-Control: "no-cache", X-Rule: ok}, remove: [X-Powered-By]}
    """)
    body = bytes(range(48, 58)) * 10

    async def ranges(request: web.Request) -> web.StreamResponse:
        headers = {"Cache-Control": "max-age=600", "ETag": '"e"', "Content-Type": "text/html",
                   "X-Powered-By": "PHP"}
        rng = request.headers.get("Range")
        if rng is None:
            return web.Response(body=body, headers=headers)
        first, last = (int(n) for n in rng.removeprefix("bytes=").split("-"))
        headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
        return web.Response(status=206, body=body[first:last + 1], headers=headers)

    origin.route("/p", ranges)

    def edited(reply: Reply) -> tuple[int, str, list[str], str | None, str | None]:
        h = reply.headers
        return reply.status, reply.x_cache, h.getall("Cache-Control"), h.get("X-Rule"), h.get("X-Powered-By")

    rng = {"Range": "bytes=0-9"}
    assert edited(await proxy.get("/p", headers=rng)) == (206, "MISS", ["no-cache"], "ok", None)  # the origin's
    await settle(proxy)
    assert edited(await proxy.get("/p", headers=rng)) == (206, "HIT", ["no-cache"], "ok", None)  # the part's
    assert edited(await proxy.get("/p")) == (200, "MISS", ["no-cache"], "ok", None)
    await settle(proxy)
    assert edited(await proxy.get("/p")) == (200, "HIT", ["no-cache"], "ok", None)  # the fast path's
    assert edited(await proxy.get("/p", headers=rng)) == (206, "HIT", ["no-cache"], "ok", None)  # the 200's
    assert origin.count("/p") == 2


# -- client_cache_control --------------------------------------------------------------------------


async def test_client_cache_control_honor_revalidate_ignore(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: honor, match: {path: "/honor"}, client_cache_control: honor}
          - {name: revalidate, match: {path: "/revalidate"}, client_cache_control: revalidate}
          - {name: ignore, match: {path: "/ignore"}, client_cache_control: ignore}
    """)

    async def validated(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "max-age=60", "ETag": '"v1"'}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(body=b"body", headers=headers)

    no_cache = {"Cache-Control": "no-cache"}
    for path in ("/honor", "/revalidate", "/ignore"):
        origin.route(path, validated)
        assert (await proxy.get(path)).x_cache == "MISS"
        await settle(proxy)

    honor = await proxy.get("/honor", headers=no_cache)
    assert (honor.x_cache, honor.body) == ("MISS", b"body")
    assert "If-None-Match" not in origin.seen[-1].headers  # a full origin trip
    assert (await proxy.get("/honor", headers={"Pragma": "no-cache"})).x_cache == "MISS"
    assert origin.count("/honor") == 3

    revalidated = await proxy.get("/revalidate", headers=no_cache)
    assert (revalidated.x_cache, revalidated.body) == ("REVALIDATED", b"body")
    assert origin.seen[-1].headers["If-None-Match"] == '"v1"'
    assert origin.count("/revalidate") == 2

    for headers in (no_cache, {"Cache-Control": "max-age=0"}, {"Pragma": "no-cache"}):
        ignored = await proxy.get("/ignore", headers=headers)
        assert (ignored.x_cache, ignored.body) == ("HIT", b"body")
    assert origin.count("/ignore") == 1


# -- deception_guard ---------------------------------------------------------------------------------


async def test_deception_guard_is_on_for_override_origin_rules(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: static, match: {path: "/static/**"}, ttl: {200: 1h}, override_origin: true}
          - {name: unguarded, match: {path: "/raw/**"}, ttl: {200: 1h}, override_origin: true,
             deception_guard: false}
          - {name: guarded, match: {path: "/assets/**"}, deception_guard: true}
    """)
    html = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "max-age=60"}
    origin.route("/static/account.css", body=b"<h1>your account</h1>", headers=html)
    origin.route("/static/site.css", body=b"body{}", headers={"Content-Type": "text/css"})
    origin.route("/raw/account.css", body=b"<h1>x</h1>", headers=html)
    origin.route("/assets/me.js", body=b"<h1>x</h1>", headers=html)
    deceived = await proxy.get("/static/account.css")
    assert "detail=DECEPTION-GUARD" in deceived.cache_status
    assert (await proxy.get("/static/account.css")).x_cache == "MISS"
    assert await twice(proxy, "/static/site.css") == ("MISS", "HIT")
    assert await twice(proxy, "/raw/account.css") == ("MISS", "HIT")
    assert "detail=DECEPTION-GUARD" in (await proxy.get("/assets/me.js")).cache_status


# -- ttl_jitter --------------------------------------------------------------------------------------


async def test_ttl_jitter_spreads_lifetimes_downwards_only(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: jittered, match: {path: "/j/**"}, ttl: {200: 100s}, ttl_jitter: 50%}
          - {name: origin max-age, match: {path: "/o/**"}, ttl_jitter: 50%}
          - {name: steady, match: {path: "/s/**"}, ttl: {200: 100s}}
    """)
    for i in range(12):
        origin.route(f"/j/{i}", body=b"j")
        origin.route(f"/o/{i}", body=b"o", headers={"Cache-Control": "max-age=100"})
        origin.route(f"/s/{i}", body=b"s")
    spreads: dict[str, set[int]] = {}
    for prefix in ("j", "o", "s"):
        for i in range(12):
            await proxy.get(f"/{prefix}/{i}")
            hit = await proxy.get(f"/{prefix}/{i}")
            assert hit.x_cache == "HIT"
            spreads.setdefault(prefix, set()).add(ttl(hit))
    for prefix in ("j", "o"):
        assert all(49 <= t <= 100 for t in spreads[prefix]), spreads
        assert len(spreads[prefix]) > 3, spreads  # 12 draws from 50 values: not all alike
    assert min(spreads["s"]) >= 95, spreads  # no jitter: only the seconds the test took


# -- allow_set_cookie -------------------------------------------------------------------------------


async def test_allow_set_cookie_stores_the_response_without_the_cookie(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: tracking cookie is harmless, match: {path: "/landing"}, allow_set_cookie: true}
    """)
    origin.route("/landing", body=b"hi", headers={"Cache-Control": "max-age=60", "Set-Cookie": "visitor=1"})
    origin.route("/other", body=b"hi", headers={"Cache-Control": "max-age=60", "Set-Cookie": "visitor=1"})
    first = await proxy.get("/landing")
    assert (first.x_cache, first.headers.get("Set-Cookie")) == ("MISS", "visitor=1")
    second = await proxy.get("/landing")
    assert second.x_cache == "HIT" and "Set-Cookie" not in second.headers
    assert await twice(proxy, "/other") == ("MISS", "MISS")


async def test_a_collapsed_request_never_gets_the_leaders_set_cookie(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: cookie ok, match: {path: "/slow"}, allow_set_cookie: true}
    """)
    origin.route("/slow", body=b"x" * 1000, delay=0.3,
                 headers={"Cache-Control": "max-age=60", "Set-Cookie": "visitor=1"})
    replies = await asyncio.gather(*(proxy.get("/slow") for _ in range(3)))
    assert origin.count("/slow") == 1
    assert sorted("Set-Cookie" in r.headers for r in replies) == [False, False, True]
    assert all(r.body == b"x" * 1000 for r in replies)
