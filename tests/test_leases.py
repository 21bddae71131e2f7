"""The lease table's bookkeeping (proxy/leases.py) in a real shared arena, without processes: who
fetches, who is told what.

The end-to-end behaviour through ``cachegate run --workers 2`` is in test_herd_workers.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from proxy.leases import LEASE_MAX_AGE, LeaseRelay, LeaseTable
from proxy.storage.arena import LEASE_LOCK, Arena


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table() -> Iterator[tuple[LeaseTable, Clock]]:
    arena = Arena.create(64 * 1024)
    clock = Clock()
    yield LeaseTable(arena, clock), clock
    arena.close()


def events(told: list[tuple[int, dict[str, object]]]) -> list[tuple[int, object]]:
    return sorted((w, e["outcome"]) for w, e in told)


def test_the_first_worker_to_ask_fetches_and_the_others_hear_it_was_stored(
        table: tuple[LeaseTable, Clock]) -> None:
    t, _ = table
    first, told = t.acquire(0, "k")
    assert first == {"granted": True, "token": 1} and told == []
    second, _ = t.acquire(1, "k")
    assert second == {"granted": False, "token": 1, "holder": 0}
    third, _ = t.acquire(2, "k")
    assert third is not None and third["granted"] is False
    assert t.head("k", token=1, shareable=True, pass_=False) == []  # nothing changes for waiters
    told = t.release("k", token=1, outcome="stored")
    assert events(told) == [(1, "stored"), (2, "stored")]
    assert t.held == 0
    again, _ = t.acquire(1, "k")
    assert again is not None and again["granted"] is True


def test_a_lease_nobody_waits_for_tells_nobody(table: tuple[LeaseTable, Clock]) -> None:
    t, _ = table
    t.acquire(0, "k")
    assert t.release("k", token=1, outcome="stored") == []  # no message to send at all


def test_a_response_that_is_not_shareable_sends_waiters_and_later_askers_upstream(
        table: tuple[LeaseTable, Clock]) -> None:
    t, _ = table
    t.acquire(0, "private")
    t.acquire(1, "private")
    told = t.head("private", token=1, shareable=False, pass_=True)
    assert told == [(1, {"key": "private", "token": 1, "outcome": "pass"})]
    late, _ = t.acquire(2, "private")
    assert late is not None and late["head"] == {"shareable": False, "pass": True}
    assert t.release("private", token=1, outcome="failed") == []  # the waiters were already sent on

    t.acquire(0, "too-big")
    t.acquire(1, "too-big")
    assert events(t.head("too-big", token=2, shareable=False, pass_=False)) == [(1, "unshareable")]


def test_a_head_not_stored_tells_its_status_to_waiters_later_askers_and_the_table(
        table: tuple[LeaseTable, Clock]) -> None:
    """An origin error not stored (a 503 without freshness): the waiters serve stale-if-error
    on it, as the holder's own followers do, rather than each ask the failing origin again;
    so its status travels with the word, and stays in the table for a worker that asks later
    (a new waiter joining after it, or one whose word was lost: ``ended``)."""
    t, _ = table
    t.acquire(0, "down")
    t.acquire(1, "down")
    told = t.head("down", token=1, shareable=False, pass_=False, status=503)
    assert told == [(1, {"key": "down", "token": 1, "outcome": "unshareable", "status": 503})]
    assert t.ended("down", token=1) == {"outcome": "unshareable", "status": 503}
    late, _ = t.acquire(2, "down")
    assert late is not None and late["head"] == {"shareable": False, "pass": False, "status": 503}
    t.worker_gone(3)  # (a slot rewritten keeps it)
    assert t.ended("down", token=1) == {"outcome": "unshareable", "status": 503}
    t.release("down", token=1, outcome="failed")
    assert t.ended("down", token=1) == {"outcome": "ended"}


def test_a_look_tells_whether_another_worker_is_fetching_a_key_and_takes_nothing(
        table: tuple[LeaseTable, Clock]) -> None:
    """A range miss looks (``fetching_elsewhere``) before it decides to wait for another
    worker's fill: not its own lease, not one whose response is known not to be shareable,
    not one past LEASE_MAX_AGE; and the look neither takes the lease nor waits on it."""
    t, clock = table
    assert not t.fetching_elsewhere(1, "k")
    t.acquire(0, "k")
    assert t.fetching_elsewhere(1, "k") and not t.fetching_elsewhere(0, "k")
    assert t.counts()["waited"] == 0 and t.held == 1
    assert t.release("k", token=1, outcome="stored") == []  # nobody became a waiter by looking
    assert not t.fetching_elsewhere(1, "k")
    t.acquire(0, "private")
    t.head("private", token=2, shareable=False, pass_=False)
    assert not t.fetching_elsewhere(1, "private")
    t.acquire(0, "old")
    clock.now += LEASE_MAX_AGE + 1
    assert not t.fetching_elsewhere(1, "old")


def test_a_refresh_that_does_not_wait_is_told_busy_and_not_counted_as_a_waiter(
        table: tuple[LeaseTable, Clock]) -> None:
    t, _ = table
    t.acquire(0, "k")
    busy, _ = t.acquire(1, "k", block=False)
    assert busy is not None and busy["granted"] is False
    assert t.release("k", token=1, outcome="stored") == []


def test_an_error_reaches_the_waiters_with_its_status(table: tuple[LeaseTable, Clock]) -> None:
    t, _ = table
    t.acquire(0, "k")
    t.acquire(1, "k")
    told = t.release("k", token=1, outcome="error", status=504, message="read timed out")
    assert told == [(1, {"key": "k", "token": 1, "outcome": "error", "status": 504,
                         "message": "read timed out"})]
    t.acquire(0, "j")
    t.acquire(1, "j")
    told = t.release("j", token=2, outcome="error", status=502, message="body broke off",
                     detail="UPSTREAM-BROKE-OFF")  # what its clients' Cache-Status says
    assert told == [(1, {"key": "j", "token": 2, "outcome": "error", "status": 502,
                         "message": "body broke off", "detail": "UPSTREAM-BROKE-OFF"})]
    t.acquire(0, "i")
    t.acquire(1, "i")
    # A body that fell silent after its head: said so, for the waiters to take it (not fetch again).
    told = t.release("i", token=3, outcome="error", status=504, message="read timed out mid-body",
                     detail="UPSTREAM-TIMEOUT", in_body=True)
    assert told == [(1, {"key": "i", "token": 3, "outcome": "error", "status": 504,
                         "message": "read timed out mid-body", "detail": "UPSTREAM-TIMEOUT", "in_body": True})]


def test_a_dead_holder_ends_its_leases_and_a_dead_waiter_is_forgotten(table: tuple[LeaseTable, Clock]) -> None:
    t, _ = table
    t.acquire(0, "a")
    t.acquire(1, "a")
    t.acquire(2, "a")
    t.acquire(1, "b")
    t.acquire(0, "b")
    told = t.worker_gone(0)
    assert events(told) == [(1, "gone"), (2, "gone")]
    taken, _ = t.acquire(2, "a")
    assert taken is not None and taken["granted"] is True  # a waiter takes the lease on
    assert t.release("b", token=2, outcome="stored") == []  # worker 0 waited for "b": gone


def test_stale_messages_change_nothing(table: tuple[LeaseTable, Clock]) -> None:
    t, _ = table
    t.acquire(0, "k")
    t.acquire(1, "k")
    assert t.release("k", token=99, outcome="stored") == []  # not the current lease
    assert t.head("other", token=1, shareable=False, pass_=True) == []
    assert t.held == 1


def test_a_lease_never_released_is_taken_over_and_the_counts_add_up(table: tuple[LeaseTable, Clock]) -> None:
    t, clock = table
    t.acquire(0, "k")
    t.acquire(1, "k")
    clock.now += LEASE_MAX_AGE + 1
    taken, told = t.acquire(2, "k")
    assert taken is not None and taken["granted"] is True
    assert told == [(1, {"key": "k", "token": 1, "outcome": "gone"})]
    t.release("k", token=taken["token"], outcome="stored")
    relay = LeaseRelay(t, lambda w, e: None)
    counts = {s.labels["event"]: s.value for m in relay.collect() if m.name == "cachegate_cross_worker_leases"
              for s in m.samples}
    assert counts["granted"] == 2.0 and counts["waited"] == 1.0 and counts["stored"] == 1.0


@pytest.mark.slow
def test_two_processes_take_leases_in_the_same_table() -> None:
    arena = Arena.create(64 * 1024)
    t = LeaseTable(arena)  # the real clock: both processes read the same monotonic clock
    code = ("import sys; from proxy.leases import LeaseTable; from proxy.storage.arena import Arena\n"
            "t = LeaseTable(Arena.attach(int(sys.argv[1])))\n"
            "print(t.acquire(1, 'k')[0])")
    t.acquire(0, "k")
    out = subprocess.run([sys.executable, "-c", code, str(arena.fd)], pass_fds=(arena.fd,),
                         capture_output=True, text=True, check=True).stdout
    assert "'granted': False" in out and "'holder': 0" in out
    assert events(t.release("k", token=1, outcome="stored")) == [(1, "stored")]
    arena.close()


def test_keys_sharing_a_bucket_each_have_their_own_lease_until_the_bucket_is_full(
        table: tuple[LeaseTable, Clock]) -> None:
    from proxy.leases import SLOTS
    t, _ = table
    t._buckets = 1  # every key in the one bucket
    keys = [f"k{i}" for i in range(SLOTS + 1)]
    for i, key in enumerate(keys[:SLOTS]):
        got, _ = t.acquire(i % 4, key)
        assert got == {"granted": True, "token": i + 1}
    assert t.acquire(0, keys[SLOTS]) == (None, [])  # no room: fetched without a lease
    waiting, _ = t.acquire(3, keys[5])
    assert waiting == {"granted": False, "token": 6, "holder": 1}
    assert events(t.release(keys[5], token=6, outcome="stored")) == [(3, "stored")]
    assert t.release(keys[5], token=6, outcome="stored") == []  # already ended
    got, _ = t.acquire(0, keys[SLOTS])  # the slot it freed
    assert got == {"granted": True, "token": SLOTS + 1}
    for i, key in enumerate(keys[:SLOTS]):
        if i != 5:
            assert t.release(key, token=i + 1, outcome="failed") == []
    assert t.held == 1


async def test_a_dead_workers_leases_are_cleared_without_blocking_the_supervisors_loop() -> None:
    """A worker stopped while it held the lease table's lock, and then another worker died: the
    supervisor cleared the dead one's leases on its event loop and blocked there in ``fcntl``
    (no watchdog to kill the holder, no admin API, no SIGTERM) for as long as the holder lived.
    The clearing runs in a thread: the loop goes on, and it ends once the lock is free."""
    import asyncio

    arena = Arena.create(64 * 1024)
    holder = await asyncio.create_subprocess_exec(
        # It holds the lock until told, or 5 s at most: a clearing that blocks the loop again
        # fails the test instead of hanging it.
        sys.executable, "-c", "import fcntl, select, sys\n"
        "fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX, 1, int(sys.argv[2]), 0); print('held', flush=True)\n"
        "select.select([sys.stdin], [], [], 5)\n", str(arena.fd), str(LEASE_LOCK),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(arena.fd,))
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 10)).strip() == b"held"
        told: list[object] = []
        relay = LeaseRelay(LeaseTable(arena), lambda worker, event: told.append(event))
        gone = asyncio.ensure_future(relay.worker_gone(1))
        for _ in range(5):
            await asyncio.sleep(0.02)  # the loop runs while the clearing waits for the lock
        assert not gone.done()
        holder.stdin.write(b"\n")
        await holder.stdin.drain()
        await asyncio.wait_for(gone, 10)
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        arena.close()


class QuietChannel:
    """A worker's control channel whose words to the supervisor take ``delay`` seconds to be
    answered (``sent`` has them once answered)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.handlers: dict[str, object] = {}
        self.sent: list[object] = []
        self.delay = delay

    async def call(self, name: str, wait: float | None = None, **args: object) -> None:
        import asyncio

        await asyncio.sleep(self.delay)
        self.sent.append((name, args))


async def test_a_waiter_that_hears_nothing_finds_the_lease_over_in_the_table(
        caplog: pytest.LogCaptureFixture) -> None:
    """The holder's word is lost (its worker closed its control channel first, as a stop once
    did): the waiter finds the lease gone from the table, gives the word LEASE_WORD_WAIT more,
    and asks again (it waited until lock_timeout). A head that is not shareable is read there
    too, at once."""
    import asyncio

    from proxy.leases import LEASE_POLL, LEASE_WORD_WAIT, LeaseClient, Waiting

    caplog.set_level(logging.DEBUG, logger="cachegate")
    arena = Arena.create(64 * 1024)
    try:
        t = LeaseTable(arena)
        client = LeaseClient(t, 1, QuietChannel())  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        for key, end in (("k", "release"), ("p", "pass"), ("u", "unshareable")):
            granted, _ = t.acquire(0, key)  # worker 0 fetches
            assert granted is not None
            waiting = await client.acquire(key)
            assert isinstance(waiting, Waiting)
            started = loop.time()
            wait = asyncio.ensure_future(client.wait(key, waiting, started + 30))
            await asyncio.sleep(LEASE_POLL * 1.5)
            assert not wait.done()  # held: it goes on waiting
            if end == "release":
                t.release(key, granted["token"], "stored")  # the waiters' word is never sent
            else:
                t.head(key, granted["token"], shareable=False, pass_=end == "pass")
            told = await asyncio.wait_for(wait, 5)
            client.forget(key, waiting)
            assert told == {"outcome": "ended" if end == "release" else end}
            took = loop.time() - started - LEASE_POLL * 1.5
            assert took < LEASE_POLL * 2 + (LEASE_WORD_WAIT if end == "release" else 0), took
        # Said at INFO (a slow relay, not a fault: the waiter asked again), one line a window.
        late = [r for r in caplog.records if "ended without word" in r.getMessage()]
        assert [r.levelno for r in late] == [logging.INFO], late
        # The word when it comes first; "timeout" at the deadline when neither comes.
        granted, _ = t.acquire(0, "w")
        assert granted is not None
        waiting = await client.acquire("w")
        assert isinstance(waiting, Waiting)
        wait = asyncio.ensure_future(client.wait("w", waiting, loop.time() + 30))
        await client._event(waiting.token, "error", 504, "timed out", "w")
        assert await wait == {"outcome": "error", "status": 504, "message": "timed out", "detail": "",
                          "public": "", "in_body": False}
        client.forget("w", waiting)
        # A word that comes after the table showed the lease over, but soon, is still the answer.
        granted, _ = t.acquire(0, "v")
        assert granted is not None
        waiting = await client.acquire("v")
        assert isinstance(waiting, Waiting)
        wait = asyncio.ensure_future(client.wait("v", waiting, loop.time() + 30))
        t.release("v", granted["token"], "error", 504, "timed out")
        await asyncio.sleep(LEASE_POLL * 1.5)  # a look found it over
        assert not wait.done()
        await client._event(waiting.token, "error", 504, "timed out", "v")
        assert (await wait)["outcome"] == "error"
        granted, _ = t.acquire(0, "y")
        waiting = await client.acquire("y")
        assert isinstance(waiting, Waiting)
        assert await client.wait("y", waiting, loop.time() + LEASE_POLL / 2) == {"outcome": "timeout"}
    finally:
        arena.close()


async def test_the_words_still_being_sent_go_out_before_the_lease_client_closes() -> None:
    """A stop closes the control channel once ``close`` returns: a release's word to the waiters
    must be with the supervisor by then."""
    from proxy.leases import Granted, LeaseClient

    arena = Arena.create(64 * 1024)
    try:
        t = LeaseTable(arena)
        channel = QuietChannel(delay=0.2)
        holder = LeaseClient(t, 0, channel)  # type: ignore[arg-type]
        lease = await holder.acquire("k")
        assert isinstance(lease, Granted)
        t.acquire(1, "k")  # worker 1 waits
        holder.release("k", lease, "stored")
        assert channel.sent == []
        await holder.close(5.0)
        assert [name for name, _ in channel.sent] == ["lease_notify"]  # type: ignore[misc]
    finally:
        arena.close()


def test_a_waiters_time_counts_from_the_holders_own_fetch_after_its_wait_for_another_node(
        table: tuple[LeaseTable, Clock]) -> None:
    """The holder waits for another node's fill (cluster mode) until its lock_timeout, then
    fetches: the node's one origin request. Its waiters' lock_timeout counts from that fetch,
    not from the lease's start, else they time out with it and each fetch too."""
    t, clock = table
    granted, _ = t.acquire(0, "k")
    assert granted is not None
    token = granted["token"]
    t.acquire(1, "k")
    assert t.fetch_left("k", token, 5.0) is None  # it did not wait for another node: no change
    t.fetch_from("k", token, 4.0)  # it waits for another node's fill, 4 s at most
    clock.now += 3
    assert t.fetch_left("k", token, 5.0) == 6.0
    clock.now += 0.5
    t.fetch_from("k", token, 0.0)  # the wait ended early: it fetches now
    clock.now += 4.0
    assert t.fetch_left("k", token, 5.0) == 1.0
    t.fetch_from("k", token + 1, 60.0)  # not that lease's holder: nothing changes
    assert t.fetch_left("k", token, 5.0) == 1.0
    assert events(t.release("k", token, "stored")) == [(1, "stored")]
    assert t.fetch_left("k", token, 5.0) is None


async def test_a_waiter_waits_past_its_deadline_while_its_holder_waits_for_another_node() -> None:
    import asyncio

    from proxy.leases import LEASE_POLL, LeaseClient, Waiting

    arena = Arena.create(64 * 1024)
    try:
        t = LeaseTable(arena)
        client = LeaseClient(t, 1, QuietChannel())  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        granted, _ = t.acquire(0, "k")
        assert granted is not None
        waiting = await client.acquire("k")
        assert isinstance(waiting, Waiting)
        t.fetch_from("k", granted["token"], LEASE_POLL * 4)
        wait = asyncio.ensure_future(client.wait("k", waiting, loop.time() + LEASE_POLL, LEASE_POLL))
        await asyncio.sleep(LEASE_POLL * 3)
        assert not wait.done()  # past its own deadline: the holder has not fetched yet
        await client._event(waiting.token, "stored")
        assert (await wait)["outcome"] == "stored"
        client.forget("k", waiting)
        # Without ``fetch_wait`` (a range miss waiting for a fetch) the deadline is the deadline.
        waiting = await client.acquire("k")
        assert isinstance(waiting, Waiting)
        assert await client.wait("k", waiting, loop.time() + LEASE_POLL / 2) == {"outcome": "timeout"}
    finally:
        arena.close()


def test_a_closed_arenas_lease_counters_read_as_none_not_an_error() -> None:
    """A metrics scrape racing the stop: the arena closed (its words let go) while a view of it
    was still held (a response being sent). The counters raised ValueError (a released
    memoryview), the scrape failed; now they read as nothing held and no samples, as the other
    readers of a closed arena read nothing."""
    arena = Arena.create(64 * 1024)
    t = LeaseTable(arena, Clock())
    t.acquire(0, "k")
    arena.put("k", b"m", b"body")
    found = arena.find("k")
    assert found is not None and t.held == 1 and t.counts()["granted"] == 1
    view = arena.view[found.body_at:found.body_at + 4]  # (a body being sent)
    arena.close()
    assert t.held == 0 and t.counts() == {}
    families = {m.name: [s.value for s in m.samples] for m in LeaseRelay(t, lambda w, e: None).collect()}
    assert families == {"cachegate_cross_worker_leases": [], "cachegate_cross_worker_leases_held": [0]}
    assert bytes(view) == b"body"
    view.release()
