"""The Redis side shared by the bus and the shared tier: key names and client settings.

Every key lives under ``cluster.namespace`` (default ``cachegate``), so several
clusters can share one Redis. Clients are made to fail fast: no retries inside
the client (a slow or dead Redis must turn into "Redis unreachable" within
``cluster.timeout``, not into a request that hangs), and the caller decides what
a failure means (a purge answers 503, a shared-tier lookup becomes a miss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.cluster.settings import ClusterSettings

# What a Redis that is down, slow or restarting raises through the asyncio client.
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError, ConnectionError)


@dataclass(frozen=True)
class Names:
    """The Redis keys of one cluster (``ns`` is ``cluster.namespace``)."""

    ns: str

    @property
    def stream(self) -> str:
        return f"{self.ns}:purges"  # the purge stream (XADD / XREAD)

    @property
    def seq(self) -> str:
        return f"{self.ns}:purges:seq"  # gap-free purge counter (INCR with every XADD)

    @property
    def epoch(self) -> str:
        return f"{self.ns}:epoch"  # names this Redis's data: a new one means it lost everything

    @property
    def acks(self) -> str:
        return f"{self.ns}:acks"  # pub/sub: nodes acknowledge applied purges

    @property
    def members(self) -> str:
        return f"{self.ns}:nodes"  # set of node names ever seen

    def node(self, name: str) -> str:
        return f"{self.ns}:node:{name}"  # heartbeat: the node's state, with a TTL

    @property
    def generation(self) -> str:
        return f"{self.ns}:l2:gen"  # shared tier: purge-all replaces it (old keys become unreachable)

    @property
    def purges(self) -> str:
        return f"{self.ns}:l2:purges"  # shared tier: bumped by every purge (fences fills in flight)

    @property
    def fence(self) -> str:
        return f"{self.ns}:l2:fence"  # shared tier: fencing tokens of fill locks

    @property
    def filled(self) -> str:
        return f"{self.ns}:l2:filled"  # pub/sub: a fill lock was released (key and outcome)

    @property
    def l2(self) -> str:
        return f"{self.ns}:l2"  # prefix of the shared tier's per-generation keys


class RedisDataError(Exception):
    """A key of ours holds what cachegate never writes there (another program wrote it, or
    another cluster shares the namespace): reported in words, never as a crash."""


def stored_int(value: Any, key: str) -> int:
    """The integer stored under ``key`` (0 when it is missing); RedisDataError otherwise."""
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        shown = value.decode(errors="replace") if isinstance(value, bytes) else value
        raise RedisDataError(f"{key} holds {str(shown)[:40]!r}, not a number: cachegate never writes "
                             "that (another program, or another cluster in this namespace?); delete the "
                             "key to start it over") from None


def client(settings: ClusterSettings, *, decode: bool, blocking: float = 0.0) -> aioredis.Redis:
    """A client for ``cluster.redis`` that fails within ``cluster.timeout`` (plus ``blocking``
    for a connection that waits in XREAD BLOCK)."""
    return aioredis.Redis.from_url(
        settings.redis,
        decode_responses=decode,
        socket_timeout=settings.timeout + blocking,
        socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        client_name=f"cachegate:{settings.node}",
    )
