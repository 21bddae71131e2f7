"""The demo: a small sample origin, and cachegate in front of it with the shipped rules.

``cachegate demo`` (what ``scripts/run`` starts with no arguments) runs the origin
on 127.0.0.1:9000 and the proxy on 127.0.0.1:8080, and prints the curl lines
that show MISS, HIT, REVALIDATED and a purge.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time

from aiohttp import web

from proxy.config import Overrides, Settings, load_config
from proxy.schema import parse_hostport
from proxy.web.server import serve

ORIGIN_HITS = web.AppKey("origin_hits", dict)


def create_origin_app() -> web.Application:
    """A sample origin whose pages say how they may be cached."""
    app = web.Application()
    app[ORIGIN_HITS] = {}

    def count(request: web.Request) -> int:
        hits: dict[str, int] = request.app[ORIGIN_HITS]
        hits[request.path] = hits.get(request.path, 0) + 1
        return hits[request.path]

    async def index(request: web.Request) -> web.Response:
        count(request)
        return web.Response(text=(
            "cachegate demo origin\n"
            "  /hello    Cache-Control: max-age=5, ETag: revalidates with 304 after 5 s\n"
            "  /private  Cache-Control: private (never stored)\n"
            "  /slow     takes 1 s, max-age=30 (watch concurrent requests coalesce)\n"
            "  /nocache  no freshness information (never reused)\n"
        ), headers={"Cache-Control": "max-age=60"})

    async def hello(request: web.Request) -> web.Response:
        n = count(request)
        body = b"Hello from the origin!\n"
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        headers = {"Cache-Control": "max-age=5", "ETag": etag, "X-Origin-Requests": str(n),
                   "Content-Type": "text/plain; charset=utf-8"}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers)

    async def private(request: web.Request) -> web.Response:
        n = count(request)
        return web.Response(text=f"your private page (origin request {n})\n",
                            headers={"Cache-Control": "private, max-age=60"})

    async def slow(request: web.Request) -> web.Response:
        n = count(request)
        await asyncio.sleep(1.0)
        return web.Response(text=f"slow page built at {time.strftime('%X')} (origin request {n})\n",
                            headers={"Cache-Control": "max-age=30"})

    async def nocache(request: web.Request) -> web.Response:
        n = count(request)
        return web.Response(text=f"no freshness information (origin request {n})\n")

    app.router.add_get("/", index)
    app.router.add_get("/hello", hello)
    app.router.add_get("/private", private)
    app.router.add_get("/slow", slow)
    app.router.add_get("/nocache", nocache)
    return app


def instructions(origin: str, proxy: str, admin: str) -> str:
    # JSON, as the admin API asks of every POST without a token (curl -d alone sends a form's type).
    purge = (f"curl -s -X POST {admin}/purge -H 'Content-Type: application/json' "
             f"-d '{{\"urls\": [\"{proxy}/hello\"]}}'")
    return f"""
cachegate demo: origin on {origin}, cachegate on {proxy}, admin API on {admin}

  curl -si {proxy}/hello | grep -i x-cache-status    # MISS: fetched from the origin and stored
  curl -si {proxy}/hello | grep -i x-cache-status    # HIT: served from the cache
  sleep 6; curl -si {proxy}/hello | grep -i x-cache-status    # REVALIDATED: 304 from the origin
  {purge}    # {{"purged": 1, ...}}
  curl -si {proxy}/hello | grep -i x-cache-status    # MISS again

  curl -si {proxy}/private | grep -i cache-status     # never stored: detail=PRIVATE
  curl -s {admin}/metrics | grep cachegate_requests

Press Ctrl-C to stop.
"""


def prepare_demo(listen: str, admin_listen: str, origin_listen: str, rules: str, cache_dir: str
                 ) -> tuple[str, Settings]:
    """Write the demo's config beside its cache directory and load it (ConfigError if broken)."""
    origin_host, origin_port = parse_hostport(origin_listen)
    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    config = os.path.join(os.path.dirname(cache_dir), "demo.yaml")
    rules_line = f"rules: [{os.path.abspath(rules)!s}]\n" if os.path.isfile(rules) else ""
    with open(config, "w") as f:
        f.write(
            f"listen: {listen}\n"
            f"upstreams: [{{url: 'http://{origin_host}:{origin_port}'}}]\n"
            f"cache: {{memory: 64MB, disk: {{path: '{cache_dir}', size: 1GB, shards: 4}}}}\n"
            f"admin: {{listen: '{admin_listen}'}}\n"
            + rules_line
        )
    return config, load_config(config, Overrides())


async def run_demo(settings: Settings, config: str, origin_listen: str) -> int:
    """Start the sample origin, then cachegate in front of it, until Ctrl-C."""
    origin_host, origin_port = parse_hostport(origin_listen)
    origin = web.AppRunner(create_origin_app(), access_log=None)
    await origin.setup()
    try:
        await web.TCPSite(origin, origin_host, origin_port).start()
    except OSError as exc:
        print(f"cachegate demo: cannot start the origin on {origin_host}:{origin_port}: {exc}",
              file=sys.stderr)
        await origin.cleanup()
        return 1
    proxy = f"http://{settings.listen[0]}:{settings.listen[1]}"
    admin_listen = settings.admin.listen or ("127.0.0.1", 8081)
    print(instructions(f"http://{origin_host}:{origin_port}", proxy,
                       f"http://{admin_listen[0]}:{admin_listen[1]}"), flush=True)
    try:
        return await serve(settings, config, Overrides())
    finally:
        await origin.cleanup()


async def run_origin(listen: str) -> int:
    """Serve only the sample origin until interrupted."""
    host, port = parse_hostport(listen)
    runner = web.AppRunner(create_origin_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"cachegate sample origin listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
