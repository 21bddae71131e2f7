"""The admin API: purge, reload, metrics, health. Closed to strangers.

With a token configured, every endpoint but ``/healthz`` requires
``Authorization: Bearer <token>`` (compared in constant time); without one, the
config refuses any listener but loopback. Bad JSON, unknown fields and wrong
types answer 400 with a JSON error, and nothing is purged.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.errors import BadRequest
from proxy.purge import PurgeSpec, parse_purge
from proxy.runtime import Runtime

log = logging.getLogger("cachegate.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RuntimeRef = Callable[[], Runtime]
PURGE = web.AppKey("purge", Callable[[PurgeSpec], Awaitable[int]])
RUNTIME_REF = web.AppKey("runtime_ref", RuntimeRef)


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[RUNTIME_REF]().settings.admin.token
    if token is None or request.path == "/healthz":
        return await handler(request)
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        return web.json_response({"error": "admin token required: Authorization: Bearer <token>"},
                                 status=401, headers={"WWW-Authenticate": 'Bearer realm="cachegate"'})
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return json_error(exc.status, exc.reason)
        raise
    except BadRequest as exc:
        return json_error(400, str(exc))
    except Exception:
        log.exception("admin error on %s", request.path)
        return json_error(500, "internal error")


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > 1 << 20:
        raise BadRequest("request body too large")
    raw = await request.read()
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None


async def purge(request: web.Request) -> web.Response:
    spec = parse_purge(await read_json(request))
    count = await request.app[PURGE](spec)
    return web.json_response({"purged": count, "soft": spec.soft})


async def reload(request: web.Request) -> web.Response:
    """Re-read config and rules: 200 when applied; 400 with every FILE:LINE problem when not
    (the running config stays); 501 when this process was started without a config file."""
    runtime = request.app[RUNTIME_REF]()
    if runtime.reload_config is None:
        return json_error(501, "reload is not available in this process")
    result = runtime.reload_config()
    if not result.ok:
        return web.json_response({"error": "config rejected; the running config stays",
                                  "problems": result.problems}, status=400)
    return web.json_response({"reloaded": True, "rules": result.rules,
                              "rule_files": list(result.rule_files),
                              "restart_required": result.restart_required})


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME_REF]()
    return web.Response(body=runtime.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_admin_app(runtime_ref: RuntimeRef,
                     purge_fn: Callable[[PurgeSpec], Awaitable[int]] | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1 << 20)
    app[RUNTIME_REF] = runtime_ref
    app[PURGE] = purge_fn or (lambda spec: runtime_ref().purge(spec))
    app.router.add_post("/purge", purge)
    app.router.add_post("/reload", reload)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app
