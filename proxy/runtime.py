"""Everything one serving process owns, opened and closed together (no singletons).

The web apps hold a ``Runtime`` under an ``AppKey``; tests build one directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import Metric

from proxy.config import Settings
from proxy.engine import Engine
from proxy.metrics import Metrics, tier_families
from proxy.purge import Purger, PurgeSpec
from proxy.storage.disk import DiskTier
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import Storage
from proxy.upstream import UpstreamPool


@dataclass
class ReloadResult:
    """What a reload did: the problems that rejected it, or what it applied."""

    problems: list[str]  # FILE:LINE: message; empty when the new config was applied
    restart_required: list[str] = field(default_factory=list)  # changed, applied at next start
    rules: int = 0
    rule_files: tuple[str, ...] = ()

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
    reload_config: Callable[[], ReloadResult] | None = None

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        c = settings.cache
        memory = MemoryTier(c.memory, c.memory_max_object, c.memory_policy)
        disk = index = None
        if c.disk is not None:
            os.makedirs(c.disk.path, exist_ok=True)
            disk = DiskTier(c.disk.path, c.disk.size, c.disk.shards, c.disk.eviction)
            index = UrlTagIndex(c.disk.path)
        storage = Storage(memory, disk, index, max_object=c.max_object)
        metrics = Metrics()
        pool = UpstreamPool(settings.upstreams, settings.pool,
                            on_error=lambda name, kind: metrics.upstream_errors.labels(name, kind).inc())
        await pool.start()
        metrics.add_collector(pool.collect)
        runtime: Runtime

        async def invalidate(urls: Sequence[str]) -> None:
            await runtime.purge(PurgeSpec(urls=tuple(urls)))

        engine = Engine(settings, storage, pool, metrics, invalidate=invalidate)
        purger = Purger(storage, lambda: runtime.settings.rules)
        runtime = cls(settings, storage, pool, engine, metrics, purger)
        metrics.add_collector(runtime._collect_tiers)
        return runtime

    async def purge(self, spec: PurgeSpec) -> int:
        """Purge in this process (both tiers). Multi-worker deployments override this."""
        count = await self.purger.purge(spec)
        for kind in spec.kinds:
            self.metrics.purges.labels(kind).inc()
        self.metrics.purged_entries.inc(count)
        return count

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.engine.reconfigure(settings)

    async def close(self) -> None:
        await self.engine.close()
        await self.pool.close()
        self.storage.close()

    def _collect_tiers(self) -> Iterator[Metric]:
        m = self.storage.memory
        entries = {"memory": len(m)}
        size = {"memory": m.bytes}
        evictions = {"memory": m.evictions}
        yield from tier_families(entries, size, evictions)
