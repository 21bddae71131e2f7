"""Field names that CGI-style origins read as one field: ``_`` and ``-`` swapped, any case.

CGI, WSGI, Rack and PHP origins (wsgiref, gunicorn before 22, Puma, PHP behind a server that
passes such fields) see a request field as ``HTTP_`` plus its name upper-cased with ``-`` read
as ``_``: ``X-Tenant`` and ``X_Tenant`` are both ``HTTP_X_TENANT``, and the line that comes
later overwrites the other. Every other origin (aiohttp, Go, Node, Varnish) reads them as two
fields. So a request carrying a field the cache reads (a rule's condition or ``key.headers``,
a response's ``Vary``) and another spelling of it too may mean another value to the origin
than to the cache: ``X-Tenant: acme`` and ``X_Tenant: evil`` is tenant ``evil``'s page, which
the cache would file under ``acme``'s key or variant for every client.

cachegate forwards both spellings as they came and refuses to decide on such a request (the
rules' conditions: ``proxy.rules.plan.RuleSet._repeated``; the key: ``RuleSet._keyed_once``; a
variant: ``storability``, and ``reuse.vouches`` for its revalidation), rather than dropping
fields with ``_`` as nginx does by default (``underscores_in_headers off``): an origin may use
such names on purpose, and only the few requests that carry two spellings of a field the cache
reads lose anything.

Nearly every request has no ``_`` in a field name: ``underscored`` then costs one scan of the
names, and ``aliases`` one dictionary look-up per other spelling of the name asked about; the
key asks nothing of such a request (``RequestHead.underscores``, from ``normalise_request``,
which reads the names anyway).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from proxy.policy.messages import Headers

Spelled = Mapping[str, tuple[str, ...]]  # ``underscored``'s answer
NO_SPELLING: dict[str, tuple[str, ...]] = {}  # shared, never written: no name with ``_``


def underscored(headers: Headers) -> dict[str, tuple[str, ...]]:
    """The request's field names spelled with ``_``, by the name they are to CGI, WSGI and Rack
    origins (lower-cased, ``_`` read as ``-``: ``X_Requested_With`` and ``X-Requested-With`` both
    become ``HTTP_X_REQUESTED_WITH``); empty, after one scan, for nearly every request.

    >>> from multidict import CIMultiDict
    >>> underscored(CIMultiDict([("X_Tenant", "a"), ("x-tenant", "b"), ("x_TENANT", "c")]))
    {'x-tenant': ('x_tenant',)}
    """
    if "_" not in "".join(headers.keys()):
        return NO_SPELLING
    found: dict[str, tuple[str, ...]] = {}
    for k in headers:
        if "_" in k:
            low = k.lower()
            norm = low.replace("_", "-")
            if low not in found.get(norm, ()):
                found[norm] = (*found.get(norm, ()), low)
    return found


def spellings(name: str) -> tuple[str, ...] | None:
    """The other spellings of a field name a CGI-style origin reads as it (each ``-`` or ``_``
    either way), lower-cased; None when there are too many to look each up (over 4 of them).

    >>> spellings("X-Requested-With")
    ('x_requested-with', 'x-requested_with', 'x_requested_with')
    """
    known = _SPELLINGS.get(name, _UNKNOWN)
    if known is not _UNKNOWN:
        return known  # type: ignore[return-value]
    low = name.lower()
    parts = re.split("[-_]", low)
    found: tuple[str, ...] | None = None
    if len(parts) <= 5:
        every = []
        for mask in range(1 << (len(parts) - 1)):
            spelled = parts[0]
            for i, part in enumerate(parts[1:]):
                spelled += ("_" if mask >> i & 1 else "-") + part
            every.append(spelled)
        found = tuple(n for n in every if n != low)
    if len(_SPELLINGS) >= 4096:
        _SPELLINGS.clear()
    _SPELLINGS[name] = found
    return found


_SPELLINGS: dict[str, tuple[str, ...] | None] = {}  # the names asked about: a bounded few
_UNKNOWN = object()


def aliases(headers: Headers, name: str, spelled: Callable[[], Spelled] | None = None) -> tuple[str, ...]:
    """The other names (lower-cased) in ``headers`` that CGI-style origins read as the field
    ``name``: spelled with ``_`` where ``name`` has ``-`` or the other way round. ``spelled``:
    ``underscored(headers)``, when the caller keeps it (asked only for a name of over five parts).

    >>> from multidict import CIMultiDict
    >>> aliases(CIMultiDict([("X_Tenant", "evil"), ("X-Tenant", "acme")]), "x-tenant")
    ('x_tenant',)
    >>> aliases(CIMultiDict([("X-Tenant", "acme")]), "X_Tenant"), aliases(CIMultiDict(), "X-Tenant")
    (('x-tenant',), ())
    """
    others = spellings(name)
    if others is not None:
        return tuple(n for n in others if n in headers)
    low = name.lower()
    norm = low.replace("_", "-")
    found = tuple(n for n in (underscored(headers) if spelled is None else spelled()).get(norm, ())
                  if n != low)
    if "_" in low and norm in headers:
        found = (*found, norm)
    return found


def spelled_otherwise(names: Iterable[str], headers: Headers) -> str | None:
    """The first of ``names`` (fields a key or a variant reads) that ``headers`` also carry under
    another spelling (``aliases``), whether or not they carry it as named; None for nearly every
    request. Such a request may be another value to a CGI-style origin than to the cache.

    >>> from multidict import CIMultiDict
    >>> spelled_otherwise(("accept-language", "x-tenant"), CIMultiDict([("X_Tenant", "evil")]))
    'x-tenant'
    >>> spelled_otherwise(("x-tenant",), CIMultiDict([("X-Tenant", "acme"), ("X_Other", "1")])) is None
    True
    """
    for name in names:
        others = spellings(name)
        if others is not None:
            for other in others:  # (one look-up each: no closure, no generator, on the hit path)
                if other in headers:
                    return name
        elif aliases(headers, name):  # a name of over five parts: the scan
            return name
    return None
