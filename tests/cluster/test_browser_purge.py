"""A console purge that a node did not acknowledge, in real headless Chromium against two
``cachegate run`` nodes on a real Redis. The admin API answers 202 naming the node; the console
used to show "purged 1 entry" as a success, though that node may still serve what was purged."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.cluster.nodes import Nodes, cluster_view, wait_until
from tests.cluster.redis_server import RedisServer
from tests.console.browser import browser_page, need_browser
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess

pytestmark = pytest.mark.slow


async def _live(proc: ProxyProcess, n: int) -> bool:
    return sum(1 for x in (await cluster_view(proc))["nodes"] if x["live"]) == n


async def test_a_console_purge_a_node_did_not_acknowledge_names_it_as_an_error(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    from playwright.async_api import expect

    need_browser()
    origin.route("/p", body=b"p", headers={"Cache-Control": "max-age=300"})
    # heartbeat 2 s: b, stopped, stays live for a while (its heartbeat's TTL), and a purge waits
    # ack_timeout (1 s) for it, then answers 202 naming it.
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url, heartbeat="2s", ack_timeout="1s")
    try:
        a, b = await asyncio.gather(nodes.start("a"), nodes.start("b"))
        for proc in (a, b):
            await proc.get("/p")
        await wait_until(lambda: _live(a, 2))
        async with browser_page(tmp_path / "profile") as page:
            await page.goto(a.admin_url + "/")
            await expect(page.locator("#cluster-box")).to_be_visible(timeout=15_000)
            await page.fill("#purge-value", f"http://{HOST}/p")

            # Every node acknowledges: the count (the nodes' added up), as a success.
            await page.click("#purge-button")
            await expect(page.locator("#purge-result")).to_have_text("purged 2 entries")
            await expect(page.locator("#purge-result")).not_to_have_class("error")
            for proc in (a, b):
                await proc.get("/p")

            b.send(signal.SIGSTOP)
            try:
                await page.click("#purge-button")
                result = page.locator("#purge-result")
                await expect(result).to_have_text(
                    "purged 1 entry on a; not acknowledged by b: it may still serve what was purged",
                    timeout=10_000)
                await expect(result).to_have_class("error")
            finally:
                b.send(signal.SIGCONT)
            assert page.errors == [], page.errors
    finally:
        await nodes.stop_all()
