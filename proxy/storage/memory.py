"""The memory tier: per-process, byte-budgeted, LRU (default) or LFU.

A lookup is one dict access (plus the recency bump). Objects larger than
``max_object`` keep only their metadata here (their body stays on disk), so a
hit on them still needs no disk read for the freshness decision. Eviction from
memory never touches the disk copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from proxy.storage.entry import Entry

MemoryPolicy = Literal["lru", "lfu"]

ENTRY_OVERHEAD = 400  # bytes of Python objects around an entry, measured roughly


@dataclass(slots=True)
class Cached:
    """One stored variant: its metadata, and its body when the body is held in memory."""

    entry: Entry
    body: bytes | None  # None: the body is on disk only


def cost(variants: tuple[Cached, ...]) -> int:
    total = 0
    for c in variants:
        e = c.entry
        total += ENTRY_OVERHEAD + len(e.key) + (len(c.body) if c.body is not None else 0)
        for k, v in e.response.headers:
            total += len(k) + len(v) + 64
    return total


class MemoryTier:
    def __init__(self, budget: int, max_object: int, policy: MemoryPolicy = "lru") -> None:
        self.budget = budget
        self.max_object = max_object
        self.policy = policy
        self._items: OrderedDict[str, tuple[Cached, ...]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._hits: dict[str, int] = {}  # LFU frequency (and inspection hit counts)
        self._tags: dict[str, set[str]] = {}
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> Iterator[str]:
        return iter(list(self._items))

    def get(self, key: str) -> tuple[Cached, ...] | None:
        variants = self._items.get(key)
        if variants is not None:
            if self.policy == "lru":
                self._items.move_to_end(key)
            self._hits[key] = self._hits.get(key, 0) + 1
        return variants

    def peek(self, key: str) -> tuple[Cached, ...] | None:
        """Like ``get`` without counting as a use (for inspection)."""
        return self._items.get(key)

    def hits(self, key: str) -> int:
        return self._hits.get(key, 0)

    def put(self, key: str, variants: tuple[Cached, ...]) -> bool:
        """Hold ``variants`` under ``key``; False when they can never fit the budget."""
        self.delete(key)
        size = cost(variants)
        if size > self.budget:
            return False
        self._items[key] = variants
        self._sizes[key] = size
        self.bytes += size
        for tag in {t for c in variants for t in c.entry.tags}:
            self._tags.setdefault(tag, set()).add(key)
        self._evict()
        return key in self._items

    def delete(self, key: str) -> bool:
        variants = self._items.pop(key, None)
        if variants is None:
            return False
        self.bytes -= self._sizes.pop(key)
        self._hits.pop(key, None)
        for tag in {t for c in variants for t in c.entry.tags}:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]
        return True

    def keys_for_tag(self, tag: str) -> list[str]:
        return list(self._tags.get(tag, ()))

    def clear(self) -> int:
        n = len(self._items)
        self._items.clear()
        self._sizes.clear()
        self._hits.clear()
        self._tags.clear()
        self.bytes = 0
        return n

    def _evict(self) -> None:
        while self.bytes > self.budget and self._items:
            if self.policy == "lru":
                victim = next(iter(self._items))
            else:
                # LFU: the least used; ties go to the least recently inserted.
                victim = min(self._items, key=lambda k: self._hits.get(k, 0))
            self.delete(victim)
            self.evictions += 1
