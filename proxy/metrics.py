"""Prometheus metrics: one registry per process, Prometheus naming (``_total``, ``_seconds``, ``_bytes``).

Counters are plain numbers on the request path (``LeanCounter``: one dict lookup and
an addition) exported when scraped, as prometheus-client's own ``Counter`` would
export them (same family names, samples and labels). prometheus-client's ``Counter``
takes a lock and builds a label key per ``labels().inc()``, ~1-2.5 µs each, and a
hit makes two of them: 5-10 % of a whole 1 KiB hit. The event loop is the only
writer, so no lock is needed. Tier sizes are read when scraped, by a collector, so
the hit path never updates a gauge.

With several workers (``cachegate run --workers N``) every process keeps its own
registry and the supervisor adds them up when ``/metrics`` is scraped: each worker
sends a ``snapshot`` of its samples over the control channel and
``ClusterMetrics`` merges them. Why not prometheus-client's multiprocess mode: it
needs a shared directory and an environment variable set before the library is
imported, it cannot run our scrape-time collectors (tier sizes, upstream health),
and it leaves a file per process id behind; the control channel already connects
every worker to the supervisor. Merging rules:

- counters and histograms are summed over the supervisor and every worker; a
  worker that dies has its last reported values kept (``retired``), so the sums
  never go down when a worker is restarted (Prometheus would read that as a reset);
- families only the supervisor keeps (reloads, purges) and the tiers' figures
  (entries, bytes, evictions, write-behind losses) come from the supervisor alone
  (every worker sees the same shared memory and disk), and so does nothing of them
  from a dead worker's last values (``NOT_FROM_WORKERS``);
- other gauges are summed over workers (requests in flight), except
  ``cachegate_upstream_up``, the mean over workers (0.5: half of the workers send it
  traffic), and ``cachegate_tls_certificate_expiry_seconds``, the earliest over workers
  (a time: the first certificate a client may be served that expires).
"""

from __future__ import annotations

import bisect
import collections
import gc
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy import __version__, gctuning

# HIT_STATUSES: the X-Cache-Status values that count as hits in hit ratios (answered from the
# store without waiting for the origin; a collapsed waiter says HIT too: it cost no origin request).
from proxy.live import HIT_STATUSES, NOT_IN_RATIOS, LiveStats

# The *_created series double the scrape size and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# cachegate_requests_total's method for a request the HTTP parser refused: its method is not
# known (a field too long, a bad byte), or is one llhttp does not know (BREW, lower-case get),
# which would make the label as open-ended as what clients send. Every other request's method
# is one llhttp parsed: its list of methods bounds the label.
REFUSED_METHOD = "-"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Families that only the supervisor's numbers describe (workers forward these to it).
SUPERVISOR_ONLY = frozenset({"cachegate_config_reloads", "cachegate_purges", "cachegate_purged_entries",
                             "cachegate_admin_unauthorized", "cachegate_admin_refused",
                             # the supervisor restarts workers: theirs is always 0
                             "cachegate_worker_restarts",
                             # one value for the whole: the build, the start, the open-files limit
                             "cachegate_build_info", "process_start_time_seconds", "process_max_fds"})
# Families describing the machine's shared memory and disk tier: the supervisor's figures, once.
SHARED_TIER = frozenset({"cachegate_cache_entries", "cachegate_cache_bytes", "cachegate_evictions",
                         "cachegate_write_behind_lost", "cachegate_cache_budget_bytes"})
# Families describing each worker's own upstream pool: workers only, never the supervisor's.
# cachegate_fast_path_enabled too: the processes with client listeners (0.5: half of them).
WORKER_ONLY = frozenset({"cachegate_upstream_up", "cachegate_upstream_in_flight",
                         "cachegate_fast_path_enabled", "cachegate_tls_certificate_expiry_seconds"})
# Families whose worker samples count for nothing: summing them (or keeping a dead worker's
# last copy, ``ClusterMetrics.retire``) would count the supervisor's or the machine's number twice.
NOT_FROM_WORKERS = SUPERVISOR_ONLY | SHARED_TIER
MEAN_GAUGES = frozenset({"cachegate_upstream_up", "cachegate_fast_path_enabled"})
# Gauges that hold a time: the earliest over workers, never a sum.
MIN_GAUGES = frozenset({"cachegate_tls_certificate_expiry_seconds"})

# The label sets each labelled counter below is known to take, exported at 0 from the start
# (``Metrics.__init__``): rate() and increase() read a series' first sample as its start, so a
# counter first exported at 1 (one rejected reload, the first storage error) shows no increase
# and an alert on it never fires. Open-ended labels (rule names, URLs' statuses) are not here,
# nor are cachegate_requests (cache status by method: a product of two lists) and
# cachegate_upstream_requests (status classes: whatever an origin sends);
# upstream error kinds are added per configured upstream by ``Runtime.open``
# (``proxy.http_client.UPSTREAM_ERROR_KINDS``). tests/ops/test_metrics_ops.py checks the types
# these mirror (admin_guard.RefusalReason, flight.FlightOutcome, PurgeSpec.kinds, frontend.TIERS)
# are covered.
KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    "cachegate_config_reloads": ("success", "failure"),
    "cachegate_storage_errors": ("read", "spool", "write", "invalidate", "forget"),
    "cachegate_admin_refused": ("host", "origin", "content_type", "content_encoding", "rate", "csrf"),
    "cachegate_purge_refused": ("forbidden", "disabled", "origin"),
    "cachegate_slow_readers": ("resumed", "cut_off"),
    # ``proxy.web.headtimeout.LimitedHandler.limited``
    "cachegate_client_connections_closed": ("send_timeout", "cap_oldest", "cap_refused", "max_unsent"),
    # the store's own reasons (a full disk, too large, the spools' share used up, the disk tier
    # over cache.disk.size); the response's reasons (PRIVATE, RULE-NO-STORE:<rule>, ...) stay
    # open-ended
    "cachegate_not_stored": ("STORE-FAILED", "TOO-LARGE", "SPOOLS-FULL", "DISK-OVER-SIZE"),
    # how a flight ended: ``proxy.flight.FlightOutcome``'s labels
    "cachegate_flights": ("filled", "freshened", "passed", "broke_off", "abandoned", "unreachable",
                          "adopted", "stored_elsewhere", "dispersed", "skipped", "stopped", "aborted"),
    # why a 304 to a revalidation was not used: ``proxy.flight.MissPath._origin``
    "cachegate_unusable_304s": ("validator", "purged"),
    "cachegate_purges": ("url", "prefix", "tag", "all", "invalidation"),  # ``PurgeSpec.kinds``
    "cachegate_purge_failures": ("url", "prefix", "tag", "all", "invalidation"),  # the same kinds
    # where a body came from: ``proxy.web.frontend.TIERS``
    "cachegate_response_bytes": ("memory", "disk", "upstream", "none"),
    # where this process ran out of descriptors opening a connection: ``proxy.upstream.EXHAUSTED_WHERE``
    "cachegate_out_of_resources": ("upstream_connect", "health_check"),
}

# cachegate_worker_restarts_total's reasons (``Supervisor._ended``), at 0 for every configured
# worker from the start (the supervisor's: it knows the workers).
WORKER_END_REASONS = ("signal", "oom", "exit", "hung")

# A snapshot: [[family name, type, help, [[sample name, {labels}, value], ...]], ...]
Snapshot = list[list[Any]]


class CounterChild:
    """One label set's value of a ``LeanCounter``: ``inc`` is an attribute addition."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LeanCounter(Collector):
    """A counter family with prometheus-client's ``Counter`` interface for updates
    (``labels(...).inc()``, or ``inc()`` without labels) and its exposition at scrape time.

    Hot paths keep the child (``labels(...)`` once) and add to ``child.value`` directly.
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild] = {}
        self._plain = CounterChild() if not self.labelnames else None
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values!r}")
            key = tuple(str(v) for v in values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = CounterChild()
        return child

    def inc(self, amount: float = 1) -> None:
        if self._plain is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels(...).inc()")
        self._plain.inc(amount)

    def values(self) -> dict[tuple[str, ...], float]:
        """Every label set's value (``()`` for a counter without labels)."""
        if self._plain is not None:
            return {(): self._plain.value}
        return {k: c.value for k, c in self._children.items()}

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values().items()):
            family.add_metric(list(labels), value)
        yield family


Counter = LeanCounter

# cachegate_responses_total's classes, always exported (at 0 from the start: KNOWN_LABELS says why).
# No other reaches a client: an origin's status outside 100-599 is answered 502 (UPSTREAM-INVALID).
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class StatusClassCounter(Collector):
    """cachegate_responses_total: the answers of the client listeners by status class, one int
    per class in ``counts``, indexed by ``status // 100`` (a status is 100-999). The request
    paths add to ``counts[status // 100]`` directly: a list store, no label lookup, no call
    (the fast path's hits are the most frequent answers there are)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.counts = [0] * 10
        if registry is not None:
            registry.register(self)

    def add(self, status: int) -> None:
        """Count an answer of ``status`` (the paths that are not hot call this)."""
        self.counts[status // 100] += 1

    def values(self) -> dict[str, int]:
        """Answers by class: every one of STATUS_CLASSES, and any other class once seen."""
        return {f"{i}xx": n for i, n in enumerate(self.counts) if 1 <= i <= 5 or n}

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=["code"])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["code"])
        for code, n in self.values().items():
            family.add_metric([code], n)
        yield family

# Client request durations: a fresh memory hit takes tens of microseconds, a miss what the
# origin takes, so the buckets start well below LATENCY_BUCKETS' first (1 ms).
REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class HistogramChild:
    """One label set's buckets of a ``LeanHistogram`` (counts per bucket, not cumulative)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        """Count ``value`` ``weight`` times (a sampled observation stands for ``weight`` of them)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += weight
        self.sum += value * weight


class LeanHistogram(Collector):
    """A histogram family with prometheus-client's ``Histogram`` exposition, whose ``observe``
    is a bisect and two additions (prometheus-client's takes a lock and walks every bucket:
    ≈ 1.5 µs, a fifth of a fast-path hit)."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str],
                 buckets: tuple[float, ...], registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets)
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values!r}")
            child = self._children.setdefault(tuple(str(v) for v in values), HistogramChild(self.buckets))
        return child

    def values(self) -> dict[tuple[str, ...], list[int]]:
        """Every label set's per-bucket counts (the last is +Inf), not cumulative."""
        return {k: list(c.counts) for k, c in list(self._children.items())}

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(floatToGoString(b) for b in self.buckets), "+Inf"]  # type: ignore[no-untyped-call]
        for labels, child in list(self._children.items()):
            running, cumulative = 0, []
            for edge, n in zip(edges, child.counts, strict=True):
                running += n
                cumulative.append((edge, float(running)))
            family.add_metric(list(labels), cumulative, child.sum)
        yield family


@dataclass(frozen=True, slots=True)
class FastPathState:
    """What the start-up probe of the fast hit path found (``proxy.web.fastpath.probe``)."""

    enabled: bool
    reason: str  # "ok", or a short token naming what is missing (the metric's label)
    detail: str = ""  # for the operator: which aiohttp internals are missing

    def to_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "reason": self.reason, "detail": self.detail}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cachegate_requests", "Client requests by cache status and method",
                                ["cache_status", "method"], registry=r)
        self.responses = StatusClassCounter(
            "cachegate_responses",
            "Answers of the client listeners by status class (code: 1xx to 5xx), as the access log's "
            "status: cachegate's own error pages and refusals, the parser's refusals and the 408 of a "
            "head not whole in time included; 499 (the client left before its answer was whole) is a 4xx",
            registry=r)
        self.response_bytes = Counter("cachegate_response_bytes", "Body bytes sent to clients by source",
                                      ["tier"], registry=r)
        self.upstream_requests = Counter("cachegate_upstream_requests", "Requests sent upstream",
                                         ["upstream", "status_class"], registry=r)
        self.upstream_errors = Counter("cachegate_upstream_errors", "Upstream failures by kind",
                                       ["upstream", "kind"], registry=r)
        self.upstream_latency = LeanHistogram("cachegate_upstream_latency_seconds",
                                              "Time to the upstream response head", ["upstream"],
                                              LATENCY_BUCKETS, registry=r)
        self.coalesced = Counter("cachegate_coalesced_requests",
                                 "Requests served from another request's fetch", registry=r)
        self.not_stored = Counter("cachegate_not_stored", "Responses not stored, by reason",
                                  ["reason"], registry=r)
        self.origin_date_behind = Counter(
            "cachegate_origin_date_behind",
            "Responses that arrived stale only because their Date was behind this clock by more than "
            "their lifetime and 60 s (the origin's clock is behind: cache.apparent_age), by upstream",
            ["upstream"], registry=r)
        self.purges = Counter("cachegate_purges", "Purge operations by kind", ["kind"], registry=r)
        self.purge_failures = Counter(
            "cachegate_purge_failures",
            "Purges answered failed (the admin API's and PURGE's 503 or 500: a full disk, the supervisor "
            "or the cluster not answering) and unsafe methods' invalidations that failed, by kind",
            ["kind"], registry=r)
        self.worker_restarts = Counter(
            "cachegate_worker_restarts",
            "Worker processes that ended without the supervisor stopping them, by worker and reason: "
            "signal (killed by a signal, not put down to the OOM killer), oom (a SIGKILL put down to "
            "the kernel's OOM killer), exit (exited with a status), hung (killed by the supervisor: "
            "no answer to its pings, not ready in time, or a purge not acknowledged)",
            ["worker", "reason"], registry=r)
        self.purged_entries = Counter("cachegate_purged_entries", "Entries removed or marked stale by purges",
                                      registry=r)
        self.purge_refused = Counter("cachegate_purge_refused",
                                     "PURGE requests on the client listener refused, by reason",
                                     ["reason"], registry=r)
        self.admin_unauthorized = Counter("cachegate_admin_unauthorized",
                                          "Admin API requests refused for a missing or wrong token",
                                          registry=r)
        self.admin_refused = Counter("cachegate_admin_refused",
                                     "Admin API requests refused before the token check (DNS rebinding "
                                     "and CSRF guards, an encoded body, wrong tokens too fast), by "
                                     "reason: host, origin, content_type, content_encoding, rate, csrf",
                                     ["reason"], registry=r)
        self.reloads = Counter("cachegate_config_reloads", "Config reloads by result", ["result"], registry=r)
        self.storage_errors = Counter("cachegate_storage_errors",
                                      "Storage failures degraded to a miss (read), to not storing "
                                      "(spool, write), or to forgetting a variant whose body is gone "
                                      "in memory only (forget), by operation", ["operation"], registry=r)
        self.slow_readers = Counter("cachegate_slow_readers",
                                    "Clients that fell too far behind a shared fill: resumed from the "
                                    "stored response, or cut off (connection aborted)", ["outcome"],
                                    registry=r)
        self.client_closed = Counter("cachegate_client_connections_closed",
                                     "Client connections closed by a limit: send_timeout (a reply "
                                     "unread that long), cap_oldest (the oldest waiting for its "
                                     "client, to admit a new one past max_connections), cap_refused "
                                     "(a new one past max_connections, every other busy), max_unsent "
                                     "(a reply unread for a second, past the worker's max_unsent)",
                                     ["reason"],
                                     registry=r)
        self.access_log_dropped = Counter("cachegate_access_log_dropped_lines",
                                          "Access log lines not written: a write failed (a full disk)",
                                          registry=r)
        self.fills = Counter("cachegate_fills", "Responses stored in the cache (a complete body committed)",
                             registry=r)
        self.out_of_resources = Counter(
            "cachegate_out_of_resources",
            "Connections to an upstream this process could not open: out of file descriptors or "
            "socket memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), by where: upstream_connect (the "
            "request was answered 503), health_check (the check was skipped). Not an upstream error",
            ["where"], registry=r)
        self.flights = Counter("cachegate_flights",
                               "Origin fetches shared by a key's clients (flights), by how they ended "
                               "(proxy.flight)", ["outcome"], registry=r)
        self.unusable_304s = Counter("cachegate_unusable_304s",
                                     "304s to a revalidation that could not freshen the stored response, "
                                     "each followed by a full fetch, by reason: validator (its ETag or "
                                     "Last-Modified is another response's), purged (the stored response "
                                     "was purged meanwhile)", ["reason"], registry=r)
        # Fast-path hits are timed one in FAST_SAMPLE and counted FAST_SAMPLE times (proxy.live).
        self.request_duration = LeanHistogram(
            "cachegate_request_duration_seconds",
            "Time to answer a client request, by cache status (fast-path hits sampled)",
            ["cache_status"], REQUEST_BUCKETS, registry=r)
        self.live = LiveStats()
        for family in (self.reloads, self.storage_errors, self.admin_refused, self.purge_refused,
                       self.slow_readers, self.not_stored, self.flights, self.purges, self.purge_failures,
                       self.response_bytes, self.out_of_resources, self.client_closed, self.unusable_304s):
            for value in KNOWN_LABELS[family.name]:
                family.labels(value)  # at 0 from the start (KNOWN_LABELS)
        # Whether this process's client listeners answer fresh hits on the fast path (set when
        # they start: ``proxy.web.server.start_proxy_listener``); None: it has none.
        self.fast_path: FastPathState | None = None
        # Per TLS listener (its address), the notAfter of the certificate it serves, a Unix
        # time: set when it starts and at each reload (``proxy.web.server``).
        self.tls_expiry: dict[str, float] = {}
        # -- deploy and operate: the build and the processes ---------------------------------
        self.process_label = "0"  # this process in cachegate_worker_*: a worker id, or "supervisor"
        self._process = ProcessCollector(registry=r)  # process_*, read from /proc when scraped
        self.add_collector(self._collect_process)

    def _collect_process(self) -> Iterator[Metric]:
        """The build, whether the fast hit path is on, and this process's CPU, memory, open files
        and garbage collector under its worker label (process_* is summed over the processes when
        several serve)."""
        info = GaugeMetricFamily("cachegate_build_info", "cachegate's version (always 1)", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        fast = self.fast_path
        if fast is not None:
            gauge = GaugeMetricFamily("cachegate_fast_path_enabled",
                                      "1 when fresh hits are answered on the fast hit path; 0 when this "
                                      "aiohttp lacks what it needs (reason) and every hit takes the "
                                      "general path", labels=["reason"])
            gauge.add_metric([fast.reason], 1 if fast.enabled else 0)
            yield gauge
        # Always named (no series without a TLS listener), as the documented table lists it.
        expiry = GaugeMetricFamily("cachegate_tls_certificate_expiry_seconds",
                                   "When the certificate a TLS listener serves expires (its notAfter, "
                                   "a Unix time), by listener", labels=["listener"])
        for listener, when in sorted(self.tls_expiry.items()):
            expiry.add_metric([listener], when)
        yield expiry
        label = [self.process_label]
        frozen = GaugeMetricFamily("cachegate_worker_gc_frozen_objects",
                                   "Objects start-up built that the garbage collector no longer scans "
                                   "(frozen once the process serves), by worker", labels=["worker"])
        frozen.add_metric(label, gctuning.frozen())
        yield frozen
        runs = CounterMetricFamily("cachegate_worker_gc_collections",
                                   "Garbage collections by generation (2: full), by worker",
                                   labels=["worker", "generation"])
        for generation, stats in enumerate(gc.get_stats()):
            runs.add_metric([*label, str(generation)], stats["collections"])
        yield runs
        for family in self._process.collect():
            for sample in family.samples:
                target = _PER_WORKER.get(sample.name)
                if target is not None:
                    name, kind, doc = target
                    per: CounterMetricFamily | GaugeMetricFamily
                    if kind == "counter":
                        per = CounterMetricFamily(name, doc, labels=["worker"])
                    else:
                        per = GaugeMetricFamily(name, doc, labels=["worker"])
                    per.add_metric(label, sample.value)
                    yield per

    def answered(self, url: str | None, cache_status: str, seconds: float, weight: int = 1) -> None:
        """A client request answered (the fast path calls it for one answer in FAST_SAMPLE,
        with that ``weight``: ``proxy.live``)."""
        self.request_duration.labels(cache_status).observe(seconds, weight)
        if url is not None:
            self.live.top.add(url, cache_status in HIT_STATUSES, weight)

    def not_stored_because(self, reason: str, url: str) -> None:
        self.not_stored.labels(reason).inc()
        self.live.not_stored.add(reason, url)

    def add_collector(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> Snapshot:
        """Every sample of this process's registry, as JSON-ready lists (sent to the supervisor)."""
        return snapshot_of(self.registry.collect())

    def sent_upstream(self) -> int:
        """Requests sent upstream so far: those answered with a head and those that got none (a
        timeout, a refused connection), as the documented error rate counts them: an error kind
        that got a head (``status_*``, ``body_*``) is among the answered already, and a
        ``pool_wait`` sent nothing. The answered alone read an origin that hangs as offload 1."""
        answered = sum(self.upstream_requests.values().values())
        failed = sum(n for (_, kind), n in self.upstream_errors.values().items()
                     if kind != "pool_wait" and not kind.startswith(("status_", "body_")))
        return int(answered + failed)

    def request_counts(self) -> dict[str, int]:
        """Client requests so far by X-Cache-Status (all methods together)."""
        out: dict[str, int] = {}
        for (status, _method), n in list(self.requests.values().items()):
            out[status] = out.get(status, 0) + int(n)
        return out


# The process_* samples also given per process (nothing on hosts without /proc).
_PER_WORKER = {
    "process_cpu_seconds_total": ("cachegate_worker_cpu_seconds", "counter",
                                  "CPU time (user and system) of each process, by worker"),
    "process_resident_memory_bytes": ("cachegate_worker_resident_memory_bytes", "gauge",
                                      "Resident memory of each process, by worker"),
    "process_open_fds": ("cachegate_worker_open_fds", "gauge",
                         "Open file descriptors of each process, by worker"),
}


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()


def tier_families(entries: dict[str, int], size: dict[str, int], evictions: dict[str, int],
                  budget: dict[str, int]) -> Iterator[Metric]:
    e = GaugeMetricFamily("cachegate_cache_entries", "Stored keys per tier", labels=["tier"])
    b = GaugeMetricFamily("cachegate_cache_bytes", "Stored bytes per tier", labels=["tier"])
    ev = CounterMetricFamily("cachegate_evictions", "Evictions per tier", labels=["tier"])
    cap = GaugeMetricFamily("cachegate_cache_budget_bytes",
                            "The bytes each tier may hold, the most cachegate_cache_bytes reaches: "
                            "memory, the shared memory's ring (cache.memory less each process's "
                            "decoded cache and the ring's index); disk, the shards' budget in force "
                            "(cache.disk.size less the index's and journals' share). As running: a "
                            "new cache.memory or cache.disk.size applies at a restart", labels=["tier"])
    for tier, n in entries.items():
        e.add_metric([tier], n)
    for tier, n in size.items():
        b.add_metric([tier], n)
    for tier, n in evictions.items():
        ev.add_metric([tier], n)
    for tier, n in budget.items():
        cap.add_metric([tier], n)
    yield e
    yield b
    yield ev
    yield cap


def snapshot_of(families: Iterable[Metric]) -> Snapshot:
    out: Snapshot = []
    for f in families:
        samples = [[s.name, dict(s.labels), float(s.value)] for s in f.samples
                   if not s.name.endswith("_created")]
        out.append([f.name, f.type, f.documentation, samples])
    return out


def hit_ratio(counts: dict[str, int]) -> float | None:
    """Hits (HIT, STALE, UPDATING) over every client request but PURGEs (``NOT_IN_RATIOS``);
    None before the first request."""
    total = sum(n for s, n in counts.items() if s not in NOT_IN_RATIOS)
    if total == 0:
        return None
    return sum(n for s, n in counts.items() if s in HIT_STATUSES) / total


class RequestWindow:
    """Request counts sampled every few seconds, for "hit ratio over the last minute".

    Sampling cumulative counters (rather than counting into per-second buckets)
    keeps the request path untouched: the window is the difference between the
    latest counts and those of about a minute ago.
    """

    def __init__(self, span: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.span = span
        self.clock = clock
        self._samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()

    def add(self, counts: dict[str, int]) -> None:
        now = self.clock()
        self._samples.append((now, dict(counts)))
        # Keep one sample at least ``span`` old, so the window covers the whole minute.
        while len(self._samples) >= 2 and now - self._samples[1][0] >= self.span:
            self._samples.popleft()

    def last(self, counts: dict[str, int]) -> tuple[float, dict[str, int]]:
        """(seconds covered, counts in that time) up to ``counts`` (the current totals)."""
        now = self.clock()
        base_time, base = now, counts
        for t, c in self._samples:
            if now - t <= self.span + 1e-9:
                base_time, base = t, c
                break
        delta = {k: v - base.get(k, 0) for k, v in counts.items()}
        return now - base_time, {k: v for k, v in delta.items() if v > 0}


class ClusterMetrics:
    """Adds up the supervisor's registry and its workers' snapshots (see the module docstring)."""

    def __init__(self) -> None:
        self._last: dict[int, Snapshot] = {}  # worker pid -> its latest snapshot
        self._worker_pid: dict[int, int] = {}  # worker id -> pid of its current process
        self._retired: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self._types: dict[str, tuple[str, str]] = {}

    def update(self, worker_id: int, pid: int, snapshot: Snapshot) -> None:
        """Record a worker's snapshot; a new pid for a worker id retires the old process's counters."""
        old = self._worker_pid.get(worker_id)
        if old is not None and old != pid:
            self.retire(old)
        self._worker_pid[worker_id] = pid
        self._last[pid] = snapshot

    def retire(self, pid: int) -> None:
        snap = self._last.pop(pid, None)
        if snap is None:
            return
        for name, kind, doc, samples in snap:
            if kind == "gauge" or name in NOT_FROM_WORKERS:
                continue
            self._types.setdefault(name, (kind, doc))
            for sample, labels, value in samples:
                k = (name, sample, tuple(sorted(labels.items())))
                self._retired[k] = self._retired.get(k, 0.0) + value

    def workers(self) -> list[Snapshot]:
        live = set(self._worker_pid.values())
        return [s for pid, s in self._last.items() if pid in live]

    def merge(self, own: Snapshot, workers: list[Snapshot]) -> list[Metric]:
        """The supervisor's snapshot ``own`` (plus extra families) and the live workers', merged."""
        sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = dict(self._retired)
        counts: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
        types = dict(self._types)

        def add(snap: Snapshot, is_worker: bool) -> None:
            for name, kind, doc, samples in snap:
                if name in (NOT_FROM_WORKERS if is_worker else WORKER_ONLY):
                    continue
                types.setdefault(name, (kind, doc))
                for sample, labels, value in samples:
                    k = (name, sample, tuple(sorted(labels.items())))
                    if name in MIN_GAUGES:
                        sums[k] = min(sums.get(k, value), value)
                    else:
                        sums[k] = sums.get(k, 0.0) + value
                    counts[k] = counts.get(k, 0) + 1

        add(own, False)
        for snap in workers:
            add(snap, True)
        families: dict[str, Metric] = {}
        for name, (kind, doc) in types.items():
            families[name] = Metric(name, doc, kind)
        for (name, sample, labels), value in sorted(sums.items(), key=lambda kv: exposition_order(kv[0])):
            if name in MEAN_GAUGES and counts.get((name, sample, labels)):
                value /= counts[(name, sample, labels)]
            families[name].add_sample(sample, dict(labels), value)
        return list(families.values())


def exposition_order(key: tuple[str, str, tuple[tuple[str, str], ...]]) -> tuple[Any, ...]:
    """Where a merged sample goes in /metrics: each series together (a histogram's buckets,
    ``_count`` and ``_sum`` of one label set, as prometheus-client writes them), its buckets by
    the number ``le`` names. The text format requires increasing ``le``; sorting the strings
    put ``+Inf`` first and ``10.0`` before ``2.5``.

    >>> sorted([("h", "h_bucket", (("le", v), ("u", "a"))) for v in ("+Inf", "10.0", "2.5")],
    ...        key=exposition_order)[0][2][0], exposition_order(("h", "h_sum", (("u", "a"),)))
    (('le', '2.5'), ('h', (('u', 'a'),), 'h_sum', 0.0))
    """
    name, sample, labels = key
    rest = tuple(kv for kv in labels if kv[0] != "le")
    le = next((v for k, v in labels if k == "le"), None)
    try:
        bound = float(le) if le is not None else 0.0  # float("+Inf") is inf: the last bucket
    except ValueError:
        bound = math.inf
    return name, rest, sample, bound


def render_families(families: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    fams = list(families)
    registry.register(_FunctionCollector(lambda: iter(fams)))
    return generate_latest(registry)


def merge_single(own: Snapshot, extra: Snapshot) -> list[Metric]:
    """One process: its registry plus extra families (or extra samples of the same families)."""
    merged: dict[str, Metric] = {}
    for name, kind, doc, samples in [*own, *extra]:
        m = merged.get(name)
        if m is None:
            m = merged[name] = Metric(name, doc, kind)
        for sample, labels, value in samples:
            m.add_sample(sample, labels, value)
    return list(merged.values())
