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
from urllib.parse import unquote

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


# Origins that read a cookie otherwise than by its exact name and raw value.
CASE_AND_VALUE_RULES = """
    rules:
      - name: preview mode is never cached
        match: {cookie: {preview: "1"}}
        bypass: true
      - name: logged-in users skip the cache
        match: {cookie: {session: present}}
        bypass: true
      - name: pages
        match: {path: "/**"}
        ttl: {200: 2m}
        key: {cookies: [bucket]}
"""


def aspnet_cookies(value: str) -> dict[str, str]:
    """``Request.Cookies`` as ASP.NET Core builds it: names compared ignoring case (nginx's
    ``$cookie_*`` too), the last pair wins, values percent-decoded (``Uri.UnescapeDataString``)."""
    jar: dict[str, str] = {}
    for part in value.split(";"):
        name, _, v = part.strip().partition("=")
        if name:
            jar[name.lower()] = unquote(v)
    return jar


async def aspnet_page(request: web.Request) -> web.Response:
    jar = aspnet_cookies(request.headers.get("Cookie", ""))
    who = f"logged in as {jar['session']}" if "session" in jar else "anonymous"
    draft = " | DRAFT" if jar.get("preview") == "1" else ""
    return web.Response(text=f"{who} | bucket={jar.get('bucket', '-')}{draft}")


async def test_a_session_cookie_spelled_in_another_case_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """``SESSION`` is no ``session`` to the rules but ASP.NET's: the bypass rule did not hold
    while the origin rendered the logged-in page, stored for every anonymous visitor."""
    origin.route("/home", aspnet_page)
    proxy = await make_proxy(rules=CASE_AND_VALUE_RULES)
    attack = await send_raw(proxy, get("/home", "Cookie: SESSION=MALLORY"))
    assert attack.body.startswith(b"logged in as MALLORY")
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    assert "AMBIGUOUS-COOKIE:session" in (attack.header("Cache-Status") or "")
    victim = await send_raw(proxy, get("/home"))
    assert (victim.x_cache, victim.body) == ("MISS", b"anonymous | bucket=-")


@pytest.mark.parametrize("cookie", ["bucket=A; Bucket=EVIL", "BUCKET=EVIL; bucket=A", "Bucket=EVIL"])
async def test_a_keyed_cookie_spelled_in_another_case_is_not_cached(
        origin: Origin, make_proxy: MakeProxy, cookie: str) -> None:
    """``bucket=A; Bucket=EVIL`` was keyed on A while ASP.NET rendered EVIL, served to A's visitors."""
    origin.route("/ab/x", aspnet_page)
    proxy = await make_proxy(rules=CASE_AND_VALUE_RULES)
    attack = await send_raw(proxy, get("/ab/x", f"Cookie: {cookie}"))
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    assert "AMBIGUOUS-COOKIE:bucket" in (attack.header("Cache-Status") or "")
    victim = await send_raw(proxy, get("/ab/x", "Cookie: bucket=A"))
    assert (victim.x_cache, victim.body) == ("MISS", b"anonymous | bucket=A")


@pytest.mark.parametrize("cookie", ["preview=%31", "preview=%31; bucket=A"])
async def test_a_compared_cookie_value_the_origin_percent_decodes_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy, cookie: str) -> None:
    """``preview=%31`` did not hold ``preview: "1"`` while the origin read 1 and rendered the
    draft, stored for everyone."""
    origin.route("/news", aspnet_page)
    proxy = await make_proxy(rules=CASE_AND_VALUE_RULES)
    attack = await send_raw(proxy, get("/news", f"Cookie: {cookie}"))
    assert attack.body.endswith(b"DRAFT")
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    assert "AMBIGUOUS-COOKIE:preview" in (attack.header("Cache-Status") or "")
    victim = await send_raw(proxy, get("/news", *(["Cookie: bucket=A"] if "bucket" in cookie else [])))
    assert victim.x_cache == "MISS" and not victim.body.endswith(b"DRAFT"), victim.body



CONSENT_RULES = """
    rules:
      - name: analytics consent
        match: {path: "/consented/**", cookie: {OptanonConsent: {regex: "C0004%3A1"}}}
        ttl: {200: 2m}
        key: {cookies: [OptanonConsent]}
      - name: pages
        match: {path: "/**"}
        ttl: {200: 2m}
"""

# A OneTrust consent cookie as browsers send it: its value always holds % and +.
ONETRUST = ("OptanonConsent=isGpcEnabled=0&datestamp=Sun+Dec+06+2026+12%3A00%3A00+GMT%2B0000"
            "&groups=C0001%3A1%2CC0004%3A1")


async def consent_page(request: web.Request) -> web.Response:
    groups = aspnet_cookies(request.headers.get("Cookie", "")).get("optanonconsent", "").partition("groups=")[2]
    return web.Response(text="with analytics" if "C0004:1" in groups.split(",") else "without analytics")


async def test_a_compared_cookie_value_every_reading_agrees_on_is_cached(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A value with ``%`` or ``+`` is ambiguous only when a decoded reading decides otherwise:
    every OneTrust visitor bypassed a ``regex: "C0004%3A1"`` rule, whose escape stands for the
    ``C0004:1`` the origin reads; ``C0004%3a1`` is that too, and the rule's verdicts differ."""
    origin.route("/consented/page", consent_page)
    proxy = await make_proxy(rules=CONSENT_RULES)
    first = await send_raw(proxy, get("/consented/page", f"Cookie: {ONETRUST}"))
    second = await send_raw(proxy, get("/consented/page", f"Cookie: {ONETRUST}"))
    assert (first.x_cache, second.x_cache) == ("MISS", "HIT"), first.header("Cache-Status")
    assert second.body == b"with analytics"
    odd = await send_raw(proxy, get("/consented/page", f"Cookie: {ONETRUST.replace('%3A1', '%3a1')}"))
    assert odd.body == b"with analytics"
    assert odd.x_cache == "BYPASS" and "AMBIGUOUS-COOKIE:OptanonConsent" in (odd.header("Cache-Status") or "")
    anonymous = await send_raw(proxy, get("/consented/page"))  # ("pages" would have stored odd's page)
    assert (anonymous.x_cache, anonymous.body) == ("MISS", b"without analytics")
    assert origin.count("/consented/page") == 3


def wsgi_cookies(value: str) -> dict[str, str]:
    """Django's ``parse_cookie`` behind a WSGI server: the field's bytes read as Latin-1 (PEP
    3333), pairs split at ``;``, name and value ``str.strip``-ped (a no-break space, U+0085 too)."""
    text = value.encode("utf-8", "surrogateescape").decode("latin-1")
    jar: dict[str, str] = {}
    for part in text.split(";"):
        name, _, v = part.partition("=")
        if name := name.strip():
            jar[name] = v.strip()
    return jar


async def wsgi_page(request: web.Request) -> web.Response:
    session = wsgi_cookies(request.headers.get("Cookie", "")).get("session")
    return web.Response(text=f"logged in as {session}" if session else "anonymous")


@pytest.mark.parametrize("separator", [b"\xa0", b"\x85", b" \xa0"])
async def test_a_session_cookie_behind_a_byte_past_ascii_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy, separator: bytes) -> None:
    """A raw 0xA0 arrives as ``\\udca0`` (not UTF-8), which no whitespace pattern matched: the
    rules saw ``\\udca0session`` while a WSGI origin read ``session`` and rendered its page."""
    origin.route("/news", wsgi_page)
    proxy = await make_proxy(rules=MIXED_APP)
    data = get("/news", "Cookie: a=1;@session=MALLORY").replace(b"@", separator)
    attack = await send_raw(proxy, data)
    assert attack.body == b"logged in as MALLORY"
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    victim = await send_raw(proxy, get("/news"))
    assert (victim.x_cache, victim.body) == ("MISS", b"anonymous")
