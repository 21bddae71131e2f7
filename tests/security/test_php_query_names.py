"""A query name PHP reads as another: ``?edit.mode=1`` is PHP's ``$_GET['edit_mode']``.

PHP registers a query parameter under its name with leading spaces dropped, ``.`` and `` `` read
as ``_``, and a ``[`` that opens no array index read as ``_`` (``php_register_variable_ex``); an
array ``edit_mode[]`` under ``edit_mode``. A
``bypass`` rule on ``edit_mode: "1"`` did not hold for ``?edit.mode=1`` while a PHP origin
answered its editor form, which was stored and served to the next client of that URL. Now such a
name is another value of the parameter PHP reads it as, and when reading it so decides otherwise
the request is neither looked up nor stored (``AMBIGUOUS-QUERY:<name>``).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.messages import RequestHead
from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.rules.test_compile import compile_text
from tests.security.util import assert_plan, get, send_raw

RULES = """
defaults:
  ttl: {200: 5m}
rules:
  - name: the editor is never cached
    match: {path: /page, query: {edit_mode: "1"}}
    bypass: true
"""


def php_get(query: str) -> dict[str, str]:
    """``$_GET`` as PHP 8 builds it from ``query``, arrays left out (written from PHP's
    main/php_variables.c, apart from the code under test)."""
    out: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        name = name.split("\x00", 1)[0].lstrip(" ")  # a C string: a NUL ends it
        cut = name.find("[")
        if cut >= 0 and "]" in name[cut + 1:]:
            continue  # an array
        if cut >= 0:
            name = name[:cut].replace(".", "_").replace(" ", "_") + "_" + \
                name[cut + 1:].replace(".", "_").replace(" ", "_").replace("[", "_")
        else:
            name = name.replace(".", "_").replace(" ", "_")
        if name:
            out[name] = value  # the last value wins
    return out


async def php_page(request: web.Request) -> web.Response:
    if php_get(request.query_string).get("edit_mode") == "1":
        return web.Response(text="editor form, token for " + request.headers.get("X-Session", "?"))
    return web.Response(text="public page")


@pytest.mark.parametrize("query", ["edit.mode=1", "edit+mode=1", "%20edit%20mode=1", "edit[mode=1",
                                   "edit_mode=0&edit.mode=1", "edit_mode%00x=1", "edit%00=1&edit.mode%00=1"])
async def test_a_name_php_reads_as_a_bypass_rules_parameter_is_never_stored(
        origin: Origin, make_proxy: MakeProxy, query: str) -> None:
    origin.route("/page", php_page)
    proxy = await make_proxy(rules=RULES)
    for who in ("mallory", "alice"):
        reply = await send_raw(proxy, get("/page?" + query, "X-Session: " + who))
        assert reply.body == b"editor form, token for " + who.encode()
        assert reply.x_cache == "BYPASS", reply.header("Cache-Status")
        assert "AMBIGUOUS-QUERY:edit_mode" in (reply.header("Cache-Status") or "")


async def test_a_dotted_name_no_rule_reads_is_cached_as_usual(origin: Origin, make_proxy: MakeProxy) -> None:
    origin.route("/page", php_page)
    proxy = await make_proxy(rules=RULES)
    for _ in range(2):
        reply = await send_raw(proxy, get("/page?utm.source=x&file=a.b.jpg"))
        assert reply.body == b"public page"
    assert reply.x_cache == "HIT"


SEARCH_RULES = """
defaults:
  ttl: {200: 5m}
rules:
  - name: searches with a category are kept longer
    match: {path: /search, query: {category: present}}
    ttl: {200: 1h}
"""


async def test_an_array_a_ttl_rule_reads_is_cached_as_usual(origin: Origin, make_proxy: MakeProxy) -> None:
    """``?category[]=shoes`` is PHP's (and Rails') ``category``: the rule for it only keeps the page
    longer, so every reading caches the same page under the same key. It was a bypass for every
    client (``AMBIGUOUS-QUERY:category``)."""
    origin.route("/search", body="results")
    proxy = await make_proxy(rules=SEARCH_RULES)
    seen = [(await send_raw(proxy, get("/search?category[]=shoes"))).x_cache for _ in range(3)]
    assert seen == ["MISS", "HIT", "HIT"]


NAMES = [
    ("edit_mode", "edit_mode"),
    ("edit.mode", "edit_mode"),
    ("edit mode", "edit_mode"),
    ("  edit.mode", "edit_mode"),  # leading spaces dropped
    ("edit[mode", "edit_mode"),  # a [ that opens no index
    ("a.b[c.d e[f", "a_b_c_d_e_f"),  # after it, ' ', '.' and '[' are '_' too (PHP 8)
    ("edit[", "edit_"),
    ("edit[mode]", "edit"),  # an array, registered under the name before its [
    ("edit[]", "edit"),
    ("edit[ ]", "edit"),
    ("edit.mode[x][y]", "edit_mode"),
    ("[edit", None),  # an empty name: dropped
    ("   ", None),
    ("..Host-x", None),  # made a __Host- prefix: dropped
    ("__Host-x", "__Host-x"),
    ("x]y", "x]y"),
    ("edit_mode\x00x", "edit_mode"),  # a C string to PHP: a NUL ends the name
    ("edit.mode\x00[x]", "edit_mode"),
    ("\x00edit_mode", None),
]


@pytest.mark.parametrize(("name", "php"), NAMES)
def test_php_name_reads_a_query_name_as_php_does(name: str, php: str | None) -> None:
    from proxy.policy.php_names import php_name  # (here: the other tests run without it)

    assert php_name(name) == php


PLAN_RULES = compile_text("""
    rules:
      - name: editor
        match: {query: {edit_mode: "1"}}
        bypass: true
      - name: drafts
        match: {query: {draft_id: present}}
        bypass: true
      - name: feed
        match: {path: "/feed", query: {user_id: absent}}
        ttl: {200: 1m}
        override_origin: true
      - name: searches
        match: {path: "/search", query: {category: present}}
        ttl: {200: 1h}
      - name: tagged
        match: {path: "/shoes", query: {category: shoes}}
        tags: [shoes]
      - name: pages
        match: {path: "/page"}
        ttl: {200: 1m}
""")

# (case, target, the plan's rule name, its bypass detail or None)
CASES: list[tuple[str, str, str | None, str | None]] = [
    ("the name itself", "/page?edit_mode=1", "editor", "RULE-BYPASS:editor"),
    ("a dot", "/page?edit.mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("a space (+)", "/page?edit+mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("a space (%20) and a leading one", "/page?%20edit%20mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("an escaped dot", "/page?edit%2Emode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("a lone [", "/page?edit[mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("PHP's last value is the dotted one", "/page?edit_mode=0&edit.mode=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("Rails' last value holds, PHP's does not", "/page?edit_mode=0&edit_mode=1&edit.mode=0", "pages",
     "AMBIGUOUS-QUERY:edit_mode"),
    ("the first value holds: the rule's bypass stands", "/page?edit_mode=1&edit.mode=0",
     "editor", "RULE-BYPASS:editor"),
    ("a dotted value no reading holds", "/page?edit.mode=0", "pages", None),
    ("an array is the parameter too", "/page?edit_mode[]=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("an array present", "/page?draft.id[x]=7", "pages", "AMBIGUOUS-QUERY:draft_id"),
    ("a dot in a value only", "/page?file=a.jpg&edit_mode=0", "pages", None),
    ("a dotted name no rule reads", "/page?utm.source=x", "pages", None),
    ("present", "/page?draft.id=7", "pages", "AMBIGUOUS-QUERY:draft_id"),
    ("absent", "/feed?user.id=7", "feed", "AMBIGUOUS-QUERY:user_id"),
    ("absent, no such name", "/feed?page.size=7", "feed", None),
    ("a NUL ends PHP's name", "/page?edit_mode%00x=1", "pages", "AMBIGUOUS-QUERY:edit_mode"),
    ("a NUL, the name PHP reads not read by a rule", "/page?utm%00x=1", "pages", None),
    # (readings that differ only in how long the page is kept cache the same page alike)
    ("an array where only the ttl differs", "/search?category[]=shoes", None, None),
    # ... but a ttl of 0 (never from the store) and tags (what a purge finds) are not lifetimes:
    # another client was served a PHP reading's editor form; a tag purge missed the array page.
    ("tags in one reading only", "/shoes?category[]=shoes", None, "AMBIGUOUS-QUERY:category"),
]


@pytest.mark.parametrize(("case", "target", "rule", "detail"), CASES, ids=[c[0] for c in CASES])
def test_the_rules_read_a_query_name_as_php_does_too(
        case: str, target: str, rule: str | None, detail: str | None) -> None:
    assert_plan(PLAN_RULES, target, [], rule, detail)


def test_a_reading_with_a_ttl_of_0_is_not_a_lifetime_only_difference() -> None:
    """A ttl of 0 is Varnish's "never from the cache": ``?edit.mode=1`` (PHP's ``edit_mode``) was
    stored under the defaults' 5 minutes and one client's editor form served to the next."""
    rules = compile_text("""
        defaults: {ttl: {200: 5m}}
        rules:
          - name: editor
            match: {path: "/form", query: {edit_mode: "1"}}
            ttl: {200: 0s}
    """)
    head = RequestHead("GET", "http", "a.example", "/form?edit.mode=1",
                       CIMultiDictProxy(CIMultiDict(Host="a.example")))
    plan = rules.plan(head)
    assert plan.bypass and plan.bypass_detail == "AMBIGUOUS-QUERY:edit_mode", plan
