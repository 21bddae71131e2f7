"""What clients and origins write, shown by the console in real headless Chromium against
``cachegate run``: 8 KB URLs in the top lists leave Inspect and Purge within reach (each cell
shows its start and says how long the whole is; the whole is what inspect looks up); invisible
and bidi characters are written as escapes, so variants that differ by them do not look alike;
the key's lookups, counted for all its variants together, are shown once for them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.console.browser import browser_page, need_browser, until
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, write_config

pytestmark = pytest.mark.slow

VIEWPORT = 1000  # px: browser_page's height
LONG = 8140  # characters of a URL's query: as long as a request line may be


async def start(tmp_path: Path, origin: Origin) -> ProxyProcess:
    """cachegate with its console open (no token: the admin listener is loopback only)."""
    config = await asyncio.to_thread(write_config, str(tmp_path), origin.url, "cache: {memory: 16MB}\n")
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start()
    await proxy.wait_for(lambda: bool(proxy.admin_url))
    return proxy


async def raw_get(proxy: ProxyProcess, path: bytes, fields: bytes = b"") -> bytes:
    """A GET whose target and fields are sent as these bytes (UTF-8 in a field: a client that
    can, not what aiohttp's client would send)."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" % (path, HOST.encode(), fields))
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    return answer


async def test_8_kb_urls_in_the_top_lists_leave_inspect_and_purge_within_reach(
        origin: Origin, tmp_path: Path) -> None:
    """Each 8 KB URL wrapped to about 3,500 px in its cell: 15 of them in Top URLs put the Purge
    form some 50,000 px down the page. A cell now shows 200 characters and the length of the
    whole (the whole in its title), the tables that clients fill scroll in a bounded box, and
    the buttons still inspect the whole URL."""
    from playwright.async_api import expect

    need_browser()
    origin.route("/huge", body=b"h", headers={"Cache-Control": "max-age=300"})
    origin.route("/private", body=b"p", headers={"Cache-Control": "private"})
    urls = [f"/huge?{i:02d}" + "C" * LONG for i in range(16)]
    private = "/private?" + "D" * LONG
    proxy = await start(tmp_path, origin)
    try:
        async with aiohttp.ClientSession(headers={"Host": HOST}) as s:
            for path in [*urls, *urls, private]:
                async with s.get(proxy.url + path) as r:
                    assert r.status == 200
                    await r.read()
        async with browser_page(tmp_path / "profile") as page:
            await page.goto(proxy.admin_url + "/")
            await until(page, "document.querySelectorAll('#top-urls tbody tr').length >= 15"
                              " && document.querySelector('#not-stored tbody').textContent.includes('PRIVATE')")
            for form in ("#purge-form", "#inspect-form"):
                y = await page.evaluate(f"document.querySelector('{form}').getBoundingClientRect().top + scrollY")
                assert y < 2 * VIEWPORT, (form, y)
            cells = await page.locator("#top-urls tbody td.url").all()
            assert len(cells) >= 15
            for cell in cells:
                text, title = await cell.text_content(), await cell.get_attribute("title")
                assert title in {f"http://{HOST}{u}" for u in urls}, (title or "")[:100]
                assert len(text) < 250 and text == title[:200] + f"…({len(title):,} chars)", text

            # The not-stored example: a button showing the start, that inspects the whole URL.
            example, whole = page.locator("#not-stored tbody button"), f"http://{HOST}{private}"
            await expect(example).to_have_text(whole[:200] + f"…({len(whole):,} chars)")
            assert await example.get_attribute("title") == whole
            await example.click()
            await expect(page.locator("#inspect-url")).to_have_value(f"http://{HOST}{private}")
            await expect(page.locator("#inspect-result")).to_be_visible()

            row = page.locator("#top-urls tbody tr").first
            whole = await row.locator("td.url").get_attribute("title")
            await row.locator("button").click()
            await expect(page.locator("#inspect-url")).to_have_value(whole or "")
            await expect(page.locator("#variants tbody tr").first).to_contain_text("fresh")
            decision = await page.locator("#inspect-decision").text_content() or ""
            assert "…(8," in decision and len(decision) < 600, decision[:700]  # (the key, cut short)
            assert page.errors == [], page.errors
    finally:
        await proxy.stop()


async def tenant_page(request: web.Request) -> web.Response:
    tenant = request.headers.get("X-Tenant", "")
    return web.Response(body=tenant.encode(), headers={"Cache-Control": "max-age=300", "Vary": "X-Tenant",
                                                       "Surrogate-Key": f"tenant-{tenant}"})


async def inspect_tenants(proxy: ProxyProcess, page: Any, tenants: list[str]) -> Any:
    """A variant of /tenant stored for each ``X-Tenant`` of ``tenants``, and Inspect of it in the
    console: its variants' rows, once there is one for each."""
    from playwright.async_api import expect

    for tenant in tenants:
        await raw_get(proxy, b"/tenant", b"X-Tenant: " + tenant.encode() + b"\r\n")
    await page.goto(proxy.admin_url + "/")
    await page.fill("#inspect-url", f"http://{HOST}/tenant")
    await page.click("#inspect-button")
    await expect(page.locator("#inspect-result")).to_be_visible()
    rows = page.locator("#variants tbody tr")
    await expect(rows).to_have_count(len(tenants))
    return rows


async def test_invisible_and_bidi_characters_are_shown_as_escapes_so_variants_differ(
        origin: Origin, tmp_path: Path) -> None:
    """``X-Tenant: acme``, ``acme`` with a zero-width space, and U+202E (right-to-left override)
    then ``emca``: three variants stored, which Inspect showed as "acme" three times (their tags
    too). The characters that show as nothing or reorder the text are written as escapes."""
    need_browser()
    origin.route("/tenant", tenant_page)
    tenants = ["acme", "acme\u200b", "\u202eemca", "ac\u00adme\ufeff\u2066", "acme\u200d"]
    proxy = await start(tmp_path, origin)
    try:
        async with browser_page(tmp_path / "profile") as page:
            rows = await inspect_tenants(proxy, page, tenants)
            vary = {await rows.nth(i).locator("td").first.inner_text() for i in range(len(tenants))}
            assert vary == {'x-tenant: "acme"', 'x-tenant: "acme\\u200b"', 'x-tenant: "\\u202eemca"',
                            'x-tenant: "ac\\xadme\\ufeff\\u2066"', 'x-tenant: "acme\\u200d"'}, vary
            tags = {await rows.nth(i).locator("td").nth(5).inner_text() for i in range(len(tenants))}
            assert tags == {"tenant-acme", "tenant-acme\\u200b", "tenant-\\u202eemca",
                            "tenant-ac\\xadme\\ufeff\\u2066", "tenant-acme\\u200d"}, tags
            text = await page.locator("#dashboard").inner_text()
            assert not any(c in text for c in "\u200b\u202e\u00ad\ufeff\u2066\u200d"), ascii(text)
            bidi = await page.evaluate("getComputedStyle(document.querySelector('#variants td')).unicodeBidi")
            assert bidi == "isolate"

            assert page.errors == [], page.errors
    finally:
        await proxy.stop()


async def test_text_that_reads_as_an_escape_is_not_shown_as_one_and_cuts_count_characters(
        origin: Origin, tmp_path: Path) -> None:
    """A zero-width space was shown as ``\\u200b``, and so were the six characters ``\\u200b``
    as a client sent them: ``X-Tenant: acme`` + U+200B and ``X-Tenant: acme\\u200b`` were two
    variants whose tags read alike. A backslash is now shown ``\\\\``. And a cut value said its
    length in UTF-16 units: 250 emoji were "(500 chars)" and only 100 of them were shown."""
    need_browser()
    origin.route("/tenant", tenant_page)
    emoji = "\U0001f600" * 250
    tenants = ["acme\u200b", "acme\\u200b", emoji]
    proxy = await start(tmp_path, origin)
    try:
        async with browser_page(tmp_path / "profile") as page:
            rows = await inspect_tenants(proxy, page, tenants)
            cells = [[rows.nth(i).locator("td").nth(n) for n in (0, 5)] for i in range(len(tenants))]
            texts = {(await vary.inner_text(), await tags.inner_text()) for vary, tags in cells}
            # (a Vary value is written as JSON writes it: its backslash is \\ there already)
            whole_vary, whole_tag = f'x-tenant: "{emoji}"', f"tenant-{emoji}"  # 262 and 257 characters
            cut = (f"{whole_vary[:200]}…(262 chars)", f"{whole_tag[:200]}…(257 chars)")
            assert texts == {('x-tenant: "acme\\u200b"', "tenant-acme\\u200b"),
                             ('x-tenant: "acme\\\\u200b"', "tenant-acme\\\\u200b"), cut}, texts
            titles = {(await vary.get_attribute("title"), await tags.get_attribute("title")) for vary, tags in cells}
            assert (whole_vary, whole_tag) in titles, titles
            assert page.errors == [], page.errors
    finally:
        await proxy.stop()


async def test_the_keys_lookups_are_shown_once_for_all_its_variants(origin: Origin, tmp_path: Path) -> None:
    """``hits`` in ``GET /cache`` counts the lookups of the key, all its variants together; the
    console showed that number on each variant's row, as if each had had that many."""
    from playwright.async_api import expect

    need_browser()
    origin.route("/tenant", tenant_page)
    proxy = await start(tmp_path, origin)
    try:
        for tenant, n in (("a", 5), ("b", 2)):
            for _ in range(n):
                await raw_get(proxy, b"/tenant", b"X-Tenant: %s\r\n" % tenant.encode())
        stored = (await proxy.admin("GET", f"/cache?url=http://{HOST}/tenant")).body
        variants = json.loads(stored)["variants"]
        assert len(variants) == 2 and len({v["key"] for v in variants}) == 1
        hits = max(v["hits"] for v in variants)
        assert hits > 0, variants
        async with browser_page(tmp_path / "profile") as page:
            await page.goto(proxy.admin_url + "/")
            await page.fill("#inspect-url", f"http://{HOST}/tenant")
            await page.click("#inspect-button")
            await expect(page.locator("#variants tbody tr")).to_have_count(2)
            await expect(page.locator("#variants thead th").last).to_have_text("key lookups (all variants)")
            lookups = page.locator("#variants tbody td.lookups")
            await expect(lookups).to_have_count(1)  # one cell, across both rows
            assert await lookups.get_attribute("rowspan") == "2"
            await expect(lookups).to_have_text(str(hits))
            # Each row has one cell fewer than the header after the first: the same column.
            counts = [await page.locator("#variants tbody tr").nth(i).locator("td").count() for i in range(2)]
            assert counts == [9, 8], counts
            assert page.errors == [], page.errors
    finally:
        await proxy.stop()
