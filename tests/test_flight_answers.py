"""What a flight's clients get once it has ended: the response the origin gave for it, or a
stored response that is a fresh hit for their own request, never a stored one the flight did
not vouch for; and an origin's 304 counts only as the answer to a conditional request."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin, Proxy, Reply, Versions
from tests.security.misbehaving import Conn, Serve, flight_with, raw_origins, response
from tests.test_coalescing import herd, wait_until

CHUNK = 64 * 1024


async def test_a_revalidation_answered_after_a_soft_purge_does_not_make_the_purged_response_fresh(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    answer_304 = asyncio.Event()
    served = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal served
        served += 1
        if request.headers.get("If-None-Match") == '"1"':
            await answer_304.wait()  # the 304 leaves the origin after the purge
            return web.Response(status=304, headers={
                "Date": format_http_date(clock()), "ETag": '"1"',
                "Cache-Control": "max-age=100, stale-while-revalidate=30"})
        return web.Response(body=b"v%d" % served, headers={
            "Date": format_http_date(clock()), "ETag": f'"{served}"',
            "Cache-Control": "max-age=1, stale-while-revalidate=30"})

    origin.route("/p", handler)
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/p")).body == b"v1"
    clock.advance(2)
    assert (await proxy.get("/p")).x_cache == "UPDATING"  # a background revalidation starts
    for _ in range(200):
        if served == 2:
            break
        await asyncio.sleep(0.01)
    assert served == 2
    host = proxy.url.removeprefix("http://")
    purged = await proxy.admin("POST", "/purge", json={"urls": [f"http://{host}/p"], "soft": True})
    assert purged.status == 200, purged.body
    answer_304.set()
    for _ in range(200):  # the refresh fetches the response anew (a third origin request)
        if served == 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # and stores it
    after = await proxy.get("/p")
    assert after.body == b"v3"  # the response fetched after the purge, not v1 made fresh again
    assert served == 3
    assert proxy.runtime.metrics.unusable_304s.labels("purged").value == 1  # the 304 not used


async def test_a_purge_of_another_key_during_a_revalidation_does_not_make_it_fetch_again(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    answer_304 = asyncio.Event()
    served = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal served
        served += 1
        if request.headers.get("If-None-Match") == '"1"':
            await answer_304.wait()
            return web.Response(status=304, headers={"Date": format_http_date(clock()), "ETag": '"1"',
                                                     "Cache-Control": "max-age=100"})
        return web.Response(body=b"v%d" % served, headers={
            "Date": format_http_date(clock()), "ETag": f'"{served}"', "Cache-Control": "max-age=1"})

    origin.route("/p", handler)
    origin.route("/other", body=b"o", headers={"Cache-Control": "max-age=100"})
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/p")).body == b"v1"
    assert (await proxy.get("/other")).body == b"o"
    clock.advance(2)
    revalidation = asyncio.ensure_future(proxy.get("/p"))
    for _ in range(200):
        if served == 2:
            break
        await asyncio.sleep(0.01)
    host = proxy.url.removeprefix("http://")
    assert (await proxy.admin("POST", "/purge", json={"urls": [f"http://{host}/other"]})).status == 200
    answer_304.set()
    reply = await revalidation
    assert (reply.x_cache, reply.body) == ("REVALIDATED", b"v1")
    assert served == 2  # the 304 was used: no second fetch
    assert sum(proxy.runtime.metrics.unusable_304s.values().values()) == 0


async def test_a_client_too_late_to_join_a_failing_revalidation_is_not_served_the_stale_response(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    calls = 0
    streamed = 0
    go_on = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls, streamed
        calls += 1
        if calls == 1:
            return web.Response(body=b"v1-old", headers={
                "Date": format_http_date(clock()), "ETag": '"1"', "Cache-Control": "max-age=1, must-revalidate"})
        if calls > 2:
            return web.Response(body=b"v3", headers={"Date": format_http_date(clock()),
                                                     "Cache-Control": "max-age=60"})
        # The revalidation: a 3 MiB 503 (more than a flight keeps for clients joining late).
        resp = web.StreamResponse(status=503, headers={"Content-Type": "text/plain"})
        resp.content_length = 48 * CHUNK
        await resp.prepare(request)
        for i in range(48):
            if i == 24:
                await go_on.wait()
            await resp.write(b"e" * CHUNK)
            streamed += CHUNK
            await asyncio.sleep(0.005)
        return resp

    origin.route("/m", handler)
    proxy = await clocked(make_proxy, clock, config=(
        "cache: {memory: 64MB, memory_max_object: 64KB, disk: {path: cache, size: 512MB}}\n"))
    assert (await proxy.get("/m")).body == b"v1-old"
    clock.advance(5)
    leader = asyncio.ensure_future(proxy.get("/m"))
    for _ in range(500):
        if streamed >= 24 * CHUNK:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    late = asyncio.ensure_future(proxy.get("/m"))  # past the flight's kept history: waits for its end
    await asyncio.sleep(0.2)
    go_on.set()
    first, second = await leader, await late
    assert (first.status, len(first.body)) == (503, 48 * CHUNK)
    # The stored response is 5 s stale and must-revalidate, and the flight stored nothing: the
    # late client's request goes to the origin for itself.
    assert (second.status, second.body) == (200, b"v3"), (second.status, second.x_cache, second.cache_status)
    assert calls == 3


async def test_a_follower_asking_for_another_variant_is_not_served_its_stale_variant_after_a_304(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    asked = {"en": 0, "fr": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        lang = request.headers.get("Accept-Language", "en")
        asked[lang] += 1
        fields = {"Date": format_http_date(clock()), "Cache-Control": "max-age=1, must-revalidate",
                  "Vary": "Accept-Language", "ETag": f'"{lang}{asked[lang]}"'}
        validator = request.headers.get("If-None-Match")
        if validator is not None:
            await asyncio.sleep(0.4)
            if validator == f'"{lang}1"':
                return web.Response(status=304, headers=fields | {"ETag": validator, "Cache-Control": "max-age=100"})
        return web.Response(body=f"{lang} v{asked[lang]}".encode(), headers=fields)

    origin.route("/v", handler)
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/v", headers={"Accept-Language": "en"})).body == b"en v1"
    assert (await proxy.get("/v", headers={"Accept-Language": "fr"})).body == b"fr v1"
    clock.advance(5)
    english = asyncio.ensure_future(proxy.get("/v", headers={"Accept-Language": "en"}))
    await asyncio.sleep(0.1)
    french = asyncio.ensure_future(proxy.get("/v", headers={"Accept-Language": "fr"}))  # joins en's flight
    en, fr = await english, await french
    assert (en.x_cache, en.body) == ("REVALIDATED", b"en v1")
    # The 304 was for the English variant: the French one, stale and must-revalidate, is
    # fetched for its client (anew: what it had stored may have changed meanwhile), not
    # served unchecked.
    assert fr.body == b"fr v2", (fr.x_cache, fr.cache_status)
    assert asked == {"en": 2, "fr": 2}, asked


async def test_a_304_to_a_fill_without_conditions_is_a_502_for_every_client(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/n", status=304, headers={"Cache-Control": "max-age=60", "ETag": '"a"'}, delay=0.2)
    proxy = await make_proxy()
    answers = await herd(proxy.url + "/n", 4)
    assert [status for status, _, _ in answers] == [502] * 4, answers
    # The leader's fetch, then one more for its three followers (their own requests were never
    # sent): the second's failure is theirs.
    assert origin.count("/n") == 2
    again = await proxy.get("/n")
    assert again.status == 502  # nothing stored, no hit-for-pass relaying the 304
    assert origin.count("/n") == 3


async def test_the_followers_of_a_revalidation_share_its_304_for_a_no_cache_response(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """``no-cache`` + ETag (the usual HTML setting): clients that joined a revalidation were sent
    with it, and its 304 came after their requests: the response it validated is theirs too
    (RFC 9111 §4.2.4 asks for a validation, not one per client), rather than a full fetch each."""
    async def page(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        fields = {"Cache-Control": "no-cache", "ETag": '"v1"'}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=fields)
        return web.Response(body=b"page", headers=fields)

    origin.route("/html", page)
    proxy = await make_proxy()
    assert (await proxy.get("/html")).body == b"page"
    answers = await herd(proxy.url + "/html", 8)
    assert [(status, body) for status, _, body in answers] == [(200, b"page")] * 8
    assert sorted(x for _, x, _ in answers) == ["REVALIDATED"] * 8, answers
    assert origin.count("/html") == 2  # the fill, then one revalidation for the eight


async def test_a_fill_sent_before_an_invalidation_and_answered_after_it_is_not_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """RFC 9111 §4.4: a successful POST invalidates its target. A GET whose request went to the
    origin before it, and whose answer (rendered from the data as it was) came after, is relayed
    to its client but not stored: it would be served as fresh for its whole max-age."""
    state = {"version": 0}

    async def item(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            state["version"] += 1
            return web.Response(status=204)
        version = state["version"]  # rendered from the data as it is now ...
        await asyncio.sleep(0.6)  # ... slowly
        return web.Response(body=b"item v%d" % version, headers={"Cache-Control": "max-age=600",
                                                                 "Cache-Status": "origin-cdn; hit"})

    origin.route("/item", item)
    origin.route("/other", body=b"o", headers={"Cache-Control": "max-age=600"}, delay=0.6)
    proxy = await make_proxy()
    get = asyncio.ensure_future(proxy.get("/item"))
    other = asyncio.ensure_future(proxy.get("/other"))  # another key's fill, in flight alike
    await asyncio.sleep(0.2)
    assert (await proxy.request("POST", "/item", data=b"x")).status == 204
    answered = await get
    assert answered.body == b"item v0"  # its own answer: sent before the update
    # (sent whole, after its body: its Cache-Status says it was not stored, and why)
    # (the origin's own member relayed as it was, before cachegate's)
    assert answered.headers.getall("Cache-Status") == [
        "origin-cdn; hit", "cachegate; fwd=uri-miss; fwd-status=200; detail=PURGED"]
    assert (await other).body == b"o"
    after = await proxy.get("/item")
    assert (after.body, after.x_cache) == (b"item v1", "MISS"), (after.body, after.x_cache)
    assert (await proxy.get("/other")).x_cache == "HIT"  # what the invalidation did not cover was stored


def purged_count(proxy: Proxy) -> float:
    return proxy.runtime.metrics.registry.get_sample_value(
        "cachegate_not_stored_total", {"reason": "PURGED"}) or 0.0


async def test_a_fill_purged_while_its_body_streams_is_counted_not_stored_as_purged(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """Its head went out saying stored (the body's end was not there yet); the purge that came
    meanwhile keeps it out of the cache, and it is counted under PURGED as the other reasons a
    response is not stored are (``cachegate_not_stored_total``, the metrics docs: by detail)."""
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=600", "Content-Length": "20"})
        await resp.prepare(request)
        await resp.write(b"0123456789")
        started.set()
        await asyncio.sleep(0.5)
        await resp.write(b"abcdefghij")
        return resp

    origin.route("/slow", slow)
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8, '::1/128']}\n")
    get = asyncio.ensure_future(proxy.get("/slow"))
    await started.wait()
    assert (await proxy.admin("POST", "/purge", json={"urls": [f"{proxy.url}/slow"]})).status == 200
    answered = await get
    assert answered.body == b"0123456789abcdefghij"
    assert purged_count(proxy) == 1
    assert (await proxy.get("/slow")).x_cache == "MISS"  # not stored
    assert purged_count(proxy) == 1


STALE_IF_ERROR = {"Cache-Control": "max-age=1, stale-if-error=60"}
NEW_BODY = b"new" * 1000  # small: each client is sent it whole, its head with it


def broken_refetch(broken: str, go: asyncio.Event, first: bytes | None = None) -> Serve:
    """An origin whose first answer (when ``first``) is whole, and every later one a head and part
    of its body, once ``go`` is set: then the connection closes ("short") or falls silent ("stall")."""
    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            if first is not None and len(conn.origin.requests) == 1:
                await conn.send(response("200 OK", {**STALE_IF_ERROR, "ETag": '"v1"'}, first))
                continue
            await go.wait()
            await conn.send(response("200 OK", {**STALE_IF_ERROR, "ETag": '"v2"'}, NEW_BODY)[:-500])
            if broken == "stall":
                await asyncio.sleep(5)
            return

    return serve


async def three_clients(proxy: Proxy, go: asyncio.Event) -> list[Reply]:
    """A leader and two followers of one flight, answered once ``go`` lets its origin answer."""
    clients = [asyncio.ensure_future(proxy.get("/p")) for _ in range(3)]
    await flight_with(proxy, 2)
    go.set()
    replies = await asyncio.gather(*clients, return_exceptions=True)
    assert all(isinstance(r, Reply) for r in replies), replies  # none broken off: nothing was sent
    return [r for r in replies if isinstance(r, Reply)]


@pytest.mark.parametrize("broken", ["short", "stall"])
async def test_a_refetch_whose_small_body_breaks_off_serves_every_client_the_stale_response(
        make_proxy: MakeProxy, clock: Clock, broken: str) -> None:
    # Nothing of the new response had gone out (a small body is sent whole, its head with it):
    # stale-if-error holds as when the origin fails before its head, for leader and followers.
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(broken_refetch(broken, go, first=b"old"))
        proxy = await make_proxy(config="upstream: {timeouts: {read: 300ms}, retries: 0}\n",
                                 upstreams=[origin.url])
        proxy.runtime.engine.clock = clock
        assert (await proxy.get("/p")).body == b"old"
        clock.advance(2)  # stale, within its stale-if-error
        replies = await three_clients(proxy, go)
        assert [(r.status, r.x_cache, r.body, r.headers["ETag"]) for r in replies] == \
            [(200, "STALE", b"old", '"v1"')] * 3
        assert all("detail=ORIGIN-UNREACHABLE" in r.cache_status for r in replies)
        assert len(origin.requests) == 2
        again = await proxy.get("/p")  # the stored response is still the one stored
        assert (again.x_cache, again.body) == ("STALE", b"old")


@pytest.mark.parametrize(("broken", "status", "detail", "said"), [
    ("short", 502, "UPSTREAM-BROKE-OFF", b"the origin server's response body broke off"),
    ("stall", 504, "UPSTREAM-TIMEOUT", b"the origin server did not answer in time")])
async def test_a_fill_whose_small_body_breaks_off_is_the_same_gateway_error_for_every_client(
        make_proxy: MakeProxy, broken: str, status: int, detail: str, said: bytes) -> None:
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(broken_refetch(broken, go))
        proxy = await make_proxy(config="upstream: {timeouts: {read: 300ms}, retries: 0}\n",
                                 upstreams=[origin.url])
        replies = await three_clients(proxy, go)
        assert [(r.status, r.x_cache) for r in replies] == [(status, "MISS")] * 3
        # One went upstream; the two that waited for its fetch say so (``collapsed``).
        assert sorted(r.cache_status for r in replies) == sorted(
            [f"cachegate; fwd=uri-miss; detail={detail}"]
            + [f"cachegate; fwd=uri-miss; collapsed; detail={detail}"] * 2)
        # What the body says agrees with its detail (a body cut short read "an invalid response").
        assert all(said in r.body for r in replies), [r.body for r in replies]
        assert len(origin.requests) == 1


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/3.0", "HTTP/9.9", "HTTP/1.2", "HTTP/0.9"])
async def test_a_status_line_of_another_http_version_is_a_502_never_stored(
        make_proxy: MakeProxy, version: str) -> None:
    """HTTP/2 has no text status line: "HTTP/2.0 200 OK" from an origin asked in HTTP/1.1 is not
    a valid response. It was relayed and stored (llhttp reads any major version; only HTTP/1.2
    was refused)."""
    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(f"{version} 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok"
                            .encode())

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        for _ in range(2):
            reply = await proxy.get("/p")
            assert (reply.status, reply.cache_status) == (502, "cachegate; fwd=uri-miss; detail=UPSTREAM-INVALID")
        assert len(origin.requests) == 2  # nothing was stored


async def test_an_http_1_0_status_line_is_relayed_and_stored(make_proxy: MakeProxy) -> None:
    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.0 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok")

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        assert [((r := await proxy.get("/p")).status, r.x_cache, r.body) for _ in range(2)] == [
            (200, "MISS", b"ok"), (200, "HIT", b"ok")]
        assert len(origin.requests) == 1


async def test_an_invalid_response_is_a_502_that_says_so(make_proxy: MakeProxy) -> None:
    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nhi")

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        reply = await proxy.get("/p")
        assert (reply.status, reply.cache_status) == (502, "cachegate; fwd=uri-miss; detail=UPSTREAM-INVALID")


# How the tests below purge (or invalidate) the URL: admin by URL, by tag, soft; PURGE; a POST.
LATE_PURGES = ["url", "tag", "soft", "PURGE", "POST"]


async def purge_by(proxy: Proxy, how: str) -> int:
    host = proxy.url.removeprefix("http://")
    match how:
        case "url" | "soft":
            spec: dict[str, object] = {"urls": [f"http://{host}/p"], "soft": how == "soft"}
            return (await proxy.admin("POST", "/purge", json=spec)).status
        case "tag":
            return (await proxy.admin("POST", "/purge", json={"tags": ["t1"]})).status
        case "PURGE":
            return (await proxy.request("PURGE", "/p")).status
        case _:
            return (await proxy.request("POST", "/p", data=b"x")).status  # RFC 9111 §4.4


@pytest.mark.parametrize("how", LATE_PURGES)
async def test_a_client_arriving_after_a_purge_does_not_join_a_fill_whose_request_went_out_before_it(
        origin: Origin, make_proxy: MakeProxy, how: str) -> None:
    """The fill's request went out, the purge answered, and only then came the origin's head
    (rendered from the data before the purge). Its own clients, the one that made it and one
    that joined before the purge, get that answer, labelled as not stored; a client arriving
    after the purge's answer fetches anew (it joined the old fill, and got its body as a HIT)."""
    v = Versions(tag="t1")
    origin.route("/p", v.page)
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8, '::1/128']}\n")
    first = asyncio.ensure_future(proxy.get("/p"))
    await wait_until(lambda: v.gets == 1)
    early = asyncio.ensure_future(proxy.get("/p"))
    old = await flight_with(proxy, 1)  # joined before the purge
    assert await purge_by(proxy, how) in (200, 204)
    v.version = 2  # the origin's data changed (the POST's did so itself)
    late = [asyncio.ensure_future(proxy.get("/p")) for _ in range(3)]
    # (the late clients either fetch anew or, wrongly, join the old fill)
    await wait_until(lambda: v.gets == 2 or old.followers == 4)
    v.head.set()
    answers = [await first, await early]
    assert [r.body for r in answers] == [b"v1", b"v1"]  # its own clients get its answer ...
    # ... said not to be stored, as is: the one that went upstream a MISS, the one that waited a HIT
    assert [(r.x_cache, r.cache_status) for r in answers] == [
        ("MISS", "cachegate; fwd=uri-miss; fwd-status=200; detail=PURGED"),
        ("HIT", "cachegate; fwd=uri-miss; fwd-status=200; collapsed; detail=PURGED")]
    after = [await r for r in late]
    assert [r.body for r in after] == [b"v2"] * 3, [(r.body, r.x_cache, r.cache_status) for r in after]
    assert sorted(r.x_cache for r in after) == ["HIT", "HIT", "MISS"]  # one fetch for the three
    assert v.gets == 2
    again = await proxy.get("/p")
    assert (again.body, again.x_cache) == (b"v2", "HIT")


async def test_a_herd_with_purges_of_other_tags_every_50_ms_costs_one_origin_request(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A CMS purges unrelated tags all the time. Before the head the fill's tags are not known,
    but such a purge does not cover its answer: every client joins the one fill (each late one
    started a new fill of its own, itself overtaken by the next purge: 38 origin requests for
    200 clients over 2 s)."""
    gets = 0
    head = asyncio.Event()

    async def item(request: web.Request) -> web.StreamResponse:
        nonlocal gets
        gets += 1
        await head.wait()
        return web.Response(body=b"v1", headers={"Cache-Control": "max-age=600", "Surrogate-Key": "t1"})

    origin.route("/p", item)
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8, '::1/128']}\n")
    first = asyncio.ensure_future(proxy.get("/p"))
    await wait_until(lambda: gets == 1)
    late = []
    for i in range(8):  # a purge of another tag (or of everything else's URL), then a client
        spec = {"tags": [f"other-{i}"]} if i % 2 else {"urls": [f"{proxy.url}/other"]}
        assert (await proxy.admin("POST", "/purge", json=spec)).status == 200
        late.append(asyncio.ensure_future(proxy.get("/p")))
        await flight_with(proxy, i + 1)  # it joined the one fill
        await asyncio.sleep(0.05)
    head.set()
    answers = [await first, *[await r for r in late]]
    assert [r.body for r in answers] == [b"v1"] * 9
    assert [r.x_cache for r in answers] == ["MISS"] + ["HIT"] * 8
    assert gets == 1
    again = await proxy.get("/p")  # and it was stored: no purge covered it
    assert (again.body, again.x_cache) == (b"v1", "HIT")
    assert gets == 1


@pytest.mark.parametrize("how", ["tag", "all"])
async def test_a_purge_covering_a_fill_before_its_head_sends_only_the_clients_after_it_anew(
        origin: Origin, make_proxy: MakeProxy, how: str) -> None:
    """Among purges of other tags, one by the fill's own tag (or of everything) answers before
    the origin's head: the clients who joined before it get the fill's answer, those who came
    after it get the new body, from one new fetch."""
    v = Versions(tag="t1")
    origin.route("/p", v.page)
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8, '::1/128']}\n")
    first = asyncio.ensure_future(proxy.get("/p"))
    await wait_until(lambda: v.gets == 1)
    assert (await proxy.admin("POST", "/purge", json={"tags": ["other"]})).status == 200
    early = asyncio.ensure_future(proxy.get("/p"))
    old = await flight_with(proxy, 1)  # joined after a purge that does not cover it
    spec = {"tags": ["t1"]} if how == "tag" else {"all": True}
    assert (await proxy.admin("POST", "/purge", json=spec)).status == 200
    v.version = 2
    assert (await proxy.admin("POST", "/purge", json={"tags": ["other"]})).status == 200
    late = [asyncio.ensure_future(proxy.get("/p")) for _ in range(3)]
    await wait_until(lambda: old.followers == 4)  # they join: its tags are not known yet
    v.head.set()
    answers = [await first, await early]
    assert [(r.body, r.x_cache) for r in answers] == [(b"v1", "MISS"), (b"v1", "HIT")]
    after = [await r for r in late]
    assert [r.body for r in after] == [b"v2"] * 3, [(r.body, r.x_cache, r.cache_status) for r in after]
    assert sorted(r.x_cache for r in after) == ["HIT", "HIT", "MISS"]  # one fetch for the three
    assert v.gets == 2
    again = await proxy.get("/p")
    assert (again.body, again.x_cache) == (b"v2", "HIT")


async def test_a_purge_of_another_url_does_not_keep_a_client_from_joining_a_fill_in_flight(
        origin: Origin, make_proxy: MakeProxy) -> None:
    gets = 0
    head = asyncio.Event()

    async def item(request: web.Request) -> web.StreamResponse:
        nonlocal gets
        gets += 1
        await head.wait()
        return web.Response(body=b"v1", headers={"Cache-Control": "max-age=600"})

    origin.route("/p", item)
    proxy = await make_proxy()
    first = asyncio.ensure_future(proxy.get("/p"))
    await wait_until(lambda: gets == 1)
    host = proxy.url.removeprefix("http://")
    assert (await proxy.admin("POST", "/purge", json={"urls": [f"http://{host}/other"]})).status == 200
    late = asyncio.ensure_future(proxy.get("/p"))
    await flight_with(proxy, 1)  # it joined
    head.set()
    assert [(r.body, r.x_cache) for r in (await first, await late)] == [(b"v1", "MISS"), (b"v1", "HIT")]
    assert gets == 1
