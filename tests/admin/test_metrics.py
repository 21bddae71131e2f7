"""GET /metrics: every family the issue lists, with its labels, after real traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Overrides
from proxy.web.server import install_reloader
from tests.admin.util import absolute, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

CONFIG = "cache: {memory: 40KB, memory_max_object: 2KB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = await proxy.admin("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_every_family_is_there_with_its_labels(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=CONFIG)
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    up = origin.url
    origin.route("/small", body=b"s" * 100, headers={"Cache-Control": "max-age=60", "Surrogate-Key": "t"})
    origin.route("/big", body=b"b" * 10_000, headers={"Cache-Control": "max-age=60"})
    origin.route("/private", body=b"p", headers={"Cache-Control": "private"})
    origin.route("/slow", body=b"w", headers={"Cache-Control": "max-age=60"}, delay=0.2)
    for path in ("/small", "/small", "/big", "/big", "/private"):
        await proxy.get(path)
    await proxy.request("HEAD", "/small")
    await proxy.request("POST", "/private", data=b"x")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async def one() -> None:
            async with s.get(proxy.url + "/slow") as r:
                await r.read()

        await asyncio.gather(*(one() for _ in range(4)))  # 1 fetch, 3 coalesced waiters
    for i in range(40):  # 40 x 1 KB into a 40 KB memory tier: some are evicted from memory
        origin.route(f"/fill/{i}", body=b"f" * 1000, headers={"Cache-Control": "max-age=60"})
        await proxy.get(f"/fill/{i}")
    await settle(proxy)
    for spec in ({"urls": [absolute(proxy, "/small")]}, {"prefixes": [absolute(proxy, "/fill/")]},
                 {"tags": ["t"]}, {"all": True, "soft": True}):
        assert (await proxy.admin("POST", "/purge", json=spec)).status == 200
    assert (await proxy.admin("POST", "/reload")).status == 200
    Path(proxy.config_path).write_text("upstreams: nope\n")  # noqa: ASYNC240
    assert (await proxy.admin("POST", "/reload")).status == 400
    origin.route("/after", body=b"a", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/after")  # the purges emptied memory: one entry again
    await settle(proxy)
    await origin.stop()
    await proxy.get("/down")  # an upstream error

    m = await scrape(proxy)
    assert value(m, "cachegate_requests_total", cache_status="MISS", method="GET") >= 4
    assert value(m, "cachegate_requests_total", cache_status="HIT", method="GET") >= 5
    assert value(m, "cachegate_requests_total", cache_status="HIT", method="HEAD") == 1
    assert value(m, "cachegate_requests_total", cache_status="BYPASS", method="POST") == 1
    for tier in ("memory", "disk", "upstream"):
        assert value(m, "cachegate_response_bytes_total", tier=tier) > 0, tier
    assert value(m, "cachegate_response_bytes_total", tier="disk") == 10_000  # the second /big
    assert value(m, "cachegate_upstream_requests_total", upstream=up, status_class="2xx") >= 45
    assert value(m, "cachegate_upstream_errors_total", upstream=up, kind="connect") >= 1
    assert value(m, "cachegate_upstream_latency_seconds_count", upstream=up) >= 45
    assert value(m, "cachegate_upstream_latency_seconds_bucket", upstream=up, le="+Inf") >= 45
    assert value(m, "cachegate_coalesced_requests_total") == 3
    assert value(m, "cachegate_evictions_total", tier="memory") > 0
    assert ("cachegate_evictions_total", (("tier", "disk"),)) in m
    assert value(m, "cachegate_cache_entries", tier="memory") > 0
    assert value(m, "cachegate_cache_entries", tier="disk") > 0
    assert value(m, "cachegate_cache_bytes", tier="memory") > 0
    assert value(m, "cachegate_cache_bytes", tier="disk") > 0
    # (A 40 KB memory tier filled 1 KB at a time may wrap between two looks of write-behind.)
    assert ("cachegate_write_behind_lost_total", ()) in m
    for kind in ("url", "prefix", "tag", "all", "invalidation"):  # the POST invalidated /private
        assert value(m, "cachegate_purges_total", kind=kind) == 1, kind
    assert value(m, "cachegate_config_reloads_total", result="success") == 1
    assert value(m, "cachegate_config_reloads_total", result="failure") == 1
    assert value(m, "cachegate_not_stored_total", reason="PRIVATE") == 1
    assert value(m, "cachegate_upstream_up", upstream=up) in (0.0, 1.0)
