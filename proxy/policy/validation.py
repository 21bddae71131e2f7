"""Conditional requests: ours to the origin, and the client's to us (RFC 9111 §4.3, RFC 9110 §13).

- ``conditional_headers``: the validators a revalidation sends (§4.3.1).
- ``decide_on_validation``: what the origin's answer means for the stored
  response: ``Freshen`` (304: update its headers, keep the body, §4.3.4),
  ``Replace`` (a full new response), ``ServeStale`` (5xx or unreachable within
  stale-if-error, RFC 5861) or ``PassThrough`` (hand the answer to the client).
- ``client_not_modified``: may we answer the client's own conditional GET with 304?
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.cache_control import split_directives
from proxy.policy.headers import HOP_BY_HOP
from proxy.policy.httpdate import parse_http_date
from proxy.policy.messages import HeaderList, Headers, StoredResponse

# Fields a 304 must not overwrite in the stored response (RFC 9111 §3.2): the
# stored body's framing and encoding are the stored body's, not the 304's.
NOT_UPDATED_BY_304 = HOP_BY_HOP | {"content-length", "content-encoding", "content-range"}


@dataclass(frozen=True, slots=True)
class Freshen:
    headers: HeaderList  # the stored headers updated from the 304


@dataclass(frozen=True, slots=True)
class Replace:
    pass


@dataclass(frozen=True, slots=True)
class ServeStale:
    detail: str  # why the stale response is served: ORIGIN-ERROR, ORIGIN-UNREACHABLE


@dataclass(frozen=True, slots=True)
class PassThrough:
    pass


ValidationOutcome = Freshen | Replace | ServeStale | PassThrough


def has_validator(stored: StoredResponse) -> bool:
    return stored.etag is not None or stored.last_modified is not None


def conditional_headers(stored: StoredResponse) -> HeaderList:
    headers: list[tuple[str, str]] = []
    if stored.etag is not None:
        headers.append(("If-None-Match", stored.etag))
    if stored.last_modified is not None:
        headers.append(("If-Modified-Since", stored.last_modified))
    return tuple(headers)


def merge_headers(stored: HeaderList, update: Headers) -> HeaderList:
    """Stored headers with every field present in ``update`` replaced (RFC 9111 §3.2)."""
    replaced = {k.lower() for k in update if k.lower() not in NOT_UPDATED_BY_304}
    kept = [(k, v) for k, v in stored if k.lower() not in replaced]
    added = [(k, v) for k, v in update.items() if k.lower() in replaced]
    return (*kept, *added)


def _strong(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def decide_on_validation(
    stored: StoredResponse, status: int, headers: Headers, stale_if_error: bool
) -> ValidationOutcome:
    if status == 304:
        etag = headers.get("ETag")
        if etag is not None and stored.etag is not None and _strong(etag) != _strong(stored.etag):
            return Replace()  # the 304 is about another representation (§4.3.4)
        return Freshen(merge_headers(stored.headers, headers))
    if status >= 500 and stale_if_error:
        return ServeStale("ORIGIN-ERROR")
    if status >= 500:
        return PassThrough()
    return Replace()


def etag_list(values: list[str] | tuple[str, ...]) -> list[str]:
    return split_directives(", ".join(values))


def client_not_modified(request_headers: Headers, stored: StoredResponse) -> bool:
    """RFC 9110 §13.2.2 for GET/HEAD: If-None-Match wins over If-Modified-Since."""
    if stored.status != 200:
        return False
    inm = request_headers.getall("If-None-Match", ())
    if inm:
        tags = etag_list(inm)
        if "*" in tags:
            return True
        if stored.etag is None:
            return False
        mine = _strong(stored.etag)
        return any(_strong(t) == mine for t in tags)
    ims = request_headers.get("If-Modified-Since")
    if ims is not None and stored.last_modified is not None:
        since = parse_http_date(ims)
        modified = parse_http_date(stored.last_modified)
        return since is not None and modified is not None and modified <= since
    return False
