"""A slow but alive Redis (every round trip well under cluster.timeout, a new connection's set-up
several of them) is no lapse of the node's own heartbeat: hits are not held (in-process node on a
real Redis behind a delaying TCP proxy)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from proxy.cluster.node import ClusterNode
from proxy.cluster.settings import ClusterSettings
from proxy.purge import PurgeSpec
from tests.cluster.redis_server import RedisServer
from tests.cluster.relay import Relay


async def nothing(spec: PurgeSpec) -> int:
    return 0


class SlowLink(Relay):
    """A TCP proxy in front of Redis that delays everything by ``delay`` in each direction."""

    def __init__(self, port: int, delay: float) -> None:
        super().__init__(port)
        self.delay = delay

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
    # 0.4 s a round trip, so a new connection's set-up (its handshake commands) takes ~2 s: as
    # long as the shortest heartbeat TTL. cluster.timeout is 0.6 s: every answer comes within it.
    link = SlowLink(shared_redis.port, 0.2)
    url = await link.start()
    node = ClusterNode(ClusterSettings(redis=url, node="a", namespace=f"t{uuid.uuid4().hex[:8]}",
                                       heartbeat=0.2, timeout=0.6), nothing, None)
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
