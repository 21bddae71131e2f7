"""The shared tier's scripts against a real Redis, without nodes: what a purge removes when Redis
evicted an index set (``maxmemory-policy volatile-lru``), the fill fence across a Redis
that restarted empty, and fills slower than their lock."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import pytest

from proxy.cluster import shared
from proxy.cluster.fills import Contended, Found, Locked
from proxy.cluster.settings import ClusterSettings
from proxy.cluster.shared import SharedTier, shared_ttl
from proxy.purge import PurgeSpec
from proxy.storage.entry import Entry, encode_variants, entry_from_json
from tests.cluster.redis_server import RedisServer
from tests.ports import Ports

pytestmark = pytest.mark.slow

SITE = "http://cachegate.test"
HOT = f"{SITE}/a/hot"
OTHER = f"{SITE}/b/other"


def entry(key: str, body: bytes, now: float, tags: tuple[str, ...] = (),
          vary: tuple[tuple[str, str], ...] = ()) -> Entry:
    return entry_from_json({
        "key": key, "url": key, "body_id": uuid.uuid4().hex, "body_size": len(body), "tags": list(tags),
        "stored_at": now, "seq": 0, "status": 200, "reason": "OK",
        "headers": [["Cache-Control", "max-age=300"]], "request_time": now, "response_time": now,
        "freshness": [300.0, "max-age", 0.0, now, False, False, 0.0, 0.0, False],
        "vary": [list(v) for v in vary], "etag": None, "last_modified": None, "invalidated": False})


def tier_on(redis: RedisServer, namespace: str) -> SharedTier:
    return SharedTier(ClusterSettings(redis=redis.url, node="a", namespace=namespace, timeout=2.0))


async def fill(tier: SharedTier, key: str, body: bytes, tags: tuple[str, ...] = (),
               vary: tuple[tuple[str, str], ...] = ()) -> None:
    lock = await tier.lookup(key, 5.0, lock_only=True)
    assert isinstance(lock, Locked), lock
    now = time.time()
    assert await tier.write(entry(key, body, now, tags, vary), body, lock, now)
    await tier.release(key, lock, "stored")


async def generation(tier: SharedTier) -> str:
    return (await tier._redis.get(tier.names.generation)).decode()


async def bodies(tier: SharedTier, key: str) -> set[bytes]:
    found = await tier.lookup(key, 0)
    return {body for _, body in found.variants} if isinstance(found, Found) else set()


@pytest.mark.parametrize(("evicted", "spec"), [
    (f"u:{HOT}", PurgeSpec(urls=(HOT,))),
    ("t:hot", PurgeSpec(tags=("hot",))),
    (f"h:{SITE}", PurgeSpec(prefixes=(f"{SITE}/a/",))),
])
async def test_a_purge_removes_an_entry_whose_index_set_redis_evicted(
        shared_redis: RedisServer, evicted: str, spec: PurgeSpec) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    try:
        await fill(tier, HOT, b"hot", tags=("hot",))
        await fill(tier, OTHER, b"other")
        assert await bodies(tier, HOT) == {b"hot"}
        # Redis under maxmemory with volatile-lru evicts the set (it has a TTL), not the entry.
        assert await tier._redis.delete(f"{ns}:l2:{await generation(tier)}:{evicted}") == 1
        await tier.purge(spec)
        assert await bodies(tier, HOT) == set()
        # What the evicted set did not index is still shared.
        assert await bodies(tier, OTHER) == (set() if evicted.startswith("h:") else {b"other"})
    finally:
        await tier.close()


async def test_a_later_fill_does_not_bring_back_a_variant_whose_index_set_redis_evicted(
        shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    try:
        await fill(tier, HOT, b"en-old", vary=(("accept-language", "en"),))
        assert await tier._redis.delete(f"{ns}:l2:{await generation(tier)}:u:{HOT}") == 1  # evicted
        await tier.purge(PurgeSpec(urls=(HOT,)))
        # Another variant filled after the purge puts the key back into a new u: set.
        await fill(tier, HOT, b"de-new", vary=(("accept-language", "de"),))
        assert await bodies(tier, HOT) == {b"de-new"}
    finally:
        await tier.close()


async def test_losing_the_generation_key_does_not_undo_a_purge_of_everything(shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    try:
        await fill(tier, HOT, b"first")
        await tier.purge(PurgeSpec(all=True))
        assert await bodies(tier, HOT) == set()
        await fill(tier, OTHER, b"after")
        after = await generation(tier)
        # Redis evicts the generation key (allkeys-lru) while the entries of the generation
        # before the purge are still there: the next generation is a new one, not an old one.
        assert await tier._redis.delete(tier.names.generation) == 1
        assert await bodies(tier, HOT) == set()
        assert await generation(tier) != after
        assert await bodies(tier, OTHER) == set()  # lost with it: a miss, filled again
        await fill(tier, OTHER, b"again")
        assert await bodies(tier, OTHER) == {b"again"}
    finally:
        await tier.close()


# What the release before the random generation does with NS:l2:gen (KEYS[1]; KEYS[2] is the
# purge counter): purge-all INCRs it, a lookup reads it with a default of '0'.
EARLIER_PURGE_ALL = """
redis.call('INCR', KEYS[2])
redis.call('INCR', KEYS[1])
return -1
"""
EARLIER_GENERATION = "return redis.call('GET', KEYS[1]) or '0'"


async def test_nodes_of_the_earlier_release_can_purge_everything_in_the_same_cluster(
        shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    try:
        for _ in range(2):  # the generation a missing key starts, and the one purge-all sets
            await fill(tier, HOT, b"first")
            ours = await generation(tier)
            assert ours.isdigit() and int(ours) < 2**63 - 2**32, ours  # room for an earlier node's INCR
            # An earlier node purges everything (a rolling upgrade): it must work, and be a purge.
            assert await tier._redis.eval(EARLIER_PURGE_ALL, 2, tier.names.generation, tier.names.purges) == -1
            assert int(await generation(tier)) == int(ours) + 1
            assert (await tier._redis.eval(EARLIER_GENERATION, 1, tier.names.generation)).decode() == str(int(ours) + 1)
            assert await bodies(tier, HOT) == set()
            await fill(tier, HOT, b"second")
            assert await bodies(tier, HOT) == {b"second"}
            await tier.purge(PurgeSpec(all=True))
            assert await bodies(tier, HOT) == set()
            assert await generation(tier) != str(int(ours) + 1)
            await tier._redis.delete(tier.names.generation)
    finally:
        await tier.close()


async def test_a_purge_counter_that_is_not_a_number_is_a_failure_and_the_lock_taken_is_let_go(
        shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    try:
        await tier._redis.set(tier.names.purges, "garbage")
        # The script takes the fill lock and answers the counter: unreadable, so a miss (the
        # node goes to the origin), counted as an error, and the lock is not left to expire.
        assert await tier.lookup(HOT, 5.0) is None
        assert tier.counts["error"] == 1 and tier.counts["locked"] == 0
        assert await tier._redis.exists(f"{ns}:l2:lock:{HOT}") == 0
    finally:
        await tier.close()


async def test_a_failure_of_every_lookup_is_logged_once_and_counted_each_time(
        shared_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    caplog.set_level(logging.INFO, "cachegate.cluster.shared")
    try:
        await fill(tier, OTHER, b"kept")
        await tier._redis.set(tier.names.purges, "garbage")
        for i in range(20):  # every miss fails (a Redis that is down fails the same way)
            assert await tier.lookup(f"{SITE}/miss/{i}", 5.0) is None
            if i == 10:  # a hit in between: not "works again" yet, nor the failure logged again
                assert await bodies(tier, OTHER) == {b"kept"}
        assert tier.counts["error"] == 20  # the metric counts each failure
        logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(logged) == 1, logged
        assert "shared tier failed: lookup: ValueError: " in logged[0] and "garbage" in logged[0], logged
        assert "/miss/" not in logged[0]
        await tier._redis.delete(tier.names.purges)
        tier._failures.settle = 0.0  # as after SETTLE seconds without a failure
        assert isinstance(await tier.lookup(HOT, 5.0), Locked)
        assert [rec.getMessage() for rec in caplog.records][-1] == "cluster: the shared tier works again"
    finally:
        await tier.close()


async def test_a_redis_that_is_down_is_logged_once_not_per_lookup(
        caplog: pytest.LogCaptureFixture, ports: Ports) -> None:
    port = ports.hold()  # a port nothing listens on
    tier = SharedTier(ClusterSettings(redis=f"redis://127.0.0.1:{port}/0", node="a", namespace="down", timeout=2.0))
    caplog.set_level(logging.INFO, "cachegate.cluster.shared")
    try:
        for i in range(10):
            assert await tier.lookup(f"{SITE}/miss/{i}", 5.0) is None
        assert tier.counts["error"] == 10
        logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(logged) == 1 and "the origin is asked instead" in logged[0], logged
    finally:
        await tier.close()


async def test_a_fill_locked_before_redis_restarted_empty_is_not_written_after_a_purge_made_since(
        own_redis: RedisServer) -> None:
    a, c = tier_on(own_redis, "ns"), tier_on(own_redis, "ns")
    try:
        await c.purge(PurgeSpec(tags=("unrelated",)))  # one purge before
        lock = await a.lookup(HOT, 5.0)                 # a takes the fill lock and asks the origin
        assert isinstance(lock, Locked), lock
        own_redis.kill()
        own_redis.start()                               # Redis restarts empty meanwhile
        for attempt in range(3):  # the first call on a pooled connection to the old Redis fails
            try:
                await c.purge(PurgeSpec(urls=(HOT,)))   # one purge after: c purges the URL
                break
            except Exception:
                if attempt == 2:
                    raise
        await a.lookup(OTHER, 0)                        # a's other traffic renews its connections
        now = time.time()
        assert not await a.write(entry(HOT, b"before-the-purge", now), b"before-the-purge", lock, now)
        assert await bodies(c, HOT) == set()
    finally:
        await a.close()
        await c.close()


async def test_after_a_lookup_redis_did_not_answer_the_next_ones_skip_it_for_a_while(
        own_redis: RedisServer) -> None:
    """A hung Redis (SIGSTOP), before the node's bus notices: one lookup waits cluster.timeout and
    fails; those right after it do not ask (each waited the timeout too)."""
    import os
    import signal

    tier = SharedTier(ClusterSettings(redis=own_redis.url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}",
                                      timeout=0.5))
    assert own_redis.proc is not None
    try:
        assert await tier.lookup(HOT, 0) is None  # (a miss: the connection is up)
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        assert await tier.lookup(HOT, 0) is None
        assert (tier.counts["error"], tier.counts["skipped"]) == (1, 0)
        for _ in range(3):
            assert await tier.lookup(OTHER, 5.0) is None
        assert (tier.counts["error"], tier.counts["skipped"]) == (1, 3)
        tier.cut_off = lambda: True  # the node says it is not connected: skipped however long
        tier._quiet_until = 0.0
        assert await tier.lookup(OTHER, 5.0) is None
        assert (tier.counts["error"], tier.counts["skipped"]) == (1, 4)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await tier.close()


@pytest.mark.parametrize(("status", "kept"), [(200, 610.0), (404, 610.0), (503, 10.0), (500, 10.0)])
def test_a_shared_error_is_kept_for_its_freshness_only_never_its_stale_windows(status: int, kept: float) -> None:
    """A stored 5xx is never served stale, yet Redis kept it for its stale-if-error window."""
    now = time.time()
    e = entry_from_json({
        "key": HOT, "url": HOT, "body_id": "b", "body_size": 1, "tags": [], "stored_at": now, "seq": 0,
        "status": status, "reason": "", "headers": [["Cache-Control", "max-age=10, stale-if-error=600"]],
        "request_time": now, "response_time": now,
        "freshness": [10.0, "max-age", 0.0, now, False, False, 0.0, 600.0, False],
        "vary": [], "etag": None, "last_modified": None, "invalidated": False})
    assert shared_ttl(e, now) == pytest.approx(kept)


async def test_a_release_heard_before_its_waiter_registered_still_wakes_it(shared_redis: RedisServer) -> None:
    """The lookup's answer (the lock is taken) and the release's message come on two
    connections: when the message is read first, the listener has nobody to wake, and the
    waiter that registers next used to sleep out its whole wait (the lock's time left). It
    asks the lock again once registered, and looks again at once."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    a, b = tier_on(shared_redis, ns), tier_on(shared_redis, ns)
    key = f"{SITE}/herd"
    try:
        assert await asyncio.wait_for(b.wait_filled("warm-up", 5), 3) == "stored"  # b's listener is up
        lock = await a.lookup(key, 10.0)
        assert isinstance(lock, Locked)
        busy = await b.lookup(key, 10.0)
        assert isinstance(busy, Contended) and busy.holder == lock.token
        await a.release(key, lock, "not_shared")
        await asyncio.sleep(0.3)  # b's listener has read the message: nobody was waiting
        started = time.monotonic()
        told = await b.wait_filled(key, 5.0, busy.holder)
        assert told == "stored" and time.monotonic() - started < 2
        assert b.counts["released_unheard"] == 1 and b.counts["wait_timeout"] == 0
        # A lock still held by the token looked up is waited for, and its release heard.
        lock = await a.lookup(key, 10.0)
        assert isinstance(lock, Locked)
        busy = await b.lookup(key, 10.0)
        assert isinstance(busy, Contended)
        waiting = asyncio.ensure_future(b.wait_filled(key, 5.0, busy.holder))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await a.release(key, lock, "failed")
        assert await asyncio.wait_for(waiting, 2) == "failed"
        assert b.counts["released_unheard"] == 1
    finally:
        await a.close()
        await b.close()


async def test_records_of_an_older_layout_are_counted_and_said_once(
        shared_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A node of a build older than the index sets in each record writes ``BODY_ID\\nRECORD``: a
    lookup here deletes it (it could never be purged through the sets), which used to say nothing
    while the two nodes shared nothing. Now each such record is counted, and said once."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    caplog.set_level(logging.INFO, "cachegate.cluster.shared")
    try:
        await fill(tier, HOT, b"hot")
        base = f"{ns}:l2:{await generation(tier)}"
        for i in range(2):  # as the older node's WRITE left them
            key, now = f"{SITE}/old/{i}", time.time()
            old = entry(key, b"old", now)
            await tier._redis.hset(f"{base}:m:{key}", "[]", old.body_id.encode() + b"\n" + encode_variants((old,)))
            await tier._redis.set(f"{base}:b:{old.body_id}", b"old")
        assert isinstance(await tier.lookup(f"{SITE}/old/0", 5.0), Locked)  # a miss, as before
        assert await bodies(tier, f"{SITE}/old/1") == set()
        assert await tier._redis.exists(f"{base}:m:{SITE}/old/0", f"{base}:m:{SITE}/old/1") == 0
        assert await bodies(tier, HOT) == {b"hot"}  # (this layout's: not counted)
        assert tier.counts["foreign_layout"] == 2 and tier.counts["error"] == 0
        logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(logged) == 1, logged
        assert "written by a node of an older cachegate" in logged[0]
        assert 'event="foreign_layout"' in logged[0] and "/old/" not in logged[0]
    finally:
        await tier.close()


@pytest.mark.parametrize("lost", ["expired", "evicted"])
async def test_a_fill_that_lost_its_lock_does_not_overwrite_the_newer_fill(
        shared_redis: RedisServer, lost: str) -> None:
    """a's fill outlasts its lock (expired, or evicted); b takes the lock, writes v1 and lets go.
    a's v0 then found no lock at all, and was written over v1: what the shared tier held went
    back to the older response (RFC 9111 §4: the most recent one is to be used)."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    a, b = tier_on(shared_redis, ns), tier_on(shared_redis, ns)
    try:
        slow = await a.lookup(HOT, 0.2 if lost == "expired" else 5.0)
        assert isinstance(slow, Locked), slow
        if lost == "expired":
            await asyncio.sleep(0.3)
        else:
            assert await a._redis.delete(f"{ns}:l2:lock:{HOT}") == 1
        await fill(b, HOT, b"v1")
        now = time.time()
        assert not await a.write(entry(HOT, b"v0", now), b"v0", slow, now)
        await a.release(HOT, slow, "failed")
        assert (a.counts["write_voided"], a.counts["written"]) == (1, 0)
        assert await bodies(b, HOT) == {b"v1"}
        await fill(a, HOT, b"v2")  # (a fill that took the lock after it replaces it)
        assert await bodies(b, HOT) == {b"v2"}
    finally:
        await a.close()
        await b.close()


async def test_a_variant_an_earlier_build_wrote_without_a_token_is_replaced_by_a_fill(
        shared_redis: RedisServer) -> None:
    """A rolling upgrade: a node of the build before the tokens wrote ``BODY_ID\nSETS\nRECORD``;
    a node of this one reads it, and replaces it with its own fill."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    try:
        assert await tier.lookup(HOT, 0) is None  # (a miss: the generation exists)
        base = f"{ns}:l2:{await generation(tier)}"
        now = time.time()
        old = entry(HOT, b"before", now)
        sets = json.dumps([f"u:{HOT}", f"h:{SITE}"]).encode()
        await tier._redis.hset(f"{base}:m:{HOT}", "[]", b"\n".join((old.body_id.encode(), sets,
                                                                     encode_variants((old,)))))
        await tier._redis.set(f"{base}:b:{old.body_id}", b"before")
        for s in (f"u:{HOT}", f"h:{SITE}"):
            await tier._redis.sadd(f"{base}:{s}", HOT)
        assert await bodies(tier, HOT) == {b"before"}
        await fill(tier, HOT, b"after")
        assert await bodies(tier, HOT) == {b"after"}
    finally:
        await tier.close()


async def test_fills_go_on_being_written_when_the_fence_is_lost_and_the_variants_stay(
        shared_redis: RedisServer) -> None:
    """The fence (an INCR counter) is lost while the variants stay (an allkeys-* eviction): it
    starts again above the tokens they were written with, not at 1, below them all."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    try:
        await tier._redis.set(f"{ns}:l2:fence", 1000)  # (locks were taken before)
        await fill(tier, HOT, b"v0")
        assert await tier._redis.delete(f"{ns}:l2:fence") == 1
        await fill(tier, HOT, b"v1")
        assert await bodies(tier, HOT) == {b"v1"}
    finally:
        await tier.close()


async def test_a_purge_of_many_keys_goes_through_redis_a_bounded_share_a_call(
        shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefix or tag purge went through its whole index set in one script (SMEMBERS): 200,000
    keys under one host held Redis 1.18 s, every other client waiting, past cluster.timeout, and
    the purge answered 503. Now each call empties or scans at most PURGE_STEP members, and the
    purge calls again until it is through: everything covered goes, nothing else."""
    monkeypatch.setattr(shared, "PURGE_STEP", 300, raising=False)
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = tier_on(shared_redis, ns)
    calls: list[tuple[object, ...]] = []
    try:
        await fill(tier, HOT, b"hot", tags=("many",))
        await fill(tier, OTHER, b"other")
        base = f"{ns}:l2:{await generation(tier)}:"
        variants = await tier._redis.hgetall(f"{base}m:{HOT}")
        keys = [f"{SITE}/a/{i}" for i in range(2000)]
        async with tier._redis.pipeline(transaction=False) as pipe:
            for i, k in enumerate(keys):
                pipe.hset(f"{base}m:{k}", mapping=variants)
                pipe.sadd(f"{base}h:{SITE}", k)
                if i % 2:
                    pipe.sadd(f"{base}t:many", k)
            await pipe.execute()
        real = tier._redis.eval

        async def counted(script: str, *args: object) -> object:
            if script == shared.PURGE:
                calls.append(args)
            return await real(script, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(tier._redis, "eval", counted)
        await tier.purge(PurgeSpec(tags=("many",)))
        assert len(calls) >= 1000 // 300, len(calls)
        assert await tier._redis.exists(f"{base}t:many") == 0
        assert sum([await tier._redis.exists(f"{base}m:{k}") for k in keys[1::2]]) == 0
        assert await bodies(tier, HOT) == set()

        calls.clear()
        await tier.purge(PurgeSpec(prefixes=(f"{SITE}/a/",)))
        assert len(calls) >= 2000 // 300, len(calls)
        assert sum([await tier._redis.exists(f"{base}m:{k}") for k in keys]) == 0
        assert await tier._redis.smembers(f"{base}h:{SITE}") == {OTHER.encode()}
        assert await bodies(tier, OTHER) == {b"other"}
    finally:
        await tier.close()
