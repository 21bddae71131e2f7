"""The admin listener without a token, attacked through a browser on the same machine.

Without ``admin.token`` the admin API listens on loopback and trusts whoever reaches it. A web
page the operator visits can borrow that reach: by DNS rebinding (its own name re-resolved to
127.0.0.1, so its scripts read and write the admin API as their own origin, with ``Host:
evil.example``), or by cross-site request forgery (a form or a no-cors ``fetch`` POSTing to
``http://127.0.0.1:8081/purge``). Each test sends exactly what such a browser sends and checks
that nothing happened: 403/415 with a JSON error saying why, the cache untouched, the refusal
counted. Then what a legitimate client (curl, ``cachegate purge``, a page served by the admin
listener itself) sends still works.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.web.admin_guard import GuessLimiter
from tests.admin.test_admin_answers import admin_context
from tests.admin.util import absolute, settle
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, Reply

TOKEN = "a-token-long-enough-to-use"
EVIL = "evil.example"


@pytest.fixture
async def open_admin(origin: Origin, make_proxy: MakeProxy) -> Proxy:
    """A proxy with a token-less admin listener on loopback, and one cached page."""
    proxy = await make_proxy()
    origin.route("/page", body=b"cached", headers={"Cache-Control": "max-age=600"})
    await proxy.get("/page")
    await settle(proxy)
    return proxy


async def send(proxy: Proxy, method: str, path: str, headers: dict[str, str], body: bytes | None = None
               ) -> Reply:
    """Exactly these headers (aiohttp adds no Content-Type of its own), Host included."""
    async with proxy.session.request(method, proxy.admin_url + path, headers=headers, data=body,
                                     skip_auto_headers=("Content-Type",)) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


def port_of(proxy: Proxy) -> str:
    return proxy.admin_url.rsplit(":", 1)[1]


async def refused_total(proxy: Proxy, reason: str) -> float:
    text = (await proxy.admin("GET", "/metrics")).body.decode()
    for line in text.splitlines():
        if line.startswith(f'cachegate_admin_refused_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def counted(proxy: Proxy, reason: str) -> float:
    """``cachegate_admin_refused_total{reason}`` read in process (the API may be refusing tokens)."""
    return proxy.runtime.metrics.admin_refused.values().get((reason,), 0.0)


async def still_cached(proxy: Proxy) -> bool:
    return (await proxy.get("/page")).x_cache == "HIT"


def purge_all() -> bytes:
    return json.dumps({"all": True}).encode()


# -- DNS rebinding --------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/cache?url={page}", None),
    ("GET", "/stats", None),
    ("GET", "/metrics", None),
    ("GET", "/explain?url={page}", None),
    ("POST", "/purge", purge_all()),
    ("POST", "/reload", b"{}"),
])
async def test_a_page_rebound_to_loopback_can_neither_read_nor_purge(
        open_admin: Proxy, method: str, path: str, body: bytes | None) -> None:
    """After the rebinding the page is same-origin with the admin API: its requests carry its own
    Origin and JSON like a legitimate page's would. Only the Host tells them apart."""
    host = f"{EVIL}:{port_of(open_admin)}"
    headers = {"Host": host}
    if body is not None:
        headers |= {"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin",
                    "Content-Type": "application/json"}
    reply = await send(open_admin, method, path.format(page=absolute(open_admin, "/page")), headers, body)
    assert reply.status == 403
    error = json.loads(reply.body)["error"]
    assert f"Host '{host}' is not a loopback address or one of admin.server_names" in error
    assert "DNS rebinding" in error
    assert await still_cached(open_admin)
    assert await refused_total(open_admin, "host") == 1


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LOCALHOST.:{port}",
                                  "[::1]:{port}", "127.1.2.3:{port}"])
async def test_loopback_hosts_and_localhost_are_answered(open_admin: Proxy, host: str) -> None:
    reply = await send(open_admin, "GET", "/stats", {"Host": host.format(port=port_of(open_admin))})
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("headers", [{}, {"Host": "a"}, {"Host": "0.0.0.0:8081"}],
                         ids=["no-host", "other-name", "wildcard-address"])
async def test_a_missing_or_foreign_host_is_refused_even_without_a_browser(
        open_admin: Proxy, headers: dict[str, str]) -> None:
    reader, writer = await asyncio.open_connection(*open_admin.listeners.admin_addresses[0])
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"GET /stats HTTP/1.0\r\n{lines}\r\n".encode())
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.split(b" ", 2)[1] == b"403", answer[:200]
    assert b'"error"' in answer


async def test_healthz_answers_whatever_the_host(open_admin: Proxy) -> None:
    reply = await send(open_admin, "GET", "/healthz", {"Host": f"{EVIL}:1"})
    assert (reply.status, json.loads(reply.body)) == (200, {"status": "ok"})


async def test_admin_server_names_adds_the_names_the_listener_answers_to(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', server_names: [cache-admin.internal, "
                                    "'*.ops.example']}\n")
    port = port_of(proxy)
    for host in (f"cache-admin.internal:{port}", f"eu.ops.example:{port}", "Cache-Admin.Internal."):
        assert (await send(proxy, "GET", "/stats", {"Host": host})).status == 200, host
    for host in (f"{EVIL}:{port}", f"ops.example:{port}", f"cache-admin.internal.{EVIL}:{port}"):
        reply = await send(proxy, "GET", "/stats", {"Host": host})
        assert reply.status == 403, host
        assert "(cache-admin.internal, *.ops.example)" in json.loads(reply.body)["error"]


async def test_an_ipv6_address_in_server_names_lets_its_host_through_in_any_spelling(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The guard compared the address without its brackets with the bracketed pattern: an
    IPv6 server name never matched, and its Host was refused."""
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0', server_names: ['[2001:db8:0::1]', "
                                    "'[2001:db8::2]:8081']}\n")
    port = port_of(proxy)
    for host in (f"[2001:db8::1]:{port}", "[2001:DB8:0:0::0001]", "[2001:db8::2]:8081"):
        assert (await send(proxy, "GET", "/stats", {"Host": host})).status == 200, host
    for host in (f"[2001:db8::3]:{port}", f"[2001:db8::2]:{port}"):
        assert (await send(proxy, "GET", "/stats", {"Host": host})).status == 403, host


async def test_with_a_token_the_host_is_checked_only_when_server_names_are_listed(
        origin: Origin, make_proxy: MakeProxy) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    free = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    reply = await send(free, "GET", "/stats", {"Host": f"cache-1.internal:{port_of(free)}", **auth})
    assert reply.status == 200  # the token is the lock: scrapers and scripts use names of their own
    await free.close()  # (one process per cache directory)
    named = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}, "
                                    "server_names: [cache-1.internal]}\n")
    assert (await send(named, "GET", "/stats", {"Host": "cache-1.internal", **auth})).status == 200
    assert (await send(named, "GET", "/stats", {"Host": "cache-2.internal", **auth})).status == 403


async def test_with_a_token_a_browser_must_still_name_a_loopback_host(
        origin: Origin, make_proxy: MakeProxy) -> None:
    # A page rebound to the listener could otherwise try tokens and read the answers.
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    rebound = {"Host": f"{EVIL}:{port_of(proxy)}", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    for token in (TOKEN, "guess"):
        reply = await send(proxy, "GET", "/stats", {**rebound, "Authorization": f"Bearer {token}"})
        assert reply.status == 403 and json.loads(reply.body)["error"].startswith("Host")
    login = await send(proxy, "POST", "/console/api/login", {**rebound, "Content-Type": "application/json"},
                       json.dumps({"token": "guess"}).encode())
    assert login.status == 403
    local = {"Host": f"127.0.0.1:{port_of(proxy)}", "Sec-Fetch-Site": "same-origin",
             "Authorization": f"Bearer {TOKEN}"}
    assert (await send(proxy, "GET", "/stats", local)).status == 200


async def test_with_a_token_a_rebound_page_without_fetch_metadata_must_name_a_loopback_host(
        origin: Origin, make_proxy: MakeProxy) -> None:
    # Browsers send Sec-Fetch-* only to https and localhost: a page rebound to
    # http://evil.example:PORT sends none, only its Host (and Origin on a POST) tells it.
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    origin.route("/page", body=b"cached", headers={"Cache-Control": "max-age=600"})
    await proxy.get("/page")
    await settle(proxy)
    host = f"{EVIL}:{port_of(proxy)}"
    login = await send(proxy, "POST", "/console/api/login",
                       {"Host": host, "Origin": f"http://{host}", "Content-Type": "application/json"},
                       json.dumps({"token": TOKEN}).encode())  # even the right token: never compared
    assert login.status == 403 and "DNS rebinding" in json.loads(login.body)["error"]
    assert "Set-Cookie" not in login.headers
    for path in ("/", "/console/api/session", "/stats"):
        assert (await send(proxy, "GET", path, {"Host": host})).status == 403, path
    # A session opened from a loopback name is no use to the rebound page either.
    local = await send(proxy, "POST", "/console/api/login", {"Host": f"127.0.0.1:{port_of(proxy)}",
                       "Content-Type": "application/json"}, json.dumps({"token": TOKEN}).encode())
    assert local.status == 200
    cookie = local.headers["Set-Cookie"].split(";", 1)[0]
    csrf = json.loads(local.body)["csrf"]
    purge = await send(proxy, "POST", "/purge", {"Host": host, "Origin": f"http://{host}", "Cookie": cookie,
                       "X-CSRF-Token": csrf, "Content-Type": "application/json"}, purge_all())
    assert purge.status == 403
    assert await still_cached(proxy)
    assert counted(proxy, "host") == 5
    # The right bearer token (cachegate commands, a Prometheus scraper) may name any host.
    reply = await send(proxy, "GET", "/stats", {"Host": "10.1.2.3:9", "Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 200


async def test_wrong_tokens_are_limited_per_client(origin: Origin, make_proxy: MakeProxy) -> None:
    """A loopback listener's token may be short: after 10 wrong ones (console logins or bearer
    tokens, from any host), every request of that client presenting a token is answered 429 with Retry-After,
    before its token is compared (a right one too: else the answer would still tell it)."""
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    local = {"Host": f"127.0.0.1:{port_of(proxy)}", "Content-Type": "application/json"}
    statuses = []
    for i in range(6):
        reply = await send(proxy, "POST", "/console/api/login", local, json.dumps({"token": f"g{i}"}).encode())
        statuses.append(reply.status)
    for i in range(4):  # wrong bearer tokens from a host the guard refuses count too
        reply = await send(proxy, "GET", "/stats", {"Host": f"{EVIL}:1", "Authorization": f"Bearer g{i}"})
        statuses.append(reply.status)
    assert statuses == [401] * 6 + [403] * 4
    for attempt in ({"token": TOKEN}, {"token": "g9"}):
        reply = await send(proxy, "POST", "/console/api/login", local, json.dumps(attempt).encode())
        assert reply.status == 429 and int(reply.headers["Retry-After"]) >= 1
        assert "Set-Cookie" not in reply.headers
    reply = await send(proxy, "GET", "/stats", {**local, "Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 429
    # A request that presents no token is not a guess: answered as usual.
    assert (await send(proxy, "GET", "/stats", local)).status == 401
    assert counted(proxy, "rate") == 3
    text = (await send(proxy, "GET", "/healthz", local)).body
    assert b"ok" in text
    await asyncio.sleep(1.1)  # the bucket refills at one guess a second
    reply = await send(proxy, "GET", "/stats", {**local, "Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 200


def test_a_client_trying_tokens_locks_out_itself_not_the_others() -> None:
    """On a listener open to a network, a stranger flooding wrong tokens must not keep the
    operator's scraper or purges (another address) out."""
    now = [0.0]
    limiter = GuessLimiter(burst=3, per_second=1.0, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("10.0.0.9") == 0
        limiter.failed("10.0.0.9")
    assert limiter.retry_after("10.0.0.9") >= 1
    assert limiter.retry_after("10.0.1.2") == 0  # the operator's address, in another /24
    assert limiter.retry_after("10.0.0.77") >= 1  # more addresses of one network do not help
    assert limiter.retry_after("127.0.0.1") == 0
    for _ in range(3):
        limiter.failed("127.0.3.4")  # every loopback address is one client
    assert limiter.retry_after("127.0.0.1") >= 1 and limiter.retry_after("::1") >= 1
    for i in range(3):
        limiter.failed(f"2001:db8::{i + 1}")  # one host's /64
    assert limiter.retry_after("2001:db8::ffff") >= 1 and limiter.retry_after("2001:db8:0:1::1") == 0
    now[0] += 1.0
    assert limiter.retry_after("10.0.0.9") == 0  # one guess a second again
    for i in range(GuessLimiter.MAX_CLIENTS + 10):  # remembered addresses are bounded
        limiter.failed(f"10.{i // 256}.{i % 256}.1")
    assert len(limiter._buckets) == GuessLimiter.MAX_CLIENTS


def test_an_ipv4_mapped_loopback_address_counts_as_loopback() -> None:
    """``is_loopback`` was asked before the IPv4-mapped address was unwrapped: ::ffff:127.0.0.1
    (not loopback as an IPv6 address) counted in 127.0.0.0/24, apart from the other loopback
    addresses. (No listener gives such an address today: each is IPv6-only.)"""
    assert {GuessLimiter.key(a) for a in ("::ffff:127.0.0.1", "::ffff:127.9.9.9", "127.0.0.1", "::1")} == {
        GuessLimiter.LOOPBACK}
    assert GuessLimiter.key("::ffff:10.0.0.9") == GuessLimiter.key("10.0.0.77") == "10.0.0.0/24"


def test_a_locked_out_network_stays_locked_out_however_many_other_networks_guess() -> None:
    """The last 4,096 networks were remembered, the oldest forgotten first with their lockout:
    a locked-out client that sent one wrong token from each of 4,096 other /64s of its own
    range (a /52) had its allowance back, every round (no limit at all). Now networks whose
    bucket is still refilling are kept, and a bucket for all networks together refuses the
    newcomers' guesses, the way the admin API asks (``retry_after`` before a token is compared)
    or not (the reviewer's sequence: each wrong token counted)."""
    now = [0.0]
    limiter = GuessLimiter(clock=lambda: now[0])
    attacker = "2001:db8:0:1::1"
    for _ in range(limiter.burst):
        assert limiter.retry_after(attacker) == 0
        limiter.failed(attacker)
    assert limiter.retry_after(attacker) >= 1
    compared = 0
    for _ in range(3):
        for i in range(2, 4098):  # the other /64s of its /52
            other = f"2001:db8:0:{i:x}::1"
            if limiter.retry_after(other) == 0:
                compared += 1
            limiter.failed(other)
        assert limiter.retry_after(attacker) >= 1
    assert compared == limiter.total_burst - limiter.burst  # what the bucket for all had left
    assert len(limiter._buckets) <= GuessLimiter.MAX_CLIENTS
    now[0] += 1.0  # a second: 5 guesses for all, one for the attacker's own network
    assert limiter.retry_after(attacker) == 0
    assert [limiter.retry_after(f"2001:db8:1:{i:x}::1") == 0 for i in range(6)] == [True] * 6  # (not counted)


def test_only_refilled_networks_are_forgotten_and_their_run_with_them() -> None:
    """Room for a newcomer is made by forgetting networks whose bucket has refilled (what a
    network not remembered gets), never one still refilling: a newcomer's wrong token is not
    remembered rather than a locked-out network's. A refilled network's run of refusals is
    over with its bucket (the set of networks whose run was logged grew with every network
    refused, pruned only when that one came back)."""
    now = [0.0]

    class Small(GuessLimiter):
        MAX_CLIENTS = 3

    limiter = Small(clock=lambda: now[0])
    limiter.failed("10.0.1.1")  # refilled at 1 s
    now[0] = 0.5
    for _ in range(10):
        limiter.failed("10.0.2.1")  # locked out until 1.5 s, refilled at 10.5 s
    limiter.failed("10.0.3.1")
    assert limiter.retry_after("10.0.2.1") >= 1 and limiter.refused("10.0.2.1") == "network"
    assert limiter.refused("10.0.2.1") is None  # one line a run
    now[0] = 1.2
    limiter.failed("10.0.4.1")  # the refilled 10.0.1.0/24 makes room
    assert list(limiter._buckets) == ["10.0.2.0/24", "10.0.3.0/24", "10.0.4.0/24"]
    limiter.failed("10.0.5.1")  # no room: 10.0.2.0/24 is still refilling, and stays
    assert list(limiter._buckets) == ["10.0.2.0/24", "10.0.3.0/24", "10.0.4.0/24"]
    assert limiter.retry_after("10.0.2.1") >= 1 and limiter.refused("10.0.2.1") is None
    now[0] = 10.5
    assert limiter.retry_after("10.0.2.1") == 0
    assert "10.0.2.0/24" not in limiter._buckets  # refilled: forgotten, its run with it
    for _ in range(10):
        limiter.failed("10.0.2.1")
    assert limiter.retry_after("10.0.2.1") >= 1 and limiter.refused("10.0.2.1") == "network"  # a new run


async def test_loopback_is_never_kept_out_by_a_flood_of_guesses_from_elsewhere(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """Over the wire, on loopback: wrong tokens from many networks empty the bucket for all;
    loopback was held to it too, and a handful of networks guessing kept ``cachegate purge`` on
    the machine itself out for as long as they went on (and after a restart, which forgets the
    networks that presented the right token). Loopback is held to its own bucket only: the right
    token works at once, a console login too; its own 10 wrong tokens still lock it out."""
    caplog.set_level(logging.WARNING, logger="cachegate.admin")
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    now = [0.0]
    limiter = admin_context(proxy).guesses = GuessLimiter(clock=lambda: now[0])
    local = {"Host": f"127.0.0.1:{port_of(proxy)}", "Content-Type": "application/json"}
    right = {**local, "Authorization": f"Bearer {TOKEN}"}
    flood(limiter, range(1, 200))
    assert limiter.retry_after("2001:db8:1::1") >= 1  # another network waits
    assert (await send(proxy, "GET", "/stats", right)).status == 200
    login = await send(proxy, "POST", "/console/api/login", local, json.dumps({"token": TOKEN}).encode())
    assert login.status == 200 and "Set-Cookie" in login.headers
    # Its own network's bucket still holds: 10 wrong tokens, then 429 (the right one too).
    for i in range(10):
        assert (await send(proxy, "GET", "/stats", {**local, "Authorization": f"Bearer g{i}"})).status == 401
    assert (await send(proxy, "GET", "/stats", right)).status == 429
    said = [r.getMessage() for r in caplog.records if "too many wrong tokens" in r.getMessage()]
    assert len(said) == 1 and "from 127.0.0.1 (more than 10" in said[0], said  # (its own bucket)


def flood(limiter: GuessLimiter, networks: range) -> None:
    """A wrong token from each of ``networks`` (other /64s), as the admin API counts them."""
    for i in networks:
        other = f"2001:db8:0:{i:x}::1"
        if limiter.retry_after(other) == 0:
            limiter.failed(other)


def test_a_network_that_presented_the_right_token_passes_a_flood_and_the_flood_is_said_once() -> None:
    """While many networks' guesses keep the bucket for all empty, a network that presented the
    right token before is held to its own bucket only (else a handful of networks kept the
    operator's scraper out for as long as they liked); any other waits. The run of refusals of
    the bucket for all is one line however long the flood: it ended at each refill (every
    0.2 s), and a flood logged its line five times a second."""
    now = [0.0]
    limiter = GuessLimiter(clock=lambda: now[0])
    scraper, newcomer = "10.1.2.3", "10.9.9.9"
    limiter.succeeded(scraper)
    runs = []
    for _ in range(50):  # 10 s of a flood from many networks
        flood(limiter, range(1, 300))
        assert limiter.retry_after(scraper) == 0
        if limiter.retry_after(newcomer):
            runs.append(limiter.refused(newcomer))
        now[0] += 0.2
    assert runs[0] == "all" and runs[1:] == [None] * (len(runs) - 1) and len(runs) == 50
    now[0] += 20.0  # quiet: the bucket for all is full again, and its run over
    assert limiter.retry_after(newcomer) == 0
    flood(limiter, range(1, 300))
    assert limiter.retry_after(newcomer) >= 1 and limiter.refused(newcomer) == "all"  # a new run


# -- cross-site request forgery -------------------------------------------------------------------

# What browsers send for a cross-site POST that needs no preflight, and the refusal expected.
FORGED: list[tuple[str, dict[str, str], bytes | None, int, str, str]] = [
    ("form post (urlencoded) from a page elsewhere",
     {"Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://{EVIL}",
      "Sec-Fetch-Site": "cross-site"}, b"all=true", 403, "origin", "Sec-Fetch-Site: cross-site"),
    ("form post (text/plain, a JSON-looking body) from an old browser that sends no Origin",
     {"Content-Type": "text/plain"}, b'{"all": true, "x": "="}', 415, "content_type",
     "Content-Type 'text/plain'"),
    ("multipart form post", {"Content-Type": "multipart/form-data; boundary=x"},
     b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n", 415, "content_type",
     "must say Content-Type: application/json"),
    ("no-cors fetch with a typeless body", {"Origin": f"http://{EVIL}"}, purge_all(), 403, "origin",
     f"Origin 'http://{EVIL}' is not this admin listener's own origin"),
    ("no-cors fetch from a sandboxed frame", {"Origin": "null", "Content-Type": "text/plain"}, purge_all(),
     403, "origin", "Origin 'null'"),
    ("another local app (same site, other port)", {"Origin": "http://127.0.0.1:3000",
                                                  "Sec-Fetch-Site": "same-site"}, purge_all(), 403,
     "origin", "Sec-Fetch-Site: same-site"),
    ("a typeless POST from a script without Origin", {}, purge_all(), 415, "content_type",
     "no Content-Type"),
]


@pytest.mark.parametrize("path", ["/purge", "/reload"])
@pytest.mark.parametrize("case, headers, body, status, reason, message", FORGED, ids=[f[0] for f in FORGED])
async def test_a_forged_state_changing_request_is_refused_and_changes_nothing(
        open_admin: Proxy, path: str, case: str, headers: dict[str, str], body: bytes | None,
        status: int, reason: str, message: str) -> None:
    reloads_before = await reloads(open_admin)
    reply = await send(open_admin, "POST", path, {"Host": f"127.0.0.1:{port_of(open_admin)}", **headers},
                       body)
    assert reply.status == status, (case, reply.body)
    assert reply.headers["Content-Type"].startswith("application/json")
    assert message in json.loads(reply.body)["error"]
    assert await still_cached(open_admin)
    assert await reloads(open_admin) == reloads_before
    assert await refused_total(open_admin, reason) == 1


@pytest.mark.parametrize("first", ["own", "foreign"])
async def test_a_request_with_two_origin_fields_is_refused_whichever_comes_first(
        open_admin: Proxy, first: str) -> None:
    """Only the first Origin was checked: its own origin first let a foreign one ride behind it."""
    own, foreign = f"http://127.0.0.1:{port_of(open_admin)}", f"http://{EVIL}"
    pair = [own, foreign] if first == "own" else [foreign, own]
    headers = CIMultiDict([("Host", f"127.0.0.1:{port_of(open_admin)}"),
                           ("Content-Type", "application/json"), *(("Origin", o) for o in pair)])
    async with open_admin.session.post(open_admin.admin_url + "/purge", headers=headers,
                                       data=purge_all()) as resp:
        status, body = resp.status, json.loads(await resp.read())
    assert status == 403, body
    assert body["error"].startswith("2 Origin fields: a request has at most one"), body
    assert await still_cached(open_admin)


async def reloads(proxy: Proxy) -> str:
    text = (await proxy.admin("GET", "/metrics")).body.decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("cachegate_config_reloads_total"))


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json"},  # curl -H 'Content-Type: application/json', cachegate purge
    {"Content-Type": "Application/JSON; charset=utf-8"},
    # A page served by the admin listener itself (a console), fetch() with a JSON body:
    {"Content-Type": "application/json", "Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
    {"Content-Type": "application/json", "Sec-Fetch-Site": "none"},  # typed by the user
])
async def test_a_legitimate_json_post_purges(open_admin: Proxy, headers: dict[str, Any]) -> None:
    headers = {k: v.format(port=port_of(open_admin)) for k, v in headers.items()}
    reply = await send(open_admin, "POST", "/purge", {"Host": f"127.0.0.1:{port_of(open_admin)}", **headers},
                       json.dumps({"urls": [absolute(open_admin, "/page")]}).encode())
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["purged"] == 1


async def test_with_a_token_scripts_may_post_any_content_type_but_no_other_origin_may(
        origin: Origin, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    auth = {"Authorization": f"Bearer {TOKEN}", "Host": f"127.0.0.1:{port_of(proxy)}"}
    # curl -H "$AUTH" -d '{...}' sends a form's Content-Type: a form cannot carry the token.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert (await send(proxy, "POST", "/purge", {**auth, **form}, purge_all())).status == 200
    forged = await send(proxy, "POST", "/purge", {**auth, **form, "Origin": f"http://{EVIL}"}, purge_all())
    assert forged.status == 403


async def test_the_guard_runs_before_routing_so_routes_added_later_are_covered(open_admin: Proxy) -> None:
    """Console and cluster routes join the same app: a path no route knows is refused, not 404."""
    forged = await send(open_admin, "POST", "/cluster/anything",
                        {"Origin": f"http://{EVIL}", "Content-Type": "application/json"}, b"{}")
    assert forged.status == 403
    rebound = await send(open_admin, "GET", "/console", {"Host": EVIL})
    assert rebound.status == 403


@pytest.mark.parametrize("host", ["127.0.0.1:80@evil.com", "[::1]evil.com", "[::1]:x.evil.com", "localhost:evil",
                                  "127.0.0.1:abc", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:", "[127.0.0.1]",
                                  "[::1", "::1", "[::1%25lo]", "127.0.0.1:\u0661", "127.0.0.1 evil.com",
                                  "evil.com#@127.0.0.1", "localhost:80:80"])
async def test_a_host_that_is_not_name_and_port_is_refused(open_admin: Proxy, host: str) -> None:
    """Only ``name[:port]`` or ``[v6][:port]``, the port 1-65535: what follows a loopback name is
    never ignored (a lenient split once answered ``127.0.0.1:80@evil.com`` as loopback)."""
    reader, writer = await asyncio.open_connection(*open_admin.listeners.admin_addresses[0])
    writer.write(b"GET /stats HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.split(b" ", 2)[1] == b"403", (host, answer[:300])
    assert b"is not a host name or address with an optional :port" in answer


def test_host_syntax_units() -> None:
    from proxy.web.admin_guard import _authority, _split_host

    assert _split_host("LocalHost.:8081") == ("localhost", "8081")
    assert _split_host("[::1]:1") == ("::1", "1") and _split_host("[::FFFF:127.0.0.1]") == ("::ffff:127.0.0.1", "")
    assert _split_host("127.0.0.1:65535") == ("127.0.0.1", "65535")
    for bad in ("127.0.0.1:80@evil.com", "[::1]evil.com", "localhost:evil", "a:0", "[x]", ""):
        assert _split_host(bad) is None, bad
    assert _authority("http://127.0.0.1:80") == "127.0.0.1"
    assert _authority("http://127.0.0.1:80@evil.com") is None and _authority("http://[::1]evil.com") is None
