"""The admin API (purge, explain, inspection, stats, metrics, reload, health) and the PURGE method.

Closed to strangers: with ``admin.token`` set, every endpoint but ``/healthz``
requires ``Authorization: Bearer <token>`` (compared in constant time: both sides
are hashed first, so neither the content nor the length of the token leaks through
timing); the config refuses a token under 16 characters on a listener that is not
loopback, and any listener but loopback without a token. Without a token, the guard
(``proxy.web.admin_guard``) refuses what a web page could send through a browser on
this machine: a foreign ``Host`` (DNS rebinding), a state-changing request from
another origin or without ``Content-Type: application/json`` (CSRF).
Bad, hostile (nested deeper than 32 levels, duplicate keys, NaN) or oversized JSON,
unknown fields or parameters, wrong types and URLs for a host cachegate does not
serve answer 400 (413 over 1 MiB) with ``{"error": "..."}``, and nothing is purged.

Which hosts cachegate serves: the patterns in ``admin.hosts`` when set; otherwise
any host a client has asked this proxy for since it started, the configured
listen address, or a host with entries in the store (so a typo in a purge URL is
an error, not a silent no-op).

``PURGE <path>`` on the *client* listener (the Varnish/nginx convention) purges
that URL (every variant, as ``POST /purge {"urls": [...]}``) when the TCP peer's
address is in ``admin.purge_from`` and it is no browser's (``admin_guard.decide_purge_method``:
no ``Origin``, no cross-site ``Sec-Fetch-Site``); anyone else gets 403. Without ``purge_from``
(the default) the method is switched off: 405. Not loopback by default, because a
TLS terminator or sidecar on the same host makes every client 127.0.0.1. The admin
token does not open it: the token is the key to the whole admin API, and the client
listener is the public one (often plain HTTP behind a terminator, its headers seen
and logged by layers cachegate does not control); nothing is lost, since ``POST
/purge`` on the admin listener does the same with the token. PURGE is never
forwarded to the origin (a 2xx from it would invalidate the URL for anyone who
asks, RFC 9111 §4.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from multidict import MultiMapping

from proxy.admin_client import ADMIN_FIELD
from proxy.errors import BadRequest, ClientBodyError, ClientGone
from proxy.explain import (
    ExplainRequest,
    RangeFill,
    StoredVariant,
    explain_trace,
    field_problem,
    limits_refusal,
    request_body,
    route_of,
    unbypassed,
    would_refuse,
)
from proxy.explain import request_head as explain_head
from proxy.inspection import Inspector, group_copies, variant_view
from proxy.live import upstreams_of_workers
from proxy.policy.fields import is_token
from proxy.policy.keys import cache_key, part_key
from proxy.policy.messages import HeaderList, RequestHead
from proxy.policy.request import ALLOW as FORWARDED_METHODS
from proxy.policy.request import DEFAULT_MAX_HEAD, LookUp, Refusal
from proxy.purge import (
    PurgeOutcome,
    PurgeSpec,
    PurgeUnavailable,
    normalise_url,
    read_purge,
    url_host,
    url_key_shapes,
)
from proxy.runtime import Runtime
from proxy.shown import shown
from proxy.web.admin_guard import (
    SAFE_METHODS,
    GuardSettings,
    GuessLimiter,
    RefusalReason,
    decide_purge_method,
    guard_middleware,
    loads_untrusted,
)
from proxy.web.bodyreader import BodyReader
from proxy.web.console import CONSOLE, CSRF_HEADER, console_access, setup_console
from proxy.web.heads import asks_to_close, ends_connection, from_response, version_refusal

log = logging.getLogger("cachegate.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PurgeFn = Callable[[PurgeSpec], Awaitable[PurgeOutcome]]
SOFT_PURGE_HEADER = "Cachegate-Soft-Purge"
MAX_BODY = 1 << 20


@dataclass
class AdminContext:
    runtime: Runtime
    purge: PurgeFn
    inspector: Inspector
    guesses: GuessLimiter = field(default_factory=GuessLimiter)
    refusals: RefusalLog = field(default_factory=lambda: RefusalLog())


ADMIN = web.AppKey("admin", AdminContext)


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def token_matches(given: str | None, token: str) -> bool:
    """Constant time, whatever the lengths: compare digests, never the strings themselves."""
    if given is None:
        return False
    def digest(s: str) -> bytes:
        return hashlib.sha256(s.encode("utf-8", "surrogateescape")).digest()

    return hmac.compare_digest(digest(given), digest(token))


def bearer(headers: MultiMapping[str]) -> str | None:
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


BEARER_OK = web.RequestKey("bearer_ok", bool)


def too_many_guesses(request: web.Request) -> web.Response | None:
    """The 429 for a request that presents a token while wrong tokens are being tried faster
    than ``GuessLimiter`` allows (logged once per run of refusals, each one counted); None
    when its token may be compared."""
    ctx = request.app[ADMIN]
    guesses = ctx.guesses
    client = request.remote or ""
    wait = guesses.retry_after(client)
    if not wait:
        return None
    ctx.runtime.metrics.admin_refused.labels("rate").inc()
    run = guesses.refused(client)
    if run == "network":
        log.warning("admin: too many wrong tokens from %s (more than %d, then %g a second): its "
                    "requests that present a token are answered 429 for now (Host %r)",
                    client, guesses.burst, guesses.per_second, request.headers.get("Host"))
    elif run == "all":
        log.warning("admin: too many wrong tokens from all networks together (more than %d, then %g a "
                    "second): requests that present a token are answered 429 for now, but from networks "
                    "that presented the right one before (this one from %s, Host %r)",
                    guesses.total_burst, guesses.total_per_second, client, request.headers.get("Host"))
    return web.json_response({"error": "too many wrong admin tokens: try again later"}, status=429,
                             headers={"Retry-After": str(wait)})


@web.middleware
async def bearer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Compare a bearer token once, before the guard (which lets the right one name any Host),
    under the limit on wrong tokens."""
    token = request.app[ADMIN].runtime.settings.admin.token
    given = bearer(request.headers)
    ok = False
    if token is not None and given is not None and request.path != "/healthz":
        refusal = too_many_guesses(request)
        if refusal is not None:
            return refusal
        ok = token_matches(given, token)
        if ok:
            request.app[ADMIN].guesses.succeeded(request.remote or "")
        else:
            request.app[ADMIN].guesses.failed(request.remote or "")
    request[BEARER_OK] = ok
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    runtime = request.app[ADMIN].runtime
    token = runtime.settings.admin.token
    # Without a token the listener is loopback only, and the guard let this one in.
    request[AUTHENTICATED] = token is None or request.get(BEARER_OK, False)
    if token is None or request.path == "/healthz":
        return await handler(request)
    if not request.get(BEARER_OK, False):
        access = console_access(request, token)  # the console's page, or a logged-in browser
        request[AUTHENTICATED] = access == "session"
        if access in ("public", "session"):
            return await handler(request)
        if access == "csrf":  # 401, not 403: the console tab shows its login (another tab's
            # login replaced this browser's one cookie, so this tab's secret opens nothing now)
            runtime.metrics.admin_refused.labels("csrf").inc()
            return web.json_response(
                {"error": f"missing or wrong {CSRF_HEADER} header for this console session: every "
                          "call needs the session's secret (the login answer's csrf) with the cookie; "
                          "the cookie alone opens nothing"},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="cachegate"'})
        runtime.metrics.admin_unauthorized.inc()
        return web.json_response({"error": "admin token required: Authorization: Bearer <token>"},
                                 status=401, headers={"WWW-Authenticate": 'Bearer realm="cachegate"'})
    return await handler(request)


AUTHENTICATED = web.RequestKey("admin_authenticated", bool)  # the right token, or a session
LOGIN_PATH = "/console/api/login"  # public: its 200 is a right token, any other answer is not
AUDIT = web.RequestKey("admin_audit", str)  # what a state-changing request did, for its log line
REFUSED = frozenset({401, 403, 405, 415, 429})  # refused before (or instead of) being carried out
READ_ONLY_POSTS = frozenset({"/explain"})  # a POST that changes nothing (a long query's form)
SHOWN_PATH = 200  # characters of a path a log line shows


@dataclass
class _Window:
    """One client network's minute: when it began, lines it may still log, lines left out."""

    since: float
    left: int
    dropped: int = 0


class RefusalLog:
    """Lines about admin requests that did not authenticate (refusals, and any answer to a
    request without the right token or a session: the public login's 400, 408 and 413), at
    most ``burst`` a ``every`` seconds per client network (``GuessLimiter.key``: an IPv4 /24,
    an IPv6 /64, loopback) and ``total`` in all: a client sending them as fast as it can must
    not fill the log, nor spend another client's lines. What is left out is counted: said on
    that network's next line, or, when none comes, in one line once its minute is over (a
    timer; at close, whatever is still counted). The metrics count each request."""

    MAX_NETWORKS = 1024  # networks remembered (the oldest forgotten first, their counts kept)
    NAMED = 5  # networks named in a line about what was left out (the rest counted)

    def __init__(self, burst: int = 10, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, total: int | None = None) -> None:
        self.burst, self.every, self._clock = burst, every, clock
        self.total = burst * 10 if total is None else total
        self._nets: OrderedDict[str, _Window] = OrderedDict()
        self._all = _Window(-math.inf, 0)
        self._forgotten = 0  # left out by networks no longer remembered
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, request: web.Request, status: int, why: str) -> None:
        self.note(request, logging.WARNING, f"admin {_shown_method(request)} {_shown_path(request)} "
                                            f"from {request.remote} refused: {status} {why}")

    def note(self, request: web.Request, level: int, line: str) -> None:
        """Log ``line`` if the client's network and the whole have lines left; else count it."""
        net = GuessLimiter.key(request.remote or "")
        now = self._clock()
        window = self._nets.get(net)
        if window is None or now - window.since >= self.every:
            window = _Window(now, self.burst, window.dropped if window else 0)
            self._nets[net] = window
            while len(self._nets) > self.MAX_NETWORKS:
                self._forgotten += self._nets.popitem(last=False)[1].dropped
        self._nets.move_to_end(net)
        if now - self._all.since >= self.every:
            self._all.since, self._all.left = now, self.total
        if window.left == 0 or self._all.left == 0:
            window.dropped += 1
            self._schedule(window.since + self.every - now)
            return
        window.left -= 1
        self._all.left -= 1
        dropped, window.dropped = window.dropped, 0
        more = f" ({dropped} more from {net} before it not logged)" if dropped else ""
        log.log(level, "%s%s", line, more)

    def _schedule(self, delay: float) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self.flush)

    def flush(self, final: bool = False) -> None:
        """One line for what networks whose minute is over (every one, when ``final``) left out."""
        self._timer = None
        now = self._clock()
        due = sorted(((w.dropped, net) for net, w in self._nets.items()
                      if w.dropped and (final or now - w.since >= self.every)), reverse=True)
        for _, net in due:
            self._nets[net].dropped = 0
        forgotten, self._forgotten = self._forgotten, 0
        if due or forgotten:
            named = [f"{net}: {n}" for n, net in due[:self.NAMED]]
            others = sum(n for n, _ in due[self.NAMED:]) + forgotten
            if others:
                named.append(f"{others} from other networks")
            log.warning("admin: %d more requests that did not authenticate were not logged (over "
                        "%d lines a minute per client network, %d in all): %s",
                        sum(n for n, _ in due) + forgotten, self.burst, self.total, ", ".join(named))
        waits = [w.since + self.every - now for w in self._nets.values() if w.dropped]
        if waits and not final:
            self._schedule(min(waits))

    def close(self) -> None:
        """Write what is still counted, and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush(final=True)


def _shown_method(request: web.Request) -> str:
    return shown(request.method[:20], keep="")


def _shown_path(request: web.Request) -> str:
    path = request.raw_path
    return shown(path if len(path) <= SHOWN_PATH else path[:SHOWN_PATH] + "...", keep="")


def _error_of(response: web.StreamResponse) -> str:
    """The ``error`` of a JSON error answer (cut short), or ''."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or len(body) > 1 << 16:
        return ""
    try:
        error = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        return ""
    text = str(error)
    return shown(text if len(text) <= 300 else text[:300] + "...", keep="")


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line on ``cachegate.admin`` for each state-changing request (INFO: who, what, the
    status and what it did) and each refused one (WARNING, ``RefusalLog``'s budget); read-only
    GETs are not logged (scrapes and probes would bury the rest)."""
    status, response = 0, None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # (a redirect: error_middleware answers every error)
        status = exc.status
        raise
    finally:
        _audit(request, status, response)


def _audit(request: web.Request, status: int, response: web.StreamResponse | None) -> None:
    refusals = request.app[ADMIN].refusals
    if status in REFUSED:
        refusals.refused(request, status, _error_of(response) if response else "")
    elif request.method not in SAFE_METHODS and request.path not in READ_ONLY_POSTS:
        done = request.get(AUDIT, "")
        error = _error_of(response) if response is not None and status >= 400 else ""
        did = f": {shown(done, keep='')}" if done else ""
        line = (f"admin {_shown_method(request)} {_shown_path(request)} from {request.remote}: "
                f"{status or 'not answered (the client went away)'}{did}{f': {error}' if error else ''}")
        # Only a request that authenticated (it cost a token) is logged whole; any other answer
        # (the public login's 400s, 408s, 413s) goes through the budget, as refusals do.
        if request.get(AUTHENTICATED, False) or (request.path == LOGIN_PATH and status == 200):
            log.info("%s", line)
        else:
            refusals.note(request, logging.INFO, line)


@web.middleware
async def chunked_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Close the connection after a request whose body was chunked (``heads.ends_connection``:
    aiohttp's parser would carry its last trailer field into the next request)."""
    resp = await handler(request)
    if ends_connection(request.headers):
        resp.force_close()
    return resp


@web.middleware
async def version_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request line in a version this listener does not speak (``HTTP/2.0``, ``HTTP/0.9``) is
    refused before any route, token or guard, as the client listener refuses it
    (``heads.version_refusal``), in HTTP/1.1, and the connection closes: it was answered
    ``HTTP/2.0 200 OK`` with an HTTP/1 head."""
    if request.version[0] == 1 or (refused := version_refusal(request.version)) is None:
        return await handler(request)
    log.info("admin: refused %s %s from %s: %d %s", _shown_method(request), _shown_path(request),
             request.remote, *refused)
    response = from_response(json_error(*refused), request.method)
    response.force_close()  # nothing more on this connection is read as HTTP/1.x
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = TOO_LARGE if exc.status == 413 else exc.reason
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = " or ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}: it takes {allowed}"
        response = json_error(exc.status, message)
        # Its fields but the body's: a 405's Allow is a MUST (RFC 9110 §15.5.6).
        for name, value in exc.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                response.headers.add(name, value)
        return response
    except (ConnectionError, ClientGone) as exc:
        # The client hung up (mid-body, most often): nobody to answer, and not an internal error
        # (a hostile client must not fill the log with tracebacks). Nothing was done: the body
        # was not whole.
        log.debug("admin client %s went away during %s %s: %r", request.remote, request.method,
                  request.path, exc)
        return json_error(400, "the client went away")
    except ClientBodyError as exc:  # (a BadRequest) the body did not come in time: it never will
        response = json_error(408, f"{exc}: the request body did not arrive in time")
        # Once it is written, closed by a lingering close (``LimitedHandler.closed_after``): not
        # aiohttp's read of what is left of the body.
        response.force_close()
        return response
    except BadRequest as exc:
        return json_error(400, str(exc))
    except PurgeUnavailable as exc:
        return json_error(503, str(exc))
    except Exception:
        log.exception("admin error on %s", request.path)
        return json_error(500, "internal error")


TOO_LARGE = f"the request body is over {MAX_BODY} bytes (1 MiB), the admin API's limit"


async def read_json(request: web.Request) -> Any:
    """The body as JSON (``admin_guard.loads_untrusted``; an empty body is ``null``): 400 when
    hostile, and ``read_body``'s 413 and 408."""
    return loads_untrusted(await read_body(request) or b"null")


_JSON_KINDS = {type(None): "null", bool: "true or false", int: "a number", float: "a number",
               str: "a string", list: "an array"}


async def read_no_fields(request: web.Request) -> None:
    """The body of an endpoint that takes no fields (``/reload``, the console's logout): none, or
    ``{}``. Anything else is a 400 before anything is done: a ``{"dry_run": true}`` that was
    ignored would do for real what its sender meant to try."""
    raw = await read_body(request)
    if not raw:
        return
    doc = loads_untrusted(raw)
    what = f"{request.method} {request.path}"
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} takes no fields: send no body or {{}}, not {_JSON_KINDS[type(doc)]}")
    if doc:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(doc))}; {what} takes none (send no body "
                         "or {}): nothing was done")


async def read_body(request: web.Request) -> bytes:
    """The whole body: 413 over 1 MiB, 408 (the connection closed) when it does not come within
    the client listener's limits: ``client_body_timeout`` of silence, or slower than
    ``client_body_min_rate`` on average (``bodyreader.BodyReader``). The login is public:
    without them, a body that never came held its connection for good."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length,
                                            text=TOO_LARGE)
    settings = request.app[ADMIN].runtime.settings
    reader = BodyReader(request, settings.client_body_timeout, settings.client_body_min_rate)
    parts: list[bytes] = []
    while chunk := await reader.read(64 * 1024):
        if reader.received > MAX_BODY:  # a chunked body has no Content-Length to refuse first
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=reader.received,
                                                text=TOO_LARGE)
        parts.append(chunk)
    return b"".join(parts)


def query_params(request: web.Request, allowed: tuple[str, ...], repeatable: tuple[str, ...] = ()
                 ) -> dict[str, list[str]]:
    """The query parameters, each at most once (unless repeatable); unknown ones are an error."""
    out: dict[str, list[str]] = {}
    for name, value in request.query.items():
        if name not in allowed:
            if not allowed:
                raise BadRequest(f"unknown parameter {name!r}: {request.method} {request.path} takes "
                                 "no query parameters")
            raise BadRequest(f"unknown parameter {name!r}; allowed: {', '.join(allowed)}")
        out.setdefault(name, []).append(value)
        if len(out[name]) > 1 and name not in repeatable:
            raise BadRequest(f"parameter {name!r} given twice")
    return out


async def check_hosts(ctx: AdminContext, hosts: set[str]) -> None:
    """400 when a URL names a host cachegate does not serve (see the module docstring)."""
    unknown = await ctx.inspector.unknown_hosts(hosts)
    if not unknown:
        return
    runtime = ctx.runtime
    listed = runtime.settings.admin.hosts
    if listed:
        raise BadRequest(f"cachegate does not serve host {unknown[0]!r}: admin.hosts lists "
                         f"{', '.join(listed)}")
    known = await ctx.inspector.known_hosts()
    raise BadRequest(f"cachegate does not serve host {unknown[0]!r}: no client asked for it since start "
                     f"and the cache holds nothing for it (hosts seen: {', '.join(known) or 'none'}); "
                     "list the hosts in admin.hosts to name them before any traffic")


# -- endpoints -----------------------------------------------------------------------------


async def purge(request: web.Request) -> web.Response:
    ctx = request.app[ADMIN]
    # Everything is in the body: a ?soft=true or ?dry_run=1 must not become a hard purge.
    query_params(request, ())
    spec = await read_purge(await read_json(request))  # in slices: client requests go on meanwhile
    await check_hosts(ctx, spec.hosts)
    request[AUDIT] = spec.describe()
    outcome = await ctx.purge(spec)
    request[AUDIT] += f"; purged {outcome.purged}" + ("" if outcome.complete else
                                                      f", not acknowledged by {', '.join(outcome.missing)}")
    # 202: not every live node of the cluster acknowledged within cluster.ack_timeout.
    return web.json_response({**outcome.to_json(), "soft": spec.soft},
                             status=200 if outcome.complete else 202)


async def reload(request: web.Request) -> web.Response:
    """Re-read config and rules: 200 when applied; 400 with every FILE:LINE problem when not
    (the running config stays); 501 when this process was started without a config file; 503
    once the instance stops (as SIGHUP is ignored then: the drain runs the config it had)."""
    query_params(request, ())
    await read_no_fields(request)
    runtime = request.app[ADMIN].runtime
    if runtime.reload_config is None:
        return json_error(501, "reload is not available in this process")
    if runtime.state == "stopping":
        return json_error(503, "the instance is stopping: not reloaded (the drain keeps the running config)")
    result = await runtime.reload_config()
    # Workers that ended during the reload never confirmed it: named, so that a 200 does not
    # read as every worker having applied it (their replacements start with the new config).
    replaced = [r.to_json() for r in result.replaced]
    gone = f"; replaced worker{'s' if len(replaced) > 1 else ''} " \
           f"{', '.join(str(r.worker) for r in result.replaced)}" if replaced else ""
    request[AUDIT] = (f"applied: {result.rules} rules{gone}" if result.ok else
                      f"not applied: {len(result.problems)} problems{gone}")
    if not result.ok:
        error = ("the new config runs here but not in every worker (those named keep the config "
                 "they ran)" if result.partial else "config rejected; the running config stays")
        refused: dict[str, Any] = {"error": error, "problems": result.problems}
        if result.partial:
            refused["replaced_workers"] = replaced
        return web.json_response(refused, status=400)
    return web.json_response({"reloaded": True, "rules": result.rules,
                              "rule_files": list(result.rule_files),
                              "restart_required": result.restart_required,
                              "warnings": list(result.warnings),
                              "replaced_workers": replaced})


async def metrics(request: web.Request) -> web.Response:
    query_params(request, ())
    body = await request.app[ADMIN].inspector.metrics()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def healthz(request: web.Request) -> web.Response:
    """200 when this process serves: its client listeners accept (every worker's, with
    ``--workers N``); 503 while starting or stopping, so a readiness probe sends traffic only
    to a process that takes it; in cluster mode also 503 while it catches up with the
    cluster's purges (a load balancer sends it nothing until it has applied them), with the
    reason; and 503 "degraded", with the reason, while the supervisor runs fewer workers than
    configured because some cannot start (cachegate installed over the running one:
    ``Supervisor._code_changed``), when no worker serves, or while one keeps exiting soon after
    its restarts (``proxy.supervisor.workers_health``). A worker restarted after a crash does
    not count while its siblings serve.

    200 "degraded" when the disk tier's index was found damaged: cachegate serves (so a load
    balancer keeps sending traffic), but purges empty the whole disk tier until a restart sets
    the index aside; the reason names the file and says so. Likewise when a disk shard was
    found damaged, and when the cache directory is gone (the disk tier is off: memory only until
    a restart). A write that fails (a full disk) does not make it degraded: that is in
    ``GET /stats`` (``storage``) and the metrics, and each fill tries again."""
    runtime = request.app[ADMIN].runtime
    node = runtime.cluster
    if node is not None and not node.ready:  # the cluster's reason first: it is why the rest waits
        return web.json_response({"status": "not ready", "reason": node.reason,
                                  "cluster": node.state}, status=503)
    if runtime.state != "ready":
        return web.json_response({"status": runtime.state}, status=503)
    if runtime.degraded is not None:
        return web.json_response({"status": "degraded", "reason": runtime.degraded}, status=503)
    workers = runtime.workers_health() if runtime.workers_health is not None else None
    if workers is not None:
        return web.json_response({"status": "degraded", "reason": workers}, status=503)
    trouble = disk_trouble(runtime)
    if trouble is not None:
        body = {"status": "degraded", "reason": " ".join(trouble.split())}  # (one line: ``cachegate health``)
        if node is not None:
            body["cluster"] = node.state
        return web.json_response(body)
    if node is None:
        return web.json_response({"status": "ok"})
    body = {"status": "ok", "cluster": node.state}
    if node.state != "ready":
        body["reason"] = node.reason  # serving from the local cache while Redis is away
    return web.json_response(body)


def disk_trouble(runtime: Runtime) -> str | None:
    """Why the disk tier serves less than it should while cachegate serves (``/healthz``' 200
    "degraded"), with what to do; None when it does not."""
    storage = runtime.storage
    if (gone := storage.disk_gone) is not None:
        return (f"{gone}: the disk tier is off (responses are kept in memory only) until cachegate "
                "restarts; restart it (it starts the disk tier empty)")
    index = storage.index
    if index is not None and (damage := index.known_damage) is not None:
        return (f"the disk tier's index {index.file} is damaged ({damage}): every purge empties the "
                "whole disk tier until cachegate restarts; restart it (the restart sets the index "
                "aside and starts the disk tier empty)")
    disk = storage.disk
    if disk is not None and (shards := disk.damaged_shards()):
        named = "; ".join(f"{folder} ({why})" for folder, why in shards.items())
        return (f"disk shard(s) found damaged: {named}: their entries are misses; restart cachegate "
                "(the restart sets them aside and starts them empty)")
    return None


async def cluster(request: web.Request) -> web.Response:
    """Cluster mode: every node Redis has seen, its state, last applied purge and lag
    (see docs/cluster.md for the shape)."""
    query_params(request, ())
    node = request.app[ADMIN].runtime.cluster
    if node is None:
        return json_error(404, "cluster mode is off: the config has no cluster: section")
    return web.json_response(await node.view())


async def stats(request: web.Request) -> web.Response:
    params = query_params(request, ("top",))
    top = 20
    if "top" in params:
        text = params["top"][0]
        # ASCII only: str.isdigit() also accepts '²' and '①', which int() refuses.
        if not (text.isascii() and text.isdigit()) or int(text) > 1000:
            raise BadRequest("'top' must be a whole number from 0 to 1000")
        top = int(text)
    return web.json_response(await request.app[ADMIN].inspector.stats(top))


async def cache(request: web.Request) -> web.Response:
    """Every stored variant of a URL (all key shapes, all tiers, every worker)."""
    ctx = request.app[ADMIN]
    params = query_params(request, ("url",))
    if "url" not in params:
        raise BadRequest("give the URL: GET /cache?url=https://host/path")
    url = normalise_url(params["url"][0])
    await check_hosts(ctx, {url_host(url)})
    shapes, exact = url_key_shapes(url, ctx.runtime.settings.rules)
    found = await ctx.inspector.copies({url, *shapes}, exact=exact)
    now = ctx.runtime.engine.clock()  # the clock the engine decides freshness with
    variants = [variant_view(entry, cs, now) for entry, cs in group_copies(found.copies)]
    body: dict[str, Any] = {"url": url, "variants": variants}
    if found.unanswered:  # a hung worker: its reads (memory_workers, hits) are missing
        body["unanswered_workers"] = list(found.unanswered)
    return web.json_response(body)


EXAMPLE_HEADERS = '{"Accept": "text/html"}'
_EXPLAIN_FIELDS = ("url", "method", "headers", "status", "response_headers")


def _header_pairs(value: Any, what: str, refusal: Callable[[HeaderList], Refusal | None] | None = None
                  ) -> tuple[tuple[str, str], ...]:
    """``{"Name": "value" | ["v1", "v2"]}`` -> pairs; BadRequest otherwise. ``refusal``: why the
    proxy would refuse a head with these fields, asked before each field is checked (20,000 of
    them took 40 ms to check, and then to trace, where the proxy refuses them at once)."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = loads_untrusted(value)
        except BadRequest as exc:
            raise BadRequest(f"{what!r} must be a JSON object like {EXAMPLE_HEADERS}: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what!r} must be a JSON object like {EXAMPLE_HEADERS}")
    out: list[tuple[str, str]] = []
    for name, v in value.items():
        values = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in values):
            raise BadRequest(f"{what!r}: {name!r} must map to a string or a list of strings")
        if not values and (problem := field_problem(name, "")) is not None:
            raise BadRequest(f"{what!r}: {problem}")
        out.extend((name, x) for x in values)
    pairs = tuple(out)
    refused = refusal(pairs) if refusal is not None else None
    if refused is not None:
        raise BadRequest(would_refuse(refused))
    for name, x in pairs:
        if (problem := field_problem(name, x)) is not None:
            raise BadRequest(f"{what!r}: {problem}")
    return pairs


# RFC 9110 §5.6.2: token = 1*tchar, ASCII only (methods and field names are tokens).


def _check_method(method: Any) -> str:
    """The method as the proxy's parser takes it (case-sensitive, RFC 9110 §9.1); BadRequest
    for a method no client could send it, or one it answers 501 itself."""
    if not isinstance(method, str) or not is_token(method):
        raise BadRequest(f"'method' must be a method name like GET: a token of ASCII letters, digits "
                         f"and !#$%&'*+-.^_`|~ (RFC 9110 §9.1), not {method!r}")
    if method == "CONNECT":
        # The listener answers it 405 before any rule or key (proxy_handler); and the parser,
        # fed a whole CONNECT, switches to tunnelling: it would call its (absent) protocol.
        raise BadRequest("the proxy answers 405 to CONNECT (a reverse proxy opens no tunnels): no "
                         "rule, key or cache decision applies to it")
    parser = HttpRequestParser(None, None, 1 << 16)  # aiohttp's, as the listeners parse
    try:
        parser.feed_data(f"{method} / HTTP/1.1\r\nHost: h\r\n\r\n".encode("ascii"))
    except BadHttpMethod:
        hint = f" (methods are case-sensitive: {method.upper()} is another method)" \
            if method != method.upper() else ""
        raise BadRequest(f"the proxy answers 501 to the method {method!r}, which its HTTP parser does "
                         f"not implement{hint}") from None
    except HttpProcessingError:  # PRI (the start of HTTP/2's connection preface), a method too long
        why = ("takes it for the start of an HTTP/2 connection preface, not an HTTP/1.1 request"
               if method == "PRI" else "refuses the request line")
        raise BadRequest(f"the proxy answers 400 to the method {method[:40]!r}: its HTTP parser "
                         f"{why}") from None
    return method


def parse_explain(doc: dict[str, Any], max_head: int = DEFAULT_MAX_HEAD) -> ExplainRequest:
    """The request an explain document describes, or BadRequest; a head the proxy's client
    listener would refuse (``max_head``: its ``max_request_head``; ``head_refusal``) is answered
    with its status and why, as ``explain_head`` does, before its fields are checked."""
    unknown = sorted(set(doc) - set(_EXPLAIN_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(_EXPLAIN_FIELDS)}")
    url = doc.get("url")
    if not isinstance(url, str) or not url:
        raise BadRequest("give the URL: {\"url\": \"https://host/path\"} or ?url=...")
    method = _check_method(doc.get("method", "GET"))
    raw_status = doc.get("status", [])
    statuses = raw_status if isinstance(raw_status, list) else [raw_status]
    parsed: list[int] = []
    for s in statuses:
        if isinstance(s, str) and s.isascii() and s.isdigit() and len(s) <= 3:  # not '²
            s = int(s)
        if not isinstance(s, int) or isinstance(s, bool) or not 100 <= s <= 599:
            raise BadRequest("'status' must be an HTTP status (100-599) or a list of them")
        parsed.append(s)
    response_headers = _header_pairs(doc.get("response_headers"), "response_headers")
    if response_headers and not parsed:
        parsed = [200]
    url = normalise_url(url)
    headers = _header_pairs(doc.get("headers"), "headers",
                            lambda fields: limits_refusal(method, url, fields, max_head))
    return ExplainRequest(url=url, method=method, headers=headers, statuses=tuple(parsed),
                          response_headers=response_headers, max_head=max_head)


def explain_request(doc: dict[str, Any], max_head: int = DEFAULT_MAX_HEAD
                    ) -> tuple[ExplainRequest, RequestHead]:
    """The request an explain document describes; BadRequest for anything else (pure)."""
    req = parse_explain(doc, max_head)
    try:
        return req, explain_head(req)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


async def explain(request: web.Request) -> web.Response:
    """The decision trace for a request, from the running rules and store; the origin is not asked."""
    ctx = request.app[ADMIN]
    if request.method == "POST":
        query_params(request, ())
        doc = await read_json(request)
        if not isinstance(doc, dict):
            raise BadRequest("the body must be a JSON object like {\"url\": \"https://host/path\"}")
    else:
        params = query_params(request, _EXPLAIN_FIELDS, repeatable=("status",))
        doc = {k: (v if k == "status" else v[0]) for k, v in params.items()}
    req, head = explain_request(doc, ctx.runtime.settings.max_request_head)
    await check_hosts(ctx, {head.host})
    runtime = ctx.runtime
    rules = runtime.settings.rules
    plan = rules.plan(head)
    body = request_body(req)
    # A bypassed request: what is stored under the key it has without the bypass, which the
    # bypass hides (``unbypassed``); "stored": [] said nothing was while GET /cache listed it.
    hidden = unbypassed(rules, head, plan)
    key = cache_key(head, (plan if hidden is None else hidden).key)
    found: dict[str, list[StoredVariant]] = {key: [], part_key(key): []}  # the key's, its parts
    if hidden is not None or isinstance(route_of(head, plan, body), LookUp):  # (as the engine: looked up)
        copies = [c for c in (await ctx.inspector.copies((), tuple(found))).copies if c.entry.key in found]
        for entry, cs in group_copies(copies):
            tiers = tuple(sorted({c.tier for c in cs}, key=("memory", "disk").index))
            found[entry.key].append(StoredVariant(entry.response, tiers, entry.tags, entry.body_size,
                                                  sum(c.hits or 0 for c in cs if c.tier == "memory")))
    trace = explain_trace(rules, head, found[key], runtime.engine.clock(),
                          [(s, req.response_headers) for s in req.statuses], found[part_key(key)],
                          body, runtime.engine.miss.refresh_held_back, runtime.storage.max_object,
                          RangeFill(whole=runtime.settings.cache.range_fill == "whole",
                                    passing=runtime.engine.coalescer.is_pass(key)),
                          runtime.engine.miss.soft_refresh_failed)
    return web.json_response(trace)


# -- the PURGE method on the client listener ----------------------------------------------------


def _purge_allowed_peer(runtime: Runtime, remote: str) -> bool:
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(ip in net for net in runtime.settings.admin.purge_from)


async def purge_method(request: web.BaseRequest, runtime: Runtime, head: RequestHead) -> web.Response:
    """``PURGE <path>`` sent to the proxy: purge that URL's variants, or refuse (see the docstring)."""
    if not runtime.settings.admin.purge_from:
        runtime.metrics.purge_refused.labels("disabled").inc()
        # Allow is a MUST on a 405 (RFC 9110 §15.5.6): the methods this listener forwards, as
        # its own answer to an OPTIONS names them (the origin has the last word on each).
        refused = json_error(405, "PURGE is switched off on this listener: list the addresses allowed "
                                  "to send it in admin.purge_from, or use POST /purge on the admin API")
        refused.headers["Allow"] = FORWARDED_METHODS
        return refused
    if not _purge_allowed_peer(runtime, request.remote or ""):
        runtime.metrics.purge_refused.labels("forbidden").inc()
        log.info("PURGE %s refused for %s", head.url, request.remote)
        return json_error(403, f"PURGE is allowed only from admin.purge_from; {request.remote} is not in it")
    browser = decide_purge_method(request.headers)
    if browser is not None:
        runtime.metrics.purge_refused.labels(browser.reason).inc()
        # Only purge_from peers get here: the log is theirs to fill, as their purges are.
        log.warning("PURGE %s from %s refused: %s", shown(head.url[:200], keep=""), request.remote,
                    shown(browser.message[:500], keep=""))
        return json_error(browser.status, browser.message)
    soft = request.headers.get(SOFT_PURGE_HEADER, "").strip().lower() in ("1", "true", "yes")
    try:
        url = normalise_url(head.url)
    except BadRequest as exc:
        return json_error(400, str(exc))
    try:
        outcome = await runtime.purge(PurgeSpec(urls=(url,), soft=soft))
    except PurgeUnavailable as exc:
        return json_error(503, str(exc))
    return web.json_response({**outcome.to_json(), "soft": soft, "url": url},
                             status=200 if outcome.complete else 202)


# -- the app ------------------------------------------------------------------------------------


def create_admin_app(runtime: Runtime, purge_fn: PurgeFn | None = None,
                     inspector: Inspector | None = None) -> web.Application:
    """The admin app; ``purge_fn`` and ``inspector`` are the supervisor's in multi-worker mode.

    Every route, including those other modules add, passes the guard (Host, Origin,
    Content-Type: ``admin_guard``) and then the token check."""

    def guard_settings(request: web.Request) -> GuardSettings:
        admin = runtime.settings.admin
        return GuardSettings(token_set=admin.token is not None, server_names=admin.server_names,
                             bearer_ok=request.get(BEARER_OK, False))

    def refused(request: web.Request, reason: RefusalReason) -> None:
        runtime.metrics.admin_refused.labels(reason).inc()

    app = web.Application(middlewares=[audit_middleware, version_middleware, chunked_body_middleware,
                                       error_middleware, bearer_middleware,
                                       guard_middleware(guard_settings, refused),
                                       auth_middleware],
                          client_max_size=MAX_BODY)
    ctx = AdminContext(runtime, purge_fn or runtime.purge,
                       inspector or Inspector(runtime))
    app[ADMIN] = ctx

    async def sampler(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(ctx.inspector.sample_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def server_name(request: web.Request, response: web.StreamResponse) -> None:
        # The operator's name, not aiohttp's default (which names its and Python's versions).
        response.headers["Server"] = runtime.settings.server_header
        # What tells this listener's answers from the client listener's: `cachegate health`
        # requires it (with none of the fields the client listener adds to what it relays).
        response.headers[ADMIN_FIELD] = "1"
        # Every answer here is the state of this process now, or a secret (the login's): none is
        # for a browser's or a proxy's cache (the pages and console.js included), so this one
        # place says so for every route, the console's and its errors too.
        response.headers["Cache-Control"] = "no-store"
        # ``close`` beside ``keep-alive`` in an HTTP/1.0 request ends the connection (llhttp
        # reads it for HTTP/1.1 only): the reply said keep-alive, and what was pipelined behind
        # was answered. The client listener's replies see to it in ``ReplyResponse``. Here, for
        # every reply (redirects and aiohttp's own too); aiohttp framed the head before this
        # hook, and an HTTP/1.0 reply without ``Connection: keep-alive`` says close.
        if asks_to_close(request.version, request.headers):
            response.force_close()
            if response.headers.get("Connection", "").lower() == "keep-alive":
                del response.headers["Connection"]

    async def close_refusals(app: web.Application) -> None:
        app[ADMIN].refusals.close()

    app.on_response_prepare.append(server_name)
    app.on_cleanup.append(close_refusals)
    app.cleanup_ctx.append(sampler)
    app.router.add_post("/purge", purge)
    app.router.add_post("/reload", reload)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    app.router.add_get("/cache", cache)
    app.router.add_get("/explain", explain)
    app.router.add_post("/explain", explain)
    app.router.add_get("/upstreams", upstreams)
    app.router.add_get("/cluster", cluster)
    setup_console(app, runtime, ctx.inspector)  # GET / and /console/...
    return app


async def upstreams(request: web.Request) -> web.Response:
    """Each upstream's state: up or down and why, requests in flight, totals, and the passive
    and active health counters (``UpstreamPool.snapshot``). With ``--workers N``, ``workers``
    has each worker's own pool, where requests are sent and passive ejections happen, and the
    top level is the whole proxy's, as the console shows it (``live.upstreams_of_workers``):
    the supervisor's pool alone, which only runs health checks, said "up", 0 requests, while
    every worker had the upstream down."""
    query_params(request, ())
    ctx = request.app[ADMIN]
    body: dict[str, Any] = {"upstreams": ctx.runtime.pool.snapshot()}
    if ctx.inspector.multi:
        answers = sorted(await ctx.inspector.ask_workers("upstream_states"), key=lambda a: a["worker"])
        counts = request.app[CONSOLE].feed.upstream_counts  # kept by process since start
        counts.add(answers)
        body["upstreams"] = upstreams_of_workers(body["upstreams"], answers, counts.total())
        body["workers"] = answers
    return web.json_response(body)


__all__ = ["ADMIN", "create_admin_app", "purge_method", "token_matches", "too_many_guesses"]
