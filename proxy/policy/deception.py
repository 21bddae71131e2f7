"""Web cache deception guard: store only when the Content-Type agrees with the path's extension.

``/account/settings.css`` answered with ``text/html`` is a personal page behind
a static-looking URL: a rule that caches ``*.css`` by force must not store it.

>>> content_type_agrees("/a/b.css", "text/css; charset=utf-8")
True
>>> content_type_agrees("/account/x.css", "text/html")
False
>>> content_type_agrees("/no-extension", "text/html")
True
"""

from __future__ import annotations

import mimetypes
import posixpath

# Types that browsers and CDNs treat as the same thing as the registered one.
_ALIASES = {
    "application/javascript": {"text/javascript", "application/x-javascript", "application/ecmascript"},
    "text/javascript": {"application/javascript", "application/x-javascript"},
    "image/x-icon": {"image/vnd.microsoft.icon"},
    "font/woff": {"application/font-woff"},
    "font/woff2": {"application/font-woff2"},
}


def content_type_agrees(path: str, content_type: str | None) -> bool:
    ext = posixpath.splitext(path.split("?", 1)[0])[1].lower()
    if not ext:
        return True
    expected, _ = mimetypes.guess_type("x" + ext, strict=False)
    if expected is None:
        return True  # an extension we know nothing about proves nothing
    actual = (content_type or "").split(";", 1)[0].strip().lower()
    if not actual:
        return False
    return actual == expected or actual in _ALIASES.get(expected, ())
