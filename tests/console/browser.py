"""Headless Chromium for the console's browser tests: Debian's ``chromium`` driven by Playwright.

Never ``playwright install`` (it downloads a browser build, which cannot be had here):
``scripts/test`` installs the Debian package when it is missing, and the tests skip
with the reason when there is still no browser.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CACHEGATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def need_browser() -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/test installs Debian's chromium as root; "
                    "install it with apt-get install chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (it is in the test extra: pip install -e '.[test]')")


@asynccontextmanager
async def browser_page(profile: Path, width: int = 1400, height: int = 1000,
                       extra_args: tuple[str, ...] = ()) -> AsyncIterator[Any]:
    """A page of a fresh Chromium profile in ``profile`` (``extra_args`` added to Chromium's
    command line); the browser is closed afterwards."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=[*ARGS, *extra_args],
            viewport={"width": width, "height": height})
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Script errors only: the browser also logs every non-2xx answer (a refused reload,
            # GET /cluster where there is none) as "Failed to load resource".
            page.on("console", lambda msg: errors.append(msg.text)
                    if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
            page.errors = errors
            yield page
        finally:
            await context.close()


async def until(page: Any, expression: str, wait: float = 15.0) -> None:
    """Poll ``expression`` in the page until it is true (page.wait_for_function evaluates a
    string, which the console's Content-Security-Policy refuses)."""
    deadline = time.monotonic() + wait
    while not await page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true within {wait}s: {expression}"
        await asyncio.sleep(0.2)
