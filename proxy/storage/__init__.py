"""Where responses live: a byte-budgeted memory tier in front of a diskcache disk tier.

- ``entry``   what is stored: the metadata of one variant (``Entry``), serialised apart from its body
- ``memory``  the per-process memory tier (LRU or LFU, byte budget)
- ``disk``    the shared disk tier (diskcache ``FanoutCache``; the only importer of diskcache)
- ``index``   the URL and tag index that makes purge by prefix and by tag cheap
- ``tiered``  the two tiers as one store: lookup, promotion, streamed writes, purge
"""
