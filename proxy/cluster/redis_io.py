"""The Redis side shared by the bus and the shared tier: key names and client settings.

Every key lives under ``cluster.namespace`` (default ``cachegate``), so several
clusters can share one Redis. Clients are made to fail fast: no retries inside
the client (a slow or dead Redis must turn into "Redis unreachable" within
``cluster.timeout``, not into a request that hangs), and the caller decides what
a failure means (a purge answers 503, a shared-tier lookup becomes a miss).

Every command is bounded as a whole (``Bounded``): a new connection's set-up (the TCP and TLS
handshakes, then HELLO and CLIENT SETNAME, one round trip each) counts in the same
``cluster.timeout`` as the command it is made for. Bounding each socket read and the connect on
their own let one call that had to open a connection take several timeouts (a 0.9 s round trip:
misses of 4.5 s, purges of up to 11.75 s with ``cluster.timeout`` 1s). redis-py's CLIENT SETINFO
calls are not sent: they name the library in ``CLIENT LIST`` and cost a round trip more.

A connection that dies without being closed (a NAT, conntrack table or load balancer
that drops an idle flow sends no reset) fails the next command within
``cluster.timeout`` too, but a subscribed one sends no commands: it only waits for
messages, for ever. Every pub/sub listener therefore reads through ``subscribed``,
which PINGs its connection every heartbeat and gives it up when no pong comes
within ``cluster.timeout``; TCP keepalive (short, ``KEEPALIVE``) keeps idle
connections known to such middleboxes and lets the kernel notice a dead peer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.cluster.settings import ClusterSettings
from proxy.resolver import scoped

# What a Redis that is down, slow or restarting raises through the asyncio client.
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError, ConnectionError)
# TCP keepalive on every TCP connection to Redis: first probe after 5 s idle, then every 2 s, and
# the connection fails after 3 unanswered (redis-py's default waits 30 s; older ones send none).
KEEPALIVE = (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))


def _no_setinfo() -> dict[str, Any]:
    """The client options that leave out CLIENT SETINFO: ``driver_info=None`` from redis-py 7.1
    on (``lib_name`` and ``lib_version`` warn there), both of those set to None before."""
    try:
        import redis.driver_info  # noqa: F401
    except ImportError:
        return {"lib_name": None, "lib_version": None}
    return {"driver_info": None}


NO_SETINFO = _no_setinfo()


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


def keepalive_options() -> dict[int, int]:
    """``KEEPALIVE`` as socket options, those this platform has (macOS names the idle time
    TCP_KEEPALIVE)."""
    options: dict[int, int] = {}
    for name, value in KEEPALIVE:
        option = getattr(socket, name, None)
        if option is None and name == "TCP_KEEPIDLE":
            option = getattr(socket, "TCP_KEEPALIVE", None)
        if option is not None:
            options[option] = value
    return options


class Bounded(aioredis.Redis):
    """A client each of whose commands fails within ``bound`` seconds as a whole: the wait for
    a connection and its set-up included (``RedisTimeoutError``, as a socket read's timeout;
    redis-py drops a connection whose set-up or reply was cut short, never reuses it). Every
    command goes through ``execute_command`` (a script, a GET, an XREAD, a PING, ...)."""

    bound = 1.0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        limit = asyncio.timeout(self.bound)
        try:
            async with limit:
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call, unused-ignore]
        except TimeoutError:
            if not limit.expired():
                raise
            raise RedisTimeoutError(f"Timeout: no reply within {self.bound:g}s, a new connection's set-up "
                                    "included") from None


class ZonedConnection(aioredis.Connection):
    """A connection to an IPv6 address with a zone (``redis://[fe80::1%25eth0]:6379/0``): the
    socket is connected here, to the address with its scope, and handed to the client. redis-py
    passes the host text to ``open_connection``, whose lookup under uvloop (0.23) drops the zone:
    the connect went nowhere, and the node did not start ("no answer within the timeout")."""

    _connected: socket.socket | None = None

    async def _connect(self) -> None:
        sockaddr = scoped(self.host, self.port)
        if sockaddr is None:  # (no such interface: the client's own lookup says so)
            await super()._connect()  # type: ignore[no-untyped-call, unused-ignore]
            return
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.socket_connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, sockaddr)
            self._connected = sock
            await super()._connect()  # type: ignore[no-untyped-call, unused-ignore]
        except BaseException:
            sock.close()
            raise
        finally:
            self._connected = None

    def _connection_arguments(self) -> Any:
        arguments = dict(super()._connection_arguments())
        if self._connected is not None:
            del arguments["host"], arguments["port"]
            arguments["sock"] = self._connected
            if arguments.get("ssl") is not None:
                arguments["server_hostname"] = self.host.partition("%")[0]
        return arguments


class ZonedSSLConnection(ZonedConnection, aioredis.SSLConnection):
    """``ZonedConnection`` over TLS (``rediss://``)."""


def client(settings: ClusterSettings, *, decode: bool, blocking: float = 0.0) -> Bounded:
    """A client for ``cluster.redis`` whose every command fails within ``cluster.timeout``
    (plus ``blocking`` for a connection that waits in XREAD BLOCK), a new connection's set-up
    included (``Bounded``), with TCP keepalive (not on a unix socket, whose connections take no
    such options)."""
    tcp: dict[str, Any] = {}
    if not settings.redis.lower().startswith("unix:"):
        tcp = {"socket_keepalive": True, "socket_keepalive_options": keepalive_options()}
    redis = Bounded.from_url(
        settings.redis,
        decode_responses=decode,
        # Bytes that are not UTF-8 (another program's) decode to lone surrogates, which the
        # readers of each key refuse one value at a time (``stream.not_utf8``): strict decoding
        # failed the whole reply, and the session with it, on every attempt.
        encoding_errors="surrogateescape",
        socket_timeout=settings.timeout + blocking,
        socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        client_name=f"cachegate:{settings.node}",
        **NO_SETINFO,
        **tcp,
    )
    assert isinstance(redis, Bounded)  # (``from_url`` is typed to make a plain client)
    pool = redis.connection_pool
    if "%" in str(pool.connection_kwargs.get("host", "")):
        tls = issubclass(pool.connection_class, aioredis.SSLConnection)
        pool.connection_class = ZonedSSLConnection if tls else ZonedConnection
    redis.bound = settings.timeout + blocking
    return redis


def raise_if_cancelled() -> None:
    """CancelledError when this task is being cancelled, for loops to call at each turn: Python
    3.11's wait_for, under which redis-py sends each command, returns the command's result when
    the cancellation lands just as the command was sent, and the cancellation is lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class DeadSubscription(RedisConnectionError):
    """A subscribed connection answered no PING within ``cluster.timeout``: it is dead although
    nothing closed it (dropped without a reset by a NAT, firewall or load balancer)."""


async def subscribed(pubsub: Any, settings: ClusterSettings, what: str,
                     stop: Callable[[], bool]) -> AsyncIterator[dict[str, Any]]:
    """The messages of a subscribed ``pubsub`` (its subscribe confirmations included, not its
    pongs) until ``stop()``. Every ``cluster.heartbeat`` it PINGs the connection (a subscribed
    connection may: the pong comes as a message); no pong within ``cluster.timeout`` raises
    DeadSubscription (``what`` names the connection). Waiting for messages alone never fails
    on a connection dropped without a reset: nothing ever comes, as when nothing is sent."""
    loop = asyncio.get_running_loop()
    ping_at = loop.time() + settings.heartbeat
    pong_by = 0.0  # 0: no PING unanswered
    while not stop():
        raise_if_cancelled()  # (the listener of an ended session went on, reconnecting by itself)
        now = loop.time()
        if pong_by and now >= pong_by:
            raise DeadSubscription(
                f"the {what} connection (pub/sub) answered no PING within {settings.timeout:g}s: "
                "dead although nothing closed it (dropped by a NAT, firewall or load balancer?)")
        if not pong_by and now >= ping_at:
            await pubsub.ping()
            pong_by = now + settings.timeout
        # At most a second at a time: a cancellation that lands in the client's own read timeout
        # can be lost (``stop`` ends it then).
        message = await pubsub.get_message(timeout=min(1.0, max(0.01, (pong_by or ping_at) - now)))
        if message is None:
            continue
        if message.get("type") == "pong":
            pong_by, ping_at = 0.0, loop.time() + settings.heartbeat
            continue
        yield message
