"""The miss and pass-through path: hit-for-pass keys go straight through (no flight, no disk
lookup), a key the disk does not have costs no disk read, and small responses are handed to
the web layer whole."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.engine import ClientRequest, Reply
from proxy.policy.messages import RequestHead
from proxy.storage.arena import Arena
from proxy.storage.memory import ALL_TO_WRITE, Cached, MemoryTier
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, directory_ready
from tests.storage.procs import ProxyProcess, write_config


def count_calls(obj: Any, name: str) -> list[tuple[Any, ...]]:
    """Record every call of ``obj.name`` (the real method still runs)."""
    calls: list[tuple[Any, ...]] = []
    real: Callable[..., Any] = getattr(obj, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    setattr(obj, name, spy)
    return calls


async def test_a_hit_for_pass_key_costs_no_flight_and_no_disk_lookup(origin: Origin, proxy: Proxy) -> None:
    origin.route("/private", body=b"yours only", headers={"Cache-Control": "private"})
    await directory_ready(proxy)
    lookups = count_calls(proxy.runtime.storage.reads, "_load_from_disk")
    flights = count_calls(proxy.runtime.engine.coalescer, "start")
    first = await proxy.get("/private")
    assert (first.x_cache, first.body) == ("MISS", b"yours only")
    assert "detail=PRIVATE" in first.cache_status
    assert (len(lookups), len(flights)) == (0, 1)  # the directory knows the disk has nothing
    for _ in range(5):
        reply = await proxy.get("/private")
        assert (reply.status, reply.x_cache, reply.body) == (200, "MISS", b"yours only")
        assert "detail=PRIVATE" in reply.cache_status
    assert (len(lookups), len(flights)) == (0, 1)  # straight through, in the request's own task
    assert origin.count("/private") == 6


async def test_a_hit_for_pass_key_whose_response_turns_cacheable_is_stored(
    origin: Origin, proxy: Proxy
) -> None:
    origin.route("/turns", body=b"private", headers={"Cache-Control": "private"})
    await proxy.get("/turns")
    assert proxy.runtime.engine.coalescer.is_pass(_key(proxy, "/turns"))
    origin.route("/turns", body=b"public now", headers={"Cache-Control": "max-age=60"})
    stored = await proxy.get("/turns")
    assert (stored.x_cache, stored.body) == ("MISS", b"public now")
    assert "stored" in stored.cache_status
    hit = await proxy.get("/turns")
    assert (hit.x_cache, hit.body) == ("HIT", b"public now")
    assert origin.count("/turns") == 2


async def test_a_head_for_a_hit_for_pass_key_goes_upstream_as_a_head(origin: Origin, proxy: Proxy) -> None:
    """Nothing of a HEAD's answer can be stored: passed, it goes as a HEAD (as Varnish passes
    one), not as the GET a fill is, which had the origin start sending the body at every HEAD
    (megabytes of a big object). What its head says keeps the mark, or ends it."""
    origin.route("/ns", body=b"123456789", headers={"Cache-Control": "no-store"})
    for _ in range(2):
        assert (await proxy.get("/ns")).body == b"123456789"
    for _ in range(2):
        head = await proxy.request("HEAD", "/ns")
        assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", "9")
        assert head.cache_status == "cachegate; fwd=uri-miss; fwd-status=200; detail=NO-STORE"
    assert [s.method for s in origin.seen] == ["GET", "GET", "HEAD", "HEAD"]
    assert proxy.runtime.engine.coalescer.is_pass(_key(proxy, "/ns"))
    origin.route("/ns", body=b"public", headers={"Cache-Control": "max-age=60"})
    assert (await proxy.request("HEAD", "/ns")).status == 200  # storable now: the mark ends
    assert not proxy.runtime.engine.coalescer.is_pass(_key(proxy, "/ns"))
    assert (await proxy.get("/ns")).x_cache == "MISS"
    assert (await proxy.request("HEAD", "/ns")).x_cache == "HIT"
    assert [s.method for s in origin.seen] == ["GET", "GET", "HEAD", "HEAD", "HEAD", "GET"]


def _key(proxy: Proxy, path: str) -> str:
    from proxy.policy.keys import cache_key

    host = proxy.url.removeprefix("http://")
    head = RequestHead("GET", "http", host, path, CIMultiDictProxy(CIMultiDict({"Host": host})))
    return cache_key(head, proxy.runtime.engine.rules.plan(head).key)


async def test_a_key_no_process_stored_costs_no_disk_lookup(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # memory_max_object 1 KB: a bigger body is on disk only, so a hit must come from a lookup.
    proxy = await make_proxy(config="cache: {memory: 8MB, memory_max_object: 1KB, "
                                    "disk: {path: cache, size: 64MB, shards: 1}}\n")
    await directory_ready(proxy)
    origin.route("/n", body=b"no freshness: not stored")
    lookups = count_calls(proxy.runtime.storage.reads, "_load_from_disk")
    for _ in range(3):
        assert (await proxy.get("/n")).x_cache == "MISS"
    assert len(lookups) == 0  # the shared directory of the disk's keys: not there
    origin.route("/n", body=b"x" * 5000, headers={"Cache-Control": "max-age=60"})
    assert (await proxy.get("/n")).x_cache == "MISS"  # stored on disk only
    hit = await proxy.get("/n")
    assert (hit.x_cache, len(hit.body)) == ("HIT", 5000)  # the store cleared the mark
    assert origin.count("/n") == 4


async def test_a_storable_answer_ends_the_hit_for_pass_mark_before_its_client_has_it(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """The mark used to end only once the disk had the body: a client's next request for a body
    kept on disk alone, sent before the disk write had returned (late here), was passed again,
    a MISS and one more origin request."""
    proxy = await make_proxy(config="cache: {memory: 8MB, memory_max_object: 1KB, "
                                    "disk: {path: cache, size: 64MB, shards: 1}}\n")
    await directory_ready(proxy)
    origin.route("/p", body=b"yours only", headers={"Cache-Control": "private"})
    assert (await proxy.get("/p")).x_cache == "MISS"  # hit-for-pass
    storage = proxy.runtime.storage
    real = storage.put_disk
    written = asyncio.Event()

    async def slow_put_disk(*args: Any, **kwargs: Any) -> Any:
        # The write itself as usual; what it returns comes late (its sync and index, here slow).
        write = asyncio.ensure_future(real(*args, **kwargs))
        await asyncio.sleep(0.5)
        try:
            return await write
        finally:
            written.set()

    storage.put_disk = slow_put_disk  # type: ignore[method-assign]
    origin.route("/p", body=b"x" * 5000, headers={"Cache-Control": "max-age=60"})
    assert (await proxy.get("/p")).x_cache == "MISS"  # stored, on disk only
    assert not written.is_set()  # answered before the disk has it
    after = await proxy.get("/p")  # looked up, not passed: a hit
    assert (after.x_cache, len(after.body)) == ("HIT", 5000)
    assert origin.count("/p") == 2


async def test_a_small_response_that_arrived_whole_is_handed_over_as_bytes(
    origin: Origin, proxy: Proxy
) -> None:
    origin.route("/small", body=b"s" * 1024, headers={"Cache-Control": "private"})
    host = proxy.url.removeprefix("http://")
    head = RequestHead("GET", "http", host, "/small", CIMultiDictProxy(CIMultiDict({"Host": host})))
    engine = proxy.runtime.engine
    replies: list[Reply] = []
    for _ in range(3):  # the fill's leader, then hit-for-pass passes
        replies.append(await engine.handle(ClientRequest(head, "127.0.0.1")))
    for reply in replies:
        assert (reply.status, reply.body, reply.length) == (200, b"s" * 1024, 1024)
    post = RequestHead("POST", "http", host, "/small", CIMultiDictProxy(CIMultiDict({"Host": host})))
    bypass = await engine.handle(ClientRequest(post, "127.0.0.1"))
    assert (bypass.x_cache, bypass.body) == ("BYPASS", b"s" * 1024)


@pytest.mark.slow
async def test_with_two_workers_a_key_one_worker_knows_absent_is_found_once_the_other_stored_it(
    origin: Origin, tmp_path: Path
) -> None:
    proxy = ProxyProcess(str(tmp_path), write_config(
        str(tmp_path), origin.url, "cache: {memory: 64MB, disk: {path: cache, size: 256MB, shards: 2}}\n"))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        origin.route("/flip", body=b"not yet")  # no freshness: not stored (and not hit-for-pass)
        seen: set[str] = set()
        for _ in range(40):  # until both workers have looked the key up and found nothing
            reply = await proxy.get("/flip")
            assert reply.x_cache == "MISS" and "stored" not in reply.headers["Cache-Status"]
            seen.add(reply.worker)
            if len(seen) == 2:
                break
        assert seen == {"0", "1"}
        before = origin.count("/flip")
        origin.route("/flip", body=b"cacheable", headers={"Cache-Control": "max-age=60"})
        replies = [await proxy.get("/flip") for _ in range(16)]
        assert replies[0].x_cache == "MISS" and all(r.x_cache == "HIT" for r in replies[1:])
        assert {r.worker for r in replies} == {"0", "1"}
        assert origin.count("/flip") == before + 1  # the other worker found it in the store
    finally:
        await proxy.stop()


async def test_a_hit_whose_record_another_worker_replaces_at_each_read_of_its_body_is_no_miss(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A hit whose record in the shared memory is replaced (another worker's refresh) while its
    body is read looks the key up again: that second read is of a copy taken at once, which
    nothing written later changes. Before, it read a view of the new record, which could be
    replaced in its turn (a worker preempted in that instant, under load): the request went to
    the origin as a full miss (``fwd=uri-miss``) for a key stored all along. Here the other
    worker replaces the record each time a body is read from the shared memory."""
    proxy = await make_proxy(config="cache: {memory: 16MB}\n")  # no disk tier: nothing to hide a miss
    origin.route("/swr", body=b"w" * 100, headers={"Cache-Control": "max-age=0, stale-while-revalidate=600"})
    assert (await proxy.get("/swr")).x_cache == "MISS"
    memory = proxy.runtime.storage.memory
    other = MemoryTier(16 << 20, 1 << 20, arena=Arena.attach(os.dup(memory.arena.fd)), owns_arena=True)
    real = memory.body_bytes
    versions: list[bytes] = []

    def replaced_by_another_worker(cached: Cached) -> bytes | None:
        if isinstance(cached.body, memoryview):
            body = b"v%d" % len(versions) * 25
            versions.append(body)
            e = cached.entry.with_body(f"other-{len(versions)}", len(body))
            assert other.put(e.key, (Cached(e, body, state=ALL_TO_WRITE),)) is True
        return real(cached)

    memory.body_bytes = replaced_by_another_worker  # type: ignore[method-assign]
    try:
        served = await proxy.get("/swr")
    finally:
        memory.body_bytes = real  # type: ignore[method-assign]
        other.close()
    assert "fwd=uri-miss" not in served.headers["Cache-Status"], served.headers["Cache-Status"]
    assert served.body in versions  # the copy another worker wrote, whole
    assert origin.count("/swr") <= 2  # the fill, and maybe the background refresh: no miss
