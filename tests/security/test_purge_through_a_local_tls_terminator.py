"""PURGE from the internet, through a TLS terminator on the same host.

A common deployment: a TLS terminator (stunnel, haproxy, a sidecar) on the cachegate host
accepts the public HTTPS connections and relays them to cachegate on 127.0.0.1. Every client then
reaches cachegate from 127.0.0.1, so a ``purge_from`` that trusted loopback by default let anyone
on the internet purge any page, or all of them one by one, and send the origin a stampede. Here
the terminator is real: TLS on a loopback port, relaying bytes to cachegate's client listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.admin.util import settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.test_upstream_pool import self_signed


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
        writer.close()


@contextlib.asynccontextmanager
async def terminator(tmp_path: Path, backend: tuple[str, int]) -> AsyncIterator[tuple[int, ssl.SSLContext]]:
    """TLS on a loopback port, relayed in plain HTTP to ``backend``; yields (port, a client context)."""
    key, cert = self_signed(tmp_path, "term", "127.0.0.1", "IP:127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    relays: set[asyncio.Task[None]] = set()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*backend)
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    def track(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(relay(r, w))
        relays.add(task)
        task.add_done_callback(relays.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0, ssl=server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    try:
        yield server.sockets[0].getsockname()[1], client_ctx
    finally:
        server.close()
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await server.wait_closed()


async def purge_over_tls(port: int, ctx: ssl.SSLContext, path: str, extra: str = "") -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(f"PURGE {path} HTTP/1.1\r\nHost: shop.example\r\n{extra}Connection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def cached_page(origin: Origin, proxy: Proxy) -> None:
    origin.route("/page", body=b"page", headers={"Cache-Control": "max-age=600"})
    await proxy.get("/page", headers={"Host": "shop.example"})
    await settle(proxy)


async def still_cached(proxy: Proxy) -> bool:
    return (await proxy.get("/page", headers={"Host": "shop.example"})).x_cache == "HIT"


async def test_by_default_nobody_purges_through_a_same_host_terminator(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\n")
    await cached_page(origin, proxy)
    async with terminator(tmp_path, proxy.listeners.proxy_addresses[0]) as (port, ctx):
        status, body = await purge_over_tls(port, ctx, "/page")
    assert status == 405
    assert "PURGE is switched off on this listener" in body["error"]
    assert await still_cached(proxy)
    assert origin.count("/page") == 1


@pytest.mark.parametrize("forwarded", [
    "X-Forwarded-For: 10.0.0.7\r\n", "X-Real-IP: 10.0.0.7\r\n", "Forwarded: for=10.0.0.7\r\n",
])
async def test_purge_from_is_the_tcp_peer_whatever_the_forwarding_fields_say(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Path, forwarded: str) -> None:
    """Even with the terminator in trusted_proxies, a client cannot claim to be a purging host."""
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', purge_from: [10.0.0.0/8]}\n"
                                    "trusted_proxies: [127.0.0.1/32]\n")
    await cached_page(origin, proxy)
    async with terminator(tmp_path, proxy.listeners.proxy_addresses[0]) as (port, ctx):
        status, body = await purge_over_tls(port, ctx, "/page", forwarded)
    assert status == 403
    assert "127.0.0.1 is not in it" in body["error"]
    assert await still_cached(proxy)
