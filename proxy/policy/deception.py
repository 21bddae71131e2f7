"""Web cache deception guard: store only when the Content-Type agrees with the path's extension.

``/account/settings.css`` answered with ``text/html`` is a personal page behind
a static-looking URL: a rule that caches ``*.css`` by force must not store it.

The extension is read from the path the rules matched (``normalise_path``:
percent-decoded, dot-segments removed), never from the raw target, so ``%2e`` cannot
hide the dot from the guard while the rule sees it; and from every other path origins
read it as (``path_readings``), each of which must agree: ``/account;%2f..%2fstatic%2fx.html``
is ``/static/x.html`` to the rules but a servlet's ``/account``, which has no extension.

Two strengths. When the response's own freshness decides (the origin said it may be
shared), a path without an extension, or with one the ``mimetypes`` table does not
know, proves nothing and the response may be stored. Under a *forced* lifetime (a
rule's ``ttl`` gave it, with or without ``override_origin``), the cache is the one
deciding to share, so it needs positive proof: a known extension whose type is the
response's ``Content-Type``. ``/static/..;/account`` (a path some servers read as
``/account``) and ``/account/x.unknownext`` are then not stored.

>>> content_type_agrees("/a/b.css", "text/css; charset=utf-8")
True
>>> content_type_agrees("/account/x.css", "text/html")
False
>>> [content_type_agrees(p, "text/html", forced=f) for p in ("/plain", "/x.webfoo") for f in (False, True)]
[True, False, True, False]
>>> guard_allows("/account%2ecss", "text/html")
False
>>> [guard_allows(p, "text/html", forced=True) for p in ("/s/x.html", "/account;%2f..%2fs%2fx.html")]
[True, False]
"""

from __future__ import annotations

import mimetypes
import posixpath

from proxy.policy.messages import RequestHead, StoredResponse
from proxy.policy.request import normalise_path, path_readings

# Types that browsers and CDNs treat as the same thing as the registered one.
_ALIASES = {
    "application/javascript": {"text/javascript", "application/x-javascript", "application/ecmascript"},
    "text/javascript": {"application/javascript", "application/x-javascript"},
    "image/x-icon": {"image/vnd.microsoft.icon"},
    "font/woff": {"application/font-woff"},
    "font/woff2": {"application/font-woff2"},
}


def content_type_agrees(path: str, content_type: str | None, *, forced: bool = False) -> bool:
    """Does ``content_type`` fit the extension of ``path`` (already normalised)?

    ``forced``: the lifetime is a rule's, so only a positive match counts.
    """
    ext = posixpath.splitext(path)[1].lower()
    if not ext:
        return not forced
    expected, _ = mimetypes.guess_type("x" + ext, strict=False)
    if expected is None:
        return not forced  # an extension we know nothing about proves nothing
    actual = (content_type or "").split(";", 1)[0].strip().lower()
    if not actual:
        return False
    return actual == expected or actual in _ALIASES.get(expected, ())


def guard_allows(target: str, content_type: str | None, *, forced: bool = False) -> bool:
    """The guard's verdict for a request target (raw path and query), read as the rules read it
    and as every origin that reads it otherwise does: it allows only when all agree."""
    raw = target.partition("?")[0]
    if not content_type_agrees(normalise_path(raw), content_type, forced=forced):
        return False
    return all(content_type_agrees(p, content_type, forced=forced) for p in path_readings(raw))


def deception_refuses(head: RequestHead, stored: StoredResponse, content_type: str | None) -> bool:
    """With the guard on: must this response, storable otherwise, not be stored? Forced when
    its lifetime is a rule's. Asked by the fill decision (``policy.fill``) alone."""
    return not guard_allows(head.target, content_type, forced=stored.freshness.source == "rule")
