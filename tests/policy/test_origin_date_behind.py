"""An origin whose clock is behind this one (RFC 9111 §4.2.3): its Date's apparent age, the
``cache.apparent_age`` choice, what the followers of a fill may take and when it is said."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.policy.fill import (
    Exchange,
    Fill,
    FillSettings,
    decide_fill,
    freshened,
    shareable_with_followers,
    stored_for_waiters,
)
from proxy.policy.freshness import corrected_initial_age, origin_date_behind
from proxy.policy.messages import CacheOptions, StoredResponse
from tests.policy.build import T0, date, headers, request
from tests.policy.test_fill import Rules

Pairs = list[tuple[str, str]]
FULL, AGE_ONLY = CacheOptions(), CacheOptions(apparent_age=False)


# (case, response fields, options, fresh on arrival, followers take it, seconds said behind);
# the request went out at T0 - 1, the response arrived at T0.
CASES: list[tuple[str, Pairs, CacheOptions, bool, bool, float]] = [
    ("Date behind by less than the lifetime: fresh, nothing said",
     [("Cache-Control", "max-age=600"), ("Date", date(-300))], FULL, True, True, 0.0),
    ("Date behind by more than the lifetime, no Age: stale on arrival by the Date alone",
     [("Cache-Control", "max-age=600"), ("Date", date(-7200))], FULL, False, True, 7200.0),
    ("Date behind, an Age within the lifetime: stale by the Date alone still",
     [("Cache-Control", "max-age=600"), ("Date", date(-7200)), ("Age", "100")], FULL, False, True, 7200.0),
    ("Date behind, an Age over the lifetime: its Age makes it stale too, followers go on",
     [("Cache-Control", "max-age=600"), ("Date", date(-7200)), ("Age", "700")], FULL, False, False, 0.0),
    ("an Age over the lifetime with a right Date: stale, followers go on, nothing said",
     [("Cache-Control", "max-age=600"), ("Date", date(0)), ("Age", "700")], FULL, False, False, 0.0),
    ("Date behind by more than a short lifetime and 60 s: said",
     [("Cache-Control", "max-age=10"), ("Date", date(-90))], FULL, False, True, 90.0),
    ("Date behind by more than the lifetime but not 60 s: followers take it, nothing said",
     [("Cache-Control", "max-age=10"), ("Date", date(-50))], FULL, False, True, 0.0),
    ("Expires minus Date behind: the same as max-age",
     [("Date", date(-7200)), ("Expires", date(-7200 + 600))], FULL, False, True, 7200.0),
    ("s-maxage and stale-while-revalidate: the same",
     [("Cache-Control", "s-maxage=600, stale-while-revalidate=60"), ("Date", date(-7200))], FULL, False, True,
     7200.0),
    ("max-age=0: stale by its lifetime, followers go on",
     [("Cache-Control", "max-age=0"), ("Date", date(-7200)), ("ETag", '"a"')], FULL, False, False, 0.0),
    ("no-cache: revalidated before each use, followers go on",
     [("Cache-Control", "no-cache, max-age=600"), ("Date", date(-7200))], FULL, False, False, 0.0),
    ("a Date in the future: age 0",
     [("Cache-Control", "max-age=600"), ("Date", date(3600))], FULL, True, True, 0.0),
    ("apparent_age false: Date behind by more than the lifetime, no Age: fresh",
     [("Cache-Control", "max-age=600"), ("Date", date(-7200))], AGE_ONLY, True, True, 0.0),
    ("apparent_age false: an Age within the lifetime: fresh",
     [("Cache-Control", "max-age=600"), ("Date", date(-7200)), ("Age", "100")], AGE_ONLY, True, True, 0.0),
    ("apparent_age false: an Age over the lifetime: stale, followers go on",
     [("Cache-Control", "max-age=600"), ("Date", date(-7200)), ("Age", "700")], AGE_ONLY, False, False, 0.0),
    ("apparent_age false: no-cache still goes on",
     [("Cache-Control", "no-cache, max-age=600"), ("Date", date(-7200))], AGE_ONLY, True, False, 0.0),
]


@pytest.mark.parametrize(("case", "pairs", "options", "fresh", "shared", "behind"), CASES,
                         ids=[c[0] for c in CASES])
def test_an_origin_date_behind_this_clock(case: str, pairs: Pairs, options: CacheOptions, fresh: bool,
                                          shared: bool, behind: float) -> None:
    decision = decide_fill(Exchange(request(), 200, "OK", headers(*pairs), T0 - 1, T0), Rules(options),
                           FillSettings())
    assert isinstance(decision, Fill), decision
    stored = decision.response
    assert (stored.freshness.ttl(T0) > 0) == fresh
    assert shareable_with_followers(stored, T0) == shared
    assert origin_date_behind(stored) == behind


@pytest.mark.parametrize(("pairs", "expected"), [
    ([("Date", date(-7200))], 1.0),  # the Date is not used: the delay alone
    ([("Date", date(-7200)), ("Age", "30")], 31.0),
    ([("Date", date(3600)), ("Age", "5")], 6.0),
    ([("Age", "5")], 6.0),
])
def test_apparent_age_false_is_the_age_field_plus_the_delay(pairs: Pairs, expected: float) -> None:
    assert corrected_initial_age(headers(*pairs), T0 - 1, T0, apparent_age=False) == expected
    assert corrected_initial_age(headers(*pairs), T0 - 1, T0) >= expected  # the full formula: never less


def _arrived(pairs: Pairs, at: float, vary: tuple[tuple[str, str], ...] = ()) -> StoredResponse:
    decision = decide_fill(Exchange(request(), 200, "OK", headers(*pairs), at - 1, at), Rules(FULL), FillSettings())
    assert isinstance(decision, Fill), decision
    return replace(decision.response, vary=vary)


BEHIND_PAGE: Pairs = [("Cache-Control", "max-age=600"), ("Date", date(-7200))]
WAIT = T0 - 0.5  # the flight began to wait for another worker's (node's) fetch; that one arrived at T0


# (case, the key's variants, the request's fields, since, which one answers the flight's clients)
WAITERS: list[tuple[str, list[StoredResponse], Pairs, float | None, int | None]] = [
    ("stale by its Date alone, stored by the fetch waited for: taken",
     [_arrived(BEHIND_PAGE, T0)], [], WAIT, 0),
    ("the same, the flight did not wait (its own lease, a plain lookup): not taken",
     [_arrived(BEHIND_PAGE, T0)], [], None, None),
    ("stale by its Date alone, stored before the wait began: an older one, not taken",
     [_arrived(BEHIND_PAGE, T0)], [], T0 + 0.1, None),
    ("stale by its Age too: not taken",
     [_arrived([*BEHIND_PAGE, ("Age", "900")], T0)], [], WAIT, None),
    ("no-cache: not taken",
     [_arrived([("Cache-Control", "no-cache, max-age=600"), ("Date", date(-7200))], T0)], [], WAIT, None),
    ("soft-purged since it was stored: not taken",
     [replace(_arrived(BEHIND_PAGE, T0), invalidated=True)], [], WAIT, None),
    ("the fetch stored another variant; the request's own is older: not taken",
     [_arrived(BEHIND_PAGE, T0 - 60, (("accept-encoding", "identity"),)),
      _arrived(BEHIND_PAGE, T0, (("accept-encoding", "gzip"),))], [("Accept-Encoding", "identity")], WAIT,
     None),
    ("the fetch stored the request's own variant: that one",
     [_arrived(BEHIND_PAGE, T0 - 60, (("accept-encoding", "identity"),)),
      _arrived(BEHIND_PAGE, T0, (("accept-encoding", "gzip"),))], [("Accept-Encoding", "gzip")], WAIT, 1),
    ("a fresh hit, waited for or not: taken",
     [_arrived([("Cache-Control", "max-age=600"), ("Date", date(0))], T0 - 60)], [], None, 0),
]


@pytest.mark.parametrize(("case", "variants", "fields", "since", "expected"), WAITERS,
                         ids=[c[0] for c in WAITERS])
def test_what_the_clients_of_a_flight_that_waited_for_another_fetch_take(
        case: str, variants: list[StoredResponse], fields: Pairs, since: float | None,
        expected: int | None) -> None:
    assert stored_for_waiters(request(*fields), variants, T0 + 1, FULL, since) == expected


def _freshened(pairs: Pairs, update: Pairs, at: float, took: float) -> StoredResponse:
    """A response filled long before ``at``, freshened by a 304 that arrived at ``at``, ``took`` s after it was asked."""
    kept = _arrived(pairs, at - 3600)
    fresh = freshened(kept, Exchange(request(), 304, "", headers(*update), at - took, at), Rules(FULL),
                      FillSettings())
    assert fresh is not None
    return fresh


NO_CACHE: Pairs = [("Cache-Control", "no-cache"), ("ETag", '"a"'), ("Date", date(-3600))]
SHORT: Pairs = [("Cache-Control", "max-age=1"), ("ETag", '"a"'), ("Date", date(-3600))]

# (case, the key's variants, since, the fetch waited for was a revalidation answered 304, which
# one answers the flight's clients): as the revalidation's own followers in its worker take it.
REVALIDATED: list[tuple[str, list[StoredResponse], float | None, bool, int | None]] = [
    ("no-cache, freshened by the 304 waited for: taken",
     [_freshened(NO_CACHE, [("ETag", '"a"'), ("Date", date(0))], T0, 1.0)], WAIT, True, 0),
    ("stale on arrival (max-age=1, a 304 that took 1.2 s), freshened by the 304 waited for: taken",
     [_freshened(SHORT, [("ETag", '"a"')], T0, 1.2)], WAIT, True, 0),
    ("the same, fetched by a fill (a 200, not a validation): not taken",
     [_arrived([("Cache-Control", "no-cache"), ("ETag", '"a"'), ("Date", date(0))], T0)], WAIT, False, None),
    ("no-cache, freshened before the wait began: a request after the validation revalidates",
     [_freshened(NO_CACHE, [("ETag", '"a"'), ("Date", date(0))], T0, 1.0)], T0 + 0.1, True, None),
    ("no-cache, freshened, the flight did not wait (its own lease, a plain lookup): not taken",
     [_freshened(NO_CACHE, [("ETag", '"a"'), ("Date", date(0))], T0, 1.0)], None, True, None),
    ("no-cache, freshened, soft-purged since: not taken",
     [replace(_freshened(NO_CACHE, [("ETag", '"a"'), ("Date", date(0))], T0, 1.0), invalidated=True)], WAIT,
     True, None),
]


@pytest.mark.parametrize(("case", "variants", "since", "validated", "expected"), REVALIDATED,
                         ids=[c[0] for c in REVALIDATED])
def test_what_the_clients_of_a_flight_that_waited_for_another_revalidation_take(
        case: str, variants: list[StoredResponse], since: float | None, validated: bool,
        expected: int | None) -> None:
    assert variants[0].freshness.ttl(variants[0].response_time) <= 0 or variants[0].freshness.no_cache
    assert stored_for_waiters(request(), variants, T0 + 1, FULL, since, validated=validated) == expected
