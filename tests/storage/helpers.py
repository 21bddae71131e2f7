"""Entries and stores for storage tests: real tiers on a real temporary directory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import aiohttp

from proxy.policy.messages import Freshness, StoredResponse
from proxy.storage.disk import DiskTier
from proxy.storage.entry import Entry
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import MemoryPolicy, MemoryTier
from proxy.storage.tiered import Storage
from tests.harness import Proxy

MB = 1 << 20


async def close_proxy(proxy: Proxy) -> None:
    """Stop an in-process proxy before the test starts another on its cache directory."""
    await proxy.session.close()
    await proxy.close()


async def x_caches(proxy: Proxy, keys: Iterable[int], body: Callable[[int], bytes],
                   headers: dict[str, str] | None = None) -> list[str]:
    """The X-Cache-Status of ``/k<i>`` for each key, each answer checked to be ``body(i)``."""
    out = []
    for i in keys:
        reply = await proxy.get(f"/k{i}", headers=headers)
        assert (reply.status, reply.body) == (200, body(i))
        out.append(reply.x_cache)
    return out


async def fetch_all(url_of: Callable[[int], str], count: int, *, pause: float = 0.0,
                    max_field_size: int = 8190) -> None:
    """GET ``url_of(i)`` for ``i`` in ``range(count)``, 100 at a time over 16 connections (a
    pause after each hundred), each answered 200 and read to its end."""
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector, max_field_size=max_field_size) as s:
        async def fetch(i: int) -> None:
            async with s.get(url_of(i)) as r:
                assert r.status == 200
                await r.read()

        for start in range(0, count, 100):
            await asyncio.gather(*(fetch(i) for i in range(start, min(start + 100, count))))
            if pause:
                await asyncio.sleep(pause)


def entry(key: str, *, tags: tuple[str, ...] = (), vary: tuple[tuple[str, str], ...] = (),
          headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/plain"),)) -> Entry:
    response = StoredResponse(200, "OK", headers, 1000.0, 1000.0,
                              Freshness(60.0, "max-age", 0.0, 1000.0), vary=vary)
    return Entry(key=key, url=key.split("\x1f")[0], response=response, body_id="", body_size=0,
                 tags=tags, stored_at=1000.0)


def open_store(path: str | None, *, memory: int = 8 * MB, memory_max_object: int = 64 * 1024,
               disk_size: int = 64 * MB, shards: int = 2, policy: MemoryPolicy = "lru",
               max_object: int = 16 * MB) -> Storage:
    mem = MemoryTier(memory, memory_max_object, policy)
    if path is None:
        return Storage(mem, None, None, max_object=max_object)
    return Storage(mem, DiskTier(path, disk_size, shards), UrlTagIndex(path), max_object=max_object)


async def store(s: Storage, e: Entry, body: bytes, chunk: int = 16 * 1024, flush: bool = True) -> bool:
    """Stream ``body`` into a spool and commit it, as the engine does; then (``flush``) write it
    to disk at once, as the owner's write-behind would soon after."""
    spool = s.spool(e, len(body))
    for i in range(0, len(body), chunk):
        if not await spool.write(body[i:i + chunk]):
            return False
    final = s.finalize(e, spool)
    if final is None:
        return False
    s.put_memory(final, spool)
    stored = await s.put_disk(final, spool)
    if flush:
        await s.flush()
    return stored


async def read_body(s: Storage, key: str, index: int = 0) -> bytes | None:
    variants = await s.get(key)
    if not variants:
        return None
    body = await s.open_body(variants[index])
    if body is None or isinstance(body, bytes):
        return body
    with body:
        return body.read()
