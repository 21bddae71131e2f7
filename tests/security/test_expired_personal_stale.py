"""A personal page the origin marked expired at once is never served stale to someone else.

Origins that personalise by cookie often say "do not reuse this" with a lifetime of 0 rather
than ``private``: ASP.NET's ``Expires: -1``, PHP's ``Expires: Thu, 19 Nov 1981 ...``,
``Expires: 0`` (with ``Pragma: no-cache``) or ``max-age=0``. cachegate stored such a page (it
has a validator) only to revalidate it before every use. The rules' ``stale_if_error``
(``rules/default.yaml`` ships 1h) used to apply to it, so while the origin was down or
answered 503, Bob got Alice's page as STALE; with the rules' ``stale_while_revalidate`` he got
it at once (UPDATING) while the origin was up. The rules' windows now apply only to a response
with a lifetime; the origin's own ``stale-if-error=`` still does (RFC 5861). Since, a response
to a request with a Cookie and no lifetime is not stored at all (``COOKIE-NO-FRESHNESS``:
tests/security/test_cookie_no_lifetime.py), so Alice's page is not there to be served stale;
the windows' own limit (for a page personalised by something else than a cookie) is held by
the policy tables (tests/policy/test_freshness.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.rules.util import settle, shift_clock

SHIPPED_RULES = (Path(__file__).resolve().parents[2] / "rules" / "default.yaml").read_text()
WITH_SWR = SHIPPED_RULES.replace("  # stale_while_revalidate: 30s", "  stale_while_revalidate: 30s")
EXPIRED_AT_ONCE = {
    "Expires: -1": {"Expires": "-1"},
    "Expires: 0": {"Expires": "0"},
    "a past Expires": {"Expires": "Thu, 19 Nov 1981 08:52:00 GMT"},
    "Expires: 0, Pragma: no-cache": {"Expires": "0", "Pragma": "no-cache"},
    "max-age=0": {"Cache-Control": "max-age=0"},
}


class Personal:
    """An origin page that greets the session's user, and can be made to fail."""

    def __init__(self, fields: dict[str, str], *, etag: bool = True) -> None:
        self.fields, self.etag, self.failing = fields, etag, False

    async def __call__(self, request: web.Request) -> web.Response:
        if self.failing:
            return web.Response(status=503, text="maintenance")
        who = request.cookies.get("session", "stranger")
        fields = {**self.fields, "Content-Type": "text/html"}
        if self.etag:
            fields["ETag"] = f'"{who}"'
        return web.Response(text=f"Hello {who}", headers=fields)


async def alice_fills(origin: Origin, proxy: Proxy, page: Personal) -> None:
    origin.route("/account", page)
    alice = await proxy.get("/account", headers={"Cookie": "session=alice"})
    assert alice.body == b"Hello alice"
    await settle(proxy)


def test_the_shipped_rules_still_serve_stale_on_error() -> None:
    assert "\n  stale_if_error: 1h" in SHIPPED_RULES and "\n  stale_while_revalidate: 30s" in WITH_SWR


@pytest.mark.parametrize("fields", EXPIRED_AT_ONCE.values(), ids=EXPIRED_AT_ONCE.keys())
@pytest.mark.parametrize("failure", ["origin down", "origin 503"])
async def test_while_the_origin_fails_bob_never_gets_alices_expired_page(
        origin: Origin, make_proxy: MakeProxy, fields: dict[str, str], failure: str) -> None:
    proxy = await make_proxy(rules=SHIPPED_RULES)
    page = Personal(fields)
    await alice_fills(origin, proxy, page)
    if failure == "origin down":
        await origin.stop(hold_port=True)
    else:
        page.failing = True
    bob = await proxy.get("/account", headers={"Cookie": "session=bob"})
    assert b"alice" not in bob.body, (bob.status, bob.x_cache, bob.cache_status)
    assert bob.status == (503 if failure == "origin 503" else 502) or bob.status == 504


@pytest.mark.parametrize("fields", EXPIRED_AT_ONCE.values(), ids=EXPIRED_AT_ONCE.keys())
@pytest.mark.parametrize("etag", [True, False], ids=["a validator", "no validator"])
async def test_with_the_rules_stale_while_revalidate_bob_gets_his_own_page(
        origin: Origin, make_proxy: MakeProxy, fields: dict[str, str], etag: bool) -> None:
    proxy = await make_proxy(rules=WITH_SWR)
    await alice_fills(origin, proxy, Personal(fields, etag=etag))
    bob = await proxy.get("/account", headers={"Cookie": "session=bob"})
    assert (bob.status, bob.body) == (200, b"Hello bob"), (bob.x_cache, bob.cache_status)
    assert bob.x_cache != "UPDATING"


async def test_the_origins_own_stale_if_error_still_serves_a_zero_lifetime_page(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """RFC 5861: the origin's stale-if-error= is its word that the stale page may be shared: an
    anonymous fill's. A fill for a request with a Cookie is not stored at all without a lifetime
    (COOKIE-NO-FRESHNESS), stale-if-error= or not: Bob gets the origin's error, not Alice's page."""
    proxy = await make_proxy(rules=SHIPPED_RULES)
    page = Personal({"Cache-Control": "max-age=0, stale-if-error=600"})
    origin.route("/account", page)
    assert (await proxy.get("/account")).body == b"Hello stranger"
    await alice_fills(origin, proxy, page)
    page.failing = True
    again = await proxy.get("/account")
    assert (again.status, again.x_cache, again.body) == (200, "STALE", b"Hello stranger")
    bob = await proxy.get("/account", headers={"Cookie": "session=bob"})
    assert (bob.status, bob.x_cache) == (200, "STALE") and b"alice" not in bob.body


async def test_a_page_with_a_lifetime_is_still_served_stale_by_the_rules(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The shipped stale_if_error still hides an outage behind a page the origin gave a lifetime."""
    proxy = await make_proxy(rules=SHIPPED_RULES)
    page = Personal({"Cache-Control": "max-age=1"})
    await alice_fills(origin, proxy, page)
    shift_clock(proxy, 10)
    page.failing = True
    again = await proxy.get("/account")
    assert (again.status, again.x_cache, again.body) == (200, "STALE", b"Hello alice")
