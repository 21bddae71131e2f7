"""The memory tier: per-process, byte-budgeted, LRU (default) or LFU, every operation O(1).

A lookup is one dict access plus a use count. Objects whose body is larger than
``max_object`` keep only their metadata here (the body stays on disk), so a hit
on them still needs no disk read for the freshness decision. Eviction from
memory never touches the disk copy.

LRU is approximated by CLOCK ("second chance", as page caches do): entries sit
in insertion order; a hit only increments the entry's use count; eviction takes
the oldest entry unless it was used since the clock hand last passed it, in
which case it moves to the young end and the hand goes on. Exact LRU
(``move_to_end`` on every hit) relinks list nodes on the hit path and measured
about 1.5x slower per lookup at 100k keys; the order it keeps differs from
CLOCK's only for entries used once long ago. LFU is the classic O(1) scheme:
one ``OrderedDict`` bucket per use count, the least-used bucket remembered,
ties evicted oldest first (a ``min()`` scan over every key per eviction was
O(n) per insert).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.settings import MemoryPolicy
from proxy.storage.entry import Entry

# What a key and a variant cost beyond their strings and body, measured with tracemalloc
# (tests/storage/test_memory.py keeps cost() within 10% of the real figure): the key's slot,
# list and OrderedDict links; per variant Cached, Entry, StoredResponse, Freshness, their
# floats and tuples, and the fast path's pre-serialised head with its Head object.
KEY_OVERHEAD = 250
VARIANT_OVERHEAD = 1180
FIELD_OVERHEAD = 170  # a (name, value) tuple, two str objects, its slot, its line in the head


@dataclass(slots=True)
class Cached:
    """One stored variant: its metadata, and its body when the body is held in memory."""

    entry: Entry
    body: bytes | None  # None: the body is on disk only
    # The fast path's pre-serialised response heads for this variant (proxy.web.fastpath),
    # built on its first fast hit; a freshened or replaced variant is a new Cached.
    heads: list[Any] | None = field(default=None, compare=False, repr=False)
    # A variant just read from disk with its body (``Storage.get(bodies=True)``): this
    # request's body comes from the disk tier; memory holds a copy without the mark.
    from_disk: bool = field(default=False, compare=False, repr=False)


def cost(variants: tuple[Cached, ...]) -> int:
    """What a key's variants cost against the budget, close to the memory they really take
    (bodies, strings and the Python objects around them), so that a worker's RSS stays near
    the budget it was given."""
    total = KEY_OVERHEAD
    for c in variants:
        e = c.entry
        total += VARIANT_OVERHEAD + 3 * len(e.key) + len(e.body_id)
        if c.body is not None:
            total += len(c.body)
        for k, v in e.response.headers:
            total += FIELD_OVERHEAD + 2 * (len(k) + len(v))  # the field, and its line in the head
        for t in e.tags:
            total += len(t) + 64
    return total


class MemoryTier:
    def __init__(self, budget: int, max_object: int, policy: MemoryPolicy = "lru") -> None:
        if policy not in ("lru", "lfu"):
            raise ValueError(f"memory policy must be lru or lfu, not {policy!r}")
        self.budget = budget
        self.max_object = max_object
        self.policy = policy
        # key -> [variants, cost, uses, uses when the clock hand last passed]: one dict entry
        # per key, so a hit is one lookup and one increment.
        self._items: OrderedDict[str, list[Any]] = OrderedDict()
        self._get = self._items.get
        self._tags: dict[str, set[str]] = {}
        self._extra_keys: dict[str, set[str]] = {}  # url -> keys with header/cookie parts
        # LFU: use count -> keys with that count, oldest first; and the smallest count present.
        self._buckets: dict[int, OrderedDict[str, None]] = {}
        self._min_hits = 0
        self.bytes = 0
        self.evictions = 0
        if policy == "lfu":
            self.get = self._get_lfu  # type: ignore[method-assign]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> Iterator[str]:
        return iter(list(self._items))

    def get(self, key: str) -> tuple[Cached, ...] | None:
        """The variants under ``key`` (a use: counted, which also marks it recently used), or None."""
        slot = self._get(key)
        if slot is None:
            return None
        slot[2] += 1
        return slot[0]  # type: ignore[no-any-return]

    def _get_lfu(self, key: str) -> tuple[Cached, ...] | None:
        slot = self._items.get(key)
        if slot is None:
            return None
        self._bump(key, slot)
        return slot[0]  # type: ignore[no-any-return]

    def slot(self, key: str) -> list[Any] | None:
        """The key's slot ``[variants, cost, uses, ...]`` without counting a use; ``use`` counts
        one once the caller knows it serves from it (the fast path)."""
        return self._get(key)

    def use(self, key: str, slot: list[Any]) -> None:
        """Count a use of ``key`` (whose ``slot`` came from ``slot``), as ``get`` does."""
        if self.policy == "lfu":
            self._bump(key, slot)
        else:
            slot[2] += 1

    def peek(self, key: str) -> tuple[Cached, ...] | None:
        """Like ``get`` without counting as a use (for inspection and internal updates)."""
        slot = self._items.get(key)
        return None if slot is None else slot[0]

    def hits(self, key: str) -> int:
        """Uses of ``key`` since it was stored."""
        slot = self._items.get(key)
        return 0 if slot is None else int(slot[2])

    def top(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` keys with the most uses (for ``GET /stats``): a scan, ~0.2 s per million keys."""
        best = heapq.nlargest(n, self._items.items(), key=lambda kv: kv[1][2])
        return [(k, int(slot[2])) for k, slot in best]

    def put(self, key: str, variants: tuple[Cached, ...]) -> bool:
        """Hold ``variants`` under ``key``; False when they can never fit the budget."""
        old = self._items.get(key)
        # A replaced key keeps its use count: a refreshed hot object stays hot under LFU.
        hits = 0 if old is None else int(old[2])
        self.delete(key)
        size = cost(variants)
        if size > self.budget:
            return False
        self._items[key] = [variants, size, hits, hits]
        self.bytes += size
        if self.policy == "lfu":
            self._buckets.setdefault(hits, OrderedDict())[key] = None
            if hits < self._min_hits or len(self._items) == 1:
                self._min_hits = hits
        for tag in {t for c in variants for t in c.entry.tags}:
            self._tags.setdefault(tag, set()).add(key)
        if "\x1f" in key:
            self._extra_keys.setdefault(key.split("\x1f", 1)[0], set()).add(key)
        self._evict(keep=key)
        return key in self._items

    def replace(self, key: str, variants: tuple[Cached, ...]) -> bool:
        """Update a present key in place (metadata changes) without counting a use."""
        if key not in self._items:
            return False
        return self.put(key, variants)

    def delete(self, key: str) -> bool:
        slot = self._items.pop(key, None)
        if slot is None:
            return False
        variants, size, hits, _ = slot
        self.bytes -= size
        if self.policy == "lfu":
            bucket = self._buckets[hits]
            del bucket[key]
            if not bucket:
                del self._buckets[hits]
        for tag in {t for c in variants for t in c.entry.tags}:
            members = self._tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[tag]
        if "\x1f" in key:
            url = key.split("\x1f", 1)[0]
            extra = self._extra_keys.get(url)
            if extra is not None:
                extra.discard(key)
                if not extra:
                    del self._extra_keys[url]
        return True

    def keys_for_tag(self, tag: str) -> list[str]:
        return list(self._tags.get(tag, ()))

    def keys_for_url(self, url: str) -> list[str]:
        """Every key of ``url``: the plain one and those with header or cookie parts."""
        keys = list(self._extra_keys.get(url, ()))
        if url in self._items:
            keys.append(url)
        return keys

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self._items if k.startswith(prefix)]

    def clear(self) -> int:
        n = len(self._items)
        self._items.clear()
        self._tags.clear()
        self._extra_keys.clear()
        self._buckets.clear()
        self._min_hits = 0
        self.bytes = 0
        return n

    def _bump(self, key: str, slot: list[Any]) -> None:
        hits = slot[2]
        bucket = self._buckets[hits]
        del bucket[key]
        if not bucket:
            del self._buckets[hits]
            if self._min_hits == hits:
                self._min_hits = hits + 1
        slot[2] = hits + 1
        self._buckets.setdefault(hits + 1, OrderedDict())[key] = None

    def _victim(self) -> str:
        if self.policy == "lru":
            # CLOCK: the oldest entry goes unless it was used since the hand last passed it;
            # a used one gets a second chance at the young end. Amortised O(1): each pass
            # clears the mark it looks at.
            items = self._items
            while True:
                key = next(iter(items))
                slot = items[key]
                if slot[2] == slot[3]:
                    return key
                slot[3] = slot[2]
                items.move_to_end(key)
        bucket = self._buckets.get(self._min_hits)
        if bucket is None:  # the minimum moved (deletes): find it again, rare
            self._min_hits = min(self._buckets)
            bucket = self._buckets[self._min_hits]
        return next(iter(bucket))

    def _evict(self, keep: str) -> None:
        while self.bytes > self.budget and len(self._items) > 1:
            victim = self._victim()
            if victim == keep:
                # The newcomer is the least used: evict the next one instead, so a new
                # object gets a chance to be used (LFU would otherwise never admit anything).
                if self.policy == "lru":
                    break
                keep_hits = self._items[keep][2]
                bucket = self._buckets[keep_hits]
                if len(bucket) > 1:
                    victim = next(k for k in bucket if k != keep)
                else:
                    others = [h for h in self._buckets if h != keep_hits]
                    if not others:
                        break
                    victim = next(iter(self._buckets[min(others)]))
            self.delete(victim)
            self.evictions += 1
        if self.bytes > self.budget and keep in self._items:
            self.delete(keep)
