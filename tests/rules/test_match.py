"""Every match field through the running proxy: a rule marks the responses it matched."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from tests.harness import Origin, Proxy

MakeProxy = Callable[..., Awaitable[Proxy]]


async def any_path(request: web.Request) -> web.Response:
    return web.Response(text="ok", headers={"Cache-Control": "max-age=60", "Content-Type": "text/plain"})


# (match, request path, request headers, matches?)
REQUEST_CASES = [
    ("{host: shop.example}", "/x", {"Host": "shop.example"}, True),
    ("{host: shop.example}", "/x", {"Host": "SHOP.example:80"}, True),
    ("{host: shop.example}", "/x", {"Host": "other.example"}, False),
    ("{host: '*.example.com'}", "/x", {"Host": "img.example.com"}, True),
    ("{host: '*.example.com'}", "/x", {"Host": "a.b.example.com"}, True),
    ("{host: '*.example.com'}", "/x", {"Host": "example.com"}, False),
    ("{host: [a.example, b.example]}", "/x", {"Host": "b.example"}, True),
    ("{host: 'a.example:8080'}", "/x", {"Host": "a.example:8080"}, True),
    ("{host: 'a.example:8080'}", "/x", {"Host": "a.example:9090"}, False),
    # an IPv6 literal is compared in one spelling (RFC 5952), on both sides
    ("{host: '[0:0::1]'}", "/x", {"Host": "[::1]"}, True),
    ("{host: '[::1]'}", "/x", {"Host": "[0000::0001]:80"}, True),
    ("{host: '[0::1]:8080'}", "/x", {"Host": "[::1]:8080"}, True),
    ("{host: '[::1]'}", "/x", {"Host": "[::2]"}, False),
    ("{path: /a/*/c}", "/a/b/c", {}, True),
    ("{path: /a/*/c}", "/a/b/x/c", {}, False),
    ("{path: /a/**}", "/a/b/x/c", {}, True),
    ("{path: /a/**}", "/ab", {}, False),
    ("{path: '/*.css'}", "/site.css", {}, True),
    ("{path: '/*.css'}", "/dir/site.css", {}, False),
    ("{path: '/**.css'}", "/dir/site.css?x=1", {}, True),
    ("{path: 'regex:^/v[0-9]+/'}", "/v2/items", {}, True),
    ("{path: 'regex:^/v[0-9]+/'}", "/vx/items", {}, False),
    ("{path: 'regex:\\.json$'}", "/deep/a.json", {}, True),  # regex: searched, anchors are yours
    # The path is matched decoded with dot-segments removed, as the origin will read it.
    ("{path: /admin/**}", "/%61dmin/x", {}, True),
    ("{path: /admin/**}", "/static/..%2Fadmin/x", {}, True),
    ("{path: /static/**}", "/static/..%2Fadmin/x", {}, True),  # a raw router's /static/..%2Fadmin/x
    ("{path: /admin/**}", "//admin//x", {}, True),
    ("{method: GET, path: /m}", "/m", {}, True),
    ("{method: [POST], path: /m}", "/m", {}, False),
    ("{query: {preview: present}}", "/q?preview", {}, True),
    ("{query: {preview: present}}", "/q?x=1", {}, False),
    ("{query: {preview: absent}}", "/q?x=1", {}, True),
    ("{query: {lang: de}}", "/q?lang=de", {}, True),
    ("{query: {lang: de}}", "/q?lang=en", {}, False),
    ("{query: {page: 2}}", "/q?page=2", {}, True),
    ("{query: {q: {regex: '^shoe'}}}", "/q?q=shoes%20red", {}, True),
    ("{query: {q: {equals: 'a b'}}}", "/q?q=a+b", {}, True),
    ("{header: {X-Debug: present}}", "/h", {"x-debug": "1"}, True),
    ("{header: {X-Debug: absent}}", "/h", {"X-Debug": "1"}, False),
    ("{header: {Accept: {regex: json}}}", "/h", {"Accept": "application/json"}, True),
    ("{header: {Accept: {regex: json}}}", "/h", {"Accept": "text/html"}, False),
    ("{header: {X-Tenant: {equals: acme}}}", "/h", {"X-Tenant": "acme"}, True),
    ("{cookie: {session: present}}", "/c", {"Cookie": "a=1; session=xyz"}, True),
    ("{cookie: {session: present}}", "/c", {"Cookie": "xsession=1"}, False),
    ("{cookie: {session: absent}}", "/c", {}, True),
    ("{cookie: {role: admin}}", "/c", {"Cookie": "role=admin"}, True),
    ("{cookie: {role: admin}}", "/c", {"Cookie": "role=user"}, False),
    # A cookie origins read differently (whitespace inside a pair: Go drops `session =x`, aiohttp
    # reads `session`; a name sent twice with other values) is bypassed whatever the rule says
    # (Cache-Status detail AMBIGUOUS-COOKIE, tests/rules/test_ambiguous_cookies.py).
    ("{cookie: {session: present}}", "/c", {"Cookie": "session =mallory"}, True),
    ("{cookie: {session: present}}", "/c", {"Cookie": "a=1;\tsession\t= x"}, True),
    ("{cookie: {role: admin}}", "/c", {"Cookie": "role = admin "}, True),
    ("{cookie: {role: admin}}", "/c", {"Cookie": "role=admin; role=user"}, True),
    ("{cookie: {role: admin}}", "/c", {"Cookie": "role=user; role=user"}, False),
    ("{cookie: {session: present}}", "/c", {"Cookie": "a=1; session=xyz; theme=dark"}, True),
    ("{path: /api/**, cookie: {session: present}}", "/api/x", {"Cookie": "session=1"}, True),
    ("{path: /api/**, cookie: {session: present}}", "/web/x", {"Cookie": "session=1"}, False),
]


@pytest.mark.parametrize(("match", "path", "headers", "matches"), REQUEST_CASES)
async def test_request_conditions_decide_whether_a_rule_applies(
        origin: Origin, make_proxy: MakeProxy, match: str, path: str, headers: dict[str, str],
        matches: bool) -> None:
    proxy = await make_proxy(rules=f"""
        rules:
          - name: marked
            match: {match}
            bypass: true
    """)
    origin.route(path.split("?")[0], any_path)
    reply = await proxy.get(path, headers=headers)
    assert (reply.x_cache == "BYPASS") is matches, reply.cache_status


async def test_method_condition_through_the_proxy(origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: writes
            match: {method: [POST, PUT]}
            response_headers: {add: {X-Rule: writes}}
          - name: reads
            match: {method: GET}
            tags: [reads]
            response_headers: {add: {X-Rule: reads}}
    """)
    origin.route("/m", any_path)
    posted = await proxy.request("POST", "/m", data=b"x")
    got = await proxy.get("/m")
    head = await proxy.request("HEAD", "/m")  # GET implies HEAD: same rule, same key
    assert posted.headers["X-Rule"] == "writes"
    assert (got.headers["X-Rule"], head.headers["X-Rule"]) == ("reads", "reads")
    assert head.x_cache == "HIT"


async def test_status_and_content_type_conditions_decide_at_store_time(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(rules="""
        rules:
          - name: no html
            match: {content_type: [text/html, "application/*+xml"]}
            no_store: true
          - name: not found
            match: {status: 404}
            ttl: {404: 5m}
            tags: [missing]
    """)
    origin.route("/page", body=b"<p>", headers={"Content-Type": "text/html; charset=utf-8",
                                                 "Cache-Control": "max-age=60"})
    origin.route("/feed", body=b"<a/>", headers={"Content-Type": "application/atom+xml",
                                                 "Cache-Control": "max-age=60"})
    origin.route("/data", body=b"{}", headers={"Content-Type": "application/json",
                                               "Cache-Control": "max-age=60"})
    page = await proxy.get("/page")
    assert 'detail="RULE-NO-STORE:no html"' in page.cache_status
    assert 'detail="RULE-NO-STORE:no html"' in (await proxy.get("/feed")).cache_status
    assert (await proxy.get("/data")).x_cache == "MISS"
    assert (await proxy.get("/data")).x_cache == "HIT"
    missing = await proxy.get("/nothing-here")  # the origin's 404 without freshness
    assert (missing.status, (await proxy.get("/nothing-here")).x_cache) == (404, "HIT")
