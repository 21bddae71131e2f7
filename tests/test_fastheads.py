"""Head templates by shape (``proxy.web.fastheads.HeadShapes``) give the very bytes that building
each head on its own gives (``build_head`` after ``served_headers`` and the rule's edits)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.engine import served_headers
from proxy.policy.messages import Freshness, RequestHead, StoredResponse
from proxy.policy.reply import NotModified, reply_head
from proxy.rules.plan import HeaderEdits, header_edits
from proxy.storage.entry import Entry
from proxy.storage.memory import Cached
from proxy.web.fastheads import MARK_AGE, MARK_STATUS, Head, HeadShapes, build_head
from proxy.web.frontend import Extras

PLAIN = (("Date", "Fri, 04 Dec 2026 10:00:00 GMT"), ("Content-Type", "application/octet-stream"),
         ("Cache-Control", "public, max-age=86400"))
EDITS = header_edits((("X-Edited", "yes 100%"),), ("Cache-Control",))
DEBUG = Extras((("X-Cache-Worker", "1"),), "edge/1.0")
PLAIN_EXTRAS = Extras((), "cachegate")


def cached(headers: tuple[tuple[str, str], ...], body: bytes | None = b"x" * 1024, status: int = 200,
           reason: str = "OK", size: int = 1024) -> Cached:
    response = StoredResponse(status, reason, headers, 1000.0, 1000.0, Freshness(60.0, "max-age", 0.0, 1000.0))
    return Cached(Entry("http://h/k", "http://h/k", response, "b", size, stored_at=1000.0), body)


def direct(c: Cached, edits: HeaderEdits | None, flavor: int, extras: Extras, version: tuple[int, int]
           ) -> tuple[bytes, bytes] | None:
    """Each head built on its own (what the fast path did before templates); flavor 4: the 304
    the general path's ``reply_head`` makes of it for a client whose conditional matched."""
    stored = c.entry.response
    headers = served_headers(stored.headers, MARK_AGE, MARK_STATUS, "HIT")
    if edits:
        headers = edits.apply(headers)
    if flavor & 4:
        if stored.status != 200 or any("\ue000" in k for k, _ in stored.headers):
            return None  # (such a name, not a token, is left to the general path whatever it heads)
        asked = RequestHead("GET", "http", "h", "/k", CIMultiDictProxy(CIMultiDict({"If-None-Match": "*"})))
        answer = reply_head(asked, stored, c.entry.body_size, headers, True)
        assert isinstance(answer, NotModified)
        return build_head(304, "Not Modified", answer.headers, extras.debug, 0, False, version, extras.server)
    if stored.status < 200 or stored.status == 304 or (stored.status == 204 and c.body != b""):
        return None
    head_only = bool(flavor & 2)
    length = c.entry.body_size if head_only or c.body is None else len(c.body)
    return build_head(stored.status, stored.reason, headers, extras.debug, length, head_only, version,
                      extras.server)


CASES = [
    ("plain", cached(PLAIN)),
    ("percent, tab, UTF-8 and repeated names", cached(
        (("Content-Type", "text/plain; q=50%"), ("Link", "</a>; rel=preload"), ("X-T", "a\tb"),
         ("Link", "</b>; rel=preload"), ("Content-Disposition", "attachment; filename=café.txt")))),
    ("no Date, no Content-Type", cached((("Cache-Control", "max-age=60"),))),
    ("empty body", cached((("Cache-Control", "max-age=60"),), body=b"", size=0)),
    ("fields the cache replaces", cached(
        (("Age", "100"), ("Content-Length", "1024"), ("Server", "origin"), ("X-Request-Id", "abc"),
         ("Date", "Fri, 04 Dec 2026 10:00:00 GMT")))),
    ("a redirect", cached((("Location", "/elsewhere?x=%41"),), status=301, reason="Moved Permanently",
                          body=b"", size=0)),
    ("a body on disk only", cached(PLAIN, body=None, size=5000)),
    ("an uncommon reason", cached(PLAIN, reason="Fine %d %s")),
    ("a control character", cached((("X-Bad", "a\x01b"),))),
    ("the placeholder character", cached((("X-Bad", "a\ue000b"),))),
    ("a reason with CR", cached(PLAIN, reason="OK\r\nX: y")),
    ("a lone surrogate", cached((("X-Bad", "a\udc80b"),))),
    ("a name with the placeholder character", cached((("X\ue000Y", "v"),))),
    ("not modified", cached(PLAIN, status=304, reason="Not Modified")),
    ("validators", cached((*PLAIN, ("ETag", 'W/"x%"'), ("Last-Modified", "Fri, 04 Dec 2026 09:00:00 GMT"),
                           ("Vary", "Accept-Encoding"), ("Content-Location", "/k.txt"), ("Via", "1.1 lb"),
                           ("Expires", "Sat, 05 Dec 2026 10:00:00 GMT"), ("Link", "</a>")))),
    ("no content", cached((("Cache-Control", "max-age=60"),), status=204, reason="No Content", body=b"", size=0)),
    ("no content on disk", cached((("Cache-Control", "max-age=60"),), status=204, reason="No Content", body=None,
                                  size=0)),
]


@pytest.mark.parametrize("edits", [None, EDITS])
@pytest.mark.parametrize("flavor,version", [(0, (1, 1)), (2, (1, 1)), (1, (1, 0)), (3, (1, 0)), (4, (1, 1)),
                                            (5, (1, 0))])
@pytest.mark.parametrize("extras", [PLAIN_EXTRAS, DEBUG])
def test_a_head_from_its_shape_is_the_head_built_alone(edits: HeaderEdits | None, flavor: int,
                                                         version: tuple[int, int], extras: Extras) -> None:
    shapes = HeadShapes()
    for _ in range(2):  # the template is built, then reused
        for name, c in CASES:
            head = shapes.head(c, edits, flavor, extras, version)
            assert isinstance(head, Head)
            want = direct(c, edits, flavor, extras, version)
            got = None if head.fmt is None else (head.fmt, head.order)
            assert got == want, name


def test_one_template_serves_every_variant_of_a_shape() -> None:
    shapes = HeadShapes()
    heads = []
    for i in range(50):
        c = cached((("Date", f"Fri, 04 Dec 2026 10:00:{i:02d} GMT"), ("ETag", f'"v{i}%"')), body=b"y" * (i + 1))
        heads.append(shapes.head(c, None, 0, PLAIN_EXTRAS, (1, 1)))
        assert (heads[-1].fmt, heads[-1].order) == direct(c, None, 0, PLAIN_EXTRAS, (1, 1))
    assert len({h.fmt for h in heads}) == 50
    assert len(shapes._templates) == 1
    # Another config's front-end fields (a reload) are another shape, even when equal.
    c = cached(PLAIN)
    again = shapes.head(c, None, 0, Extras((), "cachegate"), (1, 1))
    assert len(shapes._templates) == 2 and again.fmt == shapes.head(c, None, 0, PLAIN_EXTRAS, (1, 1)).fmt


@pytest.mark.parametrize("name", ["X\ue000Y\ue000Z", "X\ue000A\ue000", "X\ue0007\ue000"])
def test_a_field_name_holding_placeholders_is_left_to_the_general_path(name: str) -> None:
    """Not a token (the origin's parser refuses it), but never read as a hole either."""
    head = HeadShapes().head(cached(((name, "v"),)), None, 0, PLAIN_EXTRAS, (1, 1))
    assert head.fmt is None
