"""A node whose clock is off Redis's (and so, likely, off the other nodes'): the nodes no longer
share the shared tier's entries beyond CLOCK_SLACK apart, and nothing said so. Each heartbeat
holds this machine's clock against Redis's TIME: said once beyond CLOCK_SLACK, shown in
``GET /cluster`` (``clock_offset``) and ``cachegate_cluster_clock_offset_seconds``. In-process
nodes on a real Redis; the shifted one's wall clock is the node's ``clock``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
from aiohttp import web

from proxy.cluster.node import ClusterNode
from proxy.cluster.settings import ClusterSettings
from proxy.policy.httpdate import format_http_date
from proxy.purge import PurgeSpec
from tests.cluster.redis_server import RedisServer
from tests.conftest import MakeProxy
from tests.harness import Origin


async def nothing(spec: PurgeSpec) -> int:
    return 0


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "clock" in r.getMessage() and r.levelno >= logging.WARNING]


def gauge(node: ClusterNode) -> list[float]:
    return [s.value for m in node.collect() if m.name == "cachegate_cluster_clock_offset_seconds"
            for s in m.samples]


async def test_a_node_whose_clock_is_ahead_of_redis_says_so_once_and_shows_it(
        shared_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ns = f"t{uuid.uuid4().hex[:8]}"
    ahead = ClusterNode(ClusterSettings(redis=shared_redis.url, node="ahead", namespace=ns, heartbeat=0.1),
                        nothing, None, clock=lambda: time.time() + 120)
    right = ClusterNode(ClusterSettings(redis=shared_redis.url, node="right", namespace=ns, heartbeat=0.1),
                        nothing, None)
    try:
        await ahead.start()
        await right.start()
        await asyncio.sleep(0.5)  # a few heartbeats: still one line
        assert ahead.clock_offset is not None and 115 < ahead.clock_offset < 125
        assert right.clock_offset is not None and abs(right.clock_offset) < 5
        lines = said(caplog)
        assert len(lines) == 1, lines
        assert lines[0].startswith("cluster: this machine's clock is 120 s ahead of Redis's at "), lines
        assert "do not share the shared tier's entries" in lines[0]
        [offset] = gauge(ahead)
        assert 115 < offset < 125
        view = await right.view()
        shown = {n["node"]: n["clock_offset"] for n in view["nodes"]}
        assert 115 < shown["ahead"] < 125 and abs(shown["right"]) < 5  # every node's, from its heartbeat
    finally:
        await ahead.close()
        await right.close()


async def test_no_offset_is_shown_before_a_heartbeat(shared_redis: RedisServer) -> None:
    node = ClusterNode(ClusterSettings(redis=shared_redis.url, node="n", namespace=f"t{uuid.uuid4().hex[:8]}"),
                       nothing, None)
    assert node.clock_offset is None and gauge(node) == []
    assert node.node_info()["clock_offset"] is None


@pytest.mark.parametrize("ahead", [0, 7200])
async def test_a_node_knows_whose_clock_an_origins_date_behind_blames(
        shared_redis: RedisServer, make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture,
        ahead: int) -> None:
    """An origin's Date 2 h behind this machine's clock: the origin's clock behind, or this
    machine's ahead (the same observable skew). A node held its clock against Redis's, and says
    which."""
    caplog.set_level(logging.WARNING)

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"page", headers={"Cache-Control": "max-age=600",
                                                   "Date": format_http_date(time.time() - 7200)})

    origin.route("/p", page)
    proxy = await make_proxy()
    node = ClusterNode(ClusterSettings(redis=shared_redis.url, node="n", namespace=f"t{uuid.uuid4().hex[:8]}",
                                       heartbeat=0.1), nothing, None, clock=lambda: time.time() + ahead)
    await node.start()
    try:
        proxy.runtime.engine.cluster = node  # as join_cluster does
        assert (await proxy.get("/p")).status == 200
        [line] = [m for m in said(caplog) if m.startswith("origin ")]
        if ahead:
            assert "s behind this clock, which is 7200 s ahead of Redis's; its responses arrive stale and are " \
                   "not reused: set this machine's clock (NTP)" in line, line
        else:
            assert "s behind this clock (which agrees with Redis's); its responses arrive stale and are not " \
                   "reused: set the origin's clock (NTP)" in line, line
    finally:
        proxy.runtime.engine.cluster = None
        await node.close()
