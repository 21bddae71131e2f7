"""PURGE <path> on the client listener: off unless admin.purge_from is listed; then allowed from
those peers only (the admin token does not open it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from tests.admin.util import absolute, js, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

TOKEN = "purge-token-0123"


def page(origin: Origin, path: str, vary: str | None = None) -> dict[str, int]:
    state = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        if request.method != "GET":
            state["other"] = state.get("other", 0) + 1
            return web.Response(status=204)
        state["n"] += 1
        headers = {"Cache-Control": "max-age=300", "ETag": f'"{state["n"]}"'}
        if vary:
            headers["Vary"] = vary
        return web.Response(text=f"v{state['n']}", headers=headers)

    origin.route(path, handler)
    return state


LOOPBACK = "admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8, '::1/128']}\n"


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    """A proxy that takes PURGE from loopback (the test's address): listed, as it must be now."""
    return await make_proxy(config=LOOPBACK)


async def test_purge_from_loopback_purges_every_variant_and_never_reaches_the_origin(
        origin: Origin, proxy: Proxy) -> None:
    state = page(origin, "/doc", vary="Accept-Encoding")
    for enc in ("gzip", "br"):
        await proxy.get("/doc", headers={"Accept-Encoding": enc})
    await settle(proxy)
    reply = await proxy.request("PURGE", "/doc")
    assert reply.status == 200
    assert js(reply) == {"purged": 1, "soft": False, "url": absolute(proxy, "/doc")}
    assert "other" not in state  # the origin never saw the PURGE
    for enc in ("gzip", "br"):
        assert (await proxy.get("/doc", headers={"Accept-Encoding": enc})).x_cache == "MISS"
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_purges_total{kind="url"} 1.0' in metrics


async def test_a_purge_of_a_url_with_a_query_purges_that_url_only(origin: Origin, proxy: Proxy) -> None:
    page(origin, "/q")
    await proxy.get("/q?a=1")
    await proxy.get("/q?a=2")
    await settle(proxy)
    assert js(await proxy.request("PURGE", "/q?a=1"))["purged"] == 1
    assert (await proxy.get("/q?a=1")).x_cache == "MISS"
    assert (await proxy.get("/q?a=2")).x_cache == "HIT"


async def test_a_soft_purge_header_marks_the_url_stale(origin: Origin, proxy: Proxy) -> None:
    page(origin, "/soft")
    await proxy.get("/soft")
    await settle(proxy)
    reply = await proxy.request("PURGE", "/soft", headers={"Cachegate-Soft-Purge": "1"})
    assert js(reply)["soft"] is True
    stale = await proxy.get("/soft")
    assert (stale.body, stale.x_cache) == (b"v1", "UPDATING")
    await settle(proxy)
    assert (await proxy.get("/soft")).body == b"v2"


@pytest.fixture
async def guarded(make_proxy: MakeProxy) -> Proxy:
    """A proxy that takes PURGE only from 10.0.0.0/8 (not from the test, on 127.0.0.1)."""
    return await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}, purge_from: [10.0.0.0/8]}}\n")


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN}"},  # the token is no key to PURGE (see proxy.web.admin)
    {"X-Forwarded-For": "10.0.0.1", "X-Real-IP": "10.0.0.1"},  # only the TCP peer counts
])
async def test_anyone_else_gets_403_and_nothing_is_purged(
        origin: Origin, guarded: Proxy, headers: dict[str, str]) -> None:
    state = page(origin, "/doc")
    await guarded.get("/doc")
    await settle(guarded)
    reply = await guarded.request("PURGE", "/doc", headers=headers)
    assert reply.status == 403
    assert "admin.purge_from" in js(reply)["error"]
    assert "other" not in state  # not forwarded either
    assert (await guarded.get("/doc")).x_cache == "HIT"
    metrics = (await guarded.admin("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).body
    assert b'cachegate_purge_refused_total{reason="forbidden"} 1.0' in metrics


@pytest.mark.parametrize("config", [
    "",  # the default: a TLS terminator on this host would make every client 127.0.0.1
    "admin: {listen: '127.0.0.1:0', purge_from: []}\n",
    f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n",  # a token alone does not switch it on
], ids=["default", "empty-list", "token-only"])
@pytest.mark.parametrize("authorization", [None, f"Bearer {TOKEN}"])
async def test_without_purge_from_the_method_is_switched_off_even_from_loopback(
        origin: Origin, make_proxy: MakeProxy, config: str, authorization: str | None) -> None:
    proxy = await make_proxy(config=config)
    state = page(origin, "/doc")
    await proxy.get("/doc")
    await settle(proxy)
    headers = {"Authorization": authorization} if authorization else {}
    reply = await proxy.request("PURGE", "/doc", headers=headers)  # from 127.0.0.1
    assert reply.status == 405
    assert "PURGE is switched off on this listener" in js(reply)["error"]
    # Allow is a MUST on a 405 (RFC 9110 §15.5.6): what the listener forwards, as for OPTIONS.
    assert reply.headers["Allow"] == "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
    assert "other" not in state  # never forwarded either
    assert (await proxy.get("/doc")).x_cache == "HIT"


async def test_methods_the_parser_knows_pass_to_the_origin_and_ban_is_refused_before_it(
        origin: Origin, proxy: Proxy) -> None:
    """What docs/admin-api.md says of other methods: llhttp's list passes (PROPFIND, M-SEARCH,
    QUERY, ...), anything else (Varnish's BAN) is refused by the parser (501: a method this
    server does not implement) and reaches nobody."""
    from tests.test_proxying import raw_exchange

    state = page(origin, "/m")
    for method in ("PROPFIND", "M-SEARCH", "QUERY"):
        reply = await proxy.request(method, "/m")
        assert (reply.status, reply.x_cache) == (204, "BYPASS"), method
    assert state.get("other") == 3
    head = await raw_exchange(proxy.url, b"BAN /m HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 Not Implemented"), head  # (in the request line's version)
    assert state.get("other") == 3


# -- a browser on a purge_from host (cross-site request forgery) -----------------------------------

BROWSER_SENT = [
    ("fetch from a page elsewhere", {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "cross-site",
                                     "Sec-Fetch-Mode": "cors"}, "Sec-Fetch-Site: cross-site"),
    ("another local app", {"Origin": "http://127.0.0.1:3000", "Sec-Fetch-Site": "same-site"},
     "Sec-Fetch-Site: same-site"),
    # A page of the site cachegate serves: its user content and third-party scripts are no operator.
    ("the site's own page", {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"},
     "Sec-Fetch-Site: same-origin"),
    ("an older browser: Origin only", {"Origin": "http://evil.example"}, "Origin 'http://evil.example'"),
    ("a sandboxed frame", {"Origin": "null"}, "Origin 'null'"),
    ("Origin with Sec-Fetch-Site: none", {"Origin": "http://evil.example", "Sec-Fetch-Site": "none"},
     "Origin 'http://evil.example'"),
]


@pytest.mark.parametrize("case, headers, message", BROWSER_SENT, ids=[c[0] for c in BROWSER_SENT])
async def test_a_purge_a_browser_sent_for_a_page_is_refused_from_an_allowed_peer(
        origin: Origin, proxy: Proxy, case: str, headers: dict[str, str], message: str) -> None:
    """purge_from trusts a machine, and a browser on it sends what any page asks (the origin's
    permissive CORS preflight lets the PURGE through): the browser's own fields refuse it."""
    state = page(origin, "/doc")
    await proxy.get("/doc")
    await settle(proxy)
    reply = await proxy.request("PURGE", "/doc", headers=headers)
    assert reply.status == 403, (case, reply.body)
    error = js(reply)["error"]
    assert message in error and "cross-site request forgery" in error, error
    assert "other" not in state
    assert (await proxy.get("/doc")).x_cache == "HIT"
    metrics = (await proxy.admin("GET", "/metrics")).body
    assert b'cachegate_purge_refused_total{reason="origin"} 1.0' in metrics


async def test_a_script_that_says_sec_fetch_site_none_still_purges(origin: Origin, proxy: Proxy) -> None:
    """``none`` is a user's own navigation (never a PURGE): taken like no field at all."""
    page(origin, "/doc")
    await proxy.get("/doc")
    await settle(proxy)
    reply = await proxy.request("PURGE", "/doc", headers={"Sec-Fetch-Site": "none"})
    assert (reply.status, js(reply)["purged"]) == (200, 1)


@pytest.mark.parametrize("headers, refused", [
    ({}, False),  # curl, a CMS, a CDN
    ({"Sec-Fetch-Site": "none"}, False),
    ({"Sec-Fetch-Site": " Cross-Site "}, True),
    ({"Sec-Fetch-Site": "same-origin"}, True),
    ({"Origin": "http://127.0.0.1:8080"}, True),
    ({"Origin": ""}, True),  # a field at all: only browsers send it
])
def test_decide_purge_method(headers: dict[str, str], refused: bool) -> None:
    from multidict import CIMultiDict

    from proxy.web.admin_guard import decide_purge_method

    verdict = decide_purge_method(CIMultiDict(headers))
    assert (verdict is not None) == refused
    assert verdict is None or (verdict.status, verdict.reason) == (403, "origin")


async def test_a_purge_answer_carries_both_cache_fields_and_is_counted_as_a_client_request(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    """Carried out (200) or refused (403), cachegate's answer says so in X-Cache-Status and
    Cache-Status, as every response does, and cachegate_requests_total counts it (PURGE)."""
    page(origin, "/doc")
    allowed = await make_proxy(config=LOOPBACK, directory=tmp_path / "allowed")
    refused = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}, purge_from: [10.0.0.0/8]}}\n",
                               directory=tmp_path / "refused")
    for proxy, status in ((allowed, 200), (refused, 403)):
        await proxy.get("/doc")
        await settle(proxy)
        reply = await proxy.request("PURGE", "/doc")
        assert reply.status == status
        assert (reply.x_cache, reply.cache_status) == ("PURGE", "cachegate; detail=PURGE")
        metrics = (await proxy.admin("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).body
        assert b'cachegate_requests_total{cache_status="PURGE",method="PURGE"} 1.0' in metrics


async def test_purges_are_counted_as_requests_but_in_no_hit_ratio_or_offload(
        origin: Origin, proxy: Proxy) -> None:
    """1 miss and 9 hits, then 40 PURGEs: /stats's hit ratio went from 0.90 to 0.18, and the
    console's request offload counted every PURGE as a request the origin was spared. PURGEs
    stay counted as requests (PURGE), in neither ratio."""
    page(origin, "/r")
    for _ in range(10):
        await proxy.get("/r")
        await settle(proxy)
    for i in range(40):
        assert (await proxy.request("PURGE", f"/none{i}")).x_cache == "PURGE"
    stats = js(await proxy.admin("GET", "/stats"))
    assert stats["requests"]["by_cache_status"] == {"HIT": 9, "MISS": 1, "PURGE": 40}
    assert stats["hit_ratio"]["since_start"] == 0.9
    for _ in range(100):  # the console samples its counters every second or so
        live = js(await proxy.admin("GET", "/console/api/live"))
        if live["since_start"]["requests"].get("PURGE") == 40:
            break
        await asyncio.sleep(0.1)
    since = live["since_start"]
    assert since["requests"] == {"HIT": 9, "MISS": 1, "PURGE": 40}
    assert (since["hit_ratio"], since["request_offload"]) == (0.9, 0.9)
    assert (live["last_minute"]["hit_ratio"], live["last_minute"]["request_offload"]) == (0.9, 0.9)


async def test_a_purge_with_one_ipv6_spelling_in_host_purges_what_another_stored(
        origin: Origin, proxy: Proxy) -> None:
    page(origin, "/six")
    port = proxy.url.rpartition(":")[2]
    assert (await proxy.raw("GET", "/six", host=f"[::1]:{port}")).status == 200
    await settle(proxy)
    purged = await proxy.raw("PURGE", "/six", host=f"[0:0:0:0:0:0:0:1]:{port}")
    assert (purged.status, js(purged)) == (200, {"purged": 1, "soft": False, "url": f"http://[::1]:{port}/six"})
    assert (await proxy.raw("GET", "/six", host=f"[0000::1]:{port}")).x_cache == "MISS"
