"""Spellings of a selecting field that the origin reads as another value must not select an
innocent client's variant (RFC 9111 §4.1: normalise only what has the same meaning).

An attacker repeats a field over several lines, or adds an empty member, so that the
origin answers for another value (Go, Starlette and aiohttp read the first line; Node and
WSGI join the lines; an exact CORS allow-list sees ``https://app.example,`` as a stranger),
while a cache that joins lines and drops empty members files the answer under the value
without them: the victim's. The origins here are real aiohttp apps on loopback and the
requests go byte for byte on a socket (no client library sends an empty field line).
"""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Handler, Origin
from tests.security.util import CACHEABLE, get, send_raw

APP = "https://app.example"

# The attacker's Origin field lines: each selects the victim's variant if lines are joined
# and empty members dropped.
ORIGIN_SPELLINGS = {
    "a trailing comma": ["Origin: https://app.example,"],
    "an empty line after": ["Origin: https://app.example", "Origin: ,"],
    "an empty line before": ["Origin: ,", "Origin: https://app.example"],
    "a leading empty member": ["Origin: , https://app.example"],
}


def cors_api(reading: str) -> Handler:
    """An API that allows one origin exactly (as the ``cors`` packages of Express, Django and
    Spring do), reading the field as the named framework family does."""

    async def api(request: web.Request) -> web.Response:
        lines = request.headers.getall("Origin", [])
        seen = (lines[0] if lines else None) if reading == "first line" else ", ".join(lines) or None
        headers = {**CACHEABLE, "Vary": "Origin"}
        if seen == APP:
            headers["Access-Control-Allow-Origin"] = APP
        return web.Response(text='{"data": 1}', headers=headers)

    return api


@pytest.mark.parametrize("reading", ["first line", "lines joined"])
@pytest.mark.parametrize("spelling", list(ORIGIN_SPELLINGS))
async def test_an_origin_spelled_with_empty_members_or_lines_never_selects_the_real_origins_variant(
        origin: Origin, make_proxy: MakeProxy, spelling: str, reading: str) -> None:
    origin.route("/api/items", cors_api(reading))
    proxy = await make_proxy()
    attacker = await send_raw(proxy, get("/api/items", *ORIGIN_SPELLINGS[spelling]))
    assert attacker.status == 200
    victim = await send_raw(proxy, get("/api/items", f"Origin: {APP}"))
    assert victim.header("Access-Control-Allow-Origin") == APP, (victim.x_cache, victim.fields)


async def localised_page(request: web.Request) -> web.Response:
    """A page in the first language of the first Accept-Language line (German by default), each
    language read once with its last weight (a dict, as hand-written parsers do); Vary says so."""
    value = request.headers.get("Accept-Language", "")
    weights: dict[str, float] = {}
    for member in value.split(","):
        tag, _, q = member.strip().partition(";q=")
        if tag:
            weights[tag.lower()] = float(q or 1)
    lang = max(weights, key=lambda t: weights[t]) if weights else "de"
    return web.Response(text=f"page in {lang}", headers={**CACHEABLE, "Vary": "Accept-Language"})


KEYED = """
    rules:
      - name: anonymous pages
        match: {path: "/**", method: GET}
        key: {headers: [Accept-Language]}
"""

# (the attacker's Accept-Language lines, the victim's, the page the victim must get)
LANGUAGE_SPELLINGS = {
    "an empty line before en": (["Accept-Language: ", "Accept-Language: en"], "Accept-Language: en", b"page in en"),
    "de listed twice, last with a low weight": (["Accept-Language: de, en;q=0.5, de;q=0.1"],
                                                "Accept-Language: de, en;q=0.5", b"page in de"),
}


@pytest.mark.parametrize("keyed_by", ["Vary", "a rule's key.headers"])
@pytest.mark.parametrize("spelling", list(LANGUAGE_SPELLINGS))
async def test_an_accept_language_the_origin_reads_otherwise_never_serves_the_victims_language(
        origin: Origin, make_proxy: MakeProxy, spelling: str, keyed_by: str) -> None:
    origin.route("/home", localised_page)
    proxy = await make_proxy(rules=KEYED if keyed_by != "Vary" else None)
    lines, victims, page = LANGUAGE_SPELLINGS[spelling]
    attacker = await send_raw(proxy, get("/home", *lines))
    assert attacker.status == 200
    victim = await send_raw(proxy, get("/home", victims))
    assert victim.body == page, victim.x_cache
    # The same spelling again still shares the attacker's own entry: nothing else was lost.
    again = await send_raw(proxy, get("/home", *lines))
    assert (again.x_cache, again.body) == ("HIT", attacker.body)
