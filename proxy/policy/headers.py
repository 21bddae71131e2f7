"""Header-field facts shared by the policy and the proxy: hop-by-hop fields and friends, and
which of a rule's ``response_headers`` edits may apply to a reply (``reply_edits``)."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.policy.cache_control import parse_cache_control
from proxy.policy.cache_status import CACHE_NAME, upstream_cache_status
from proxy.policy.httpdate import format_http_date
from proxy.policy.messages import HeaderList, Headers

# RFC 9110 §7.6.1 and the fields a proxy must not forward or store (RFC 9111 §3.1 names
# Proxy-Authenticate, Proxy-Authentication-Info and Proxy-Authorization).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate", "proxy-authentication-info",
})  # fmt: skip


def connection_tokens(headers: Headers) -> frozenset[str]:
    """The field names listed in ``Connection`` (they are hop-by-hop too)."""
    tokens: set[str] = set()
    for line in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in line.split(",") if t.strip())
    return frozenset(tokens)


# A response's fields this cache writes itself and never takes from upstream: an origin's
# X-Cache-Status would be relayed ahead of cachegate's own (clients saw "HIT, MISS") and
# stored with the response. Cache-Status is not here: RFC 9211 lists every cache on the path,
# the origin's side first, and cachegate appends its own member last.
# Cachegate-Admin: the admin listener's mark (``proxy.admin_client.relayed``): an origin's is
# never relayed nor stored, so the client listener cannot pass for the admin one, even where a
# rule removes its X-Cache-Status and Cache-Status.
OWN_RESPONSE_FIELDS = frozenset({"x-cache-status", "cachegate-admin"})
_RESPONSE_DROPS = HOP_BY_HOP | OWN_RESPONSE_FIELDS


def end_to_end(headers: Headers, also: frozenset[str] = frozenset()) -> HeaderList:
    """A response's header list without hop-by-hop fields and this cache's own
    (``OWN_RESPONSE_FIELDS``), order kept: what is relayed and stored. (A list comprehension,
    not a generator: one call instead of one per field, on every response forwarded or stored.)
    ``also``: more lower-cased names to leave out, in the same pass (a relay's own fields:
    filtered afterwards, each name was lowered a second time).

    >>> from multidict import CIMultiDict
    >>> h = CIMultiDict([("Connection", "x-a"), ("X-A", "1"), ("Server", "o"), ("ETag", "e")])
    >>> end_to_end(h), end_to_end(h, frozenset({"server"}))
    ((('Server', 'o'), ('ETag', 'e')), (('ETag', 'e'),))
    """
    listed = connection_tokens(headers)
    drop = _RESPONSE_DROPS | also if also else _RESPONSE_DROPS
    if listed:
        drop = drop | listed
    fields = [(k, v) for k, v in headers.items() if k.lower() not in drop]
    if "Cache-Status" in headers:  # (a CIMultiDict: any spelling; rare: a cache before this one)
        return _their_cache_status(fields)
    return tuple(fields)


def _their_cache_status(fields: list[tuple[str, str]]) -> HeaderList:
    """``fields`` with the upstream's Cache-Status members that cachegate relays and stores
    (``upstream_cache_status``): one line where the first was, or none; done once, when a
    response is received, never per hit."""
    values = [v for k, v in fields if k.lower() == "cache-status"]
    kept = upstream_cache_status(values)
    if kept is None:
        return tuple(fields)
    out: list[tuple[str, str]] = []
    for k, v in fields:
        if k.lower() != "cache-status":
            out.append((k, v))
        elif kept:
            out.append((k, ", ".join(kept)))
            kept = ()
    return tuple(out)


def shared_interim(status: int, fields: HeaderList) -> HeaderList:
    """The fields of an interim response that may go to the clients coalesced on a fetch made
    for another client's request: a 103's ``Link`` fields, nothing else (a ``Set-Cookie`` or any
    other field of it was sent for that request alone); empty when none may go (another 1xx, or
    a 103 without ``Link``), and the interim is then not sent to them at all.

    >>> shared_interim(103, (("Link", "</a.css>; rel=preload"), ("Set-Cookie", "s=1")))
    (('Link', '</a.css>; rel=preload'),)
    >>> shared_interim(103, (("Set-Cookie", "s=1"),)), shared_interim(100, (("Link", "</a>"),))
    ((), ())
    """
    if status != 103:
        return ()
    return tuple([(k, v) for k, v in fields if k.lower() == "link"])


def dated(fields: HeaderList, response_time: float) -> HeaderList:
    """``fields`` of a response received at ``response_time``, with a Date: the origin's, else
    that time. RFC 9110 §6.6.1: a recipient with a clock "MUST record the time it was received
    and append a corresponding Date header field" to a response without one that it caches
    or forwards; stamped once here, every hit on the stored response says the same Date
    (and its Age agrees with it), on both hit paths.

    >>> dated((("X", "1"),), 0.0), dated((("date", "d"),), 0.0)
    ((('X', '1'), ('Date', 'Thu, 01 Jan 1970 00:00:00 GMT')), (('date', 'd'),))
    """
    for k, _ in fields:
        if k.lower() == "date":
            return fields
    return (*fields, ("Date", format_http_date(response_time)))


# Fields that tell the caches after this one (a CDN, a browser) whether and how long they may
# keep a reply: Cache-Control, its targeted forms (RFC 9213: CDN-Cache-Control, ...), and the
# older Expires, Pragma and Surrogate-Control.
_CACHING_FIELDS = frozenset({"cache-control", "expires", "pragma", "surrogate-control"})


def caching_field(name: str) -> bool:
    """Does this field tell later caches whether and how long to keep the reply?

    >>> [caching_field(n) for n in ("Cache-Control", "CDN-Cache-Control", "Expires", "X-Cache")]
    [True, True, True, False]
    """
    lower = name.lower()
    return lower in _CACHING_FIELDS or lower.endswith("-cache-control")


def personal_reply(fields: Sequence[tuple[str, str]]) -> bool:
    """Is this reply one no shared cache may keep? Its Cache-Control says ``private`` or
    ``no-store``, it sets a cookie, this cache refused to store it for the request's
    ``Authorization`` (its ``Cache-Status`` member says ``detail=AUTHORIZATION``) or for the
    request's cookie with no lifetime of its own (``COOKIE-NO-FRESHNESS``: often one user's page),
    or the
    request was not cached at all (``fwd=bypass``: a rule's bypass, usually for what a session
    or ``Authorization`` makes personal, or a cookie origins read differently).

    >>> personal_reply([("Cache-Control", "private, max-age=0")]), personal_reply([("Set-Cookie", "a=1")])
    (True, True)
    >>> personal_reply([("Cache-Status", "cachegate; fwd=uri-miss; fwd-status=200; detail=AUTHORIZATION")])
    True
    >>> personal_reply([("Cache-Status", 'cachegate; fwd=bypass; fwd-status=200; detail="RULE-BYPASS:s"')])
    True
    >>> personal_reply([("Cache-Status", "cachegate; fwd=uri-miss; detail=COOKIE-NO-FRESHNESS")])
    True
    >>> personal_reply([("Cache-Control", "max-age=60"), ("Cache-Status", "cachegate; hit")])
    False
    """
    for name, value in fields:
        lower = name.lower()
        if lower == "set-cookie":
            return True
        if lower == "cache-control":
            cc = parse_cache_control([value])
            if "private" in cc or "no-store" in cc:
                return True
        elif lower == "cache-status" and any(
                m.strip().startswith(f"{CACHE_NAME};")
                and ("detail=AUTHORIZATION" in m or "fwd=bypass" in m or "COOKIE-NO-FRESHNESS" in m)
                for m in value.split(",")):
            return True
    return False


def reply_edits(fields: Sequence[tuple[str, str]], add: tuple[tuple[str, str], ...], drop: frozenset[str]
                ) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    """The ``response_headers`` edits (fields to set, lower-cased names to remove first) that
    apply to this reply: all of them, unless it is a ``personal_reply``. Then none touches a
    ``caching_field`` (an ``add: {Cache-Control: "public, max-age=60"}`` would tell a CDN after
    this cache to keep one user's reply for everyone), except a field set to a value that itself
    says ``private`` or ``no-store``.

    >>> edits = (("Cache-Control", "public, max-age=60"), ("X-A", "1"))
    >>> add, drop = reply_edits([("Set-Cookie", "s=1")], edits, frozenset({"cache-control", "x-a", "x-b"}))
    >>> add, sorted(drop)
    ((('X-A', '1'),), ['x-a', 'x-b'])
    """
    if not personal_reply(fields):
        return add, drop
    kept = tuple((k, v) for k, v in add if not caching_field(k) or _forbids_sharing(v))
    return kept, frozenset(n for n in drop if not caching_field(n)) | {k.lower() for k, _ in kept}


def _forbids_sharing(value: str) -> bool:
    cc = parse_cache_control([value])
    return "private" in cc or "no-store" in cc
