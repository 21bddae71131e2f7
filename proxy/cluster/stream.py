"""The purge stream's bookkeeping, pure: entries, where a node resumes, and cheap catch-up.

No Redis and no clock here; ``proxy.cluster.node`` does the I/O and asks these
functions what to do.

- An entry is one purge (or unsafe-method invalidation) as XADDed by the node
  that received it: its origin node, a gap-free sequence number (``INCR`` in the
  same script as the ``XADD``: stream ids alone cannot tell whether an entry was
  trimmed away between two others) and the ``PurgeSpec``.
- ``plan_resume`` decides where a node (re)starts reading: from its saved id, or
  after purging its whole local cache when it cannot know what it missed (the
  entries after its id were trimmed, or Redis lost its data: a new *epoch*).
- ``check_epoch`` decides what a connected node does when Redis lost its data under it
  (``FLUSHALL``): the entries it reads are then the new stream's, and it catches up with that
  from its start, as a reconnection would, before it applies them.
- ``merge_specs`` turns a backlog into at most two purges (hard, then soft), so
  catching up on 1,000 purges costs two local purges, not 1,000: tags, prefixes
  and "all" are bans in the local store (``proxy.storage.bans``) and URLs one
  lookup each, and a hard "all" makes everything before it moot.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.purge import PurgeOutcome, PurgeSpec

START = "0-0"  # the id before every stream entry


@dataclass(frozen=True, slots=True)
class StreamEntry:
    id: str  # the Redis stream id ("1700000000000-0")
    seq: int  # gap-free: the previous purge of the stream is seq - 1
    node: str  # the node that received the purge
    spec: PurgeSpec


def entry_fields(node: str, spec: PurgeSpec) -> dict[str, str]:
    """The fields XADDed for a purge (``seq`` is added by the script that appends it)."""
    return {"node": node, "spec": json.dumps(spec.to_json(), separators=(",", ":"))}


def entry_seq(fields: Mapping[str, str]) -> int | None:
    """An entry's sequence number, read apart from the rest of it (None: unreadable). A damaged
    entry whose number is readable took that number all the same: skipping it leaves no gap.

    >>> entry_seq({"seq": "4", "spec": "{not json"}), entry_seq({"spec": "{}"}), entry_seq({"seq": "x"})
    (4, None, None)
    """
    try:
        return int(fields["seq"])
    except (KeyError, ValueError, TypeError):
        return None


def decode_entry(entry_id: str, fields: Mapping[str, str]) -> StreamEntry | None:
    """An entry as read back; None when it is damaged (it is then skipped and counted): whatever
    another program XADDed, a field that is not UTF-8 (read with ``surrogateescape``:
    ``proxy.cluster.redis_io.client``), JSON too deep for the parser, a purge of the wrong types.

    >>> e = decode_entry("5-0", {"seq": "3", **entry_fields("a", PurgeSpec(tags=("t",)))})
    >>> (e.seq, e.node, e.spec.tags) if e else None
    (3, 'a', ('t',))
    >>> [decode_entry("5-0", {"seq": "3", "node": "a", "spec": s}) for s in ('{"urls":[1]}',
    ...  '{"all":"false"}', '{"tags":"t"}', "[" * 100_000)]
    [None, None, None, None]
    >>> decode_entry("5-0", {"seq": "x"}) is None
    True
    """
    try:
        if any(not_utf8(v) for v in fields.values()):
            return None
        spec = PurgeSpec.from_json(json.loads(fields["spec"]))
        return StreamEntry(entry_id, int(fields["seq"]), str(fields["node"]), spec)
    except Exception:  # whatever a hostile entry raises: it is one entry, never the session's end
        return None


ApplyFailure = Literal["damaged", "retry"]

# What an entry's own content raises in the local store: it fails the same way each time.
_CONTENT_ERRORS = (TypeError, ValueError, LookupError, AttributeError, RecursionError,
                   sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                   sqlite3.NotSupportedError)
# SQLITE_ERROR messages that a purge's size or shape causes (its statement), not the moment.
_CONTENT_SQL = re.compile(r"too many (SQL variables|terms)|too (large|big)", re.I)


def apply_failure(exc: BaseException) -> ApplyFailure:
    """What a failure to apply an entry that was read means: ``damaged``, its content can never
    be applied here (skipped, counted, its position saved), or ``retry``, this node cannot apply
    it now (its index locked or busy, a full or failing disk, a worker that did not answer): the
    session ends with the position before it, and the next one applies it. Unknown failures are
    retried: a skipped purge serves what it removed for ever; a retried one costs a reconnection.

    >>> apply_failure(TypeError("unhashable type: 'dict'"))
    'damaged'
    >>> apply_failure(sqlite3.OperationalError("database is locked"))
    'retry'
    """
    if isinstance(exc, sqlite3.OperationalError):
        return "damaged" if _CONTENT_SQL.search(str(exc)) else "retry"
    if isinstance(exc, sqlite3.ProgrammingError):  # a closed connection (stopping) is no content
        return "retry" if "closed" in str(exc) else "damaged"
    # (UnicodeError is a ValueError: content; OSError, a timeout, a worker's error: retried)
    return "damaged" if isinstance(exc, _CONTENT_ERRORS) else "retry"


def not_utf8(text: object) -> bool:
    """Whether ``text``, read from Redis with ``surrogateescape``, held bytes that are not UTF-8."""
    return isinstance(text, str) and _SURROGATE.search(text) is not None


_SURROGATE = re.compile("[\udc80-\udcff]")


def trusted(seq: int | None, counter: int) -> bool:
    """Whether an entry's sequence number can be believed: not ahead of the stream's counter
    (``NS:purges:seq``), which the script that appends an entry increments in the same step.
    One ahead of it is no node's: believed, it became this node's applied number, every lag
    read 0, and the next start found the counter behind it and purged the whole local cache
    ("Redis lost data"); as the first entry read, it was a gap (the same).

    >>> trusted(5, 7), trusted(None, 7), trusted(999_999, 7)
    (True, True, False)
    """
    return seq is None or seq <= counter


def first_trusted(seqs: Iterable[int | None], counter: int) -> int | None:
    """The first readable, trusted sequence number of ``seqs`` (None: none), for ``plan_resume``.

    >>> first_trusted([None, 999_999, 8, 9], 9), first_trusted([999_999], 9)
    (8, None)
    """
    return next((s for s in seqs if s is not None and trusted(s, counter)), None)


@dataclass(frozen=True, slots=True)
class Saved:
    """What a node last applied, kept in its cache directory (survives its restarts)."""

    epoch: str
    seq: int
    id: str

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seq": self.seq, "id": self.id}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Saved:
        return cls(str(d["epoch"]), int(d["seq"]), str(d["id"]))


@dataclass(frozen=True, slots=True)
class Resume:
    """Read the entries after ``after`` and apply them."""

    after: str


@dataclass(frozen=True, slots=True)
class Flush:
    """This node cannot know what it missed: purge its whole local cache, then go on
    after ``after`` (the stream's end: what came before is moot once everything is gone)."""

    after: str
    reason: str  # "trimmed", "redis-lost-data" or "no-state", for the log and the metric


@dataclass(frozen=True, slots=True)
class Tip:
    """The stream as Redis has it now."""

    epoch: str
    seq: int  # the last purge's sequence number (0: none yet)
    last_id: str  # the last entry's id (START: none)


def plan_resume(saved: Saved | None, tip: Tip, next_seq: int | None, *, keep_unknown: bool = False,
                holds_entries: bool = False) -> Resume | Flush:
    """Where a node starts reading, given what it last applied (``saved``), the stream's
    tip, and the seq of the first entry still in the stream after ``saved.id`` (None: none).

    ``keep_unknown``: the node has been running all along and had applied everything it
    had seen when Redis went away, so a new epoch (Redis restarted empty) costs it nothing:
    what the old epoch held after its last read was lost with Redis, for every node alike.
    ``holds_entries``: its local cache is not empty. Without a record of what it applied
    (a cache directory from before cluster mode, its record deleted or unreadable), what
    it holds may have been purged anywhere meanwhile.

    >>> tip = Tip("e1", 10, "9-0")
    >>> plan_resume(None, tip, None)          # joining: from now on
    Resume(after='9-0')
    >>> plan_resume(None, tip, None, holds_entries=True)   # a cache, and no record of its purges
    Flush(after='9-0', reason='no-state')
    >>> plan_resume(Saved("e1", 7, "6-0"), tip, 8)
    Resume(after='6-0')
    >>> plan_resume(Saved("e1", 7, "6-0"), tip, 9)   # seq 8 was trimmed away
    Flush(after='9-0', reason='trimmed')
    >>> plan_resume(Saved("e0", 7, "6-0"), tip, None)
    Flush(after='9-0', reason='redis-lost-data')
    """
    if saved is None:
        return Flush(tip.last_id, "no-state") if holds_entries else Resume(tip.last_id)
    if saved.epoch != tip.epoch:
        return Resume(START) if keep_unknown else Flush(tip.last_id, "redis-lost-data")
    if tip.seq < saved.seq:
        return Flush(tip.last_id, "redis-lost-data")  # the same epoch cannot go backwards
    if tip.seq == saved.seq:
        return Resume(saved.id)
    if next_seq is None or next_seq > saved.seq + 1:
        return Flush(tip.last_id, "trimmed")
    return Resume(saved.id)


@dataclass(frozen=True, slots=True)
class Recatch:
    """Redis lost its data under a connected node: catch up again as a reconnection does
    (``plan_resume`` with this ``keep_unknown``), before applying what was just read."""

    keep_unknown: bool


def check_epoch(saved: Saved, epoch: str | None, *, at_tip: bool) -> Recatch | None:
    """What a node does with entries it just read after ``saved.id``, given the stream's epoch as
    read right after them (None: no epoch, Redis emptied and nothing appended yet): apply them
    (None), or catch up again (``Recatch``) when Redis lost its data meanwhile (``FLUSHALL``, or a
    restart the connections did not notice). Read from the new stream after the old stream's id,
    its entries were applied as the old epoch's, and at the next reconnection the new epoch made
    the node read the new stream from its start and apply every purge of it again (a purge
    "all" of long ago wiped everything cached since, on every node at once).

    ``at_tip``: its previous read had read everything there was (not a full batch), so, as for a
    reconnection (``caught_up_when_lost``), what the old stream held past it was lost for every
    node alike: it reads the new stream from its start and keeps its cache. The entries just read
    are not applied: they are the new stream's first ones (read again from its start), or, had
    Redis lost its data between the read and this check, the lost stream's, which no node could
    have acknowledged for this one (no purge of them answered 200).

    >>> check_epoch(Saved("e1", 7, "6-0"), "e1", at_tip=True) is None
    True
    >>> s = Saved("e1", 7, "6-0")
    >>> check_epoch(s, "e2", at_tip=True), check_epoch(s, None, at_tip=False)
    (Recatch(keep_unknown=True), Recatch(keep_unknown=False))
    """
    return None if epoch == saved.epoch else Recatch(keep_unknown=at_tip)


def lost_data(saved: Saved | None, tip: Tip) -> bool:
    """Whether Redis lost data since this node last read it: a new epoch (it restarted empty) or
    a sequence number gone backwards in the same epoch (restored from an older snapshot).

    >>> lost_data(Saved("e1", 7, "6-0"), Tip("e1", 5, "4-0"))  # an older snapshot
    True
    >>> lost_data(Saved("e0", 7, "6-0"), Tip("e1", 9, "9-0"))  # restarted empty
    True
    >>> lost_data(Saved("e1", 7, "6-0"), Tip("e1", 9, "9-0")), lost_data(None, Tip("e1", 9, "9-0"))
    (False, False)
    """
    return saved is not None and (saved.epoch != tip.epoch or tip.seq < saved.seq)


def lost_own(appended: tuple[str, int] | None, tip: Tip) -> bool:
    """Whether Redis lost an entry this node appended itself (``appended``: its epoch and seq,
    the last one it appended): the same epoch, the counter now below it (restored from a
    snapshot older than the append). ``lost_data`` compares what the node *read* back from the
    stream: Redis killed between a purge's append (answered 200) and the follower's read of it,
    then restored from a snapshot of before it, looked intact, and its shared tier served what
    that purge removed.

    >>> lost_own(("e1", 8), Tip("e1", 7, "6-0")), lost_own(("e1", 8), Tip("e1", 8, "8-0"))
    (True, False)
    >>> lost_own(("e0", 8), Tip("e1", 2, "1-0")), lost_own(None, Tip("e1", 0, "0-0"))
    (False, False)
    """
    return appended is not None and appended[0] == tip.epoch and tip.seq < appended[1]


def caught_up_when_lost(state: str, tip_read: bool, saved: Saved | None, tip_seq: int,
                        before: bool) -> bool:
    """Whether a node that just lost Redis had applied every purge it knew of (``keep_unknown``
    for ``plan_resume`` if Redis comes back empty).

    ``state`` is the node's state when the session failed, ``tip_read`` whether that session
    read the stream's tip (``tip_seq``), ``before`` the answer the last failed session gave.
    A session that fails before it learns the tip learns nothing, so the last answer stands.
    A node killed while catching up that had applied up to the tip is as caught up as a ready
    one: without this it purged its whole cache when Redis died during a reconnect.

    >>> caught_up_when_lost("ready", True, Saved("e1", 7, "6-0"), 7, False)
    True
    >>> caught_up_when_lost("catching-up", True, Saved("e1", 5, "4-0"), 7, True)   # half way
    False
    >>> caught_up_when_lost("catching-up", False, Saved("e1", 5, "4-0"), 7, True)  # tip not read
    True
    """
    if state == "ready" or (state == "catching-up" and tip_read):
        return saved is not None and saved.seq >= tip_seq
    return before


def merge_specs(specs: Iterable[PurgeSpec]) -> list[PurgeSpec]:
    """A backlog of purges as at most two: every hard one together, then every soft one.

    The order within a backlog does not matter for what ends up served: a hard purge
    removes, a soft one marks stale, and either after the other leaves the entry removed
    or stale exactly as the two merged purges do. A hard "all" supersedes what came
    before it.

    >>> merged = merge_specs([PurgeSpec(tags=("a",)), PurgeSpec(urls=("http://h/x",), soft=True),
    ...                       PurgeSpec(all=True), PurgeSpec(tags=("b",)), PurgeSpec(tags=("b",))])
    >>> [(s.all, s.tags, s.urls, s.soft) for s in merged]
    [(True, ('b',), (), False)]
    """
    items = list(specs)
    for i in range(len(items) - 1, -1, -1):
        if items[i].all and not items[i].soft:
            items = items[i:]
            break
    out: list[PurgeSpec] = []
    for soft in (False, True):
        group = [s for s in items if s.soft == soft]
        if not group:
            continue
        out.append(PurgeSpec(
            urls=_union(s.urls for s in group), prefixes=_union(s.prefixes for s in group),
            tags=_union(s.tags for s in group), all=any(s.all for s in group), soft=soft,
            keys=_union(s.keys for s in group), invalidation=all(s.invalidation for s in group)))
    return out


def _union(parts: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x for p in parts for x in p))


def outcome(live: Iterable[str], acks: Mapping[str, int]) -> PurgeOutcome:
    """The answer to a purge: every acknowledging node's count, and the live nodes that did
    not acknowledge (a node that acknowledged without being seen alive still counts).

    >>> outcome(["a", "b", "c"], {"a": 3, "b": 2}).to_json()
    {'purged': 5, 'nodes': {'a': {'purged': 3}, 'b': {'purged': 2}}, 'missing': ['c']}
    """
    missing = tuple(sorted(n for n in set(live) if n not in acks))
    return PurgeOutcome(sum(acks.values()), dict(acks), missing)
