"""The console's per-request tables and per-second series (proxy.live): plain data, no clock."""

from __future__ import annotations

from proxy.live import (
    TOP_GENERATION,
    Kept,
    NotStoredLog,
    Series,
    TopUrls,
    merge_snapshots,
    percentile,
    ratios,
    sum_tables,
    sum_upstreams,
    upstreams_of_workers,
)
from proxy.metrics import REQUEST_BUCKETS, LeanHistogram, Metrics


def totals(pid: int, hit: int = 0, miss: int = 0, origin: int = 0, mem: int = 0, up: int = 0,
           hit_latency: list[int] | None = None) -> dict:
    return {"pid": pid, "requests": {"HIT": hit, "MISS": miss}, "bytes": {"memory": mem, "upstream": up},
            "origin": origin, "fills": miss, "evictions": 0,
            "latency": {"HIT": hit_latency or [0] * (len(REQUEST_BUCKETS) + 1)}}


def test_top_urls_rank_by_requests_with_their_hits_over_two_generations():
    top = TopUrls()
    top.rotate(0.0)
    for _ in range(3):
        top.add("http://a/x", True)
    top.add("http://a/x", False)
    top.add("http://a/y", True, weight=16)
    top.rotate(61.0)  # a new generation: the previous one still counts
    top.add("http://a/x", True)
    assert top.top(10) == [["http://a/y", 16, 16], ["http://a/x", 5, 4]]
    top.rotate(122.0)  # two generations on: the first is gone
    assert top.top(10) == [["http://a/x", 1, 1]]


def test_top_urls_stay_bounded_under_a_long_tail_of_one_off_urls():
    top = TopUrls(capacity=100)
    for _ in range(50):
        top.add("http://a/hot", True)
    for i in range(10_000):
        top.add(f"http://a/once/{i}", False)
    assert len(top.current) <= 100
    assert top.top(1) == [["http://a/hot", 50, 50]]


def test_top_urls_stay_bounded_in_bytes_under_long_one_off_urls():
    """2,000 URLs of 8 KB (a request line's limit) were 16 MB a generation in every worker."""
    top = TopUrls(capacity=2000, max_bytes=64 * 1024)
    for _ in range(50):
        top.add("http://a/hot", True)
    for i in range(3_000):
        top.add(f"http://a/once/{i}/" + "x" * 8000, False)
        assert sum(map(len, top.current)) <= 64 * 1024 + 8100
    assert top.top(1) == [["http://a/hot", 50, 50]]


def test_not_stored_keeps_a_count_and_the_last_url_per_reason():
    log = NotStoredLog(capacity=2)
    log.add("PRIVATE", "http://a/1")
    log.add("PRIVATE", "http://a/2")
    log.add("NO-STORE", "http://a/3")
    log.add("SET-COOKIE", "http://a/4")  # over capacity: not kept
    assert log.rows() == [["PRIVATE", 2, "http://a/2"], ["NO-STORE", 1, "http://a/3"]]


def test_snapshots_of_two_workers_add_up_with_hit_ratios():
    a = {"top": [["http://a/x", 10, 5]], "not_stored": [["PRIVATE", 3, "http://a/p1"]]}
    b = {"top": [["http://a/x", 10, 10], ["http://a/y", 1, 0]], "not_stored": [["PRIVATE", 5, "http://a/p2"]]}
    merged = merge_snapshots([a, b], 10)
    assert merged["top_urls"][0] == {"url": "http://a/x", "requests": 20, "hits": 15, "hit_ratio": 0.75}
    assert merged["not_stored"] == [{"reason": "PRIVATE", "count": 8, "example": "http://a/p2"}]


def test_percentiles_interpolate_inside_a_bucket_like_histogram_quantile():
    bounds = [0.001, 0.01, 0.1]
    assert percentile([0, 0, 0, 0], bounds, 0.5) is None
    assert percentile([10, 0, 0, 0], bounds, 0.5) == 0.0005
    assert abs(percentile([50, 50, 0, 0], bounds, 0.99) - (0.001 + 0.009 * 0.98)) < 1e-12
    assert percentile([0, 0, 0, 1], bounds, 0.5) == 0.1


def test_the_first_sample_is_a_baseline_and_later_ones_are_differences():
    s = Series(REQUEST_BUCKETS)
    assert s.add(100.0, [totals(1, hit=1000, miss=10)]) is None  # counts since start are not a rate
    point = s.add(101.0, [totals(1, hit=1030, miss=12, origin=2, mem=3000, up=200)])
    assert point is not None
    assert point["requests"] == {"HIT": 30, "MISS": 2}
    assert point["origin"] == 2 and point["fills"] == 2
    assert point["bytes"] == {"memory": 3000, "upstream": 200}
    assert s.since(0) == [point] and s.since(point["seq"]) == []


def test_a_restarted_worker_starts_from_a_new_baseline_never_a_negative_rate():
    s = Series(REQUEST_BUCKETS)
    s.add(0.0, [totals(1, hit=500), totals(2, hit=500)])
    s.add(1.0, [totals(1, hit=510), totals(2, hit=505)])
    point = s.add(2.0, [totals(1, hit=520), totals(3, hit=2)])  # worker 2 came back as pid 3
    assert point is not None and point["requests"] == {"HIT": 10}
    point = s.add(3.0, [totals(1, hit=520), totals(3, hit=9)])
    assert point is not None and point["requests"] == {"HIT": 7}


def worker(w: int, pid: int, **counts: int) -> dict:
    return {**totals(pid, **counts), "worker": w}


def since_start(s: Series) -> int:
    return sum(s.totals["requests"].values())


def test_totals_since_start_keep_what_a_restarted_worker_had_counted():
    s = Series(REQUEST_BUCKETS)
    s.add(0.0, [totals(1), worker(0, 10), worker(1, 11)])
    s.add(1.0, [totals(1), worker(0, 10, hit=2000), worker(1, 11, hit=1000, origin=5)])
    assert since_start(s) == 3000
    # Worker 1 is killed: a sample without it, then one with its successor (pid 12), counting afresh.
    point = s.add(2.0, [totals(1), worker(0, 10, hit=2010)])
    assert point is not None and point["requests"] == {"HIT": 10}
    assert since_start(s) == 3010 and s.totals["origin"] == 5  # its last totals still count
    point = s.add(3.0, [totals(1), worker(0, 10, hit=2020), worker(1, 12, hit=3)])
    assert point is not None and point["requests"] == {"HIT": 10}  # pid 12's first sight: its baseline
    assert since_start(s) == 3023 and s.totals["origin"] == 5
    point = s.add(4.0, [totals(1), worker(0, 10, hit=2030), worker(1, 12, hit=10, origin=1)])
    assert point is not None and point["requests"] == {"HIT": 17} and point["origin"] == 1
    assert since_start(s) == 3040 and s.totals["origin"] == 6
    # Restarted again: the retired totals add up (and the old process is kept once, not per sample).
    for t in (5.0, 6.0):
        s.add(t, [totals(1), worker(0, 10, hit=2030), worker(1, 13)])
    assert since_start(s) == 3040 and s.totals["origin"] == 6
    assert s.kept.pids() == [1, 10, 13]


def test_a_worker_missing_from_a_sample_is_counted_as_last_seen():
    """A worker too slow to answer one sample: the totals do not dip, and its requests meanwhile
    are in the next point it answers."""
    s = Series(REQUEST_BUCKETS)
    s.add(0.0, [worker(0, 10), worker(1, 11)])
    s.add(1.0, [worker(0, 10, hit=5), worker(1, 11, hit=5)])
    s.add(2.0, [worker(0, 10, hit=6)])
    assert since_start(s) == 11
    point = s.add(3.0, [worker(0, 10, hit=7), worker(1, 11, hit=9)])
    assert point is not None and point["requests"] == {"HIT": 5}
    assert since_start(s) == 16


def test_a_pid_given_again_to_another_worker_is_a_new_process():
    s = Series(REQUEST_BUCKETS)
    s.add(0.0, [worker(0, 10, hit=100), worker(1, 11, hit=50)])
    s.add(1.0, [worker(1, 10, hit=1), worker(0, 12, hit=2)])  # both restarted; 10 is worker 1's now
    assert since_start(s) == 153  # the old processes retired, the new ones counted from 0
    point = s.add(2.0, [worker(1, 10, hit=4), worker(0, 12, hit=2)])
    assert point is not None and point["requests"] == {"HIT": 3}
    assert since_start(s) == 156


def test_latency_by_status_covers_the_last_minute_of_samples():
    buckets = len(REQUEST_BUCKETS) + 1
    s = Series(REQUEST_BUCKETS, latency_window=2)
    fast = [0] * buckets
    s.add(0.0, [totals(1, hit_latency=fast)])
    s.add(1.0, [totals(1, hit_latency=[10] + [0] * (buckets - 1))])  # 10 answers under 0.1 ms
    slow = [10, 0, 0, 0, 0, 0, 0, 0, 0, 10] + [0] * (buckets - 10)  # and then 10 of 50-100 ms
    s.add(2.0, [totals(1, hit_latency=slow)])
    lat = s.latency()["HIT"]
    assert lat["count"] == 20
    assert lat["p50"] == 0.1 and 50 < lat["p99"] <= 100
    s.add(3.0, [totals(1, hit_latency=slow)])
    s.add(4.0, [totals(1, hit_latency=slow)])  # both timed seconds are out of the window
    assert s.latency() == {}


def test_window_adds_up_the_last_points_and_ratios_follow():
    s = Series(REQUEST_BUCKETS)
    s.add(0.0, [totals(1)])
    s.add(1.0, [totals(1, hit=3, miss=1, origin=1, mem=300, up=100)])
    s.add(2.0, [totals(1, hit=6, miss=2, origin=2, mem=600, up=200)])
    w = s.window(60)
    assert w["requests"] == {"HIT": 6, "MISS": 2} and w["seconds"] == 2.0
    assert ratios(w["requests"], w["bytes"], w["origin"]) == {
        "hit_ratio": 0.75, "request_offload": 0.75, "byte_offload": 0.75}
    assert ratios({}, {}, 0) == {"hit_ratio": None, "request_offload": None, "byte_offload": None}


def test_byte_offload_leaves_cachegate_s_own_bodies_out():
    # tier "none" (error pages, refusals) is neither the store's nor the origin's
    assert ratios({"HIT": 3, "ERROR": 1}, {"memory": 300, "upstream": 100, "none": 400}, 1)["byte_offload"] == 0.75
    assert ratios({"ERROR": 1}, {"none": 400}, 0)["byte_offload"] is None


def test_lean_histogram_exposes_what_prometheus_client_histogram_exposes():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LeanHistogram("x_seconds", "X", ["status"], REQUEST_BUCKETS, registry=ours)
    b = Histogram("x_seconds", "X", ["status"], buckets=REQUEST_BUCKETS, registry=theirs)
    for v in (0.00005, 0.0001, 0.003, 0.2, 7.0, 100.0):
        a.labels("HIT").observe(v)
        b.labels("HIT").observe(v)
    a.labels("MISS").observe(0.01, 2)
    b.labels("MISS").observe(0.01)
    b.labels("MISS").observe(0.01)
    assert generate_latest(ours) == generate_latest(theirs).replace(b"# TYPE x_seconds_created gauge\n", b"")


def test_metrics_answered_times_the_request_and_counts_the_url():
    m = Metrics()
    m.answered("http://a/x", "HIT", 0.0002)
    m.answered("http://a/x", "MISS", 0.02)
    m.answered(None, "ERROR", 0.001)
    assert m.live.top.top(5) == [["http://a/x", 2, 1]]
    assert sum(m.request_duration.values()[("ERROR",)]) == 1


def upstream_states(pid: int, worker: int, requests: int, failures: int, in_flight: int = 0) -> dict:
    return {"pid": pid, "worker": worker,
            "upstreams": [{"url": "http://o", "requests": requests, "failures": failures, "in_flight": in_flight}]}


def test_upstream_counts_keep_a_killed_workers_last_read_and_count_its_successor_from_zero():
    """Like Prometheus counters of one series: a worker's successor (a new pid in its place)
    neither adds to its counts twice nor resets them; a pid given again to another worker retires
    what it counted there; requests in flight are no counter and are not kept."""
    kept = Kept(sum_upstreams)
    kept.add([upstream_states(10, 0, 100, 3, in_flight=2), upstream_states(11, 1, 50, 1)])
    assert kept.total() == {"upstreams": [{"url": "http://o", "requests": 150, "failures": 4}]}
    kept.add([upstream_states(10, 0, 120, 3)])  # worker 1 killed: counted as last read
    assert kept.total()["upstreams"][0]["requests"] == 170
    kept.add([upstream_states(10, 0, 120, 3), upstream_states(12, 1, 0, 0)])  # its successor
    assert kept.total()["upstreams"][0] == {"url": "http://o", "requests": 170, "failures": 4}
    kept.add([upstream_states(10, 0, 121, 3), upstream_states(12, 1, 5, 2)])
    assert kept.total()["upstreams"][0] == {"url": "http://o", "requests": 176, "failures": 6}
    kept.add([upstream_states(13, 0, 0, 0), upstream_states(12, 1, 5, 2)])  # worker 0 restarted
    kept.add([upstream_states(12, 0, 1, 0), upstream_states(14, 1, 0, 0)])  # pid 12 given again
    assert kept.total()["upstreams"][0] == {"url": "http://o", "requests": 177, "failures": 6}
    assert kept.pids() == [12, 14]


def pool_row(state: str, available: bool, requests: int = 0, failures: int = 0, in_flight: int = 0,
             passive: tuple[int, float] = (0, 0.0), health_check: dict | None = None) -> dict:
    return {"url": "http://o", "state": state, "available": available, "weight": 1, "in_flight": in_flight,
            "requests": requests, "failures": failures,
            "passive": {"consecutive_failures": passive[0], "down_for": passive[1]},
            "health_check": health_check}


def test_the_whole_proxys_upstream_is_the_workers_state_and_counts_with_the_supervisors_check():
    """With --workers N the supervisor's pool sends nothing and never ejects passively: the
    top level of GET /upstreams (and the console) takes the workers' state, counts kept by
    process since start, and the supervisor's active check, which alone can say down for all."""
    check = {"path": "/healthz", "healthy": True, "consecutive_successes": 4,
             "consecutive_failures": 0, "last_error": None}
    own = [pool_row("up", True, health_check=check)]
    workers = [{"pid": 10, "worker": 0, "upstreams": [pool_row("down (passive, 7.5s left)", False, 5, 3,
                                                               passive=(3, 7.5))]},
               {"pid": 11, "worker": 1, "upstreams": [pool_row("up", True, 4, 1, in_flight=2, passive=(1, 0.0))]}]
    kept = Kept(sum_upstreams)
    kept.add([{"pid": 9, "worker": 1, "upstreams": [pool_row("up", True, 100, 10)]}])  # killed since
    kept.add(workers)
    [row] = upstreams_of_workers(own, workers, kept.total())
    assert row == {"url": "http://o", "state": "up in 1 of 2 workers, down (passive) in 1 of 2 workers",
                   "available": True, "weight": 1, "in_flight": 2, "requests": 109, "failures": 14,
                   "passive": {"consecutive_failures": 3, "down_for": 7.5}, "health_check": check,
                   "workers": 2, "workers_available": 1}
    workers[1]["upstreams"] = [pool_row("down (passive, 9.0s left)", False, 6, 3, passive=(3, 9.0))]
    [row] = upstreams_of_workers(own, workers, sum_upstreams(workers))
    assert (row["state"], row["available"], row["workers_available"]) == ("down (passive) in 2 of 2 workers", False, 0)
    assert (row["requests"], row["failures"], row["passive"]["down_for"]) == (11, 6, 9.0)
    sick = [pool_row("down (health check)", False, health_check={**check, "healthy": False})]
    workers[1]["upstreams"] = [pool_row("up", True)]
    [row] = upstreams_of_workers(sick, workers, sum_upstreams(workers))
    assert (row["state"], row["available"], row["workers_available"]) == ("down (health check)", False, 1)
    assert row["health_check"]["healthy"] is False
    [row] = upstreams_of_workers(own, [], sum_upstreams([]))  # no worker answered
    assert (row["state"], row["available"], row["requests"]) == ("up; no worker answered", False, 0)


def test_not_stored_counts_are_kept_and_a_killed_workers_top_urls_age_out_of_the_window():
    kept = Kept(sum_tables)
    a = {"pid": 10, "worker": 0, "t": 100.0, "top": [["http://a/x", 10, 5]],
         "not_stored": [["PRIVATE", 3, "http://a/p1"]]}
    b = {"pid": 11, "worker": 1, "t": 100.0, "top": [["http://a/x", 10, 10]],
         "not_stored": [["PRIVATE", 5, "http://a/p2"], ["NO-STORE", 1, "http://a/n"]]}
    kept.add([a, b])
    fresh = {"pid": 12, "worker": 1, "t": 102.0, "top": [["http://a/x", 1, 1]],
             "not_stored": [["PRIVATE", 1, "http://a/p3"]]}
    kept.add([{**a, "t": 102.0}, fresh])  # worker 1 killed and started again as pid 12
    merged = merge_snapshots(kept.parts(), 10, 102.0)
    assert merged["not_stored"] == [{"reason": "PRIVATE", "count": 9, "example": "http://a/p2"},
                                    {"reason": "NO-STORE", "count": 1, "example": "http://a/n"}]
    assert merged["top_urls"] == [{"url": "http://a/x", "requests": 21, "hits": 16, "hit_ratio": 0.7619}]
    # A generation after it was last read, what the killed worker served is out of the top list
    # (it would have been out of its own); its not-stored counts stay.
    later = merge_snapshots(kept.parts(), 10, 100.0 + TOP_GENERATION)
    assert later["top_urls"][0]["requests"] == 11
    assert later["not_stored"][0]["count"] == 9
    # Retired top lists are kept only while they can still be shown.
    late = 100.0 + 2 * TOP_GENERATION
    kept.add([{**a, "pid": 13, "t": late}, fresh])  # worker 0 restarted (pid 10 retired) ...
    kept.add([{**a, "pid": 14, "t": late + 1}, fresh])  # ... and again, two generations on
    assert [t for t, _ in kept.parts()[0]["gone"]] == [late]


def test_a_dead_workers_top_urls_leave_the_list_a_generation_after_its_last_read_even_unreplaced():
    """A worker that is not started again (its code changed, or in a long backoff) is never
    replaced: its top URLs still age out, its not-stored counts stay."""
    kept = Kept(sum_tables)
    kept.add([{"pid": 10, "worker": 0, "t": 100.0, "top": [["http://a/x", 4, 4]],
               "not_stored": [["PRIVATE", 2, "http://a/p"]]}])
    assert merge_snapshots(kept.parts(), 10, 100.0 + TOP_GENERATION - 1)["top_urls"][0]["requests"] == 4
    gone = merge_snapshots(kept.parts(), 10, 100.0 + TOP_GENERATION)
    assert gone["top_urls"] == [] and gone["not_stored"][0]["count"] == 2


def test_a_points_seconds_are_the_monotonic_clocks_and_its_label_the_wall_clocks():
    """A step of the wall clock back an hour between two samples made the point's dt -3600."""
    s = Series(REQUEST_BUCKETS)
    s.add(10_000.0, [worker(0, 10)], 5.0)
    point = s.add(10_001.0 - 3600, [worker(0, 10, hit=3)], 6.0)
    assert point is not None and (point["t"], point["dt"]) == (6401.0, 1.0)
    assert s.window(60)["seconds"] == 1.0
