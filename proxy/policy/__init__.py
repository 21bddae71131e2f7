"""The caching decisions of RFC 9111, as pure functions over headers and times.

Nothing in this package performs I/O, reads the clock or imports asyncio, aiohttp
or diskcache: ``now`` is always a parameter. Each decision is a small frozen
dataclass naming what the engine must do next and why (``reason`` / ``detail``),
so the engine, the ``Cache-Status`` header, the logs and the metrics all report
the same cause.

Where is what:

- ``fields``         reading field values: lists, singletons, numbers, parameters (RFC 9110 §5.6)
- ``cache_control``  parsing Cache-Control and targeted fields (RFC 9111 §5.2, RFC 9213)
- ``httpdate``       HTTP-date parsing and formatting (RFC 9110 §5.6.7)
- ``freshness``      freshness lifetime, heuristics and current age (RFC 9111 §4.2)
- ``statuses``       heuristically cacheable statuses, and which a rule's ttl default covers (CPDoS)
- ``storability``    may this response be stored? (RFC 9111 §3)
- ``fill``           is a fetched response stored, and as what: §3 with the rules (engine and explain)
- ``keys``           primary cache key and Vary variant selection (RFC 9111 §2, §4.1)
- ``reuse``          may a stored response satisfy this request? (RFC 9111 §4)
- ``reply``          the 200 / 304 / 206 / 416 head of a reply from a stored response
- ``validation``     conditional requests and handling of their answers (RFC 9111 §4.3)
- ``invalidation``   what unsafe methods invalidate (RFC 9111 §4.4)
- ``ranges``         answering Range requests (RFC 9110 §14)
- ``partial``        stored 206 parts, the ranges they answer, combining them (RFC 9111 §3.3-3.4)
- ``cache_status``   the ``Cache-Status`` (RFC 9211) and ``X-Cache-Status`` values
"""
