"""``response_headers: {add: {Cache-Control: "public, max-age=60"}}`` (the example docs/rules.md gives)
in ``defaults:`` stamped ``public`` over a reply cachegate itself refused to store as personal
(``private`` with a ``Set-Cookie``), so the CDN in front of cachegate could keep Alice's page and
her cookie for everyone. The edit now leaves the caching fields of such replies alone.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import get, send_raw

RULES = """
    defaults:
      response_headers: {add: {Cache-Control: "public, max-age=60", X-Served-By: edge}}
    rules:
      - name: logged in
        match: {path: "/bypassed"}
        bypass: true
"""


@pytest.mark.parametrize(("path", "fields", "request_field", "origin_cc"), [
    ("/me", {"Cache-Control": "private, max-age=0", "Set-Cookie": "sid=alice-secret; HttpOnly"},
     "Cookie: sid=alice", "private, max-age=0"),
    ("/nostore", {"Cache-Control": "no-store"}, "Cookie: sid=alice", "no-store"),
    ("/cookie", {"Set-Cookie": "sid=alice-secret"}, "Cookie: sid=alice", None),
    ("/auth", {}, "Authorization: Bearer alice", None),
    ("/bypassed", {"Cache-Control": "private"}, "Cookie: sid=alice", "private"),
    # A rule's bypass (for a session, an Authorization) with no marking of the origin's own:
    # public there would let a CDN keep the personal reply for everyone.
    ("/bypassed", {}, "Authorization: Bearer alice", None),
    ("/bypassed", {"Cache-Control": "max-age=0"}, "Cookie: session=alice", "max-age=0"),
])
async def test_a_rule_never_marks_a_personal_reply_public(
        origin: Origin, make_proxy: MakeProxy, path: str, fields: dict[str, str], request_field: str,
        origin_cc: str | None) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="alice's page", headers=fields)

    origin.route(path, page)
    proxy = await make_proxy(rules=RULES)
    reply = await send_raw(proxy, get(path, request_field))
    assert reply.body == b"alice's page"
    assert [v for k, v in reply.fields if k.lower() == "cache-control"] == ([origin_cc] if origin_cc else [])
    assert reply.header("X-Served-By") == "edge"  # the rest of the edits apply


async def test_a_shareable_reply_still_gets_the_edit(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", body=b"for everyone", headers={"Cache-Control": "max-age=5"})
    proxy = await make_proxy(rules=RULES)
    for _ in range(2):  # the miss and the hit
        reply = await send_raw(proxy, get("/page"))
        assert reply.header("Cache-Control") == "public, max-age=60"
