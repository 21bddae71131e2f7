"""What the admin API answers to a wrong method, and what it logs of the requests it is sent."""

from __future__ import annotations

import logging

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
    assert last.endswith(" (21 more refused before it not logged)"), last
