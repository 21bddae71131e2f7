"""Cookie parser differentials: the rules read one set of cookies, the origin another.

The origin here is a real aiohttp app that reads ``request.cookies`` (as Python's
``http.cookies`` does, it ends a cookie at whitespace and reads a quoted value whole), behind
the shipped ``rules/examples/mixed-app.yaml``: a ``session`` cookie bypasses the cache, anonymous
pages are stored for two minutes keyed on the ``ab_bucket`` cookie. When cachegate read a cookie
only up to the next ``;``, ``Cookie: theme=dark, session=ATTACKER`` had no ``session`` for the
rules while the origin rendered ATTACKER's logged-in page, which was stored and served to every
anonymous visitor; and ``ab_bucket=A; x=1, ab_bucket=B`` stored the origin's B page under A.

Now a cookie the rules read and that origins may read differently (``policy.fields.cookies``:
a comma, whitespace or a quote inside a pair, a name twice with other values, two ``Cookie``
lines) makes the request a bypass: neither looked up nor stored (``AMBIGUOUS-COOKIE``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import get, send_raw

MIXED_APP = (Path(__file__).resolve().parents[2] / "rules" / "examples" / "mixed-app.yaml").read_text()


async def page(request: web.Request) -> web.Response:
    session = request.cookies.get("session")
    who = f"logged in as {session}" if session else "anonymous"
    return web.Response(text=f"{who} | ab_bucket={request.cookies.get('ab_bucket', '-')}")


@pytest.mark.parametrize("cookie", [
    "theme=dark, session=ATTACKER",   # Rack 2 ends a cookie at ","
    "theme=dark session=ATTACKER",    # http.cookies and aiohttp at whitespace
    "theme=dark,\tsession=ATTACKER",
    'theme="x"; session=ATTACKER',    # a quote: the rest cannot be read alike by everyone
    "theme=dark;\u00a0session=ATTACKER",  # a no-break space aiohttp strips (UTF-8 on the wire)
])
async def test_a_session_cookie_hidden_from_a_semicolon_only_reading_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy, cookie: str) -> None:
    origin.route("/news", page)
    proxy = await make_proxy(rules=MIXED_APP)
    attack = await send_raw(proxy, get("/news", f"Cookie: {cookie}".encode().decode("latin-1")))
    assert attack.body.startswith(b"logged in as ATTACKER")  # the origin read a session
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")  # (the session rule's bypass)
    victim = await send_raw(proxy, get("/news"))
    assert (victim.x_cache, victim.body) == ("MISS", b"anonymous | ab_bucket=-")
    assert origin.count("/news") == 2


@pytest.mark.parametrize("cookie", [
    "ab_bucket=A; x=1, ab_bucket=B",
    "ab_bucket=A, ab_bucket=B",
    "ab_bucket=A; ab_bucket=B",       # frameworks take the first or the last
    "ab_bucket=A x=1 ab_bucket=B",
])
async def test_a_keyed_cookie_origins_read_differently_is_not_cached(
        origin: Origin, make_proxy: MakeProxy, cookie: str) -> None:
    origin.route("/promo", page)
    proxy = await make_proxy(rules=MIXED_APP)
    attack = await send_raw(proxy, get("/promo", f"Cookie: {cookie}"))
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    assert "AMBIGUOUS-COOKIE:ab_bucket" in (attack.header("Cache-Status") or "")
    victim = await send_raw(proxy, get("/promo", "Cookie: ab_bucket=A"))
    assert (victim.x_cache, victim.body) == ("MISS", b"anonymous | ab_bucket=A")
    assert origin.count("/promo") == 2


async def test_two_cookie_lines_are_not_cached(origin: Origin, make_proxy: MakeProxy) -> None:
    """aiohttp reads the first line only; WSGI servers join them: the second line's session."""
    origin.route("/news", page)
    proxy = await make_proxy(rules=MIXED_APP)
    attack = await send_raw(proxy, get("/news", "Cookie: theme=dark", "Cookie: session=ATTACKER"))
    assert attack.x_cache == "BYPASS"
    assert (await send_raw(proxy, get("/news"))).x_cache == "MISS"


async def test_what_browsers_send_is_still_cached(origin: Origin, make_proxy: MakeProxy) -> None:
    """A plain Cookie (RFC 6265 §4.2.1) is read as every origin reads it, and cached as before,
    and so is one beside a pair with a comma that holds no cookie the rules read."""
    origin.route("/promo", page)
    proxy = await make_proxy(rules=MIXED_APP)
    first = await send_raw(proxy, get("/promo", "Cookie: theme=dark; ab_bucket=B; prefs=a,b"))
    assert (first.x_cache, first.body) == ("MISS", b"anonymous | ab_bucket=B")
    again = await send_raw(proxy, get("/promo", "Cookie: ab_bucket=B"))
    assert (again.x_cache, again.body) == ("HIT", b"anonymous | ab_bucket=B")
    other = await send_raw(proxy, get("/promo", "Cookie: ab_bucket=A"))
    assert (other.x_cache, other.body) == ("MISS", b"anonymous | ab_bucket=A")


def php_cookies(value: str) -> dict[str, str]:
    """``$_COOKIE`` as PHP 8 builds it (main/php_variables.c): pairs split at ``;``, leading
    whitespace dropped, ``.`` and `` `` read as ``_``, and a name's first value wins."""
    jar: dict[str, str] = {}
    for part in value.split(";"):
        name, _, v = part.lstrip().partition("=")
        name = name.replace(".", "_").replace(" ", "_")
        if name and name not in jar:
            jar[name] = v
    return jar


async def php_page(request: web.Request) -> web.Response:
    jar = php_cookies(request.headers.get("Cookie", ""))
    who = f"logged in as {jar['session']}" if "session" in jar else "anonymous"
    return web.Response(text=f"{who} | ab_bucket={jar.get('ab_bucket', '-')}")


@pytest.mark.parametrize("cookie", ["ab.bucket=B; ab_bucket=A", "ab_bucket=A; ab.bucket=B", "ab bucket=B; ab_bucket=A"])
async def test_a_keyed_cookie_php_reads_under_another_name_is_not_cached(
        origin: Origin, make_proxy: MakeProxy, cookie: str) -> None:
    """PHP reads ``ab.bucket`` as ``$_COOKIE['ab_bucket']`` and keeps a name's first value: the B
    page was stored under A's key and served to A's visitors."""
    origin.route("/promo", php_page)
    proxy = await make_proxy(rules=MIXED_APP)
    attack = await send_raw(proxy, get("/promo", f"Cookie: {cookie}"))
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    assert "AMBIGUOUS-COOKIE:ab_bucket" in (attack.header("Cache-Status") or "")
    victim = await send_raw(proxy, get("/promo", "Cookie: ab_bucket=A"))
    assert (victim.x_cache, victim.body) == ("MISS", b"anonymous | ab_bucket=A")


async def php_logged_in(request: web.Request) -> web.Response:
    jar = php_cookies(request.headers.get("Cookie", ""))
    return web.Response(text=f"logged in as {jar['logged_in']}" if "logged_in" in jar else "anonymous")


async def test_a_bypass_cookie_php_reads_under_another_name_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """``logged.in`` is no ``logged_in`` to the rules but PHP's ``$_COOKIE['logged_in']``: the
    bypass rule did not hold while PHP rendered the logged-in page, stored for cookieless visitors."""
    origin.route("/news", php_logged_in)
    proxy = await make_proxy(rules=MIXED_APP.replace("session", "logged_in"))
    attack = await send_raw(proxy, get("/news", "Cookie: logged.in=ATTACKER"))
    # (a cookie present in some reading holds a present-means-bypass rule, as an ambiguous one does)
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    victim = await send_raw(proxy, get("/news"))
    assert victim.body == b"anonymous"
