"""Every node needs a name of its own: a second process under a live node's name does not start,
and a running node that finds its name taken says so (in-process nodes on a real Redis)."""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from pathlib import Path

import pytest

from proxy.cluster import ClusterUnavailable
from proxy.cluster.node import ClusterNode
from proxy.cluster.redis_io import Names, client
from proxy.cluster.settings import ClusterSettings
from proxy.purge import PurgeSpec
from tests.cluster.nodes import Nodes, cluster_view, wait_until
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin


async def nothing(spec: PurgeSpec) -> int:
    return 0


def settings(redis: RedisServer, ns: str, heartbeat: float = 0.2) -> ClusterSettings:
    return ClusterSettings(redis=redis.url, node="a", namespace=ns, heartbeat=heartbeat)


def foreign(pid: int = 4242) -> str:
    """The heartbeat of another process named "a"."""
    return json.dumps({"node": "a", "state": "ready", "pid": pid, "instance": uuid.uuid4().hex,
                       "listen": "10.0.0.9:8080", "seen": time.time()})


async def holder(r: object, key: str) -> str | None:
    beat = await r.get(key)  # type: ignore[attr-defined]
    return json.loads(beat)["instance"] if beat else None


async def test_a_second_process_under_a_live_nodes_name_does_not_start(shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    first = ClusterNode(settings(shared_redis, ns), nothing, None)
    await first.start()
    r = client(settings(shared_redis, ns), decode=True)
    try:
        twin = ClusterNode(settings(shared_redis, ns), nothing, None)
        with pytest.raises(ClusterUnavailable) as info:
            await twin.start()
        assert "another process runs as node 'a'" in str(info.value)
        assert f"pid {first.node_info()['pid']}" in str(info.value)
        # The first one is untouched: still ready, and the heartbeat is still its own.
        assert first.state == "ready"
        assert await holder(r, Names(ns).node("a")) == first.instance
    finally:
        await first.close()
        await r.aclose()


async def test_a_restart_after_a_crash_waits_for_the_dead_heartbeat_instead_of_refusing(
        shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    r = client(settings(shared_redis, ns), decode=True)
    await r.set(Names(ns).node("a"), foreign(), px=500)  # left by a process that was killed
    node = ClusterNode(settings(shared_redis, ns), nothing, None)
    try:
        await node.start()
        assert node.state == "ready"
        assert await holder(r, Names(ns).node("a")) == node.instance
    finally:
        await node.close()
        await r.aclose()


async def test_a_running_node_whose_name_another_process_takes_logs_it_once_and_goes_on(
        shared_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    node = ClusterNode(settings(shared_redis, ns), nothing, None)
    await node.start()
    r = client(settings(shared_redis, ns), decode=True)
    key = Names(ns).node("a")
    try:
        for pid in (4242, 4243):
            await r.set(key, foreign(pid), px=5000)
            await wait_until(lambda: _mine(r, key, node))
        errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert len(errors) == 1 and "another process also runs as node 'a' (pid 4242" in errors[0], errors
        assert node.state == "ready"
    finally:
        await node.close()
        await r.aclose()


async def _mine(r: object, key: str, node: ClusterNode) -> bool:
    return await holder(r, key) == node.instance


async def test_a_node_that_stops_leaves_another_instances_heartbeat_alone(shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    node = ClusterNode(settings(shared_redis, ns, heartbeat=30.0), nothing, None)
    await node.start()
    r = client(settings(shared_redis, ns), decode=True)
    key = Names(ns).node("a")
    try:
        beat = foreign()
        await r.set(key, beat, px=5000)  # a twin's, written since this node's last beat
        await node.close()
        assert await r.get(key) == beat
    finally:
        await r.aclose()


@pytest.mark.slow
async def test_the_default_name_of_a_node_listening_on_port_0_has_the_port_it_bound(
        origin: Origin, tmp_path: Path, shared_redis: RedisServer) -> None:
    """``listen: 127.0.0.1:0`` and no cluster.node: with --workers N the supervisor binds first,
    so the name is HOSTNAME:PORT of that port; it was HOSTNAME:0, the same for every such node."""
    nodes = Nodes(str(tmp_path), origin.url, shared_redis.url)
    try:
        a = await nodes.start("a", "--workers", "2", node="")
        port = int(a.url.rsplit(":", 1)[1])
        assert port != 0
        view = await cluster_view(a)
        name = f"{socket.gethostname()}:{port}"
        assert view["node"] == name, view
        (me,) = [n for n in view["nodes"] if n["node"] == name]
        assert me["listen"] == f"127.0.0.1:{port}", me
    finally:
        await nodes.stop_all()
