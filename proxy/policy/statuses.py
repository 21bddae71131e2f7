"""Status codes as the caching policy classifies them (RFC 9110 §15).

``HEURISTICALLY_CACHEABLE`` are the statuses RFC 9110 §15.1 lets a cache store
without explicit freshness. ``default_ttl_covers`` decides which statuses a rule's
``ttl`` default (``default:`` in the table, or a lone duration) may give a lifetime:
never an error status outside that list. A 400 or 431 that one client caused with a
field the origin rejects (an oversized header, a meta character), or a 500 of a
moment, stored under the page's key would be served to every client after it: the
cache-poisoned denial of service (CPDoS, Nguyen et al., CCS 2019). An error status is
stored by a rule only when its table names it.

>>> [s for s in (200, 302, 400, 404, 410, 429, 431, 500, 501, 503) if default_ttl_covers(s)]
[200, 302, 404, 410, 501]
"""

from __future__ import annotations

# RFC 9110 §15.1: statuses that are heuristically cacheable by default.
HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})


def default_ttl_covers(status: int) -> bool:
    """Whether a rule's ``ttl`` default may apply to ``status`` (see the module docstring)."""
    return status < 400 or status in HEURISTICALLY_CACHEABLE
