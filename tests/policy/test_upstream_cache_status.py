"""An upstream's Cache-Status members as cachegate relays and stores them (RFC 9211 §2 with
RFC 8941 §3.1): kept when valid and another cache's, dropped otherwise; None: unchanged."""

from __future__ import annotations

import pytest

from proxy.policy.cache_status import upstream_cache_status

CASES = [
    ("valid members of other caches stay as they are", ["inner; hit", "edge; fwd=uri-miss; stored"], None),
    ("an sf-string name is a name", ['"CDN Edge"; hit'], None),
    ("a member that is not sf-list syntax is dropped, the others kept", ["a b c, inner; hit"], ("inner; hit",)),
    ("the whole field invalid: nothing kept", ["a b c"], ()),
    ("a member named as this cache is dropped", ["inner; hit", "cachegate; hit; ttl=999"], ("inner; hit",)),
    ("its name as an sf-string too", ['"cachegate"; hit'], ()),
    ("another case is another name", ["Cachegate; hit"], None),
    ("an empty member (a stray comma) is dropped", ["inner; hit,"], ("inner; hit",)),
    ("a quoted comma does not split", ['x; detail="a, b"'], None),
    ("an inner list is no cache name", ["(a b); hit"], ()),
    ("a number is no cache name", ["1; hit"], ()),
    ("a bad parameter drops its member", ["x; ttl=", "y; hit"], ("y; hit",)),
    ("a non-ASCII byte drops its member", ["caché; hit"], ()),
]


@pytest.mark.parametrize(("case", "values", "kept"), CASES, ids=[c[0] for c in CASES])
def test_upstream_cache_status_members(case: str, values: list[str], kept: tuple[str, ...] | None) -> None:
    assert upstream_cache_status(values) == kept
