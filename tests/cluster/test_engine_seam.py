"""The engine's side of the shared tier (``proxy.cluster.fills``), with a shared tier in memory
standing in for Redis where the test must decide exactly when things happen."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.purge import PurgeSpec
from tests.conftest import MakeProxy
from tests.engine.fakes import FakeShared
from tests.harness import Origin


async def test_an_entry_found_in_the_shared_tier_while_a_purge_of_it_was_applied_here_is_not_kept(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Any) -> None:
    version = [0]

    async def page(request: web.Request) -> web.Response:
        version[0] += 1
        return web.Response(body=f"v{version[0]}".encode(), headers={"Cache-Control": "max-age=300"})

    origin.route("/x", page)
    shared = FakeShared()
    a = await make_proxy(directory=tmp_path / "a")
    b = await make_proxy(directory=tmp_path / "b")
    a.runtime.engine.shared = b.runtime.engine.shared = shared
    site = {"Host": "site.test"}  # the same key on both nodes
    assert (await a.get("/x", headers=site)).body == b"v1"  # a fills and writes through
    assert len(shared.stored) == 1

    async def purge_arrives() -> None:
        # The purge, after Redis had answered b's lookup with v1: the shared tier drops the
        # key and b applies the purge before it reads that answer.
        shared.stored.clear()
        await b.runtime.purge_here(PurgeSpec(urls=("http://site.test/x",)))

    shared.before_answer = purge_arrives
    r = await b.get("/x", headers=site)
    assert r.body == b"v2", "b kept and served what a purge applied on b covered"
    assert origin.count("/x") == 2
    # Without a purge in the way, what a stored is what b serves.
    assert (await b.get("/x", headers=site)).body == b"v2"
    shared.stored.clear()
    await b.runtime.purge_here(PurgeSpec(urls=("http://site.test/x",)))
    assert (await a.get("/x", headers=site)).body == b"v1"  # a still has its own copy
    await a.runtime.purge_here(PurgeSpec(urls=("http://site.test/x",)))
    assert (await a.get("/x", headers=site)).body == b"v3"  # fetched, written through
    assert (await b.get("/x", headers=site)).x_cache == "HIT"  # found in the shared tier
    assert (await b.get("/x", headers=site)).body == b"v3" and origin.count("/x") == 3


class _Lapsed:
    """A cluster node whose heartbeat lapsed and that has not caught up yet."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waited = 0

    def hits_held(self) -> bool:
        return not self.go.is_set()

    async def caught_up(self) -> None:
        self.waited += 1
        await self.go.wait()


async def test_only_lookups_wait_for_a_node_whose_heartbeat_lapsed(
        origin: Origin, make_proxy: MakeProxy) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"ok", headers={"Cache-Control": "max-age=300"})

    origin.route("/x", page)
    proxy = await make_proxy()
    lapsed = _Lapsed()
    proxy.runtime.engine.cluster = lapsed  # type: ignore[assignment]
    # An unsafe method goes to the origin at once: nothing stored answers it.
    assert (await asyncio.wait_for(proxy.request("POST", "/x"), 2)).status == 200
    assert lapsed.waited == 0
    lookup = asyncio.ensure_future(proxy.get("/x"))
    await asyncio.sleep(0.2)
    assert not lookup.done() and lapsed.waited == 1  # a lookup waits until the node caught up
    lapsed.go.set()
    assert (await asyncio.wait_for(lookup, 2)).body == b"ok"


async def test_a_workers_hit_waits_for_its_lapsed_node_as_long_as_consistency_wait_says() -> None:
    """``WorkerGate.caught_up`` (a worker's hits while its supervisor's heartbeat lapsed) waits
    what ``consistency_wait`` says (read when it waits), not a constant 10 s."""
    from proxy.cluster import WorkerGate

    gate = WorkerGate(lambda: 0.2)
    gate.told(1, 0.0, held=True)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(gate.caught_up(), 5)  # (the default, 10 s, fails here)
    assert loop.time() - began >= 0.2  # it did wait while held
    gate.told(2, 0.0, held=False)
    await asyncio.wait_for(gate.caught_up(), 1)  # not held: at once
