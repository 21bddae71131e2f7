"""Header-field facts shared by the policy and the proxy: hop-by-hop fields and friends."""

from __future__ import annotations

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
OWN_RESPONSE_FIELDS = frozenset({"x-cache-status"})
_RESPONSE_DROPS = HOP_BY_HOP | OWN_RESPONSE_FIELDS


def end_to_end(headers: Headers) -> HeaderList:
    """A response's header list without hop-by-hop fields and this cache's own
    (``OWN_RESPONSE_FIELDS``), order kept: what is relayed and stored. (A list comprehension,
    not a generator: one call instead of one per field, on every response forwarded or stored.)"""
    listed = connection_tokens(headers)
    drop = _RESPONSE_DROPS | listed if listed else _RESPONSE_DROPS
    return tuple([(k, v) for k, v in headers.items() if k.lower() not in drop])


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
