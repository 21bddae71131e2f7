"""Typed application keys (aiohttp: state lives on the Application, never in globals)."""

from __future__ import annotations

from aiohttp import web

from proxy.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
