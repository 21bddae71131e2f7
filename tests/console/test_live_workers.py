"""The console's live numbers against ``cachegate run`` as a real process tree: the shared memory
tier counted once however many processes read it, and totals since start that a worker's
restart does not take back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

BODY = 64 * 1024
WAIT = 60.0  # at most this long for the console's once-a-second sampler to see what was sent


async def live(proxy: ProxyProcess) -> dict[str, Any]:
    reply = await proxy.admin("GET", "/console/api/live?since=0&top=10")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = json.loads(reply.body)
    return body


async def stats(proxy: ProxyProcess) -> dict[str, Any]:
    reply = await proxy.admin("GET", "/stats?top=0")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = json.loads(reply.body)
    return body


async def live_until(proxy: ProxyProcess, done: Callable[[dict[str, Any]], bool],
                     seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``/console/api/live`` until ``done`` accepts it, or the last answer after WAIT (every
    answer read is added to ``seen``)."""
    body: dict[str, Any] = {}
    for _ in range(int(WAIT / 0.2)):
        body = await live(proxy)
        if seen is not None:
            seen.append(body)
        if done(body):
            break
        await asyncio.sleep(0.2)
    return body


async def requests_in_metrics(proxy: ProxyProcess) -> int:
    """Client requests as ``/metrics`` counts them (over every worker, the retired ones too)."""
    text = (await proxy.admin("GET", "/metrics")).body.decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("cachegate_requests_total{")))


def since_start(body: dict[str, Any]) -> int:
    return sum(body["since_start"]["requests"].values())


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_shared_memory_tier_is_counted_once_against_the_machines_budget(
        origin: Origin, tmp_path: Path, workers: str) -> None:
    """Every process reads the same shared memory tier (the whole machine's entries, bytes and
    evictions): the console shows what /stats shows, against ``cache.memory`` itself, however
    many workers there are."""
    for i in range(160):  # 10 MB of bodies for a 4 MB memory tier, no disk: evictions
        origin.route(f"/m/{i}", body=bytes([65 + i % 26]) * BODY, headers={"Cache-Control": "max-age=600"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, "cache: {memory: 4MB, disk: null}\n"))
    await proxy.start("--workers", workers)
    try:
        if workers == "2":
            await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        served = set()
        for i in range(160):
            r = await proxy.get(f"/m/{i}")  # a new connection each: both workers fill some
            assert r.status == 200 and len(r.body) == BODY
            served.add(r.worker)
        if workers == "2":
            assert served == {"0", "1"}
        memory: dict[str, Any] = {}

        def agrees(body: dict[str, Any]) -> bool:
            # Read together with /stats' (nothing is sent meanwhile, so both settle on the same).
            shown = body["storage"]["memory"]
            evictions = sum(p["evictions"] for p in body["points"])
            return (shown["entries"], shown["bytes"], evictions) == (
                memory.get("entries"), memory.get("bytes"), memory.get("evictions"))

        async def settled() -> dict[str, Any]:
            for _ in range(int(WAIT / 0.2)):
                memory.update((await stats(proxy))["tiers"]["memory"])
                body = await live(proxy)
                if agrees(body):
                    return body
                await asyncio.sleep(0.2)
            raise AssertionError(f"/stats memory {memory}, console {body['storage']['memory']}, "
                                 f"evictions in its points {sum(p['evictions'] for p in body['points'])}")

        body = await settled()
        assert memory["evictions"] > 0 and 0 < memory["bytes"] <= 4 << 20
        assert body["storage"]["memory"]["budget"] == 4 << 20  # cache.memory: the machine's
        assert body["last_minute"]["evictions"] <= memory["evictions"]
        assert "disk" not in body["storage"]
        assert body["workers"] == (2 if workers == "2" else None)
    finally:
        await proxy.stop()


async def test_totals_since_start_keep_what_a_killed_worker_had_counted(origin: Origin, tmp_path: Path) -> None:
    """A worker killed and started again: the console's totals since start keep its requests (as
    /metrics does) and never go down meanwhile; its successor's counts start from a baseline, so
    no point of the series counts a request twice or goes negative."""
    origin.route("/r", body=b"r" * 100, headers={"Cache-Control": "max-age=600"})
    cache = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        # Both workers sampled before any traffic: their baselines are at 0.
        assert (await live_until(proxy, lambda b: b["workers"] == 2))["workers"] == 2
        by_worker = {"0": 0, "1": 0}
        sent = 0
        while min(by_worker.values()) < 20:
            r = await proxy.get("/r")  # a new connection each: both workers answer some
            assert r.status == 200
            by_worker[r.worker] += 1
            sent += 1
        seen: list[dict[str, Any]] = []
        assert since_start(await live_until(proxy, lambda b: since_start(b) == sent, seen)) == sent
        assert await requests_in_metrics(proxy) == sent  # /metrics has read the workers' counts too
        victim = max(by_worker, key=lambda w: by_worker[w])  # the busier one
        old = proxy.workers[int(victim)]
        os.kill(old, signal.SIGKILL)
        for _ in range(int(WAIT / 0.2)):  # the console read meanwhile, the worker dead and restarting
            seen.append(await live(proxy))
            if proxy.workers[int(victim)] != old:
                break
            await asyncio.sleep(0.2)
        assert proxy.workers[int(victim)] != old, "the killed worker was not started again"
        # A whole sample after the new worker was ready: its baseline, before it answers anything.
        ready_seq = seen[-1]["seq"]
        body = await live_until(proxy, lambda b: b["seq"] >= ready_seq + 2 and b["workers"] == 2, seen)
        assert body["workers"] == 2
        more = 0
        answered = set()
        while len(answered) < 2 or more < 20:  # the new worker answers some too
            r = await proxy.get("/r")
            assert r.status == 200
            answered.add(r.worker)
            more += 1
        body = await live_until(proxy, lambda b: since_start(b) == sent + more, seen)
        totals = [since_start(b) for b in seen]
        assert totals == sorted(totals), totals  # never backwards, not even while the worker was down
        assert since_start(body) == sent + more
        assert await requests_in_metrics(proxy) == since_start(body)  # what /metrics says
        # The series: what each second counted adds up to the requests sent, none counted twice
        # (the new worker's counts start from its baseline) and none negative.
        points = body["points"]
        assert all(n >= 0 for p in points for n in p["requests"].values())
        assert sum(n for p in points for n in p["requests"].values()) == sent + more
    finally:
        await proxy.stop()


def shown_counts(body: dict[str, Any]) -> dict[str, int]:
    """What the console shows as counted since start besides ``since_start``: the upstream's
    requests and failures (the workers' pools) and the not-stored reasons; and the top URLs'
    requests (the last one to two minutes: a killed worker's stay until they would have aged)."""
    upstream = body["upstreams"][0]
    out = {"upstream requests": upstream["requests"], "upstream failures": upstream["failures"]}
    out.update({f"not stored {r['reason']}": r["count"] for r in body["not_stored"]})
    out.update({f"top {r['url'].rsplit('/', 1)[1]}": r["requests"] for r in body["top_urls"]})
    return out


def top_once(proxy: ProxyProcess) -> list[str]:
    """``cachegate top --once``'s frame, as an operator would read it."""
    done = subprocess.run([sys.executable, "-m", "proxy", "top", "--admin", proxy.admin_url, "--once"],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.splitlines()


def upstream_row(lines: list[str]) -> tuple[int, int]:
    """REQUESTS and FAILURES of ``top``'s one upstream."""
    row = lines[lines.index(next(x for x in lines if x.startswith("UPSTREAM"))) + 1].split()
    return int(row[-2].replace(",", "")), int(row[-1].replace(",", ""))


async def test_upstream_counts_and_reasons_keep_what_a_killed_worker_had_counted(
        origin: Origin, tmp_path: Path) -> None:
    """kill -9 of a worker: the upstream's requests and failures, the not-stored counts and the
    top URLs that the console and ``cachegate top`` show keep what it had counted (they went
    down to the surviving worker's), while it is down, once it is started again, and after its
    successor counts more; requests in flight (a gauge) are the live workers'."""
    origin.route("/c", body=b"c" * 100, headers={"Cache-Control": "max-age=600"})
    origin.route("/p", body=b"p" * 100, headers={"Cache-Control": "private"})
    origin.route("/bad", status=502, body=b"no")
    cache = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        by_worker = {"0": 0, "1": 0}
        while min(by_worker.values()) < 10:  # a new connection each: both workers answer some
            r = await proxy.get("/p")
            assert r.status == 200
            by_worker[r.worker] += 1
            assert (await proxy.get("/c")).status == 200
            assert (await proxy.get("/bad")).status == 502

        def origin_saw() -> dict[str, int]:
            return {"upstream requests": sum(origin.counts.values()), "upstream failures": origin.count("/bad"),
                    "not stored PRIVATE": origin.count("/p"), "top p": origin.count("/p")}

        def counted(body: dict[str, Any]) -> bool:
            shown = shown_counts(body)
            return all(shown.get(k) == v for k, v in origin_saw().items())

        seen: list[dict[str, Any]] = []
        before = await live_until(proxy, counted, seen)
        assert counted(before), (shown_counts(before), origin_saw())
        assert upstream_row(await asyncio.to_thread(top_once, proxy)) == (
            origin_saw()["upstream requests"], origin_saw()["upstream failures"])

        victim = max(by_worker, key=lambda w: by_worker[w])
        old = proxy.workers[int(victim)]
        os.kill(old, signal.SIGKILL)
        for _ in range(int(WAIT / 0.2)):  # read while it is dead and being started again
            seen.append(await live(proxy))
            if proxy.workers[int(victim)] != old:
                break
            await asyncio.sleep(0.2)
        assert proxy.workers[int(victim)] != old, "the killed worker was not started again"
        ready_seq = seen[-1]["seq"]  # a few samples with the new worker in them
        after = await live_until(proxy, lambda b: b["seq"] >= ready_seq + 3 and b["workers"] == 2, seen)
        assert counted(after), (shown_counts(after), origin_saw())
        assert upstream_row(await asyncio.to_thread(top_once, proxy)) == (
            origin_saw()["upstream requests"], origin_saw()["upstream failures"])

        answered = set()
        while len(answered) < 2:  # the new worker counts on from there
            r = await proxy.get("/p")
            answered.add(r.worker)
            assert (await proxy.get("/bad")).status == 502
        final = await live_until(proxy, counted, seen)
        assert counted(final), (shown_counts(final), origin_saw())
        assert final["upstreams"][0]["in_flight"] == 0
        for name in origin_saw():
            values = [shown_counts(b).get(name, 0) for b in seen]
            assert values == sorted(values), (name, values)  # never backwards
    finally:
        await proxy.stop()
