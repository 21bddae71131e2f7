"""What an operator's monitoring must see in /metrics, scraped from real processes: the errors
clients got (an origin down was a healthy MISS), purges that failed (a full disk: 503s counted
nowhere), a worker killed and restarted between two scrapes, each tier's budget beside its
use, and an origin that hangs (no latency, no upstream request counted)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.settings import shard_budget
from tests.conftest import MakeProxy
from tests.console.test_console_api import feed
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, on_disk, write_config
from tests.storage.test_full_filesystem import fill
from tests.tmpfs import mounted_tmpfs

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
MB = 1024 * 1024


def samples(text: bytes) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def family(m: Samples, name: str, label: str) -> dict[str, float]:
    """``name``'s samples by the value of ``label`` (summed over the other labels)."""
    out: dict[str, float] = {}
    for (sample, labels), value in m.items():
        if sample == name:
            key = dict(labels)[label]
            out[key] = out.get(key, 0.0) + value
    return out


async def scrape(proxy: ProxyProcess) -> Samples:
    reply = await proxy.admin("GET", "/metrics")
    assert reply.status == 200, reply
    return samples(reply.body)


async def started(tmp_path: Path, origin: Origin, cache: str, admin: str = "{listen: '127.0.0.1:0'}",
                  directory: Path | None = None, with_log: bool = False) -> ProxyProcess:
    where = str(directory or tmp_path)
    proxy = ProxyProcess(where, write_config(where, origin.url, cache, admin=admin))
    await proxy.start("--workers", "2", with_log=with_log)
    await proxy.wait_for(lambda: bool(proxy.admin_url) and len(proxy.workers) == 2)
    return proxy


async def refused_by_the_parser(proxy: ProxyProcess) -> bytes:
    """A request the HTTP parser refuses (Content-Length and Transfer-Encoding both): its answer."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer = await reader.read(200)
    writer.close()
    return answer


async def test_an_origin_outage_is_counted_as_5xx_answers_to_clients(origin: Origin, tmp_path: Path) -> None:
    """An origin down answered 2,771 clients 502 and the dashboard's headline stayed healthy: the
    502s are MISSes in cachegate_requests_total. cachegate_responses_total counts every answer by
    status class, the fast path's hits, the origin's own, cachegate's 502s and the parser's 400s,
    each request of cachegate_requests_total once, summed over the workers."""
    origin.route("/ok", body=b"ok", headers={"Cache-Control": "max-age=600"})
    proxy = await started(tmp_path, origin, "cache: {memory: 16MB, disk: null}\n")
    try:
        before = await scrape(proxy)
        assert family(before, "cachegate_responses_total", "code") == {c: 0 for c in ("1xx", "2xx", "3xx",
                                                                                         "4xx", "5xx")}
        statuses = [(await proxy.get("/ok")).status for _ in range(8)]  # a miss, then hits (fast path)
        await origin.stop(hold_port=True)  # connections refused: cachegate answers 502
        statuses += [(await proxy.get(f"/down{i}")).status for i in range(5)]
        assert statuses == [200] * 8 + [502] * 5
        assert (await refused_by_the_parser(proxy)).startswith(b"HTTP/1.1 400 ")
        m = await scrape(proxy)
    finally:
        assert await proxy.stop() == 0
    answers = family(m, "cachegate_responses_total", "code")
    assert answers == {"1xx": 0, "2xx": 8, "3xx": 0, "4xx": 1, "5xx": 5}, answers
    requests = family(m, "cachegate_requests_total", "cache_status")
    assert sum(answers.values()) == sum(requests.values()), requests
    assert requests["HIT"] >= 6 and requests["MISS"] >= 5, requests  # the 502s: MISS, as before


def full_again(filesystem: Path) -> None:
    """Take whatever room is left on ``filesystem`` (a file beside ``fill``'s)."""
    with open(filesystem / "more", "ab") as f:
        free = os.statvfs(filesystem)
        f.write(b"\0" * (free.f_bavail * free.f_frsize))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_tmpfs(tmp_path / "small", "8m")


async def test_purges_answered_503_on_a_full_disk_are_counted_as_purge_failures(
        origin: Origin, tmp_path: Path, small_tmpfs: Path) -> None:
    """A full disk answered 179 of 179 purges 503, and no metric moved but
    cachegate_requests_total{cache_status="PURGE"}: each failed purge is counted by kind, the
    admin API's (the supervisor answers it) and the PURGE method's (a worker answers it). (A
    purge on a full filesystem fails unless SQLite's journal happens to have the room it
    needs: each answer the clients got is counted as what it was.)"""
    keys = 6
    for i in range(keys):
        origin.route(f"/k{i}", body=b"x" * 100, headers={"Cache-Control": "max-age=600"})
    directory = small_tmpfs / "p"
    directory.mkdir()
    proxy = await started(tmp_path, origin, "cache: {memory: 16MB, disk: {path: cache, size: 4MB, shards: 2}}\n",
                          admin="{listen: '127.0.0.1:0', purge_from: [127.0.0.1/32]}", directory=directory,
                          with_log=True)
    answers: dict[str, list[int]] = {"admin": [], "method": []}
    try:
        for i in range(keys):
            assert (await proxy.get(f"/k{i}")).status == 200
            await on_disk(proxy, f"http://{HOST}/k{i}")
        before = await scrape(proxy)
        fill(small_tmpfs, 0)
        async with aiohttp.ClientSession() as s:
            for i in range(keys):
                full_again(small_tmpfs)  # (what was freed meanwhile: a journal checkpointed)
                if i % 2:
                    async with s.request("PURGE", f"{proxy.url}/k{i}", headers={"Host": HOST}) as r:
                        answers["method"].append(r.status)
                else:
                    reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}/k{i}"]})
                    answers["admin"].append(reply.status)
        m = await scrape(proxy)
    finally:
        assert await proxy.stop() == 0
    statuses = answers["admin"] + answers["method"]
    assert set(statuses) <= {200, 503} and 503 in statuses, answers
    assert family(before, "cachegate_purge_failures_total", "kind") == {
        k: 0 for k in ("url", "prefix", "tag", "all", "invalidation")}
    failed = family(m, "cachegate_purge_failures_total", "kind")
    assert failed == {"url": statuses.count(503), "prefix": 0, "tag": 0, "all": 0, "invalidation": 0}, \
        (failed, answers)
    assert family(m, "cachegate_purges_total", "kind")["url"] == statuses.count(200), answers
    # Each failure is a line naming its cause, not a traceback (a bug's), one per PURGE.
    assert not [line for line in proxy.lines if "Traceback" in line], "\n".join(proxy.lines)


async def test_a_worker_killed_by_a_signal_is_counted_as_a_restart(origin: Origin, tmp_path: Path) -> None:
    """kill -9 of a worker, restarted before the next scrape, left nothing in /metrics: the
    supervisor counts it, by worker and reason, every pair at 0 from the start."""
    proxy = await started(tmp_path, origin, "cache: {memory: 16MB, disk: null}\n")
    try:
        zero = {(w, r): 0.0 for w in ("0", "1") for r in ("signal", "oom", "exit", "hung")}

        def restarts(m: Samples) -> dict[tuple[str, str], float]:
            return {(dict(labels)["worker"], dict(labels)["reason"]): value for (name, labels), value in m.items()
                    if name == "cachegate_worker_restarts_total"}

        assert restarts(await scrape(proxy)) == zero
        pid = proxy.workers[1]
        os.kill(pid, signal.SIGKILL)
        await proxy.wait_for(lambda: proxy.workers[1] != pid)  # restarted, and ready again
        m = await scrape(proxy)
        # A SIGTERM sent to a worker alone: it stops cleanly (status 0) and says so; a signal,
        # as the log line says, not an "exit" an operator would take for a crash.
        pid = proxy.workers[0]
        os.kill(pid, signal.SIGTERM)
        await proxy.wait_for(lambda: proxy.workers[0] != pid)
        termed = await scrape(proxy)
    finally:
        assert await proxy.stop() == 0
    assert restarts(m) == {**zero, ("1", "signal"): 1.0}
    assert restarts(termed) == {**zero, ("1", "signal"): 1.0, ("0", "signal"): 1.0}


async def test_each_tier_has_its_budget_beside_its_use_and_a_reload_keeps_the_running_one(
        origin: Origin, tmp_path: Path) -> None:
    """"Disk tier at 95 % of its budget" needs the budget: cachegate_cache_budget_bytes is what
    cachegate_cache_bytes of the tier reaches at most (the disk: the shards' budget; memory: the
    shared memory's ring), counted once for the machine. cache.disk.size and cache.memory take
    effect at a restart: a reload that changes them keeps the gauge at the running value."""
    origin.route("/k", body=b"x" * 5000, headers={"Cache-Control": "max-age=600"})
    cache = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
    proxy = await started(tmp_path, origin, cache)
    try:
        assert (await proxy.get("/k")).status == 200
        m = await scrape(proxy)
        budget = family(m, "cachegate_cache_budget_bytes", "tier")
        used = family(m, "cachegate_cache_bytes", "tier")
        assert budget["disk"] == shard_budget(64 * MB, 2) * 2, budget
        assert 8 * MB < budget["memory"] <= 16 * MB, budget
        assert 0 < used["memory"] <= budget["memory"] and used["disk"] <= budget["disk"], used
        write_config(proxy.directory, origin.url, "cache: {memory: 32MB, disk: {path: cache, size: 128MB, "
                                                  "shards: 2}}\n")
        reloaded = await proxy.admin("POST", "/reload")
        assert reloaded.status == 200, reloaded
        assert {"cache.memory", "cache.disk.size"} <= set(json.loads(reloaded.body)["restart_required"]), reloaded.body
        assert family(await scrape(proxy), "cachegate_cache_budget_bytes", "tier") == budget
    finally:
        assert await proxy.stop() == 0


async def test_requests_that_timed_out_waiting_for_the_origin_are_in_its_latency(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """An origin that hung past timeouts.read: 20 requests went to it, and its latency histogram
    counted none (no data on the dashboard), nor did the console's offload (the origin saw no
    request). A request that timed out waiting for its head is in the histogram at the time it
    waited, and among the requests sent upstream."""
    async def hang(request: object) -> object:
        await asyncio.sleep(2)
        raise AssertionError("answered after the timeout")

    origin.route("/hang", hang)  # type: ignore[arg-type]
    proxy = await make_proxy(config="upstream: {timeouts: {read: 0.3s}}\n")
    live = feed(proxy)
    await live.sample()  # the console's baseline
    assert (await proxy.get("/hang")).status == 504
    await live.sample()
    point = json.loads((await proxy.admin("GET", "/console/api/live")).body)["points"][-1]
    assert point["origin"] == 1, point  # the console's offload: the request went to the origin
    m = samples((await proxy.admin("GET", "/metrics")).body)
    upstream = origin.url
    count = {dict(labels)["upstream"]: v for (name, labels), v in m.items()
             if name == "cachegate_upstream_latency_seconds_count"}
    took = {dict(labels)["upstream"]: v for (name, labels), v in m.items()
            if name == "cachegate_upstream_latency_seconds_sum"}
    assert list(count.values()) == [1.0], (count, upstream)
    assert 0.3 <= next(iter(took.values())) < 2
    errors = {dict(labels)["kind"]: v for (name, labels), v in m.items() if name == "cachegate_upstream_errors_total"}
    assert errors["read_timeout"] == 1


async def test_an_invalidation_that_fails_on_a_full_disk_is_counted_and_logged_in_one_line(
        origin: Origin, tmp_path: Path, small_tmpfs: Path) -> None:
    """A POST to a stored URL while the disk is full: its invalidation fails (the client still
    gets the origin's answer), counted as a failed purge of kind ``invalidation``, and logged as
    a line naming the cause, where each such request logged a whole traceback."""
    origin.route("/k", body=b"x" * 100, headers={"Cache-Control": "max-age=600"})
    directory = small_tmpfs / "i"
    directory.mkdir()
    proxy = await started(tmp_path, origin, "cache: {memory: 16MB, disk: {path: cache, size: 4MB, shards: 2}}\n",
                          directory=directory, with_log=True)
    try:
        assert (await proxy.get("/k")).status == 200
        await on_disk(proxy, f"http://{HOST}/k")
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                fill(small_tmpfs, 0)
                full_again(small_tmpfs)
                async with s.post(f"{proxy.url}/k", headers={"Host": HOST}, data=b"x") as r:
                    statuses.append(r.status)
        m = await scrape(proxy)
    finally:
        assert await proxy.stop() == 0
    assert statuses == [200] * 4
    failed = family(m, "cachegate_purge_failures_total", "kind")["invalidation"]
    assert failed >= 1, "\n".join(proxy.lines)
    assert len([line for line in proxy.lines if "invalidation of" in line and "failed" in line]) == failed
    assert not [line for line in proxy.lines if "Traceback" in line], "\n".join(proxy.lines)
