"""A field a rule's key or a response's Vary reads, sent spelled with ``_`` for ``-`` too.

CGI, WSGI, Rack and PHP origins read ``X-Tenant`` and ``X_Tenant`` as one field
(``HTTP_X_TENANT``; the later line wins). ``X-Tenant: acme`` with ``X_Tenant: evil`` was keyed
(``key.headers``) or filed as a variant (``Vary: X-Tenant``) under ``acme`` while such an origin
answered tenant ``evil``'s dashboard, which every ``acme`` client then got from the cache. Now a
keyed field spelled otherwise too is a bypass (``AMBIGUOUS-HEADER:<name>``), a response varying on
one is not stored (the same detail), and such a request never revalidates a stored variant.
The origins are real aiohttp apps reading fields as CGI does; the requests go byte for byte on a
socket.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.httpdate import format_http_date, parse_http_date
from proxy.policy.messages import RequestHead
from proxy.policy.request import Listener, Message, normalise_request
from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Handler, Origin
from tests.rules.test_compile import compile_text
from tests.security.util import assert_plan, get, send_raw

KEYED = """
rules:
  - name: dashboards keyed by tenant
    match: {path: "/dash"}
    key: {headers: [X-Tenant]}
"""


def tenant(fields: CIMultiDictProxy[str]) -> str:
    """The tenant as a CGI-style origin reads it: every field as ``HTTP_`` plus its name upper-cased
    with ``-`` as ``_``, a later line overwriting an earlier one."""
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in fields.items()}
    return environ.get("HTTP_X_TENANT", "none")


def dashboard(*, vary: bool) -> Handler:
    async def page(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "max-age=600", **({"Vary": "X-Tenant"} if vary else {})}
        return web.Response(text=f"dashboard of tenant {tenant(request.headers)}", headers=headers)

    return page


# (the attacker's field lines, the victim's, the page the victim must get)
ATTACKS = {
    "both spellings, the _ one last": (["X-Tenant: acme", "X_Tenant: evil"], ["X-Tenant: acme"], "acme"),
    "both spellings, in other cases": (["x-tenant: acme", "X_TENANT: evil"], ["X-Tenant: acme"], "acme"),
    "the _ spelling alone": (["X_Tenant: evil"], [], "none"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_keyed_field_sent_spelled_with_underscores_too_is_neither_looked_up_nor_stored(
        origin: Origin, make_proxy: MakeProxy, attack: str) -> None:
    lines, victim_lines, victim_tenant = ATTACKS[attack]
    origin.route("/dash", dashboard(vary=False))
    proxy = await make_proxy(rules=KEYED)
    first = await send_raw(proxy, get("/dash", *lines))
    assert first.x_cache == "BYPASS", first.header("Cache-Status")
    assert first.header("Cache-Status") == \
        "cachegate; fwd=bypass; fwd-status=200; detail=AMBIGUOUS-HEADER:x-tenant"
    assert first.body == b"dashboard of tenant evil"
    for _ in range(2):
        victim = await send_raw(proxy, get("/dash", *victim_lines))
        assert victim.body == f"dashboard of tenant {victim_tenant}".encode()
    assert victim.x_cache == "HIT"
    again = await send_raw(proxy, get("/dash", *lines))  # not looked up either
    assert (again.x_cache, again.body) == ("BYPASS", b"dashboard of tenant evil")


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_response_varying_on_a_field_the_request_also_sent_spelled_with_underscores_is_not_stored(
        origin: Origin, make_proxy: MakeProxy, attack: str) -> None:
    lines, victim_lines, victim_tenant = ATTACKS[attack]
    origin.route("/dash", dashboard(vary=True))
    proxy = await make_proxy()
    first = await send_raw(proxy, get("/dash", *lines))
    assert first.x_cache == "MISS", first.header("Cache-Status")
    assert first.header("Cache-Status") == \
        "cachegate; fwd=uri-miss; fwd-status=200; detail=AMBIGUOUS-HEADER:x-tenant"
    assert first.body == b"dashboard of tenant evil"
    victim_page = f"dashboard of tenant {victim_tenant}".encode()
    victim = await send_raw(proxy, get("/dash", *victim_lines))
    assert (victim.x_cache, victim.body) == ("MISS", victim_page)  # stored now: no hit-for-pass
    victim = await send_raw(proxy, get("/dash", *victim_lines))
    assert (victim.x_cache, victim.body) == ("HIT", victim_page)
    # The attacker is served the stored variant, as a client sending the named field alone is.
    again = await send_raw(proxy, get("/dash", *lines))
    assert (again.x_cache, again.body) == ("HIT", victim_page)
    assert origin.count("/dash") == 2


async def test_a_request_with_a_selecting_field_spelled_otherwise_never_revalidates_the_variant(
        origin: Origin, make_proxy: MakeProxy, clock: Clock) -> None:
    """Tenant ``acme``'s page changes; tenant ``evil``'s does not. A revalidation of ``acme``'s
    stale variant sent with ``X_Tenant: evil`` got the origin's 304 about ``evil``'s page, which
    freshened ``acme``'s old page for every ``acme`` client."""
    proxy = await clocked(make_proxy, clock)
    modified = {"acme": clock() - 3600, "evil": clock() - 3600}
    version = {"acme": 1, "evil": 1}

    async def page(request: web.Request) -> web.Response:
        who = tenant(request.headers)
        headers = {"Cache-Control": "max-age=60", "Vary": "X-Tenant", "Date": format_http_date(clock()),
                   "Last-Modified": format_http_date(modified[who])}
        since = parse_http_date(request.headers.get("If-Modified-Since", ""))
        if since is not None and since >= modified[who]:
            return web.Response(status=304, headers=headers)
        return web.Response(text=f"{who} v{version[who]}", headers=headers)

    origin.route("/dash", page)
    assert (await send_raw(proxy, get("/dash", "X-Tenant: acme"))).body == b"acme v1"
    version["acme"], modified["acme"] = 2, clock()
    clock.advance(120)
    attack = await send_raw(proxy, get("/dash", "X-Tenant: acme", "X_Tenant: evil"))
    asked = origin.seen[-1].headers
    assert "If-Modified-Since" not in asked and "If-None-Match" not in asked  # fetched, not revalidated
    assert attack.body == b"evil v1"
    assert "AMBIGUOUS-HEADER:x-tenant" in (attack.header("Cache-Status") or "")
    victim = await send_raw(proxy, get("/dash", "X-Tenant: acme"))
    assert victim.body == b"acme v2", (victim.x_cache, victim.header("Cache-Status"))


PLAN_RULES = compile_text("""
    rules:
      - name: dashboards
        match: {path: "/dash"}
        key: {headers: [X-Tenant, Accept-Language]}
      - name: the same field in a condition
        match: {path: "/acme", header: {X-Tenant: acme}}
        key: {headers: [X-Tenant]}
      - name: tenant pages
        match: {path: "/t/**", header: {X-Tenant: present}}
        key: {headers: [X-Tenant]}
      - name: others
        match: {path: "/**"}
        ttl: {200: 1m}
""")

# (case, target, field lines, the plan's rule name, its bypass detail or None)
PLAN_CASES: list[tuple[str, str, list[tuple[str, str]], str | None, str | None]] = [
    ("the keyed fields as named", "/dash", [("X-Tenant", "acme"), ("Accept-Language", "de")],
     "dashboards", None),
    ("a keyed field twice, one spelling: lines the key keeps apart", "/dash",
     [("X-Tenant", "acme"), ("X-Tenant", "evil")], "dashboards", None),
    ("a keyed field spelled with _ too", "/dash", [("X-Tenant", "acme"), ("X_Tenant", "evil")],
     "dashboards", "AMBIGUOUS-HEADER:x-tenant"),
    ("the second keyed field spelled with _ alone", "/dash", [("accept_language", "de")],
     "dashboards", "AMBIGUOUS-HEADER:accept-language"),
    ("another field spelled with _", "/dash", [("X-Tenant", "acme"), ("X_Other", "1")], "dashboards", None),
    ("a field spelled with _ where no key reads it", "/other", [("X_Tenant", "evil")], "others", None),
    ("a value condition reads the field spelled with _ too: the conditions' readings say so first",
     "/acme", [("X-Tenant", "acme"), ("X_Tenant", "evil")], "the same field in a condition",
     "AMBIGUOUS-HEADER:X-Tenant"),
    ("a presence condition every reading holds: the key's reading says so", "/t/x",
     [("X-Tenant", "acme"), ("X_Tenant", "evil")], "tenant pages", "AMBIGUOUS-HEADER:x-tenant"),
    ("a presence condition, the field as named alone", "/t/x", [("X-Tenant", "acme")], "tenant pages", None),
]


@pytest.mark.parametrize(("case", "target", "lines", "rule", "detail"), PLAN_CASES,
                         ids=[c[0] for c in PLAN_CASES])
def test_a_key_never_reads_a_field_the_request_also_sent_spelled_otherwise(
        case: str, target: str, lines: list[tuple[str, str]], rule: str | None, detail: str | None) -> None:
    assert_plan(PLAN_RULES, target, lines, rule, detail)


def normalised(*lines: tuple[str, str], target: str = "/dash") -> RequestHead:
    msg = Message("GET", target, (1, 1), CIMultiDictProxy(CIMultiDict([("Host", "a.example"), *lines])))
    head = normalise_request(msg, secure=False, trusted=False, listener=Listener("127.0.0.1:80", max_head=4096))
    assert isinstance(head, RequestHead)
    return head


def test_the_normalised_head_says_whether_a_name_holds_an_underscore_and_the_key_trusts_it() -> None:
    """The key asks no more of a request whose names ``normalise_request`` saw without ``_``
    (nearly all: nothing added on the hit path); a keyed name with ``_`` is asked of every one."""
    clean, spelled = normalised(("X-Tenant", "acme")), normalised(("X-Tenant", "acme"), ("X_Tenant", "evil"))
    assert (clean.underscores, spelled.underscores) == (False, True)
    absolute = "http://a.example/dash"  # (the other route through normalise_request)
    assert normalised(("X_Tenant", "evil"), target=absolute).underscores
    assert not normalised(("X-Tenant", "acme"), target=absolute).underscores
    keyed = compile_text("""
        rules:
          - {name: dashes, match: {path: /dash}, key: {headers: [X-Tenant]}}
    """)
    assert not keyed.plan(clean).bypass
    assert keyed.plan(spelled).bypass_detail == "AMBIGUOUS-HEADER:x-tenant"
    underscored = compile_text("""
        rules:
          - {name: underscores, match: {path: /dash}, key: {headers: [X_Tenant]}}
    """)
    assert underscored.plan(clean).bypass_detail == "AMBIGUOUS-HEADER:x_tenant"
    assert not underscored.plan(normalised(("X_Tenant", "acme"))).bypass
