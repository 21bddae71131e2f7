"""``Prefixes``, the one matcher of keys against a purge's or a ban's prefixes: it answers as
testing each prefix in turn did, whatever their number and nesting."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from proxy.storage.bans import GONE, STALE, BanList, Prefixes, PurgeMatch
from proxy.storage.index import Ban
from tests.storage.helpers import entry

texts = st.text(alphabet="ab/", max_size=6)


@given(st.lists(texts, max_size=12), st.lists(texts, min_size=1, max_size=12))
def test_the_prefixes_a_key_starts_with_are_those_found_one_by_one(prefixes: list[str], keys: list[str]) -> None:
    found = Prefixes(prefixes)
    for key in keys:
        expected = {p for p in prefixes if key.startswith(p)}
        assert found.matches(key) == bool(expected)
        assert sorted(found.matching(key)) == sorted(expected)


def test_nested_prefix_bans_each_hide_what_they_cover_up_to_their_own_seq() -> None:
    bans = BanList([Ban(1, "prefix", "http://h/a/", False, 10), Ban(2, "prefix", "http://h/a/b/", True, 20),
                    Ban(3, "prefix", "http://h/a/b/c/", False, 5), Ban(4, "prefix", "http://h/z/", False, 30)])

    def verdict(key: str, seq: int) -> str | None:
        return bans.verdict(replace(entry(key), seq=seq))

    assert verdict("http://h/a/b/c/1", 4) == GONE
    assert verdict("http://h/a/b/c/1", 15) == STALE  # the soft /a/b/ ban only
    assert verdict("http://h/a/b/x", 8) == GONE
    assert verdict("http://h/a/b/x", 25) is None
    assert verdict("http://h/a/x", 12) is None
    assert verdict("http://h/b", 1) is None


def test_a_purge_match_covers_the_keys_under_any_of_many_prefixes() -> None:
    match = PurgeMatch(prefixes=tuple(f"http://h/{i}/" for i in range(20_000)))
    assert match.may_cover("http://h/19999/x", None) and match.may_cover("http://h/0/", None)
    assert not match.may_cover("http://h/20000/x", None) and not match.may_cover("http://h/", None)
    assert replace(match, soft=True).may_cover("http://h/7/a\x1fh:accept=x", None)
