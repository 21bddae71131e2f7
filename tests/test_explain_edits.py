"""``cachegate explain`` says the ``response_headers`` edits the proxy really sends: those that
touch a caching field (``Cache-Control: public, max-age=600``) are withheld from a personal reply
(private, a cookie, a bypassed request: ``policy.headers.reply_edits``), as the proxy withholds
them, and explain says so instead of listing them as sent."""

from __future__ import annotations

import time

import pytest

from proxy.explain import ExplainRequest, explain
from tests.admin.util import absolute, settle
from tests.conftest import MakeProxy
from tests.harness import Origin

RULES = """
rules:
  - name: bp-edit
    match: {path: "/bpe/**"}
    bypass: true
    response_headers: {add: {Cache-Control: "public, max-age=600", X-Bpe: "1"}}
  - name: landing
    match: {path: "/landing/**"}
    allow_set_cookie: true
    response_headers: {add: {Cache-Control: "public, max-age=600"}}
  - name: ccadd
    match: {path: "/cc/**"}
    ttl: {200: 1h}
    response_headers: {add: {Cache-Control: "public, max-age=600", X-E: "1"}, remove: [Expires]}
"""
SET = "set Cache-Control: public, max-age=600"

# (path, origin's fields, the reply's Cache-Control, words of explain's "response headers" line)
CASES = [
    ("/cc/private", [("Cache-Control", "private")], "private",
     f"set X-E: 1; withheld: {SET}; remove Expires (the reply's Cache-Control says private: no cache "
     "after this one may be told to share it)"),
    ("/cc/shared", [], "public, max-age=600", f"{SET}; set X-E: 1; remove Expires"),
    ("/bpe/a", [], None, f"set X-Bpe: 1; withheld: {SET} (the request is bypassed, so its reply may be "
                         "one user's: no cache after this one may be told to share it)"),
    ("/landing/a", [("Cache-Control", "max-age=60"), ("Set-Cookie", "s=1")], "max-age=60",
     f"none; withheld: {SET} (the reply sets a cookie: no cache after this one may be told to share it)"),
]


@pytest.mark.parametrize(("path", "fields", "sent", "said"), CASES, ids=[c[0] for c in CASES])
async def test_explain_lists_the_edits_the_proxy_sends_and_the_ones_it_withholds(
        origin: Origin, make_proxy: MakeProxy, path: str, fields: list[tuple[str, str]], sent: str | None,
        said: str) -> None:
    proxy = await make_proxy(rules=RULES)
    origin.route(path, body=b"x", headers=dict(fields))
    reply = await proxy.get(path)
    assert reply.headers.get("Cache-Control") == sent, reply.headers
    req = ExplainRequest(url=absolute(proxy, path), statuses=(200,), response_headers=tuple(fields))
    lines = explain(proxy.runtime.settings.rules, req, time.time(), show_all=False)
    assert f"  response headers    {said}" in lines, lines


async def test_explain_says_a_stored_reply_s_hits_get_the_edits_its_fill_did_not(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """allow_set_cookie stores the response without its Set-Cookie: the reply that fetched it
    withholds the Cache-Control edit, the hits after it get it."""
    proxy = await make_proxy(rules=RULES)
    fields = {"Cache-Control": "max-age=60", "Set-Cookie": "s=1"}
    origin.route("/landing/b", body=b"x", headers=fields)
    assert (await proxy.get("/landing/b")).headers["Cache-Control"] == "max-age=60"
    await settle(proxy)
    hit = await proxy.get("/landing/b")
    assert (hit.headers["X-Cache-Status"], hit.headers["Cache-Control"]) == ("HIT", "public, max-age=600")
    req = ExplainRequest(url=absolute(proxy, "/landing/b"), response_headers=tuple(fields.items()))
    lines = explain(proxy.runtime.settings.rules, req, time.time(), show_all=False)
    assert f"  ... on hits         {SET}" in lines, lines
