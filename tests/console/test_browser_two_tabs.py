"""Two console tabs in one browser, in real headless Chromium. Each tab logs in on its own (the
secret lives in the tab's ``sessionStorage``), but the browser holds one session cookie: the
second tab's login replaces it, so the first tab's secret opens nothing any more. That tab must
say so and ask for the token again (a 401), not sit on a dashboard that stopped updating and
whose purge fails with a reason meant for API clients.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import MakeProxy
from tests.console.browser import browser_page, need_browser

pytestmark = pytest.mark.slow

TOKEN = "two-tabs-t0ken-of-some-length"


async def test_a_login_in_another_tab_sends_the_first_back_to_its_login(
        make_proxy: MakeProxy, tmp_path: Path) -> None:
    from playwright.async_api import expect

    need_browser()
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    async with browser_page(tmp_path / "profile") as first:
        second = await first.context.new_page()
        for page in (first, second):
            await page.goto(proxy.admin_url + "/")
            await expect(page.locator("#login")).to_be_visible(timeout=10_000)
            await page.fill("#token", TOKEN)
            await page.click("#login-button")
            await expect(page.locator("#headline")).to_contain_text("requests since start", timeout=10_000)
        # The first tab's next call (its poll, every second) finds the cookie is the second's.
        await expect(first.locator("#login")).to_be_visible(timeout=10_000)
        await expect(first.locator("#dashboard")).to_be_hidden()
        await expect(first.locator("#login-error")).to_contain_text("logged in again elsewhere")
        await expect(second.locator("#dashboard")).to_be_visible()  # the second goes on
        await first.fill("#token", TOKEN)  # and the first gets back in with the token
        await first.click("#login-button")
        await expect(first.locator("#headline")).to_contain_text("requests since start", timeout=10_000)
        assert first.errors == [], first.errors
