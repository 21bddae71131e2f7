"""The console's session cookie, seen by another web app on the same host, in real headless
Chromium: cookies are not port-scoped, so after the operator logs in on 127.0.0.1:ADMIN the
browser sends ``cachegate_session`` to a page on 127.0.0.1:OTHER too. What that app receives
must open nothing: the session's secret lives in the console's ``sessionStorage`` (scoped to the
port) and is sent only by the console's own calls, and no endpoint hands it to a cookie holder.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.admin.util import absolute, settle
from tests.conftest import MakeProxy
from tests.console.browser import browser_page, need_browser
from tests.harness import Origin

pytestmark = pytest.mark.slow

TOKEN = "cookie-ports-t0ken-of-some-length"


async def test_the_cookie_another_port_receives_opens_nothing(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    from playwright.async_api import expect

    need_browser()
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    origin.route("/page", body=b"cached", headers={"Cache-Control": "max-age=600"})
    await proxy.get("/page")
    await settle(proxy)
    assert (await proxy.get("/page")).x_cache == "HIT"

    seen: list[str] = []

    async def other_app(request: web.Request) -> web.Response:  # another local web app
        seen.append(request.headers.get("Cookie", ""))
        return web.Response(text="<!doctype html><title>other</title>some other app", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", other_app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    other_port = runner.addresses[0][1]
    try:
        async with browser_page(tmp_path / "profile") as page:
            await page.goto(proxy.admin_url + "/")
            await page.fill("#token", TOKEN)
            await page.click("#login-button")
            await expect(page.locator("#headline")).to_contain_text("requests since start", timeout=10_000)
            await page.goto(f"http://127.0.0.1:{other_port}/")
            await expect(page).to_have_title("other")
            # Back in the same tab, a reload of the console is still logged in (sessionStorage).
            await page.goto(proxy.admin_url + "/")
            await expect(page.locator("#headline")).to_contain_text("requests since start", timeout=10_000)
            assert page.errors == [], page.errors
    finally:
        await runner.cleanup()

    cookie = [c for c in seen[0].split("; ") if c.startswith("cachegate_session=")]
    assert cookie, seen  # the browser did send it to the other port: that is the threat
    stolen = {"Cookie": cookie[0]}
    url = absolute(proxy, "/page")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async def call(method: str, path: str, **kwargs: object) -> tuple[int, dict[str, object]]:
            async with s.request(method, proxy.admin_url + path, **kwargs) as r:  # type: ignore[arg-type]
                return r.status, json.loads(await r.read() or b"null")

        status, session = await call("GET", "/console/api/session", headers=stolen)
        assert status == 200 and session == {"authenticated": False, "token_required": True}
        for path in ("/stats", "/console/api/live", f"/cache?url={url}"):
            status, body = await call("GET", path, headers=stolen)
            assert status == 401 and "X-CSRF-Token" in str(body["error"]), (path, body)
        for secret in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": "guess"}):
            status, body = await call("POST", "/purge", json={"urls": [url]},
                                      headers={**stolen, **secret, "Content-Type": "application/json"})
            assert status == 401, body
    assert (await proxy.get("/page")).x_cache == "HIT"  # nothing was purged
