"""The memory tier: the machine's shared memory (``proxy.storage.arena``) holding each key's
variants and bodies once, in front of a small per-process cache of decoded entries.

A key's variants are one record in the arena: their metadata (``entry.encode_record``) and
the bodies the memory tier holds (over ``max_object``, a body stays on disk and only its
metadata is here, so a hit on it still decides freshness without a disk read). Every
process maps the same arena, so what one worker stores the others find at once, and a
body is in RAM once however many workers serve it.

Reading a record means copying and decoding its metadata (≈ 5-10 µs), so each process keeps
the entries it used lately decoded (``decoded_budget`` bytes, counted by ``cost``): a hit on
one of them is a dict lookup, and a check that its record is still there (the arena's
``alive``: one 8-byte read). A key is kept decoded from its second sighting in a while on (a
doorkeeper, as TinyLFU's: the last ``DOORKEEPER_KEYS`` keys seen once, read or written by a
fill or a promotion from disk): the decoded cache
holds a small part of the machine's keys (1/32 of the budget per process), and under a long
tail most keys are read once in a while, so admitting each one cost its decoding's worth
again (its ``cost``, the cache's upkeep, the fast path's head kept with it: ≈ 10 % of a
worker's samples on 100,000 random keys, py-spy) and pushed out keys that come back.

A decoded entry's body is a view into the arena, never a copy: whoever sends it copies it
out (or hands it to the kernel) and checks ``alive`` afterwards, since the ring may have
reclaimed the record meanwhile (a miss, never another key's bytes).

Eviction is the arena's: oldest first, and a record read since it was written goes round
again (CLOCK's second chance). ``memory_policy: lfu`` gives that second chance only to
records read at least twice in one process since it decoded them. The decoded cache evicts
by CLOCK.
"""

from __future__ import annotations

import builtins
import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.policy.keys import url_of_key
from proxy.settings import MemoryPolicy, arena_capacity, decoded_budget, ring_body_limit
from proxy.storage.arena import CHANGED, F_PERSISTED, Arena
from proxy.storage.entry import ALL_TO_WRITE, META_TO_WRITE, ON_DISK, Entry, decode_record, encode_record

# What a decoded key and variant cost in a process beyond their strings, measured with
# tracemalloc (tests/storage/test_memory.py keeps cost() within 10-50% of the real figure):
# the key's Slot and OrderedDict links; per variant Cached, Entry, StoredResponse, Freshness,
# their floats and tuples, and the view of its body. The fast path's heads are counted as they
# are built (``keep_head``).
KEY_OVERHEAD = 300
VARIANT_OVERHEAD = 900
FIELD_OVERHEAD = 120  # a (name, value) tuple, the value's str object (names are shared)
DOORKEEPER_KEYS = 4096  # keys seen once that a process remembers (then forgets all at once)


class Heads:
    """The fast path's pre-serialised response heads of one variant (``proxy.web.fastpath``: one
    per rule edits x HTTP version x GET/HEAD, at most ``MAX_HEADS``). They live with the variant's
    decoded entry and count in the decoded budget: a worker's heads are part of its share of
    ``cache.memory``, not memory beside it."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Any] = []


MAX_HEADS = 8
HEAD_OVERHEAD = 200  # a Head object, its tuple of holes, its list slot; the bytes are counted apart


@dataclass(slots=True)
class Cached:
    """One stored variant: its metadata, and its body when the body is at hand."""

    entry: Entry
    # bytes (read from disk, or a fill's own), a view of the arena's copy (check that the
    # record is still ``alive`` after copying from it), or None: the body is on disk only.
    body: bytes | memoryview | None
    # The fast path's pre-serialised response heads for this variant (proxy.web.fastpath),
    # built on its first fast hit and counted in its decoded entry's cost (``MemoryTier.keep_head``);
    # a freshened or replaced variant is a new Cached.
    heads: Heads | None = field(default=None, compare=False, repr=False)
    # A variant just read from disk with its body (``Storage.get(bodies=True)``): this
    # request's body comes from the disk tier; memory holds a copy without the mark.
    from_disk: bool = field(default=False, compare=False, repr=False)
    pos: int = field(default=0, compare=False, repr=False)  # its arena record (0: none)
    state: int = field(default=ON_DISK, compare=False, repr=False)  # see entry.ON_DISK

    def with_entry(self, entry: Entry, state: int) -> Cached:
        """The same body with new metadata (a 304's, a soft purge's): a view of the arena keeps
        its record's position, by which a copy of it is checked (``MemoryTier.body_bytes``);
        the pre-serialised heads were built from the old metadata and are not carried."""
        return Cached(entry, self.body, None, False, self.pos, state)


UNWRITTEN_ROOM = 4  # × memory_max_object: a key's bodies not on disk yet (``bodies_within``)
# Without a disk tier, a key's bodies may take this share of the ring when that is more
# (``memory_only_bodies``).
MEMORY_ONLY_SHARE = 64


def bodies_within(variants: tuple[Cached, ...], limit: int, unwritten: int,
                  on_disk: Callable[[Cached], bool]) -> tuple[Cached, ...]:
    """A key's variants with about ``limit`` bytes of bodies (``memory_max_object``: what one
    object may hold in memory), the newest kept. Why: every new Vary variant rewrites the key's
    record with all the others' bodies, so a client asking for one 900 KB page with 64
    User-Agents wrote 28 MB records, over and over, and pushed every other key out of the
    shared memory (asking for 64 distinct URLs pushes out none). An older variant whose body is
    on disk keeps only its metadata here (its body is read from disk when asked, as a big
    body's). One not written to disk yet keeps its body while the record's bodies stay within
    ``unwritten`` bytes (``MemoryTier.unwritten_limit``: dropped at once, it was refetched by
    clients asking for the variants of a page in turn faster than write-behind writes them);
    past that the oldest of them are left out (a miss, as if the ring had evicted them)."""
    if sum(len(c.body) for c in variants if c.body is not None) <= limit:
        return variants
    room, spare = limit, unwritten - limit
    kept: list[Cached] = []
    for c in reversed(variants):  # the newest last (``merge_variant``)
        body = c.body
        if body is None or len(body) <= room:
            room -= 0 if body is None else len(body)
            kept.append(c)
        elif on_disk(c):
            state = ON_DISK if c.state == ALL_TO_WRITE else c.state
            kept.append(Cached(c.entry, None, None, False, 0, state))
        elif len(body) <= spare:
            spare -= len(body)
            kept.append(c)
    return tuple(reversed(kept))


# Readings of a key's variants by a write that merges into them (``Writer._put_variant``), when
# another process wrote the key between each reading and the write (``MemoryTier.put``'s
# ``expect``). Each failed try means another write of the key went in; past these, the write
# gives up (as for variants memory does not take).
PUT_TRIES = 8


def record_of(variants: tuple[Cached, ...] | None) -> int:
    """The arena record ``variants`` (``MemoryTier.peek``'s) were read from, or 0 (none): a put
    of what was made from them replaces that record only (``MemoryTier.put``'s ``expect``)."""
    return variants[0].pos if variants else 0


def memory_only_bodies(capacity: int, max_object: int) -> int:
    """What a key's record may hold of bodies without a disk tier (``unwritten_limit``): nothing
    is ever written behind, so a variant left out is asked of the origin again; the key keeps
    its newest bodies up to 1/``MEMORY_ONLY_SHARE`` of the ring (``UNWRITTEN_ROOM`` ×
    ``max_object`` when that is more), and never more than a quarter of it (a record must fit
    the ring, which takes at most half of it). The share bounds what a client sending a new
    ``User-Agent`` per request makes the ring write (the whole record, each time): 64 such
    requests to turn the ring over."""
    return min(max(UNWRITTEN_ROOM * max_object, capacity // MEMORY_ONLY_SHARE), capacity // 4)


def _without_oldest(written: list[Cached], metas: list[tuple[Entry, int, int]], parts: list[builtins.bytes]
                    ) -> tuple[list[Cached], list[tuple[Entry, int, int]], list[builtins.bytes]]:
    """A record's variants less the oldest one's body when the disk has it (its metadata
    stays), else less the oldest variant (never the newest, the last: ``merge_variant``)."""
    at = 0  # where the variant's body is in ``parts``
    for i, (entry, body_len, state) in enumerate(metas[:-1]):
        if body_len >= 0 and state != ALL_TO_WRITE:
            return (written, [*metas[:i], (entry, -1, state), *metas[i + 1:]], [*parts[:at], *parts[at + 1:]])
        at += body_len >= 0
    _, body_len, _ = metas[0]
    return written[1:], metas[1:], parts[1:] if body_len >= 0 else parts


def cost(variants: tuple[Cached, ...]) -> int:
    """What a key's decoded variants cost a process (bodies excepted: they are the arena's,
    unless a variant holds its own bytes)."""
    total = KEY_OVERHEAD
    for c in variants:
        e = c.entry
        total += VARIANT_OVERHEAD + 3 * len(e.key) + len(e.body_id)
        if isinstance(c.body, bytes):
            total += len(c.body)
        for _, v in e.response.headers:
            total += FIELD_OVERHEAD + len(v)
        for t in e.tags:
            total += len(t) + 64
        if c.heads is not None:  # carried into a new record of the key (``MemoryTier.put``)
            total += sum(size + HEAD_OVERHEAD for _, size in c.heads.items)
    return total


class Slot:
    """A key's variants decoded in this process, and the tier's bookkeeping of them."""

    __slots__ = ("cost", "marked", "pos", "seen", "starts", "uses", "variants")

    def __init__(self, variants: tuple[Cached, ...], cost: int, uses: int, pos: int,
                 starts: tuple[int, ...]) -> None:
        self.variants = variants
        self.cost = cost  # what it counts against the decoded budget
        self.uses = uses  # uses in this process since it was decoded here
        self.seen = 0  # uses when the decoded cache's clock hand last passed
        self.pos = pos  # its arena record
        self.starts = starts  # where each variant's body starts in the record (-1: none)
        self.marked = 0  # the record last marked read (the arena's second chance)


class MemoryTier:
    def __init__(self, budget: int, max_object: int, policy: MemoryPolicy = "lru", *,
                 arena: Arena | None = None, decoded: int | None = None, owns_arena: bool = False,
                 doorkeeper: int = DOORKEEPER_KEYS) -> None:
        """``budget``: ``cache.memory`` (of the machine); ``arena``: the machine's shared memory
        (a new one of this process's own when None); ``owns_arena``: close it with the tier;
        ``doorkeeper``: keys seen once remembered (0: every key read or written is kept decoded)."""
        if policy not in ("lru", "lfu"):
            raise ValueError(f"memory policy must be lru or lfu, not {policy!r}")
        self.arena = arena if arena is not None else Arena.create(arena_capacity(budget))
        self._own_arena = arena is None or owns_arena
        self.budget = self.arena.capacity
        # ``memory_max_object``, but no more than one record of the ring holds (``ring_body_limit``):
        # a bigger body was spooled in RAM, then refused by the ring at the put.
        self.max_object = min(max_object, ring_body_limit(self.arena.capacity))
        # What a key's record may hold of bodies not on disk yet (``bodies_within``); without a
        # disk tier (nothing is written behind) ``Storage`` sets ``memory_only_bodies``.
        self.unwritten_limit = UNWRITTEN_ROOM * max_object
        self.policy = policy
        self.decoded_budget = decoded if decoded is not None else decoded_budget(budget)
        self._decoded: OrderedDict[str, Slot] = OrderedDict()
        self._get = self._decoded.get
        self._alive = self.arena.alive
        self.decoded_bytes = 0
        self._doorkeeper_keys = doorkeeper
        # Keys seen once lately and not kept decoded (the doorkeeper): the uses that sighting counts.
        self._read_once: dict[str, int] = {}

    def close(self) -> None:
        self._decoded.clear()
        if self._own_arena:
            self.arena.close()

    # -- counts (the arena's: the whole machine) ---------------------------------------------

    def __len__(self) -> int:
        return self.arena.entries

    @property
    def bytes(self) -> int:
        return self.arena.live_bytes

    @property
    def evictions(self) -> int:
        return self.arena.evictions

    @property
    def decoded_entries(self) -> int:
        return len(self._decoded)

    def __contains__(self, key: str) -> bool:
        return self.slot(key) is not None

    def keys(self) -> Iterator[str]:
        return iter([r.key for r in self.arena.scan()])

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str) -> tuple[Cached, ...] | None:
        """The variants under ``key`` (a use: counted), or None."""
        slot = self.slot(key)
        if slot is None:
            return None
        self.use(slot)
        return slot.variants

    def slot(self, key: str) -> Slot | None:
        """The key's decoded ``Slot`` without counting a use (``use`` counts one once the caller
        serves from it: the fast path)."""
        slot = self._get(key)
        if slot is not None:
            if self._alive(slot.pos):
                return slot
            self._forget(key)
        return self._load(key)

    def use(self, slot: Slot) -> None:
        """Count a use, and mark the record as read (once per record: it then goes round the
        ring again instead of out)."""
        uses = slot.uses = slot.uses + 1
        if slot.marked != slot.pos and (uses > 1 or self.policy == "lru"):
            self.arena.mark(slot.pos)
            slot.marked = slot.pos

    def keep_head(self, key: str, cached: Cached, head: Any, size: int) -> None:
        """Keep a pre-serialised head of ``cached`` (``size`` bytes), counted in the decoded
        budget; the oldest of the variant's heads goes past ``MAX_HEADS``."""
        heads = cached.heads
        if heads is None:
            heads = cached.heads = Heads()
        heads.items.append((head, size))
        grown = size + HEAD_OVERHEAD
        if len(heads.items) > MAX_HEADS:
            _, gone = heads.items.pop(0)
            grown -= gone + HEAD_OVERHEAD
        slot = self._decoded.get(key)
        if slot is not None and any(c is cached for c in slot.variants):
            slot.cost += grown
            self.decoded_bytes += grown
            self._shrink(key)

    def peek(self, key: str) -> tuple[Cached, ...] | None:
        """Like ``get`` without counting a use (for inspection and internal updates)."""
        slot = self.slot(key)
        return None if slot is None else slot.variants

    def hits(self, key: str) -> int:
        """Uses of ``key`` in this process since it was decoded here."""
        slot = self._decoded.get(key)
        return 0 if slot is None else slot.uses

    def top(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` keys with the most uses in this process (for ``GET /stats``)."""
        best = heapq.nlargest(n, self._decoded.items(), key=lambda kv: kv[1].uses)
        return [(k, slot.uses) for k, slot in best]

    def alive(self, cached: Cached) -> bool:
        """Whether a variant's view of the arena still shows its body (after copying from it)."""
        return not cached.pos or self._alive(cached.pos)

    def body_bytes(self, cached: Cached) -> builtins.bytes | None:
        """The variant's body as bytes: its own, or copied from the arena (None: not at hand, or
        the arena reclaimed it while it was copied)."""
        body = cached.body
        if body is None or isinstance(body, bytes):
            return body
        data = bytes(body)
        return data if self._alive(cached.pos) else None

    def _load(self, key: str) -> Slot | None:
        record = self.arena.find(key)
        if record is None:
            return None
        decoded = decode_record(key, record.meta)
        if decoded is None:
            return None
        view = self.arena.view
        base = self.arena.body_at(record.pos, 0, 0)
        at = record.body_at
        variants, starts = [], []
        for e, body_len, state in decoded:
            body = None
            if body_len >= 0:
                body = view[at:at + body_len]
                starts.append(at - base)
                at += body_len
            else:
                starts.append(-1)
            variants.append(Cached(e, body, pos=record.pos,
                                   state=ON_DISK if record.flags & F_PERSISTED else state))
        before = self._admit(key)
        if before is not None:
            return self._hold(key, tuple(variants), record.pos, tuple(starts), before)
        return Slot(tuple(variants), 0, 0, record.pos, tuple(starts))  # for this read only

    def _admit(self, key: str, read: bool = True) -> int | None:
        """Whether a key just decoded (``read``), or just written by a fill or a promotion from
        disk, is kept decoded: when the doorkeeper saw it lately. Then the uses to count for
        that sighting (1 for a read, 0 for a write), else None."""
        if not self._doorkeeper_keys:
            return 1 if read else 0
        once = self._read_once
        before = once.pop(key, None)
        if before is not None:
            return before
        if len(once) >= self._doorkeeper_keys:
            once.clear()
        once[key] = 1 if read else 0
        return None

    def _hold(self, key: str, variants: tuple[Cached, ...], pos: int, starts: tuple[int, ...],
              uses: int = 0) -> Slot:
        """Keep ``variants`` decoded (``uses``: those counted before, when it was not kept)."""
        old = self._decoded.pop(key, None)
        if old is not None:
            self.decoded_bytes -= old.cost
        size = cost(variants)
        slot = Slot(variants, size, uses if old is None else old.uses, pos, starts)
        self._decoded[key] = slot
        self.decoded_bytes += size
        self._shrink(key)
        return slot

    def _forget(self, key: str) -> None:
        slot = self._decoded.pop(key, None)
        if slot is not None:
            self.decoded_bytes -= slot.cost

    def _shrink(self, keep: str) -> None:
        """CLOCK over the decoded entries until they fit ``decoded_budget``."""
        items = self._decoded
        while self.decoded_bytes > self.decoded_budget and len(items) > 1:
            key = next(iter(items))
            slot = items[key]
            if key != keep and slot.uses == slot.seen:
                self._forget(key)
                continue
            slot.seen = slot.uses
            items.move_to_end(key)

    # -- writing -----------------------------------------------------------------------------

    def put(self, key: str, variants: tuple[Cached, ...], *, admit: bool = False,
            expect: int | None = None) -> bool | None:
        """Hold ``variants`` under ``key`` (a new record: whatever the key had is replaced); False
        when they can never fit. Bodies that are views of the arena are copied first (from the
        key's record as it is now, when theirs was replaced meanwhile: ``_body_now``); a variant
        whose body is neither at hand nor on disk is left out, never written body-less.

        ``admit``: this process keeps them decoded only when the doorkeeper admits the key, as
        for a read of the shared memory (a fill of a new key, a promotion from disk: the put
        counts as the key's first sighting, and the next read keeps it). Why: in the ``zipf``
        load a third or more of the requests are fills, nearly all of keys asked once in the
        run, and more are disk reads of the long tail; kept decoded, they pushed hot keys out of
        this process's decoded entries (and built the slot, its views and its cost for
        nothing). Paired with the code before (``scripts/bench-pair``): ``zipf`` 1.11x, 1.03x
        and 1.04x the req/s in three runs, ``fill`` 1.00x, 1.07x and 1.09x.

        ``expect``: written only while the key's record is the one the caller read (``record_of``
        what ``peek`` gave; 0: while the key has none), checked under the ring's lock, else None
        and nothing written: another process wrote the key in between, and the caller reads it
        again (``Arena.put``)."""
        if len(variants) > 1:
            variants = bodies_within(variants, self.max_object, self.unwritten_limit, self._on_disk)
        metas: list[tuple[Entry, int, int]] = []
        parts: list[builtins.bytes] = []
        written: list[Cached] = []
        for c in variants:
            body, state = c.body, c.state
            if isinstance(body, memoryview):
                body = self.body_bytes(c)
                if body is None:  # its record was replaced meanwhile (by another process)
                    body, state = self._body_now(key, c)
            if body is None:
                if state == ALL_TO_WRITE:
                    continue  # neither in memory nor on disk: left out (a miss), never a hole
                metas.append((c.entry, -1, state))
            else:
                metas.append((c.entry, len(body), state))
                parts.append(body)
            written.append(c)
        if not written:  # (each was a view of a record gone meanwhile, its variant with it)
            return False
        meta = encode_record(metas)
        # Each variant fits the ring alone (``proxy.storage.writes.Writer.room``), but all of them
        # together may be more than a record holds (``ring_body_limit``): the oldest give way, a
        # body the disk has first (its metadata stays), else the whole variant (a miss). Why: the
        # record was refused whole, the new variant with it, after its MISS said ``stored``.
        room = ring_body_limit(self.arena.capacity) - len(key.encode("utf-8", "surrogatepass"))
        while len(written) > 1 and len(meta) + sum(len(p) for p in parts) > room:
            written, metas, parts = _without_oldest(written, metas, parts)
            meta = encode_record(metas)
        persisted = all(state == ON_DISK for _, _, state in metas)
        pos = self.arena.put(key, meta, parts, F_PERSISTED if persisted else 0, expect=expect)
        if pos == CHANGED:  # (``expect``) another process's record of the key stands
            self._forget(key)
            return None
        if not pos:
            self._forget(key)
            return False
        before = self._admit(key, read=False) if admit else 0
        if before is None:
            self._forget(key)
            return True
        base = self.arena.body_at(pos, 0, 0)
        at = self.arena.body_at(pos, len(key.encode("utf-8", "surrogatepass")), len(meta))
        view = self.arena.view
        held, starts = [], []
        for c, (_, body_len, state) in zip(written, metas, strict=True):
            view_of: memoryview | None = None
            if body_len >= 0:
                view_of = view[at:at + body_len]
                starts.append(at - base)
                at += body_len
            else:
                starts.append(-1)
            held.append(Cached(c.entry, view_of, c.heads, False, pos, state))
        self._hold(key, tuple(held), pos, tuple(starts), before)
        return True

    def _body_now(self, key: str, c: Cached) -> tuple[builtins.bytes | None, int]:
        """The body of ``c`` (a view of a record that was replaced meanwhile) and the state to
        write it with, from the key's record as it is now. Why: a process's put carries the
        other variants' bodies as views of the record it read, which another worker may replace
        at the same moment; written body-less, a variant not on disk yet was never written
        behind, and its next hit found no body and forgot the whole key."""
        for now in self.peek(key) or ():
            if now.entry.body_id != c.entry.body_id:
                continue
            body = self.body_bytes(now) if now.body is not None else None
            if c.state == ALL_TO_WRITE and now.state != ALL_TO_WRITE:
                return body, META_TO_WRITE  # the disk has its body (maybe older metadata)
            return body, c.state
        return None, c.state

    def _on_disk(self, c: Cached) -> bool:
        """Whether the disk tier has the variant's body (its record was written behind since
        this process decoded it, or it came from disk)."""
        return c.state != ALL_TO_WRITE or (c.pos != 0 and self.arena.persisted(c.pos))

    def delete(self, key: str) -> bool:
        self._forget(key)
        return self.arena.delete(key)

    def clear(self) -> int:
        self._decoded.clear()
        self._read_once.clear()
        self.decoded_bytes = 0
        return self.arena.clear()

    # -- finding keys (scans of the arena: purges and inspection) ----------------------------

    def keys_for_tag(self, tag: str) -> list[str]:
        out = []
        for r in self.arena.scan():
            decoded = decode_record(r.key, r.meta)
            if decoded and any(tag in e.tags for e, _, _ in decoded):
                out.append(r.key)
        return out

    def keys_for_url(self, url: str, scan: bool = True) -> list[str]:
        """Every key of ``url``: the plain one and those with header or cookie parts or a
        range's parts. Without ``scan`` (the disk tier's index knows the persisted ones), only
        the records not yet written behind are looked through for the other shapes."""
        if scan:
            return [r.key for r in self.arena.scan() if r.key == url or url_of_key(r.key) == url]
        keys = [url] if self.slot(url) is not None else []
        keys += [r.key for r in self.arena.scan(skip=F_PERSISTED)
                 if r.key != url and url_of_key(r.key) == url]
        return keys

    def keys_for_urls(self, urls: Iterable[str], scan: bool = True) -> set[str]:
        """``keys_for_url`` of every URL of ``urls``, with one pass over the records for all of
        them (a pass per URL made a purge of thousands of URLs cost thousands of passes)."""
        wanted = set(urls)
        if not wanted:
            return set()
        if scan:
            return {r.key for r in self.arena.scan() if r.key in wanted or url_of_key(r.key) in wanted}
        keys = {url for url in wanted if self.slot(url) is not None}
        for r in self.arena.scan(skip=F_PERSISTED):
            url = url_of_key(r.key)
            if url != r.key and url in wanted:
                keys.add(r.key)
        return keys

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [r.key for r in self.arena.scan() if r.key.startswith(prefix)]


__all__ = ["ALL_TO_WRITE", "PUT_TRIES", "Cached", "Heads", "MemoryPolicy", "MemoryTier", "Slot",
           "arena_capacity", "cost", "decoded_budget", "record_of"]
