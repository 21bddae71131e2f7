"""Answering ``Range`` requests from a stored full response (RFC 9110 §14).

Single byte ranges are served as 206 from a stored 200; multiple ranges and
anything unparsable fall back to the full 200 (allowed: a server may ignore
Range). ``If-Range`` must match the stored strong ETag or Last-Modified date.

Parsing (RFC 9110 §14.1.1): the unit is case-insensitive; the range set is a list,
so empty members and whitespace around members are ignored; positions are ASCII
digits (any length); a Range field sent on several lines is ignored.

>>> parse_range("bytes=0-99", 1000), parse_range("bytes=-100", 1000), parse_range("bytes=900-", 1000)
((0, 99), (900, 999), (900, 999))
>>> parse_range("bytes=1000-", 1000)
'unsatisfiable'
>>> parse_range("bytes=0-1,5-6", 1000) is None
True
>>> parse_range("Bytes= 0-1 , ", 1000)
(0, 1)
"""

from __future__ import annotations

from typing import Literal

from proxy.policy.fields import digits, split_list
from proxy.policy.httpdate import parse_http_date
from proxy.policy.messages import Headers, StoredResponse

Unsatisfiable = Literal["unsatisfiable"]
# A byte range as the client asked for it, before the size is known: (first, last) with
# last None for "to the end", or (None, n) for the last n bytes.
RangeSpec = tuple[int, int | None] | tuple[None, int]


def parse_range_spec(value: str) -> RangeSpec | None:
    """The one byte range a Range value asks for; None to ignore the field (another unit,
    several ranges, or not the grammar)."""
    unit, eq, range_set = value.partition("=")
    if not eq or unit.strip(" \t").lower() != "bytes":
        return None
    members = split_list((range_set,))
    if len(members) != 1:
        return None
    first_text, dash, last_text = members[0].partition("-")
    if not dash:
        return None
    first_text, last_text = first_text.strip(" \t"), last_text.strip(" \t")
    if first_text == "":
        suffix = digits(last_text)
        return None if suffix is None else (None, suffix)
    first = digits(first_text)
    if first is None:
        return None
    if last_text == "":
        return first, None
    last = digits(last_text)
    if last is None or last < first:
        return None
    return first, last


def resolve_range(spec: RangeSpec, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """The inclusive (first, last) bytes of a ``size``-byte representation that ``spec`` selects;
    None to ignore the Range: a suffix range on an empty representation is satisfiable (RFC 9110
    §14.1.1: the only form that is) but selects no byte, which no ``Content-Range`` can state,
    so the whole (empty) 200 answers it, as nginx does.

    >>> resolve_range((None, 5), 0), resolve_range((None, 0), 0), resolve_range((0, None), 0)
    (None, 'unsatisfiable', 'unsatisfiable')
    """
    first, last = spec
    if first is None:
        assert last is not None
        if last == 0:
            return "unsatisfiable"
        if size <= 0:
            return None
        return max(0, size - last), size - 1
    if first >= size:
        return "unsatisfiable"
    return first, size - 1 if last is None else min(last, size - 1)


def parse_range(value: str, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """An inclusive (first, last) byte range; "unsatisfiable"; or None to ignore the header.

    >>> parse_range("bytes=-5", 0) is None, parse_range("bytes=0-", 0)
    (True, 'unsatisfiable')
    """
    spec = parse_range_spec(value)
    return None if spec is None else resolve_range(spec, size)


def request_range(request_headers: Headers) -> RangeSpec | None:
    """The request's one byte range; None when it has none we answer (absent, several lines,
    several ranges, another unit or malformed: the full representation is the answer)."""
    values = request_headers.getall("Range", ())
    return parse_range_spec(values[0]) if len(values) == 1 else None


def if_range_allows(request_headers: Headers, stored: StoredResponse) -> bool:
    """True when there is no If-Range, or it matches the stored validator strongly (RFC 9110 §13.1.5).

    An entity-tag matches only a strong stored ETag, character for character; a date
    matches only a stored Last-Modified of the same instant that is strong, i.e. at
    least a second older than the response's Date (RFC 9110 §8.8.2.2). Anything else,
    several If-Range lines included, sends the whole representation.
    """
    values = request_headers.getall("If-Range", ())
    if not values:
        return True
    if len(values) > 1:
        return False
    value = values[0].strip(" \t")
    if value.startswith(('"', "W/")):
        return not value.startswith("W/") and stored.etag is not None and stored.etag.strip() == value
    since = parse_http_date(value)
    modified = parse_http_date(stored.last_modified) if stored.last_modified is not None else None
    if since is None or modified is None or since != modified:
        return False
    date = next((v for k, v in stored.headers if k.lower() == "date"), None)
    reference = parse_http_date(date) if date is not None else None
    return (reference if reference is not None else stored.response_time) >= modified + 1
