"""The disk tier: a diskcache ``FanoutCache`` shared by every worker process.

This is the only module that imports diskcache. Every method blocks; callers
run them in a thread executor. Facts of diskcache respected here:

- keys are ``str`` and values ``bytes`` or files, never pickles;
- ``set`` may return False on a lock timeout: callers check and count it;
- values of 32 KiB and more are separate files, read back as open files so big
  bodies stream instead of loading whole;
- the metadata record (``m:<key>``) and the body record (``b:<body id>``) are
  written body first, so a crash between the two leaves an orphan body (culled
  later), never metadata pointing at a missing or partial body.
"""

from __future__ import annotations

import os
from typing import IO, Literal

import diskcache

from proxy.storage.entry import Entry, decode_variants, encode_variants

DiskEviction = Literal["least-recently-stored", "least-recently-used"]


class DiskTier:
    def __init__(
        self,
        path: str,
        size_limit: int,
        shards: int = 8,
        eviction_policy: DiskEviction = "least-recently-stored",
        timeout: float = 2.0,
    ) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.size_limit = size_limit
        self._cache = diskcache.FanoutCache(
            directory=path,
            shards=shards,
            timeout=timeout,
            size_limit=size_limit,
            eviction_policy=eviction_policy,
            statistics=False,
            cull_limit=16,
        )
        self.failed_writes = 0

    def close(self) -> None:
        self._cache.close()

    def get_variants(self, key: str) -> tuple[Entry, ...]:
        blob = self._cache.get("m:" + key, default=None, retry=True)
        if blob is None:
            return ()
        return decode_variants(blob)

    def set_variants(self, key: str, variants: tuple[Entry, ...]) -> bool:
        if not variants:
            return self.delete_variants(key) != ()
        ok = bool(self._cache.set("m:" + key, encode_variants(variants), retry=True))
        if not ok:
            self.failed_writes += 1
        return ok

    def delete_variants(self, key: str) -> tuple[Entry, ...]:
        """Remove a key's metadata and bodies; return what was removed."""
        variants = self.get_variants(key)
        self._cache.delete("m:" + key, retry=True)
        for e in variants:
            self._cache.delete("b:" + e.body_id, retry=True)
        return variants

    def get_body(self, body_id: str) -> bytes | IO[bytes] | None:
        """The body: bytes when small, an open file when stored as a file, None when gone."""
        return self._cache.get("b:" + body_id, default=None, read=True, retry=True)  # type: ignore[no-any-return]

    def set_body(self, body_id: str, body: bytes | IO[bytes]) -> bool:
        read = not isinstance(body, bytes)
        ok = bool(self._cache.set("b:" + body_id, body, read=read, retry=True))
        if not ok:
            self.failed_writes += 1
        return ok

    def delete_body(self, body_id: str) -> None:
        self._cache.delete("b:" + body_id, retry=True)

    def clear(self) -> None:
        self._cache.clear(retry=True)

    def volume(self) -> int:
        return int(self._cache.volume())

    def count(self) -> int:
        return int(len(self._cache))

    def iter_keys(self) -> list[str]:
        return [k[2:] for k in self._cache.iterkeys() if isinstance(k, str) and k.startswith("m:")]
