"""Everything one serving process owns, opened and closed together (no singletons).

The web apps hold a ``Runtime`` under an ``AppKey``; tests build one directly.

Exactly one process per cache directory is its *owner* and runs the store's
upkeep in the background (sweeping bans into deletions, dropping index rows of
evicted entries, removing what a crash left behind): the only process, or with
``--workers N`` the supervisor. Workers only reload the ban list now and then.

The owner holds an exclusive lock on ``OWNER_LOCK`` in the cache directory while it runs:
a second owner (another instance given the same ``cache.disk.path``) would run write-behind,
repair and the orphan sweep beside the first, and its memory would never hear of the
first one's purges. It refuses to start instead (``CacheDirectoryInUse``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.config import Settings
from proxy.control import Channel
from proxy.engine import Engine
from proxy.http_client import UPSTREAM_ERROR_KINDS
from proxy.lockfile import HeldLock, LockTaken
from proxy.logs import AccessLog, RepeatedFailure, RequestIds, setup_logging, worker_label
from proxy.metrics import Metrics, tier_families
from proxy.purge import PurgeOutcome, Purger, PurgeSpec, PurgeUnavailable
from proxy.room import MemoryUnavailable, OutOfFiles, out_of_files
from proxy.settings import arena_capacity, shard_budget, storable_limit
from proxy.storage.arena import Arena
from proxy.storage.disk import (
    KEY_SCHEME,
    ORPHAN_AGE,
    DiskTier,
    foreign_placement,
    forget_scheme,
    mark_moving,
    mark_running,
    note_budget,
    opened_with,
    record_scheme,
    recorded_scheme,
    recorded_shards,
    running_pid,
    shard_folders,
    stamp_matches,
    stamp_stop,
    unknown_writer,
    wal_limit,
)
from proxy.storage.failures import SETTLE
from proxy.storage.index import UrlTagIndex, of_earlier_release
from proxy.storage.memory import MemoryTier
from proxy.storage.persist import PERSIST_INTERVAL
from proxy.storage.spool import SPOOLS, empty_dead_spools, sweep_dead_spools
from proxy.storage.tiered import Storage
from proxy.upstream import UpstreamPool

log = logging.getLogger("cachegate.runtime")

UPKEEP_INTERVAL = 1.0  # seconds between upkeep rounds (bans are swept within about this)
ORPHAN_SWEEP_INTERVAL = 3600.0
BAN_RELOAD_INTERVAL = 30.0  # workers: pick up bans the sweeper removed
MAX_HOSTS_SEEN = 10_000
# Seconds the last commit to disk at a stop has even when the grace period is spent: a disk
# that is not busy commits the last 200 ms of fills in far less (``Runtime.close``).
LAST_FLUSH_MIN = 1.0
# In the cache directory; never written (the owner's pid is in the mark of its run,
# ``disk.mark_running``): earlier releases write their pid into it, which tells the owner's start
# that another program held the directory since (``disk.unknown_writer``).
OWNER_LOCK = ".lock"


class CacheDirectoryUnusable(Exception):
    """The cache directory (or the shared memory beside it) could not be opened: ``cause`` says
    why. Only what ``Runtime.open`` met opening the store, so nothing else is blamed on it."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class CacheDirectoryInUse(Exception):
    """Another running cachegate owns the cache directory."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"the cache directory {path} (cache.disk.path) is in use by another "
                         f"cachegate ({holder}); each instance needs a cache directory of its own")
        self.path = path


def lock_cache_directory(settings: Settings) -> HeldLock | None:
    """The owner's lock on its cache directory (None without a disk tier)."""
    disk = settings.cache.disk
    if disk is None:
        return None
    os.makedirs(disk.path, exist_ok=True)
    try:
        return HeldLock(os.path.join(disk.path, OWNER_LOCK), write_pid=False)
    except LockTaken as exc:  # (ours in the mark of its run; an earlier release's in the file)
        pid = running_pid(disk.path)
        holder = f"pid {pid}" if pid is not None and _alive(pid) else exc.holder
        raise CacheDirectoryInUse(disk.path, holder) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's)
        return True
    return True


def open_access_log(settings: Settings, metrics: Metrics | None = None,
                    keeping: AccessLog | None = None) -> AccessLog | None:
    """The access log ``settings`` ask for; None when they ask for none, or (logged) when it
    cannot be opened: then ``keeping``, the log of the config running until now, goes on."""
    if settings.access_log is None:
        return None
    dropped = metrics.access_log_dropped.inc if metrics is not None else None
    try:
        return AccessLog(settings.access_log, worker_label(), dropped)
    except OSError as exc:  # checked by the config, but the file may have gone since
        then = f"writing on to {keeping.settings.path}" if keeping is not None else "logging no requests"
        log.error("cannot open the access log %s: %s; %s", settings.access_log.path, exc, then)
        return keeping


def error_log_json(settings: Settings) -> bool:
    """The error log is JSON lines when the access log is."""
    return settings.access_log is not None and settings.access_log.format == "json"


def _foreign_writes(path: str, lock: HeldLock | None) -> tuple[str | None, str | None]:
    """The owner, at start, before it writes anything in the cache directory: why another
    program with another shard count wrote the directory since this release last stopped there
    (``disk.foreign_placement``, looked for only when the stamp of that stop does not match,
    ``disk.stamp_matches``), and why its entries may have been stored under other rules than this
    release's key scheme (None: they were not). The record of the scheme is trusted only when
    the stamp shows no other program wrote the directory since our last run
    (``disk.unknown_writer``, by the owner's ``lock`` file, which every earlier release writes
    its pid into): a release that knows neither the record nor the stamp leaves them as they were.
    An index that needs conversion is of scheme 1: noted as such before it is converted; a
    record the stamp does not vouch for is removed before this run is marked
    (``disk.mark_running``): a start killed after either still empties the entries."""
    foreign = None if stamp_matches(path) else foreign_placement(path)
    scheme = recorded_scheme(path)
    if scheme is None and of_earlier_release(os.path.join(path, "index.sqlite3")):
        scheme = 1  # (the releases whose index needs converting: ``disk.KEY_SCHEME``)
        record_scheme(path, scheme)
    writer = unknown_writer(path, lock.found if lock is not None else None)
    why = None
    if scheme is None:
        why = (f"entries with no record of the key scheme they were stored under (an earlier "
               f"release's, which wrote none; this release's is {KEY_SCHEME})")
    elif scheme != KEY_SCHEME:
        why = (f"entries stored by an earlier release, whose keys, Vary matching and rules of what "
               f"may be stored follow other rules (key scheme {scheme}, this release's {KEY_SCHEME})")
    elif writer is not None:
        why = (f"entries written since this release last ran there by another program or another "
               f"build ({writer}): the key scheme they were stored under is not known")
        forget_scheme(path)
    mark_running(path, lock.found if lock is not None else None)
    return foreign, why


def open_storage(settings: Settings, *, arena_fd: int | None = None, processes: int = 1,
                 lock: HeldLock | None = None) -> Storage:
    """The store of one process. The owner of the cache directory makes the machine's shared
    memory (``processes`` serving processes take their decoded caches out of ``cache.memory``);
    a worker attaches to it (``arena_fd``, inherited from its supervisor). ``lock``: the owner's
    on the cache directory (``lock_cache_directory``)."""
    c = settings.cache
    try:
        if arena_fd is not None:
            arena = Arena.attach(arena_fd)
        else:
            arena = Arena.create(arena_capacity(c.memory, processes),
                                 c.disk.size if c.disk is not None else 0, processes)
    except OSError as exc:  # mapping it (ENOMEM): cache.memory's fault, not the cache directory's
        raise MemoryUnavailable(c.memory, exc) from exc
    memory = MemoryTier(c.memory, c.memory_max_object, c.memory_policy, arena=arena, owns_arena=True)
    disk = index = None
    if c.disk is not None:
        os.makedirs(c.disk.path, exist_ok=True)
        # The owner (no arena yet: the first process) sets a damaged database aside and starts
        # without it; the index first, since losing it empties the disk tier too.
        repair = arena_fd is None
        foreign: str | None = None
        unknown_keys: str | None = None
        if repair:  # before the databases: on a full filesystem they may need that room
            empty_dead_spools(os.path.join(c.disk.path, SPOOLS))
            foreign, unknown_keys = _foreign_writes(c.disk.path, lock)
            note_budget(c.disk.path, shard_budget(c.disk.size, c.disk.shards))  # (before the shards)
        index = UrlTagIndex(c.disk.path, wal_limit(c.disk.size), repair=repair)
        recorded = recorded_shards(c.disk.path)
        if repair and recorded is not None and recorded != c.disk.shards:
            # (Before the folders it opens. One that cannot be written: the shards' open says
            # why, naming the file, and the move writes it again.)
            with contextlib.suppress(OSError):
                mark_moving(c.disk.path, recorded, c.disk.shards)
        disk = DiskTier(c.disk.path, c.disk.size, c.disk.shards, c.disk.eviction, repair=repair,
                        empty=index.recreated)
        # An index missing, or older than the shards, lists none of the entries past it: they
        # would be served unlisted and escape purges. Emptied, as for a damaged index.
        why = index.unlisted(disk.high_seq(), disk.has_entries()) if repair and not index.recreated else None
        old_keys = unknown_keys is not None and not index.recreated
        if why is not None:
            log.warning("cache index %s does not list every entry of the disk tier (%s): the disk "
                        "tier is emptied (its entries are misses)", index.file, why)
        elif foreign is not None and not index.recreated:
            log.warning("the cache directory %s was written, since cachegate last stopped there, "
                        "by another program with another shard count (%s): an earlier release "
                        "run on it with its own cache.disk.shards? Its purges may have missed "
                        "entries, so the disk tier is emptied (its entries are misses). Keep the "
                        "same cache.disk.shards across a rollback, or delete the cache directory",
                        c.disk.path, foreign)
        elif old_keys and (disk.has_entries()
                           or any(i >= c.disk.shards for i in shard_folders(c.disk.path))):
            log.warning("the cache directory %s holds %s: the disk tier is emptied (its entries "
                        "are misses), so that no response is served to a request this release's "
                        "rules tell apart from the one that stored it, or would not store",
                        c.disk.path, unknown_keys)
        if why is not None or (foreign is not None and not index.recreated) or old_keys:
            disk.close()
            index.clear()
            disk = DiskTier(c.disk.path, c.disk.size, c.disk.shards, c.disk.eviction, repair=repair,
                            empty=True)
        if repair:  # (after the check above: an entry is moved only if the index lists it)
            opened_with(c.disk.path, disk.shard_limit)  # (every shard is open with it now)
            disk.relayout(index.listed)
            record_scheme(c.disk.path, KEY_SCHEME)  # (the entries left are of this scheme)
    limit = storable_limit(c.max_object, (c.disk.size, c.disk.shards) if c.disk is not None else None,
                           c.memory_max_object, c.memory, arena.processes)
    # (A memory-only owner says once why it spools in a folder of its own; its workers do not.)
    storage = Storage(memory, disk, index, max_object=c.max_object, configured_limit=limit,
                      spool_warn=arena_fd is None)
    if disk is None and arena_fd is None:  # what killed processes left in this user's spool root
        sweep_dead_spools(storage.spools.root)
    return storage


@dataclass(frozen=True)
class ReplacedWorker:
    """A worker that ended while a reload waited for its answer: killed by the supervisor
    (``cause`` "watchdog": its pings went unanswered for worker_timeout; "purge": it did not
    acknowledge a purge) or exited on its own ("exited": kill -9, the OOM killer, a crash). It
    never confirmed the reload, yet the reload holds for its slot: its replacement starts from
    the config the reload committed (``proxy.supervisor.ConfigCopy``). Named in the answer so
    that a 200 does not read as every worker having confirmed it."""

    worker: int
    pid: int
    cause: str  # "watchdog", "purge" or "exited"
    exit_status: int | None  # as waitpid gives it (-9: SIGKILL); None when not reaped in time
    why: str  # what ended it, in words ("was killed by the watchdog (no answer to ... for 2 s)")

    def detail(self) -> str:
        return (f"worker {self.worker} (pid {self.pid}) {self.why} during the reload; its "
                "replacement starts with the new config")

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "pid": self.pid, "cause": self.cause,
                "exit_status": self.exit_status, "detail": self.detail()}


@dataclass
class ReloadResult:
    """What a reload did: the problems that rejected it, or what it applied."""

    problems: list[str]  # FILE:LINE: message; empty when the new config was applied
    restart_required: list[str] = field(default_factory=list)  # changed, applied at next start
    rules: int = 0
    rule_files: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # FILE:LINE: warning: ... of the applied config
    # Applied by the supervisor but not by every worker (``problems`` name them): the new config
    # runs in some processes, not "rejected" as a whole.
    partial: bool = False
    # Of ``restart_required``, what this process could not apply although the config changed
    # nothing only a restart changes (a TLS listener's new key of another type): a supervisor
    # adds its workers' to its answer (their other names are theirs, not the config's).
    unapplied: list[str] = field(default_factory=list)
    # Workers that ended during the reload without confirming it; their replacements start
    # with the new config (``ReplacedWorker``). A supervisor's only.
    replaced: tuple[ReplacedWorker, ...] = ()
    # Not applied because the process stops (not a bad config): a worker stopped alone is
    # replaced with the new config, and a supervisor tells this apart from a rejection.
    stopping: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Runtime:
    settings: Settings
    storage: Storage
    pool: UpstreamPool
    engine: Engine
    metrics: Metrics
    purger: Purger
    # Set by the server (install_reloader): re-read config and rules, apply them when valid.
    reload_config: Callable[[], Awaitable[ReloadResult]] | None = None
    # Where a purge really happens: in cluster mode the node's bus (proxy.cluster), with
    # several workers the supervisor's fan-out (in a worker, a call to the supervisor).
    # None: purge this process's store (``purge_here``).
    purge_fn: Callable[[PurgeSpec], Awaitable[PurgeOutcome]] | None = None
    # In cluster mode, in the process that is the node's member of the cluster (the only
    # process, or the supervisor): its ``proxy.cluster.node.ClusterNode``, for GET /cluster
    # and /healthz. Typed loosely so that nothing here imports the Redis client.
    cluster: Any = None
    # Set once ``proxy.cluster.join`` is over (joined, or failed): a purge waits for it.
    joined: asyncio.Event = field(default_factory=asyncio.Event)
    worker_id: int | None = None
    # In a worker: the control channel to the supervisor. Features add named calls to
    # ``control.handlers`` (answered here) and call the supervisor with ``control.call``.
    control: Channel | None = None
    # CACHEGATE_DEBUG_HEADERS=1: responses say which tier served them and which worker
    # (X-Cachegate-Tier, X-Cachegate-Worker), for debugging and the multi-worker tests.
    debug_headers: bool = field(default_factory=lambda: os.environ.get("CACHEGATE_DEBUG_HEADERS") == "1")
    # Hosts clients asked for (up to MAX_HOSTS_SEEN): with the hosts in the store, what the
    # admin API takes as "hosts cachegate serves" when admin.hosts does not list them.
    hosts_seen: set[str] = field(default_factory=set)
    owner: bool = True  # owns the cache directory: upkeep and write-behind
    # X-Request-Id values (proxy.logs), and the access log when the config asks for one.
    request_ids: RequestIds = field(default_factory=RequestIds)
    access_log: AccessLog | None = None
    # The first client listener's address once bound (``proxy.web.server``): with port 0 in the
    # config, the port the system chose, which the default Host names (``Settings.bound_listener``).
    bound_listen: tuple[str, int] | None = None
    # "starting" until the client listeners accept, "ready", then "stopping" (GET /healthz).
    state: str = "starting"
    # Why this process serves short of its config (the supervisor: workers it no longer
    # restarts, ``Supervisor._code_changed``); GET /healthz answers 503 "degraded" with it.
    degraded: str | None = None
    # The supervisor's: why its workers do not all serve now (none runs, some keep exiting:
    # ``proxy.supervisor.workers_health``), or None; GET /healthz answers 503 "degraded" with it.
    workers_health: Callable[[], str | None] | None = None
    # What else a reload applies (the web layer adds a TLS listener's certificate reload): each
    # returns None, or what it could not apply and only a restart does (``ReloadResult.unapplied``).
    on_reconfigure: list[Callable[[Settings], str | None]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Closed first by ``close`` (cluster mode's Redis connections), last added first.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _owner_lock: HeldLock | None = None  # the owner's, on its cache directory

    @classmethod
    async def open(cls, settings: Settings, *, owner: bool = True, arena_fd: int | None = None,
                   processes: int = 1) -> Runtime:
        """Raises ``CacheDirectoryInUse`` when ``owner`` and another process owns the directory:
        taken before anything is repaired or swept there; ``CacheDirectoryUnusable`` when the
        store does not open; ``UpstreamTLSUnusable`` when ``upstream.tls.ca_file`` does not load."""
        started = time.time()
        metrics = Metrics()
        # First: its TLS context (UpstreamTLSUnusable), before the cache directory is touched.
        pool = UpstreamPool(settings.upstreams, settings.pool,
                            on_error=lambda name, kind: metrics.upstream_errors.labels(name, kind).inc(),
                            on_exhausted=lambda where: metrics.out_of_resources.labels(where).inc())
        for upstream in pool.upstreams:  # at 0 from the start (proxy.metrics.KNOWN_LABELS)
            for kind in UPSTREAM_ERROR_KINDS:
                metrics.upstream_errors.labels(upstream.name, kind)
            metrics.origin_date_behind.labels(upstream.name)
        lock: HeldLock | None = None
        try:
            lock = lock_cache_directory(settings) if owner else None
            storage = open_storage(settings, arena_fd=arena_fd, processes=processes, lock=lock)
        except BaseException as exc:
            if lock is not None:
                lock.release()
            if isinstance(exc, OSError):
                raise CacheDirectoryUnusable(exc) from exc
            raise
        await pool.start()
        metrics.add_collector(pool.collect)
        runtime: Runtime

        async def invalidate(urls: Sequence[str]) -> None:
            await runtime.purge(PurgeSpec(urls=tuple(urls), invalidation=True))

        engine = Engine(settings, storage, pool, metrics, invalidate=invalidate)
        purger = Purger(storage, lambda: runtime.settings.rules)
        runtime = cls(settings, storage, pool, engine, metrics, purger)
        runtime.access_log = open_access_log(settings, metrics)
        metrics.add_collector(runtime._collect_tiers)
        if storage.disk is not None:
            loop = runtime._upkeep(started) if owner else runtime._reload_bans()
            runtime._tasks.append(asyncio.ensure_future(loop))
            if owner:  # which keys the disk holds, for every process: absent ones cost no disk read
                runtime._tasks.append(asyncio.ensure_future(runtime._rebuild_directory()))
            if owner and storage.persister is not None:  # write-behind: the owner's alone
                interval = float(os.environ.get("CACHEGATE_PERSIST_INTERVAL") or PERSIST_INTERVAL)
                storage.persister.failures = engine.write_failures
                runtime._tasks.append(asyncio.ensure_future(storage.persister.run_forever(interval)))
        if storage.disk is not None:  # body files found cut short count as read failures
            storage.reads.read_failed = metrics.storage_errors.labels("read").inc
        runtime.owner = owner
        runtime._owner_lock = lock
        return runtime

    async def purge(self, spec: PurgeSpec) -> PurgeOutcome:
        """Purge everywhere this cache lives (every worker, every node of a cluster). Every purge
        asked of this process comes here (the admin API's, the PURGE method's, an unsafe
        method's invalidation), so a failed one is counted here, once, in the process that
        answers it (``cachegate_purge_failures_total``): the count of purges made
        (``count_purge``) is the supervisor's, and a purge that failed made none. An
        invalidation's failure is the engine's to count, as it tries again URL by URL."""
        try:
            if self.purge_fn is not None:
                return await self.purge_fn(spec)
            if self.settings.cluster is not None:
                return await (await self.joined_cluster()).purge(spec)  # type: ignore[no-any-return]
            return PurgeOutcome(await self.purge_here(spec))
        except Exception:
            if not spec.invalidation:  # (the engine counts those: ``Engine._invalidate``)
                for kind in spec.kinds:
                    self.metrics.purge_failures.labels(kind).inc()
            raise

    async def joined_cluster(self) -> Any:
        """In cluster mode, this node's member of the cluster, once it has joined. The admin
        listener answers before then (GET /healthz says why the node is not ready), and a purge
        applied here alone meanwhile was lost for the other nodes, which went on serving what it
        covered: it waits for the join, up to ``cluster.ack_timeout`` (what a purge waits for the
        other nodes), else ``PurgeUnavailable`` (503) with nothing purged anywhere."""
        cluster = self.settings.cluster
        assert cluster is not None
        if not self.joined.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.joined.wait(), cluster.ack_timeout)
        if self.cluster is None or not self.joined.is_set():
            raise PurgeUnavailable(
                "cluster: the purge was not made: this node has not joined the cluster yet (it is "
                "connecting to Redis or catching up with the cluster's purges; GET /healthz answers "
                "503 until it has), so the other nodes cannot be told; nothing was purged on any "
                "node; retry once it is ready")
        return self.cluster

    async def purge_here(self, spec: PurgeSpec) -> int:
        """Purge this process's store (a cachegate of one process: its whole cache)."""
        count = await self.purger.purge(spec)
        self.count_purge(spec, count)
        return count

    def count_purge(self, spec: PurgeSpec, count: int) -> None:
        for kind in spec.kinds:
            self.metrics.purges.labels(kind).inc()
        self.metrics.purged_entries.inc(count)

    def reconfigure(self, settings: Settings) -> list[str]:
        """Apply ``settings``; what the hooks could not apply (they logged why)."""
        old = self.settings
        self.settings = settings
        self.engine.reconfigure(settings)
        if settings.access_log != old.access_log:
            running = self.access_log
            self.access_log = open_access_log(settings, self.metrics, keeping=running)
            if running is not None and self.access_log is not running:
                running.close()
            setup_logging(as_json=error_log_json(settings))
        elif self.access_log is not None:
            self.access_log.reopen()  # SIGHUP after logrotate moved the file
        unapplied = []
        for hook in self.on_reconfigure:
            try:
                kept = hook(settings)
            except Exception:  # one part failing to reload must not stop the rest
                log.exception("reload: applying the new config failed in part")
            else:
                if kept is not None:
                    unapplied.append(kept)
        return unapplied

    async def drain(self, grace: float | None = None) -> None:
        """Let the fills still running end within ``grace`` seconds (default: shutdown_grace), and
        the words their cross-worker leases send go out (``Engine.close``). A worker's stop does
        this before it closes its control channel (``proxy.web.server.serve``): a fill that ends
        later could not tell the other workers' waiters how it went. ``close`` does it too (a
        second time it has nothing to wait for)."""
        await self.engine.close(grace)

    async def close(self, grace: float | None = None) -> None:
        """Close everything; background fills get ``grace`` seconds (default: shutdown_grace),
        what is left of the stop's deadline (``proxy.web.server.serve``), and the last commit to
        disk what is left after them (at least LAST_FLUSH_MIN)."""
        deadline = time.monotonic() + (self.settings.shutdown_grace if grace is None else max(0.0, grace))
        self.storage.stop_waiting()  # (a purge behind another process's shard lock: 503 now)
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:
                log.exception("closing %r failed", close)
        self.closers.clear()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.engine.close(grace)
        await self.pool.close()
        if self.owner:  # what the shared memory holds that the disk does not yet: a clean stop keeps it
            # Bounded: with a shard's lock held by another program (a backup, a long
            # transaction), each batch waited the lock's timeout per shard and a stop took 18 s
            # where shutdown_grace was 10 (a service manager kills it then). What is left is lost
            # as a kill would lose it: never half written (docs/storage.md).
            until = max(deadline, time.monotonic() + LAST_FLUSH_MIN)
            left = 0
            try:
                await self.storage.flush(until)
                left = self.storage.unwritten()
            except Exception:
                log.exception("writing the last fills to disk failed")
            if left:
                log.warning("stopping: %d entries in memory were not written to disk before the stop's "
                            "deadline (a shard's lock held by another program, a slow or full disk); they "
                            "are misses after the restart, as after a kill", left)
        self.storage.close()
        lock = self._owner_lock
        if self.owner and self.storage.disk is not None:  # (``disk.stamp_matches`` at the next start)
            stamp_stop(self.storage.disk.path, lock.found if lock is not None else None)
        if lock is not None:  # after the store: nothing of ours writes there any more
            lock.release()
            self._owner_lock = None
        if self.access_log is not None:
            self.access_log.close()

    async def _upkeep(self, started: float) -> None:
        """The owner's background upkeep. The first orphan sweep takes everything older than
        this process (no other writer existed yet); later ones only what is surely not a write
        in progress."""
        orphans_before: float | None = started
        next_orphans = time.monotonic() + ORPHAN_SWEEP_INTERVAL
        # Works again only once no round failed for SETTLE seconds: with the cache directory
        # deleted, rounds failed and worked in turn (a storage thread with a new connection
        # fails, one with an old connection works), and each success ended the streak: a
        # traceback every few seconds where once, then once a minute, was promised.
        failures = RepeatedFailure(log, "storage upkeep", settle=SETTLE)
        while True:
            try:
                await self.storage.maintain(orphans_before=orphans_before)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if out_of_files(exc):  # said in one line, with what to do (no traceback)
                    failures.failed(OutOfFiles(exc), traceback=False)
                else:
                    failures.failed(exc)
            else:
                failures.succeeded()
            orphans_before = None
            if time.monotonic() >= next_orphans:
                orphans_before = time.time() - ORPHAN_AGE
                next_orphans = time.monotonic() + ORPHAN_SWEEP_INTERVAL
            await asyncio.sleep(UPKEEP_INTERVAL)

    async def _rebuild_directory(self) -> None:
        try:
            await self.storage.rebuild_directory()
        except Exception:  # lookups go on asking the disk
            log.exception("building the directory of the disk tier's keys failed")

    async def _reload_bans(self) -> None:
        failures = RepeatedFailure(log, "reloading bans")
        while True:
            await asyncio.sleep(BAN_RELOAD_INTERVAL)
            try:
                await self.storage.reload_bans()
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()

    def _collect_tiers(self) -> Iterator[Metric]:
        s = self.storage
        m = s.memory
        entries = {"memory": len(m)}
        size = {"memory": m.bytes}
        evictions = {"memory": m.evictions}
        budget = {"memory": m.budget}
        if s.disk is not None:
            size["disk"] = s.disk.volume()
            budget["disk"] = s.disk.capacity()
        yield from tier_families(entries, size, evictions, budget)
        c = CounterMetricFamily("cachegate_storage_write_failures",
                                "Disk writes that failed (shard lock timeout); the response was not stored")
        c.add_metric([], s.failed_writes)
        yield c
        q = GaugeMetricFamily("cachegate_disk_writes_pending",
                              "Stored responses still being written to the disk tier (write-behind queue)")
        # Bodies this process is writing to the disk tier right now (too big for memory), and in
        # the owner what memory holds that the write-behind has not committed yet
        # (proxy.storage.persist; the other processes' persisters never run).
        behind = s.persister.backlog() if self.owner and s.persister is not None else 0
        q.add_metric([], len(s.work.writes) + behind)
        yield q
        if s.disk is not None:
            lost = CounterMetricFamily(
                "cachegate_write_behind_lost",
                "Stored responses the shared memory dropped before write-behind committed them to disk")
            lost.add_metric([], m.arena.lost)
            yield lost
