"""scripts/bench works: its pieces compute the right thing, and one tiny real round runs clean.

Correctness only: nothing here looks at how fast anything is. The end-to-end test runs
the real command for one 1-second round (or, without wrk, starts, primes and checks every
system), then checks that every answer was what the workload claims and that nothing it
started is still running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "benchlib"
sys.path.insert(0, str(BENCH))

from bench_apps import etag_of, keyed_body, origin_response, route  # noqa: E402
from bench_procs import render  # noqa: E402
from bench_report import (  # noqa: E402
    TARGETS,
    Run,
    judge,
    miss_curve,
    parse_wrk,
    rss_verdict,
    summarise,
)

WRK_LINE = ('BENCH-RESULT {"requests": 30000, "duration_us": 2000000, "bytes": 1, "errors": {"connect": 0, '
            '"read": 0, "write": 0, "status": 2, "timeout": 0}, "latency_us": {"mean": 1.0, "p50": 1500, '
            '"p90": 2000, "p99": 4000, "max": 9000}}')


def test_the_url_space_names_kind_and_size() -> None:
    assert route("/obj/1k") == ("obj", 1024)
    assert route("/obj/100k/k17") == ("obj", 100 * 1024)
    assert route("/pass/1m?x=1") == ("pass", 1 << 20)
    assert route("/obj/2048") == ("obj", 2048)
    assert route("/other/1k") is None
    assert route("/obj/lots") is None
    assert route("/zipf/3000/17") == ("zipf", 3000)


def test_zipf_bodies_are_the_keys_own() -> None:
    one, other = keyed_body("/zipf/3000/1", 3000), keyed_body("/zipf/3000/2", 3000)
    assert len(one) == len(other) == 3000 and one != other
    assert one == keyed_body("/zipf/3000/1", 3000)  # the same bytes every time
    assert one.startswith(b"/zipf/3000/1\n")
    assert len(keyed_body("/zipf/4/1", 4)) == 4


def test_the_origin_gives_cacheable_objects_validators_and_nothing_else() -> None:
    def head(kind: str, size: int) -> str:
        return origin_response(kind, size, head_only=True)[0].decode()

    one_k = head("obj", 1024)
    assert one_k.startswith("HTTP/1.1 200 OK\r\n") and "Content-Length: 1024\r\n" in one_k
    assert f"ETag: {etag_of(1024)}\r\n" in one_k and "Last-Modified: " in one_k
    assert etag_of(1024).startswith('"') and etag_of(1024) != etag_of(100 * 1024)  # strong, per body
    for kind in ("pass", "zipf"):
        assert "ETag" not in head(kind, 1024) and "Last-Modified" not in head(kind, 1024)


def test_cond_1k_sends_the_objects_etag_and_accepts_only_a_304_from_the_cache() -> None:
    from bench import check_answer, describe, workloads, wrk_argv
    from bench_procs import System

    loads = {w.name: w for w in workloads(100)}
    cond, hit = loads["cond-1k"], loads["hit-1k"]
    assert (cond.path, cond.expect, cond.keys) == (hit.path, "not-modified", 0)  # hit-1k's object
    assert set(cond.systems) == {"cachegate", "nginx-2w", "varnish"}
    opts = argparse.Namespace(duration=1.0, threads=1, connections=8)
    system = System(name="cachegate", kind="cachegate", workers=2, port=8080)
    argv = wrk_argv(system, cond, opts)  # type: ignore[arg-type]
    assert argv[argv.index("-H") + 1] == f"If-None-Match: {etag_of(1024)}"
    assert argv[-1] == "http://127.0.0.1:8080/obj/1k"
    assert "-H" not in wrk_argv(system, hit, opts)  # type: ignore[arg-type]

    def check(kind: str, status: int, length: int, cache: str = "HIT", expect: str = "not-modified",
              ids: str = "5 3") -> str | None:
        headers = {"x-cache-status": cache, "x-varnish": ids}
        return check_answer(System(name=kind, kind=kind, workers=1, port=1), expect, "/obj/1k", status,
                            headers, length)

    for kind in ("cachegate", "nginx", "varnish"):
        assert check(kind, 304, 0) is None
        assert "the condition ignored" in (check(kind, 200, 1024) or "")
        assert "304 with 1024 body bytes" in (check(kind, 304, 1024) or "")
        assert "not a hit" in (check(kind, 304, 0, cache="MISS") or "")  # asked the origin
        assert check(kind, 200, 1024, expect="hit") is None
        assert "status 304" in (check(kind, 304, 0, expect="hit") or "")  # only cond-1k takes a 304
    assert "X-Varnish" in (check("varnish", 304, 0, ids="7") or "")  # a fetch, then the 304
    assert describe("cachegate", {"x-cache-status": "HIT"}, 304) == "304 HIT"
    assert describe("nginx", {"x-cache-status": "HIT"}) == "HIT"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cond_1k_check_passes_cachegate_and_fails_what_ignores_the_condition() -> None:
    """Real processes: cachegate answers the primed object's conditional with a 304 hit, and
    still answers hit-1k with 200 hits now that the object carries validators; the origin,
    which ignores conditions, fails the cond-1k check."""
    import asyncio

    from bench import _check, prime, workloads
    from bench_procs import Fleet

    loads = {w.name: w for w in workloads(100)}
    fleet = Fleet()
    try:
        origin = fleet.start_app("origin-raw", "origin", 1)
        cachegate = fleet.start_cachegate("cachegate", origin, 1)
        asyncio.run(prime(cachegate, loads["cond-1k"]))
        report = asyncio.run(_check(cachegate, loads["cond-1k"]))
        assert report["problems"] == [] and report["says"] == "304 HIT"
        report = asyncio.run(_check(cachegate, loads["hit-1k"]))
        assert report["problems"] == [] and report["says"] == "HIT"
        report = asyncio.run(_check(origin, loads["cond-1k"]))
        problems = report["problems"]
        assert isinstance(problems, list) and len(problems) == 8
        assert "status 200 (the condition ignored), expected 304" in problems[0]
    finally:
        fleet.stop()


def test_hit_ratio_is_compared_over_the_same_requests() -> None:
    # Misses are the request numbers (from 1) that reached the origin, counted per step.
    assert miss_curve([1, 2, 3, 1500, 2999], sent=3000, step=1000) == (3, 4, 5)
    assert miss_curve([3001], sent=3500, step=1000) == (0, 0, 0)  # past the last full step

    def run(system: str, sent: int, misses: tuple[int, ...]) -> Run:
        return Run("zipf-cold", system, 0, sent / 10, 1.0, 2.0, sent, sent=sent, step=1000,
                   distinct_curve=(500, 800, 1000, 1100)[:sent // 1000], miss_curve=misses,
                   misses=misses[-1], seconds=10.0)

    # The slow system sent 2,000 requests, the fast one 4,000: both are judged over the first 2,000.
    summaries = summarise([run("cachegate", 2000, (500, 800)), run("nginx-2w", 4000, (600, 900, 1100, 1200))])
    assert summaries[("zipf-cold", "cachegate")].hit_ratio == 1 - 800 / 2000
    assert summaries[("zipf-cold", "nginx-2w")].hit_ratio == 1 - 900 / 2000
    assert summaries[("zipf-cold", "nginx-2w")].ideal_hit_ratio == 1 - 800 / 2000
    assert summaries[("zipf-cold", "nginx-2w")].fills_per_s == 120.0
    verdict = next(v for v in judge(summaries, workers=2) if "hit ratio" in v.label)
    assert verdict.result == "PASS" and verdict.value is not None and verdict.value > 1


def test_wrk_result_line_becomes_a_run() -> None:
    run = parse_wrk("Running 2s test\n" + WRK_LINE + "\n", "hit-1k", "cachegate", 0)
    assert run.rps == 15000
    assert (run.p50_ms, run.p99_ms) == (1.5, 4.0)
    assert not run.clean  # two non-2xx answers
    with pytest.raises(ValueError, match="BENCH-RESULT"):
        parse_wrk("wrk crashed", "hit-1k", "cachegate", 0)


def test_targets_are_ratios_of_medians_with_pass_and_fail() -> None:
    runs = [Run("hit-1k", "cachegate", r, rps, 1.0, p99, 1) for r, rps, p99 in
            ((0, 900, 3.0), (1, 1000, 5.0), (2, 5000, 4.0))]
    runs += [Run("hit-1k", "ceiling-2p", r, 1000, 1.0, 2.0, 1) for r in range(3)]
    runs += [Run("hit-1k", "varnish", r, 2000, 1.0, 1.0, 1) for r in range(3)]
    summaries = summarise(runs)
    assert summaries[("hit-1k", "cachegate")].rps == 1000  # the median, not the mean
    verdicts = {v.label: v for v in judge(summaries, workers=2)}
    ceiling = verdicts["1 KiB memory hit / aiohttp ceiling (same workers)"]
    assert (ceiling.value, ceiling.result) == (1.0, "PASS")
    varnish = verdicts["1 KiB hit / Varnish"]
    assert (varnish.value, varnish.result) == (0.5, "FAIL")
    p99 = verdicts["p99 of 1 KiB hits / aiohttp ceiling's p99"]
    assert (p99.value, p99.result) == (2.0, "PASS")  # median p99 4.0 ms vs 2.0 ms, bound <= 2
    assert verdicts["100 KiB hit / Varnish"].result == "n/a"  # not measured: no verdict
    assert verdicts["conditional 1 KiB hit (304) / Varnish"].result == "n/a"
    assert verdicts["fill: CPU µs per fill"].result == "n/a"
    assert len(verdicts) == len(TARGETS)
    assert rss_verdict(300 << 20, 256 << 20, 100_000).result == "PASS"
    assert rss_verdict(400 << 20, 256 << 20, 100_000).result == "FAIL"


def test_the_conditional_hit_is_judged_against_varnish_304s() -> None:
    runs = [Run("cond-1k", "cachegate", r, rps, 1.0, 2.0, 1) for r, rps in ((0, 800), (1, 900), (2, 700))]
    runs += [Run("cond-1k", "varnish", r, 1000, 1.0, 2.0, 1) for r in range(3)]
    runs += [Run("hit-1k", "varnish", r, 5000, 1.0, 2.0, 1) for r in range(3)]  # not its denominator
    verdicts = {v.label: v for v in judge(summarise(runs), workers=2)}
    cond = verdicts["conditional 1 KiB hit (304) / Varnish"]
    assert (cond.value, cond.op, cond.bound, cond.result) == (0.8, ">=", 0.75, "PASS")
    assert cond.detail == "800 / 1,000 req/s"
    assert verdicts["1 KiB hit / Varnish"].result == "n/a"  # no cachegate hit-1k run


def test_config_templates_fill_every_placeholder(tmp_path: Path) -> None:
    nginx = render(BENCH / "nginx.conf.in", USER="", WORKERS="2", DIR=str(tmp_path), ORIGIN_PORT="1",
                   PORT="2")
    assert "listen 127.0.0.1:2" in nginx and "server 127.0.0.1:1;" in nginx
    assert '"1"' in render(BENCH / "varnish.vcl.in", ORIGIN_PORT="1")
    with pytest.raises(ValueError, match="ORIGIN_PORT"):
        render(BENCH / "varnish.vcl.in")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_tiny_round_runs_clean_and_leaves_nothing_running(tmp_path: Path) -> None:
    has_wrk = shutil.which("wrk") is not None
    argv = [sys.executable, str(BENCH / "bench.py"), "--only", "hit-1k,cond-1k,pass-1k,zipf", "--rounds", "1",
            "--duration", "1", "--skip", "nginx-1w,ceiling-2p,passthrough-2p", "--out", str(tmp_path),
            "--workers", "1",  # 1 worker: its admin /metrics show which tier every body came from
            "--zipf-keys", "300", "--zipf-duration", "1"]
    if not has_wrk:
        argv.append("--no-wrk")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=ROOT,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())

    checks = results["checks"]
    assert "hit-1k/cachegate" in checks and "pass-1k/cachegate" in checks
    for name, check in checks.items():
        assert check["problems"] == [], name
    assert checks["hit-1k/cachegate"]["says"] == "HIT"
    assert checks["hit-1k/cachegate"]["tier_bytes"]["memory"] > 0
    assert checks["pass-1k/cachegate"]["says"] != "HIT"
    assert checks["hit-1k/cachegate-log"]["says"] == "HIT"
    assert checks["hit-1k/cachegate-log"]["access_log_lines"] > 0  # the log variant logs
    assert checks["cond-1k/cachegate"]["says"] == "304 HIT"
    assert checks["cond-1k/cachegate"]["tier_bytes"]["upstream"] == 0
    if shutil.which("varnishd"):
        assert checks["hit-1k/varnish"]["says"].startswith("HIT")
        assert checks["cond-1k/varnish"]["says"].startswith("304 HIT")
    if shutil.which("nginx"):
        assert checks["hit-1k/nginx-2w"]["says"] == "HIT"
        assert checks["cond-1k/nginx-2w"]["says"] == "304 HIT"

    if has_wrk:
        measured = {(r["workload"], r["system"]) for r in results["runs"]}
        assert {("hit-1k", "cachegate"), ("hit-1k", "cachegate-log"), ("hit-1k", "ceiling-1p"),
                ("cond-1k", "cachegate"), ("pass-1k", "cachegate"), ("pass-1k", "passthrough-1p")} <= measured
        for r in results["runs"]:
            assert r["requests"] > 0 and not any(r["errors"].values()), r
        assert "| target" in out.stdout and "1 KiB memory hit / aiohttp ceiling" in out.stdout
        zipf = {r["workload"]: r for r in results["runs"] if r["system"] == "cachegate"
                and r["workload"].startswith("zipf")}
        assert set(zipf) == {"zipf-cold", "zipf-warm"}
        # Every request of the cold phase was new to an empty cache or a hit; misses <= requests.
        assert 0 < zipf["zipf-cold"]["misses"] <= zipf["zipf-cold"]["sent"]
        assert checks["zipf/cachegate/round1"]["problems"] == []

    for name, pids in results["pids"].items():
        for pid in pids:
            assert not _running(pid), f"{name} (pid {pid}) is still running"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent (not us) reaps it


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_calls_per_request_are_counted_in_each_serving_worker(tmp_path: Path) -> None:
    """scripts/bench-calls' pieces end to end, driven by plain requests instead of wrk: the hook
    profiles the serving workers only when asked, a window counts a pass-through's and a fill's
    calls by module, and everything it started is stopped."""
    import argparse
    import urllib.request

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_calls
    from bench_procs import Fleet, System

    sent: dict[str, int] = {}

    def drive(system: System, workload: str, seconds: float, connections: int, run: str) -> int:
        for i in range(20):
            path = bench_calls.WORKLOADS[workload] + (f"{run}-{i}" if workload == "fill" else "")
            with urllib.request.urlopen(system.url(path), timeout=10) as r:
                r.read()
        sent[workload] = sent.get(workload, 0) + 20
        return 20

    calls_dir = tmp_path / "calls"
    calls_dir.mkdir()
    fleet = Fleet()
    fleet.env["CACHEGATE_CALLS_DIR"] = str(calls_dir)
    fleet.path = [str(bench_calls.HOOK)]
    opts = argparse.Namespace(warmup=1.0, duration=1.0, connections=1)
    try:
        origin = fleet.start_app("origin-raw", "origin", 1)
        system = fleet.start_cachegate("cachegate", origin, 2)
        pids = system.all_pids()
        results = [bench_calls.window(system, w, opts, calls_dir, ROOT, drive) for w in ("pass-1k", "fill")]
    finally:
        fleet.stop()
    assert sent == {"pass-1k": 40, "fill": 40}  # warm-up and window each
    by = {r["workload"]: r for r in results}
    assert 100 < by["pass-1k"]["calls_per_request"] < by["fill"]["calls_per_request"] < 5000
    assert "proxy/flight.py" in by["fill"]["modules"] and "aiohttp" in by["pass-1k"]["modules"]
    # By function too: calls and the profiled time spent in the function itself, per request.
    fill = by["fill"]
    assert any(f.startswith("proxy/flight.py:") for f in fill["functions"])
    assert sum(fill["functions"].values()) <= fill["calls_per_request"] + 1e-6
    assert 0 < sum(fill["own_us"].values()) <= fill["profiled_us_per_request"] + 1e-6
    table = bench_calls.report(results, 3, functions=5)
    assert "fill cachegate: calls per request by function (top 5)" in table
    assert "profiled µs per request in the function itself (top 5)" in table
    assert len(list(calls_dir.glob("*.prof"))) == 2  # one window from each serving worker
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    # Any other process (a supervisor, the origin) loads the hook but does not profile: its
    # signals keep their default meaning.
    other = subprocess.run([sys.executable, "-c", "import signal, sys; "
                            "print(signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL, 'sitecustomize' in sys.modules)"],
                           capture_output=True, text=True, timeout=30, check=True,
                           env=dict(os.environ, CACHEGATE_CALLS_DIR=str(calls_dir),
                                    PYTHONPATH=str(bench_calls.HOOK)))
    assert other.stdout.split() == ["True", "True"]


def test_a_zipf_run_gives_every_system_the_same_sequence_and_the_next_run_another() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_calls
    from bench_procs import System

    def argv(name: str, run: str) -> list[str]:
        system = System(name=name, kind="cachegate", workers=2, port=8080)
        return bench_calls.wrk_argv(system, "zipf", 3.0, 64, run)

    a, b, later = argv("before", "p1"), argv("this", "p1"), argv("before", "p2")
    assert a[a.index("--") + 1:] == b[b.index("--") + 1:]  # the same keys, seed and exponent
    assert a[-2] != later[-2]  # another seed for the next pair
    seeds = {bench_calls.zipf_seed(run) for run in ("warm", "run", "p0", "p1", "p2", "p10")}
    assert len(seeds) == 6  # a measured window never replays its warm-up's sequence
    keys = Path(a[a.index("zipf") + 1]).read_text().split()
    assert len(keys) == 100_000 and keys[0].startswith("/zipf/")  # scripts/bench's own keys


def test_keys_1k_asks_the_keys_it_primed_as_scripts_bench_does() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_calls
    from bench import workloads
    from bench_procs import System

    argv = bench_calls.wrk_argv(System(name="this", kind="cachegate", workers=2, port=8080), "keys-1k",
                                3.0, 64, "p1")
    ours = next(w for w in workloads(bench_calls.KEYS) if w.name == "keys-1k")
    assert argv[argv.index("--") + 1:] == [ours.path, str(ours.keys)]  # report.lua's prefix and count
    assert argv[argv.index("-s") + 1].endswith("report.lua")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_pair_alternates_two_running_systems_and_takes_the_median_of_the_pairs_ratios() -> None:
    """scripts/bench-pair's pieces end to end, driven by plain requests instead of wrk: both
    systems run at once, the first of each pair alternates, each run counts the CPU of the
    system's processes, and the ratios are per pair."""
    import argparse
    import urllib.request

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_pair
    from bench_procs import Fleet, System

    order: list[str] = []

    def drive(system: System, workload: str, seconds: float, connections: int, run: str
              ) -> tuple[int, float, float | None]:
        order.append(system.name)
        n = 30 if system.name == "this" else 20  # "this" answers 1.5 times as many
        for _ in range(n):
            with urllib.request.urlopen(system.url(bench_pair.WORKLOADS[workload]), timeout=10) as r:
                r.read()
        return n, 1.0, 8.0 if system.name == "this" else 10.0  # and its p99 is 0.8 times

    asked: list[list[int]] = []
    real_cpu = bench_pair.cpu_seconds

    def cpu_seconds(pids: list[int]) -> float:
        asked.append(sorted(pids))
        return real_cpu(pids)

    fleet = Fleet()
    try:
        origin = fleet.start_app("origin-raw", "origin", 1)
        a = fleet.start_cachegate("before", origin, 1, root=ROOT)
        b = fleet.start_cachegate("this", origin, 1)
        pids = {"before": sorted(a.all_pids()), "this": sorted(b.all_pids())}
        opts = argparse.Namespace(pairs=3, seconds=1.0, connections=1)
        bench_pair.cpu_seconds = cpu_seconds  # type: ignore[assignment]
        try:
            runs = bench_pair.pairs(a, b, "pass-1k", opts, drive)
        finally:
            bench_pair.cpu_seconds = real_cpu
    finally:
        fleet.stop()
    assert order == ["before", "this", "this", "before", "before", "this"]
    # Each run counts the CPU of its own system's processes, before and after.
    assert asked == [pids[name] for name in order for _ in range(2)]
    assert pids["before"] != pids["this"]
    result = bench_pair.summary("pass-1k", "before", "this", runs)
    assert result["rps_ratios"] == [1.5, 1.5, 1.5] and result["rps_ratio"] == 1.5
    assert result["p99_ratios"] == [0.8, 0.8, 0.8] and result["p99_ratio"] == 0.8
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids["before"] + pids["this"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_storage_runs_every_part_against_the_store_of_today() -> None:
    """scripts/bench-storage calls the store's own methods, which move when the store is
    reorganised: a few keys of each part (memory, disk, purge) run for real and print the table."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_storage.py"), "--smoke",
                          "--purge-entries", "2000"],
                         capture_output=True, text=True, timeout=110, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| tier | size | op | median | p50 | p99 | baseline (median) | ratio |" in out.stdout
    for tier, ops, baseline in (("memory", ("get", "put"), "x dict"),
                                ("disk", ("get", "put", "put-batch"), "x diskcache")):
        for size in ("1KB", "100KB", "1MB"):
            for op in ops:
                row = next((line for line in out.stdout.splitlines()
                            if line.startswith(f"| {tier} | {size} | {op} |")), None)
                assert row is not None and row.endswith(f"{baseline} |"), (tier, size, op, out.stdout)
    assert "purge tag 'hot' (200 entries): median" in out.stdout
    assert "eager deletion instead:" in out.stdout
