"""Helpers for the admin tests: absolute URLs of a running proxy, its admin context, settling."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from proxy.inspection import Inspector
from proxy.storage.arena import F_PERSISTED
from proxy.web.admin import ADMIN
from tests.harness import Origin, Proxy
from tests.rules.util import settle

__all__ = ["absolute", "crowd", "inspector", "js", "loop_held", "memory_passes", "settle", "stored", "swept"]


@contextlib.asynccontextmanager
async def loop_held() -> AsyncIterator[list[float]]:
    """The CPU time the event loop's thread spends between two wakes of a probe that sleeps
    10 ms at a time on it, from entry to exit (``max``: the longest the loop was held). Its CPU
    time, not the clock's: a loaded machine stretches the clock's gaps (a full test run's made
    257 ms of them), not the CPU the loop spent in one go. The collector is off meanwhile: this
    process is the whole test run's (in a full run, a gen-2 collection of its heap took 60-120 ms
    of one gap), and what is measured is the code's slicing, not the test process's garbage."""
    gaps: list[float] = []
    collecting = gc.isenabled()
    gc.disable()
    done = asyncio.Event()

    async def probe() -> None:
        last = time.thread_time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.thread_time()
            gaps.append(now - last)
            last = now

    probing = asyncio.ensure_future(probe())
    await asyncio.sleep(0.05)
    try:
        yield gaps
    finally:
        done.set()
        await probing
        if collecting:
            gc.enable()


def memory_passes(proxy: Proxy, monkeypatch: Any) -> list[int]:
    """Counts the passes over the proxy's shared memory from now on, and the records they went
    by (``[passes, records]``, kept up to date: a record passed over counts too)."""
    arena = proxy.runtime.storage.memory.arena
    passes = [0, 0]

    def records(items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            passes[1] += 1
            yield item

    for name in ("scan", "walk"):
        real = getattr(arena, name)

        def counted(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            passes[0] += 1
            return records(_real(*args, **kwargs))

        monkeypatch.setattr(arena, name, counted)
    return passes


def crowd(proxy: Proxy, like: str, prefix: str, n: int) -> None:
    """``n`` records under ``prefix`` + a number, each a copy of ``like``'s record, put straight
    into the shared memory (as many fills would leave them; a few may push others out: a full
    bucket of the arena's index): flagged as written to disk where there is a disk tier (the
    write-behind then leaves them alone, and a lookup with an index that answers passes them
    over), else not."""
    storage = proxy.runtime.storage
    arena = storage.memory.arena
    record = arena.find(like)
    assert record is not None, like
    body = arena.body(record)
    assert body is not None
    flags = F_PERSISTED if storage.disk is not None else 0
    for i in range(n):
        assert arena.put(f"{prefix}{i}", record.meta, body, flags=flags)
    assert len(storage.memory) > n * 0.95


async def stored(origin: Origin, proxy: Proxy, path: str, headers: dict[str, str] | None = None) -> str:
    """Store ``path``, and the key it has (its URL: ``headers`` make the key of a keyed rule)."""
    origin.route(path.split("?")[0], body=b"stored", headers={"Cache-Control": "max-age=300"})
    await proxy.get(path, headers=headers)
    assert (await proxy.get(path, headers=headers)).x_cache == "HIT"
    await settle(proxy)
    return absolute(proxy, path)


async def swept(proxy: Proxy, wait: float = 10.0) -> None:
    """Wait until the upkeep has swept every ban (a tag/prefix/all purge's entries are gone from
    the index, so the next purge's count does not include them again)."""
    import asyncio

    storage = proxy.runtime.storage
    for _ in range(int(wait / 0.05)):
        if len(storage.bans) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("bans were not swept in time")


def js(reply: Any) -> Any:
    """The JSON body of a reply."""
    return json.loads(reply.body)


def absolute(proxy: Proxy, path: str) -> str:
    """The URL a client's request for ``path`` is keyed under (its Host is the listener)."""
    return proxy.url + path


def inspector(proxy: Proxy) -> Inspector:
    """The admin app's inspector (to move its window's clock or sample on demand)."""
    for runner in proxy.listeners.runners:
        app = getattr(runner, "app", None)
        if app is not None and ADMIN in app:
            return app[ADMIN].inspector
    raise AssertionError("no admin app")
