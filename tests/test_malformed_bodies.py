"""A response whose head was valid and whose chunked body is malformed (a chunk size that is no
hex number) is a body that broke off (``UpstreamBodyError``: ``detail=UPSTREAM-BROKE-OFF``),
whether the bad chunk came in the head's read or later: not an invalid response, which is held
against the upstream's health (one client could take every upstream out with one URL), is
counted as ``kind="protocol"`` and sends the fetch's other clients (followers, the other
worker waiting on the lease) to the origin again.

Real raw origins on loopback; one in-process proxy, or ``cachegate run --workers 2``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.logs import REQUEST
from tests.admin.test_metrics import scrape, value
from tests.conftest import MakeProxy
from tests.harness import Clock
from tests.security.misbehaving import Conn, Serve, flight_with, raw_origins
from tests.storage.procs import ProxyProcess, Response, write_config

HEAD = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n"
GARBLED = b"5\r\nhello\r\nZZ\r\nxx\r\n0\r\n\r\n"  # a good chunk, then a chunk size "ZZ"
GOOD = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 4\r\n\r\ngood"
# One failure would take the upstream out of rotation for 30 s: the 503 says so.
PASSIVE = "upstream: {passive: {failures: 1, cooldown: 30s}, retries: 0}\n"


def garbling(go: asyncio.Event | None = None, *, apart: bool = False, body: bytes = GARBLED) -> Serve:
    """``/bad``: a valid 200 head and a chunked body with a malformed chunk size, in one write
    (the head's read), or ``apart`` (the head and a first chunk, then the bad chunk later);
    held until ``go`` is set. Any other path: a good 200."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if not request.target.startswith("/bad"):
                await conn.send(GOOD)
                continue
            if go is not None:
                await go.wait()
            if apart:
                await conn.send(HEAD + b"%x\r\n%s\r\n" % (100_000, b"x" * 100_000))
                await asyncio.sleep(0.2)
                await conn.send(b"ZZ\r\nxx\r\n")
            else:
                await conn.send(HEAD + body)
            await asyncio.sleep(5)
            return

    return serve


@pytest.mark.parametrize("body", [GARBLED, b"2 \r\nok\r\n0\r\n\r\n"], ids=["size-not-hex", "space-after-size"])
async def test_a_malformed_chunk_in_the_heads_read_is_a_body_that_broke_off_not_a_failed_upstream(
        make_proxy: MakeProxy, tmp_path: Path, body: bytes) -> None:
    """It was an invalid response HEAD: UPSTREAM-INVALID, kind="protocol", and a passive failure
    (here, with ``failures: 1``, the next request found no upstream: a 503). Then the head went
    out and the connection was cut: known to have failed before any of it was sent, the body
    is a 502 UPSTREAM-BROKE-OFF (docs/upstreams.md)."""
    async with raw_origins() as start:
        origin = await start(garbling(body=body))
        log_file = tmp_path / "access.log"
        proxy = await make_proxy(config=PASSIVE + f"access_log: {{format: json, path: {log_file}}}\n",
                                 upstreams=[origin.url])
        before = await scrape(proxy)
        bad = await proxy.get("/bad")
        assert (bad.status, bad.cache_status) == (502, "cachegate; fwd=uri-miss; detail=UPSTREAM-BROKE-OFF"), bad
        after = await scrape(proxy)
        assert proxy.runtime.access_log is not None
        proxy.runtime.access_log.flush()
        logged = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert [r["cache_status"].rsplit("; ", 1)[-1] for r in logged] == ["detail=UPSTREAM-BROKE-OFF"], logged
        for kind, grew in (("body_broke_off", 1), ("protocol", 0)):
            assert value(after, "cachegate_upstream_errors_total", upstream=origin.url, kind=kind) \
                - value(before, "cachegate_upstream_errors_total", upstream=origin.url, kind=kind) == grew
        # Its flight too (no client had its head: it was counted "unreachable").
        for outcome, grew in (("broke_off", 1), ("unreachable", 0)):
            assert value(after, "cachegate_flights_total", outcome=outcome) \
                - value(before, "cachegate_flights_total", outcome=outcome) == grew
        upstreams = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"]
        assert [u["state"] for u in upstreams] == ["up"], upstreams
        good = await proxy.get("/good")  # the upstream is still in rotation
        assert (good.status, good.body) == (200, b"good"), good


async def test_the_followers_of_a_fetch_whose_body_was_malformed_in_its_heads_read_do_not_fetch_again(
        make_proxy: MakeProxy) -> None:
    """A body that broke off is every client's answer (docs/upstreams.md); taken for a failure
    before the head, it sent the followers to the origin once more."""
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(garbling(go))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        clients = [asyncio.ensure_future(proxy.get("/bad")) for _ in range(5)]
        await flight_with(proxy, 4)
        go.set()
        answers = await asyncio.gather(*clients, return_exceptions=True)
        await asyncio.sleep(0.1)
        assert origin.targets() == [(0, "GET", "/bad")], (origin.targets(), answers)


async def test_the_stray_body_warning_after_a_204_carries_the_request_id_of_the_204s_request(
        make_proxy: MakeProxy) -> None:
    """The warning was logged where the bytes were read, in the context the pooled connection
    was made in: the request id of the request that opened it, another client's."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if request.target.startswith("/nothing"):
                await conn.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
                return
            await conn.send(GOOD)

    seen: list[tuple[str, str | None]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            info = REQUEST.get()
            seen.append((record.getMessage(), info.request_id if info is not None else None))

    handler = Catch(logging.WARNING)
    logger = logging.getLogger("cachegate.upstream")
    logger.addHandler(handler)
    try:
        async with raw_origins() as start:
            origin = await start(serve)
            url = origin.url
            proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[url])
            opener = await proxy.get("/opener")
            assert opener.status == 200
            reply = await proxy.get("/nothing")
            assert reply.status == 204
            assert origin.connections == 1  # the 204 came on the connection the first request opened
    finally:
        logger.removeHandler(handler)
    stray = [(m, rid) for m, rid in seen if "after a 204 response" in m]
    assert stray == [(f"upstream {url}: 5 or more bytes of body after a 204 response, which has none "
                      "(RFC 9112 §6.3): dropped, the 204 answered, the connection closed",
                      reply.headers["X-Request-Id"])], (seen, opener.headers["X-Request-Id"])


STALE_IF_ERROR = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=1, stale-if-error=3600\r\nContent-Length: 4\r\n\r\ngood"


def turning() -> Serve:
    """``/turn``: a good 200 (max-age=1, stale-if-error=3600) the first time, then a valid 200
    head with a malformed chunked body in the same write."""
    fetched = 0

    async def serve(conn: Conn) -> None:
        nonlocal fetched
        while True:
            await conn.request()
            fetched += 1
            if fetched == 1:
                await conn.send(STALE_IF_ERROR)
                continue
            await conn.send(HEAD + GARBLED)
            await asyncio.sleep(5)
            return

    return serve



async def test_a_body_malformed_in_the_heads_read_is_covered_by_stale_if_error(
        make_proxy: MakeProxy, clock: Clock) -> None:
    """The head went out (``fwd=stale; fwd-status=200``) and the connection was closed with no
    body, each time: the stored copy, which stale-if-error covers, was never served."""
    async with raw_origins() as start:
        origin = await start(turning())
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        proxy.runtime.engine.clock = clock
        first = await proxy.get("/turn")
        assert (first.status, first.body) == (200, b"good"), first
        clock.advance(3)
        for _ in range(2):
            stale = await proxy.get("/turn")
            assert (stale.status, stale.body, stale.x_cache) == (200, b"good", "STALE"), stale
            assert stale.cache_status.endswith("detail=ORIGIN-UNREACHABLE"), stale
        upstreams = json.loads((await proxy.admin("GET", "/upstreams")).body)["upstreams"]
        assert [u["passive"]["consecutive_failures"] for u in upstreams] == [0], upstreams


@pytest.mark.slow
async def test_a_body_malformed_in_the_heads_read_is_covered_by_stale_if_error_in_two_workers(
        tmp_path: Path) -> None:
    """As with one worker: the worker that fetched relayed the head and cut the connection."""
    async with raw_origins() as start:
        origin = await start(turning())
        cache = "cache: {memory: 64MB, disk: {path: cache, size: 256MB, shards: 2}}\n"
        proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache,
                                                         "upstream: {retries: 0}\n"))
        await proxy.start("--workers", "2")
        try:
            await proxy.wait_for(lambda: len(proxy.workers) == 2)
            first = await proxy.get("/turn")
            assert (first.status, first.body) == (200, b"good"), first
            await asyncio.sleep(1.5)  # expired, within stale-if-error
            for _ in range(4):  # whichever worker takes it
                stale = await proxy.get("/turn")
                assert (stale.status, stale.body, stale.x_cache) == (200, b"good", "STALE"), stale
                assert stale.headers["Cache-Status"].endswith("detail=ORIGIN-UNREACHABLE"), stale
        finally:
            await proxy.stop()


@pytest.mark.slow
@pytest.mark.parametrize("apart", [False, True], ids=["in-the-heads-read", "mid-body"])
async def test_a_malformed_body_is_one_fetch_for_both_workers(tmp_path: Path, apart: bool) -> None:
    """The worker waiting on the lease takes the holder's failure (a body that broke off is
    shared: ``SHARED_FAILURES``); told UPSTREAM-INVALID, it fetched again: two origin fetches."""
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(garbling(go, apart=apart))
        cache = "cache: {memory: 64MB, lock_timeout: 30s, disk: {path: cache, size: 256MB, shards: 2}}\n"
        proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache,
                                                         "upstream: {retries: 0}\n"))
        await proxy.start("--workers", "2")
        try:
            await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
            clients = [asyncio.ensure_future(proxy.get("/bad")) for _ in range(16)]
            await asyncio.sleep(1.0)  # every client has asked by now: one worker waits on the lease
            go.set()
            answers = await asyncio.gather(*clients, return_exceptions=True)
            await asyncio.sleep(0.3)
            replies = [a for a in answers if isinstance(a, Response)]
            # The waiting worker's clients had no byte of the body: a 502 each. The holder's get a
            # 502 too when the body broke in the head's own read; when it broke off later, their
            # head was relayed and their connections are aborted (not among ``replies``). All but
            # the client whose request went waited for that fetch: ``collapsed``.
            went = "cachegate; fwd=uri-miss; detail=UPSTREAM-BROKE-OFF"
            told = Counter((r.status, r.headers["Cache-Status"]) for r in replies)
            assert replies and set(told) <= {(502, went), (502, went.replace("; detail", "; collapsed; detail"))}
            assert told[(502, went)] == (0 if apart else 1), answers
            assert Counter(t for _, _, t in origin.targets())["/bad"] == 1, origin.targets()
            # One fetch whose body broke off, so each worker's flight ended: the waiting worker's
            # said "unreachable" (and the holder's too, when it broke in the head's read).
            metrics = (await proxy.admin("GET", "/metrics")).body.decode()
            flights = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(metrics)
                       if f.name == "cachegate_flights" for s in f.samples}
            assert (flights["broke_off"], flights["unreachable"]) == (2, 0)
        finally:
            await proxy.stop()


async def test_the_warning_for_a_304_to_an_unconditional_request_names_the_upstream(
        make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """Every other "upstream failed" line names the upstream, whose fault it is; this one did not."""
    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')

    async with raw_origins() as start:
        origin = await start(serve)
        url = origin.url
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[url])
        with caplog.at_level(logging.WARNING, logger="cachegate"):
            reply = await proxy.get("/unasked")
    assert (reply.status, reply.cache_status) == (502, "cachegate; fwd=uri-miss; detail=UPSTREAM-INVALID"), reply
    assert [r.getMessage() for r in caplog.records if "304" in r.getMessage()] == [
        f"upstream failed: {url}: the origin answered 304 Not Modified to a request without conditions"]
