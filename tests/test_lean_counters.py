"""LeanCounter exports exactly what prometheus-client's Counter exports (names, labels, values)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter

from proxy.metrics import LeanCounter, Metrics


def test_exposition_is_identical_to_prometheus_client_counter() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LeanCounter("x_requests", "Requests", ["status", "method"], registry=ours)
    b = PromCounter("x_requests", "Requests", ["status", "method"], registry=theirs)
    c = LeanCounter("x_plain", "Plain", registry=ours)
    d = PromCounter("x_plain", "Plain", registry=theirs)
    LeanCounter("x_unused", "Never used", ["reason"], registry=ours)
    PromCounter("x_unused", "Never used", ["reason"], registry=theirs)
    for counter in (a, b):
        counter.labels("HIT", "GET").inc()
        counter.labels("HIT", "GET").inc(2.5)
        counter.labels("MISS", "HEAD").inc()
    for counter in (c, d):
        counter.inc(3)
    assert generate_latest(ours) == generate_latest(theirs)


def test_label_values_are_strings_and_children_are_shared() -> None:
    counter = LeanCounter("y", "Y", ["status"])
    counter.labels(404).inc()
    counter.labels("404").inc()
    assert counter.values() == {("404",): 2.0}
    assert counter.labels("404") is counter.labels("404")


def test_misuse_raises_as_prometheus_client_does() -> None:
    counter = LeanCounter("z", "Z", ["a"])
    with pytest.raises(ValueError):
        counter.labels("a", "b")
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError):
        counter.inc()


def test_request_counts_add_up_methods() -> None:
    m = Metrics()
    m.requests.labels("HIT", "GET").inc()
    m.requests.labels("HIT", "HEAD").inc()
    m.requests.labels("MISS", "GET").inc()
    assert m.request_counts() == {"HIT": 2, "MISS": 1}
