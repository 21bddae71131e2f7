"""The followers of a fetch that failed before its head (a reset, a timeout, an invalid
response) fetch again, as one new flight.

A follower's own request was never sent: the leader's was, and may be what the origin failed
on (a field that makes its app drop the connection). Every follower used to get the leader's
502, so one client's request broke the page for everyone who asked for it meanwhile. Now they
fetch again as one new flight, led by the first of them (as nginx's ``proxy_cache_lock``
waiters send their own request when the holder stored nothing): an origin that is down costs
one more fetch for the whole herd, and a follower whose second fetch fails gets that error.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Handler, Origin, Proxy
from tests.security.misbehaving import flight_with
from tests.security.util import Raw, get, send_raw

PAGE = b"good page\n"


def victims_fetches(origin: Origin) -> int:
    """The origin's requests for /p without the attacker's field."""
    return sum(1 for seen in origin.seen if seen.path == "/p" and "X-Crash" not in seen.headers)


def crashing(release: asyncio.Event, *, always: bool = False,
             fields: dict[str, str] | None = None) -> Handler:
    """A page whose app drops the connection on a request carrying X-Crash (on every request,
    when ``always``: the origin is down); each answer waits for ``release``."""

    async def page(request: web.Request) -> web.StreamResponse:
        await release.wait()
        if always or "X-Crash" in request.headers:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.Response(body=PAGE, headers=fields or {"Cache-Control": "public, max-age=300"})

    return page


async def attack(proxy: Proxy, release: asyncio.Event, victims: int) -> tuple[Raw, list[Raw]]:
    """The attacker's request leads the key's fetch; ``victims`` plain requests join it."""
    attacker = asyncio.ensure_future(send_raw(proxy, get("/p", "X-Crash: 1")))
    await flight_with(proxy, 0)
    joined = [asyncio.ensure_future(send_raw(proxy, get("/p"))) for _ in range(victims)]
    await flight_with(proxy, victims)
    release.set()
    return await attacker, list(await asyncio.gather(*joined))


async def test_followers_of_a_fetch_the_origin_reset_fetch_again_and_get_the_page(
        origin: Origin, make_proxy: MakeProxy) -> None:
    release = asyncio.Event()
    origin.route("/p", crashing(release))
    proxy = await make_proxy()
    attacker, victims = await attack(proxy, release, 5)
    assert attacker.status == 502  # its own request's failure
    assert [(v.status, v.body) for v in victims] == [(200, PAGE)] * 5
    assert victims_fetches(origin) == 1  # one for the five
    assert (await send_raw(proxy, get("/p"))).body == PAGE  # stored by that one


async def test_followers_of_an_origin_that_is_down_cost_one_more_fetch_not_one_each(
        origin: Origin, make_proxy: MakeProxy) -> None:
    release = asyncio.Event()
    origin.route("/p", crashing(release, always=True))
    proxy = await make_proxy()
    attacker, victims = await attack(proxy, release, 8)
    assert [attacker.status, *(v.status for v in victims)] == [502] * 9
    assert all((v.header("Cache-Status") or "").endswith("detail=UPSTREAM-UNREACHABLE") for v in victims)
    # One fetch for the eight (a new connection dropped after the request was read is that
    # fetch's one try: nothing is sent again, whatever the retries).
    assert victims_fetches(origin) == 1


async def test_followers_with_a_stale_response_still_get_it_under_stale_if_error(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    release = asyncio.Event()
    release.set()
    origin.route("/p", crashing(release, fields={"Cache-Control": "max-age=1, stale-if-error=600"}))
    proxy = await clocked(make_proxy, clock)
    assert (await send_raw(proxy, get("/p"))).body == PAGE
    clock.advance(5)
    release.clear()
    attacker, victims = await attack(proxy, release, 3)
    assert [(r.status, r.body) for r in (attacker, *victims)] == [(200, PAGE)] * 4
    assert all("detail=ORIGIN-UNREACHABLE" in (r.header("Cache-Status") or "") for r in (attacker, *victims))
    assert victims_fetches(origin) == 1  # the fill; none fetched again
