"""The memory tier: the machine's shared memory (``proxy.storage.arena``) holding each key's
variants and bodies once, in front of a small per-process cache of decoded entries.

A key is one record in the arena: its variants' metadata (``entry.encode_record``) and, for a
key with one variant, its body (over ``max_object``, a body stays on disk and only its
metadata is here, so a hit on it still decides freshness without a disk read). A key with more
than one variant (``Vary``) keeps each body in a record of its own (``entry.body_key``: the key,
a NUL, the body's id; flagged ``arena.F_BODY``), and its key's record holds the metadata only
(``entry.APART``). Why: with the bodies in the key's record, each fill of a new variant
rewrote the record with the other variants' bodies: one client asking one URL with a new
``User-Agent`` per request (40 fills of 30 KB) made the ring write ~30x what 40 URLs would and
pushed 5,000 other keys out of it. Now a new variant costs its own body and the key's
metadata; a body read again from disk writes its own record only.

A body record the ring dropped (or never took) means the body is not in memory: it is read
from disk when the disk has it (the key's record was written behind, or the body came from
disk: as a body over ``max_object``), else the variant is left out when the record is read (a
miss; never a listed variant whose body is nowhere, which a hit would take for a body the disk
lost, and forget the whole key). A body record is found by its body id and checked by its
length, so one a purge or a refill left behind is never served; ``delete`` drops a key's body
records with it.

Every process maps the same arena, so what one worker stores the others find at once, and a
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.policy.keys import part_key, url_of_key
from proxy.settings import MemoryPolicy, arena_capacity, decoded_budget, ring_body_limit
from proxy.storage.arena import CHANGED, F_BODY, F_PERSISTED, Arena, Record
from proxy.storage.bans import Prefixes
from proxy.storage.entry import (
    ALL_TO_WRITE,
    APART,
    META_TO_WRITE,
    ON_DISK,
    Entry,
    body_key,
    decode_record,
    encode_record,
)

# What a decoded key and variant cost in a process beyond their strings, measured with
# tracemalloc (tests/storage/test_memory.py keeps cost() within 10-50% of the real figure):
# the key's Slot and OrderedDict links; per variant Cached, Entry, StoredResponse, Freshness,
# their floats and tuples, and the view of its body. The fast path's heads are counted as they
# are built (``keep_head``).
KEY_OVERHEAD = 300
VARIANT_OVERHEAD = 900
FIELD_OVERHEAD = 120  # a (name, value) tuple, the value's str object (names are shared)
DOORKEEPER_KEYS = 4096  # keys seen once that a process remembers (then forgets all at once)
UNSURE_RECORDS = 256  # records with variants not known to be anywhere a process remembers (``_unsure``)


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
    # The arena record its body is a view of (its key's, or its own: ``apart``), else its key's
    # record (0: none), by which ``alive`` checks a copy.
    pos: int = field(default=0, compare=False, repr=False)
    state: int = field(default=ON_DISK, compare=False, repr=False)  # see entry.ON_DISK
    # Its body is kept in a record of its own (``entry.APART``: a key with several variants).
    apart: bool = field(default=False, compare=False, repr=False)
    rec: int = field(default=0, compare=False, repr=False)  # its key's record (``record_of``)

    def with_entry(self, entry: Entry, state: int) -> Cached:
        """The same body with new metadata (a 304's, a soft purge's): a view of the arena keeps
        its record's position, by which a copy of it is checked (``MemoryTier.body_bytes``);
        the pre-serialised heads were built from the old metadata and are not carried."""
        return Cached(entry, self.body, None, False, self.pos, state, self.apart, self.rec)


# Readings of a key's variants by a write that merges into them (``Writer._put_variant``), when
# another process wrote the key between each reading and the write (``MemoryTier.put``'s
# ``expect``). Each failed try means another write of the key went in; past these, the write
# gives up (as for variants memory does not take).
PUT_TRIES = 8


def record_of(variants: tuple[Cached, ...] | None) -> int:
    """The arena record ``variants`` (``MemoryTier.peek``'s) were read from, or 0 (none): a put
    of what was made from them replaces that record only (``MemoryTier.put``'s ``expect``)."""
    return variants[0].rec if variants else 0


def _body_of(found: Record, e: Entry) -> bool:
    """Whether ``found`` (the record under ``e``'s body key) holds ``e``'s body."""
    return bool(found.flags & F_BODY) and found.body_len == e.body_size


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

    __slots__ = ("apart", "cost", "marked", "pos", "seen", "starts", "uses", "variants")

    def __init__(self, variants: tuple[Cached, ...], cost: int, uses: int, pos: int,
                 starts: tuple[int, ...], apart: tuple[int, ...] = ()) -> None:
        self.variants = variants
        self.cost = cost  # what it counts against the decoded budget
        self.uses = uses  # uses in this process since it was decoded here
        self.seen = 0  # uses when the decoded cache's clock hand last passed
        self.pos = pos  # its arena record
        self.starts = starts  # where each variant's body starts in the record (-1: none)
        self.marked = 0  # the record last marked read (the arena's second chance)
        # The body records its variants' bodies are views of (``Cached.apart``): each one gone
        # makes the decoded entry stale, as its key's record gone does (``MemoryTier.slot``).
        self.apart = apart


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
        self.policy = policy
        self.decoded_budget = decoded if decoded is not None else decoded_budget(budget)
        self._decoded: OrderedDict[str, Slot] = OrderedDict()
        self._get = self._decoded.get
        self._alive = self.arena.alive
        self.decoded_bytes = 0
        self._doorkeeper_keys = doorkeeper
        # Keys seen once lately and not kept decoded (the doorkeeper): the uses that sighting counts.
        self._read_once: dict[str, int] = {}
        # Variants a record read here lists as not on disk yet with no body record found
        # (record position -> them): left out of what was read, carried into a put that
        # replaces that record (``_unsure``). A rare path: the dict is nearly always empty.
        self._unsure: dict[int, list[Entry]] = {}

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
        return iter([r.key for r in self.arena.scan(skip=F_BODY)])

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str) -> tuple[Cached, ...] | None:
        """The variants under ``key`` (a use: counted), or None."""
        slot = self.slot(key)
        if slot is None:
            return None
        self.use(slot)
        return slot.variants

    def get_copied(self, key: str) -> tuple[Cached, ...] | None:
        """``get``, with the bodies copied out of the shared memory at once (bytes: no later
        write changes them; not kept decoded). For a hit whose view of its body was overwritten
        while it was read (its record replaced by a refresh or a fill, maybe another worker's):
        read by ``get`` again, the new record's view could be replaced in its turn, and a key
        stored all along went to the origin as a miss."""
        slot = self._load(key, copied=True)
        if slot is None:
            return None
        self.use(slot)
        return slot.variants

    def slot(self, key: str) -> Slot | None:
        """The key's decoded ``Slot`` without counting a use (``use`` counts one once the caller
        serves from it: the fast path)."""
        slot = self._get(key)
        if slot is not None:
            # (A key without Vary has no body records: one attribute read more, no call.)
            if self._alive(slot.pos) and (not slot.apart or all(map(self._alive, slot.apart))):
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

    def use_body(self, cached: Cached) -> None:
        """Mark a body record as read when its variant is served (it then goes round the ring
        again, as a key's record read does: ``use``)."""
        if cached.apart and cached.body is not None:
            self.arena.mark(cached.pos)

    def find_body(self, key: str, e: Entry) -> Record | None:
        """The live record of the body of ``e`` (a variant of ``key``), if the ring has it: found
        by its body id, and of its length (its bytes stay in place; check ``alive`` after copying).
        (One being moved round the ring is found too: ``Arena.find``.)"""
        found = self.arena.find(body_key(key, e.body_id))
        return found if found is not None and _body_of(found, e) else None

    def copy_body(self, key: str, e: Entry) -> tuple[Record, builtins.bytes] | None:
        """``find_body`` with the body copied at once (bytes no later write changes), or None
        when the ring does not hold it. A body record that went round the ring while it was
        copied (CLOCK's second chance: alive at the head) is looked up again, never taken as
        gone (``Arena.find_copy``): taken so, a variant not on disk yet was dropped from the
        key, and the key's record with it when no variant was left."""
        copy = self.arena.find_copy(body_key(key, e.body_id))
        return copy if copy is not None and _body_of(copy[0], e) else None

    def body_apart(self, key: str, e: Entry) -> builtins.bytes | None:
        """A copy of ``e``'s body from its own record (None: the ring does not hold it). This
        process's decoded entry of the key is dropped when it is found (it was read while the
        ring lacked the body: another process put it back since), so the next hit takes it."""
        copy = self.copy_body(key, e)
        if copy is None:
            return None
        self._forget(key)
        return copy[1]

    def put_body(self, key: str, e: Entry, body: builtins.bytes, on_disk: bool) -> int:
        """Write ``body`` (of ``e``, a variant of ``key`` whose body is kept apart) into a record
        of its own, unless the ring has it already; its position (0: it does not fit).
        ``on_disk``: the disk tier has it. This process's decoded entry of the key is dropped (it
        does not know the new record)."""
        found = self.find_body(key, e)
        if found is not None:
            return found.pos
        bkey = body_key(key, e.body_id)
        pos = self.arena.put(bkey, b"", body, F_BODY | (F_PERSISTED if on_disk else 0))
        self._forget(key)
        if pos > 0 and not self._names(key, e.body_id):
            # The key's record was purged or replaced since the body was read from disk: no
            # variant would ever name this record (it took ring space and counted as an entry
            # until it aged out). A purge drops the key's record before its body records
            # (``delete``), so one written after that purge looked is found gone here.
            self.arena.delete(bkey, pos)
            return 0
        return max(pos, 0)

    def _names(self, key: str, body_id: str) -> bool:
        """Whether the key's record lists ``body_id``."""
        record = self.arena.find(key)
        return record is not None and any(
            e.body_id == body_id for e, _, _ in decode_record(key, record.meta) or ())

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

    def _load(self, key: str, copied: bool = False) -> Slot | None:
        """The key's record decoded, kept decoded when the doorkeeper admits it; ``copied``:
        with copies of the bodies (``get_copied``), never kept."""
        data: bytes | None = None  # (``copied``) the record's body bytes, copied with it
        record: Record | None
        if copied:
            copy = self.arena.find_copy(key)
            record, data = copy if copy is not None else (None, None)
        else:
            record = self.arena.find(key)
        if record is None:
            return None
        decoded = decode_record(key, record.meta)
        if decoded is None:
            return None
        view = self.arena.view
        base = self.arena.body_at(record.pos, 0, 0)
        at = record.body_at
        rec = record.pos
        persisted = record.flags & F_PERSISTED
        variants, starts, apart = [], [], []
        for e, body_len, state in decoded:
            if persisted:
                state = ON_DISK
            if body_len == APART:
                apart_body: bytes | memoryview | None = None
                if data is None:
                    found = self.find_body(key, e)
                    if found is not None:
                        apart_body = view[found.body_at:found.body_at + found.body_len]
                else:  # (a body record is never rewritten with other bytes: a new body has a new id)
                    found, apart_body = self.copy_body(key, e) or (None, None)
                if found is not None:
                    if state == ALL_TO_WRITE and found.flags & F_PERSISTED:
                        state = ON_DISK  # (written behind since the key's record was)
                    variants.append(Cached(e, apart_body, pos=found.pos, state=state, apart=True, rec=rec))
                    apart.append(found.pos)
                elif state != ALL_TO_WRITE:  # the disk has its body: read from there
                    variants.append(Cached(e, None, pos=rec, state=state, apart=True, rec=rec))
                else:
                    # Not at hand: a miss. Maybe on disk all the same (its batch committed it
                    # after this record was written): write-behind, which knows, decides
                    # whether it stays listed (``put`` carries it over, ``_unsure``).
                    self._note_unsure(rec, e)
                    continue
                starts.append(-1)
                continue
            body: bytes | memoryview | None = None
            if body_len >= 0:
                body = view[at:at + body_len] if data is None else \
                    data[at - record.body_at:at - record.body_at + body_len]
                starts.append(at - base)
                at += body_len
            else:
                starts.append(-1)
            variants.append(Cached(e, body, pos=rec, state=state, rec=rec))
        if not variants:  # (each was a body the ring dropped: what the disk has is read from there)
            if not copied:  # (the looked-again read leaves the record to the next plain one)
                self._unsure.pop(rec, None)
                self.arena.delete(key, rec)
            return None
        before = None if copied else self._admit(key)
        bodies = tuple(apart) if apart else ()
        if before is not None:
            return self._hold(key, tuple(variants), rec, tuple(starts), before, bodies)
        return Slot(tuple(variants), 0, 0, rec, tuple(starts), bodies)  # for this read only

    def _note_unsure(self, rec: int, e: Entry) -> None:
        unsure = self._unsure
        if len(unsure) >= UNSURE_RECORDS and rec not in unsure:
            unsure.clear()
        found = unsure.setdefault(rec, [])
        if e not in found:
            found.append(e)

    def _carried(self, expect: int | None, metas: list[tuple[Entry, int, int]]
                 ) -> list[tuple[Entry, int, int]]:
        """The variants the record being replaced (``expect``) lists as not on disk yet whose
        body records were not found when it was read (``_load``), and which ``metas`` neither
        holds nor replaces: carried over as they were. Why: a batch in flight may have just
        committed one (a fill copied it before its body record was marked persisted, then the
        ring dropped that record); left out here, the key's record in memory lacked a variant
        the disk has, a miss for good (the disk is not read for a key memory holds). Write-behind
        tells: on disk (it committed it lately) it is marked so, else written out of the record."""
        unsure = self._unsure.pop(expect, None) if expect else None
        if not unsure:
            return []
        ids = {e.body_id for e, _, _ in metas}
        varies = {e.response.vary for e, _, _ in metas}
        return [(e, APART, ALL_TO_WRITE) for e in unsure
                if e.body_id not in ids and e.response.vary not in varies]

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
              uses: int = 0, apart: tuple[int, ...] = ()) -> Slot:
        """Keep ``variants`` decoded (``uses``: those counted before, when it was not kept)."""
        old = self._decoded.pop(key, None)
        if old is not None:
            self.decoded_bytes -= old.cost
        size = cost(variants)
        slot = Slot(variants, size, uses if old is None else old.uses, pos, starts, apart)
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
        when they can never fit. One variant: its body in the key's record (bodies that are
        views of the arena are copied first, from the key's record as it is now when theirs was
        replaced meanwhile: ``_body_now``). More: each body in a record of its own, written
        here unless the ring has it already (``_apart``), and only metadata in the key's
        record. A variant whose body is neither at hand nor on disk is left out, never written
        body-less.

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
        apart = len(variants) > 1
        metas: list[tuple[Entry, int, int]] = []
        parts: list[builtins.bytes] = []
        written: list[Cached] = []
        # Each variant's body record and view (a key with several variants only).
        views: list[tuple[int, memoryview | None]] | None = [] if apart else None
        wrote: list[tuple[str, int]] = []  # body records this put wrote (body id, position)
        for c in variants:
            body, state = c.body, c.state
            if apart and (body is not None or c.apart):
                kept = self._apart(key, c, wrote)
                assert views is not None
                if kept is None:
                    if state == ALL_TO_WRITE:
                        continue  # neither in memory nor on disk: left out (a miss)
                    views.append((0, None))  # on disk only (read from there)
                else:
                    pos, view, on_disk = kept
                    if state == ALL_TO_WRITE and on_disk:
                        state = ON_DISK  # (written behind since)
                    views.append((pos, view))
                metas.append((c.entry, APART, state))
                written.append(c)
                continue
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
            if views is not None:
                views.append((0, None))
            written.append(c)
        if not written:  # (each was a view of a record gone meanwhile, its variant with it)
            return False
        # (Each variant fits the ring alone, ``proxy.storage.writes.Writer.room``, and a key with
        # several keeps their bodies apart: a record the ring refuses is a key's one variant, or
        # a key and metadata past what a record holds, which can never fit.)
        meta = encode_record(metas + self._carried(expect, metas) if self._unsure and apart else metas)
        persisted = all(state == ON_DISK for _, _, state in metas)
        pos = self.arena.put(key, meta, parts, F_PERSISTED if persisted else 0, expect=expect)
        if pos <= 0 and wrote:
            self._unwrite(key, wrote)
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
        held, starts, positions = [], [], []
        # (``written`` in place of ``views`` for a key's one variant: no list built for nothing.)
        for c, (_, body_len, state), its in zip(written, metas, views or written, strict=True):
            if body_len == APART:
                assert isinstance(its, tuple)
                body_pos, body_view = its
                starts.append(-1)
                if body_view is not None:
                    held.append(Cached(c.entry, body_view, c.heads, False, body_pos, state, True, pos))
                    positions.append(body_pos)
                else:
                    held.append(Cached(c.entry, None, c.heads, False, pos, state, True, pos))
                continue
            view_of: memoryview | None = None
            if body_len >= 0:
                view_of = view[at:at + body_len]
                starts.append(at - base)
                at += body_len
            else:
                starts.append(-1)
            held.append(Cached(c.entry, view_of, c.heads, False, pos, state, False, pos))
        self._hold(key, tuple(held), pos, tuple(starts), before, tuple(positions) if positions else ())
        return True

    def _unwrite(self, key: str, wrote: list[tuple[str, int]]) -> None:
        """Drop the body records a put wrote before its key's record was refused (another
        process's record stands: ``expect``; a purge since), unless the key's record names them
        now (another put found them meanwhile). Left, no variant would ever name them: they
        took ring space and counted as entries until they aged out (a purge racing a
        promotion from disk or a fill of another variant left 2-8 in 20 s)."""
        record = self.arena.find(key)
        named = set()
        if record is not None:
            named = {e.body_id for e, _, _ in decode_record(key, record.meta) or ()}
        for body_id, pos in wrote:
            if body_id not in named:
                self.arena.delete(body_key(key, body_id), pos)

    def _apart(self, key: str, c: Cached, wrote: list[tuple[str, int]]
               ) -> tuple[int, memoryview, bool] | None:
        """The record holding ``c``'s body apart (written now when the ring has none: from its
        bytes, a view of a record still there, or the key's record as it is now, and noted in
        ``wrote``), its view, and whether the disk has it; None when the body is at hand nowhere."""
        if c.apart and c.body is not None and self._alive(c.pos):
            return c.pos, c.body if isinstance(c.body, memoryview) else memoryview(c.body), \
                self.arena.persisted(c.pos)
        found = self.find_body(key, c.entry)
        if found is None:
            body = c.body
            if isinstance(body, memoryview):
                body = self.body_bytes(c)
                if body is None:
                    body, _ = self._body_now(key, c)
            if body is None:
                return None
            # (Its key's record may have been written behind since this process read it.)
            on_disk = c.state != ALL_TO_WRITE or (c.pos != 0 and self.arena.persisted(c.pos))
            pos = self.arena.put(body_key(key, c.entry.body_id), b"", body,
                                 F_BODY | (F_PERSISTED if on_disk else 0))
            if pos <= 0:
                return None
            wrote.append((c.entry.body_id, pos))
            found = self.arena.read(pos)
            if found is None:
                return None
        view = self.arena.view[found.body_at:found.body_at + found.body_len]
        return found.pos, view, bool(found.flags & F_PERSISTED)

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

    def delete(self, key: str) -> bool:
        """Drop the key's record, and the records of its bodies kept apart (left behind, they
        would never be served: no variant names them any more; dropped, they free the ring)."""
        self._forget(key)
        record = self.arena.find(key)
        # The key's record first: a body put back from disk meanwhile (``put_body``) then finds
        # its key's record gone and drops itself, else it is found here.
        dropped = self.arena.delete(key)
        for e, body_len, _ in (decode_record(key, record.meta) or ()) if record is not None else ():
            if body_len == APART:
                self.arena.delete(body_key(key, e.body_id))
        return dropped

    def clear(self) -> int:
        self._decoded.clear()
        self._read_once.clear()
        self.decoded_bytes = 0
        return self.arena.clear()

    # -- finding keys (scans of the arena: purges and inspection) ----------------------------

    def keys_for_tag(self, tag: str) -> list[str]:
        out = []
        for r in self.arena.scan(skip=F_BODY):
            decoded = decode_record(r.key, r.meta)
            if decoded and any(tag in e.tags for e, _, _ in decoded):
                out.append(r.key)
        return out

    def keys_for_url(self, url: str, scan: bool = True) -> list[str]:
        """Every key of ``url``: the plain one and those with header or cookie parts or a
        range's parts (``find_url_keys``)."""
        return [k for k in self.find_url_keys((url,), scan) if k is not None]

    def keys_for_urls(self, urls: Iterable[str], scan: bool = True) -> set[str]:
        """``keys_for_url`` of every URL of ``urls``, with one pass over the records for all of
        them (a pass per URL made a purge of thousands of URLs cost thousands of passes)."""
        return {k for k in self.find_url_keys(urls, scan) if k is not None}

    def find_url_keys(self, urls: Iterable[str], scan: bool = True, exact: bool = False
                      ) -> Iterator[str | None]:
        """The keys of ``urls`` (every shape: header or cookie parts, a range's parts), found in
        one pass over the records: each item is a key found, or None for a record or URL looked
        at in vain, so that a caller may let the event loop run between items (a purge of 10,000
        URLs, a ring of 250,000 records: ``purging.Turns.collect``). Without ``scan`` (the disk
        tier's index knows the persisted keys), the plain keys are looked up one by one and only
        the records not yet written behind are looked through for the other shapes. ``exact``:
        the caller knows that no key of these URLs has header or cookie parts (no rule keys them
        on fields or cookies): each URL and its parts' key are looked up, and nothing more (a
        URL's lookup then costs its keys, not the ring)."""
        wanted = set(urls)
        if not wanted:
            return
        if exact:
            for url in wanted:
                yield url if self.slot(url) is not None else None
                yield part_key(url) if self.slot(part_key(url)) is not None else None
            return
        if scan:
            for r in self.arena.walk(skip=F_BODY):
                yield r.key if r is not None and (r.key in wanted or url_of_key(r.key) in wanted) else None
            return
        for url in wanted:
            yield url if self.slot(url) is not None else None
        for r in self.arena.walk(skip=F_PERSISTED | F_BODY):
            url = url_of_key(r.key) if r is not None else ""
            yield r.key if r is not None and url != r.key and url in wanted else None

    def find_hosts(self, hosts: Iterable[str], scan: bool = True) -> Iterator[str | None]:
        """Which of ``hosts`` (``name[:port]``, as keys hold them) a key of the records names:
        each host once, as found, or None for a record looked at in vain (as ``find_url_keys``).
        The pass ends once every host is found. Without ``scan``, the records not yet written
        behind only (the disk tier's index knows the others)."""
        left = set(hosts)
        if not left:
            return
        for r in self.arena.walk(skip=F_BODY if scan else F_PERSISTED | F_BODY):
            host = key_host(r.key) if r is not None else None
            if host is None or host not in left:
                yield None
                continue
            left.discard(host)
            yield host
            if not left:
                return

    def keys_with_prefixes(self, prefixes: Prefixes) -> list[str]:
        """The keys that start with any of ``prefixes``, in one pass over the records."""
        return [r.key for r in self.arena.scan(skip=F_BODY) if prefixes.matches(r.key)]


def key_host(key: str) -> str | None:
    """The ``host[:port]`` of an http(s) key (``https://a.example:8443/x`` -> ``a.example:8443``),
    None for any other (``find_hosts``)."""
    scheme, sep, rest = key.partition("://")
    host, slash, _ = rest.partition("/")
    return host if sep and slash and scheme in ("http", "https") else None


__all__ = ["ALL_TO_WRITE", "PUT_TRIES", "Cached", "Heads", "MemoryPolicy", "MemoryTier", "Slot",
           "arena_capacity", "cost", "decoded_budget", "record_of"]
