"""scripts/bench: cachegate side by side with aiohttp's ceiling, a toy aiohttp proxy, nginx and Varnish.

One run starts an origin, cachegate (``cachegate run`` with a generated config), the bare
aiohttp ceiling app (1 and 2 processes), the bare aiohttp pass-through proxy (1 and 2
processes) and, when they are on the PATH, nginx proxy_cache (1 and 2 workers) and Varnish,
all on free loopback ports in a temporary directory. It primes each system, checks that
the answers are what the workload claims (hits are hits, passes reach the origin), drives
each with ``wrk -t1 -c64`` for the same duration, system after system within a round and
in a rotated order each round, and prints the medians and the issue's ratios with
PASS/FAIL. Raw results go to ``var/bench/*.json``.

The long-tail workloads (``zipf``, ``fill``) start cachegate, nginx and Varnish empty in every
round instead: ``zipf`` asks for 100,000 keys of mixed sizes with Zipf 0.9 popularity, a cold
phase then a warm one, and checks a sample of bodies byte for byte afterwards; ``fill`` asks
for distinct keys, each once. Each request carries its number (``zipf.lua``), the origin
records the numbers that reach it, and so every system's hit ratio is taken over the same
first requests. Caches live in the temporary directory (``TMPDIR``).

Absolute numbers drift on a shared machine; the ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_apps import etag_of, keyed_body, read_records, route
from bench_procs import CACHEGATE_MEMORY, HERE, ROOT, Fleet, System, cpu_seconds, pss_bytes, rss_bytes
from bench_report import (
    Run,
    format_results,
    format_tail,
    format_verdicts,
    judge,
    miss_curve,
    parse_wrk,
    rss_verdict,
    summarise,
)

REPORT_LUA = HERE / "report.lua"
ZIPF_LUA = HERE / "zipf.lua"
ZIPF_EXPONENT = 0.9
ZIPF_SEED = 1127  # the cold phase's sequence; the warm phase's is the next seed


@dataclass
class Workload:
    name: str
    path: str  # a URL path, or the prefix of ``keys`` distinct paths
    # "hit": every answer from the cache; "pass": every answer from the origin;
    # "not-modified": every answer a 304 from the cache (a client's conditional on a fresh entry)
    expect: str
    systems: list[str]
    keys: int = 0
    about: str = ""
    # Fresh workloads (zipf, fill) start every system empty in every round and run these wrk
    # phases one after the other on it (zipf.lua), instead of priming a shared one.
    phases: tuple[str, ...] = ()
    # Request fields wrk and the check send on every request (priming asks without them).
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def fresh(self) -> bool:
        return bool(self.phases)

    def sample_paths(self, n: int) -> list[str]:
        if not self.keys:
            return [self.path]
        return [f"{self.path}{i}" for i in random.sample(range(self.keys), min(n, self.keys))]


def workloads(keys: int, zipf_keys: int = 100_000, before: bool = False) -> list[Workload]:
    """The benchmark's workloads; ``{w}`` in a system name = cachegate's worker count. With
    ``before``, every workload cachegate runs also runs ``cachegate-before`` (``--before``)."""
    loads = _workloads(keys, zipf_keys)
    if before:
        for w in loads:
            if "cachegate" in w.systems:
                w.systems.insert(w.systems.index("cachegate") + 1, "cachegate-before")
    return loads


def _workloads(keys: int, zipf_keys: int) -> list[Workload]:
    return [
        Workload("hit-1k", "/obj/1k", "hit",
                 ["cachegate", "cachegate-log", "ceiling-1p", "ceiling-2p", "origin-raw", "nginx-1w",
                  "nginx-2w", "varnish"],
                 about="one 1 KiB object, memory-tier hit (cachegate-log: with the JSON access log on)"),
        Workload("cond-1k", "/obj/1k", "not-modified", ["cachegate", "nginx-2w", "varnish"],
                 headers=(("If-None-Match", etag_of(1024)),),
                 about="one 1 KiB object, primed, every request If-None-Match its ETag: a 304 from the "
                       "cache, no body, the origin not asked (a browser's or a CDN's revalidation)"),
        Workload("hit-100k", "/obj/100k", "hit", ["cachegate", "ceiling-{w}p", "nginx-2w", "varnish"],
                 about="one 100 KiB object, memory-tier hit"),
        Workload("hit-1m", "/obj/1m", "hit", ["cachegate", "ceiling-{w}p", "nginx-2w", "varnish"],
                 about="one 1 MiB object, memory-tier hit"),
        Workload("disk-100k", "/obj/100k", "hit", ["cachegate-disk"],
                 about="one 100 KiB object, disk-tier hit (memory_max_object 64KB)"),
        Workload("pass-1k", "/pass/1k", "pass",
                 ["cachegate", "passthrough-1p", "passthrough-2p", "nginx-2w", "varnish"],
                 about="1 KiB Cache-Control: private, forwarded every time (keep-alive upstream)"),
        Workload("keys-1k", "/obj/1k/k", "hit", ["cachegate", "nginx-2w", "varnish"], keys=keys,
                 about=f"{keys} distinct cached 1 KiB keys at random (RSS measured)"),
        Workload("zipf", "/zipf/", "mixed", ["cachegate", "nginx-2w", "varnish"], keys=zipf_keys,
                 phases=("cold", "warm"),
                 about=f"{zipf_keys} keys, popularity Zipf {ZIPF_EXPONENT}, bodies 70% 1-4 KiB / 28% "
                       "8-32 KiB / 2% 128-256 KiB, every system started empty: a cold phase, then a "
                       "warm one; a sample of bodies checked byte for byte afterwards"),
        Workload("fill", "/zipf/1024/f", "miss", ["cachegate", "nginx-2w", "varnish"], phases=("fill",),
                 about="distinct 1 KiB keys, each asked once, from empty (cache fills)"),
    ]


def zipf_sizes(keys: int, seed: int = 20261127) -> list[int]:
    """The body size of each zipf key, by popularity rank: 70 % 1-4 KiB, 28 % 8-32 KiB,
    2 % 128-256 KiB, drawn from a fixed seed (the same keys in every run)."""
    rng = random.Random(seed)
    out = []
    for _ in range(keys):
        r = rng.random()
        if r < 0.70:
            out.append(rng.randint(1024, 4096))
        elif r < 0.98:
            out.append(rng.randint(8192, 32768))
        else:
            out.append(rng.randint(128 * 1024, 256 * 1024))
    return out


def zipf_paths(keys: int) -> list[str]:
    return [f"/zipf/{size}/{rank}" for rank, size in enumerate(zipf_sizes(keys))]


# -- machine ---------------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("aiohttp", "uvloop", "multidict", "yarl"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    for tool, flag in (("wrk", "-v"), ("nginx", "-v"), ("varnishd", "-V")):
        exe = shutil.which(tool)
        if exe:
            with contextlib.suppress(Exception):
                out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
                versions[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "versions": versions,
            "load": load()}


def load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


# -- priming and checking -------------------------------------------------------------------------


class CheckFailed(RuntimeError):
    pass


def describe(kind: str, headers: dict[str, str], status: int = 200) -> str:
    """What the cache says it did, from the headers each system uses (a status other than
    200 in front: ``304 HIT``)."""
    code = "" if status == 200 else f"{status} "
    if kind in ("cachegate", "nginx", "varnish"):
        said = headers.get("x-cache-status", "?")
        if kind == "varnish":
            ids = headers.get("x-varnish", "").split()
            said += f" (X-Varnish ids: {len(ids)}, Age: {headers.get('age', '?')})"
        return code + said
    return code + ("origin-less" if kind == "ceiling" else "forwarded")


def check_answer(system: System, expect: str, path: str, status: int, headers: dict[str, str],
                 length: int) -> str | None:
    """None when the answer is what the workload claims; else why not."""
    found = route(path)
    assert found is not None
    if expect == "not-modified":  # the client's If-None-Match matched: 304, no body
        if status != 304:
            why = " (the condition ignored)" if status == 200 else ""
            return f"{system.name} {path}: status {status}{why}, expected 304"
        if length:
            return f"{system.name} {path}: a 304 with {length} body bytes"
    elif status != 200:
        return f"{system.name} {path}: status {status}"
    elif length != found[1]:
        return f"{system.name} {path}: {length} body bytes, expected {found[1]}"
    kind = system.kind
    cache_status = headers.get("x-cache-status", "")
    if expect in ("hit", "not-modified") and kind in ("cachegate", "nginx", "varnish"):
        if cache_status != "HIT":
            return f"{system.name} {path}: not a hit (X-Cache-Status: {cache_status or 'absent'})"
        if kind == "varnish" and len(headers.get("x-varnish", "").split()) != 2:
            return f"{system.name} {path}: Varnish did not answer from cache (X-Varnish)"
    if expect == "pass" and kind in ("cachegate", "nginx", "varnish") and cache_status == "HIT":
        return f"{system.name} {path}: answered from cache, but the workload is a pass"
    return None


async def _session_get(concurrency: int, fresh_connections: bool = False) -> tuple[object, object]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=fresh_connections)
    session = aiohttp.ClientSession(connector=connector,
                                    timeout=aiohttp.ClientTimeout(total=60), auto_decompress=False)

    async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], int]:
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, len(body)

    return session, get


async def prime(system: System, workload: Workload, concurrency: int = 64) -> float:
    """Ask for every key once (concurrently); the seconds it took."""
    session, get = await _session_get(concurrency)
    started = time.monotonic()
    try:
        if workload.keys:
            todo = iter(range(workload.keys))

            async def filler() -> None:
                for i in todo:
                    await get(system.url(f"{workload.path}{i}"))  # type: ignore[operator]

            await asyncio.gather(*(filler() for _ in range(concurrency)))
        else:
            await get(system.url(workload.path))  # type: ignore[operator]
    finally:
        await session.close()  # type: ignore[attr-defined]
    return time.monotonic() - started


async def _check(system: System, workload: Workload, samples: int = 200) -> dict[str, object]:
    """A sample of the keys, each asked several times: every answer must be what the workload claims.

    Each request on a new connection, so that with several workers (SO_REUSEPORT spreads
    connections) every worker is asked, not only the one that was primed.
    """
    session, get = await _session_get(1, fresh_connections=True)
    problems: list[str] = []
    last: dict[str, str] = {}
    last_status = 200
    paths = workload.sample_paths(samples)
    sent = dict(workload.headers)
    try:
        for path in paths:
            for _ in range(2 if workload.keys else 8):
                status, headers, length = await get(system.url(path), sent)  # type: ignore[operator]
                problem = check_answer(system, workload.expect, path, status, headers, length)
                if problem:
                    problems.append(problem)
                last, last_status = headers, status
    finally:
        await session.close()  # type: ignore[attr-defined]
    return {"checked": len(paths), "problems": problems, "says": describe(system.kind, last, last_status)}


SETTLE_FILLS = 0.5  # seconds between a system's priming and its check: background fills land


def prime_all(systems: list[System], workload: Workload) -> dict[str, float]:
    """Prime every system, then let background fills land (disk writes finish after the
    response): one wait for all of them, each primed at least ``SETTLE_FILLS`` before it is
    checked (``check_primed``). The seconds each priming took, by system name."""
    primed = {system.name: asyncio.run(prime(system, workload)) for system in systems}
    time.sleep(SETTLE_FILLS)
    return primed


def check_primed(system: System, workload: Workload, primed: float) -> dict[str, object]:
    """Check a primed system's answers (``prime_all``).

    For cachegate, its admin metrics must also show the checked bodies coming from the tier
    the workload is about (memory, or disk for the disk workload); a 304 has no body, so for
    ``not-modified`` only that none came from upstream.
    """
    before = tier_bytes(system)
    report = asyncio.run(_check(system, workload))
    report["primed_s"] = round(primed, 2)
    after = tier_bytes(system)
    if system.kind == "cachegate" and not after:
        report["tier_bytes"] = None
        report["note"] = (f"tiers not verified: no per-worker /metrics with {system.workers} workers "
                          "(the admin API is the supervisor's)")
    elif before or after:
        delta = {t: after.get(t, 0) - before.get(t, 0) for t in after}
        report["tier_bytes"] = delta
        tier = "disk" if workload.name.startswith("disk") else "memory"
        if workload.expect == "hit" and delta.get(tier, 0) <= 0:
            report["problems"].append(  # type: ignore[attr-defined]
                f"{system.name} {workload.path}: no body bytes came from the {tier} tier ({delta})")
        if workload.expect in ("hit", "not-modified") and delta.get("upstream", 0) > 0:
            report["problems"].append(  # type: ignore[attr-defined]
                f"{system.name} {workload.path}: {delta['upstream']:.0f} body bytes came from upstream")
    return report


def access_log_lines(fleet: Fleet, system: System) -> int:
    """Lines in a cachegate system's access log file so far (it writes a batch every 0.1 s)."""
    time.sleep(0.3)
    path = fleet.access_log_path(system.name)
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def tier_bytes(system: System) -> dict[str, float]:
    """cachegate's cachegate_response_bytes_total by tier, from its admin /metrics ({} if absent)."""
    if system.admin_port is None:
        return {}
    import urllib.request

    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{system.admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    for line in text.splitlines():
        if line.startswith("cachegate_response_bytes_total{"):
            labels, value = line.rsplit(" ", 1)
            tier = labels.split('tier="', 1)[1].split('"', 1)[0]
            out[tier] = float(value)
    return out


# -- driving ---------------------------------------------------------------------------------------


@dataclass
class Options:
    rounds: int
    duration: float
    connections: int
    threads: int
    keys: int
    workers: int
    use_wrk: bool
    profile: bool
    profile_seconds: float
    out_dir: Path
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    zipf_keys: int = 100_000
    zipf_duration: float = 20.0  # seconds of each zipf phase (and of fill)
    before: Path | None = None  # another checkout, run beside as cachegate-before


def wrk_argv(system: System, workload: Workload, opts: Options, duration: float | None = None) -> list[str]:
    d = duration if duration is not None else opts.duration
    argv = ["wrk", f"-t{opts.threads}", f"-c{opts.connections}", f"-d{d:g}s", "--timeout", "5s",
            "-s", str(REPORT_LUA), system.url(workload.path if not workload.keys else "/")]
    for name, value in workload.headers:
        argv[1:1] = ["-H", f"{name}: {value}"]
    if workload.keys:
        argv += ["--", workload.path, str(workload.keys)]
    return argv


def drive(system: System, workload: Workload, opts: Options, round_: int) -> Run:
    """One wrk run; also the CPU time the system's processes spent per request meanwhile."""
    argv = wrk_argv(system, workload, opts)
    pids = system.all_pids()
    cpu = cpu_seconds(pids)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=opts.duration + 60, check=False)
    cpu = cpu_seconds(pids) - cpu
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed for {system.name}: {out.stderr.strip()}")
    result = parse_wrk(out.stdout, workload.name, system.name, round_)
    cpu_us = cpu / result.requests * 1e6 if result.requests else None
    return dataclasses.replace(result, cpu_us=cpu_us)


class RssSampler:
    """Samples the RSS of a system's workers every 0.25 s while a run lasts; keeps the peaks.

    Besides VmRSS (what the target is about), the anonymous part (the heap) and the
    file-backed part (mapped files: SQLite's mmap of the disk tier's databases) are kept apart.
    """

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, system: System) -> None:
        self.pids = system.worker_pids()
        self.peak: dict[int, int] = dict.fromkeys(self.pids, 0)
        self.parts: dict[str, dict[int, int]] = {f: dict.fromkeys(self.pids, 0) for f in self.FIELDS[1:]}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_bytes(pid))
                for f, peaks in self.parts.items():
                    peaks[pid] = max(peaks[pid], rss_bytes(pid, f))
            self._stop.wait(0.25)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- fresh workloads (zipf, fill): every system started empty in every round -----------------------


class PssSampler:
    """The peak of the summed PSS of a system's processes (all of them: supervisor, workers,
    Varnish's child, nginx's master), every 0.25 s while a run lasts."""

    def __init__(self, system: System) -> None:
        self.pids = system.all_pids()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(pss_bytes(p) for p in self.pids))
            self._stop.wait(0.25)

    def take(self) -> int:
        """The peak since the last take."""
        peak, self.peak = self.peak, 0
        return peak

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_fresh(fleet: Fleet, name: str, origin: System, workers: int, tag: str
                ) -> tuple[System, list[Path]]:
    """An empty ``name`` (cachegate, nginx-2w, varnish) for one round of a fresh workload, and
    the folders it keeps its cache in (removed when the round is over)."""
    inner = f"{tag}-{name}"
    if name in ("cachegate", "cachegate-before"):
        root = BEFORE[0] if name == "cachegate-before" else None
        return fleet.start_cachegate(inner, origin, workers, root=root), [fleet.dir / f"{inner}-cache"]
    if name.startswith("nginx-"):
        return fleet.start_nginx(inner, origin, int(name[len("nginx-"):-1])), [fleet.dir / inner]
    if name == "varnish":
        # The same memory budget as cachegate's (the comparison: malloc 256 MB).
        return fleet.start_varnish(inner, origin, storage=f"malloc,{CACHEGATE_MEMORY >> 20}m"), \
            [fleet.dir / inner]
    raise ValueError(f"no fresh start for {name}")


def fresh_available(name: str) -> bool:
    return name == "cachegate" or (name == "cachegate-before" and bool(BEFORE)) \
        or (name.startswith("nginx-") and shutil.which("nginx") is not None) \
        or (name == "varnish" and shutil.which("varnishd") is not None)


def settle_cpu(pids: list[int], limit: float = 30.0) -> float:
    """CPU the processes go on spending once the load stopped (writes behind, flushes), until
    they are idle (under 2 % of a core for half a second) or ``limit`` seconds passed."""
    total = 0.0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu_seconds(pids)
        time.sleep(0.5)
        spent = cpu_seconds(pids) - before
        total += spent
        if spent < 0.01:
            break
    return total


def phase_argv(system: System, workload: Workload, phase: str, opts: Options, run_id: str,
               keys_file: Path, duration: float | None = None) -> list[str]:
    d = opts.zipf_duration if duration is None else duration
    argv = ["wrk", "-t1", f"-c{opts.connections}", f"-d{d:g}s", "--timeout", "5s", "-s", str(ZIPF_LUA),
            system.url("/"), "--", run_id]
    if workload.name == "zipf":
        seed = ZIPF_SEED + (1 if phase == "warm" else 0)
        return [*argv, "zipf", str(keys_file), str(seed), str(ZIPF_EXPONENT)]
    return [*argv, "fill", workload.path]


def drive_phase(fleet: Fleet, system: System, name: str, workload: Workload, phase: str, opts: Options,
                round_: int, keys_file: Path, settle: bool) -> Run:
    """One wrk phase of a fresh workload; the misses among its requests come from the origin's
    records of X-Bench, and the CPU of writes that go on after the load counts too (``settle``)."""
    run_id = f"r{round_}-{name}-{workload.name}-{phase}"
    label = f"{workload.name}-{phase}" if len(workload.phases) > 1 else workload.name
    pids = system.all_pids()
    cpu = cpu_seconds(pids)
    out = subprocess.run(phase_argv(system, workload, phase, opts, run_id, keys_file), capture_output=True,
                         text=True, timeout=opts.zipf_duration + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed for {name}: {out.stderr.strip()}")
    if settle:
        settle_cpu(pids)
    cpu = cpu_seconds(pids) - cpu
    result = parse_wrk(out.stdout, label, name, round_)
    time.sleep(0.3)  # the origin writes its records every 0.1 s
    seqs = read_records(str(fleet.records), run_id)
    return dataclasses.replace(result, cpu_us=cpu / result.requests * 1e6 if result.requests else None,
                               misses=len(seqs), miss_curve=miss_curve(seqs, result.sent, result.step))


async def _byte_check(system: System, paths: list[str], samples: int = 200) -> list[str]:
    """A random sample of zipf keys (half among the 1,000 most popular), each on a new
    connection: the answer must be 200 with exactly the origin's bytes for that key."""
    import aiohttp

    picks = random.sample(range(min(1000, len(paths))), min(samples // 2, len(paths)))
    picks += random.sample(range(len(paths)), min(samples - len(picks), len(paths)))
    problems: list[str] = []
    connector = aiohttp.TCPConnector(limit=8, force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(path: str) -> None:
            found = route(path)
            assert found is not None
            try:
                async with session.get(system.url(path)) as resp:
                    body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{path}: {type(exc).__name__}: {exc}")
                return
            if resp.status != 200:
                problems.append(f"{path}: status {resp.status}")
            elif body != keyed_body(path, found[1]):
                problems.append(f"{path}: {len(body)} bytes that are not the origin's "
                                f"({resp.headers.get('X-Cache-Status', '?')})")

        await asyncio.gather(*(one(paths[i]) for i in picks))
    return problems


def run_fresh(fleet: Fleet, origin: System, workload: Workload, opts: Options, round_: int,
              keys_file: Path, paths: list[str], checks: dict[str, object]) -> list[Run]:
    """One round of a fresh workload: each system started empty, in a rotated order, driven
    through every phase, its bodies checked (zipf), and stopped with its cache removed."""
    runs: list[Run] = []
    for name in rotated(workload.systems, round_):
        system, folders = start_fresh(fleet, name, origin, opts.workers, f"{workload.name}-r{round_}")
        try:
            with PssSampler(system) as sampler:
                for phase in workload.phases:
                    result = drive_phase(fleet, system, name, workload, phase, opts, round_, keys_file,
                                         settle=phase == workload.phases[-1])
                    runs.append(dataclasses.replace(result, peak_pss=sampler.take()))
                    r = runs[-1]
                    flag = "" if r.clean else f"  errors {r.errors}"
                    distinct = r.distinct_curve[-1] if r.distinct_curve else "?"
                    print(f"  {r.workload:<9} {name:<16} {r.rps:>10,.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
                          f"p99 {r.p99_ms:6.2f} ms  CPU {r.cpu_us or 0:6.1f} µs/req  "
                          f"misses {r.misses}/{r.sent} (distinct {distinct})"
                          f"  PSS {(r.peak_pss or 0) / (1 << 20):.0f} MB{flag}", flush=True)
            if workload.name == "zipf":
                problems = asyncio.run(_byte_check(system, paths))
                checks[f"zipf/{name}/round{round_ + 1}"] = {"checked": 200, "problems": problems}
                print(f"  zipf      {name:<16} bytes of 200 sampled keys: "
                      f"{'ok' if not problems else f'{len(problems)} PROBLEM(S): {problems[0]}'}", flush=True)
        finally:
            fleet.discard(system, *folders)
        time.sleep(0.5)
    return runs


def rotated(items: list[str], by: int) -> list[str]:
    if not items:
        return items
    k = by % len(items)
    return items[k:] + items[:k]


# -- main ------------------------------------------------------------------------------------------


BEFORE: list[Path] = []  # --before: another checkout, measured beside this one as cachegate-before


def start_fleet(fleet: Fleet, wanted: set[str], workers: int) -> None:
    """Start every system a selected workload names (those whose tools are missing are skipped)."""
    origin = fleet.start_app("origin-raw", "origin", 2, record=str(fleet.records))
    print(f"  origin-raw       127.0.0.1:{origin.port}  (raw asyncio protocol, 2 processes)", flush=True)
    for name in sorted(wanted):
        if name == "origin-raw":
            continue
        system: System | None = None
        if name.startswith("ceiling-"):
            system = fleet.start_app(name, "ceiling", int(name[len("ceiling-"):-1]))
        elif name.startswith("passthrough-"):
            system = fleet.start_app(name, "passthrough", int(name[len("passthrough-"):-1]),
                                     upstream=f"http://127.0.0.1:{origin.port}")
        elif name == "cachegate":
            system = fleet.start_cachegate(name, origin, workers)
        elif name == "cachegate-before":
            system = fleet.start_cachegate(name, origin, workers, root=BEFORE[0])
        elif name == "cachegate-disk":
            system = fleet.start_cachegate(name, origin, workers, memory_max_object="64KB")
        elif name == "cachegate-log":  # the same, with the JSON access log written to a file
            system = fleet.start_cachegate(name, origin, workers, access_log=True)
        elif name.startswith("nginx-"):
            if shutil.which("nginx"):
                system = fleet.start_nginx(name, origin, int(name[len("nginx-"):-1]))
            else:
                fleet.notes.append(f"{name}: nginx is not on the PATH; skipped")
                print(f"  note: {fleet.notes[-1]}", flush=True)
        elif name == "varnish":
            if shutil.which("varnishd"):
                system = fleet.start_varnish(name, origin)
            else:
                fleet.notes.append("varnish: varnishd is not on the PATH; skipped")
                print(f"  note: {fleet.notes[-1]}", flush=True)
        if system is not None:
            print(f"  {name:<16} 127.0.0.1:{system.port}  ({system.workers} process(es))", flush=True)


def run(opts: Options) -> int:
    if opts.before is not None:
        BEFORE[:] = [opts.before]
    all_loads = workloads(opts.keys, opts.zipf_keys, before=opts.before is not None)
    loads = [w for w in all_loads if (not opts.only or w.name in opts.only)]
    if not loads:
        print(f"no workload selected; choose from {', '.join(w.name for w in all_loads)}", file=sys.stderr)
        return 2
    info = machine()
    print(f"machine: {info['nproc']} CPU(s), {info['cpu']}, Linux {info['kernel']}, load {info['load']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))  # type: ignore[attr-defined]
    print(f"plan: {opts.rounds} round(s) × wrk -t{opts.threads} -c{opts.connections} -d{opts.duration:g}s; "
          f"cachegate --workers {opts.workers}")

    fleet = Fleet()
    results: dict[str, object] = {"started": dt.datetime.now().isoformat(timespec="seconds"),
                                  "machine": info, "options": {k: str(v) for k, v in opts.__dict__.items()}}
    runs: list[Run] = []
    checks: dict[str, object] = {}
    rss: dict[str, object] = {}

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        print("starting:", flush=True)
        wanted = {s for w in loads if not w.fresh for s in w.systems if s not in opts.skip}
        wanted = {s.replace("{w}", str(opts.workers)) for s in wanted}
        start_fleet(fleet, wanted, opts.workers)
        results["pids"] = {n: s.all_pids() for n, s in fleet.systems.items()}
        cg = fleet.systems.get("cachegate") or fleet.systems.get("cachegate-disk")
        workers = cg.workers if cg is not None else opts.workers
        for w in loads:
            if w.fresh:
                w.systems = [s for s in w.systems if s not in opts.skip and fresh_available(s)]
                continue
            w.systems = [s.replace("{w}", str(workers)) for s in w.systems]
            w.systems = [s for s in w.systems if s in fleet.systems]
        origin = fleet.systems["origin-raw"]
        paths = zipf_paths(opts.zipf_keys)
        keys_file = fleet.dir / "zipf-keys.txt"
        keys_file.write_text("\n".join(paths) + "\n")

        print("priming and checking:", flush=True)
        failures = 0
        for w in loads:
            if w.fresh:
                continue
            primed = prime_all([fleet.systems[name] for name in w.systems], w)
            for name in w.systems:
                system = fleet.systems[name]
                report = check_primed(system, w, primed[name])
                checks[f"{w.name}/{name}"] = report
                problems = report["problems"]
                ok = "ok" if not problems else f"{len(problems)} PROBLEM(S): {problems[0]}"  # type: ignore[index]
                tiers = report.get("tier_bytes")
                tier_note = f" tiers {tiers}" if tiers else ""
                if "note" in report:
                    tier_note = f" ({report['note']})"
                print(f"  {w.name:<9} {name:<16} primed in {report['primed_s']}s, "
                      f"{report['checked']} checked, says {report['says']}{tier_note}: {ok}", flush=True)
                failures += bool(problems)
            if w.keys and "cachegate" in w.systems:
                idle = {pid: rss_bytes(pid) for pid in fleet.systems["cachegate"].worker_pids()}
                rss["after_priming"] = idle
        if failures:
            print(f"{failures} system(s) did not answer as the workload needs; their numbers would "
                  "mean something else. Stopping.", file=sys.stderr)
            return 1
        log_system = fleet.systems.get("cachegate-log")
        if log_system is not None:  # the log was really on: the checks' requests are in it
            lines = access_log_lines(fleet, log_system)
            checks["hit-1k/cachegate-log"]["access_log_lines"] = lines  # type: ignore[index]
            print(f"  cachegate-log wrote {lines} access log lines while primed and checked", flush=True)
            if lines == 0:
                print("cachegate-log wrote no access log line: the log is not on", file=sys.stderr)
                return 1
        results["checks"] = checks
        if not opts.use_wrk:
            print("--no-wrk: started, primed and checked every system; not measuring.")
            return 0

        round_loads: list[str] = []
        results["round_loads"] = round_loads
        for r in range(opts.rounds):
            round_loads.append(load())
            print(f"round {r + 1}/{opts.rounds} (load {load()}):", flush=True)
            for w in loads:
                if w.fresh:
                    runs.extend(run_fresh(fleet, origin, w, opts, r, keys_file, paths, checks))
                    continue
                for name in rotated(w.systems, r):
                    system = fleet.systems[name]
                    if not system.alive():
                        raise RuntimeError(f"{name} died\n{system.log_tail()}")
                    if w.keys and name == "cachegate":
                        with RssSampler(system) as sampler:
                            result = drive(system, w, opts, r)
                        for label, peaks in (("peak_per_worker", sampler.peak),
                                             ("peak_anon_per_worker", sampler.parts["RssAnon"]),
                                             ("peak_file_per_worker", sampler.parts["RssFile"])):
                            kept: dict[int, int] = rss.setdefault(label, {})  # type: ignore[assignment]
                            for pid, peak in peaks.items():
                                kept[pid] = max(kept.get(pid, 0), peak)
                    else:
                        result = drive(system, w, opts, r)
                    runs.append(result)
                    flag = "" if result.clean else f"  errors {result.errors}"
                    cpu = f"{result.cpu_us:6.1f}" if result.cpu_us is not None else "     ?"
                    print(f"  {w.name:<9} {name:<16} {result.rps:>10,.0f} req/s  p50 {result.p50_ms:6.2f} ms"
                          f"  p99 {result.p99_ms:6.2f} ms  CPU {cpu} µs/req{flag}", flush=True)
                    time.sleep(0.3)

        summaries = summarise(runs)
        workers_of = {n: s.workers for n, s in fleet.systems.items()}
        verdicts = judge(summaries, workers)
        peaks: dict[int, int] = rss.get("peak_per_worker") or {}  # type: ignore[assignment]
        anon: dict[int, int] = rss.get("peak_anon_per_worker") or {}  # type: ignore[assignment]
        files: dict[int, int] = rss.get("peak_file_per_worker") or {}  # type: ignore[assignment]
        worst = max(peaks, key=lambda p: peaks[p]) if peaks else None
        verdicts.append(rss_verdict(peaks.get(worst) if worst else None, CACHEGATE_MEMORY, opts.keys,
                                    anon.get(worst) if worst else None, files.get(worst) if worst else None))
        results.update({
            "finished": dt.datetime.now().isoformat(timespec="seconds"), "load_after": load(),
            "cachegate_workers": workers, "notes": fleet.notes, "checks": checks,
            "workloads": {w.name: {"path": w.path, "keys": w.keys, "about": w.about, "systems": w.systems,
                                   "phases": list(w.phases)} for w in loads},
            "runs": [r.__dict__ for r in runs],
            "summary": [s.as_dict() for s in summaries.values()],
            "targets": [v.as_dict() for v in verdicts],
            "rss": {k: ({str(p): b for p, b in v.items()} if isinstance(v, dict) else v)
                    for k, v in rss.items()},
        })
        print()
        print(f"wrk -t{opts.threads} -c{opts.connections} -d{opts.duration:g}s, {opts.rounds} round(s); "
              f"cachegate {workers} worker(s); load before {info['load']}, after {load()}")
        order = [n for w in loads for n in ([f"{w.name}-{p}" for p in w.phases] if len(w.phases) > 1
                                            else [w.name])]
        print(format_results(summaries, workers_of, order))
        if any(w.fresh for w in loads):
            print()
            print(format_tail(summaries, CACHEGATE_MEMORY, workers))
        print()
        print(format_verdicts(verdicts))
        for note in fleet.notes:
            print(f"note: {note}")
        if opts.profile:
            results["profiles"] = profile(fleet, loads, opts)
            if any(w.name == "zipf" for w in loads):
                zipf = next(w for w in loads if w.name == "zipf")
                for name in ["cachegate"] + (["cachegate-before"] if BEFORE else []):
                    results["profiles"][f"zipf-{name}"] = profile_zipf(  # type: ignore[index]
                        fleet, origin, zipf, opts, keys_file, name)
    except KeyboardInterrupt:
        print("interrupted; stopping every system", file=sys.stderr)
        return 130
    finally:
        fleet.stop()
        if "pids" in results:
            save(results, opts.out_dir)
    return 0


def save(results: dict[str, object], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    shutil.copyfile(path, out_dir / "latest.json")
    print(f"raw results: {path}")


# -- profiling -------------------------------------------------------------------------------------


def py_spy() -> str | None:
    exe = shutil.which("py-spy")
    if exe:
        return exe
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else None


def profile(fleet: Fleet, loads: list[Workload], opts: Options) -> dict[str, object]:
    """py-spy record one cachegate worker while wrk drives the 1 KiB hit and the pass-through.

    ``--gil`` keeps only samples of the thread holding the GIL: in a GIL-bound worker that is
    where the CPU goes (idle executor threads and the loop's wait in epoll drop out).
    """
    exe = py_spy()
    if exe is None:
        print("profile: py-spy not found; `.venv/bin/pip install py-spy` (it is not a dependency)")
        return {}
    out: dict[str, object] = {}
    for name in ("cachegate", "cachegate-before"):
        system = fleet.systems.get(name)
        if system is not None:
            out.update(_profile_system(exe, system, loads, opts))
    return out


def _profile_system(exe: str, system: System, loads: list[Workload], opts: Options) -> dict[str, object]:
    out: dict[str, object] = {}
    suffix = "" if system.name == "cachegate" else f"-{system.name}"
    pid = system.worker_pids()[0]
    for w in loads:
        if w.name not in ("hit-1k", "pass-1k", "keys-1k"):
            continue
        raw = opts.out_dir / f"profile-{w.name}{suffix}.txt"
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        wrk = subprocess.Popen(wrk_argv(system, w, opts, opts.profile_seconds + 4),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        subprocess.run([exe, "record", "--pid", str(pid), "--duration", f"{opts.profile_seconds:g}",
                        "--rate", "250", "--gil", "--format", "raw", "--output", str(raw)],
                       capture_output=True, check=False)
        wrk_out, _ = wrk.communicate()
        if not raw.exists():
            print(f"profile {w.name}: py-spy wrote nothing (it needs ptrace permission)")
            continue
        text = raw.read_text()
        self_top, incl_top, total = top_frames(text)
        by_area = areas(text)
        try:
            rps = parse_wrk(wrk_out, w.name, system.name, 0).rps
        except ValueError:
            rps = 0.0
        out[w.name + suffix] = {"file": str(raw), "samples": total, "rps_while_sampled": rps,
                       "areas": by_area, "self": self_top[:40], "inclusive": incl_top[:60],
                       "callers": {f: callers(text, f) for f, _ in self_top[:8]}}
        print(f"\nprofile {w.name}{suffix}: {total} GIL-holding samples of {system.name} worker {pid} at "
              f"{rps:,.0f} req/s under wrk ({raw})")
        print("  by area (self time, generic frames charged to their caller):")
        for area, n in by_area[:12]:
            print(f"    {100 * n / total:5.1f}%  {area}")
        print("  self time:")
        for frame, n in self_top[:20]:
            print(f"    {100 * n / total:5.1f}%  {frame}")
            for chain, m in callers(text, frame)[:1]:
                print(f"             from {chain} ({100 * m / total:.1f}%)")
        print("  inclusive:")
        for frame, n in incl_top[:30]:
            print(f"    {100 * n / total:5.1f}%  {frame}")
    return out


def profile_zipf(fleet: Fleet, origin: System, workload: Workload, opts: Options,
                 keys_file: Path, name: str = "cachegate") -> dict[str, object]:
    """py-spy record one worker of an empty cachegate (or ``cachegate-before``) through a zipf
    cold phase, every thread (no --gil: where each thread spends its time, the disk threads
    included): per thread, the share of samples it was busy (py-spy leaves idle threads out)
    and its top frames."""
    exe = py_spy()
    if exe is None:
        print("profile: py-spy not found; `.venv/bin/pip install py-spy` (it is not a dependency)")
        return {}
    system, folders = start_fresh(fleet, name, origin, opts.workers, "zipf-profile")
    raw = opts.out_dir / f"profile-zipf-{name}.txt"
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    rate = 100
    try:
        pid = system.worker_pids()[0]
        seconds = max(opts.zipf_duration - 3, 3)
        wrk = subprocess.Popen(phase_argv(system, workload, "cold", opts, "profile", keys_file),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        subprocess.run([exe, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate",
                        str(rate), "--threads", "--format", "raw", "--output", str(raw)],
                       capture_output=True, check=False)
        wrk_out, _ = wrk.communicate()
    finally:
        fleet.discard(system, *folders)
    if not raw.exists():
        print("profile zipf: py-spy wrote nothing (it needs ptrace permission)")
        return {}
    try:
        rps = parse_wrk(wrk_out, "zipf-cold", name, 0).rps
    except ValueError:
        rps = 0.0
    text = raw.read_text()
    possible = seconds * rate
    threads: dict[str, list[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        first, _, rest = stack.partition(";")
        threads.setdefault(first, []).append(f"{rest} {count}")
    out: dict[str, object] = {"file": str(raw), "rps_while_sampled": rps, "threads": {}}
    print(f"\nprofile zipf (cold), {name}: worker {pid} at {rps:,.0f} req/s under wrk, {seconds:g} s "
          f"at {rate} Hz ({raw}); busy = samples the thread was not idle / samples possible")
    def samples(lines: list[str]) -> int:
        return sum(int(x.rsplit(" ", 1)[1]) for x in lines)

    for thread, lines in sorted(threads.items(), key=lambda kv: -samples(kv[1])):
        body = "\n".join(lines)
        self_top, _, total = top_frames(body)
        busy = total / possible
        out["threads"][thread] = {"busy": busy, "samples": total, "self": self_top[:15],  # type: ignore[index]
                                  "areas": areas(body)}
        print(f"  {thread}: busy {100 * busy:.0f}%")
        for frame, n in self_top[:8]:
            print(f"    {100 * n / total:5.1f}%  {frame}")
    return out


_LINE = re.compile(r":\d+\)$")
GENERIC = ("(dataclasses.py)", "(<string>)", "(functools.py)", "(typing.py)", "(enum.py)", "(re/",
           "(abc.py)", "(contextlib.py)", "(copy.py)")
AREAS = (
    ("proxy/web/", "cachegate web layer (proxy/web)"),
    ("proxy/engine.py", "cachegate engine"),
    ("proxy/coalescer.py", "cachegate coalescer"),
    ("proxy/rules/", "cachegate rules"),
    ("proxy/policy/", "cachegate policy"),
    ("proxy/storage/", "cachegate storage"),
    ("proxy/upstream.py", "cachegate upstream pool"),
    ("proxy/", "cachegate other"),
    ("aiohttp/client", "aiohttp client"),
    ("aiohttp/connector", "aiohttp client"),
    ("aiohttp/tracing", "aiohttp client"),
    ("aiohttp/cookiejar", "aiohttp client"),
    ("aiohttp/helpers", "aiohttp helpers"),
    ("aiohttp/", "aiohttp server and HTTP (web_*, http_*, streams)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("diskcache/", "diskcache"),
    ("multidict/", "multidict"),
    ("yarl/", "yarl"),
    ("asyncio/", "event loop (asyncio/uvloop)"),
    ("uvloop/", "event loop (asyncio/uvloop)"),
    ("concurrent/", "thread pool"),
    ("threading.py", "thread pool"),
)


def _frames(collapsed: str) -> Iterator[tuple[list[str], int]]:
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield [_LINE.sub(")", f) for f in stack.split(";")], int(count)


def top_frames(collapsed: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """py-spy's raw (collapsed) stacks -> frames by self and by inclusive samples (line numbers dropped)."""
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for frames, n in _frames(collapsed):
        total += n
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    by = sorted(self_counts.items(), key=lambda kv: -kv[1])
    return by, sorted(incl.items(), key=lambda kv: -kv[1]), total


def areas(collapsed: str) -> list[tuple[str, int]]:
    """Self time by component; a generic frame (dataclasses, re, ...) is charged to its caller."""
    out: dict[str, int] = {}
    for frames, n in _frames(collapsed):
        i = len(frames) - 1
        while i > 0 and any(g in frames[i] for g in GENERIC):
            i -= 1
        frame = frames[i]
        area = next((name for needle, name in AREAS if needle in frame), None)
        if area is None:
            area = "runtime (" + frame.split(" (", 1)[-1].rstrip(")") + ")"
        out[area] = out.get(area, 0) + n
    return sorted(out.items(), key=lambda kv: -kv[1])


def callers(collapsed: str, frame: str, depth: int = 3) -> list[tuple[str, int]]:
    """Who calls ``frame``: the ``depth`` frames above it, most samples first."""
    out: dict[str, int] = {}
    for frames, n in _frames(collapsed):
        if frame in frames:
            i = frames.index(frame)
            chain = " < ".join(f.split(" (", 1)[0] for f in reversed(frames[max(0, i - depth):i]))
            out[chain] = out.get(chain, 0) + n
    return sorted(out.items(), key=lambda kv: -kv[1])


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 3 s, 5000 keys: a smoke run")
    p.add_argument("--rounds", type=int, help="rounds (default 3)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keys", type=int, help="distinct keys for keys-1k (default 100000)")
    p.add_argument("--workers", type=int, default=2, help="cachegate worker processes (default 2)")
    p.add_argument("--only", default="", help="comma-separated workloads (hit-1k,cond-1k,hit-100k,"
                                               "hit-1m,disk-100k,pass-1k,keys-1k,zipf,fill)")
    p.add_argument("--zipf-keys", type=int, help="distinct keys of zipf (default 100000)")
    p.add_argument("--zipf-duration", type=float,
                   help="seconds of each zipf phase and of fill (default 20)")
    p.add_argument("--before", default="",
                   help="a checkout of earlier code (git worktree or archive), measured beside as "
                        "cachegate-before in every workload cachegate runs")
    p.add_argument("--skip", default="", help="comma-separated systems to leave out")
    p.add_argument("--no-wrk", action="store_true", help="start, prime and check every system; no load")
    p.add_argument("--profile", action="store_true",
                   help="afterwards, py-spy record cachegate on hit-1k, pass-1k and keys-1k")
    p.add_argument("--profile-seconds", type=float, default=10)
    p.add_argument("--out", default=str(ROOT / "var" / "bench"), help="where the JSON goes")
    a = p.parse_args(argv)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    duration = a.duration if a.duration is not None else (3.0 if a.quick else 10.0)
    keys = a.keys if a.keys is not None else (5000 if a.quick else 100_000)
    zipf_keys = a.zipf_keys if a.zipf_keys is not None else (5000 if a.quick else 100_000)
    zipf_duration = a.zipf_duration if a.zipf_duration is not None else (3.0 if a.quick else 20.0)
    return Options(rounds, duration, a.connections, a.threads, keys, a.workers, not a.no_wrk, a.profile,
                   a.profile_seconds, Path(a.out), [s for s in a.only.split(",") if s],
                   [s for s in a.skip.split(",") if s], zipf_keys, zipf_duration,
                   Path(a.before).resolve() if a.before else None)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.use_wrk and shutil.which("wrk") is None:
        print("wrk is not installed. Debian/Ubuntu: sudo apt-get install wrk; Fedora: sudo dnf install wrk; "
              "macOS: brew install wrk; or build it from https://github.com/wg/wrk. "
              "(--no-wrk starts, primes and checks the systems without measuring.)", file=sys.stderr)
        return 2
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
