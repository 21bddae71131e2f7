"""The values the policy reasons about: a request head, a stored response, options.

They are plain frozen data so that the policy can be tested with literals and
``now`` as a number. The storage layer persists ``StoredResponse``; the rules
layer produces ``CacheOptions`` for a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from proxy.policy.statuses import default_ttl_covers

Headers = MultiMapping[str]
HeaderList = tuple[tuple[str, str], ...]

ClientCacheControl = Literal["honor", "revalidate", "ignore"]

# Seconds a stored response's ``response_time`` may lie ahead of ``now`` before the clock is
# taken to have gone back since it was stored (``Freshness.age``). Within it the resident time
# counts as 0, as RFC 9111 §4.2.3's ``max(0, ...)`` does: processes of one machine read one
# clock but stamp and read at slightly different moments, NTP steps a drifting clock back by
# well under a second, and cluster peers' clocks (``proxy/cluster``) differ by a few seconds at
# worst. Beyond it the entry cannot be told how old it is, and is stale. 60 s: the most
# freshness a step back can add to an entry, against a skew no healthy setup comes near.
CLOCK_SLACK = 60.0


class RequestHead(NamedTuple):
    """What the cache needs of a request: never the body.

    Built by ``proxy.policy.request.normalise_request``, the one view of a request that
    rules, key, variant, storability and the upstream request are all computed from.
    Immutable like the frozen dataclasses elsewhere, but a named tuple: one is built for
    every request, and a frozen dataclass of six fields costs ~0.8 µs to construct
    (``object.__setattr__`` per field) against ~0.25 µs for the tuple (``python -m timeit
    -p``, Python 3.11).
    """

    method: str
    scheme: str
    host: str  # lower-cased, default port dropped
    target: str  # raw path and query, as received (not decoded); never a #fragment
    headers: Headers  # normalised (proxy.policy.request): what the origin may receive
    trusted: bool = False  # from a trusted proxy: the forwarding fields it sent were kept
    # A field name may hold ``_`` (``proxy.policy.spellings``); False only from
    # ``normalise_request``, which read the names anyway, so that a key need not scan them again.
    underscores: bool = True

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.target}"


@dataclass(frozen=True, slots=True)
class Freshness:
    """Everything about a stored response's freshness, computed once when it is stored.

    The current age is ``initial_age + (now - response_time)`` (RFC 9111 §4.2.3),
    so the hit path does one subtraction and one comparison.

    A ``response_time`` more than ``CLOCK_SLACK`` ahead of ``now`` was stamped by a clock that
    has gone back since (it was ahead, and was set right): the time the entry has been stored
    is unknown, and its age is taken as its whole lifetime (at least ``initial_age``), so it is
    stale and revalidated at its next use, never served as fresh for a day because the clock
    was a day ahead. (RFC 9111's ``max(0, now - response_time)`` keeps the age from going
    negative but would hold it at ``initial_age`` until the clock caught up.) It counts as
    stale by 0 s: ``stale-while-revalidate`` and ``stale-if-error`` may still serve it while
    it is revalidated or while the origin fails, as for any response just gone stale.
    """

    lifetime: float  # seconds; 0 when none was given
    source: str  # what decided the lifetime: s-maxage, max-age, expires, heuristic, rule, none
    initial_age: float  # corrected_initial_age of RFC 9111 §4.2.3
    response_time: float
    must_revalidate: bool = False  # must-revalidate, proxy-revalidate or s-maxage: never serve stale
    no_cache: bool = False  # unqualified no-cache: revalidate before every use
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    immutable: bool = False

    def age(self, now: float) -> float:
        resident = now - self.response_time
        if resident >= 0.0:  # the hit path: one comparison, where max() was a call
            return self.initial_age + resident
        if resident >= -CLOCK_SLACK:
            return self.initial_age
        return self.lifetime if self.lifetime > self.initial_age else self.initial_age

    def ttl(self, now: float) -> float:
        """Seconds of freshness left; negative once stale."""
        return self.lifetime - self.age(now)

    def may_serve_stale(self) -> bool:
        """May this response ever be served stale? Never when it said ``must-revalidate``,
        ``proxy-revalidate``, ``s-maxage`` or ``no-cache`` (RFC 9111 §4.2.4), whatever its
        stale windows, the request's ``max-stale`` or the rules say."""
        return not (self.must_revalidate or self.no_cache)

    def stamped_ahead(self, now: float) -> bool:
        """Whether this was stored by a clock ahead of ``now`` by more than ``CLOCK_SLACK`` (it
        has gone back since): the entry is stale whatever its lifetime (``age``).

        >>> f = Freshness(300.0, "max-age", 0.0, 1_000_000.0)
        >>> f.stamped_ahead(1_000_000.0 - 30), f.stamped_ahead(1_000_000.0 - 86400)
        (False, True)
        """
        return self.response_time - now > CLOCK_SLACK


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as the cache keeps it: status, headers and what was derived from them."""

    status: int
    reason: str
    headers: HeaderList  # hop-by-hop fields already removed
    request_time: float
    response_time: float
    freshness: Freshness
    vary: HeaderList = ()  # (lower-cased field name, normalised request value) at store time
    etag: str | None = None
    last_modified: str | None = None
    invalidated: bool = False  # soft purge: stale from now on, whatever its freshness said
    # Filled (or freshened) for a request with Cookie or Authorization: no heuristic lifetime,
    # whatever request revalidates it later (``proxy.policy.freshness``).
    credentials: bool = False
    # Filled (or freshened) for a request with Authorization: unless the response says public or
    # s-maxage, no rule ttl or override_origin, whatever request revalidates it later (§3.5).
    authorization: bool = False

    def header_dict(self) -> CIMultiDict[str]:
        return CIMultiDict(self.headers)

    def ttl(self, now: float) -> float:
        """Seconds of freshness left, as ``Cache-Status`` reports them: a soft-purged response
        is stale since the purge, so at most 0, whatever its lifetime had left."""
        ttl = self.freshness.ttl(now)
        return min(ttl, 0.0) if self.invalidated else ttl


_NO_TTLS: Mapping[int, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """The knobs the policy takes from config and the matched rule.

    Defaults are RFC 9111's behaviour with no operator choices: no TTL is added to
    responses without freshness information (heuristics aside).
    """

    ttl_by_status: Mapping[int, float] = field(default_factory=lambda: _NO_TTLS)
    # Rule TTL for statuses not listed in ttl_by_status, never for most errors (policy.statuses).
    ttl_default: float | None = None
    override_origin: bool = False  # rule TTL wins over the origin's Cache-Control / Expires
    stale_while_revalidate: float = 0.0  # used when the origin gives none
    stale_if_error: float = 0.0  # used when the origin gives none
    heuristic_fraction: float = 0.1  # of the time since Last-Modified (RFC 9111 §4.2.2)
    heuristic_max: float = 86400.0
    allow_set_cookie: bool = False
    client_cache_control: ClientCacheControl = "honor"
    targeted_fields: tuple[str, ...] = ("cachegate-cache-control", "cdn-cache-control")
    surrogate_device: str | None = "cachegate"  # obey Surrogate-Control for this device; None: ignore it
    max_object: int = 100 * 1024 * 1024
    # RFC 9111 §4.2.3's full formula, the Date's apparent age counted (``cache.apparent_age``);
    # False: the Age field plus the response delay alone (``freshness.corrected_initial_age``).
    apparent_age: bool = True

    def rule_ttl(self, status: int) -> float | None:
        """The rule's lifetime for ``status``: named in the table, else the default when it
        covers the status (an error status only when named: ``policy.statuses``)."""
        ttl = self.ttl_by_status.get(status)
        if ttl is not None:
            return ttl
        return self.ttl_default if default_ttl_covers(status) else None


DEFAULT_OPTIONS = CacheOptions()

EMPTY_HEADERS: Headers = CIMultiDictProxy(CIMultiDict())
