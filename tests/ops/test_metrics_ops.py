"""The metrics operators graph: client latency by cache status, process_* per worker and summed,
the build, fills and the write-behind queue."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.live import FAST_SAMPLE
from proxy.metrics import REQUEST_BUCKETS, ClusterMetrics, LeanHistogram, Metrics
from tests.conftest import MakeProxy
from tests.harness import Origin

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: bytes | str) -> Samples:
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_lean_histogram_exposition_is_prometheus_clients() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LeanHistogram("x_seconds", "X", ["status"], REQUEST_BUCKETS, registry=ours)
    b = PromHistogram("x_seconds", "X", ["status"], buckets=REQUEST_BUCKETS, registry=theirs)
    for h in (a, b):
        for value in (0.00005, 0.0001, 0.0003, 0.2, 31.0, 1.0):
            h.labels("HIT").observe(value)
        h.labels("MISS").observe(0.01)
    assert generate_latest(ours) == generate_latest(theirs)


async def test_a_scrape_shows_latency_by_cache_status_fills_and_the_process(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.route("/a", body=b"a" * 100, headers={"Cache-Control": "max-age=60"})
    proxy = await make_proxy()
    await proxy.get("/a")
    await asyncio.sleep(0.05)
    for _ in range(FAST_SAMPLE):  # fast-path hits: one in FAST_SAMPLE is timed, counted FAST_SAMPLE times
        await proxy.get("/a")
    m = samples((await proxy.admin("GET", "/metrics")).body)
    for status, n in (("MISS", 1), ("HIT", FAST_SAMPLE)):
        assert m[("cachegate_request_duration_seconds_count", (("cache_status", status),))] == n
        assert m[("cachegate_request_duration_seconds_bucket", (("cache_status", status), ("le", "+Inf")))] == n
    assert m[("cachegate_build_info", (("version", __version__),))] == 1
    assert m[("cachegate_fills_total", ())] == 1
    assert ("cachegate_disk_writes_pending", ()) in m
    assert m[("process_resident_memory_bytes", ())] > 1 << 20
    assert m[("process_open_fds", ())] > 3
    assert m[("cachegate_worker_resident_memory_bytes", (("worker", "0"),))] > 1 << 20
    assert m[("cachegate_worker_cpu_seconds_total", (("worker", "0"),))] > 0
    assert m[("cachegate_worker_open_fds", (("worker", "0"),))] > 3
    # In-process (the test suite's own interpreter): nothing settled, nothing frozen.
    assert m[("cachegate_worker_gc_frozen_objects", (("worker", "0"),))] == 0
    for generation in "012":
        assert ("cachegate_worker_gc_collections_total", (("generation", generation), ("worker", "0"))) in m


def test_several_processes_are_summed_and_shown_per_worker() -> None:
    """The supervisor's merge: process_* summed over every process, start time, fd limit and
    build from the supervisor alone, cachegate_worker_* one series per process."""
    supervisor, w0, w1 = Metrics(), Metrics(), Metrics()
    supervisor.process_label, w0.process_label, w1.process_label = "supervisor", "0", "1"
    snaps = [m.snapshot() for m in (supervisor, w0, w1)]
    cluster = ClusterMetrics()
    cluster.update(0, 100, snaps[1])
    cluster.update(1, 101, snaps[2])
    merged = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in cluster.merge(snaps[0], cluster.workers()) for s in f.samples}
    assert merged[("cachegate_build_info", (("version", __version__),))] == 1
    rss = [v for (name, labels), v in merged.items() if name == "cachegate_worker_resident_memory_bytes"]
    assert sorted(dict(labels)["worker"] for (name, labels) in merged
                  if name == "cachegate_worker_resident_memory_bytes") == ["0", "1", "supervisor"]
    # (All three are this process, whose resident size may move between two reads of it: a
    # page or two, not another process's whole size.)
    assert merged[("process_resident_memory_bytes", ())] == pytest.approx(sum(rss), rel=0.01)
    own = {(s[0], tuple(sorted(s[1].items()))): s[2] for f in snaps[0] for s in f[3]}
    assert merged[("process_max_fds", ())] == own[("process_max_fds", ())]
    assert merged[("process_start_time_seconds", ())] == own[("process_start_time_seconds", ())]


@pytest.mark.slow
async def test_two_workers_show_their_own_processes_and_one_build(origin: Origin, tmp_path: Path) -> None:
    from tests.storage.procs import ProxyProcess, write_config

    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url,
                                                     "cache: {memory: 16MB, disk: null}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        m: Samples = {}
        for _ in range(50):  # the supervisor asks the workers when scraped
            m = samples((await proxy.admin("GET", "/metrics")).body)
            if ("cachegate_worker_open_fds", (("worker", "1"),)) in m:
                break
            await asyncio.sleep(0.1)
        workers = {dict(labels)["worker"] for name, labels in m if name == "cachegate_worker_open_fds"}
        assert workers == {"0", "1", "supervisor"}
        assert m[("cachegate_build_info", (("version", __version__),))] == 1
        assert m[("process_open_fds", ())] == sum(
            v for (name, _), v in m.items() if name == "cachegate_worker_open_fds")
        # Each process froze what its start-up built (tens of thousands of objects: modules,
        # config, rules) once it served, and counts its collections per generation.
        for w in ("0", "1", "supervisor"):
            assert m[("cachegate_worker_gc_frozen_objects", (("worker", w),))] > 10_000, w
            for generation in "012":
                assert ("cachegate_worker_gc_collections_total", (("generation", generation), ("worker", w))) in m
    finally:
        await proxy.stop()


def test_a_serving_process_freezes_its_start_up_and_collects_less_often() -> None:
    """``proxy.gctuning`` in a fresh interpreter (it changes the whole process's collector):
    a reload before the process serves changes nothing; ``settle`` freezes and raises the
    young generation's threshold; a reload afterwards collects the cycles that were frozen
    (a replaced config's) and freezes again; on an event loop, the young generation is
    collected on a timer, one per process."""
    script = """
import gc, weakref
from proxy import gctuning
default = gc.get_threshold()
gctuning.resettle()
assert gc.get_threshold() == default and gctuning.frozen() == 0, "resettle before settle"

class Old:  # a replaced config's object, in a cycle, alive when the process settled
    pass
old = Old(); old.me = old
gone = weakref.ref(old)
gctuning.settle()
assert gc.get_threshold() == gctuning.THRESHOLD, gc.get_threshold()
assert gctuning.frozen() > 1000, gctuning.frozen()
del old
gc.collect()
assert gone() is not None, "a frozen cycle is not collected"
gctuning.resettle()
assert gone() is None, "the reload collected it"
assert gctuning.frozen() > 1000 and gc.get_threshold() == gctuning.THRESHOLD

# A reload on the event loop: answered first, collected on the loop's next turn.
import asyncio
async def reload_on_the_loop():
    again = Old(); again.me = again
    ref = weakref.ref(again)
    gctuning.resettle()  # frozen with the rest, as at start
    del again
    gctuning.resettle_soon()
    assert ref() is not None, "not during the reload itself"
    await asyncio.sleep(0)
    assert ref() is None, "on the loop's next turn"
asyncio.run(reload_on_the_loop())

# On a running loop, the young generation is collected every YOUNG_EVERY seconds whatever the
# allocation count says (nothing is allocated here), by one timer however often it resettles.
gctuning.YOUNG_EVERY = 0.05
young = []
gc.callbacks.append(lambda phase, info: young.append(info["generation"]) if phase == "stop" else None)
async def collected_on_a_timer():
    gctuning.settle()
    young.clear()
    await asyncio.sleep(0.52)
    alone = young.count(0)
    assert 5 <= alone <= 11, young  # 10 on an idle machine; 0 without the timer
    gctuning.resettle()
    gctuning.resettle()
    young.clear()
    await asyncio.sleep(0.52)
    assert young.count(0) <= 11, young  # not a timer per settle
    # The older generations have their turns on the timer too (an explicit young collection
    # only counts towards the middle one's threshold): here every 3rd tick a middle one, and
    # every 2nd of those a full one (without that: only young ones, whatever the counts).
    gctuning.THRESHOLD = (10_000, 2, 1)
    gctuning.settle()
    young.clear()
    await asyncio.sleep(0.62)
    assert 1 in young and 2 in young, young
asyncio.run(collected_on_a_timer())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


async def test_a_fresh_cachegate_exports_its_known_events_at_zero(origin: Origin, tmp_path: Path) -> None:
    """rate() and increase() read a series' first sample as its start: a reload rejected once,
    first exported at 1, showed no increase, and an alert on it never fired (so did the first
    broken-off flight, the first tag purge, the first body from upstream). A cachegate that has
    seen nothing exports every known label set at 0 (a real process, scraped)."""
    from typing import get_args

    from proxy.flight import FlightOutcome
    from proxy.http_client import UPSTREAM_ERROR_KINDS
    from proxy.metrics import KNOWN_LABELS
    from proxy.web.frontend import TIERS
    from tests.storage.procs import ProxyProcess, write_config

    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url,
                                                     "cache: {memory: 16MB, disk: null}\n"))
    await proxy.start()
    try:
        await proxy.wait_for(lambda: bool(proxy.admin_url))
        m = samples((await proxy.admin("GET", "/metrics")).body)
    finally:
        await proxy.stop()
    # Counted from the first flight, purge and body sent: read from the sources, not KNOWN_LABELS
    # (cachegate_flights_total, _purges_total and _response_bytes_total appeared at their first).
    known = [("cachegate_flights_total", "outcome", o.label) for o in get_args(FlightOutcome)]
    known += [("cachegate_purges_total", "kind", k) for k in ("url", "prefix", "tag", "all", "invalidation")]
    known += [("cachegate_response_bytes_total", "tier", t) for t in TIERS]
    missing = [k for k in known if m.get((k[0], ((k[1], k[2]),))) != 0]
    assert not missing, missing
    label = {"cachegate_config_reloads": "result", "cachegate_storage_errors": "operation",
             "cachegate_admin_refused": "reason", "cachegate_purge_refused": "reason",
             "cachegate_slow_readers": "outcome", "cachegate_not_stored": "reason",
             "cachegate_flights": "outcome", "cachegate_purges": "kind", "cachegate_response_bytes": "tier",
             "cachegate_out_of_resources": "where", "cachegate_client_connections_closed": "reason",
             "cachegate_unusable_304s": "reason", "cachegate_purge_failures": "kind"}
    assert set(label) == set(KNOWN_LABELS)
    for family, values in KNOWN_LABELS.items():
        for value in values:
            assert m.get((family + "_total", ((label[family], value),))) == 0, (family, value)
    assert {"success", "failure", "read", "spool", "write", "host", "csrf", "forbidden", "cut_off",
            "STORE-FAILED", "broke_off", "invalidation", "upstream"} <= {
        v for values in KNOWN_LABELS.values() for v in values}
    errors = {dict(labels)["upstream"]: [] for name, labels in m if name == "cachegate_upstream_errors_total"}
    assert len(errors) == 1 and next(iter(errors)).rstrip("/") == origin.url.rstrip("/"), errors
    for (name, labels), value in m.items():
        if name == "cachegate_upstream_errors_total":
            assert value == 0, labels
            errors[dict(labels)["upstream"]].append(dict(labels)["kind"])
    assert sorted(next(iter(errors.values()))) == sorted(UPSTREAM_ERROR_KINDS)


def test_the_known_label_sets_cover_the_typed_ones() -> None:
    """KNOWN_LABELS mirrors label types declared elsewhere: a new refusal reason is exported at
    0 too, or this fails."""
    from typing import get_args

    from proxy.errors import UpstreamConnectError, UpstreamProtocolError
    from proxy.flight import FlightOutcome
    from proxy.http_client import (
        UPSTREAM_ERROR_KINDS,
        PoolWaitTimeout,
        UpstreamBodyError,
        UpstreamConnectTimeout,
        UpstreamDNSError,
        UpstreamDNSTimeout,
        UpstreamReadTimeout,
        UpstreamTotalTimeout,
        body_error_kind,
        error_kind,
    )
    from proxy.metrics import KNOWN_LABELS
    from proxy.purge import PurgeSpec
    from proxy.web.admin_guard import RefusalReason
    from proxy.web.frontend import TIERS

    assert set(get_args(RefusalReason)) <= set(KNOWN_LABELS["cachegate_admin_refused"])
    # how a flight ends, what a purge is, where a body comes from: each value exported at 0
    assert {o.label for o in get_args(FlightOutcome)} == set(KNOWN_LABELS["cachegate_flights"])
    specs = (PurgeSpec(urls=("http://a/",)), PurgeSpec(keys=("k",)), PurgeSpec(prefixes=("http://a/",)),
             PurgeSpec(tags=("t",)), PurgeSpec(all=True), PurgeSpec(keys=("k",), invalidation=True))
    assert {k for spec in specs for k in spec.kinds} == set(KNOWN_LABELS["cachegate_purges"])
    assert KNOWN_LABELS["cachegate_purge_failures"] == KNOWN_LABELS["cachegate_purges"]
    assert set(TIERS) == set(KNOWN_LABELS["cachegate_response_bytes"])
    errors = (UpstreamConnectError("x"), UpstreamConnectTimeout("x"), PoolWaitTimeout("x"), UpstreamReadTimeout("x"),
              UpstreamTotalTimeout("x"), UpstreamProtocolError("x"), UpstreamBodyError("x"), UpstreamDNSError("x"),
              UpstreamDNSTimeout("x"))
    in_a_body = (UpstreamReadTimeout("x"), UpstreamTotalTimeout("x"), UpstreamBodyError("x"))
    kinds = {error_kind(e) for e in errors} | {body_error_kind(e) for e in in_a_body}
    assert kinds == set(UPSTREAM_ERROR_KINDS)


@pytest.mark.slow
async def test_the_write_behind_queue_counts_what_memory_holds_and_the_disk_does_not_yet(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cachegate_disk_writes_pending ("the write-behind queue") counted only big bodies written
    straight to disk: 50 fills held in memory, none on disk, and it said 0. The owner's
    write-behind backlog is in it (two workers: the supervisor owns the directory)."""
    from tests.storage.procs import ProxyProcess, write_config

    for i in range(5):
        origin.route(f"/c/{i}", body=b"c" * 1000, headers={"Cache-Control": "max-age=600"})
    monkeypatch.setenv("CACHEGATE_PERSIST_INTERVAL", "3600")  # a disk far behind
    disk = tmp_path / "cache"
    proxy = ProxyProcess(str(tmp_path), write_config(
        str(tmp_path), origin.url, f"cache: {{memory: 16MB, max_object: 1MB, disk: {{path: '{disk}', size: 64MB}}}}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        for i in range(5):
            assert (await proxy.get(f"/c/{i}")).status == 200
        m: Samples = {}
        for _ in range(100):  # the fills reach the shared memory, the scrape asks the workers
            m = samples((await proxy.admin("GET", "/metrics")).body)
            if m.get(("cachegate_cache_entries", (("tier", "memory"),))) == 5:
                break
            await asyncio.sleep(0.1)
        assert m[("cachegate_cache_entries", (("tier", "memory"),))] == 5
        assert m[("cachegate_cache_entries", (("tier", "disk"),))] == 0
        assert m[("cachegate_disk_writes_pending", ())] == 5
    finally:
        await proxy.stop()
