"""What the cache stores for one response variant, and its byte serialisation.

Metadata is stored apart from the body, so freshness checks, HEAD, purge and
inspection never read a body. Serialisation is JSON (never pickle: a cache
directory must not be able to execute code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http
import json
import marshal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from math import isfinite
from sys import intern
from typing import Any, TypeVar

from proxy.policy.messages import Freshness, StoredResponse


@dataclass(frozen=True, slots=True)
class Entry:
    key: str  # primary cache key
    url: str  # absolute URL the response was fetched for (purge by URL and prefix)
    response: StoredResponse
    body_id: str  # names the body record; a new body gets a new id
    body_size: int
    tags: tuple[str, ...] = ()
    stored_at: float = 0.0
    # The index's commit sequence number of this variant: a purge by tag, prefix or "all"
    # (a ban) hides exactly the variants committed at or before the ban's sequence number.
    seq: int = 0
    # Per-process cache of the serialised header block (not persisted, not compared).
    wire_headers: bytes | None = field(default=None, compare=False, repr=False)

    def with_response(self, response: StoredResponse) -> Entry:
        return replace(self, response=response, wire_headers=None)

    # ``replace(self, ...)`` for the two changes every fill makes (its body, then its index
    # sequence number), through the slotted twin (``_fast_new``): ``dataclasses.replace`` walks
    # the fields and sets each through ``object.__setattr__`` (≈ 30 Python-level calls a time,
    # ``scripts/bench-calls``).

    def with_body(self, body_id: str, body_size: int) -> Entry:
        return _new_entry(self.key, self.url, self.response, body_id, body_size, self.tags, self.stored_at,
                          self.seq, self.wire_headers)

    def with_seq(self, seq: int) -> Entry:
        return _new_entry(self.key, self.url, self.response, self.body_id, self.body_size, self.tags,
                          self.stored_at, seq, self.wire_headers)

    def invalidated(self) -> Entry:
        """This variant marked stale (soft purge): served only after revalidation."""
        return self.with_response(replace(self.response, invalidated=True))


def _freshness_to_json(f: Freshness) -> list[Any]:
    return [f.lifetime, f.source, f.initial_age, f.response_time, f.must_revalidate,
            f.no_cache, f.stale_while_revalidate, f.stale_if_error, f.immutable]


def _freshness_from_json(v: list[Any]) -> Freshness:
    return Freshness(float(v[0]), str(v[1]), float(v[2]), float(v[3]), bool(v[4]), bool(v[5]),
                     float(v[6]), float(v[7]), bool(v[8]))


def entry_to_json(e: Entry) -> dict[str, Any]:
    r = e.response
    return {
        "key": e.key, "url": e.url, "body_id": e.body_id, "body_size": e.body_size,
        "tags": list(e.tags), "stored_at": e.stored_at, "seq": e.seq,
        "status": r.status, "reason": r.reason, "headers": [list(h) for h in r.headers],
        "request_time": r.request_time, "response_time": r.response_time,
        "freshness": _freshness_to_json(r.freshness), "vary": [list(v) for v in r.vary],
        "etag": r.etag, "last_modified": r.last_modified, "invalidated": r.invalidated,
        "credentials": r.credentials, "authorization": r.authorization,
    }  # fmt: skip


def entry_from_json(d: dict[str, Any]) -> Entry:
    response = StoredResponse(
        status=int(d["status"]),
        reason=str(d["reason"]),
        headers=tuple((str(k), str(v)) for k, v in d["headers"]),
        request_time=float(d["request_time"]),
        response_time=float(d["response_time"]),
        freshness=_freshness_from_json(d["freshness"]),
        vary=tuple((str(k), str(v)) for k, v in d["vary"]),
        etag=d["etag"],
        last_modified=d["last_modified"],
        invalidated=bool(d["invalidated"]),
        credentials=bool(d.get("credentials", False)),
        authorization=bool(d.get("authorization", False)),
    )
    return Entry(
        key=str(d["key"]), url=str(d["url"]), response=response, body_id=str(d["body_id"]),
        body_size=int(d["body_size"]), tags=tuple(d["tags"]), stored_at=float(d["stored_at"]),
        seq=int(d.get("seq", 0)),
    )  # fmt: skip


# The stored record: one positional JSON array per variant (field names would double its
# size and its decoding time; a disk read decodes one on every memory miss).
RECORD_VERSION = 1
_RECORD_LEN = 18


def _flags(r: StoredResponse) -> bool | int:
    """The record's last response slot, in both record formats: ``invalidated`` as a bool (all
    that older records hold there: they read as filled without credentials), or, for a
    response filled with credentials, an int of bits (1: invalidated, 2: credentials, 4:
    Authorization). The common case costs no byte more; an older version reading the int sees
    a soft-purged entry (revalidated before use: safe)."""
    if not (r.credentials or r.authorization):
        return r.invalidated
    return 2 * r.credentials | 4 * r.authorization | r.invalidated


def _record(e: Entry) -> list[Any]:
    r = e.response
    return [RECORD_VERSION, e.key, e.url, e.body_id, e.body_size, list(e.tags), e.stored_at, e.seq,
            r.status, r.reason, [x for h in r.headers for x in h], r.request_time, r.response_time,
            _freshness_to_json(r.freshness), [x for v in r.vary for x in v], r.etag,
            r.last_modified, _flags(r)]


# Field names and short values read back from disk, one str object each (100k entries
# otherwise hold 100k copies of "Content-Type", "public, max-age=86400", ...).
_SHARED: dict[str, str] = {}
SHARED_LIMIT = 20_000


def shared_str(text: str) -> str:
    """``text`` as the one object all decoded records use for it (short strings only)."""
    if len(text) > 128:
        return text
    found = _SHARED.get(text)
    if found is None:
        if len(_SHARED) >= SHARED_LIMIT:
            _SHARED.clear()
        found = _SHARED[text] = text
    return found


def _from_record(v: list[Any]) -> Entry:
    if len(v) != _RECORD_LEN or v[0] != RECORD_VERSION:
        raise ValueError("unknown record version")
    h, vary, f, flags = v[10], v[14], v[13], v[17]
    h = [shared_str(x) for x in h]
    times = (float(v[6]), float(v[11]), float(v[12]), float(f[0]), float(f[2]), float(f[3]),
             float(f[6]), float(f[7]))
    _check(times, v[15], v[16], vary)
    # Through the slotted twins (``_fast_new``), as ``decode_record`` does: every disk hit
    # decodes its record here.
    response = _new_response(
        int(v[8]), shared_str(str(v[9])), tuple(zip(h[::2], h[1::2], strict=True)), times[1], times[2],
        _new_freshness(times[3], str(f[1]), times[4], times[5], bool(f[4]), bool(f[5]), times[6],
                       times[7], bool(f[8])),
        tuple(zip(vary[::2], vary[1::2], strict=True)), v[15], v[16], flags & 1 == 1, flags & 2 == 2,
        flags & 4 == 4)
    key, url = str(v[1]), str(v[2])
    return _new_entry(key, key if url == key else url, response, str(v[3]), int(v[4]), tuple(v[5]),
                      times[0], int(v[7]))


def _check(times: tuple[float, ...], etag: Any, last_modified: Any, vary: list[Any]) -> None:
    """ValueError for what cachegate never writes and Python's JSON reads all the same: a time
    that is no finite number (``Infinity``, ``NaN``, ``1e999``: an age, a lifetime or a
    header's value computed from it fails or lies), a validator or Vary pair that is not text.
    One sum: a few hundred nanoseconds on a record's decoding."""
    if not isfinite(sum(times)):
        raise ValueError("a time that is not a finite number")
    if not ((etag is None or type(etag) is str) and (last_modified is None or type(last_modified) is str)
            and all(type(x) is str for x in vary)):
        raise ValueError("a validator or a Vary field that is not text")


def _from_dict(d: dict[str, Any]) -> Entry:
    """A record of the older, named format (``entry_from_json``), checked as ``_from_record``."""
    e = entry_from_json(d)
    r, f = e.response, e.response.freshness
    _check((e.stored_at, r.request_time, r.response_time, f.lifetime, f.initial_age, f.response_time,
            f.stale_while_revalidate, f.stale_if_error), r.etag, r.last_modified,
           [x for pair in r.vary for x in pair])
    return e


def encode_variants(entries: tuple[Entry, ...]) -> bytes:
    return json.dumps([_record(e) for e in entries], separators=(",", ":")).encode()


# What decoding a record raises when it holds what cachegate never writes: a damaged file, or
# a value another program left in the shared tier (``int(Infinity)``: OverflowError; JSON nested
# too deep: RecursionError).
UNREADABLE_RECORD = (ValueError, KeyError, TypeError, IndexError, AttributeError, ArithmeticError,
                     RecursionError)


def decode_variants(blob: bytes) -> tuple[Entry, ...]:
    """Decode a metadata record; a damaged record reads as empty (a miss), never as an error."""
    try:
        return tuple(_from_record(v) if isinstance(v, list) else _from_dict(v)
                     for v in json.loads(blob.decode()))
    except UNREADABLE_RECORD:
        return ()


def body_refs(blob: bytes) -> list[tuple[str, int]]:
    """The body ids and sizes a metadata record names, without decoding its entries (disk
    eviction reads thousands of records a second); a damaged record names none."""
    return refs_and_seq(blob)[0]


def refs_and_seq(blob: bytes) -> tuple[list[tuple[str, int]], int]:
    """``body_refs``, and the highest commit sequence number of the record's variants (0: none
    noted, or a damaged record): what an eviction tells the index (``UrlTagIndex.remove_stale``).

    >>> e = Entry("k", "k", StoredResponse(200, "OK", (), 0, 0, Freshness(0, "none", 0, 0)), "b1", 5, seq=7)
    >>> refs_and_seq(encode_variants((e, e.with_body("b2", 2).with_seq(3))))
    ([('b1', 5), ('b2', 2)], 7)
    """
    try:
        records = json.loads(blob.decode())
        refs = [(str(v[3]), int(v[4])) if isinstance(v, list) else (str(v["body_id"]), int(v["body_size"]))
                for v in records]
    except UNREADABLE_RECORD:
        return [], 0
    top = 0
    for v in records:  # (a number it cannot read leaves the others', and the bodies, as they are)
        with contextlib.suppress(*UNREADABLE_RECORD):
            top = max(top, int(v[7] if isinstance(v, list) else v.get("seq", 0)))
    return refs, top


# -- the arena's records ----------------------------------------------------------------------
# One record per key in the shared memory (proxy.storage.arena): every variant's metadata in a
# ``marshal``-ed tuple, their bodies after it. marshal, not JSON: it decodes ≈ 4x faster, and
# the arena is memory our own processes wrote (CRC-checked before decoding), never a file a
# stranger could hand us; the disk tier stays JSON.
ARENA_VERSION = 1

# Where a variant stands against the disk tier (write-behind: proxy.storage.persist).
ON_DISK = 0  # the disk tier has it as it is
META_TO_WRITE = 1  # its body is on disk, its metadata changed (a revalidation)
ALL_TO_WRITE = 2  # neither is on disk yet (a fill)

# ``encode_record``'s body length of a variant whose body is in a record of its own (a key with
# more than one variant: ``proxy.storage.memory``), found under ``body_key``.
APART = -2
# Between a key and a body id in ``body_key``: no cache key holds a NUL (a URL's is
# percent-encoded, and HTTP parsers refuse one in a header's value).
BODY_SEP = "\x00"


def body_key(key: str, body_id: str) -> str:
    """The arena key of the record holding the body ``body_id`` of a variant of ``key``. The
    body id is new for every body, so such a record never stands for another body (one left
    behind by a purge or a refill is never found by a variant that does not name it)."""
    return key + BODY_SEP + body_id


# Common field names, as one character in a record (``\x01``...): a record holds a 1 KiB
# response in ≈ 1.4 KiB, and these names were 50 of its bytes.
_NAMES = ("Date", "Content-Type", "Content-Length", "Cache-Control", "Server", "Last-Modified", "ETag",
          "Expires", "Vary", "Content-Encoding", "Age", "Via", "Accept-Ranges", "Connection",
          "Surrogate-Key", "Cache-Tag", "X-Cache", "Content-Language", "Access-Control-Allow-Origin",
          "Strict-Transport-Security", "X-Content-Type-Options", "Link", "Location", "Set-Cookie",
          "Content-Location", "Content-Disposition", "Transfer-Encoding", "Keep-Alive", "Pragma")
_NAME_CODE = {n: chr(i + 1) for i, n in enumerate(_NAMES)}
_NAME_OF = {chr(i + 1): n for i, n in enumerate(_NAMES)}


def encode_record(variants: list[tuple[Entry, int, int]]) -> bytes:
    """The metadata of a key's variants for an arena record: (entry, length of its body in the
    record, -1 when the record holds none, or ``APART`` when a record of its own may, disk
    state) each. Times equal to the response
    time, and a reason that is the status's usual phrase, are left out (None)."""
    out = []
    for e, body_len, state in variants:
        r = e.response
        f = r.freshness
        at = r.response_time
        # One comprehension, ``_plain`` inline: two appends and a call or two per field were
        # most of this function's Python-level calls on every fill (``scripts/bench-calls``).
        # (Tags and Vary values without a generator each: most fills have neither.)
        fields = [x for k, v in r.headers
                  for x in (_NAME_CODE.get(k) or (k if type(k) is str else str(k)),
                            v if type(v) is str else str(v))]
        out.append((
            "" if e.url == e.key else str(e.url), e.body_id, e.body_size, body_len,
            tuple(map(_plain, e.tags)), None if e.stored_at == at else e.stored_at, e.seq,
            r.status, None if r.reason == _phrase(r.status) else str(r.reason), tuple(fields),
            None if r.request_time == at else r.request_time, at,
            (f.lifetime, f.source, f.initial_age, None if f.response_time == at else f.response_time,
             f.must_revalidate, f.no_cache, f.stale_while_revalidate, f.stale_if_error, f.immutable),
            tuple(_plain(x) for v in r.vary for x in v) if r.vary else (), r.etag and str(r.etag),
            r.last_modified and str(r.last_modified), _flags(r), state))
    return marshal.dumps((ARENA_VERSION, tuple(out)))


_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}
_T = TypeVar("_T")


def _fast_new(cls: type[_T]) -> Callable[..., _T]:
    """A constructor of the frozen dataclass ``cls`` (fields given positionally) that builds an
    instance of a plain slotted twin with the same fields, then makes it a ``cls``.

    Why: a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``;
    decoding a record builds three of them per variant, and that was most of the 7.3 µs
    ``decode_record`` took (``timeit``: 1.0–1.2 µs each, 0.3 through the twin; 5.0 µs in all
    after), on every hit on a key a worker has not kept decoded. CPython allows setting
    ``__class__`` between classes of the same slots (and raises TypeError otherwise, so a
    change to ``cls`` that the twin does not follow fails at once, not silently); the object is
    then a ``cls`` in every way (its equality, hash, frozenness). tests/storage/test_entry.py
    checks it."""
    spec: list[Any] = [(f.name, Any) if f.default is dataclasses.MISSING
                       else (f.name, Any, dataclasses.field(default=f.default))
                       for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    twin = dataclasses.make_dataclass(f"{cls.__name__}Twin", spec, slots=True, eq=False, repr=False)

    def new(*args: Any) -> _T:
        obj = twin(*args)
        obj.__class__ = cls
        return obj  # type: ignore[no-any-return]

    return new


_new_freshness = _fast_new(Freshness)
_new_response = _fast_new(StoredResponse)
_new_entry = _fast_new(Entry)


def _phrase(status: int) -> str | None:
    return _PHRASES.get(status)


def decode_record(key: str, meta: bytes) -> list[tuple[Entry, int, int]] | None:
    """``encode_record`` undone: (entry, body length in the record or -1, disk state) per
    variant; None when the record is not one this version wrote."""
    try:
        version, variants = marshal.loads(meta)
    except (EOFError, ValueError, TypeError):
        return None
    if version != ARENA_VERSION:
        return None
    out = []
    names = _NAME_OF
    for (url, body_id, body_size, body_len, tags, stored_at, seq, status, reason, fields, request_time,
         at, f, vary, etag, last_modified, flags, state) in variants:
        # Field names and short values as one str object each in the process (sys.intern: in C,
        # and freed once nothing uses them).
        h = [intern(x) if len(x) <= 64 else x for x in fields]
        response = _new_response(
            status, (_PHRASES.get(status) or "") if reason is None else intern(reason),
            tuple(zip([names.get(k) or k for k in h[::2]], h[1::2], strict=True)),
            at if request_time is None else request_time, at,
            _new_freshness(f[0], intern(f[1]), f[2], at if f[3] is None else f[3], *f[4:]),
            tuple(zip(vary[::2], vary[1::2], strict=True)), etag, last_modified, flags & 1 == 1,
            flags & 2 == 2, flags & 4 == 4)
        out.append((_new_entry(key, url or key, response, body_id, body_size, tags,
                               at if stored_at is None else stored_at, seq), body_len, state))
    return out


_TAGS = 4  # where a variant's tags are in ``encode_record``'s tuple


def record_tags(meta: bytes) -> list[tuple[str, ...]] | None:
    """Each variant's tags in an arena record, without building its entries: a purge by tag
    reads every record of the shared memory (``timeit``: 1.6 µs a record, against 14 µs for
    ``decode_record``). None when the record is not one this version wrote."""
    try:
        version, variants = marshal.loads(meta)
        if version != ARENA_VERSION:
            return None
        return [v[_TAGS] for v in variants]
    except (EOFError, ValueError, TypeError, IndexError):
        return None


def _plain(x: str) -> str:
    """marshal takes ``str`` only, not its subclasses (multidict's ``istr`` field names)."""
    return x if type(x) is str else str(x)


