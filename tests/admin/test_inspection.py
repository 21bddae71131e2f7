"""GET /cache (every stored variant of a URL) and GET /stats (tiers, hit ratios, top keys)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from proxy.inspection import DISK_COUNT_MAX_AGE
from proxy.metrics import RequestWindow
from proxy.settings import SHARD_FLOOR
from tests.admin.test_metrics import scrape, value
from tests.admin.util import absolute, inspector, js, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

CONFIG = "cache: {memory: 16MB, memory_max_object: 2KB, disk: {path: cache, size: 64MB, shards: 2}}\n"


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy(config=CONFIG)


async def cache_of(proxy: Proxy, path: str) -> list[dict[str, object]]:
    reply = await proxy.admin("GET", "/cache?url=" + quote(absolute(proxy, path)))
    assert reply.status == 200, reply.body
    body = js(reply)
    assert body["url"] == absolute(proxy, path)
    return list(body["variants"])


async def test_cache_shows_each_variant_with_its_tiers_age_ttl_tags_and_hits(origin: Origin, proxy: Proxy) -> None:
    origin.route("/c", body=b"hello", headers={"Cache-Control": "max-age=100", "Vary": "Accept-Language",
                                              "Surrogate-Key": "greeting page-c"})
    for lang, times in (("de", 3), ("fr", 1)):
        for _ in range(times):
            await proxy.get("/c", headers={"Accept-Language": lang})
    await settle(proxy)
    variants = await cache_of(proxy, "/c")
    assert len(variants) == 2
    by_lang = {v["vary"]["accept-language"]: v for v in variants}  # type: ignore[index]
    de = by_lang["de"]
    assert de["key"] == absolute(proxy, "/c") and de["status"] == 200 and de["size"] == 5
    assert ["Cache-Control", "max-age=100"] in de["headers"]  # type: ignore[operator]
    assert de["tags"] == ["greeting", "page-c"]
    assert (de["tier"], de["tiers"], de["body_in_memory"]) == ("memory", ["memory", "disk"], True)
    assert 0 <= de["age"] < 5 and abs(de["ttl"] + de["age"] - 100) < 0.01  # type: ignore[operator]
    assert de["fresh"] is True and de["freshness_source"] == "max-age"
    # Memory-tier uses count per key: the key's four lookups after the first store.
    assert de["hits"] == by_lang["fr"]["hits"] and de["hits"] >= 2


async def test_a_body_too_big_for_memory_is_served_from_disk(origin: Origin, proxy: Proxy) -> None:
    origin.route("/big", body=b"b" * 10_000, headers={"Cache-Control": "max-age=100"})
    await proxy.get("/big")
    await settle(proxy)
    [variant] = await cache_of(proxy, "/big")
    assert (variant["tier"], variant["body_in_memory"], variant["size"]) == ("disk", False, 10_000)


async def test_the_disk_entries_gauge_is_a_count_reused_while_the_bytes_are_read_at_each_scrape(
        origin: Origin, proxy: Proxy) -> None:
    """cachegate_cache_entries{tier="disk"} is the index's count, reused for DISK_COUNT_MAX_AGE
    (a COUNT(*) per scrape costs in proportion to the entries), while the bytes beside it are
    read at each scrape (the docs say how old it may be: the test below)."""
    for path in ("/first", "/second"):
        origin.route(path, body=b"d" * 4096, headers={"Cache-Control": "max-age=600"})  # over 2KB: disk
    await proxy.get("/first")
    await settle(proxy)
    before = await scrape(proxy)
    await proxy.get("/second")
    await settle(proxy)
    after = await scrape(proxy)
    disk = {"tier": "disk"}
    assert value(after, "cachegate_cache_bytes", **disk) > value(before, "cachegate_cache_bytes", **disk)
    assert value(after, "cachegate_cache_entries", **disk) == value(before, "cachegate_cache_entries", **disk) == 1


@pytest.mark.parametrize(("name", "anchor"), [
    ("admin-api.md", "| `cachegate_cache_entries`"), ("admin-api.md", "`tiers.disk.entries`"),
    ("console.md", "| Memory, Disk |"),
])
def test_the_docs_say_how_old_the_disk_entries_may_be(name: str, anchor: str) -> None:
    """Where /metrics, /stats and the console's disk entries are described (a table's row, or
    the paragraph)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / name).read_text()
    said = text[text.index(anchor):].split("\n" if anchor.startswith("|") else "\n\n")[0]
    age = f"{DISK_COUNT_MAX_AGE:g} s"
    assert f"up to {age} older" in said or f"at most {age} ago" in said, said


async def test_cache_of_something_not_stored_is_empty_and_bad_requests_get_400(origin: Origin, proxy: Proxy) -> None:
    await proxy.get("/nothing")  # 404 without freshness: not stored
    assert await cache_of(proxy, "/nothing") == []
    for query, message in (("", "give the URL"), ("url=/x", "absolute"), ("url=http://else.example/", "does not serve"),
                           ("url=" + quote(absolute(proxy, "/")) + "&all=1", "unknown parameter 'all'")):
        reply = await proxy.admin("GET", "/cache?" + query)
        assert reply.status == 400 and message in js(reply)["error"], reply.body


async def test_stats_count_tiers_requests_hit_ratio_and_top_keys(origin: Origin, proxy: Proxy) -> None:
    for path in ("/hot", "/warm", "/cold"):
        origin.route(path, body=path.encode() * 10, headers={"Cache-Control": "max-age=100"})
    for path, n in (("/hot", 6), ("/warm", 3), ("/cold", 1)):
        for _ in range(n):
            await proxy.get(path)
    await settle(proxy)
    stats = js(await proxy.admin("GET", "/stats"))
    assert stats["tiers"]["memory"]["entries"] == 3 and stats["tiers"]["memory"]["bytes"] > 0
    assert stats["tiers"]["disk"]["entries"] == 3 and stats["tiers"]["disk"]["bytes"] > 0
    assert stats["requests"] == {"total": 10, "by_cache_status": {"HIT": 7, "MISS": 3}}
    assert stats["hit_ratio"]["since_start"] == 0.7
    # /cold was stored and never read since: not held decoded, so not among the top keys.
    assert [(k["url"], k["hits"]) for k in stats["top_keys"]] == [
        (absolute(proxy, "/hot"), 5), (absolute(proxy, "/warm"), 2)]
    assert len(js(await proxy.admin("GET", "/stats?top=1"))["top_keys"]) == 1
    for query in ("top=x", "top=-1", "bogus=1", "top=1&top=2"):
        assert (await proxy.admin("GET", "/stats?" + query)).status == 400, query


async def test_the_last_minute_hit_ratio_leaves_older_requests_out(origin: Origin, proxy: Proxy) -> None:
    clock = [1000.0]
    # A window on a clock the test moves (the background sampler's next round is 5 s away).
    inspector(proxy).window = RequestWindow(clock=lambda: clock[0])
    origin.route("/x", body=b"x", headers={"Cache-Control": "max-age=100"})
    origin.route("/y", body=b"y")  # never stored: always a miss
    for _ in range(4):
        await proxy.get("/y")
    await inspector(proxy).refresh()  # a sample at t=1000: 4 misses so far
    clock[0] += 61
    await inspector(proxy).refresh()  # t=1061: still 4 misses
    clock[0] += 30
    for _ in range(4):
        await proxy.get("/x")  # a miss, then 3 hits
    ratio = js(await proxy.admin("GET", "/stats"))["hit_ratio"]
    assert ratio["since_start"] == round(3 / 8, 4)
    # The sample at t=1000 is over a minute old: the window starts at t=1061.
    assert (ratio["last_minute"], ratio["last_minute_requests"]) == (0.75, 4)
    assert ratio["last_minute_window_seconds"] == 30.0


async def test_long_urls_are_inspected_and_overlong_request_lines_get_a_json_error(
        origin: Origin, proxy: Proxy) -> None:
    # 7,500 bytes as the client sends it; escaped as a query parameter (= and & take 3 bytes
    # each), 17,500: over aiohttp's default line limit, 8,190 bytes.
    long_path = "/long?" + "x=&" * 2500
    origin.route("/long", body=b"long", headers={"Cache-Control": "max-age=100"})
    await proxy.get(long_path)
    await settle(proxy)
    reply = await proxy.admin("GET", "/cache?url=" + quote(absolute(proxy, long_path), safe=""))
    assert reply.status == 200 and len(js(reply)["variants"]) == 1, reply.body[:300]
    reply = await proxy.admin("GET", "/explain?url=" + quote(absolute(proxy, long_path), safe=""))
    assert reply.status == 200, reply.body[:300]
    reply = await proxy.admin("GET", "/cache?url=" + quote(absolute(proxy, "/" + "c" * 70_000)))
    assert reply.status == 414 and reply.headers["Content-Type"].startswith("application/json")
    assert js(reply) == {"error": "the request line (method, URL, version) is over 65,536 bytes, "
                                  "the admin listener's limit"}
    reply = await proxy.admin("GET", "/stats", headers={"X-Big": "a" * 9000})
    assert reply.status == 431 and js(reply)["error"].startswith("a header field is over 8,190 bytes")


async def test_stats_show_the_disk_shards_budget_in_force_and_the_biggest_body_stored(proxy: Proxy) -> None:
    """The budget the URL index lowers (``count_index``) and the biggest body stored with it:
    an operator saw fills TOO-LARGE under a max_object far above them, with nothing saying why."""
    storage = proxy.runtime.storage
    disk = storage.disk
    assert disk is not None
    usual = disk.shard_limit
    shown = js(await proxy.admin("GET", "/stats?top=0"))["tiers"]["disk"]
    assert (shown["shard_budget"], shown["shard_budget_configured"], shown["max_body"]) == \
        (usual, usual, usual // 2)
    assert shown["over_size"] is False
    # A 64 GB index, as the owner's upkeep counts it every second (which, counting the real one
    # meanwhile, put the configured budget back under the test's feet): the shards at their floor.
    assert storage.index is not None
    storage.index.size = lambda: 64 << 30  # type: ignore[method-assign]
    storage.memory.arena.set_shard_budget(disk.count_index(storage.index.size()))
    shown = js(await proxy.admin("GET", "/stats?top=0"))["tiers"]["disk"]
    floor = min(usual, SHARD_FLOOR)
    assert (shown["shard_budget"], shown["shard_budget_configured"], shown["max_body"]) == \
        (floor, usual, floor // 2)
