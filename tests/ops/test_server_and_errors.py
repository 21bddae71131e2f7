"""The Server field and the error pages are the operator's: no software versions, no internal addresses."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.ports import Ports


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_server_names_cachegate_without_versions_on_misses_hits_and_heads(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=60", "Server": "Apache/2.4.41 (Ubuntu)"})
    proxy = await make_proxy()
    miss = await proxy.get("/a")
    await asyncio.sleep(0.05)
    hit = await proxy.get("/a")
    head = await proxy.request("HEAD", "/a")
    assert (miss.x_cache, hit.x_cache, head.x_cache) == ("MISS", "HIT", "HIT")
    for reply in (miss, hit, head):
        assert reply.headers.getall("Server") == ["cachegate"]  # the origin's is not passed on either
    assert proxy.runtime.metrics.requests.labels("HIT", "GET").value >= 1


async def test_server_header_is_configurable_and_rules_may_still_set_it(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=60"})
    origin.route("/ruled", body=b"r", headers={"Cache-Control": "max-age=60"})
    proxy = await make_proxy(config="server_header: edge\n", rules="""
        rules:
          - name: ruled
            match: {path: /ruled}
            response_headers: {add: {Server: from-a-rule}}
    """)
    for _ in range(2):
        assert (await proxy.get("/a")).headers.getall("Server") == ["edge"]
        assert (await proxy.get("/ruled")).headers.getall("Server") == ["from-a-rule"]
        await asyncio.sleep(0.05)


async def test_a_request_aiohttp_refuses_is_answered_with_our_server(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    port = proxy.listeners.proxy_addresses[0][1]
    answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert b"\r\nServer: cachegate\r\n" in answer and b"aiohttp" not in answer


async def test_the_admin_api_does_not_name_versions_either(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    reply = await proxy.admin("GET", "/healthz")
    assert reply.status == 200 and reply.headers["Server"] == "cachegate"


async def test_a_502_says_what_happened_without_the_upstream_address(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture, ports: Ports
) -> None:
    port = ports.hold()
    proxy = await make_proxy(upstreams=[f"http://127.0.0.1:{port}"])
    with caplog.at_level(logging.WARNING, logger="cachegate"):
        reply = await proxy.get("/x")
    assert reply.status == 502
    text = reply.body.decode()
    assert "could not be reached" in text
    assert str(port) not in text and "127.0.0.1" not in text
    assert reply.headers["Server"] == "cachegate"
    assert any(str(port) in r.getMessage() for r in caplog.records), "the detail goes to the log"


async def test_a_504_says_the_origin_was_too_slow_without_its_address(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/slow", body=b"s", delay=2.0)
    proxy = await make_proxy(config="upstream: {timeouts: {connect: 1s, read: 200ms}}\n")
    reply = await proxy.get("/slow")
    assert reply.status == 504
    text = reply.body.decode()
    assert "did not answer in time" in text
    assert str(origin.port) not in text and "127.0.0.1" not in text
