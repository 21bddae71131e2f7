"""The ``Cache-Status`` (RFC 9211) and ``X-Cache-Status`` (nginx's vocabulary) values.

``Cache-Status`` says what this cache did, with the parameters of RFC 9211 §2:
``hit``, ``fwd`` (bypass, method, uri-miss, vary-miss, miss, request, stale),
``fwd-status``, ``ttl``, ``stored``, ``collapsed`` and a ``detail`` token saying
why a response was not stored or not served (``PRIVATE``, ``NO-STORE``, ...).

>>> cache_status(hit=True, ttl=42.7)
'cachegate; hit; ttl=42'
>>> cache_status(fwd="uri-miss", fwd_status=200, stored=True)
'cachegate; fwd=uri-miss; fwd-status=200; stored'
>>> cache_status(fwd="bypass", detail="RULE-BYPASS:logged in")
'cachegate; fwd=bypass; detail="RULE-BYPASS:logged in"'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from http_sfv.item import Item
from http_sfv.list import List

from proxy.policy.fields import split_outside_quotes

CACHE_NAME = "cachegate"

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~:/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _sf_token_or_string(value: str) -> str:
    if value and value[0].isalpha() and _TOKEN_CHARS.issuperset(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c for c in escaped if " " <= c <= "~") + '"'


def cache_status(
    *,
    hit: bool = False,
    fwd: str | None = None,
    fwd_status: int | None = None,
    ttl: float | None = None,
    stored: bool = False,
    collapsed: bool = False,
    detail: str | None = None,
    key: str | None = None,
) -> str:
    parts = [CACHE_NAME]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        parts.append(f"ttl={math.floor(ttl)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if key is not None:
        parts.append(f"key={_sf_token_or_string(key)}")
    if detail:
        parts.append(f"detail={_sf_token_or_string(detail)}")
    return "; ".join(parts)


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside sf-strings (RFC 8941 §3.3.3: quoted, ``\\`` escapes, as
    RFC 9110's quoted-string), each part stripped."""
    return [part.strip(" \t") for part in split_outside_quotes(text, sep)]


def _foreign_member(member: str) -> bool:
    """Is ``member`` one an upstream cache may have put in Cache-Status: valid sf-list syntax
    of one item (RFC 8941 §3.1), a cache's name (sf-token or sf-string, RFC 9211 §2) with its
    parameters, and not this cache's name?"""
    members = List()
    try:
        members.parse(member.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    if len(members) != 1 or not isinstance(item := members[0], Item):
        return False
    return isinstance(item.value, str) and str(item.value) != CACHE_NAME


def upstream_cache_status(values: Sequence[str]) -> tuple[str, ...] | None:
    """An upstream's ``Cache-Status`` field lines as cachegate relays and stores them: None when
    they stay as they are; else the members kept, in order. RFC 9211 §2: each cache appends
    its member to the list; cachegate's goes last. A member that is not valid sf-list syntax
    made the whole field fail to parse for every client (hits included), and one named as this
    cache would pass for its own: both are dropped, the other caches' members kept.

    >>> upstream_cache_status(["inner; hit", "edge; fwd=miss"]) is None
    True
    >>> upstream_cache_status(["a b c, inner; hit", "cachegate; hit; ttl=999"])
    ('inner; hit',)
    >>> upstream_cache_status(['"cachegate"; hit', 'x; detail="a, b",'])
    ('x; detail="a, b"',)
    """
    members = [m for value in values for m in _split(value, ",")]
    kept = tuple(m for m in members if _foreign_member(m))
    return None if len(kept) == len(members) else kept


def cut_short(member: str | None, detail: str) -> str:
    """What cachegate's member says of a response whose body broke off after its head went out:
    the head's member, without ``stored`` (nothing was) and with the error's ``detail`` in place
    of any it had. The client was sent the head's; this one is for the access log.

    >>> cut_short("cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed", "UPSTREAM-BROKE-OFF")
    'cachegate; fwd=uri-miss; fwd-status=200; collapsed; detail=UPSTREAM-BROKE-OFF'
    >>> cut_short(None, "UPSTREAM-TIMEOUT")
    'cachegate; detail=UPSTREAM-TIMEOUT'
    """
    kept = [p for p in _split(member or CACHE_NAME, ";") if p != "stored" and not p.startswith("detail=")]
    return "; ".join([*kept, f"detail={_sf_token_or_string(detail)}"])


def settled(member: str | None, detail: str) -> str | None:
    """What cachegate's member says in the access log of a fill streamed to its client, once
    its body has gone out: ``stored`` when it was (``detail`` ""; a head sent before the body's
    length was known could not say so), else the head's member without ``stored`` and with why
    (``cut_short``: TOO-LARGE, a body that outgrew the store while it streamed, PURGED, ...).
    None (no member was sent: a rule removed it) stays None.

    >>> settled("cachegate; fwd=uri-miss; fwd-status=200; collapsed", "")
    'cachegate; fwd=uri-miss; fwd-status=200; stored; collapsed'
    >>> settled("cachegate; fwd=uri-miss; fwd-status=200; stored", "")
    'cachegate; fwd=uri-miss; fwd-status=200; stored'
    >>> settled("cachegate; fwd=uri-miss; fwd-status=200", "TOO-LARGE")
    'cachegate; fwd=uri-miss; fwd-status=200; detail=TOO-LARGE'
    """
    if member is None:
        return None
    if detail:
        return cut_short(member, detail)
    parts = _split(member, ";")
    if "stored" in parts:
        return member
    # (in ``cache_status``'s order: before collapsed, key and detail)
    later = ("collapsed", "key=", "detail=")
    at = next((i for i, p in enumerate(parts) if i and p.startswith(later)), len(parts))
    return "; ".join([*parts[:at], "stored", *parts[at:]])


class _Invalidatable(Protocol):
    @property
    def invalidated(self) -> bool: ...


def serve_detail(status: str, stored: _Invalidatable) -> str | None:
    """The ``detail`` of a response served from the store: why a stale one was served.

    >>> serve_detail("UPDATING", type("R", (), {"invalidated": False})())
    'STALE-WHILE-REVALIDATE'
    """
    if status == "HIT":
        return None
    if stored.invalidated:
        return "SOFT-PURGED"  # a soft purge: served while one request revalidates it
    return "STALE-WHILE-REVALIDATE" if status == "UPDATING" else "MAX-STALE"


def forwarded_x_cache(fwd: str) -> str:
    """The ``X-Cache-Status`` of a request the cache sent forward (its ``Cache-Status`` ``fwd``),
    whether the origin answered or failed: ``EXPIRED`` for a stored response that was stale
    (nginx's word), ``MISS`` for anything else forwarded. (A bypass says ``BYPASS``, given where
    the bypass is decided.)

    >>> forwarded_x_cache("stale"), forwarded_x_cache("uri-miss"), forwarded_x_cache("request")
    ('EXPIRED', 'MISS', 'MISS')
    """
    return "EXPIRED" if fwd == "stale" else "MISS"


def forwarded_ttl(x_cache: str, ttl: float) -> float | None:
    """The ``ttl`` of an answer read from the store for a request that went forward (a fill or
    a revalidation it waited for): a REVALIDATED answer says the refreshed response's, which is
    what it answers with; a MISS, EXPIRED or collapsed answer says none, as the same answer
    relayed while it arrives says none (RFC 9211 §2.5 makes ``ttl`` optional). Whether the
    client's conditional or Range had the answer read back from the store then changes nothing
    in what it says.

    >>> forwarded_ttl("REVALIDATED", 29.5), forwarded_ttl("EXPIRED", 29.5), forwarded_ttl("HIT", 29.5)
    (29.5, None, None)
    """
    return ttl if x_cache == "REVALIDATED" else None
