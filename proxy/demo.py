"""The demo: a small sample origin, and cachegate in front of it with the shipped rules.

``cachegate demo`` (what ``scripts/run`` starts without ``--config``, with its flags) runs
the origin on 127.0.0.1:9000 and the proxy on 127.0.0.1:8080 with an empty cache, and
once both listen prints the curl lines that show MISS, HIT, REVALIDATED and a purge.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import tempfile
import time

from aiohttp import web

from proxy.config import Overrides, Settings, load_config
from proxy.schema import parse_hostport, show_hostport
from proxy.web.server import Listeners, _bound, serve

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


DEMO_CONFIG = "demo.yaml"  # the config the demo writes (inside --cache-dir when given)


def prepare_demo(listen: str, admin_listen: str, origin_listen: str, rules: str, cache_dir: str | None
                 ) -> tuple[str, Settings, str]:
    """Write the demo's config and load it (ConfigError if broken): (config path, settings,
    a line saying which cache it starts with).

    Without ``cache_dir`` the demo gets a new empty cache in a temporary folder (removed by
    ``run_demo`` at the end), so its first printed ``MISS`` is true; a ``cache_dir`` that
    already holds a cache is reused, and said so.
    """
    origin_host, origin_port = parse_hostport(origin_listen)
    if cache_dir is None:
        home = tempfile.mkdtemp(prefix="cachegate-demo-")
        cache_dir = os.path.join(home, "cache")
        note = "starting with an empty cache (a temporary folder, removed at the end)"
    else:
        # The config goes inside the folder given, not beside it (into a parent the user never
        # named); the disk tier does not mind a file of its own there.
        cache_dir = home = os.path.abspath(cache_dir)
        if os.path.isdir(cache_dir) and set(os.listdir(cache_dir)) - {DEMO_CONFIG}:
            note = (f"reusing the cache in {cache_dir}: what it holds is served, so the first "
                    "request may not be a MISS")
        else:
            note = f"starting with an empty cache in {cache_dir}"
    os.makedirs(cache_dir, exist_ok=True)
    config = os.path.join(home, DEMO_CONFIG)
    rules_line = f"rules: [{os.path.abspath(rules)!s}]\n" if os.path.isfile(rules) else ""
    with open(config, "w") as f:
        f.write(
            f"listen: {listen}\n"
            f"upstreams: [{{url: 'http://{show_hostport((origin_host, origin_port))}'}}]\n"
            f"cache: {{memory: 64MB, disk: {{path: '{cache_dir}', size: 1GB, shards: 4}}}}\n"
            f"admin: {{listen: '{admin_listen}'}}\n"
            + rules_line
        )
    return config, load_config(config, Overrides()), note


def _name_origin(config: str, asked: str, origin_url: str) -> Settings:
    """The config (written before the origin had its port: ``asked``, port 0) made to name the
    port it got (``origin_url``), and loaded again."""
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text.replace(f"'{asked}'", f"'{origin_url}'", 1))
    return load_config(config, Overrides())


async def run_demo(settings: Settings, config: str, origin_listen: str, note: str = "") -> int:
    """Start the sample origin, then cachegate in front of it, until Ctrl-C. The curl lines are
    printed once both listen (with the ports they really got); a port that is taken ends the
    demo with the error instead."""
    origin_host, origin_port = parse_hostport(origin_listen)
    origin = web.AppRunner(create_origin_app(), access_log=None)
    await origin.setup()
    try:
        await web.TCPSite(origin, origin_host, origin_port).start()
    except OSError as exc:
        where = show_hostport((origin_host, origin_port))
        print(f"cachegate demo: cannot start the origin on {where}: {exc}", file=sys.stderr)
        await origin.cleanup()
        return 1
    origin_url = f"http://{show_hostport((origin_host, _bound(origin)[0][1]))}"
    if origin_port == 0:
        settings = _name_origin(config, f"http://{show_hostport((origin_host, 0))}", origin_url)

    def listening(listeners: Listeners) -> None:
        proxy_host, proxy_port = listeners.proxy_addresses[0]
        admin = listeners.admin_addresses[0] if listeners.admin_addresses else ("127.0.0.1", 8081)
        print(instructions(origin_url, f"http://{show_hostport((proxy_host, proxy_port))}",
                           f"http://{show_hostport(admin)}"), flush=True)
        if note:
            print(f"({note})\n", flush=True)

    try:
        return await serve(settings, config, Overrides(), on_listening=listening)
    finally:
        await origin.cleanup()


async def run_origin(listen: str) -> int:
    """Serve only the sample origin until interrupted."""
    host, port = parse_hostport(listen)
    runner = web.AppRunner(create_origin_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"cachegate sample origin listening on http://{show_hostport((host, port))}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
