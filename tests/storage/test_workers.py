"""``cachegate run --workers 2`` as a real process tree: shared port, shared disk, purges everywhere."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, Response, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def _until_each_worker(proxy: ProxyProcess, path: str, want: int, check: object) -> dict[str, Response]:
    """New connections until every worker answered ``path`` with a response ``check`` accepts."""
    seen: dict[str, Response] = {}
    for _ in range(400):
        r = await proxy.get(path)
        if check(r):  # type: ignore[operator]
            seen[r.worker] = r
        if len(seen) == want:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered as wanted")


async def test_a_purge_through_the_admin_api_reaches_every_workers_memory(
        origin: Origin, tmp_path: Path) -> None:
    version = {"v": b"v1"}

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=version["v"] * 100, headers={
            "Cache-Control": "max-age=300", "Surrogate-Key": "pages"})

    origin.route("/p", page)
    origin.route("/q", page)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    try:
        for path in ("/p", "/q"):
            assert (await proxy.get(path)).x_cache == "MISS"
            # (Another worker may miss too until the first one's disk write has landed:
            # workers coalesce only within themselves.)
            # Every worker serves it from the machine's shared memory, where the first stored it.
            hits = await _until_each_worker(
                proxy, path, 2, lambda r: r.x_cache == "HIT" and r.tier == "memory")
            assert sorted(hits) == ["0", "1"]
            assert all(r.body == b"v1" * 100 for r in hits.values())
        assert origin.count("/p") <= 2 and origin.count("/q") <= 2

        version["v"] = b"v2"
        host = HOST
        purged = await proxy.admin("POST", "/purge", json={"urls": [f"http://{host}/p"]})
        assert purged.status == 200, purged.body
        purged = await proxy.admin("POST", "/purge", json={"tags": ["pages"]})
        assert purged.status == 200, purged.body

        # No worker may answer with the purged body, from memory or from disk.
        seen = set()
        for _ in range(40):
            for path in ("/p", "/q"):
                r = await proxy.get(path)
                assert r.status == 200
                assert r.body == b"v2" * 100, (path, r.worker, r.x_cache, r.tier)
                seen.add(r.worker)
        assert seen == {"0", "1"}
    finally:
        await proxy.stop()


async def test_a_purge_sent_to_a_worker_as_an_unsafe_method_reaches_the_other_worker(
        origin: Origin, tmp_path: Path) -> None:
    version = {"v": b"old"}

    async def page(request: web.Request) -> web.Response:
        if request.method == "POST":
            version["v"] = b"new"
            return web.Response(status=204)
        return web.Response(body=version["v"], headers={"Cache-Control": "max-age=300"})

    origin.route("/doc", page)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    try:
        await proxy.get("/doc")
        await _until_each_worker(proxy, "/doc", 2, lambda r: r.tier == "memory")
        # A POST through one worker invalidates /doc (RFC 9111 §4.4) in both.
        connector_resp = await _post(proxy, "/doc")
        assert connector_resp == 204
        for _ in range(30):
            r = await proxy.get("/doc")
            assert r.body == b"new", (r.worker, r.x_cache, r.tier)
    finally:
        await proxy.stop()


async def _post(proxy: ProxyProcess, path: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
            s.post(proxy.url + path, data=b"x", headers={"Host": HOST}) as r:
        return r.status


async def test_a_worker_killed_with_sigkill_is_restarted_and_sigterm_stops_all_with_exit_0(
        origin: Origin, tmp_path: Path) -> None:
    origin.route("/k", body=b"k", headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        old = proxy.workers[1]
        os.kill(old, signal.SIGKILL)
        await proxy.wait_for(lambda: proxy.workers[1] != old, wait=30)
        new = proxy.workers[1]
        assert new != old
        # Both workers serve again (the new one from the shared disk tier).
        seen = await _until_each_worker(proxy, "/k", 2, lambda r: r.status == 200 and r.body == b"k")
        assert sorted(seen) == ["0", "1"]
        pids = list(proxy.workers.values())
    finally:
        code = await proxy.stop(signal.SIGTERM)
    assert code == 0
    assert "cachegate: stopped" in proxy.lines
    for pid in pids:  # no worker outlives the supervisor
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_worker_whose_loop_is_stuck_is_killed_and_restarted(origin: Origin, tmp_path: Path) -> None:
    """A stopped worker (SIGSTOP: its loop answers nothing, as a stuck one) still gets its share
    of new connections from the kernel: the supervisor's ping finds it silent within
    ``worker_timeout`` and replaces it, and every client is answered again."""
    origin.route("/s", body=b"s", headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE + "worker_timeout: 1s\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        await _until_each_worker(proxy, "/s", 2, lambda r: r.status == 200)
        old = proxy.workers[0]
        os.kill(old, signal.SIGSTOP)
        await proxy.wait_for(lambda: proxy.workers[0] != old, wait=30)
        assert any("worker 0" in line and "unresponsive for 1s" in line for line in proxy.lines)
        with pytest.raises(ProcessLookupError):
            for _ in range(100):  # killed (SIGKILL reaches a stopped process), and reaped
                os.kill(old, 0)
                await asyncio.sleep(0.1)
        seen = await _until_each_worker(proxy, "/s", 2, lambda r: r.status == 200 and r.body == b"s")
        assert sorted(seen) == ["0", "1"]
        # The busy but healthy sibling was left alone.
        assert not any("worker 1" in line and "unresponsive" in line for line in proxy.lines)
    finally:
        await proxy.stop(signal.SIGTERM)


async def every_worker_says(proxy: ProxyProcess, via: str) -> None:
    """Wait until the reloaded config answers everywhere: six answers in a row carry ``via``,
    then each of the two workers has answered with it."""
    for _ in range(100):
        rs = [await proxy.get("/h") for _ in range(6)]
        if all(via in r.headers["Via"] for r in rs):
            break
        await asyncio.sleep(0.1)
    seen = await _until_each_worker(proxy, "/h", 2, lambda r: via in r.headers["Via"])
    assert len(seen) == 2


async def test_sighup_reloads_the_config_in_every_worker(origin: Origin, tmp_path: Path) -> None:
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    config = write_config(str(tmp_path), origin.url, CACHE, "via: before\n")
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2")
    try:
        seen = await _until_each_worker(proxy, "/h", 2, lambda r: "1.1 before" in r.headers["Via"])
        assert len(seen) == 2
        write_config(str(tmp_path), origin.url, CACHE, "via: after\n")
        proxy.send(signal.SIGHUP)
        await every_worker_says(proxy, "1.1 after")
        for _ in range(20):
            assert "1.1 after" in (await proxy.get("/h")).headers["Via"]
        # POST /reload on the supervisor's admin API reaches the workers the same way.
        write_config(str(tmp_path), origin.url, CACHE, "via: third\n")
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 200, reply.body
        await every_worker_says(proxy, "1.1 third")
    finally:
        assert await proxy.stop() == 0


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
        origin: Origin, tmp_path: Path) -> None:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    await proxy.wait_for(lambda: len(proxy.workers) == 2)
    pids = list(proxy.workers.values())
    assert proxy.process is not None
    proxy.process.kill()  # SIGKILL: no chance to stop the workers
    await proxy.process.wait()
    for _ in range(200):  # they notice the control channel closing and drain (grace 2 s)
        alive = [p for p in pids if _alive(p)]
        if not alive:
            break
        await asyncio.sleep(0.05)
    assert not alive, "workers outlived their supervisor"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


async def test_sigint_to_the_supervisor_stops_every_worker_and_exits_0(
        origin: Origin, tmp_path: Path) -> None:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    await proxy.wait_for(lambda: len(proxy.workers) == 2)
    pids = list(proxy.workers.values())
    assert await proxy.stop(signal.SIGINT) == 0
    assert "cachegate: stopped" in proxy.lines
    assert not [p for p in pids if _alive(p)]


async def test_what_one_worker_stored_the_other_serves_from_memory_without_a_miss(
        origin: Origin, tmp_path: Path) -> None:
    """One cache per machine: the workers share one memory tier. Memory only (no disk tier to
    meet in, no cross-worker lease): each key reaches the origin once, whichever worker asks."""
    for i in range(20):
        origin.route(f"/f/{i}", body=b"%d" % i * 50, headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url,
                                                     "cache: {memory: 16MB, disk: null}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        for i in range(20):
            first = await proxy.get(f"/f/{i}")
            assert first.x_cache == "MISS"
            # The other worker, asked right after: a hit from the shared memory.
            seen = await _until_each_worker(proxy, f"/f/{i}", 2, lambda r: r.status == 200)
            for worker, r in seen.items():
                if worker != first.worker:
                    assert (r.x_cache, r.tier, r.body) == ("HIT", "memory", b"%d" % i * 50)
            assert origin.count(f"/f/{i}") == 1
    finally:
        await proxy.stop()


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Pss")


# What each worker process costs beyond the machine's cache.memory, measured with two workers
# at 100,000 keys (docs/storage.md): the interpreter with aiohttp, uvloop, yaml, diskcache and
# prometheus-client, SQLite's page caches, spools in flight, and the supervisor's share.
WORKER_OVERHEAD = 80 << 20


async def test_two_workers_together_stay_within_the_machines_memory_budget(
        origin: Origin, tmp_path: Path) -> None:
    """cache.memory is the budget of the machine: with two workers that both fill, read and
    promote a set of bodies twice the budget, all cachegate processes together (proportional set size:
    shared pages counted once) stay within cache.memory + 2 x the fixed overhead."""
    body = os.urandom(64 * 1024)

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Cache-Control": "max-age=300"})

    for i in range(3200):  # 200 MB of distinct bodies against a 96 MB budget
        origin.route(f"/b/{i}", page)
    proxy = ProxyProcess(str(tmp_path), write_config(
        str(tmp_path), origin.url, "cache: {memory: 96MB, disk: {path: cache, size: 1GB, shards: 4}}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        assert proxy.process is not None
        pids = [proxy.process.pid, *proxy.workers.values()]
        peak = 0
        sem = asyncio.Semaphore(16)

        async def get(i: int) -> None:
            async with sem:
                r = await proxy.get(f"/b/{i}")
                assert r.status == 200 and len(r.body) == len(body)

        # Fill, then read it all twice: a key read from disk twice by one worker is promoted
        # into memory then (proxy.storage.reads.Promotions), in round 3.
        for _ in range(3):
            for start in range(0, 3200, 400):
                await asyncio.gather(*(get(i) for i in range(start, start + 400)))
                peak = max(peak, sum(_pss(p) for p in pids))
        assert peak <= (96 << 20) + 2 * WORKER_OVERHEAD, peak / (1 << 20)
    finally:
        await proxy.stop()


async def test_a_restarted_worker_gets_the_config_last_loaded_good_not_the_file_as_it_is(
        origin: Origin, tmp_path: Path) -> None:
    """An edited file not reloaded yet, or a broken one: a restarted worker runs what its
    siblings run (and starts at all), with the config's relative rule file still found."""
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - name: mark\n    match: {path: /h}\n    response_headers: {add: {X-Rule: here}}\n")
    extra = "rules: [rules.yaml]\n"
    config = write_config(str(tmp_path), origin.url, CACHE, extra + "via: before\n")
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2")

    async def restart_worker_1() -> None:
        old = proxy.workers[1]
        os.kill(old, signal.SIGKILL)
        await proxy.wait_for(lambda: proxy.workers[1] != old, wait=30)

    def good(via: str) -> object:
        return lambda r: f"1.1 {via}" in r.headers["Via"] and r.headers.get("X-Rule") == "here"

    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        write_config(str(tmp_path), origin.url, CACHE, extra + "via: edited\n")  # not reloaded
        await restart_worker_1()
        assert len(await _until_each_worker(proxy, "/h", 2, good("before"))) == 2
        for _ in range(10):
            assert "1.1 before" in (await proxy.get("/h")).headers["Via"]
        write_config(str(tmp_path), origin.url, CACHE, extra + "workers: lots\n")  # broken
        await restart_worker_1()  # it starts (it would exit 2 at every restart)
        assert len(await _until_each_worker(proxy, "/h", 2, good("before"))) == 2
        assert (await proxy.admin("POST", "/reload")).status != 200  # rejected: "before" stays
        await restart_worker_1()
        assert len(await _until_each_worker(proxy, "/h", 2, good("before"))) == 2
        write_config(str(tmp_path), origin.url, CACHE, extra + "via: after\n")
        assert (await proxy.admin("POST", "/reload")).status == 200
        await every_worker_says(proxy, "1.1 after")
        await restart_worker_1()
        assert len(await _until_each_worker(proxy, "/h", 2, good("after"))) == 2
        # A temporary-file cleaner removes the copy (the supervisor runs for months): written again.
        with open(f"/proc/{proxy.workers[1]}/cmdline", "rb") as f:  # noqa: ASYNC230 (procfs, instant)
            argv = f.read().split(b"\0")
        copy = argv[argv.index(b"--config") + 1].decode()
        shutil.rmtree(os.path.dirname(copy))
        await restart_worker_1()
        assert len(await _until_each_worker(proxy, "/h", 2, good("after"))) == 2
    finally:
        assert await proxy.stop() == 0
