"""Python-level calls per request: the deterministic companion of scripts/bench (not a test: it
prints numbers). Run it through scripts/bench-calls.

Timings on a shared, noisy machine move by 10-30 % from one run to the next; the number of
Python-level calls a request makes does not (it moves by less than 1 % between runs). This
starts cachegate (and, with ``--before DIR``, another checkout beside it) with cProfile on in
each serving worker (a ``sitecustomize`` hook on the workers' PYTHONPATH,
``benchlib/calls_hook``: nothing in cachegate itself), drives each workload with wrk for a
warm-up and then a measured window, and prints per workload and system: requests, Python calls
per request, the profiler's µs per request (slowed by the profiler: compare systems with it,
never with scripts/bench), and the calls per request by module. Measured this way, a 1 KiB
pass-through was 342 calls on the code before the long-tail work and 388 after (+13 %), when
three timed pairs said 0.66, 0.98 and 0.87 ×.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "benchlib"))

from bench_procs import Fleet, System  # noqa: E402
from bench_report import parse_wrk  # noqa: E402

HOOK = HERE / "benchlib" / "calls_hook"
REPORT_LUA = HERE / "benchlib" / "report.lua"
ZIPF_LUA = HERE / "benchlib" / "zipf.lua"
WORKLOADS = {"hit-1k": "/obj/1k", "pass-1k": "/pass/1k", "fill": "/zipf/1024/", "zipf": "/zipf/",
             "keys-1k": "/obj/1k/k"}
KEYS = 100_000  # keys-1k's distinct keys, as scripts/bench's default
_ZIPF_KEYS: list[Path] = []  # the zipf workload's keys file, written once per run


def zipf_keys_file() -> Path:
    """scripts/bench's ``zipf`` keys (100,000 paths of mixed sizes, most popular first), in a file
    for zipf.lua."""
    if not _ZIPF_KEYS:
        from bench import zipf_paths  # scripts/benchlib/bench.py, only when a zipf run needs it

        fd, name = tempfile.mkstemp(prefix="cachegate-zipf-keys-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(zipf_paths(100_000)) + "\n")
        atexit.register(os.unlink, name)
        _ZIPF_KEYS.append(Path(name))
    return _ZIPF_KEYS[0]


def zipf_seed(run: str) -> int:
    """The request sequence of a run: the same for every system given the same run name, another
    one for every other name (``warm``, ``run``, ``p1``, ``p2``, ...), none of them scripts/bench's
    own two (its cold and warm phases: ``ZIPF_SEED`` and the next)."""
    from bench import ZIPF_SEED

    return ZIPF_SEED + 2 + zlib.crc32(run.encode()) % 1_000_000


def wrk_argv(system: System, workload: str, seconds: float, connections: int, run: str) -> list[str]:
    base = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    if workload == "fill":  # every request a key never asked before (zipf.lua's fill mode)
        return [*base, "-s", str(ZIPF_LUA), system.url("/"), "--", run, "fill",
                f"{WORKLOADS['fill']}{system.name}-{run}-"]
    if workload == "zipf":  # scripts/bench's long tail; the cache carries over from run to run
        from bench import ZIPF_EXPONENT

        return [*base, "-s", str(ZIPF_LUA), system.url("/"), "--", run, "zipf", str(zipf_keys_file()),
                str(zipf_seed(run)), str(ZIPF_EXPONENT)]
    if workload == "keys-1k":  # report.lua spreads the requests over the KEYS stored keys
        return [*base, "-s", str(REPORT_LUA), system.url("/"), "--", WORKLOADS[workload], str(KEYS)]
    return [*base, "-s", str(REPORT_LUA), system.url(WORKLOADS[workload])]


def prepare(system: System, workload: str) -> None:
    """A hit workload's objects are stored before anything is measured: hit-1k's one object,
    keys-1k's KEYS (asked once each, 64 at a time, as scripts/bench primes them)."""
    if workload == "hit-1k":
        for _ in range(2):  # the first fills, the second is a hit
            with urllib.request.urlopen(system.url(WORKLOADS[workload]), timeout=10) as r:
                r.read()
    elif workload == "keys-1k":
        import asyncio

        from bench import Workload, prime

        asyncio.run(prime(system, Workload(workload, WORKLOADS[workload], "hit", [], keys=KEYS)))


def module_of(filename: str, root: Path) -> str:
    """Where a profiled function lives: cachegate's own modules by path, the rest by package."""
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins" if filename.startswith("~") else "generated"
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    for base in (root, HERE.parent):
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return "stdlib: " + path.stem


def drive_wrk(system: System, workload: str, seconds: float, connections: int, run: str) -> int:
    """Load ``system`` with wrk for ``seconds``; the requests answered."""
    out = subprocess.run(wrk_argv(system, workload, seconds, connections, run),
                         capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(out.stdout, workload, system.name, 0).requests


Drive = Callable[[System, str, float, int, str], int]


def serving(system: System, timeout: float = 20.0) -> list[int]:
    """The system's serving workers, once all of them listen (the first answers before the
    others have started)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = system.worker_pids()
        if len(workers) >= system.workers or time.monotonic() > deadline:
            return workers
        time.sleep(0.05)


def window(system: System, workload: str, opts: argparse.Namespace, calls_dir: Path,
           root: Path, drive: Drive = drive_wrk) -> dict[str, Any]:
    """One measured window of ``workload`` on ``system``: its requests and calls."""
    prepare(system, workload)
    if opts.warmup > 0:
        drive(system, workload, opts.warmup, opts.connections, "warm")
    workers = serving(system)
    for pid in workers:
        (calls_dir / f"{pid}.prof").unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    requests = drive(system, workload, opts.duration, opts.connections, "run")
    for pid in workers:
        os.kill(pid, signal.SIGUSR2)
    files = [calls_dir / f"{pid}.prof" for pid in workers]
    deadline = time.monotonic() + 20
    while not all(f.exists() for f in files):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system.name}: no profile from workers {workers}")
        time.sleep(0.05)
    stats = pstats.Stats(*map(str, files))
    by_module: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    own_time: Counter[str] = Counter()
    calls = seconds = 0.0
    for (filename, line, name), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        calls += ncalls
        seconds += tottime
        module = module_of(filename, root)
        by_module[module] += ncalls
        function = name if module == "builtins" else f"{module}:{line} {name}"
        by_function[function] += ncalls
        own_time[function] += tottime
    n = max(requests, 1)
    return {"workload": workload, "system": system.name, "requests": requests,
            "calls_per_request": calls / n, "profiled_us_per_request": seconds / n * 1e6,
            "modules": {m: c / n for m, c in by_module.most_common()},
            "functions": {f: c / n for f, c in by_function.most_common(60)},
            "own_us": {f: t / n * 1e6 for f, t in own_time.most_common(60)}}


def workloads_of(ap: argparse.ArgumentParser, text: str) -> list[str]:
    """``--workloads a,b``: the names, each one of WORKLOADS (else the usage error)."""
    workloads = [w for w in text.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(unknown)}")
    return workloads


def report(results: list[dict[str, Any]], top: int, functions: int = 0) -> str:
    lines = ["| workload | system | requests | calls / request | µs / request (profiled) | / first system |",
             "|---|---|---|---|---|---|"]
    first: dict[str, float] = {}
    for r in results:
        base = first.setdefault(r["workload"], r["calls_per_request"])
        calls = r["calls_per_request"]
        lines.append(f"| {r['workload']} | {r['system']} | {r['requests']:,} | {calls:.0f} | "
                     f"{r['profiled_us_per_request']:.0f} | {calls / base:.2f} |")
    for r in results:
        lines.append(f"\n{r['workload']} {r['system']}: calls per request by module (top {top})")
        for module, calls in list(r["modules"].items())[:top]:
            lines.append(f"  {calls:7.1f}  {module}")
        if functions:
            lines.append(f"{r['workload']} {r['system']}: calls per request by function (top {functions})")
            for function, calls in list(r.get("functions", {}).items())[:functions]:
                lines.append(f"  {calls:7.1f}  {function}")
            lines.append(f"{r['workload']} {r['system']}: profiled µs per request in the function itself "
                         f"(top {functions})")
            for function, us in list(r.get("own_us", {}).items())[:functions]:
                lines.append(f"  {us:7.1f}  {function}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-calls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="hit-1k,pass-1k,fill", help=f"of {', '.join(WORKLOADS)}")
    ap.add_argument("--before", type=Path, help="another checkout, measured beside this one")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each measured window")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--top", type=int, default=8, help="modules listed per workload")
    ap.add_argument("--functions", type=int, default=0, help="functions listed per workload (up to 60)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "var" / "bench")
    opts = ap.parse_args(argv)
    workloads = workloads_of(ap, opts.workloads)
    if shutil.which("wrk") is None:
        print("wrk is not installed (scripts/bench installs it with apt-get)", file=sys.stderr)
        return 2
    calls_dir = Path(tempfile.mkdtemp(prefix="cachegate-calls-"))
    fleet = Fleet()
    fleet.env["CACHEGATE_CALLS_DIR"] = str(calls_dir)
    fleet.path = [str(HOOK)]
    results: list[dict[str, Any]] = []
    try:
        origin = fleet.start_app("origin-raw", "origin", 2)
        checkouts = [("cachegate", HERE.parent)]
        if opts.before is not None:
            checkouts.append(("cachegate-before", opts.before.resolve()))
        systems = [(fleet.start_cachegate(name, origin, opts.workers,
                                          root=None if root == HERE.parent else root), root)
                   for name, root in checkouts]
        for workload in workloads:
            for system, root in systems:
                results.append(window(system, workload, opts, calls_dir, root))
                calls = results[-1]["calls_per_request"]
                print(f"  {workload:8} {system.name:16} {calls:6.0f} calls/request", flush=True)
    finally:
        fleet.stop()
        shutil.rmtree(calls_dir, ignore_errors=True)
    print()
    print(report(results, opts.top, opts.functions))
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"calls-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
