"""What a purge's 503 says, by what went wrong: nothing made, Redis refused it, or no answer to an
append Redis may have made (in-process nodes on a real Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from proxy.cluster.node import ClusterNode
from proxy.cluster.redis_io import Names
from proxy.cluster.settings import ClusterSettings
from proxy.cluster.shared import SharedTier
from proxy.purge import PurgeSpec, PurgeUnavailable
from tests.cluster.nodes import wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.relay import Relay
from tests.cluster.test_shared_tier import HOT, bodies, fill

URL = "redis://10.0.0.5:6379/0"


async def nothing(spec: PurgeSpec) -> int:
    return 0


async def answer(value: bool) -> bool:
    return value


@pytest.mark.parametrize(("kind", "says", "never"), [
    ("unreachable", [f"Redis at {URL} is not reachable (why)", "nothing was purged on any node",
                     "retry when it is back"], ["may or may not", "answered with an error"]),
    ("refused", [f"Redis at {URL} answered with an error (why)", "nothing was purged on any node",
                 "retrying does not help until that is fixed"], ["not reachable", "when it is back"]),
    ("unknown", ["the purge may or may not have been made", f"Redis at {URL} did not answer its append (why)",
                 "retry it (a purge is idempotent)"], ["nothing was purged", "was not made", "not reachable"]),
    ("disconnected", ["this node is not connected to Redis (why)", "nothing was purged on any node",
                      "retry once it is connected again"], ["not reachable", "when it is back"]),
    ("partly", ["the purge may have been partly made", f"Redis at {URL} did not finish removing it from "
                "the shared tier (why)", "no node was told", "purge again"], ["nothing was purged on any"]),
])
def test_each_cause_has_its_words(kind: str, says: list[str], never: list[str]) -> None:
    node = ClusterNode(ClusterSettings(redis=URL, node="a"), nothing, None)
    message = node._unavailable_message("why", kind)
    assert all(s in message for s in says), message
    assert not any(s in message for s in never), message


def settings(redis: RedisServer, ns: str, name: str, **kw: object) -> ClusterSettings:
    return ClusterSettings(redis=redis.url, node=name, namespace=ns, heartbeat=0.2, **kw)  # type: ignore[arg-type]


class LateReplies(Relay):
    """A TCP proxy in front of Redis that, once ``hold`` is set, holds Redis's answers on a
    connection for ``hold`` seconds after that connection sends ``trigger`` (XADD: the append
    script)."""

    def __init__(self, port: int, trigger: bytes = b"XADD") -> None:
        super().__init__(port)
        self.hold = 0.0
        self.trigger = trigger

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        until = [0.0]
        for pair in ((cr, sw, True), (sr, cw, False)):
            self._spawn(self._pump(*pair, until))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool,
                    until: list[float]) -> None:
        try:
            while data := await reader.read(65536):
                if up and self.hold and self.trigger in data:
                    until[0] = time.monotonic() + self.hold
                if not up:
                    await asyncio.sleep(max(0.0, until[0] - time.monotonic()))
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def test_an_append_whose_answer_comes_too_late_may_have_been_made(shared_redis: RedisServer) -> None:
    """Redis makes the append, and its answer comes after cluster.timeout: the 503 says the purge
    may have been made, and it was: both nodes apply it."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    applied: dict[str, list[PurgeSpec]] = {"a": [], "b": []}
    link = LateReplies(shared_redis.port)
    late_url = await link.start()

    def node(name: str, url: str) -> ClusterNode:
        async def local(spec: PurgeSpec) -> int:
            applied[name].append(spec)
            return 1

        return ClusterNode(ClusterSettings(redis=url, node=name, namespace=ns, heartbeat=0.2, timeout=0.5),
                           local, None)

    a, b = node("a", late_url), node("b", shared_redis.url)
    try:
        await a.start()
        await b.start()
        link.hold = 1.0
        spec = PurgeSpec(urls=("http://h.test/p",))
        with pytest.raises(PurgeUnavailable) as info:
            await a.purge(spec)
        link.hold = 0.0
        message = str(info.value)
        assert "may or may not have been made" in message and "nothing was purged" not in message, message
        assert shared_redis.command("XLEN", Names(ns).stream).startswith(b":1")
        await wait_until(lambda: answer(spec in applied["a"] and spec in applied["b"]), wait=10)
    finally:
        await a.close()
        await b.close()
        await link.close()


async def test_a_node_cut_off_by_a_redis_that_refuses_writes_does_not_call_it_unreachable(
        own_redis: RedisServer) -> None:
    """maxmemory reached with noeviction: Redis answers reads and refuses writes, the node's heartbeat
    among them. The 503 names that error, not an unreachable Redis."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    node = ClusterNode(settings(own_redis, ns, "a", timeout=0.5, required=False), nothing, None)
    try:
        await node.start()
        assert own_redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction").startswith(b"+OK")
        assert own_redis.command("CONFIG", "SET", "maxmemory", "1").startswith(b"+OK")
        await wait_until(lambda: answer(node.state == "disconnected"), wait=10)
        for _ in range(5):  # whether it is between two attempts to reconnect, or in one
            with pytest.raises(PurgeUnavailable) as info:
                await node.purge(PurgeSpec(urls=("http://h.test/p",)))
            message = str(info.value)
            assert "answered with an error" in message and "maxmemory" in message, message
            assert "not reachable" not in message and "when it is back" not in message, message
    finally:
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
        await node.close()


async def test_a_shared_tier_purge_whose_answer_comes_too_late_may_have_been_partly_made(
        shared_redis: RedisServer) -> None:
    """The shared tier's purge (before the append) got no answer within cluster.timeout, and
    Redis had made it: the 503 said "nothing was purged on any node" while the shared tier had
    been purged (a prefix purge longer than the timeout). Now it says the purge may have been
    partly made, no node was told, and to purge again; and nothing went onto the stream."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    link = LateReplies(shared_redis.port, trigger=b"doc.prefixes")  # (in the purge script alone)
    tier = SharedTier(ClusterSettings(redis=await link.start(), node="a", namespace=ns, timeout=0.5))
    node = ClusterNode(settings(shared_redis, ns, "a", timeout=0.5), nothing, None, shared_purge=tier.purge)
    try:
        await node.start()
        await fill(tier, HOT, b"hot")
        link.hold = 1.0
        with pytest.raises(PurgeUnavailable) as info:
            await node.purge(PurgeSpec(urls=(HOT,)))
        link.hold = 0.0
        message = str(info.value)
        assert "the purge may have been partly made" in message and "purge again" in message, message
        assert "nothing was purged on any node" not in message and "not reachable" not in message, message
        assert await bodies(tier, HOT) == set()  # Redis made it
        assert shared_redis.command("XLEN", Names(ns).stream).startswith(b":0")
    finally:
        await node.close()
        await tier.close()
        await link.close()
