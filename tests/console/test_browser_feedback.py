"""What the console says when things are not quite right, in real headless Chromium against
``cachegate run``: an admin process that stops answering shows "not updating" (a hung call is
given up, the next poll goes on) and the warning clears once it answers again; a reload's
warnings and the workers it replaced are shown, not thrown away; after a restart of cachegate
the charts hold the new process's points only, never the old one's spliced with them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.nodes import wait_until
from tests.console.browser import browser_page, need_browser, until
from tests.harness import Origin
from tests.ports import Ports
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

TOKEN = "feedback-t0ken-of-some-length"
CACHE = "cache: {memory: 16MB}\n"
RULES = """\
rules:
  - name: static
    match: {path: "/static/**"}
    ttl: {200: 1h}
"""


async def start(tmp_path: Path, origin: Origin, *args: str, extra: str = "",
                admin: str = "{listen: '127.0.0.1:0'}") -> ProxyProcess:
    config = await asyncio.to_thread(write_config, str(tmp_path), origin.url, CACHE, extra, admin)
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start(*args)
    await proxy.wait_for(lambda: bool(proxy.admin_url))
    return proxy


async def test_a_hung_admin_process_shows_not_updating_until_it_answers_again(
        origin: Origin, tmp_path: Path) -> None:
    """SIGSTOP: the poll's call hangs. It used to hang forever (no timeout), so the count of failed
    polls never rose and the page went on showing old numbers with no warning."""
    from playwright.async_api import expect

    need_browser()
    proxy = await start(tmp_path, origin)
    assert proxy.process is not None
    try:
        async with browser_page(tmp_path / "profile") as page:
            await page.goto(proxy.admin_url + "/")
            await expect(page.locator("#headline")).to_contain_text("requests since start", timeout=10_000)
            await expect(page.locator("#stale")).to_be_hidden()
            proxy.send(signal.SIGSTOP)
            try:
                await expect(page.locator("#stale")).to_be_visible(timeout=15_000)
                await expect(page.locator("#stale")).to_contain_text("not updating: last update")
            finally:
                proxy.send(signal.SIGCONT)
            # Answering again: the warning goes at the next poll, and the numbers move on.
            await expect(page.locator("#stale")).to_be_hidden(timeout=15_000)
            before = await page.evaluate("state.seq")
            await until(page, f"state.seq > {before}")
            await expect(page.locator("#stale")).to_be_hidden()
            assert page.errors == [], page.errors
    finally:
        await proxy.stop()


async def test_a_reload_shows_its_warnings_and_the_workers_it_replaced(
        origin: Origin, tmp_path: Path) -> None:
    """An empty rule file is a warning, and a worker killed while the reload waits for it is
    replaced: both are in the 200's answer, and the page showed neither."""
    from playwright.async_api import expect

    need_browser()
    rules = tmp_path / "rules.yaml"
    await asyncio.to_thread(rules.write_text, RULES)
    proxy = await start(tmp_path, origin, "--workers", "2", extra="rules: [rules.yaml]\n")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        async with browser_page(tmp_path / "profile") as page:
            await page.goto(proxy.admin_url + "/")
            await expect(page.locator("#headline")).to_contain_text("2 workers", timeout=15_000)

            # A warning only.
            await asyncio.to_thread(rules.write_text, "")
            await page.click("#reload-button")
            await expect(page.locator("#reload-result")).to_contain_text("reloaded: 0 rule(s) from 1 file(s)")
            await expect(page.locator("#reload-result")).to_contain_text("1 warning(s)")
            item = page.locator("#reload-problems li")
            await expect(item).to_have_count(1)
            await expect(item).to_contain_text("rules.yaml:1: warning: the rule file is empty")
            await expect(item).to_have_class("warning")

            # A worker stopped, then killed while the reload waits for its answer: replaced.
            await asyncio.to_thread(rules.write_text, RULES)
            pid = proxy.workers[1]
            os.kill(pid, signal.SIGSTOP)
            try:
                await page.click("#reload-button")
                await asyncio.sleep(1.5)  # the supervisor has loaded the config and called the workers
                await expect(page.locator("#reload-result")).to_have_text("reloading…")
            finally:
                os.kill(pid, signal.SIGKILL)
            await expect(page.locator("#reload-result")).to_contain_text("reloaded: 1 rule(s)", timeout=30_000)
            await expect(page.locator("#reload-result")).to_contain_text("1 worker(s) replaced")
            await expect(item).to_have_count(1)
            await expect(item).to_have_text(f"worker 1 (pid {pid}) was killed by SIGKILL during the reload; "
                                            "its replacement starts with the new config")
            await expect(item).to_have_class("warning")

            # A refused reload: problems in the error style, as before.
            await asyncio.to_thread(rules.write_text, RULES.replace("ttl:", "tll:"))
            await page.click("#reload-button")
            await expect(page.locator("#reload-result")).to_contain_text("config rejected")
            await expect(item.first).to_contain_text("unknown key")
            await expect(item.first).to_have_class("error")
            assert page.errors == [], page.errors
    finally:
        await proxy.stop()


async def live(proxy: ProxyProcess, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return json.loads((await proxy.admin("GET", "/console/api/live?since=0&top=1", headers=headers)).body)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
async def test_after_a_restart_the_charts_hold_the_new_process_points_only(
        origin: Origin, tmp_path: Path, token: str | None, ports: Ports) -> None:
    """The page asked for points after the old process's last ``seq``: once the new process had
    counted past it, those came back and were drawn after the old process's points. Without a
    token the page polls on by itself; with one, its session ended with the restart and it logs in
    again."""
    from playwright.async_api import expect

    need_browser()
    port = ports.hold()  # the same admin port after the restart (the page's origin stays): held across it
    admin = f"{{listen: '127.0.0.1:{port}'" + (f", token: {token}}}" if token else "}")
    proxy = await start(tmp_path, origin, admin=admin)
    try:
        async with browser_page(tmp_path / "profile") as page:
            await page.goto(proxy.admin_url + "/")
            if token:
                await page.fill("#token", token)
                await page.click("#login-button")
            # Two old points: the first was sampled a whole second before the stop, so it is
            # told from the new process's by its time.
            await until(page, "state.points.length >= 2")
            # No call gets through while cachegate restarts, and until the new process has counted
            # past the old one's seq (as a page whose calls failed for a while, or a login later).
            await page.route("**/console/api/**", lambda route: route.abort())
            old_seq = await page.evaluate("state.seq")
            await proxy.stop()
            restarted = time.time()
            await proxy.start()
            await proxy.wait_for(lambda: bool(proxy.admin_url))

            async def counted_past() -> bool:
                return bool((await live(proxy, token))["seq"] >= old_seq + 3)

            await wait_until(counted_past)
            await page.unroute("**/console/api/**")
            if token:
                await expect(page.locator("#login")).to_be_visible(timeout=10_000)
                await page.fill("#token", token)
                await page.click("#login-button")
            await expect(page.locator("#dashboard")).to_be_visible()
            await until(page, f"state.seq >= {old_seq + 3}")
            times = await page.evaluate("state.points.map((p) => p.t)")
            seq = await page.evaluate("state.seq")
            # Only the new process's points, and every one of them from its first on.
            assert [t for t in times if t < restarted - 0.5] == [], (restarted, times)
            assert len(times) == seq, (seq, times)
            assert page.errors == [], page.errors
    finally:
        await proxy.stop()
