"""The upstream pool: balancing, retries, passive and active health, TLS, all-down behaviour."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from yarl import URL

from proxy.upstream import Selector, Upstream
from tests.conftest import MakeProxy
from tests.harness import Origin


def test_weighted_round_robin_spreads_by_weight_and_interleaves() -> None:
    ups = [Upstream(URL("http://a"), 3), Upstream(URL("http://b"), 1)]
    sel = Selector()
    picks = [sel.choose(ups, 0.0).name for _ in range(8)]  # type: ignore[union-attr]
    assert picks.count("http://a") == 6 and picks.count("http://b") == 2
    assert "http://b" in picks[:4]  # smooth: b does not wait until a's three turns are used


def test_least_conn_picks_the_least_loaded_per_weight() -> None:
    a, b = Upstream(URL("http://a"), 1, in_flight=5), Upstream(URL("http://b"), 2, in_flight=4)
    assert Selector("least_conn").choose([a, b], 0.0) is b
    a.in_flight = 1
    assert Selector("least_conn").choose([a, b], 0.0) is a


def test_unavailable_upstreams_get_no_traffic() -> None:
    a, b = Upstream(URL("http://a")), Upstream(URL("http://b"), healthy=False)
    c = Upstream(URL("http://c"), down_until=100.0)
    sel = Selector()
    assert {sel.choose([a, b, c], 50.0).name for _ in range(5)} == {"http://a"}  # type: ignore[union-attr]
    assert sel.choose([b, c], 50.0) is None
    assert sel.choose([b, c], 150.0) is c


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def second() -> AsyncIterator[Origin]:
    o = Origin()
    await o.start()
    yield o
    await o.stop()


async def test_idempotent_requests_are_retried_on_another_upstream(
    origin: Origin, second: Origin, make_proxy: MakeProxy
) -> None:
    second.route("/r", body=b"from b")
    proxy = await make_proxy(config="upstream: {retries: 1, passive: {failures: 0}}\n",
                             upstreams=[closed_port_url(), second.url])
    for _ in range(4):
        reply = await proxy.get("/r")
        assert (reply.status, reply.body) == (200, b"from b")
    assert second.count("/r") == 4
    # A POST with a streamed body is sent once: when that upstream is the dead one, it is a 502.
    statuses = {(await proxy.request("POST", "/r", data=b"x")).status for _ in range(4)}
    assert statuses == {200, 502}


async def test_consecutive_5xx_take_an_upstream_out_for_a_cooldown(
    origin: Origin, second: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/p", status=500, body=b"broken")
    second.route("/p", body=b"fine")
    proxy = await make_proxy(config="upstream: {passive: {failures: 2, cooldown: 30s}}\n",
                             upstreams=[origin.url, second.url])
    for _ in range(10):
        await proxy.get("/p")
    assert origin.count("/p") == 2  # then it was out of rotation
    assert second.count("/p") == 8
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert f'cachegate_upstream_up{{upstream="{origin.url}"}} 0.0' in metrics
    assert f'cachegate_upstream_errors_total{{kind="status_500",upstream="{origin.url}"}} 2.0' in metrics


async def test_active_health_checks_eject_and_return_an_upstream(
    origin: Origin, second: Origin, make_proxy: MakeProxy
) -> None:
    for o in (origin, second):
        o.route("/healthz", body=b"ok")
        o.route("/h", body=o.url.encode())
    proxy = await make_proxy(
        config="upstream: {health: {path: /healthz, interval: 100ms, timeout: 200ms, healthy: 2, "
               "unhealthy: 2}, passive: {failures: 0}, retries: 0}\n",
        upstreams=[origin.url, second.url])
    first = proxy.runtime.pool.upstreams[0]
    await origin.stop()
    await wait_for(lambda: not first.healthy)
    bodies = {(await proxy.get("/h")).body for _ in range(6)}
    assert bodies == {second.url.encode()}  # no request was sent to the dead one
    await origin.start(port=origin.port)
    await wait_for(lambda: first.healthy)
    bodies = {(await proxy.get("/h")).body for _ in range(6)}
    assert bodies == {origin.url.encode(), second.url.encode()}


async def wait_for(condition: object, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_with_every_upstream_down_it_is_503_or_stale_if_error(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/s", body=b"old", headers={"Cache-Control": "max-age=1, stale-if-error=60"})
    origin.route("/n", body=b"never stored")
    proxy = await make_proxy(config="upstream: {passive: {failures: 1, cooldown: 60s}, retries: 0}\n")
    await proxy.get("/s")
    origin.route("/boom", status=503, body=b"x")
    await proxy.get("/boom")  # one 5xx takes the only upstream out
    await asyncio.sleep(1.1)
    stale = await proxy.get("/s")
    assert (stale.status, stale.body, stale.x_cache) == (200, b"old", "STALE")
    down = await proxy.get("/n")
    assert down.status == 503
    assert "detail=NO-UPSTREAM" in down.cache_status


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return key, cert


async def test_upstream_tls_is_verified_by_default(
    tmp_path: Path, tls_files: tuple[Path, Path], make_proxy: MakeProxy
) -> None:
    key, cert = tls_files
    secure = Origin()
    secure.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    secure.ssl_context.load_cert_chain(cert, key)
    secure.route("/t", body=b"over tls")
    await secure.start()
    try:
        strict = await make_proxy(upstreams=[secure.url], directory=tmp_path / "strict")
        assert (await strict.get("/t")).status == 502  # self-signed: refused
        trusting = await make_proxy(config=f"upstream: {{tls: {{ca_file: '{cert}'}}}}\n",
                                    upstreams=[secure.url], directory=tmp_path / "ca")
        reply = await trusting.get("/t")
        assert (reply.status, reply.body) == (200, b"over tls")
        lax = await make_proxy(config="upstream: {tls: {verify: false}}\n", upstreams=[secure.url],
                               directory=tmp_path / "lax")
        assert (await lax.get("/t")).status == 200
    finally:
        await secure.stop()
