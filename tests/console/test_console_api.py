"""The console on the admin listener, without a browser: the page and its headers, login and
sessions, CSRF on every state-changing call, and the live numbers after real traffic."""

from __future__ import annotations

import asyncio
import re
from http.cookies import SimpleCookie

import pytest

from proxy.config import Overrides
from proxy.live import Series
from proxy.metrics import REQUEST_BUCKETS
from proxy.web.console import CONSOLE, COOKIE, CSP, LiveFeed
from proxy.web.server import install_reloader
from tests.admin.util import absolute, js, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

TOKEN = "console-t0ken-of-some-length"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def locked(origin: Origin, make_proxy: MakeProxy) -> Proxy:
    origin.route("/keep", body=b"k" * 100, headers={"Cache-Control": "max-age=60"})
    origin.route("/private", body=b"p", headers={"Cache-Control": "private"})
    return await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")


async def login(proxy: Proxy) -> tuple[dict[str, str], str]:
    """Log in as the page does: the Cookie header to send, and the CSRF token."""
    reply = await proxy.admin("POST", "/console/api/login", json={"token": TOKEN})
    assert reply.status == 200, reply.body
    cookie = SimpleCookie(reply.headers["Set-Cookie"])
    return {"Cookie": f"{COOKIE}={cookie[COOKIE].value}"}, js(reply)["csrf"]


def feed(proxy: Proxy) -> LiveFeed:
    """The console's sampler, its background loop stopped: the test samples when it wants."""
    for runner in proxy.listeners.runners:
        app = getattr(runner, "app", None)
        if app is not None and CONSOLE in app:
            live: LiveFeed = app[CONSOLE].feed
            if live.task is not None:
                live.task.cancel()
            live.series = Series(REQUEST_BUCKETS)
            return live
    raise AssertionError("no console")


def replace_in(path: str, old: str, new: str) -> None:
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(old, new))


async def test_the_page_and_its_files_are_public_hold_no_data_and_forbid_inline_script(locked: Proxy) -> None:
    page = await locked.admin("GET", "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.body.decode()
    assert page.headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "default-src 'none'" in CSP
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    # Every script is a file of this origin; no inline script, no handler attributes, nothing remote.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/console/static/console.js" defer>']
    assert not re.search(r"\son[a-z]+=", html)
    assert all(ref.startswith("/console/static/") or ref == "data:," for ref in re.findall(r'(?:src|href)="([^"]*)"', html))
    assert "style=" not in html
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        reply = await locked.admin("GET", f"/console/static/{name}")
        assert reply.status == 200 and reply.headers["Content-Type"].startswith(kind)
        assert reply.headers["Content-Security-Policy"] == CSP
        assert b"http://" not in reply.body.replace(b"http://www.w3.org/2000/svg", b"")
    for path in ("/console/static/../admin.py", "/console/static/..%2Fconsole.py", "/console/static/console.html"):
        reply = await locked.admin("GET", path)  # only the page's own files, by name
        assert reply.status in (401, 404) and b"import" not in reply.body, path
    assert (await locked.admin("GET", "/console/static/nope.js")).status == 404


async def test_without_a_session_the_console_api_gives_nothing(locked: Proxy) -> None:
    session = js(await locked.admin("GET", "/console/api/session"))
    assert session == {"authenticated": False, "token_required": True}
    assert (await locked.admin("GET", "/console/api/live")).status == 401
    forged = {"Cookie": f"{COOKIE}=made-up"}
    assert (await locked.admin("GET", "/console/api/live", headers=forged)).status == 401
    assert (await locked.admin("GET", "/stats", headers=forged)).status == 401


async def test_login_sets_an_httponly_samesite_strict_cookie_and_gives_a_csrf_token(locked: Proxy) -> None:
    wrong = await locked.admin("POST", "/console/api/login", json={"token": "nope"})
    assert wrong.status == 401 and "Set-Cookie" not in wrong.headers
    form = await locked.admin("POST", "/console/api/login", data=f"token={TOKEN}",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 415 and "Set-Cookie" not in form.headers  # an HTML form cannot log in
    bad = await locked.admin("POST", "/console/api/login", data="{", headers=JSON)
    assert bad.status == 400
    reply = await locked.admin("POST", "/console/api/login", json={"token": TOKEN})
    morsel = SimpleCookie(reply.headers["Set-Cookie"])[COOKIE]
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    cookie = {"Cookie": f"{COOKIE}={morsel.value}"}
    both = {**cookie, "X-CSRF-Token": js(reply)["csrf"]}
    session = js(await locked.admin("GET", "/console/api/session", headers=both))
    assert session == {"authenticated": True, "token_required": True}  # the secret is not repeated
    assert (await locked.admin("GET", "/console/api/live", headers=both)).status == 200
    assert (await locked.admin("GET", "/stats", headers=both)).status == 200


async def test_the_session_cookie_alone_opens_nothing_not_even_a_get(locked: Proxy) -> None:
    """Browsers send a host's cookies to every port of it: another web app on this machine
    gets the session cookie. With it alone, or with a wrong secret, nothing answers, and the
    session call does not hand the secret out."""
    await locked.get("/keep")
    await settle(locked)
    cookie, csrf = await login(locked)
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
        session = js(await locked.admin("GET", "/console/api/session", headers={**cookie, **headers}))
        assert session == {"authenticated": False, "token_required": True}
        for path in ("/console/api/live", "/stats", "/metrics", "/upstreams",
                     f"/cache?url={absolute(locked, '/keep')}"):
            reply = await locked.admin("GET", path, headers={**cookie, **headers})
            assert reply.status == 401 and "X-CSRF-Token" in js(reply)["error"], (path, reply.body)
    assert (await locked.admin("GET", "/stats", headers={**cookie, "X-CSRF-Token": csrf})).status == 200
    metrics = (await locked.admin("GET", "/metrics", headers=AUTH)).body.decode()
    assert 'cachegate_admin_refused_total{reason="csrf"} 15.0' in metrics  # 3 headers × 5 paths


async def test_every_state_changing_call_needs_the_sessions_csrf_token(locked: Proxy) -> None:
    await locked.get("/keep")
    await settle(locked)
    cookie, csrf = await login(locked)
    url = absolute(locked, "/keep")
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
        reply = await locked.admin("POST", "/purge", json={"urls": [url]}, headers={**cookie, **headers})
        assert reply.status == 401 and "X-CSRF-Token" in js(reply)["error"]
        assert (await locked.admin("POST", "/reload", json={}, headers={**cookie, **headers})).status == 401
        assert (await locked.admin("POST", "/console/api/logout", headers={**cookie, **headers})).status == 401
    assert (await locked.get("/keep")).x_cache == "HIT"  # nothing was purged
    _, other_csrf = await login(locked)
    assert other_csrf != csrf  # one session's token does not open another's
    reply = await locked.admin("POST", "/purge", json={"urls": [url]}, headers={**cookie, "X-CSRF-Token": other_csrf})
    assert reply.status == 401
    reply = await locked.admin("POST", "/purge", json={"urls": [url]}, headers={**cookie, "X-CSRF-Token": csrf})
    assert reply.status == 200 and js(reply)["purged"] == 1
    assert (await locked.get("/keep")).x_cache == "MISS"


async def test_logout_ends_the_session(locked: Proxy) -> None:
    cookie, csrf = await login(locked)
    reply = await locked.admin("POST", "/console/api/logout", headers={**cookie, "X-CSRF-Token": csrf})
    assert reply.status == 200 and f"{COOKIE}=\"\"" in reply.headers["Set-Cookie"]
    both = {**cookie, "X-CSRF-Token": csrf}
    assert (await locked.admin("GET", "/console/api/live", headers=both)).status == 401
    assert not js(await locked.admin("GET", "/console/api/session", headers=both))["authenticated"]


async def test_a_reload_that_changes_the_token_ends_every_session(locked: Proxy) -> None:
    install_reloader(locked.runtime, locked.config_path, Overrides())
    cookie, csrf = await login(locked)
    replace_in(locked.config_path, TOKEN, TOKEN + "-new")
    reply = await locked.admin("POST", "/reload", headers={**cookie, "X-CSRF-Token": csrf})
    assert reply.status == 200
    assert (await locked.admin("GET", "/console/api/live", headers={**cookie, "X-CSRF-Token": csrf})).status == 401


async def test_without_an_admin_token_the_console_opens_on_the_dashboard(proxy: Proxy) -> None:
    session = js(await proxy.admin("GET", "/console/api/session"))
    assert session == {"authenticated": True, "token_required": False}
    assert (await proxy.admin("GET", "/console/api/live")).status == 200


async def test_live_numbers_follow_real_traffic(locked: Proxy) -> None:
    live = feed(locked)
    await live.sample()  # the baseline
    await locked.get("/keep")
    for _ in range(32):
        assert (await locked.get("/keep")).x_cache == "HIT"
    fast = locked.listeners.runners[0].server.fast  # type: ignore[attr-defined]
    assert fast.answered == 32  # each hit took the fast path, which sampled the 16th and the 32nd
    await locked.get("/private")
    await locked.get("/missing")
    await settle(locked)
    await live.sample()
    body = js(await locked.admin("GET", "/console/api/live?top=5", headers=AUTH))
    assert body["seq"] == 1 and len(body["points"]) == 1
    point = body["points"][0]
    assert point["requests"] == {"HIT": 32, "MISS": 3}
    assert point["origin"] == 3 and point["fills"] == 1
    assert point["bytes"]["memory"] == 3200 and point["bytes"]["upstream"] >= 100
    minute = body["last_minute"]
    assert minute["hit_ratio"] == round(32 / 35, 4) and minute["request_offload"] == round(32 / 35, 4)
    assert minute["byte_offload"] == round(3200 / (3200 + point["bytes"]["upstream"]), 4)
    assert body["latency"]["MISS"]["count"] == 3 and body["latency"]["HIT"]["count"] == 32
    assert 0 < body["latency"]["HIT"]["p50"] <= body["latency"]["HIT"]["p99"]
    top = body["top_urls"][0]
    assert top == {"url": absolute(locked, "/keep"), "requests": 33, "hits": 32, "hit_ratio": round(32 / 33, 4)}
    reasons = {r["reason"]: r for r in body["not_stored"]}
    assert reasons["PRIVATE"]["example"] == absolute(locked, "/private")
    assert body["storage"]["memory"]["entries"] >= 1 and body["storage"]["memory"]["budget"] == 64 << 20
    assert body["storage"]["disk"]["budget"] == 512 << 20
    assert [u["available"] for u in body["upstreams"]] == [True]
    # The page asks only for what is new.
    again = js(await locked.admin("GET", f"/console/api/live?since={body['seq']}", headers=AUTH))
    assert again["points"] == []


async def test_fast_path_hits_are_sampled_into_the_top_list_and_the_latency(locked: Proxy) -> None:
    await locked.get("/keep")
    await settle(locked)
    live = feed(locked)
    await live.sample()
    for _ in range(64):
        await locked.get("/keep")
    await live.sample()
    fast = locked.listeners.runners[0].server.fast  # type: ignore[attr-defined]
    assert fast is not None and fast.answered >= 48  # most hits took the fast path
    body = js(await locked.admin("GET", "/console/api/live", headers=AUTH))
    assert body["points"][-1]["requests"]["HIT"] == 64  # counted exactly
    # The fast path timed one hit in 16 and counted it 16 times: the histogram and the top list
    # agree with the exact count to within one sample.
    timed = body["latency"]["HIT"]["count"]
    assert abs(timed - 64) <= 16, timed
    hits = body["top_urls"][0]["hits"]
    assert abs(hits - 64) <= 16, hits


async def test_bad_parameters_are_refused(locked: Proxy) -> None:
    for query in ("since=-1", "top=1000", "since=x", "other=1"):
        reply = await locked.admin("GET", f"/console/api/live?{query}", headers=AUTH)
        assert reply.status == 400, query
        assert "error" in js(reply)
    # Digits to str.isdigit() ('²', '①', Arabic-Indic two), not to int(): a 400, not a 500.
    for name, limit in (("since", 1 << 62), ("top", 200)):
        for value in ("%C2%B2", "%E2%91%A0", "%D9%A2", "1%C2%B2"):
            reply = await locked.admin("GET", f"/console/api/live?{name}={value}", headers=AUTH)
            assert reply.status == 400, (name, value, reply.body)
            assert js(reply)["error"] == f"{name!r} must be a whole number from 0 to {limit}"


async def test_a_csrf_header_that_is_not_utf8_is_refused_not_an_error(locked: Proxy) -> None:
    cookie, _ = await login(locked)
    host, port = locked.listeners.admin_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Cookie: {cookie['Cookie']}\r\n".encode()
                 + b"X-CSRF-Token: \xff\xfe\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


@pytest.mark.parametrize("body, message", [
    (b'{"everywhere": true}', "unknown field(s): everywhere; POST /console/api/logout takes none"),
    (b"bye", "invalid JSON"),
])
async def test_a_logout_with_a_body_it_does_not_take_is_400_and_the_session_stays(
        locked: Proxy, body: bytes, message: str) -> None:
    cookie, csrf = await login(locked)
    both = {**cookie, "X-CSRF-Token": csrf}
    reply = await locked.admin("POST", "/console/api/logout", headers=both, data=body)
    assert reply.status == 400 and message in js(reply)["error"], reply.body
    assert js(await locked.admin("GET", "/console/api/session", headers=both))["authenticated"]
    reply = await locked.admin("POST", "/console/api/logout", headers=both, json={})  # as the page sends
    assert reply.status == 200
    assert not js(await locked.admin("GET", "/console/api/session", headers=both))["authenticated"]


async def test_a_step_of_the_system_clock_back_is_no_negative_uptime_or_rate(
        locked: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uptime and a point's seconds (``dt``, which the console and ``cachegate top`` divide by)
    were read on the wall clock: a step back of an hour (NTP, a VM resumed) showed uptime
    -3593 s and a point of -3600 s. They are monotonic now; only a point's label ``t`` is the
    wall clock's."""
    import time

    import proxy.inspection
    import proxy.web.console

    class Stepped:
        offset = 0.0

        def time(self) -> float:
            return time.time() + self.offset

        def monotonic(self) -> float:
            return time.monotonic()

    clock = Stepped()
    monkeypatch.setattr(proxy.inspection, "time", clock)
    monkeypatch.setattr(proxy.web.console, "time", clock)
    live = feed(locked)
    await live.sample()  # the baseline
    clock.offset = -3600.0
    await locked.get("/keep")
    await settle(locked)
    await live.sample()
    body = js(await locked.admin("GET", "/console/api/live", headers=AUTH))
    point = body["points"][-1]
    assert 0 <= point["dt"] < 60 and point["requests"] == {"MISS": 1}
    assert abs(point["t"] - (time.time() - 3600)) < 60  # (the label: the wall clock's)
    assert 0 <= body["last_minute"]["seconds"] < 60
    assert 0 <= body["uptime_seconds"] < 3000
    stats = js(await locked.admin("GET", "/stats", headers=AUTH))
    assert 0 <= stats["uptime_seconds"] < 3000
