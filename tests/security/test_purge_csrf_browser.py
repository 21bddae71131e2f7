"""A web page makes a browser on an ``admin.purge_from`` host send ``PURGE`` to the client
listener (headless Chromium, a real page on another origin, a real origin whose CORS preflight
answer is as permissive as many public APIs'): refused, and the cache keeps the page."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from tests.admin.util import settle
from tests.conftest import MakeProxy
from tests.console.browser import browser_page, need_browser
from tests.harness import Origin

pytestmark = pytest.mark.slow


async def test_a_page_elsewhere_cannot_make_a_browser_on_an_allowed_host_purge(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    need_browser()
    fetches = {"n": 0}

    async def article(request: web.Request) -> web.Response:
        cors = {"Access-Control-Allow-Origin": "*"}
        if request.method == "OPTIONS":  # the preflight cachegate forwards: granted
            return web.Response(status=204, headers={**cors, "Access-Control-Allow-Methods": "*",
                                                     "Access-Control-Allow-Headers": "*"})
        fetches["n"] += 1
        return web.Response(text=f"fetch #{fetches['n']}", headers={**cors, "Cache-Control": "max-age=600"})

    origin.route("/article", article)
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8]}\n")
    await proxy.get("/article")
    await settle(proxy)
    # The hostile page: served by another origin (localhost:<the origin's port>, not the proxy).
    origin.route("/evil", body=f"""<!doctype html><script>
fetch("{proxy.url}/article", {{method: "PURGE"}})
  .then(r => r.text()).then(t => document.title = "answered " + t, e => document.title = "failed " + e);
</script>""", headers={"Content-Type": "text/html"})
    async with browser_page(tmp_path / "profile") as browser:
        await browser.goto(f"http://localhost:{origin.port}/evil")
        await browser.wait_for_function("document.title !== ''", timeout=15000)
    assert any(s.method == "OPTIONS" for s in origin.seen)  # the browser did ask, and was granted
    reply = await proxy.get("/article")
    assert (reply.x_cache, reply.body) == ("HIT", b"fetch #1")
    assert fetches["n"] == 1
    metrics = (await proxy.admin("GET", "/metrics")).body
    assert b'cachegate_purge_refused_total{reason="origin"} 1.0' in metrics
    assert b'cachegate_purges_total{kind="url"}' not in metrics or \
        b'cachegate_purges_total{kind="url"} 0.0' in metrics
