"""A purge sent to a node that has not joined the cluster yet (its admin listener answers while it
connects and catches up) waits for the join, or is refused: never applied on that node alone,
where the other nodes went on serving what it covered (in-process nodes on a real Redis)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from proxy.cluster import join
from tests.cluster.redis_server import RedisServer
from tests.harness import Origin, Proxy, start_proxy


async def node(tmp_path: Path, origin: Origin, redis: RedisServer, ns: str, name: str) -> Proxy:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    cluster = {"redis": redis.url, "node": name, "namespace": ns, "heartbeat": "0.2s", "ack_timeout": "1s"}
    return await start_proxy(str(d), origin.url, "admin: {listen: '127.0.0.1:0', purge_from: [127.0.0.1/32]}\n"
                             f"cluster: {json.dumps(cluster)}\n")


async def close(*proxies: Proxy) -> None:
    for p in proxies:
        await p.session.close()
        await p.close()


async def test_a_purge_before_the_join_waits_for_it_and_reaches_every_node(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer) -> None:
    origin.route("/x", body="x", headers={"Cache-Control": "max-age=600"})
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = await node(tmp_path, origin, shared_redis, ns, "a")
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    try:
        await join(b.runtime, b.runtime.purge_here)
        await b.get("/x", headers={"Host": "shop.example"})
        assert (await b.get("/x", headers={"Host": "shop.example"})).headers["X-Cache-Status"] == "HIT"
        # a's admin listener answers; a has not joined yet.
        purging = asyncio.ensure_future(a.admin("POST", "/purge", json={"all": True}))
        await asyncio.sleep(0.2)
        assert not purging.done()  # it waits for the join
        await join(a.runtime, a.runtime.purge_here)
        r = await asyncio.wait_for(purging, 10)
        assert r.status == 200, r.body
        answer = json.loads(r.body)
        assert set(answer["nodes"]) == {"a", "b"} and answer["missing"] == []
        assert answer["nodes"]["b"]["purged"] == 1
        assert (await b.get("/x", headers={"Host": "shop.example"})).headers["X-Cache-Status"] == "MISS"
    finally:
        await close(a, b)


async def test_a_node_that_does_not_join_in_time_refuses_the_purge_with_503(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer) -> None:
    origin.route("/x", body="x", headers={"Cache-Control": "max-age=600"})
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = await node(tmp_path, origin, shared_redis, ns, "a")  # never joins (still catching up)
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    try:
        await join(b.runtime, b.runtime.purge_here)
        await b.get("/x", headers={"Host": "shop.example"})
        r = await a.admin("POST", "/purge", json={"all": True})
        assert r.status == 503, r.body
        error = json.loads(r.body)["error"]
        assert "has not joined the cluster yet" in error and "nothing was purged on any node" in error
        # PURGE on the client listener: the same.
        r = await a.request("PURGE", "/x", headers={"Host": "shop.example"})
        assert r.status == 503, r.body
        assert "has not joined the cluster yet" in json.loads(r.body)["error"]
        assert (await b.get("/x", headers={"Host": "shop.example"})).headers["X-Cache-Status"] == "HIT"
    finally:
        await close(a, b)
