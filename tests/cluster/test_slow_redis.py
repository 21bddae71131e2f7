"""A slow Redis (in-process nodes and shared tiers on a real Redis behind a delaying TCP proxy):
one answering within cluster.timeout is no lapse of the node's own heartbeat (hits are not held),
and a call that has to open a connection is bounded by cluster.timeout as a whole, its set-up
included (a lookup goes to the origin, a purge answers 503)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from proxy.cluster.node import ClusterNode
from proxy.cluster.redis_io import Names, client
from proxy.cluster.settings import ClusterSettings
from proxy.cluster.shared import SharedTier
from proxy.purge import PurgeSpec, PurgeUnavailable
from tests.cluster.redis_server import RedisServer
from tests.cluster.relay import Relay


async def nothing(spec: PurgeSpec) -> int:
    return 0


class SlowLink(Relay):
    """A TCP proxy in front of Redis that delays everything by ``delay`` in each direction."""

    def __init__(self, port: int, delay: float) -> None:
        super().__init__(port)
        self.delay = delay  # (bytes that arrive after it changed take the new one)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        for pair in ((cr, sw), (sr, cw)):
            self._spawn(self._pump(*pair))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay, data))
            queue.put_nowait((time.monotonic() + self.delay, b""))
            await sender
        except (OSError, asyncio.CancelledError):
            sender.cancel()
            writer.close()


async def test_a_slow_redis_answering_within_the_timeout_holds_no_hits(
        shared_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    # 0.2 s a round trip, so a new connection's first command (HELLO, CLIENT SETNAME, then the
    # command) takes ~0.6 s; cluster.timeout is 1 s: every call comes back within it, its
    # connection's set-up included.
    link = SlowLink(shared_redis.port, 0.1)
    url = await link.start()
    node = ClusterNode(ClusterSettings(redis=url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}",
                                       heartbeat=0.2, timeout=1.0), nothing, None)
    held: list[bool] = []

    async def watch() -> None:  # as the hit path does, from the start on
        while True:
            held.append(node.hits_held())
            await asyncio.sleep(0.02)

    watching = asyncio.ensure_future(watch())
    try:
        await node.start()
        assert node.state == "ready", node.reason
        await asyncio.sleep(1.5)  # beats while the session is new, and after
        assert not any(held)
        assert node.state == "ready", node.reason
        assert node.counts["reconnects"] == 0
        assert not [r for r in caplog.records if "lapsed" in r.getMessage()]
    finally:
        watching.cancel()
        await node.close()
        await link.close()


async def test_a_purge_under_a_hung_redis_says_it_answered_nothing_in_time(own_redis: RedisServer) -> None:
    """Redis stopped (SIGSTOP): the node gives its connections up after cluster.timeout, and a
    purge waiting on one of them was told 'Connection closed by server', which blamed Redis for
    this node's own close."""
    import os
    import signal

    from proxy.purge import PurgeUnavailable

    node = ClusterNode(ClusterSettings(redis=own_redis.url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}",
                                       heartbeat=0.2, timeout=0.5), nothing, None)
    await node.start()
    assert own_redis.proc is not None
    try:
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(0.3)  # a heartbeat is under way: the purge's answer outlasts it
        with pytest.raises(PurgeUnavailable) as info:
            await node.purge(PurgeSpec(tags=("x",)))
        message = str(info.value)
        assert "no answer within" in message and "closed by server" not in message, message
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await node.close()


# A round trip of 0.6 s: a call on an open connection (one round trip) answers within
# cluster.timeout (1 s); one that has to open a connection first does not (HELLO and CLIENT
# SETNAME before the command: three). Each read and the connect were bounded on their own, so
# such a call took 2.4 s and worked (CLIENT SETINFO was one round trip more): at 0.9 s a round
# trip, misses took 4.5 s and purges up to 11.75 s with cluster.timeout 1s.
SLOW = 0.3
TIMEOUT = 1.0


async def test_a_lookup_that_has_to_open_a_connection_over_a_slow_link_goes_to_the_origin_within_the_timeout(
        shared_redis: RedisServer) -> None:
    link = SlowLink(shared_redis.port, SLOW)
    url = await link.start()
    ns = f"t{uuid.uuid4().hex[:8]}"
    tier = SharedTier(ClusterSettings(redis=url, node="a", namespace=ns, timeout=TIMEOUT))
    direct = client(ClusterSettings(redis=shared_redis.url, node="t", namespace=ns), decode=True)
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        assert await tier.lookup("http://cachegate.test/x", 5.0) is None  # the origin is asked
        assert loop.time() - began < 3 * TIMEOUT
        assert tier.counts["error"] == 1 and tier.counts["locked"] == 0
        assert await direct.exists(f"{Names(ns).l2}:lock:http://cachegate.test/x") == 0  # none taken
    finally:
        await tier.close()
        await direct.aclose()
        await link.close()


async def test_a_purge_that_has_to_open_a_connection_over_a_slow_link_answers_503_within_the_timeout(
        shared_redis: RedisServer) -> None:
    """The node's own connections are open (the link was fast when it joined); the purge's call
    to the shared tier has to open one: no answer within cluster.timeout, so the purge is not
    made anywhere and says Redis did not answer in time (a 503)."""
    link = SlowLink(shared_redis.port, 0.0)
    url = await link.start()
    settings = ClusterSettings(redis=url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}", heartbeat=0.5,
                               timeout=TIMEOUT)
    tier = SharedTier(settings)  # (no connection yet)
    purged: list[PurgeSpec] = []

    async def local(spec: PurgeSpec) -> int:
        purged.append(spec)
        return 0

    node = ClusterNode(settings, local, None, shared_purge=lambda spec: tier.purge(spec))
    loop = asyncio.get_running_loop()
    try:
        await node.start()
        assert node.state == "ready", node.reason
        link.delay = SLOW
        began = loop.time()
        with pytest.raises(PurgeUnavailable) as info:
            await node.purge(PurgeSpec(tags=("x",)))
        assert loop.time() - began < 3 * TIMEOUT
        assert "the purge was not made" in str(info.value) and "no reply within 1s" in str(info.value)
        assert purged == []
    finally:
        await node.close()
        await tier.close()
        await link.close()
