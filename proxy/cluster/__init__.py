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

from typing import TYPE_CHECKING

from proxy.errors import CachegateError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from proxy.cluster.shared import SharedTier
    from proxy.purge import PurgeSpec
    from proxy.runtime import Runtime


class ClusterUnavailable(CachegateError):
    """Redis cannot be reached at start and ``cluster.required`` is true."""


async def join(runtime: Runtime, local_purge: Callable[[PurgeSpec], Awaitable[int]],
               workers: int = 1) -> None:
    """Make this process its node's member of the cluster (the only process, or the
    supervisor): connect, catch up, then purge through the bus. Raises
    ``ClusterUnavailable`` when Redis cannot be reached and ``cluster.required``."""
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

    host, port = settings.listen
    index = runtime.storage.index
    node = ClusterNode(cluster, local_purge, disk.path if disk is not None else None,
                       shared_purge=shared_purge,
                       shared_reset=tier.new_generation if tier is not None else None,
                       info=lambda: {"workers": workers, "listen": f"{host}:{port}"},
                       local_entries=index.count if index is not None else None)
    runtime.metrics.add_collector(node.collect)
    runtime.cluster = node  # GET /healthz says "not ready" while it catches up
    # Hits wait while this node's heartbeat has lapsed, and the shared tier is not consulted while
    # invalidations wait for Redis (in this process: with --workers N, the member is the
    # supervisor, which serves nothing).
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
    runtime.closers.append(tier.close)
    runtime.metrics.add_collector(tier.collect)
    return tier
