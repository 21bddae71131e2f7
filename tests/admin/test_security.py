"""The admin API is closed to strangers: token on every endpoint but /healthz, loopback without one,
and bad input answered 400 with nothing purged."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.web.admin import token_matches
from tests.admin.util import absolute, js, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy

TOKEN = "t0ken-with-some-length"
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("GET", "/metrics", None), ("GET", "/stats", None), ("GET", "/cache?url=http://x/", None),
    ("GET", "/explain?url=http://x/", None), ("POST", "/explain", {"url": "http://x/"}),
    ("POST", "/purge", {"all": True}), ("POST", "/reload", None),
]


@pytest.fixture
async def locked(origin: Origin, make_proxy: MakeProxy) -> Proxy:
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    origin.route("/keep", body=b"k", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/keep")
    await settle(proxy)
    return proxy


@pytest.mark.parametrize("method, path, body", ENDPOINTS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}",
                                           f"Bearer {TOKEN}{TOKEN}", "Bearer "])
async def test_every_endpoint_but_healthz_needs_the_token(
        locked: Proxy, method: str, path: str, body: Any, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    reply = await locked.admin(method, path, json=body, headers=headers)
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="cachegate"'
    assert "admin token required" in js(reply)["error"]
    assert (await locked.get("/keep")).x_cache == "HIT"  # nothing was purged


async def test_with_the_token_every_endpoint_answers(locked: Proxy) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await locked.admin("GET", "/healthz")).status == 200  # open: load balancers probe it
    for method, path, body in ENDPOINTS:
        path = path.replace("http://x/", absolute(locked, "/keep"))
        body = {k: absolute(locked, "/keep") if v == "http://x/" else v for k, v in (body or {}).items()} or None
        reply = await locked.admin(method, path, json=body, headers=auth)
        assert reply.status not in (401, 403), (path, reply.body)
    metrics = (await locked.admin("GET", "/metrics", headers=auth)).body.decode()
    assert "cachegate_admin_unauthorized_total 0.0" in metrics


def test_the_token_is_compared_whatever_its_length() -> None:
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(None, TOKEN)
    assert not token_matches("", TOKEN)
    assert not token_matches(TOKEN + "x", TOKEN)
    assert not token_matches("\udcff", TOKEN)  # undecodable header bytes do not raise


@pytest.mark.parametrize("admin, override", [
    ("admin: {listen: '0.0.0.0:0'}\n", []),
    ("admin: {listen: '127.0.0.1:0'}\n", ["--admin-listen", "0.0.0.0:0"]),
    ("admin: {listen: '[::]:0'}\n", []),
])
async def test_without_a_token_cachegate_run_refuses_a_non_loopback_admin_listener(
        tmp_path: Path, admin: str, override: list[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nupstreams: [{url: 'http://127.0.0.1:9'}]\n" + admin)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), *override,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "is not loopback and admin.token is not set: the admin API would be open to anyone" in err.decode()
    assert "listening" not in out.decode()


@pytest.mark.parametrize("body", [
    b'{"urls": ["http://a/"], "tags": "t"}',
    b'{"tags": [1]}',
    b'{"tags": [""]}',
    b'{"prefixes": "http://a/"}',
    b'{"prefixes": ["ftp://a/"]}',
    b'{"all": "yes"}',
    b'{"all": 1}',
    b'{"urls": [null]}',
    b'{"url": ["http://a/"]}',
    b'{"all": true, "hard": true}',
    b'"all"',
    b"null",
    b"\xff\xfe",
])
async def test_bad_purge_bodies_get_a_json_400_and_purge_nothing(origin: Origin, proxy: Proxy, body: bytes) -> None:
    origin.route("/keep", body=b"k", headers={"Cache-Control": "max-age=60"})
    await proxy.get("/keep")
    await settle(proxy)
    reply = await proxy.admin("POST", "/purge", data=body)
    assert reply.status == 400
    assert reply.headers["Content-Type"].startswith("application/json")
    assert js(reply)["error"]
    assert (await proxy.get("/keep")).x_cache == "HIT"


async def test_an_oversized_purge_body_is_refused(origin: Origin, proxy: Proxy) -> None:
    import io

    reply = await proxy.admin("POST", "/purge", data=io.BytesIO(b'{"tags": ["' + b"x" * (2 << 20) + b'"]}'))
    assert reply.status in (400, 413)
    assert "error" in js(reply)


@pytest.mark.parametrize("path", ["/metrics?x=1", "/stats?top=ten", "/cache", "/nope"])
async def test_bad_requests_elsewhere_get_json_errors(proxy: Proxy, path: str) -> None:
    reply = await proxy.admin("GET", path)
    assert reply.status in (400, 404)
    assert "error" in js(reply)


@pytest.mark.parametrize("value", ["%C2%B2", "%E2%91%A0", "%D9%A1%D9%A2", "1%C2%B2"])
async def test_digits_that_int_refuses_are_a_400_not_an_internal_error(proxy: Proxy, value: str) -> None:
    """str.isdigit() accepts '²', '①' and Arabic-Indic digits; int() does not."""
    reply = await proxy.admin("GET", f"/stats?top={value}")
    assert reply.status == 400, reply.body
    assert js(reply)["error"] == "'top' must be a whole number from 0 to 1000"
