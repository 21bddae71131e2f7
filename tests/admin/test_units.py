"""The pure parts of the admin API: tags, hosts, the metrics merge across workers, the request window."""

from __future__ import annotations

import doctest
import importlib

import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import ClusterMetrics, Metrics, RequestWindow, hit_ratio, render_families
from proxy.purge import PurgeSpec, host_matches, parse_purge, tags_from_headers
from proxy.shown import same_width, shown


@pytest.mark.parametrize("name", ["proxy.purge", "proxy.admin_client", "proxy.explain", "proxy.metrics",
                                  "proxy.shown"])
def test_docstring_examples_hold(name: str) -> None:
    assert doctest.testmod(importlib.import_module(name)).failed == 0


def test_shown_tells_a_control_from_text_that_reads_as_its_escape() -> None:
    """An ESC was shown as ``\\x1b``, and so was the text ``\\x1b`` as a server sent it: the
    one passed for the other (``shown(shown(x)) == shown(x)``). A backslash is now ``\\\\``."""
    real, typed = "tag-\x1b[2J\u202e", "tag-\\x1b[2J\\u202e"
    assert shown(real) == "tag-\\x1b[2J\\u202e"
    assert shown(typed) == "tag-\\\\x1b[2J\\\\u202e"
    assert shown(shown(real)) != shown(real)
    assert shown("C:\\temp\n", keep="") == "C:\\\\temp\\x0a"
    assert shown("plain text, no escapes") == "plain text, no escapes"
    # JSON writes its own backslashes as \\: only what a terminal acts on is escaped in it.
    assert shown('{"a": "\\\\ \\u001b \x1b"}', backslash=False) == '{"a": "\\\\ \\u001b \\x1b"}'
    assert same_width("a\\b\x1b") == "a\\b\ufffd"  # (one for one: the columns hold)


@pytest.mark.parametrize("headers, names, tags", [
    ([("Surrogate-Key", "a b\tc")], ["Surrogate-Key"], ("a", "b", "c")),
    ([("Surrogate-Key", "a"), ("Surrogate-Key", "b a")], ["Surrogate-Key"], ("a", "b")),
    ([("Cache-Tag", "x y, z ,,")], ["Cache-Tag"], ("x y", "z")),
    ([("X-Tags", "p,q r")], ["x-tags"], ("p", "q", "r")),
    ([("Surrogate-Key", "s"), ("Cache-Tag", "c")], ["Cache-Tag", "Surrogate-Key"], ("c", "s")),
    ([("Other", "o")], ["Surrogate-Key"], ()),
])
def test_tags_are_split_as_each_header_defines(headers: list[tuple[str, str]], names: list[str],
                                               tags: tuple[str, ...]) -> None:
    assert tags_from_headers(CIMultiDict(headers), names) == tags


@pytest.mark.parametrize("patterns, host, served", [
    (["shop.example"], "shop.example", True),
    (["shop.example"], "shop.example:8080", True),
    (["shop.example:8080"], "shop.example", False),
    (["shop.example:8080"], "shop.example:8080", True),
    (["*.example"], "a.example", True),
    (["*.example"], "a.b.example:81", True),
    (["*.example"], "example", False),
    (["*.example"], "badexample", False),
    (["Shop.Example."], "shop.example", True),
    ([], "shop.example", False),
])
def test_admin_hosts_patterns(patterns: list[str], host: str, served: bool) -> None:
    assert host_matches(patterns, host) is served


def test_purge_specs_name_their_hosts_and_kinds() -> None:
    spec = parse_purge({"urls": ["HTTP://Shop.Example:80/a?b"], "prefixes": ["https://img.example:8443/x/"],
                        "tags": ["t"]})
    assert spec.urls == ("http://shop.example/a?b",)
    assert spec.hosts == {"shop.example", "img.example:8443"}
    assert spec.kinds == ["url", "prefix", "tag"]
    assert PurgeSpec.from_json(spec.to_json()) == spec
    invalidation = PurgeSpec(urls=("http://a/",), invalidation=True)
    assert invalidation.kinds == ["invalidation"]
    assert PurgeSpec.from_json(invalidation.to_json()) == invalidation


def _worker(requests: dict[str, int], memory_entries: int, disk_bytes: int, up: float) -> Metrics:
    m = Metrics()
    for status, n in requests.items():
        m.requests.labels(status, "GET").inc(n)
        m.upstream_latency.labels("u").observe(0.01)
    m.reloads.labels("success").inc()  # each worker reloads too: only the supervisor's count
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def tiers():  # type: ignore[no-untyped-def]
        e = GaugeMetricFamily("cachegate_cache_entries", "Stored keys per tier", labels=["tier"])
        e.add_metric(["memory"], memory_entries)
        b = GaugeMetricFamily("cachegate_cache_bytes", "Stored bytes per tier", labels=["tier"])
        b.add_metric(["disk"], disk_bytes)
        u = GaugeMetricFamily("cachegate_upstream_up", "up", labels=["upstream"])
        u.add_metric(["u"], up)
        lost = CounterMetricFamily("cachegate_write_behind_lost", "lost")  # the machine's ring
        lost.add_metric([], 3)
        yield from (e, b, u, lost)

    m.add_collector(tiers)
    return m


def _parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_counters_add_up_across_workers_and_shared_gauges_are_counted_once() -> None:
    supervisor = _worker({}, 12, 5000, 1.0)
    supervisor.purges.labels("tag").inc()
    cluster = ClusterMetrics()
    cluster.update(0, 100, _worker({"HIT": 3, "MISS": 1}, 10, 5000, 1.0).snapshot())
    cluster.update(1, 101, _worker({"HIT": 2}, 7, 5000, 0.0).snapshot())
    m = _parse(render_families(cluster.merge(supervisor.snapshot(), cluster.workers())))
    assert m[("cachegate_requests_total", (("cache_status", "HIT"), ("method", "GET")))] == 5
    assert m[("cachegate_requests_total", (("cache_status", "MISS"), ("method", "GET")))] == 1
    assert m[("cachegate_upstream_latency_seconds_count", (("upstream", "u"),))] == 3
    # The machine's shared memory and disk: the supervisor's figures, once.
    assert m[("cachegate_cache_entries", (("tier", "memory"),))] == 12
    assert m[("cachegate_cache_bytes", (("tier", "disk"),))] == 5000
    assert m[("cachegate_write_behind_lost_total", ())] == 3
    assert m[("cachegate_config_reloads_total", (("result", "success"),))] == 1
    assert m[("cachegate_purges_total", (("kind", "tag"),))] == 1
    assert m[("cachegate_upstream_up", (("upstream", "u"),))] == 0.5  # the mean over workers


def test_a_restarted_workers_old_counts_are_kept_so_sums_never_go_down() -> None:
    cluster = ClusterMetrics()
    supervisor = _worker({}, 0, 0, 1.0).snapshot()
    cluster.update(0, 100, _worker({"HIT": 10}, 5, 0, 1.0).snapshot())
    cluster.update(1, 101, _worker({"HIT": 4}, 5, 0, 1.0).snapshot())
    before = _parse(render_families(cluster.merge(supervisor, cluster.workers())))
    cluster.update(0, 200, _worker({"HIT": 1}, 1, 0, 1.0).snapshot())  # worker 0 restarted as pid 200
    after = _parse(render_families(cluster.merge(supervisor, cluster.workers())))
    key = ("cachegate_requests_total", (("cache_status", "HIT"), ("method", "GET")))
    assert (before[key], after[key]) == (14, 15)
    assert after[("cachegate_cache_entries", (("tier", "memory"),))] == 0  # the supervisor's
    # The machine's and the supervisor's counters: the supervisor's alone, the dead worker's not kept.
    assert after[("cachegate_write_behind_lost_total", ())] == 3
    assert after[("cachegate_config_reloads_total", (("result", "success"),))] == 1


def test_the_window_covers_the_last_minute_of_samples() -> None:
    now = [0.0]
    w = RequestWindow(span=60, clock=lambda: now[0])
    assert w.last({"HIT": 5}) == (0.0, {})
    w.add({"HIT": 1, "MISS": 1})
    for t in range(5, 125, 5):
        now[0] = t
        w.add({"HIT": 1 + t, "MISS": 1})
    now[0] = 125
    seconds, recent = w.last({"HIT": 200, "MISS": 3})
    assert seconds == 60 and recent == {"HIT": 200 - 66, "MISS": 2}
    assert hit_ratio({"HIT": 3, "STALE": 1, "UPDATING": 1, "MISS": 5}) == 0.5
    assert hit_ratio({}) is None
