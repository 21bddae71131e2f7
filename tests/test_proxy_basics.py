"""The foundation end to end: a real origin, cachegate in front, real disk cache."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.policy.httpdate import format_http_date
from proxy.web.fastpath import ProxyServer
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin, Proxy
from tests.security.misbehaving import Conn, raw_origins


async def test_a_fresh_response_is_stored_then_served_from_the_cache(origin: Origin, proxy: Proxy) -> None:
    origin.route("/a", body=b"hello", headers={"Cache-Control": "max-age=60"})
    first = await proxy.get("/a")
    second = await proxy.get("/a")
    assert (first.status, first.body, first.x_cache) == (200, b"hello", "MISS")
    assert first.cache_status == "cachegate; fwd=uri-miss; fwd-status=200; stored"
    assert (second.status, second.body, second.x_cache) == (200, b"hello", "HIT")
    assert second.cache_status.startswith("cachegate; hit; ttl=")
    assert second.headers["Age"] in ("0", "1")
    assert origin.count("/a") == 1


async def test_private_and_no_store_responses_are_never_stored(origin: Origin, proxy: Proxy) -> None:
    origin.route("/p", body=b"mine", headers={"Cache-Control": "private, max-age=60"})
    origin.route("/n", body=b"none", headers={"Cache-Control": "no-store, max-age=60"})
    for path, detail in (("/p", "PRIVATE"), ("/n", "NO-STORE")):
        a = await proxy.get(path)
        b = await proxy.get(path)
        assert a.x_cache == b.x_cache == "MISS"
        assert f"detail={detail}" in b.cache_status
        assert origin.count(path) == 2


async def test_expired_entry_is_revalidated_with_if_none_match(origin: Origin, make_proxy: MakeProxy,
                                                               clock: Clock) -> None:
    async def handler(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "max-age=1", "ETag": '"v1"', "Date": format_http_date(clock())}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(body=b"body-v1", headers=headers)

    origin.route("/r", handler)
    proxy = await clocked(make_proxy, clock)  # (expired by moving its clock, not by a sleep)
    assert (await proxy.get("/r")).x_cache == "MISS"
    clock.advance(2)
    again = await proxy.get("/r")
    assert (again.status, again.body, again.x_cache) == (200, b"body-v1", "REVALIDATED")
    assert origin.seen[-1].headers.get("If-None-Match") == '"v1"'
    assert (await proxy.get("/r")).x_cache == "HIT"


async def test_head_is_answered_from_the_stored_get(origin: Origin, proxy: Proxy) -> None:
    origin.route("/h", body=b"0123456789", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/h")
    head = await proxy.request("HEAD", "/h")
    assert (head.status, head.body, head.x_cache) == (200, b"", "HIT")
    assert head.headers["Content-Length"] == "10"
    assert origin.count("/h") == 1


async def test_host_is_part_of_the_key(origin: Origin, proxy: Proxy) -> None:
    async def by_host(request: web.Request) -> web.Response:
        return web.Response(text=request.host, headers={"Cache-Control": "max-age=60"})

    origin.route("/v", by_host)
    a = await proxy.get("/v", headers={"Host": "a.example"})
    b = await proxy.get("/v", headers={"Host": "B.EXAMPLE:80"})
    a2 = await proxy.get("/v", headers={"Host": "a.example"})
    # the origin is sent the Host as the key names it (case and default port normalised)
    assert (a.body, b.body, a2.body) == (b"a.example", b"b.example", b"a.example")
    assert a2.x_cache == "HIT"
    assert origin.count("/v") == 2


async def test_purge_removes_an_entry(origin: Origin, proxy: Proxy) -> None:
    origin.route("/x", body=b"x", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/x")
    assert (await proxy.get("/x")).x_cache == "HIT"
    host = proxy.url.removeprefix("http://")
    reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{host}/x"]})
    assert (reply.status, reply.body) == (200, b'{"purged": 1, "soft": false}')
    assert (await proxy.get("/x")).x_cache == "MISS"


async def _raw_get(proxy: Proxy, extra: bytes = b"", path: bytes = b"/t") -> tuple[bytes, bytes]:
    """(head, body) of a GET sent on a socket: what is on the wire, nothing a client added."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: site.example\r\n" + extra + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head, await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()


async def test_a_response_without_content_type_is_relayed_and_served_without_one(make_proxy: MakeProxy) -> None:
    """RFC 9110 §8.3: an origin that does not know the type may leave it out, and the client may
    sniff it; a proxy that said application/octet-stream would make a browser download the page."""
    page = b"<html><body>hi</body></html>"

    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(page), page))

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(upstreams=[origin.url])
        server = proxy.listeners.runners[0].server
        assert isinstance(server, ProxyServer) and server.fast is not None
        fast = server.fast
        # the miss, the hit on the fast path, a hit on the general path (a request directive)
        for extra, x_cache, fast_answers in ((b"", b"MISS", 0), (b"", b"HIT", 1),
                                             (b"Cache-Control: max-stale=5\r\n", b"HIT", 1)):
            head, body = await _raw_get(proxy, extra)
            assert body == page and b"X-Cache-Status: " + x_cache in head
            assert b"content-type" not in head.lower(), head
            assert fast.answered == fast_answers
        assert len(origin.requests) == 1
        # cachegate's own replies still say what they are
        own, _ = await _raw_get(proxy, b"Cache-Control: only-if-cached\r\n", b"/not-stored")
        assert own.startswith(b"HTTP/1.1 504") and b"Content-Type: text/plain" in own


async def test_a_response_without_date_is_stored_and_served_with_the_time_it_was_received(
        make_proxy: MakeProxy, clock: Clock) -> None:
    """RFC 9110 §6.6.1: a cache with a clock records when a response without Date was received
    and appends that Date to what it stores and forwards: every hit on it, on either path, says
    the same Date, and its Age agrees; a 304 without Date dates the freshened response anew."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if "if-none-match" in request.headers:
                await conn.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=10\r\n\r\n')
            else:
                await conn.send(b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nCache-Control: max-age=10\r\n'
                                b"Content-Length: 2\r\n\r\nhi")

    def date_of(head: bytes) -> bytes:
        return next(line for line in head.split(b"\r\n") if line.lower().startswith(b"date:"))

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(upstreams=[origin.url])
        clock.now -= 86400  # the engine's clock: a day behind the wall clock
        proxy.runtime.engine.clock = clock
        received = b"Date: " + format_http_date(clock.now).encode()
        miss, _ = await _raw_get(proxy)
        assert b"X-Cache-Status: MISS" in miss and date_of(miss) == received
        clock.advance(5)
        for extra in (b"", b"Cache-Control: max-stale=5\r\n"):  # the fast path, the general path
            hit, _ = await _raw_get(proxy, extra)
            assert b"X-Cache-Status: HIT" in hit and b"Age: 5\r\n" in hit
            assert date_of(hit) == received
        clock.advance(20)
        revalidated, _ = await _raw_get(proxy)
        assert b"X-Cache-Status: REVALIDATED" in revalidated
        freshened = b"Date: " + format_http_date(clock.now).encode()
        assert date_of(revalidated) == freshened
        clock.advance(3)
        hit, _ = await _raw_get(proxy)
        assert b"Age: 3\r\n" in hit and date_of(hit) == freshened


async def test_obs_text_in_an_origins_fields_and_reason_reaches_the_client_byte_for_byte(
        make_proxy: MakeProxy) -> None:
    """RFC 9110 §5.5: a field value may hold obs-text (bytes 0x80-0xFF), which a recipient
    treats as opaque data; RFC 9112 §4 allows it in a reason phrase. Those bytes are relayed as
    they came, not dropped (``caf\\xe9`` went out as ``caf``): on the miss, on a memory hit on
    either path, and on a hit from disk after a restart. UTF-8 is relayed as it came too."""
    odd = {
        b"/latin1": (b"200 OK", b"X-Obs: caf\xe9\r\n"),
        b"/utf8": (b"200 OK", b"X-Utf: caf\xc3\xa9\r\n"),
        b"/mixed": (b"200 OK", b"X-Mixed: \xff\x80 caf\xc3\xa9\ta\xe9\r\nX-Plain: ascii\r\n"),
        b"/reason": (b"200 Fine \xe9t\xe9", b""),
    }

    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            status, fields = odd[request.target.encode()]
            await conn.send(b"HTTP/1.1 " + status + b"\r\nCache-Control: max-age=600\r\n" + fields
                            + b"Content-Length: 4\r\n\r\nbody")

    def check(head: bytes, body: bytes, path: bytes, x_cache: bytes) -> None:
        status, fields = odd[path]
        assert head.startswith(b"HTTP/1.1 " + status + b"\r\n"), (path, head)
        assert b"\r\n" + fields in head, (path, head)
        assert b"\r\nX-Cache-Status: " + x_cache + b"\r\n" in head and body == b"body", (path, head)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(upstreams=[origin.url])
        server = proxy.listeners.runners[0].server
        assert isinstance(server, ProxyServer) and server.fast is not None
        for path in odd:
            check(*await _raw_get(proxy, b"", path), path, b"MISS")
            answered = server.fast.answered
            check(*await _raw_get(proxy, b"", path), path, b"HIT")
            assert server.fast.answered == answered + 1  # the fast path's pre-built head
            check(*await _raw_get(proxy, b"Cache-Control: max-stale=5\r\n", path), path, b"HIT")  # general
            assert proxy.runtime.storage.memory_get("http://site.example" + path.decode()) is not None
        assert len(origin.requests) == len(odd)
        await proxy.runtime.storage.flush()
        await proxy.session.close()
        await proxy.close()
        restarted = await make_proxy(upstreams=[origin.url])  # the same cache directory
        for path in odd:
            assert restarted.runtime.storage.memory_get("http://site.example" + path.decode()) is None
            check(*await _raw_get(restarted, b"", path), path, b"HIT")  # read from disk
            check(*await _raw_get(restarted, b"", path), path, b"HIT")
        assert len(origin.requests) == len(odd)


async def test_x_cache_status_says_expired_whenever_cache_status_says_a_stale_copy_went_forward(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """A stored copy gone stale, then answers the cache may not store (private: the key passes)
    and a range of it: X-Cache-Status is EXPIRED as long as Cache-Status says ``fwd=stale``
    (the passed and range answers said MISS)."""
    served = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        served["n"] += 1
        cc = "max-age=1" if served["n"] == 1 else "private"
        return web.Response(body=b"0123456789", headers={"Cache-Control": cc, "Date": format_http_date(clock())})

    origin.route("/s", handler)
    origin.route("/r", body=b"0123456789", headers={"Cache-Control": "max-age=1"})
    proxy = await clocked(make_proxy, clock)
    assert (await proxy.get("/s")).x_cache == (await proxy.get("/r")).x_cache == "MISS"
    clock.advance(5)
    seen = [await proxy.get("/s") for _ in range(3)]
    seen.append(await proxy.get("/r", headers={"Range": "bytes=0-3"}))
    for reply in seen:
        assert "fwd=stale" in reply.cache_status, reply.cache_status
        assert reply.x_cache == "EXPIRED", (reply.x_cache, reply.cache_status)
