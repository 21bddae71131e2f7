"""DNS rebinding against a token-protected admin listener, in real headless Chromium.

The rebinding is simulated with Chromium's ``--host-resolver-rules`` (``evil.example`` ->
127.0.0.1) and Playwright serving the attacker's page at ``http://evil.example:PORT/`` (what the
attacker's own server served before its DNS changed); the page's own requests then go to the
admin listener for real. Chromium's Private Network Access checks are switched off, as Firefox
and Safari have none: a page at a plain-http origin sends no ``Sec-Fetch-*`` fields, so the
listener can tell it only by its ``Host``. Even the right token must not open a session there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MakeProxy
from tests.console.browser import browser_page, need_browser
from tests.harness import Origin

pytestmark = pytest.mark.slow

TOKEN = "k7q"  # a loopback listener may have a short token
NO_PNA = ("--host-resolver-rules=MAP evil.example 127.0.0.1",
          "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,"
          "PrivateNetworkAccessRespectPreflightResults,LocalNetworkAccessChecks")
ATTACK = """<!doctype html><script>
(async () => { const log = {};
  let r = await fetch('/console/api/login', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                              body: JSON.stringify({token: 'TOKEN'})});
  log.login = r.status;
  r = await fetch('/console/api/live'); log.live = r.status;
  r = await fetch('/purge', {method: 'POST', headers: {'Content-Type': 'application/json'},
                             body: JSON.stringify({all: true})});
  log.purge = r.status;
  document.body.textContent = JSON.stringify(log);
  document.title = 'done';
})();
</script>""".replace("TOKEN", TOKEN)


async def test_a_rebound_page_cannot_log_in_even_with_the_right_token(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    need_browser()
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    origin.route("/page", body=b"cached", headers={"Cache-Control": "max-age=600"})
    await proxy.get("/page")
    assert (await proxy.get("/page")).x_cache == "HIT"
    port = proxy.admin_url.rsplit(":", 1)[1]
    async with browser_page(tmp_path / "profile", extra_args=NO_PNA) as page:
        await page.route(f"http://evil.example:{port}/rebound.html",
                         lambda route: route.fulfill(status=200, content_type="text/html", body=ATTACK))
        await page.goto(f"http://evil.example:{port}/rebound.html")
        await page.wait_for_function("document.title === 'done'", timeout=30000)
        seen = json.loads(await page.inner_text("body"))
    assert seen == {"login": 403, "live": 403, "purge": 403}
    assert (await proxy.get("/page")).x_cache == "HIT"
    assert proxy.runtime.metrics.admin_refused.values().get(("host",)) == 3
