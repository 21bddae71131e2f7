"""Vary through the proxy: browsers' equivalent Accept-Encoding / Accept-Language share a variant,
and values an origin reads otherwise (another order, another case) never do."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from proxy.policy.httpdate import format_http_date
from proxy.storage.entry import body_key
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Handler, Origin, Proxy

CHROME = {"Accept-Encoding": "gzip, deflate, br, zstd", "Accept-Language": "en-US,en;q=0.9"}
CURL = {"Accept-Encoding": "gzip,deflate , br,zstd", "Accept-Language": "en-US , en; q=0.9"}
FIREFOX = {"Accept-Encoding": "gzip, deflate, br, zstd", "Accept-Language": "en-US,en;q=0.5"}
MIXED_APP = Path(__file__).resolve().parent.parent / "rules" / "examples" / "mixed-app.yaml"


async def test_equivalent_browser_values_share_one_stored_variant(origin: Origin, proxy: Proxy) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"for {request.headers.get('Accept-Language')}", headers={
            "Cache-Control": "max-age=60", "Vary": "Accept-Encoding, Accept-Language"})

    origin.route("/page", page)
    first = await proxy.get("/page", headers=CHROME)
    again = await proxy.get("/page", headers=CURL)  # the same values, other whitespace
    other = await proxy.get("/page", headers=FIREFOX)  # en weighs 0.5, not 0.9: another variant
    assert (first.x_cache, again.x_cache, other.x_cache) == ("MISS", "HIT", "MISS")
    assert again.body == first.body
    assert origin.count("/page") == 2


def first_member(value: str | None, default: str) -> str:
    """What an origin that reads the first member of a list field takes (PHP's
    ``substr($_SERVER['HTTP_ACCEPT_LANGUAGE'], 0, 2)`` for a language, a framework's first
    media type for Accept), whatever the weights say."""
    return (value or default).split(",")[0].split(";")[0].strip()


async def test_a_weighted_down_first_language_never_selects_the_variant_of_the_other_order(
        origin: Origin, proxy: Proxy) -> None:
    async def page(request: web.Request) -> web.Response:
        lang = first_member(request.headers.get("Accept-Language"), "en")[:2]
        return web.Response(text=f"page in {lang}", headers={"Cache-Control": "max-age=60",
                                                              "Vary": "Accept-Language"})

    origin.route("/page", page)
    attacker = await proxy.get("/page", headers={"Accept-Language": "en;q=0.5, de"})
    victim = await proxy.get("/page", headers={"Accept-Language": "de, en;q=0.5"})
    assert (attacker.body, victim.body) == (b"page in en", b"page in de")
    assert victim.x_cache == "MISS"
    shouting = await proxy.get("/page", headers={"Accept-Language": "DE, en;q=0.5"})  # another case: apart
    assert shouting.x_cache == "MISS"
    spaced = await proxy.get("/page", headers={"Accept-Language": "de ,en ; q=0.5"})  # whitespace only
    assert (spaced.x_cache, spaced.body) == ("HIT", b"page in de")


async def test_json_stored_for_a_weighted_down_first_media_type_never_reaches_a_browser(
        origin: Origin, proxy: Proxy) -> None:
    async def page(request: web.Request) -> web.Response:
        if first_member(request.headers.get("Accept"), "text/html") == "application/json":
            return web.json_response({"page": 1}, headers={"Cache-Control": "max-age=60", "Vary": "Accept"})
        return web.Response(text="<html>page</html>", content_type="text/html",
                            headers={"Cache-Control": "max-age=60", "Vary": "Accept"})

    origin.route("/page", page)
    attacker = await proxy.get("/page", headers={"Accept": "application/json;q=0.9, text/html"})
    browser = await proxy.get("/page", headers={"Accept": "text/html, application/json;q=0.9"})
    assert attacker.headers["Content-Type"].startswith("application/json")
    assert (browser.x_cache, browser.headers["Content-Type"]) == ("MISS", "text/html; charset=utf-8")


async def test_the_shipped_mixed_app_rules_key_a_first_language_reader_s_pages_apart(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """rules/examples/mixed-app.yaml keys anonymous pages on Accept-Language (``key.headers``,
    the same reading as a Vary variant's)."""
    async def page(request: web.Request) -> web.Response:
        lang = (request.headers.get("Accept-Language") or "en")[:2]  # PHP's substr(..., 0, 2)
        return web.Response(text=f"<html lang={lang}>page in {lang}</html>", content_type="text/html")

    origin.route("/products", page)
    proxy = await make_proxy(rules=MIXED_APP.read_text())
    attacker = await proxy.get("/products", headers={"Accept-Language": "en;q=0.5, de"})
    victim = await proxy.get("/products", headers={"Accept-Language": "de, en;q=0.5"})
    assert attacker.body == b"<html lang=en>page in en</html>"
    assert (victim.x_cache, victim.body) == ("MISS", b"<html lang=de>page in de</html>")
    again = await proxy.get("/products", headers={"Accept-Language": "de,en;q=0.5"})
    assert (again.x_cache, again.body) == ("HIT", b"<html lang=de>page in de</html>")


async def test_many_variants_of_a_big_page_keep_each_body_once_in_memory(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A client asking with many User-Agents for a page that varies on it: each variant's body
    is written into memory once, in a record of its own (the key's record holds their metadata:
    with the bodies in it, each new variant rewrote all the others'), every variant is served
    its own bytes, and other keys stay in memory."""
    async def page(request: web.Request) -> web.Response:
        agent = request.headers.get("User-Agent", "")
        return web.Response(body=agent.encode().ljust(40 * 1024, b"."), headers={
            "Cache-Control": "max-age=600", "Vary": "User-Agent"})

    origin.route("/big", page)
    origin.route("/hot", body=b"hot", headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(config="cache: {memory: 64MB, memory_max_object: 100KB, "
                                    "disk: {path: cache, size: 256MB}}\n")
    assert (await proxy.get("/hot")).x_cache == "MISS"
    agents = [f"agent-{i}" for i in range(12)]
    memory = proxy.runtime.storage.memory
    head = memory.arena.head
    for agent in agents:
        assert (await proxy.get("/big", headers={"User-Agent": agent})).x_cache == "MISS"
        await asyncio.sleep(0.3)  # written behind (one client's pace, as in the attack)
    variants = memory.peek(proxy.url + "/big") or ()
    assert len(variants) == len(agents)
    # 12 × 40 KB were asked for and written once each (with the bodies in the key's record,
    # the twelfth fill alone wrote 480 KB)
    assert memory.arena.head - head < 12 * 48 * 1024
    record = memory.arena.find(proxy.url + "/big")
    assert record is not None and record.body_len == 0
    for _ in range(2):
        for agent in agents:
            r = await proxy.get("/big", headers={"User-Agent": agent})
            assert r.body == agent.encode().ljust(40 * 1024, b"."), (agent, r.x_cache)
    assert (await proxy.get("/hot")).x_cache == "HIT"
    assert origin.count("/big") == len(agents)


def agent_page(size: int = 40 * 1024) -> Handler:
    """A page that varies on User-Agent, each variant's body its own (the agent, padded)."""
    async def page(request: web.Request) -> web.Response:
        agent = request.headers.get("User-Agent", "")
        return web.Response(body=agent.encode().ljust(size, b"."), headers={
            "Cache-Control": "max-age=600", "Vary": "User-Agent"})
    return page


async def test_a_hit_on_a_variant_whose_body_left_memory_writes_back_its_body_only(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A variant whose body record the ring dropped is served from disk, and its body goes back
    into a record of its own: the key's record is not rewritten (putting a body back used to
    rewrite the whole record, up to memory_max_object of bodies, pushing other keys out)."""
    origin.route("/big", agent_page())
    proxy = await make_proxy(config="cache: {memory: 64MB, memory_max_object: 100KB, "
                                    "disk: {path: cache, size: 256MB}}\n")
    storage = proxy.runtime.storage
    agents = [f"agent-{i}" for i in range(8)]
    for agent in agents:
        assert (await proxy.get("/big", headers={"User-Agent": agent})).x_cache == "MISS"
        await storage.flush()  # written behind
    ring = storage.memory.arena
    key = proxy.url + "/big"
    for c in storage.memory.peek(key) or ():  # as if the ring had dropped the older bodies
        if c.entry.response.vary[0][1] in agents[:-2]:
            assert ring.delete(body_key(key, c.entry.body_id))
    record = ring.find(key)
    head = ring.head
    for agent in agents[:-2]:
        r = await proxy.get("/big", headers={"User-Agent": agent})
        assert (r.x_cache, r.body) == ("HIT", agent.encode().ljust(40 * 1024, b"."))
    assert ring.head - head < 6 * 42 * 1024  # six bodies, nothing more
    assert record is not None and ring.alive(record.pos)  # the key's record as it was
    head = ring.head
    for agent in agents:
        r = await proxy.get("/big", headers={"User-Agent": agent})
        assert (r.x_cache, r.body, r.headers.get("X-Cachegate-Tier", "memory")) == (
            "HIT", agent.encode().ljust(40 * 1024, b"."), "memory")
    assert ring.head == head  # from memory, writing nothing
    assert origin.count("/big") == len(agents)


async def test_without_a_disk_tier_a_key_keeps_each_variants_body(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """Memory-only, nothing is written behind: each variant's body is a record of its own, kept
    as any other key's (a key's bodies were bounded to a share of the ring, and past it the
    oldest variants were asked of the origin again)."""
    origin.route("/page", agent_page())
    proxy = await make_proxy(config="cache: {memory: 64MB, memory_max_object: 64KB, disk: null}\n")
    agents = [f"agent-{i}" for i in range(14)]
    for _ in range(3):
        for agent in agents:
            r = await proxy.get("/page", headers={"User-Agent": agent})
            assert r.body == agent.encode().ljust(40 * 1024, b"."), (agent, r.x_cache)
    assert origin.count("/page") == len(agents)
    more = [f"agent-{i}" for i in range(14, 32)]  # 32 × 40 KB in all (MAX_VARIANTS)
    for agent in more:
        assert (await proxy.get("/page", headers={"User-Agent": agent})).x_cache == "MISS"
    for agent in agents + more:
        assert (await proxy.get("/page", headers={"User-Agent": agent})).x_cache == "HIT", agent


async def test_a_304_freshens_every_variant_with_the_same_strong_etag(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """RFC 9111 §4.3.4: all the stored responses with the 304's strong validator are updated:
    the German variant, the same bytes as the English one, needs no revalidation of its own."""
    async def page(request: web.Request) -> web.Response:
        fields = {"ETag": '"same"', "Vary": "Accept-Language", "Cache-Control": "max-age=10",
                  "Date": format_http_date(clock())}
        if request.headers.get("If-None-Match") == '"same"':
            return web.Response(status=304, headers=fields)
        return web.Response(body=b"same bytes for every language", headers=fields)

    async def other(request: web.Request) -> web.Response:  # a weak validator: not an identity
        fields = {"ETag": 'W/"w"', "Vary": "Accept-Language", "Cache-Control": "max-age=10",
                  "Date": format_http_date(clock())}
        if request.headers.get("If-None-Match") == 'W/"w"':
            return web.Response(status=304, headers=fields)
        return web.Response(body=b"weak", headers=fields)

    origin.route("/p", page)
    origin.route("/w", other)
    proxy = await clocked(make_proxy, clock)
    for path in ("/p", "/w"):
        for lang in ("en", "de"):
            assert (await proxy.get(path, headers={"Accept-Language": lang})).x_cache == "MISS"
    clock.advance(20)
    assert (await proxy.get("/p", headers={"Accept-Language": "en"})).x_cache == "REVALIDATED"
    de = await proxy.get("/p", headers={"Accept-Language": "de"})
    assert (de.x_cache, de.body) == ("HIT", b"same bytes for every language")
    assert origin.count("/p") == 3  # two fills, one revalidation for both
    assert (await proxy.get("/w", headers={"Accept-Language": "en"})).x_cache == "REVALIDATED"
    assert (await proxy.get("/w", headers={"Accept-Language": "de"})).x_cache == "REVALIDATED"


async def test_a_revalidation_writes_the_key_once_however_many_variants_share_its_etag(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """The variants a 304 freshens were each written on their own: a new record of the key, with
    every variant's body, in the shared memory per variant, so 8 variants of 20 KB made each
    revalidation write 1.3 MB, and a no-cache page does that on every request, pushing other
    keys out of memory. They are written together, in one record; the siblings of a no-cache
    response are not freshened at all (each is revalidated before its use anyway)."""
    size, agents = 20 * 1024, [f"agent-{i}" for i in range(8)]

    def route(path: str, cache_control: str) -> None:
        async def page(request: web.Request) -> web.Response:
            fields = {"ETag": '"same"', "Vary": "User-Agent", "Cache-Control": cache_control,
                      "Date": format_http_date(clock())}
            if request.headers.get("If-None-Match") == '"same"':
                return web.Response(status=304, headers=fields)
            return web.Response(body=request.headers["User-Agent"].encode().ljust(size, b"."), headers=fields)
        origin.route(path, page)

    route("/nc", "no-cache")
    route("/ma", "max-age=10")
    proxy = await clocked(make_proxy, clock, config="cache: {memory: 64MB, disk: {path: cache, size: 256MB}}\n")
    arena = proxy.runtime.storage.memory.arena
    record = len(agents) * size + 8 * 1024  # the key's record: every body, and the metadata
    for path in ("/nc", "/ma"):
        for agent in agents:
            assert (await proxy.get(path, headers={"User-Agent": agent})).x_cache == "MISS"
    await proxy.runtime.storage.flush()

    written = arena.head
    for i in range(10):
        agent = agents[i % len(agents)]
        r = await proxy.get("/nc", headers={"User-Agent": agent})
        assert (r.x_cache, r.body) == ("REVALIDATED", agent.encode().ljust(size, b"."))
    assert arena.head - written <= 10 * record  # one record per revalidation (it was 8: 10.5 MB)

    clock.advance(20)
    written = arena.head
    assert (await proxy.get("/ma", headers={"User-Agent": agents[0]})).x_cache == "REVALIDATED"
    assert arena.head - written <= record  # every variant freshened, in one record
    for agent in agents:
        r = await proxy.get("/ma", headers={"User-Agent": agent})
        assert (r.x_cache, r.body) == ("HIT", agent.encode().ljust(size, b"."))
    assert origin.count("/nc") == len(agents) + 10 and origin.count("/ma") == len(agents) + 1
