"""A request body with a Content-Encoding goes upstream as the client sent it.

aiohttp's server decodes gzip/deflate/br request bodies by default: the origin got the decoded
bytes still labelled ``Content-Encoding: gzip`` (a corrupt upload: a gzipped JSON POST, an OTLP
exporter's gzip), and a body that did not decode was a 500 from cachegate. nginx and Varnish
pass a request body through untouched. The origin here reads the raw bytes (its own decoding
off), so what it records is what was on the wire.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Proxy

Seen = tuple[str | None, str | None, bytes]


@pytest.fixture
async def raw_origin() -> AsyncIterator[tuple[str, list[Seen]]]:
    seen: list[Seen] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((request.headers.get("Content-Encoding"), request.headers.get("Content-Length"), body))
        return web.Response(text=hashlib.sha256(body).hexdigest())

    app = web.Application(client_max_size=1 << 24)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def _proxy(make_proxy: MakeProxy, url: str) -> Proxy:
    return await make_proxy(upstreams=[url])


@pytest.mark.parametrize(("coding", "body"), [
    # (mtime=0: the same bytes in every pytest-xdist worker, which collect the tests apart)
    ("gzip", gzip.compress(b'{"q": "a gzipped upload"}' * 50, mtime=0)),
    ("deflate", zlib.compress(b'{"q": "a deflated upload"}' * 50)),
    ("gzip", b"not gzip at all: passed on as it came, the origin's to refuse"),
], ids=["gzip", "deflate", "not-gzip"])
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_an_encoded_request_body_reaches_the_origin_byte_for_byte(
        make_proxy: MakeProxy, raw_origin: tuple[str, list[Seen]], coding: str, body: bytes, method: str) -> None:
    url, seen = raw_origin
    proxy = await _proxy(make_proxy, url)
    r = await proxy.request(method, "/upload", data=body, headers={"Content-Encoding": coding})
    assert (r.status, r.body.decode()) == (200, hashlib.sha256(body).hexdigest()), r.cache_status
    assert seen == [(coding, str(len(body)), body)]


async def test_a_chunked_encoded_request_body_reaches_the_origin_byte_for_byte(
        make_proxy: MakeProxy, raw_origin: tuple[str, list[Seen]]) -> None:
    url, seen = raw_origin
    proxy = await _proxy(make_proxy, url)
    body = gzip.compress(b"chunk " * 10_000, mtime=0)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = await proxy.request("POST", "/upload", data=chunks(), headers={"Content-Encoding": "gzip"})
    assert (r.status, r.body.decode()) == (200, hashlib.sha256(body).hexdigest()), r.cache_status
    [(coding, _, got)] = seen
    assert (coding, got) == ("gzip", body)
