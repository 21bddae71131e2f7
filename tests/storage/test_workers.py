"""``cachegate run --workers 2`` as a real process tree: shared port, shared disk, purges everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Edited, Origin
from tests.storage.procs import HOST, ProxyProcess, Response, alive, write_config

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
    origin.route("/doc", Edited().page)
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


async def test_a_reload_longer_than_worker_timeout_kills_no_worker_and_serves_throughout(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling thousands of rules takes longer than worker_timeout: the supervisor, then each
    worker, compiles in a thread, so every worker answers clients and pings meanwhile (a reload
    on the event loop got each one killed as unresponsive, its connections reset). Each reload
    is held mid-compile by the test hook (CACHEGATE_RELOAD_HOLD) for two worker_timeouts."""
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("CACHEGATE_RELOAD_HOLD", str(hold))
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    timeout = 1.0
    extra = f"worker_timeout: {timeout:g}s\n"
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, extra + "via: before\n"))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        await _until_each_worker(proxy, "/h", 2, lambda r: r.status == 200)
        pids = dict(proxy.workers)
        assert proxy.process is not None
        write_config(str(tmp_path), origin.url, CACHE, extra + "via: after\n")
        proxy.send(signal.SIGHUP)
        for pid in (proxy.process.pid, pids[0], pids[1]):  # the supervisor first, then each worker
            marker = hold / f"{pid}.held"
            await proxy.wait_for(marker.exists, wait=20)
            held = [w for w, p in pids.items() if p == pid]
            if held:  # the worker compiling answers a client meanwhile, on the old config
                seen = await _until_each_worker(proxy, "/h", 2, lambda r: r.status == 200)
                assert "1.1 before" in seen[str(held[0])].headers["Via"]
            await asyncio.sleep(2 * timeout)  # pings keep coming, and are answered
            assert marker.exists()  # still compiling
            marker.unlink()
        await every_worker_says(proxy, "1.1 after")
        assert proxy.workers == pids  # no worker was killed or restarted
        assert not [line for line in proxy.lines if "unresponsive" in line or "reload failed" in line]
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
        left = [p for p in pids if alive(p)]
        if not left:
            break
        await asyncio.sleep(0.05)
    assert not left, "workers outlived their supervisor"




async def test_sigint_to_the_supervisor_stops_every_worker_and_exits_0(
        origin: Origin, tmp_path: Path) -> None:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    await proxy.wait_for(lambda: len(proxy.workers) == 2)
    pids = list(proxy.workers.values())
    assert await proxy.stop(signal.SIGINT) == 0
    assert "cachegate: stopped" in proxy.lines
    assert not [p for p in pids if alive(p)]


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
    """An edited file not reloaded yet, or a broken one, the config or a rule file: a restarted
    worker runs what its siblings run (and starts at all), with the config's relative rule
    file still found."""
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})

    def rules(text: str) -> None:
        (tmp_path / "rules.yaml").write_text(text)

    def marking(value: str) -> str:
        return f"rules:\n  - name: mark\n    match: {{path: /h}}\n    response_headers: {{add: {{X-Rule: {value}}}}}\n"

    rules(marking("here"))
    extra = "rules: [rules.yaml]\n"
    config = write_config(str(tmp_path), origin.url, CACHE, extra + "via: before\n")
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start("--workers", "2")

    turns = iter(range(100))

    async def restart_a_worker() -> None:
        """Kill a worker, worker 0 and 1 in turn (either must run what its siblings run): one
        killed again soon after its start is restarted with crash-loop backoff (0.5 s, doubled
        each time: six in a row took 31 s of this test's 38)."""
        n = next(turns) % 2
        old = proxy.workers[n]
        os.kill(old, signal.SIGKILL)
        await proxy.wait_for(lambda: proxy.workers[n] != old, wait=30)

    def good(via: str, rule: str = "here") -> object:
        return lambda r: f"1.1 {via}" in r.headers["Via"] and r.headers.get("X-Rule") == rule

    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        write_config(str(tmp_path), origin.url, CACHE, extra + "via: edited\n")  # not reloaded
        rules("rules:\n  - {name: mark, match: {path: /h}, bypass: true}\n")  # nor this
        await restart_a_worker()
        assert len(await _until_each_worker(proxy, "/h", 2, good("before"))) == 2
        for _ in range(10):
            r = await proxy.get("/h")
            assert "1.1 before" in r.headers["Via"] and r.headers.get("X-Rule") == "here"
        rules("rules:\n  - name: mark\n    match: {path: /h\n")  # half-written: broken
        await restart_a_worker()  # it starts (it would exit 2 at every restart)
        assert len(await _until_each_worker(proxy, "/h", 2, good("before"))) == 2
        rules(marking("here"))
        write_config(str(tmp_path), origin.url, CACHE, extra + "workers: lots\n")  # broken
        await restart_a_worker()  # it starts (it would exit 2 at every restart)
        assert len(await _until_each_worker(proxy, "/h", 2, good("before"))) == 2
        assert (await proxy.admin("POST", "/reload")).status != 200  # rejected: "before" stays
        await restart_a_worker()
        assert len(await _until_each_worker(proxy, "/h", 2, good("before"))) == 2
        write_config(str(tmp_path), origin.url, CACHE, extra + "via: after\n")
        rules(marking("after"))
        assert (await proxy.admin("POST", "/reload")).status == 200
        await every_worker_says(proxy, "1.1 after")
        rules(marking("edited-again"))  # not reloaded
        await restart_a_worker()
        assert len(await _until_each_worker(proxy, "/h", 2, good("after", "after"))) == 2
        # A temporary-file cleaner removes the copy (the supervisor runs for months): written again.
        with open(f"/proc/{proxy.workers[1]}/cmdline", "rb") as f:  # noqa: ASYNC230 (procfs, instant)
            argv = f.read().split(b"\0")
        copy = argv[argv.index(b"--config") + 1].decode()
        shutil.rmtree(os.path.dirname(copy))
        await restart_a_worker()  # (worker 1's turn: the one whose copy is gone)
        assert len(await _until_each_worker(proxy, "/h", 2, good("after", "after"))) == 2
    finally:
        assert await proxy.stop() == 0


def _copy_of(pid: int) -> str:
    """The config copy a worker was started with (its ``--config``)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return argv[argv.index(b"--config") + 1].decode()


async def test_a_reload_after_a_cleaner_removed_the_copy_reaches_every_worker(
        origin: Origin, tmp_path: Path) -> None:
    """A temporary-file cleaner removed the workers' copy of the config, whose directory moves
    then: each worker reloads from the copy the reload committed (named in the call), not the
    path it was started with, and the answer comes once every worker has applied it."""
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, "via: before\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        started_with = _copy_of(proxy.workers[0])
        assert _copy_of(proxy.workers[1]) == started_with
        shutil.rmtree(os.path.dirname(started_with))
        write_config(str(tmp_path), origin.url, CACHE, "via: after\n")
        reply = await proxy.admin("POST", "/reload")
        assert reply.status == 200, reply.body
        for _ in range(20):  # already everywhere
            assert "1.1 after" in (await proxy.get("/h")).headers["Via"]
        assert len(await _until_each_worker(proxy, "/h", 2, lambda r: "1.1 after" in r.headers["Via"])) == 2
        assert proxy.process is not None
        pid = proxy.process.pid
        copies = [n for n in os.listdir(os.path.dirname(os.path.dirname(started_with)))
                  if n.startswith(f"cachegate-config-{pid}-")]
        assert len(copies) == 1  # one copy per supervisor
    finally:
        assert await proxy.stop() == 0


async def test_a_reload_a_worker_did_not_apply_is_answered_as_failed_naming_the_worker(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy vanishes while worker 1 is about to read it (held by the test hook before it
    loads): worker 0 and the supervisor run the new config, worker 1 keeps the old one, and the
    answer says so instead of {"reloaded": true}."""
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("CACHEGATE_RELOAD_HOLD", str(hold))
    origin.route("/h", body=b"h", headers={"Cache-Control": "no-store"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, "via: before\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        assert proxy.process is not None
        write_config(str(tmp_path), origin.url, CACHE, "via: after\n")
        reply = asyncio.ensure_future(proxy.admin("POST", "/reload"))
        for pid in (proxy.process.pid, proxy.workers[0], proxy.workers[1]):
            marker = hold / f"{pid}.held"
            await proxy.wait_for(marker.exists, wait=20)
            if pid == proxy.workers[1]:
                # Workers reload at once: worker 0 reads the copy before it goes.
                await _until_each_worker(proxy, "/h", 1, lambda r: r.worker == "0" and "1.1 after" in r.headers["Via"])
                shutil.rmtree(os.path.dirname(_copy_of(pid)))
            marker.unlink()
        answer = await reply
        assert answer.status == 400, answer.body
        problems = json.loads(answer.body)["problems"]
        assert len(problems) == 1 and problems[0].startswith("worker 1 "), problems
        assert json.loads(answer.body)["error"].startswith("the new config runs here but not in every worker")
        assert "cannot read the supervisor's copy" in problems[0]
        seen = await _until_each_worker(proxy, "/h", 2, lambda r: True)
        assert "1.1 after" in seen["0"].headers["Via"] and "1.1 before" in seen["1"].headers["Via"]
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert 'cachegate_config_reloads_total{result="failure"} 1.0' in metrics
        assert 'cachegate_config_reloads_total{result="success"} 0.0' in metrics \
            or 'cachegate_config_reloads_total{result="success"}' not in metrics
    finally:
        assert await proxy.stop() == 0


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


def _holds_ring_lock(pid: int) -> bool:
    """Whether ``pid`` holds a POSIX lock on byte 0 of a file (the arena's ring lock: the
    worker's only POSIX locks are the arena's and the disk tier's SQLite ones, whose bytes
    lie past 2**30)."""
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[1] == "POSIX" and fields[4] == str(pid) and fields[6:8] == ["0", "0"]:
                return True
    return False


async def _stop_holding_ring_lock(pid: int, may_stop: Callable[[], bool], tries: int = 20000) -> None:
    """SIGSTOP ``pid`` at a moment it holds the ring lock (stopped, then looked at; else let go
    on and tried again), only when ``may_stop()``."""
    for _ in range(tries):
        if not may_stop():
            await asyncio.sleep(0.01)
            continue
        os.kill(pid, signal.SIGSTOP)
        for _ in range(2000):  # the signal is taken asynchronously: until it really stands
            if _state(pid) == "T":
                break
        if _state(pid) == "T" and _holds_ring_lock(pid) and may_stop():
            await asyncio.sleep(0.05)
            if _holds_ring_lock(pid):
                return
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.002)
    raise AssertionError("never caught the worker holding the ring lock")


async def test_a_worker_stopped_holding_the_ring_lock_is_killed_not_the_worker_waiting_for_it(
        origin: Origin, tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP: as one hung) while it holds the shared memory's ring lock
    freezes the other worker at its next fill: its loop blocks in ``fcntl`` waiting for the
    lock, and answers no ping either. The supervisor kills the holder, which frees the lock,
    and leaves the waiter alone: it serves again within worker_timeout and a ping interval,
    as the same process. (It killed both: the waiter's ping timed out first, or in the same
    moment, and the waiter's requests in flight were cut.)

    The stop is timed against the supervisor's pings (every worker_timeout / 2 from each
    worker's ready line) so that the waiter's ping times out first: the order that killed
    the waiter for certain."""
    timeout, period = 3.0, 1.5  # worker_timeout, and the ping interval it gives
    big = bytes(range(256)) * 4096  # 1 MiB: a fill's copy into the ring holds the lock a while
    origin.route("/small", body=b"small", headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(
        str(tmp_path), origin.url,
        "cache: {memory: 32MB, memory_max_object: 2MB, disk: {path: cache, size: 128MB, shards: 2}}\n",
        f"worker_timeout: {timeout:g}s\n"))
    await proxy.start("--workers", "2")
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    count = 0

    async def fills() -> None:
        """Misses of 1 MiB on new connections (both workers), each given up after a second
        (one sent to the stopped worker would hold its client for good)."""
        nonlocal count
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1)) as s:
            async def one() -> None:
                nonlocal count
                while not done.is_set():
                    count += 1
                    path = f"/f/{count}"
                    origin.route(path, body=big, headers={"Cache-Control": "max-age=300"})
                    with contextlib.suppress(Exception):
                        async with s.get(proxy.url + path, headers={"Host": HOST}) as r:
                            await r.read()

            await asyncio.gather(*(one() for _ in range(8)))

    load: asyncio.Task[None] | None = None
    stopped = 0
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        # Ping phases far enough apart for the waiter's ping to time out well before the
        # holder's (0.3 s at least), with room to stop the holder in between: a restarted
        # worker gets a new phase.
        for _ in range(20):
            gap = (proxy.ready_at[0] - proxy.ready_at[1]) % period
            if 0.3 <= gap <= period - 0.5 or 0.3 <= period - gap <= period - 0.5:
                break
            old = proxy.workers[1]
            os.kill(old, signal.SIGKILL)
            await proxy.wait_for(lambda old=old: proxy.workers[1] != old, wait=60)
        else:
            raise AssertionError("no two ping phases apart")
        holder, waiter = (0, 1) if 0.3 <= gap <= period - 0.5 else (1, 0)
        gap = (proxy.ready_at[holder] - proxy.ready_at[waiter]) % period  # the waiter's ping first by this
        await _until_each_worker(proxy, "/small", 2, lambda r: r.status == 200)
        holder_pid, waiter_pid = proxy.workers[holder], proxy.workers[waiter]

        def may_stop() -> bool:
            # The holder answered its last ping (0.1 s since it went out), and the waiter's
            # next one is 0.2 s away at least (it blocks on the lock by then, at its next fill).
            since = (loop.time() - proxy.ready_at[holder]) % period
            return 0.1 <= since <= period - gap - 0.2

        load = asyncio.ensure_future(fills())
        await asyncio.sleep(1.0)
        await _stop_holding_ring_lock(holder_pid, may_stop)
        stopped = holder_pid
        t0 = loop.time()

        # The waiter serves again, as the same process, within worker_timeout + a ping interval.
        served_at = None
        while loop.time() - t0 < timeout + period + 6:
            with contextlib.suppress(Exception):
                r = await asyncio.wait_for(proxy.get("/small"), 0.5)
                if r.status == 200 and r.worker == str(waiter):
                    served_at = loop.time() - t0
                    break
            await asyncio.sleep(0.05)
        await proxy.wait_for(lambda: proxy.workers[holder] != holder_pid, wait=30)
        stopped = 0
        assert _state(holder_pid) == "gone"
        assert served_at is not None and served_at <= timeout + period + 1.0, (served_at, proxy.lines)
        assert proxy.workers[waiter] == waiter_pid, proxy.lines
        # The waiter's ping times out first, as timed above, and the supervisor finds the lock's
        # holder; on a loaded machine the stop can land late in the holder's own phase, and the
        # holder's ping times out first: killed as unresponsive, which frees the lock too. Either
        # way the holder goes, never the waiter (asserted above and below).
        rescued = f"worker {holder} (pid {holder_pid}) holds the ring lock worker {waiter} waits for"
        unresponsive = f"worker {holder} (pid {holder_pid}) unresponsive for"  # its line on standard output
        assert any(rescued in line or unresponsive in line for line in proxy.lines), proxy.lines
        assert not any(f"worker {waiter} (pid {waiter_pid}) unresponsive" in line for line in proxy.lines)
        done.set()
        await asyncio.wait_for(load, 30)
        await asyncio.sleep(timeout + period)  # the waiter's next pings: answered
        assert proxy.workers[waiter] == waiter_pid, proxy.lines
        seen = await _until_each_worker(proxy, "/small", 2, lambda r: r.status == 200 and r.body == b"small")
        assert sorted(seen) == ["0", "1"]
    finally:
        done.set()
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        if load is not None:
            load.cancel()
            with contextlib.suppress(BaseException):
                await load
        await proxy.stop(signal.SIGTERM)


async def test_workers_reload_at_once_not_one_after_the_other(
        origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker's reload is asked for at once: held in turn, a hung worker kept every worker
    after it on the old config for the call's 30 s. Both workers' reloads are held (the test
    hook) at the same time here before either is let go."""
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("CACHEGATE_RELOAD_HOLD", str(hold))
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, "via: before\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        assert proxy.process is not None
        write_config(str(tmp_path), origin.url, CACHE, "via: after\n")
        reply = asyncio.ensure_future(proxy.admin("POST", "/reload"))
        marker = hold / f"{proxy.process.pid}.held"
        await proxy.wait_for(marker.exists, wait=20)
        marker.unlink()
        workers = [hold / f"{proxy.workers[i]}.held" for i in (0, 1)]
        await proxy.wait_for(lambda: all(m.exists() for m in workers), wait=8)
        for m in workers:
            m.unlink()
        answer = await reply
        assert answer.status == 200, answer.body
    finally:
        assert await proxy.stop() == 0
