"""Cluster mode on Redis: many cachegate nodes that purge, fill and coalesce as one cache.

An adapter around the runtime, like the web layer: nothing in ``proxy/policy/`` or
the storage roles knows Redis exists. The runtime and the engine call narrow seams:

- ``Runtime.purge_fn``: a purge goes through the node's bus (``node.ClusterNode``),
  which appends it to a Redis stream, applies it here with the purge the node had
  before (``purge_here``: one process, or the supervisor's fan-out to its workers)
  and waits for the other nodes' acknowledgements;
- ``Engine.shared``: with ``shared_cache: true``, a flight's leader asks the shared
  tier before the origin and writes its fill through (``shared.SharedTier``), under
  a cluster-wide lock per key, so a herd spread over N nodes costs one origin request.

``settings`` (the config section) and ``stream`` (the stream's pure bookkeeping)
import no Redis client; ``node`` and ``shared`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.errors import CachegateError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from proxy.cluster.shared import SharedTier
    from proxy.purge import PurgeSpec
    from proxy.runtime import Runtime


class ClusterUnavailable(CachegateError):
    """Redis cannot be reached at start and ``cluster.required`` is true."""


OUTBOX_CALL = "cluster_outbox"  # supervisor -> worker: whether invalidations wait for Redis


class WorkerGate:
    """A worker's ``NodeGate``: what its supervisor (the node's member) told it of its outbox."""

    invalidations_pending = False

    def hits_held(self) -> bool:
        return False  # (the member's own check: docs/cluster.md, "A node that was stopped")

    async def caught_up(self) -> None:
        return None


async def join(runtime: Runtime, local_purge: Callable[[PurgeSpec], Awaitable[int]],
               workers: int = 1, call_workers: Callable[..., Awaitable[list[Any]]] | None = None) -> None:
    """Make this process its node's member of the cluster (the only process, or the
    supervisor, whose ``call_workers`` calls every worker): connect, catch up, then purge
    through the bus. Raises ``ClusterUnavailable`` when Redis cannot be reached and
    ``cluster.required``."""
    from proxy.cluster.node import ClusterNode

    settings = runtime.settings
    cluster = settings.cluster
    assert cluster is not None
    disk = settings.cache.disk
    shared_purge = None
    tier = attach_shared(runtime)
    if tier is not None:
        from proxy.purge import keys_for_url

        def shared_purge(spec: PurgeSpec) -> Awaitable[None]:
            rules = runtime.settings.rules
            return tier.purge(spec, {keys_for_url(u, rules) for u in spec.urls})

    outbox_changed = None
    if call_workers is not None and tier is not None:
        wait = cluster.timeout

        async def outbox_changed(pending: bool) -> None:
            await call_workers(OUTBOX_CALL, wait=wait, pending=pending)

    host, port = settings.listen
    index = runtime.storage.index
    node = ClusterNode(cluster, local_purge, disk.path if disk is not None else None,
                       shared_purge=shared_purge,
                       shared_reset=tier.new_generation if tier is not None else None,
                       outbox_changed=outbox_changed,
                       info=lambda: {"workers": workers, "listen": f"{host}:{port}"},
                       local_entries=index.count if index is not None else None)
    runtime.metrics.add_collector(node.collect)
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
    runtime.closers.append(node.close)


def attach_shared(runtime: Runtime) -> SharedTier | None:
    """With ``shared_cache: true``: this process's client of the shared tier, as the engine's
    ``shared`` (every serving process: the only one, or each worker). None otherwise."""
    cluster = runtime.settings.cluster
    if cluster is None or not cluster.shared_cache:
        return None
    from proxy.cluster.shared import SharedTier

    if isinstance(runtime.engine.shared, SharedTier):
        return runtime.engine.shared
    tier = SharedTier(cluster)
    runtime.engine.shared = tier
    control = runtime.control
    if control is not None:  # a worker: its supervisor tells it whether its outbox holds anything
        gate = WorkerGate()
        runtime.engine.cluster = gate

        async def outbox(pending: bool) -> None:
            gate.invalidations_pending = pending

        control.handlers[OUTBOX_CALL] = outbox
    runtime.closers.append(tier.close)
    runtime.metrics.add_collector(tier.collect)
    return tier
