"""Proxying: headers in both directions, forwarding fields, errors, hostile input, streaming."""

from __future__ import annotations

import asyncio
import os
import resource

import aiohttp
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.misbehaving import Conn, raw_origins, response


async def raw_exchange(url: str, data: bytes, quiet: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; return what came back up to the end of the response head."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), quiet)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


async def test_hop_by_hop_fields_are_removed_in_both_directions(origin: Origin, proxy: Proxy) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={
            "Connection": "X-Origin-Hop", "X-Origin-Hop": "1", "Proxy-Authenticate": "Basic",
            "Keep-Alive": "timeout=5", "Trailer": "X-T", "X-End-To-End": "yes",
        })

    origin.route("/hop", handler)
    reply = await proxy.get("/hop", headers={
        "Connection": "X-Client-Hop", "X-Client-Hop": "1", "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==", "Keep-Alive": "timeout=5",
        "X-Client-End-To-End": "yes",
    })
    seen = origin.seen[-1].headers
    for name in ("X-Client-Hop", "TE", "Proxy-Authorization", "Keep-Alive"):
        assert name not in seen, name
    assert seen["X-Client-End-To-End"] == "yes"
    for name in ("X-Origin-Hop", "Proxy-Authenticate", "Keep-Alive", "Trailer"):
        assert name not in reply.headers, name
    assert reply.headers["X-End-To-End"] == "yes"


async def test_forwarding_fields_are_cachegates_own(origin: Origin, proxy: Proxy) -> None:
    origin.route("/fwd", body=b"ok")
    reply = await proxy.get("/fwd", headers={
        "Host": "Shop.Example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
        "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Original-URL": "/admin",
    })
    seen = origin.seen[-1].headers
    assert seen["Host"] == "shop.example"  # the client's Host as the key names it, not the upstream's
    assert seen["X-Forwarded-Host"] == "shop.example"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert "Forwarded" not in seen and "X-Original-URL" not in seen
    assert seen["Via"] == "1.1 cachegate"
    assert reply.headers["Via"] == "1.1 cachegate"


async def test_trusted_proxies_keep_their_forwarding_fields(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config="trusted_proxies: [127.0.0.0/8]\n")
    origin.route("/fwd", body=b"ok")
    await proxy.get("/fwd", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    seen = origin.seen[-1].headers
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "https"


async def test_an_unkeyed_forwarding_header_cannot_poison_the_cache(origin: Origin, proxy: Proxy) -> None:
    async def reflect(request: web.Request) -> web.Response:
        host = request.headers.get("X-Forwarded-Host", "?")
        return web.Response(text=f"<script src=//{host}/a.js>", headers={"Cache-Control": "max-age=60"})

    origin.route("/page", reflect)
    poisoned = await proxy.get("/page", headers={"Host": "shop.example", "X-Forwarded-Host": "evil.example"})
    victim = await proxy.get("/page", headers={"Host": "shop.example"})
    assert b"evil" not in poisoned.body and b"evil" not in victim.body
    assert victim.x_cache == "HIT"


async def test_refused_upstream_connection_is_a_502(origin: Origin, proxy: Proxy) -> None:
    await origin.stop(hold_port=True)
    reply = await proxy.get("/gone")
    assert reply.status == 502
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert "detail=UPSTREAM-UNREACHABLE" in reply.cache_status
    assert reply.x_cache == "MISS"


async def test_upstream_timeout_is_a_504(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config="upstream: {timeouts: {connect: 1s, read: 300ms}, retries: 0}\n")
    origin.route("/slow", body=b"late", delay=2.0)
    reply = await proxy.get("/slow")
    assert reply.status == 504
    assert "detail=UPSTREAM-TIMEOUT" in reply.cache_status


HOSTILE = {
    "both Content-Length and Transfer-Encoding":
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "malformed request line": b"GARBAGE\r\n\r\n",
    "huge header": b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "bad Content-Length": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
    "bad chunking": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    "missing Host": b"GET /x HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "bad Host": b"GET /x HTTP/1.1\r\nHost: a/b\r\n\r\n",
}


async def test_hostile_requests_get_4xx_and_everyone_else_is_still_served(origin: Origin, proxy: Proxy) -> None:
    origin.route("/x", body=b"fine", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/x")
    for name, data in HOSTILE.items():
        answer = await raw_exchange(proxy.url, data)
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.split(b" ")[1:2] in ([b"400"], [b"413"], [b"431"]), (name, answer)
    # A connection that sends half a request and stalls does not wedge anyone.
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    _r, stalled = await asyncio.open_connection(host, int(port))
    stalled.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Half")
    await stalled.drain()
    reply = await proxy.get("/x")
    assert (reply.status, reply.body, reply.x_cache) == (200, b"fine", "HIT")
    stalled.close()
    assert origin.count("/x") == 1


async def test_request_without_freshness_is_passed_through_not_stored(origin: Origin, proxy: Proxy) -> None:
    origin.route("/plain", body=b"p")
    a, b = await proxy.get("/plain"), await proxy.get("/plain")
    assert a.x_cache == b.x_cache == "MISS"
    assert origin.count("/plain") == 2


async def test_other_methods_and_their_bodies_are_forwarded(origin: Origin, proxy: Proxy) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=201, body=await request.read())

    origin.route("/post", echo)
    reply = await proxy.request("POST", "/post", data=b"payload")
    assert (reply.status, reply.body, reply.x_cache) == (201, b"payload", "BYPASS")
    assert "fwd=method" in reply.cache_status
    assert origin.seen[-1].method == "POST"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


GIB = 1 << 30
CHUNK = b"x" * (1 << 20)


async def test_a_1gb_download_and_upload_stream_through_without_being_held(origin: Origin, proxy: Proxy) -> None:
    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "Content-Length": str(GIB)})
        await resp.prepare(request)
        for _ in range(GIB // len(CHUNK)):
            await resp.write(CHUNK)
        return resp

    async def upload(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.Response(text=str(total))

    origin.route("/big", download)
    origin.route("/upload", upload)
    before = _peak_rss_mb()
    received = 0
    async with proxy.session.get(proxy.url + "/big") as resp:
        assert resp.status == 200
        assert "detail=TOO-LARGE" in resp.headers["Cache-Status"]  # over cache.max_object
        async for chunk in resp.content.iter_any():
            received += len(chunk)
    assert received == GIB

    async def body() -> object:
        for _ in range(GIB // len(CHUNK)):
            yield CHUNK

    async with proxy.session.post(proxy.url + "/upload", data=body(),
                                  headers={"Content-Length": str(GIB)}) as resp:
        assert (resp.status, await resp.text()) == (200, str(GIB))
    grew = _peak_rss_mb() - before
    assert grew < 300, f"peak RSS grew by {grew:.0f} MB while streaming 1 GiB each way"


async def test_upstream_that_breaks_off_mid_body_ends_the_client_connection(origin: Origin, proxy: Proxy) -> None:
    # A body large enough to be streamed: its head has gone out when it breaks off (a small one
    # is sent whole, and its client gets a 502 instead: tests/test_flight_answers.py).
    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "Content-Length": "1000000"})
        await resp.prepare(request)
        await resp.write(b"a" * 100)
        assert request.transport is not None
        request.transport.abort()
        return resp

    origin.route("/broken", broken)
    try:
        async with proxy.session.get(proxy.url + "/broken") as resp:
            await resp.read()
        raise AssertionError("the client must not see a complete response")
    except aiohttp.ClientPayloadError:
        pass
    # Nothing was stored: the next request goes to the origin again.
    origin.route("/broken", body=b"whole", headers={"Cache-Control": "max-age=60"})
    assert (await proxy.get("/broken")).body == b"whole"
    assert origin.count("/broken") == 2


async def test_cachegate_refuses_to_start_on_the_pure_python_parser(tmp_path: object) -> None:
    import subprocess
    import sys

    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "run", "--config", "/dev/null", "--upstream", "http://127.0.0.1:9",
         "--listen", "127.0.0.1:0", "--admin-listen", "off"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0
    assert "C HTTP parser" in done.stderr + done.stdout


async def test_max_forwards_zero_is_answered_here_and_more_is_forwarded_one_lower(
        origin: Origin, proxy: Proxy) -> None:
    """RFC 9110 §7.6.2: an OPTIONS or TRACE with Max-Forwards: 0 is for this hop; with more it
    goes on with one fewer. A TRACE is not echoed here (405): its echo would hand a page's
    script the cookies it cannot read."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.method} mf={request.headers.get('Max-Forwards')}")

    origin.route("/echo", echo)
    options = await proxy.request("OPTIONS", "/echo", headers={"Max-Forwards": "0"})
    assert (options.status, options.headers["Allow"], options.body) == (
        200, "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS", b"")
    trace = await proxy.request("TRACE", "/echo", headers={"Max-Forwards": "0", "Cookie": "s=1"})
    assert (trace.status, trace.headers["Allow"], trace.body) == (
        405, "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS", b"")
    assert origin.count("/echo") == 0
    onward = await proxy.request("OPTIONS", "/echo", headers={"Max-Forwards": "5"})
    assert (onward.status, onward.body) == (200, b"OPTIONS mf=4")
    onward = await proxy.request("TRACE", "/echo", headers={"Max-Forwards": "1"})
    assert (onward.status, onward.body) == (200, b"TRACE mf=0")
    plain = await proxy.request("GET", "/echo", headers={"Max-Forwards": "0"})
    assert (plain.status, plain.body) == (200, b"GET mf=0")  # other methods: left alone


async def test_options_to_an_absolute_url_without_a_path_reaches_the_origin_as_options_star(
        make_proxy: MakeProxy) -> None:
    """RFC 9112 §3.2.4: an OPTIONS whose absolute-form target has an empty path and no query asks
    about the server, and the last proxy MUST send it as ``OPTIONS *`` (it went as ``OPTIONS /``,
    a question about one resource). The authority still names the server, in Host; a path or a
    query keeps the origin form, and another method's empty path is ``/``."""

    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(response("200 OK", {"Allow": "GET, OPTIONS"}))

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(upstreams=[origin.url])
        sent = [("OPTIONS", "http://other.test"), ("OPTIONS", "http://Other.test:80?q=1"),
                ("OPTIONS", "http://other.test/"), ("OPTIONS", "*"), ("GET", "http://other.test")]
        for method, target in sent:
            reply = await proxy.raw(method, target, host="shop.example")
            assert reply.status == 200, (target, reply.body)
        assert [(r.method, r.target, r.headers["host"]) for _, r in origin.requests] == [
            ("OPTIONS", "*", "other.test"), ("OPTIONS", "/?q=1", "other.test"),
            ("OPTIONS", "/", "other.test"), ("OPTIONS", "*", "shop.example"), ("GET", "/", "other.test")]
