"""An admin URL names the key the proxy stores a client's request for that URL under: explain,
purge by URL (the admin API, the PURGE method, a cluster's peers) and the inspection of a URL
all start from ``normalise_url``, and the purge from ``keys_for_url`` too.

Each request target is sent as raw bytes (an HTTP client's URL parser would re-encode it or drop
an empty query before the proxy saw it), and the key compared is the one the proxy stored.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from aiohttp import web

from proxy.policy.keys import url_of_key
from proxy.purge import keys_for_url, normalise_url
from tests.admin.util import js, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

# Request targets, and the URL text an operator gives for them (a fragment is not sent).
TARGETS = [
    ("/a", "/a"),
    ("/a?", "/a?"),
    ("/a?", "/a?#f"),
    ("/a", "/a#f?g"),
    ("/?", "/?"),
    ("/a?b", "/a?b"),
    ("/a?b=", "/a?b="),
    ("/a?b#c", "/a?b#c"),  # sent with its fragment: the proxy drops it as the URL does
    ("/q?a=1&&b=2", "/q?a=1&&b=2"),
    ("/q?x=%2F", "/q?x=%2F"),
    ("/q?x=a+b", "/q?x=a+b"),
    ("/q?x=a%20b", "/q?x=a%20b"),
    ("/%7Euser", "/%7Euser"),
    ("/~user", "/~user"),
    ("/%41bc", "/%41bc"),
    ("/caf%C3%A9", "/caf%C3%A9"),
    ("/pct%2fslash", "/pct%2fslash"),
    ("/e%3fq?", "/e%3fq?"),
    ("/hash%23x", "/hash%23x"),
    ("/a/../dots", "/a/../dots"),
    ("/a//slash", "/a//slash"),

]

# URL text that names a target with what is not the URL around it: a fragment is dropped
# whatever it holds (it is never sent), surrounding whitespace (the line end of a URL read from a
# file or pasted from a shell) is not part of it.
WRITTEN = [
    ("/x", "/x#frag ment"),
    ("/x", "/x#a\x01b"),
    ("/x", "/x\n"),
    ("/x?", "/x? \r\n"),
]

# URL text no request target holds as written: non-ASCII, which a client sends percent-encoded
# as UTF-8 (upper-case hex, as browsers do; the proxy refuses raw non-ASCII in a target).
ENCODED = [
    ("/caf%C3%A9", "/café"),
    ("/q?a=%E2%82%AC", "/q?a=€"),
    ("/caf%C3%A9?", "/café?#ü"),
    ("/caf%c3%a9", "/caf%c3%a9"),  # another key than %C3%A9, for the proxy as for the purge
]

LOOPBACK = "admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.0/8, '::1/128']}\n"


class AnyPath(dict[str, object]):
    """Origin routes that answer every path with a cacheable page."""

    def get(self, key: str, default: object = None) -> object:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text=request.raw_path, headers={"Cache-Control": "max-age=300"})

        return page


async def stored_key(proxy: Proxy, target: str) -> str:
    """The one key a GET of ``target`` stored."""
    memory = proxy.runtime.storage.memory
    before = set(memory.keys())
    reply = await proxy.raw("GET", target)
    assert (reply.status, reply.x_cache) == (200, "MISS"), target
    await settle(proxy)
    new = set(memory.keys()) - before
    assert len(new) == 1, (target, new)
    return new.pop()


async def still_stored(proxy: Proxy, key: str) -> bool:
    """Whether ``key`` is still stored; if so, it is dropped (the next target starts afresh)."""
    storage = proxy.runtime.storage
    if key not in set(storage.memory.keys()):
        return False
    await storage.delete([key])
    return True


async def test_every_admin_url_names_the_key_the_proxy_stores_its_request_under(
        origin: Origin, make_proxy: MakeProxy) -> None:
    origin.routes = AnyPath()  # type: ignore[assignment]
    proxy = await make_proxy(config=LOOPBACK)
    rules = proxy.runtime.settings.rules
    wrong: list[tuple[str, str, object, object]] = []
    for target, text in TARGETS + ENCODED + WRITTEN:
        key = await stored_key(proxy, target)
        url = normalise_url(proxy.url + text)
        if url != url_of_key(key):
            wrong.append((text, "normalise_url", url, key))
        if keys_for_url(url, rules) != key:
            wrong.append((text, "keys_for_url", keys_for_url(url, rules), key))
        trace = js(await proxy.admin("POST", "/explain", json={"url": proxy.url + text}))
        if (trace["cache_key"], trace["decision"]["action"]) != (key, "serve"):
            wrong.append((text, "explain", (trace["cache_key"], trace["decision"]["action"]), key))
        copies = js(await proxy.admin("GET", f"/cache?url={quote(proxy.url + text, safe='')}"))
        if [v["key"] for v in copies["variants"]] != [key]:
            wrong.append((text, "GET /cache", copies["variants"], key))
        purged = js(await proxy.admin("POST", "/purge", json={"urls": [proxy.url + text]}))
        if await still_stored(proxy, key) or purged["purged"] != 1:
            wrong.append((text, "POST /purge", purged, key))
        if "#" not in target:  # PURGE sends the target: no fragment
            assert await stored_key(proxy, target) == key
            status = (await proxy.raw("PURGE", target)).status
            if await still_stored(proxy, key) or status != 200:
                wrong.append((text, "PURGE", status, key))
    assert wrong == [], "\n".join(map(str, wrong))


async def test_a_url_with_a_character_no_request_target_holds_is_refused_and_nothing_is_purged(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A raw space (or a control character) in a purge URL is a typo for its ``%XX`` form: a 400
    saying so, not a silent ``{"purged": 0}`` that leaves the entry cached."""
    origin.routes = AnyPath()  # type: ignore[assignment]
    proxy = await make_proxy()
    key = await stored_key(proxy, "/sp%20ace")
    for text in ("/sp ace", "/sp\tace"):
        for doc in ({"urls": [proxy.url + text]}, {"prefixes": [proxy.url + text]}):
            reply = await proxy.admin("POST", "/purge", json=doc)
            assert reply.status == 400, (doc, reply.body)
            error = js(reply)["error"]
            assert "which no request target can hold: write it percent-encoded (%" in error, error
        reply = await proxy.admin("GET", f"/cache?url={quote(proxy.url + text, safe='')}")
        assert reply.status == 400, reply.body
    assert key in set(proxy.runtime.storage.memory.keys())


async def test_warm_requests_each_url_as_a_client_does(origin: Origin, make_proxy: MakeProxy) -> None:
    """``cachegate warm`` stores each URL under the key a client's request for its target has,
    the one ``cachegate purge`` and ``explain`` name: its HTTP client must not re-encode the
    target (yarl decodes %41, upper-cases %3f, resolves ``..``). An empty query, which that
    client cannot send, is an error, not a warm of the URL without it (another key)."""
    from tests.console.test_warm import warm

    origin.routes = AnyPath()  # type: ignore[assignment]
    proxy = await make_proxy()
    texts = sorted({text for _, text in TARGETS})
    empty = {t for t in texts if t.split("#", 1)[0].endswith("?")}
    code, out, err = await warm("--proxy", proxy.url, "--urls", "-", "--progress", "none",
                                "--max-errors", str(len(empty)),
                                stdin="".join(f"{proxy.url}{t}\n" for t in texts).encode())
    await settle(proxy)
    stored = set(proxy.runtime.storage.memory.keys())
    wanted = {normalise_url(proxy.url + t) for t in texts if t not in empty}
    assert (sorted(stored - wanted), sorted(wanted - stored)) == ([], [])
    assert code == 0, (out, err)
    assert f"(an empty query ('?') cannot be sent {len(empty)})" in out, out


async def test_a_url_no_request_could_name_is_a_400_that_says_why_never_a_500(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """A non-ASCII host yarl cannot split was a 500 with a traceback; a host of 800 KB held the
    event loop for a second in IDNA; userinfo was "does not serve host 'user:pw@...'"; a
    non-ASCII IPv6 literal was quoted in punycode with "port can't be converted to integer"."""
    origin.routes = AnyPath()  # type: ignore[assignment]
    proxy = await make_proxy()
    key = await stored_key(proxy, "/x")
    authority = proxy.url.split("://", 1)[1]
    cases = [
        ("http://é[]/x", "is not a URL"),
        ("http://é[]@/x", "the URL holds userinfo"),
        ("http://[::1é]/x", "its IPv6 address '[::1é]' holds a non-ASCII character"),
        ("http://[::1é]:80/x", "its IPv6 address '[::1é]' holds a non-ASCII character"),
        (f"http://user:pw@{authority}/x", "the URL holds userinfo"),
        ("http://" + "a.é" * 2000 + "/", "a DNS name has at most 253"),
        (proxy.url + "/" + "a" * 9000, "no request the proxy takes names a URL over"),
        (proxy.url + "/" + "é" * 3000, "no request the proxy takes names a URL over"),
    ]
    for text, why in cases:
        for method, path, doc in (("POST", "/purge", {"urls": [proxy.url + "/x", text]}),
                                  ("POST", "/purge", {"prefixes": [text]}),
                                  ("POST", "/explain", {"url": text})):
            reply = await proxy.admin(method, path, json=doc)
            assert reply.status == 400, (text[:40], path, reply.body[:300])
            assert why in js(reply)["error"], (text[:40], js(reply)["error"][:300])
        reply = await proxy.admin("GET", f"/cache?url={quote(text, safe='')}")
        assert reply.status == 400 and why in js(reply)["error"], (text[:40], reply.body[:300])
    assert "pw@" not in caplog.text  # the password is not echoed into the admin log
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    assert key in set(proxy.runtime.storage.memory.keys())
