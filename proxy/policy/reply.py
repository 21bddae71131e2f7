"""The head of a reply from a stored response: 200, 304, 206 or 416 (RFC 9110 §13-15, RFC 9111 §4).

``served_headers`` is what a stored response's fields become on the way out (the same
for the general path and the fast hit path); ``reply_head`` decides, from the
client's request, which reply those fields head:

- ``PreconditionFailed``: the client's If-Match or If-Unmodified-Since is false for the
  stored response (RFC 9110 §13.1.1, §13.1.4: 412, before anything else is considered);
- ``NotModified``: the client's own conditional matched (RFC 9110 §15.4.5: a 304
  carries only the fields a 200 would have that describe the representation, and its Via);
- ``Unsatisfiable``: a Range outside a stored 200 (416 with ``Content-Range: bytes */size``);
- ``Send``: the stored body, whole (its own status) or one range of it (206, RFC 9110
  §14.2); a stored part (RFC 9111 §3.3) only for a range it holds whole;
- ``None``: the stored response cannot answer this request (a part asked for another
  range, or by a HEAD): the engine fetches instead.

``reply_on_arrival`` is the same decision for a response that is still arriving (a fill's,
whose request dropped the client's conditionals and ``Range``), made from its head alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.policy.messages import RequestHead, StoredResponse
from proxy.policy.partial import answerable, part_range
from proxy.policy.ranges import if_range_allows, request_range, resolve_range
from proxy.policy.validation import client_not_modified, precondition_failed

# A stored response's fields that are never served as stored (see served_headers).
# X-Cache-Status, Cachegate-Admin: this cache's own fields, in case an entry stored before they
# were dropped on the way in (proxy.policy.headers.OWN_RESPONSE_FIELDS) still holds an origin's.
SERVED_DROPS = frozenset({"age", "content-length", "server", "x-request-id", "x-cache-status",
                          "cachegate-admin"})
# The fields a 304 keeps (RFC 9110 §15.4.5), besides this cache's own; and Via (RFC 9110 §7.6.3),
# the path the 200 it stands for came by, this cache last: as on that 200 (a hit's is stored).
NOT_MODIFIED_FIELDS = ("cache-control", "content-location", "date", "etag", "expires", "vary",
                       "last-modified", "via")  # fmt: skip
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


@dataclass(frozen=True, slots=True)
class AsArrives:
    """The response itself, relayed as it arrives (``reply_on_arrival``): what the request asks
    besides it cannot be decided from the head (a range of a body of unknown length), or is
    the whole response (no range, a range ``If-Range`` does not allow, several ranges)."""


ArrivalReply = PreconditionFailed | NotModified | Unsatisfiable | Send | AsArrives


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
    early = _conditions(request, stored, headers, not_modified)
    if early is not None:
        return early
    # RFC 9110 §14.2: GET is the only method range handling is defined for; a HEAD's Range is
    # ignored (its answer is the 200's head).
    spec = request_range(request.headers) if request.method == "GET" else None
    if stored.status == 206:
        held = answerable(stored, spec) if spec is not None else None
        part = part_range(stored)
        if held is None or part is None or request.method == "HEAD":
            return None
        headers = _ranges_served(_with_range(headers, f"bytes {held.first}-{held.last}/{held.total}"))
        return Send(206, stored.reason, headers, held.length, held.first - part.first)
    if spec is not None and stored.status == 200 and if_range_allows(request.headers, stored):
        rng = resolve_range(spec, body_size)
        if rng == "unsatisfiable":
            return Unsatisfiable(_with_range(headers, f"bytes */{body_size}"))
        if rng is not None:
            first, last = rng
            headers = _ranges_served(_with_range(headers, f"bytes {first}-{last}/{body_size}"))
            return Send(206, "Partial Content", headers, last - first + 1, first)
    return Send(stored.status, stored.reason, headers, body_size, 0)


def _with_range(headers: list[tuple[str, str]], value: str) -> list[tuple[str, str]]:
    """``headers`` with this cache's own Content-Range, and no other, on a 206 or 416 it makes:
    a stored part's, a stray one a stored 200 carries, an origin's 206 arriving as a fill's, or
    a rule's went out beside it (two fields, the other first: a client reading that one placed
    the bytes at the wrong offset). A 200 keeps its own as stored (RFC 9111 §3.1 stores every
    field; the HTTP cache tests' headers-store-Content-Range requires it)."""
    return [*[(k, v) for k, v in headers if k.lower() != "content-range"], ("Content-Range", value)]


def _ranges_served(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A 206's fields with any ``Accept-Ranges`` saying ``bytes`` (RFC 9110 §14.3), where it
    stands: the origin's ``Accept-Ranges: none`` on the stored 200 contradicted the 206 this
    cache cut from it. (None is added: a 206 without one says nothing false.)"""
    if not any(k.lower() == "accept-ranges" and v != "bytes" for k, v in headers):
        return headers
    at = next(i for i, (k, _) in enumerate(headers) if k.lower() == "accept-ranges")
    out = [(k, v) for k, v in headers if k.lower() != "accept-ranges"]
    out.insert(at, ("Accept-Ranges", "bytes"))
    return out


def _conditions(request: RequestHead, stored: StoredResponse, headers: list[tuple[str, str]],
                not_modified: bool) -> PreconditionFailed | NotModified | None:
    """RFC 9110 §13.2.2 steps 1-4, before any range: a 412 when If-Match or If-Unmodified-Since
    is false, a 304 when the client's If-None-Match / If-Modified-Since matched
    (``not_modified``); None when neither applies."""
    fields = request.headers
    if ("If-Match" in fields or "If-Unmodified-Since" in fields) and precondition_failed(fields, stored):
        return PreconditionFailed([(k, v) for k, v in headers if k in _OWN_FIELDS and k != "Age"])
    if not_modified:
        return NotModified(not_modified_fields(headers))
    return None


def not_modified_fields(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The fields of a 304 that stands for a 200 headed by ``headers`` (``served_headers``, the
    rule's edits applied): those RFC 9110 §15.4.5 keeps, Via, and this cache's own. The one
    choice, for the general path (``NotModified``) and the fast path's 304 heads
    (``proxy.web.fastheads``), which call it on field names alone."""
    return [(k, v) for k, v in headers if k.lower() in NOT_MODIFIED_FIELDS or k in _OWN_FIELDS]


def reply_on_arrival(request: RequestHead, response: StoredResponse, length: int | None,
                     headers: list[tuple[str, str]]) -> ArrivalReply:
    """The reply to a client of a fill, decided from the response's head as it arrives, before
    its body: ``response`` is the head as it will be stored, ``length`` its Content-Length
    (None: unknown until the body ends), ``headers`` the fields the client would get with it.

    A fill drops the client's conditionals and ``Range`` (it must get the whole response to
    store it), so they are answered here; all that needs is the head. The preconditions and
    If-None-Match / If-Modified-Since compare the client's validators with the response's
    ETag and Last-Modified (or Date), which the head carries (RFC 9110 §13.1-13.2): a 412 or
    a 304 goes out at once. A single range of a 200 whose length the head states is a slice
    of the body as it streams (RFC 9110 §14.2; ``If-Range`` against the head's validators):
    a 206, or a 416 when it lies beyond the end. Anything else gets the response itself
    (``AsArrives``), always a valid answer to a conditional or ranged GET: a false
    If-None-Match means the 200, and a server may ignore Range. Waiting for the store
    instead held the client for the whole body, and past ``lock_timeout`` made it fetch the
    object again.

    >>> from proxy.policy.messages import Freshness
    >>> from multidict import CIMultiDict, CIMultiDictProxy
    >>> s = StoredResponse(200, "OK", (), 0, 0, Freshness(10, "max-age", 0, 0), etag='"v1"')
    >>> def get(**fields: str) -> RequestHead:
    ...     return RequestHead("GET", "http", "a", "/", CIMultiDictProxy(CIMultiDict(fields)))
    >>> reply_on_arrival(get(**{"If-None-Match": '"v1"', "Range": "bytes=0-1"}), s, 10, [])
    NotModified(headers=[])
    >>> reply_on_arrival(get(Range="bytes=2-"), s, 10, [])  # doctest: +NORMALIZE_WHITESPACE
    Send(status=206, reason='Partial Content', headers=[('Content-Range', 'bytes 2-9/10')],
         length=8, offset=2)
    >>> reply_on_arrival(get(Range="bytes=2-"), s, None, [])
    AsArrives()
    """
    early = _conditions(request, response, headers, client_not_modified(request.headers, response))
    if early is not None:
        return early
    if length is None:
        return AsArrives()
    answer = reply_head(request, response, length, headers, False)
    if isinstance(answer, Unsatisfiable) or (isinstance(answer, Send) and answer.status == 206
                                             and response.status != 206):
        return answer
    return AsArrives()
