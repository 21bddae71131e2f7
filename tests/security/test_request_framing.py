"""Request smuggling and oversized heads: what two parsers could frame differently, and what
an origin would refuse (and an ``error`` TTL would store), is refused here first.

- ``Transfer-Encoding`` other than a single ``chunked`` (nginx's rule): 501 for a coding
  this proxy does not implement, 400 for a list or an HTTP/1.0 request;
- a request head over ``max_request_head`` (32 KiB by default): 431, never forwarded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config import Overrides, load_config
from proxy.errors import ConfigError
from proxy.web.server import install_reloader
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import echo_origin, get, port_of, received, request, send_raw
from tests.test_fastpath import read_response

BODY = "Content-Length: 0"
CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

TRANSFER_CODINGS = {
    # aiohttp's parser refuses these itself: a coding other than chunked, or not last
    "gzip": ("Transfer-Encoding: gzip", "1.1", 501, b"only a single 'chunked'"),
    "identity": ("Transfer-Encoding: identity", "1.1", 501, b"only a single 'chunked'"),
    "gzip, deflate": ("Transfer-Encoding: gzip, deflate", "1.1", 501, b"only a single 'chunked'"),
    # these it accepts: cachegate refuses them
    "gzip, chunked": ("Transfer-Encoding: gzip, chunked", "1.1", 400, b"a list of transfer codings"),
    "chunked on HTTP/1.0": ("Transfer-Encoding: chunked", "1.0", 400, b"HTTP/1.0"),
}


@pytest.mark.parametrize("case", list(TRANSFER_CODINGS))
async def test_a_transfer_encoding_other_than_chunked_is_refused_and_never_forwarded(
        origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    field, version, status, text = TRANSFER_CODINGS[case]
    echo_origin(origin, "/upload")
    proxy = await make_proxy()
    refused = await send_raw(proxy, request("POST", "/upload", "Host: shop.example", field, version=version)
                             + CHUNKED_BODY, see_close=True)
    assert refused.status == status, refused.body
    assert text in refused.body
    assert refused.closed  # the rest of the bytes are never read as a next request
    assert origin.count("/upload") == 0
    innocent = await send_raw(proxy, request("POST", "/upload", "Host: shop.example", BODY))
    assert innocent.status == 200


async def test_a_single_chunked_body_is_forwarded(origin: Origin, make_proxy: MakeProxy) -> None:
    async def body(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    origin.route("/upload", body)
    proxy = await make_proxy()
    reply = await send_raw(proxy, request("POST", "/upload", "Host: shop.example",
                                          "Transfer-Encoding: Chunked") + CHUNKED_BODY)
    assert (reply.status, reply.body) == (200, b"hello")


def big_fields(total: int) -> list[str]:
    """Fields of 4,000 bytes each (under aiohttp's per-line limit), ``total`` bytes or more in all."""
    return [f"X-Filler-{i}: {'a' * 4000}" for i in range(total // 4000 + 1)]


async def test_a_request_head_over_the_cap_is_refused_with_431_and_never_forwarded(
        origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    await send_raw(proxy, get("/page"))  # stored: the fast path must refuse the big head too
    refused = await send_raw(proxy, get("/page", *big_fields(33 * 1024)))
    assert refused.status == 431
    assert b"over the 32768 this proxy accepts" in refused.body
    uncached = await send_raw(proxy, get("/other", *big_fields(33 * 1024)))
    assert uncached.status == 431
    assert origin.count("/page") == 1 and origin.count("/other") == 0
    fits = await send_raw(proxy, get("/page", *big_fields(28 * 1024)))
    assert (fits.status, fits.x_cache) == (200, "HIT")


async def test_the_head_cap_is_configurable(origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy(config="max_request_head: 64KB\n")
    reply = await send_raw(proxy, get("/page", *big_fields(40 * 1024)))
    assert reply.status == 200
    assert len(received(reply)["fields"]) > 10
    refused = await send_raw(proxy, get("/page", *big_fields(65 * 1024)))
    assert refused.status == 431


async def test_too_many_fields_is_431_not_a_generic_400(origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    refused = await send_raw(proxy, get("/page", *(f"X-F{i}: 1" for i in range(130))))
    assert refused.status == 431 and b"too many header fields" in refused.body
    assert origin.count("/page") == 0


@pytest.mark.parametrize(("value", "message"), [
    ("512", "max_request_head: must be at least 1KB"),
    ("lots", "max_request_head: bad size 'lots'"),
])
def test_a_bad_head_cap_is_a_config_error_with_its_line(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"upstreams: ['http://127.0.0.1:9']\nmax_request_head: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert f"{path}:2: {message}" in caught.value.problems[0]


def replace_in(path: str, old: str, new: str) -> None:
    Path(path).write_text(Path(path).read_text().replace(old, new))


async def test_a_reload_changes_the_head_cap_at_once(origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy(config="max_request_head: 64KB\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    big = get("/page", *big_fields(40 * 1024))
    assert (await send_raw(proxy, big)).status == 200
    replace_in(proxy.config_path, "max_request_head: 64KB", "max_request_head: 32KB")
    assert (await proxy.runtime.reload_config()).ok
    assert (await send_raw(proxy, big)).status == 431  # the fast path (a stored page) included


@pytest.mark.parametrize("target", ["http://[::1]@", "http://[::1]@/x"])
async def test_a_request_target_the_url_parser_chokes_on_is_a_400_on_a_new_or_a_kept_alive_connection(
        origin: Origin, make_proxy: MakeProxy, target: str) -> None:
    """yarl raises IndexError for these targets, and aiohttp's parser let it through: the
    connection died without an answer (and a traceback in the log). A 400 now, whether aiohttp's
    handler parses the request (a connection's first) or the fast path does (a kept-alive
    connection's next), and everyone else is served as before."""
    echo_origin(origin, "/ok")
    proxy = await make_proxy()
    refused = await send_raw(proxy, get(target), see_close=True)
    assert (refused.status, refused.closed) == (400, True)
    assert b"malformed request target" in refused.body
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    try:
        writer.write(get("/ok"))
        assert (await read_response(reader, "GET")).status_line.split(" ")[1] == "200"
        writer.write(get(target))
        refused_too = await read_response(reader, "GET")
        assert refused_too.status_line.split(" ")[1] == "400"
        assert b"malformed request target" in refused_too.body
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed after it
    finally:
        writer.close()
    assert (await send_raw(proxy, get("/ok"))).status == 200


# (request line's method, status): llhttp refuses the methods it does not know; those that
# begin with a method it knows (GETX) in other words ("Expected space after method"), alike.
EXTENSION_METHODS = {"BREW": 501, "FOO-BAR": 501, "get": 501, "G@T": 400, "G(T": 400,
                     "GETX": 501, "POSTS": 501, "PUTS": 501, "HEADS": 501, "LINKS": 501, "PURGEX": 501,
                     "GET-X": 501, "GET@": 400, "POST(": 400}


@pytest.mark.parametrize("method", list(EXTENSION_METHODS))
async def test_a_method_the_parser_does_not_know_is_501_and_a_malformed_one_400(
        origin: Origin, make_proxy: MakeProxy, method: str) -> None:
    """RFC 9110 §9.1: an unrecognised method is 501 Not Implemented (it was 400, as if the
    request were malformed); a method that is not a token is a malformed request line, whose
    400 says so in fixed words (it quoted the request line, a session token in its query too)."""
    echo_origin(origin, "/m")
    proxy = await make_proxy()
    refused = await send_raw(proxy, request(method, "/m?session=SECRET123", "Host: shop.example", BODY),
                             see_close=True)
    assert refused.status == EXTENSION_METHODS[method], refused.body
    if refused.status == 501:
        assert f"the method {method} is not implemented".encode() in refused.body
    else:
        assert refused.body == b"400 Bad Request: malformed request: invalid request line\n"
    assert b"SECRET" not in refused.body
    assert refused.closed
    assert origin.count("/m") == 0
