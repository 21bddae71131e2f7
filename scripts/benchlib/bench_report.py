"""Pure pieces of scripts/bench: parse wrk's result line, summarise rounds, judge the targets, print.

Nothing here starts a process or reads a clock, so the smoke test can check it on made-up numbers.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

RESULT_MARK = "BENCH-RESULT "
MB = 1 << 20


@dataclass(frozen=True)
class Run:
    """One wrk run of one system on one workload."""

    workload: str
    system: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)
    cpu_us: float | None = None  # CPU time of the system's processes per request (µs)

    @property
    def clean(self) -> bool:
        """No socket errors and no non-2xx/3xx answers: the numbers mean what they say."""
        return not any(self.errors.values())


def parse_wrk(stdout: str, workload: str, system: str, round_: int) -> Run:
    """The ``BENCH-RESULT {...}`` line that report.lua prints -> a ``Run``."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK):])
            seconds = data["duration_us"] / 1e6
            lat = data["latency_us"]
            return Run(workload, system, round_, data["requests"] / seconds if seconds else 0.0,
                       lat["p50"] / 1000, lat["p99"] / 1000, data["requests"], dict(data["errors"]))
    raise ValueError(f"no {RESULT_MARK.strip()} line in wrk's output:\n{stdout[-2000:]}")


@dataclass(frozen=True)
class Summary:
    workload: str
    system: str
    rps: float  # median over rounds
    rps_min: float
    rps_max: float
    p50_ms: float  # median over rounds of each round's p50
    p99_ms: float
    rounds: int
    clean: bool  # every round clean
    cpu_us: float | None = None  # median CPU µs per request of the system's processes

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def summarise(runs: Iterable[Run]) -> dict[tuple[str, str], Summary]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.workload, run.system), []).append(run)
    out = {}
    for (workload, system), rs in groups.items():
        rps = [r.rps for r in rs]
        cpu = [r.cpu_us for r in rs if r.cpu_us is not None]
        out[(workload, system)] = Summary(
            workload, system, statistics.median(rps), min(rps), max(rps),
            statistics.median(r.p50_ms for r in rs), statistics.median(r.p99_ms for r in rs),
            len(rs), all(r.clean for r in rs), statistics.median(cpu) if cpu else None)
    return out


@dataclass(frozen=True)
class Target:
    """``numerator / denominator`` (req/s medians unless ``metric`` says p99) against a bound."""

    label: str
    num: tuple[str, str]  # (workload, system); "{w}" in a system name = cachegate's worker count
    den: tuple[str, str]
    op: str  # ">=" or "<="
    bound: float
    metric: str = "rps"  # or "p99"
    stretch: bool = False  # shown, but not part of what the issue requires


TARGETS: tuple[Target, ...] = (
    Target("1 KiB memory hit / aiohttp ceiling (same workers)",
           ("hit-1k", "cachegate"), ("hit-1k", "ceiling-{w}p"), ">=", 0.95),
    Target("1 KiB memory hit / aiohttp ceiling, stretch",
           ("hit-1k", "cachegate"), ("hit-1k", "ceiling-{w}p"), ">=", 1.0, stretch=True),
    Target("1 KiB hit / Varnish", ("hit-1k", "cachegate"), ("hit-1k", "varnish"), ">=", 0.75),
    Target("1 KiB hit / nginx 2 workers", ("hit-1k", "cachegate"), ("hit-1k", "nginx-2w"), ">=", 0.45),
    Target("100 KiB hit / Varnish", ("hit-100k", "cachegate"), ("hit-100k", "varnish"), ">=", 1.0),
    Target("1 MiB hit / Varnish", ("hit-1m", "cachegate"), ("hit-1m", "varnish"), ">=", 1.0),
    Target("disk-tier 100 KiB hit / memory-tier 100 KiB hit",
           ("disk-100k", "cachegate-disk"), ("hit-100k", "cachegate"), ">=", 0.8),
    Target("miss path: 1 KiB pass-through / Varnish pass",
           ("pass-1k", "cachegate"), ("pass-1k", "varnish"), ">=", 0.7),
    Target("miss path: 1 KiB pass-through / Varnish pass, stretch",
           ("pass-1k", "cachegate"), ("pass-1k", "varnish"), ">=", 1.0, stretch=True),
    Target("p99 of 1 KiB hits / aiohttp ceiling's p99",
           ("hit-1k", "cachegate"), ("hit-1k", "ceiling-{w}p"), "<=", 2.0, metric="p99"),
    Target("1 KiB hit with the JSON access log / without",
           ("hit-1k", "cachegate-log"), ("hit-1k", "cachegate"), ">=", 0.8),
)


@dataclass(frozen=True)
class Verdict:
    label: str
    value: float | None  # None: a side was not measured
    op: str
    bound: float
    stretch: bool
    detail: str = ""

    @property
    def result(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value >= self.bound if self.op == ">=" else self.value <= self.bound
        return "PASS" if ok else "FAIL"

    def as_dict(self) -> dict[str, object]:
        return {"label": self.label, "value": self.value, "op": self.op, "bound": self.bound,
                "stretch": self.stretch, "result": self.result, "detail": self.detail}


def judge(summaries: dict[tuple[str, str], Summary], workers: int,
          targets: Sequence[Target] = TARGETS) -> list[Verdict]:
    out = []
    for t in targets:
        num = summaries.get((t.num[0], t.num[1].format(w=workers)))
        den = summaries.get((t.den[0], t.den[1].format(w=workers)))
        value = None
        detail = ""
        if num is not None and den is not None:
            a, b = (num.rps, den.rps) if t.metric == "rps" else (num.p99_ms, den.p99_ms)
            value = a / b if b else None
            unit = "req/s" if t.metric == "rps" else "ms p99"
            detail = f"{a:,.1f} / {b:,.1f} {unit}" if t.metric == "p99" else f"{a:,.0f} / {b:,.0f} {unit}"
        out.append(Verdict(t.label, value, t.op, t.bound, t.stretch, detail))
    return out


def rss_verdict(peak_rss: int | None, budget: int, keys: int, anon: int | None = None,
                file: int | None = None) -> Verdict:
    """RSS per worker while serving 100k distinct cached keys < 100 MB + the memory tier budget.

    Judged on the whole VmRSS, as the target says; the heap (anonymous) and mapped files
    (file-backed, e.g. SQLite's mmap) are shown beside it.
    """
    limit = 100 * MB + budget
    label = f"RSS per worker serving {keys:,} keys (MB)"
    if peak_rss is None:
        return Verdict(label, None, "<=", limit / MB, False)
    parts = f" (anon {anon / MB:.0f}, file {file / MB:.0f})" if anon is not None and file is not None else ""
    return Verdict(label, peak_rss / MB, "<=", limit / MB, False,
                   f"peak {peak_rss / MB:.0f} MB{parts}; limit 100 MB + {budget // MB} MB budget")


# -- printing -------------------------------------------------------------------------------------


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def format_results(summaries: dict[tuple[str, str], Summary], workers_of: dict[str, int],
                   workload_order: Sequence[str]) -> str:
    rows = [("workload", "system", "procs", "req/s median (min–max)", "p50 ms", "p99 ms", "CPU µs/req",
             "rounds")]
    for workload in workload_order:
        items = sorted((s for (w, _), s in summaries.items() if w == workload), key=lambda s: -s.rps)
        for s in items:
            flag = "" if s.clean else " !"
            rows.append((workload, s.system, str(workers_of.get(s.system, "")),
                         f"{_k(s.rps)} ({_k(s.rps_min)}–{_k(s.rps_max)}){flag}",
                         f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}",
                         "" if s.cpu_us is None else f"{s.cpu_us:.1f}", str(s.rounds)))
    return _grid(rows)


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    rows = [("target", "measured", "goal", "result", "from (medians)")]
    for v in verdicts:
        value = "—" if v.value is None else (f"{v.value:.0f}" if v.bound > 10 else f"{v.value:.2f}")
        bound = f"{v.bound:.0f}" if v.bound > 10 else f"{v.bound:.2f}"
        rows.append((v.label, value, f"{v.op} {bound}", v.result, v.detail))
    return _grid(rows)


def _grid(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
