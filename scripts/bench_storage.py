"""The storage benchmark behind scripts/bench-storage (not a test: it prints numbers).

For 1 KB, 100 KB and 1 MB objects it measures, in one run and on the same keys:

- memory tier ``get`` (the hit path: ``Storage.memory_get``) against a plain dict lookup,
  and memory tier ``put`` against a dict assignment;
- disk tier ``get`` (metadata + body, the body read to the end) and ``put`` (body, index,
  metadata) against ``diskcache.Cache.get``/``set`` of the same bytes under one key.

Each figure is the median of several rounds; latency percentiles are per operation.
``--purge-entries N`` also times a purge by tag covering a tenth of an index of N entries
(issue 6's constraint: 100k of 1M in under 2 s) against deleting entries one by one.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import diskcache

from proxy.policy.messages import Freshness, StoredResponse
from proxy.storage.disk import DiskTier, new_body_id
from proxy.storage.entry import Entry
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import Cached, MemoryTier
from proxy.storage.tiered import Storage

SIZES = {"1KB": 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}


def make_entry(key: str, size: int, tags: tuple[str, ...] = ()) -> Entry:
    headers = (("Content-Type", "application/octet-stream"), ("Cache-Control", "max-age=3600"),
               ("ETag", '"abc"'), ("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT"))
    r = StoredResponse(200, "OK", headers, 1000.0, 1000.0, Freshness(3600.0, "max-age", 0.0, 1000.0))
    return Entry(key, key, r, new_body_id(), size, tags, 1000.0)


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


def bench_memory(rounds: int, quick: bool) -> list[Row]:
    rows: list[Row] = []
    n = 20_000 if quick else 100_000
    for label, size in SIZES.items():
        count = n  # every key shares one body object: the tier's budget is bookkeeping only
        body = os.urandom(size)
        keys = [f"http://bench.test/item/{i}?v={label}" for i in range(count)]
        mem = MemoryTier(1 << 40, 2 << 20)
        store = Storage(mem, None, None, max_object=2 << 20)
        values = {k: (Cached(make_entry(k, size), body),) for k in keys}
        plain: dict[str, Any] = {}
        put_lat = timed(lambda k, mem=mem, values=values: mem.put(k, values[k]), keys)
        dict_put = loop_time(lambda k, plain=plain, values=values: plain.__setitem__(k, values[k]),
                             keys, rounds)
        get = store.memory_get
        mem_get, dict_get = paired_loop_time(get, plain.get, keys, rounds * 2)
        get_lat = timed(get, keys[: min(len(keys), 20_000)])
        rows.append(("memory", label, "get", mem_get, pct(get_lat, 0.5), pct(get_lat, 0.99),
                     dict_get, f"{mem_get / dict_get:.2f}x dict"))
        rows.append(("memory", label, "put", statistics.median(put_lat), pct(put_lat, 0.5),
                     pct(put_lat, 0.99), dict_put, f"{statistics.median(put_lat) / dict_put:.1f}x dict"))
        store.close()
    return rows


def bench_disk(rounds: int, quick: bool, base: str) -> list[Row]:
    rows: list[Row] = []
    for label, size in SIZES.items():
        count = {"1KB": 2000, "100KB": 400, "1MB": 60}[label] // (4 if quick else 1)
        body = os.urandom(size)
        results: dict[str, list[list[float]]] = {
            k: [] for k in ("ours_put", "raw_put", "ours_get", "raw_get")}
        for r in range(rounds):
            ours_dir = os.path.join(base, f"ours-{label}-{r}")
            raw_dir = os.path.join(base, f"raw-{label}-{r}")
            disk = DiskTier(ours_dir, 8 << 30, shards=8)
            index = UrlTagIndex(ours_dir)
            store = Storage(MemoryTier(1 << 20, 64 << 10), disk, index, max_object=64 << 20)
            raw = diskcache.FanoutCache(raw_dir, shards=8, size_limit=8 << 30, statistics=False)
            keys = [f"http://bench.test/item/{i}?v={label}" for i in range(count)]
            entries = {k: make_entry(k, size) for k in keys}
            # Alternate ours and raw per key, so that neither gets a quieter disk.
            op, rp = [], []
            for k in keys:
                t0 = time.perf_counter()
                store._commit_to_disk(entries[k], body, None)
                op.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                raw.set(k, body)
                rp.append(time.perf_counter() - t0)
            og, rg = [], []
            for k in keys:
                t0 = time.perf_counter()
                (e,) = disk.get_variants(k)
                b = disk.get_body(k, e.body_id, e.body_size)
                if not isinstance(b, bytes):
                    assert b is not None
                    with b:
                        b = b.read()
                assert len(b) == size
                og.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                v = raw.get(k)
                assert len(v) == size
                rg.append(time.perf_counter() - t0)
            results["ours_put"].append(op)
            results["raw_put"].append(rp)
            results["ours_get"].append(og)
            results["raw_get"].append(rg)
            store.close()
            raw.close()
            shutil.rmtree(ours_dir, ignore_errors=True)
            shutil.rmtree(raw_dir, ignore_errors=True)
        for opname in ("get", "put"):
            ours = [statistics.median(x) for x in results[f"ours_{opname}"]]
            base_ = [statistics.median(x) for x in results[f"raw_{opname}"]]
            flat = [v for x in results[f"ours_{opname}"] for v in x]
            m, b = statistics.median(ours), statistics.median(base_)
            rows.append(("disk", label, opname, m, pct(flat, 0.5), pct(flat, 0.99), b,
                         f"{m / b:.2f}x diskcache"))
    return rows


def bench_purge(entries: int, base: str) -> None:
    path = os.path.join(base, "purge")
    index = UrlTagIndex(path)
    db = index._db()
    tagged = entries // 10
    print(f"\npurge by tag: filling an index with {entries:,} entries, {tagged:,} of them tagged 'hot' ...",
          flush=True)
    t0 = time.perf_counter()
    batch = 50_000
    for start in range(0, entries, batch):
        db.execute("BEGIN")
        db.executemany("INSERT INTO entries (key, url) VALUES (?, ?)",
                       [(f"http://bench.test/p/{i}", f"http://bench.test/p/{i}")
                        for i in range(start, min(entries, start + batch))])
        db.executemany("INSERT INTO tags (tag, key) VALUES (?, ?)",
                       [("hot" if i % 10 == 0 else f"t{i % 1000}", f"http://bench.test/p/{i}")
                        for i in range(start, min(entries, start + batch))])
        db.execute("COMMIT")
    print(f"  filled in {time.perf_counter() - t0:.1f} s")
    disk = DiskTier(os.path.join(base, "purge-disk"), 8 << 30, shards=8)
    store = Storage(MemoryTier(64 << 20, 1 << 20), disk, index, max_object=1 << 20)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        count, bans = store._purge_shared([], [], ["hot"], False, False)
        times.append(time.perf_counter() - t0)
        assert count == tagged
        for b in bans:
            index.remove_ban(b.id)
    print(f"  purge tag 'hot' ({tagged:,} entries): median {statistics.median(times) * 1000:.1f} ms "
          f"(ban recorded + entries counted; the memory tiers drop their keys by their own tag maps)")
    # The eager alternative, per entry, on real entries: metadata read + body and metadata delete.
    n = 2000
    keys = [f"http://bench.test/e/{i}" for i in range(n)]
    for k in keys:
        store._commit_to_disk(make_entry(k, 1024, ("hot",)), os.urandom(1024), None)
    t0 = time.perf_counter()
    disk.delete_keys(keys)
    index.remove(keys)
    per = (time.perf_counter() - t0) / n
    print(f"  eager deletion instead: {per * 1e6:.0f} us per entry -> {per * tagged:.1f} s for {tagged:,}")
    store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer keys and rounds")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--purge-entries", type=int, default=0, metavar="N",
                    help="also time a purge by tag over an index of N entries (e.g. 1000000)")
    ap.add_argument("--dir", default=None, help="where to put the caches (default: a temp dir)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    base = tempfile.mkdtemp(prefix="bench-storage-", dir=args.dir)
    try:
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
              f"{platform.platform()}; diskcache {diskcache.__version__}; {rounds} rounds")
        rows = bench_memory(rounds, args.quick) + bench_disk(rounds, args.quick, base)
        print()
        print("| tier | size | op | median | p50 | p99 | baseline (median) | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for tier, label, op, med, p50, p99, b, ratio in rows:
            print(f"| {tier} | {label} | {op} | {fmt(med)} | {fmt(p50)} | {fmt(p99)} | {fmt(b)} | {ratio} |")
        if args.purge_entries:
            bench_purge(args.purge_entries, base)
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
