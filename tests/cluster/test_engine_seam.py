"""The engine's side of the shared tier (``proxy.cluster.fills``), with a shared tier in memory
standing in for Redis where the test must decide exactly when things happen."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.cluster.fills import Found, Locked, Lookup
from proxy.purge import PurgeSpec
from proxy.storage.entry import Entry
from tests.conftest import MakeProxy
from tests.harness import Origin


class InMemoryShared:
    """A shared tier that holds what it is given; ``before_answer`` runs while a lookup is
    "in flight" (between Redis executing it and this node reading the answer)."""

    max_object = 1 << 20

    def __init__(self) -> None:
        self.stored: dict[str, tuple[Entry, bytes]] = {}
        self.before_answer: Any = None

    async def lookup(self, key: str, lock_for: float, lock_only: bool = False) -> Lookup:
        found = self.stored.get(key)
        if self.before_answer is not None:
            hook, self.before_answer = self.before_answer, None
            await hook()
        if found is not None and not lock_only:
            return Found((found,))
        return Locked(1, 0)

    async def wait_filled(self, key: str, wait: float) -> str | None:
        return None

    async def write(self, entry: Entry, body: bytes, lock: Locked, now: float) -> bool:
        self.stored[entry.key] = (entry, body)
        return True

    async def release(self, key: str, lock: Locked, outcome: str) -> None:
        pass


async def test_an_entry_found_in_the_shared_tier_while_a_purge_of_it_was_applied_here_is_not_kept(
        origin: Origin, make_proxy: MakeProxy, tmp_path: Any) -> None:
    version = [0]

    async def page(request: web.Request) -> web.Response:
        version[0] += 1
        return web.Response(body=f"v{version[0]}".encode(), headers={"Cache-Control": "max-age=300"})

    origin.route("/x", page)
    shared = InMemoryShared()
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
