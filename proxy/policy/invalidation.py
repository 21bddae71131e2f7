"""What an unsafe request invalidates (RFC 9111 §4.4).

A non-error answer (2xx or 3xx) to a request whose method is not known to be
safe invalidates the target URI and the same-origin ``Location`` and
``Content-Location`` URIs. Other origins' URIs are left alone: a response must
not be able to purge someone else's content.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

from proxy.policy.messages import Headers, RequestHead

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def invalidated_urls(request: RequestHead, status: int, headers: Headers) -> tuple[str, ...]:
    """The URLs whose stored responses must be invalidated, target first.

    >>> from multidict import CIMultiDict
    >>> head = RequestHead("POST", "http", "a.example", "/x", CIMultiDict())
    >>> invalidated_urls(head, 201, CIMultiDict({"Location": "/y", "Content-Location": "http://b/z"}))
    ('http://a.example/x', 'http://a.example/y')
    """
    if request.method in SAFE_METHODS or not 200 <= status < 400:
        return ()
    base = request.url
    origin = (request.scheme, request.host)
    urls = [base]
    for name in ("Location", "Content-Location"):
        value = headers.get(name)
        if not value:
            continue
        absolute = urljoin(base, value.strip())
        parts = urlsplit(absolute)
        if (parts.scheme, parts.netloc.lower()) == origin and absolute not in urls:
            urls.append(absolute)
    return tuple(urls)
