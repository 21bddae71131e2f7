"""What the cache stores for one response variant, and its byte serialisation.

Metadata is stored apart from the body, so freshness checks, HEAD, purge and
inspection never read a body. Serialisation is JSON (never pickle: a cache
directory must not be able to execute code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

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


def _record(e: Entry) -> list[Any]:
    r = e.response
    return [RECORD_VERSION, e.key, e.url, e.body_id, e.body_size, list(e.tags), e.stored_at, e.seq,
            r.status, r.reason, [x for h in r.headers for x in h], r.request_time, r.response_time,
            _freshness_to_json(r.freshness), [x for v in r.vary for x in v], r.etag,
            r.last_modified, r.invalidated]


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
    h, vary, f = v[10], v[14], v[13]
    h = [shared_str(x) for x in h]
    response = StoredResponse(
        int(v[8]), shared_str(str(v[9])), tuple(zip(h[::2], h[1::2], strict=True)), float(v[11]),
        float(v[12]),
        Freshness(float(f[0]), str(f[1]), float(f[2]), float(f[3]), bool(f[4]), bool(f[5]),
                  float(f[6]), float(f[7]), bool(f[8])),
        tuple(zip(vary[::2], vary[1::2], strict=True)), v[15], v[16], bool(v[17]))
    key, url = str(v[1]), str(v[2])
    return Entry(key, key if url == key else url, response, str(v[3]), int(v[4]), tuple(v[5]),
                 float(v[6]), int(v[7]))


def encode_variants(entries: tuple[Entry, ...]) -> bytes:
    return json.dumps([_record(e) for e in entries], separators=(",", ":")).encode()


def decode_variants(blob: bytes) -> tuple[Entry, ...]:
    """Decode a metadata record; a damaged record reads as empty (a miss), never as an error."""
    try:
        return tuple(_from_record(v) if isinstance(v, list) else entry_from_json(v)
                     for v in json.loads(blob.decode()))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return ()
