"""What the admin API answers to a wrong method, and what it logs of the requests it is sent."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from proxy.web.admin import ADMIN, AdminContext, RefusalLog
from tests.admin.util import js, settle
from tests.conftest import MakeProxy
from tests.harness import Clock, Origin, Proxy


@pytest.mark.parametrize(("method", "path", "allow", "takes"), [
    ("GET", "/purge", {"POST"}, "POST"),
    ("PUT", "/purge", {"POST"}, "POST"),
    ("DELETE", "/purge", {"POST"}, "POST"),
    ("GET", "/reload", {"POST"}, "POST"),
    ("POST", "/stats", {"GET", "HEAD"}, "GET or HEAD"),
    ("DELETE", "/explain", {"GET", "HEAD", "POST"}, "GET or HEAD or POST"),
])
async def test_a_wrong_method_is_405_with_allow_and_says_which_methods_the_path_takes(
        proxy: Proxy, method: str, path: str, allow: set[str], takes: str) -> None:
    """A 405 must say Allow (RFC 9110 §15.5.6); it was a bare "Method Not Allowed" without it."""
    reply = await proxy.admin(method, path, json={})
    assert reply.status == 405, reply.body
    assert set(reply.headers["Allow"].split(",")) == allow
    assert js(reply) == {"error": f"{method} is not allowed on {path}: it takes {takes}"}
    assert reply.headers["Content-Type"].startswith("application/json")


def admin_context(proxy: Proxy) -> AdminContext:
    for runner in proxy.listeners.runners:
        app = getattr(runner, "app", None)
        if app is not None and ADMIN in app:
            return app[ADMIN]
    raise AssertionError("no admin app")


def admin_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "cachegate.admin"]


TOKEN = "s3cret-admin-token-0123456789"


async def test_each_state_changing_admin_request_is_logged_with_who_what_and_the_outcome(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """Purges and reloads left no trace in any log: who purged what could not be told."""
    caplog.set_level(logging.INFO, logger="cachegate.admin")
    origin.route("/p", body=b"p", headers={"Cache-Control": "max-age=300"})
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await proxy.get("/p")).status == 200
    await settle(proxy)
    reply = await proxy.admin("POST", "/purge", json={"urls": [proxy.url + "/p"]}, headers=auth)
    assert js(reply)["purged"] == 1
    tags = ["t1", "t2", "t3", "t4", "t5"]
    assert (await proxy.admin("POST", "/purge", json={"tags": tags, "soft": True}, headers=auth)).status == 200
    assert (await proxy.admin("POST", "/purge", json={"urls": ["nope"]}, headers=auth)).status == 400
    assert (await proxy.admin("POST", "/reload", headers=auth)).status in (200, 501)
    for path in ("/stats", "/metrics", "/healthz", "/cluster"):  # read-only: not logged
        await proxy.admin("GET", path, headers=auth)
    await proxy.admin("POST", "/explain", json={"url": proxy.url + "/p"}, headers=auth)
    lines = admin_lines(caplog)
    assert [level for level, _ in lines] == [logging.INFO] * 4, lines
    assert lines[0][1] == f"admin POST /purge from 127.0.0.1: 200: 1 URL ('{proxy.url}/p'); purged 1"
    assert lines[1][1] == ("admin POST /purge from 127.0.0.1: 200: 5 tags ('t1', 't2', 't3', ... 2 more), "
                           "soft; purged 0")
    assert lines[2][1].startswith("admin POST /purge from 127.0.0.1: 400: 'nope'"), lines[2]
    assert lines[3][1].startswith("admin POST /reload from 127.0.0.1: "), lines[3]
    assert TOKEN not in caplog.text


async def test_refused_admin_requests_are_logged_with_the_reason_within_a_budget(
        make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """A refused request is a warning with its reason, but a client sending them as fast as it
    can gets ten lines a minute, the next one saying how many were left out."""
    caplog.set_level(logging.INFO, logger="cachegate.admin")
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    clock = Clock()
    admin_context(proxy).refusals = RefusalLog(burst=10, every=60.0, clock=clock)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await proxy.admin("GET", "/purge", headers=auth)).status == 405
    for _ in range(30):  # no token: 401 (not a guess: no 429 comes of it)
        assert (await proxy.admin("POST", "/purge", json={"all": True})).status == 401
    lines = admin_lines(caplog)
    assert len(lines) == 10 and all(level == logging.WARNING for level, _ in lines), lines
    assert lines[0][1] == ("admin GET /purge from 127.0.0.1 refused: 405 GET is not allowed on /purge: "
                           "it takes POST")
    assert lines[1][1] == ("admin POST /purge from 127.0.0.1 refused: 401 admin token required: "
                           "Authorization: Bearer <token>")
    clock.advance(60)
    assert (await proxy.admin("POST", "/reload", headers={"Host": "evil.example"})).status == 403
    last = admin_lines(caplog)[-1][1]
    assert last.startswith("admin POST /reload from 127.0.0.1 refused: 403 Host 'evil.example' is not"), last
    assert last.endswith(" (21 more from loopback before it not logged)"), last


async def test_answers_to_requests_without_a_token_share_the_budget_and_a_token_is_logged_whole(
        make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """The console login is public: its 400s (a body without a token) compared no token, so
    neither the refusal budget nor the wrong-token limit applied, and each one was an INFO line
    (500 requests, 500 lines). Now every answer to a request that did not authenticate is in
    the budget; a right login and an authenticated purge are still logged, whatever was spent."""
    caplog.set_level(logging.INFO, logger="cachegate.admin")
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    for _ in range(40):
        assert (await proxy.admin("POST", "/console/api/login", json={"x": 1})).status == 400
    lines = admin_lines(caplog)
    assert len(lines) == 10, lines
    assert lines[0] == (logging.INFO, "admin POST /console/api/login from 127.0.0.1: 400: the body must "
                                      'be {"token": "<admin token>"}')
    assert (await proxy.admin("POST", "/console/api/login", json={"token": TOKEN})).status == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await proxy.admin("POST", "/purge", json={"tags": ["t"]}, headers=auth)).status == 200
    lines = admin_lines(caplog)
    assert [text for _, text in lines[10:]] == [
        "admin POST /console/api/login from 127.0.0.1: 200",
        "admin POST /purge from 127.0.0.1: 200: 1 tag ('t'); purged 0"], lines
    await proxy.close()  # what is still counted is written at close
    assert admin_lines(caplog)[-1] == (
        logging.WARNING, "admin: 30 more requests that did not authenticate were not logged (over 10 "
                         "lines a minute per client network, 100 in all): loopback: 30")


async def test_refusals_left_out_are_counted_in_a_line_when_the_minute_ends_without_another(
        make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """The count of refusals over the budget was only in the next logged refusal, which need
    never come: 300 refusals after the first ten were never mentioned."""
    caplog.set_level(logging.INFO, logger="cachegate.admin")
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    admin_context(proxy).refusals = RefusalLog(burst=3, every=0.5)
    for _ in range(20):
        assert (await proxy.admin("POST", "/purge", json={"all": True})).status == 401
    assert len(admin_lines(caplog)) == 3
    for _ in range(500):  # no request comes; the minute (here half a second) ends
        if len(admin_lines(caplog)) > 3:
            break
        await asyncio.sleep(0.02)
    assert admin_lines(caplog)[3:] == [(
        logging.WARNING, "admin: 17 more requests that did not authenticate were not logged (over 3 "
                         "lines a minute per client network, 30 in all): loopback: 17")]


class Peer:
    """What ``RefusalLog`` reads of a request: its address, method and path."""

    def __init__(self, remote: str) -> None:
        self.remote, self.method, self.raw_path = remote, "POST", "/purge"


async def test_the_budget_is_per_client_network_and_bounded_in_all(
        caplog: pytest.LogCaptureFixture) -> None:
    """One process-wide budget let a client spend it on decoys, and the refusals of everyone
    else that minute went unlogged."""
    caplog.set_level(logging.INFO, logger="cachegate.admin")
    clock = Clock()
    refusals = RefusalLog(burst=2, every=60.0, clock=clock, total=5)
    refusals.MAX_NETWORKS = 3
    for _ in range(50):  # the attacker's network spends its own lines, not 10.0.1.0/24's
        refusals.refused(Peer("10.0.0.7"), 401, "x")  # type: ignore[arg-type]
    refusals.refused(Peer("10.0.1.9"), 401, "y")  # type: ignore[arg-type]
    refusals.refused(Peer("10.0.0.8"), 401, "x")  # type: ignore[arg-type]
    for n in range(2, 6):  # networks: the total caps them, the oldest are forgotten (counted)
        refusals.refused(Peer(f"10.0.{n}.1"), 401, "z")  # type: ignore[arg-type]
    lines = admin_lines(caplog)
    assert [text.split(" refused")[0] for _, text in lines] == [
        "admin POST /purge from 10.0.0.7", "admin POST /purge from 10.0.0.7",
        "admin POST /purge from 10.0.1.9", "admin POST /purge from 10.0.2.1",
        "admin POST /purge from 10.0.3.1"], lines
    refusals.close()
    assert admin_lines(caplog)[-1][1] == (
        "admin: 51 more requests that did not authenticate were not logged (over 2 lines a minute per "
        "client network, 5 in all): 10.0.5.0/24: 1, 10.0.4.0/24: 1, 49 from other networks")


async def reload_totals(proxy: Proxy) -> str:
    text = (await proxy.admin("GET", "/metrics")).body.decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("cachegate_config_reloads_total"))


@pytest.mark.parametrize("body, message", [
    (b'{"dry_run": true}', "unknown field(s): dry_run; POST /reload takes none (send no body or {}): "
                           "nothing was done"),
    (b'{"validate_only": true, "a": 1}', "unknown field(s): a, validate_only;"),
    (b"not json at all", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON: not UTF-8"),
    (b"null", "POST /reload takes no fields: send no body or {}, not null"),
    (b"[]", "not an array"),
    (b" ", "invalid JSON"),
])
async def test_a_reload_with_a_body_it_does_not_take_is_400_and_reloads_nothing(
        origin: Origin, make_proxy: MakeProxy, body: bytes, message: str) -> None:
    """/reload never read its body: a 'dry run' reloaded for real, and so did garbage."""
    from proxy.config import Overrides
    from proxy.web.server import install_reloader

    proxy = await make_proxy()
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    before = await reload_totals(proxy)
    reply = await proxy.admin("POST", "/reload", data=body)
    assert reply.status == 400, reply.body
    assert message in js(reply)["error"], js(reply)
    assert await reload_totals(proxy) == before  # no reload was tried


@pytest.mark.parametrize("body", [None, b"{}", b'{ }'])
async def test_a_reload_with_no_body_or_an_empty_object_reloads(
        origin: Origin, make_proxy: MakeProxy, body: bytes | None) -> None:
    from proxy.config import Overrides
    from proxy.web.server import install_reloader

    proxy = await make_proxy()
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    reply = await proxy.admin("POST", "/reload", data=body)
    assert (reply.status, js(reply).get("reloaded")) == (200, True), reply.body
    assert 'cachegate_config_reloads_total{result="success"} 1.0' in await reload_totals(proxy)


@pytest.mark.parametrize(("path", "connection"), [
    ("/healthz", "keep-alive, close"), ("/healthz", "Close, Keep-Alive"),
    ("/stats", "keep-alive,close"), ("/", "keep-alive, close"),  # (the console)
    ("/nowhere", "keep-alive, close"),  # (a 404)
])
async def test_a_1_0_admin_request_asking_to_close_beside_keep_alive_ends_the_connection(
        proxy: Proxy, connection: str, path: str) -> None:
    """``close`` wins over ``keep-alive`` (RFC 9112 §9.3), for HTTP/1.0 too, on the admin
    listener (the console's pages included) as on the client listener: llhttp reads ``close``
    for HTTP/1.1 only, so the reply said keep-alive and a request pipelined behind was answered."""
    host, port = proxy.listeners.admin_addresses[0]
    ask = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nConnection: {connection}\r\n\r\n"
    behind = f"GET /healthz HTTP/1.0\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n\r\n"
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write((ask + behind).encode())
        data = await asyncio.wait_for(reader.read(), 20)  # up to the server's close
    finally:
        writer.close()
    assert data.count(b"HTTP/1.") == 1, data
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    assert "connection: keep-alive" not in head, head


async def test_every_admin_answer_says_cache_control_no_store(origin: Origin, make_proxy: MakeProxy) -> None:
    """Only the console's own calls said ``no-store``: /cache, /explain, /purge and /reload (a
    URL's stored variants, its tags, what was purged) were answers a browser or a proxy between
    it and the admin listener was free to keep. Every answer now says it, errors included."""
    from proxy.config import Overrides
    from proxy.web.server import install_reloader

    origin.route("/p", body=b"p", headers={"Cache-Control": "max-age=300", "Surrogate-Key": "t"})
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await proxy.get("/p")).status == 200
    await settle(proxy)
    url = proxy.url + "/p"
    calls: list[tuple[str, str, dict[str, Any], int]] = [
        ("GET", f"/cache?url={url}", {}, 200),
        ("POST", "/explain", {"json": {"url": url}}, 200),
        ("GET", f"/explain?url={url}", {}, 200),
        ("POST", "/purge", {"json": {"urls": [url]}}, 200),
        ("POST", "/reload", {}, 200),
        ("GET", "/stats", {}, 200),
        ("GET", "/upstreams", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/healthz", {}, 200),
        ("GET", "/", {}, 200),  # the console's page, its script and its calls
        ("GET", "/console/static/console.js", {}, 200),
        ("GET", "/console/api/live", {}, 200),
        ("GET", "/cluster", {}, 404),  # (not in cluster mode) and the errors
        ("GET", "/purge", {}, 405),
        ("POST", "/purge", {"data": b"{"}, 400),
        ("GET", "/cache", {}, 400),
    ]
    for method, path, kwargs, status in calls:
        reply = await proxy.admin(method, path, headers=auth, **kwargs)
        assert reply.status == status, (path, reply.status, reply.body[:200])
        assert reply.headers.getall("Cache-Control", []) == ["no-store"], (method, path, reply.headers)
    refused = await proxy.admin("GET", f"/cache?url={url}")  # no token: 401
    assert refused.status == 401 and refused.headers.getall("Cache-Control", []) == ["no-store"]
