"""Another user's page through revalidation: a response to a request with a Cookie, stored only
to be revalidated.

The origin greets the session's user on a page whose validators do not change per user (a
constant ``Last-Modified``, an ``ETag`` naming the article rather than the page rendered), gives
it no lifetime (no ``Cache-Control`` at all, ``max-age=0``, ``no-cache``, ...) and no
``private``, and answers a conditional request by its validators alone, as any origin honouring
its own ``Last-Modified`` does. Stored "to be revalidated", Alice's page went to Bob and to
anonymous clients: their requests were revalidated with Alice's ``If-None-Match`` /
``If-Modified-Since``, the origin answered 304, and cachegate served what it held
(``REVALIDATED``). Such a response is now not stored (``COOKIE-NO-FRESHNESS``), as nginx and
Varnish keep no response with a lifetime of 0.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.admin.util import absolute, js
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.rules.util import settle

LAST_MODIFIED = format_http_date(time.time() - 30 * 86400)
ETAG = '"article-7"'
CONDITIONALS = ("If-None-Match", "If-Modified-Since")
NOT_STORED = "cachegate; fwd=uri-miss; fwd-status=200; detail=COOKIE-NO-FRESHNESS"


class Greeting:
    """An origin page that greets the session's user, validated by the article's validators only."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = {**fields, "Last-Modified": LAST_MODIFIED, "ETag": ETAG, "Content-Type": "text/plain"}
        self.failing = False

    async def __call__(self, request: web.Request) -> web.Response:
        if self.failing:
            return web.Response(status=503, text="maintenance")
        if request.headers.get("If-None-Match") == ETAG or request.headers.get("If-Modified-Since") == LAST_MODIFIED:
            return web.Response(status=304, headers=self.fields)
        return web.Response(text=f"Hello {request.cookies.get('session', 'stranger')}", headers=self.fields)


def conditionals(origin: Origin) -> list[list[str]]:
    """The validators each request the origin received for /greet carried."""
    return [[name for name in CONDITIONALS if name in seen.headers] for seen in origin.seen
            if seen.path == "/greet"]


def not_stored(proxy: Proxy) -> float:
    return proxy.runtime.metrics.registry.get_sample_value(
        "cachegate_not_stored_total", {"reason": "COOKIE-NO-FRESHNESS"}) or 0.0


NO_LIFETIME = {
    "no Cache-Control": {},
    "max-age=0": {"Cache-Control": "max-age=0"},
    "no-cache": {"Cache-Control": "no-cache"},
    "no-cache beside a max-age": {"Cache-Control": "no-cache, max-age=600"},
    "max-age=0, must-revalidate": {"Cache-Control": "max-age=0, must-revalidate"},
    "Expires: -1": {"Expires": "-1"},
    "the origin's stale-while-revalidate": {"Cache-Control": "max-age=0, stale-while-revalidate=60"},
}


@pytest.mark.parametrize("fields", NO_LIFETIME.values(), ids=NO_LIFETIME.keys())
async def test_bob_and_anonymous_clients_get_their_own_page_not_alices(
        origin: Origin, make_proxy: MakeProxy, fields: dict[str, str]) -> None:
    origin.route("/greet", Greeting(fields))
    proxy = await make_proxy()
    alice = await proxy.get("/greet", headers={"Cookie": "session=alice"})
    assert (alice.body, alice.x_cache, alice.cache_status) == (b"Hello alice", "MISS", NOT_STORED)
    await settle(proxy)
    assert not_stored(proxy) == 1
    bob = await proxy.get("/greet", headers={"Cookie": "session=bob"})
    assert (bob.status, bob.body, bob.x_cache) == (200, b"Hello bob", "MISS"), bob.cache_status
    anonymous = await proxy.get("/greet")
    assert (anonymous.status, anonymous.body, anonymous.x_cache) == (200, b"Hello stranger", "MISS")
    # The origin got each request as its client sent it: never with Alice's validators.
    assert conditionals(origin) == [[], [], []]
    # An anonymous fill is stored (to be revalidated, or by its heuristic lifetime), as before.
    assert "stored" in anonymous.cache_status.split("; "), anonymous.cache_status
    assert not_stored(proxy) == 2  # Alice's and Bob's


async def test_the_origins_stale_if_error_never_hands_alices_page_to_bob(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """With a lifetime of 0, the origin's own stale-if-error= would have served Alice's page to
    everyone while the origin failed."""
    page = Greeting({"Cache-Control": "max-age=0, stale-if-error=600"})
    origin.route("/greet", page)
    proxy = await make_proxy()
    alice = await proxy.get("/greet", headers={"Cookie": "session=alice"})
    assert (alice.body, alice.cache_status) == (b"Hello alice", NOT_STORED)
    await settle(proxy)
    page.failing = True
    for headers in ({"Cookie": "session=bob"}, {}):
        other = await proxy.get("/greet", headers=headers)
        assert (other.status, other.body) == (503, b"maintenance"), (other.x_cache, other.cache_status)


@pytest.mark.parametrize(("fields", "rules"), [
    ({"Cache-Control": "public, max-age=0"}, None),
    ({"Cache-Control": "public, no-cache"}, None),
    ({"Cache-Control": "max-age=60"}, None),
    ({}, "rules:\n  - {name: greet, match: {path: /greet}, ttl: {200: 1m}}\n"),
], ids=["public, max-age=0", "public, no-cache", "max-age=60", "a rule ttl"])
async def test_the_origins_public_a_lifetime_or_a_rule_ttl_still_store_it(
        origin: Origin, make_proxy: MakeProxy, fields: dict[str, str], rules: str | None) -> None:
    """The origin's word (public, a lifetime) or the operator's rule say it is everyone's."""
    origin.route("/greet", Greeting(fields))
    proxy = await make_proxy(rules=rules)
    alice = await proxy.get("/greet", headers={"Cookie": "session=alice"})
    assert "stored" in alice.cache_status.split("; "), alice.cache_status
    assert not_stored(proxy) == 0


async def test_explain_says_why_it_is_not_stored(origin: Origin, make_proxy: MakeProxy) -> None:
    """GET and POST /explain decide with the proxy's own policy (``decide_fill``)."""
    proxy = await make_proxy()
    await proxy.get("/")  # a request names the listener's host: a host it serves
    url = absolute(proxy, "/greet")
    response = {"Cache-Control": "max-age=0", "ETag": ETAG}

    async def fetched(**body: Any) -> Any:
        reply = await proxy.admin("POST", "/explain", json={"url": url, "response_headers": response, **body})
        assert reply.status == 200, reply.body
        [decision] = js(reply)["if_fetched"]
        return decision

    alice = await fetched(headers={"Cookie": "session=alice"})
    assert (alice["stored"], alice["detail"]) == (False, "COOKIE-NO-FRESHNESS")
    assert alice["why"].startswith("the request has a Cookie and the response is not public and has no "
                                   "lifetime above 0 (the origin's Cache-Control: max-age=0)"), alice["why"]
    anonymous = await fetched()
    assert anonymous["stored"] is True and anonymous["why"] == "storable: to be revalidated"
    reply = await proxy.admin("GET", "/explain", params={"url": url, "headers": '{"Cookie": "session=alice"}',
                                                         "response_headers": '{"Cache-Control": "no-cache", "ETag": "\\"v1\\""}'})
    assert reply.status == 200, reply.body
    [got] = js(reply)["if_fetched"]
    assert (got["stored"], got["detail"]) == (False, "COOKIE-NO-FRESHNESS")
    assert "no-cache has every use revalidated" in got["why"], got["why"]
