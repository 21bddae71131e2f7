"""RFC 9111 behaviour through the running proxy: the policy's decisions wired to storage and upstream.

A real origin on loopback, cachegate in front with a disk cache in tmp_path, and
the engine's clock replaced by a ``Clock`` the test advances (the origin stamps
its Date from the same clock), so nothing sleeps for freshness to run out.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin

STALE_IF_ERROR_RULES = "defaults:\n  stale_if_error: 1h\nrules: []\n"  # as rules/default.yaml


def route(origin: Origin, clock: Clock, path: str, *, body: bytes = b"body", status: int = 200,
          **fields: str) -> None:
    """A route whose Date comes from the test's clock; ``fields`` use _ for - in names."""
    headers = {k.replace("_", "-"): v for k, v in fields.items()}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers={"Date": format_http_date(clock()), **headers})

    origin.route(path, handler)


async def test_head_is_answered_from_the_stored_get_without_a_body(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/h", body=b"hello", Cache_Control="max-age=60")
    assert (await proxy.get("/h")).x_cache == "MISS"
    head = await proxy.request("HEAD", "/h")
    assert (head.status, head.body, head.x_cache) == (200, b"", "HIT")
    assert head.headers["Content-Length"] == "5"
    assert origin.count("/h") == 1


async def test_a_head_miss_fills_the_cache_with_a_get(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/h2", body=b"hello", Cache_Control="max-age=60")
    head = await proxy.request("HEAD", "/h2")
    assert (head.status, head.body) == (200, b"")
    got = await proxy.get("/h2")
    assert (got.body, got.x_cache) == (b"hello", "HIT")
    assert [s.method for s in origin.seen] == ["GET"]


async def test_client_conditionals_are_answered_304_from_a_fresh_stored_response(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    last_modified = format_http_date(clock() - 3600)
    route(origin, clock, "/c", body=b"content", Cache_Control="max-age=60", ETag='"v1"',
          Last_Modified=last_modified)
    first = await proxy.get("/c", headers={"If-None-Match": '"v1"'})
    assert (first.status, first.body) == (304, b"")
    assert "If-None-Match" not in origin.seen[0].headers  # the fill asked for the full response
    by_etag = await proxy.get("/c", headers={"If-None-Match": 'W/"v1"'})
    by_date = await proxy.get("/c", headers={"If-Modified-Since": last_modified})
    other = await proxy.get("/c", headers={"If-None-Match": '"v2"'})
    assert (by_etag.status, by_etag.x_cache, by_etag.headers["ETag"]) == (304, "HIT", '"v1"')
    assert (by_date.status, by_date.body) == (304, b"")
    assert (other.status, other.body, other.x_cache) == (200, b"content", "HIT")
    assert origin.count("/c") == 1


async def test_only_if_cached_answers_504_without_asking_the_origin(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/o", Cache_Control="max-age=60")
    miss = await proxy.get("/o", headers={"Cache-Control": "only-if-cached"})
    assert miss.status == 504
    assert origin.count("/o") == 0
    await proxy.get("/o")
    hit = await proxy.get("/o", headers={"Cache-Control": "only-if-cached"})
    assert (hit.status, hit.x_cache) == (200, "HIT")
    clock.advance(61)
    stale = await proxy.get("/o", headers={"Cache-Control": "only-if-cached"})
    assert stale.status == 504
    assert origin.count("/o") == 1


async def test_must_revalidate_is_never_served_stale_and_gets_504_when_the_origin_is_down(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock, rules=STALE_IF_ERROR_RULES)
    route(origin, clock, "/m", body=b"strict", Cache_Control="max-age=1, must-revalidate", ETag='"m"')
    route(origin, clock, "/l", body=b"lenient", Cache_Control="max-age=1", ETag='"l"')
    await proxy.get("/m")
    await proxy.get("/l")
    clock.advance(5)
    await origin.stop(hold_port=True)
    strict = await proxy.get("/m")
    assert strict.status == 504
    assert "STALE-NOT-ALLOWED" in strict.cache_status
    assert (await proxy.get("/m", headers={"Cache-Control": "max-stale=3600"})).status == 504
    lenient = await proxy.get("/l")  # the same outage, without must-revalidate: stale-if-error applies
    assert (lenient.status, lenient.body, lenient.x_cache) == (200, b"lenient", "STALE")


async def test_stale_if_error_serves_the_stale_response_on_a_5xx_within_its_window(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    answers = [(200, b"good"), (503, b"down"), (503, b"down")]

    async def handler(request: web.Request) -> web.Response:
        status, body = answers.pop(0)
        return web.Response(status=status, body=body, headers={
            "Date": format_http_date(clock()), "Cache-Control": "max-age=10, stale-if-error=60"})

    origin.route("/e", handler)
    await proxy.get("/e")
    clock.advance(30)  # stale for 20 s: inside the 60 s window
    within = await proxy.get("/e")
    assert (within.status, within.body, within.x_cache) == (200, b"good", "STALE")
    assert int(within.headers["Age"]) >= 30
    clock.advance(100)  # stale for 120 s: the error passes through
    past = await proxy.get("/e")
    assert (past.status, past.body) == (503, b"down")


async def test_an_error_passed_through_for_a_stale_response_says_why_it_is_not_stored(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    """must-revalidate: a 503 to the revalidation is relayed (never stale), not stored
    (UNCACHEABLE-STATUS: no freshness of its own), and the stored response stays: the next
    request revalidates it. ORIGIN-ERROR is the detail of a stale response served instead of
    an error (docs/admin-api.md)."""
    proxy = await clocked(make_proxy, clock)
    answers = [(200, b"good"), (503, b"down"), (304, b"")]

    async def handler(request: web.Request) -> web.Response:
        status, body = answers.pop(0)
        return web.Response(status=status, body=body, headers={
            "Date": format_http_date(clock()), "ETag": '"m"', "Cache-Control": "max-age=1, must-revalidate"}
            if status != 503 else {"Date": format_http_date(clock())})

    origin.route("/m", handler)
    await proxy.get("/m")
    clock.advance(5)
    error = await proxy.get("/m")
    assert (error.status, error.body, error.x_cache) == (503, b"down", "EXPIRED")
    assert error.cache_status == "cachegate; fwd=stale; fwd-status=503; detail=UNCACHEABLE-STATUS"
    again = await proxy.get("/m")
    assert (again.status, again.body, again.x_cache) == (200, b"good", "REVALIDATED")
    assert origin.count("/m") == 3


@pytest.mark.parametrize("code", [501, 505])
@pytest.mark.parametrize("error_cc", ["max-age=10", "no-store"])  # stored over the stale response, or not
async def test_stale_if_error_never_hides_an_answer_rfc_5861_does_not_call_an_error(
    origin: Origin, make_proxy: MakeProxy, clock: Clock, code: int, error_cc: str
) -> None:
    """RFC 5861 §4: an error is what "would result in a 500, 502, 503, or 504": a 501 (the
    origin does not implement the method) or a 505 is its answer, relayed, not hidden."""
    proxy = await clocked(make_proxy, clock)
    answers = [(200, "max-age=10, stale-if-error=60"), (code, error_cc)]

    async def handler(request: web.Request) -> web.Response:
        status, cc = answers.pop(0)
        return web.Response(status=status, body=f"{status} {cc}".encode(), headers={
            "Date": format_http_date(clock()), "Cache-Control": cc})

    origin.route("/e", handler)
    await proxy.get("/e")
    clock.advance(30)  # stale for 20 s: inside the 60 s window
    reply = await proxy.get("/e")
    assert (reply.status, reply.body) == (code, f"{code} {error_cc}".encode())
    if error_cc != "no-store":  # a full response, stored in place of the stale one (RFC 9111 §4.3.3)
        again = await proxy.get("/e")
        assert (again.status, again.x_cache) == (code, "HIT")


async def test_a_response_without_freshness_is_never_served_stale_by_the_rule_default(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock, rules=STALE_IF_ERROR_RULES)
    answers = [200, 500]

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=answers.pop(0), body=b"x", headers={"ETag": '"p"'})

    origin.route("/p", handler)
    await proxy.get("/p")
    second = await proxy.get("/p")
    assert second.status == 500


async def test_stale_while_revalidate_serves_updating_and_refreshes_once(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    bodies = [b"v1", b"v2", b"v3"]

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bodies.pop(0), headers={
            "Date": format_http_date(clock()), "Cache-Control": "max-age=10, stale-while-revalidate=60"})

    origin.route("/s", handler)
    await proxy.get("/s")
    clock.advance(20)
    updating = await asyncio.gather(*(proxy.get("/s") for _ in range(5)))
    assert {(r.body, r.x_cache) for r in updating} == {(b"v1", "UPDATING")}
    for _ in range(100):
        if origin.count("/s") == 2 and (await proxy.get("/s")).body == b"v2":
            break
        await asyncio.sleep(0.02)
    refreshed = await proxy.get("/s")
    assert (refreshed.body, refreshed.x_cache) == (b"v2", "HIT")
    assert origin.count("/s") == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_a_successful_unsafe_request_invalidates_the_uri_and_same_origin_locations(
    origin: Origin, make_proxy: MakeProxy, clock: Clock, method: str
) -> None:
    proxy = await clocked(make_proxy, clock)
    for path in ("/i", "/j", "/k", "/x"):
        route(origin, clock, path, Cache_Control="max-age=600")
        await proxy.get(path)

    async def unsafe(request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.Response(body=b"i", headers={"Cache-Control": "max-age=600"})
        return web.Response(status=201, headers={
            "Location": "/j", "Content-Location": f"{proxy.url}/k",
            "Content-Location-Other": "http://elsewhere.example/x"})

    origin.route("/i", unsafe)
    assert (await proxy.request(method, "/i", data=b"payload")).status == 201
    after = {p: (await proxy.get(p)).x_cache for p in ("/i", "/j", "/k", "/x")}
    assert after == {"/i": "MISS", "/j": "MISS", "/k": "MISS", "/x": "HIT"}


async def test_a_location_with_the_scheme_s_default_port_is_the_same_origin(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    """RFC 9110 §4.2.3: http://shop.example:80/item is http://shop.example/item, which the
    clients that sent ``Host: shop.example`` have stored."""
    proxy = await clocked(make_proxy, clock)
    host = {"Host": "shop.example"}
    for path in ("/item", "/other"):
        route(origin, clock, path, Cache_Control="max-age=600")
        await proxy.get(path, headers=host)

    async def update(request: web.Request) -> web.Response:
        return web.Response(status=201, headers={"Location": "http://shop.example:80/item",
                                                 "Content-Location": "//SHOP.example.:080/other#top"})

    origin.route("/update", update)
    assert (await proxy.request("POST", "/update", data=b"x", headers=host)).status == 201
    assert [(await proxy.get(p, headers=host)).x_cache for p in ("/item", "/other")] == ["MISS", "MISS"]


async def test_a_location_with_an_empty_query_invalidates_that_url_not_the_one_without(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    """``/search?`` and ``/search`` are two keys (the target as written); ``Location: /search?``
    names the first (RFC 3986 §5.2.2: the reference's query, empty or not, is the URL's)."""
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/search", Cache_Control="max-age=600")
    for target in ("/search?", "/search"):
        assert (await proxy.raw("GET", target)).x_cache == "MISS"

    async def update(request: web.Request) -> web.Response:
        return web.Response(status=201, headers={"Location": "/search?"})

    origin.route("/update", update)
    assert (await proxy.request("POST", "/update", data=b"x")).status == 201
    assert [(await proxy.raw("GET", t)).x_cache for t in ("/search?", "/search")] == ["MISS", "HIT"]


async def test_a_failed_unsafe_request_invalidates_nothing(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)

    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.Response(status=500)
        return web.Response(body=b"kept", headers={"Cache-Control": "max-age=600"})

    origin.route("/f", handler)
    await proxy.get("/f")
    assert (await proxy.request("POST", "/f", data=b"x")).status == 500
    assert (await proxy.get("/f")).x_cache == "HIT"


async def test_a_range_request_is_answered_206_from_a_stored_200(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/g", body=b"0123456789", Cache_Control="max-age=600", ETag='"g"')
    # A miss asks the origin for the range; this origin ignores Range and sends the whole: that
    # is stored, and the range answered from it.
    first = await proxy.get("/g", headers={"Range": "bytes=2-4"})
    assert (first.status, first.body, first.headers["Content-Range"]) == (206, b"234", "bytes 2-4/10")
    assert origin.seen[0].headers["Range"] == "bytes=2-4"
    suffix = await proxy.get("/g", headers={"Range": "bytes=-3"})
    assert (suffix.status, suffix.body, suffix.x_cache) == (206, b"789", "HIT")
    assert suffix.headers["Content-Length"] == "3"
    beyond = await proxy.get("/g", headers={"Range": "bytes=50-"})
    assert (beyond.status, beyond.headers["Content-Range"]) == (416, "bytes */10")
    mismatch = await proxy.get("/g", headers={"Range": "bytes=0-1", "If-Range": '"other"'})
    assert (mismatch.status, mismatch.body) == (200, b"0123456789")
    several = await proxy.get("/g", headers={"Range": "bytes=0-1,4-5"})
    assert (several.status, several.body) == (200, b"0123456789")
    assert origin.count("/g") == 1


async def test_the_age_header_counts_the_time_in_the_cache_rfc_9111_section_5_1(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/a", Cache_Control="max-age=600", Age="30")
    await proxy.get("/a")
    clock.advance(10)
    assert (await proxy.get("/a")).headers["Age"] == "40"


async def test_a_304_freshens_the_stored_headers_but_not_the_excluded_ones(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    state = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        state["n"] += 1
        date = format_http_date(clock())
        if request.headers.get("If-None-Match") == '"r"':
            return web.Response(status=304, headers={
                "Date": date, "ETag": '"r"', "Cache-Control": "max-age=100", "X-Version": "2",
                "Content-MD5": "bmV3", "Set-Cookie": "s=1"})
        return web.Response(body=b"stored body", headers={
            "Date": date, "ETag": '"r"', "Cache-Control": "max-age=1", "X-Version": "1",
            "Content-MD5": "b2xk"})

    origin.route("/u", handler)
    await proxy.get("/u")
    clock.advance(5)
    revalidated = await proxy.get("/u")
    assert (revalidated.x_cache, revalidated.body) == ("REVALIDATED", b"stored body")
    assert (revalidated.headers["X-Version"], revalidated.headers["Content-MD5"]) == ("2", "b2xk")
    # The 304's Set-Cookie is the revalidating client's own, never stored with the headers.
    assert revalidated.headers.getall("Set-Cookie") == ["s=1"]
    clock.advance(50)  # fresh for 100 s from the 304 on
    hit = await proxy.get("/u")
    assert hit.x_cache == "HIT" and "Set-Cookie" not in hit.headers
    assert state["n"] == 2


async def test_targeted_fields_win_over_cache_control_for_this_cache_rfc_9213(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/t", Cache_Control="no-store", CDN_Cache_Control="max-age=60")
    route(origin, clock, "/u", Cache_Control="max-age=60", Cachegate_Cache_Control="no-store")
    for _ in range(2):
        await proxy.get("/t")
        await proxy.get("/u")
    assert (origin.count("/t"), origin.count("/u")) == (1, 2)


async def test_cachegate_announces_its_surrogate_capability_and_drops_the_client_s(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/sc", Cache_Control="no-store", Surrogate_Control="max-age=60;cachegate")
    await proxy.get("/sc", headers={"Surrogate-Capability": 'evil="ESI/1.0"'})
    assert origin.seen[0].headers.getall("Surrogate-Capability") == ['cachegate="Surrogate/1.0"']
    assert (await proxy.get("/sc")).x_cache == "HIT"


async def test_unknown_request_directives_do_not_switch_caching_off(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/q", Cache_Control="max-age=60")
    fields = {"Cache-Control": "nothing-to-see-here", "Pragma": "foo"}
    assert [(await proxy.get("/q", headers=fields)).x_cache for _ in range(2)] == ["MISS", "HIT"]


async def test_a_response_stored_already_stale_is_not_replayed_to_the_next_request(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    proxy = await clocked(make_proxy, clock)
    n = {"count": 0}

    async def handler(request: web.Request) -> web.Response:
        n["count"] += 1
        now = format_http_date(clock())
        return web.Response(body=str(n["count"]).encode(), headers={"Date": now, "Expires": now})

    origin.route("/z", handler)
    assert [(await proxy.get("/z")).body for _ in range(3)] == [b"1", b"2", b"3"]


async def test_a_single_upstream_answering_5xx_is_not_taken_out_by_default(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    """Passive checks would leave no upstream at all: every other URL would get 503."""
    proxy = await clocked(make_proxy, clock)
    route(origin, clock, "/broken", status=503)
    route(origin, clock, "/fine", body=b"fine")
    assert [(await proxy.get("/broken")).status for _ in range(5)] == [503] * 5
    fine = await proxy.get("/fine")
    assert (fine.status, fine.body) == (200, b"fine")
    assert origin.count("/broken") == 5
