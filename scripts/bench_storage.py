"""The storage benchmark behind scripts/bench-storage (not a test: it prints numbers).

For 1 KB, 100 KB and 1 MB objects it measures, in one run and on the same keys:

- memory tier ``get``: the hit lookup, ``Storage.memory_get`` (the key's decoded variants in
  this process, the check that their record is still in the shared memory, the use counted;
  the fast path does the same in two calls, ``fresh_view`` and ``serve_from``), every key
  kept decoded as a hot key is, against a plain dict lookup;
- memory tier ``put``: a fill's ``Storage.put_memory`` (the key's variants looked up and
  merged, a new record written to the shared memory with the body copied in), against a dict
  assignment;
- disk tier ``get``: ``DiskTier.get_variants`` then ``get_body``, the body read to the end
  (what a read from disk does), against ``diskcache.FanoutCache.get`` of the same bytes;
- disk tier ``put``: the write-behind commit of one entry (the record ``put_memory`` wrote,
  committed by ``Storage.flush``: body, index row, metadata, tags), against
  ``FanoutCache.set`` of the same bytes under one key, each awaited from the event loop and
  run in a thread as the proxy does; ``put-batch``: the same for all the round's keys in one
  write-behind batch (as under load), against the same ``set`` calls in one thread call
  (its p50/p99 are over the rounds' per-entry figures).

Each figure is the median of several rounds; latency percentiles are per operation.
``--purge-entries N`` also times a purge by tag covering a tenth of an index of N entries
(``Storage.purge_shared``; the purge constraint: 100k of 1M in under 2 s) against deleting
entries one by one. ``--smoke`` runs every part on a few keys, for the tests (its numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import diskcache

from proxy.policy.messages import Freshness, StoredResponse
from proxy.storage.disk import DiskTier, new_body_id
from proxy.storage.entry import Entry
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import Cached, MemoryTier
from proxy.storage.tiered import Storage
from proxy.storage.writes import BodySpool

SIZES = {"1KB": 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}


@dataclass(frozen=True)
class Scale:
    """How many keys and rounds each part uses."""

    memory_keys: dict[str, int]
    disk_keys: dict[str, int]
    rounds: int
    eager_keys: int  # entries deleted one by one, for the purge's eager alternative


FULL = Scale({"1KB": 100_000, "100KB": 2000, "1MB": 200}, {"1KB": 2000, "100KB": 400, "1MB": 60}, 5, 2000)
QUICK = Scale({"1KB": 20_000, "100KB": 1000, "1MB": 100}, {"1KB": 500, "100KB": 100, "1MB": 15}, 3, 2000)
SMOKE = Scale({"1KB": 50, "100KB": 10, "1MB": 3}, {"1KB": 10, "100KB": 4, "1MB": 2}, 1, 20)


def make_entry(key: str, size: int, tags: tuple[str, ...] = ()) -> Entry:
    headers = (("Content-Type", "application/octet-stream"), ("Cache-Control", "max-age=3600"),
               ("ETag", '"abc"'), ("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT"))
    r = StoredResponse(200, "OK", headers, 1000.0, 1000.0, Freshness(3600.0, "max-age", 0.0, 1000.0))
    return Entry(key, key, r, new_body_id(), size, tags, 1000.0)


async def received(store: Storage, entry: Entry, body: bytes) -> tuple[Entry, BodySpool]:
    """``entry`` with ``body`` received as a fill receives it (``Storage.spool``), finalized:
    ready for ``put_memory``."""
    spool = store.spool(entry, len(body))
    assert await spool.write(body)
    final = store.finalize(entry, spool)
    assert final is not None
    return final, spool


def timed(fn: Callable[[Any], Any], items: list[Any]) -> list[float]:
    """Per-call latencies in seconds."""
    out = []
    clock = time.perf_counter
    for it in items:
        t0 = clock()
        fn(it)
        out.append(clock() - t0)
    return out


def loop_time(fn: Callable[[Any], Any], items: list[Any], rounds: int) -> float:
    """Median seconds per call of a tight loop (for sub-microsecond operations); the garbage
    collector is off while it runs, as timeit does."""
    gc.collect()
    gc.disable()
    try:
        return _loop_time(fn, items, rounds)
    finally:
        gc.enable()


def _loop_time(fn: Callable[[Any], Any], items: list[Any], rounds: int) -> float:
    per = []
    for it in items:  # warm-up round, not counted
        fn(it)
    for _ in range(rounds):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        per.append((time.perf_counter() - t0) / len(items))
    return statistics.median(per)


def paired_loop_time(fn: Callable[[Any], Any], base: Callable[[Any], Any], items: list[Any],
                     rounds: int) -> tuple[float, float]:
    """Like ``loop_time`` for two functions, their rounds interleaved so that both see the
    same machine (this one is shared and noisy)."""
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(loop_time(fn, items, 1))
        theirs.append(loop_time(base, items, 1))
    return statistics.median(ours), statistics.median(theirs)


def pct(lat: list[float], p: float) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, int(p * len(s)))]


Row = tuple[str, str, str, float, float, float, float, str]


def bench_memory(scale: Scale) -> list[Row]:
    return asyncio.run(_bench_memory(scale))


async def _bench_memory(scale: Scale) -> list[Row]:
    rows: list[Row] = []
    rounds = scale.rounds
    for label, size in SIZES.items():
        count = scale.memory_keys[label]
        body = os.urandom(size)
        keys = [f"http://bench.test/item/{i}?v={label}" for i in range(count)]
        # A ring that holds every key twice over (none of them evicted: every get is a hit),
        # already full of other records, and every key kept decoded in this process once read
        # twice, as a hot key is.
        ring = 2 * count * (size + 1024) + (64 << 20)
        mem = MemoryTier(ring, 2 << 20, decoded=1 << 40)
        store = Storage(mem, None, None, max_object=2 << 20)
        fill_ring(mem)
        spools = {k: await received(store, make_entry(k, size), body) for k in keys}
        plain: dict[str, Any] = {}

        def put(k: str, store: Storage = store, spools: dict[str, tuple[Entry, BodySpool]] = spools) -> None:
            assert store.put_memory(*spools[k])

        put_lat = timed(put, keys)
        for _, spool in spools.values():
            spool.discard()

        def dict_set(k: str, plain: dict[str, Any] = plain,
                     spools: dict[str, tuple[Entry, BodySpool]] = spools) -> None:
            plain[k] = spools[k]

        dict_put = loop_time(dict_set, keys, rounds)
        get = store.memory_get
        # Each key read twice in a row: the second read keeps it decoded (the doorkeeper). A
        # key may be gone all the same, rarely: a full bucket of the ring's index drops its
        # oldest record (1 of 100,000 1 KB keys, once); the gets are timed on those found.
        keys = [k for k in keys if get(k) is not None and get(k) is not None]
        assert len(keys) >= count * 0.99, f"{count - len(keys)} of {count} keys not found in memory"
        assert all(mem.hits(k) for k in keys), "keys not kept decoded"
        mem_get, dict_get = paired_loop_time(get, plain.get, keys, rounds * 2)
        get_lat = timed(get, keys[: min(len(keys), 20_000)])
        rows.append(("memory", label, "get", mem_get, pct(get_lat, 0.5), pct(get_lat, 0.99),
                     dict_get, f"{mem_get / dict_get:.2f}x dict"))
        put_med = statistics.median(put_lat)
        rows.append(("memory", label, "put", put_med, pct(put_lat, 0.5),
                     pct(put_lat, 0.99), dict_put, f"{put_med / dict_put:.1f}x dict"))
        store.close()
    return rows


def fill_ring(mem: MemoryTier) -> None:
    """Write throwaway records until the shared memory's ring has wrapped, as a running proxy's
    has: a put then lands on pages already in RAM and evicts the oldest records. (A new ring's
    first pass costs a page fault per 4 KiB written: 0.65 ms of a 1 MB put.)"""
    body = os.urandom(1 << 20)
    i = 0
    while mem.evictions == 0:
        key = f"http://bench.test/filler/{i}"
        assert mem.put(key, (Cached(make_entry(key, len(body)), body),))
        i += 1


def open_store(path: str) -> Storage:
    """A store with a disk tier, as the process that owns the cache directory has (it writes
    behind: ``Storage.flush``)."""
    disk = DiskTier(path, 8 << 30, shards=8)
    index = UrlTagIndex(path)
    return Storage(MemoryTier(256 << 20, 2 << 20), disk, index, max_object=64 << 20)


def bench_disk(scale: Scale, base: str) -> list[Row]:
    return asyncio.run(_bench_disk(scale, base))


async def _bench_disk(scale: Scale, base: str) -> list[Row]:
    rows: list[Row] = []
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw")
    for label, size in SIZES.items():
        count = scale.disk_keys[label]
        body = os.urandom(size)
        results: dict[str, list[list[float]]] = {
            k: [] for k in ("ours_put", "raw_put", "ours_get", "raw_get", "ours_put-batch", "raw_put-batch")}
        for r in range(scale.rounds):
            ours_dir = os.path.join(base, f"ours-{label}-{r}")
            raw_dir = os.path.join(base, f"raw-{label}-{r}")
            store = open_store(ours_dir)
            disk = store.disk
            assert disk is not None
            raw = diskcache.FanoutCache(raw_dir, shards=8, size_limit=8 << 30, statistics=False)
            keys = [f"http://bench.test/item/{i}?v={label}" for i in range(count)]
            # Alternate ours and raw per key, so that neither gets a quieter disk.
            op, rp = [], []
            for k in keys:
                final, spool = await received(store, make_entry(k, size), body)
                assert store.put_memory(final, spool)
                await store.put_disk(final, spool)  # nothing now: the owner writes it behind
                t0 = time.perf_counter()
                assert await store.flush() == 1
                op.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await loop.run_in_executor(thread, raw.set, k, body)
                rp.append(time.perf_counter() - t0)
            og, rg = [], []
            for k in keys:
                t0 = time.perf_counter()
                (e,) = disk.get_variants(k)
                got = disk.get_body(k, e.body_id, e.body_size)
                if not isinstance(got, bytes):
                    assert got is not None
                    with got:
                        got = got.read()
                assert len(got) == size
                og.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                v = raw.get(k)
                assert len(v) == size
                rg.append(time.perf_counter() - t0)
            # The same keys again, all in one write-behind batch (new bodies of the same keys).
            for k in keys:
                final, spool = await received(store, make_entry(k, size), body)
                assert store.put_memory(final, spool)
                await store.put_disk(final, spool)
            t0 = time.perf_counter()
            assert await store.flush() == count
            ob = (time.perf_counter() - t0) / count

            def set_all(raw: diskcache.FanoutCache = raw, keys: list[str] = keys, body: bytes = body) -> None:
                for k in keys:
                    raw.set(k, body)

            t0 = time.perf_counter()
            await loop.run_in_executor(thread, set_all)
            rb = (time.perf_counter() - t0) / count
            results["ours_put"].append(op)
            results["raw_put"].append(rp)
            results["ours_get"].append(og)
            results["raw_get"].append(rg)
            results["ours_put-batch"].append([ob])
            results["raw_put-batch"].append([rb])
            store.close()
            raw.close()
            shutil.rmtree(ours_dir, ignore_errors=True)
            shutil.rmtree(raw_dir, ignore_errors=True)
        for opname in ("get", "put", "put-batch"):
            ours = [statistics.median(x) for x in results[f"ours_{opname}"]]
            base_ = [statistics.median(x) for x in results[f"raw_{opname}"]]
            flat = [v for x in results[f"ours_{opname}"] for v in x]
            m, b = statistics.median(ours), statistics.median(base_)
            rows.append(("disk", label, opname, m, pct(flat, 0.5), pct(flat, 0.99), b,
                         f"{m / b:.2f}x diskcache"))
    thread.shutdown()
    return rows


def bench_purge(entries: int, base: str, scale: Scale) -> None:
    asyncio.run(_bench_purge(entries, base, scale))


async def _bench_purge(entries: int, base: str, scale: Scale) -> None:
    path = os.path.join(base, "purge")
    store = open_store(path)
    disk, index = store.disk, store.index
    assert disk is not None and index is not None
    tagged = entries // 10
    print(f"\npurge by tag: filling an index with {entries:,} entries, {tagged:,} of them tagged 'hot' ...",
          flush=True)
    t0 = time.perf_counter()
    batch = 50_000
    for start in range(0, entries, batch):
        index.add_many([(f"http://bench.test/p/{i}",
                         ("hot",) if i % 10 == 0 else (f"t{i % 1000}",))
                        for i in range(start, min(entries, start + batch))])
    print(f"  filled in {time.perf_counter() - t0:.1f} s")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        count, bans = await store.purge_shared([], tags=["hot"])
        times.append(time.perf_counter() - t0)
        assert count == tagged, (count, tagged)
        for b in bans:
            index.remove_ban(b.id)
    print(f"  purge tag 'hot' ({tagged:,} entries): median {statistics.median(times) * 1000:.1f} ms "
          "(the disk's half: a ban recorded and the entries counted; the shared memory's, a pass over "
          "its records, is apart)")
    # The eager alternative, per entry, on real entries: metadata read + body and metadata delete.
    n = scale.eager_keys
    keys = [f"http://bench.test/e/{i}" for i in range(n)]
    for k in keys:
        final, spool = await received(store, make_entry(k, 1024, ("hot",)), os.urandom(1024))
        assert store.put_memory(final, spool)
        await store.put_disk(final, spool)
    assert await store.flush() == n
    t0 = time.perf_counter()
    assert len(disk.delete_keys(keys)) == n
    index.remove(keys)
    per = (time.perf_counter() - t0) / n
    print(f"  eager deletion instead: {per * 1e6:.0f} us per entry -> {per * tagged:.1f} s for {tagged:,}")
    store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer keys and rounds")
    ap.add_argument("--smoke", action="store_true",
                    help="a few keys and one round: checks that every part runs (for the tests)")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--purge-entries", type=int, default=0, metavar="N",
                    help="also time a purge by tag over an index of N entries (e.g. 1000000)")
    ap.add_argument("--dir", default=None, help="where to put the caches (default: a temp dir)")
    args = ap.parse_args()
    scale = SMOKE if args.smoke else QUICK if args.quick else FULL
    rounds = args.rounds or scale.rounds
    scale = Scale(scale.memory_keys, scale.disk_keys, rounds, scale.eager_keys)
    base = tempfile.mkdtemp(prefix="bench-storage-", dir=args.dir)
    try:
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
              f"{platform.platform()}; diskcache {diskcache.__version__}; {rounds} rounds")
        rows = bench_memory(scale) + bench_disk(scale, base)
        print()
        print("| tier | size | op | median | p50 | p99 | baseline (median) | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for tier, label, op, med, p50, p99, b, ratio in rows:
            print(f"| {tier} | {label} | {op} | {fmt(med)} | {fmt(p50)} | {fmt(p99)} | {fmt(b)} | {ratio} |")
        if args.purge_entries:
            bench_purge(args.purge_entries, base, scale)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def fmt(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
