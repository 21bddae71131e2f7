"""Two checkouts side by side, one workload, short wrk runs alternated: the ratio of a small
change that scripts/bench's rounds cannot see. Run it through scripts/bench-pair.

On this shared machine the speed of the same code moves by 10-40 % within minutes (other
tenants), so two systems measured one after the other, minutes apart, differ by the machine's
drift as much as by their code: three hand-timed pairs of a pass-through said 0.66, 0.98 and
0.87 x. Here both systems run at the same time from start to end, each measured run lasts a
few seconds, the two alternate (A B, B A, A B, ...: neither always goes first), and the result
is the median of the per-pair ratios, which a drift slower than a pair cannot skew. Its own
spread, measured: three runs of 10-12 pairs of the same two checkouts within 25 minutes gave
1.01, 0.89 and 0.97 (docs/performance.md): read a ratio within about 6 % of 1 as no change.
``zipf`` is scripts/bench's long tail started empty and continued pair after pair, each pair
with a request sequence of its own that both systems get (``bench_calls.zipf_seed``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "benchlib"))

from bench_calls import WORKLOADS, prepare, serving, workloads_of, wrk_argv  # noqa: E402
from bench_procs import Fleet, System, cpu_seconds  # noqa: E402
from bench_report import parse_wrk  # noqa: E402

# One timed run of a workload on a system: (requests answered, seconds it lasted, p99 latency
# in ms or None when the driver does not measure it).
Drive = Callable[[System, str, float, int, str], tuple[int, float, float | None]]


def drive_wrk(system: System, workload: str, seconds: float, connections: int, run: str
              ) -> tuple[int, float, float | None]:
    """One wrk run; a run with errors (timeouts, non-2xx/3xx answers) is refused: its rate would
    count failures as throughput."""
    out = subprocess.run(wrk_argv(system, workload, seconds, connections, run),
                         capture_output=True, text=True, check=True, timeout=seconds + 60)
    result = parse_wrk(out.stdout, workload, system.name, 0)
    if not result.clean or not result.requests:
        raise RuntimeError(f"{system.name} {workload}: a run with errors {result.errors}, "
                           f"{result.requests} requests\n{system.log_tail()}")
    return result.requests, result.seconds or seconds, result.p99_ms


def measure(system: System, workload: str, seconds: float, connections: int, run: str,
            drive: Drive) -> dict[str, float]:
    """One run: req/s, CPU per request of all the system's processes (its supervisor's
    write-behind included), and wrk's p99 (ms; -1 when the driver has none)."""
    pids = system.all_pids()
    before = cpu_seconds(pids)
    requests, lasted, p99 = drive(system, workload, seconds, connections, run)
    cpu = cpu_seconds(pids) - before
    n = max(requests, 1)
    return {"rps": requests / lasted, "cpu_us": cpu / n * 1e6, "p99_ms": -1.0 if p99 is None else p99}


def pairs(a: System, b: System, workload: str, opts: argparse.Namespace, drive: Drive = drive_wrk
          ) -> list[dict[str, dict[str, float]]]:
    """``opts.pairs`` pairs of runs, the order alternating from pair to pair."""
    out = []
    for i in range(opts.pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        got = {s.name: measure(s, workload, opts.seconds, opts.connections, f"p{i}", drive) for s in order}
        out.append(got)
        ra, rb = got[a.name], got[b.name]
        ratio = f"{rb['rps'] / ra['rps']:.2f}" if ra["rps"] else "-"
        print(f"  {workload:8} pair {i + 1:2}: {a.name} {ra['rps']:9.0f} req/s {ra['cpu_us']:6.1f} µs "
              f"p99 {ra['p99_ms']:6.1f} ms   {b.name} {rb['rps']:9.0f} req/s {rb['cpu_us']:6.1f} µs "
              f"p99 {rb['p99_ms']:6.1f} ms   ratio {ratio}", flush=True)
    return out


def summary(workload: str, a: str, b: str, runs: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    rps = [r[b]["rps"] / r[a]["rps"] for r in runs if r[a]["rps"] > 0]
    cpu = [r[b]["cpu_us"] / r[a]["cpu_us"] for r in runs if r[a]["cpu_us"] > 0]
    p99 = [r[b]["p99_ms"] / r[a]["p99_ms"] for r in runs if r[a]["p99_ms"] > 0 and r[b]["p99_ms"] >= 0]
    return {"workload": workload, "a": a, "b": b, "pairs": len(runs),
            "rps_ratios": [round(x, 3) for x in rps], "cpu_ratios": [round(x, 3) for x in cpu],
            "p99_ratios": [round(x, 3) for x in p99],
            "rps_ratio": statistics.median(rps) if rps else None,
            "cpu_ratio": statistics.median(cpu) if cpu else None,
            "p99_ratio": statistics.median(p99) if p99 else None,
            "a_rps": statistics.median(r[a]["rps"] for r in runs),
            "b_rps": statistics.median(r[b]["rps"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-pair", description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path, help="the other checkout (A); this one is B")
    ap.add_argument("--workloads", default="pass-1k", help=f"of {', '.join(WORKLOADS)}")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of each run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE.parent / "var" / "bench")
    opts = ap.parse_args(argv)
    workloads = workloads_of(ap, opts.workloads)
    if not (opts.before / "proxy").is_dir():
        ap.error(f"{opts.before} is not a cachegate checkout")
    if shutil.which("wrk") is None:
        print("wrk is not installed (scripts/bench installs it with apt-get)", file=sys.stderr)
        return 2
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"pair-{time.strftime('%Y%m%d-%H%M%S')}.json"  # written as each workload ends
    fleet = Fleet()
    results: list[dict[str, Any]] = []
    try:
        origin = fleet.start_app("origin-raw", "origin", 2)
        a = fleet.start_cachegate("before", origin, opts.workers, root=opts.before.resolve())
        b = fleet.start_cachegate("this", origin, opts.workers)
        for system in (a, b):
            serving(system)
        for workload in workloads:
            for system in (a, b):
                prepare(system, workload)
                drive_wrk(system, workload, 1.0, opts.connections, "warm")
            results.append(summary(workload, a.name, b.name, pairs(a, b, workload, opts)))
            path.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    finally:
        fleet.stop()
    print()
    print("| workload | pairs | before req/s | this req/s | this / before, req/s (median of pairs) "
          "| CPU per request (median of pairs) | p99 (median of pairs) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        spread = f" ({min(r['rps_ratios']):.2f}–{max(r['rps_ratios']):.2f})" if r["rps_ratios"] else ""
        rps = "-" if r["rps_ratio"] is None else f"**{r['rps_ratio']:.3f}**{spread}"
        cpu = "-" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.3f}"
        p99 = "-" if r["p99_ratio"] is None else f"{r['p99_ratio']:.3f}"
        print(f"| {r['workload']} | {r['pairs']} | {r['a_rps']:,.0f} | {r['b_rps']:,.0f} | {rps} | {cpu} "
              f"| {p99} |")
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
