"""The thin aiohttp layer: client-facing proxy handler, admin API, middlewares, server runner."""
