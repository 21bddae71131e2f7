"""What an unsafe request invalidates (RFC 9111 §4.4).

A non-error answer (2xx or 3xx) to a request whose method is not known to be
safe invalidates the target URI and the same-origin ``Location`` and
``Content-Location`` URIs. Other origins' URIs are left alone: a response must
not be able to purge someone else's content.

Same origin is decided on the normalised authority, as the cache key is
(``proxy.policy.request.normal_host``: case, trailing dot, the scheme's default
port; RFC 9110 §4.2.3), and the URL invalidated is the one the key was built
from: ``http://Shop.example:80/item#top`` is ``http://shop.example/item``.
"""

from __future__ import annotations

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
    no fragment); None when it is another origin's (or its authority is not a valid host)."""
    parts = urlsplit(urljoin(request.url, reference.strip()))
    if parts.scheme != request.scheme or normal_host(parts.netloc, parts.scheme) != request.host:
        return None
    query = f"?{parts.query}" if parts.query else ""
    return f"{request.scheme}://{request.host}{parts.path or '/'}{query}"
