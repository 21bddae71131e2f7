"""The head of a reply from a stored response: 200, 304, 206 or 416 (RFC 9110 §13-15, RFC 9111 §4).

``served_headers`` is what a stored response's fields become on the way out (the same
for the general path and the fast hit path); ``reply_head`` decides, from the
client's request, which reply those fields head:

- ``PreconditionFailed``: the client's If-Match or If-Unmodified-Since is false for the
  stored response (RFC 9110 §13.1.1, §13.1.4: 412, before anything else is considered);
- ``NotModified``: the client's own conditional matched (RFC 9110 §15.4.5: a 304
  carries only the fields a 200 would have that describe the representation);
- ``Unsatisfiable``: a Range outside a stored 200 (416 with ``Content-Range: bytes */size``);
- ``Send``: the stored body, whole (its own status) or one range of it (206, RFC 9110
  §14.2); a stored part (RFC 9111 §3.3) only for a range it holds whole;
- ``None``: the stored response cannot answer this request (a part asked for another
  range, or by a HEAD): the engine fetches instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.policy.messages import RequestHead, StoredResponse
from proxy.policy.partial import answerable, part_range
from proxy.policy.ranges import if_range_allows, request_range, resolve_range
from proxy.policy.validation import precondition_failed

# A stored response's fields that are never served as stored (see served_headers).
# X-Cache-Status: this cache's own field, in case an entry stored before it was dropped on the
# way in (proxy.policy.headers.OWN_RESPONSE_FIELDS) still holds an origin's.
SERVED_DROPS = frozenset({"age", "content-length", "server", "x-request-id", "x-cache-status"})
# The fields a 304 keeps (RFC 9110 §15.4.5), besides this cache's own.
NOT_MODIFIED_FIELDS = ("cache-control", "content-location", "date", "etag", "expires", "vary",
                       "last-modified")  # fmt: skip
_OWN_FIELDS = ("Age", "Cache-Status", "X-Cache-Status")


@dataclass(frozen=True, slots=True)
class PreconditionFailed:
    """412: only this cache's own fields (Cache-Status, X-Cache-Status), none of the stored
    response's: the 412 is not that representation, nor a response a cache may reuse."""

    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class NotModified:
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    headers: list[tuple[str, str]]  # with Content-Range: bytes */size


@dataclass(frozen=True, slots=True)
class Send:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    length: int  # bytes sent: the body's size, or the range's
    offset: int  # where in the stored body they begin


ReplyHead = PreconditionFailed | NotModified | Unsatisfiable | Send


def served_headers(stored: Sequence[tuple[str, str]], age: str, cs: str, x_cache: str
                   ) -> list[tuple[str, str]]:
    """A stored response's fields as served: its own Age and Content-Length dropped (the
    web layer frames the body), its Server (the operator's ``server_header`` names this proxy
    instead, as nginx does), any X-Request-Id (each request gets its own from the web
    layer) and any X-Cache-Status; this cache's Age, Cache-Status and X-Cache-Status added.
    Shared by the engine and the fast path (``proxy.web.fastpath``)."""
    headers = [(k, v) for k, v in stored if k.lower() not in SERVED_DROPS]
    headers.append(("Age", age))
    headers.append(("Cache-Status", cs))
    headers.append(("X-Cache-Status", x_cache))
    return headers


def reply_head(request: RequestHead, stored: StoredResponse, body_size: int,
               headers: list[tuple[str, str]], not_modified: bool) -> ReplyHead | None:
    """The reply to ``request`` from ``stored`` (a body of ``body_size`` bytes), headed by
    ``headers`` (``served_headers``); ``not_modified``: the client's conditional matched.

    >>> from proxy.policy.messages import EMPTY_HEADERS, Freshness
    >>> from multidict import CIMultiDict, CIMultiDictProxy
    >>> s = StoredResponse(200, "OK", (), 0, 0, Freshness(10, "max-age", 0, 0))
    >>> def get(range_: str) -> RequestHead:
    ...     return RequestHead("GET", "http", "a", "/", CIMultiDictProxy(CIMultiDict(Range=range_)))
    >>> reply_head(get("bytes=2-"), s, 10, [], False)  # doctest: +NORMALIZE_WHITESPACE
    Send(status=206, reason='Partial Content', headers=[('Content-Range', 'bytes 2-9/10')],
         length=8, offset=2)
    >>> reply_head(get("bytes=20-"), s, 10, [], False)
    Unsatisfiable(headers=[('Content-Range', 'bytes */10')])
    """
    fields = request.headers
    if ("If-Match" in fields or "If-Unmodified-Since" in fields) and precondition_failed(fields, stored):
        return PreconditionFailed([(k, v) for k, v in headers if k in _OWN_FIELDS and k != "Age"])
    if not_modified:
        return NotModified([(k, v) for k, v in headers
                            if k.lower() in NOT_MODIFIED_FIELDS or k in _OWN_FIELDS])
    # RFC 9110 §14.2: GET is the only method range handling is defined for; a HEAD's Range is
    # ignored (its answer is the 200's head).
    spec = request_range(request.headers) if request.method == "GET" else None
    if stored.status == 206:
        held = answerable(stored, spec) if spec is not None else None
        part = part_range(stored)
        if held is None or part is None or request.method == "HEAD":
            return None
        headers = [(k, v) for k, v in headers if k.lower() != "content-range"]
        headers.append(("Content-Range", f"bytes {held.first}-{held.last}/{held.total}"))
        return Send(206, stored.reason, headers, held.length, held.first - part.first)
    if spec is not None and stored.status == 200 and if_range_allows(request.headers, stored):
        rng = resolve_range(spec, body_size)
        if rng == "unsatisfiable":
            return Unsatisfiable([*headers, ("Content-Range", f"bytes */{body_size}")])
        first, last = rng
        headers = [*headers, ("Content-Range", f"bytes {first}-{last}/{body_size}")]
        return Send(206, "Partial Content", headers, last - first + 1, first)
    return Send(stored.status, stored.reason, headers, body_size, 0)
