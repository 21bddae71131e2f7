"""The console in a real browser (headless Chromium), against ``cachegate run`` with and without
workers: log in, watch the hit ratio move, inspect a URL, purge it from the form, see a refused
reload's FILE:LINE, log out; a page without the token shows the login form and no data."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from tests.console.browser import browser_page, need_browser
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, write_config

pytestmark = pytest.mark.slow

TOKEN = "browser-t0ken-of-some-length"
RULES = """\
rules:
  - name: static
    match: {path: "/static/**"}
    ttl: 1h
"""
BROKEN = """\
rules:
  - name: static
    match: {path: "/static/**"}
    tll: 1h
"""


def write(path: Path, text: str) -> None:
    path.write_text(text)


async def traffic(proxy: ProxyProcess, path: str, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(proxy.url + path, headers={"Host": HOST}) as r:
                await r.read()


@pytest.mark.parametrize("workers", [1, 2])
async def test_an_operator_logs_in_watches_inspects_purges_reloads_and_logs_out(
        origin: Origin, tmp_path: Path, workers: int) -> None:
    need_browser()
    origin.route("/static/app.js", body=b"console.log(1)" * 50, headers={"Cache-Control": "max-age=300",
                                                                          "Surrogate-Key": "js", "Vary": "X-Tenant"})
    origin.route("/account", body=b"me", headers={"Cache-Control": "private"})
    await asyncio.to_thread(write, tmp_path / "rules.yaml", RULES)
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n",
                          "rules: [rules.yaml]\n")
    text = await asyncio.to_thread(Path(config).read_text)  # the admin listener, with a token
    await asyncio.to_thread(write, Path(config), text.replace(
        "admin: {listen: '127.0.0.1:0'}", f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}"))
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start(*(["--workers", str(workers)] if workers > 1 else []))
    try:
        if workers > 1:
            await proxy.wait_for(lambda: len(proxy.workers) == workers and bool(proxy.admin_url))
        await proxy.wait_for(lambda: bool(proxy.admin_url))
        async with browser_page(tmp_path / "profile") as page:
            await run_console(page, proxy)
            assert page.errors == [], page.errors
    finally:
        await proxy.stop()


async def run_console(page, proxy: ProxyProcess) -> None:  # type: ignore[no-untyped-def]
    from playwright.async_api import expect

    url = f"http://{HOST}/static/app.js"
    # Without the token: the login form, and no data anywhere on the page.
    await page.goto(proxy.admin_url + "/")
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()
    assert await page.locator("#top-urls tbody tr").count() == 0
    assert "requests since start" not in await page.content()
    await page.fill("#token", "wrong")
    await page.click("#login-button")
    await expect(page.locator("#login-error")).to_have_text("wrong admin token")

    # Log in: the dashboard, live.
    await page.fill("#token", TOKEN)
    await page.click("#login-button")
    await expect(page.locator("#dashboard")).to_be_visible()
    await expect(page.locator("#headline")).to_contain_text("requests since start", timeout=10_000)
    cookies = await page.context.cookies()
    session = [c for c in cookies if c["name"] == "cachegate_session"]
    assert session and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"

    # Traffic moves the hit ratio: 1 miss and 19 hits.
    await expect(page.locator("#card-hit")).to_have_text("–")  # no request yet
    await traffic(proxy, "/static/app.js", 20)
    await traffic(proxy, "/account", 2)
    await expect(page.locator("#card-hit")).to_have_text(re.compile(r"^(8[0-9]|9[0-9]|100)\.\d%$"), timeout=15_000)
    await expect(page.locator("#top-urls tbody tr").first).to_contain_text(url, timeout=10_000)
    await expect(page.locator("#not-stored tbody")).to_contain_text("PRIVATE")
    await expect(page.locator("#not-stored tbody")).to_contain_text(f"http://{HOST}/account")
    assert await page.locator("#chart-requests path").count() >= 1

    # Inspect the URL: its variant, fresh, with its tag, and the decision.
    await page.fill("#inspect-url", url)
    await page.click("#inspect-button")
    await expect(page.locator("#inspect-result")).to_be_visible()
    row = page.locator("#variants tbody tr").first
    await expect(row).to_contain_text("fresh")
    await expect(row).to_contain_text("js")
    await expect(row).to_contain_text("x-tenant: (absent)")  # (sent by no client: not the word null)
    await expect(page.locator("#inspect-decision")).to_contain_text("serve")
    await expect(page.locator("#inspect-rules")).to_contain_text("static")

    # Purge it from the form: the count, then the next request is a MISS.
    await page.select_option("#purge-kind", "urls")
    await page.fill("#purge-value", url)
    await page.click("#purge-button")
    await expect(page.locator("#purge-result")).to_have_text("purged 1 entry")
    assert (await proxy.get("/static/app.js")).x_cache == "MISS"

    # A refused reload shows each problem as FILE:LINE.
    rules = Path(proxy.directory) / "rules.yaml"
    await asyncio.to_thread(write, rules, BROKEN)
    await page.click("#reload-button")
    await expect(page.locator("#reload-problems li").first).to_contain_text(re.compile(r"rules\.yaml:4: unknown key"))
    await expect(page.locator("#reload-result")).to_contain_text("config rejected")
    await asyncio.to_thread(write, rules, RULES)
    await page.click("#reload-button")
    await expect(page.locator("#reload-result")).to_contain_text("reloaded: 1 rule(s)")
    # No problem left; the accepted config's warnings are listed as such (this one has some:
    # the rule's bare ttl, cache.max_object against the disk's shards).
    await expect(page.locator("#reload-problems li.error")).to_have_count(0)
    await expect(page.locator("#reload-problems li.warning").first).to_contain_text(": warning: ")

    # Log out: the login form again, no session, and a reload of the page stays logged out.
    await page.click("#logout")
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(page.locator("#dashboard")).to_be_hidden()
    assert not [c for c in await page.context.cookies() if c["name"] == "cachegate_session"]
    await page.reload()
    await expect(page.locator("#login-form")).to_be_visible()
    assert await page.locator("#top-urls tbody tr").count() == 0
