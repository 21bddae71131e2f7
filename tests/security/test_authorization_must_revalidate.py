"""A response to a request with ``Authorization`` that only ``must-revalidate`` lets a shared cache
keep (RFC 9111 §3.5: no ``public``, no ``s-maxage``) may be stored only by a cache that obeys
``must-revalidate``. A rule's ``ttl`` (a ``defaults:`` table as in rules/examples/static-site.yaml,
or a rule's with ``override_origin``) must not give it a lifetime: with one, Alice's answer was
a HIT for the next anonymous client.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from aiohttp import web

from proxy.policy.messages import CacheOptions
from proxy.rules import load_rules
from proxy.yamlsrc import Problems
from tests.conftest import MakeProxy
from tests.harness import Handler, Origin
from tests.security.util import get, send_raw

RULES = """
    defaults:
      ttl: {200: 5m, 301: 1h, 404: 1m}
    rules:
      - name: reports
        match: {path: "/reports/**"}
        ttl: {200: 1h}
        override_origin: true
"""


def protected(cache_control: str, *, lax_304: bool = False) -> Handler:
    """An API that answers only with credentials; ``lax_304``: it answers a conditional request
    with 304 without looking at who asks (the sharp edge SECURITY.md names)."""
    async def api(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        if lax_304 and request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": cache_control})
        if auth is None:
            return web.Response(status=401, text="login required",
                                headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})
        return web.Response(text=f"secret for {auth}", content_type="application/json",
                            headers={"Cache-Control": cache_control, "ETag": '"v1"'})
    return api


@pytest.mark.parametrize(("path", "cache_control"), [
    ("/api/me", "must-revalidate"),  # the defaults' ttl
    ("/reports/q3.json", "max-age=0, must-revalidate"),  # a rule's ttl with override_origin
])
async def test_a_rule_ttl_never_shares_a_response_to_authorization_kept_by_must_revalidate(
        origin: Origin, make_proxy: MakeProxy, path: str, cache_control: str) -> None:
    origin.route(path, protected(cache_control))
    proxy = await make_proxy(rules=RULES)
    alice = await send_raw(proxy, get(path, "Authorization: Bearer alice"))
    assert alice.body == b"secret for Bearer alice"
    anonymous = await send_raw(proxy, get(path))
    assert (anonymous.status, anonymous.body) == (401, b"login required"), anonymous.x_cache
    assert origin.count(path) == 2
    again = await send_raw(proxy, get(path, "Authorization: Bearer alice"))  # revalidated, not a HIT
    assert again.x_cache != "HIT" and again.body == b"secret for Bearer alice"
    assert origin.count(path) == 3


async def test_an_anonymous_304_does_not_give_it_the_rule_ttl(origin: Origin, make_proxy: MakeProxy) -> None:
    """An origin that answers a conditional request with 304 whoever asks hands the stored
    response to that client (SECURITY.md, not defended); freshened by that 304, it must not
    then become fresh for everyone for the rule's 5 minutes."""
    origin.route("/api/me", protected("must-revalidate", lax_304=True))
    proxy = await make_proxy(rules=RULES)
    assert (await send_raw(proxy, get("/api/me", "Authorization: Bearer alice"))).x_cache == "MISS"
    await send_raw(proxy, get("/api/me"))  # revalidated: the origin's 304
    assert origin.count("/api/me") == 2
    later = await send_raw(proxy, get("/api/me"))
    assert later.x_cache != "HIT" and origin.count("/api/me") == 3


def test_explain_says_the_rule_ttl_does_not_apply(tmp_path: Path) -> None:
    from proxy.explain import AUTHORIZATION_ORIGIN_ONLY, ExplainRequest, explain

    path = tmp_path / "site.yaml"
    path.write_text(textwrap.dedent(RULES))
    problems = Problems()
    ruleset = load_rules([(str(path), "site.yaml")], CacheOptions(), problems)
    assert not problems
    req = ExplainRequest("http://shop.example/reports/q3.json", headers=(("Authorization", "Bearer alice"),),
                         response_headers=(("Cache-Control", "max-age=0, must-revalidate"), ("ETag", '"v1"'),
                                           ("Content-Type", "application/json")))
    text = "\n".join(explain(ruleset, req, time.time()))
    assert "stored, fresh for 0s (from the origin's max-age)" in text and AUTHORIZATION_ORIGIN_ONLY in text
