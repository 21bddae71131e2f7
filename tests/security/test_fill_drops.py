"""A fill drops every field its origin could read as a range or a conditional, however spelled.

A fill must get the whole response to store it, so it drops the client's Range and
conditionals. It dropped them by exact name only, and so forwarded ``Request-Range`` (the
pre-standard Range that Apache httpd's byterange filter still honours) and ``If_None_Match``
(which a CGI, WSGI or Rack origin reads as ``HTTP_IF_NONE_MATCH``): the origin answered the
fill 206 or 304, which cachegate cannot store and turned into a 502 for the attacker and for
every client that had joined the fetch, a fresh miss or the revalidation of an expired entry.
The origins are real aiohttp apps reading fields as Apache and CGI do; the attacker's request
goes byte for byte on a socket.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Handler, Origin, Proxy
from tests.security.util import get, send_raw

BODY = bytes(range(256)) * 64
TAG = '"v1"'


def apache_like(arrived: asyncio.Event, release: asyncio.Event, *, tagged: bool = True) -> Handler:
    """Ranges as Apache's byterange filter reads them (``Range``, or ``Request-Range``), and
    conditionals as a CGI origin does (every name upper-cased with ``-`` as ``_``); it holds
    each answer until ``release``, once ``arrived`` says a request is in. Not ``tagged``: no
    ETag on its answers (a refetch of such an entry asks for the whole response)."""

    async def page(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in request.headers.items()}
        fields = {"Cache-Control": "public, max-age=60", "Accept-Ranges": "bytes", **({"ETag": TAG} if tagged else {})}
        if environ.get("HTTP_IF_NONE_MATCH") == TAG:
            return web.Response(status=304, headers=fields)
        if environ.get("HTTP_IF_MODIFIED_SINCE"):
            return web.Response(status=304, headers=fields)
        asked = request.headers.get("Range") or request.headers.get("Request-Range")
        if asked is not None and asked.startswith("bytes="):
            first, _, last = asked[6:].partition("-")
            end = int(last) if last else len(BODY) - 1
            return web.Response(status=206, body=BODY[int(first):end + 1], headers={
                **fields, "Content-Range": f"bytes {first}-{end}/{len(BODY)}"})
        return web.Response(body=BODY, headers=fields)

    return page


ATTACKS = {
    "Request-Range": "Request-Range: bytes=0-0",
    "request_range": "request_range: bytes=0-0",
    "If_None_Match": f"If_None_Match: {TAG}",
    "IF_MODIFIED_SINCE": "IF_MODIFIED_SINCE: Mon, 01 Jan 2024 00:00:00 GMT",
}


async def _attack_and_join(proxy: Proxy, attack: str, arrived: asyncio.Event, release: asyncio.Event) -> None:
    """The attacker's request starts a fetch, a victim's plain GET joins it; both get the
    whole page, and the origin was never asked for less."""
    arrived.clear()
    attacker = asyncio.ensure_future(send_raw(proxy, get("/file.bin", ATTACKS[attack])))
    await asyncio.wait_for(arrived.wait(), 10)
    victim = asyncio.ensure_future(send_raw(proxy, get("/file.bin")))
    await asyncio.sleep(0.2)  # the victim joins the fetch (it is held until release)
    release.set()
    for reply in (await attacker, await victim):
        assert (reply.status, reply.body) == (200, BODY), reply.fields


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_fill_drops_request_range_and_underscored_conditionals(
        origin: Origin, make_proxy: MakeProxy, attack: str) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    origin.route("/file.bin", apache_like(arrived, release))
    proxy = await make_proxy()
    await _attack_and_join(proxy, attack, arrived, release)
    assert origin.count("/file.bin") == 1
    assert not {"request-range", "if_none_match", "if_modified_since", "request_range"} & {
        k.lower() for k in origin.seen[0].headers}


@pytest.mark.parametrize("attack", ["Request-Range", "If_None_Match"])
async def test_the_refetch_of_an_expired_entry_drops_them_too(
        origin: Origin, make_proxy: MakeProxy, clock: Clock, attack: str) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    release.set()
    origin.route("/file.bin", apache_like(arrived, release, tagged=False))
    proxy = await clocked(make_proxy, clock)
    assert (await send_raw(proxy, get("/file.bin"))).status == 200
    clock.advance(120)  # expired; no stale-if-error to fall back on
    release.clear()
    await _attack_and_join(proxy, attack, arrived, release)
    assert not {"request-range", "if_none_match"} & {k.lower() for s in origin.seen for k in s.headers}
