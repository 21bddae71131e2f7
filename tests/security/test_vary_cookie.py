"""``Vary: Cookie`` and a cookie the origin reads differently from a browser's.

The origin (a real aiohttp app) answers in German for ``lang=de`` and marks the page
``public, max-age=60, Vary: Cookie``. ``Cookie: ,lang=de`` is no ``lang`` to aiohttp (the name is
``,lang``), nor is ``lang=de,`` ``de``, nor an empty first ``Cookie`` line followed by ``lang=de``
(aiohttp reads the first line). Normalised as a list, each of those was the variant of a
browser's ``lang=de``: the English page stored for it was served to German visitors. The
``Cookie`` selecting value is now compared as received (``policy.keys.cookie_selecting``).
"""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import get, send_raw


async def greeting(request: web.Request) -> web.Response:
    text = "Hallo" if request.cookies.get("lang") == "de" else "Hello"
    return web.Response(text=text, headers={"Cache-Control": "public, max-age=60", "Vary": "Cookie"})


@pytest.mark.parametrize("lines", [["Cookie: ,lang=de"], ["Cookie: lang=de,"], ["Cookie: ", "Cookie: lang=de"]])
async def test_a_cookie_spelling_the_origin_reads_otherwise_is_not_a_browsers_variant(
        origin: Origin, make_proxy: MakeProxy, lines: list[str]) -> None:
    origin.route("/hello", greeting)
    proxy = await make_proxy()
    attack = await send_raw(proxy, get("/hello", *lines))
    assert attack.body == b"Hello"  # the origin saw no lang=de
    victim = await send_raw(proxy, get("/hello", "Cookie: lang=de"))
    assert (victim.x_cache, victim.body) == ("MISS", b"Hallo"), victim.header("Cache-Status")
    again = await send_raw(proxy, get("/hello", "Cookie: lang=de"))
    assert (again.x_cache, again.body) == ("HIT", b"Hallo")
