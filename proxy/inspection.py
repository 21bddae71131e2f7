"""Looking into the cache for the admin API: stored copies of a URL, stats, served hosts, metrics.

Every process has a half it can answer alone (what its memory tier holds, its
request counters); the disk tier and its index are shared. ``Inspector`` is the
view the admin API answers from:

- in one process (``cachegate run``), its own memory tier and the disk tier;
- in the supervisor of ``--workers N``, the disk tier (the supervisor has it open
  too) and every worker's half, asked for over the control channel with the named
  calls ``register_worker_calls`` installs in each worker (``admin_copies``,
  ``admin_stats``, ``admin_metrics``, ``admin_hosts``).

A *copy* is one variant in one tier of one process (a variant may be on disk and
in the memory of both workers at once); ``group_copies`` folds the copies of a
variant into one view for ``GET /cache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proxy.logs import RepeatedFailure
from proxy.metrics import ClusterMetrics, RequestWindow, Snapshot, hit_ratio, merge_single, render_families
from proxy.policy.keys import normalise_host, shown_vary, url_of_key
from proxy.purge import host_matches
from proxy.runtime import Runtime
from proxy.storage.entry import Entry, entry_from_json, entry_to_json
from proxy.storage.failures import merge_snapshots
from proxy.storage.tiered import Storage

# Supervisor.call_each(name, wait=..., **args): worker id (every slot) -> its answer, or the
# exception it gave (a timeout; for a worker not running, one it was never asked for)
WorkerCall = Callable[..., Awaitable[dict[int, Any]]]

log = logging.getLogger("cachegate.admin")

SAMPLE_INTERVAL = 5.0  # seconds between samples of the request counters (hit ratio, last minute)
DISK_COUNT_MAX_AGE = 10.0  # seconds a counted number of disk entries is reused (COUNT(*) is O(n))
TOP_KEYS = 20
# Seconds an admin request waits for each worker (asked all at once). A hung worker must not
# hold a scrape past Prometheus's scrape_timeout (10 s by default) until the watchdog replaces
# it: /metrics then gives that worker's last snapshot, /stats and /cache name it.
ANSWER_WAIT = 2.0
SAMPLE_WAIT = 10.0  # the background sampler's wait: nobody waits on it


@dataclass(frozen=True)
class Answers:
    """Every worker's answer to one call, by worker id, and the workers that gave none in time
    (hung, failed, or not running: dead, restarting, stopped)."""

    by_worker: dict[int, Any]
    unanswered: tuple[int, ...] = ()

    @property
    def values(self) -> list[Any]:
        return [self.by_worker[w] for w in sorted(self.by_worker)]


@dataclass(frozen=True)
class Found:
    """Stored copies, and the workers that did not answer (their share may be missing)."""

    copies: list[Copy]
    unanswered: tuple[int, ...] = ()


@dataclass(frozen=True)
class Copy:
    """One stored variant as one tier of one process holds it."""

    entry: Entry
    tier: str  # "memory" or "disk"
    worker: int | None = None  # the worker whose memory holds it (None: this process / the disk)
    hits: int | None = None  # memory-tier uses of the key since it entered that memory
    body_in_memory: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"entry": entry_to_json(self.entry), "tier": self.tier, "worker": self.worker,
                "hits": self.hits, "body_in_memory": self.body_in_memory}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Copy:
        return cls(entry_from_json(d["entry"]), str(d["tier"]), d.get("worker"), d.get("hits"),
                   bool(d.get("body_in_memory")))


# -- one process's half ----------------------------------------------------------------------


def memory_copies(runtime: Runtime, keys: Iterable[str]) -> list[Copy]:
    """The variants this process's memory tier holds under these keys (``Inspector.copies``
    found them: a lookup each, never a pass over the shared memory)."""
    memory = runtime.storage.memory
    out: list[Copy] = []
    for key in sorted(set(keys)):
        variants = memory.peek(key) or ()
        hits = memory.hits(key)
        out.extend(Copy(c.entry, "memory", runtime.worker_id, hits, c.body is not None) for c in variants)
    return out


def disk_copies(storage: Storage, keys: Iterable[str]) -> list[Copy]:
    """The variants on disk under these keys, as a reader sees them (bans applied). Blocking."""
    if storage.disk is None:
        return []
    out: list[Copy] = []
    for key in sorted(set(keys)):
        out.extend(Copy(e, "disk") for e in storage.bans.apply(storage.disk.get_variants(key)))
    return out


def local_stats(runtime: Runtime, top: int = TOP_KEYS) -> dict[str, Any]:
    """This process's memory tier and request counters (``GET /stats``' per-process half)."""
    memory = runtime.storage.memory
    return {
        "worker": runtime.worker_id, "pid": os.getpid(),
        # Its cache of decoded entries (the memory tier itself is the machine's, in /stats' tiers).
        "memory": {"decoded_entries": memory.decoded_entries, "decoded_bytes": memory.decoded_bytes},
        "requests": runtime.metrics.request_counts(),
        "hosts": sorted(runtime.hosts_seen)[:100],
        "top": [[url_of_key(k), k, n] for k, n in memory.top(top)] if top else [],
        "storage": runtime.engine.write_failures.snapshot(),
        # Whether its client listeners answer hits on the fast path (None: it has none).
        "fast_path": runtime.metrics.fast_path.to_json() if runtime.metrics.fast_path else None,
    }


def known_hosts_local(runtime: Runtime, hosts: Iterable[str]) -> list[str]:
    """Which of ``hosts`` this process has served since start (the shared memory and the disk
    are asked once, by ``Inspector.unknown_hosts``)."""
    return [host for host in hosts if host in runtime.hosts_seen]


def register_worker_calls(runtime: Runtime) -> None:
    """Answer the supervisor's inspection calls in a worker (``runtime.control`` is its channel)."""
    channel = runtime.control
    assert channel is not None

    async def admin_copies(keys: list[str]) -> list[dict[str, Any]]:
        return [c.to_json() for c in memory_copies(runtime, keys)]

    async def admin_stats(top: int) -> dict[str, Any]:
        return local_stats(runtime, top)

    async def admin_metrics() -> dict[str, Any]:
        return {"worker": runtime.worker_id, "pid": os.getpid(), "snapshot": runtime.metrics.snapshot()}

    async def admin_hosts(hosts: list[str]) -> list[str]:
        return known_hosts_local(runtime, hosts)

    channel.handlers.update({"admin_copies": admin_copies, "admin_stats": admin_stats,
                             "admin_metrics": admin_metrics, "admin_hosts": admin_hosts})


# -- the cluster view --------------------------------------------------------------------------


class Inspector:
    """What the admin API sees: this process alone, or (``call_workers`` given) the supervisor
    with its workers."""

    def __init__(self, runtime: Runtime, call_workers: WorkerCall | None = None) -> None:
        self._runtime = runtime
        self._call = call_workers
        self.cluster = ClusterMetrics()
        self.window = RequestWindow()
        # Monotonic: a step of the system clock (NTP, a VM resumed) is no uptime (a step back of
        # an hour showed uptime_seconds -3593).
        self.started = time.monotonic()
        self._disk_count: tuple[float, int] | None = None
        # Why the last count of the disk tier's entries failed (the count given is the one
        # before), or None; logged once per streak.
        self.disk_count_failed: str | None = None
        self._count_failures = RepeatedFailure(log, "counting the disk tier's entries (the index)",
                                               traceback=False, level=logging.WARNING)
        self._worker_counts: dict[str, int] = {}

    @property
    def multi(self) -> bool:
        return self._call is not None

    async def ask_workers(self, name: str, **args: Any) -> list[Any]:
        """Every live worker's answer to a named call (admin endpoints of other features)."""
        return await self._workers(name, **args)

    async def _workers(self, name: str, **args: Any) -> list[Any]:
        """Answers of every live worker that answered (failures are left out)."""
        return (await self._ask(name, **args)).values

    async def _ask(self, name: str, wait: float = ANSWER_WAIT, **args: Any) -> Answers:
        """Every worker's answer within ``wait`` seconds, and which workers gave none."""
        assert self._call is not None
        results = await self._call(name, wait=wait, **args)
        return Answers({w: r for w, r in results.items() if not isinstance(r, BaseException)},
                       tuple(sorted(w for w, r in results.items() if isinstance(r, BaseException))))

    def _take_snapshots(self, answers: Answers) -> None:
        for a in answers.values:
            self.cluster.update(int(a["worker"]), int(a["pid"]), a["snapshot"])

    # -- variants ------------------------------------------------------------------------------

    async def copies(self, urls: Iterable[str], keys: Iterable[str] = (), exact: bool = False) -> Found:
        """Every stored copy of these URLs (all key shapes) and keys, in every tier and worker.
        ``exact``: no key of the URLs has header or cookie parts (``purge.url_key_shapes``).

        The keys are found here, once (the index, and the shared memory: the machine's, the
        same in every process), in slices (``Storage.url_keys``); each worker is asked for its
        copies of those keys only. Why: each worker looked through the whole shared memory in
        one go, and with 250,000 records there every worker's clients waited 1.5-3 s, and past
        ``ANSWER_WAIT`` the answer named both workers unanswered and listed no memory copy."""
        runtime = self._runtime
        storage = runtime.storage
        urls = sorted(set(urls))
        found = sorted({*keys, *urls, *await storage.url_keys(urls, exact)})
        unanswered: tuple[int, ...] = ()
        if self._call is None:
            memory = memory_copies(runtime, found)
        else:
            answers = await self._ask("admin_copies", keys=found)
            memory = [Copy.from_json(d) for a in answers.values for d in a]
            unanswered = answers.unanswered
        disk = await storage.run(disk_copies, storage, found)
        return Found(memory + disk, unanswered)

    # -- hosts ---------------------------------------------------------------------------------

    async def unknown_hosts(self, hosts: Iterable[str]) -> list[str]:
        """Hosts (``name[:port]``) cachegate does not serve: not in ``admin.hosts`` when that is
        set; otherwise neither asked for by a client since start, nor the listen address, nor
        held in the store."""
        runtime = self._runtime
        hosts = sorted(set(hosts))
        listed = runtime.settings.admin.hosts
        if listed:
            return [h for h in hosts if not host_matches(listed, h)]
        known = set(known_hosts_local(runtime, hosts))
        for listener in runtime.settings.listeners:
            if listener.port:  # a configured listen address (a client may use it as Host)
                literal = f"[{listener.host}]" if ":" in listener.host else listener.host
                known.add(normalise_host(f"{literal}:{listener.port}", listener.scheme))
        rest = [h for h in hosts if h not in known]
        if rest and self._call is not None:
            for answer in await self._workers("admin_hosts", hosts=rest):
                known.update(answer)
            rest = [h for h in rest if h not in known]
        storage = runtime.storage
        index = storage.index
        if rest and index is not None:
            def stored(host: str) -> bool:
                return any(index.keys_for_prefix(f"{s}://{host}/", limit=1) for s in ("http", "https"))

            on_disk = await storage.run(lambda: [h for h in rest if stored(h)])
            rest = [h for h in rest if h not in on_disk]
        if rest:
            # Last, as it may cost a pass over the shared memory (in slices): the machine's,
            # asked once here, not by every process as each looked through all of it in one go
            # (a host not seen since start held every worker's clients for a second).
            in_memory = await storage.hosts_in_memory(rest)
            rest = [h for h in rest if h not in in_memory]
        return rest

    async def known_hosts(self, limit: int = 20) -> list[str]:
        """Some of the hosts cachegate serves (for error messages)."""
        runtime = self._runtime
        if runtime.settings.admin.hosts:
            return list(runtime.settings.admin.hosts)
        seen = set(runtime.hosts_seen)
        if self._call is not None:
            for p in await self._workers("admin_stats", top=0):
                seen.update(p.get("hosts", ()))
        return sorted(seen)[:limit]

    # -- metrics and stats ---------------------------------------------------------------------

    async def _disk_entries(self) -> int:
        """Keys on the shared disk tier (the index's count, at most DISK_COUNT_MAX_AGE old)."""
        storage = self._runtime.storage
        if storage.index is None:
            return 0
        now = time.monotonic()
        if self._disk_count is None or now - self._disk_count[0] > DISK_COUNT_MAX_AGE:
            index = storage.index
            try:
                self._disk_count = (now, await storage.run(index.count))
            except sqlite3.Error as exc:
                # A damaged (or unreadable) index must not turn /metrics and /stats into 500s
                # when the disk tier is in trouble: the last count stands, said so
                # (``disk_count_failed``), and a damaged index is noted for the next start.
                self._count_failures.failed(exc)
                self.disk_count_failed = str(exc)
                with contextlib.suppress(sqlite3.Error, OSError):
                    await storage.run(index.noticed, exc)
                self._disk_count = (now, self._disk_count[1] if self._disk_count else 0)
            else:
                self.disk_count_failed = None
                self._count_failures.succeeded()
        return self._disk_count[1]

    async def disk_entries(self) -> int:
        return await self._disk_entries()

    async def _disk_extras(self) -> Snapshot:
        """Families only the owner of the cache directory reports: disk entries and evictions
        (entries evicted from disk, as the index's upkeep finds them)."""
        storage = self._runtime.storage
        gone = ["cachegate_disk_directory_gone", "gauge",
                "1 when the cache directory was found gone while running (removed, moved away, "
                "another in its place): the disk tier is off, memory only, until a restart",
                [["cachegate_disk_directory_gone", {}, float(storage.disk_gone is not None)]]]
        if storage.disk_gone is not None:
            return [gone]
        if storage.disk is None or storage.index is None:
            return []
        entries = await self._disk_entries()
        damage = await storage.run(storage.index.look_for_damage)
        shards = await storage.run(storage.disk.look_for_damage)
        return [
            ["cachegate_cache_entries", "gauge", "Stored keys per tier",
             [["cachegate_cache_entries", {"tier": "disk"}, float(entries)]]],
            ["cachegate_evictions", "counter", "Evictions per tier",
             [["cachegate_evictions_total", {"tier": "disk"}, float(storage.upkeep.index_rows_dropped)]]],
            ["cachegate_disk_index_damaged", "gauge",
             "1 when the disk tier's index was found damaged: purges empty the whole disk tier "
             "until a restart, which sets the index aside (disk entries: the last count)",
             [["cachegate_disk_index_damaged", {}, float(damage is not None)]]],
            ["cachegate_disk_shards_damaged", "gauge",
             "Disk shards found damaged while running: their entries are misses until a restart "
             "sets them aside",
             [["cachegate_disk_shards_damaged", {}, float(len(shards))]]],
            ["cachegate_disk_entries_stale", "gauge",
             "1 when the last count of the disk tier's entries failed: its entries gauge is the "
             "count before",
             [["cachegate_disk_entries_stale", {}, float(self.disk_count_failed is not None)]]],
            gone,
        ]

    async def refresh(self) -> None:
        """Fetch every worker's metrics snapshot (multi-worker) and sample the request counts."""
        if self._call is not None:
            self._take_snapshots(await self._ask("admin_metrics", wait=SAMPLE_WAIT))
        self.window.add(self.request_counts())

    def request_counts(self) -> dict[str, int]:
        """Client requests by X-Cache-Status since start, over every worker (as last refreshed)."""
        if self._call is None:
            return self._runtime.metrics.request_counts()
        own = self._runtime.metrics.snapshot()
        counts: dict[str, int] = {}
        for family in self.cluster.merge(own, self.cluster.workers()):
            if family.name != "cachegate_requests":
                continue
            for s in family.samples:
                status = s.labels["cache_status"]
                counts[status] = counts.get(status, 0) + int(s.value)
        return counts

    async def metrics(self) -> bytes:
        runtime = self._runtime
        extras = await self._disk_extras()
        own = runtime.metrics.snapshot()
        if self._call is None:
            return render_families(merge_single(own, extras))
        answers = await self._ask("admin_metrics")
        self._take_snapshots(answers)
        # A worker that did not answer in time, or is not running (restarting, stopping), counts
        # with its last snapshot, and says so: every worker slot has its series.
        stale = [["cachegate_worker_metrics_stale", {"worker": str(w)}, float(w in answers.unanswered)]
                 for w in sorted({*answers.by_worker, *answers.unanswered})]
        extras = [*extras, ["cachegate_worker_metrics_stale", "gauge",
                            "1 when a worker did not answer this scrape in time or is not running: "
                            "its numbers are from its last snapshot", stale]]
        return render_families(self.cluster.merge(own + extras, self.cluster.workers()))

    async def stats(self, top: int = TOP_KEYS) -> dict[str, Any]:
        runtime = self._runtime
        storage = runtime.storage
        unanswered: list[int] = []
        if self._call is None:
            parts = [local_stats(runtime, top)]
        else:
            # Both at once: a worker that does not answer costs one wait, not two in a row.
            stats, snapshots = await asyncio.gather(self._ask("admin_stats", top=top),
                                                    self._ask("admin_metrics"))
            parts = stats.values
            self._take_snapshots(snapshots)
            unanswered = sorted({*stats.unanswered, *snapshots.unanswered})
        m = storage.memory  # the machine's shared memory: the same in every process
        tiers: dict[str, Any] = {"memory": {"entries": len(m), "bytes": m.bytes, "evictions": m.evictions}}
        if storage.disk is not None:
            disk = storage.disk
            max_body = storage.max_object  # (first: it follows the budget the owner published)
            tiers["disk"] = {"entries": await self._disk_entries(),
                             "bytes": await storage.run(disk.volume),
                             "evictions": storage.upkeep.index_rows_dropped,
                             # Each shard's budget in force (lower while the URL index takes more
                             # than its share) and the biggest body stored now: without them an
                             # operator saw big fills TOO-LARGE under a max_object far above them.
                             "shard_budget": disk.budget, "shard_budget_configured": disk.shard_limit,
                             "max_body": max_body,
                             # New entries kept in memory only: the directory is over
                             # cache.disk.size (the owner's ``DiskTier.weigh``, shared).
                             "over_size": storage.memory.arena.disk_full}
            if self.disk_count_failed is not None:
                tiers["disk"]["entries_stale"] = f"the last count: counting failed ({self.disk_count_failed})"
            if storage.index is not None and (damage := await storage.run(storage.index.look_for_damage)):
                tiers["disk"]["index_damaged"] = damage
            if shards := await storage.run(disk.look_for_damage):
                tiers["disk"]["shards_damaged"] = shards
        elif storage.disk_gone is not None:  # (given up while running: memory only until a restart)
            tiers["disk"] = {"gone": storage.disk_gone}
        counts = self.request_counts()
        seconds, recent = self.window.last(counts)
        hits: dict[tuple[str, str], int] = {}
        for p in parts:
            for url, key, n in p["top"]:
                hits[(url, key)] = hits.get((url, key), 0) + int(n)
        ranked = sorted(hits.items(), key=lambda kv: (-kv[1], kv[0][1]))[:top]
        out: dict[str, Any] = {
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "tiers": tiers,
            "requests": {"total": sum(counts.values()), "by_cache_status": dict(sorted(counts.items()))},
            "hit_ratio": {
                "since_start": _round(hit_ratio(counts)),
                "last_minute": _round(hit_ratio(recent)),
                "last_minute_requests": sum(recent.values()),
                "last_minute_window_seconds": round(seconds, 1),
            },
            "top_keys": [{"url": url, "key": key, "hits": n} for (url, key), n in ranked],
            # Storage write failures (a full disk): responses passed on unstored meanwhile.
            # (With workers, the supervisor's too: it writes behind to the disk tier.)
            "storage": merge_snapshots([p["storage"] for p in parts if "storage" in p]
                                       + ([runtime.engine.write_failures.snapshot()] if self._call else [])),
        }
        # The fast hit path: on, or off and why (a process whose aiohttp lacks what it needs).
        states = [p["fast_path"] for p in parts if p.get("fast_path")]
        out["fast_path"] = next((s for s in states if not s["enabled"]), states[0] if states else None)
        if self._call is not None:
            out["workers"] = [{"worker": p["worker"], "pid": p["pid"], "memory": p["memory"],
                               "requests": sum(p["requests"].values()), "fast_path": p.get("fast_path")}
                              for p in sorted(parts, key=lambda p: p["worker"])]
            if unanswered:  # counted with its last snapshot; its top keys and storage are missing
                out["unanswered_workers"] = unanswered
        return out

    async def sample_forever(self) -> None:
        """The admin app's background task: a sample every SAMPLE_INTERVAL seconds."""
        while True:
            with contextlib.suppress(Exception):
                await self.refresh()
            await asyncio.sleep(SAMPLE_INTERVAL)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


# -- views ----------------------------------------------------------------------------------


def copy_priority(c: Copy) -> tuple[bool, float, int]:
    """Which copy of a variant tells its current state: a soft-purged mark or a later freshening wins."""
    r = c.entry.response
    return (r.invalidated, r.response_time, c.entry.seq)


def group_copies(copies: Iterable[Copy]) -> list[tuple[Entry, list[Copy]]]:
    """Copies folded per stored response (key and body id), by key, most recently stored first."""
    groups: dict[tuple[str, str], list[Copy]] = {}
    for c in copies:
        groups.setdefault((c.entry.key, c.entry.body_id), []).append(c)
    out = [(max(cs, key=copy_priority).entry, cs) for cs in groups.values()]
    out.sort(key=lambda g: (g[0].key, -g[0].stored_at))
    return out


def variant_view(entry: Entry, copies: list[Copy], now: float) -> dict[str, Any]:
    """One stored variant for ``GET /cache``: where it is, how old, how fresh, its tags and hits."""
    r = entry.response
    f = r.freshness
    tiers = sorted({c.tier for c in copies}, key=("memory", "disk").index)
    in_memory = [c for c in copies if c.tier == "memory"]
    hits = sum(c.hits or 0 for c in in_memory)
    ttl = r.ttl(now)  # a soft-purged entry is stale since the purge
    view: dict[str, Any] = {
        "key": entry.key,
        "url": entry.url,
        # Workers that each fetched the same variant before the other's copy reached the disk
        # hold different copies for a while: each copy is listed, told apart by its body id.
        "body_id": entry.body_id,
        "vary": shown_vary(r.vary),
        "status": r.status,
        "headers": [list(h) for h in r.headers],
        "size": entry.body_size,
        "age": round(f.age(now), 3),
        "ttl": round(ttl, 3),
        "fresh": ttl > 0 and not r.invalidated and not f.no_cache,
        "soft_purged": r.invalidated,
        "freshness_source": f.source,
        "lifetime": f.lifetime,
        "stale_while_revalidate": f.stale_while_revalidate,
        "stale_if_error": f.stale_if_error,
        "tags": list(entry.tags),
        # Where the next request's body comes from: memory when a worker's memory holds it.
        "tier": "memory" if any(c.body_in_memory for c in in_memory) or "disk" not in tiers else "disk",
        "tiers": tiers,
        "hits": hits,
        "stored_at": entry.stored_at,
        "etag": r.etag,
        "last_modified": r.last_modified,
    }
    workers = sorted({c.worker for c in in_memory if c.worker is not None})
    if workers:
        view["memory_workers"] = workers
    view["body_in_memory"] = any(c.body_in_memory for c in in_memory)
    return view
