"""Real parts for tests: an origin server on a loopback port, and cachegate in front of it.

Nothing here is a mock: the origin is an aiohttp app listening on 127.0.0.1:0,
the proxy is cachegate's own runtime and listeners on port 0, with its disk tier
in a temporary folder.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Overrides, load_config
from proxy.runtime import Runtime
from proxy.web.server import Listeners, _bound, start_admin_listener, start_proxy_listeners
from tests.ports import HeldPort

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes


class Origin:
    """An origin whose routes a test sets; it records every request it receives."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[Seen] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._held = HeldPort()  # the port, while stopped to be started again
        self.ssl_context: Any = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def route(self, path: str, handler: Handler | None = None, *, status: int = 200,
              body: bytes | str = b"", headers: dict[str, str] | None = None,
              delay: float = 0.0) -> None:
        if handler is None:
            data = body.encode() if isinstance(body, str) else body

            async def fixed(request: web.Request) -> web.StreamResponse:
                if delay:
                    await asyncio.sleep(delay)
                return web.Response(status=status, body=data, headers=headers or {})

            handler = fixed
        self.routes[path] = handler

    def count(self, path: str) -> int:
        return self.counts[path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        # Small bodies are recorded; big ones are left for the route to stream.
        length = request.content_length
        body = await request.read() if length is not None and length <= 1 << 20 else b""
        self.seen.append(Seen(request.method, request.path_qs, request.headers, body))
        self.counts[request.path] += 1
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no such route")
        return await handler(request)

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port or self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = _bound(self.runner)[0][1]
        self._held.release()

    async def stop(self, hold_port: bool = False) -> None:
        """Stop; with ``hold_port`` keep the port until the next ``start`` or ``stop``: for a
        ``start`` on it, or for a test that wants its connections refused meanwhile (no other
        test's server is given the port: tests/ports.py)."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self._held.release()
        if hold_port and self.port:
            self._held.keep(self.port)


class Versions:
    """A page whose data changes while a fill of it is in flight: it renders the data's current
    ``version`` (a POST to it makes the next one), and answers the first version only once
    ``head`` is set: a response made before a purge and sent after it."""

    def __init__(self, tag: str | None = None) -> None:
        self.version = 1
        self.gets = 0
        self.head = asyncio.Event()
        self._fields = {"Cache-Control": "max-age=600", **({"Surrogate-Key": tag} if tag else {})}

    async def page(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            self.version += 1
            return web.Response(status=204)
        self.gets += 1
        version = self.version  # rendered from the data as it is now ...
        if version == 1:
            await self.head.wait()  # ... and answered after the purge
        return web.Response(body=b"v%d" % version, headers=self._fields)


class Edited:
    """A page a POST edits: a GET answers ``old`` (``max-age=300``) until a POST (answered 204),
    ``new`` from then on, so that a response served after the POST tells whether the unsafe
    method's invalidation (RFC 9111 §4.4) reached the cache that served it."""

    def __init__(self) -> None:
        self.body = b"old"

    async def page(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self.body = b"new"
            return web.Response(status=204)
        return web.Response(body=self.body, headers={"Cache-Control": "max-age=300"})


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def x_cache(self) -> str:
        return self.headers.get("X-Cache-Status", "")

    @property
    def cache_status(self) -> str:
        return self.headers.get("Cache-Status", "")


class Clock:
    """A clock a test moves by hand (set as ``runtime.engine.clock``), so nothing sleeps for
    freshness to run out. It starts at the current whole second, as Date headers have it.
    ``monotonic`` is the time that passes beside it (the coalescer's clock: ``run_on``):
    ``advance`` moves both, ``step`` only the wall clock (an operator or NTP setting it)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))
        self.elapsed = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.elapsed += seconds

    def step(self, seconds: float) -> None:
        """The wall clock set forwards or back: no time passes."""
        self.now += seconds

    def run_on(self, runtime: Runtime) -> None:
        """Run ``runtime``'s engine on this clock: the wall clock its decisions read, and the
        monotonic one its coalescer's whiles (hit-for-pass, a failed refresh's wait) run on."""
        runtime.engine.clock = self
        runtime.engine.coalescer._clock = self.monotonic


@dataclass
class Proxy:
    runtime: Runtime
    listeners: Listeners
    session: aiohttp.ClientSession
    cache_dir: str
    config_path: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The first client listener's URL."""
        if self.listeners.proxy_urls:
            return self.listeners.proxy_urls[0]
        host, port = self.listeners.proxy_addresses[0]
        return f"http://{host}:{port}"

    @property
    def admin_url(self) -> str:
        host, port = self.listeners.admin_addresses[0]
        return f"http://{host}:{port}"

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        async with self.session.request(method, self.url + path, allow_redirects=False,
                                        **kwargs) as resp:
            body = await resp.read()
            return Reply(resp.status, resp.headers, body)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def raw(self, method: str, target: str, host: str | None = None) -> Reply:
        """``method target`` sent as written, on a connection of its own (an HTTP client's URL
        parser would re-encode the target, or drop an empty query, before the proxy saw it)."""
        address, port = self.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(address, int(port))
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: {host or f'{address}:{port}'}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        fields = CIMultiDict(tuple(line.split(": ", 1)) for line in lines)
        return Reply(int(status.split()[1]), CIMultiDictProxy(fields), body)

    async def admin(self, method: str, path: str, **kwargs: Any) -> Reply:
        """An admin request as ``cachegate purge`` sends it: JSON for anything but GET/HEAD
        (unless the test gives its own Content-Type; the admin guard refuses others)."""
        kwargs["headers"] = json_content(method, kwargs.get("headers"))
        async with self.session.request(method, self.admin_url + path, **kwargs) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def close(self) -> None:
        await self.listeners.stop(1.0)
        await self.runtime.close()


async def directory_ready(proxy: Proxy) -> None:
    """Until the directory of the disk's keys is built (the owner does it at start)."""
    for _ in range(200):
        if proxy.runtime.storage.memory.arena.directory_ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the directory of the disk's keys was never built")


def json_content(method: str, headers: dict[str, str] | None) -> dict[str, str]:
    """``headers`` with ``Content-Type: application/json`` added for a state-changing method."""
    headers = dict(headers or {})
    if method.upper() not in ("GET", "HEAD") and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    return headers


def write_config(directory: str, origin_url: str, config: str = "", rules: str | None = None,
                 upstreams: list[str] | None = None) -> str:
    """A config file in ``directory``: loopback listeners on port 0, the disk tier beside it."""
    rules_line = ""
    if rules is not None:
        with open(os.path.join(directory, "rules.yaml"), "w") as f:
            f.write(textwrap.dedent(rules))
        rules_line = "rules: [rules.yaml]\n"
    config = textwrap.dedent(config)
    text = (
        ("" if re.search(r"^listen:", config, re.MULTILINE) else "listen: 127.0.0.1:0\n")
        + f"upstreams: [{', '.join(f'{{url: {u!r}}}' for u in upstreams or [origin_url])}]\n"
        + ("" if "admin:" in config else "admin: {listen: '127.0.0.1:0'}\n")
        + rules_line
        + config
    )
    if "cache:" not in config:
        text += "cache: {memory: 64MB, disk: {path: cache, size: 512MB, shards: 2}}\n"
    path = os.path.join(directory, "cachegate.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


async def start_proxy(directory: str, origin_url: str, config: str = "", rules: str | None = None,
                      upstreams: list[str] | None = None) -> Proxy:
    path = write_config(directory, origin_url, config, rules, upstreams)
    settings = load_config(path, Overrides())
    runtime = await Runtime.open(settings)
    listeners = Listeners()
    await start_proxy_listeners(runtime, settings, listeners)
    runtime.state = "ready"  # as serve() says once its listeners accept
    admin = await start_admin_listener(runtime, settings)
    if admin is not None:
        listeners.runners.append(admin)
        listeners.admin_addresses = _bound(admin)
    session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
    cache_dir = settings.cache.disk.path if settings.cache.disk else directory
    return Proxy(runtime, listeners, session, cache_dir, path)


@dataclass
class ProxyProcess:
    """``cachegate run`` as a real subprocess, with the addresses it announced."""

    proc: subprocess.Popen[str]
    proxy_url: str
    admin_url: str | None
    output: list[str]
    drain: threading.Thread | None = None

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to end (killing it after ``timeout``) and close its pipe."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.drain is not None:
            self.drain.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    @property
    def text(self) -> str:
        return "".join(self.output)


def post_reload(admin_url: str, timeout: float = 90) -> tuple[int, dict[str, Any]]:
    """``POST /reload`` to a cachegate's admin API (blocking: call it in a thread); its status
    and JSON answer, a refusal's too."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{admin_url}/reload", method="POST", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def spawn_cachegate(args: list[str], env: dict[str, str] | None = None, *, expect_admin: bool = True,
                    timeout: float = 20.0, preexec: Callable[[], None] | None = None) -> ProxyProcess:
    """Start ``python -m proxy <args>`` and wait until it announces its listeners (``preexec``
    runs in the child before it starts: a resource limit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, **(env or {})}, preexec_fn=preexec,
    )
    assert proc.stdout is not None
    output: list[str] = []
    proxy_url = admin_url = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (proxy_url and (admin_url or not expect_admin)):
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        # Text, or a JSON object's "message" (logs in JSON): the URL ends at a space or quote.
        if "proxy listening on " in line and proxy_url is None:
            proxy_url = re.split(r'[\s"]', line.split("proxy listening on ", 1)[1])[0]
        elif "admin listening on " in line and admin_url is None:
            admin_url = re.split(r'[\s"]', line.split("admin listening on ", 1)[1])[0]
    if proxy_url is None:
        proc.kill()
        rest = proc.stdout.read()
        proc.stdout.close()  # (left open, its warning failed whichever test ran next in the worker)
        proc.wait()
        raise RuntimeError("cachegate did not start:\n" + "".join(output) + rest)
    drain = threading.Thread(target=_drain, args=(proc, output), daemon=True)
    drain.start()
    return ProxyProcess(proc, proxy_url, admin_url, output, drain)


def _drain(proc: subprocess.Popen[str], output: list[str]) -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            output.append(line)
    except ValueError:  # closed by ProxyProcess.wait
        pass


# What self_signed made, by its arguments: a key is generated once per process, not at each call
# (two RSA keys per TLS test cost a second or more on a loaded machine).
_SELF_SIGNED: dict[tuple[str, str, str], tuple[bytes, bytes, int]] = {}


def self_signed(directory: Path, name: str, cn: str, alt_names: str) -> tuple[Path, Path]:
    """A throwaway key and self-signed certificate (openssl), valid for 90 days (a TLS listener
    warns of one that expires within 14); the test skips, saying why, when there is no openssl
    (scripts/test installs it). The same arguments give the same pair within a test run
    (written afresh into ``directory``); other names, other keys."""
    import pytest

    key, cert = directory / f"{name}key.pem", directory / f"{name}cert.pem"
    made = _SELF_SIGNED.get((name, cn, alt_names))
    if made is not None:
        key.write_bytes(made[0])
        key.chmod(made[2])
        cert.write_bytes(made[1])
        return key, cert
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/test installs it with apt-get where it can)")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "90", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={alt_names}"],
        check=True, capture_output=True,
    )
    _SELF_SIGNED[(name, cn, alt_names)] = (key.read_bytes(), cert.read_bytes(), key.stat().st_mode & 0o777)
    return key, cert
