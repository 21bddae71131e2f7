"""Prometheus metrics: one registry per process, Prometheus naming (``_total``, ``_seconds``, ``_bytes``).

Counters are updated on the request path; tier sizes are read when scraped, by a
collector, so the hit path never updates a gauge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The *_created series double the scrape size and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cachegate_requests", "Client requests by cache status and method",
                                ["cache_status", "method"], registry=r)
        self.response_bytes = Counter("cachegate_response_bytes", "Body bytes sent to clients by source",
                                      ["tier"], registry=r)
        self.upstream_requests = Counter("cachegate_upstream_requests", "Requests sent upstream",
                                         ["upstream", "status_class"], registry=r)
        self.upstream_errors = Counter("cachegate_upstream_errors", "Upstream failures by kind",
                                       ["upstream", "kind"], registry=r)
        self.upstream_latency = Histogram("cachegate_upstream_latency_seconds",
                                          "Time to the upstream response head", ["upstream"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.coalesced = Counter("cachegate_coalesced_requests",
                                 "Requests served from another request's fetch", registry=r)
        self.not_stored = Counter("cachegate_not_stored", "Responses not stored, by reason",
                                  ["reason"], registry=r)
        self.purges = Counter("cachegate_purges", "Purge operations by kind", ["kind"], registry=r)
        self.purged_entries = Counter("cachegate_purged_entries", "Entries removed or marked stale by purges",
                                      registry=r)
        self.reloads = Counter("cachegate_config_reloads", "Config reloads by result", ["result"], registry=r)
        self.storage_errors = Counter("cachegate_storage_errors", "Storage failures degraded to a miss",
                                      ["operation"], registry=r)

    def add_collector(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()


def tier_families(entries: dict[str, int], size: dict[str, int], evictions: dict[str, int]
                  ) -> Iterator[Metric]:
    e = GaugeMetricFamily("cachegate_cache_entries", "Stored keys per tier", labels=["tier"])
    b = GaugeMetricFamily("cachegate_cache_bytes", "Stored bytes per tier", labels=["tier"])
    ev = CounterMetricFamily("cachegate_evictions", "Evictions per tier", labels=["tier"])
    for tier, n in entries.items():
        e.add_metric([tier], n)
    for tier, n in size.items():
        b.add_metric([tier], n)
    for tier, n in evictions.items():
        ev.add_metric([tier], n)
    yield e
    yield b
    yield ev
