"""Header-field facts shared by the policy and the proxy: hop-by-hop fields and friends."""

from __future__ import annotations

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


def end_to_end(headers: Headers) -> HeaderList:
    """The header list without hop-by-hop fields, order kept. (A list comprehension, not a
    generator: one call instead of one per field, on every response forwarded or stored.)"""
    listed = connection_tokens(headers)
    drop = HOP_BY_HOP | listed if listed else HOP_BY_HOP
    return tuple([(k, v) for k, v in headers.items() if k.lower() not in drop])
