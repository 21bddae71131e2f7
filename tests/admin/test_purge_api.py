"""POST /purge against a running proxy: URLs with every variant, prefixes, tags, all, soft, hosts."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web

from tests.admin.util import absolute, js, memory_passes, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.util import get, send_raw


def versioned(origin: Origin, path: str, headers: dict[str, str] | None = None) -> dict[str, int]:
    """A route whose body names how many times the origin served it (v1, v2, ...)."""
    state = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        state["n"] += 1
        return web.Response(text=f"{path} v{state['n']}", headers={"Cache-Control": "max-age=300",
                                                                  **(headers or {})})

    origin.route(path, handler)
    return state


async def warm(proxy: Proxy, *paths: str) -> None:
    for p in paths:
        await proxy.get(p)
        assert (await proxy.get(p)).x_cache == "HIT", p
    await settle(proxy)


async def test_a_url_purge_removes_every_variant_and_key_shape(origin: Origin, make_proxy: MakeProxy) -> None:
    # Vary: Accept-Language makes two variants; the rule keys /k by a cookie too (another key shape).
    proxy = await make_proxy(rules="""
        rules:
          - name: keyed by bucket
            match: {path: /k}
            key: {cookies: [bucket]}
    """)
    versioned(origin, "/v", {"Vary": "Accept-Language"})
    versioned(origin, "/k")
    for lang in ("de", "fr"):
        await proxy.get("/v", headers={"Accept-Language": lang})
        assert (await proxy.get("/v", headers={"Accept-Language": lang})).x_cache == "HIT"
    for bucket in ("a", "b"):
        await proxy.get("/k", headers={"Cookie": f"bucket={bucket}"})
    await settle(proxy)

    reply = await proxy.admin("POST", "/purge", json={"urls": [absolute(proxy, "/v"), absolute(proxy, "/k")]})
    assert reply.status == 200, reply.body
    assert js(reply) == {"purged": 3, "soft": False}  # 1 key for /v (2 variants), 2 for /k
    for lang in ("de", "fr"):
        assert (await proxy.get("/v", headers={"Accept-Language": lang})).x_cache == "MISS"
    for bucket in ("a", "b"):
        assert (await proxy.get("/k", headers={"Cookie": f"bucket={bucket}"})).x_cache == "MISS"


@pytest.mark.parametrize("tier", ["memory", "disk"])
async def test_a_url_purge_finds_the_key_shape_of_a_rule_that_matches_on_a_header(
        origin: Origin, make_proxy: MakeProxy, tier: str) -> None:
    # The purge used to plan a GET without fields, which the header condition never matched:
    # the URL's entries under the rule's key (its path alone) were left, {"purged": 0}, HIT.
    proxy = await make_proxy(rules="""
        rules:
          - name: mobile
            match: {path: "/m/**", header: {X-Mobile: present}}
            key: {query: ignore, headers: [X-Mobile]}
    """)
    versioned(origin, "/m/p")
    for mobile in ("1", "2"):
        await proxy.get("/m/p?utm=1", headers={"X-Mobile": mobile})
        assert (await proxy.get("/m/p?utm=2", headers={"X-Mobile": mobile})).x_cache == "HIT"
    await settle(proxy)
    if tier == "disk":
        proxy.runtime.storage.memory.clear()
    copies = js(await proxy.admin("GET", "/cache?url=" + quote(absolute(proxy, "/m/p?utm=3"), safe="")))
    assert len(copies["variants"]) == 2  # every key shape of the URL, as the purge finds them
    reply = await proxy.admin("POST", "/purge", json={"urls": [absolute(proxy, "/m/p?utm=3")]})
    assert js(reply) == {"purged": 2, "soft": False}
    for mobile in ("1", "2"):
        assert (await proxy.get("/m/p?utm=1", headers={"X-Mobile": mobile})).x_cache == "MISS"


@pytest.mark.parametrize("tier", ["memory", "disk"])
async def test_a_url_purge_finds_what_a_header_rule_keyed_under_the_lower_cased_path(
        origin: Origin, make_proxy: MakeProxy, tier: str) -> None:
    # /Shop/Item with X-Mobile: the lower-casing rule reads the rules again on /shop/item, where
    # the mobile rule keys it (/shop/item, each X-Mobile value). Purging /Shop/Item planned a
    # request without fields on the path as sent, which the mobile rule matches neither way:
    # {"purged": 0}, and the page went on being a HIT.
    proxy = await make_proxy(rules="""
        rules:
          - name: mobile
            match: {path: "/shop/**", header: {X-Mobile: present}}
            key: {query: ignore, headers: [X-Mobile], lowercase_path: true}
          - name: lower-cased
            key: {lowercase_path: true}
    """)
    versioned(origin, "/shop/item")
    for mobile in ("1", "2"):
        await proxy.get("/Shop/Item?utm=1", headers={"X-Mobile": mobile})
        assert (await proxy.get("/shop/ITEM?utm=2", headers={"X-Mobile": mobile})).x_cache == "HIT"
    await settle(proxy)
    if tier == "disk":
        proxy.runtime.storage.memory.clear()
    url = absolute(proxy, "/Shop/Item?utm=1")
    copies = js(await proxy.admin("GET", "/cache?url=" + quote(url, safe="")))
    assert len(copies["variants"]) == 2  # every key shape of the URL, as the purge finds them
    reply = await proxy.admin("POST", "/purge", json={"urls": [url]})
    assert js(reply) == {"purged": 2, "soft": False}
    for mobile in ("1", "2"):
        again = await proxy.get("/Shop/Item?utm=1", headers={"X-Mobile": mobile})
        assert (again.x_cache, again.body) == ("MISS", f"/shop/item v{2 + int(mobile)}".encode())


async def test_a_prefix_purge_takes_the_urls_under_it_only(origin: Origin, proxy: Proxy) -> None:
    for p in ("/p/1", "/p/2", "/p/deep/3", "/q/1", "/p"):
        versioned(origin, p)
    await warm(proxy, "/p/1", "/p/2", "/p/deep/3", "/q/1", "/p")
    reply = await proxy.admin("POST", "/purge", json={"prefixes": [absolute(proxy, "/p/")]})
    assert (reply.status, js(reply)) == (200, {"purged": 3, "soft": False})
    for p in ("/p/1", "/p/2", "/p/deep/3"):
        again = await proxy.get(p)
        assert (again.x_cache, again.body) == ("MISS", f"{p} v2".encode()), p
    assert (await proxy.get("/q/1")).x_cache == "HIT"
    assert (await proxy.get("/p")).x_cache == "HIT"


async def test_a_prefix_ending_in_a_question_mark_takes_the_queries_of_that_path_only(
        origin: Origin, proxy: Proxy) -> None:
    # An empty query is dropped by URL parsers: "/search?" must not become "/search".
    for p in ("/search", "/searchable", "/search-help"):
        versioned(origin, p)
    await warm(proxy, "/search?q=a", "/search?q=b", "/searchable", "/search-help", "/search")
    reply = await proxy.admin("POST", "/purge", json={"prefixes": [absolute(proxy, "/search?")]})
    assert (reply.status, js(reply)) == (200, {"purged": 2, "soft": False})
    for p in ("/search?q=a", "/search?q=b"):
        assert (await proxy.get(p)).x_cache == "MISS", p
    for p in ("/searchable", "/search-help", "/search"):
        assert (await proxy.get(p)).x_cache == "HIT", p


@pytest.mark.parametrize("suffix", ["#", "#top", "?#"])
async def test_a_prefix_with_a_fragment_is_refused_not_widened(origin: Origin, proxy: Proxy, suffix: str) -> None:
    for p in ("/search", "/searchable"):
        versioned(origin, p)
    await warm(proxy, "/search", "/searchable")
    reply = await proxy.admin("POST", "/purge", json={"prefixes": [absolute(proxy, "/search" + suffix)]})
    assert reply.status == 400, reply.body
    assert "a prefix cannot hold a fragment ('#')" in js(reply)["error"]
    for p in ("/search", "/searchable"):
        assert (await proxy.get(p)).x_cache == "HIT", p


async def test_tags_come_from_surrogate_key_cache_tag_and_rules(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: catalogue pages
            match: {path: "/cat/**"}
            tags: [catalogue]
    """)
    versioned(origin, "/sk", {"Surrogate-Key": "product-1  shelf-a"})
    versioned(origin, "/ct", {"Cache-Tag": "product 2,shelf-a"})
    versioned(origin, "/cat/x")
    versioned(origin, "/none")
    await warm(proxy, "/sk", "/ct", "/cat/x", "/none")

    async def purge_tag(tag: str) -> Any:
        reply = await proxy.admin("POST", "/purge", json={"tags": [tag]})
        assert reply.status == 200, reply.body
        return js(reply)

    assert await purge_tag("product 2") == {"purged": 1, "soft": False}  # Cache-Tag keeps inner spaces
    assert (await proxy.get("/ct")).x_cache == "MISS"
    assert (await proxy.get("/sk")).x_cache == "HIT"
    await settle(proxy)
    assert await purge_tag("shelf-a") == {"purged": 2, "soft": False}
    assert (await proxy.get("/sk")).x_cache == "MISS"
    assert (await proxy.get("/ct")).x_cache == "MISS"
    assert await purge_tag("catalogue") == {"purged": 1, "soft": False}
    assert (await proxy.get("/cat/x")).x_cache == "MISS"
    assert (await proxy.get("/none")).x_cache == "HIT"
    assert await purge_tag("no-such-tag") == {"purged": 0, "soft": False}


async def test_the_tag_header_names_are_configurable(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config="""
        cache:
          memory: 16MB
          disk: {path: cache, size: 64MB, shards: 2}
          tag_headers: [X-Magento-Tags]
    """)
    versioned(origin, "/m", {"X-Magento-Tags": "cat_p_1,cat_c_2 store_1", "Surrogate-Key": "ignored"})
    await warm(proxy, "/m")
    ignored = await proxy.admin("POST", "/purge", json={"tags": ["ignored"]})
    assert js(ignored) == {"purged": 0, "soft": False}
    assert (await proxy.get("/m")).x_cache == "HIT"
    purged = await proxy.admin("POST", "/purge", json={"tags": ["cat_c_2"]})
    assert js(purged) == {"purged": 1, "soft": False}
    assert (await proxy.get("/m")).x_cache == "MISS"


async def test_purge_all_empties_both_tiers(origin: Origin, proxy: Proxy) -> None:
    for p in ("/a", "/b", "/c"):
        versioned(origin, p)
    await warm(proxy, "/a", "/b", "/c")
    reply = await proxy.admin("POST", "/purge", json={"all": True})
    assert (reply.status, js(reply)) == (200, {"purged": 3, "soft": False})
    assert len(proxy.runtime.storage.memory) == 0
    for p in ("/a", "/b", "/c"):
        assert (await proxy.get(p)).x_cache == "MISS"


@pytest.mark.parametrize("kind", ["urls", "prefixes", "tags", "all"])
async def test_a_soft_purge_serves_the_old_copy_while_one_request_revalidates(
        origin: Origin, proxy: Proxy, kind: str) -> None:
    calls = {"n": 0}

    async def slow_page(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] > 1:
            await asyncio.sleep(0.3)  # the revalidation takes a while: others keep being served
        return web.Response(text=f"v{calls['n']}", headers={
            "Cache-Control": "max-age=300", "ETag": f'"{calls["n"]}"', "Surrogate-Key": "soft"})

    origin.route("/s/page", slow_page)
    await warm(proxy, "/s/page")
    spec = {"urls": {"urls": [absolute(proxy, "/s/page")]}, "prefixes": {"prefixes": [absolute(proxy, "/s/")]},
            "tags": {"tags": ["soft"]}, "all": {"all": True}}[kind]
    reply = await proxy.admin("POST", "/purge", json={**spec, "soft": True})
    assert (reply.status, js(reply)) == (200, {"purged": 1, "soft": True})

    herd = await asyncio.gather(*(proxy.get("/s/page") for _ in range(5)))
    assert {(r.body, r.x_cache) for r in herd} == {(b"v1", "UPDATING")}
    assert all("detail=SOFT-PURGED" in r.cache_status for r in herd)
    # Stale since the purge: its ttl is not what was left of max-age=300 (RFC 9211 §2.3).
    assert all("; ttl=0;" in r.cache_status for r in herd), [r.cache_status for r in herd]
    await settle(proxy)
    assert calls["n"] == 2  # exactly one revalidation for all five
    fresh = await proxy.get("/s/page")
    assert (fresh.body, fresh.x_cache) == (b"v2", "HIT")


async def test_a_url_for_a_host_cachegate_does_not_serve_is_refused(origin: Origin, proxy: Proxy) -> None:
    versioned(origin, "/x")
    await warm(proxy, "/x")
    for body in ({"urls": [absolute(proxy, "/x"), "http://typo.example/x"]},
                 {"prefixes": ["https://typo.example/"], "tags": ["t"]}):
        reply = await proxy.admin("POST", "/purge", json=body)
        assert reply.status == 400
        error = (js(reply))["error"]
        assert "does not serve host 'typo.example'" in error
        assert proxy.url.removeprefix("http://") in error  # names the hosts it does serve
    assert (await proxy.get("/x")).x_cache == "HIT"  # nothing was purged
    # A host with entries in the store counts as served, even with no request since start.
    proxy.runtime.hosts_seen.clear()
    ok = await proxy.admin("POST", "/purge", json={"urls": [absolute(proxy, "/x")]})
    assert ok.status == 200, ok.body


async def test_admin_hosts_lists_the_served_hosts_up_front(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', hosts: [shop.example, '*.cdn.example']}\n")
    for url in ("https://shop.example/a", "http://img.cdn.example:8080/b"):
        reply = await proxy.admin("POST", "/purge", json={"urls": [url]})
        assert (reply.status, js(reply)) == (200, {"purged": 0, "soft": False})
    versioned(origin, "/y")
    await proxy.get("/y")  # seen, but not listed: admin.hosts is the whole list
    for url in ("http://cdn.example/", absolute(proxy, "/y")):
        reply = await proxy.admin("POST", "/purge", json={"urls": [url]})
        assert reply.status == 400
        assert "admin.hosts lists shop.example, *.cdn.example" in (js(reply))["error"]


async def test_a_big_url_purge_lets_client_requests_through_while_it_is_read_and_planned(
        origin: Origin, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge of thousands of URLs, in a cachegate of one process, is read (each URL parsed and
    normalised) and planned (each URL's keys) in slices with a turn of the event loop between
    them: a client's request sent when the first URL is parsed is answered, a HIT, while later
    URLs are still being parsed; the same while they are resolved to keys."""
    import proxy.purge as purge_module

    origin.route("/hot", body=b"hot", headers={"Cache-Control": "max-age=300"})
    await warm(proxy, "/hot")
    monkeypatch.setattr(purge_module, "PURGE_SLICE", 50, raising=False)
    asked: dict[str, asyncio.Future[Any]] = {}
    answered: dict[str, list[bool]] = {"read": [], "plan": []}

    def watched(phase: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if phase not in asked:  # the first URL: a client asks for /hot now
                asked[phase] = asyncio.ensure_future(proxy.get("/hot"))
            answered[phase].append(asked[phase].done())
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(purge_module, "normalise_url", watched("read", purge_module.normalise_url))
    monkeypatch.setattr(purge_module, "keys_for_url", watched("plan", purge_module.keys_for_url))
    urls = [absolute(proxy, f"/gone/{i}") for i in range(3000)]
    reply = await proxy.admin("POST", "/purge", json={"urls": urls})
    assert (reply.status, js(reply)["purged"]) == (200, 0)
    for phase in ("read", "plan"):
        assert len(answered[phase]) == 3000
        assert answered[phase][-1], f"the client's request waited for the whole {phase} of the purge"
        assert (await asked[phase]).x_cache == "HIT"


async def test_a_purge_of_many_urls_looks_through_the_memory_once_a_slice_not_once_a_url(
        origin: Origin, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory tier finds the keys of a slice of URLs (every key shape) in one pass over its
    records: a pass per URL made a purge of thousands of URLs thousands of passes, each over
    the whole memory, on the event loop. What is purged stays the same."""
    import proxy.purge as purge_module

    origin.route("/v", body=b"v", headers={"Cache-Control": "max-age=300", "Vary": "Accept-Language"})
    for lang in ("en", "fr"):
        await proxy.get("/v", headers={"Accept-Language": lang})
    await settle(proxy)
    passes = memory_passes(proxy, monkeypatch)
    urls = [absolute(proxy, f"/gone/{i}") for i in range(2000)] + [absolute(proxy, "/v")]
    reply = await proxy.admin("POST", "/purge", json={"urls": urls})
    assert (reply.status, js(reply)["purged"]) == (200, 1), reply.body  # /v: both variants, one key
    assert passes[0] <= 2 * len(urls) // purge_module.PURGE_SLICE + 10, passes  # 2,001 URLs: not 2,001 passes
    monkeypatch.undo()
    for lang in ("en", "fr"):
        assert (await proxy.get("/v", headers={"Accept-Language": lang})).x_cache == "MISS"
async def test_unknown_query_parameters_on_purge_and_reload_are_refused_and_nothing_is_done(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    versioned(origin, "/q")
    await warm(proxy, "/q")
    reloads: list[int] = []
    proxy.runtime.reload_config = lambda: reloads.append(1)  # type: ignore[assignment,return-value,func-returns-value]
    for query in ("soft=true", "dry_run=1", "urls=x"):
        reply = await proxy.admin("POST", f"/purge?{query}", json={"urls": [absolute(proxy, "/q")]})
        assert reply.status == 400, reply.body
        name = query.split("=")[0]
        assert js(reply)["error"] == f"unknown parameter {name!r}: POST /purge takes no query parameters"
    assert (await proxy.get("/q")).x_cache == "HIT"  # nothing was purged
    reply = await proxy.admin("POST", "/reload?x=1")
    assert reply.status == 400 and js(reply)["error"] == "unknown parameter 'x': POST /reload takes no query parameters"
    assert reloads == []
    reply = await proxy.admin("GET", "/metrics?x=1")
    assert reply.status == 400 and js(reply)["error"] == "unknown parameter 'x': GET /metrics takes no query parameters"


async def test_a_url_purge_of_one_ipv6_spelling_removes_the_entry_of_every_spelling(
        origin: Origin, proxy: Proxy) -> None:
    """``[::1]``, ``[0:0::1]``, ``[0000::1]`` filled one entry each, and a purge took only its own."""
    versioned(origin, "/pg")
    port = proxy.url.rpartition(":")[2]
    spellings = ("[::1]", "[0:0::1]", "[0000::1]", "[::0:1]", "[0:0:0:0:0:0:0:1]", "[::0001]")
    for spelling in spellings:
        reply = await send_raw(proxy, get("/pg", host=f"{spelling}:{port}"))
        assert reply.status == 200, spelling
    assert origin.count("/pg") == 1
    for purged in ("[0:0::1]", "[::1]"):
        for spelling in spellings:
            await send_raw(proxy, get("/pg", host=f"[::1]:{port}"))
            await settle(proxy)
            reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{purged}:{port}/pg"]})
            assert js(reply) == {"purged": 1, "soft": False}, (purged, spelling)
            after = await send_raw(proxy, get("/pg", host=f"{spelling}:{port}"))
            assert after.x_cache == "MISS", (purged, spelling)


async def test_a_purge_url_whose_brackets_hold_no_ipv6_address_is_refused(proxy: Proxy) -> None:
    reply = await proxy.admin("POST", "/purge", json={"urls": ["http://[1:2:3]/x"]})
    assert reply.status == 400 and "IPv6" in js(reply)["error"]
