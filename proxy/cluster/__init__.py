"""Cluster mode on Redis: many cachegate nodes that purge, fill and coalesce as one cache.

An adapter around the runtime, like the web layer: nothing in ``proxy/policy/`` or
the storage roles knows Redis exists. The runtime and the engine call narrow seams:

- ``Runtime.purge``: a purge goes through the node's bus (``node.ClusterNode``) once the
  node has joined (one sent before waits for that: ``Runtime.joined_cluster``),
  which appends it to a Redis stream, applies it here with the purge the node had
  before (``purge_here``: one process, or the supervisor's fan-out to its workers)
  and waits for the other nodes' acknowledgements;
- ``Engine.shared``: with ``shared_cache: true``, a flight's leader asks the shared
  tier before the origin and writes its fill through (``shared.SharedTier``), under
  a cluster-wide lock per key, so a herd spread over N nodes costs one origin request.

``settings`` (the config section), ``stream`` (the stream's pure bookkeeping) and ``outbox``
(the node's unsent invalidations, kept in a file across restarts) import no Redis client;
``node`` and ``shared`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from proxy.errors import CachegateError
from proxy.schema import show_hostport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from proxy.cluster.shared import SharedTier
    from proxy.purge import PurgeSpec
    from proxy.runtime import Runtime


_monotonic = time.monotonic


class ClusterUnavailable(CachegateError):
    """Redis cannot be reached at start and ``cluster.required`` is true."""


OUTBOX_CALL = "cluster_outbox"  # supervisor -> worker: whether invalidations wait for Redis
BEAT_CALL = "cluster_beat"  # supervisor -> worker: when its heartbeat expires, whether hits wait
HOLD_MAX = 10.0  # seconds a request waits for a node whose heartbeat lapsed to catch up (the default
# of the ``consistency_wait`` setting, which the callers read)


class WorkerGate:
    """A worker's ``NodeGate``: what its supervisor (the node's member) told it. Hits wait
    while the supervisor says so, or once its last heartbeat's key has expired (the clock is
    the machine's monotonic one, the same in every process) without word of a newer one."""

    def __init__(self, hold: Callable[[], float] = lambda: HOLD_MAX) -> None:
        self._hold = hold  # at most this long a hit waits (``consistency_wait``)
        self.invalidations_pending = False
        self.deadline = 0.0  # when the supervisor's heartbeat key expires (0: no check)
        self.held = False
        self.redis_away = False  # the supervisor is not connected to Redis: the shared tier waits
        self.clock_offset: float | None = None  # (measured by the supervisor, not told: NodeGate)
        self._told = -1
        self._go = asyncio.Event()
        self._go.set()

    def hits_held(self) -> bool:
        return self.held or _monotonic() > self.deadline > 0.0

    async def caught_up(self) -> None:
        if self.hits_held():
            self._go.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._go.wait(), self._hold())

    def told(self, n: int, deadline: float, held: bool, away: bool = False) -> None:
        if n <= self._told:
            return  # (an older word that arrived late)
        self._told, self.deadline, self.held, self.redis_away = n, deadline, held, away
        if self.hits_held():
            self._go.clear()
        else:
            self._go.set()


async def join(runtime: Runtime, local_purge: Callable[[PurgeSpec], Awaitable[int]],
               workers: int = 1, call_workers: Callable[..., Awaitable[list[Any]]] | None = None,
               port: int | None = None) -> None:
    """Make this process its node's member of the cluster (the only process, or the
    supervisor, whose ``call_workers`` calls every worker): connect, catch up, then purge
    through the bus. Raises ``ClusterUnavailable`` when Redis cannot be reached and
    ``cluster.required``. ``port``: the first client listener's port as bound (a supervisor
    reserves its ports first: a config's port 0 resolved), for the default node name and
    ``GET /cluster``'s ``listen``; a single process joins before it binds (its clients wait
    until it has caught up), so port 0 stays 0 there."""
    from proxy.cluster.node import ClusterNode

    settings = runtime.settings
    assert settings.cluster is not None
    host, listen_port = settings.listen
    if port is not None:
        listen_port = port
    cluster = settings.cluster.with_node_name(listen_port)
    disk = settings.cache.disk
    shared_purge = None
    tier = attach_shared(runtime)
    if tier is not None:
        from proxy.purge import url_shapes

        def shared_purge(spec: PurgeSpec) -> Awaitable[None]:
            rules = runtime.settings.rules
            return tier.purge(spec, {shape for u in spec.urls for shape in url_shapes(u, rules)})

    outbox_changed = beat_changed = None
    if call_workers is not None:
        wait = cluster.timeout
        telling: set[asyncio.Future[Any]] = set()

        async def outbox_changed(pending: bool) -> None:
            await call_workers(OUTBOX_CALL, wait=wait, pending=pending)

        def beat_changed(n: int, deadline: float, held: bool, away: bool) -> None:
            told = asyncio.ensure_future(call_workers(BEAT_CALL, wait=wait, n=n, deadline=deadline,
                                                      held=held, away=away))
            telling.add(told)
            told.add_done_callback(telling.discard)

    index = runtime.storage.index
    node = ClusterNode(cluster, local_purge, disk.path if disk is not None else None,
                       shared_purge=shared_purge,
                       shared_reset=tier.new_generation if tier is not None else None,
                       outbox_changed=outbox_changed, beat_changed=beat_changed,
                       info=lambda: {"workers": workers, "listen": show_hostport((host, listen_port))},
                       local_entries=index.count if index is not None else None,
                       hold=lambda: runtime.settings.consistency_wait)
    runtime.metrics.add_collector(node.collect)
    if tier is not None:
        tier.cut_off = lambda: not node.connected  # (this process's own lookups, when it serves)
    runtime.cluster = node  # GET /healthz says "not ready" while it catches up
    # Hits wait while this node's heartbeat has lapsed, and the shared tier is not consulted while
    # invalidations wait for Redis (in this process; with --workers N the member is the
    # supervisor, which serves nothing, and tells its workers of the outbox: attach_shared).
    runtime.engine.cluster = node
    try:
        await node.start()
    except BaseException:
        runtime.cluster = runtime.engine.cluster = None
        raise
    finally:
        runtime.joined.set()  # purges made meanwhile waited (``Runtime.joined_cluster``)
    runtime.closers.append(node.close)


async def purge_shared_tier(runtime: Runtime, spec: PurgeSpec) -> None:
    """Remove what ``spec`` covers from the shared tier, from this process (a worker whose
    supervisor did not answer an invalidation: ``proxy.web.server.invalidate_unheard``), so
    that no node's miss fetches it from there meanwhile. Nothing without ``shared_cache``.
    Raises when Redis cannot be reached."""
    cluster = runtime.settings.cluster
    if cluster is None or not cluster.shared_cache:
        return
    from proxy.cluster.shared import SharedTier
    from proxy.purge import url_shapes

    tier = runtime.engine.shared
    if isinstance(tier, SharedTier):
        rules = runtime.settings.rules
        await tier.purge(spec, {shape for u in spec.urls for shape in url_shapes(u, rules)})


def attach_shared(runtime: Runtime) -> SharedTier | None:
    """With ``shared_cache: true``: this process's client of the shared tier, as the engine's
    ``shared`` (every serving process: the only one, or each worker). None otherwise. In a
    worker, also what its supervisor tells it of the node (``WorkerGate``), with or without it."""
    cluster = runtime.settings.cluster
    if cluster is None:
        return None
    control = runtime.control
    if control is not None and not isinstance(runtime.engine.cluster, WorkerGate):
        gate = WorkerGate(lambda: runtime.settings.consistency_wait)
        runtime.engine.cluster = gate

        async def outbox(pending: bool) -> None:
            gate.invalidations_pending = pending

        async def beat(n: int, deadline: float, held: bool, away: bool = False) -> None:
            gate.told(n, deadline, held, away)

        control.handlers[OUTBOX_CALL] = outbox
        control.handlers[BEAT_CALL] = beat
    if not cluster.shared_cache:
        return None
    from proxy.cluster.shared import SharedTier

    if isinstance(runtime.engine.shared, SharedTier):
        return runtime.engine.shared
    tier = SharedTier(cluster)
    told = runtime.engine.cluster
    if isinstance(told, WorkerGate):
        tier.cut_off = lambda: told.redis_away
    runtime.engine.shared = tier
    runtime.closers.append(tier.close)
    runtime.metrics.add_collector(tier.collect)
    return tier
