"""GET/POST /explain: the whole decision trace for a request, from the running rules and store."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from proxy.config import Overrides
from proxy.explain import ExplainRequest, request_head
from proxy.explain import explain as explain_lines
from proxy.web.server import install_reloader
from tests.admin.util import absolute, js, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.rules.util import shift_clock
from tests.security.util import send_raw

RULES = """
rules:
  - name: logged-in users
    match: {cookie: {session: present}}
    bypass: true
  - name: search keyed by q
    match: {path: /search}
    key: {query: {include: [q]}, headers: [Accept-Language]}
  - name: api errors
    match: {path: "/api/**", status: [500, 503]}
    no_store: true
  - name: static
    match: {path: "/static/**"}
    ttl: {200: 1h}
    tags: [assets]
"""


@pytest.fixture
async def ruled(origin: Origin, make_proxy: MakeProxy) -> Proxy:
    proxy = await make_proxy(rules=RULES)
    await proxy.get("/")  # a request names the listener's host: a host it serves
    return proxy


async def explain(proxy: Proxy, path: str, **params: Any) -> Any:
    query = "&".join(f"{k}={quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in params.items())
    reply = await proxy.admin("GET", f"/explain?url={quote(absolute(proxy, path))}" + (f"&{query}" if query else ""))
    assert reply.status == 200, reply.body
    return js(reply)


@pytest.mark.parametrize(("cc", "stale"), [
    ("max-age=60, must-revalidate, stale-if-error=60", False),
    ("max-age=60, no-cache, stale-while-revalidate=30", False),
    ("max-age=60", True),
])
async def test_a_stored_variants_stale_windows_are_those_that_apply(
        origin: Origin, make_proxy: MakeProxy, cc: str, stale: bool) -> None:
    """The variant's freshness said stale_if_error: 3600 beside may_serve_stale: false (the
    storability beside it said 0): a stale hour the proxy never serves."""
    proxy = await make_proxy(rules="defaults: {stale_if_error: 1h, stale_while_revalidate: 10s}\nrules: []\n")
    await proxy.get("/")
    origin.route("/w", body=b"w", headers={"Cache-Control": cc})
    await proxy.get("/w")
    await settle(proxy)
    [variant] = (await explain(proxy, "/w"))["stored"]
    f = variant["freshness"]
    assert f["may_serve_stale"] is stale
    windows = (f["stale_if_error"], f["stale_while_revalidate"])
    assert windows == ((3600, 10) if stale else (0, 0)), f
    assert windows == (variant["storability"]["stale_if_error"],
                       variant["storability"]["stale_while_revalidate"]), variant


async def test_a_fresh_entry_is_a_hit_and_the_trace_says_which_directive_decided(
        origin: Origin, ruled: Proxy) -> None:
    origin.route("/page", body=b"p", headers={"Cache-Control": "public, s-maxage=120, max-age=10",
                                             "Surrogate-Key": "pages"})
    await ruled.get("/page")
    await settle(ruled)
    before = origin.count("/page")
    trace = await explain(ruled, "/page")
    assert origin.count("/page") == before  # the origin was not asked
    assert trace["rule"] is None
    assert trace["cache_key"] == absolute(ruled, "/page")
    [variant] = trace["stored"]
    assert variant["selected"] and variant["tiers"] == ["memory", "disk"]
    assert variant["tags"] == ["pages"]
    assert variant["freshness"]["source"] == "s-maxage"
    assert variant["freshness"]["decided_by"] == "s-maxage=120 in cache-control"
    assert variant["freshness"]["must_revalidate"] is True  # s-maxage: never served stale
    assert variant["freshness"]["may_serve_stale"] is False
    assert (variant["storability"]["may_serve_stale"], variant["storability"]["stale_if_error"]) == (False, 0)
    assert variant["storability"]["stored"] is True
    assert variant["storability"]["directives"] == "public, s-maxage=120, max-age=10"
    decision = trace["decision"]
    assert (decision["action"], decision["x_cache_status"]) == ("serve", "HIT")
    assert decision["cache_status"].startswith("cachegate; hit; ttl=")
    # What the trace predicts is what the proxy does.
    assert (await ruled.get("/page")).x_cache == "HIT"


async def test_a_stale_entry_with_a_validator_is_revalidated(origin: Origin, ruled: Proxy) -> None:
    origin.route("/old", body=b"o", headers={"Cache-Control": "max-age=1, stale-if-error=600", "ETag": '"v1"'})
    await ruled.get("/old")
    await settle(ruled)
    shift_clock(ruled, 30)
    decision = (await explain(ruled, "/old"))["decision"]
    assert decision["action"] == "revalidate" and decision["fwd"] == "stale"
    assert "If-None-Match" in decision["why"] and "stale-if-error" in decision["why"]
    assert decision["x_cache_status"] == "REVALIDATED"


async def test_a_full_fetch_of_a_stored_response_says_why_it_is_not_a_revalidation(
        origin: Origin, ruled: Proxy) -> None:
    """A client's no-cache on a response stored with an ETag is a full fetch because
    client_cache_control is honor (the default), not for want of a validator, which it has (that
    was the reason given for every such full fetch); with none, or a field spelled otherwise,
    the reason is that one. What the origin is then sent agrees."""
    origin.route("/tagged", body=b"t", headers={"Cache-Control": "max-age=60", "ETag": '"t1"'})
    origin.route("/bare", body=b"b", headers={"Cache-Control": "max-age=60"})
    origin.route("/tenant", body=b"v", headers={"Cache-Control": "max-age=60", "ETag": '"v1"', "Vary": "X-Tenant"})
    await ruled.get("/tagged")
    await ruled.get("/bare")
    await ruled.get("/tenant", headers={"X-Tenant": "acme"})
    await settle(ruled)

    reload = (await explain(ruled, "/tagged", headers={"Cache-Control": "no-cache"}))["decision"]
    assert (reload["action"], reload["fwd"]) == ("forward", "request")
    assert "client_cache_control is honor" in reload["why"] and "no validator" not in reload["why"], reload
    before = len(origin.seen)
    assert (await ruled.get("/tagged", headers={"Cache-Control": "no-cache"})).x_cache == "MISS"
    assert [s.headers.get("If-None-Match") for s in origin.seen[before:]] == [None]  # unconditional

    assert (await explain(ruled, "/tagged", headers={"Cache-Control": "max-age=0"}))["decision"]["action"] \
        == "revalidate"
    bare = (await explain(ruled, "/bare", headers={"Cache-Control": "max-age=0"}))["decision"]
    assert (bare["action"], bare["fwd"]) == ("forward", "request")
    assert "it has no validator" in bare["why"], bare

    spelled = (await explain(ruled, "/tenant", headers={"Cache-Control": "max-age=0", "X-Tenant": "acme",
                                                        "X_Tenant": "evil"}))["decision"]
    assert (spelled["action"], spelled["fwd"]) == ("forward", "request")
    assert "x-tenant under another spelling" in spelled["why"] and "no validator" not in spelled["why"], spelled


async def test_a_vary_miss_names_the_header_that_differs(origin: Origin, ruled: Proxy) -> None:
    origin.route("/v", body=b"v", headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})
    await ruled.get("/v", headers={"Accept-Language": "de"})
    await settle(ruled)
    trace = await explain(ruled, "/v", headers={"Accept-Language": "fr"})
    assert trace["decision"]["fwd"] == "vary-miss"
    assert "accept-language: stored 'de', request 'fr'" in trace["decision"]["why"]
    assert trace["stored"][0]["vary_matches"] is False
    hit = await explain(ruled, "/v", headers={"Accept-Language": "de"})
    assert hit["decision"]["x_cache_status"] == "HIT"


async def test_a_vary_field_the_storing_request_lacked_is_null_not_a_newline(origin: Origin, ruled: Proxy) -> None:
    """The key's marker for an absent field (a newline) showed through as ``"\\n"``."""
    origin.route("/gz", body=b"z", headers={"Cache-Control": "max-age=60", "Vary": "Accept-Encoding"})
    host = ruled.url.removeprefix("http://")
    assert (await send_raw(ruled, f"GET /gz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())).status == 200
    await settle(ruled)
    trace = await explain(ruled, "/gz", headers={"Accept-Encoding": "gzip"})
    assert trace["stored"][0]["vary"] == {"accept-encoding": None}
    assert "accept-encoding: stored none, request 'gzip'" in trace["decision"]["why"]
    listed = js(await ruled.admin("GET", "/cache?url=" + quote(absolute(ruled, "/gz"))))
    assert [v["vary"] for v in listed["variants"]] == [{"accept-encoding": None}]


async def test_rules_key_and_bypass_are_explained(origin: Origin, ruled: Proxy) -> None:
    trace = await explain(ruled, "/search?q=shoe&utm=x", headers={"Accept-Language": "de"})
    assert trace["rule"]["name"] == "search keyed by q" and trace["rule"]["where"].endswith("rules.yaml:6")
    assert trace["cache_key"].startswith(absolute(ruled, "/search?q=shoe"))
    assert "utm" not in trace["cache_key"]
    assert trace["key_changes"] == ["query only q"]
    assert trace["decision"]["fwd"] == "uri-miss"
    assert [r["holds"] for r in trace["rules"]] == [False, True, False, False]
    assert trace["rules"][1]["role"] == "wins"
    assert "session" in trace["rules"][0]["why"]
    bypassed = await explain(ruled, "/search?q=x", headers={"Cookie": "session=1"})
    assert bypassed["bypass"] is True and bypassed["cache_key"] is None
    assert bypassed["decision"]["cache_status"] == 'cachegate; fwd=bypass; detail="RULE-BYPASS:logged-in users"'


async def test_a_post_body_can_ask_what_a_response_would_do(origin: Origin, ruled: Proxy) -> None:
    url = absolute(ruled, "/api/orders")
    reply = await ruled.admin("POST", "/explain", json={
        "url": url, "headers": {"Authorization": "Bearer t"}, "status": [200, 503],
        "response_headers": {"Cache-Control": "private, max-age=60"}})
    assert reply.status == 200, reply.body
    ok, error = js(reply)["if_fetched"]
    assert (ok["stored"], ok["detail"]) == (False, "PRIVATE")
    assert (error["stored"], error["detail"], error["store_rule"]["name"]) == (False, "RULE-NO-STORE:api errors",
                                                                            "api errors")
    public = js(await ruled.admin("POST", "/explain", json={
        "url": url, "headers": {"Authorization": "Bearer t"}, "response_headers": {"Cache-Control": "public, max-age=60"}}))
    [fetched] = public["if_fetched"]
    assert fetched["stored"] is True and "public in cache-control allows storing it" in fetched["why"]
    static = js(await ruled.admin("POST", "/explain", json={"url": absolute(ruled, "/static/a.js"), "status": 200}))
    [asset] = static["if_fetched"]
    assert asset["freshness_source"] == "rule" and asset["lifetime"] == 3600 and asset["tags"] == ["assets"]
    assert "static" in asset["freshness_decided_by"]


async def test_a_directive_that_refuses_storing_is_blamed_on_the_field_it_came_from(ruled: Proxy) -> None:
    """A targeted field (RFC 9213) overrides Cache-Control: its no-store was blamed on a
    Cache-Control that said max-age=500."""
    url = absolute(ruled, "/page")
    targeted = js(await ruled.admin("POST", "/explain", json={
        "url": url, "response_headers": {"Cache-Control": "max-age=500", "CDN-Cache-Control": "No-Store"}}))
    [fetched] = targeted["if_fetched"]
    assert (fetched["stored"], fetched["detail"], fetched["directives_from"]) == (False, "NO-STORE",
                                                                                 "cdn-cache-control")
    assert fetched["why"] == "the origin sent CDN-Cache-Control: no-store"
    plain = js(await ruled.admin("POST", "/explain", json={
        "url": url, "response_headers": {"cache-control": "private"}}))
    assert plain["if_fetched"][0]["why"] == "the origin sent cache-control: private (never stored by a shared cache)"


async def test_methods_that_are_never_cached_and_soft_purged_entries(origin: Origin, ruled: Proxy) -> None:
    posted = await explain(ruled, "/form", method="POST")
    assert posted["decision"]["fwd"] == "method" and "invalidates" in posted["decision"]["why"]
    origin.route("/s", body=b"s", headers={"Cache-Control": "max-age=600"})
    await ruled.get("/s")
    await settle(ruled)
    await ruled.admin("POST", "/purge", json={"urls": [absolute(ruled, "/s")], "soft": True})
    trace = await explain(ruled, "/s")
    assert trace["stored"][0]["soft_purged"] is True
    assert trace["decision"]["x_cache_status"] == "UPDATING"
    assert trace["decision"]["cache_status"].endswith("detail=SOFT-PURGED")


@pytest.mark.parametrize("query, message", [
    ("", "give the URL"),
    ("url=/relative", "absolute http"),
    ("url=http://h/&bogus=1", "unknown parameter 'bogus'"),
    ("url=http://h/&url=http://h/x", "given twice"),
    ("url=http://h/&headers=notjson", "'headers' must be a JSON object"),
    ("url=http://h/&headers=[1]", "'headers' must be a JSON object"),
    ("url=http://h/&headers={\"A\": 1}", "must map to a string"),
    ("url=http://h/&status=999", "'status' must be an HTTP status"),
    # Digits to str.isdigit(), not to int(): a 400, not an internal error.
    ("url=http://h/&status=%C2%B2", "'status' must be an HTTP status"),
    ("url=http://h/&status=%E2%91%A0%E2%91%A1", "'status' must be an HTTP status"),
    ("url=http://h/&status=%D9%A2%D9%A0%D9%A0", "'status' must be an HTTP status"),
    ("url=http://h/&method=G%20T", "'method' must be a method name"),
    ("url=http://h/&method=CONNECT", "the proxy answers 405 to CONNECT"),
    ("url=http://unknown.example/", "does not serve host 'unknown.example'"),
])
async def test_bad_explain_requests_get_400(ruled: Proxy, query: str, message: str) -> None:
    query = query.replace("http://h/", absolute(ruled, "/"))
    reply = await ruled.admin("GET", "/explain?" + query)
    assert reply.status == 400
    assert message in js(reply)["error"]


@pytest.mark.parametrize("field, value, message", [
    ("method", "\uff27\uff25\uff34", "'method' must be a method name like GET: a token of ASCII"),  # full-width
    ("method", "G(T", "'method' must be a method name like GET"),
    ("method", "", "'method' must be a method name like GET"),
    ("method", "get", "the proxy answers 501 to the method 'get', which its HTTP parser does not implement "
                      "(methods are case-sensitive: GET is another method)"),
    ("method", "BREW", "the proxy answers 501 to the method 'BREW'"),
    # The parser, fed a whole CONNECT, switched to tunnelling and called its absent protocol: a 500.
    ("method", "CONNECT", "the proxy answers 405 to CONNECT (a reverse proxy opens no tunnels)"),
    # What the listener answers it (400: the start of HTTP/2's preface), not 501.
    ("method", "PRI", "the proxy answers 400 to the method 'PRI': its HTTP parser takes it for the "
                      "start of an HTTP/2 connection preface"),
    ("headers", {"X\u0000A": "v"}, "'headers': 'X\\x00A' is not a field name"),
    ("headers", {"X(": "v"}, "'headers': 'X(' is not a field name"),
    ("headers", {"X-\u00e9": "v"}, "is not a field name"),
    ("headers", {"": "v"}, "'headers': '' is not a field name"),
    ("headers", {"X-A": "a\u0000b"}, "the value of 'X-A' holds '\\x00'"),
    ("response_headers", {"Cache Control": "max-age=1"}, "'response_headers': 'Cache Control' is not a field name"),
])
async def test_explain_refuses_requests_no_client_could_send(ruled: Proxy, field: str, value: object,
                                                             message: str) -> None:
    """What the proxy's parser refuses (or answers 501 itself) is not explained as if served."""
    reply = await ruled.admin("POST", "/explain", json={"url": absolute(ruled, "/"), field: value})
    assert reply.status == 400 and message in js(reply)["error"], reply.body
    reply = await ruled.admin("POST", "/explain", json={"url": absolute(ruled, "/"), "method": "PROPFIND",
                                                        "headers": {"X-Odd_Name!": "v"}})
    assert reply.status == 200, reply.body  # tokens the parser takes


async def test_a_bad_post_body_gets_400(ruled: Proxy) -> None:
    for body, message in ((b"{", "invalid JSON"), (b"[]", "JSON object"),
                          (b'{"url": "http://x/", "extra": 1}', "unknown field(s): extra"),
                          ('{"url": "http://x/", "status": "\u00b2"}'.encode(), "'status' must be"),
                          ('{"url": "http://x/", "status": ["200", "\u0662\u0660\u0660"]}'.encode(),
                           "'status' must be")):
        reply = await ruled.admin("POST", "/explain", data=body)
        assert (reply.status, message in js(reply)["error"]) == (400, True), reply.body


async def test_a_request_asking_to_upgrade_is_explained_as_the_proxy_answers_it(ruled: Proxy) -> None:
    """Upgrade is hop-by-hop, dropped, and the request answered as HTTP/1.1: explained so (the
    method check feeds the parser no fields, so none switches it to another protocol)."""
    reply = await ruled.admin("POST", "/explain", json={
        "url": absolute(ruled, "/"), "headers": {"Upgrade": "websocket", "Connection": "Upgrade"}})
    assert reply.status == 200, reply.body


async def test_a_get_with_a_body_is_explained_as_the_proxy_passes_it(origin: Origin, ruled: Proxy) -> None:
    origin.route("/_search", body=b"r", headers={"Cache-Control": "max-age=60"})
    await ruled.get("/_search")
    await settle(ruled)
    url = absolute(ruled, "/_search")
    trace = js(await ruled.admin("POST", "/explain", json={
        "url": url, "headers": {"Content-Type": "application/json", "Content-Length": "14"}, "status": 200}))
    assert trace["request"]["body"] is True and trace["cache_key"] is None and trace["stored"] == []
    assert "if_fetched" not in trace
    decision = trace["decision"]
    assert (decision["action"], decision["x_cache_status"]) == ("forward", "BYPASS")
    assert decision["cache_status"] == "cachegate; fwd=bypass; detail=REQUEST-BODY"
    # What the trace predicts is what the proxy does, though the URL's answer is stored.
    reply = await ruled.get("/_search", data=b'{"q": "alpha"}', headers={"Content-Type": "application/json"})
    assert reply.x_cache == "BYPASS" and reply.cache_status.endswith("detail=REQUEST-BODY")
    plain = js(await ruled.admin("POST", "/explain", json={"url": url, "headers": {"Content-Length": "0"}}))
    assert plain["request"]["body"] is False and plain["decision"]["action"] == "serve"


@pytest.mark.parametrize("fields", [
    [("Content-Length", "abc")],
    [("Content-Length", "-1")],
    [("Content-Length", "5, 5")],
    [("Content-Length", "+5")],
    [("Content-Length", "")],
    [("Content-Length", "18446744073709551616")],
    [("Content-Length", "5"), ("Content-Length", "5")],
    [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],   # "both"
    [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],   # llhttp names the length
    [("Content-Length", "5"), ("Transfer-Encoding", "gzip")],      # 400 before the coding's 501
    [("Content-Length", "abc"), ("Transfer-Encoding", "gzip")],
])
async def test_explain_refuses_a_framing_the_proxy_answers_400_with_the_proxy_s_words(
        ruled: Proxy, fields: list[tuple[str, str]]) -> None:
    """A GET with ``Content-Length: abc`` (or ``-1``, ``5, 5``, or beside ``Transfer-Encoding``)
    was explained as a lookup or as REQUEST-BODY, while the proxy's parser answers it 400: now
    explain (GET /explain, POST /explain, ``cachegate explain``) says the proxy refuses it, with
    the status and the reason the proxy's answer gives."""
    sent = "".join(f"{k}: {v}\r\n" for k, v in fields)
    head = f"GET /p HTTP/1.1\r\nHost: {ruled.url.removeprefix('http://')}\r\n{sent}\r\n"
    body = "0\r\n\r\n" if any(k == "Transfer-Encoding" for k, _ in fields) else "abcde"
    answer = await send_raw(ruled, (head + body).encode())
    assert answer.status == 400 and answer.body.startswith(b"400 Bad Request: malformed request: "), answer
    reason = answer.body.decode().removeprefix("400 Bad Request: ").strip()
    said = f"the proxy would refuse this request with 400: {reason}"
    headers: dict[str, list[str]] = {}
    for k, v in fields:
        headers.setdefault(k, []).append(v)
    reply = await ruled.admin("POST", "/explain", json={"url": absolute(ruled, "/p"), "headers": headers})
    assert (reply.status, js(reply)["error"]) == (400, said), reply.body
    with pytest.raises(ValueError, match=re.escape(said)):  # (`cachegate explain` reads it so)
        request_head(ExplainRequest(absolute(ruled, "/p"), "GET", tuple(fields)))


@pytest.mark.parametrize("value", ["5", " 5\t", "05", "0"])
async def test_a_content_length_the_parser_takes_is_explained(ruled: Proxy, value: str) -> None:
    reply = await ruled.admin("POST", "/explain", json={"url": absolute(ruled, "/p"),
                                                        "headers": {"Content-Length": value}})
    assert reply.status == 200, reply.body


async def test_an_ipv6_url_is_explained_under_the_key_every_spelling_shares(origin: Origin, ruled: Proxy) -> None:
    origin.route("/six", body=b"6", headers={"Cache-Control": "max-age=120"})
    port = ruled.url.rpartition(":")[2]
    await ruled.raw("GET", "/six", host=f"[0:0::1]:{port}")
    await settle(ruled)
    url = f"http://[0000:0::0001]:{port}/six"
    reply = await ruled.admin("GET", f"/explain?url={quote(url)}")
    trace = js(reply)
    assert trace["cache_key"] == f"http://[::1]:{port}/six"
    assert trace["decision"]["x_cache_status"] == "HIT"


async def reload_rules(proxy: Proxy, rules: str) -> None:
    """Write the proxy's rules file anew and ``POST /reload`` it."""
    Path(proxy.config_path).with_name("rules.yaml").write_text(rules)
    reply = await proxy.admin("POST", "/reload")
    assert reply.status == 200, reply.body


def here(proxy: Proxy, text: str) -> str:
    """``text`` with the rules file's directory left out of its FILE:LINE."""
    return text.replace(f"{Path(proxy.config_path).parent}/", "")


async def test_a_stored_rule_ttl_is_said_as_the_rules_at_store_time_not_as_the_rule_matching_now(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """An entry stored under rule 'rl' (1h) kept its 3600 s across reloads, but its decided_by
    named whichever rule matched now: "a ttl from rule 'rl-short'" (5s), one with no_store and
    no ttl at all, "the rules' defaults" with no rules."""
    proxy = await make_proxy(rules='rules:\n  - {name: rl, match: {path: "/rl/**"}, ttl: {200: 1h}}\n')
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    origin.route("/rl/a", body=b"a")
    await proxy.get("/rl/a")
    await settle(proxy)

    async def decided_by() -> str:
        [variant] = (await explain(proxy, "/rl/a"))["stored"]
        assert variant["freshness"]["lifetime"] == 3600
        return here(proxy, variant["freshness"]["decided_by"])

    at_store = "a ttl from the rules at store time (3600 s)"
    assert await decided_by() == f"{at_store}; the rules now give 3600 s (a ttl from rule 'rl' (rules.yaml:2))"
    await reload_rules(proxy, 'rules:\n  - {name: rl-short, match: {path: "/rl/**"}, ttl: {200: 5s}}\n')
    assert await decided_by() == f"{at_store}; the rules now give 5 s (a ttl from rule 'rl-short' (rules.yaml:2))"
    await reload_rules(proxy, 'rules:\n  - {name: rl-nostore, match: {path: "/rl/**"}, no_store: true}\n')
    assert await decided_by() == f"{at_store}; the rules now do not store it (RULE-NO-STORE:rl-nostore)"
    await reload_rules(proxy, "rules: []\n")
    assert await decided_by() == f"{at_store}; the rules now do not store it (NO-FRESHNESS)"


async def test_a_ttl_the_rule_does_not_set_is_the_defaults(origin: Origin, make_proxy: MakeProxy) -> None:
    """A rule with no ttl of its own, whose 5m came from defaults.ttl, was named as its source."""
    proxy = await make_proxy(rules='defaults: {ttl: {200: 5m}}\n'
                                   'rules:\n  - {name: r1b, match: {path: "/r1b/**"}, tags: [t]}\n'
                                   '  - {name: own, match: {path: "/own/**"}, ttl: {200: 1m}}\n')
    await proxy.get("/")
    for path in ("/r1b/a", "/own/a"):
        origin.route(path, body=b"x")
        await proxy.get(path)
    await settle(proxy)
    [variant] = (await explain(proxy, "/r1b/a", status=200))["stored"]
    assert variant["storability"]["freshness_decided_by"] == "a ttl from the rules' defaults"
    assert variant["freshness"]["decided_by"] == ("a ttl from the rules at store time (300 s); the rules now "
                                                  "give 300 s (a ttl from the rules' defaults)")
    trace = await explain(proxy, "/own/a", status=200)
    assert here(proxy, trace["if_fetched"][0]["freshness_decided_by"]) == "a ttl from rule 'own' (rules.yaml:4)"


async def test_a_lifetime_shortened_by_ttl_jitter_is_not_said_as_if_the_rules_had_changed(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """57.5542 s "at store time; the rules now give 100 s" read as a reload that never was: the
    jitter is said beside it (the entry does not keep its draw: a reload may be why too)."""
    proxy = await make_proxy(rules='rules:\n  - {name: j, match: {path: "/j/**"}, ttl: {200: 100s}, '
                                   'ttl_jitter: 0.5}\n')
    await proxy.get("/")
    origin.route("/j/a", body=b"j")
    await proxy.get("/j/a")
    await settle(proxy)
    [variant] = (await explain(proxy, "/j/a"))["stored"]
    lifetime = variant["freshness"]["lifetime"]
    assert 50 <= lifetime <= 100
    assert variant["storability"]["ttl_jitter"] == 0.5
    assert here(proxy, variant["freshness"]["decided_by"]) == (
        f"a ttl from the rules at store time ({f'{lifetime:.1f}'.removesuffix('.0')} s); the rules now give 100 s, "
        "less up to 50% "
        "by ttl_jitter (a ttl from rule 'j' (rules.yaml:2))")


async def test_a_bypass_shows_what_it_hides_under_the_key_without_it(origin: Origin, make_proxy: MakeProxy) -> None:
    """After a reload added a bypass rule, /explain said "stored": [] while GET /cache listed the
    variant, which is served again once the bypass goes."""
    proxy = await make_proxy(rules='rules:\n  - {name: rl, match: {path: "/rl/**"}, ttl: {200: 1h}}\n')
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    origin.route("/rl/q", body=b"q")
    await proxy.get("/rl/q")
    await settle(proxy)
    await reload_rules(proxy, 'rules:\n  - {name: rl-bypass, match: {path: "/rl/**"}, bypass: true}\n'
                              '  - {name: rl, match: {path: "/rl/**"}, ttl: {200: 1h}}\n')
    trace = await explain(proxy, "/rl/q")
    assert trace["bypass"] is True and trace["cache_key"] is None
    assert trace["hidden_key"] == absolute(proxy, "/rl/q")
    [variant] = trace["stored"]
    assert variant["hidden_by_bypass"] is True and variant["decision"] == "forward"
    assert variant["storability"]["stored"] is True  # under 'rl', the plan without the bypass
    assert here(proxy, variant["freshness"]["decided_by"]).endswith("(a ttl from rule 'rl' (rules.yaml:3))")
    assert trace["decision"]["action"] == "forward"
    assert "1 variant(s) and 0 part(s) are stored under the key this URL has without the bypass " \
           "('rl' (rules.yaml:3))" in here(proxy, trace["decision"]["why"])
    assert (await proxy.get("/rl/q")).headers["X-Cache-Status"] == "BYPASS"
    lines = explain_lines(proxy.runtime.settings.rules, ExplainRequest(absolute(proxy, "/rl/q")), 0.0)
    assert any(line.startswith(f"  hidden key          {absolute(proxy, '/rl/q')}: what is stored under the "
                               "key this URL has without the bypass") for line in lines), lines
    plain = await explain(proxy, "/other")
    assert plain["hidden_key"] is None and "hidden_by_bypass" not in str(plain["stored"])


async def test_what_a_bypass_hides_is_not_said_to_come_back_when_the_url_stays_bypassed_without_it(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A URL whose query origins read two ways stays bypassed (AMBIGUOUS-QUERY) once a reload
    takes the rule's bypass away: explain said its stored variant was "served again once it goes"."""
    proxy = await make_proxy(rules='rules:\n  - {name: rl, match: {path: "/rl/**"}, ttl: {200: 1h}}\n')
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    origin.route("/rl/q", body=b"q")
    path = "/rl/q?mode=view&mode=edit"
    assert (await proxy.get(path)).headers["X-Cache-Status"] == "MISS"  # (no rule reads mode yet)
    await settle(proxy)
    edit_no_store = '  - {name: edit, match: {query: {mode: edit}}, no_store: true}\n'
    await reload_rules(proxy, 'rules:\n  - {name: rl-bypass, match: {path: "/rl/**"}, bypass: true}\n'
                       + edit_no_store)
    trace = await explain(proxy, path)
    assert trace["hidden_key"] == absolute(proxy, path) and trace["stored"]
    why = trace["decision"]["why"]
    assert "served again" not in why
    assert "nor once it goes: the request is bypassed without it too (AMBIGUOUS-QUERY:mode)" in why, why
    await reload_rules(proxy, "rules:\n" + edit_no_store)  # the bypass gone: still not served
    assert "AMBIGUOUS-QUERY:mode" in (await proxy.get(path)).headers["Cache-Status"]
