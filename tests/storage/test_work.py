"""The work in progress a process keeps once for every role (``proxy.storage.work``)."""

from __future__ import annotations

import pytest

from proxy.storage.bans import PurgeMatch
from proxy.storage.work import RECENT_PURGES, InProgress
from tests.storage.helpers import entry

A = entry("http://h/a", tags=("t1",))


@pytest.mark.parametrize(("purges", "since", "covered"), [
    ([], 0, False),  # no purge since the request went out
    ([PurgeMatch(urls=frozenset({"http://h/b"}))], 0, False),  # another URL's
    ([PurgeMatch(urls=frozenset({"http://h/a"}))], 0, True),
    ([PurgeMatch(tags=frozenset({"t1"}))], 0, True),  # by a tag the response carries
    ([PurgeMatch(prefixes=("http://h/",))], 0, True),
    ([PurgeMatch(all=True, soft=True)], 0, True),  # soft too: its response may predate the purge
    ([PurgeMatch(urls=frozenset({"http://h/a"})), PurgeMatch(tags=frozenset({"x"}))], 1, False),  # before it
])
def test_a_fill_is_covered_by_the_purges_since_its_request_went_out(
        purges: list[PurgeMatch], since: int, covered: bool) -> None:
    work = InProgress()
    for match in purges:
        work.purged(match)
    assert work.epoch == len(purges)
    assert work.purged_since(since, A) is covered


def test_a_fill_older_than_every_purge_remembered_counts_as_covered() -> None:
    work = InProgress()
    for _ in range(RECENT_PURGES + 1):
        work.purged(PurgeMatch(urls=frozenset({"http://h/b"})))
    assert work.purged_since(0, A)  # the first purge is forgotten: it cannot be told
    assert not work.purged_since(1, A)  # every purge since epoch 1 is remembered
