"""Running the listeners: proxy and admin, signals, hot reload and graceful shutdown.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish within
``shutdown_grace``, finish background fills, close the store, exit 0.
SIGHUP: re-read config and rules; a bad new config is logged and the old one
keeps serving. Once stopping, SIGTERM, SIGINT and SIGHUP are logged and ignored:
the drain goes on.

The same ``serve`` runs a worker of ``cachegate run --workers N``; the
supervisor itself is ``proxy.supervisor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, TypeVar

from aiohttp import web

from proxy import __version__, earlysignals, gctuning
from proxy.cluster import ClusterUnavailable, attach_shared, purge_shared_tier
from proxy.cluster import join as join_cluster
from proxy.config import (
    HostPort,
    Listener,
    MachineCheck,
    Overrides,
    PoolSettings,
    Settings,
    base_cache_options,
    load_config,
)
from proxy.control import Channel, ChannelClosed, RemoteError
from proxy.errors import ConfigError
from proxy.inspection import Inspector, register_worker_calls
from proxy.lockfile import bind_refused
from proxy.logs import RepeatedFailure, say, tell
from proxy.policy.request import MAX_HEADERS, MAX_REQUEST_LINE
from proxy.purge import PurgeOutcome, PurgeSpec, PurgeUnavailable
from proxy.room import FilesystemFull, MemoryUnavailable, NotWritable, denied, filesystem_full
from proxy.runtime import CacheDirectoryInUse, CacheDirectoryUnusable, ReloadResult, Runtime
from proxy.schema import show_hostport
from proxy.sdnotify import Notifier
from proxy.startup import EXIT_CACHE_DIR
from proxy.tls import ExpiryWatch, ServerTLS
from proxy.upstream import UpstreamTLSUnusable
from proxy.web.admin import ADMIN, create_admin_app
from proxy.web.console import register_console_calls
from proxy.web.fastpath import FastPath, ProxyServer
from proxy.web.fastpath import probe as probe_fast_path
from proxy.web.frontend import Front
from proxy.web.headtimeout import CappedServer
from proxy.web.proxy_handler import make_handler
from proxy.web.tlsaccept import TLSAcceptor

log = logging.getLogger("cachegate.server")


def check_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser (request-smuggling advisories)."""
    from aiohttp import http_parser

    c_parser = getattr(http_parser, "HttpRequestParserC", None)
    if c_parser is None or http_parser.HttpRequestParser is not c_parser:
        raise SystemExit(
            "cachegate: aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or no "
            "compiled wheel for this platform); refusing to start: the pure-Python parser has had "
            "request-smuggling advisories"
        )


# Seconds a stop may take past shutdown_grace: for cancelled handlers to unwind (``Listeners``).
# A process stops within shutdown_grace + STOP_MARGIN, and a little more to close its store
# (the supervisor kills a worker only at shutdown_grace + STOP_DEADLINE_MARGIN).
STOP_MARGIN = 1.0
FLUSH_POLL = 0.01  # seconds between looks at the closed connections' unsent bytes at a stop
# Seconds a worker stopped by a signal waits for its supervisor to hear which (``_tell_stopped_by``).
STOPPED_BY_WAIT = 1.0


@dataclass
class Listeners:
    runners: list[web.BaseRunner] = field(default_factory=list)
    proxy_addresses: list[tuple[str, int]] = field(default_factory=list)  # every client listener's
    admin_addresses: list[tuple[str, int]] = field(default_factory=list)
    proxy_urls: list[str] = field(default_factory=list)  # the same, as http:// or https:// URLs
    tls: list[tuple[str, ServerTLS]] = field(default_factory=list)  # each TLS listener's, by address
    open_files: OpenFilesWatch | None = None

    async def stop(self, grace: float) -> None:
        """Stop accepting; requests in flight have ``grace`` seconds, then are cancelled, and
        all is over within ``grace`` + STOP_MARGIN: aiohttp would wait as long as ``grace``
        again for the cancelled handlers."""
        if self.open_files is not None:
            self.open_files.close()
        for runner in self.runners:
            runner._shutdown_timeout = grace  # aiohttp reads it in cleanup()
        if not self.runners:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        transports = _transports(self.runners)
        try:
            async with asyncio.timeout(grace + STOP_MARGIN):
                await asyncio.gather(*(r.cleanup() for r in self.runners), return_exceptions=True)
        except TimeoutError:
            log.warning("requests still in flight %gs after the grace period; cut off", STOP_MARGIN)
            await _cut_off(self.runners)
        await _flushed(transports, deadline)


class OpenFilesWatch:
    """Once a second, whether this process can still open a file: at the open-files limit the
    plain client listener's accept fails (EMFILE) and uvloop (libuv) closes each new connection
    at once, with no log line and no metric (the TLS listener logs its own: ``TLSAcceptor``).
    One line when it starts, once a minute while it lasts, one when it ends (``RepeatedFailure``).
    Why a probe: the failure never reaches Python under uvloop; opening and closing
    ``/dev/null`` costs two system calls a second. ``max_connections``'s default keeps the
    connections below the limit; this says when something else (or a set cap) got there."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every: float = 1.0) -> None:
        self._loop = loop
        self._every = every
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.failure = RepeatedFailure(
            log, f"opening a file (the open-files limit, {soft}, reached: new client connections are "
                 "closed unanswered; lower max_connections or raise the limit, LimitNOFILE)",
            traceback=False, then="checked every second")
        self._handle: asyncio.TimerHandle | None = loop.call_later(every, self._tick)

    def _tick(self) -> None:
        self.check()
        self._handle = self._loop.call_later(self._every, self._tick)

    def check(self) -> bool:
        """Whether a file could be opened now (logged when that changes)."""
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.failure.failed(exc, traceback=False)
            return False
        os.close(fd)
        self.failure.succeeded()
        return True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _transports(runners: list[web.BaseRunner]) -> list[asyncio.Transport]:
    """The client connections' transports as a stop begins (aiohttp's cleanup forgets them)."""
    found = []
    for runner in runners:
        for conn in list(getattr(runner.server, "connections", ())):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                found.append(transport)
    return found


async def _flushed(transports: list[asyncio.Transport], deadline: float) -> None:
    """Wait, until ``deadline`` (the grace period's end) at most, for the bytes the closed
    connections still hold to go out. aiohttp's cleanup closes a connection as soon as its
    handler has put the last byte into the transport, whose buffer (32 KB behind for a client
    reading at its pace) the event loop sends only later: the process exited first, and that
    client's body ended short of its Content-Length."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:  # (a stop's look, so no per-connection hook on the request path)
        if not any(_unsent(t) for t in transports):
            return
        await asyncio.sleep(FLUSH_POLL)


def _unsent(transport: asyncio.Transport) -> int:
    """The bytes ``transport`` still holds; 0 once it is gone (a TLS transport whose connection
    ended has no buffer left to ask: asyncio's raises AttributeError then)."""
    try:
        return transport.get_write_buffer_size()
    except (AttributeError, RuntimeError):
        return 0


async def _cut_off(runners: list[web.BaseRunner]) -> None:
    """Cancel the handlers still writing to a client that reads nothing once the stop's
    deadline passed, and let them unwind (at most STOP_MARGIN): aiohttp's cleanup, cut short by
    that deadline, cancels them only after waiting its timeout a second time, so such a handler
    was never cancelled, and its request had no access-log line (499) before the process
    exited. Not the handlers waiting for a fetch: the stop's end of the fills answers them
    (503 STOPPING, or stale-if-error) after this."""
    tasks = []
    for runner in runners:
        server = runner.server
        for conn in list(getattr(server, "connections", ())):
            task = getattr(conn, "_task_handler", None)
            if task is not None and not task.done() and getattr(conn, "writing_paused", False):
                task.cancel()
                tasks.append(task)
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_MARGIN)


def _bound(runner: web.BaseRunner) -> list[tuple[str, int]]:
    out = []
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            out.append((str(addr[0]), int(addr[1])))
    return out


async def start_proxy_listeners(runtime: Runtime, settings: Settings, listeners: Listeners,
                                *, reuse_port: bool = False) -> None:
    """Every client listener of ``settings`` (its runners added to ``listeners`` as they start,
    so a later one that cannot bind leaves nothing behind once they stop), all with one front
    end (``proxy.web.frontend``); a TLS listener's certificate is the one the config load read,
    and each reload's (``proxy.tls``)."""
    front = Front(runtime)
    if listeners.open_files is None:
        listeners.open_files = OpenFilesWatch(asyncio.get_running_loop())
    for index, listener in enumerate(settings.listeners):
        tls = (ServerTLS(listener.tls.cert, listener.tls.key, settings.pem(listener.tls))
               if listener.tls is not None else None)
        runner = await start_proxy_listener(runtime, settings, reuse_port=reuse_port, listener=listener,
                                            tls=tls, front=front)
        listeners.runners.append(runner)
        bound = _bound(runner)
        if index == 0 and bound:
            runtime.bound_listen = bound[0]
            front.reset()  # (a front end built meanwhile named the config's port)
        listeners.proxy_addresses.extend(bound)
        listeners.proxy_urls.extend(f"{listener.scheme}://{_fmt(h)}:{p}" for h, p in bound)
        if tls is not None:
            name = f"{_fmt(bound[0][0])}:{bound[0][1]}" if bound else f"listen[{index}]"
            listeners.tls.append((name, tls))
            _export_expiry(runtime, name, tls)
            runtime.on_reconfigure.append(_tls_reload(tls, index, functools.partial(_export_expiry, runtime,
                                                                                     name, tls)))


def watch_expiry(runtime: Runtime, served: list[tuple[str, ServerTLS]]) -> asyncio.Task[None] | None:
    """A lone process's ``ExpiryWatch`` of its TLS listeners (None without one): their
    certificates' dates warned of while it runs, not only at its start and at reloads (a
    reload's hook tells it that the reload has just warned)."""
    if not served:
        return None
    watch = ExpiryWatch(lambda: [(name, tls.files[0], tls.cert_pem) for name, tls in served])

    def reloaded(settings: Settings) -> None:
        watch.said()

    runtime.on_reconfigure.append(reloaded)
    return asyncio.ensure_future(watch.run())


def _export_expiry(runtime: Runtime, listener: str, tls: ServerTLS) -> None:
    """cachegate_tls_certificate_expiry_seconds{listener}: when the certificate served expires."""
    if tls.not_after is None:
        runtime.metrics.tls_expiry.pop(listener, None)
    else:
        runtime.metrics.tls_expiry[listener] = tls.not_after


def _tls_reload(tls: ServerTLS, index: int, served: Callable[[], None]) -> Callable[[Settings], str | None]:
    """A reload's hook: the listener's certificate read again (``served`` called once it is:
    the metric of its expiry); when the old one stays (a key of another type), a
    ``restart_required`` name saying why, not a silent success."""

    def reload(settings: Settings) -> str | None:
        files = settings.listeners[index].tls if index < len(settings.listeners) else None
        if files is None:
            return None
        kept = tls.reload(files.cert, files.key, settings.pem(files))
        served()
        return None if kept is None else f"listen[{index}].tls ({kept})"

    return reload


async def start_proxy_listener(runtime: Runtime, settings: Settings, *,
                               reuse_port: bool = False, fast: bool = True, listener: Listener | None = None,
                               tls: ServerTLS | None = None, front: Front | None = None) -> web.ServerRunner:
    """One client listener (the first of ``settings`` unless ``listener`` says which); ``fast``
    False answers hits on aiohttp's general path only (tests compare both)."""
    listener = listener or settings.listeners[0]
    if listener.tls is not None and tls is None:
        tls = ServerTLS(listener.tls.cert, listener.tls.key, settings.pem(listener.tls))
    front = front or Front(runtime)
    server = ProxyServer(
        make_handler(front),
        # Fresh memory hits below web.Response (proxy.web.fastpath); tests compare without.
        front=front,
        fast=FastPath(front) if fast else None,
        max_line_size=MAX_REQUEST_LINE,
        max_field_size=MAX_REQUEST_LINE,
        max_headers=MAX_HEADERS,
        # A request body goes upstream as the client sent it: aiohttp's server decodes a body
        # with Content-Encoding gzip/deflate/br by default, and the origin got the decoded bytes
        # still labelled gzip, with the decoded length (a corrupt upload: a gzipped JSON POST, an
        # OTLP export), and a body that did not decode was a 500.
        auto_decompress=False,
        access_log=None,  # cachegate's own, on both paths (proxy.logs)
    )
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    host, port = listener.address
    site: web.TCPSite
    if tls is not None:
        site = HandshakeTimedSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024,
                                  ssl_context=tls.context,
                                  handshake_timeout=lambda: runtime.settings.client_header_timeout,
                                  server_header=lambda: runtime.settings.server_header,
                                  shutdown_timeout=lambda: runtime.settings.send_timeout)
    else:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024,
                           ssl_context=tls.context if tls is not None else None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        # aiohttp's "[Errno 98] error while attempting to bind on address ...": named as the
        # supervisor names it, with who holds the port (or the capability a low port takes).
        where = show_hostport((host, port))
        # (aiohttp's words for a failed lookup, "[Errno -2] Name or service not known", named no address)
        raise OSError(bind_refused(where, port, "this listener", exc)
                      or f"listen {where}: {exc.strerror or exc}") from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class HandshakeTimedSite(web.TCPSite):
    """aiohttp's ``TCPSite`` for a TLS listener, whose connections a ``TLSAcceptor`` accepts
    (``proxy.web.tlsaccept``): a plain HTTP request gets a 400 that says so, and each TLS
    handshake must end within ``handshake_timeout()`` seconds (``client_header_timeout``, read
    live at each accept, as nginx bounds its handshakes). ``TCPSite`` leaves the event loop's
    60 s: a client that connected and stalled mid-handshake held its connection that long
    whatever ``client_header_timeout`` said (200 such held 200 descriptors), and the head's own
    timer starts only once the handshake is done. The sockets are bound as ``TCPSite`` binds
    them (``create_server``, not serving), then accepted on by the acceptor."""

    __slots__ = ("_handshake_timeout", "_server_header", "_shutdown_timeout")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 handshake_timeout: Callable[[], float], server_header: Callable[[], str],
                 shutdown_timeout: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._handshake_timeout = handshake_timeout
        self._server_header = server_header
        self._shutdown_timeout = shutdown_timeout  # (send_timeout: ``TLSAcceptor``)

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None and self._ssl_context is not None
        bound = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port, start_serving=False)
        # The listening sockets, as the acceptor's own (the server's are closed with it).
        socks = [socket.socket(s.family, s.type, s.proto, fileno=os.dup(s.fileno())) for s in bound.sockets]
        bound.close()
        for sock in socks:
            sock.listen(self._backlog)
        self._server = TLSAcceptor(  # type: ignore[assignment]
            socks, server, self._ssl_context, self._handshake_timeout, self._server_header,
            shutdown_timeout=self._shutdown_timeout)
        self._bound_port = socks[0].getsockname()[1] if socks else self._port


async def start_admin_listener(runtime: Runtime, settings: Settings,
                               purge: Callable[[PurgeSpec], Awaitable[PurgeOutcome]] | None = None,
                               inspector: Inspector | None = None) -> web.AppRunner | None:
    if settings.admin.listen is None:
        return None
    app = create_admin_app(runtime, purge, inspector)
    runner = AdminRunner(app, handle_signals=False, access_log=None,
                         shutdown_timeout=settings.shutdown_grace, keepalive_timeout=ADMIN_KEEPALIVE,
                         max_line_size=ADMIN_MAX_LINE,
                         # A body is read as sent: one with a Content-Encoding is refused 415 by
                         # the guard (``admin_guard.decide``). Decoded by aiohttp, a body that did
                         # not decode was a 500 with a traceback, a gzip bomb up to 1 MiB decoded.
                         auto_decompress=False)
    await runner.setup()
    host, port = settings.admin.listen
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(_admin_unbound(host, port, exc)) from None
    return runner


def _admin_unbound(host: str, port: int, exc: OSError) -> str:
    """Why the admin listener cannot bind, naming admin.listen and, for a port in use, the
    processes that listen on it (as the client listeners' refusal does); it said only
    "[Errno 98] address already in use"."""
    where = f"admin.listen {show_hostport((host, port))}"
    return bind_refused(where, port, "the admin API", exc) or f"{where}: {exc.strerror or exc}"


# The admin listener's limits on connections (the client listener's come from the config:
# send_timeout, max_connections; both kept by ``LimitedHandler``): a request
# head must be whole within client_header_timeout, a body is read under client_body_timeout
# and client_body_min_rate (``proxy.web.admin.read_json``), an idle connection is closed after
# ADMIN_KEEPALIVE seconds, and at most ADMIN_MAX_CONNECTIONS are open at once (the oldest that
# only waits for its client makes room for a new one: ``CappedHandler``). Without them, a few
# hundred connections that never finished a request held as many file descriptors for an hour,
# and the client listener could accept nothing once the process ran out. A reply the client
# does not read for ADMIN_SEND_TIMEOUT seconds (its writes paused all along) has its connection
# aborted: 64 connections pipelining requests and reading nothing otherwise held every place.
ADMIN_KEEPALIVE = 30.0
ADMIN_MAX_CONNECTIONS = 64
ADMIN_SEND_TIMEOUT = 30.0
# The request line (method, URL, version): a URL to inspect (/cache?url=, /explain?url=&headers=)
# may be long; aiohttp's default, 8,190 bytes, refused some that the client listener serves.
ADMIN_MAX_LINE = 64 * 1024


class AdminRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a ``CappedServer`` (head timeout, connection cap)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        runtime = self.app[ADMIN].runtime
        return CappedServer(server.request_handler, request_factory=server.request_factory,
                            handler_cancellation=server.handler_cancellation, loop=server._loop,
                            head_timeout=lambda: runtime.settings.client_header_timeout,
                            max_connections=ADMIN_MAX_CONNECTIONS, send_timeout=ADMIN_SEND_TIMEOUT,
                            server_header=lambda: runtime.settings.server_header,
                            lingering=lambda: (runtime.settings.lingering_time,
                                               runtime.settings.lingering_timeout),
                            **server._kwargs)


def announce(listeners: Listeners) -> None:
    for url in listeners.proxy_urls:
        say(f"cachegate: proxy listening on {url}")
    for host, port in listeners.admin_addresses:
        say(f"cachegate: admin listening on http://{_fmt(host)}:{port}")


def say_started(settings: Settings, proxy_urls: list[str], admin_urls: list[str], workers: int) -> None:
    """The one start-up line: version, listeners, workers, cache budgets, config file, and a
    warning when this aiohttp lacks what the fast hit path needs (every process of the
    machine runs the same aiohttp: the supervisor's probe speaks for its workers)."""
    c = settings.cache
    memory = f"memory {_size(c.memory)} shared by the workers" if workers > 1 else f"memory {_size(c.memory)}"
    disk = f"disk {_size(c.disk.size)} at {c.disk.path}" if c.disk is not None else "no disk tier"
    fast = probe_fast_path()
    warnings = [] if fast.enabled else [f"the fast hit path is off ({fast.detail}): every hit takes the "
                                        "general path, at its cost"]
    say(f"cachegate {__version__} started: proxy {', '.join(proxy_urls)}; "
        f"admin {', '.join(admin_urls) or 'off'}; {workers} worker{'s' if workers > 1 else ''}; "
        f"cache {memory}, {disk}; config {settings.source}" + "".join(f"; warning: {w}" for w in warnings),
        level="warning" if warnings else "info", warnings=warnings,
        event="started", version=__version__, listen=proxy_urls, admin=admin_urls, workers=workers,
        memory_bytes=c.memory, disk_bytes=c.disk.size if c.disk else None,
        disk_path=c.disk.path if c.disk else None, config=settings.source)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def _fmt(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# the cache keys a reload applies
LIVE_CACHE_KEYS = ("tag_headers", "lock_timeout", "range_fill", "apparent_age")


def _cache_keys(old: Any, new: Any, prefix: str = "cache") -> list[tuple[str, Any, Any]]:
    """(``cache.KEY``, old value, new value) for each cache key only a restart applies, the disk
    tier's key by key (``cache.disk.size``): ``restart_required`` names the key that changed."""
    keys: list[tuple[str, Any, Any]] = []
    for f in fields(old):
        if prefix == "cache" and f.name in LIVE_CACHE_KEYS:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if is_dataclass(a) and is_dataclass(b):
            keys += _cache_keys(a, b, f"{prefix}.{f.name}")
        else:
            keys.append((f"{prefix}.{f.name}", a, b))
    return keys


def _pool_change(old: PoolSettings, new: PoolSettings) -> str:
    """The name ``restart_required`` gives a change of the pool's settings: ``upstream.tls.ca_file``
    when only the CA certificates it trusts changed (the same path, new bytes, say), else
    ``upstream``."""
    same_but_ca = replace(new, tls=replace(new.tls, ca_file=old.tls.ca_file, ca_data=old.tls.ca_data))
    return "upstream.tls.ca_file" if same_but_ca == old else "upstream"


def live_settings(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """What a running process can take from a reloaded config, and what needs a restart.

    Rules, the admin token, purge_from and server_names, trusted_proxies, via (but not on
    responses already stored: their head keeps the Via of their fill, docs/rules.md), tag_headers,
    lock_timeout, range_fill, apparent_age (to new fills), shutdown_grace, worker_timeout, server_header and
    the access log apply at once
    (they are read per request), and so do TLS certificates (read again, also from the same
    files). Listener addresses, upstreams, the other cache keys (each named: ``cache.max_object``,
    ``cache.disk.size``) and workers keep their running values until a restart; they are named
    so the operator is told instead of silently ignored.
    """
    same_listeners = _listener_shape(old) == _listener_shape(new)
    restart = [name for name, a, b in (
        ("listen", _listener_shape(old), _listener_shape(new)),
        ("admin.listen", old.admin.listen, new.admin.listen),
        ("upstreams", old.upstreams, new.upstreams),
        (_pool_change(old.pool, new.pool), old.pool, new.pool),
        *_cache_keys(old.cache, new.cache),
        ("workers", old.workers, new.workers),
        ("cluster", old.cluster, new.cluster),
    ) if a != b]
    merged = replace(
        new, listeners=new.listeners if same_listeners else old.listeners,
        upstreams=old.upstreams, pool=old.pool, workers=old.workers,
        cluster=old.cluster,
        admin=replace(new.admin, listen=old.admin.listen),
        cache=replace(old.cache, tag_headers=new.cache.tag_headers,
                      lock_timeout=new.cache.lock_timeout, range_fill=new.cache.range_fill,
                      apparent_age=new.cache.apparent_age),
    )
    if merged.cache.max_object != new.cache.max_object:
        merged = replace(merged, rules=new.rules.rebased(base_cache_options(merged)))
    return merged, restart


# What only a restart changes, as ``live_settings`` keeps it: a supervisor hands its workers
# its running values of these (``restart_only``, ``with_restart_only``), so that a worker
# started after a reload that changed one of them still binds the supervisor's ports and opens
# its cache directory, and takes the rest of the reload.
RESTART_ONLY = ("listeners", "upstreams", "pool", "cache", "cluster")


def restart_only(running: Settings, ports: tuple[int, ...]) -> dict[str, Any]:
    """``running``'s values of what only a restart changes, its listeners on ``ports`` (the
    ones the supervisor reserved: port 0 resolved)."""
    parts = {name: getattr(running, name) for name in RESTART_ONLY}
    parts["listeners"] = tuple(replace(li, port=port)
                               for li, port in zip(running.listeners, ports, strict=True))
    return parts


def with_restart_only(new: Settings, parts: dict[str, Any]) -> Settings:
    """A worker's settings: what is live from ``new`` (the config as its supervisor last loaded
    it), the rest from ``parts`` (``restart_only``); a worker has no admin listener. With
    ``served_tls`` in ``parts`` (per listener, the certificate and key its siblings serve:
    ``proxy.tls.served_after_reload``), a TLS listener starts with those, not with a pair of
    another key type that a reload loaded and they refused: every worker serves one
    certificate, and each names the listener in ``restart_required`` at the next reload."""
    parts = dict(parts)
    served: tuple[tuple[bytes, bytes] | None, ...] = parts.pop("served_tls", ())
    running = replace(new, **parts, workers=1, admin=replace(new.admin, listen=None))
    merged = live_settings(running, with_running_ports(new, running))[0]
    sources = dict(merged.sources)
    for listener, pem in zip(merged.listeners, served, strict=False):
        if listener.tls is not None and pem is not None and merged.pem(listener.tls) != pem:
            sources[os.path.abspath(listener.tls.cert)], sources[os.path.abspath(listener.tls.key)] = pem
    return replace(merged, sources=tuple(sources.items()))


def with_running_ports(new: Settings, running: Settings) -> Settings:
    """``new`` with each listener whose port is 0 (chosen at start) on the port the listener of
    the same place in ``running`` has: a config that did not change them has the same
    listeners then (``live_settings`` takes their new TLS files)."""
    listeners = tuple(
        replace(li, port=running.listeners[i].port) if li.port == 0 and i < len(running.listeners) else li
        for i, li in enumerate(new.listeners))
    return replace(new, listeners=listeners)


def _listener_shape(s: Settings) -> tuple[tuple[str, int, bool], ...]:
    """What of the listeners only a restart changes: addresses, and which ones are TLS."""
    return tuple((li.host, li.port, li.tls is not None) for li in s.listeners)


RELOAD_HOLD = "CACHEGATE_RELOAD_HOLD"
START_HOLD = "CACHEGATE_START_HOLD"


def _hold_for_tests(variable: str = RELOAD_HOLD) -> None:
    """For tests, as CACHEGATE_READY_TIMEOUT: with ``CACHEGATE_RELOAD_HOLD`` set to a directory,
    a reload's compiling thread writes ``<pid>.held`` there and waits until the file is removed,
    so that a test sees what a process does while a reload compiles, however fast the machine;
    with ``CACHEGATE_START_HOLD`` set to a directory that exists, a worker does the same in its
    start, once its store and its control channel are open (its event loop held: it reads no
    call of its supervisor meanwhile), as one slow to start."""
    where = os.environ.get(variable)
    if not where:
        return
    marker = os.path.join(where, f"{os.getpid()}.held")
    try:
        with open(marker, "x"):
            pass
    except OSError:
        return
    deadline = time.monotonic() + 20.0  # a test that failed midway does not hang the process
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(OSError):
        os.remove(marker)


_T = TypeVar("_T")


STOP_LOOK = 0.1  # seconds between two looks at whether the instance stops, while a reload loads


async def in_daemon_thread(fn: Callable[[], _T], name: str) -> _T:
    """``fn()`` in a thread of its own that nothing waits for at exit.

    Not ``asyncio.to_thread``: the loop's default executor is joined when the loop closes
    (``asyncio.run`` waits for it with no timeout on Python 3.11), so a stop that came while
    12,000 rules compiled exited 15 s after it said it had stopped, far past ``shutdown_grace``.
    A stop makes the reload moot: its thread is a daemon, abandoned with the process."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if done.done():  # the awaiting task was cancelled (the stop)
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting task, as to_thread does
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to tell
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


class Reloader:
    """Re-reads config and rules; applies them only when valid, else the old ones keep running.

    The files are read and compiled in a thread (thousands of rules take seconds): the event
    loop meanwhile serves requests and answers the supervisor's pings; a stop does not wait
    for that thread (``in_daemon_thread``). Only the swap of the new
    settings runs on the loop, all at once. Reloads run one at a time, in the order asked, each
    reading the files when its turn comes: the last one asked applies last."""

    def __init__(self, path: str | None, overrides: Overrides, current: Callable[[], Settings],
                 apply: Callable[[Settings], list[str]],
                 on_result: Callable[[bool], None] | None = None, display: str | None = None,
                 prepare: Callable[[Settings, Settings], Settings] | None = None,
                 machine: MachineCheck = "reload", stopping: Callable[[], bool] = lambda: False,
                 warn: bool = True) -> None:
        self.path = path
        # The config's warnings logged here: not by a worker, whose supervisor logs them once
        # (each reload said each one three times with two workers).
        self._warn = warn
        self._stopping = stopping  # the instance stops: a reload still loading is not applied
        self.machine = machine  # (``load_config``)
        self._prepare = prepare  # (new, running) -> new, before ``live_settings``
        self.display = display  # the config file ``path`` is a copy of (``load_config``)
        self.overrides = overrides
        self._current = current
        self._apply = apply
        self._on_result = on_result
        self._turn = asyncio.Lock()  # FIFO: overlapping reloads apply in the order they came

    def _load(self, running_admin: HostPort | None) -> Settings:
        _hold_for_tests()
        return load_config(self.path, self.overrides, running_admin=running_admin, display=self.display,
                           machine=self.machine)

    async def reload(self, path: str | None = None, within: float | None = None,
                     deadline: float | None = None) -> ReloadResult:
        """``path``: the file to read from now on (a worker's supervisor names the copy it just
        committed: ``proxy.supervisor.ConfigCopy`` may have moved since the worker started).
        ``within``: seconds the reload may take to apply (a worker's supervisor waits that long,
        then answers that the worker keeps its config): past them it is dropped, whether it
        waited for its turn or compiled that long. They count from ``deadline`` - ``within``
        when ``deadline`` is given: the moment on CLOCK_MONOTONIC (``time.monotonic``, one clock
        for every process of the machine) the supervisor sent the call, not the moment this
        process read it, which a stalled process (stopped, swapped out) does seconds later."""
        if within is not None and deadline is None:
            deadline = time.monotonic() + within
        async with self._turn:
            if path is not None:
                self.path = path
            if self._stopping():  # (queued behind another when the stop came: no compile)
                return self._stopped()
            if deadline is not None and time.monotonic() > deadline:
                return self._too_late(within)
            try:
                # The token of a listener that only a restart moves is checked where it listens now.
                running_admin = self._current().admin.listen
                load = asyncio.ensure_future(
                    in_daemon_thread(lambda: self._load(running_admin), "cachegate-reload"))
                while not load.done():
                    # A stop that comes meanwhile answers at once: a POST /reload left waiting for
                    # the compile was cut off unanswered at the end of the drain, which it held.
                    await asyncio.wait({load}, timeout=STOP_LOOK)
                    if self._stopping() and not load.done():
                        load.cancel()
                        return self._stopped()
                new = load.result()
            except ConfigError as exc:
                return self.reject(exc.problems)
            except Exception as exc:  # a bug must not take the serving process down with it
                log.exception("reload failed")
                return self.reject([f"{self.display or self.path}:0: reload failed: {exc!r}"])
            if deadline is not None and time.monotonic() > deadline:  # right before applying
                return self._too_late(within)
            if self._stopping():  # (the drain keeps the running config, however it was asked)
                return self._stopped()
            # From here on the loop alone: nothing runs between reading the running settings
            # and applying the new ones.
            current = self._current()
            merged, restart = live_settings(current, self._prepare(new, current) if self._prepare else new)
            unapplied = self._apply(merged)  # named in ``restart_required`` too (logged by who kept them)
            gctuning.resettle_soon()
            for name in restart:
                log.warning("reload: %s changed; it applies at the next restart", name)
            for warning in new.warnings if self._warn else ():
                log.warning("reload: %s", warning)
            log.info("config reloaded from %s: %d rule(s) from %d file(s)", self.display or self.path,
                     len(merged.rules.rules), len(merged.rules.files))
            if self._on_result:
                self._on_result(True)
            return ReloadResult([], [*restart, *unapplied], len(merged.rules.rules), merged.rules.files,
                                new.warnings, unapplied=unapplied)

    def _stopped(self) -> ReloadResult:
        """A reload that came during a stop: no fault of the config, so no ``FILE:LINE`` and no
        ERROR (a SIGHUP racing a SIGTERM logged one, as if the file were wrong)."""
        problem = f"{self.display or self.path}: not applied: the instance is stopping (the drain keeps " \
                  "the running config)"
        log.info("reload %s", problem)
        if self._on_result:
            self._on_result(False)
        result = ReloadResult([problem])
        result.stopping = True
        return result

    def _too_late(self, within: float | None) -> ReloadResult:
        bound = f"{within:g} s, " if within is not None else ""
        return self.reject([f"{self.display or self.path}:0: not applied: the reload took longer than "
                            f"{bound}the time this process had to apply it"])

    def reject(self, problems: list[str]) -> ReloadResult:
        """A reload that did not happen: ``problems`` logged and answered, the old config stays."""
        for p in problems:
            log.error("reload rejected, the running config stays: %s", p)
        if self._on_result:
            self._on_result(False)
        return ReloadResult(problems)


_RELOADS: set[asyncio.Task[Any]] = set()  # reloads a signal started, kept until they end


def reload_in_background(runtime: Runtime) -> None:
    """SIGHUP: the reload as a task (a signal handler cannot wait for it)."""
    if runtime.reload_config is None:
        return
    task = asyncio.ensure_future(runtime.reload_config())
    _RELOADS.add(task)
    task.add_done_callback(_reload_done)


def _reload_done(task: asyncio.Task[Any]) -> None:
    _RELOADS.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("reload failed", exc_info=task.exception())


def install_reloader(runtime: Runtime, path: str | None, overrides: Overrides,
                     display: str | None = None,
                     prepare: Callable[[Settings, Settings], Settings] | None = None,
                     machine: MachineCheck = "reload", counted: bool = True, warn: bool = True) -> Reloader:
    """Give ``runtime`` its reload (used by SIGHUP and ``POST /reload``); ``counted``: in
    ``cachegate_config_reloads_total`` (a supervisor counts its reloads once its workers'
    answers are in)."""
    reloader = Reloader(path, overrides, lambda: runtime.settings, runtime.reconfigure,
                        (lambda ok: count_reload(runtime, ok)) if counted else None,
                        display, prepare, machine, stopping=lambda: runtime.state == "stopping", warn=warn)
    runtime.reload_config = reloader.reload
    return reloader


def count_reload(runtime: Runtime, ok: bool) -> None:
    runtime.metrics.reloads.labels("success" if ok else "failure").inc()


async def open_runtime(settings: Settings, owner: bool, *, arena_fd: int | None = None,
                       processes: int = 1) -> Runtime | None:
    """``Runtime.open``, or None after one line on stderr when the cache directory cannot be
    used (not writable, a file in the way, its filesystem full, owned by another running
    cachegate), the shared memory of ``cache.memory`` cannot be mapped or ``upstream.tls.ca_file``
    no longer loads: an operator's mistake or the machine's state, not a traceback."""
    try:
        return await Runtime.open(settings, owner=owner, arena_fd=arena_fd, processes=processes)
    except (CacheDirectoryInUse, MemoryUnavailable, UpstreamTLSUnusable) as exc:
        tell(f"cachegate: {exc}")
        return None
    except CacheDirectoryUnusable as unusable:
        cause = unusable.cause
        disk = settings.cache.disk
        where = disk.path if disk is not None else "?"
        if disk is not None and not isinstance(cause, FilesystemFull) and filesystem_full(disk.path, cause):
            cause = FilesystemFull(disk.path, cause)
        elif denied(cause):  # its lock file, a spool folder: named, with the fix
            cause = NotWritable(os.fsdecode(cause.filename), cause)
        if disk is None:  # memory-only: its spool folder, in the temp directory, is all on disk
            detail = cause.strerror or str(cause)
            if not isinstance(cause, NotWritable) and isinstance(cause.filename, str | bytes):
                detail = f"{os.fsdecode(cause.filename)}: {detail}"  # (NotWritable's names it)
            tell(f"cachegate: cannot make a spool folder in the temp directory (TMPDIR; there is "
                 f"no cache.disk): {detail}")
            return None
        tell(f"cachegate: cannot open the cache directory {where} (cache.disk.path): "
             f"{cause.strerror or cause}")
        return None


@dataclass
class WorkerLink:
    """How a worker process talks to its supervisor (see ``proxy.supervisor``)."""

    worker_id: int
    control_fd: int
    arena_fd: int | None = None  # the machine's shared memory (proxy.storage.arena), a memfd
    # The config file whose copy (the one it last loaded good) the supervisor hands the worker
    # as its config path: messages name it, relative paths resolve from its directory.
    config_as: str | None = None


async def serve(settings: Settings, config_path: str | None, overrides: Overrides,
                worker: WorkerLink | None = None,
                on_listening: Callable[[Listeners], None] | None = None) -> int:
    """Run one serving process until SIGTERM/SIGINT; returns the exit status.

    Alone, it owns the cache directory (upkeep) and runs the admin API. As a worker
    of a supervisor (``worker``), it accepts on the shared port (SO_REUSEPORT), leaves
    the admin API and the upkeep to the supervisor, sends purges through it, and
    answers its calls (``purge_local``, ``reload``, ``ping``).
    """
    check_c_parser()
    opened = await open_runtime(settings, owner=worker is None,
                                arena_fd=worker.arena_fd if worker is not None else None)
    if opened is None:
        return 1 if worker is None else EXIT_CACHE_DIR
    runtime = opened
    listeners = Listeners()
    # The admin listener: up until the drain is over, so that /healthz answers 503 "stopping"
    # and /metrics shows the drain, where stopping it with the client listeners refused both.
    admin = Listeners()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # systemd's Type=notify: the one serving process is the service's main process.
    notifier = Notifier.take() if worker is None else Notifier()

    # A worker's listeners are on the ports its supervisor reserved (a config's port 0 too).
    reloader = install_reloader(runtime, config_path, overrides,
                                worker.config_as if worker is not None else None,
                                with_running_ports if worker is not None else None,
                                "no" if worker is not None else "reload",  # (the supervisor checks)
                                warn=worker is None)
    channel = None
    if worker is not None:
        channel = await _connect_supervisor(runtime, worker, reloader, stop)
        attach_shared(runtime)  # cluster mode's shared tier (the supervisor runs the bus)
        _hold_for_tests(START_HOLD)
        if not await _may_listen(channel, worker.worker_id):
            await channel.close()
            await runtime.close()
            return 0
    try:
        if worker is None:
            admin_runner = await start_admin_listener(runtime, settings)
            if admin_runner is not None:
                admin.runners.append(admin_runner)
                listeners.admin_addresses = _bound(admin_runner)
            if settings.cluster is not None:
                # Caught up with the cluster's purges before the first client is served
                # (GET /healthz on the admin listener says why it is not ready meanwhile).
                await join_cluster(runtime, runtime.purge_here)  # (purges go through it: Runtime.purge)
        await start_proxy_listeners(runtime, settings, listeners, reuse_port=worker is not None)
    except (OSError, ClusterUnavailable) as exc:
        what = "cannot listen: " if isinstance(exc, OSError) else ""
        tell(f"cachegate: {what}{exc}")
        await listeners.stop(0)
        await admin.stop(0)
        if channel is not None:
            await channel.close()
        await runtime.close()
        return 1
    # A worker leaves SIGINT (Ctrl-C reaches the whole process group) to its supervisor.
    stop_signals = (signal.SIGTERM,) if worker is not None else (signal.SIGTERM, signal.SIGINT)
    stopped_by: list[str] = []  # the signal that stopped it, told to a worker's supervisor

    def stop_on(sig: signal.Signals) -> None:
        stopped_by.append(sig.name)
        stop.set()

    for sig in stop_signals:
        loop.add_signal_handler(sig, stop_on, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_in_background, runtime)
    watchdog = asyncio.ensure_future(notifier.keep_watchdog())
    expiry = None if worker is not None else watch_expiry(runtime, listeners.tls)
    # What came during the start-up (``proxy.earlysignals``): done now.
    early = next((sig for sig in stop_signals if earlysignals.take(sig)), None)
    if early is not None:
        stop_on(early)
    if earlysignals.take(signal.SIGHUP) and not stop.is_set():
        await reloader.reload()
    gctuning.settle()
    runtime.state = "ready"
    if channel is not None:
        try:
            await channel.call("ready", worker_id=worker.worker_id, pid=os.getpid())  # type: ignore[union-attr]
        except ChannelClosed:
            stop.set()  # the supervisor died while this worker started (``watch_supervisor`` says so)
    else:
        if on_listening is not None:
            on_listening(listeners)  # bound: what it prints is true (the demo's curl lines)
        announce(listeners)
        say_started(settings, listeners.proxy_urls,
                    [f"http://{_fmt(h)}:{p}" for h, p in listeners.admin_addresses], 1)
        if notifier.active and not stop.is_set():
            serving = f"serving {', '.join(listeners.proxy_urls)}"
            notifier.ready(serving)
            runtime.reload_config = _notified(notifier, serving, reloader.reload)
    try:
        await stop.wait()
    finally:
        runtime.state = "stopping"
        notifier.stopping()
        if channel is not None and stopped_by:
            await _tell_stopped_by(channel, stopped_by[0])
        # The grace period of the config running now: a reload may have changed it.
        log.info("shutting down: finishing in-flight requests (grace %gs)", runtime.settings.shutdown_grace)
        ignore_while_stopping(loop, (*stop_signals, signal.SIGHUP))
        # One deadline for the whole stop: requests in flight, then background fills, each
        # with what is left of the grace period (not a grace period each).
        deadline = loop.time() + runtime.settings.shutdown_grace
        await listeners.stop(runtime.settings.shutdown_grace)
        # The fills still running (a body past memory_max_object goes to disk once its clients
        # are served) end while the control channel is open: their leases' waiters in other
        # workers are told through it (proxy.leases). Closed before, their words were lost, and
        # those waiters sat until lock_timeout, then each fetched the object again.
        await runtime.drain(max(0.0, deadline - loop.time()))
        await admin.stop(max(0.0, deadline - loop.time()))  # (its own requests: what is left)
        if channel is not None:
            await channel.close()
        await runtime.close(max(0.0, deadline - loop.time()))
        watchdog.cancel()
        if expiry is not None:
            expiry.cancel()
    if worker is None:
        say("cachegate: stopped", event="stopped")
    return 0


async def _may_listen(channel: Channel, worker_id: int) -> bool:
    """Ask the supervisor before this worker's listeners open (its ``listen`` call). The purges
    made while it started were answered without waiting for it (``Supervisor._purge_starting``);
    the answer comes once it has acknowledged each of them (applied: its ban list, the shared
    memory), so nothing it serves is older than a purge that answered; later purges wait for
    it. False: the supervisor is gone (the worker stops, as ``watch_supervisor`` says)."""
    try:
        await channel.call("listen", worker_id=worker_id, pid=os.getpid())
    except ChannelClosed:
        return False
    return True


async def _tell_stopped_by(channel: Channel, name: str) -> None:
    """Tell the supervisor which signal stops this worker (one it did not send: ``kill -TERM``
    by an operator or a tool), before the drain, so that its exit is said as the stop it is,
    not as a crash. A supervisor that does not answer at once (stopped, gone) is not waited for."""
    with contextlib.suppress(ChannelClosed, RemoteError, TimeoutError):
        await channel.call("stopped_by", wait=STOPPED_BY_WAIT, pid=os.getpid(), signal=name)


def _notified(notifier: Notifier, serving: str,
              reload: Callable[[], Awaitable[ReloadResult]]) -> Callable[[], Awaitable[ReloadResult]]:
    """``reload`` bracketed by RELOADING=1 and READY=1 for the service manager; READY=1 once
    the last of overlapping reloads is over (its outcome), not while a later one still runs."""
    pending = 0

    async def reload_notified() -> ReloadResult:
        nonlocal pending
        pending += 1
        notifier.reloading()
        try:
            result = await reload()
        finally:
            pending -= 1
        if pending == 0:
            notifier.reloaded(serving, result.problems)
        return result
    return reload_notified


def ignore_while_stopping(loop: asyncio.AbstractEventLoop, signals: tuple[signal.Signals, ...]) -> None:
    """Once a stop began, ``signals`` only log. Why not remove the handlers: that resets them to
    the default action, which for SIGTERM and SIGHUP is to die, and a second SIGTERM (an
    impatient operator, a pod's preStop plus the kubelet) or a SIGHUP (logrotate's postrotate,
    ``systemctl reload``) during the drain would cut the in-flight requests off and exit non-zero."""
    for sig in signals:
        loop.add_signal_handler(sig, _ignored_while_stopping, sig)


def _ignored_while_stopping(sig: signal.Signals) -> None:
    log.warning("%s ignored while stopping", signal.Signals(sig).name)


# Seconds an unanswered invalidation waits for a disk shard's write lock before its worker answers
# (the lock's holder may be the stopped supervisor; its queued purge deletes what is left).
UNHEARD_DISK_WAIT = 1.0


async def invalidate_unheard(runtime: Runtime, spec: PurgeSpec, worker_id: int) -> PurgeOutcome:
    """An invalidation the supervisor did not carry out within ``consistency_wait`` (it is stopped or
    stalled): applied here to what every worker reads (the disk tier, the shared memory and, in
    cluster mode, the shared tier) and to this worker's own half, and the client gets its answer,
    rather than waiting for as long as the supervisor is stopped. The call stays queued on the control
    channel: when the supervisor runs again it makes the invalidation as usual (every worker's
    half; in cluster mode the other nodes, through the stream or the outbox). Until then another
    worker may still store a covered fill that was in flight in it, and the other nodes serve what
    they hold: a client kept waiting would not have changed that.

    The disk's copies are deleted without waiting long for a shard's write lock
    (``UNHEARD_DISK_WAIT``): a supervisor stopped in the middle of a write-behind commit holds one,
    and the deletion waited for it, the answer with it, until the supervisor ran again. They leave
    the directory of disk keys first, so no worker reads them meanwhile (``Purger.purge_unheard``)."""
    log.warning("worker %d: the supervisor did not answer an invalidation (%s) within %g s (stopped "
                "or stalled): applied from this worker to the disk and the shared memory (and the "
                "shared tier); the other workers and nodes get it when the supervisor runs again",
                worker_id, spec.describe(), runtime.settings.consistency_wait)
    runtime.metrics.storage_errors.labels("invalidate").inc()
    count, _ = await runtime.purger.purge_unheard(spec, UNHEARD_DISK_WAIT)
    try:
        await purge_shared_tier(runtime, spec)
    except Exception as exc:  # Redis away: the supervisor's outbox covers it once it runs
        log.warning("worker %d: the invalidation's removal from the shared tier failed: %r",
                    worker_id, exc)
    return PurgeOutcome(count)


async def _connect_supervisor(runtime: Runtime, worker: WorkerLink, reloader: Reloader,
                              stop: asyncio.Event) -> Channel:
    from proxy.purge import match_from_json
    from proxy.storage.index import Ban

    async def purge_local(match: dict[str, Any], bans: list[list[Any]]) -> int:
        return await runtime.storage.purge_local(match_from_json(match),
                                                 [Ban.from_json(b) for b in bans])

    async def reload(config: str | None = None, within: float | None = None,
                     deadline: float | None = None) -> dict[str, Any]:
        # the supervisor's copy as it committed it, to apply by ``deadline`` (CLOCK_MONOTONIC)
        result = await reloader.reload(config, within, deadline)
        return {"problems": result.problems, "restart_required": result.restart_required,
                "unapplied": result.unapplied, "stopping": result.stopping}

    async def ping() -> dict[str, Any]:
        return {"worker_id": worker.worker_id, "pid": os.getpid(),
                "memory_entries": len(runtime.storage.memory)}

    sock = socket.socket(fileno=worker.control_fd)
    channel = await Channel.open(sock, {"purge_local": purge_local, "reload": reload, "ping": ping},
                                 name=f"worker {worker.worker_id}")

    async def purge_via_supervisor(spec: PurgeSpec) -> PurgeOutcome:
        # An unsafe method's invalidation holds a client's answer: it waits for the supervisor as
        # long as a hit waits for a node to catch up (consistency_wait), then goes on without it
        # (``invalidate_unheard``). An admin purge's answer is the purge's outcome: it waits.
        wait = runtime.settings.consistency_wait if spec.invalidation else None
        try:
            return PurgeOutcome.from_json(await channel.call("purge", wait=wait, spec=spec.to_json()))
        except TimeoutError:
            if not spec.invalidation:
                raise
            return await invalidate_unheard(runtime, spec, worker.worker_id)
        except RemoteError as exc:
            kind, _, message = str(exc).partition(": ")
            if kind == PurgeUnavailable.__name__:
                raise PurgeUnavailable(message) from None
            raise

    runtime.purge_fn = purge_via_supervisor
    runtime.worker_id = worker.worker_id
    runtime.metrics.process_label = str(worker.worker_id)
    runtime.control = channel
    register_worker_calls(runtime)  # GET /cache, /stats, /metrics on the supervisor ask workers
    register_console_calls(runtime)  # the console's live numbers
    runtime.engine.join_cluster(channel, worker.worker_id)  # cross-worker coalescing (proxy.leases)

    async def watch_supervisor() -> None:
        await channel.closed.wait()
        if not stop.is_set():
            log.error("worker %d: the supervisor is gone; stopping", worker.worker_id)
            stop.set()

    runtime._tasks.append(asyncio.ensure_future(watch_supervisor()))
    return channel
