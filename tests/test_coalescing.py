"""Stampede protection: one origin fetch per key, bounded waits, hit-for-pass, stale serving."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Handler, Origin, Proxy

BODY = bytes(range(256)) * 1024  # 256 KiB: streamed to waiters in several chunks


async def herd(url: str, n: int, headers: dict[str, str] | None = None) -> list[tuple[int, str, bytes]]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def one() -> tuple[int, str, bytes]:
            async with session.get(url, headers=headers) as resp:
                return resp.status, resp.headers.get("X-Cache-Status", ""), await resp.read()

        return await asyncio.gather(*(one() for _ in range(n)))


async def test_500_concurrent_misses_make_exactly_one_origin_request(origin: Origin, proxy: Proxy) -> None:
    origin.route("/cold", body=BODY, headers={"Cache-Control": "max-age=60"}, delay=0.2)
    results = await herd(proxy.url + "/cold", 500)
    assert origin.count("/cold") == 1
    digest = hashlib.sha256(BODY).hexdigest()
    assert {(status, hashlib.sha256(body).hexdigest()) for status, _, body in results} == {(200, digest)}
    statuses = [x for _, x, _ in results]
    assert statuses.count("MISS") == 1
    assert statuses.count("HIT") == 499
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert "cachegate_coalesced_requests_total 499.0" in metrics


async def test_waiters_are_not_given_a_response_that_is_not_shareable(origin: Origin, proxy: Proxy) -> None:
    calls = 0

    async def personal(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        mine = calls
        await asyncio.sleep(0.2)
        return web.Response(text=f"for caller {mine}", headers={"Cache-Control": "private, max-age=60"})

    origin.route("/me", personal)
    results = await herd(proxy.url + "/me", 10)
    bodies = {body for _, _, body in results}
    assert len(bodies) == 10  # every client got its own response
    assert origin.count("/me") == 10
    key = proxy.url.removeprefix("http://")
    assert proxy.runtime.engine.coalescer.is_pass(f"http://{key}/me")  # hit-for-pass remembered
    # The next herd goes straight through: nobody waits for anybody.
    results = await herd(proxy.url + "/me", 10)
    assert len({body for _, _, body in results}) == 10
    assert origin.count("/me") == 20


class Gathering:
    """An origin route that, while ``gather`` is set, holds each request until that many are
    in at once (5 s at most), then answers them all; ``peaks`` gets how many were in at once
    when each was answered. Else it answers after 0.2 s. ``storable``: it answers max-age=60."""

    def __init__(self, status: int, cache_control: str) -> None:
        self.status, self.cache_control = status, cache_control
        self.gather = 0
        self.storable = False
        self.inside = 0
        self.peaks: list[int] = []
        self.everyone = asyncio.Event()

    async def __call__(self, request: web.Request) -> web.Response:
        self.inside += 1
        if self.gather:
            if self.inside >= self.gather:
                self.everyone.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.everyone.wait(), 5.0)
        else:
            await asyncio.sleep(0.2)
        self.peaks.append(self.inside)
        self.inside -= 1
        return web.Response(status=self.status, body=b"x", headers={
            "Cache-Control": "max-age=60" if self.storable else self.cache_control})


@pytest.mark.parametrize(("status", "cache_control"), [(503, ""), (200, "max-age=0"), (200, "no-cache")])
async def test_an_answer_nothing_may_reuse_makes_the_next_herd_go_straight_through(
        origin: Origin, proxy: Proxy, status: int, cache_control: str) -> None:
    # Not stored because nothing may reuse it (a 503 without freshness, a lifetime of 0, no-cache
    # without a validator): hit-for-pass, as Varnish's hit-for-miss for a ttl <= 0. The next
    # herd's requests all reach the origin at once, rather than one (the leader's) and the rest
    # only after its answer: every herd used to wait in line.
    route = Gathering(status, cache_control)
    origin.route("/u", route)
    first = await herd(proxy.url + "/u", 8)
    # Not given the leader's answer (RFC 9111 §4: no reuse without validation; a 503 neither):
    # each asked for its own, after the leader's head.
    assert origin.count("/u") == 8 and {s for s, _, _ in first} == {status}
    key = proxy.url.removeprefix("http://")
    assert proxy.runtime.engine.coalescer.is_pass(f"http://{key}/u")
    route.gather = 8
    second = await herd(proxy.url + "/u", 8)
    assert origin.count("/u") == 16 and {s for s, _, _ in second} == {status}
    assert max(route.peaks[8:]) == 8  # all in at once: nobody waited for anybody
    # Within the mark, an answer that became storable is stored, and ends the mark.
    route.gather, route.storable = 0, True
    assert (await proxy.get("/u")).x_cache == "MISS"
    assert (await proxy.get("/u")).x_cache == "HIT"
    assert origin.count("/u") == 17
    assert not proxy.runtime.engine.coalescer.is_pass(f"http://{key}/u")


@pytest.mark.parametrize(("field", "value", "refusal"), [
    ("Cookie", "huge=1", 400), ("X-Rate", "limited", 429), ("Cookie", "s=1", 503)])
async def test_one_clients_refused_request_does_not_stop_the_next_herd_from_coalescing(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, field: str, value: str, refusal: int) -> None:
    # The origin refuses one client's request (its huge cookie, its rate limit, its token): a
    # 400/429 (or a 5xx to a request with credentials) without freshness, UNCACHEABLE-STATUS,
    # marked the key hit-for-pass: the next herd of plain clients sent 20 requests, not 1, on a
    # cold key and on a stale one alike (a revalidation stampede anyone could set off every few
    # seconds).
    async def page(request: web.Request) -> web.Response:
        if field in request.headers:
            return web.Response(status=refusal, text="refused")
        await asyncio.sleep(0.5)  # the herd has joined the flight by then
        return web.Response(text="page", headers={"Cache-Control": "max-age=2", "Date": format_http_date(clock())})

    origin.route("/r", page)
    proxy = await clocked(make_proxy, clock)
    key = "http://" + proxy.url.removeprefix("http://") + "/r"
    refused = await proxy.get("/r", headers={field: value})
    assert refused.status == refusal
    assert not proxy.runtime.engine.coalescer.is_pass(key)
    results = await herd(proxy.url + "/r", 20)
    assert {(status, body) for status, _, body in results} == {(200, b"page")}
    assert origin.count("/r") == 2  # the refused request, then one for the herd
    clock.advance(3)  # stale now (max-age=2)
    assert (await proxy.get("/r", headers={field: value})).status == refusal
    assert not proxy.runtime.engine.coalescer.is_pass(key)
    results = await herd(proxy.url + "/r", 20)
    assert {(status, body) for status, _, body in results} == {(200, b"page")}
    assert origin.count("/r") == 4  # one revalidation for the herd


async def test_one_request_with_authorization_does_not_stop_the_next_herd_from_coalescing(
        origin: Origin, proxy: Proxy) -> None:
    # Not stored because of the request's Authorization, not because of the response: the key
    # is not made hit-for-pass (any client could otherwise turn coalescing off for a URL).
    origin.route("/page", body=b"page", headers={"Cache-Control": "max-age=60"}, delay=0.2)
    first = await proxy.get("/page", headers={"Authorization": "Bearer x"})
    assert (first.x_cache, first.body) == ("MISS", b"page")
    results = await herd(proxy.url + "/page", 20)
    assert {body for _, _, body in results} == {b"page"}
    assert origin.count("/page") == 2  # one fetch for the whole herd


async def test_a_waiter_goes_upstream_itself_after_lock_timeout(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/slow", body=b"slow", headers={"Cache-Control": "max-age=60"}, delay=1.0)
    proxy = await make_proxy(config="cache: {lock_timeout: 200ms, disk: {path: cache, size: 64MB}}\n")
    results = await herd(proxy.url + "/slow", 3)
    assert {(s, b) for s, _, b in results} == {(200, b"slow")}
    assert origin.count("/slow") == 3


# -- stale serving: the engine's clock is the test's, so nothing sleeps for freshness to run out --

def versions(clock: Clock, cache_control: str, delay: float = 0.0,
             answers: list[tuple[int, bytes]] | None = None) -> Handler:
    """A handler answering v1, v2, ... (or the given (status, body) answers in turn), its Date
    from the test's clock."""
    served = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        status, body = answers.pop(0) if answers else (200, f"v{served}".encode())
        if delay and served > 1:
            await asyncio.sleep(delay)
        return web.Response(status=status, body=body, headers={
            "Date": format_http_date(clock()), "Cache-Control": cache_control, "ETag": f'"{served}"'})

    return handler


async def test_stale_while_revalidate_refreshes_once_whatever_arrives_during_the_refresh(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    origin.route("/swr", versions(clock, "max-age=1, stale-while-revalidate=30", delay=0.4))
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/swr")).body == b"v1"
    clock.advance(2)
    results = await herd(proxy.url + "/swr", 20)
    assert {(s, x, b) for s, x, b in results} == {(200, "UPDATING", b"v1")}
    # Requests keep coming while the refresh is at the origin: none starts another.
    for _ in range(10):
        reply = await proxy.get("/swr")
        assert (reply.x_cache, reply.body) == ("UPDATING", b"v1")
        await asyncio.sleep(0.02)
    await wait_until(lambda: origin.count("/swr") == 2)
    for _ in range(50):
        if (await proxy.get("/swr")).body == b"v2":
            break
        await asyncio.sleep(0.02)
    fresh = await proxy.get("/swr")
    assert (fresh.body, fresh.x_cache) == (b"v2", "HIT")
    assert origin.count("/swr") == 2  # one background refresh for everyone


def stale_then(clock: Clock, cache_control: str, status: int, headers: dict[str, str] | None = None) -> Handler:
    """A handler answering OLD (no validators) once, then ``status`` with ``headers`` to every
    request, its Date from the test's clock."""
    served = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        dated = {"Date": format_http_date(clock())}
        if served == 1:
            return web.Response(body=b"OLD", headers={**dated, "Cache-Control": cache_control})
        return web.Response(status=status, body=b"" if status == 304 else b"down", headers={**dated, **(headers or {})})

    return handler


async def updating(proxy: Proxy) -> tuple[str, bytes]:
    """One request, once any refresh it started has ended."""
    reply = await proxy.get("/r")
    await wait_until(lambda: proxy.runtime.engine.coalescer.in_flight == 0)
    return reply.x_cache, reply.body


async def test_a_refresh_answered_304_to_a_request_without_validators_leaves_the_stale_response_stale(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """The stored response has no validators: its refresh asks unconditionally, and a 304 to
    that is the origin's fault. It freshened the old response (a HIT with the 304's max-age)."""
    origin.route("/r", stale_then(clock, "max-age=1, stale-while-revalidate=60", 304,
                                  {"Cache-Control": "max-age=100"}))
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/r")).body == b"OLD"
    clock.advance(2)
    assert await updating(proxy) == ("UPDATING", b"OLD")
    assert origin.count("/r") == 2
    assert not [k for k in origin.seen[-1].headers if k.lower().startswith("if-")]
    assert await updating(proxy) == ("UPDATING", b"OLD")  # still stale, not a HIT


@pytest.mark.parametrize(("status", "headers", "backoff"), [
    (503, {}, 5), (503, {"Retry-After": "30"}, 30), (500, {"Retry-After": "5000"}, 599),  # capped by the window
    (304, {"Cache-Control": "max-age=100"}, 5)])  # a 304 it did not ask for
async def test_a_failed_refresh_is_not_retried_by_every_request_until_its_while_is_over(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, status: int, headers: dict[str, str],
        backoff: int) -> None:
    """Every request the stale response answered started another refresh of it: a failing
    origin got one request per client request for the whole stale-while-revalidate window."""
    origin.route("/r", stale_then(clock, "max-age=1, stale-while-revalidate=600", status, headers))
    proxy = await clocked(make_proxy, clock)
    await proxy.get("/r")
    clock.advance(2)  # stale for 1 s: 599 s left of the window
    for _ in range(10):
        assert await updating(proxy) == ("UPDATING", b"OLD")
    assert origin.count("/r") == 2  # one refresh, then none for its while
    clock.advance(backoff - 1)
    assert await updating(proxy) == ("UPDATING", b"OLD")
    assert origin.count("/r") == 2
    clock.advance(1)
    assert await updating(proxy) == ("UPDATING", b"OLD")
    assert origin.count("/r") == 3  # its while is over: one more refresh


async def explained(proxy: Proxy) -> dict[str, Any]:
    """GET /explain's decision for /r."""
    reply = await proxy.admin("GET", f"/explain?url={quote(proxy.url + '/r')}")
    assert reply.status == 200, reply.body
    decision: dict[str, Any] = json.loads(reply.body)["decision"]
    return decision


@pytest.mark.parametrize(("spec", "lifted"), [
    ({"urls": ["/r"], "soft": True}, True),  # the operator's "the origin is mended: refresh it"
    ({"tags": ["t1"], "soft": True}, True),
    ({"tags": ["other"], "soft": True}, False),  # it does not cover the response: the wait holds
])
async def test_a_purge_covering_a_stale_response_lifts_the_wait_after_its_failed_refresh(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, spec: dict[str, object], lifted: bool) -> None:
    """A refresh failed with Retry-After: 3600; the origin recovered and the operator soft-purged
    the URL: every request for the next hour was still UPDATING with the old body, and no
    refresh went to the origin."""
    state = {"served": 0, "down": False}

    async def handler(request: web.Request) -> web.Response:
        state["served"] += 1
        dated = {"Date": format_http_date(clock()), "Surrogate-Key": "t1"}
        if state["down"]:
            return web.Response(status=503, body=b"down", headers={**dated, "Retry-After": "3600"})
        body = b"OLD" if state["served"] == 1 else b"NEW"
        return web.Response(body=body, headers={**dated, "Cache-Control": "max-age=1, stale-while-revalidate=86400"})

    origin.route("/r", handler)
    proxy = await clocked(make_proxy, clock,
                          config="admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8, '::1/128']}\n")
    assert (await proxy.get("/r")).body == b"OLD"
    clock.advance(2)
    state["down"] = True
    assert await updating(proxy) == ("UPDATING", b"OLD")
    assert origin.count("/r") == 2  # the refresh failed: the next waits an hour
    state["down"] = False
    clock.advance(1)
    assert (await explained(proxy))["refresh_held_back"] == 3599  # GET /explain says so
    if "urls" in spec:
        spec = {**spec, "urls": [proxy.url + "/r"]}
    assert (await proxy.admin("POST", "/purge", json=spec)).status == 200
    decision = await explained(proxy)  # what the next request does
    assert ("refresh_held_back" not in decision) is lifted, decision
    assert ("one background request revalidates it" in decision["why"]) is lifted, decision["why"]
    assert await updating(proxy) == ("UPDATING", b"OLD")  # (stale: served at once)
    if lifted:
        assert origin.count("/r") == 3  # one refresh, at once
        assert (await proxy.get("/r")).body == b"NEW"
    else:
        assert origin.count("/r") == 2
        assert await updating(proxy) == ("UPDATING", b"OLD")
        assert origin.count("/r") == 2


@pytest.mark.parametrize("step", [-2 * 86400, -600, 3600])
async def test_a_failed_refresh_waits_its_while_of_time_passed_whatever_the_wall_clock_is_set_to(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, step: float) -> None:
    """The wait after a failed refresh was a mark on the wall clock: set back two days once it
    had failed, every request was served the old copy (UPDATING) for two days, the mended
    origin never asked, and GET /explain said the refresh was held back two days more."""
    state = {"served": 0, "down": False}

    async def handler(request: web.Request) -> web.Response:
        state["served"] += 1
        dated = {"Date": format_http_date(clock())}
        if state["down"]:
            return web.Response(status=500, body=b"down", headers=dated)
        body = b"OLD" if state["served"] == 1 else b"NEW"
        return web.Response(body=body, headers={**dated, "Cache-Control": "max-age=60, stale-while-revalidate=300"})

    origin.route("/r", handler)
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/r")).body == b"OLD"
    clock.advance(70)
    state["down"] = True
    assert await updating(proxy) == ("UPDATING", b"OLD")
    assert origin.count("/r") == 2  # the refresh failed: the next waits 5 s
    state["down"] = False
    clock.step(step)
    clock.advance(1)
    decision = await explained(proxy)
    if "refresh_held_back" in decision:  # (set forwards, the copy may be past its windows)
        assert decision["refresh_held_back"] == 4, decision
        assert "for 4s more" in decision["why"], decision["why"]
        assert await updating(proxy) == ("UPDATING", b"OLD")
        assert origin.count("/r") == 2  # its while holds
    clock.advance(4)  # its while is over, whatever the wall clock says
    await updating(proxy)
    assert origin.count("/r") == 3  # asked again
    assert (await proxy.get("/r")).body == b"NEW"


async def test_a_clients_max_stale_bounds_what_stale_while_revalidate_serves_it(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """A client that accepts at most 1 s of staleness was served a response 3 s stale
    (UPDATING) because it was within the origin's stale-while-revalidate window."""
    origin.route("/m", versions(clock, "max-age=1, stale-while-revalidate=600"))
    proxy = await clocked(make_proxy, clock)
    await proxy.get("/m")
    clock.advance(4)  # stale for 3 s
    within = await proxy.get("/m", headers={"Cache-Control": "max-stale=5"})
    assert (within.x_cache, within.body) == ("STALE", b"v1")
    bounded = await proxy.get("/m", headers={"Cache-Control": "max-stale=1"})
    assert (bounded.x_cache, bounded.body) == ("EXPIRED", b"v2")  # revalidated first: a new response
    assert origin.count("/m") == 2


async def test_stale_if_error_with_the_origin_stopped_within_the_window_then_the_error(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    origin.route("/sie", versions(clock, "max-age=1, stale-if-error=10"))
    proxy = await clocked(make_proxy, clock)
    await proxy.get("/sie")
    await origin.stop(hold_port=True)
    clock.advance(6)  # stale for 5 s: inside the 10 s window
    stale = await proxy.get("/sie")
    assert (stale.status, stale.body, stale.x_cache) == (200, b"v1", "STALE")
    assert "detail=ORIGIN-UNREACHABLE" in stale.cache_status
    clock.advance(10)  # stale for 15 s: past the window, the error passes through
    after = await proxy.get("/sie")
    assert (after.status, after.x_cache) == (502, "EXPIRED")  # a stored response went forward stale
    assert "detail=UPSTREAM-UNREACHABLE" in after.cache_status


async def test_stale_if_error_with_an_origin_that_times_out_within_the_window_then_504(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    origin.route("/slow", versions(clock, "max-age=1, stale-if-error=10", delay=2.0))
    proxy = await clocked(make_proxy, clock, config="upstream: {timeouts: {read: 200ms}, retries: 0}\n")
    await proxy.get("/slow")
    clock.advance(6)
    stale = await proxy.get("/slow")
    assert (stale.status, stale.body, stale.x_cache) == (200, b"v1", "STALE")
    clock.advance(10)
    after = await proxy.get("/slow")
    assert after.status == 504
    assert "detail=UPSTREAM-TIMEOUT" in after.cache_status


async def test_stale_if_error_covers_5xx_answers_within_the_window_then_the_5xx_passes(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    answers = [(200, b"good"), (503, b"down for maintenance"), (503, b"down for maintenance")]
    origin.route("/e", versions(clock, "max-age=1, stale-if-error=10", answers=answers))
    proxy = await clocked(make_proxy, clock)
    await proxy.get("/e")
    clock.advance(6)
    reply = await proxy.get("/e")
    assert (reply.status, reply.body, reply.x_cache) == (200, b"good", "STALE")
    assert "fwd-status=503" in reply.cache_status
    clock.advance(10)
    after = await proxy.get("/e")
    assert (after.status, after.body) == (503, b"down for maintenance")


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate"])
async def test_must_and_proxy_revalidate_are_never_served_stale(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, directive: str) -> None:
    cc = f"max-age=1, {directive}, stale-while-revalidate=60, stale-if-error=60"
    answers = [(200, b"v1"), (200, b"v2"), (503, b"broken")]
    origin.route("/m", versions(clock, cc, delay=0.1, answers=answers))
    rules = "defaults:\n  stale_while_revalidate: 1h\n  stale_if_error: 1h\nrules: []\n"
    proxy = await clocked(make_proxy, clock, rules=rules)
    await proxy.get("/m")
    clock.advance(5)
    # Not UPDATING with the old body: the client waits for the origin.
    reply = await proxy.get("/m")
    assert (reply.status, reply.body) == (200, b"v2") and reply.x_cache != "UPDATING"
    clock.advance(5)
    failed = await proxy.get("/m")  # a 5xx is not covered by stale-if-error here
    assert (failed.status, failed.body) == (503, b"broken")
    await origin.stop(hold_port=True)
    clock.advance(5)
    down = await proxy.get("/m")
    assert down.status == 504
    assert "detail=STALE-NOT-ALLOWED" in down.cache_status
    assert origin.count("/m") == 3


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_hit_for_pass_marks_expire_in_order_and_are_capped() -> None:
    from proxy.coalescer import Coalescer

    now = [0.0]
    c = Coalescer(1 << 20, hit_for_pass=5.0, clock=lambda: now[0])
    for i in range(1000):
        c.mark_pass(f"/k/{i}", found_nothing=True)
    now[0] = 2.0
    c.mark_pass("/k/0")  # marked again: now the latest to expire
    now[0] = 4.0
    c.mark_pass("/late")
    now[0] = 6.0  # every mark but /k/0's second and /late's has expired
    c.mark_pass("/new", found_nothing=True)
    # Expired marks go as new ones come, not when 100,000 have piled up.
    assert len(c._pass_until) == 3 and len(c._unlooked_until) == 1
    assert c.is_pass("/k/0") and c.is_pass("/late") and not c.is_pass("/k/1")
    # However many live marks, at most 100,000 are kept: the oldest go first.
    for i in range(100_010):
        c.mark_pass(f"/live/{i}")
    assert len(c._pass_until) == 100_000
    assert not c.is_pass("/live/0") and c.is_pass("/live/100009")
    # And at most 16 MB of keys: 8 KB URLs.
    pad = "p" * 8000
    for i in range(3000):
        c.mark_pass(f"/long/{i}?{pad}")
    assert len(c._pass_until) <= 16 * 1024 * 1024 // 8000
    assert c.is_pass(f"/long/2999?{pad}") and not c.is_pass(f"/long/0?{pad}")


async def test_a_flight_cancelled_before_its_first_step_still_answers_its_clients() -> None:
    """A task cancelled before it first runs never enters its coroutine: the runner's finally
    does not run, and the flight's clients waited for a head that never came while the key
    stayed in flight for every later request."""
    from proxy.coalescer import Coalescer
    from proxy.errors import ProxyStopping

    c = Coalescer(1 << 20)
    ran: list[str] = []

    async def run(flight: object) -> None:
        ran.append("ran")

    for closing, error in ((False, ConnectionError), (True, ProxyStopping)):
        c.closing = closing
        flight = c.start("/k", run)
        assert flight.task is not None
        flight.task.cancel()
        with pytest.raises(error):
            await asyncio.wait_for(asyncio.shield(flight.head), 2)
        assert c.get("/k") is None and flight.result.done() and c.in_flight == 0
    assert ran == []


async def test_a_clock_stepped_a_day_forward_during_a_fill_neither_breaks_the_herd_nor_ages_the_response(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """An NTP step (or a VM resumed) while the origin answers is no delay of the response
    (RFC 9111 §4.2.3's response_delay is measured on the monotonic clock then)."""
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)  # the herd joins the fill meanwhile
        clock.step(86400)  # the proxy's clock was a day behind; the origin's Date is right
        return web.Response(body=b"page", headers={"Cache-Control": "max-age=600",
                                                   "Date": format_http_date(clock())})

    origin.route("/step", slow)
    proxy = await clocked(make_proxy, clock)
    results = await herd(proxy.url + "/step", 20)
    assert origin.count("/step") == 1
    assert {(s, b) for s, _, b in results} == {(200, b"page")}
    assert sorted(x for _, x, _ in results) == ["HIT"] * 19 + ["MISS"]
    stored = await proxy.get("/step")
    assert (stored.x_cache, stored.headers["Age"]) == ("HIT", "0")
    assert origin.count("/step") == 1


async def test_the_delay_of_a_response_is_the_wall_clocks_unless_that_clock_was_stepped(
        proxy: Proxy, clock: Clock) -> None:
    engine = proxy.runtime.engine
    engine.clock = clock
    sent = engine.sending()
    await asyncio.sleep(0.05)
    assert engine.answered(sent) == (clock.now, clock.now)  # a clock that does not move: no delay
    clock.advance(0.01)
    assert engine.answered(sent) == (clock.now - 0.01, clock.now)  # less than elapsed: the wall's
    for step in (86400.0, -3600.0):  # a step forward, a step back: the monotonic time elapsed
        clock.step(step)
        request_time, response_time = engine.answered(sent)
        assert response_time == clock.now
        assert 0.05 <= response_time - request_time < 5
