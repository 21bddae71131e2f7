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


def encode_variants(entries: tuple[Entry, ...]) -> bytes:
    return json.dumps([entry_to_json(e) for e in entries], separators=(",", ":")).encode()


def decode_variants(blob: bytes) -> tuple[Entry, ...]:
    """Decode a metadata record; a damaged record reads as empty (a miss), never as an error."""
    try:
        return tuple(entry_from_json(d) for d in json.loads(blob))
    except (ValueError, KeyError, TypeError, IndexError):
        return ()
