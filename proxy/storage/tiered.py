"""The memory and disk tiers as one store.

Reads look in memory first (synchronously: the hit path awaits nothing), then
on disk in the executor; a disk hit is promoted into memory when its body is
small enough. Writes go to both tiers, disk first. A body is collected by a
``BodySpool`` while it streams to the client, and committed only when it is
complete: an upstream that breaks off leaves no entry.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import IO, Any, TypeVar

from proxy.policy.keys import url_of_key
from proxy.storage.disk import DiskTier
from proxy.storage.entry import Entry
from proxy.storage.index import UrlTagIndex
from proxy.storage.memory import Cached, MemoryTier

T = TypeVar("T")

MAX_VARIANTS = 32


def new_body_id() -> str:
    return uuid.uuid4().hex


class BodySpool:
    """A body being received: bytes in memory up to ``memory_limit``, then a temp file.

    ``write`` returns False once the body grew past ``max_size``; the spool is then
    abandoned (the response still streams to the client, it is just not stored).
    """

    def __init__(self, storage: Storage, entry: Entry, expected_length: int | None) -> None:
        self._storage = storage
        self.entry = entry  # what this body will be stored as (key, url, tags)
        self.doomed = False  # a purge matched it while it was being received: never store it
        self.expected_length = expected_length
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.too_large = expected_length is not None and expected_length > storage.max_object
        self.body_id = new_body_id()

    async def write(self, chunk: bytes) -> bool:
        if self.too_large:
            return False
        self.size += len(chunk)
        if self.size > self._storage.max_object:
            self.too_large = True
            self.discard()
            return False
        if self._file is None and self.size <= self._storage.spill_threshold:
            self._chunks.append(chunk)
            return True
        if self._file is None:
            self._file = await self._storage.run(self._storage.make_tempfile)
            pending, self._chunks = b"".join(self._chunks), []
            await self._storage.run(self._file.write, pending)
        await self._storage.run(self._file.write, chunk)
        return True

    @property
    def complete(self) -> bool:
        return not self.too_large and (
            self.expected_length is None or self.expected_length == self.size
        )

    def body_bytes(self) -> bytes | None:
        return b"".join(self._chunks) if self._file is None else None

    def file(self) -> IO[bytes] | None:
        return self._file

    def discard(self) -> None:
        self._storage._spools.discard(self)
        self._chunks = []
        if self._file is not None:
            f, self._file = self._file, None
            name = f.name
            f.close()
            try:
                os.unlink(name)
            except OSError:
                pass


class Storage:
    def __init__(
        self,
        memory: MemoryTier,
        disk: DiskTier | None,
        index: UrlTagIndex | None,
        *,
        max_object: int,
        executor: ThreadPoolExecutor | None = None,
        tmpdir: str | None = None,
    ) -> None:
        self.memory = memory
        self.disk = disk
        self.index = index
        self.max_object = max_object
        self.spill_threshold = max(memory.max_object, 64 * 1024)
        self._executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="disk")
        self._own_executor = executor is None
        self._tmpdir = tmpdir or (os.path.join(disk.path, "tmp") if disk else tempfile.gettempdir())
        os.makedirs(self._tmpdir, exist_ok=True)
        self.failed_writes = 0
        self._spools: set[BodySpool] = set()  # bodies being received, not yet stored

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def make_tempfile(self) -> IO[bytes]:
        return tempfile.NamedTemporaryFile(dir=self._tmpdir, prefix="spool-", delete=False)

    def close(self) -> None:
        if self._own_executor:
            self._executor.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()
        if self.index is not None:
            self.index.close()

    # -- reading ------------------------------------------------------------------------

    def memory_get(self, key: str) -> tuple[Cached, ...] | None:
        return self.memory.get(key)

    async def get(self, key: str) -> tuple[Cached, ...]:
        variants = self.memory.get(key)
        if variants is not None:
            return variants
        if self.disk is None:
            return ()
        variants = await self.run(self._load_from_disk, key)
        if variants and key not in self.memory:
            self.memory.put(key, variants)  # promotion; big bodies stay on disk
        return variants

    def _load_from_disk(self, key: str) -> tuple[Cached, ...]:
        assert self.disk is not None
        entries = self.disk.get_variants(key)
        if not entries:
            return ()
        variants: list[Cached] = []
        for e in entries:
            body: bytes | None = None
            if e.body_size <= self.memory.max_object:
                raw = self.disk.get_body(e.body_id)
                if raw is None:
                    continue  # the body was culled: this variant is gone
                body = raw if isinstance(raw, bytes) else _read_all(raw)
                if len(body) != e.body_size:
                    continue
            variants.append(Cached(e, body))
        return tuple(variants)

    async def open_body(self, cached: Cached) -> bytes | IO[bytes] | None:
        """The body of a variant: bytes from memory, or a file (or bytes) from disk."""
        if cached.body is not None:
            return cached.body
        if self.disk is None:
            return None
        return await self.run(self.disk.get_body, cached.entry.body_id)

    # -- writing ------------------------------------------------------------------------

    def spool(self, entry: Entry, expected_length: int | None) -> BodySpool:
        """Start receiving a body for ``entry``; purges from now on doom it (see ``delete``)."""
        spool = BodySpool(self, entry, expected_length)
        self._spools.add(spool)
        return spool

    def finalize(self, entry: Entry, spool: BodySpool) -> Entry | None:
        """The entry with its body's id and size; None when the body is incomplete."""
        if not spool.complete:
            spool.discard()
            return None
        return replace(entry, body_id=spool.body_id, body_size=spool.size)

    def put_memory(self, entry: Entry, spool: BodySpool) -> bool:
        """Make a finalized entry visible in memory at once (small bodies only)."""
        body = spool.body_bytes()
        if spool.doomed or body is None or entry.body_size > self.memory.max_object:
            return False
        current = self.memory.peek(entry.key) or ()
        return self.memory.put(entry.key, _merge_variant(current, Cached(entry, body)))

    async def put_disk(self, entry: Entry, spool: BodySpool) -> bool:
        """Write a finalized entry to the disk tier; big bodies become visible here."""
        try:
            if spool.doomed:
                return False
            if self.disk is None:
                return spool.body_bytes() is not None
            ok = await self.run(self._commit_to_disk, entry, spool.body_bytes(), spool.file())
            if not ok:
                self.failed_writes += 1
                return False
            if spool.doomed:
                # Purged while the write was under way: the purge must win.
                await self.run(self._delete_on_disk, [entry.key], False)
                return False
        finally:
            spool.discard()
        if entry.body_size > self.memory.max_object:
            current = self.memory.peek(entry.key)
            if current is not None:  # keep memory's view of the key consistent
                self.memory.put(entry.key, _merge_variant(current, Cached(entry, None)))
        return True

    async def commit(self, entry: Entry, spool: BodySpool) -> bool:
        """Store ``entry`` with the spooled body, replacing the variant with the same Vary values."""
        final = self.finalize(entry, spool)
        if final is None:
            return False
        in_memory = self.put_memory(final, spool)
        return await self.put_disk(final, spool) or (in_memory and self.disk is None)

    def _commit_to_disk(self, entry: Entry, body: bytes | None, file: IO[bytes] | None) -> bool:
        assert self.disk is not None
        if body is not None:
            ok = self.disk.set_body(entry.body_id, body)
        else:
            assert file is not None
            file.flush()
            file.seek(0)
            ok = self.disk.set_body(entry.body_id, file)
        if not ok:
            return False
        current = self.disk.get_variants(entry.key)
        merged = _merge_variant(tuple(Cached(e, None) for e in current), Cached(entry, None))
        kept = {c.entry.body_id for c in merged}
        if not self.disk.set_variants(entry.key, tuple(c.entry for c in merged)):
            self.disk.delete_body(entry.body_id)
            return False
        for e in current:
            if e.body_id not in kept:
                self.disk.delete_body(e.body_id)
        if self.index is not None:
            tags = tuple(sorted({t for c in merged for t in c.entry.tags}))
            self.index.add(entry.key, url_of_key(entry.key), tags)
        return True

    async def update(self, entry: Entry) -> None:
        """Replace a variant's metadata (after a 304), keeping its body."""
        current = self.memory.peek(entry.key)
        if current is not None:
            self.memory.put(entry.key, tuple(
                Cached(entry, c.body) if c.entry.body_id == entry.body_id else c for c in current
            ))
        if self.disk is not None:
            await self.run(self._update_on_disk, entry)

    def _update_on_disk(self, entry: Entry) -> None:
        assert self.disk is not None
        current = self.disk.get_variants(entry.key)
        if any(e.body_id == entry.body_id for e in current):
            self.disk.set_variants(
                entry.key, tuple(entry if e.body_id == entry.body_id else e for e in current)
            )

    # -- removing -----------------------------------------------------------------------

    async def keys_for(self, urls: Iterable[str] = (), prefixes: Iterable[str] = (),
                       tags: Iterable[str] = (), memory_only: bool = False) -> set[str]:
        """Every stored key for these URLs (all variants), prefixes and tags, in both tiers."""
        urls, prefixes, tags = list(urls), list(prefixes), list(tags)
        keys: set[str] = set()
        mem_keys = list(self.memory.keys()) if (urls or prefixes) else []
        url_set = set(urls)
        for k in mem_keys:
            u = url_of_key(k)
            if u in url_set or any(u.startswith(p) for p in prefixes):
                keys.add(k)
        for t in tags:
            keys.update(self.memory.keys_for_tag(t))
        tag_set = set(tags)
        for spool in self._spools:
            e = spool.entry
            u = url_of_key(e.key)
            if u in url_set or any(u.startswith(p) for p in prefixes) or tag_set & set(e.tags):
                keys.add(e.key)
        if self.index is not None and not memory_only:
            keys.update(await self.run(self._index_keys, urls, prefixes, tags))
        return keys

    def _index_keys(self, urls: list[str], prefixes: list[str], tags: list[str]) -> set[str]:
        assert self.index is not None
        keys: set[str] = set()
        for u in urls:
            keys.update(self.index.keys_for_url(u))
        for p in prefixes:
            keys.update(self.index.keys_for_prefix(p))
        for t in tags:
            keys.update(self.index.keys_for_tag(t))
        return keys

    async def delete(self, keys: Iterable[str], soft: bool = False) -> int:
        """Remove (or, when ``soft``, mark stale) these keys in both tiers; count the keys found."""
        keys = list(keys)
        if not soft:
            wanted = set(keys)
            for spool in self._spools:
                if spool.entry.key in wanted:
                    spool.doomed = True
        found = {k for k in keys if self.forget_in_memory(k, soft)}
        if self.disk is not None and keys:
            found |= await self.run(self._delete_on_disk, keys, soft)
        return len(found)

    def forget_in_memory(self, key: str, soft: bool) -> bool:
        if not soft:
            return self.memory.delete(key)
        current = self.memory.peek(key)
        if current is None:
            return False
        self.memory.put(key, tuple(Cached(_invalidated(c.entry), c.body) for c in current))
        return True

    def _delete_on_disk(self, keys: list[str], soft: bool) -> set[str]:
        assert self.disk is not None
        found: set[str] = set()
        for k in keys:
            if soft:
                current = self.disk.get_variants(k)
                if current:
                    self.disk.set_variants(k, tuple(_invalidated(e) for e in current))
                    found.add(k)
            elif self.disk.delete_variants(k):
                found.add(k)
        if not soft and self.index is not None:
            self.index.remove(keys)
        return found

    async def delete_all(self, soft: bool = False) -> int:
        if soft:
            keys = set(self.memory.keys())
            if self.disk is not None:
                keys.update(await self.run(self.disk.iter_keys))
            return await self.delete(keys, soft=True)
        for spool in self._spools:
            spool.doomed = True
        count = len(self.memory)
        self.memory.clear()
        if self.disk is not None:
            count = max(count, await self.run(self._clear_disk))
        return count

    def _clear_disk(self) -> int:
        assert self.disk is not None
        n = len(self.disk.iter_keys())
        self.disk.clear()
        if self.index is not None:
            self.index.clear()
        return n


def _invalidated(e: Entry) -> Entry:
    return e.with_response(replace(e.response, invalidated=True))


def _merge_variant(current: tuple[Cached, ...], new: Cached) -> tuple[Cached, ...]:
    kept = [c for c in current if c.entry.response.vary != new.entry.response.vary]
    kept.append(new)
    return tuple(kept[-MAX_VARIANTS:])


def _read_all(f: IO[bytes]) -> bytes:
    with f:
        return f.read()
