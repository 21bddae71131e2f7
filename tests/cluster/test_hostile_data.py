"""What another program (or tenant) can write under the cluster's keys: each bad value is skipped,
counted and logged, never the end of a node's session (real nodes in-process: the local purge is
the real store's)."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from proxy.cluster import join
from proxy.cluster.redis_io import Names
from tests.cluster.nodes import Nodes, metrics, wait_until
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_bus import versioned
from tests.harness import Origin, Proxy, start_proxy
from tests.storage.procs import STARTED

HOST = "h.test"


async def node(tmp_path: Path, origin: Origin, redis: RedisServer, ns: str, name: str) -> Proxy:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    cluster = {"redis": redis.url, "node": name, "namespace": ns, "heartbeat": "0.2s", "ack_timeout": "2s"}
    p = await start_proxy(str(d), origin.url, f"cluster: {json.dumps(cluster)}\n")
    await join(p.runtime, p.runtime.purge_here)
    p.runtime.purge_fn = p.runtime.cluster.purge  # as serve() does once it has joined
    return p


async def answer(value: Any) -> Any:
    return value


# JSON that parses, with what no node writes: each was a session that ended, for good, on every node
# (or a purge nobody asked for: "false" read as true, a URL purged letter by letter).
WRONG_TYPES = ['{"urls":[1]}', '{"tags":[{"a":1}]}', '{"keys":[1]}', '{"prefixes":[null]}',
               '{"all":"false","soft":"no"}', '{"urls":"http://h.test/"}', '{"tags":["\\udcff"]}',
               "[" * 100_000]


async def xadd(raw: aioredis.Redis, ns: str, node: bytes | str, spec: bytes | str) -> None:
    names = Names(ns)
    seq = await raw.incr(names.seq)
    await raw.xadd(names.stream, {"seq": str(seq), "node": node, "spec": spec})


async def test_hostile_stream_entries_and_member_names_are_skipped_and_the_cluster_goes_on(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer) -> None:
    versioned(origin, "/keep")
    versioned(origin, "/gone")
    ns = f"t{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis.from_url(shared_redis.url)  # bytes as they are: not UTF-8 too
    a = await node(tmp_path, origin, shared_redis, ns, "a")
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    c = await node(tmp_path, origin, shared_redis, ns, "c")
    procs = [a, b, c]
    try:
        for p in (a, b):
            for path in ("/keep", "/gone"):
                await p.get(path, headers={"Host": HOST})
                assert (await p.get(path, headers={"Host": HOST})).x_cache == "HIT"
        await c.session.close()
        await c.close()  # c catches up on them at its restart (a backlog: merged)
        procs.remove(c)

        hostile = [*WRONG_TYPES,
                   '{"urls":["http://[x"]}']  # well typed, and the store refuses it: skipped too
        for spec in hostile:
            await xadd(raw, ns, "evil", spec)
        await xadd(raw, ns, b"\xff\xfe", '{"tags":["x"]}')  # a node name that is not UTF-8
        await xadd(raw, ns, "evil", b'{"tags":["\xff"]}')  # a purge that is not UTF-8
        await raw.sadd(Names(ns).members, b"\xff\xfe")
        damaged = len(hostile) + 2

        for p in (a, b):
            node_ = p.runtime.cluster
            await wait_until(lambda n=node_: answer(n.counts["damaged"] == damaged))
            assert node_.state == "ready" and node_.connected, (node_.state, node_.reason)
            assert node_.counts["reconnects"] == 0
            assert (await p.get("/keep", headers={"Host": HOST})).x_cache == "HIT"  # nothing purged

        r = await a.admin("GET", "/cluster")
        assert r.status == 200, r.body
        assert sorted(n["node"] for n in json.loads(r.body)["nodes"]) == ["a", "b", "c"]

        c = await node(tmp_path, origin, shared_redis, ns, "c")  # required: true, it starts
        procs.append(c)
        assert c.runtime.cluster.state == "ready"
        assert c.runtime.cluster.counts["damaged"] == damaged
        assert sum(c.runtime.cluster.full_purges.values()) == 0

        r = await a.admin("POST", "/purge", json={"urls": [f"http://{HOST}/gone"]})
        assert r.status == 200, r.body
        assert set(json.loads(r.body)["nodes"]) == {"a", "b", "c"}, r.body
        for p in (a, b):
            assert (await p.get("/gone", headers={"Host": HOST})).x_cache != "HIT"
            assert (await p.get("/keep", headers={"Host": HOST})).x_cache == "HIT"
    finally:
        await raw.aclose()
        for p in procs:
            await p.session.close()
            await p.close()


# Another process holding the index: BEGIN EXCLUSIVE until told to commit.
HOLD = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
db.execute("BEGIN EXCLUSIVE"); print("locked", flush=True)
sys.stdin.readline(); db.execute("COMMIT")
"""


async def test_a_purge_a_node_cannot_apply_for_now_is_applied_when_it_can_never_skipped(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The index's busy timeout is 30 s: shortened here (the same real SQLite lock, sooner).
    connect = sqlite3.connect

    def quick(file: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if str(file).endswith("index.sqlite3"):
            kwargs["timeout"] = 0.2
        return connect(file, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", quick)
    versioned(origin, "/obj")
    ns = f"t{uuid.uuid4().hex[:8]}"
    a = await node(tmp_path, origin, shared_redis, ns, "a")
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    holder = None
    try:
        for p in (a, b):
            await p.get("/obj", headers={"Host": HOST})
            assert (await p.get("/obj", headers={"Host": HOST})).x_cache == "HIT"
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD, b.runtime.storage.index.file,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert holder.stdin is not None and holder.stdout is not None
        assert (await holder.stdout.readline()).strip() == b"locked"
        r = await a.admin("POST", "/purge", json={"urls": [f"http://{HOST}/obj"]})
        assert r.status == 202 and json.loads(r.body)["missing"] == ["b"], r.body
        node_b = b.runtime.cluster
        await wait_until(lambda: answer(node_b.counts["reconnects"] > 0 or node_b.counts["damaged"] > 0))
        holder.stdin.write(b"commit\n")
        await holder.stdin.drain()
        assert await holder.wait() == 0

        async def purged_on_b() -> bool:
            return (await b.get("/obj", headers={"Host": HOST})).x_cache != "HIT"

        await wait_until(purged_on_b)  # the next session applied it: b no longer serves it
        assert node_b.counts["damaged"] == 0
        assert node_b.state == "ready", node_b.reason
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        for p in (a, b):
            await p.session.close()
            await p.close()


@pytest.mark.parametrize("body", ['{"tags":["\\udcff"]}', '{"urls":["http://h.test/"],"soft":"no"}'])
async def test_the_admin_api_refuses_what_the_stream_refuses(proxy: Proxy, body: str) -> None:
    r = await proxy.admin("POST", "/purge", data=body)
    assert r.status == 400, r.body


def _spoiled(record: bytes, how: str) -> bytes:
    """A shared-tier record (``bid\\nsets\\nJSON``) with one slot as Python's JSON reads it and
    cachegate never writes it."""
    bid, sets, text = record.split(b"\n", 2)
    variants = json.loads(text)
    if how == "deep":
        return b"\n".join((bid, sets, b"[" * 100_000 + b"]" * 100_000))
    slot, value = {"seq-inf": (7, math.inf), "stored_at-inf": (6, math.inf), "response_time-nan": (12, math.nan),
                   "lifetime-inf": ((13, 0), math.inf), "status-inf": (8, math.inf)}[how]
    if isinstance(slot, tuple):
        variants[0][slot[0]][slot[1]] = value
    else:
        variants[0][slot] = value
    return b"\n".join((bid, sets, json.dumps(variants).encode()))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_tier_pair(tmp_path_factory: pytest.TempPathFactory,
                           shared_redis: RedisServer) -> AsyncIterator[tuple[Origin, Nodes]]:
    """Nodes a and b sharing a tier, for each spoiled record in turn (each under a path of its own):
    two starts for them all, not two per record."""
    origin = Origin()
    await origin.start()
    nodes = Nodes(str(tmp_path_factory.mktemp("hostile")), origin.url, shared_redis.url, shared_cache=True)
    try:
        await asyncio.gather(nodes.start("a"), nodes.start("b"))
        for proc in nodes.procs.values():
            STARTED.remove(proc)  # (kill_leftovers, after each test, leaves them to this fixture)
        yield origin, nodes
    finally:
        try:
            await nodes.stop_all()
        finally:
            for proc in nodes.procs.values():
                if proc.process is not None and proc.process.returncode is None:
                    await proc.kill()
            await origin.stop()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("how", ["seq-inf", "stored_at-inf", "response_time-nan", "lifetime-inf", "status-inf",
                                 "deep"])
async def test_a_shared_tier_record_cachegate_never_writes_is_an_error_and_the_origin_answers(
        shared_tier_pair: tuple[Origin, Nodes], shared_redis: RedisServer, how: str) -> None:
    origin, nodes = shared_tier_pair
    a, b = nodes["a"], nodes["b"]
    path = f"/{how}/l2"
    versioned(origin, path)
    errors = ("cachegate_cluster_shared_total", (("event", "error"),))
    errors_before = (await metrics(b)).get(errors, 0)
    raw = aioredis.Redis.from_url(shared_redis.url)
    try:
        assert (await a.get(path)).body == b"v1"  # filled through to the shared tier
        names = Names(nodes.namespace)
        keys: list[bytes] = []
        for _ in range(200):  # the shared tier is written after the answer, not before it
            keys = [k async for k in raw.scan_iter(f"{names.l2}:*:m:*{path}")]
            if keys:
                break
            await asyncio.sleep(0.025)
        assert len(keys) == 1, keys
        field, record = next(iter((await raw.hgetall(keys[0])).items()))
        await raw.hset(keys[0], field, _spoiled(record, how))

        for _ in range(2):
            r = await b.get(path)
            assert r.status == 200 and r.body.startswith(b"v"), (r.status, r.body)
        assert (await b.get(path)).x_cache == "HIT"  # its own fill, from its own tiers
        assert origin.count(path) == 2
        m = await metrics(b)
        assert m[errors] >= errors_before + 1
    finally:
        await raw.aclose()


MALFORMED_ACKS = ['{"id":"1-0","node":"x","n":Infinity}', '{"id":"1-0","node":"x","n":NaN}',
                  '{"id":"1-0","node":"x","n":1e999}', '{"id":"1-0","node":"x","n":true}',
                  '{"id":["1-0"],"node":"x","n":1}', '{"id":"1-0","node":{"a":1},"n":1}', "[1]",
                  "[" * 100_000, "not json"]


async def test_malformed_acknowledgements_are_ignored_and_purges_go_on(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis.from_url(shared_redis.url)
    a = await node(tmp_path, origin, shared_redis, ns, "a")
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    stop = asyncio.Event()
    rounds = [0]

    async def flood() -> None:
        while not stop.is_set():
            for message in [*MALFORMED_ACKS, b'{"id":"1-0","node":"\xff","n":1}']:
                await raw.publish(Names(ns).acks, message)
            rounds[0] += 1
            await asyncio.sleep(0.01)

    flooding = asyncio.ensure_future(flood())
    try:
        await wait_until(lambda: answer(rounds[0] >= 20))
        for i in range(5):
            r = await a.admin("POST", "/purge", json={"tags": [f"t{i}"]})
            assert r.status == 200, r.body
            assert set(json.loads(r.body)["nodes"]) == {"a", "b"}, r.body
        for p in (a, b):
            n = p.runtime.cluster
            assert n.connected and n.state == "ready" and n.counts["reconnects"] == 0, (n.state, n.reason)
            assert n.counts.get("malformed_acks", 0) >= 20 * (len(MALFORMED_ACKS) + 1)
    finally:
        stop.set()
        await flooding
        await raw.aclose()
        for p in (a, b):
            await p.session.close()
            await p.close()


async def test_an_entry_numbered_ahead_of_the_counter_is_skipped_and_costs_no_node_its_cache(
        tmp_path: Path, origin: Origin, shared_redis: RedisServer) -> None:
    """A well-formed entry whose seq is far ahead of NS:purges:seq (another program's XADD): it
    was taken as this node's applied number, and the next start purged the whole local cache
    ("Redis lost data"); read first in a backlog, it was a gap (the same)."""
    versioned(origin, "/keep")
    ns = f"t{uuid.uuid4().hex[:8]}"
    names = Names(ns)
    raw = aioredis.Redis.from_url(shared_redis.url)
    a = await node(tmp_path, origin, shared_redis, ns, "a")
    b = await node(tmp_path, origin, shared_redis, ns, "b")
    procs = [a, b]

    async def restart_b() -> Proxy:
        await procs[1].session.close()
        await procs[1].close()
        procs[1] = await node(tmp_path, origin, shared_redis, ns, "b")
        return procs[1]

    async def ahead() -> str:
        entry_id = await raw.xadd(names.stream, {"seq": "999999", "node": "evil",
                                                 "spec": '{"tags":["nothing-cached"]}'})
        return str(entry_id.decode())

    try:
        await b.get("/keep", headers={"Host": HOST})
        assert (await b.get("/keep", headers={"Host": HOST})).x_cache == "HIT"
        assert (await a.admin("POST", "/purge", json={"tags": ["t0"]})).status == 200

        # Followed: skipped and counted; what b applied stays the counter's.
        bogus = await ahead()
        await wait_until(lambda: answer(b.runtime.cluster.saved.id == bogus))  # read past it
        counter = int(await raw.get(names.seq))
        assert b.runtime.cluster.saved.seq == counter == 1
        assert b.runtime.cluster.counts["damaged"] == 1
        r = await a.admin("POST", "/purge", json={"tags": ["t1"]})
        assert r.status == 200 and set(json.loads(r.body)["nodes"]) == {"a", "b"}, r.body
        view = json.loads((await b.admin("GET", "/cluster")).body)
        assert view["stream_seq"] == 2 and view["nodes"][1]["applied_seq"] == 2, view

        # Read first in a backlog: b was away, one more purge came after it.
        await procs[1].session.close()
        await procs[1].close()
        await ahead()
        assert (await a.admin("POST", "/purge", json={"tags": ["t2"]})).status == 200
        procs[1] = b = await node(tmp_path, origin, shared_redis, ns, "b")
        assert b.runtime.cluster.saved.seq == 3
        b = await restart_b()
        for n in (a, b):
            assert sum(n.runtime.cluster.full_purges.values()) == 0, n.runtime.cluster.full_purges
        assert (await b.get("/keep", headers={"Host": HOST})).x_cache == "HIT"  # its cache kept
    finally:
        await raw.aclose()
        for p in procs:
            await p.session.close()
            await p.close()
