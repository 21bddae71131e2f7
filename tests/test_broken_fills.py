"""A fill whose body the origin broke off after its head went out: every client's connection is
aborted (it cannot be told otherwise), and what cachegate records of it says what happened, not
what the head said: the access log, the request counter, the upstream's error count, and one
line in the error log for the one failed fetch, however many clients it cut."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.admin.test_metrics import PromQL, documented_query, scrape, value
from tests.conftest import MakeProxy
from tests.harness import Proxy, Reply
from tests.security.misbehaving import Conn, Serve, flight_with, raw_origins

ANNOUNCED = 2 * 1024 * 1024
SENT = 1024 * 1024
CLIENTS = 6


def cut_body(how: str, go: asyncio.Event) -> Serve:
    """A 200 whose head says it is stored (max-age) and whose body breaks off once ``go`` is set:
    half of its Content-Length then the connection closes ("short"), or it falls silent
    ("stall"), or a chunked body closes without its last chunk ("chunked") or goes on with a
    chunk size that is no hex number ("garbled")."""
    async def serve(conn: Conn) -> None:
        await conn.request()
        await go.wait()
        if how in ("chunked", "garbled"):
            await conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(16):
                await conn.send(b"%x\r\n%s\r\n" % (SENT // 16, b"x" * (SENT // 16)))
            if how == "garbled":
                await conn.send(b"ZZ\r\n")
                await asyncio.sleep(10)
            return
        await conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: %d\r\n\r\n" % ANNOUNCED)
        for _ in range(16):
            await conn.send(b"x" * (SENT // 16))
        if how == "stall":
            await asyncio.sleep(10)

    return serve


def records(proxy: Proxy, path: Path) -> list[dict[str, Any]]:
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("how", "detail", "kind"), [
    ("short", "UPSTREAM-BROKE-OFF", "body_broke_off"),
    ("chunked", "UPSTREAM-BROKE-OFF", "body_broke_off"),
    ("garbled", "UPSTREAM-BROKE-OFF", "body_broke_off"),  # not an invalid response (its head was valid)
    ("stall", "UPSTREAM-TIMEOUT", "body_read_timeout"),
])
async def test_a_fill_broken_off_after_its_head_is_logged_and_counted_as_the_error_it_was(
        make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        how: str, detail: str, kind: str) -> None:
    go = asyncio.Event()
    log_file = tmp_path / "access.log"
    async with raw_origins() as start:
        origin = await start(cut_body(how, go))
        proxy = await make_proxy(config=f"access_log: {{format: json, path: {log_file}}}\n"
                                        "upstream: {timeouts: {read: 500ms}, retries: 0}\n",
                                 upstreams=[origin.url])
        before = await scrape(proxy)
        clients = [asyncio.ensure_future(proxy.get("/big")) for _ in range(CLIENTS)]
        await flight_with(proxy, CLIENTS - 1)
        with caplog.at_level(logging.WARNING, logger="cachegate"):
            go.set()
            answers = await asyncio.gather(*clients, return_exceptions=True)
            await asyncio.sleep(0.1)
        assert not any(isinstance(a, Reply) for a in answers), answers  # every connection aborted
        assert len(origin.requests) == 1
        after = await scrape(proxy)

        def grew(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        # Not a HIT (the followers' heads said so) nor a MISS (the leader's): an error, each.
        assert grew("cachegate_requests_total", cache_status="ERROR", method="GET") == CLIENTS
        assert grew("cachegate_requests_total", cache_status="HIT", method="GET") == 0
        assert grew("cachegate_requests_total", cache_status="MISS", method="GET") == 0
        # The origin's failure, once, with its kind; in GET /upstreams too.
        assert grew("cachegate_upstream_errors_total", upstream=origin.url, kind=kind) == 1
        assert grew("cachegate_flights_total", outcome="broke_off") == 1
        assert grew("cachegate_fills_total") == 0
        upstreams = await proxy.admin("GET", "/upstreams")
        assert [u["failures"] for u in json.loads(upstreams.body)["upstreams"]] == [1]
        logged = records(proxy, log_file)
        assert len(logged) == CLIENTS
        for record in logged:
            assert record["cache"] == "ERROR", record
            assert "stored" not in record["cache_status"].split("; "), record
            assert record["cache_status"].endswith(f"; detail={detail}"), record
        # One failed fetch, one warning: not one per client it cut.
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        # Clients joined to the body, streaming it or not: not all were reading it.
        assert f"({CLIENTS} clients waiting on it)" in warnings[0].getMessage()
        # Nothing was stored: the next request goes to the origin.
        go.clear()
        nxt = asyncio.ensure_future(proxy.get("/big"))
        for _ in range(200):
            if len(origin.requests) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(origin.requests) == 2
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)


async def test_a_small_fill_that_stalls_mid_body_is_one_warning_for_all_its_clients(
        make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """Its followers are sent the body whole (so they get a 504, nothing having gone out), its
    leader has it streamed (aborted): the error log has one line for the one fetch that failed,
    not one per client (nor a second one for the leader)."""
    go = asyncio.Event()

    async def serve(conn: Conn) -> None:
        await conn.request()
        await go.wait()
        await conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 200000\r\n\r\n")
        await conn.send(b"x" * 100_000)
        await asyncio.sleep(10)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {timeouts: {read: 500ms}, retries: 0}\n",
                                 upstreams=[origin.url])
        clients = [asyncio.ensure_future(proxy.get("/small")) for _ in range(CLIENTS)]
        await flight_with(proxy, CLIENTS - 1)
        with caplog.at_level(logging.WARNING, logger="cachegate"):
            go.set()
            answers = await asyncio.gather(*clients, return_exceptions=True)
            await asyncio.sleep(0.1)
        replies = [a for a in answers if isinstance(a, Reply)]
        assert [(r.status, r.x_cache) for r in replies] == [(504, "MISS")] * (CLIENTS - 1)
        assert len(origin.requests) == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "read timed out mid-body" in warnings[0]


async def test_the_documented_upstream_error_rate_of_an_origin_that_cuts_every_body_is_one(
        make_proxy: MakeProxy) -> None:
    """Its heads are answers (counted in cachegate_upstream_requests_total) and its bodies
    failures: each once in the rate, which was 0 when body failures were not counted."""
    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 200000\r\n\r\n")
        await conn.send(b"x" * 100_000)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        for i in range(3):
            with pytest.raises(aiohttp.ClientPayloadError):
                await proxy.get(f"/cut{i}")
        m = await scrape(proxy)
        assert value(m, "cachegate_upstream_errors_total", upstream=origin.url, kind="body_broke_off") == 3
        rate = PromQL(m, documented_query("Upstream error rate, per upstream")).run()
        assert rate == {frozenset({("upstream", origin.url)}): 1.0}
