"""Poisoning through ``Connection``: a field it names is hop-by-hop, so it never reaches the
origin; if the key or the Vary variant were computed before it was removed, the origin's
answer *without* the field would be stored as the answer *with* it."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import echo_origin, get, received, request, send_raw


async def by_language(request: web.Request) -> web.Response:
    lang = request.headers.get("Accept-Language", "default")
    return web.Response(text=json.dumps({"lang": lang}), headers={
        "Cache-Control": "public, max-age=60", "Vary": "Accept-Language"})


async def test_connection_naming_a_vary_field_cannot_store_one_variant_under_another(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", by_language)
    proxy = await make_proxy()
    attack = await send_raw(proxy, get("/page", "Accept-Language: de", "Connection: Accept-Language"))
    assert attack.json() == {"lang": "default"}  # the field never reached the origin...
    innocent = await send_raw(proxy, get("/page", "Accept-Language: de"))
    assert innocent.json() == {"lang": "de"}  # ...so its answer is not the German variant
    again = await send_raw(proxy, get("/page", "Accept-Language: de"))
    assert (again.x_cache, again.json()) == ("HIT", {"lang": "de"})


async def test_connection_naming_a_keyed_field_cannot_store_the_default_under_its_key(
        origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/tenant")
    proxy = await make_proxy(rules="""
        rules:
          - {name: per tenant, match: {path: "/tenant"}, key: {headers: [X-Tenant]}}
    """)
    attack = await send_raw(proxy, get("/tenant", "X-Tenant: acme", "Connection: X-Tenant"))
    assert "x-tenant" not in received(attack)["fields"]
    innocent = await send_raw(proxy, get("/tenant", "X-Tenant: acme"))
    assert received(innocent)["fields"]["x-tenant"] == ["acme"]


@pytest.mark.parametrize("named", ["Host", "host", "Content-Length", "Transfer-Encoding"])
async def test_connection_naming_host_or_a_framing_field_is_refused(
        origin: Origin, make_proxy: MakeProxy, named: str) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    refused = await send_raw(proxy, get("/page", f"Connection: keep-alive, {named}"), see_close=True)
    assert refused.status == 400
    assert f"Connection names {named.title() if named != 'host' else 'Host'}".encode() in refused.body
    assert refused.closed
    assert origin.count("/page") == 0
    innocent = await send_raw(proxy, get("/page"))
    assert received(innocent)["host"] == "shop.example"


async def test_hop_by_hop_and_connection_named_fields_never_reach_the_origin(
        origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    reply = await send_raw(proxy, request(
        "GET", "/page", "Host: shop.example", "Connection: X-Secret, Cookie", "X-Secret: 1",
        "Cookie: a=1", "TE: trailers", "Keep-Alive: timeout=5", "Upgrade: h2c",
        "Proxy-Authorization: Basic eDp5", "Proxy-Connection: keep-alive", "X-Kept: yes"))
    fields = received(reply)["fields"]
    for name in ("x-secret", "cookie", "te", "keep-alive", "upgrade", "proxy-authorization",
                 "proxy-connection"):
        assert name not in fields, name
    assert fields["x-kept"] == ["yes"]
