"""What an unsafe request invalidates (RFC 9111 §4.4).

A non-error answer (2xx or 3xx) to a request whose method is not known to be
safe invalidates the target URI and the same-origin ``Location`` and
``Content-Location`` URIs. Other origins' URIs are left alone: a response must
not be able to purge someone else's content.

Same origin is decided on the normalised authority, as the cache key is
(``proxy.policy.request.normal_host``: case, trailing dot, an IPv6 literal's spelling, the scheme's default
port; RFC 9110 §4.2.3), and the URL invalidated is the one the key was built
from: ``http://Shop.example:80/item#top`` is ``http://shop.example/item``.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

from proxy.policy.messages import Headers, RequestHead
from proxy.policy.request import normal_host

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def invalidated_urls(request: RequestHead, status: int, headers: Headers) -> tuple[str, ...]:
    """The URLs whose stored responses must be invalidated, target first.

    >>> from multidict import CIMultiDict
    >>> head = RequestHead("POST", "http", "a.example", "/x", CIMultiDict())
    >>> invalidated_urls(head, 201, CIMultiDict({"Location": "/y", "Content-Location": "http://b/z"}))
    ('http://a.example/x', 'http://a.example/y')
    >>> invalidated_urls(head, 201, CIMultiDict({"Location": "http://A.example:80/y#top"}))
    ('http://a.example/x', 'http://a.example/y')
    """
    if request.method in SAFE_METHODS or not 200 <= status < 400:
        return ()
    urls = [request.url]
    for name in ("Location", "Content-Location"):
        value = headers.get(name)
        url = same_origin_url(request, value) if value else None
        if url is not None and url not in urls:
            urls.append(url)
    return tuple(urls)


def same_origin_url(request: RequestHead, reference: str) -> str | None:
    """``reference`` resolved against the request's URL, as a key's URL (normalised authority,
    no fragment); None when it is another origin's (or its authority is not a valid host), or
    no URL (``http://[x``, a lone surrogate that no header's bytes decode to).

    A reference's query is the resolved URL's even when empty (RFC 3986 §5.2.2), and the key
    of ``/search?`` is not that of ``/search``; ``urljoin`` and ``urlsplit`` drop an empty
    query (and ``urljoin`` resolves a bare ``?`` to the base's query), so it is taken from
    the reference's own text (a reference without one has none, unless it is a fragment only).

    >>> from multidict import CIMultiDict
    >>> head = RequestHead("POST", "http", "a.example", "/x?q", CIMultiDict())
    >>> [same_origin_url(head, r) for r in ("/search?", "?", "/s?#top", "#top")]
    ['http://a.example/search?', 'http://a.example/x?', 'http://a.example/s?', 'http://a.example/x?q']
    """
    ref = _ascii(reference.strip())
    if ref is None:
        return None
    try:
        parts = urlsplit(urljoin(request.url, ref))
        netloc = parts.netloc
    except ValueError:  # "http://[x": no URL at all (it raised, and took the target's invalidation)
        return None
    if parts.scheme != request.scheme or normal_host(netloc, parts.scheme) != request.host:
        return None
    before = ref.split("#", 1)[0]
    if not before:  # a fragment only: the request's own URL
        return request.url
    _, mark, query = before.partition("?")  # a reference with a path or authority: its query only
    return f"{request.scheme}://{request.host}{parts.path or '/'}{mark}{query}"


def _ascii(reference: str) -> str | None:
    """``reference`` with each byte of the header that is not ASCII, and each character browsers
    encode in a path or a query (``_PATH_SET``, ``_QUERY_SET``), percent-encoded, as browsers
    and curl do when they follow it (a byte that is not UTF-8 arrives as a lone surrogate,
    ``surrogateescape``): the URL a client then asks for, and one that a key can hold. None for
    what no header's bytes decode to (another lone surrogate): that reference alone is dropped."""
    if reference.isascii() and _UNSAFE.search(reference) is None:
        return reference
    try:
        raw = reference.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    path, mark, query = raw.partition(b"?")
    return _encoded(path, _PATH_SET) + mark.decode() + _encoded(query, _QUERY_SET)


def _encoded(raw: bytes, unsafe: frozenset[int]) -> str:
    return "".join(f"%{b:02X}" if b >= 0x80 or b in unsafe else chr(b) for b in raw)


# What browsers percent-encode in a path or a query they request (WHATWG URL's path and
# special-query percent-encode sets, controls aside): ``Location: /my report.pdf`` is asked for
# as ``/my%20report.pdf``, the key such a request has.
_QUERY_SET = frozenset(b' "<>\'')
_PATH_SET = frozenset(b' "<>`{}')
_UNSAFE = re.compile('[ "<>`{}\']')
