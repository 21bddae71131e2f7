"""The ``cluster:`` section of the config: where Redis is, this node's name, and the bus's limits.

Read like every other section (``proxy.schema.Section``): each wrong key, type or
value is one ``FILE:LINE: message``, and ``cachegate check`` reports them all.
Nothing here imports the Redis client: a config without ``cluster:`` never needs it.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from yarl import URL

from proxy.schema import Section

KB = 1 << 10
REDIS_SCHEMES = ("redis", "rediss", "unix")
_NODE_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
KEYS = ("redis", "node", "namespace", "ack_timeout", "shared_cache", "shared_max_object", "required",
        "stream_max", "heartbeat", "timeout")


@dataclass(frozen=True)
class ClusterSettings:
    redis: str  # redis://HOST:PORT/DB, rediss:// (TLS) or unix:///path/to/socket
    node: str  # this node's name in the cluster (default: hostname:port of the client listener)
    namespace: str = "cachegate"  # prefix of every Redis key: several clusters may share one Redis
    ack_timeout: float = 2.0  # how long a purge waits for the other nodes' acknowledgements
    shared_cache: bool = False  # Redis as a shared L2 tier (and cluster-wide coalescing)
    shared_max_object: int = 256 * KB  # bigger bodies stay local
    required: bool = True  # false: start and serve locally when Redis cannot be reached at start
    stream_max: int = 100_000  # purge stream entries kept (older ones are trimmed)
    heartbeat: float = 1.0  # how often a node says it is alive (it is gone after 3 missed beats)
    timeout: float = 1.0  # a Redis command slower than this counts as Redis being unreachable

    @property
    def redacted_url(self) -> str:
        """The Redis URL without its password, for messages and ``GET /cluster``."""
        return redacted(self.redis)


def redacted(url: str) -> str:
    try:
        parsed = URL(url)
    except ValueError:
        return url
    return str(parsed.with_password("***")) if parsed.password else url


def read_cluster(top: Section, listen_port: int) -> ClusterSettings | None:
    """The ``cluster:`` section, or None when there is none (problems recorded in ``top``)."""
    cs = top.section("cluster", KEYS)
    if cs is None:
        return None
    problems = cs.problems
    redis = cs.optional_str("redis")
    if redis is None:
        problems.add(top.line_of("cluster"), "cluster.redis: required (e.g. redis://127.0.0.1:6379/0)")
        redis = "redis://127.0.0.1:6379/0"
    else:
        try:
            url = URL(redis)
            ok = url.scheme in REDIS_SCHEMES and (bool(url.host) or url.scheme == "unix")
        except ValueError:
            ok = False
        if not ok:
            problems.add(cs.raw("redis") or cs.src,
                         f"cluster.redis: {redacted(redis)!r} is not a Redis URL: use redis://HOST:PORT/DB, "
                         "rediss://HOST:PORT/DB (TLS) or unix:///path/to/redis.sock")
    node = cs.str("node", "") or f"{socket.gethostname()}:{listen_port}"
    if not _NODE_NAME.fullmatch(node):
        problems.add(cs.raw("node") or cs.src,
                     f"cluster.node: {node!r}: use letters, digits and . _ - : @ (at most 200)")
    namespace = cs.str("namespace", "cachegate")
    if not _NAMESPACE.fullmatch(namespace):
        problems.add(cs.raw("namespace") or cs.src,
                     f"cluster.namespace: {namespace!r}: use letters, digits and . _ - : (at most 64)")
    ack_timeout = cs.duration("ack_timeout", 2.0)
    heartbeat = cs.duration("heartbeat", 1.0)
    timeout = cs.duration("timeout", 1.0)
    for name, value in (("ack_timeout", ack_timeout), ("heartbeat", heartbeat), ("timeout", timeout)):
        if value <= 0:
            problems.add(cs.raw(name) or cs.src, f"cluster.{name}: must be more than 0")
    return ClusterSettings(
        redis=redis,
        node=node,
        namespace=namespace,
        ack_timeout=ack_timeout if ack_timeout > 0 else 2.0,
        shared_cache=cs.bool("shared_cache", False),
        shared_max_object=cs.size("shared_max_object", 256 * KB),
        required=cs.bool("required", True),
        stream_max=cs.int("stream_max", 100_000, minimum=100),
        heartbeat=heartbeat if heartbeat > 0 else 1.0,
        timeout=timeout if timeout > 0 else 1.0,
    )
