"""A header a rule compares sent as several lines: the rules and the origin must not part.

A value condition (``equals``, ``regex``) reads a repeated field joined with ``, `` (RFC 9110
§5.3), but aiohttp, Go and Varnish read its first line and some frameworks its last. With a
``bypass`` rule on ``X-Requested-With: XMLHttpRequest``, the field sent twice read
``XMLHttpRequest, XMLHttpRequest`` to the rules (no bypass) while the origin (aiohttp here)
answered its XHR fragment, which was stored and served to every browser of the page. Now the
rules are read with each repeated field cut to its first and to its last line too, and when the
outcome differs the request is neither looked up nor stored (``AMBIGUOUS-HEADER:<name>``).

CGI, WSGI and Rack origins read ``X_Requested_With`` as ``X-Requested-With`` (both are
``HTTP_X_REQUESTED_WITH``): a field spelled so is another line of the field the rules read.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.rules.test_compile import compile_text
from tests.security.util import Raw, assert_plan, get, head, send_raw

RULES = """
defaults:
  ttl: {200: 5m}
rules:
  - name: ajax skips the cache
    match: {header: {X-Requested-With: {equals: XMLHttpRequest}}}
    bypass: true
"""


async def page(request: web.Request) -> web.Response:
    if request.headers.get("X-Requested-With") == "XMLHttpRequest":  # the first line, as aiohttp reads it
        return web.json_response({"fragment": True})
    return web.Response(text="<html>full page</html>", content_type="text/html")


async def attack_then_browse(proxy: Proxy, *lines: str) -> Raw:
    """The attacker's GET of /page with ``lines`` is a bypass for its ambiguous header; two
    browsers' plain GETs after it get the full page, the second from the cache. The attack's
    answer."""
    attack = await send_raw(proxy, get("/page", *lines))
    assert attack.x_cache == "BYPASS", attack.header("Cache-Status")
    assert "AMBIGUOUS-HEADER:X-Requested-With" in (attack.header("Cache-Status") or "")
    for _ in range(2):
        victim = await send_raw(proxy, get("/page"))
        assert victim.body == b"<html>full page</html>"
    assert victim.x_cache == "HIT"
    return attack


@pytest.mark.parametrize("lines", [
    ["XMLHttpRequest", "XMLHttpRequest"],
    ["XMLHttpRequest", "other"],
    ["other", "XMLHttpRequest"],
])
async def test_a_repeated_header_a_bypass_rule_reads_is_never_stored_for_everyone(
        origin: Origin, make_proxy: MakeProxy, lines: list[str]) -> None:
    origin.route("/page", page)
    proxy = await make_proxy(rules=RULES)
    await attack_then_browse(proxy, *(f"X-Requested-With: {v}" for v in lines))


async def test_a_repeated_header_every_reading_agrees_on_is_cached_as_usual(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", page)
    proxy = await make_proxy(rules=RULES)
    first = await send_raw(proxy, get("/page", "X-Requested-With: a", "X-Requested-With: b"))
    assert first.x_cache == "MISS", first.header("Cache-Status")
    assert (await send_raw(proxy, get("/page"))).x_cache == "HIT"


PLAN_RULES = compile_text("""
    rules:
      - name: xhr
        match: {header: {X-Requested-With: {equals: XMLHttpRequest}}}
        bypass: true
      - name: json
        match: {path: "/api/**", header: {Accept: {regex: "^application/json$"}}}
        ttl: {200: 1m}
        override_origin: true
      - name: tenant
        match: {header: {X-Tenant: acme}}
        ttl: {200: 2m}
        allow_set_cookie: true
      - name: longer
        match: {path: "/long", header: {X-Long: "1"}}
        ttl: {200: 1h}
""")

# (case, target, header lines, the plan's rule name, its bypass detail or None)
CASES: list[tuple[str, str, list[tuple[str, str]], str | None, str | None]] = [
    ("one line", "/a", [("X-Requested-With", "XMLHttpRequest")], "xhr", "RULE-BYPASS:xhr"),
    ("no such field", "/a", [], None, None),
    ("twice, same value: joined reads otherwise", "/a",
     [("X-Requested-With", "XMLHttpRequest")] * 2, None, "AMBIGUOUS-HEADER:X-Requested-With"),
    ("twice, first line holds", "/a", [("X-Requested-With", "XMLHttpRequest"), ("X-Requested-With", "x")],
     None, "AMBIGUOUS-HEADER:X-Requested-With"),
    ("twice, last line holds", "/a", [("X-Requested-With", "x"), ("X-Requested-With", "XMLHttpRequest")],
     None, "AMBIGUOUS-HEADER:X-Requested-With"),
    ("twice, no reading holds", "/a", [("X-Requested-With", "a"), ("X-Requested-With", "b")], None, None),
    ("one line with a comma: read whole by every origin", "/a",
     [("X-Requested-With", "XMLHttpRequest, x")], None, None),
    ("a regex on a repeated Accept: the key rule may differ", "/api/x",
     [("Accept", "application/json"), ("Accept", "text/html")], None, "AMBIGUOUS-HEADER:Accept"),
    ("a repeated field no condition reads", "/a", [("X-Other", "1"), ("X-Other", "2")], None, None),
    ("a repeated field whose condition was not reached", "/other",
     [("Accept", "application/json"), ("Accept", "text/html")], None, None),
    ("the second rule's field repeated", "/a", [("X-Tenant", "acme"), ("X-Tenant", "evil")],
     None, "AMBIGUOUS-HEADER:X-Tenant"),
    ("spelled with _ (CGI/WSGI/Rack read it as the field)", "/a",
     [("X_Requested_With", "XMLHttpRequest")], None, "AMBIGUOUS-HEADER:X-Requested-With"),
    ("spelled half with _", "/a", [("x-requested_with", "XMLHttpRequest")],
     None, "AMBIGUOUS-HEADER:X-Requested-With"),
    ("both spellings, the _ one last", "/a",
     [("X-Requested-With", "a"), ("X_Requested_With", "XMLHttpRequest")], None,
     "AMBIGUOUS-HEADER:X-Requested-With"),
    ("the field holds, its _ spelling does not: the rule's bypass stands", "/a",
     [("X-Requested-With", "XMLHttpRequest"), ("X_Requested_With", "a")], "xhr", "RULE-BYPASS:xhr"),
    ("spelled with _, a value no reading holds", "/a", [("X_Requested_With", "a")], None, None),
    ("a _ name no rule reads", "/a", [("X_Other", "XMLHttpRequest")], None, None),
    # (readings that differ only in how long the page is kept cache the same page alike)
    ("twice, the readings differ only in ttl", "/long", [("X-Long", "1"), ("X-Long", "2")], None, None),
]

PRESENCE_RULES = compile_text("""
    rules:
      - name: signed-in skips the cache
        match: {header: {X-Session: present}}
        bypass: true
      - name: anonymous for long
        match: {path: "/p/**", header: {X-User: absent}}
        ttl: {200: 1h}
        override_origin: true
""")

PRESENCE_CASES: list[tuple[str, str, list[tuple[str, str]], str | None, str | None]] = [
    ("present, spelled with -", "/a", [("X-Session", "1")], "signed-in skips the cache",
     "RULE-BYPASS:signed-in skips the cache"),
    ("present, spelled with _ only", "/a", [("X_Session", "1")], None, "AMBIGUOUS-HEADER:X-Session"),
    ("absent holds", "/p/x", [], "anonymous for long", None),
    ("absent, the field spelled with _", "/p/x", [("X_User", "alice")], "anonymous for long",
     "AMBIGUOUS-HEADER:X-User"),
    ("absent, another _ field", "/p/x", [("X_Other", "1")], "anonymous for long", None),
]


@pytest.mark.parametrize(("case", "target", "lines", "rule", "detail"), PRESENCE_CASES,
                         ids=[c[0] for c in PRESENCE_CASES])
def test_present_and_absent_see_a_field_spelled_with_underscores(
        case: str, target: str, lines: list[tuple[str, str]], rule: str | None, detail: str | None) -> None:
    assert_plan(PRESENCE_RULES, target, lines, rule, detail)


def test_many_ambiguous_fields_the_rules_read_are_a_bypass_at_once() -> None:
    names = [f"X-F{i}" for i in range(12)]
    rules = compile_text("rules:\n" + "".join(
        f"  - {{name: r{i}, match: {{header: {{{n}: {{equals: v}}}}}}, ttl: {{200: 1m}}}}\n"
        for i, n in enumerate(names)))
    lines = [(n, "x") for n in names] * 2
    plan = rules.plan(head("/a", lines))
    assert plan.bypass and plan.bypass_detail == "AMBIGUOUS-HEADER:X-F0"
    # one repeated field every reading agrees on is cached as usual
    assert not rules.plan(head("/a", [("X-F0", "x"), ("X-F0", "y")])).bypass


async def cgi_page(request: web.Request) -> web.Response:
    """An origin that reads fields as CGI, WSGI and Rack do: ``X_Requested_With`` is
    ``HTTP_X_REQUESTED_WITH``, as ``X-Requested-With`` is."""
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in request.headers.items()}
    if environ.get("HTTP_X_REQUESTED_WITH") == "XMLHttpRequest":
        return web.json_response({"fragment": True})
    return web.Response(text="<html>full page</html>", content_type="text/html")


async def test_a_field_spelled_with_underscores_never_stores_the_other_answer_for_everyone(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", cgi_page)
    proxy = await make_proxy(rules=RULES)
    attack = await attack_then_browse(proxy, "X_Requested_With: XMLHttpRequest")
    assert attack.body == b'{"fragment": true}'


@pytest.mark.parametrize(("case", "target", "lines", "rule", "detail"), CASES, ids=[c[0] for c in CASES])
def test_the_rules_read_a_repeated_field_every_way_origins_do(
        case: str, target: str, lines: list[tuple[str, str]], rule: str | None, detail: str | None) -> None:
    assert_plan(PLAN_RULES, target, lines, rule, detail)
