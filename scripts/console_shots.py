"""Make docs/console.md's pictures: the console under traffic, a ``cachegate warm`` run and a
``cachegate top`` screen, all from a real cachegate in front of a small shop-like origin.

    .venv/bin/python scripts/console_shots.py [--seconds 90] [--workers 2] [--out docs/images/console.png]

Everything listens on loopback port 0 and lives in a temporary folder; the browser is
Debian's chromium (see tests/console/browser.py). It prints the warm run and the top
screen; the screenshot goes to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.console.browser import browser_page  # noqa: E402
from tests.storage.procs import ProxyProcess, write_config  # noqa: E402

TOKEN = "screenshot-token"
HOST = "shop.example"
RULES = """\
rules:
  - name: static assets
    match: {path: "/static/**"}
    ttl: 1d
    override_origin: true
  - name: logged-in users skip the cache
    match: {cookie: {session: present}}
    bypass: true
"""


def origin_app() -> web.Application:
    async def page(request: web.Request) -> web.Response:
        path = request.path
        await asyncio.sleep(random.uniform(0.005, 0.03))
        if path.startswith("/static/"):
            return web.Response(body=b"/* asset */" * 300, content_type="text/css")
        if path.startswith("/products/"):
            return web.Response(text=f"<h1>{path}</h1>" + "x" * 4000, content_type="text/html",
                                headers={"Cache-Control": "public, max-age=20", "Surrogate-Key": "catalogue"})
        if path == "/cart":
            return web.Response(text="your cart", headers={"Cache-Control": "private"})
        if path == "/search":
            return web.Response(text="results", headers={"Cache-Control": "no-store"})
        if path == "/promo":
            return web.Response(text="promo", headers={"Set-Cookie": "seen=1", "Cache-Control": "max-age=60"})
        if path == "/sitemap.xml":
            urls = "".join(f"<url><loc>http://{HOST}/products/{i}</loc></url>" for i in range(60))
            urls += f"<url><loc>http://{HOST}/discontinued</loc></url>"
            return web.Response(text=f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urls}</urlset>',
                                content_type="application/xml")
        return web.Response(status=404, text="not found")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    return app


async def traffic(proxy_url: str, seconds: float, stop: asyncio.Event) -> None:
    """A shop's traffic: mostly product pages and assets, some carts, searches and logged-in users,
    at a rate that rises and falls."""
    rng = random.Random(7)
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=16, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one() -> None:
            r = rng.random()
            headers = {"Host": HOST}
            if r < 0.55:
                path = f"/products/{min(59, int(rng.paretovariate(1.2)) - 1)}"
            elif r < 0.8:
                path = f"/static/app{rng.randint(0, 9)}.css"
            elif r < 0.86:
                path = "/cart"
            elif r < 0.9:
                path = "/search"
            elif r < 0.95:
                path, headers["Cookie"] = "/products/1", "session=abc"
            elif r < 0.97:
                path = "/promo"
            else:
                path = f"/products/{rng.randint(100, 10_000)}"
            try:
                async with s.get(proxy_url + path, headers=headers) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass

        while not stop.is_set() and time.monotonic() - started < seconds:
            t = time.monotonic() - started
            rate = 120 + 80 * math.sin(t / 12)
            await asyncio.gather(*(one() for _ in range(max(1, int(rate / 10)))))
            await asyncio.sleep(0.1)


def prepare(tmp: str, origin: str) -> str:
    """The config (with the admin token) and the rules in ``tmp``."""
    Path(tmp, "rules.yaml").write_text(RULES)
    config = write_config(tmp, origin, "cache: {memory: 32MB, disk: {path: cache, size: 256MB, shards: 2}}\n",
                          "rules: [rules.yaml]\n")
    text = Path(config).read_text().replace(
        "admin: {listen: '127.0.0.1:0'}", f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}")
    Path(config).write_text(text)
    return config


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs/images/console.png"))
    args = parser.parse_args()
    runner = web.AppRunner(origin_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    with tempfile.TemporaryDirectory() as tmp:
        config = prepare(tmp, f"http://127.0.0.1:{port}")
        proxy = ProxyProcess(tmp, config)
        await proxy.start(*(["--workers", str(args.workers)] if args.workers > 1 else []))
        try:
            await proxy.wait_for(lambda: bool(proxy.admin_url))
            env = {**os.environ, "CACHEGATE_ADMIN_TOKEN": TOKEN}
            warm = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "warm", "--proxy", proxy.url, "--sitemap", f"http://{HOST}/sitemap.xml",
                "--concurrency", "8", "--progress", "lines", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT)
            out, _ = await warm.communicate()
            print(f"$ cachegate warm --proxy {proxy.url} --sitemap http://{HOST}/sitemap.xml --concurrency 8")
            print(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:8080", out.decode()))
            stop = asyncio.Event()
            load = asyncio.ensure_future(traffic(proxy.url, args.seconds, stop))
            async with browser_page(Path(tmp) / "profile", 1400, 1350) as page:
                await page.goto(proxy.admin_url + "/")
                await page.fill("#token", TOKEN)
                await page.click("#login-button")
                await asyncio.sleep(args.seconds * 0.6)
                async with aiohttp.ClientSession() as s:  # a purge: the fills come back
                    await s.post(proxy.admin_url + "/purge", json={"tags": ["catalogue"]},
                                 headers={"Authorization": f"Bearer {TOKEN}"})
                await asyncio.sleep(args.seconds * 0.3)
                await page.fill("#inspect-url", f"http://{HOST}/products/0")
                await page.fill("#inspect-headers", "Accept-Encoding: gzip")
                await page.click("#inspect-button")
                command = [sys.executable, "-m", "proxy", "top", "--admin", proxy.admin_url, "--once"]
                top = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                              env=env, cwd=ROOT, check=False)
                await asyncio.sleep(1.5)
                await page.screenshot(path=args.out, full_page=True)
                stop.set()
                await load
            print("$ cachegate top --admin http://127.0.0.1:8081 --once")
            print(re.sub(r"127\.0\.0\.1:\d+", lambda m: "127.0.0.1:8081" if m.group(0) in proxy.admin_url
                         else "127.0.0.1:9000", top.stdout))
        finally:
            await proxy.stop()
            await runner.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
