"""Cache-Status (RFC 9211) and X-Cache-Status on every path through the engine, through a running proxy.

One row per outcome: the X-Cache-Status nginx would say and the complete Cache-Status
value (``ttl`` values are matched as numbers). Stale cases move the proxy's clock
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.admin.util import settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, Reply
from tests.rules.util import shift_clock

RULES = """
rules:
  - name: skip
    match: {path: "/bypass"}
    bypass: true
  - name: keep errors out
    match: {path: "/nostore", status: [500]}
    no_store: true
  - name: guarded assets
    match: {path: "/dg/**"}
    ttl: 1h
    override_origin: true
"""
CONFIG = "cache: {memory: 16MB, max_object: 4KB, disk: {path: cache, size: 64MB, shards: 2}}\n"
CC = "Cache-Control"

Scenario = Callable[[Origin, Proxy], Awaitable[Reply]]


async def plain(origin: Origin, proxy: Proxy, path: str, headers: dict[str, str], *, status: int = 200,
                body: bytes = b"body", request_headers: dict[str, str] | None = None) -> Reply:
    origin.route(path, body=body, status=status, headers=headers)
    return await proxy.get(path, headers=request_headers or {})


async def twice(origin: Origin, proxy: Proxy, path: str, headers: dict[str, str], shift: float = 0.0,
                request_headers: dict[str, str] | None = None) -> Reply:
    """Store ``path``, move the clock ``shift`` seconds, ask again."""
    origin.route(path, body=b"stored", headers=headers)
    await proxy.get(path)
    await settle(proxy)
    if shift:
        shift_clock(proxy, shift)
    reply = await proxy.get(path, headers=request_headers or {})
    await settle(proxy)
    return reply


async def origin_fails(origin: Origin, proxy: Proxy, path: str, headers: dict[str, str], status: int
                       ) -> Reply:
    origin.route(path, body=b"stored", headers=headers)
    await proxy.get(path)
    await settle(proxy)
    origin.route(path, status=status, body=b"broken")
    shift_clock(proxy, 10)
    return await proxy.get(path)


async def unreachable(origin: Origin, proxy: Proxy, path: str, headers: dict[str, str] | None) -> Reply:
    if headers is not None:
        origin.route(path, body=b"stored", headers=headers)
        await proxy.get(path)
        await settle(proxy)
        shift_clock(proxy, 10)
    await origin.stop(hold_port=True)
    return await proxy.get(path)


async def vary_miss(origin: Origin, proxy: Proxy) -> Reply:
    origin.route("/v", body=b"v", headers={CC: "max-age=60", "Vary": "Accept-Language"})
    await proxy.get("/v", headers={"Accept-Language": "de"})
    await settle(proxy)
    return await proxy.get("/v", headers={"Accept-Language": "fr"})


async def revalidated(origin: Origin, proxy: Proxy) -> Reply:
    async def etagged(request: web.Request) -> web.Response:
        headers = {CC: "max-age=1", "ETag": '"e"'}
        if request.headers.get("If-None-Match") == '"e"':
            return web.Response(status=304, headers=headers)
        return web.Response(body=b"stored", headers=headers)

    origin.route("/rv", etagged)
    await proxy.get("/rv")
    await settle(proxy)
    shift_clock(proxy, 5)
    return await proxy.get("/rv")


async def posted(origin: Origin, proxy: Proxy) -> Reply:
    origin.route("/form", body=b"ok")
    return await proxy.request("POST", "/form", data=b"x")


async def too_large(origin: Origin, proxy: Proxy) -> Reply:
    return await plain(origin, proxy, "/big", {CC: "max-age=60"}, body=b"x" * 10_000)


async def deceived(origin: Origin, proxy: Proxy) -> Reply:
    return await plain(origin, proxy, "/dg/me.css", {"Content-Type": "text/html"})


T = r"-?\d+"  # a ttl

CASES: dict[str, tuple[Scenario, int, str, str]] = {
    # name: (scenario, status, X-Cache-Status, Cache-Status as a regex)
    "stored miss": (lambda o, p: plain(o, p, "/m", {CC: "max-age=60"}), 200, "MISS",
                    "cachegate; fwd=uri-miss; fwd-status=200; stored"),
    "hit": (lambda o, p: twice(o, p, "/h", {CC: "max-age=60"}), 200, "HIT", f"cachegate; hit; ttl={T}"),
    "private": (lambda o, p: plain(o, p, "/pr", {CC: "private, max-age=60"}), 200, "MISS",
                "cachegate; fwd=uri-miss; fwd-status=200; detail=PRIVATE"),
    "no-store": (lambda o, p: plain(o, p, "/ns", {CC: "no-store"}), 200, "MISS",
                 "cachegate; fwd=uri-miss; fwd-status=200; detail=NO-STORE"),
    "set-cookie": (lambda o, p: plain(o, p, "/sc", {CC: "max-age=60", "Set-Cookie": "a=1"}), 200, "MISS",
                   "cachegate; fwd=uri-miss; fwd-status=200; detail=SET-COOKIE"),
    "authorization": (lambda o, p: plain(o, p, "/au", {CC: "max-age=60"},
                                         request_headers={"Authorization": "Bearer x"}), 200, "MISS",
                      "cachegate; fwd=uri-miss; fwd-status=200; detail=AUTHORIZATION"),
    "request no-store": (lambda o, p: plain(o, p, "/rns", {CC: "max-age=60"},
                                            request_headers={CC: "no-store"}), 200, "MISS",
                         "cachegate; fwd=uri-miss; fwd-status=200; detail=REQUEST-NO-STORE"),
    "uncacheable status": (lambda o, p: plain(o, p, "/us", {}, status=302), 302, "MISS",
                           "cachegate; fwd=uri-miss; fwd-status=302; detail=UNCACHEABLE-STATUS"),
    "no freshness": (lambda o, p: plain(o, p, "/nf", {}), 200, "MISS",
                     "cachegate; fwd=uri-miss; fwd-status=200; detail=NO-FRESHNESS"),
    "too large": (too_large, 200, "MISS", "cachegate; fwd=uri-miss; fwd-status=200; detail=TOO-LARGE"),
    "vary star": (lambda o, p: plain(o, p, "/vs", {CC: "max-age=60", "Vary": "*"}), 200, "MISS",
                  "cachegate; fwd=uri-miss; fwd-status=200; detail=VARY-STAR"),
    "must-understand": (lambda o, p: plain(o, p, "/mu", {CC: "must-understand, max-age=60"}, status=299),
                        299, "MISS", "cachegate; fwd=uri-miss; fwd-status=299; detail=MUST-UNDERSTAND"),
    "rule bypass": (lambda o, p: plain(o, p, "/bypass", {CC: "max-age=60"}), 200, "BYPASS",
                    "cachegate; fwd=bypass; fwd-status=200; detail=RULE-BYPASS:skip"),
    "rule no-store": (lambda o, p: plain(o, p, "/nostore", {CC: "max-age=60"}, status=500), 500, "MISS",
                      'cachegate; fwd=uri-miss; fwd-status=500; detail="RULE-NO-STORE:keep errors out"'),
    "deception guard": (deceived, 200, "MISS", "cachegate; fwd=uri-miss; fwd-status=200; detail=DECEPTION-GUARD"),
    "method": (posted, 200, "BYPASS", "cachegate; fwd=method; fwd-status=200"),
    "vary miss": (vary_miss, 200, "MISS", "cachegate; fwd=vary-miss; fwd-status=200; stored"),
    "client no-cache": (lambda o, p: twice(o, p, "/r", {CC: "max-age=60"}, request_headers={CC: "no-cache"}),
                        200, "MISS", "cachegate; fwd=request; fwd-status=200; stored"),
    "stale, no validator": (lambda o, p: twice(o, p, "/st", {CC: "max-age=1"}, 5), 200, "EXPIRED",
                            "cachegate; fwd=stale; fwd-status=200; stored"),
    "revalidated": (revalidated, 200, "REVALIDATED",
                    f"cachegate; fwd=stale; fwd-status=304; ttl={T}"),
    "stale-while-revalidate": (lambda o, p: twice(o, p, "/swr", {CC: "max-age=1, stale-while-revalidate=60"}, 5),
                               200, "UPDATING", f"cachegate; hit; ttl={T}; detail=STALE-WHILE-REVALIDATE"),
    "max-stale": (lambda o, p: twice(o, p, "/mx", {CC: "max-age=1"}, 5, request_headers={CC: "max-stale=60"}),
                  200, "STALE", f"cachegate; hit; ttl={T}; detail=MAX-STALE"),
    "stale-if-error on 503": (lambda o, p: origin_fails(o, p, "/sie", {CC: "max-age=1, stale-if-error=60"}, 503),
                              200, "STALE", f"cachegate; fwd=stale; fwd-status=503; ttl={T}; detail=ORIGIN-ERROR"),
    "only-if-cached": (lambda o, p: plain(o, p, "/oic", {CC: "max-age=60"}, request_headers={CC: "only-if-cached"}),
                       504, "MISS", "cachegate; detail=ONLY-IF-CACHED"),
    # Stored, but it needs validation first (its no-cache, a stale one, the client's max-age=0):
    # said apart from nothing stored, so a client asking whether it is stored can tell.
    "only-if-cached, stored no-cache": (
        lambda o, p: twice(o, p, "/oicn", {CC: "no-cache, max-age=60", "ETag": '"n"'},
                           request_headers={CC: "only-if-cached"}),
        504, "MISS", "cachegate; detail=ONLY-IF-CACHED-NEEDS-VALIDATION"),
    "only-if-cached, stored, client max-age=0": (
        lambda o, p: twice(o, p, "/oicm", {CC: "max-age=60"}, request_headers={CC: "only-if-cached, max-age=0"}),
        504, "MISS", "cachegate; detail=ONLY-IF-CACHED-NEEDS-VALIDATION"),
    "stale-if-error, origin down": (lambda o, p: unreachable(o, p, "/down", {CC: "max-age=1, stale-if-error=60"}),
                                    200, "STALE", f"cachegate; fwd=stale; ttl={T}; detail=ORIGIN-UNREACHABLE"),
    "must-revalidate, origin down": (lambda o, p: unreachable(o, p, "/mr", {CC: "max-age=1, must-revalidate"}),
                                     504, "EXPIRED", "cachegate; fwd=stale; detail=STALE-NOT-ALLOWED"),
    "stale, no stale permission, origin down": (lambda o, p: unreachable(o, p, "/plain", {CC: "max-age=1"}),
                                                502, "EXPIRED", "cachegate; fwd=stale; detail=UPSTREAM-UNREACHABLE"),
    "origin down": (lambda o, p: unreachable(o, p, "/gone", None), 502, "MISS",
                    "cachegate; fwd=uri-miss; detail=UPSTREAM-UNREACHABLE"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_every_outcome_says_what_the_cache_did(origin: Origin, make_proxy: MakeProxy, name: str) -> None:
    proxy = await make_proxy(config=CONFIG, rules=RULES)
    scenario, status, x_cache, cache_status = CASES[name]
    reply = await scenario(origin, proxy)
    assert reply.status == status, reply.body
    assert reply.x_cache == x_cache
    assert re.fullmatch(cache_status, reply.cache_status), reply.cache_status


async def test_collapsed_waiters_say_collapsed_and_not_hit(origin: Origin, proxy: Proxy) -> None:
    origin.route("/herd", body=b"h" * 1000, headers={CC: "max-age=60"}, delay=0.3)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> tuple[str, str]:
            async with session.get(proxy.url + "/herd") as r:
                await r.read()
                return r.headers["X-Cache-Status"], r.headers["Cache-Status"]

        results = await asyncio.gather(*(one() for _ in range(10)))
    assert origin.count("/herd") == 1
    assert results.count(("MISS", "cachegate; fwd=uri-miss; fwd-status=200; stored")) == 1
    assert results.count(("HIT", "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed")) == 9


async def test_a_late_waiter_gets_the_stored_status_in_fwd_status(origin: Origin, proxy: Proxy) -> None:
    """A request that joins a fill too late to stream it is answered from the store afterwards."""
    started = asyncio.Event()

    async def slow_404(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=404, headers={CC: "max-age=60"})
        await resp.prepare(request)
        for _ in range(40):  # more than the flight keeps for late joiners (1 MiB)
            await resp.write(b"x" * 65536)
            started.set()
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    origin.route("/late", slow_404)
    first = asyncio.ensure_future(proxy.get("/late"))
    await started.wait()
    await asyncio.sleep(0.3)
    late = await proxy.get("/late")
    assert (await first).status == 404
    assert late.status == 404 and late.x_cache == "HIT"
    # No ttl, as a follower that streamed the flight says none (forwarded_ttl).
    assert late.cache_status == "cachegate; fwd=uri-miss; fwd-status=404; collapsed"


async def test_a_leaders_conditional_is_answered_from_the_store_and_says_stored(
        origin: Origin, proxy: Proxy) -> None:
    origin.route("/cond", body=b"c", headers={CC: "max-age=60", "ETag": '"c1"'})
    reply = await proxy.get("/cond", headers={"If-None-Match": '"c1"'})
    assert (reply.status, reply.x_cache) == (304, "MISS")
    assert reply.cache_status == "cachegate; fwd=uri-miss; fwd-status=200; stored"


@pytest.mark.parametrize("request_headers", [{"If-None-Match": '"other"'}, {"Range": "bytes=0-2"},
                                             {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}])
async def test_a_fill_says_the_same_whether_relayed_or_read_back_from_the_store_for_a_conditional_or_range(
        origin: Origin, proxy: Proxy, request_headers: dict[str, str]) -> None:
    """A fill drops the client's conditionals and Range and the stored response answers them:
    its Cache-Status is that of the same fill relayed to a plain request (no ttl on a MISS or
    an EXPIRED answer: ``forwarded_ttl``), whichever of the two the client sent."""
    said = {}
    for name, headers in (("plain", {}), ("conditional or range", request_headers)):
        path = "/fill-" + name.replace(" ", "-")
        origin.route(path, body=b"filled", headers={CC: "max-age=1"})
        miss = await proxy.get(path, headers=headers)
        await settle(proxy)
        shift_clock(proxy, 10)  # stale, no validator: fetched again (EXPIRED)
        expired = await proxy.get(path, headers=headers)
        await settle(proxy)
        said[name] = [(r.x_cache, r.cache_status) for r in (miss, expired)]
    assert said["plain"] == [("MISS", "cachegate; fwd=uri-miss; fwd-status=200; stored"),
                             ("EXPIRED", "cachegate; fwd=stale; fwd-status=200; stored")]
    assert said["conditional or range"] == said["plain"]


# -- an origin's own cache fields -----------------------------------------------------------------


async def test_an_origins_x_cache_status_is_dropped_and_its_cache_status_members_come_first(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """X-Cache-Status is this cache's own field: an origin's is neither relayed (clients saw
    "HIT, MISS") nor stored. Cache-Status lists every cache on the path (RFC 9211), the origin's
    side first: the origin's members stay, cachegate's is last."""
    from urllib.parse import quote

    from tests.admin.util import absolute

    proxy = await make_proxy()
    theirs = {"X-Cache-Status": "HIT", "Cache-Status": "edge; hit"}
    origin.route("/kept", body=b"k", headers={CC: "max-age=600", **theirs})
    origin.route("/passed", body=b"p", headers={CC: "no-store", **theirs})

    async def validated(request: web.Request) -> web.Response:  # its 304 carries them too
        fields = {CC: "no-cache", "ETag": '"1"', **theirs}
        if request.headers.get("If-None-Match") == '"1"':
            return web.Response(status=304, headers=fields)
        return web.Response(body=b"r", headers=fields)

    origin.route("/revalidated", validated)
    for path, expected in (("/kept", ["MISS", "HIT", "HIT"]), ("/passed", ["MISS", "MISS"]),
                           ("/revalidated", ["MISS", "REVALIDATED"])):
        for x_cache in expected:
            reply = await proxy.get(path)
            assert reply.headers.getall("X-Cache-Status") == [x_cache], path
            members = reply.headers.getall("Cache-Status")
            assert members[0] == "edge; hit" and members[-1].startswith("cachegate;") and len(members) == 2, path
            await settle(proxy)
    for path in ("/kept", "/revalidated"):
        cached = await proxy.admin("GET", "/cache?url=" + quote(absolute(proxy, path)))
        variants = json.loads(cached.body)["variants"]
        assert variants, path
        for variant in variants:
            names = [name.lower() for name, _ in variant["headers"]]
            assert "x-cache-status" not in names and "cache-status" in names, path


async def test_an_origins_invalid_or_forged_cache_status_members_are_dropped_once_at_the_fill(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A member that is not valid sf-list syntax (``a b c``) made the whole Cache-Status fail
    RFC 8941 parsing for every client, hits included; one named as this cache (``cachegate;
    hit``) passed for cachegate's own. Both are dropped when the response arrives (relayed and
    stored without them), the other caches' members kept before cachegate's."""
    from http_sfv.list import List

    async def two_lines(request: web.Request) -> web.Response:
        return web.Response(body=b"x", headers=CIMultiDict([
            (CC, "max-age=600"), ("Cache-Status", "a b c, inner; hit"), ("Cache-Status", "cachegate; hit; ttl=999")]))

    origin.route("/cs", two_lines)
    origin.route("/bad", body=b"x", headers={CC: "max-age=600", "Cache-Status": "a b c"})
    proxy = await make_proxy()
    for path, theirs in (("/cs", ["inner; hit"]), ("/bad", [])):
        for x_cache in ("MISS", "HIT"):
            reply = await proxy.get(path)
            assert reply.x_cache == x_cache
            members = reply.headers.getall("Cache-Status")
            assert members[:-1] == theirs and members[-1].startswith("cachegate; "), (path, members)
            field = List()
            field.parse(", ".join(members).encode())  # the whole field parses (RFC 8941)
            assert [str(m.value) for m in field] == [*(t.split(";")[0] for t in theirs), "cachegate"]
            await settle(proxy)


async def test_a_far_expires_gives_the_same_capped_ttl_as_a_huge_max_age(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """RFC 9111 §1.2.2 caps delta-seconds at 2**31: a far Expires said ttl=251605782415 where
    max-age=99999999999999999999 said 2147483647."""
    origin.route("/expires", body=b"x", headers={"Expires": "Fri, 31 Dec 9999 23:59:59 GMT"})
    origin.route("/maxage", body=b"x", headers={CC: "max-age=99999999999999999999"})
    proxy = await make_proxy()
    ttls = []
    for path in ("/expires", "/maxage"):
        await proxy.get(path)
        await settle(proxy)
        hit = await proxy.get(path)
        assert hit.x_cache == "HIT"
        ttls.append(int(hit.cache_status.split("ttl=")[1].split(";")[0]))
    assert all(2**31 - 5 <= ttl <= 2**31 for ttl in ttls), ttls


def test_a_stored_x_cache_status_is_never_served() -> None:
    """An entry stored before the field was dropped on the way in still holds an origin's."""
    from proxy.engine import served_headers

    served = served_headers([("X-Cache-Status", "HIT"), ("Content-Type", "text/plain")], "3",
                            "cachegate; hit; ttl=5", "HIT")
    assert [v for k, v in served if k.lower() == "x-cache-status"] == ["HIT"]
    assert [k for k, _ in served].count("X-Cache-Status") == 1
