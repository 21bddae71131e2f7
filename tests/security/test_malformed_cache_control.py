"""A personal page whose ``Cache-Control`` says ``private`` (or ``no-store``) in a form the list
grammar does not deliver: ``private; max-age=600``, ``"private, max-age=600"``, ``private
max-age=600``, ``private =1``. The origin also sends an ``Expires`` an hour ahead, so the page is
fresh. Read as unknown extensions, the restrictive word was lost and the first visitor's page was
stored and served as a HIT to every visitor after. nginx and Varnish's builtin VCL refuse such
responses by the text; cachegate counts the word as the directive (``proxy.policy.cache_control``).
"""

from __future__ import annotations

import time

import pytest
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy
from tests.harness import Handler, Origin
from tests.security.util import get, send_raw


def personal(cache_control: str) -> Handler:
    async def page(request: web.Request) -> web.Response:
        who = request.cookies.get("session", "stranger")
        return web.Response(text=f"hello {who}", headers={
            "Cache-Control": cache_control, "Expires": format_http_date(time.time() + 3600)})
    return page


@pytest.mark.parametrize("cache_control", [
    "private; max-age=600", '"private, max-age=600"', "private max-age=600", "max-age=600, private =1",
    "no-store; max-age=600",
])
async def test_a_malformed_private_or_no_store_never_shares_a_personal_page(
        origin: Origin, make_proxy: MakeProxy, cache_control: str) -> None:
    origin.route("/me", personal(cache_control))
    proxy = await make_proxy()
    victim = await send_raw(proxy, get("/me", "Cookie: session=alice"))
    assert victim.body == b"hello alice"
    other = await send_raw(proxy, get("/me"))
    assert (other.x_cache, other.body) == ("MISS", b"hello stranger"), other.header("Cache-Status")
    assert origin.count("/me") == 2


async def test_a_malformed_no_cache_is_revalidated_before_each_use(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/me", personal("no-cache; max-age=600"))
    proxy = await make_proxy()
    assert (await send_raw(proxy, get("/me", "Cookie: session=alice"))).body == b"hello alice"
    other = await send_raw(proxy, get("/me"))
    assert other.x_cache != "HIT" and other.body == b"hello stranger"
    assert origin.count("/me") == 2


@pytest.mark.parametrize("cdn_cache_control", ["No-Store", "no-store max-age=0", "private,"])
async def test_a_malformed_restrictive_cdn_cache_control_does_not_fall_back_to_a_permissive_one(
        origin: Origin, make_proxy: MakeProxy, cdn_cache_control: str) -> None:
    """RFC 9213: a targeted field that is not a Structured Field Dictionary is ignored, and the
    cache falls back to Cache-Control (here ``max-age=600``): a CDN-Cache-Control that says
    ``No-Store`` was then ignored and the first visitor's page stored for everyone."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.cookies.get('session', 'stranger')}", headers={
            "Cache-Control": "max-age=600", "CDN-Cache-Control": cdn_cache_control})

    origin.route("/me", page)
    proxy = await make_proxy()
    assert (await send_raw(proxy, get("/me", "Cookie: session=alice"))).body == b"hello alice"
    other = await send_raw(proxy, get("/me"))
    assert (other.x_cache, other.body) == ("MISS", b"hello stranger"), other.header("Cache-Status")
