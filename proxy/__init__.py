"""cachegate: an HTTP caching reverse proxy (RFC 9111) on aiohttp."""

__version__ = "0.1.0"
