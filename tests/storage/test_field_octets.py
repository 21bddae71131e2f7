"""Field values whose bytes are not UTF-8 (RFC 9110 §5.5 obs-text, a Latin-1 ``\\xe9``) in a keyed
request header or a response's tag field: stored under a key and tags every tier can hold, apart
from other bytes, purgeable, and never costing other fills their place on disk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from tests.admin.util import absolute, js
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

RULES = """
rules:
  - name: keyed
    match: {path: "/s/**"}
    key: {headers: [Accept-Language]}
"""


async def raw_get(proxy: Proxy, target: str, extra: bytes = b"") -> tuple[bytes, bytes]:
    """(head, body) of a GET sent as bytes: an HTTP client would not send a byte that is not UTF-8."""
    address, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(address, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {address}:{port}\r\nConnection: close\r\n".encode()
                 + extra + b"\r\n")
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def x_cache(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-cache-status:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


async def test_a_keyed_header_with_latin1_bytes_is_stored_on_disk_apart_and_costs_no_other_fill(
        origin: Origin, make_proxy: MakeProxy) -> None:
    async def echo(request: web.Request) -> web.Response:
        said = request.headers.get("Accept-Language", "").encode("utf-8", "surrogateescape")
        return web.Response(body=b"lang=" + said, headers={"Cache-Control": "max-age=600"})

    origin.route("/s/x", echo)
    origin.route("/plain", body=b"plain", headers={"Cache-Control": "max-age=600"})
    for i in range(30):
        origin.route(f"/n{i}", body=f"n{i}".encode(), headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy(rules=RULES)
    latin, utf8 = b"Accept-Language: d\xe9\r\n", "Accept-Language: dé\r\n".encode()
    fills = [proxy.get(f"/n{i}") for i in range(30)]
    results = await asyncio.gather(*fills[:15], raw_get(proxy, "/s/x", latin), *fills[15:])
    assert all(r.x_cache == "MISS" for r in results if not isinstance(r, tuple))
    assert await proxy.runtime.storage.flush() == 31
    assert proxy.runtime.storage.failed_writes == 0
    disk = proxy.runtime.storage.disk
    assert disk is not None
    assert all(disk.has(f"{absolute(proxy, '')}/n{i}") for i in range(30))
    # Apart from the UTF-8 "dé" (two bytes), each answered with its own bytes, from the cache.
    head, body = await raw_get(proxy, "/s/x", utf8)
    assert (x_cache(head), body) == ("MISS", "lang=dé".encode())
    await proxy.runtime.storage.flush()
    proxy.runtime.storage.memory.clear()  # from the disk tier now
    for extra, want in ((latin, b"lang=d\xe9"), (utf8, "lang=dé".encode())):
        head, body = await raw_get(proxy, "/s/x", extra)
        assert (x_cache(head), body) == ("HIT", want)
    assert origin.count("/s/x") == 2


@pytest.fixture
async def latin_tag_origin() -> AsyncIterator[str]:
    """An origin that sends ``Surrogate-Key: caf\\xe9 rawtag`` as bytes (aiohttp's serialiser
    would leave the byte out); its URL."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                body = b"tagged\n"
                writer.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nSurrogate-Key: caf\xe9 rawtag\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("tier", ["memory", "disk"])
async def test_a_latin1_tag_is_listed_and_purged_as_the_text_it_reads_as(
        latin_tag_origin: str, make_proxy: MakeProxy, tmp_path: Path, tier: str) -> None:
    proxy = await make_proxy(upstreams=[latin_tag_origin], directory=tmp_path / "p")
    assert (await proxy.get("/latin")).x_cache == "MISS"
    assert (await proxy.get("/other")).x_cache == "MISS"
    assert await proxy.runtime.storage.flush() == 2
    assert proxy.runtime.storage.failed_writes == 0
    if tier == "disk":
        proxy.runtime.storage.memory.clear()
    reply = await proxy.admin("GET", "/cache?url=" + quote(absolute(proxy, "/latin")))
    assert [v["tags"] for v in js(reply)["variants"]] == [["café", "rawtag"]]
    reply = await proxy.admin("POST", "/purge", json={"tags": ["café"]})
    assert (reply.status, js(reply)["purged"]) == (200, 2)  # both responses carry it
    assert (await proxy.get("/latin")).x_cache == "MISS"
