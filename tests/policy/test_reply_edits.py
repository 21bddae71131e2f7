"""Which ``response_headers`` edits apply to a reply (``policy.headers.reply_edits``): on a reply no
shared cache may keep (private, no-store, a Set-Cookie, refused for Authorization), a rule never
sets or removes a field that tells later caches (a CDN, a browser) whether to keep it."""

from __future__ import annotations

import pytest

from proxy.policy.headers import reply_edits
from proxy.rules import header_edits

Pairs = list[tuple[str, str]]
PUBLIC = ("Cache-Control", "public, max-age=60")
STORED = ("Cache-Status", "cachegate; fwd=uri-miss; fwd-status=200; stored")

# (case, the reply's fields, the rule's add, the rule's remove, the fields the client gets)
CASES: list[tuple[str, Pairs, Pairs, list[str], Pairs]] = [
    ("a shareable reply: every edit applies", [("Cache-Control", "max-age=5"), STORED], [PUBLIC], [],
     [STORED, PUBLIC]),
    ("private: its Cache-Control stays", [("Cache-Control", "private, max-age=0")], [PUBLIC], [],
     [("Cache-Control", "private, max-age=0")]),
    ("no-store: the same", [("Cache-Control", "no-store")], [PUBLIC], [], [("Cache-Control", "no-store")]),
    ("a Set-Cookie without Cache-Control: none is added", [("Set-Cookie", "sid=alice")], [PUBLIC], [],
     [("Set-Cookie", "sid=alice")]),
    ("refused for Authorization: none is added",
     [("Cache-Status", "cachegate; fwd=uri-miss; fwd-status=200; detail=AUTHORIZATION")], [PUBLIC], [],
     [("Cache-Status", "cachegate; fwd=uri-miss; fwd-status=200; detail=AUTHORIZATION")]),
    ("refused for the request's cookie with no lifetime: none is added",
     [("Cache-Status", "cachegate; fwd=uri-miss; fwd-status=200; detail=COOKIE-NO-FRESHNESS")], [PUBLIC], [],
     [("Cache-Status", "cachegate; fwd=uri-miss; fwd-status=200; detail=COOKIE-NO-FRESHNESS")]),
    ("an origin's own Cache-Status saying AUTHORIZATION is not ours: the edit applies",
     [("Cache-Status", "origin-cdn; detail=AUTHORIZATION")], [PUBLIC], [],
     [("Cache-Status", "origin-cdn; detail=AUTHORIZATION"), PUBLIC]),
    ("targeted fields, Expires and Surrogate-Control are kept from the edits too",
     [("Cache-Control", "private")],
     [("CDN-Cache-Control", "max-age=600"), ("Expires", "Thu, 01 Jan 2037 00:00:00 GMT"),
      ("Surrogate-Control", "max-age=600")], [], [("Cache-Control", "private")]),
    ("removing Cache-Control from a private reply is withheld", [("Cache-Control", "private")], [],
     ["Cache-Control"], [("Cache-Control", "private")]),
    ("other edits still apply to a private reply", [("Cache-Control", "private"), ("X-Powered-By", "php")],
     [PUBLIC, ("X-Frame-Options", "DENY")], ["X-Powered-By"],
     [("Cache-Control", "private"), ("X-Frame-Options", "DENY")]),
    ("an edit that itself forbids sharing still applies", [("Set-Cookie", "sid=alice")],
     [("Cache-Control", "private, no-cache")], [], [("Set-Cookie", "sid=alice"), ("Cache-Control", "private, no-cache")]),
]


@pytest.mark.parametrize(("case", "reply", "add", "remove", "expected"), CASES, ids=[c[0] for c in CASES])
def test_response_headers_never_make_a_personal_reply_shareable(
        case: str, reply: Pairs, add: Pairs, remove: list[str], expected: Pairs) -> None:
    edits = header_edits(tuple(add), tuple(remove))
    assert edits.apply(list(reply)) == expected
    kept, _ = reply_edits(reply, edits.add, edits.drop)
    assert set(kept) <= set(expected)
