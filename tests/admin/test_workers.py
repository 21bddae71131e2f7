"""The admin API of ``cachegate run --workers 2``: sums over workers, every tier, purges everywhere."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.storage.arena import F_PERSISTED, Arena
from tests.harness import Edited, Origin
from tests.storage.procs import HOST, ProxyProcess, Response, on_disk, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def start(origin: Origin, tmp_path: Path, cache: str = CACHE) -> ProxyProcess:
    proxy = ProxyProcess(str(tmp_path), write_config(
        str(tmp_path), origin.url, cache, admin="{listen: '127.0.0.1:0', purge_from: [127.0.0.0/8]}"))
    await proxy.start("--workers", "2")
    await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
    return proxy


async def in_both_memories(proxy: ProxyProcess, path: str) -> None:
    seen: set[str] = set()
    for _ in range(400):
        r = await proxy.get(path)
        if r.x_cache == "HIT" and r.tier == "memory":
            seen.add(r.worker)
        if len(seen) == 2:
            return
    raise AssertionError(f"{path} reached the memory of workers {sorted(seen)} only")


async def purge_method(proxy: ProxyProcess, path: str, headers: dict[str, str] | None = None) -> Response:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
            s.request("PURGE", proxy.url + path, headers={"Host": HOST, **(headers or {})}) as r:
        return Response(r.status, r.headers, await r.read())


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def requests_total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (name, _), v in m.items() if name == "cachegate_requests_total")


async def test_counters_add_up_across_workers_and_survive_a_worker_restart(
        origin: Origin, tmp_path: Path) -> None:
    origin.route("/n", body=b"n" * 100, headers={"Cache-Control": "max-age=300"})
    proxy = await start(origin, tmp_path)
    try:
        per_worker: dict[str, int] = {}
        total = 0
        while min(per_worker.get("0", 0), per_worker.get("1", 0)) < 3:
            r = await proxy.get("/n")
            per_worker[r.worker] = per_worker.get(r.worker, 0) + 1
            total += 1
            assert total < 500
        await on_disk(proxy, f"http://{HOST}/n")  # written behind by the supervisor
        m = samples((await proxy.admin("GET", "/metrics")).body)
        assert requests_total(m) == total  # each worker counted its own; the sum is exact
        assert m[("cachegate_response_bytes_total", (("tier", "memory"),))] + m.get(
            ("cachegate_response_bytes_total", (("tier", "disk"),)), 0) + m[
            ("cachegate_response_bytes_total", (("tier", "upstream"),))] == 100 * total
        stats = json.loads((await proxy.admin("GET", "/stats")).body)
        assert stats["requests"]["total"] == total
        assert {str(w["worker"]): w["requests"] for w in stats["workers"]} == per_worker
        assert stats["tiers"]["memory"]["entries"] == 1  # once in the machine's shared memory
        assert stats["tiers"]["disk"]["entries"] == 1  # and once on the shared disk
        assert all(w["memory"]["decoded_entries"] >= 1 for w in stats["workers"])  # each has read it
        assert stats["top_keys"][0]["url"] == f"http://{HOST}/n"

        # A worker dies and comes back: the sum keeps what it had counted.
        old = proxy.workers[1]
        os.kill(old, signal.SIGKILL)
        await proxy.wait_for(lambda: proxy.workers[1] != old, wait=30)
        await proxy.wait_for(lambda: sum(1 for line in proxy.lines if "ready" in line) >= 3, wait=30)
        after = samples((await proxy.admin("GET", "/metrics")).body)
        assert requests_total(after) == total
    finally:
        await proxy.stop()


async def test_a_worker_restart_adds_nothing_to_the_machines_counters(
        origin: Origin, tmp_path: Path) -> None:
    """Evictions (the shared memory's) and reloads (the supervisor's) are counted once, by the
    supervisor: a worker killed and started again leaves them as they were. (A dead worker's last
    snapshot was kept whole, these included: one kill -9 doubled evictions_total, with no eviction,
    and added a reload that never happened.) The worker's own counters still never go down."""
    origin.route("/big", body=b"b" * 200_000, headers={"Cache-Control": "max-age=300"})
    proxy = await start(origin, tmp_path, cache="cache: {memory: 4MB, memory_max_object: 256KB, "
                        "disk: {path: cache, size: 64MB, shards: 2}}\n")
    try:
        for i in range(30):  # 6 MB of fills into 4 MB of shared memory
            assert (await proxy.get(f"/big?i={i}")).status == 200
        assert (await proxy.admin("POST", "/reload")).status == 200
        evictions = ("cachegate_evictions_total", (("tier", "memory"),))
        reloads = ("cachegate_config_reloads_total", (("result", "success"),))
        before = samples((await proxy.admin("GET", "/metrics")).body)  # every worker's snapshot
        stats = json.loads((await proxy.admin("GET", "/stats")).body)
        assert before[evictions] == stats["tiers"]["memory"]["evictions"] > 0
        assert before[reloads] == 1
        assert requests_total(before) == 30

        old = proxy.workers[0]
        os.kill(old, signal.SIGKILL)
        await proxy.wait_for(lambda: proxy.workers[0] != old, wait=30)  # its "ready" line
        after = samples((await proxy.admin("GET", "/metrics")).body)
        assert (after[evictions], after[reloads]) == (before[evictions], 1)
        assert requests_total(after) == 30
    finally:
        await proxy.stop()


async def test_cache_stats_and_explain_see_every_workers_memory_and_the_disk(
        origin: Origin, tmp_path: Path) -> None:
    origin.route("/p", body=b"page", headers={"Cache-Control": "max-age=300", "Surrogate-Key": "pages"})
    proxy = await start(origin, tmp_path)
    try:
        url = quote(f"http://{HOST}/p")
        await proxy.get("/p")
        await on_disk(proxy, f"http://{HOST}/p")
        await in_both_memories(proxy, "/p")
        [variant] = json.loads((await proxy.admin("GET", f"/cache?url={url}")).body)["variants"]
        assert variant["tiers"] == ["memory", "disk"] and variant["memory_workers"] == [0, 1]
        assert variant["tags"] == ["pages"] and variant["hits"] >= 2
        trace = json.loads((await proxy.admin("GET", f"/explain?url={url}")).body)
        assert trace["stored"][0]["tiers"] == ["memory", "disk"]
        assert trace["decision"]["x_cache_status"] == "HIT"
        unknown = await proxy.admin("GET", "/cache?url=" + quote("http://other.test/p"))
        assert unknown.status == 400
    finally:
        await proxy.stop()


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has spent (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shared_memory_of(pid: int) -> Arena:
    """The arena (the shared memory) of the supervisor ``pid``, mapped here too."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:cachegate-arena"):
                return Arena.attach(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR))
    raise AssertionError(f"process {pid} holds no arena")


async def test_cache_of_a_url_in_a_full_shared_memory_costs_the_workers_a_lookup_not_a_pass(
        origin: Origin, tmp_path: Path) -> None:
    """Each worker answered ``GET /cache?url=`` by reading every record of the shared memory in
    one go: with 250,000 records, 2.4-4.5 s with both workers' clients waiting, and past the
    supervisor's 2 s wait the answer said "unanswered_workers": [0, 1] and listed no memory copy.
    A host no client asked for since start cost each of them such a pass too. Now the supervisor
    finds the keys (in slices) and asks each worker for those: with 120,000 records (copies of a
    stored one, put straight into the shared memory), each worker spends under 0.1 s of CPU on
    either call (a pass took 0.3 s of it), and the answer lists both workers' memory."""
    for path in ("/template", "/n"):
        origin.route(path, body=b"n", headers={"Cache-Control": "max-age=300"})
    proxy = await start(origin, tmp_path, cache="cache: {memory: 128MB, disk: {path: cache, size: 256MB, shards: 2}}\n")
    try:
        await proxy.get("/template")
        assert proxy.process is not None
        arena = shared_memory_of(proxy.process.pid)
        try:
            template = arena.find(f"http://{HOST}/template")
            assert template is not None
            body = arena.body(template)
            assert body is not None
            for i in range(120_000):  # (flagged written to disk: the write-behind leaves them)
                arena.put(f"http://{HOST}/crowd/{i}", template.meta, body, flags=F_PERSISTED)
        finally:
            arena.close()
        await in_both_memories(proxy, "/n")
        for call in (f"/cache?url={quote(f'http://{HOST}/n')}", "/cache?url=" + quote("http://other.test/p")):
            before = {w: cpu_seconds(pid) for w, pid in proxy.workers.items()}
            reply = await proxy.admin("GET", call)
            spent = {w: cpu_seconds(pid) - before[w] for w, pid in proxy.workers.items()}
            assert all(s < 0.1 for s in spent.values()), f"{call}: the workers spent {spent} s of CPU"
        assert reply.status == 400  # (other.test: no client asked for it, nothing holds it)
        cache = json.loads((await proxy.admin("GET", f"/cache?url={quote(f'http://{HOST}/n')}")).body)
        assert "unanswered_workers" not in cache
        [variant] = cache["variants"]
        assert variant["memory_workers"] == [0, 1] and variant["body_in_memory"]
    finally:
        await proxy.stop()


async def test_a_post_against_a_full_shared_memory_costs_the_supervisor_a_lookup_and_reaches_both_workers(
        origin: Origin, tmp_path: Path) -> None:
    """Any client's POST (answered 2xx: RFC 9111 §4.4) had the supervisor look through every
    record of the shared memory twice to invalidate one URL (without a disk tier: 1.4 s of CPU
    per POST with 250,000 records). Now a URL whose keys follow from it is looked up: with
    120,000 records (put straight into the shared memory) the supervisor and each worker spend
    under 0.1 s of CPU on a POST (the passes took 0.6 s of the supervisor's), and no worker
    serves the invalidated response afterwards."""
    origin.route("/template", body=b"t", headers={"Cache-Control": "max-age=300"})
    origin.route("/n", Edited().page)
    proxy = await start(origin, tmp_path, cache="cache: {memory: 128MB, disk: null}\n")
    try:
        await proxy.get("/template")
        assert proxy.process is not None
        supervisor = proxy.process.pid
        arena = shared_memory_of(supervisor)
        try:
            template = arena.find(f"http://{HOST}/template")
            assert template is not None
            body = arena.body(template)
            assert body is not None
            for i in range(120_000):
                arena.put(f"http://{HOST}/crowd/{i}", template.meta, body)
        finally:
            arena.close()
        await in_both_memories(proxy, "/n")
        pids = {"supervisor": supervisor, **proxy.workers}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                s.post(proxy.url + "/n", data=b"x", headers={"Host": HOST}) as r:
            assert r.status == 204
        spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        assert all(s < 0.1 for s in spent.values()), f"a POST cost {spent} s of CPU"
        answered: set[str] = set()
        for _ in range(400):
            r2 = await proxy.get("/n")
            assert r2.body == b"new", (r2.worker, r2.x_cache, r2.tier)
            answered.add(r2.worker)
            if len(answered) == 2:
                break
        assert answered == {"0", "1"}
    finally:
        await proxy.stop()


async def test_every_kind_of_purge_is_complete_in_both_workers_when_it_answers(
        origin: Origin, tmp_path: Path) -> None:
    version = {"v": 1}

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.path} v{version['v']}", headers={
            "Cache-Control": "max-age=300", "ETag": f'"{version["v"]}"', "Surrogate-Key": "all-pages"})

    paths = ("/a/1", "/a/2", "/b/1")
    for p in paths:
        origin.route(p, page)
    proxy = await start(origin, tmp_path)

    async def warm() -> None:
        for p in paths:
            await proxy.get(p)
            await in_both_memories(proxy, p)

    async def never_old(purged: tuple[str, ...], soft: bool = False) -> None:
        """Right after the purge answered: no worker serves an old copy as fresh."""
        for _ in range(10):
            for p in purged:
                r = await proxy.get(p)
                old = r.body == f"{p} v{version['v'] - 1}".encode()
                assert not old or (soft and r.x_cache == "UPDATING"), (p, r.worker, r.x_cache, r.body)

    purges: list[tuple[str, Any, tuple[str, ...], bool]] = [
        ("prefix", {"prefixes": [f"http://{HOST}/a/"]}, ("/a/1", "/a/2"), False),
        ("all", {"all": True}, paths, False),
        ("soft tag", {"tags": ["all-pages"], "soft": True}, paths, True),
        ("soft url", {"urls": [f"http://{HOST}/b/1"], "soft": True}, ("/b/1",), True),
    ]
    try:
        for name, spec, purged, soft in purges:
            await warm()
            version["v"] += 1
            reply = await proxy.admin("POST", "/purge", json=spec)
            assert reply.status == 200, (name, reply.body)
            # The objects purged, each counted once (not once per worker that held it).
            assert json.loads(reply.body)["purged"] == len(purged), name
            await never_old(purged, soft)
        # PURGE on the client listener, whichever worker takes it, purges in both.
        for headers, soft in (({}, False), ({"Cachegate-Soft-Purge": "1"}, True)):
            await warm()
            version["v"] += 1
            reply = await purge_method(proxy, "/b/1", headers)
            assert reply.status == 200 and json.loads(reply.body)["soft"] is soft
            await never_old(("/b/1",), soft)
            assert (await proxy.get("/a/1")).x_cache == "HIT"  # untouched
        metrics = samples((await proxy.admin("GET", "/metrics")).body)
        assert metrics[("cachegate_purges_total", (("kind", "url"),))] == 3  # soft url + 2 PURGEs
        assert metrics[("cachegate_purges_total", (("kind", "prefix"),))] == 1
    finally:
        await proxy.stop()


async def from_both_workers(proxy: ProxyProcess, path: str) -> int:
    """GET ``path`` until both workers answered one; how many requests that took."""
    seen: set[str] = set()
    total = 0
    while seen != {"0", "1"}:
        seen.add((await proxy.get(path)).worker)
        total += 1
        assert total < 500
    return total


async def test_a_hung_worker_is_named_and_its_last_snapshot_counted_not_waited_for(
        origin: Origin, tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP: as one hung) answers no call until the watchdog replaces it
    (worker_timeout, 30 s by default). /metrics still adds its last snapshot, and flags it
    stale; /stats and /cache name it. (They waited 10 s for it, /stats twice, one call after
    the other: longer than Prometheus's scrape_timeout, and without saying why.)"""
    origin.route("/n", body=b"n", headers={"Cache-Control": "max-age=300"})
    proxy = await start(origin, tmp_path)
    hung = proxy.workers[0]
    try:
        total = await from_both_workers(proxy, "/n")
        before = samples((await proxy.admin("GET", "/metrics")).body)
        assert requests_total(before) == total
        assert before[("cachegate_worker_metrics_stale", (("worker", "0"),))] == 0
        assert before[("cachegate_worker_metrics_stale", (("worker", "1"),))] == 0

        os.kill(hung, signal.SIGSTOP)
        # The three asked at once: each waits out its own call to the hung worker.
        metrics_reply, stats_reply, cache_reply = await asyncio.gather(
            proxy.admin("GET", "/metrics"), proxy.admin("GET", "/stats"),
            proxy.admin("GET", "/cache?url=" + quote(f"http://{HOST}/n")))
        after = samples(metrics_reply.body)
        assert requests_total(after) == total  # worker 0's count, from its last snapshot
        assert after[("cachegate_worker_metrics_stale", (("worker", "0"),))] == 1
        assert after[("cachegate_worker_metrics_stale", (("worker", "1"),))] == 0

        stats = json.loads(stats_reply.body)
        assert stats["unanswered_workers"] == [0]
        assert stats["requests"]["total"] == total
        assert [w["worker"] for w in stats["workers"]] == [1]

        cache = json.loads(cache_reply.body)
        assert cache["unanswered_workers"] == [0]
        assert cache["variants"][0]["url"] == f"http://{HOST}/n"  # the other worker's and the disk's
        assert proxy.workers[0] == hung  # (not replaced meanwhile: these were its answers)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
        await proxy.stop()


async def test_a_worker_that_is_not_running_is_flagged_stale_and_named_not_dropped(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker slot with no process (dead and waiting out its restart backoff, or not
    restarted: here its code changed under the supervisor, which is deterministic) keeps its
    series: cachegate_worker_metrics_stale is 1 for it, its last snapshot is still counted, and
    /stats and /cache name it in unanswered_workers. (It dropped out of the gauge and of /stats
    unnamed: an alert on max(cachegate_worker_metrics_stale) == 1 never fired for it.)"""
    origin.route("/n", body=b"n", headers={"Cache-Control": "max-age=300"})
    code = tmp_path / "site"  # the package the supervisor runs from, changed while it runs
    shutil.copytree(ROOT / "proxy", code / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(code))
    proxy = await start(origin, tmp_path)
    try:
        total = await from_both_workers(proxy, "/n")
        before = samples((await proxy.admin("GET", "/metrics")).body)  # (worker 1's last snapshot)
        assert requests_total(before) == total
        assert before[("cachegate_worker_metrics_stale", (("worker", "1"),))] == 0

        with (code / "proxy" / "__init__.py").open("a") as f:
            f.write("# another release\n")
        proxy.lines.clear()
        os.kill(proxy.workers[1], signal.SIGKILL)
        for _ in range(400):  # until the supervisor found the code changed: worker 1 not restarted
            health = await proxy.admin("GET", "/healthz")
            if "restart the service" in health.body.decode():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"worker 1 still runs: {health.body!r}")
        after = samples((await proxy.admin("GET", "/metrics")).body)
        assert after[("cachegate_worker_metrics_stale", (("worker", "0"),))] == 0
        assert after[("cachegate_worker_metrics_stale", (("worker", "1"),))] == 1
        assert requests_total(after) == total  # worker 1's count, from its last snapshot

        stats = json.loads((await proxy.admin("GET", "/stats")).body)
        assert stats["unanswered_workers"] == [1]
        assert [w["worker"] for w in stats["workers"]] == [0]
        assert stats["requests"]["total"] == total

        cache = json.loads((await proxy.admin("GET", "/cache?url=" + quote(f"http://{HOST}/n"))).body)
        assert cache["unanswered_workers"] == [1]
    finally:
        await proxy.stop()


def documented_metrics() -> set[str]:
    """The names in the first column of docs/admin-api.md's table of metrics."""
    text = (Path(__file__).resolve().parents[2] / "docs/admin-api.md").read_text()
    table = text.split("\n## Metrics\n", 1)[1].split("\n\n**", 1)[0]
    return {name for line in table.splitlines() if line.startswith("| `")
            for name in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])}


async def test_every_family_in_metrics_is_in_the_documented_table_and_back(
        origin: Origin, tmp_path: Path) -> None:
    """docs/admin-api.md's table against a real supervisor's /metrics (every family a multi-worker
    instance shows, the supervisor's own included): the leases' two families were only in
    docs/upstreams.md. Counters are documented by their sample name (``_total``)."""
    origin.route("/n", body=b"n", headers={"Cache-Control": "max-age=300"})
    proxy = await start(origin, tmp_path)
    try:
        await proxy.get("/n")
        text = (await proxy.admin("GET", "/metrics")).body.decode()
    finally:
        await proxy.stop()
    shown = {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)}
    documented = documented_metrics()
    assert shown - documented == set(), "in /metrics, not in docs/admin-api.md's table"
    assert documented - shown == set(), "in docs/admin-api.md's table, not in /metrics"


async def test_a_soft_purged_entry_is_never_a_miss_while_one_request_refreshes_it(
        origin: Origin, tmp_path: Path) -> None:
    # Soft purge, then a GET and more right behind it: the first serves the old copy and
    # refreshes it in the background; the others, in either worker, must find the old copy
    # (UPDATING) or the new one (HIT). The refresh replacing the record in the shared memory
    # made it vanish for an instant, and the other worker's lookup then went to the origin as a
    # full miss (in about one refresh in a hundred: so many are run, several at once).
    paths = [f"/s/{r}/{i}" for r in range(ROUNDS) for i in range(AT_ONCE)]
    for p in paths:
        origin.route(p, body=b"s" * 100, headers={"Cache-Control": "max-age=300"})
    proxy = await start(origin, tmp_path)

    async def refreshed(path: str) -> tuple[str, ...]:
        first = await proxy.get(path)
        others = await asyncio.gather(*(proxy.get(path) for _ in range(FOLLOWERS)))
        return (first.x_cache, *(r.x_cache for r in others))

    try:
        seen: list[tuple[str, tuple[str, ...]]] = []
        for r in range(ROUNDS):
            batch = paths[r * AT_ONCE:(r + 1) * AT_ONCE]
            for p in batch:
                await proxy.get(p)
            reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}{p}" for p in batch],
                                                               "soft": True})
            assert reply.status == 200, reply.body
            seen.extend(zip(batch, await asyncio.gather(*map(refreshed, batch)), strict=True))
        misses = [(p, s) for p, s in seen if s[0] != "UPDATING" or not set(s[1:]) <= {"UPDATING", "HIT"}]
        assert not misses, misses
    finally:
        await proxy.stop()


ROUNDS, AT_ONCE, FOLLOWERS = 40, 8, 6


async def test_a_record_replaced_in_the_shared_memory_is_never_a_miss_in_the_other_worker(
        origin: Origin, tmp_path: Path) -> None:
    # Each request serves a stale copy and refreshes it in the background (stale-while-
    # revalidate), so the records are replaced in the shared memory thousands of times while
    # both workers look them up: the old record died before the index named the new one, and a
    # lookup in that instant went to the origin as a full miss. (No disk tier: its copy would
    # hide the miss, as it does not for an entry not written behind yet, the soft purge's case.)
    paths = [f"/swr/{i}" for i in range(REPLACED_KEYS)]
    for p in paths:
        origin.route(p, body=b"w" * 100, headers={"Cache-Control": "max-age=0, stale-while-revalidate=600"})
    proxy = await start(origin, tmp_path, "cache: {memory: 16MB}\n")
    seen: collections.Counter[str] = collections.Counter()
    try:
        # A new connection each (SO_REUSEPORT then spreads them over both workers).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=50)) as s:
            async def get(path: str) -> str:
                async with s.get(proxy.url + path, headers={"Host": HOST}) as r:
                    await r.read()
                    return r.headers.get("Cache-Status", "")

            for p in paths:
                await get(p)
            for _ in range(REPLACING_ROUNDS):
                seen.update(await asyncio.gather(*(get(p) for p in paths for _ in range(10))))
        assert not [s for s in seen if "fwd=uri-miss" in s], seen
    finally:
        await proxy.stop()


REPLACED_KEYS, REPLACING_ROUNDS = 10, 40


async def test_histogram_buckets_are_listed_by_increasing_le_across_workers(
        origin: Origin, tmp_path: Path) -> None:
    """With --workers the supervisor merges the workers' samples, and it sorted them as strings:
    ``le="+Inf"`` came first and ``10.0`` before ``2.5``, where the text format requires each
    series' buckets by increasing ``le``, ``+Inf`` last."""
    origin.route("/h", body=b"h", headers={"Cache-Control": "max-age=300"})
    origin.route("/u", body=b"u")
    proxy = await start(origin, tmp_path)
    try:
        for path in ("/h", "/h", "/u", "/u"):
            await proxy.get(path)
        text = (await proxy.admin("GET", "/metrics")).body.decode()
    finally:
        await proxy.stop()
    series: dict[tuple[str, str], list[float]] = {}
    ended: set[tuple[str, str]] = set()  # series whose buckets were followed by something else
    last: tuple[str, str] | None = None
    for line in text.splitlines():
        m = re.match(r'^(\w+)_bucket\{(.*)\} ', line)
        if m is None:
            if last is not None:
                ended.add(last)
            last = None
            continue
        labels = re.findall(r'(\w+)="([^"]*)"', m.group(2))
        key = (m.group(1), ",".join(f"{k}={v}" for k, v in labels if k != "le"))
        if key != last and last is not None:
            ended.add(last)
        assert key not in ended, f"the buckets of {key} are not together:\n{text}"
        series.setdefault(key, []).append(float(dict(labels)["le"]))
        last = key
    names = {name for name, _ in series}
    assert {"cachegate_upstream_latency_seconds", "cachegate_request_duration_seconds"} <= names, names
    for key, bounds in series.items():
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds) and bounds[-1] == float("inf"), (
            key, bounds)
