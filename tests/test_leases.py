"""The lease broker's bookkeeping (proxy/leases.py), without processes: who fetches, who is told what.

The end-to-end behaviour through ``cachegate run --workers 2`` is in test_herd_workers.py.
"""

from __future__ import annotations

from typing import Any

from proxy.leases import LEASE_MAX_AGE, RECENT_FOR, LeaseBroker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def broker() -> tuple[LeaseBroker, list[tuple[int, dict[str, Any]]], Clock]:
    told: list[tuple[int, dict[str, Any]]] = []
    clock = Clock()
    return LeaseBroker(lambda w, event: told.append((w, event)), clock), told, clock


async def test_the_first_worker_to_ask_fetches_and_the_others_hear_it_was_stored() -> None:
    b, told, _ = broker()
    first = await b.acquire(0, "k")
    assert first == {"granted": True, "token": 1, "recent": False}
    second = await b.acquire(1, "k")
    assert second == {"granted": False, "token": 1, "holder": 0}
    third = await b.acquire(2, "k")
    assert third["granted"] is False
    await b.head(0, "k", token=1, shareable=True, pass_=False)
    assert told == []  # a shareable head changes nothing for the waiters: they wait for the store
    await b.release(0, "k", token=1, outcome="stored")
    assert sorted(w for w, _ in told) == [1, 2]
    assert {e["outcome"] for _, e in told} == {"stored"}
    assert b.held == 0
    again = await b.acquire(1, "k")
    assert again["granted"] is True and again["recent"] is True  # look in the store first


async def test_a_response_that_is_not_shareable_sends_waiters_and_later_askers_upstream() -> None:
    b, told, _ = broker()
    await b.acquire(0, "private")
    await b.acquire(1, "private")
    await b.head(0, "private", token=1, shareable=False, pass_=True)
    assert told == [(1, {"key": "private", "token": 1, "outcome": "pass"})]
    late = await b.acquire(2, "private")
    assert late["head"] == {"shareable": False, "pass": True}
    await b.release(0, "private", token=1, outcome="failed")
    assert len(told) == 1  # the waiters were already sent on their way

    await b.acquire(0, "too-big")
    await b.acquire(1, "too-big")
    await b.head(0, "too-big", token=2, shareable=False, pass_=False)
    assert told[-1] == (1, {"key": "too-big", "token": 2, "outcome": "unshareable"})


async def test_a_refresh_that_does_not_wait_is_told_busy_and_not_counted_as_a_waiter() -> None:
    b, told, _ = broker()
    await b.acquire(0, "k")
    busy = await b.acquire(1, "k", block=False)
    assert busy["granted"] is False
    await b.release(0, "k", token=1, outcome="stored")
    assert told == []


async def test_an_error_reaches_the_waiters_with_its_status() -> None:
    b, told, _ = broker()
    await b.acquire(0, "k")
    await b.acquire(1, "k")
    await b.release(0, "k", token=1, outcome="error", status=504, message="read timed out")
    assert told == [(1, {"key": "k", "token": 1, "outcome": "error", "status": 504,
                         "message": "read timed out"})]


async def test_a_dead_holder_ends_its_leases_and_a_dead_waiter_is_forgotten() -> None:
    b, told, _ = broker()
    await b.acquire(0, "a")
    await b.acquire(1, "a")
    await b.acquire(2, "a")
    await b.acquire(1, "b")
    await b.acquire(0, "b")
    b.worker_gone(0)
    assert sorted((w, e["key"], e["outcome"]) for w, e in told) == [(1, "a", "gone"), (2, "a", "gone")]
    assert (await b.acquire(2, "a"))["granted"] is True  # a waiter takes the lease on
    await b.release(1, "b", token=2, outcome="stored")
    assert len(told) == 2  # worker 0 waited for "b", but it is gone: nobody is told


async def test_stale_messages_and_strangers_change_nothing() -> None:
    b, told, _ = broker()
    await b.acquire(0, "k")
    await b.acquire(1, "k")
    await b.release(0, "k", token=99, outcome="stored")  # not the current lease
    await b.head(0, "other", token=1, shareable=False, pass_=True)
    assert told == [] and b.held == 1


async def test_a_lease_never_released_is_taken_over_and_recent_stores_are_forgotten() -> None:
    b, told, clock = broker()
    await b.acquire(0, "k")
    await b.acquire(1, "k")
    clock.now += LEASE_MAX_AGE + 1
    taken = await b.acquire(2, "k")
    assert taken["granted"] is True
    assert told == [(1, {"key": "k", "token": 1, "outcome": "gone"})]
    await b.release(2, "k", token=taken["token"], outcome="stored")
    clock.now += RECENT_FOR + 1
    assert (await b.acquire(0, "k"))["recent"] is False
    counts = {s.labels["event"]: s.value for m in b.collect() if m.name == "cachegate_cross_worker_leases"
              for s in m.samples}
    assert counts["granted"] == 3.0 and counts["waited"] == 1.0 and counts["stored"] == 1.0
