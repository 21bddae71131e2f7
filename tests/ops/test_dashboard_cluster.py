"""The Grafana dashboard's cluster panels ask only for what a cluster node's /metrics exports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.cluster.nodes import Nodes
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin
from tests.test_deploy import CLUSTER_PREFIX, METRIC, dashboard_queries, exported_names

pytestmark = pytest.mark.slow


async def test_the_cluster_panels_ask_only_for_what_a_cluster_node_exports(
    origin: Origin, tmp_path: Path
) -> None:
    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=60"})
    redis = RedisServer(str(tmp_path / "redis"))
    await asyncio.to_thread(redis.start)
    nodes = Nodes(str(tmp_path), origin.url, redis.url, shared_cache=True)
    try:
        node = await nodes.start("a")
        await node.get("/a")
        text = (await node.admin("GET", "/metrics")).body.decode()
    finally:
        await nodes.stop_all()
        await asyncio.to_thread(redis.close)
    exported = exported_names(text)
    cluster_names = {name for _, expr in dashboard_queries() for name in METRIC.findall(expr)
                     if name.startswith(CLUSTER_PREFIX)}
    assert len(cluster_names) >= 5
    missing = sorted(cluster_names - exported)
    assert not missing, f"the dashboard asks for {missing}, which a cluster node does not export"
    per_node = [expr for _, expr in dashboard_queries() if CLUSTER_PREFIX in expr]
    assert all("by (instance" in expr for expr in per_node), "cluster panels are per node"
