"""What the operator's console and ``cachegate top`` show, counted without slowing the hit path.

Three parts:

- **Per process, per request** (``LiveStats``, held by ``Metrics.live``): the most requested
  URLs with their hits (``TopUrls``) and, per reason a response was not stored, a count and
  the last URL (``NotStoredLog``). The general path records every request (a dict lookup
  and two additions, ≈ 0.2 µs on a path that costs 50 µs and more); the fast hit path
  records one hit in ``FAST_SAMPLE`` and counts it ``FAST_SAMPLE`` times, so its cost per
  hit is one addition and a bit test (the request-duration histogram is sampled the same
  way). Both tables are bounded: ``TopUrls`` keeps at most ``TOP_CAPACITY`` URLs per
  one-minute generation, dropping the least requested half when full.
- **Per second, on the admin listener** (``Series``): nothing is counted per request for the
  time series. Once a second the admin listener reads every process's cumulative counters
  (``Totals``: requests by cache status, bytes by source, origin requests, fills,
  evictions, request-duration buckets) and keeps the differences in a ring buffer of
  ``SERIES_POINTS`` seconds. A worker that restarts (a new pid) starts from a fresh
  baseline, so its counters going back to zero never show as a negative rate (nor its new
  process's counts as a spike), and what the process it replaces had counted stays in the
  totals since start (``Kept``, as ``proxy.metrics.ClusterMetrics`` keeps it for /metrics),
  so those never go down.
- **Counters kept by process** (``Places``, ``Kept``): the same bookkeeping keeps the other
  counts since start that the console and ``cachegate top`` show, each process's answers
  folded with its own function: the workers' upstream requests and failures
  (``sum_upstreams``) and the not-stored counts (``sum_tables``). A worker killed and started
  again takes nothing back from them; gauges (requests in flight) are not kept, and its top
  URLs (the last minute or two) stay for TOP_GENERATION after it was last read.

Everything here is plain data and arithmetic: no I/O, no clock reads (``now`` is given).
"""

from __future__ import annotations

import collections
import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

FAST_SAMPLE = 16  # the fast path records one hit in this many (a power of two: a bit test)
FAST_SAMPLE_MASK = FAST_SAMPLE - 1
TOP_CAPACITY = 2000  # URLs per generation of TopUrls
# Bytes of URLs per generation of TopUrls: a URL may be 8 KB long, and 2,000 of them in each of
# two generations in every worker held 32 MB that clients chose.
TOP_MAX_BYTES = 2 << 20
TOP_GENERATION = 60.0  # seconds per generation: "top URLs" covers the last one to two minutes
NOT_STORED_REASONS = 200  # distinct reasons kept (RULE-NO-STORE:<rule> makes them open-ended)
SERIES_POINTS = 600  # seconds of history the console can chart
LATENCY_WINDOW = 60  # seconds the latency percentiles by cache status cover
# X-Cache-Status values that count as hits in hit ratios: answered from the store without
# waiting for the origin (a collapsed waiter says HIT too: it cost no origin request).
HIT_STATUSES = frozenset({"HIT", "STALE", "UPDATING"})
# X-Cache-Status values counted as client requests (cachegate_requests_total) but in no ratio:
# a PURGE asks nothing of the cache's content, so it is neither a hit, nor a miss, nor offload
# (40 PURGEs after 1 miss and 9 hits took the hit ratio from 0.90 to 0.18).
NOT_IN_RATIOS = frozenset({"PURGE"})


class TopUrls:
    """Requests and hits per URL over the last one to two minutes (two generations)."""

    def __init__(self, capacity: int = TOP_CAPACITY, max_bytes: int = TOP_MAX_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.current: dict[str, list[int]] = {}
        self.previous: dict[str, list[int]] = {}
        self.started: float | None = None
        self._bytes = 0  # of the current generation's URLs

    def add(self, url: str, hit: bool, weight: int = 1) -> None:
        row = self.current.get(url)
        if row is None:
            if len(self.current) >= self.capacity or self._bytes >= self.max_bytes:
                self._prune()
            row = self.current[url] = [0, 0]
            self._bytes += len(url)
        row[0] += weight
        if hit:
            row[1] += weight

    def _prune(self) -> None:
        """Keep the most requested half (of the URLs, and of the bytes they take): a long tail
        of one-off URLs, short or long, cannot grow the table."""
        keep: dict[str, list[int]] = {}
        size = 0
        for url, row in sorted(self.current.items(), key=lambda kv: -kv[1][0]):
            if len(keep) >= self.capacity // 2 or size + len(url) > self.max_bytes // 2:
                break
            keep[url] = row
            size += len(url)
        self.current, self._bytes = keep, size

    def rotate(self, now: float, span: float = TOP_GENERATION) -> None:
        """Start a new generation when the current one is ``span`` old (called by readers)."""
        if self.started is None:
            self.started = now
        elif now - self.started >= span:
            self.previous, self.current, self._bytes = self.current, {}, 0
            self.started = now

    def top(self, n: int) -> list[list[Any]]:
        """``[[url, requests, hits], ...]``, most requested first."""
        merged: dict[str, list[int]] = {u: list(r) for u, r in self.previous.items()}
        for url, (requests, hits) in self.current.items():
            row = merged.setdefault(url, [0, 0])
            row[0] += requests
            row[1] += hits
        # The first n without sorting the whole table (up to TOP_CAPACITY URLs, asked every few
        # seconds by the console's sampler: a sort of it was ~1 % of a worker's time under a
        # long tail of URLs, py-spy). Same order as sorted()[:n].
        ranked = heapq.nsmallest(n, merged.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return [[url, r, h] for url, (r, h) in ranked]


class NotStoredLog:
    """Per reason a response was not stored: how many, and the last URL (an example to inspect)."""

    def __init__(self, capacity: int = NOT_STORED_REASONS) -> None:
        self.capacity = capacity
        self.reasons: dict[str, list[Any]] = {}

    def add(self, reason: str, url: str) -> None:
        row = self.reasons.get(reason)
        if row is None:
            if len(self.reasons) >= self.capacity:
                return
            row = self.reasons[reason] = [0, url]
        row[0] += 1
        row[1] = url

    def rows(self) -> list[list[Any]]:
        """``[[reason, count, example url], ...]``, most frequent first."""
        return sorted(([r, n, u] for r, (n, u) in self.reasons.items()), key=lambda x: (-x[1], x[0]))


class LiveStats:
    """This process's per-request tables (see the module docstring)."""

    def __init__(self) -> None:
        self.top = TopUrls()
        self.not_stored = NotStoredLog()

    def snapshot(self, now: float, top: int) -> dict[str, Any]:
        """What the admin listener merges over processes (JSON-ready)."""
        self.top.rotate(now)
        return {"t": now, "top": self.top.top(top), "not_stored": self.not_stored.rows()}


def merge_snapshots(parts: Iterable[dict[str, Any]], top: int, now: float | None = None) -> dict[str, Any]:
    """Several processes' ``LiveStats.snapshot`` added up: top URLs with their hit ratio, and
    the not-stored reasons with the example of the process that saw the most of them. With
    ``now``, a process's top URLs count until TOP_GENERATION after it was last read (``t``),
    whether it still runs, is dead and not started again yet, or was replaced since
    (``sum_tables``' ``gone``)."""
    urls: dict[str, list[int]] = {}
    reasons: dict[str, list[Any]] = {}

    def recent(t: Any) -> bool:
        return now is None or t is None or float(t) > now - TOP_GENERATION

    for part in parts:
        rows = [*(part["top"] if recent(part.get("t")) else ()),
                *(row for t, gone in part.get("gone", ()) if now is not None and recent(t) for row in gone)]
        for url, requests, hits in rows:
            row = urls.setdefault(url, [0, 0])
            row[0] += int(requests)
            row[1] += int(hits)
        for reason, count, example in part["not_stored"]:
            row2 = reasons.setdefault(reason, [0, example, 0])
            row2[0] += int(count)
            if int(count) > row2[2]:
                row2[1], row2[2] = example, int(count)
    ranked = sorted(urls.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    return {
        "top_urls": [{"url": u, "requests": r, "hits": h, "hit_ratio": round(h / r, 4) if r else None}
                     for u, (r, h) in ranked],
        "not_stored": [{"reason": k, "count": n, "example": ex}
                       for k, (n, ex, _) in sorted(reasons.items(), key=lambda kv: (-kv[1][0], kv[0]))],
    }


# -- percentiles from histogram buckets ------------------------------------------------------------


def percentile(counts: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of per-bucket counts (the last bucket is +Inf), interpolated
    linearly inside its bucket as Prometheus' ``histogram_quantile`` does; None without data.

    >>> percentile([0, 10, 0], [1.0, 2.0], 0.5)
    1.5
    >>> percentile([0, 0, 4], [1.0, 2.0], 0.99)  # beyond the last bound: that bound
    2.0
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * max(0.0, rank - seen) / n
        seen += n
    return float(bounds[-1])


def add_counts(a: list[int], b: Sequence[int]) -> list[int]:
    if not a:
        return list(b)
    return [x + y for x, y in zip(a, b, strict=True)]


# -- the per-second series ------------------------------------------------------------------------

# Totals, one dict per process, JSON-ready (it crosses the control channel):
#   {"pid": 123, "worker": 0, "requests": {"HIT": 10, ...},
#    "bytes": {"memory": ..., "disk": ..., "upstream": ..., "none": ...},
#    "origin": 4, "fills": 3, "evictions": 0, "latency": {"HIT": [bucket counts], ...}}
# "worker" is the worker id (None, or left out, for a process that is no worker): a new pid
# under the same worker id is a restarted worker, and the old pid's totals are retired.
Totals = dict[str, Any]
_COUNTED = ("origin", "fills", "evictions")


def _place_of(part: Totals) -> tuple[str, Any]:
    """Where a process counts: its worker id, or its pid for a process that is no worker."""
    worker = part.get("worker")
    return ("worker", worker) if worker is not None else ("pid", int(part["pid"]))


def _delta_map(new: dict[str, Any], old: dict[str, Any]) -> dict[str, int]:
    out = {}
    for k, v in new.items():
        d = int(v) - int(old.get(k, 0))
        if d > 0:
            out[k] = d
    return out


# -- processes that come and go -------------------------------------------------------------------

# A process's answer to one of the console's calls: JSON-ready, with its "pid" and its "worker" id
# (None, or left out, for a process that is no worker), as ``Totals``.
Answer = dict[str, Any]


class Places:
    """Which process holds each place (a worker id; a process that is no worker is a place of
    its own), and each current process's latest answer (``last``, by pid).

    A process replaced in its place (a restarted worker's predecessor, killed or crashed), or
    whose pid the system gave to a process in another place since, is retired: ``place`` hands
    its last answer back, once. By pid and not by worker id: the restarted worker's counts start
    again from 0, so they must neither add to its predecessor's (counted twice) nor take their
    place (a reset)."""

    def __init__(self) -> None:
        self.last: dict[int, Answer] = {}
        self._pid_of: dict[tuple[str, Any], int] = {}  # a place -> the pid of its current process

    def place(self, part: Answer) -> list[Answer]:
        """Note ``part``'s process in its place (before its answer goes into ``last``); the
        last answers of the processes that retires."""
        pid, place = int(part["pid"]), _place_of(part)
        retired = []
        old = self.last.get(pid)
        if old is not None and _place_of(old) != place:  # a pid given again, to another place
            retired.append(self.last.pop(pid))
        before = self._pid_of.get(place)
        if before is not None and before != pid:
            replaced = self.last.get(before)
            if replaced is not None and _place_of(replaced) == place:  # (not a pid given again since)
                retired.append(self.last.pop(before))
        self._pid_of[place] = pid
        return retired


class Kept:
    """Counters the processes report, added up so that they never go down, as Prometheus
    counters of one series: every current process's latest answer (one that missed a sample,
    slow to answer or dead and not started again yet, counts as last read), plus the last
    answer of every process replaced since start (``Places``). ``fold`` adds answers up into
    one answer of the same shape (``fold(())`` is the empty one): the retired are kept folded,
    so their cost does not grow with restarts. Their counts since the last read are lost (a
    ``kill -9`` gives no chance to report): the console reads once a second."""

    def __init__(self, fold: Callable[[Iterable[Answer]], Answer]) -> None:
        self._fold = fold
        self._places = Places()
        self._retired = fold(())

    def add_one(self, part: Answer) -> Answer | None:
        """Keep ``part`` as its process's latest answer; that process's answer before it (None
        for a process seen for the first time)."""
        for old in self._places.place(part):
            self._retired = self._fold((self._retired, old))
        pid = int(part["pid"])
        before = self._places.last.get(pid)
        self._places.last[pid] = part
        return before

    def add(self, parts: Iterable[Answer]) -> None:
        for part in parts:
            self.add_one(part)

    def pids(self) -> list[int]:
        """The current processes (the retired are folded and have none)."""
        return sorted(self._places.last)

    def parts(self) -> list[Answer]:
        """The retired processes' answers folded into one, then every current process's."""
        return [self._retired, *self._places.last.values()]

    def total(self) -> Answer:
        return self._fold(self.parts())


# Per upstream, what a worker's pool counts that only goes up (``in_flight`` is a gauge: a worker
# that died has none in flight any more).
UPSTREAM_COUNTED = ("requests", "failures")


def sum_upstreams(parts: Iterable[Answer]) -> Answer:
    """Workers' upstream pools (their ``upstream_states`` answers) added up: per upstream URL,
    the counters of ``UPSTREAM_COUNTED`` (``Kept``'s fold)."""
    by_url: dict[str, dict[str, int]] = {}
    for part in parts:
        for u in part.get("upstreams", ()):
            row = by_url.setdefault(str(u["url"]), dict.fromkeys(UPSTREAM_COUNTED, 0))
            for k in UPSTREAM_COUNTED:
                row[k] += int(u.get(k, 0))
    return {"upstreams": [{"url": url, **row} for url, row in by_url.items()]}


def _state_kind(state: str) -> str:
    """A pool's state without what changes every second: ``down (passive)`` for every
    ``down (passive, 7.5s left)``."""
    return "down (passive)" if state.startswith("down (passive") else state


def workers_state(own: str, states: Sequence[str]) -> str:
    """The whole proxy's state of one upstream, from the supervisor's (``own``: its active
    health checks) and the workers' (``states``: where requests go and passive ejections happen).

    >>> workers_state("up", ["down (passive, 7.5s left)", "down (passive, 2.0s left)"])
    'down (passive) in 2 of 2 workers'
    >>> workers_state("up", ["up", "down (passive, 1.0s left)"])
    'up in 1 of 2 workers, down (passive) in 1 of 2 workers'
    >>> workers_state("up", ["up", "up"]), workers_state("down (health check)", ["up", "up"])
    ('up', 'down (health check)')
    >>> workers_state("up", [])
    'up; no worker answered'
    """
    if own == "down (health check)":
        return own  # the supervisor's check is what decides "available" for the whole proxy
    if not states:
        return f"{own}; no worker answered"
    kinds = collections.Counter(_state_kind(s) for s in states)
    if set(kinds) == {"up"}:
        return "up"
    order = sorted(kinds, key=lambda k: (k != "up", k))
    return ", ".join(f"{k} in {kinds[k]} of {len(states)} workers" for k in order)


def upstreams_of_workers(own: Sequence[Answer], workers: Sequence[Answer], counted: Answer
                         ) -> list[dict[str, Any]]:
    """``GET /upstreams``' top level (and the console's) with ``--workers N``: the supervisor's
    pool (``own``) sends no client traffic and never ejects passively, so on its own it said "up",
    available, 0 requests while every worker had the upstream down. Per upstream: ``state``
    (``workers_state``); ``available`` when the supervisor's check and at least one worker's
    pool say so (``workers_available`` of ``workers`` that answered); ``in_flight`` and
    ``passive`` (the most consecutive failures, the longest ``down_for``) of the workers that
    answered now (``workers``: their ``upstream_states``); ``requests`` and ``failures`` since
    start from ``counted`` (``Kept(sum_upstreams).total()``: a worker killed and started again
    takes nothing back); ``health_check`` the supervisor's."""
    counts = {c["url"]: c for c in counted.get("upstreams", ())}
    merged = []
    for u in own:
        states = [w_u for w in workers for w_u in w.get("upstreams", ()) if w_u.get("url") == u["url"]]
        row = dict(u)
        row["state"] = workers_state(str(u["state"]), [str(s.get("state", "")) for s in states])
        row["workers_available"] = sum(1 for s in states if s.get("available"))
        row["workers"] = len(states)
        row["available"] = bool(u["available"]) and row["workers_available"] > 0
        row["in_flight"] = sum(int(s.get("in_flight", 0)) for s in states)
        for name in UPSTREAM_COUNTED:
            row[name] = int(counts.get(u["url"], {}).get(name, 0))
        passive = [s.get("passive") or {} for s in states]
        row["passive"] = {
            "consecutive_failures": max((int(p.get("consecutive_failures", 0)) for p in passive), default=0),
            "down_for": max((float(p.get("down_for", 0.0)) for p in passive), default=0.0)}
        merged.append(row)
    return merged


def sum_tables(parts: Iterable[Answer]) -> Answer:
    """Processes' ``LiveStats.snapshot`` folded for ``Kept``: the not-stored counts (since start)
    added up, with the example of the process that saw the most of each reason; the top URLs of
    each (the last one to two minutes it served) in ``gone``, with the time ``t`` they were read,
    as long as they are less than TOP_GENERATION older than the newest (``merge_snapshots``
    shows them that long: what the process served stays in the top list about as long as it
    would have, had it lived)."""
    reasons: dict[str, list[Any]] = {}
    gone: list[list[Any]] = []
    for part in parts:
        for reason, count, example in part.get("not_stored", ()):
            row = reasons.setdefault(reason, [0, example, 0])
            row[0] += int(count)
            if int(count) > row[2]:
                row[1], row[2] = example, int(count)
        gone += part.get("gone", ())
        if part.get("top") and part.get("t") is not None:
            gone.append([float(part["t"]), part["top"]])
    newest = max((t for t, _ in gone), default=0.0)
    return {"top": [], "not_stored": [[r, n, ex] for r, (n, ex, _) in reasons.items()],
            "gone": [[t, rows] for t, rows in gone if t > newest - TOP_GENERATION]}


class Series:
    """The console's time series: one point per sample, from the differences of ``Totals``."""

    def __init__(self, bounds: Sequence[float], points: int = SERIES_POINTS,
                 latency_window: int = LATENCY_WINDOW) -> None:
        self.bounds = tuple(bounds)
        self.points: collections.deque[dict[str, Any]] = collections.deque(maxlen=points)
        self._latency: collections.deque[dict[str, list[int]]] = collections.deque(maxlen=latency_window)
        self.kept = Kept(sum_totals)  # every process's latest totals, and the replaced ones' last
        self._last_time: float | None = None
        self.seq = 0
        self.totals: Totals = {}  # since start: the current processes' latest totals and the retired

    def add(self, now: float, parts: Sequence[Totals], elapsed_at: float | None = None
            ) -> dict[str, Any] | None:
        """A sample of every process's totals; the new point (None for the first sample,
        which only sets the baseline). ``now`` (the wall clock) labels the point (``t``);
        ``elapsed_at`` (the monotonic clock; ``now`` when not given) measures its ``dt``. Why:
        a step of the system clock back an hour made a point's dt -3600 (negative rates in the
        console and in ``cachegate top``, last_minute.seconds negative)."""
        requests: dict[str, int] = {}
        bytes_: dict[str, int] = {}
        counted = dict.fromkeys(_COUNTED, 0)
        latency: dict[str, list[int]] = {}
        for part in parts:
            old = self.kept.add_one(part)
            if old is None:
                continue  # a process seen for the first time: its baseline
            for k, v in _delta_map(part["requests"], old["requests"]).items():
                requests[k] = requests.get(k, 0) + v
            for k, v in _delta_map(part["bytes"], old["bytes"]).items():
                bytes_[k] = bytes_.get(k, 0) + v
            for k in _COUNTED:
                counted[k] += max(0, int(part.get(k, 0)) - int(old.get(k, 0)))
            for status, counts in part["latency"].items():
                before = old["latency"].get(status) or [0] * len(counts)
                diff = [max(0, int(x) - int(y)) for x, y in zip(counts, before, strict=True)]
                if any(diff):
                    latency[status] = add_counts(latency.get(status, []), diff)
        self.totals = self.kept.total()
        at = now if elapsed_at is None else elapsed_at
        previous, self._last_time = self._last_time, at
        if previous is None:
            return None
        self.seq += 1
        merged: list[int] = []
        for counts in latency.values():
            merged = add_counts(merged, counts)
        p50, p99 = (percentile(merged, self.bounds, q) for q in (0.5, 0.99))
        point = {"seq": self.seq, "t": round(now, 3), "dt": round(at - previous, 3),
                 "requests": requests, "bytes": bytes_, **counted,
                 "p50": _ms(p50), "p99": _ms(p99)}
        self.points.append(point)
        self._latency.append(latency)
        return point

    def since(self, seq: int) -> list[dict[str, Any]]:
        """The points after ``seq`` (all of them for 0, or when ``seq`` is from before a restart)."""
        if seq > self.seq or seq <= 0:
            return list(self.points)
        return [p for p in self.points if p["seq"] > seq]

    def latency(self) -> dict[str, dict[str, Any]]:
        """Per cache status over the last LATENCY_WINDOW samples: requests timed and p50/p90/p99 (ms)."""
        by_status: dict[str, list[int]] = {}
        for point in self._latency:
            for status, counts in point.items():
                by_status[status] = add_counts(by_status.get(status, []), counts)
        out: dict[str, dict[str, Any]] = {}
        for status, counts in sorted(by_status.items()):
            out[status] = {"count": sum(counts),
                           **{f"p{int(q * 100)}": _ms(percentile(counts, self.bounds, q))
                              for q in (0.5, 0.9, 0.99)}}
        return out

    def window(self, seconds: int) -> dict[str, Any]:
        """The last ``seconds`` points added up: requests by status, bytes by source, origin
        requests, fills, evictions, and the seconds they cover."""
        points = list(self.points)[-seconds:] if seconds > 0 else []
        requests: dict[str, int] = {}
        bytes_: dict[str, int] = {}
        out: dict[str, Any] = dict.fromkeys(_COUNTED, 0)
        for p in points:
            for k, v in p["requests"].items():
                requests[k] = requests.get(k, 0) + v
            for k, v in p["bytes"].items():
                bytes_[k] = bytes_.get(k, 0) + v
            for k in _COUNTED:
                out[k] += p[k]
        out.update(seconds=round(sum(p["dt"] for p in points), 3), requests=requests, bytes=bytes_)
        return out


def sum_totals(parts: Iterable[Totals]) -> Totals:
    """Processes' totals added up (requests, bytes and counters; latency left out)."""
    requests: dict[str, int] = {}
    bytes_: dict[str, int] = {}
    out: Totals = dict.fromkeys(_COUNTED, 0)
    for part in parts:
        for k, v in part["requests"].items():
            requests[k] = requests.get(k, 0) + int(v)
        for k, v in part["bytes"].items():
            bytes_[k] = bytes_.get(k, 0) + int(v)
        for k in _COUNTED:
            out[k] += int(part.get(k, 0))
    out.update(requests=requests, bytes=bytes_)
    return out


def ratios(requests: dict[str, int], bytes_: dict[str, int], origin: int) -> dict[str, float | None]:
    """Hit ratio (hits over client requests), request offload (client requests the origin did
    not see) and byte offload (body bytes sent from the store rather than the origin).

    >>> ratios({"HIT": 3, "MISS": 1}, {"memory": 300, "upstream": 100}, 1)
    {'hit_ratio': 0.75, 'request_offload': 0.75, 'byte_offload': 0.75}

    cachegate's own bodies (tier "none": error pages, refusals) are neither the store's nor
    the origin's, so they are no offload:

    >>> ratios({"HIT": 3, "ERROR": 1}, {"memory": 300, "upstream": 100, "none": 400}, 1)["byte_offload"]
    0.75

    PURGE requests are in no ratio (``NOT_IN_RATIOS``):

    >>> ratios({"HIT": 3, "MISS": 1, "PURGE": 40}, {}, 1)["request_offload"]
    0.75
    """
    total = sum(n for s, n in requests.items() if s not in NOT_IN_RATIOS)
    sent = sum(n for tier, n in bytes_.items() if tier != "none")
    return {
        "hit_ratio": _round(sum(n for s, n in requests.items() if s in HIT_STATUSES) / total)
        if total else None,
        "request_offload": _round(max(0.0, 1 - origin / total)) if total else None,
        "byte_offload": _round(1 - bytes_.get("upstream", 0) / sent) if sent else None,
    }


def _round(x: float) -> float:
    return round(x, 4)


def _ms(seconds: float | None) -> float | None:
    if seconds is None or math.isnan(seconds):
        return None
    return round(seconds * 1000, 3)


__all__ = ["FAST_SAMPLE", "HIT_STATUSES", "NOT_IN_RATIOS", "UPSTREAM_COUNTED", "Kept", "LiveStats",
           "NotStoredLog", "Places", "Series", "TopUrls", "merge_snapshots", "percentile", "ratios",
           "sum_tables", "sum_upstreams", "upstreams_of_workers", "workers_state"]
