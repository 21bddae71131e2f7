"""What one record of the shared memory's ring holds, against what the store says it kept
(memory only: nothing else keeps a body the ring refuses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import base_cache_options, load_config
from proxy.room import human_size
from proxy.runtime import open_storage
from proxy.settings import RECORD_HEADER, arena_capacity, ring_body_limit, storable_limit
from proxy.storage import arena
from tests.storage.helpers import MB, entry, open_store, store


def test_the_record_header_the_limits_count_is_the_arenas() -> None:
    assert RECORD_HEADER == arena.HEADER


def test_the_memory_only_limit_is_within_a_record_of_the_ring_for_the_workers_sharing_it() -> None:
    for memory in (1 * MB, 3 * MB, 64 * MB):
        for workers in (1, 4):
            limit = storable_limit(100 * MB, None, memory, memory, workers)
            capacity = arena_capacity(memory, workers)
            assert limit == ring_body_limit(capacity) < capacity // 2 < memory // 2
    # memory_max_object and max_object below it still rule
    assert storable_limit(100 * MB, None, 64 * 1024, 64 * MB) == 64 * 1024
    assert storable_limit(1000, None, MB, 64 * MB) == 1000


async def test_memory_max_object_over_what_the_ring_holds_is_held_to_it() -> None:
    s = open_store(None, memory=1 * MB, memory_max_object=MB)
    try:
        assert s.memory.max_object == s.max_object == ring_body_limit(s.memory.arena.capacity)
        e = entry("http://o/x")
        assert s.room(e) < s.max_object  # its key and metadata come off
        assert not await store(s, e, b"x" * (s.room(e) + 1))  # refused as it streams
        assert await store(s, e, b"x" * s.room(e))
        assert s.memory.peek(e.key) is not None
    finally:
        s.close()


async def test_without_a_disk_tier_a_body_the_ring_refuses_at_the_put_is_not_said_stored() -> None:
    s = open_store(None, memory=1 * MB, memory_max_object=MB)
    try:
        e = entry("http://o/late")
        body = b"x" * ring_body_limit(s.memory.arena.capacity)  # with its key and metadata, no record
        spool = s.spool(e, None)
        spool.limit = len(body)  # let in as the old up-front limit did: refused only at the put
        assert await spool.write(body)
        final = s.finalize(e, spool)
        assert final is not None
        assert not s.put_memory(final, spool)
        assert not await s.put_disk(final, spool)  # said True: the flight told everyone "stored"
        assert spool.refused == "TOO-LARGE"  # what the flight ends with (``Passed``)
        assert s.memory.peek(e.key) is None
    finally:
        s.close()


async def test_variants_that_fit_the_ring_alone_are_each_kept_in_a_record_of_their_own() -> None:
    s = open_store(None, memory=1 * MB, memory_max_object=MB)
    try:
        half = ring_body_limit(s.memory.arena.capacity) // 2 - 64  # two bodies fit, their metadata not
        gz = entry("http://o/v", vary=(("accept-encoding", "gzip"),))
        br = entry("http://o/v", vary=(("accept-encoding", "br"),))
        assert await store(s, gz, b"g" * half)
        assert await store(s, br, b"b" * half)
        held = s.memory.peek("http://o/v")
        assert held is not None
        # Each body is a record of its own (a key with several variants), so both fit; whatever
        # the key lists has its body whole (memory-only: in memory), the newest among them.
        assert held[-1].entry.response.vary == br.response.vary
        for c in held:
            assert c.body is not None and s.memory.body_bytes(c) == (b"b" if c is held[-1] else b"g") * half
    finally:
        s.close()


@pytest.mark.parametrize("workers", [1, 3])
def test_the_limit_the_rules_refuse_by_is_what_the_store_of_the_workers_takes(tmp_path: Path, workers: int) -> None:
    """memory_max_object and max_object over what a record of the ring holds: the config's
    limit (the rules' ``max_object``, its warning) is the ring's, for the workers that share it."""
    path = tmp_path / "c.yaml"
    path.write_text(f"upstreams: [http://127.0.0.1:9]\nworkers: {workers}\n"
                    "cache: {memory: 1MB, memory_max_object: 1MB, max_object: 1MB, disk: null}\n")
    settings = load_config(str(path))
    storage = open_storage(settings, processes=workers)
    try:
        limit = base_cache_options(settings).max_object
        assert limit == storage.max_object == ring_body_limit(storage.memory.arena.capacity) < 512 * 1024
        assert f"responses over {human_size(limit)} ({limit} bytes) are passed through" in settings.warnings[0]
    finally:
        storage.close()
