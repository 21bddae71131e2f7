"""Stampede protection across worker processes: ``cachegate run --workers 2`` as a real process tree.

Clients use fresh connections, so SO_REUSEPORT spreads them over both workers
(``X-Cachegate-Worker`` says which answered). The workers coalesce through the
supervisor's lease broker (proxy/leases.py): one origin fetch per key for the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.policy.httpdate import format_http_date
from tests.harness import Origin, Versions
from tests.storage.procs import HOST, ProxyProcess, Response, shared, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 64MB, disk: {path: cache, size: 256MB, shards: 2}}\n"
# Waiters that would give up on a lease (lock_timeout) only after 30 s: what they do sooner,
# they were told to.
PATIENT = "cache: {memory: 64MB, lock_timeout: 30s, disk: {path: cache, size: 256MB, shards: 2}}\n"
BODY = bytes(range(256)) * 1024  # 256 KiB


async def herd(url: str, path: str, n: int) -> list[Response | BaseException]:
    """``n`` concurrent GETs, each on its own new connection."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one() -> Response:
            async with session.get(url + path, headers={"Host": HOST}) as r:
                return Response(r.status, r.headers, await r.read())

        return list(await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True))


def answered(results: list[Response | BaseException]) -> list[Response]:
    return [r for r in results if isinstance(r, Response)]


async def start_two_workers(tmp_path: Path, origin: Origin, cache: str = CACHE) -> ProxyProcess:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache))
    await proxy.start("--workers", "2")
    await proxy.wait_for(lambda: len(proxy.workers) == 2)
    return proxy


@pytest.fixture
async def two_workers(tmp_path: Path, origin: Origin) -> AsyncIterator[ProxyProcess]:
    proxy = await start_two_workers(tmp_path, origin)
    yield proxy
    await proxy.stop()


@pytest.fixture
async def patient_workers(tmp_path: Path, origin: Origin) -> AsyncIterator[ProxyProcess]:
    proxy = await start_two_workers(tmp_path, origin, PATIENT)
    yield proxy
    await proxy.stop()


# Two workers (and their origin) shared by the tests of the module that use paths of their own and
# neither kill a worker nor count what another test did (the tests marked SHARED): one start each
# for them all. A test that kills, stops or counts from zero starts its own.
SHARED = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_pair(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Origin, ProxyProcess]]:
    async for pair in shared(str(tmp_path_factory.mktemp("herd")), CACHE, workers=2):
        yield pair


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_patient_pair(
        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Origin, ProxyProcess]]:
    async for pair in shared(str(tmp_path_factory.mktemp("patient")), PATIENT, workers=2):
        yield pair


def counter(metrics: str, sample: str) -> float:
    """A sample's value in the metrics' text (0 before it was ever counted)."""
    for line in metrics.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def flights(metrics: str, outcome: str) -> float:
    """cachegate_flights_total of ``outcome`` in the metrics' text."""
    return counter(metrics, f'cachegate_flights_total{{outcome="{outcome}"}}')


async def upstream_requests(proxy: ProxyProcess) -> list[int]:
    """Each worker's count of requests to the (one) upstream, as the admin API shows it."""
    state = json.loads((await proxy.admin("GET", "/upstreams")).body)
    return [w["upstreams"][0]["requests"] for w in state["workers"]]


@SHARED
async def test_500_concurrent_clients_over_two_workers_make_one_origin_request(
        shared_pair: tuple[Origin, ProxyProcess]) -> None:
    origin, two_workers = shared_pair
    origin.route("/cold", body=BODY, headers={"Cache-Control": "max-age=60"}, delay=0.2)
    metrics = (await two_workers.admin("GET", "/metrics")).body.decode()
    leases = 'cachegate_cross_worker_leases_total{event="%s"}'
    granted, stored = counter(metrics, leases % "granted"), counter(metrics, leases % "stored")
    requested = sum(await upstream_requests(two_workers))
    results = answered(await herd(two_workers.url, "/cold", 500))
    assert len(results) == 500
    assert origin.count("/cold") == 1
    digest = hashlib.sha256(BODY).hexdigest()
    assert {(r.status, hashlib.sha256(r.body).hexdigest()) for r in results} == {(200, digest)}
    workers = Counter(r.worker for r in results)
    assert set(workers) == {"0", "1"}, workers  # both workers had clients
    statuses = Counter(r.x_cache for r in results)
    assert statuses == {"MISS": 1, "HIT": 499}
    # Whichever worker answered, a follower says the same: its fetch stored the response (the
    # waiting worker's clients, answered from the store, used to leave "stored" out).
    assert {(r.worker, r.headers["Cache-Status"]) for r in results if r.x_cache == "HIT"} == {
        (w, "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed") for w in ("0", "1")}
    metrics = (await two_workers.admin("GET", "/metrics")).body.decode()
    assert counter(metrics, leases % "granted") - granted == 1
    assert counter(metrics, leases % "stored") - stored == 1
    # Each worker's own pool, as the admin API shows it: one request upstream for the machine.
    state = json.loads((await two_workers.admin("GET", "/upstreams")).body)
    assert [w["worker"] for w in state["workers"]] == [0, 1]
    assert all(w["upstreams"][0]["state"] == "up" for w in state["workers"])
    assert sum(await upstream_requests(two_workers)) - requested == 1
    assert state["upstreams"][0]["url"] == origin.url


@SHARED
async def test_a_herd_on_a_response_stale_by_its_date_alone_costs_one_fetch_for_both_workers(
        shared_pair: tuple[Origin, ProxyProcess]) -> None:
    """The origin's clock is 2 h behind: its max-age=600 response arrives stale through its
    Date's apparent age alone. The other worker's clients, which waited for the fetch under its
    lease, take what it stored, as this worker's own followers of that fetch do. They reread it,
    wanted a fresh hit, and fetched again (a reviewer: 2 fetches for 30 clients, the slowest
    answered at twice the origin's time). What is stored stays stale for the next request."""
    origin, two_workers = shared_pair

    async def page(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(body=b"page", headers={"Cache-Control": "max-age=600",
                                                   "Date": format_http_date(time.time() - 7200)})

    origin.route("/date-behind", page)
    results = answered(await herd(two_workers.url, "/date-behind", 30))
    assert len(results) == 30 and {(r.status, r.body) for r in results} == {(200, b"page")}
    assert {r.worker for r in results} == {"0", "1"}, "the herd did not reach both workers"
    assert origin.count("/date-behind") == 1
    assert Counter(r.x_cache for r in results) == {"MISS": 1, "HIT": 29}
    assert {(r.worker, r.headers["Cache-Status"]) for r in results if r.x_cache == "HIT"} == {
        (w, "cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed") for w in ("0", "1")}
    after = await two_workers.get("/date-behind")  # nobody waits for a fetch now: stale, as any
    assert (after.status, after.x_cache) == (200, "EXPIRED")
    assert origin.count("/date-behind") == 2


async def test_a_body_slower_than_lock_timeout_costs_one_fetch_per_worker_not_one_per_client(
        tmp_path: Path, origin: Origin) -> None:
    """The head comes at once, the body takes longer than ``lock_timeout``: the waiting worker
    gives up on the lease and fetches once for all of its clients. Its flight and its
    followers reached ``lock_timeout`` at the same instant, and each follower used to fetch
    alone (a reviewer: 11-12 origin requests for 20 clients over two workers)."""
    body = b"s" * (40 * 1024)

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "Content-Length": str(len(body))})
        await resp.prepare(request)
        for i in range(0, len(body), 2048):  # 20 pieces over 2.5 s
            await resp.write(body[i:i + 2048])
            await asyncio.sleep(0.125)
        await resp.write_eof()
        return resp

    origin.route("/slow-body", slow)
    proxy = await start_two_workers(
        tmp_path, origin, "cache: {memory: 64MB, lock_timeout: 1s, disk: {path: cache, size: 256MB, shards: 2}}\n")
    try:
        results = answered(await herd(proxy.url, "/slow-body", 20))
    finally:
        await proxy.stop()
    assert len(results) == 20 and {(r.status, r.body) for r in results} == {(200, body)}
    workers = Counter(r.worker for r in results)
    assert set(workers) == {"0", "1"} and min(workers.values()) >= 2, workers
    # The lease holder's fetch, and the waiting worker's own after lock_timeout: one each.
    assert origin.count("/slow-body") == 2


async def until_each_worker(proxy: ProxyProcess, path: str, check: Callable[[Response], bool],
                            within: float = 10.0) -> None:
    """New connections until every worker answered ``path`` with a response ``check`` accepts."""
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        r = await proxy.get(path)
        if check(r):
            seen.add(r.worker)
        if seen == {"0", "1"}:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only workers {sorted(seen)} answered as wanted")


@SHARED
async def test_stale_while_revalidate_refreshes_once_for_both_workers(
        shared_pair: tuple[Origin, ProxyProcess]) -> None:
    origin, two_workers = shared_pair
    version = 0
    release = asyncio.Event()  # the refresh stays at the origin until the checks below are done

    async def page(request: web.Request) -> web.Response:
        nonlocal version
        version += 1
        if version > 1:
            await asyncio.wait_for(release.wait(), 60)
        return web.Response(text=f"v{version}", headers={"Cache-Control": "max-age=2, stale-while-revalidate=30"})

    origin.route("/swr", page)
    assert (await two_workers.get("/swr")).body == b"v1"
    await until_each_worker(two_workers, "/swr", lambda r: r.body == b"v1")  # both hold it in memory
    await asyncio.sleep(2.1)  # stale in both
    results = answered(await herd(two_workers.url, "/swr", 40))
    assert {(r.status, r.x_cache, r.body) for r in results} == {(200, "UPDATING", b"v1")}
    assert {r.worker for r in results} == {"0", "1"}
    for _ in range(10):  # more requests while the refresh is at the origin
        assert (await two_workers.get("/swr")).x_cache == "UPDATING"
    release.set()
    await until_each_worker(two_workers, "/swr", lambda r: r.body == b"v2")
    assert origin.count("/swr") == 2  # one refresh for the machine


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_herd_on_a_stale_key_the_origin_answers_304_says_so_whichever_worker_answers(
        tmp_path: Path, origin: Origin, workers: int) -> None:
    """One conditional request for the herd on a stale key, which the origin answers 304: every
    client says what happened, alike in each worker, in its fields, the access log and
    cachegate_requests_total: ``REVALIDATED`` with ``fwd-status=304``, ``collapsed`` for all but
    the one whose request went. The other worker's clients, which waited for that revalidation
    under its lease, said ``HIT`` with ``fwd-status=200`` (the stored response's status, not the
    origin's answer), and this worker's own followers were not counted as coalesced. The 304's
    Set-Cookie goes to the client whose request went, and to no other (in neither worker)."""
    conditionals = 0

    async def page(request: web.Request) -> web.Response:
        nonlocal conditionals
        if "If-None-Match" not in request.headers:
            return web.Response(text="v1", headers={"ETag": '"v1"', "Cache-Control": "max-age=1"})
        conditionals += 1
        await asyncio.sleep(0.5)  # the herd arrives meanwhile
        return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60",
                                                 "Set-Cookie": "s=renewed"})

    origin.route("/r", page)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, PATIENT + "access_log: true\n"))
    await proxy.start("--workers", str(workers))
    try:
        if workers > 1:
            await proxy.wait_for(lambda: len(proxy.workers) == workers)
        assert (await proxy.get("/r")).x_cache == "MISS"
        await asyncio.sleep(1.2)  # stale (max-age=1: at most 1 s after it was answered)
        results = answered(await herd(proxy.url, "/r", 16))
        assert len(results) == 16 and {(r.status, r.body) for r in results} == {(200, b"v1")}
        assert conditionals == 1  # one revalidation for the machine
        if workers > 1:
            assert {r.worker for r in results} == {"0", "1"}  # both workers had clients
        went = "cachegate; fwd=stale; fwd-status=304; ttl=N"
        told = Counter(re.sub(r"ttl=\d+", "ttl=N", r.headers["Cache-Status"]) for r in results)
        assert told == {went: 1, went + "; collapsed": 15}
        assert Counter((r.headers.get("Set-Cookie"), "collapsed" in r.headers["Cache-Status"])
                       for r in results) == {("s=renewed", False): 1, (None, True): 15}
        assert {r.x_cache for r in results} == {"REVALIDATED"}
        await proxy.wait_for(lambda: sum('"path":"/r"' in line for line in proxy.lines) == 17, 10)
        logged = [json.loads(line) for line in proxy.lines if '"path":"/r"' in line][1:]
        assert Counter((e["cache"], re.sub(r"ttl=\d+", "ttl=N", e["cache_status"]), e["upstream"] is None)
                       for e in logged) == {("REVALIDATED", went, False): 1,
                                            ("REVALIDATED", went + "; collapsed", True): 15}
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert 'cachegate_requests_total{cache_status="REVALIDATED",method="GET"} 16.0' in metrics
        assert 'cachegate_requests_total{cache_status="HIT",method="GET"} 0.0' in metrics
        assert "cachegate_coalesced_requests_total 15.0" in metrics
    finally:
        await proxy.stop()


# (case, the response's Cache-Control, the 304's delay): a response its own worker's followers
# take from the 304 though it is not fresh then.
REVALIDATED_NOT_FRESH = [
    ("no-cache: validated before each use", "no-cache", 0.5),
    ("stale on arrival: a lifetime shorter than the 304 takes", "max-age=1", 1.2),
]


@SHARED
@pytest.mark.parametrize(("case", "cache_control", "delay"), REVALIDATED_NOT_FRESH,
                         ids=[c[0] for c in REVALIDATED_NOT_FRESH])
async def test_a_herd_on_a_revalidation_whose_304_leaves_it_not_fresh_costs_one_request_for_both_workers(
        shared_pair: tuple[Origin, ProxyProcess], case: str, cache_control: str, delay: float) -> None:
    """The other worker's clients, which waited under the lease for the revalidation, take the
    response its 304 freshened as that worker's own followers do, whether or not it is fresh
    then: that 304 is the validation they waited for. They wanted a fresh hit and sent it again,
    one conditional request per worker (a reviewer: 2 for 8 clients over two workers, in every
    run). A request that comes after the validation is no follower: revalidated again."""
    origin, two_workers = shared_pair
    path = "/reval-" + cache_control.replace("=", "")
    conditionals = 0

    async def page(request: web.Request) -> web.Response:
        nonlocal conditionals
        fields = {"ETag": '"v1"', "Cache-Control": cache_control}
        if "If-None-Match" not in request.headers:
            return web.Response(text="v1", headers=fields)
        conditionals += 1
        await asyncio.sleep(delay)  # the herd arrives meanwhile
        return web.Response(status=304, headers=fields)

    origin.route(path, page)
    assert (await two_workers.get(path)).x_cache == "MISS"
    if cache_control.startswith("max-age"):
        await asyncio.sleep(1.1)  # stale
    results = answered(await herd(two_workers.url, path, 16))
    assert len(results) == 16 and {(r.status, r.body) for r in results} == {(200, b"v1")}
    assert {r.worker for r in results} == {"0", "1"}, "the herd did not reach both workers"
    assert conditionals == 1  # one revalidation for the machine
    told = Counter(re.sub(r"ttl=-?\d+", "ttl=N", r.headers["Cache-Status"]) for r in results)
    went = "cachegate; fwd=stale; fwd-status=304; ttl=N"
    assert told == {went: 1, went + "; collapsed": 15}
    assert {r.x_cache for r in results} == {"REVALIDATED"}
    after = await two_workers.get(path)  # after the validation: validated again, for itself
    assert (after.status, after.x_cache, after.body) == (200, "REVALIDATED", b"v1")
    assert "collapsed" not in after.headers["Cache-Status"]
    assert conditionals == 2


@SHARED
async def test_a_response_that_is_not_shareable_sends_every_worker_upstream_then_straight_through(
        shared_pair: tuple[Origin, ProxyProcess]) -> None:
    origin, two_workers = shared_pair
    calls = 0

    async def personal(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        mine = calls
        await asyncio.sleep(0.3)
        return web.Response(text=f"for caller {mine}", headers={"Cache-Control": "private, max-age=60"})

    origin.route("/me", personal)

    async def leases() -> str:
        return (await two_workers.admin("GET", "/metrics")).body.decode()

    granted_before = grants(await leases())
    results = answered(await herd(two_workers.url, "/me", 40))
    assert len({r.body for r in results}) == 40  # nobody was given another's response
    assert {r.worker for r in results} == {"0", "1"}
    granted = grants(await leases()) - granted_before
    assert 1 <= granted <= 2
    # Both workers now know the key as hit-for-pass: the next herd asks nobody and waits for nobody.
    results = answered(await herd(two_workers.url, "/me", 40))
    assert len({r.body for r in results}) == 40
    assert origin.count("/me") == 80
    assert grants(await leases()) - granted_before == granted


async def test_what_one_worker_stores_under_a_hit_for_pass_key_the_other_serves_on_either_path(
        tmp_path: Path, origin: Origin) -> None:
    """Both workers met a private response with nothing stored (hit-for-pass: their plain
    requests skip the lookup); the origin turns public and one worker stores the response in
    the machine's memory. The other worker serves it at once, on the fast path and on the
    general one (``Connection: close``, which the fast path leaves to it) alike."""
    private = True

    async def page(request: web.Request) -> web.Response:
        if private:
            return web.Response(text="private", headers={"Cache-Control": "private, max-age=100"})
        return web.Response(text="public", headers={"Cache-Control": "public, max-age=100"})

    origin.route("/w", page)
    # Memory only: every lookup that finds nothing in memory knows the key is nowhere (with a
    # disk tier, only once the directory of its keys is built), so the first private response
    # marks the key for passes without a lookup in each worker.
    proxy = await start_two_workers(tmp_path, origin, "cache: {memory: 64MB, hit_for_pass: 30s}\n")
    try:
        await until_each_worker(proxy, "/w", lambda r: r.body == b"private")
        private = False
        # A request with Cache-Control looks up despite the mark: passed, found storable, stored.
        stored = await proxy.get("/w", headers={"Cache-Control": "max-age=1000"})
        assert (stored.x_cache, stored.body) == ("MISS", b"public")
        other = ({"0", "1"} - {stored.worker}).pop()
        asked = origin.count("/w")
        loop = asyncio.get_running_loop()
        for headers in ({"Connection": "close"}, {}):  # the general path first: its mark stands
            deadline = loop.time() + 10
            while True:
                r = await proxy.get("/w", headers=dict(headers))
                assert (r.x_cache, r.body) == ("HIT", b"public"), (headers, r.worker, r.x_cache)
                if r.worker == other:
                    break
                assert loop.time() < deadline, "the other worker never answered"
        assert origin.count("/w") == asked
    finally:
        await proxy.stop()


@SHARED
async def test_a_head_that_is_not_shareable_sends_the_other_worker_upstream_before_its_body_ends(
        shared_patient_pair: tuple[Origin, ProxyProcess]) -> None:
    """The lease holder tells the waiting worker as soon as it has the head, not at the end of
    the body: here the first body ends only once a request from the other worker reached the
    origin, so without that word the other worker's clients would sit until the origin gave
    up on the first body."""
    origin, patient_workers = shared_patient_pair
    from_other_worker = asyncio.Event()
    order: list[str] = []
    first: list[int] = []  # the pid of the worker that fetched first

    async def personal(request: web.Request) -> web.StreamResponse:
        port = request.transport.get_extra_info("peername")[1]  # type: ignore[union-attr]
        worker = pid_owning_connection(port, origin.port, list(patient_workers.workers.values()))
        response = web.StreamResponse(headers={"Cache-Control": "private, max-age=60"})
        await response.prepare(request)
        if not first:
            first.append(worker)
            await response.write(b"head first; ")
            try:
                await asyncio.wait_for(from_other_worker.wait(), 15.0)
                order.append("the other worker while the first body was open")
            except TimeoutError:
                order.append("not the other worker until the first body gave up")
        elif worker != first[0]:
            from_other_worker.set()
        await response.write_eof(b"body")
        return response

    origin.route("/slow-private", personal)
    results = answered(await herd(patient_workers.url, "/slow-private", 40))
    assert len(results) == 40 and {r.worker for r in results} == {"0", "1"}
    assert order == ["the other worker while the first body was open"]


@pytest.mark.parametrize("fields", [{"Cache-Control": "private, max-age=60"},  # the word "pass"
                                    {"Cache-Control": "max-age=0", "ETag": '"e"'}])  # "unshareable"
@SHARED
async def test_the_waiting_workers_clients_go_upstream_at_once_when_the_holders_head_is_not_shareable(
        shared_patient_pair: tuple[Origin, ProxyProcess], fields: dict[str, str]) -> None:
    """Told at the holder's head that its response may not be shared, the waiting worker's
    clients each go upstream at once, as the holder's own followers do. Its flight used to
    fetch once more first and its followers to wait for that head too (three origin round
    trips for them). Here the first answer comes after 0.5 s (the herd has joined its flights
    by then); every later request is held until all 39 are in the origin at once (15 s at most):
    that many get in only when nobody waits for anybody's head."""
    origin, patient_workers = shared_patient_pair
    path = "/np-etag" if "ETag" in fields else "/np-private"  # (each case a key of its own)
    seen = 0
    inside = 0
    peaks: list[int] = []
    everyone = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        nonlocal seen, inside
        seen += 1
        if seen == 1:
            await asyncio.sleep(0.5)
        else:
            inside += 1
            if inside >= 39:
                everyone.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(everyone.wait(), 15.0)
            peaks.append(inside)
            inside -= 1
        return web.Response(text="x", headers=fields)

    origin.route(path, page)
    results = answered(await herd(patient_workers.url, path, 40))
    assert len(results) == 40 and {r.worker for r in results} == {"0", "1"}
    assert origin.count(path) == 40
    assert max(peaks) == 39  # the other 39 were in at once


@SHARED
async def test_a_stale_if_error_herd_against_a_failing_origin_costs_it_one_request_for_both_workers(
        shared_patient_pair: tuple[Origin, ProxyProcess]) -> None:
    """A stale key whose origin now answers 503 (no freshness: not stored, not shareable):
    the waiting worker's clients were told at the holder's head to go upstream each on its
    own, and each asked the failing origin again before serving stale (13 of 20 per herd, at
    every herd of the outage). The holder's word now carries its status: they serve
    stale-if-error, as the holder's own followers do."""
    origin, patient_workers = shared_patient_pair
    failing = False

    async def page(request: web.Request) -> web.Response:
        if not failing:
            return web.Response(text="good", headers={"Cache-Control": "max-age=1, stale-if-error=60"})
        await asyncio.sleep(1.0)  # the herd has joined its flights by then
        return web.Response(status=503, text="down")

    origin.route("/sie", page)
    assert (await patient_workers.get("/sie")).x_cache == "MISS"
    await asyncio.sleep(1.2)  # stale (max-age=1: at most 1 s after it was answered)
    failing = True
    for herd_number in (1, 2):
        before = origin.count("/sie")
        results = answered(await herd(patient_workers.url, "/sie", 20))
        assert len(results) == 20 and {r.worker for r in results} == {"0", "1"}
        assert {(r.status, r.body, r.x_cache) for r in results} == {(200, b"good", "STALE")}
        assert {re.sub(r"ttl=-\d+", "ttl=N", r.headers["Cache-Status"]) for r in results} == {
            "cachegate; fwd=stale; fwd-status=503; ttl=N; detail=ORIGIN-ERROR"}
        assert origin.count("/sie") - before == 1, herd_number  # one request for the machine


@SHARED
async def test_one_clients_refused_request_does_not_stop_either_workers_next_herd_from_coalescing(
        shared_patient_pair: tuple[Origin, ProxyProcess]) -> None:
    """The origin refused one client's request (429: its rate limit); that answer marked the key
    hit-for-pass, and the next herd of plain clients sent 15 of 20 requests over two workers,
    on a stale key too. Now it is one request for the machine."""
    origin, patient_workers = shared_patient_pair

    async def page(request: web.Request) -> web.Response:
        if "X-Rate" in request.headers:
            return web.Response(status=429, text="slow down")
        await asyncio.sleep(1.0)  # the herd has joined its flights by then
        # (max-age=2: Date counts whole seconds, so the response may arrive nearly 1 s old)
        return web.Response(text="page", headers={"Cache-Control": "max-age=2"})

    origin.route("/rl", page)
    for turn in ("cold", "stale"):
        before = origin.count("/rl")
        assert (await patient_workers.get("/rl", headers={"X-Rate": "limited"})).status == 429
        results = answered(await herd(patient_workers.url, "/rl", 20))
        assert len(results) == 20 and {r.worker for r in results} == {"0", "1"}
        assert {(r.status, r.body) for r in results} == {(200, b"page")}
        assert origin.count("/rl") - before == 2, turn  # the refused request, one for the herd
        if turn == "cold":
            await asyncio.sleep(2.1)  # stale (max-age=2) for the next turn


async def test_an_origin_that_does_not_answer_in_time_gives_both_workers_clients_one_text(
        tmp_path: Path, origin: Origin) -> None:
    """The waiting worker's clients got the error class's text ("... did not answer in time"),
    the holder's the read timeout's ("... did not answer in time (read timed out)"): the holder
    now passes its clients' text on with its word."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="late")

    origin.route("/hang", hang)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE,
                                                     "upstream: {timeouts: {read: 300ms}}\n"))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        results = answered(await herd(proxy.url, "/hang", 30))
        assert len(results) == 30 and {r.worker for r in results} == {"0", "1"}
        assert {(r.status, r.body) for r in results} == {
            (504, b"504 Gateway Timeout: the origin server did not answer in time (read timed out)\n")}
        # Heard through the word (a waiter that misses it asks again and fetches for itself).
        assert not [line for line in proxy.lines if "without word" in line]
    finally:
        await proxy.stop()


@SHARED
async def test_a_fetch_whose_body_breaks_off_is_one_answer_for_both_workers(
        shared_pair: tuple[Origin, ProxyProcess]) -> None:
    """The worker waiting on the lease is given the holder's failure (stale-if-error, or the
    same error), as when the origin fails before its head: it used to fetch again, and its
    clients waited for the origin twice. Every client but the one whose request went waited for
    that fetch: each says ``collapsed`` and is counted in cachegate_coalesced_requests_total, as
    when the fetch succeeds (none said so, and only this worker's followers given the head
    before the body broke off were counted)."""
    origin, two_workers = shared_pair
    fields = {"Cache-Control": "max-age=1, stale-if-error=60"}

    async def breaking(request: web.Request) -> web.StreamResponse:
        if request.path == "/stale" and origin.count("/stale") == 1:
            return web.Response(body=b"v1", headers=fields)
        await asyncio.sleep(0.5)  # every client has asked by now: one worker waits on the lease
        resp = web.StreamResponse(headers={**fields, "Content-Length": "5000"})
        await resp.prepare(request)
        await resp.write(b"n" * 3000)
        assert request.transport is not None
        request.transport.abort()  # the body breaks off
        return resp

    origin.route("/gone", breaking)
    origin.route("/stale", breaking)
    assert (await two_workers.get("/stale")).body == b"v1"
    coalesced = "cachegate_coalesced_requests_total"
    before = (await two_workers.admin("GET", "/metrics")).body.decode()
    coalesced_before = counter(before, coalesced)
    errors = answered(await herd(two_workers.url, "/gone", 16))
    assert len(errors) == 16 and {r.worker for r in errors} == {"0", "1"}
    went = "cachegate; fwd=uri-miss; detail=UPSTREAM-BROKE-OFF"
    assert Counter((r.status, r.headers["Cache-Status"]) for r in errors) == {
        (502, went): 1, (502, went.replace("; detail", "; collapsed; detail")): 15}
    assert origin.count("/gone") == 1
    metrics = (await two_workers.admin("GET", "/metrics")).body.decode()
    assert counter(metrics, coalesced) - coalesced_before == 15
    # One origin fetch whose body broke off: so each worker's flight ended (the waiting worker's
    # said "unreachable", an origin that answered counted as one that did not).
    assert (flights(metrics, "broke_off") - flights(before, "broke_off"),
            flights(metrics, "unreachable") - flights(before, "unreachable")) == (2, 0)
    await asyncio.sleep(1.1)  # /stale is stale now, within its stale-if-error
    stale = answered(await herd(two_workers.url, "/stale", 16))
    assert len(stale) == 16 and {r.worker for r in stale} == {"0", "1"}
    assert {(r.status, r.x_cache, r.body) for r in stale} == {(200, "STALE", b"v1")}
    assert all("detail=ORIGIN-UNREACHABLE" in r.headers["Cache-Status"] for r in stale)
    assert sum("; collapsed" in r.headers["Cache-Status"] for r in stale) == 15
    assert origin.count("/stale") == 2


# (case, what the origin does once the head and the first 1,000 of 5,000 bytes are out)
BODY_FAILURES = [("broke off", "UPSTREAM-BROKE-OFF", 502), ("fell silent", "UPSTREAM-TIMEOUT", 504)]


@pytest.mark.parametrize(("case", "detail", "status"), BODY_FAILURES, ids=[c[0] for c in BODY_FAILURES])
async def test_a_body_that_fails_after_its_head_costs_the_origin_one_request_for_both_workers(
        tmp_path: Path, origin: Origin, case: str, detail: str, status: int) -> None:
    """The origin sends the head, then its body breaks off or falls silent past ``read``: every
    client of both workers gets that failure, from one origin request. The worker waiting on
    the lease used to fetch again when the body fell silent (told UPSTREAM-TIMEOUT, which it took
    for a failure before the head): the sick origin got a second request, and that worker's
    clients waited for a second timeout. Each client's access-log line says what its headers
    said: the error, ``collapsed`` for all but the one whose request went, whichever worker."""
    stalled = asyncio.Event()

    async def failing(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)  # every client has asked by now: one worker waits on the lease
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "Content-Length": "5000"})
        await resp.prepare(request)
        await resp.write(b"n" * 1000)
        if case == "broke off":
            assert request.transport is not None
            request.transport.abort()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stalled.wait(), 10)
        return resp

    origin.route("/failing", failing)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, PATIENT + "access_log: true\n",
                                                     "upstream: {timeouts: {read: 1s}}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: bool(proxy.admin_url) and len(proxy.workers) == 2)
        before = (await proxy.admin("GET", "/metrics")).body.decode()
        results = answered(await herd(proxy.url, "/failing", 16))
        stalled.set()
        assert len(results) == 16 and {r.worker for r in results} == {"0", "1"}
        went = f"cachegate; fwd=uri-miss; detail={detail}"
        collapsed = went.replace("; detail", "; collapsed; detail")
        told = Counter((r.status, r.x_cache, r.headers["Cache-Status"]) for r in results)
        assert told == {(status, "MISS", went): 1, (status, "MISS", collapsed): 15}
        assert origin.count("/failing") == 1
        await proxy.wait_for(lambda: sum('"path":"/failing"' in line for line in proxy.lines) == 16, 10)
        logged = [json.loads(line) for line in proxy.lines if '"path":"/failing"' in line]
        assert Counter((e["status"], e["cache"], e["cache_status"]) for e in logged) == told
        # Only the client whose request went names the upstream.
        assert Counter((e["cache_status"], e["upstream"] is None) for e in logged) == {
            (went, False): 1, (collapsed, True): 15}
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        # One origin fetch whose body failed: so each worker's flight ended.
        assert (flights(metrics, "broke_off") - flights(before, "broke_off"),
                flights(metrics, "unreachable") - flights(before, "unreachable")) == (2, 0)
        assert counter(metrics, "cachegate_coalesced_requests_total") == 15
    finally:
        stalled.set()
        await proxy.stop()


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def grants(metrics: str) -> int:
    assert "cachegate_cross_worker_leases_total" in metrics, "no lease metrics"
    return int(counter(metrics, 'cachegate_cross_worker_leases_total{event="granted"}'))


def pid_owning_connection(local_port: int, remote_port: int, pids: list[int]) -> int:
    """The process that owns the TCP connection 127.0.0.1:local_port -> :remote_port (Linux /proc)."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == local_port and int(fields[2].split(":")[1], 16) == remote_port:
                inode = fields[9]
    assert inode is not None, "connection not found"
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
    raise AssertionError("no worker owns the connection")


async def test_waiters_fetch_for_themselves_at_once_when_the_lease_holder_dies(
        origin: Origin, patient_workers: ProxyProcess) -> None:
    release = asyncio.Event()
    peers: list[int] = []

    async def page(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        if len(peers) == 1:
            await release.wait()  # the first fetch never finishes: its worker will die
        return web.Response(body=BODY, headers={"Cache-Control": "max-age=60"})

    origin.route("/held", page)
    proxy = patient_workers
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        clients = asyncio.ensure_future(herd(proxy.url, "/held", 30))
        await wait_until(lambda: bool(peers))
        await asyncio.sleep(0.3)  # every client has asked by now; the other worker waits on the lease
        holder = pid_owning_connection(peers[0], origin.port, list(proxy.workers.values()))
        os.kill(holder, signal.SIGKILL)
        results = await clients
        survivors = answered(results)
        holder_id = next(str(w) for w, pid in proxy.workers.items() if pid == holder)
        assert survivors and {r.worker for r in survivors} == {"0", "1"} - {holder_id}
        assert {(r.status, r.body) for r in survivors} == {(200, BODY)}
        assert loop.time() - started < 10  # not the 30 s lock_timeout: the broker said so at once
        assert len(peers) == 2  # the survivor fetched once, for all its clients
    finally:
        release.set()


async def test_the_spool_files_of_a_worker_killed_mid_fill_are_removed_at_once(
        origin: Origin, two_workers: ProxyProcess, tmp_path: Path) -> None:
    """A worker SIGKILLed while receiving a big body left its spool folder (the body so far)
    until the next start or the hourly sweep: 12 such kills kept 15 MB of a 32 MB disk budget
    that nobody's spool room counted. The supervisor sweeps as soon as it sees a worker die."""
    sent = asyncio.Event()

    async def slow_big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "Content-Length": str(8 << 20)})
        await resp.prepare(request)
        await resp.write(b"s" * (3 << 20))  # past memory_max_object (1 MB): on file
        sent.set()
        await asyncio.sleep(60)
        return resp

    origin.route("/big", slow_big)
    spools = tmp_path / "cache" / "tmp"
    async with aiohttp.ClientSession() as session, \
            session.get(two_workers.url + "/big", headers={"Host": HOST}) as r:
        worker = int(r.headers["X-Cachegate-Worker"])
        pid = two_workers.workers[worker]
        await asyncio.wait_for(sent.wait(), 10)

        def spooled() -> list[Path]:
            return [d for d in spools.iterdir() if d.name.startswith(f"{pid}-")] if spools.exists() else []

        await two_workers.wait_for(lambda: any(f.stat().st_size for d in spooled() for f in d.iterdir()
                                               if f.is_file() and not f.name.startswith(".")), wait=10)
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(aiohttp.ClientError):
            await r.read()
    await two_workers.wait_for(lambda: two_workers.workers[worker] != pid)
    await two_workers.wait_for(lambda: not spooled(), wait=10)


async def test_a_fill_that_ends_during_a_stop_still_answers_the_other_workers_waiters(
        tmp_path: Path, origin: Origin) -> None:
    """SIGTERM while a big body (past memory_max_object: the holder writes it to disk once its
    own clients are served) is still coming: the holder's fill ends during the stop, and the
    other worker's waiters hear of it and answer from the store. The worker used to close its
    control channel before its fills ended, so the release's word to the supervisor was lost:
    the waiters sat until the stop cut them off (or lock_timeout sent each to the origin)."""
    size, chunks = 4 << 20, 32

    async def slow_big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60", "Content-Length": str(size)})
        await resp.prepare(request)
        for _ in range(chunks):  # ~1.6 s in all
            await resp.write(b"b" * (size // chunks))
            await asyncio.sleep(0.05)
        return resp

    origin.route("/big", slow_big)
    path = write_config(str(tmp_path), origin.url,
                        "cache: {memory: 64MB, lock_timeout: 10s, disk: {path: cache, size: 256MB, shards: 2}}\n")
    config = Path(path)  # (a small local file)
    config.write_text(config.read_text().replace("shutdown_grace: 2s", "shutdown_grace: 4s"))  # noqa: ASYNC240
    proxy = ProxyProcess(str(tmp_path), path)
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        clients = asyncio.ensure_future(herd(proxy.url, "/big", 12))
        await wait_until(lambda: origin.count("/big") > 0)
        await asyncio.sleep(0.4)  # every client has asked: the other worker waits on the lease
        stopping = asyncio.ensure_future(proxy.stop())  # one SIGTERM
        results = await clients
        took = loop.time() - started
        assert await stopping == 0
    finally:
        await proxy.kill()
    got = answered(results)
    assert len(got) == 12, [r for r in results if not isinstance(r, Response)]
    assert {r.worker for r in got} == {"0", "1"}  # both workers had clients
    assert {(r.status, len(r.body)) for r in got} == {(200, size)}
    assert origin.count("/big") == 1
    assert took < 4.5, took  # within the grace period (4 s), and far from lock_timeout (10 s)
    # The waiters were told, not left to find out from the lease table (the backstop).
    lost = [line for line in proxy.lines if "without word" in line]
    assert not lost, lost


@SHARED
async def test_the_herd_of_a_fetch_one_client_made_the_origin_reset_fetches_again_once_for_both_workers(
        shared_patient_pair: tuple[Origin, ProxyProcess]) -> None:
    """One client's request makes the origin's app drop the connection: the clients that waited
    for that fetch, in its worker or the other, were given its 502. Now they fetch again, once
    for the machine (the lease), and get the page."""
    origin, patient_workers = shared_patient_pair
    release = asyncio.Event()
    plain: list[str] = []

    async def page(request: web.Request) -> web.StreamResponse:
        await release.wait()
        if "X-Crash" in request.headers:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        plain.append(request.path)
        return web.Response(body=BODY, headers={"Cache-Control": "max-age=60"})

    origin.route("/crash", page)
    proxy = patient_workers
    attacker = asyncio.ensure_future(proxy.get("/crash", headers={"X-Crash": "1"}))
    await wait_until(lambda: origin.count("/crash") > 0)
    victims = asyncio.ensure_future(herd(proxy.url, "/crash", 16))
    await asyncio.sleep(0.5)  # every victim has asked: some joined the fetch, the rest wait on its lease
    release.set()
    assert (await attacker).status == 502
    got = answered(await victims)
    assert len(got) == 16 and {r.worker for r in got} == {"0", "1"}
    assert {(r.status, r.body) for r in got} == {(200, BODY)}
    assert plain == ["/crash"]  # one more fetch, for both workers' clients


@SHARED
@pytest.mark.parametrize("how", ["purge", "POST"])
async def test_clients_arriving_after_a_purge_get_the_new_response_from_either_worker(
        shared_patient_pair: tuple[Origin, ProxyProcess], how: str) -> None:
    """A fill's request went out, a purge (or a POST's invalidation) answered, and the origin's
    head came only then (rendered from the data before it). The clients that arrived after the
    purge's answer get the response fetched after it, whichever worker they reached: those of
    the worker holding the fill used to join it and get the old body as a HIT."""
    origin, proxy = shared_patient_pair
    path = f"/p-{how}"  # (each case a key of its own)
    v = Versions()
    origin.route(path, v.page)
    first = asyncio.ensure_future(proxy.get(path))
    for _ in range(500):
        if v.gets:
            break
        await asyncio.sleep(0.01)
    if how == "purge":
        reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}{path}"]})
        assert reply.status == 200, reply.body
    else:
        async with aiohttp.ClientSession() as s, \
                s.post(proxy.url + path, data=b"x", headers={"Host": HOST}) as r:
            assert r.status == 204  # (its invalidation made in both workers first)
    v.version = 2
    late = asyncio.ensure_future(herd(proxy.url, path, 16))
    await asyncio.sleep(0.5)  # (for them to reach the workers: one that came later proves nothing)
    v.head.set()
    old = await first
    assert old.body == b"v1" and "detail=PURGED" in old.headers["Cache-Status"]
    after = answered(await late)
    assert len(after) == 16
    assert {r.body for r in after} == {b"v2"}, [(r.worker, r.body, r.x_cache) for r in after]
    # (the worker that held the old fill had clients among them: 16 new connections)
    assert old.worker in {r.worker for r in after}
