"""The miss path's flights (``proxy.flight``): every way a flight ends is reached, each ends once,
in one place, and the workers waiting on its lease hear how it went."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.cluster.fills import Contended
from proxy.flight import Aborted, Attempt
from proxy.leases import Busy, Granted, Waiting
from tests.engine.fakes import (
    FakeLeases,
    FakeShared,
    FakeSpool,
    Rig,
    answer,
    make_rig,
    read,
    told,
    until,
    upstream_error,
)

CACHEABLE = {"Cache-Control": "max-age=60"}


def key_of(rig: Rig, path: str) -> str:
    from proxy.policy.keys import cache_key

    head = rig.request(path).head
    return cache_key(head, rig.engine.rules.plan(head).key)


async def test_a_flight_whose_clients_all_left_and_that_stores_nothing_stops_fetching(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    a = answer(body=b"x" * 300_000, headers={"Cache-Control": "private"}, chunk=100_000,
               hold=asyncio.Queue())
    rig.origin.route("/a", a)
    reply = await rig.get("/a")
    assert reply.body is not None and not isinstance(reply.body, bytes)  # streamed
    body = reply.body.__aiter__()
    assert len(await body.__anext__()) == 100_000
    await body.aclose()  # the client went away
    a.release(2)
    await rig.settled(abandoned=1)
    assert rig.origin.wires[0].discarded  # the origin's connection is dropped, not read to the end
    assert rig.origin.wires[0].sent == 2
    await rig.engine.close()


async def test_a_fill_another_node_wrote_through_to_the_shared_tier_is_adopted_without_the_origin(
        tmp_path: Path) -> None:
    shared = FakeShared()
    a, b = make_rig(tmp_path / "a"), make_rig(tmp_path / "b")
    a.engine.shared = b.engine.shared = shared
    for rig in (a, b):
        rig.origin.route("/a", answer(body=b"from a", headers=CACHEABLE))
    assert await read(await a.get("/a")) == b"from a"
    await a.settled(filled=1)
    await until(lambda: bool(shared.stored))  # written through behind the answer
    assert list(shared.stored) == [key_of(a, "/a")]
    await until(lambda: bool(shared.released))
    assert shared.released == [(key_of(a, "/a"), "stored")]  # the fill lock, released once written
    reply = await b.get("/a")
    assert (reply.status, reply.x_cache, await read(reply)) == (200, "HIT", b"from a")
    await b.settled(adopted=1)
    assert b.origin.sent == []
    assert b.store.bodies() == [b"from a"]  # kept in b's own tiers: the next request is b's own hit
    assert (await b.get("/a")).x_cache == "HIT"
    for rig in (a, b):
        await rig.engine.close()


@pytest.mark.parametrize(("headers", "length_known", "word"), [
    ({}, True, "too_large"),  # its Content-Length is over shared_max_object
    ({}, False, "too_large"),  # chunked: let go once its body grows past it
    ({"Set-Cookie": "s=1"}, True, "not_shared"),  # not stored at all
])
async def test_a_fill_that_will_not_be_written_through_lets_the_cluster_lock_go_before_its_body_ends(
        tmp_path: Path, headers: dict[str, str], length_known: bool, word: str) -> None:
    """The other nodes waiting on the fill lock fetch at once: they are told as soon as the
    head (or the body's growth) shows the fill cannot be shared, not when the download ends."""
    shared = FakeShared()
    shared.max_object = 150_000
    rig = make_rig(tmp_path)
    rig.engine.shared = shared
    a = answer(body=b"x" * 300_000, headers={**CACHEABLE, **headers}, chunk=100_000, hold=asyncio.Queue())
    if not length_known:
        del a.headers["Content-Length"]
    rig.origin.route("/big", a)
    reply = await rig.get("/big")
    assert reply.body is not None and not isinstance(reply.body, bytes)
    body = reply.body.__aiter__()
    got = await body.__anext__()
    key = key_of(rig, "/big")
    if not length_known:
        for _ in range(10):
            await asyncio.sleep(0)
        assert shared.released == []  # 100 KB so far: it may still be shared
        a.release()
        got += await body.__anext__()
    await until(lambda: bool(shared.released))
    assert shared.released == [(key, word)]
    assert rig.origin.wires[0].sent < len(a.chunks)  # the body is still coming
    a.release(len(a.chunks))
    got += b"".join([c async for c in body])
    assert got == b"x" * 300_000
    await rig.settled(filled=1) if word == "too_large" else await rig.settled(passed=1)
    assert shared.released == [(key, word)] and shared.stored == {}  # released once, nothing written
    await rig.engine.close()


async def test_a_flight_that_waited_out_another_workers_lease_does_not_wait_for_another_nodes_lock_too(
        tmp_path: Path) -> None:
    # lock_timeout is the longest a request waits for another's fetch of its key, in all.
    rig = make_rig(tmp_path, config="cache: {lock_timeout: 0.2s}\n")
    rig.origin.route("/a", answer(body=b"fetched here", headers=CACHEABLE))
    never: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
    rig.engine.leases = FakeLeases(Waiting(7, never))  # the worker holding the lease never answers
    waits: list[float] = []

    class Held(FakeShared):  # another node holds the key's fill lock
        async def lookup(self, key: str, lock_for: float, lock_only: bool = False) -> Contended:
            return Contended(5.0)

        async def wait_filled(self, key: str, wait: float, holder: int = 0) -> str | None:
            waits.append(wait)
            await asyncio.sleep(wait)
            return None

    rig.engine.shared = Held()
    reply = await rig.get("/a")
    assert await read(reply) == b"fetched here"
    assert waits == []  # the lease's wait used up lock_timeout: fetched at once
    await rig.engine.close()


async def test_a_fill_another_worker_stored_while_this_one_waited_is_answered_from_the_store(
        tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"mine", headers=CACHEABLE))
    waiting = told("stored")
    rig.engine.leases = FakeLeases(waiting)
    # What the worker holding the lease stored, in the memory all workers share.
    other = make_rig(tmp_path / "other")
    other.origin.route("/a", answer(body=b"the other worker's", headers=CACHEABLE))
    await read(await other.get("/a"))
    key = key_of(rig, "/a")

    async def stored_meanwhile(key_: str, wait: bool = True):
        rig.store.variants[key] = other.store.variants[key]  # ... there once the holder is done
        return waiting

    rig.engine.leases.acquire = stored_meanwhile
    reply = await rig.get("/a")
    assert (reply.x_cache, await read(reply)) == ("HIT", b"the other worker's")
    await rig.settled(stored_elsewhere=1)
    assert rig.origin.sent == []
    for r in (rig, other):
        await r.engine.close()


async def test_a_lease_that_ended_without_word_is_asked_again_and_what_was_stored_is_answered(
        tmp_path: Path) -> None:
    """The holder's word was lost (``LeaseClient.wait`` found the lease gone from the table):
    the flight asks again, is granted the lease, and finds what the holder stored."""
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"mine", headers=CACHEABLE))
    other = make_rig(tmp_path / "other")
    other.origin.route("/a", answer(body=b"the other worker's", headers=CACHEABLE))
    await read(await other.get("/a"))
    key = key_of(rig, "/a")
    leases = FakeLeases(told("ended"), Granted(5))
    rig.engine.leases = leases
    asked = leases.acquire

    async def stored_meanwhile(key_: str, wait: bool = True) -> Granted | Waiting | Busy | None:
        if len(leases.answers) == 1:  # asked again: what the holder stored before it released
            rig.store.variants[key] = other.store.variants[key]
        return await asked(key_, wait)

    leases.acquire = stored_meanwhile
    reply = await rig.get("/a")
    assert (reply.x_cache, await read(reply)) == ("HIT", b"the other worker's")
    await rig.settled(stored_elsewhere=1)
    assert rig.origin.sent == [] and leases.answers == []  # asked twice
    assert leases.released == [(key, 5, "stored")]
    for r in (rig, other):
        await r.engine.close()


async def test_a_fill_under_a_granted_lease_releases_it_as_stored(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    leases = FakeLeases(Granted(5))
    rig.engine.leases = leases
    rig.origin.route("/a", answer(body=b"hello", headers=CACHEABLE))
    assert await read(await rig.get("/a")) == b"hello"
    await rig.settled(filled=1)
    assert leases.released == [(key_of(rig, "/a"), 5, "stored")]
    assert leases.heads == []  # a shareable head costs the waiters no message
    await rig.engine.close()


async def test_a_granted_lease_finding_the_key_stored_meanwhile_is_released_as_stored(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    other = make_rig(tmp_path / "other")
    other.origin.route("/a", answer(body=b"stored", headers=CACHEABLE))
    await read(await other.get("/a"))
    leases = FakeLeases(Granted(5))
    key = key_of(rig, "/a")

    async def granted_after_a_store(key_: str, wait: bool = True):
        rig.store.variants[key] = other.store.variants[key]
        return Granted(5)

    leases.acquire = granted_after_a_store
    rig.engine.leases = leases
    reply = await rig.get("/a")
    assert (reply.x_cache, await read(reply)) == ("HIT", b"stored")
    await rig.settled(stored_elsewhere=1)
    assert leases.released == [(key, 5, "stored")]
    assert rig.origin.sent == []
    for r in (rig, other):
        await r.engine.close()


async def test_a_fill_the_shared_memory_refuses_at_the_put_without_a_disk_tier_ends_not_stored(
        tmp_path: Path) -> None:
    """Memory only, a body the ring refuses only at the put (its size not known up front) is
    stored nowhere: the flight ends passed (TOO-LARGE, counted), and the workers waiting on its
    lease fetch for themselves. It ended "filled" and told them "stored": they found nothing."""
    rig = make_rig(tmp_path)
    store = rig.store
    store.memory_only = True

    def refused(entry: object, spool: FakeSpool) -> bool:
        spool.refused = "TOO-LARGE"
        return False

    store.put_memory = refused  # type: ignore[method-assign]
    leases = FakeLeases(Granted(5))
    rig.engine.leases = leases
    rig.origin.route("/a", answer(body=b"x" * 1000, headers=CACHEABLE))
    reply = await rig.get("/a")
    assert await read(reply) == b"x" * 1000
    await rig.settled(passed=1)
    assert leases.released == [(key_of(rig, "/a"), 5, "failed")]
    assert rig.engine.metrics.registry.get_sample_value(
        "cachegate_not_stored_total", {"reason": "TOO-LARGE"}) == 1
    assert store.variants == {}
    await rig.engine.close()


@pytest.mark.parametrize(("script", "outcome", "released"), [
    (answer(error=upstream_error()), "unreachable", "error"),
    (answer(body=b"yours", headers={"Cache-Control": "private"}), "passed", "failed"),
    # A body that broke off is no answer either: the waiters answer as this worker's followers.
    (answer(body=b"0123456789", headers=CACHEABLE, chunk=5, break_after=1), "broke_off", "error"),
])
async def test_a_lease_is_released_with_how_the_flight_ended(
        tmp_path: Path, script: object, outcome: str, released: str) -> None:
    rig = make_rig(tmp_path)
    leases = FakeLeases(Granted(5))
    rig.engine.leases = leases
    rig.origin.route("/a", script)
    reply = await rig.get("/a")
    with_error = outcome != "passed"
    try:
        await read(reply)
    except Exception:
        assert with_error
    await rig.settled(**{outcome: 1})
    assert leases.released == [(key_of(rig, "/a"), 5, released)]
    assert leases.in_body == [outcome == "broke_off"]  # (the waiters take a failed body as theirs)
    if outcome == "passed":  # told at once, with the head, that they must fetch for themselves
        assert leases.heads == [(key_of(rig, "/a"), False)]
    await rig.engine.close()


async def test_a_fill_cancelled_by_a_stop_tells_its_waiters_an_error_not_to_fetch_for_themselves(
        tmp_path: Path) -> None:
    """At a stop's deadline the fill is cancelled: "failed" had each waiter of the other stopping
    workers fetch for itself, be cut off at once and pass "failed" on (a chain of origin
    fetches at every SIGTERM); "error" 503 has them answer stale-if-error or 503."""
    rig = make_rig(tmp_path)
    leases = FakeLeases(Granted(5))
    rig.engine.leases = leases
    slow = answer(body=b"x" * (1 << 20), headers=CACHEABLE, chunk=1 << 16, hold=asyncio.Queue())
    rig.origin.route("/a", slow)
    reply = await asyncio.wait_for(rig.get("/a"), 5)
    reading = asyncio.ensure_future(read(reply))
    await asyncio.wait_for(rig.engine.close(grace=0.1), 5)  # never released: cancelled at the deadline
    assert leases.released == [(key_of(rig, "/a"), 5, "error")]
    reading.cancel()


async def test_a_worker_told_the_holder_was_stopping_answers_503_stopping_as_the_holder_does(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(tmp_path)
    rig.engine.leases = FakeLeases(told("error", status=503, message="the worker fetching it was stopping",
                                        detail="STOPPING"))
    rig.origin.route("/a", answer(body=b"never asked"))
    reply = await rig.get("/a")
    assert reply.status == 503
    assert "detail=STOPPING" in dict(reply.headers)["Cache-Status"]
    assert b"stopping" in await read(reply)
    await rig.settled(stopped=1)  # not "unreachable": the origin did nothing wrong
    assert rig.origin.sent == [] and "upstream failed" not in caplog.text
    await rig.engine.close()


async def test_a_failed_word_to_the_waiting_workers_costs_the_flight_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(tmp_path)
    leases = FakeLeases(Granted(5))

    def broken_head(key: str, lease: Granted, shareable: bool, pass_: bool) -> None:
        raise OSError("the shared memory is gone")

    leases.head = broken_head  # type: ignore[method-assign]
    rig.engine.leases = leases
    rig.origin.route("/a", answer(body=b"yours", headers={"Cache-Control": "private"}))
    assert await read(await rig.get("/a")) == b"yours"
    await rig.settled(passed=1)
    assert leases.released == [(key_of(rig, "/a"), 5, "failed")]  # they hear it at the release
    assert "telling the workers waiting on" in caplog.text
    await rig.engine.close()


async def test_an_origin_error_another_worker_met_twice_is_this_workers_answer_too(tmp_path: Path) -> None:
    """The holder's request failed, not this worker's: it asks for the lease once more (one of
    the waiting workers fetches again); the failure of that second fetch is its answer."""
    rig = make_rig(tmp_path)
    rig.engine.leases = FakeLeases(told("error", status=504, message="upstream timed out"),
                                   told("error", status=504, message="upstream timed out"))
    rig.origin.route("/a", answer(body=b"never asked"))
    reply = await rig.get("/a")
    assert reply.status == 504
    assert "detail=UPSTREAM-TIMEOUT" in dict(reply.headers)["Cache-Status"]
    await rig.settled(unreachable=1)
    assert rig.origin.sent == []
    await rig.engine.close()


async def test_after_another_worker_s_origin_error_this_worker_may_be_the_one_to_fetch_again(
        tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    leases = rig.engine.leases = FakeLeases(told("error", status=502, message="reset",
                                                 detail="UPSTREAM-UNREACHABLE"), Granted(8))
    rig.origin.route("/a", answer(body=b"page", headers=CACHEABLE))
    reply = await rig.get("/a")
    assert (reply.status, await read(reply)) == (200, b"page")
    await rig.settled(filled=1)
    assert leases.released == [(key_of(rig, "/a"), 8, "stored")]
    await rig.engine.close()


# (the holder's error: detail, status, after the origin's head; how this worker's flight ends)
SHARED_AT_ONCE = [("NO-UPSTREAM", 503, False, "unreachable"), ("UPSTREAM-BROKE-OFF", 502, True, "broke_off"),
                  ("UPSTREAM-TIMEOUT", 504, True, "broke_off")]


@pytest.mark.parametrize(("detail", "status", "in_body", "outcome"), SHARED_AT_ONCE,
                         ids=[c[0] for c in SHARED_AT_ONCE])
async def test_what_no_request_causes_or_a_failed_body_is_shared_at_once(
        tmp_path: Path, detail: str, status: int, in_body: bool, outcome: str) -> None:
    """A body that broke off or fell silent after the origin's head, in the worker holding the
    lease, is this worker's answer too (its clients and its followers), as for the holder's own
    followers: fetched again, it cost the origin a second request and them a second wait."""
    rig = make_rig(tmp_path)
    rig.engine.leases = FakeLeases(told("error", status=status, message="x", detail=detail, in_body=in_body))
    rig.origin.route("/a", answer(body=b"never asked"))
    replies = await asyncio.gather(rig.get("/a"), rig.get("/a"))
    for reply in replies:
        assert reply.status == status and f"detail={detail}" in dict(reply.headers)["Cache-Status"]
    await rig.settled(**{outcome: 1})
    assert rig.origin.sent == []
    await rig.engine.close()


async def test_a_background_refresh_another_worker_is_doing_is_skipped(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"old", headers={"Cache-Control": "max-age=10, stale-while-revalidate=60"}),
                     answer(body=b"new", headers=CACHEABLE))
    await read(await rig.get("/a"))
    await rig.settled(filled=1)
    rig.engine.leases = FakeLeases(Busy())
    rig.clock.advance(20)  # stale, within stale-while-revalidate
    reply = await rig.get("/a")
    assert (reply.x_cache, await read(reply)) == ("UPDATING", b"old")
    await rig.settled(filled=1, skipped=1)
    assert rig.origin.count("/a") == 1
    await rig.engine.close()


async def test_a_background_refresh_revalidates_once_and_the_next_request_is_a_hit(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"old", headers={"Cache-Control": "max-age=10, stale-while-revalidate=60"}),
                     answer(body=b"new", headers=CACHEABLE))
    await read(await rig.get("/a"))
    rig.clock.advance(20)
    assert await read(await rig.get("/a")) == b"old"
    await rig.settled(filled=2)
    hit = await rig.get("/a")
    assert (hit.x_cache, await read(hit)) == ("HIT", b"new")
    assert rig.origin.count("/a") == 2
    await rig.engine.close()


async def test_a_flight_cancelled_mid_fetch_still_ends_its_clients_and_its_lease(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    leases = FakeLeases(Granted(5))
    rig.engine.leases = leases
    rig.origin.route("/a", answer(body=b"never", gate=asyncio.Event()))  # the origin never answers
    client = asyncio.create_task(rig.get("/a"))
    await rig.origin.arrived.wait()
    flight = rig.engine.coalescer.get(key_of(rig, "/a"))
    assert flight is not None and flight.task is not None
    flight.task.cancel()  # cancelled, not by a stop (that is Stopped: the next test)
    reply = await client
    assert reply.status == 502
    await rig.settled(aborted=1)
    assert leases.released == [(key_of(rig, "/a"), 5, "failed")]  # the waiting workers fetch for themselves
    await rig.engine.close()


async def test_a_flight_cut_off_by_a_stop_answers_503_stopping_not_an_origin_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig(tmp_path)
    leases = FakeLeases(Granted(5))
    rig.engine.leases = leases
    rig.origin.route("/a", answer(body=b"never", gate=asyncio.Event()))  # the origin never answers
    client = asyncio.create_task(rig.get("/a"))
    await rig.origin.arrived.wait()
    await rig.engine.coalescer.close(grace=0)  # a stop's deadline: the flight's task is cancelled
    reply = await client
    assert reply.status == 503
    assert "detail=STOPPING" in dict(reply.headers)["Cache-Status"]
    await rig.settled(stopped=1)
    assert leases.released == [(key_of(rig, "/a"), 5, "error")]  # they answer the same (not fetch)
    assert "upstream failed" not in caplog.text


async def test_a_flight_ends_once_whatever_calls_its_end_again(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    leases = FakeLeases(Granted(5))
    rig.engine.leases = leases
    rig.origin.route("/a", answer(body=b"hello", headers=CACHEABLE))
    ends = []
    runs = []
    real_end = rig.engine.miss._end

    def spy(run, outcome):
        ends.append(type(outcome).__name__)
        runs.append(run)
        real_end(run, outcome)

    rig.engine.miss._end = spy
    await read(await rig.get("/a"))
    await rig.settled(filled=1)
    assert ends == ["Filled"]  # the task's own guard ends it only when nothing else did
    real_end(runs[0], Aborted())  # ended again (the guard's end, had it asked): no effect
    await rig.settled(filled=1)
    assert leases.released == [(key_of(rig, "/a"), 5, "stored")]
    await rig.engine.close()


async def test_a_client_detached_from_a_fill_it_fell_behind_finishes_from_the_store(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, max_object=16 << 20)
    chunk = 1 << 20
    a = answer(body=bytes(range(256)) * (6 * chunk // 256), headers=CACHEABLE, chunk=chunk)
    rig.origin.route("/a", a)
    slow = await rig.get("/a")
    fast = await rig.get("/a")  # a follower that keeps up
    assert await read(fast) == b"".join(a.chunks)
    await rig.settled(filled=1)
    assert await read(slow) == b"".join(a.chunks)  # read after the fetch ended: detached, then resumed
    assert rig.counted("slow_readers", outcome="resumed") == 1
    await rig.engine.close()


async def test_a_miss_attempt_is_a_frozen_value() -> None:
    attempt = Attempt(None, None, "k", "uri-miss")
    with pytest.raises(AttributeError):
        attempt.key = "other"
    assert attempt.alone().coalesce is False and attempt.coalesce is True


async def test_a_miss_found_nowhere_looks_in_memory_once_and_a_miss_that_waited_looks_again(
        tmp_path: Path) -> None:
    """A miss the lookup found nowhere in the same step does not look in memory again before it
    starts a flight (nothing can have been stored meanwhile); one that waited (a disk read, a
    range) still looks, and answers from what was stored while it waited."""
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"first", headers=CACHEABLE))
    looks = counting_lookups(rig)
    assert await read(await rig.get("/a")) == b"first"
    await rig.settled(filled=1)
    assert looks == [key_of(rig, "/a")]  # the lookup's, not a second one in the miss path
    # Not found nowhere (it waited): the miss path looks again, and finds the fill stored meanwhile.
    req = rig.request("/a")
    plan = rig.engine.rules.plan(req.head)
    reply = await rig.engine.miss.fetch(Attempt(req, plan, key_of(rig, "/a"), "uri-miss"))
    assert (reply.x_cache, await read(reply)) == ("HIT", b"first")
    # Found nowhere (as if by a lookup in this step): no second look, a flight to the origin.
    rig.origin.route("/a", answer(body=b"second", headers=CACHEABLE))
    reply = await rig.engine.miss.fetch(Attempt(req, plan, key_of(rig, "/a"), "uri-miss", nowhere=True))
    assert await read(reply) == b"second"
    assert len(rig.origin.sent) == 2
    await rig.engine.close()


async def test_a_leader_wakes_in_the_turn_its_flight_gets_the_head_and_its_cancellation_is_its_own(
        tmp_path: Path) -> None:
    """The leader awaits its own copy of the flight's head (``Flight.lead``), set in the same step
    as the head: not ``shield(head)``, whose callback takes one turn of the event loop and the
    leader's wake-up another (a turn is a few ms under load). A leader cancelled while it waits
    cancels its copy only: the followers still get the response."""
    rig = make_rig(tmp_path)
    gate = asyncio.Event()
    rig.origin.route("/a", answer(body=b"hello", headers=CACHEABLE, gate=gate, whole=True))
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def lead() -> tuple[bytes, int]:
        reply = await rig.get("/a")
        assert isinstance(reply.body, bytes)
        return reply.body, turns  # the turn the leader was answered in

    tick = asyncio.create_task(ticker())
    leader = asyncio.create_task(lead())
    await rig.origin.arrived.wait()
    flight = rig.engine.coalescer.get(key_of(rig, "/a"))
    assert flight is not None
    head_seen: list[int] = []
    flight.head.add_done_callback(lambda _: head_seen.append(turns))  # runs in the turn after it is set
    gate.set()
    body, answered = await leader
    assert body == b"hello"
    assert answered == head_seen[0]  # with a shield, one turn later
    tick.cancel()

    gate = asyncio.Event()
    rig.origin.route("/b", answer(body=b"shared", headers=CACHEABLE, gate=gate))
    rig.origin.arrived.clear()
    leader_b = asyncio.create_task(rig.get("/b"))
    await rig.origin.arrived.wait()
    flight = rig.engine.coalescer.get(key_of(rig, "/b"))
    assert flight is not None
    follower = asyncio.create_task(rig.get("/b"))
    await until(lambda: flight.followers == 1)
    leader_b.cancel()
    await asyncio.sleep(0)
    gate.set()
    reply = await follower
    assert (reply.status, await read(reply)) == (200, b"shared")
    with pytest.raises(asyncio.CancelledError):
        await leader_b
    await rig.settled(filled=2)
    await rig.engine.close()


@pytest.mark.parametrize("body", [b"all at once", b""])
async def test_a_body_that_came_whole_with_its_head_is_delivered_and_stored_without_reading_chunks(
        tmp_path: Path, body: bytes) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=body, headers=CACHEABLE, whole=True))
    reply = await rig.get("/a")
    assert (reply.status, reply.x_cache, await read(reply)) == (200, "MISS", body)
    await rig.settled(filled=1)
    assert rig.origin.wires[0].sent == 0  # no chunk was read: it was all there with the head
    again = await rig.get("/a")
    assert (again.x_cache, await read(again)) == ("HIT", body)
    assert len(rig.origin.sent) == 1
    await rig.engine.close()


def counting_lookups(rig: Rig) -> list[str]:
    """The keys ``rig``'s engine looks up in memory, from now on."""
    looks: list[str] = []
    memory_get = rig.store.memory_get

    def counting(key: str) -> object:
        looks.append(key)
        return memory_get(key)

    rig.store.memory_get = counting  # type: ignore[method-assign,assignment]
    return looks


def counting_directory_lookups(rig: Rig) -> list[str]:
    """The keys ``rig``'s engine looks up in the directory of the disk's keys, from now on."""
    looks: list[str] = []
    absent = rig.store.absent

    def counting(key: str) -> bool:
        looks.append(key)
        return absent(key)

    rig.store.absent = counting  # type: ignore[method-assign]
    return looks


def hand_clock(rig: Rig) -> list[float]:
    """The hit-for-pass clock of ``rig``'s engine, moved by the test."""
    now = [1000.0]
    rig.engine.coalescer._clock = lambda: now[0]
    return now


async def test_a_hit_for_pass_key_found_nowhere_is_passed_with_only_a_look_in_memory_for_the_hit_for_pass_while(
        tmp_path: Path) -> None:
    """As Varnish's hit-for-pass object: a key whose uncacheable response met a request that found
    nothing stored is passed for ``hit_for_pass`` without the directory lookup and the lookup's
    decision, with the very answer the lookup would have led to (the memory is looked at: what
    it holds is served, as the fast path serves it); a request the lookup could answer
    otherwise (only-if-cached, no-cache, a range) still looks, and so does the first request
    after the while."""
    rig = make_rig(tmp_path)
    now = hand_clock(rig)
    rig.origin.route("/p", answer(body=b"yours", headers={"Cache-Control": "private"}))
    looks, directory = counting_lookups(rig), counting_directory_lookups(rig)
    first = await rig.get("/p")
    assert (first.status, await read(first)) == (200, b"yours")
    # the lookup, and the mark's check that the key is still nowhere
    assert (len(looks), len(directory)) == (2, 2)
    for _ in range(2):
        reply = await rig.get("/p")
        assert (reply.status, reply.x_cache, await read(reply)) == (200, "MISS", b"yours")
        assert dict(reply.headers)["Cache-Status"] == dict(first.headers)["Cache-Status"]
    assert (len(looks), len(directory), len(rig.origin.sent)) == (4, 2, 3)  # passed, memory only
    assert (await rig.get("/p", {"Cache-Control": "only-if-cached"})).status == 504
    assert (len(looks), len(directory), len(rig.origin.sent)) == (5, 3, 3)  # that one looked, and found nothing
    now[0] += 6  # past hit_for_pass (5 s)
    assert await read(await rig.get("/p")) == b"yours"
    assert (len(looks), len(directory)) == (7, 5)  # looked again, found nothing again: marked again
    assert await read(await rig.get("/p")) == b"yours"
    assert (len(looks), len(directory)) == (8, 5)
    await rig.engine.close()


async def test_what_another_process_stored_under_a_hit_for_pass_key_is_served_at_once(
        tmp_path: Path) -> None:
    """Another worker's fill reaches the machine's memory without this process's flights (whose
    end clears the mark): the general path serves it at once, as the fast path does."""
    a, b = make_rig(tmp_path / "a"), make_rig(tmp_path / "b")
    b.engine.storage = a.engine.storage  # one store, as the workers of a machine share theirs
    hand_clock(a)
    a.origin.route("/p", answer(body=b"private", headers={"Cache-Control": "private"}))
    b.origin.route("/p", answer(body=b"public", headers=CACHEABLE))
    assert await read(await a.get("/p")) == b"private"
    assert a.engine.coalescer.passes_unlooked(key_of(a, "/p"))
    assert await read(await b.get("/p")) == b"public"  # another worker stored it
    await b.settled(filled=1)
    reply = await a.get("/p")
    assert (reply.x_cache, await read(reply)) == ("HIT", b"public")
    assert len(a.origin.sent) == 1
    for rig in (a, b):
        await rig.engine.close()


async def test_a_hit_for_pass_mark_by_a_request_that_found_a_variant_keeps_looking(tmp_path: Path) -> None:
    """The usual ``Vary: Cookie`` site: an anonymous page stored, a private one for a signed-in
    user. The private one marks the key, but the anonymous requests still find their page."""
    rig = make_rig(tmp_path)
    hand_clock(rig)
    rig.origin.route("/v", answer(body=b"anonymous", headers={**CACHEABLE, "Vary": "Cookie"}),
                     answer(body=b"signed in", headers={"Cache-Control": "private", "Vary": "Cookie"}))
    assert await read(await rig.get("/v")) == b"anonymous"
    await rig.settled(filled=1)
    assert await read(await rig.get("/v", {"Cookie": "id=1"})) == b"signed in"
    reply = await rig.get("/v")
    assert (reply.x_cache, await read(reply)) == ("HIT", b"anonymous")
    await rig.engine.close()


async def test_a_fill_in_this_process_ends_the_unlooked_passes_even_when_its_disk_write_failed(
        tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    hand_clock(rig)
    rig.origin.route("/p", answer(body=b"yours", headers={"Cache-Control": "private"}),
                     answer(body=b"everyone's", headers=CACHEABLE))
    assert await read(await rig.get("/p")) == b"yours"  # marked by a request that found nothing

    async def no_disk(entry: object, spool: FakeSpool) -> bool:
        spool.discard()
        return False

    rig.store.put_disk = no_disk  # type: ignore[method-assign,assignment]
    # A request that looks (its Cache-Control), passed: the response is storable now, and stored
    # in memory (not on disk): the key stays hit-for-pass, but its requests look again.
    assert await read(await rig.get("/p", {"Cache-Control": "max-age=0"})) == b"everyone's"
    await rig.settled(passed=1, filled=1)
    again = await rig.get("/p")
    assert (again.x_cache, await read(again)) == ("HIT", b"everyone's")
    await rig.engine.close()


async def test_a_hit_for_pass_key_whose_response_turns_storable_is_stored_and_no_longer_passed(
        tmp_path: Path) -> None:
    """The pass that finds the response storable hands it to a flight of its own (a flight
    nobody may join, under a name of its own): what it stores ends the key's hit-for-pass."""
    rig = make_rig(tmp_path)
    hand_clock(rig)
    rig.origin.route("/p", answer(body=b"yours", headers={"Cache-Control": "private"}),
                     answer(body=b"everyone's", headers=CACHEABLE))
    assert await read(await rig.get("/p")) == b"yours"
    assert rig.engine.coalescer.is_pass(key_of(rig, "/p"))
    assert await read(await rig.get("/p")) == b"everyone's"  # passed unlooked, and stored
    await rig.settled(passed=1, filled=1)
    assert not rig.engine.coalescer.is_pass(key_of(rig, "/p"))
    again = await rig.get("/p")
    assert (again.x_cache, await read(again)) == ("HIT", b"everyone's")
    await rig.engine.close()


async def test_a_follower_that_went_on_its_own_after_a_fill_does_not_mark_the_key_unlooked(
        tmp_path: Path) -> None:
    """``Vary: Cookie``, cold: a signed-in follower joins an anonymous leader's flight, finds the
    head not its variant and fetches on its own (a private page), after the leader's fill was
    stored. Its lookup had found nothing, but what it found is out of date: the anonymous
    requests still look, and are hits."""
    rig = make_rig(tmp_path)
    hand_clock(rig)
    gate = asyncio.Event()
    rig.origin.route("/v", answer(body=b"anonymous", headers={**CACHEABLE, "Vary": "Cookie"}, gate=gate),
                     answer(body=b"signed in", headers={"Cache-Control": "private", "Vary": "Cookie"}))
    leader = asyncio.create_task(rig.get("/v"))
    await rig.origin.arrived.wait()
    flight = rig.engine.coalescer.get(key_of(rig, "/v"))
    assert flight is not None
    follower = asyncio.create_task(rig.get("/v", {"Cookie": "id=1"}))
    await until(lambda: flight.followers == 1)
    gate.set()
    assert await read(await leader) == b"anonymous"
    assert await read(await follower) == b"signed in"
    assert rig.engine.coalescer.is_pass(key_of(rig, "/v"))
    reply = await rig.get("/v")
    assert (reply.x_cache, await read(reply)) == ("HIT", b"anonymous")
    await rig.engine.close()


async def test_a_far_range_that_finds_the_lease_taken_once_it_asks_goes_to_the_origin_at_once(
        tmp_path: Path) -> None:
    """range_fill: whole. Two workers' ranges of a cold key, at the same instant: both look, no
    lease yet, both decide to lead; the other worker takes the lease first (``Busy`` here). A
    range near the start waits for that worker's fetch; a seek far on was made to wait too (for
    the whole download, up to lock_timeout: 4 s at an origin sending 2 MB over 4 s), where one
    that finds the lease taken at its look is asked of the origin at once."""
    rig = make_rig(tmp_path, config="cache: {range_fill: whole, lock_timeout: 20s}\n")
    leases = FakeLeases(Busy())
    rig.engine.leases = leases
    big = bytes(i % 251 for i in range(3 << 20))
    first = 2_500_000
    rig.origin.route("/v", answer(206, big[first:first + 100], {
        **CACHEABLE, "ETag": '"v"', "Content-Range": f"bytes {first}-{first + 99}/{len(big)}"}))
    reply = await asyncio.wait_for(rig.get("/v", {"Range": f"bytes={first}-{first + 99}"}), 5)
    assert (reply.status, await read(reply)) == (206, big[first:first + 100])
    assert [s.headers.get("Range") for s in rig.origin.sent] == [f"bytes={first}-{first + 99}"]
    assert leases.answers == []  # (it asked, and was told another worker had it)
    await rig.engine.close()


def test_the_soft_failure_record_is_bounded_by_the_length_of_its_keys_too() -> None:
    """65,536 keys of up to 8 KB (a request line's limit) each let it hold about 0.5 GB."""
    from proxy.coalescer import SOFT_FAILED_CHARS, Coalescer

    c = Coalescer(history_limit=16)
    long = [f"http://cachegate.test/{i:06d}/" + "x" * 8000 for i in range(3000)]  # ~24 MB of keys
    for key in long:
        c.refresh_failed(key, 10.0, 1, soft=True)
    kept = [k for k in long if c.soft_failed_at(k) is not None]
    assert sum(map(len, kept)) <= SOFT_FAILED_CHARS < sum(map(len, kept)) + len(long[0])
    assert kept == long[-len(kept):]  # the oldest forgotten first
    c.refresh_failed(kept[0], 10.0, 2, soft=True)  # failed again: now the newest
    newer = "http://cachegate.test/newer/" + "x" * 8000
    c.refresh_failed(newer, 10.0, 2, soft=True)
    assert c.soft_failed_at(kept[0]) == 2 and c.soft_failed_at(kept[1]) is None  # (room made)
    for key in kept:  # stored anew: forgotten, and their length with them
        c.refresh_ok(key)
    assert c._soft_failed_chars == len(newer) and c.soft_failed_at(newer) == 2
