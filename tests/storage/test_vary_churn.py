"""A page that varies (``Vary: User-Agent``) asked with a new value per request: each variant's
body is one record of the shared memory, so a new variant costs its own body, never a rewrite
of the others' (which, with the bodies in the key's record, pushed every other key out of the
ring); and a variant the key lists always has its body in memory or on disk."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.storage.entry import APART, body_key, decode_record
from proxy.storage.tiered import Storage
from tests.conftest import MakeProxy
from tests.harness import Handler, Origin
from tests.storage.helpers import MB, entry, open_store, read_body, store
from tests.storage.procs import HOST, ProxyProcess, write_config

KB = 1024
PAGE = "http://h.test/page"


def _ordinary(i: int) -> str:
    return f"http://h.test/o{i}"


def _variant_body(i: int, size: int = 30 * KB) -> bytes:
    return f"agent-{i}:".encode().ljust(size, b".")


async def _fill_variant(s: Storage, i: int, size: int = 30 * KB, flush: bool = False) -> str:
    e = entry(PAGE, vary=(("user-agent", f"agent-{i}"),))
    assert await store(s, e, _variant_body(i, size), flush=flush)
    return f"agent-{i}"


@pytest.mark.parametrize("with_disk", [True, False], ids=["disk", "memory-only"])
async def test_forty_new_variants_of_one_page_leave_the_other_keys_in_memory(tmp_path: Path, with_disk: bool
                                                                            ) -> None:
    """R51's shape, scaled to a 16 MB ring: 2,000 ordinary keys, then one client asking one URL
    with a new User-Agent 40 times (30 KB bodies). Each new variant used to rewrite the key's
    record with up to ``memory_max_object`` of the others' bodies (or a share of the ring
    without a disk): the ring wrote ~24 MB for 1.2 MB of bodies and lost the other keys."""
    s = open_store(str(tmp_path / "c") if with_disk else None, memory=16 * MB, memory_max_object=MB)
    try:
        memory = s.memory
        for i in range(2000):
            assert await store(s, entry(_ordinary(i)), b"x" * KB, flush=False)
        await s.flush()
        before = memory.arena.head
        for i in range(40):
            await _fill_variant(s, i, flush=i % 5 == 4)  # written behind every few fills
        written = memory.arena.head - before
        kept = sum(_ordinary(i) in memory for i in range(2000))
        assert kept == 2000, (kept, written)
        assert written < 2 * 40 * 30 * KB, written  # its bodies once, and a little metadata
        variants = memory.peek(PAGE) or ()
        assert len(variants) == 32  # (MAX_VARIANTS: the oldest go)
        for c in variants:
            assert await s.open_body(c) == _variant_body(int(c.entry.response.vary[0][1].split("-")[1]))
    finally:
        s.close()


def _listed(s: Storage) -> list[tuple[str, str]]:
    """(body id, Vary value) of each variant the key's record in the shared memory lists."""
    record = s.memory.arena.find(PAGE)
    assert record is not None
    return [(e.body_id, e.response.vary[0][1]) for e, _, _ in decode_record(PAGE, record.meta) or ()]


async def _each_variant_served(s: Storage) -> int:
    variants = await s.get(PAGE)
    for c in variants:
        i = int(c.entry.response.vary[0][1].split("-")[1])
        assert await s.open_body(c) == _variant_body(i), c.entry.response.vary
    return len(variants)


async def test_every_listed_variant_has_its_body_in_memory_or_on_disk_after_a_burst_and_a_restart(
        tmp_path: Path) -> None:
    """40 fills faster than write-behind, then other keys push the oldest bodies out of the
    ring before they are written behind: a variant whose body is nowhere any more is no longer
    listed (a miss), never listed without a body (a hit on it took the body for lost on disk
    and forgot the whole key). After a restart, what the disk lists it can serve."""
    path = str(tmp_path / "c")
    s = open_store(path, memory=8 * MB, memory_max_object=MB)
    try:
        for i in range(40):
            await _fill_variant(s, i)
        # ~9 MB of other keys: the page's oldest bodies leave the ring. None in the index bucket of
        # the page's record: ~3 records in each of its 2,048 buckets, and a bucket that got 8 let
        # its oldest go, the page's record (about one run in a hundred, by the arena's random
        # hash key): a cache may, but then nothing is listed to check.
        arena = s.memory.arena
        page_bucket = arena.fingerprint(PAGE) % arena.index_buckets
        others = (n for n in map(_ordinary, itertools.count())
                  if arena.fingerprint(n) % arena.index_buckets != page_bucket)
        for name in itertools.islice(others, 6000):
            assert await store(s, entry(name), b"x" * KB, flush=False)
        await s.flush()
        listed = _listed(s)
        assert listed
        for body_id, _ in listed:
            found = s.memory.arena.find(body_key(PAGE, body_id))
            on_disk = s.disk is not None and s.disk.get_body(PAGE, body_id, 30 * KB) is not None
            assert found is not None or on_disk, body_id
        served = await _each_variant_served(s)
        assert served == len(listed)
        assert s.memory.peek(PAGE) is not None  # never forgotten whole
    finally:
        s.close()
    s = open_store(path, memory=8 * MB, memory_max_object=MB)
    try:
        assert await _each_variant_served(s) == len(listed)
    finally:
        s.close()


async def test_a_new_variant_writes_its_body_and_the_keys_metadata_only(tmp_path: Path) -> None:
    """With several variants, the key's record holds their metadata and no body; each body is a
    record of its own, written behind and marked so."""
    s = open_store(str(tmp_path / "c"), memory=8 * MB, memory_max_object=MB)
    try:
        for i in range(3):
            await _fill_variant(s, i)
        record = s.memory.arena.find(PAGE)
        assert record is not None and record.body_len == 0
        decoded = decode_record(PAGE, record.meta) or []
        assert [body_len for _, body_len, _ in decoded] == [APART] * 3
        head = s.memory.arena.head
        await _fill_variant(s, 3)
        assert s.memory.arena.head - head < 30 * KB + 8 * KB  # its body, the key's metadata
        await s.flush()
        variants = s.memory.peek(PAGE) or ()
        assert len(variants) == 4
        for c in variants:
            assert c.apart and s.memory.arena.persisted(c.pos) and s.memory.arena.persisted(c.rec)
        assert await read_body(s, PAGE, 3) is not None
    finally:
        s.close()


def _agent_page() -> Handler:
    async def page(request: web.Request) -> web.Response:
        agent = request.headers.get("User-Agent", "")
        return web.Response(body=agent.encode().ljust(40 * KB, b"."), headers={
            "Cache-Control": "max-age=600", "Vary": "User-Agent"})

    return page


async def test_six_variants_asked_in_turn_within_one_write_behind_interval_are_each_fetched_once(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """Six variants of 40 KB asked in turn, three rounds, faster than write-behind writes them:
    every body stays in memory (six fetches, not eighteen)."""
    origin.route("/page", _agent_page())
    proxy = await make_proxy(config="cache: {memory: 64MB, memory_max_object: 64KB, "
                                    "disk: {path: cache, size: 256MB}}\n")
    agents = [f"agent-{i}" for i in range(6)]
    for _ in range(3):
        for agent in agents:
            r = await proxy.get("/page", headers={"User-Agent": agent})
            assert r.body == agent.encode().ljust(40 * KB, b"."), (agent, r.x_cache)
    assert origin.count("/page") == 6


async def test_a_purge_of_the_key_leaves_no_variants_body_to_serve(origin: Origin, make_proxy: MakeProxy) -> None:
    """A purge of the page, then each variant asked: all misses, each the origin's new body;
    the bodies kept apart went with the key's record."""
    version = {"v": "v1"}

    async def page(request: web.Request) -> web.Response:
        agent = request.headers.get("User-Agent", "")
        return web.Response(body=f"{version['v']}:{agent}".encode().ljust(20 * KB, b"."), headers={
            "Cache-Control": "max-age=600", "Vary": "User-Agent"})

    origin.route("/page", page)
    proxy = await make_proxy(config="cache: {memory: 64MB, memory_max_object: 64KB, "
                                    "disk: {path: cache, size: 256MB}}\n")
    agents = [f"agent-{i}" for i in range(8)]
    for agent in agents:
        assert (await proxy.get("/page", headers={"User-Agent": agent})).x_cache == "MISS"
    for agent in agents:
        assert (await proxy.get("/page", headers={"User-Agent": agent})).x_cache == "HIT"
    await proxy.runtime.storage.flush()  # (on disk too: the purge must reach both)
    version["v"] = "v2"
    purged = await proxy.admin("POST", "/purge", json={"urls": [proxy.url + "/page"]})
    assert purged.status == 200, purged.body
    memory = proxy.runtime.storage.memory
    assert not [r.key for r in memory.arena.scan() if r.key.startswith(proxy.url + "/page")]
    for agent in agents:
        r = await proxy.get("/page", headers={"User-Agent": agent})
        assert r.x_cache == "MISS", agent
        assert r.body == f"v2:{agent}".encode().ljust(20 * KB, b".")


@pytest.mark.slow
async def test_two_workers_fill_32_variants_and_each_is_then_a_hit(origin: Origin, tmp_path: Path) -> None:
    """``--workers 2``: 32 variants filled (each by whichever worker took the connection), then
    each asked: all hits, from either worker; the key is never forgotten whole (a variant
    listed without a body anywhere made a hit on it delete the key)."""
    origin.route("/page", _agent_page())
    cache = "cache: {memory: 32MB, memory_max_object: 64KB, disk: {path: cache, size: 256MB, shards: 2}}\n"
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, cache))
    await proxy.start("--workers", "2")
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        agents = [f"agent-{i}" for i in range(32)]
        for agent in agents:
            r = await proxy.get("/page", headers={"User-Agent": agent, "Host": HOST})
            assert r.status == 200 and r.body == agent.encode().ljust(40 * KB, b".")
        fetched = origin.count("/page")
        await asyncio.sleep(0.5)  # (written behind meanwhile, or not: either way a hit)
        for _ in range(2):
            for agent in agents:
                r = await proxy.get("/page", headers={"User-Agent": agent, "Host": HOST})
                assert r.body == agent.encode().ljust(40 * KB, b".")
                assert r.x_cache == "HIT", (agent, r.worker, r.tier)
        assert origin.count("/page") == fetched
    finally:
        await proxy.stop()


async def test_a_variant_committed_while_a_new_one_was_filled_is_still_served_once_its_body_leaves_the_ring(
        tmp_path: Path) -> None:
    """A batch commits variant 2's body while a fill of variant 3 writes the key's record again,
    copying variant 2 as not yet on disk; then the ring drops variant 2's body record. Variant 2
    is on disk: it stays listed and served (it used to be taken for a body the ring dropped
    before write-behind reached it, written out of the key's record: a miss for good, while the
    disk listed it)."""
    s = open_store(str(tmp_path / "c"), memory=8 * MB, memory_max_object=MB)
    release = [threading.Event(), threading.Event()]
    try:
        persister = s.persister
        assert persister is not None
        for i in range(2):
            await _fill_variant(s, i, flush=True)
        await _fill_variant(s, 2)
        entered = [threading.Event(), threading.Event()]
        commit_many = persister.disk.commit_many

        def held_commit(*args: Any, **kwargs: Any) -> Any:
            turn = sum(e.is_set() for e in entered)
            if turn < 2:  # (the two batches of the flush below)
                entered[turn].set()
                assert release[turn].wait(10)
            return commit_many(*args, **kwargs)

        persister.disk.commit_many = held_commit  # type: ignore[method-assign]
        flushing = asyncio.ensure_future(s.flush())
        assert await asyncio.to_thread(entered[0].wait, 10)  # the batch holding variant 2 is in the thread
        await _fill_variant(s, 3)  # copies variant 2 (its body record not marked persisted yet)
        two = next(body_id for body_id, agent in _listed(s) if agent == "agent-2")
        # The ring drops its body record (as its tail would, exactly this one).
        assert s.memory.arena.delete(body_key(PAGE, two))
        release[0].set()
        assert await asyncio.to_thread(entered[1].wait, 10)  # the next batch: variant 3's record
        s.memory._forget(PAGE)  # (read again as another worker would, before that batch ends)
        assert len(s.memory.peek(PAGE) or ()) == 4, _listed(s)
        release[1].set()
        await flushing
        persister.disk.commit_many = commit_many  # type: ignore[method-assign]
        s.memory._forget(PAGE)
        assert len(s.memory.peek(PAGE) or ()) == 4, _listed(s)
        await s.flush()
        assert sorted(agent for _, agent in _listed(s)) == [f"agent-{i}" for i in range(4)]
        assert await _each_variant_served(s) == 4
    finally:
        for r in release:  # (a failed check must not leave the batch waiting)
            r.set()
        s.close()
