"""The operator's console on the admin listener: a live dashboard at ``GET /``.

The page, its script and its style sheet are static files of this package
(``proxy/web/static``), served from here with no build step and nothing from
other origins. They hold no data: everything the page shows comes from the admin
API (``/cache``, ``/explain``, ``/purge``, ``/reload``, ``/upstreams``, ``/cluster``
when present) and from ``GET /console/api/live``, which ``cachegate top`` reads too.

Security, with the admin token the API uses:

- The page, its files and the login call are public; they hold nothing. A browser
  logs in by posting the token as JSON to ``/console/api/login``; the answer sets a session
  cookie (``HttpOnly``, ``SameSite=Strict``, ``Path=/``) and gives the session's secret
  (``csrf``), which only the login answer ever holds. ``auth_middleware``
  (``proxy.web.admin``) takes a valid session cookie wherever it takes ``Authorization:
  Bearer`` only together with that secret in ``X-CSRF-Token``, on every method, GET included.
  Why: cookies are not port-scoped, so a browser sends the session cookie to every other web
  app on the same host (any port), and whoever runs one could replay it; the page keeps the
  secret in ``sessionStorage``, which is scoped to scheme, host *and port*, so nothing on
  another port ever sees it. ``/console/api/session`` says whether the cookie and secret it
  is sent are a live session, and never gives the secret out. Sessions live in the admin
  process's memory for ``SESSION_LIFETIME`` and end with logout, with a restart, or when a
  reload changes the token.
- Every page and file is sent with a strict Content-Security-Policy: scripts,
  styles and fetches from this origin only, no inline script or style, no frames.
- The page's calls are same-origin ``fetch`` with ``Content-Type: application/json``
  and ``X-CSRF-Token``: no HTML form ever posts, so Origin/Sec-Fetch-Site and
  content-type checks in front of the admin API let them through by construction.

Without ``admin.token`` (the admin listener is then loopback only) the API is open,
and so is the console: it opens on the dashboard.

The live numbers: a background task samples every process's cumulative counters
once a second (``proxy.live.Series``; with ``--workers N`` one small control call
per worker: ``console_totals``), and every ``LIVE_TABLES_EVERY`` samples the top
URLs and not-stored reasons (``console_live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.errors import BadRequest
from proxy.inspection import Inspector
from proxy.live import (
    Answer,
    Kept,
    Series,
    Totals,
    merge_snapshots,
    ratios,
    sum_tables,
    sum_upstreams,
    upstreams_of_workers,
)
from proxy.metrics import REQUEST_BUCKETS
from proxy.policy.request import CONSOLE_COOKIE
from proxy.runtime import Runtime

log = logging.getLogger("cachegate.console")

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"console.js": "text/javascript", "console.css": "text/css"}
COOKIE = CONSOLE_COOKIE  # removed from what the proxy forwards (``proxy.policy.request``)
CSRF_HEADER = "X-CSRF-Token"
SESSION_LIFETIME = 12 * 3600.0
MAX_SESSIONS = 256
SAMPLE_EVERY = 1.0  # seconds between samples of the counters
LIVE_TABLES_EVERY = 2  # samples between refreshes of the top URLs and not-stored reasons
TOP_TABLE = 200  # URLs each process reports for the top list
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}  # (and Cache-Control: no-store, as every answer of the admin listener: ``create_admin_app``)
PUBLIC_PATHS = frozenset({"/", "/console/api/login", "/console/api/session"})
SAFE_METHODS = frozenset({"GET", "HEAD"})


def _digest(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Session:
    csrf: str
    token_digest: bytes  # the admin token it was opened with: a changed token ends it
    expires: float


class Sessions:
    """Console sessions of this admin listener (in memory; a restart logs everyone out)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._by_id: dict[bytes, Session] = {}  # sha256(session id) -> session
        self._clock = clock

    def open(self, token: str) -> tuple[str, Session]:
        now = self._clock()
        for k in [k for k, s in self._by_id.items() if s.expires <= now]:
            del self._by_id[k]
        while len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id, key=lambda k: self._by_id[k].expires)
            del self._by_id[oldest]
        sid = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), _digest(token), now + SESSION_LIFETIME)
        self._by_id[_digest(sid)] = session
        return sid, session

    def get(self, sid: str | None, token: str) -> Session | None:
        """The live session ``sid`` names, opened with ``token``; None otherwise."""
        if not sid:
            return None
        session = self._by_id.get(_digest(sid))
        if session is None:
            return None
        if session.expires <= self._clock() or not hmac.compare_digest(session.token_digest, _digest(token)):
            self._by_id.pop(_digest(sid), None)
            return None
        return session

    def close(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(_digest(sid), None)

    def __len__(self) -> int:
        return len(self._by_id)


# -- who may call what ----------------------------------------------------------------------------


def console_access(request: web.Request, token: str) -> str:
    """For a request without the right bearer token: ``"public"`` (the page, its files, login,
    session), ``"session"`` (a valid session cookie with its secret in ``X-CSRF-Token``),
    ``"csrf"`` (a valid session cookie but a missing or wrong secret: the cookie alone, as a
    browser also sends it to other ports of this host, opens nothing), or ``"none"``."""
    path = request.path
    if path in PUBLIC_PATHS or (path.startswith("/console/static/") and request.method in SAFE_METHODS):
        return "public"
    console = request.app.get(CONSOLE)
    if console is None:
        return "none"
    session = console.sessions.get(request.cookies.get(COOKIE), token)
    if session is None:
        return "none"
    return "session" if secret_matches(request, session) else "csrf"


def secret_matches(request: web.Request, session: Session) -> bool:
    """Whether the request carries the session's secret (the login answer's ``csrf``)."""
    given = request.headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, session.csrf.encode())


# -- the live numbers -----------------------------------------------------------------------------


def process_totals(runtime: Runtime, owner: bool) -> Totals:
    """This process's cumulative counters for the console's series (``proxy.live.Totals``).

    ``owner``: the process that owns the cache directory (the supervisor, or the one process
    without workers) also reports the tiers: the memory tier's entries and bytes (``memory``)
    and the evictions of both tiers. The memory tier is the machine's shared arena, so every
    process reads the same whole-machine figures from it: counted from each worker too, they
    would be counted once per process (as /stats and /metrics take them from the supervisor
    alone). A worker's ``evictions`` is 0 and it has no ``memory``."""
    m = runtime.metrics
    totals: Totals = {
        "pid": os.getpid(),
        "worker": runtime.worker_id,  # None for the supervisor or the one process
        "requests": m.request_counts(),
        "bytes": {labels[0]: int(v) for labels, v in m.response_bytes.values().items()},
        "origin": m.sent_upstream(),
        "fills": int(m.fills.values()[()]),
        "evictions": 0,
        "latency": {labels[0]: counts for labels, counts in m.request_duration.values().items()},
    }
    if owner:
        memory = runtime.storage.memory
        evictions = memory.evictions
        if runtime.storage.disk is not None:
            evictions += runtime.storage.upkeep.index_rows_dropped
        totals["evictions"] = int(evictions)
        totals["memory"] = {"entries": len(memory), "bytes": memory.bytes}
    return totals


def process_tables(runtime: Runtime, now: float, top: int) -> Answer:
    """This process's top URLs and not-stored reasons (``LiveStats.snapshot``), with its pid and
    worker id: ``Kept`` keeps a killed worker's counts by process."""
    return {"pid": os.getpid(), "worker": runtime.worker_id, **runtime.metrics.live.snapshot(now, top)}


def register_console_calls(runtime: Runtime) -> None:
    """The calls the supervisor's console makes to a worker (``runtime.control`` is its channel)."""
    channel = runtime.control
    assert channel is not None

    async def console_totals() -> Totals:
        return process_totals(runtime, owner=False)

    async def console_live(top: int) -> dict[str, Any]:
        return process_tables(runtime, time.time(), top)

    channel.handlers.update({"console_totals": console_totals, "console_live": console_live})


class LiveFeed:
    """Samples the counters of every process once a second and answers ``/console/api/live``."""

    def __init__(self, runtime: Runtime, inspector: Inspector) -> None:
        self._runtime = runtime
        self.inspector = inspector
        self.series = Series(REQUEST_BUCKETS)
        self.started = time.monotonic()  # (as the Inspector's: a clock step is no uptime)
        # Made at start: ``seq`` starts again at 0 with a restart, so a client holding points
        # (the console's charts) tells by this that they are another process's.
        self.instance = secrets.token_hex(8)
        self.memory: dict[str, int] = {"entries": 0, "bytes": 0}
        self.processes = 1
        self.tables: dict[str, Any] = {"top_urls": [], "not_stored": []}
        # What the tables count since start (not-stored reasons) and the workers' upstream
        # counters, kept by process (``Kept``): a worker killed and started again must not take
        # its counts out of the totals shown, which only go up (the gauges, such as requests in
        # flight, are the workers' that answered this time).
        self.table_counts = Kept(sum_tables)
        self.upstream_counts = Kept(sum_upstreams)
        self.upstream_workers: list[Any] = []
        self._ticks = 0
        self.task: asyncio.Future[None] | None = None  # the sampling loop (tests stop it)

    async def sample(self, now: float | None = None) -> None:
        """One sample of every process's totals (and, every LIVE_TABLES_EVERY, the tables)."""
        runtime = self._runtime
        elapsed_at = time.monotonic() if now is None else None
        now = time.time() if now is None else now
        parts = [process_totals(runtime, owner=True)]
        if self.inspector.multi:
            parts += await self.inspector.ask_workers("console_totals")
        self.processes = max(1, len(parts) - 1) if self.inspector.multi else 1
        own = parts[0]["memory"]  # the machine's shared memory tier, counted once (process_totals)
        self.memory = {k: int(own[k]) for k in ("entries", "bytes")}
        self.series.add(now, parts, elapsed_at)
        if self._ticks % LIVE_TABLES_EVERY == 0:
            await self.refresh_tables(now)
        self._ticks += 1

    async def refresh_tables(self, now: float | None = None) -> None:
        runtime = self._runtime
        now = time.time() if now is None else now
        snaps = [process_tables(runtime, now, TOP_TABLE)]
        if self.inspector.multi:
            snaps += await self.inspector.ask_workers("console_live", top=TOP_TABLE)
            self.upstream_workers = await self.inspector.ask_workers("upstream_states")
            self.upstream_counts.add(self.upstream_workers)
        self.table_counts.add(snaps)
        self.tables = merge_snapshots(self.table_counts.parts(), TOP_TABLE, now)

    async def run(self) -> None:
        while True:
            # Stopped once the store is closed: the admin app (and this task with it) can
            # outlive it while a request finishes, and a sample read the closed shared memory.
            if self._runtime.storage.tiers.closed:
                return
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("console sample failed")
            await asyncio.sleep(SAMPLE_EVERY)

    async def view(self, since: int, top: int) -> dict[str, Any]:
        """The body of ``GET /console/api/live``."""
        runtime = self._runtime
        settings = runtime.settings
        minute = self.series.window(60)
        minute.update(ratios(minute["requests"], minute["bytes"], minute["origin"]))
        totals = self.series.totals or {"requests": {}, "bytes": {}, "origin": 0}
        since_start = {"requests": totals["requests"], "bytes": totals["bytes"],
                       "origin": totals["origin"], "fills": totals.get("fills", 0),
                       **ratios(totals["requests"], totals["bytes"], totals["origin"])}
        # cache.memory is the whole machine's budget, shared by every worker (docs/storage.md).
        storage: dict[str, Any] = {"memory": {**self.memory, "budget": settings.cache.memory}}
        disk = runtime.storage.disk
        if disk is not None and settings.cache.disk is not None:
            storage["disk"] = {"entries": await self.inspector.disk_entries(),
                               "bytes": await runtime.storage.run(disk.volume),
                               "budget": settings.cache.disk.size}
        upstreams = runtime.pool.snapshot()
        if self.upstream_workers:
            # Workers send the requests (and eject upstreams passively); the supervisor's pool
            # runs the active health checks: the same view as GET /upstreams' top level.
            upstreams = upstreams_of_workers(upstreams, self.upstream_workers, self.upstream_counts.total())
        return {
            "instance": self.instance,
            "seq": self.series.seq,
            "interval": SAMPLE_EVERY,
            "points": self.series.since(since),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "workers": self.processes if self.inspector.multi else None,
            "last_minute": minute,
            "since_start": since_start,
            "latency": self.series.latency(),
            "storage": storage,
            "upstreams": upstreams,
            "top_urls": self.tables["top_urls"][:top],
            "not_stored": self.tables["not_stored"][:top],
        }


@dataclass
class Console:
    runtime: Runtime
    sessions: Sessions
    feed: LiveFeed


CONSOLE = web.AppKey("console", Console)


# -- handlers -------------------------------------------------------------------------------------


def _page(body: bytes, content_type: str) -> web.Response:
    return web.Response(body=body, headers={**PAGE_HEADERS, "Content-Type": f"{content_type}; charset=utf-8"})


async def index(request: web.Request) -> web.Response:
    return _page((STATIC / "console.html").read_bytes(), "text/html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kind = STATIC_FILES.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    return _page((STATIC / name).read_bytes(), kind)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)  # (Cache-Control: no-store: ``create_admin_app``)


def _runtime(request: web.Request) -> Runtime:
    return request.app[CONSOLE].runtime


async def login(request: web.Request) -> web.Response:
    """``{"token": "..."}`` as JSON -> the session cookie and the session's secret (``csrf``, to
    send in ``X-CSRF-Token`` with every call: this answer is the only one that holds it); 401
    for a wrong token."""
    runtime = _runtime(request)
    token = runtime.settings.admin.token
    if request.content_type != "application/json":
        return _json({"error": "send the token as JSON: Content-Type: application/json"}, 415)
    from proxy.web.admin import read_json  # the admin API's one reader of untrusted JSON

    doc = await read_json(request)
    if not isinstance(doc, dict) or set(doc) - {"token"} or not isinstance(doc.get("token"), str):
        raise BadRequest('the body must be {"token": "<admin token>"}')
    if token is None:
        return _json({"authenticated": True, "token_required": False, "csrf": None})
    from proxy.web.admin import ADMIN, token_matches, too_many_guesses  # the admin module mounts this one

    refusal = too_many_guesses(request)  # wrong tokens tried too fast: 429, the token not compared
    if refusal is not None:
        return refusal
    if not token_matches(doc["token"], token):
        runtime.metrics.admin_unauthorized.inc()
        request.app[ADMIN].guesses.failed(request.remote or "")
        return _json({"error": "wrong admin token"}, 401)
    request.app[ADMIN].guesses.succeeded(request.remote or "")
    sid, session = request.app[CONSOLE].sessions.open(token)
    response = _json({"authenticated": True, "token_required": True, "csrf": session.csrf})
    response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/")
    return response


async def session_info(request: web.Request) -> web.Response:
    """Whether the session cookie and the secret in ``X-CSRF-Token`` sent with this call are a
    live session (a page reloaded in the same tab sends the secret it kept). The secret itself
    is never given here: a cookie replayed from another port's request must learn nothing."""
    token = _runtime(request).settings.admin.token
    if token is None:
        return _json({"authenticated": True, "token_required": False})
    session = request.app[CONSOLE].sessions.get(request.cookies.get(COOKIE), token)
    return _json({"authenticated": session is not None and secret_matches(request, session),
                  "token_required": True})


async def logout(request: web.Request) -> web.Response:
    """End this browser's session; the body is none or ``{}`` (anything else: 400, still logged in)."""
    from proxy.web.admin import read_no_fields

    await read_no_fields(request)
    request.app[CONSOLE].sessions.close(request.cookies.get(COOKIE))
    response = _json({"authenticated": False})
    response.del_cookie(COOKIE, path="/")
    return response


async def live(request: web.Request) -> web.Response:
    """The dashboard's numbers: new points after ``since``, the last minute, latency, storage,
    upstreams, top URLs and not-stored reasons (``top`` of each, default 20)."""
    from proxy.web.admin import query_params

    params = query_params(request, ("since", "top"))
    values = {}
    for name, default, limit in (("since", 0, 1 << 62), ("top", 20, 200)):
        text = params.get(name, [str(default)])[0]
        # ASCII only: str.isdigit() also accepts '²' and '①', which int() refuses.
        if not (text.isascii() and text.isdigit()) or int(text) > limit:
            raise BadRequest(f"{name!r} must be a whole number from 0 to {limit}")
        values[name] = int(text)
    return _json(await request.app[CONSOLE].feed.view(values["since"], values["top"]))


def setup_console(app: web.Application, runtime: Runtime, inspector: Inspector) -> None:
    """Mount the console on the admin app (routes, sessions, the sampling task)."""
    console = Console(runtime, Sessions(), LiveFeed(runtime, inspector))
    app[CONSOLE] = console

    async def sampling(app: web.Application) -> AsyncIterator[None]:
        task = console.feed.task = asyncio.ensure_future(console.feed.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(sampling)
    app.router.add_get("/", index)
    app.router.add_get("/console/static/{name}", static)
    app.router.add_post("/console/api/login", login)
    app.router.add_get("/console/api/session", session_info)
    app.router.add_post("/console/api/logout", logout)
    app.router.add_get("/console/api/live", live)


__all__ = ["CONSOLE", "console_access", "register_console_calls", "setup_console"]
