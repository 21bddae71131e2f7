"""Answering ``Range`` requests from a stored full response (RFC 9110 §14).

Single byte ranges are served as 206 from a stored 200; multiple ranges and
anything unparsable fall back to the full 200 (allowed: a server may ignore
Range). ``If-Range`` must match the stored strong ETag or Last-Modified date.

>>> parse_range("bytes=0-99", 1000), parse_range("bytes=-100", 1000), parse_range("bytes=900-", 1000)
((0, 99), (900, 999), (900, 999))
>>> parse_range("bytes=1000-", 1000)
'unsatisfiable'
>>> parse_range("bytes=0-1,5-6", 1000) is None
True
"""

from __future__ import annotations

from typing import Literal

from proxy.policy.messages import Headers, StoredResponse

Unsatisfiable = Literal["unsatisfiable"]


def parse_range(value: str, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """An inclusive (first, last) byte range; "unsatisfiable"; or None to ignore the header."""
    unit, eq, spec = value.strip().partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    first_text, last_text = first_text.strip(), last_text.strip()
    if first_text == "":
        if not last_text.isdigit():
            return None
        suffix = int(last_text)
        if suffix == 0:
            return "unsatisfiable"
        return (max(0, size - suffix), size - 1) if size > 0 else "unsatisfiable"
    if not first_text.isdigit() or (last_text and not last_text.isdigit()):
        return None
    first = int(first_text)
    if first >= size:
        return "unsatisfiable"
    last = int(last_text) if last_text else size - 1
    if last < first:
        return None
    return first, min(last, size - 1)


def if_range_allows(request_headers: Headers, stored: StoredResponse) -> bool:
    """True when there is no If-Range, or it matches the stored validator strongly."""
    value = request_headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return not value.startswith("W/") and stored.etag is not None and stored.etag == value \
            and not stored.etag.startswith("W/")
    return stored.last_modified is not None and stored.last_modified.strip() == value
