"""Vary through the proxy: browsers' equivalent Accept-Encoding / Accept-Language share a variant."""

from __future__ import annotations

from aiohttp import web

from tests.harness import Origin, Proxy

CHROME = {"Accept-Encoding": "gzip, deflate, br, zstd", "Accept-Language": "en-US,en;q=0.9"}
CURL = {"Accept-Encoding": "deflate, gzip, br, zstd", "Accept-Language": "en-us, en;q=0.90"}
FIREFOX = {"Accept-Encoding": "gzip, deflate, br, zstd", "Accept-Language": "en-US,en;q=0.5"}


async def test_equivalent_browser_values_share_one_stored_variant(origin: Origin, proxy: Proxy) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"for {request.headers.get('Accept-Language')}", headers={
            "Cache-Control": "max-age=60", "Vary": "Accept-Encoding, Accept-Language"})

    origin.route("/page", page)
    first = await proxy.get("/page", headers=CHROME)
    again = await proxy.get("/page", headers=CURL)  # the same preferences, spelled otherwise
    other = await proxy.get("/page", headers=FIREFOX)  # en weighs 0.5, not 0.9: another variant
    assert (first.x_cache, again.x_cache, other.x_cache) == ("MISS", "HIT", "MISS")
    assert again.body == first.body
    assert origin.count("/page") == 2
