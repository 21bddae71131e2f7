"""A pub/sub connection that dies without being closed (a NAT, conntrack table or load balancer
drops an idle flow and sends no reset) is noticed and replaced: the acknowledgements' one ends the
session, the shared tier's fill listener reconnects (in-process nodes on a real Redis, behind a
TCP proxy that can stop forwarding a subscribed connection without closing it)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from dataclasses import dataclass

import pytest

from proxy.cluster.fills import Locked
from proxy.cluster.node import ClusterNode
from proxy.cluster.redis_io import REDIS_DOWN, client
from proxy.cluster.settings import ClusterSettings
from proxy.cluster.shared import SharedTier
from proxy.purge import PurgeSpec
from tests.cluster.nodes import wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.relay import Relay


async def nothing(spec: PurgeSpec) -> int:
    return 0


async def answer(value: bool) -> bool:
    return value


@dataclass
class _Flow:
    subscriber: bool = False  # the client sent (P)SUBSCRIBE on it
    dropped: bool = False  # forwards nothing more, either way, and closes nothing


class Middlebox(Relay):
    """A TCP proxy in front of Redis that can drop the flows of subscribed connections as a NAT
    whose idle timeout passed does (every byte either way vanishes, and no side is told), or cut
    every connection as a Redis that went away does."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.flows: list[_Flow] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.refusing = False

    def cut(self) -> None:
        """Close every connection, and refuse new ones until ``restore``: Redis is away."""
        self.refusing = True
        for w in self.writers:
            w.close()

    def restore(self) -> None:
        self.refusing = False

    def drop_subscribers(self) -> int:
        """Drop the flows that subscribed so far (new connections go through); how many."""
        dropped = [f for f in self.flows if f.subscriber and not f.dropped]
        for f in dropped:
            f.dropped = True
        return len(dropped)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.refusing:
            cw.close()
            return
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [cw, sw]
        flow = _Flow()
        self.flows.append(flow)
        for reader, writer, up in ((cr, sw, True), (sr, cw, False)):
            self._spawn(self._pump(reader, writer, flow, up))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: _Flow,
                    up: bool) -> None:
        try:
            while data := await reader.read(65536):
                if up and b"SUBSCRIBE" in data.upper():
                    flow.subscriber = True
                if flow.dropped:
                    continue
                writer.write(data)
                await writer.drain()
            if not flow.dropped:
                writer.close()
        except (OSError, asyncio.CancelledError):
            writer.close()

    async def close(self) -> None:
        await super().close()
        for w in self.writers:
            w.close()


def settings(url: str, ns: str, node: str, **kw: object) -> ClusterSettings:
    return ClusterSettings(redis=url, node=node, namespace=ns, heartbeat=0.2, timeout=0.5,  # type: ignore[arg-type]
                           ack_timeout=2.0, **kw)


async def test_a_node_whose_acknowledgement_subscription_was_dropped_silently_reconnects(
        shared_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    box = Middlebox(shared_redis.port)
    url = await box.start()
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = ClusterNode(settings(url, ns, "a"), nothing, None)
    b = ClusterNode(settings(shared_redis.url, ns, "b"), nothing, None)
    try:
        await a.start()
        await b.start()
        outcome = await a.purge(PurgeSpec(tags=("t1",)))
        assert outcome.complete and set(outcome.nodes) == {"a", "b"}

        assert box.drop_subscribers() == 1  # a's acknowledgements, and nothing tells a
        dropped = time.monotonic()
        # a notices (its PING gets no pong within cluster.timeout), and reconnects.
        await wait_until(lambda: answer(a.counts["reconnects"] >= 1 and a.state == "ready"), wait=5)
        assert time.monotonic() - dropped < 3
        assert a.counts["dead_subscriptions"] == 1
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("the acknowledgements connection (pub/sub) answered no PING within 0.5s" in m
                   for m in logged), logged
        # b applied and acknowledged all along: a now hears it (before: 202 missing b, for ever).
        outcome = await a.purge(PurgeSpec(tags=("t2",)))
        assert outcome.complete and set(outcome.nodes) == {"a", "b"}, outcome
        assert a.counts["incomplete"] == 0
    finally:
        await a.close()
        await b.close()
        await box.close()


async def test_a_session_that_ends_leaves_none_of_its_loops_going(shared_redis: RedisServer) -> None:
    """The session's PINGs and its heartbeats tick together (each every cluster.heartbeat from its
    start), so a dead subscription is found just as a heartbeat is sent: Python 3.11's wait_for
    lost the session's cancellation of its heartbeats, which went on beside the next session's
    (until their connection was gone), and the session waited 3 s for them before reconnecting."""
    box = Middlebox(shared_redis.port)
    url = await box.start()
    a = ClusterNode(ClusterSettings(redis=url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}"), nothing, None)
    try:
        await a.start()  # heartbeat and timeout 1 s, the defaults
        await asyncio.sleep(2.3)
        assert box.drop_subscribers() == 1
        dropped = time.monotonic()
        await wait_until(lambda: answer(a.counts["reconnects"] >= 1), wait=10)
        # A heartbeat and a timeout to notice, 0.2 s to reconnect (4.9 s before, each time).
        assert time.monotonic() - dropped < 3.5
        loops = [t for t in asyncio.all_tasks() if not t.done()
                 and getattr(t.get_coro(), "__qualname__", "") == "ClusterNode._heartbeats"]
        assert len(loops) <= 1, loops
    finally:
        await a.close()
        await box.close()


async def test_the_shared_tiers_fill_listener_reconnects_when_dropped_silently_and_wakes_its_waiters(
        shared_redis: RedisServer) -> None:
    box = Middlebox(shared_redis.port)
    url = await box.start()
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = SharedTier(settings(url, ns, "a"))
    b = SharedTier(settings(shared_redis.url, ns, "b"))
    key = "https://site.test/herd"
    try:
        # The listener starts with the first wait; its subscription, once confirmed, wakes the
        # waiters to look again (a release may have come before it heard any).
        assert await asyncio.wait_for(a.wait_filled("warm-up", 5), 3) == "stored"

        async def herd() -> tuple[str | None, float]:
            lock = await b.lookup(key, 10)  # b fills the key; a waits for it
            assert isinstance(lock, Locked)
            started = time.monotonic()
            waiting = asyncio.ensure_future(a.wait_filled(key, 8))
            await asyncio.sleep(0.1)
            await b.release(key, lock, "stored")
            return await waiting, time.monotonic() - started

        told, took = await herd()
        assert told == "stored" and took < 1

        assert box.drop_subscribers() == 1  # a's fill listener, and nothing tells a
        # b's release goes unheard on the dropped connection; a notices the dead connection,
        # resubscribes and wakes its waiter to look again, well before its 8 s are up.
        told, took = await herd()
        assert told == "stored" and took < 5, (told, took)
        assert a.counts["dead_subscriptions"] == 1 and a.counts["wait_timeout"] == 0
        told, took = await herd()  # the new subscription hears releases
        assert told == "stored" and took < 1
    finally:
        await a.close()
        await b.close()
        await box.close()


async def test_connections_to_redis_keep_alive_with_short_probes(shared_redis: RedisServer) -> None:
    r = client(settings(shared_redis.url, "t", "a"), decode=True)
    try:
        await r.ping()
        conn = r.connection_pool._available_connections[0]  # type: ignore[attr-defined]
        sock = conn._writer.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
    finally:
        await r.aclose()
    # A unix socket's connections take no keepalive options (redis-py raised TypeError).
    r = client(settings("unix:///nonexistent/redis.sock", "t", "a"), decode=True)
    try:
        with pytest.raises(REDIS_DOWN):
            await r.ping()
    finally:
        await r.aclose()
