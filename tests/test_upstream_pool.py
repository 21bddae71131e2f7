"""The upstream pool: balancing, retries, passive and active health, TLS, all-down behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.config import HealthSettings, Overrides, PassiveHealth, PoolSettings, UpstreamSettings, load_config
from proxy.runtime import Runtime
from proxy.upstream import CONNECT, RESPONSE, CheckResult, Selector, Upstream, UpstreamPool
from proxy.web.server import Listeners, _bound, start_admin_listener, start_proxy_listeners
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, self_signed
from tests.ports import Ports
from tests.security.misbehaving import Conn, Request, raw_origins, response


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


def test_least_conn_breaks_ties_by_weighted_round_robin() -> None:
    """With nothing in flight every upstream ties: the weights share the load, interleaved, as
    nginx's least_conn does (the first upstream took every request of a light load)."""
    ups = [Upstream(URL("http://a"), 1), Upstream(URL("http://b"), 3), Upstream(URL("http://c"), 1)]
    sel = Selector("least_conn")
    picks = [sel.choose(ups, 0.0).name for _ in range(10)]  # type: ignore[union-attr]
    assert [picks.count(u.name) for u in ups] == [2, 6, 2]
    assert "http://a" in picks[:5] and "http://c" in picks[:5]
    ups[1].in_flight = 3  # b: 3 of weight 3 = 1 per weight; a and c tie at 0
    assert {sel.choose(ups, 0.0).name for _ in range(4)} == {"http://a", "http://c"}  # type: ignore[union-attr]


def test_unavailable_upstreams_get_no_traffic() -> None:
    a, b = Upstream(URL("http://a")), Upstream(URL("http://b"), healthy=False)
    c = Upstream(URL("http://c"), down_until=100.0)
    sel = Selector()
    assert {sel.choose([a, b, c], 50.0).name for _ in range(5)} == {"http://a"}  # type: ignore[union-attr]
    assert sel.choose([b, c], 50.0) is None
    assert sel.choose([b, c], 150.0) is c


@pytest.fixture
async def second() -> AsyncIterator[Origin]:
    o = Origin()
    await o.start()
    yield o
    await o.stop()


async def test_idempotent_requests_are_retried_on_another_upstream(
    origin: Origin, second: Origin, make_proxy: MakeProxy, ports: Ports
) -> None:
    second.route("/r", body=b"from b")
    proxy = await make_proxy(config="upstream: {retries: 1, passive: {failures: 0}}\n",
                             upstreams=[ports.url(), second.url])
    for _ in range(4):
        reply = await proxy.get("/r")
        assert (reply.status, reply.body) == (200, b"from b")
    assert second.count("/r") == 4
    # A POST (without retry_non_idempotent) is sent once: when that upstream is the dead one, a 502.
    statuses = {(await proxy.request("POST", "/r", data=b"x")).status for _ in range(4)}
    assert statuses == {200, 502}


async def test_consecutive_503s_take_an_upstream_out_for_a_cooldown(
    origin: Origin, second: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/p", status=503, body=b"unavailable")
    second.route("/p", body=b"fine")
    proxy = await make_proxy(config="upstream: {passive: {failures: 2, cooldown: 30s}}\n",
                             upstreams=[origin.url, second.url])
    for _ in range(10):
        await proxy.get("/p")
    assert origin.count("/p") == 2  # then it was out of rotation
    assert second.count("/p") == 8
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert f'cachegate_upstream_up{{upstream="{origin.url}"}} 0.0' in metrics
    assert f'cachegate_upstream_errors_total{{kind="status_503",upstream="{origin.url}"}} 2.0' in metrics


async def test_a_client_making_one_url_fail_with_500s_takes_no_upstream_out(
    origin: Origin, second: Origin, make_proxy: MakeProxy
) -> None:
    """A 500 is the application's answer to that request, not the upstream's state: held
    against it, anyone able to make one URL fail took every upstream out for everyone."""
    for o in (origin, second):
        o.route("/crash", status=500, body=b"bug")
        o.route("/page", body=b"fine", headers={"Cache-Control": "no-store"})
    proxy = await make_proxy(config="upstream: {passive: {failures: 2, cooldown: 30s}, retries: 0}\n",
                             upstreams=[origin.url, second.url])
    for _ in range(10):
        assert (await proxy.get("/crash")).status == 500
    assert origin.count("/crash") + second.count("/crash") == 10
    assert all(u.available(time.monotonic()) for u in proxy.runtime.pool.upstreams)
    assert [(await proxy.get("/page")).status for _ in range(4)] == [200] * 4
    assert origin.count("/page") == 2 and second.count("/page") == 2
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert f'cachegate_upstream_errors_total{{kind="status_500",upstream="{origin.url}"}} 5.0' in metrics


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
    await origin.stop(hold_port=True)
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


async def test_health_checks_do_not_wait_for_a_pool_busy_with_slow_answers(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Every pooled connection busy with a slow but healthy answer: the checks go on (on their
    own connections) and pass, and another request waits for a pooled connection and is
    served, rather than the upstream being taken out (every client a 503)."""
    release = asyncio.Event()
    slow_started = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal slow_started
        slow_started += 1
        await release.wait()
        return web.Response(body=b"slow", headers={"Cache-Control": "no-store"})

    origin.route("/healthz", body=b"ok")
    origin.route("/slow", slow)
    proxy = await make_proxy(
        config="upstream: {pool_size: 2, passive: {failures: 0}, retries: 0, health: {path: /healthz, "
               "interval: 100ms, timeout: 200ms, healthy: 1, unhealthy: 2}}\n")
    up = proxy.runtime.pool.upstreams[0]
    host = proxy.runtime.pool._hosts[up.name]
    busy = [asyncio.create_task(proxy.get(f"/slow?{i}")) for i in range(2)]
    await wait_for(lambda: slow_started == 2)  # both pooled connections are taken
    checked = origin.count("/healthz")
    await wait_for(lambda: origin.count("/healthz") >= checked + 4 or not up.healthy)
    assert (up.healthy, up.check_failures) == (True, 0)
    third = asyncio.create_task(proxy.get("/slow?2"))  # waits for a pooled connection
    await wait_for(lambda: origin.count("/healthz") >= checked + 8 or not up.healthy)
    assert up.healthy
    assert host.size <= 2  # the checks' connections were never pooled
    release.set()
    replies = await asyncio.gather(*busy, third)
    assert [(r.status, r.body) for r in replies] == [(200, b"slow")] * 3


async def test_with_every_upstream_down_it_is_503_or_stale_if_error(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/s", body=b"old", headers={"Cache-Control": "max-age=1, stale-if-error=60"})
    origin.route("/n", body=b"never stored")
    proxy = await make_proxy(config="upstream: {passive: {failures: 1, cooldown: 60s}, retries: 0}\n")
    await proxy.get("/s")
    await origin.stop(hold_port=True)
    await asyncio.sleep(1.1)
    assert (await proxy.get("/boom")).status == 502  # one refused connection takes the only upstream out
    stale = await proxy.get("/s")
    assert (stale.status, stale.body, stale.x_cache) == (200, b"old", "STALE")
    down = await proxy.get("/n")
    assert down.status == 503
    assert "detail=NO-UPSTREAM" in down.cache_status


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "", "127.0.0.1", "IP:127.0.0.1")


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


async def test_ca_file_replaces_the_system_cas_rather_than_adding_to_them(
    tmp_path: Path, tls_files: tuple[Path, Path], make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As nginx's proxy_ssl_trusted_certificate and curl's --cacert (docs/upstreams.md). The
    # system's store is this test's SSL_CERT_FILE: it trusts the origin's certificate.
    key, cert = tls_files
    _, other = self_signed(tmp_path, "other", "other.test", "DNS:other.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    secure = Origin()
    secure.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    secure.ssl_context.load_cert_chain(cert, key)
    secure.route("/t", body=b"over tls")
    await secure.start()
    try:
        system = await make_proxy(upstreams=[secure.url], directory=tmp_path / "system")
        assert (await system.get("/t")).status == 200  # the system's CAs trust it
        replaced = await make_proxy(config=f"upstream: {{tls: {{ca_file: '{other}'}}}}\n",
                                    upstreams=[secure.url], directory=tmp_path / "replaced")
        assert (await replaced.get("/t")).status == 502  # only the file's CA is consulted
    finally:
        await secure.stop()


# -- weights and balancing through the running proxy ---------------------------------------

def write_exact_config(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cachegate.yaml"
    path.write_text("listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n"
                    "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 1}}\n" + text)
    return path


async def start_with(directory: Path, text: str) -> Proxy:
    """cachegate with exactly this config (weights and all), loopback listeners on port 0."""
    path = write_exact_config(directory, text)
    settings = load_config(str(path), Overrides())
    runtime = await Runtime.open(settings)
    listeners = Listeners()
    await start_proxy_listeners(runtime, settings, listeners)
    admin = await start_admin_listener(runtime, settings)
    assert admin is not None
    listeners.runners.append(admin)
    listeners.admin_addresses = _bound(admin)
    session = aiohttp.ClientSession(auto_decompress=False)
    return Proxy(runtime, listeners, session, str(directory / "cache"), str(path))


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Proxy]]]:
    proxies: list[Proxy] = []

    async def start(text: str) -> Proxy:
        p = await start_with(tmp_path / f"p{len(proxies)}", text)
        proxies.append(p)
        return p

    yield start
    for p in proxies:
        await p.session.close()
        await p.close()


async def test_weights_from_the_config_share_the_traffic(
    origin: Origin, second: Origin, started: Callable[[str], Awaitable[Proxy]]
) -> None:
    for o in (origin, second):
        o.route("/w", body=b"not cached")  # no freshness: every request goes upstream
    proxy = await started(f"upstreams: [{{url: '{origin.url}', weight: 3}}, {{url: '{second.url}', weight: 1}}]\n")
    for _ in range(8):
        assert (await proxy.get("/w")).status == 200
    assert (origin.count("/w"), second.count("/w")) == (6, 2)


async def test_least_conn_is_chosen_per_pool_and_avoids_a_busy_upstream(
    origin: Origin, second: Origin, started: Callable[[str], Awaitable[Proxy]]
) -> None:
    origin.route("/lc", body=b"slow", delay=1.0)
    second.route("/lc", body=b"quick")
    ups = f"upstreams: ['{origin.url}', '{second.url}']\n"
    for balance, busy_share in (("least_conn", 0), ("round_robin", 3)):
        proxy = await started(ups + f"upstream: {{balance: {balance}}}\n")
        assert proxy.runtime.pool.selector.balance == balance
        before = origin.count("/lc"), second.count("/lc")
        slow = asyncio.ensure_future(proxy.get("/lc"))  # the first turn of the round robin: busy now
        await wait_for(lambda b=before[0]: origin.count("/lc") == b + 1)  # type: ignore[misc]
        for i in range(6):
            await proxy.get(f"/lc?n={i}")  # distinct keys: no coalescing with the slow one
        await slow
        # least_conn sends nothing more to the busy upstream; round robin keeps alternating.
        assert origin.count("/lc") - before[0] == 1 + busy_share
        assert second.count("/lc") - before[1] == 6 - busy_share


async def test_least_conn_shares_a_light_load_by_weight(
    origin: Origin, second: Origin, started: Callable[[str], Awaitable[Proxy]]
) -> None:
    """Sequential requests leave nothing in flight, so every upstream ties: the weights decide
    (every request went to one upstream: 90/0/0, or 0/90/0 with weights 1, 3, 1)."""
    third = Origin()
    await third.start()
    try:
        origins = (origin, second, third)
        for o in origins:
            o.route("/lw", body=b"not cached")  # no freshness: every request goes upstream
        for weights in ((1, 1, 1), (1, 3, 1)):
            ups = ", ".join(f"{{url: '{o.url}', weight: {w}}}" for o, w in zip(origins, weights, strict=True))
            proxy = await started(f"upstreams: [{ups}]\nupstream: {{balance: least_conn}}\n")
            before = [o.count("/lw") for o in origins]
            for i in range(10 * sum(weights)):
                assert (await proxy.get(f"/lw?{weights}-{i}")).status == 200
            assert [o.count("/lw") - b for o, b in zip(origins, before, strict=True)] == [10 * w for w in weights]
    finally:
        await third.stop()


# -- health ------------------------------------------------------------------------------

def test_active_checks_count_consecutive_results_against_their_thresholds() -> None:
    pool = UpstreamPool((UpstreamSettings(URL("http://a")),),
                        PoolSettings(health=HealthSettings("/healthz", 5.0, 1.0, healthy=2, unhealthy=3)))
    up = pool.upstreams[0]
    for ok, healthy in [(False, True), (False, True), (True, True), (False, True), (False, True),
                        (False, False), (True, False), (False, False), (True, False), (True, True)]:
        pool.record_check(up, CheckResult(ok, None if ok else "connection refused"))
        assert up.healthy is healthy
    pool.record_check(up, CheckResult(False, "answered 500 to GET /healthz"))
    assert pool.snapshot()[0]["health_check"] == {
        "path": "/healthz", "healthy": True, "consecutive_successes": 0, "consecutive_failures": 1,
        "last_error": "answered 500 to GET /healthz"}
    pool.record_check(up, CheckResult(True))
    assert pool.snapshot()[0]["health_check"]["last_error"] is None


HEALTH = "upstream: {retries: 0, health: {path: /healthz, interval: 100ms, timeout: 1s, healthy: 1, unhealthy: 2}}\n"


async def taken_out_with(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """The reason in the take-out log line and in GET /upstreams, once the upstream is out."""
    await wait_for(lambda: not proxy.runtime.pool.upstreams[0].healthy)
    line = next(r.getMessage() for r in caplog.records if "taken out" in r.getMessage())
    view = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"][0]
    assert view["state"] == "down (health check)"
    return line, view["health_check"]["last_error"]


async def test_a_health_check_that_fails_tls_verification_says_why(
    tmp_path: Path, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # It said only "failed 2 health checks: taken out"; clients got 503 and nothing named the
    # certificate. The origin's certificate is for another name, from a CA cachegate trusts.
    key, cert = self_signed(tmp_path, "wrong", "wrong.test", "DNS:wrong.test")
    secure = Origin()
    secure.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    secure.ssl_context.load_cert_chain(cert, key)
    secure.route("/healthz", body=b"ok")
    await secure.start()
    try:
        caplog.set_level("WARNING", logger="cachegate.upstream")
        config = HEALTH.replace("{retries: 0,", f"{{retries: 0, tls: {{ca_file: '{cert}'}},")
        proxy = await make_proxy(config=config, upstreams=[secure.url])
        line, last = await taken_out_with(proxy, caplog)
        assert "CERTIFICATE_VERIFY_FAILED" in line and "mismatch" in line, line
        assert last.startswith("TLS: CERTIFICATE_VERIFY_FAILED:") and "mismatch" in last, last
        assert (await proxy.get("/x")).status == 503
    finally:
        await secure.stop()


async def test_a_health_check_refused_or_answered_with_an_error_status_says_so(
    origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="cachegate.upstream")
    origin.route("/healthz", status=500, body=b"broken")
    proxy = await make_proxy(config=HEALTH)
    line, last = await taken_out_with(proxy, caplog)
    assert last == "answered 500 to GET /healthz" and last in line
    await origin.stop(hold_port=True)  # now the port refuses: the reason that changed is logged
    await wait_for(lambda: proxy.runtime.pool.upstreams[0].check_error == "connection refused")
    view = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"][0]
    assert view["health_check"]["last_error"] == "connection refused"
    assert any("now fails with: connection refused" in r.getMessage() for r in caplog.records)


async def test_a_passively_ejected_upstream_returns_after_its_cooldown(
    origin: Origin, second: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/c", status=502, body=b"broken")
    second.route("/c", body=b"fine")
    proxy = await make_proxy(config="upstream: {passive: {failures: 2, cooldown: 400ms}, retries: 0}\n",
                             upstreams=[origin.url, second.url])
    for _ in range(6):
        await proxy.get("/c")
    assert origin.count("/c") == 2
    state = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"]
    assert state[0]["url"] == origin.url and state[0]["available"] is False
    assert state[0]["state"].startswith("down (passive")
    assert state[1]["available"] is True
    origin.route("/c", body=b"recovered")
    await wait_for(lambda: proxy.runtime.pool.upstreams[0].available(time.monotonic()))
    bodies = {(await proxy.get("/c")).body for _ in range(4)}
    assert bodies == {b"recovered", b"fine"}
    state = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"]
    assert state[0]["state"] == "up"


# -- timeouts ----------------------------------------------------------------------------

@pytest.fixture
def unresponsive_port() -> Iterator[int]:
    """A port whose accept queue is full: a new connection's SYN is dropped, connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    listener.close()


async def test_an_https_upstream_that_speaks_plain_http_is_told_as_a_tls_handshake_not_a_connect(
    origin: Origin, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An https:// URL for a server that is plain HTTP: the TCP connection is made, the TLS
    handshake never completes. The log said "connect timed out", which sent the operator
    looking at the network; the client's 504 and its detail stay the same."""
    caplog.set_level("WARNING", logger="cachegate.engine")

    async def silent(conn: Conn) -> None:  # waits for a request head that never comes
        await conn.reader.read()

    async with raw_origins() as start:
        quiet = await start(silent)
        port = quiet.url.rsplit(":", 1)[1]
        proxy = await make_proxy(config="upstream: {timeouts: {connect: 300ms}, retries: 0}\n",
                                 upstreams=[f"https://127.0.0.1:{port}"], directory=tmp_path / "t")
        reply = await proxy.get("/x")
        assert reply.status == 504 and "detail=UPSTREAM-TIMEOUT" in reply.cache_status
        assert quiet.connections == 1
    # A plain HTTP server that answers the ClientHello with its own 400: the handshake fails.
    proxy = await make_proxy(config="upstream: {timeouts: {connect: 2s}, retries: 0}\n",
                             upstreams=[origin.url.replace("http://", "https://")], directory=tmp_path / "f")
    reply = await proxy.get("/y")
    assert reply.status == 502
    warned = [r.getMessage() for r in caplog.records if "upstream failed" in r.getMessage()]
    assert len(warned) == 2, warned
    assert warned[0].endswith(f"https://127.0.0.1:{port}: TLS handshake timed out (connected; is it an https "
                              "server?)"), warned
    assert "TLS handshake failed: " in warned[1] and "cannot connect" not in warned[1], warned


async def test_connect_read_and_total_timeouts_are_504s_told_apart(
    origin: Origin, make_proxy: MakeProxy, unresponsive_port: int, tmp_path: Path
) -> None:
    hanging = await make_proxy(config="upstream: {timeouts: {connect: 300ms}, retries: 0}\n",
                               upstreams=[f"http://127.0.0.1:{unresponsive_port}"], directory=tmp_path / "c")
    reply = await hanging.get("/x")
    assert reply.status == 504 and "detail=UPSTREAM-TIMEOUT" in reply.cache_status
    assert b"connect timed out" in reply.body

    origin.route("/silent", body=b"late", delay=1.0)
    proxy = await make_proxy(config="upstream: {timeouts: {read: 300ms}, retries: 0}\n",
                             directory=tmp_path / "r")
    reply = await proxy.get("/silent")
    assert reply.status == 504 and "detail=UPSTREAM-TIMEOUT" in reply.cache_status
    assert b"read timed out" in reply.body

    async def trickle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.15)  # each silence shorter than the read timeout...
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for _ in range(10):
            await asyncio.sleep(0.15)
            await resp.write(b".")
        return resp

    origin.route("/trickle", trickle)
    origin.route("/late-head", body=b"late", delay=0.5)
    bounded = await make_proxy(config="upstream: {timeouts: {read: 1s, total: 300ms}, retries: 0}\n",
                               directory=tmp_path / "t")
    reply = await bounded.get("/late-head")  # ...but the whole exchange is bounded
    assert reply.status == 504 and "detail=UPSTREAM-TIMEOUT" in reply.cache_status
    assert b"total timeout" in reply.body
    for p, kind in ((hanging, "connect_timeout"), (proxy, "read_timeout"), (bounded, "total_timeout")):
        metrics = (await p.admin("GET", "/metrics")).body.decode()
        assert f'cachegate_upstream_errors_total{{kind="{kind}"' in metrics


async def test_the_pool_keeps_at_most_pool_size_connections_per_upstream_and_reuses_them(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    active = peak = 0
    ports: set[int] = set()

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, peak
        ports.add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.2)
        active -= 1
        return web.Response(body=b"not cached")

    origin.route("/k", slow)
    proxy = await make_proxy(config="upstream: {pool_size: 2}\n")
    replies = await asyncio.gather(*(proxy.get(f"/k?n={i}") for i in range(6)))
    assert {r.status for r in replies} == {200}
    assert peak == 2  # the other four waited for a pooled connection
    for i in range(3):
        await proxy.get(f"/k?again={i}")
    assert len(ports) == 2  # kept alive and reused


# -- retries -----------------------------------------------------------------------------

@pytest.fixture
async def half_answering() -> AsyncIterator[tuple[str, list[int]]]:
    """An upstream that reads a request, sends part of a response head and hangs up."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            seen.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Len")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    server.close()
    await server.wait_closed()


async def test_retries_happen_only_before_any_response_byte_and_not_for_5xx(
    origin: Origin, second: Origin, make_proxy: MakeProxy, half_answering: tuple[str, list[int]],
    tmp_path: Path
) -> None:
    url, seen = half_answering
    second.route("/r", body=b"from b")
    proxy = await make_proxy(config="upstream: {retries: 1, passive: {failures: 0}}\n",
                             upstreams=[url, second.url], directory=tmp_path / "half")
    statuses = [(await proxy.get("/r")).status for _ in range(4)]
    assert sorted(statuses) == [200, 200, 502, 502]  # the half answer was not retried elsewhere
    assert len(seen) == 2 and second.count("/r") == 2

    origin.route("/five", status=503, body=b"busy")
    second.route("/five", body=b"fine")
    proxy = await make_proxy(config="upstream: {retries: 1, passive: {failures: 0}}\n",
                             upstreams=[origin.url, second.url], directory=tmp_path / "5xx")
    statuses = [(await proxy.get("/five")).status for _ in range(4)]
    assert sorted(statuses) == [200, 200, 503, 503]  # an answer is an answer: not retried
    assert origin.count("/five") == 2


async def test_a_keep_alive_connection_closed_as_the_request_left_gets_one_more_try_even_alone(
    make_proxy: MakeProxy
) -> None:
    async def first_connection_dropped_on_reuse(conn: Conn) -> None:
        await conn.request()
        await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"ok"))
        await conn.request()
        if conn.index == 0:
            return  # as a keep-alive connection the server has just dropped: closed, nothing sent
        await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"ok"))

    async with raw_origins() as start:
        lone = await start(first_connection_dropped_on_reuse)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[lone.url])
        assert (await proxy.get("/a")).status == 200
        reply = await proxy.get("/b")
        assert (reply.status, reply.body) == (200, b"ok")
        assert lone.targets() == [(0, "GET", "/a"), (0, "GET", "/b"), (1, "GET", "/b")]


async def test_a_request_dropped_by_the_upstream_is_sent_once_per_try(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A new connection closed after the request was read (an app or WAF dropping it) is a
    failed try, not a keep-alive connection the upstream had closed: one GET went retries + 2
    times, to one upstream twice while others were up; and a reused connection dropped gets its
    one more try on another upstream when one is up."""
    async with raw_origins() as start:
        origins = [await start(_answer_by_path) for _ in range(3)]
        config = "upstream: {retries: 1, passive: {failures: 0}}\n"
        proxy = await make_proxy(config=config, upstreams=[o.url for o in origins], directory=tmp_path / "3")
        assert (await proxy.get("/close")).status == 502
        assert sorted(len(o.requests) for o in origins) == [0, 1, 1]  # two tries, two upstreams

        alone = await start(_answer_by_path)
        proxy = await make_proxy(config=config, upstreams=[alone.url], directory=tmp_path / "1")
        assert (await proxy.get("/close")).status == 502
        assert len(alone.requests) == 1  # no other upstream to retry on

        a, b = await start(_answer_by_path), await start(_answer_by_path)
        proxy = await make_proxy(config=config, upstreams=[a.url, b.url], directory=tmp_path / "2")
        assert [(await proxy.get(f"/ok?{i}")).status for i in range(2)] == [200, 200]  # one pooled each
        assert (await proxy.get("/close?warm")).status == 502
        # a's pooled connection dropped (no try used up) is followed by b's try, on a new
        # connection, then a's on a new one (the retry): two tries, never a pooled one again
        assert [(i, t) for i, _, t in a.targets() if t == "/close?warm"] == [(0, "/close?warm"), (1, "/close?warm")]
        assert [(i, t) for i, _, t in b.targets() if t == "/close?warm"] == [(1, "/close?warm")]


async def _drop_on_reuse(conn: Conn) -> None:
    """The first request of a connection answered; the next one read and the connection closed
    with nothing sent: an origin whose keep-alive idle timeout fires as a request arrives."""
    await conn.request()
    await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"ok"))
    await conn.request()


async def test_keep_alive_connections_closed_as_the_request_left_use_up_no_try(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """A pooled connection closed with nothing read is the upstream's idle timeout, not its
    answer: it uses up neither that upstream's try nor a retry, the next try prefers another
    upstream and goes on a new connection. With two such upstreams and retries 1, the third GET
    was a 502 (a's pooled connection, then b's used up the one more try, and a counted as
    tried), though a new connection to either answered; a lone upstream with two idle pooled
    connections, both closed, was a 502 too (the one more try took the other pooled one)."""
    async with raw_origins() as start:
        a, b = await start(_drop_on_reuse), await start(_drop_on_reuse)
        proxy = await make_proxy(config="upstream: {retries: 1}\n", upstreams=[a.url, b.url],
                                 directory=tmp_path / "2")
        assert [(await proxy.get(f"/r{i}")).status for i in range(4)] == [200] * 4
        assert [(i, t) for i, _, t in a.targets() if t == "/r2"] == [(0, "/r2")]  # pooled: dropped
        assert [(i, t) for i, _, t in b.targets() if t == "/r2"] == [(1, "/r2")]  # then a new one

        both_open = asyncio.Event()

        async def two_at_once_then_drop_on_reuse(conn: Conn) -> None:
            await conn.request()
            if conn.index == 1:
                both_open.set()
            await both_open.wait()  # two pooled connections, idle after
            await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"ok"))
            await conn.request()

        lone = await start(two_at_once_then_drop_on_reuse)
        proxy = await make_proxy(config="upstream: {retries: 1}\n", upstreams=[lone.url], directory=tmp_path / "1")
        assert [r.status for r in await asyncio.gather(proxy.get("/w0"), proxy.get("/w1"))] == [200, 200]
        reply = await proxy.get("/x")
        assert (reply.status, reply.body) == (200, b"ok")
        assert [i for i, _, t in lone.targets() if t == "/x"] in ([0, 2], [1, 2])  # a new one, not the other idle


async def test_a_try_after_a_dropped_pooled_connection_goes_where_a_pool_has_room(
    make_proxy: MakeProxy,
) -> None:
    """b's pooled connection closed as the request left; a's one connection is busy. The next
    try went to a (b was avoided for that one choice) and waited timeouts.connect on a's full
    pool, though b had room (the drop freed its slot): it now goes to b on a new connection."""
    release, arrived = asyncio.Event(), asyncio.Event()

    async def busy(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if request.target == "/slow":
                arrived.set()
                await release.wait()
            await conn.send(response("200 OK", {"Cache-Control": "no-store", "X-Origin": "a"}, b"a"))

    async with raw_origins() as start:
        a, b = await start(busy), await start(_drop_on_reuse)
        proxy = await make_proxy(config="upstream: {retries: 1, pool_size: 1, timeouts: {connect: 60s}, "
                                        "passive: {failures: 0}}\n", upstreams=[a.url, b.url])
        assert [(await proxy.get(f"/w{i}")).status for i in range(2)] == [200, 200]  # a, then b
        slow = asyncio.ensure_future(proxy.get("/slow"))  # to a: its one connection busy
        await asyncio.wait_for(arrived.wait(), 20)
        try:
            reply = await asyncio.wait_for(proxy.get("/x"), 20)  # (it waited a's pool for 60 s)
            assert (reply.status, reply.body) == (200, b"ok")
            assert [i for i, _, t in b.targets() if t == "/x"] == [0, 1]  # pooled (dropped), then new
        finally:
            release.set()
            assert (await slow).status == 200


async def test_post_is_retried_only_when_configured(
    second: Origin, make_proxy: MakeProxy, tmp_path: Path, ports: Ports
) -> None:
    second.route("/p", body=b"done")
    dead = ports.url()
    for configured, expected in ((False, {200, 502}), (True, {200})):
        proxy = await make_proxy(
            config=f"upstream: {{retries: 1, retry_non_idempotent: {str(configured).lower()}, "
                   "passive: {failures: 0}}\n",
            upstreams=[dead, second.url], directory=tmp_path / str(configured))
        statuses = {(await proxy.request("POST", "/p")).status for _ in range(4)}
        assert statuses == expected
        # With a body too: a refused try read none of it (tests/test_retry_with_body.py).
        with_body = {(await proxy.request("POST", "/p", data=b"payload")).status for _ in range(4)}
        assert with_body == expected


# -- TLS: SNI ----------------------------------------------------------------------------

@pytest.fixture
def localhost_cert(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "l", "localhost", "DNS:localhost,IP:127.0.0.1")


async def test_upstream_tls_sends_the_upstream_host_as_sni_whatever_the_client_host(
    tmp_path: Path, make_proxy: MakeProxy, localhost_cert: tuple[Path, Path]
) -> None:
    key, cert = localhost_cert
    names: list[str | None] = []
    secure = Origin()
    secure.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    secure.ssl_context.load_cert_chain(cert, key)
    secure.ssl_context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,misc]
    secure.route("/sni", body=b"over tls")
    await secure.start()
    try:
        proxy = await make_proxy(config=f"upstream: {{tls: {{ca_file: '{cert}'}}, preserve_host: true}}\n",
                                 upstreams=[f"https://localhost:{secure.port}"], directory=tmp_path / "sni")
        reply = await proxy.get("/sni", headers={"Host": "shop.example"})
        assert (reply.status, reply.body) == (200, b"over tls")
        assert names == ["localhost"]  # the upstream's name, not the client's Host
        assert secure.seen[-1].headers["Host"] == "shop.example"  # which still reaches the origin
    finally:
        await secure.stop()


@pytest.mark.parametrize(("values", "length"), [
    (["120"], 120), (["7", "7"], 7), (["7, 7"], 7), ([], None), (["7", "8"], None), (["-1"], None), (["0"], 0),
])
def test_a_responses_content_length_is_parsed_once_and_the_same_every_time(
        values: list[str], length: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    import proxy.upstream
    from proxy.upstream import UpstreamResponse

    parsed: list[object] = []
    parse = proxy.upstream.content_length

    def counting(v: list[str]) -> int | None:
        parsed.append(v)
        return parse(v)

    monkeypatch.setattr(proxy.upstream, "content_length", counting)

    class Wire:
        status, reason, close_delimited_tls, stray = 200, "OK", False, 0
        headers = CIMultiDictProxy(CIMultiDict([("Content-Length", v) for v in values]))

    resp = UpstreamResponse(Wire(), None, None)  # type: ignore[arg-type]
    assert [resp.content_length for _ in range(3)] == [length] * 3
    assert len(parsed) == 1


# -- what passive health holds against an upstream ------------------------------------------

async def _answer_by_path(conn: Conn) -> None:
    """/nul: a response with a NUL in a field (invalid); /slow: slower than the read timeout;
    /close: the connection closed without an answer; anything else: 200."""
    while await _answer_by_path_once(conn, await conn.request()):
        pass


async def _answer_by_path_once(conn: Conn, request: Request) -> bool:
    """Answer one request (``_answer_by_path``); False when the connection is to be closed."""
    path = request.target.split("?")[0]
    if path == "/nul":
        await conn.send(response("200 OK", {"X-Bad": "a\x00b"}, b"hi"))
    elif path == "/slow":
        await asyncio.sleep(0.6)
        await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"late"))
    elif path == "/close":
        return False
    else:
        await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"ok"))
    return True


async def test_one_url_with_invalid_or_slow_answers_takes_out_at_most_half_the_upstreams(
    make_proxy: MakeProxy
) -> None:
    """An invalid response or no response head within the read timeout counts against an
    upstream (a broken or hung one is taken out), but one URL can cause them on every upstream:
    such failures take out at most half the pool, and every other URL keeps its answers."""
    async with raw_origins() as start:
        a, b = await start(_answer_by_path), await start(_answer_by_path)
        proxy = await make_proxy(
            config="upstream: {timeouts: {read: 200ms}, passive: {failures: 2, cooldown: 30s}, retries: 0}\n",
            upstreams=[a.url, b.url])
        replies = await asyncio.gather(*[proxy.get(f"/nul?{i}") for i in range(6)],
                                       *[proxy.get(f"/slow?{i}") for i in range(4)])
        assert [r.status for r in replies] == [502] * 6 + [504] * 4
        assert sum(u.available(time.monotonic()) for u in proxy.runtime.pool.upstreams) == 1
        assert [(await proxy.get(f"/ok?{i}")).status for i in range(4)] == [200] * 4
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        for kind, n in (("protocol", 6), ("read_timeout", 4)):
            counts = re.findall(rf'cachegate_upstream_errors_total{{kind="{kind}",upstream="[^"]+"}} (\d+)', metrics)
            assert sum(float(c) for c in counts) == n, (kind, counts)


async def test_waiting_for_a_free_pooled_connection_in_vain_takes_no_upstream_out(make_proxy: MakeProxy) -> None:
    """A pool busy with slow answers (perhaps all for one URL) is cachegate's own limit: the
    requests that wait for a free connection until the connect timeout get a 504, and no
    connection was tried, so nothing is held against the upstream."""
    async with raw_origins() as start:
        a, b = await start(_answer_by_path), await start(_answer_by_path)
        proxy = await make_proxy(
            config="upstream: {pool_size: 1, timeouts: {connect: 150ms}, passive: {failures: 2, cooldown: 30s}, "
                   "retries: 0}\n", upstreams=[a.url, b.url])
        replies = await asyncio.gather(*[proxy.get(f"/slow?{i}") for i in range(6)])
        assert sorted(r.status for r in replies) == [200] * 2 + [504] * 4
        for r in replies:  # the client is told what happened: no connect was tried
            if r.status == 504:
                assert b"no free connection to the origin server within the connect timeout" in r.body
                assert b"connect timed out" not in r.body and "detail=UPSTREAM-TIMEOUT" in r.cache_status
        assert all(u.available(time.monotonic()) for u in proxy.runtime.pool.upstreams)
        assert [(await proxy.get(f"/ok?{i}")).status for i in range(2)] == [200] * 2


def _holding(gates: dict[str, asyncio.Event]) -> Callable[[Conn], Awaitable[None]]:
    """An origin answering ``200 ok`` (no-store) to every request on a connection, a request
    whose path (without its query) is in ``gates`` once its event is set."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            gate = gates.get(request.target.split("?")[0])
            if gate is not None:
                await gate.wait()
            await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"ok"))

    return serve


async def test_a_wait_for_a_free_pooled_connection_is_one_connect_timeout_and_no_request(
    make_proxy: MakeProxy
) -> None:
    """A request that waited ``timeouts.connect`` in vain for a free pooled connection gets its
    504 then: it waited as long again for the next upstream's pool (each retry one more connect
    timeout). And only requests that held a connection count in ``GET /upstreams``' requests
    (those that waited in vain counted, though the origin never saw them)."""
    release = asyncio.Event()
    held = _holding({"/held": release})

    async with raw_origins() as start:
        a, b = await start(held), await start(held)
        proxy = await make_proxy(config="upstream: {pool_size: 1, timeouts: {connect: 150ms}, retries: 1}\n",
                                 upstreams=[a.url, b.url])
        busy = [asyncio.ensure_future(proxy.get(f"/held?{i}")) for i in range(2)]
        await wait_for(lambda: len(a.requests) + len(b.requests) == 2)
        waited = await asyncio.gather(*(proxy.get(f"/w?{i}") for i in range(2)))
        assert [r.status for r in waited] == [504, 504]
        release.set()
        assert [(await f).status for f in busy] == [200, 200]
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        waits = re.findall(r'cachegate_upstream_errors_total{kind="pool_wait",upstream="[^"]+"} (\d+)', metrics)
        assert sum(float(n) for n in waits) == 2  # one pool's wait each, not one per upstream
        # its own kind: not a connect timeout of the upstream's
        assert not re.search(r'cachegate_upstream_errors_total{kind="connect_timeout",upstream="[^"]+"} [1-9]',
                             metrics)
        upstreams = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"]
        assert [u["requests"] for u in upstreams] == [len(a.requests), len(b.requests)] == [1, 1]
        # nor a failure of the upstream's: failures / requests read 7 / 8 for a healthy upstream
        assert [u["failures"] for u in upstreams] == [0, 0]


async def test_a_full_pool_is_passed_over_for_an_upstream_with_a_free_connection(make_proxy: MakeProxy) -> None:
    """Round robin over an upstream whose one pooled connection is busy (a slow answer) and one
    with a free connection: the request goes to the free one, as nginx's max_conns, and one that
    waited ``timeouts.connect`` in vain for a full pool goes to an untried upstream whose
    connection is free by then, at once. A request by turn for the slow upstream was a 504
    after the connect timeout while the other one had a connection free."""
    release = {"/held-a": asyncio.Event(), "/held-b": asyncio.Event()}
    held = _holding(release)

    async with raw_origins() as start:
        a, b = await start(held), await start(held)
        proxy = await make_proxy(config="upstream: {pool_size: 1, timeouts: {connect: 500ms}, retries: 0}\n",
                                 upstreams=[a.url, b.url])
        slow = asyncio.ensure_future(proxy.get("/held-a"))
        await wait_for(lambda: len(a.requests) == 1)
        assert [(await proxy.get(f"/ok?{i}")).status for i in range(4)] == [200] * 4
        assert len(b.requests) == 4  # a's pool was full: none waited for it

        other = asyncio.ensure_future(proxy.get("/held-b"))  # both pools full now
        await wait_for(lambda: len(b.requests) == 5)
        waits = [asyncio.ensure_future(proxy.get(f"/w?{i}")) for i in range(2)]  # by turn: one for each pool
        pool = proxy.runtime.pool
        await wait_for(lambda: [u.in_flight for u in pool.upstreams] == [2, 2])
        release["/held-b"].set()  # b's waiter has its answer soon, a's pool stays full
        assert (await other).status == 200
        # a's waiter, after the connect timeout: b's connection, free by then, at once
        assert [(await w).status for w in waits] == [200, 200]
        assert sorted(t for _, _, t in b.targets() if t.startswith("/w")) == ["/w?0", "/w?1"]
        assert [t for _, _, t in a.targets()] == ["/held-a"]
        release["/held-a"].set()
        assert (await slow).status == 200


async def test_a_url_the_app_drops_takes_out_one_upstream_of_two_not_both(make_proxy: MakeProxy) -> None:
    """A new connection closed before any answer (an app or WAF dropping one URL, nginx's 444)
    counts against the upstream, and the retry on the other one counts there: three requests
    for such a URL took every upstream out and every other URL was a 503 for the cool-down."""
    async with raw_origins() as start:
        a, b = await start(_answer_by_path), await start(_answer_by_path)
        proxy = await make_proxy(upstreams=[a.url, b.url])  # the defaults: 3 failures, 10 s
        assert [(await proxy.get(f"/close?x={i}")).status for i in range(6)] == [502] * 6
        assert sum(u.available(time.monotonic()) for u in proxy.runtime.pool.upstreams) == 1
        assert [(await proxy.get(f"/ok?{i}")).status for i in range(4)] == [200] * 4


async def _hang(conn: Conn) -> None:
    await conn.request()
    await asyncio.sleep(30)  # accepts and reads, never answers (cancelled when the origin stops)


async def _garbage(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


@pytest.mark.parametrize(("serve", "timeouts", "status"), [
    (_hang, "{read: 200ms}", 504),
    (_hang, "{read: 5s, total: 200ms}", 504),  # no response head within the total timeout
    (_garbage, "{read: 5s}", 502),
], ids=["hang-read", "hang-total", "garbage"])
async def test_an_upstream_that_hangs_or_answers_garbage_beside_a_good_one_is_taken_out(
    make_proxy: MakeProxy, serve: Callable[[Conn], Awaitable[None]], timeouts: str, status: int
) -> None:
    """Default passive settings (3 failures), no active checks: the bad upstream is out after
    three failed requests, not tried every other request for ever."""
    async with raw_origins() as start:
        good, bad = await start(_answer_by_path), await start(serve)
        proxy = await make_proxy(config=f"upstream: {{timeouts: {timeouts}}}\n", upstreams=[good.url, bad.url])
        statuses = [(await proxy.get(f"/x?{i}")).status for i in range(12)]
        assert statuses == [200, status] * 3 + [200] * 6
        assert [u.available(time.monotonic()) for u in proxy.runtime.pool.upstreams] == [True, False]


async def test_a_total_timeout_while_the_client_still_uploads_is_not_held_against_the_upstream(
    make_proxy: MakeProxy
) -> None:
    """No response head within the total timeout counts against an upstream only once it had the
    whole request: while a slow client is still uploading, the upstream is not the slow one."""
    async def swallow(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.reader.read(-1)  # the body, as it comes: never answered

    async with raw_origins() as start:
        a, b = await start(swallow), await start(swallow)
        proxy = await make_proxy(
            config="upstream: {timeouts: {total: 300ms}, passive: {failures: 1, cooldown: 30s}}\n"
                   "client_body_buffer: 0\nclient_body_min_rate: 0\n", upstreams=[a.url, b.url])
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 1000\r\n\r\nx")

            async def drip() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(40):
                        await asyncio.sleep(0.05)
                        writer.write(b"x")

            dripping = asyncio.ensure_future(drip())
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert answer.startswith(b"HTTP/1.1 504 "), answer
            dripping.cancel()
        finally:
            writer.close()
        pool = proxy.runtime.pool
        assert [(u.available(time.monotonic()), u.passive_failures) for u in pool.upstreams] == [(True, 0)] * 2
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert 'kind="total_timeout"' in metrics  # counted as an error all the same


async def test_a_lone_upstream_is_taken_out_by_refused_connections_only(make_proxy: MakeProxy) -> None:
    """With one upstream and passive checks configured, an invalid answer, a hang, a dropped
    connection or a 503 leave it up (taken out, everything would be a 503 for the cool-down,
    and one URL could cause it); a refused connection takes it out."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if request.target.startswith("/unavailable"):
                await conn.send(response("503 Service Unavailable", {"Cache-Control": "no-store"}, b"x"))
            elif not await _answer_by_path_once(conn, request):
                return

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(
            config="upstream: {timeouts: {read: 200ms}, passive: {failures: 1, cooldown: 30s}, retries: 0}\n",
            upstreams=[origin.url])
        for path, status in (("/nul", 502), ("/slow", 504), ("/close", 502), ("/unavailable", 503)) * 2:
            assert (await proxy.get(path)).status == status, path
        assert proxy.runtime.pool.upstreams[0].available(time.monotonic())
        assert (await proxy.get("/ok")).status == 200
        await origin.stop(hold_port=True)
        await asyncio.sleep(0.05)  # the pooled connection's close is seen
        assert (await proxy.get("/ok?again")).status == 502
        down = await proxy.get("/ok")
        assert down.status == 503 and "detail=NO-UPSTREAM" in down.cache_status


def test_failures_of_an_upstream_already_out_neither_restart_its_cooldown_nor_count_towards_the_next() -> None:
    now = [0.0]
    pool = UpstreamPool(tuple(UpstreamSettings(URL(f"http://{n}")) for n in "ab"),
                        PoolSettings(passive=PassiveHealth(failures=2, cooldown=10.0)), clock=lambda: now[0])
    a = pool.upstreams[0]
    for _ in range(2):
        pool._passive_failure(a, "connect", CONNECT)
    assert a.down_until == 10.0
    now[0] = 5.0
    for _ in range(5):  # the requests in flight when it was taken out
        pool._passive_failure(a, "connect", CONNECT)
    assert (a.down_until, a.passive_failures, a.failures) == (10.0, 0, 7)
    now[0] = 10.0  # back: it takes `failures` new ones to take it out again
    pool._passive_failure(a, "connect", CONNECT)
    assert a.available(now[0])
    pool._passive_failure(a, "connect", CONNECT)
    assert a.down_until == 20.0


async def test_one_outage_takes_an_upstream_out_once(make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """The requests in flight to an upstream fail together: the first ``failures`` of them take
    it out, the rest only count (each said "marked down" again and restarted the cool-down)."""
    release = asyncio.Event()

    async def dropping(conn: Conn) -> None:
        await conn.request()
        await release.wait()  # then closed without an answer

    async with raw_origins() as start:
        good, bad = await start(_answer_by_path), await start(dropping)
        proxy = await make_proxy(config="upstream: {passive: {failures: 3, cooldown: 30s}, retries: 0}\n",
                                 upstreams=[good.url, bad.url])
        caplog.set_level("WARNING", logger="cachegate.upstream")
        replies = [asyncio.ensure_future(proxy.get(f"/d?{i}")) for i in range(12)]
        await wait_for(lambda: len(bad.requests) == 6)
        release.set()
        assert sorted([(await r).status for r in replies]) == [200] * 6 + [502] * 6
        marks = [r.getMessage() for r in caplog.records if "marked down" in r.getMessage()]
        assert marks == [f"upstream {bad.url} marked down for 30s after 3 consecutive failures"]
        upstreams = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"]
        assert upstreams[1]["failures"] == 6 and upstreams[1]["passive"]["consecutive_failures"] == 0
        assert not upstreams[1]["available"]


def test_failures_after_the_request_was_sent_leave_at_least_half_the_upstreams_up() -> None:
    """Upstreams down for any reason count: a refused connection or an active check takes an
    upstream out whatever the cap, and then response failures take out none more."""
    now = [0.0]
    pool = UpstreamPool(tuple(UpstreamSettings(URL(f"http://{n}")) for n in "abcd"),
                        PoolSettings(passive=PassiveHealth(failures=1, cooldown=10.0)), clock=lambda: now[0])
    a, b, c, d = pool.upstreams

    def up() -> str:
        return "".join(u.name[-1] for u in pool.upstreams if u.available(now[0]))

    for u in (a, b, c, d):
        pool._passive_failure(u, "read_timeout", RESPONSE)
    assert up() == "cd"  # two of four at most
    now[0] = 5.0
    pool._passive_failure(c, "connect", CONNECT)  # no cap
    assert up() == "d"
    pool._passive_failure(d, "status_503", RESPONSE)
    assert up() == "d" and d.passive_failures == 2  # held up, still counted
    now[0] = 11.0  # a and b are back, c is out until 15
    a.healthy = False  # an active check took a out
    pool._passive_failure(d, "protocol", RESPONSE)
    assert up() == "bd"
    b.healthy = a.healthy = True
    pool._passive_failure(d, "protocol", RESPONSE)
    assert up() == "ab"

    three = UpstreamPool(tuple(UpstreamSettings(URL(f"http://{n}")) for n in "xyz"),
                         PoolSettings(passive=PassiveHealth(failures=1, cooldown=10.0)), clock=lambda: 0.0)
    for u in three.upstreams:
        three._passive_failure(u, "connect", RESPONSE)
    assert sum(u.available(0.0) for u in three.upstreams) == 2  # one of three


async def test_a_body_delimited_by_the_end_of_a_tls_connection_is_relayed_never_stored(
    tmp_path: Path, tls_files: tuple[Path, Path], make_proxy: MakeProxy
) -> None:
    """RFC 9112 §9.8: over TLS, a body that only the connection's end delimits is complete only
    when the close_notify alert came, which the transport cannot tell from a bare FIN (one forged
    on the path cuts it short). Such a body is relayed, never stored; one with a length is
    stored, and so is a close-delimited body over plain TCP."""
    key, cert = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1]
        seen.append(path)
        if path == b"/length":
            writer.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 4\r\n\r\nfull")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        if path == b"/cut":
            await asyncio.sleep(0.05)
            writer.transport.abort()  # a FIN without the TLS close_notify, as a forged one
        else:
            writer.close()

    secure = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    plain = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        proxy = await make_proxy(config=f"upstream: {{tls: {{ca_file: '{cert}'}}}}\n",
                                 upstreams=[f"https://127.0.0.1:{secure.sockets[0].getsockname()[1]}"],
                                 directory=tmp_path / "tls")
        for path in ("/closed", "/cut"):
            for _ in range(2):
                reply = await proxy.get(path)
                assert (reply.status, reply.x_cache) == (200, "MISS"), path
                assert "detail=TLS-CLOSE-DELIMITED" in reply.cache_status
            assert seen.count(path.encode()) == 2  # nothing stored: both went upstream
        assert [(await proxy.get("/length")).x_cache for _ in range(2)] == ["MISS", "HIT"]
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert 'cachegate_not_stored_total{reason="TLS-CLOSE-DELIMITED"} 4.0' in metrics
        over_tcp = await make_proxy(upstreams=[f"http://127.0.0.1:{plain.sockets[0].getsockname()[1]}"],
                                    directory=tmp_path / "tcp")
        replies = [await over_tcp.get("/closed") for _ in range(2)]
        assert [(r.x_cache, len(r.body)) for r in replies] == [("MISS", 5000), ("HIT", 5000)]
    finally:
        for server in (secure, plain):
            server.close()


@pytest.mark.slow
async def test_with_workers_upstreams_top_level_is_the_workers_state_and_counts(
        origin: Origin, tmp_path: Path, ports: Ports) -> None:
    """``cachegate run --workers 2``, a dead upstream and a live one: GET /upstreams' top level
    was the supervisor's pool, which sends no client traffic, so it said "up", available, 0
    requests for the dead upstream while every worker had it down (passive) with the failures.
    Now it is the whole proxy's, as the console shows it; the supervisor's health_check stays."""
    from tests.storage.procs import ProxyProcess, write_config

    dead = ports.url()
    origin.route("/u", body=b"fine", headers={"Cache-Control": "no-store"})
    path = Path(write_config(str(tmp_path), origin.url, "cache: {disk: null}\n",
                             "upstream: {passive: {failures: 2, cooldown: 60s}}\n"))
    path.write_text(path.read_text().replace(f"upstreams: [{{url: '{origin.url}'}}]",  # noqa: ASYNC240
                                             f"upstreams: ['{dead}', '{origin.url}']"))
    proxy = ProxyProcess(str(tmp_path), str(path))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        await proxy.wait_for(lambda: any("started:" in line for line in proxy.lines))

        async def view() -> dict[str, Any]:
            return json.loads((await proxy.admin("GET", "/upstreams")).body)  # type: ignore[no-any-return]

        body = await view()
        for _ in range(200):  # new connections: both workers answer some, and eject the dead one
            if all(not w["upstreams"][0]["available"] for w in body["workers"]) and len(body["workers"]) == 2:
                break
            assert (await proxy.get("/u")).status == 200  # retried on the live one
            body = await view()
        workers = body["workers"]
        assert [w["worker"] for w in workers] == [0, 1]
        assert all(w["upstreams"][0]["state"].startswith("down (passive") for w in workers), workers
        top_dead, top_live = body["upstreams"]
        assert top_dead["url"] == dead and top_live["url"] == origin.url
        assert top_dead["state"] == "down (passive) in 2 of 2 workers"
        assert top_dead["available"] is False
        assert (top_dead["workers"], top_dead["workers_available"]) == (2, 0)
        assert top_dead["failures"] == sum(w["upstreams"][0]["failures"] for w in workers) >= 4
        assert top_dead["requests"] == sum(w["upstreams"][0]["requests"] for w in workers)
        assert top_dead["passive"]["down_for"] > 30
        assert top_dead["health_check"] is None  # the supervisor's: no active checks configured
        assert top_live["state"] == "up" and top_live["available"] is True
        assert top_live["requests"] == origin.count("/u") > 0 and top_live["failures"] == 0
        assert (top_live["workers"], top_live["workers_available"]) == (2, 2)
        for _ in range(100):  # the console reads the workers' pools every two seconds
            shown = json.loads((await proxy.admin("GET", "/console/api/live")).body)["upstreams"][0]
            if shown["state"] != "up":
                break
            await asyncio.sleep(0.1)
        assert (shown["state"], shown["available"]) == ("down (passive) in 2 of 2 workers", False)
    finally:
        await proxy.stop()


@pytest.mark.parametrize(("section", "taken_out"), [("", False), ("passive: {}\n", True)])
def test_a_lone_upstream_is_taken_out_only_when_passive_is_configured(
        tmp_path: Path, section: str, taken_out: bool) -> None:
    """docs/configuration.md's ``failures: 3`` default applies to a lone upstream only when the
    config has a ``passive:`` section (as nginx's max_fails): refused connections included."""
    config = tmp_path / "c.yaml"
    config.write_text(f"upstreams: [http://127.0.0.1:9]\ncache: {{disk: null}}\nupstream:\n  {section or 'retries: 0'}\n")
    settings = load_config(str(config))
    pool = UpstreamPool(settings.upstreams, settings.pool, clock=lambda: 0.0)
    (lone,) = pool.upstreams
    for _ in range(settings.pool.passive.failures + 2):
        pool._passive_failure(lone, "connect", CONNECT)
    assert (lone.down_until > 0) is taken_out
