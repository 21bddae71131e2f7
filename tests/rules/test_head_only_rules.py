"""A rule for HEAD without GET: it may bypass the HEAD or edit its reply, nothing else.

A HEAD that misses fills the GET entry every GET is answered from, so what is looked up and
stored, and how, is the plan of a GET of the same request (``RuleSet._head``). Such a rule
used to decide the HEAD alone, with the defaults: every later rule (a cookie ``bypass``, a
``no_store``, a ``ttl``) was skipped for the fill, and a HEAD with a session cookie stored the
logged-in page for every anonymous GET.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from proxy.cli import main
from tests.harness import Origin, Proxy
from tests.rules.test_cli import write
from tests.rules.test_compile import compile_text, head
from tests.rules.util import settle, ttl

MakeProxy = Callable[..., Awaitable[Proxy]]

HEAD_EDIT_THEN_BYPASS = """
    defaults: {ttl: {200: 5m}}
    rules:
      - name: head-edit
        match: {method: [HEAD]}
        response_headers: {remove: [X-Internal]}
      - name: logged-in users skip the cache
        match: {cookie: {session: present}}
        bypass: true
"""


def echo_cookie(origin: Origin, path: str) -> None:
    """A page that shows whose session rendered it, with a field only the HEAD rule removes."""

    async def page(request: web.Request) -> web.StreamResponse:
        body = json.dumps({"cookie": request.headers.get("Cookie")}).encode()
        return web.Response(body=body, headers={"X-Internal": "1", "Content-Type": "application/json"})

    origin.route(path, page)


# -- through the proxy ------------------------------------------------------------------------


async def test_a_head_with_a_session_is_bypassed_and_stores_nothing_for_the_gets(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules=HEAD_EDIT_THEN_BYPASS)
    echo_cookie(origin, "/account")
    probe = await proxy.request("HEAD", "/account", headers={"Cookie": "session=alice"})
    assert probe.x_cache == "BYPASS"
    assert "RULE-BYPASS:logged-in users skip the cache" in probe.cache_status
    assert "X-Internal" not in probe.headers  # the HEAD rule's edit still applies to its reply
    await settle(proxy)
    anonymous = await proxy.get("/account")
    assert anonymous.x_cache == "MISS", anonymous.cache_status
    assert json.loads(anonymous.body) == {"cookie": None}  # not alice's page
    assert origin.seen[-1].method == "GET" and "Cookie" not in origin.seen[-1].headers


async def test_a_head_under_a_later_no_store_rule_is_not_stored(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        defaults: {ttl: {200: 5m}}
        rules:
          - {name: head-edit, match: {path: "/x/**", method: [HEAD]}, response_headers: {remove: [X-Internal]}}
          - {name: private area, match: {path: "/x/**"}, no_store: true}
    """)
    origin.route("/x/a", body=b"secret", headers={"X-Internal": "1"})
    probe = await proxy.request("HEAD", "/x/a")
    assert "RULE-NO-STORE:private area" in probe.cache_status, probe.cache_status
    assert "X-Internal" not in probe.headers
    await settle(proxy)
    for _ in range(2):
        reply = await proxy.get("/x/a")
        assert reply.x_cache == "MISS" and "RULE-NO-STORE:private area" in reply.cache_status
        assert reply.headers["X-Internal"] == "1"
    assert origin.count("/x/a") == 3


async def test_a_head_only_edit_applies_to_heads_hit_and_miss_and_never_to_gets(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        defaults: {ttl: {200: 5m}}
        rules:
          - name: head-edit
            match: {method: [HEAD]}
            response_headers: {remove: [X-Internal], add: {X-Probe: "1"}}
          - name: pages
            match: {path: "/**"}
            ttl: {200: 1h}
            response_headers: {add: {X-Page: "1"}}
    """)
    origin.route("/p", body=b"page", headers={"X-Internal": "1"})
    miss = await proxy.request("HEAD", "/p")
    assert miss.x_cache == "MISS"
    assert "X-Internal" not in miss.headers and miss.headers["X-Probe"] == "1" and "X-Page" not in miss.headers
    await settle(proxy)
    hit = await proxy.get("/p")  # filled by the HEAD, under the GET's rule: its ttl and its edits
    assert hit.x_cache == "HIT" and hit.body == b"page"
    assert 3590 <= ttl(hit) <= 3600
    assert hit.headers["X-Internal"] == "1" and hit.headers["X-Page"] == "1" and "X-Probe" not in hit.headers
    again = await proxy.request("HEAD", "/p")
    assert again.x_cache == "HIT"
    assert "X-Internal" not in again.headers and again.headers["X-Probe"] == "1" and "X-Page" not in again.headers
    assert origin.count("/p") == 1


async def test_a_head_only_bypass_still_bypasses_heads_and_only_them(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        defaults: {ttl: {200: 5m}}
        rules:
          - {name: probes go through, match: {method: [HEAD]}, bypass: true}
    """)
    origin.route("/p", body=b"page")
    probe = await proxy.request("HEAD", "/p")
    assert probe.x_cache == "BYPASS" and "RULE-BYPASS:probes go through" in probe.cache_status
    assert [(await proxy.get("/p")).x_cache for _ in range(2)] == ["MISS", "HIT"]
    await settle(proxy)
    assert (await proxy.request("HEAD", "/p")).x_cache == "BYPASS"
    assert origin.count("/p") == 3


AMBIGUOUS_ONLY_FOR_HEAD_RULES = """
    defaults: {ttl: {200: 5m}}
    rules:
      - {name: head-v2, match: {method: [HEAD], query: {v: "2"}}, response_headers: {add: {X-Head: v2}}}
      - {name: head-account, match: {method: [HEAD], path: "/account/**"}, response_headers: {add: {X-Head: account}}}
      - {name: head-beta, match: {method: [HEAD], cookie: {beta: "1"}}, response_headers: {add: {X-Head: beta}}}
      - {name: static, match: {path: "/static/**"}, ttl: {200: 1h}}
"""
# Each request reads ambiguously only for what a HEAD-only rule reads: a GET of it is cached.
AMBIGUOUS_ONLY_FOR_HEADS: list[tuple[str, dict[str, str]]] = [("/q?v=1&v=2", {}), ("/static/..;/account/x", {}),
                            ("/c", {"Cookie": "beta=1; beta=2"})]


async def test_a_head_is_a_hit_where_its_get_is_though_a_head_only_rule_reads_it_ambiguously(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A HEAD-only rule's own conditions went through the ambiguity checks: the HEAD was
    bypassed (AMBIGUOUS-QUERY:v, AMBIGUOUS-PATH, AMBIGUOUS-COOKIE:beta) where its GET was a HIT."""
    proxy = await make_proxy(rules=AMBIGUOUS_ONLY_FOR_HEAD_RULES)
    heads = []
    for target, headers in AMBIGUOUS_ONLY_FOR_HEADS:
        origin.route(target.partition("?")[0], body=b"page")
        assert [(await proxy.get(target, headers=headers)).x_cache for _ in range(2)] == ["MISS", "HIT"]
        heads.append((await proxy.request("HEAD", target, headers=headers)).cache_status)
    assert [status.split("; ")[1] for status in heads] == ["hit", "hit", "hit"], heads
    assert [origin.count(target.partition("?")[0]) for target, _ in AMBIGUOUS_ONLY_FOR_HEADS] == [1, 1, 1]


# -- RuleSet.plan -------------------------------------------------------------------------------

RULES = compile_text("""
    defaults:
      ttl: {200: 5m}
      response_headers: {add: {X-Default: "1"}}
    rules:
      - {name: head errors, match: {method: [HEAD], status: [503]}, response_headers: {add: {X-Head-Error: "1"}}}
      - {name: head-edit, match: {path: "/h/**", method: [HEAD]}, response_headers: {remove: [X-Internal]}}
      - {name: head-ccc, match: {path: "/c/**", method: [HEAD]}, client_cache_control: ignore}
      - {name: head-bypass, match: {path: "/b/**", method: [HEAD]}, bypass: true}
      - {name: sessions, match: {cookie: {session: present}}, bypass: true}
      - {name: edit mode, match: {query: {mode: edit}}, bypass: true}
      - {name: private, match: {path: "/h/private/**"}, no_store: true}
      - {name: account, match: {path: "/account/**"}, bypass: true}
      - name: pages
        match: {path: "/**"}
        ttl: {200: 1h}
        override_origin: true
        deception_guard: false
        key: {query: ignore}
        tags: [pages]
        response_headers: {add: {X-Page: "1"}}
""")
HEAD_EDIT = RULES.rules[1].actions.response_headers
HEAD_ERROR = RULES.rules[0].actions.response_headers
PAGE = RULES.rules[-1].actions.response_headers


def test_a_head_is_planned_as_its_get_but_for_the_edits_of_its_own_rule() -> None:
    get, plan = RULES.plan(head("/h/x?a=1")), RULES.plan(head("/h/x?a=1", "HEAD"))
    assert plan.rule is get.rule and plan.rule is not None and plan.rule.name == "pages"
    assert (plan.bypass, plan.key, plan.options, plan.store.options, plan.store.tags, plan.store.no_store) \
        == (get.bypass, get.key, get.options, get.store.options, get.store.tags, get.store.no_store)
    assert get.response_headers is PAGE and plan.response_headers is HEAD_EDIT
    assert [plan.response_headers_for(s, None) for s in (200, 206, 503)] == [HEAD_EDIT, HEAD_EDIT, HEAD_ERROR]
    assert get.response_headers_for(503, None) is PAGE
    stored = plan.for_response(503, None)  # stored as the GET's rule says, not as the HEAD's
    assert (stored.rule, stored.options, stored.tags) == (get.store.rule, get.store.options, get.store.tags)
    assert RULES.plan(head("/h/x?a=1", "HEAD")) is plan  # memoised


def test_a_later_bypass_or_no_store_holds_for_a_head() -> None:
    plan = RULES.plan(head("/h/x", "HEAD", Cookie="session=alice"))
    assert plan.bypass and plan.bypass_detail == "RULE-BYPASS:sessions"
    assert plan.response_headers is HEAD_EDIT
    plan = RULES.plan(head("/h/private/x", "HEAD"))
    assert not plan.bypass and plan.store.no_store and plan.store.no_store_rule == "private"


def test_a_head_goes_through_the_gets_ambiguity_checks() -> None:
    # _reread: the query read as Rails reads it holds the bypass a HEAD-only rule hid.
    assert RULES.plan(head("/h/x?mode=view&mode=edit", "HEAD")).detail == "AMBIGUOUS-QUERY:mode"
    # _read_otherwise: the rules read /static/page.html, a servlet /account, which is bypassed.
    rules = compile_text("""
        rules:
          - {name: head-edit, match: {method: [HEAD]}, response_headers: {remove: [X-Internal]}}
          - {name: account, match: {path: /account}, bypass: true}
          - {name: static, match: {path: "/static/**"}, ttl: 1h, override_origin: true}
    """)
    target = "/account;%2f%2e%2e%2fstatic%2fpage.html"
    get, plan = rules.plan(head(target)), rules.plan(head(target, "HEAD"))
    assert get.bypass and get.bypass_detail == "RULE-BYPASS:account" and get.read_as == "/account"
    assert (plan.bypass, plan.bypass_detail, plan.read_as) == (True, "RULE-BYPASS:account", "/account")
    # _lowered: the origin is asked for the lower-cased path, which a bypass rule holds.
    rules = compile_text("""
        rules:
          - {name: head-edit, match: {method: [HEAD]}, response_headers: {remove: [X-Internal]}}
          - {name: account, match: {path: "/account/**"}, bypass: true}
          - {name: pages, match: {path: "/**"}, key: {lowercase_path: true}}
    """)
    plan = rules.plan(head("/Account/x", "HEAD"))
    assert plan.bypass and plan.bypass_detail == "RULE-BYPASS:account"


def test_a_head_only_bypass_and_client_cache_control_are_the_heads_own() -> None:
    plan = RULES.plan(head("/b/x", "HEAD"))
    assert plan.bypass and plan.bypass_detail == "RULE-BYPASS:head-bypass"
    assert not RULES.plan(head("/b/x")).bypass
    plan, get = RULES.plan(head("/c/x", "HEAD")), RULES.plan(head("/c/x"))
    assert plan.options.client_cache_control == "ignore" and get.options.client_cache_control == "honor"
    assert plan.store == get.store  # no edits of its own: the GET's
    assert plan.rule is get.rule


@pytest.mark.parametrize(("target", "headers"), AMBIGUOUS_ONLY_FOR_HEADS)
def test_what_only_a_head_only_rule_reads_ambiguously_is_no_ambiguity_for_the_head(
        target: str, headers: dict[str, str]) -> None:
    rules = compile_text(AMBIGUOUS_ONLY_FOR_HEAD_RULES)
    get, plan = rules.plan(head(target, **headers)), rules.plan(head(target, "HEAD", **headers))
    assert not get.bypass and not plan.bypass, plan.detail
    assert (plan.rule, plan.key, plan.store, plan.detail) == (get.rule, get.key, get.store, None)


def test_a_head_only_rules_edits_are_those_of_the_rules_own_reading() -> None:
    rules = compile_text(AMBIGUOUS_ONLY_FOR_HEAD_RULES)
    # v=1 first: head-v2 does not hold on the rules' reading, and Rails' v=2 does not bypass.
    plan = rules.plan(head("/q?v=1&v=2", "HEAD"))
    assert not plan.bypass and plan.head_rules == () and plan.response_headers is None
    plan = rules.plan(head("/q?v=2&v=1", "HEAD"))
    assert not plan.bypass and [r.name for r in plan.head_rules] == ["head-v2"]
    assert plan.response_headers is rules.rules[0].actions.response_headers


def test_a_cookie_only_a_head_only_rule_reads_makes_neither_a_get_nor_a_head_ambiguous() -> None:
    """A GET that read some cookie condition was bypassed (AMBIGUOUS-COOKIE:beta) for a cookie
    only a HEAD rule reads, which decides nothing a GET gets."""
    rules = compile_text("""
        rules:
          - {name: head-beta, match: {method: [HEAD], cookie: {beta: "1"}}, response_headers: {add: {X-Head: beta}}}
          - {name: sessions, match: {cookie: {session: present}}, bypass: true}
          - {name: pages, match: {path: "/**"}, ttl: {200: 1h}}
    """)
    for method in ("GET", "HEAD"):
        plan = rules.plan(head("/x", method, Cookie="beta=1; beta=2"))
        assert not plan.bypass and plan.rule is rules.rules[2], (method, plan.detail)
    # A cookie a GET's rule reads still makes both a bypass:
    for method in ("GET", "HEAD"):
        assert rules.plan(head("/x", method, Cookie="session=; session=a")).bypass


def test_a_head_only_bypass_is_decided_on_the_rules_own_reading() -> None:
    """Its bypass keeps only the HEAD's own answer from the cache, and a bypassed HEAD stores
    nothing: another reading of it is no ambiguity, the HEAD is then the GET's."""
    rules = compile_text("""
        rules:
          - {name: live probes, match: {method: [HEAD], query: {live: "1"}}, bypass: true}
          - {name: pages, match: {path: "/**"}, ttl: {200: 1h}}
    """)
    plan = rules.plan(head("/p?live=1&live=0", "HEAD"))
    assert plan.bypass and plan.bypass_detail == "RULE-BYPASS:live probes"
    get, plan = rules.plan(head("/p?live=0&live=1")), rules.plan(head("/p?live=0&live=1", "HEAD"))
    assert not plan.bypass and plan is get and plan.rule is rules.rules[1]


def test_gets_and_other_methods_are_planned_as_before() -> None:
    for target in ("/h/x", "/c/x", "/b/x", "/account/x"):
        for method in ("GET", "POST"):
            plan = RULES.plan(head(target, method))
            assert plan.head_rules == ()
            assert plan.rule is not None and not plan.rule.head_only
    assert RULES.plan(head("/h/x")) is RULES.rules[-1].plan  # the rule's own plan, nothing built


def test_without_rules_for_head_alone_a_head_is_scanned_once_as_a_get() -> None:
    rules = compile_text("""
        rules:
          - {name: pages, match: {path: "/**", method: [GET]}, ttl: {200: 1h}}
    """)
    assert not rules._head_only
    assert rules.plan(head("/x", "HEAD")) is rules.plan(head("/x")) is rules.rules[0].plan


async def test_a_get_that_waits_on_a_heads_fill_gets_the_gets_edits(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - {name: head-edit, match: {method: [HEAD]}, response_headers: {remove: [X-Internal], add: {X-Probe: "1"}}}
          - {name: pages, match: {path: "/**"}, ttl: {200: 1h}, response_headers: {add: {X-Page: "1"}}}
    """)
    origin.route("/slow", body=b"page", headers={"X-Internal": "1"}, delay=0.3)
    probe, get = await asyncio.gather(proxy.request("HEAD", "/slow"), proxy.get("/slow"))
    assert origin.count("/slow") == 1  # one fill, led by either
    assert "X-Internal" not in probe.headers and probe.headers["X-Probe"] == "1" and "X-Page" not in probe.headers
    assert get.body == b"page"
    assert get.headers["X-Internal"] == "1" and get.headers["X-Page"] == "1" and "X-Probe" not in get.headers


def test_cachegate_explain_says_a_head_only_rule_edits_the_heads_reply_and_the_next_rule_decides(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its "rules in order" list said the HEAD-only rule wins and the bypass after it is not
    reached, while the bypass decides the HEAD."""
    config = write(tmp_path, HEAD_EDIT_THEN_BYPASS)
    assert main(["explain", "--config", config, "-X", "HEAD", "http://shop.example/account",
                 "-H", "Cookie: session=alice"]) == 0
    out = capsys.readouterr().out
    assert "RULE-BYPASS:logged-in users skip the cache" in out
    assert "rules.yaml:3): request conditions hold -> edits the HEAD's reply only (a HEAD is cached as a GET of it)" in out
    assert "rules.yaml:6): request conditions hold -> wins" in out


def test_cachegate_explain_lists_later_head_only_rules_as_not_reached(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A HEAD-only edit rule met first: the HEAD-only rules after it (a bypass among them) are
    not reached (``RuleSet._head`` takes the first), and the GET rules decide. The list named
    the later HEAD-only bypass the winner and the GET rule that decided "not reached"."""
    config = write(tmp_path, """
        defaults: {ttl: {200: 5m}}
        rules:
          - name: head edits one
            match: {method: [HEAD]}
            response_headers: {add: {X-Head1: "1"}}
          - name: head bypass
            match: {method: [HEAD]}
            bypass: true
          - name: head edits two
            match: {method: [HEAD]}
            response_headers: {add: {X-Head2: "1"}}
          - name: static
            match: {path: "/hh/**"}
            ttl: {200: 1h}
    """)
    assert main(["explain", "--config", config, "-X", "HEAD", "http://shop.example/hh/x"]) == 0
    out = capsys.readouterr().out
    roles = [line.split(" -> ", 1)[1] for line in out.splitlines() if " -> " in line]
    assert roles == ["edits the HEAD's reply only (a HEAD is cached as a GET of it)",
                     "not reached: an earlier HEAD-only rule edits the HEAD's reply",
                     "not reached: an earlier HEAD-only rule edits the HEAD's reply",
                     "wins"], out
    assert "request-time rule   'static'" in out
