"""The shipped rules/default.yaml and rules/examples/*: loaded, and exercised through the proxy.

The guarantee checked first: with no rule files, and with rules/default.yaml, cachegate
adds no TTL to a response that carries no freshness information.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config import load_config
from tests.harness import Origin, Proxy
from tests.rules.util import settle, shift_clock, ttl

MakeProxy = Callable[..., Awaitable[Proxy]]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "rules" / "examples"


def shipped(name: str) -> str:
    return (ROOT / "rules" / name).read_text()


@pytest.mark.parametrize("rules", [None, "default.yaml"])
async def test_no_ttl_is_added_to_responses_without_freshness(
        origin: Origin, make_proxy: MakeProxy, rules: str | None) -> None:
    proxy = await make_proxy(rules=shipped(rules) if rules else None)
    origin.route("/plain", body=b"plain")
    origin.route("/typed", body=b"{}", headers={"Content-Type": "application/json"})
    origin.route("/gone", status=404, body=b"gone")
    origin.route("/etag", body=b"tagged", headers={"ETag": '"1"'})
    for path in ("/plain", "/typed", "/gone", "/etag"):
        first = await proxy.get(path)
        await settle(proxy)
        second = await proxy.get(path)
        assert first.x_cache == "MISS"
        assert second.x_cache != "HIT", (path, second.cache_status)
        assert origin.count(path) == 2, path
    # With a validator the entry is revalidated on every use, never served as fresh.
    await settle(proxy)
    assert (await proxy.get("/etag")).x_cache in ("REVALIDATED", "EXPIRED", "MISS")
    assert origin.count("/etag") == 3


async def test_default_yaml_keeps_serving_stale_on_origin_errors(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules=shipped("default.yaml"))
    origin.route("/a", body=b"good", headers={"Cache-Control": "max-age=1"})
    await proxy.get("/a")
    await settle(proxy)
    shift_clock(proxy, 120)
    origin.route("/a", status=503, body=b"down")
    stale = await proxy.get("/a")
    assert (stale.status, stale.body, stale.x_cache) == (200, b"good", "STALE")


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_loads(name: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\ncache: {{disk: null}}\n"
                      f"rules: ['{ROOT / 'rules/default.yaml'}', '{EXAMPLES / name}']\n")
    settings = load_config(str(config))
    assert len(settings.rules.rules) >= 4


def test_there_are_at_least_three_examples() -> None:
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"static-site.yaml", "json-api.yaml", "mixed-app.yaml"} <= names


async def test_static_site_example(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules=(EXAMPLES / "static-site.yaml").read_text())
    css = {"Content-Type": "text/css", "Cache-Control": "max-age=60", "X-Powered-By": "nginx"}
    origin.route("/assets/app.3f9a1c2e8b.css", body=b"body{}", headers=css)
    origin.route("/images/logo.png", body=b"png", headers={"Content-Type": "image/png"})
    origin.route("/about.html", body=b"<p>about", headers={"Content-Type": "text/html",
                                                            "X-Powered-By": "nginx"})
    origin.route("/drafts/next.html", body=b"<p>draft", headers={"Content-Type": "text/html"})

    asset = await proxy.get("/assets/app.3f9a1c2e8b.css?v=1")
    again = await proxy.get("/assets/app.3f9a1c2e8b.css?v=2")
    assert (asset.x_cache, again.x_cache) == ("MISS", "HIT")
    assert ttl(again) > 300 * 86400  # override_origin: a year, not the origin's 60 s
    assert again.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert (await proxy.get("/images/Logo.PNG")).x_cache == "MISS"
    assert (await proxy.get("/images/logo.png")).x_cache == "HIT"  # lower-cased key
    page = await proxy.get("/about.html")
    assert page.headers["Cache-Control"] == "public, max-age=60" and "X-Powered-By" not in page.headers
    hit = await proxy.get("/about.html")
    assert hit.x_cache == "HIT" and 530 <= ttl(hit) <= 600  # defaults ttl 10m, less up to 10% jitter
    assert (await proxy.get("/drafts/next.html")).x_cache == "BYPASS"


async def test_json_api_example(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules=(EXAMPLES / "json-api.yaml").read_text())

    async def product(request: web.Request) -> web.Response:
        return web.Response(text=f'{{"path": "{request.path_qs}"}}', content_type="application/json")

    origin.route("/api/v1/products/1", product)
    origin.route("/api/v1/search", product)
    origin.route("/api/v1/orders", status=503, body=b"down", headers={"Cache-Control": "max-age=60"})
    assert (await proxy.get("/api/v1/products/1?utm_source=x&b=2&a=1")).x_cache == "MISS"
    assert (await proxy.get("/api/v1/products/1?a=1&b=2")).x_cache == "HIT"
    assert origin.seen[-1].path == "/api/v1/products/1?a=1&b=2"
    user = await proxy.get("/api/v1/products/1?a=1&b=2", headers={"Authorization": "Bearer t"})
    assert user.x_cache == "BYPASS"
    assert (await proxy.get("/api/v1/search")).x_cache == "BYPASS"
    await proxy.get("/api/v1/search?q=red&sort=x")
    busted = await proxy.get("/api/v1/search?q=red", headers={"Cache-Control": "no-cache"})
    assert busted.x_cache == "HIT"  # client_cache_control: ignore for search
    assert busted.headers["Cache-Control"] == "public, max-age=30"
    assert 'RULE-NO-STORE:API errors are not kept' in (await proxy.get("/api/v1/orders")).cache_status


async def test_mixed_app_example(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules=(EXAMPLES / "mixed-app.yaml").read_text())

    async def page(request: web.Request) -> web.Response:
        bucket = request.cookies.get("ab_bucket", "-")
        return web.Response(text=f"{request.path_qs} {bucket}", content_type="text/html",
                            headers={"X-Powered-By": "rails"})

    origin.route("/", page)
    origin.route("/account", page)
    origin.route("/static/me.css", page)  # a personal page behind a static-looking URL
    assert (await proxy.get("/?utm_source=news")).x_cache == "MISS"
    home = await proxy.get("/")
    assert home.x_cache == "HIT" and "X-Powered-By" not in home.headers
    assert (await proxy.get("/", headers={"Cookie": "ab_bucket=b"})).body == b"/ b"
    assert (await proxy.get("/", headers={"Cookie": "ab_bucket=b; theme=x"})).x_cache == "HIT"
    assert (await proxy.get("/", headers={"Cookie": "session=1"})).x_cache == "BYPASS"
    assert (await proxy.get("/account")).x_cache == "BYPASS"
    assert (await proxy.get("/", headers={"Cache-Control": "no-cache"})).x_cache == "HIT"
    assert "DECEPTION-GUARD" in (await proxy.get("/static/me.css")).cache_status
