"""A full answer that is not stored supersedes the stored response it was fetched for (RFC 9111
§4.3.3): the stored one is dropped, in every worker, rather than served again.

``cachegate run`` as a real process (one worker, and two sharing the store) in front of a real
origin. Before: an entry under stale-while-revalidate whose refresh got no-store, private,
Set-Cookie, a 404 or a 200 without freshness was served UPDATING at every request of its
window, each request refreshing it again; a foreground revalidation answered 200 no-store
left it for stale-if-error to serve at the next origin error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, Response, shared
from tests.test_herd_workers import answered, herd, until_each_worker

# One cachegate (of each worker count) and one origin for the module: every test uses paths of
# its own, and none purges, reloads or stops what the others read (a start per test cost the
# module more than its tests did).
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CACHE = "cache: {memory: 64MB, disk: {path: cache, size: 256MB, shards: 2}}\n"
# Long enough for a max-age=1 response stored before it to be stale: its age counts from its
# Date, which is never later than its arrival (whole seconds: it may even arrive nearly 1 s old),
# so it is stale at most 1 s after it was answered. (A wait that is too short fails the test:
# the stale answers it expects never come.)
STALE = 1.2

# What the origin answers once the stored response is stale: (status, fields), none storable.
UNSTORABLE: dict[str, tuple[int, dict[str, str]]] = {
    "no-store": (200, {"Cache-Control": "no-store"}),
    "deleted": (404, {}),  # the page is gone (a 404 without freshness)
    "no-freshness": (200, {}),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
async def served(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Origin, ProxyProcess]]:
    """An origin and cachegate in front of it (one worker, or two), for every test of the module."""
    async for pair in shared(str(tmp_path_factory.mktemp("superseded")), CACHE, workers=request.param):
        yield pair


@pytest.fixture
def origin(served: tuple[Origin, ProxyProcess]) -> Origin:
    return served[0]


@pytest.fixture
def running(served: tuple[Origin, ProxyProcess]) -> ProxyProcess:
    return served[1]


def sequence(origin: Origin, path: str, first: dict[str, str], *then: tuple[int, bytes, dict[str, str]]) -> None:
    """``path`` answers ``old`` with ``first``'s fields once, then each of ``then`` in turn (the
    last one from then on)."""
    answers = [(200, b"old", {"ETag": '"a"', **first}), *then]

    async def page(request: web.Request) -> web.Response:
        status, body, fields = answers[min(origin.count(path) - 1, len(answers) - 1)]
        return web.Response(status=status, body=body, headers=fields)

    origin.route(path, page)


async def until_new(proxy: ProxyProcess, path: str, within: float = 10.0) -> Response:
    """Requests until one is not answered with the old body (the refresh's answer arrived)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        r = await proxy.get(path)
        if r.body != b"old":
            return r
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path}: the superseded response is still served ({r.x_cache})")


async def test_a_refresh_answered_with_a_response_not_to_store_drops_the_stale_entry(
        origin: Origin, running: ProxyProcess) -> None:
    for name, (status, fields) in UNSTORABLE.items():
        path = f"/swr-{name}"
        sequence(origin, path, {"Cache-Control": "max-age=1, stale-while-revalidate=600"},
                 (status, b"new", fields))
        assert (await running.get(path)).x_cache == "MISS"
    await asyncio.sleep(STALE)  # all stale, within stale-while-revalidate
    for name, (status, _) in UNSTORABLE.items():
        path = f"/swr-{name}"
        first = await running.get(path)
        assert (first.body, first.x_cache) == (b"old", "UPDATING"), name  # and one refresh starts
        r = await until_new(running, path)
        assert (r.status, r.body, r.x_cache) == (status, b"new", "MISS"), name
        # No client is served the old response any more, whichever worker it reaches.
        results = answered(await herd(running.url, path, 8))
        assert len(results) == 8 and {(x.status, x.body) for x in results} == {(status, b"new")}, name
        assert "UPDATING" not in {x.x_cache for x in results}, name
        if len(running.workers) > 1:  # each worker answers with the origin's answer, not the old body
            await until_each_worker(running, path, lambda x: x.body == b"new")


async def test_a_revalidation_answered_no_store_leaves_nothing_for_stale_if_error(
        origin: Origin, running: ProxyProcess) -> None:
    """Stale, revalidated in the foreground: the 200 no-store is relayed, and the origin's 503
    after it is relayed too, not hidden behind the response it superseded."""
    sequence(origin, "/fg", {"Cache-Control": "max-age=1, stale-if-error=600"},
             (200, b"new", {"Cache-Control": "no-store"}), (503, b"down", {}))
    assert (await running.get("/fg")).x_cache == "MISS"
    await asyncio.sleep(STALE)
    r = await running.get("/fg")
    assert (r.status, r.body, r.x_cache) == (200, b"new", "EXPIRED")
    r = await running.get("/fg")
    assert (r.status, r.body, r.x_cache) == (503, b"down", "MISS")
    assert origin.count("/fg") == 3


async def test_an_origin_error_on_a_refresh_keeps_the_stale_entry(origin: Origin, running: ProxyProcess) -> None:
    """An origin error says nothing of the resource: the stored response stays, served stale."""
    sequence(origin, "/err", {"Cache-Control": "max-age=1, stale-while-revalidate=600, stale-if-error=600"},
             (503, b"down", {}))
    assert (await running.get("/err")).x_cache == "MISS"
    await asyncio.sleep(STALE)
    assert (await running.get("/err")).x_cache == "UPDATING"
    await running.wait_for(lambda: origin.count("/err") >= 2, 10)
    await asyncio.sleep(0.2)
    results = answered(await herd(running.url, "/err", 8))
    assert {(r.status, r.body) for r in results} == {(200, b"old")}


async def test_an_answer_the_request_kept_out_of_the_store_leaves_the_stored_response(
        origin: Origin, running: ProxyProcess) -> None:
    """A client's own ``Cache-Control: no-store`` keeps the origin's answer out of the store: it
    says nothing of the resource, so the stored response stays (else any client could drop any
    stale entry): the next client, on an origin error, is served it under stale-if-error."""
    sequence(origin, "/mine", {"Cache-Control": "max-age=1, stale-if-error=600"},
             (200, b"new", {"Cache-Control": "max-age=100"}), (503, b"down", {}))
    assert (await running.get("/mine")).x_cache == "MISS"
    await asyncio.sleep(STALE)
    r = await running.get("/mine", headers={"Cache-Control": "no-store"})
    assert (r.status, r.body) == (200, b"new")
    r = await running.get("/mine")
    assert (r.status, r.body, r.x_cache) == (200, b"old", "STALE")


# One client's request headers that make the origin answer that client alone (not stored):
# its Cookie gets a Set-Cookie, its Authorization a private page (PRIVATE is said before
# AUTHORIZATION), its Accept a 406. None of them is part of the cache key.
ATTACKS: dict[str, dict[str, str]] = {
    "cookie": {"Cookie": "sid=1"},
    "authorization": {"Authorization": "Bearer x"},
    "406": {"Accept": "application/xml"},
    "api-key": {"X-Api-Key": "zz"},  # a credential of its own: answered private
}


class Page:
    """An origin's page shared by every client (``old`` until ``renewed``, then ``new``; per
    Accept-Language when ``vary``), answered differently to one client's own request
    (``ATTACKS``); a 503 while ``down``; the ``withdrawn`` language no-store once renewed."""

    def __init__(self, origin: Origin, path: str, cache_control: str, *, vary: bool = False,
                 withdrawn: str = "") -> None:
        self.down = self.renewed = False
        fields = {"Cache-Control": cache_control, "ETag": '"a"', **({"Vary": "Accept-Language"} if vary else {})}

        async def page(request: web.Request) -> web.Response:
            lang = request.headers.get("Accept-Language", "")
            body = (b"new" if self.renewed else b"old") + (f" {lang}".encode() if vary else b"")
            if self.down:
                return web.Response(status=503, body=b"down")
            if request.headers.get("Accept") == "application/xml":
                return web.Response(status=406, body=b"not acceptable")
            if request.headers.get("X-Mode") == "nostore":
                return web.Response(body=b"not for you", headers={**fields, "Cache-Control": "no-store"})
            if "Authorization" in request.headers or "X-Api-Key" in request.headers:
                return web.Response(body=b"your account", headers={**fields, "Cache-Control": "private"})
            if "Cookie" in request.headers:
                return web.Response(body=b"yours", headers={**fields, "Set-Cookie": "sid=2"})
            if self.renewed and lang and lang == withdrawn:
                return web.Response(body=body, headers={**fields, "Cache-Control": "no-store"})
            return web.Response(body=body, headers=fields)

        origin.route(path, page)


async def refreshed(running: ProxyProcess, origin: Origin, path: str, count: int) -> None:
    """Until the background refresh reached the origin, and a moment for its answer's handling."""
    await running.wait_for(lambda: origin.count(path) >= count, 10)
    await asyncio.sleep(0.5)


async def test_a_client_s_own_answer_on_a_revalidation_leaves_the_entry_for_stale_if_error(
        origin: Origin, running: ProxyProcess) -> None:
    """A client's Cookie (answered with a Set-Cookie), Authorization (answered private) or
    Accept (answered 406) on a stale entry: its revalidation's answer is that client's, not the
    resource's; the stored response stays, and the next client is served it under
    stale-if-error when the origin is down (before: a MISS with the origin's 503)."""
    pages = {name: Page(origin, f"/sie-{name}", "max-age=1, stale-if-error=600") for name in ATTACKS}
    for name in ATTACKS:
        assert (await running.get(f"/sie-{name}")).x_cache == "MISS"
    await asyncio.sleep(STALE)
    for name, fields in ATTACKS.items():
        r = await running.get(f"/sie-{name}", headers=dict(fields))
        assert r.body in {b"yours", b"your account", b"not acceptable"}, name  # the origin's, to it alone
    for name, page in pages.items():
        page.down = True
        results = answered(await herd(running.url, f"/sie-{name}", 4))
        assert {(x.status, x.body, x.x_cache) for x in results} == {(200, b"old", "STALE")}, name


async def test_a_client_s_own_answer_on_a_background_refresh_leaves_the_stale_entry(
        origin: Origin, running: ProxyProcess) -> None:
    """Under stale-while-revalidate the refresh carries the request of the client that set it
    off: its answer to that client alone leaves the entry; the next client is served it
    UPDATING (before: a MISS, the entry dropped by one client's header)."""
    pages = {name: Page(origin, f"/swr-{name}", "max-age=1, stale-while-revalidate=600") for name in ATTACKS}
    for name in ATTACKS:
        assert (await running.get(f"/swr-{name}")).x_cache == "MISS"
    await asyncio.sleep(STALE)
    for name, fields in ATTACKS.items():
        r = await running.get(f"/swr-{name}", headers=dict(fields))
        assert (r.status, r.body, r.x_cache) == (200, b"old", "UPDATING"), name
        await refreshed(running, origin, f"/swr-{name}", 2)
        pages[name].renewed = True
        r = await running.get(f"/swr-{name}")
        assert (r.status, r.body, r.x_cache) == (200, b"old", "UPDATING"), name


async def test_one_client_s_variant_answered_for_it_alone_leaves_the_other_variants(
        origin: Origin, running: ProxyProcess) -> None:
    """Accept-Language: fr with a Cookie refreshes the stale fr variant with that client's
    answer: the en variant, and fr, stay (before: the whole key went, en's clients missed)."""
    page = Page(origin, "/vary-cookie", "max-age=1, stale-while-revalidate=600", vary=True)
    for lang in ("en", "fr"):
        assert (await running.get("/vary-cookie", headers={"Accept-Language": lang})).x_cache == "MISS"
    await asyncio.sleep(STALE)
    r = await running.get("/vary-cookie", headers={"Accept-Language": "fr", "Cookie": "sid=1"})
    assert (r.body, r.x_cache) == (b"old fr", "UPDATING")
    await refreshed(running, origin, "/vary-cookie", 3)
    page.renewed = True
    r = await running.get("/vary-cookie", headers={"Accept-Language": "en"})
    assert (r.status, r.body, r.x_cache) == (200, b"old en", "UPDATING")


async def test_a_variant_the_origin_withdraws_does_not_drop_the_other_variants(
        origin: Origin, running: ProxyProcess) -> None:
    """The fr variant's refresh, without credentials, is answered no-store: the store drops
    whole keys, so dropping it would take en's variant, which other clients select, with it.
    The key stays; en's clients are served theirs (before: a MISS)."""
    page = Page(origin, "/vary-gone", "max-age=1, stale-while-revalidate=600", vary=True, withdrawn="fr")
    for lang in ("en", "fr"):
        assert (await running.get("/vary-gone", headers={"Accept-Language": lang})).x_cache == "MISS"
    await asyncio.sleep(STALE)
    page.renewed = True
    r = await running.get("/vary-gone", headers={"Accept-Language": "fr"})
    assert (r.body, r.x_cache) == (b"old fr", "UPDATING")
    await refreshed(running, origin, "/vary-gone", 3)
    r = await running.get("/vary-gone", headers={"Accept-Language": "en"})
    assert (r.status, r.body, r.x_cache) == (200, b"old en", "UPDATING")


async def test_a_client_s_forced_revalidation_of_a_fresh_entry_leaves_it(
        origin: Origin, running: ProxyProcess) -> None:
    """``Cache-Control: max-age=0`` (with a field the origin answers no-store) on an entry still
    fresh for every other client: the answer went to that client alone, and the entry stays
    (before: dropped; the next client missed, and got the origin's 503 when it was down)."""
    page = Page(origin, "/forced", "max-age=60, stale-if-error=600")
    assert (await running.get("/forced")).x_cache == "MISS"
    r = await running.get("/forced", headers={"Cache-Control": "max-age=0", "X-Mode": "nostore"})
    assert (r.status, r.body) == (200, b"not for you")
    page.down = True
    results = answered(await herd(running.url, "/forced", 4))
    assert {(x.status, x.body, x.x_cache) for x in results} == {(200, b"old", "HIT")}

