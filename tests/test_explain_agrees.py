"""``explain`` and the running proxy agree on what is stored, and why not.

One table of requests and origin responses goes through the real proxy (a real origin
on loopback) and through ``explain`` / ``explain_trace`` (what ``cachegate explain``
and ``GET /explain`` run) with the proxy's own compiled rules; both must say "stored",
or "not stored" with the same ``Cache-Status`` detail.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web

from proxy.explain import ExplainRequest, explain, explain_trace, request_head
from proxy.policy.httpdate import format_http_date
from tests.conftest import MakeProxy
from tests.harness import Clock, Handler, Origin, Proxy
from tests.rules.util import settle

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
    ("a garbled private", "GET", "/p/garbled-private", [], 200, [("Cache-Control", "private; max-age=60")], 10,
     "PRIVATE"),
    ("a garbled no-store", "GET", "/p/garbled-no-store", [], 200, [("Cache-Control", '"no-store, max-age=60"')],
     10, "NO-STORE"),
    ("a cookie", "GET", "/p/cookie", [], 200, [MAX_AGE, ("Set-Cookie", "s=1")], 10, "SET-COOKIE"),
    ("a cookie a rule allows", "GET", "/landing/a", [], 200, [MAX_AGE, ("Set-Cookie", "s=1")], 10, None),
    ("Vary: *", "GET", "/p/vary-star", [], 200, [MAX_AGE, ("Vary", "*")], 10, "VARY-STAR"),
    ("Vary not a list of field names", "GET", "/p/vary-invalid", [], 200, [MAX_AGE, ("Vary", '"Cookie"')], 10,
     "VARY-INVALID"),
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
    # A 206 answering the client's range is stored as a part of its representation (its 200's
    # rules); one that cannot be placed is not.
    ("a part", "GET", "/p/part", [("Range", "bytes=0-1")], 206, [MAX_AGE, ("Content-Range", "bytes 0-1/10")],
     2, None),
    ("a part without its range", "GET", "/p/part-unplaced", [("Range", "bytes=0-1")], 206, [MAX_AGE], 2,
     "NO-CONTENT-RANGE"),
    ("a private part", "GET", "/p/part-private", [("Range", "bytes=0-1")], 206,
     [("Cache-Control", "private, max-age=60"), ("Content-Range", "bytes 0-1/10")], 2, "PRIVATE"),
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


# -- what explain says the proxy answers now, from what is stored --------------------------------

BODY = b"0123456789"
OLD = "Mon, 01 Jan 2001 00:00:00 GMT"
Said = tuple[int | None, str, str]


def representation(clock: Clock, fields: dict[str, str]) -> Handler:
    """An origin's answer dated by the proxy's clock (so ages are what the test sets), with a
    304 for a matching If-None-Match and a 206 for a range ``bytes=first-last`` (when its
    If-Range, if any, is the ETag)."""
    async def answer(request: web.Request) -> web.Response:
        headers = {**fields, "Date": format_http_date(clock.now)}
        if "ETag" in fields and request.headers.get("If-None-Match") == fields["ETag"]:
            return web.Response(status=304, headers=headers)
        headers.setdefault("Content-Type", "text/plain")
        if_range = request.headers.get("If-Range", fields.get("ETag"))
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", "")) \
            if if_range == fields.get("ETag") else None
        if m is not None:
            first, last = int(m.group(1)), min(int(m.group(2)), len(BODY) - 1)
            return web.Response(status=206, body=BODY[first:last + 1],
                                headers={**headers, "Content-Range": f"bytes {first}-{last}/{len(BODY)}"})
        return web.Response(body=BODY, headers=headers)

    return answer


@pytest.fixture
async def clocked(make_proxy: MakeProxy) -> tuple[Proxy, Clock]:
    proxy = await make_proxy()
    clock = Clock()
    proxy.runtime.engine.clock = clock
    return proxy, clock


async def trace_of(proxy: Proxy, path: str, headers: dict[str, str]) -> Any:
    """GET /explain for a GET of ``path`` with ``headers``."""
    query = f"url={quote(proxy.url + path)}&headers={quote(json.dumps(headers))}"
    reply = await proxy.admin("GET", "/explain?" + query)
    assert reply.status == 200, reply.body
    return json.loads(reply.body)


async def explain_then_ask(proxy: Proxy, path: str, headers: dict[str, str]) -> tuple[Said, Said]:
    """What GET /explain says the proxy does with this request now, then what it does:
    (status, X-Cache-Status, Cache-Status) each (a decision that goes to the origin names
    no status: the origin's answer decides it)."""
    decision = (await trace_of(proxy, path, headers))["decision"]
    got = await proxy.get(path, headers=headers)
    return ((decision.get("status", got.status), decision["x_cache_status"], decision["cache_status"]),
            (got.status, got.x_cache, got.cache_status))


async def test_explain_gives_the_status_the_proxy_answers_from_a_fresh_entry(
        origin: Origin, clocked: tuple[Proxy, Clock]) -> None:
    """Preconditions and ranges decide the reply from a fresh entry (412, 304, 206, 416):
    explain says the same status as the proxy (both from ``reply_head``)."""
    proxy, clock = clocked
    origin.route("/fresh", representation(clock, {"Cache-Control": "max-age=100", "ETag": '"e1"',
                                                   "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}))
    assert (await proxy.get("/fresh")).x_cache == "MISS"
    await settle(proxy)
    cases: dict[str, dict[str, str]] = {
        "plain": {},
        "If-None-Match matching": {"If-None-Match": '"e1"'},
        "If-Match another": {"If-Match": '"other"'},
        "If-Match matching": {"If-Match": '"e1"'},
        "If-Unmodified-Since before": {"If-Unmodified-Since": OLD},
        "a range": {"Range": "bytes=0-3"},
        "a range outside": {"Range": "bytes=50-60"},
        "a range, If-Range another": {"Range": "bytes=0-3", "If-Range": '"other"'},
    }
    statuses = {}
    disagreements = []
    for case, headers in cases.items():
        explained, done = await explain_then_ask(proxy, "/fresh", headers)
        statuses[case] = done[0]
        if explained != done:
            disagreements.append((case, {"explain": explained, "proxy": done}))
    assert not disagreements, disagreements
    assert statuses == {"plain": 200, "If-None-Match matching": 304, "If-Match another": 412,
                        "If-Match matching": 200, "If-Unmodified-Since before": 412, "a range": 206,
                        "a range outside": 416, "a range, If-Range another": 200}
    assert origin.count("/fresh") == 1


async def test_explain_gives_the_cache_status_the_proxy_sends_for_stale_and_soft_purged_entries(
        origin: Origin, clocked: tuple[Proxy, Clock]) -> None:
    """A soft-purged entry served under max-stale says SOFT-PURGED (``serve_detail``, not a
    detail of explain's own), and a revalidation's 304 answer carries the ttl the freshened
    entry has, as the proxy's does."""
    proxy, clock = clocked
    origin.route("/soft", representation(clock, {"Cache-Control": "max-age=100", "ETag": '"s"'}))
    origin.route("/val", representation(clock, {"Cache-Control": "max-age=30", "ETag": '"v"'}))
    for path in ("/soft", "/val"):
        assert (await proxy.get(path)).x_cache == "MISS"
    await settle(proxy)
    purged = await proxy.admin("POST", "/purge", json={"urls": [proxy.url + "/soft"], "soft": True})
    assert purged.status == 200, purged.body
    clock.advance(60)  # /val is stale by 30s
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("soft-purged, max-stale", "/soft", {"Cache-Control": "max-stale"}),
        ("soft-purged, max-stale=1", "/soft", {"Cache-Control": "max-stale=1"}),
        ("soft-purged", "/soft", {}),  # (last: its background revalidation freshens it)
        ("stale, revalidated", "/val", {}),
    ]
    said = {}
    disagreements = []
    for case, path, headers in cases:
        explained, done = await explain_then_ask(proxy, path, headers)
        said[case] = done[1:]
        if explained != done:
            disagreements.append((case, {"explain": explained, "proxy": done}))
        await settle(proxy)
    clock.advance(60)
    explained, done = await explain_then_ask(proxy, "/val", {"If-None-Match": '"v"'})
    said["stale, revalidated, If-None-Match"] = done[1:]
    if explained != done:
        disagreements.append(("stale, revalidated, If-None-Match", {"explain": explained, "proxy": done}))
    assert not disagreements, disagreements
    assert said == {
        "soft-purged, max-stale": ("STALE", "cachegate; hit; ttl=0; detail=SOFT-PURGED"),
        "soft-purged, max-stale=1": ("STALE", "cachegate; hit; ttl=0; detail=SOFT-PURGED"),
        "soft-purged": ("UPDATING", "cachegate; hit; ttl=0; detail=SOFT-PURGED"),
        "stale, revalidated": ("REVALIDATED", "cachegate; fwd=stale; fwd-status=304; ttl=30"),
        "stale, revalidated, If-None-Match": ("REVALIDATED", "cachegate; fwd=stale; fwd-status=304; ttl=30"),
    }


async def test_explain_sees_the_stored_parts_a_range_is_answered_from(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A range no complete response answers is decided against the stored parts (206
    responses, stored under their own key) by ``decide_part_lookup``, in the engine and in
    explain alike: a HIT from a part that holds it, else the range (or, for a conditional
    one, the whole response) from the origin."""
    proxy = await make_proxy(config=CONFIG.replace("{memory: 64MB,", "{memory: 64MB, range_fill: none,"))
    clock = Clock()
    proxy.runtime.engine.clock = clock
    origin.route("/parts", representation(clock, {"Cache-Control": "max-age=100", "ETag": '"p1"'}))
    await proxy.get("/")  # a request names the listener's host: a host it serves (and explains)

    async def forwarded(headers: dict[str, str], why: str, status: int) -> None:
        before = origin.count("/parts")
        decision = (await trace_of(proxy, "/parts", headers))["decision"]
        got = await proxy.get("/parts", headers=headers)
        assert (decision["action"], decision["x_cache_status"]) == ("forward", got.x_cache), (decision, got)
        assert got.cache_status.startswith(decision["cache_status"] + ";"), (decision, got.cache_status)
        assert why in decision["why"], decision
        assert (got.status, origin.count("/parts")) == (status, before + 1)
        await settle(proxy)

    stored = await proxy.get("/parts", headers={"Range": "bytes=2-7"})
    assert (stored.status, stored.cache_status) == (206, "cachegate; fwd=uri-miss; fwd-status=206; stored")
    await settle(proxy)
    disagreements = []
    for case, headers in {
        "inside the part": {"Range": "bytes=3-5"},
        "the part's own range": {"Range": "bytes=2-7"},
        "inside, If-Match another": {"Range": "bytes=3-5", "If-Match": '"other"'},
        "inside, If-Range its ETag": {"Range": "bytes=3-5", "If-Range": '"p1"'},
    }.items():
        explained, done = await explain_then_ask(proxy, "/parts", headers)
        if explained != done:
            disagreements.append((case, {"explain": explained, "proxy": done}))
    assert not disagreements, disagreements
    assert explained[:2] == (206, "HIT") and origin.count("/parts") == 1
    trace = await trace_of(proxy, "/parts", {"Range": "bytes=3-5"})
    assert trace["stored"] == []
    assert [(p["range"], p["fresh"]) for p in trace["stored_parts"]] == [([2, 7, 10], True)]
    # Beyond the part: that range alone from the origin (combined with the part held).
    await forwarded({"Range": "bytes=0-1"}, "the range alone is asked of the origin, its 206 stored as a "
                    "part (combined with the part held", 206)
    # An If-Range the part does not satisfy wants the whole representation: fetched whole.
    await forwarded({"Range": "bytes=3-5", "If-Range": '"other"'}, "If-Range does not hold", 200)


async def test_explain_says_a_cold_ranges_if_range_goes_to_the_origin_with_it(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A range with If-Range that nothing stored answers is asked of the origin as a plain range
    is, its If-Range with it (explain said the whole response was fetched): the origin's 206
    when it holds, its whole 200 when not."""
    proxy = await make_proxy(config=CONFIG.replace("{memory: 64MB,", "{memory: 64MB, range_fill: none,"))
    clock = Clock()
    proxy.runtime.engine.clock = clock
    await proxy.get("/")  # a request names the listener's host: a host it serves (and explains)
    for i, (if_range, status) in enumerate((('"c1"', 206), ('"c0"', 200))):
        path = f"/seek{i}"
        origin.route(path, representation(clock, {"Cache-Control": "max-age=100", "ETag": '"c1"'}))
        fields = {"Range": "bytes=2-5", "If-Range": if_range}
        decision = (await trace_of(proxy, path, fields))["decision"]
        got = await proxy.get(path, headers=fields)
        await settle(proxy)
        assert (decision["action"], decision["range_fetch"], got.status) == ("forward", "range", status)
        assert "the client's If-Range goes with it" in decision["why"], decision
        assert got.cache_status.startswith(decision["cache_status"] + ";"), (decision, got.cache_status)
        sent = [(s.headers.get("Range"), s.headers.get("If-Range")) for s in origin.seen if s.path == path]
        assert sent == [("bytes=2-5", if_range)]


def asked_since(origin: Origin, path: str, since: int) -> list[str]:
    """What the origin was asked for ``path`` since its ``since``-th request: "whole" (no
    Range) or "range", in order."""
    return ["range" if "Range" in s.headers else "whole" for s in origin.seen[since:] if s.path == path]


@pytest.mark.parametrize("range_fill", ["whole", "none"])
async def test_explain_says_what_the_origin_is_asked_for_a_range_miss_as_the_proxy_asks_it(
        origin: Origin, make_proxy: MakeProxy, range_fill: str) -> None:
    """A range no stored response answers goes to the origin as ``decide_range_fetch`` says,
    in the engine and in explain alike: ``bytes=0-`` is the whole fill (explain said the range
    alone was asked, its 206 stored as a part, while the origin got no Range), and with
    ``range_fill: whole`` a range is followed by a whole fetch (explain never said so)."""
    proxy = await make_proxy(config=CONFIG.replace("{memory: 64MB,", f"{{memory: 64MB, range_fill: {range_fill},"))
    clock = Clock()
    proxy.runtime.engine.clock = clock
    await proxy.get("/")  # a request names the listener's host: a host it serves (and explains)
    expected = {"bytes=0-": ["whole"], "bytes=2-5": ["range", "whole"] if range_fill == "whole" else ["range"]}
    said = {}
    for i, rng in enumerate(expected):
        path = f"/cold{i}"
        origin.route(path, representation(clock, {"Cache-Control": "max-age=100", "ETag": '"c1"'}))
        decision = (await trace_of(proxy, path, {"Range": rng}))["decision"]
        since = len(origin.seen)
        got = await proxy.get(path, headers={"Range": rng})
        await settle(proxy)
        assert (decision["action"], decision["x_cache_status"]) == ("forward", got.x_cache), (decision, got)
        assert got.cache_status.startswith(decision["cache_status"] + ";"), (decision, got.cache_status)
        said[rng] = (decision["range_fetch"].split(", then "), asked_since(origin, path, since))
    assert said == {rng: (asked, asked) for rng, asked in expected.items()}, said


async def test_explain_says_a_part_answers_a_matching_if_none_match_with_a_304(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A stored part holds the range and the client's If-None-Match matches its ETag: the proxy
    answers 304 (RFC 9110 §13.2.2: before the range), and explain said 206."""
    proxy = await make_proxy(config=CONFIG.replace("{memory: 64MB,", "{memory: 64MB, range_fill: none,"))
    clock = Clock()
    proxy.runtime.engine.clock = clock
    origin.route("/inm", representation(clock, {"Cache-Control": "max-age=100", "ETag": '"p1"'}))
    await proxy.get("/")
    assert (await proxy.get("/inm", headers={"Range": "bytes=2-7"})).status == 206
    await settle(proxy)
    explained, done = await explain_then_ask(proxy, "/inm", {"Range": "bytes=3-5", "If-None-Match": '"p1"'})
    assert explained == done, {"explain": explained, "proxy": done}
    assert done[:2] == (304, "HIT") and origin.count("/inm") == 1
