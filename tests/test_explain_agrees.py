"""``explain`` and the running proxy agree on what is stored, and why not.

One table of requests and origin responses goes through the real proxy (a real origin
on loopback) and through ``explain`` / ``explain_trace`` (what ``cachegate explain``
and ``GET /explain`` run) with the proxy's own compiled rules; both must say "stored",
or "not stored" with the same ``Cache-Status`` detail.
"""

from __future__ import annotations

import re
import time

import pytest
from aiohttp import web

from proxy.explain import ExplainRequest, explain, explain_trace, request_head
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

RULES = """
rules:
  - name: api is never stored
    match: {path: "/api/**"}
    no_store: true
  - name: static by force
    match: {path: "/static/**"}
    ttl: {200: 1h}
    override_origin: true
  - name: landing cookies are harmless
    match: {path: "/landing/**"}
    allow_set_cookie: true
  - name: errors briefly
    match: {path: "/errors/**"}
    ttl: {503: 10s}
"""
CONFIG = "cache: {memory: 64MB, max_object: 1KB, disk: {path: cache, size: 512MB, shards: 2}}\n"
MAX_AGE = ("Cache-Control", "max-age=60")
LAST_MODIFIED = ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
Pairs = list[tuple[str, str]]

# (case, method, path, request fields, status, response fields, body size, expected detail or None: stored)
CASES: list[tuple[str, str, str, Pairs, int, Pairs, int, str | None]] = [
    ("fresh", "GET", "/p/fresh", [], 200, [MAX_AGE], 10, None),
    ("private", "GET", "/p/private", [], 200, [("Cache-Control", "private, max-age=60")], 10, "PRIVATE"),
    ("no-store", "GET", "/p/no-store", [], 200, [("Cache-Control", "no-store")], 10, "NO-STORE"),
    ("a cookie", "GET", "/p/cookie", [], 200, [MAX_AGE, ("Set-Cookie", "s=1")], 10, "SET-COOKIE"),
    ("a cookie a rule allows", "GET", "/landing/a", [], 200, [MAX_AGE, ("Set-Cookie", "s=1")], 10, None),
    ("Vary: *", "GET", "/p/vary-star", [], 200, [MAX_AGE, ("Vary", "*")], 10, "VARY-STAR"),
    ("an error without freshness", "GET", "/p/error", [], 503, [], 10, "UNCACHEABLE-STATUS"),
    ("an error a rule names", "GET", "/errors/a", [], 503, [], 10, None),
    ("no freshness, no validator", "GET", "/p/nothing", [], 200, [], 10, "NO-FRESHNESS"),
    ("a validator only", "GET", "/p/etag", [], 200, [("ETag", '"e"')], 10, None),
    ("heuristic freshness", "GET", "/p/heuristic", [], 200, [LAST_MODIFIED], 10, None),
    ("a rule's no_store", "GET", "/api/x", [], 200, [MAX_AGE], 10, "RULE-NO-STORE:api is never stored"),
    ("the deception guard", "GET", "/static/page.css", [], 200, [("Content-Type", "text/html")], 10,
     "DECEPTION-GUARD"),
    ("the guard satisfied", "GET", "/static/site.css", [], 200, [("Content-Type", "text/css")], 10, None),
    ("Authorization", "GET", "/p/auth", [("Authorization", "Bearer x")], 200, [MAX_AGE], 10, "AUTHORIZATION"),
    ("Authorization and public", "GET", "/p/auth-public", [("Authorization", "Bearer x")], 200,
     [("Cache-Control", "public, max-age=60")], 10, None),
    ("the request's no-store", "GET", "/p/request-no-store", [("Cache-Control", "no-store")], 200, [MAX_AGE],
     10, "REQUEST-NO-STORE"),
    ("a HEAD fills with a GET", "HEAD", "/p/head", [], 200, [MAX_AGE], 10, None),
    ("too large", "GET", "/p/large", [], 200, [MAX_AGE], 2048, "TOO-LARGE"),
    ("a POST", "POST", "/p/post", [], 200, [MAX_AGE], 10, "METHOD"),
]


def detail_of(cache_status: str) -> str | None:
    m = re.search(r'detail=("(?:[^"\\]|\\.)*"|[^;]+)', cache_status)
    if m is None:
        return None
    value = m.group(1)
    return value[1:-1].replace('\\"', '"').replace("\\\\", "\\") if value.startswith('"') else value


@pytest.fixture
async def proxy(origin: Origin, make_proxy: MakeProxy) -> Proxy:
    for _, _, path, _, status, fields, size, _ in CASES:
        sent = dict(fields)
        sent.setdefault("Content-Type", "text/plain")

        async def answer(request: web.Request, status: int = status, sent: dict[str, str] = sent,
                         size: int = size) -> web.Response:
            return web.Response(status=status, body=b"x" * size, headers=sent)

        origin.route(path, answer)
    return await make_proxy(config=CONFIG, rules=RULES)


def origin_fields(fields: Pairs, size: int) -> Pairs:
    """The response fields as the origin sends them (the framing and type aiohttp adds)."""
    out = list(fields)
    if not any(k == "Content-Type" for k, _ in out):
        out.append(("Content-Type", "text/plain"))
    return [*out, ("Content-Length", str(size))]


async def test_explain_and_the_proxy_agree_on_stored_and_not_stored(proxy: Proxy) -> None:
    rules = proxy.runtime.engine.rules
    disagreements = []
    for case, method, path, request_fields, status, fields, size, expected in CASES:
        reply = await proxy.request(method, path, headers=dict(request_fields))
        assert reply.status == status, (case, reply.status, reply.body)
        if method == "POST":  # never looked up nor stored: the proxy says why in its fwd
            proxy_said = "METHOD" if "fwd=method" in reply.cache_status else reply.cache_status
        else:
            proxy_said = None if "; stored" in reply.cache_status else detail_of(reply.cache_status)
        req = ExplainRequest(proxy.url + path, method, tuple(request_fields), (status,),
                             tuple(origin_fields(fields, size)))
        now = time.time()
        trace = explain_trace(rules, request_head(req), [], now, [(status, req.response_headers)])
        lines = explain(rules, req, now)
        if method == "POST":
            trace_said: str | None = "METHOD" if trace["decision"]["fwd"] == "method" else "?"
            text_said = "METHOD" if any("POST is never looked up or stored" in line for line in lines) else "?"
        else:
            [fetched] = trace["if_fetched"]
            trace_said = None if fetched["stored"] else fetched["detail"]
            [decision] = [line for line in lines if line.startswith("  decision ")]
            text = decision.split(None, 1)[1]
            text_said = None if text.startswith("stored") else text.removeprefix("not stored: ").split(" (")[0]
        if not proxy_said == trace_said == text_said == expected:
            disagreements.append((case, {"proxy": proxy_said, "explain_trace": trace_said, "explain": text_said,
                                         "expected": expected}))
        if method != "POST":  # what was stored is served next time; what was not is fetched again
            again = await proxy.request(method, path, headers=dict(request_fields))
            assert (again.x_cache == "MISS") is (expected is not None), (case, again.cache_status)
    assert not disagreements, disagreements
