"""Poisoning through forwarding fields: an origin that trusts ``X-Forwarded-Prefix`` or
``X-Real-IP`` builds its page from them, and the page is stored under a key that never saw
them. Every forwarding family is dropped unless the peer is a trusted proxy; cachegate
sends its own ``X-Forwarded-For/-Proto/-Host`` and ``Via``."""

from __future__ import annotations

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import echo_origin, get, received, send_raw

# The families the issue found reaching the origin, every name the docs list, and a few
# X-Forwarded-* nobody lists (dropped by prefix). tests/policy/test_request.py checks that
# this list and the policy's agree.
ATTACK_FIELDS = [
    # X-Forwarded-*, by prefix
    "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Prefix", "X-Forwarded-Ssl",
    "X-Forwarded-Port", "X-Forwarded-Scheme", "X-Forwarded-Server", "X-Forwarded-Uri", "X-Forwarded-Path",
    "X-Forwarded-Anything", "X-Forwarded",
    # standard
    "Forwarded", "Via",
    # client IP
    "X-Real-IP", "True-Client-IP", "CF-Connecting-IP", "CF-Connecting-IPv6", "Fastly-Client-IP",
    "X-Client-IP", "X-Cluster-Client-IP", "Client-IP", "X-Originating-IP", "X-Remote-IP", "X-Remote-Addr",
    "X-ProxyUser-IP", "X-Azure-ClientIP", "X-Azure-SocketIP", "X-ARR-ClientIP", "X-Envoy-External-Address",
    "Akamai-Client-IP", "X-AppEngine-User-IP", "X-Original-Forwarded-For",
    # scheme and TLS
    "Front-End-Https", "X-Url-Scheme", "X-Scheme", "X-ARR-SSL", "CF-Visitor", "X-Https",
    # host
    "X-Original-Host", "X-Host", "X-HTTP-Host-Override",
    # URL rewriting
    "X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "X-Envoy-Original-Path",
    # method override
    "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-Method",
    # Edge Architecture
    "Surrogate-Capability",
]
EVIL = "evil.example"


@pytest.mark.parametrize("field", ATTACK_FIELDS)
async def test_a_forwarding_field_from_an_untrusted_client_cannot_poison_the_page(
        origin: Origin, make_proxy: MakeProxy, field: str) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    attack = await send_raw(proxy, get("/page", f"{field}: {EVIL}"))
    assert EVIL not in attack.body.decode(), field
    innocent = await send_raw(proxy, get("/page"))
    assert innocent.x_cache == "HIT"
    assert EVIL not in innocent.body.decode(), field
    seen = received(innocent)["fields"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["shop.example"]
    assert seen["via"] == ["1.1 cachegate"]


@pytest.mark.parametrize("field", ["X_Forwarded_Host", "X-Forwarded_Prefix", "X_Real_IP", "True_Client_IP",
                                   "X_Original_URL", "X_HTTP_Method_Override"])
async def test_a_forwarding_field_spelled_with_underscores_is_dropped_too(
        origin: Origin, make_proxy: MakeProxy, field: str) -> None:
    # CGI, WSGI and others read X_Real_IP as X-Real-IP (both become HTTP_X_REAL_IP); nginx drops
    # every field with an underscore by default (underscores_in_headers off).
    echo_origin(origin, "/page")
    proxy = await make_proxy()
    attack = await send_raw(proxy, get("/page", f"{field}: {EVIL}"))
    assert EVIL not in attack.body.decode(), field


async def test_a_trusted_proxy_keeps_its_forwarding_fields(origin: Origin, make_proxy: MakeProxy) -> None:
    echo_origin(origin, "/page")
    proxy = await make_proxy(config="trusted_proxies: [127.0.0.0/8]\n")
    reply = await send_raw(proxy, get(
        "/page", "X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: https", "X-Real-IP: 203.0.113.9",
        "X-Forwarded-Prefix: /shop", "Via: 1.1 edge", "X-Original-Forwarded-For: 198.51.100.4"))
    seen = received(reply)["fields"]
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-real-ip"] == ["203.0.113.9"]
    assert seen["x-forwarded-prefix"] == ["/shop"]
    assert seen["x-original-forwarded-for"] == ["198.51.100.4"]
    assert seen["via"] == ["1.1 edge, 1.1 cachegate"]


# A trusted front proxy may state the client's scheme in any of these; each pair is (the
# front's https request, its http request for the same URL).
SCHEME_STATEMENTS = [
    (["Forwarded: for=203.0.113.9;proto=https"], ["Forwarded: for=203.0.113.9;proto=http"]),
    (['Forwarded: for="[2001:db8::1]:4711";proto="https", for=10.0.0.2'], ["Forwarded: for=203.0.113.9"]),
    (["X-Forwarded-Ssl: on"], []),
    (["Front-End-Https: on"], ["Front-End-Https: off"]),
    (["X-Url-Scheme: https"], ["X-Url-Scheme: http"]),
    (["X-Forwarded-Proto: https"], ["X-Forwarded-Proto: http"]),
]


@pytest.mark.parametrize(("https", "http"), SCHEME_STATEMENTS)
async def test_a_trusted_proxys_scheme_field_keeps_https_and_http_apart(
        origin: Origin, make_proxy: MakeProxy, https: list[str], http: list[str]) -> None:
    # The front's https answer was served to its http requests (and back) when the scheme came
    # in a field other than X-Forwarded-Proto: the key said http for both.
    echo_origin(origin, "/page")
    proxy = await make_proxy(config="trusted_proxies: [127.0.0.0/8]\n")
    secure = await send_raw(proxy, get("/page", *https))
    plain = await send_raw(proxy, get("/page", *http))
    assert (secure.x_cache, plain.x_cache) == ("MISS", "MISS")
    assert received(secure)["fields"]["x-forwarded-proto"] == ["https"]
    assert received(plain)["fields"]["x-forwarded-proto"] == ["http"]
    assert (await send_raw(proxy, get("/page", *https))).body == secure.body
    assert (await send_raw(proxy, get("/page", *http))).body == plain.body


async def test_the_origin_is_told_one_scheme_the_one_in_the_key(origin: Origin, make_proxy: MakeProxy) -> None:
    # A trusted Forwarded reached the origin as sent, beside cachegate's contradicting
    # X-Forwarded-Proto; now every scheme field the origin receives says the key's scheme.
    echo_origin(origin, "/page")
    proxy = await make_proxy(config="trusted_proxies: [127.0.0.0/8]\n")
    reply = await send_raw(proxy, get(
        "/page", "X-Forwarded-Proto: https, http", 'Forwarded: for=203.0.113.9;proto=http;host="a.example"',
        "X-Forwarded-Ssl: off", "Front-End-Https: on", "X-Scheme: http", "X-Url-Scheme: gopher"))
    seen = received(reply)["fields"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["forwarded"] == ['for=203.0.113.9;proto=https;host="a.example"']
    assert seen["front-end-https"] == ["on"]
    assert not {"x-forwarded-ssl", "x-scheme", "x-url-scheme"} & set(seen)
    again = await send_raw(proxy, get("/page", "Forwarded: proto=https"))
    assert again.x_cache == "HIT"  # the same scheme, however it was stated


@pytest.mark.parametrize(("forwarded", "scheme", "sent"), [
    # RFC 7239 allows one proto per element; an origin building a dict reads the last one.
    ("proto=https;proto=http", "https", ["proto=https;proto=https"]),
    ("for=1.2.3.4;proto=http;proto=https", "http", ["for=1.2.3.4;proto=http;proto=http"]),
    # A quoted-string that never ends: cachegate reads no proto in it, a lenient parser may.
    ('for="x;proto=https', "http", None),
    ('for="a\\";proto=https', "http", None),
])
async def test_a_forwarded_the_origin_could_read_otherwise_never_reaches_it_as_sent(
        origin: Origin, make_proxy: MakeProxy, forwarded: str, scheme: str, sent: list[str] | None) -> None:
    """A repeated proto (the key read the first) and an unterminated quoted-string (the key read
    none) went to the origin as they came: an origin reading the last proto, or a lenient one,
    answered for another scheme than the key's (an http->https redirect stored for https)."""
    echo_origin(origin, "/page")
    proxy = await make_proxy(config="trusted_proxies: [127.0.0.0/8]\n")
    seen = received(await send_raw(proxy, get("/page", f"Forwarded: {forwarded}")))["fields"]
    assert seen["x-forwarded-proto"] == [scheme]
    assert seen.get("forwarded") == sent
