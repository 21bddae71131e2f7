"""cachegate as a real subprocess (``cachegate run``) for crash, restart, budget and worker tests.

The origin runs in the test's event loop (tests/harness.py), so everything here
is async: the loop keeps serving the origin while a test waits on the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from tests.harness import Origin, json_content

HOST = "cachegate.test"
# (The URL ends at a space, or at the quote of a JSON line's "message": ``access_log: true``.)
LISTEN = re.compile(r'proxy listening on http://([^\s"]+)')
ADMIN = re.compile(r'admin listening on http://([^\s"]+)')
WORKER = re.compile(r"worker (\d+) ready \(pid (\d+)\)")


@dataclass
class Response:
    status: int
    headers: Any
    body: bytes

    @property
    def x_cache(self) -> str:
        return str(self.headers.get("X-Cache-Status", ""))

    @property
    def tier(self) -> str:
        return str(self.headers.get("X-Cachegate-Tier", ""))

    @property
    def worker(self) -> str:
        return str(self.headers.get("X-Cachegate-Worker", ""))


STARTED: list[ProxyProcess] = []  # every one a test started, for ``kill_leftovers``


def kill_leftovers() -> int:
    """SIGKILL what a test left running (it failed before its stop): the supervisor and its
    workers, so a failed test never leaves processes behind. How many were still running."""
    left = 0
    for p in STARTED:
        if p.process is not None and p.process.returncode is None:
            left += 1
            for pid in (p.process.pid, *p.workers.values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    STARTED.clear()
    return left


async def shared(directory: str, cache: str, *args: str,
                 workers: int = 1) -> AsyncIterator[tuple[Origin, ProxyProcess]]:
    """An origin and ``cachegate run`` in front of it (``cache`` config lines, in ``directory``)
    for a module-scoped fixture whose tests each use paths of their own (none purges, reloads,
    kills or fills what another reads, nor counts what another did): one start for the module,
    not one per test. ``kill_leftovers`` (after each test) leaves the process running; this
    stops it at the end, and kills it if it does not stop.

    The tests that use it run in the module's event loop (``pytest.mark.asyncio(loop_scope=
    "module")``), and so may not use async fixtures of a test's own (``origin``, ``make_proxy``):
    those run in a loop of their own."""
    origin = Origin()
    await origin.start()
    try:
        proxy = ProxyProcess(directory, write_config(directory, origin.url, cache))
        await proxy.start(*args, *(("--workers", str(workers)) if workers > 1 else ()))
        STARTED.remove(proxy)
        try:
            # (Its admin listener's line comes after the proxy's: a test may ask it first.)
            await proxy.wait_for(lambda: bool(proxy.admin_url) and (workers == 1 or len(proxy.workers) == workers))
            yield origin, proxy
        finally:
            try:
                await proxy.stop()
            except BaseException:
                await proxy.kill()
                raise
    finally:
        await origin.stop()


@dataclass
class ProxyProcess:
    directory: str
    config_path: str
    process: asyncio.subprocess.Process | None = None
    url: str = ""
    admin_url: str = ""
    lines: list[str] = field(default_factory=list)
    workers: dict[int, int] = field(default_factory=dict)  # worker id -> pid (latest)
    ready_at: dict[int, float] = field(default_factory=dict)  # worker id -> when its ready line came
    # The program before ``run``: ``python -m proxy`` unless given (the console script's).
    program: tuple[str, ...] = ()
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, *args: str, wait: float = 30.0, with_log: bool = False) -> None:
        """``with_log``: the error log (standard error) among ``lines`` too."""
        env = dict(os.environ, CACHEGATE_DEBUG_HEADERS="1")
        self.process = await asyncio.create_subprocess_exec(
            *(self.program or (sys.executable, "-m", "proxy")), "run", "--config", self.config_path, "--log-level",
            "warning", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if with_log else None, env=env,
            cwd=self.directory)
        STARTED.append(self)
        self.url = self.admin_url = ""
        self._reader = asyncio.ensure_future(self._read())
        await self.wait_for(lambda: bool(self.url), wait)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if m := LISTEN.search(line):
                self.url = "http://" + m.group(1)
            if m := ADMIN.search(line):
                self.admin_url = "http://" + m.group(1)
            if m := WORKER.search(line):
                self.workers[int(m.group(1))] = int(m.group(2))
                self.ready_at[int(m.group(1))] = asyncio.get_running_loop().time()
            self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Any, wait: float = 30.0) -> None:
        async def loop() -> None:
            while not predicate():
                if self.process is not None and self.process.returncode is not None:
                    raise AssertionError(f"cachegate exited ({self.process.returncode}):\n"
                                         + "\n".join(self.lines))
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.2)

        await asyncio.wait_for(loop(), wait)

    async def get(self, path: str, **kwargs: Any) -> Response:
        """A GET on a new connection (so that SO_REUSEPORT may pick any worker).

        The Host is fixed (it is part of the cache key, and a restarted proxy on port 0
        listens on another port)."""
        kwargs.setdefault("headers", {}).setdefault("Host", HOST)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as s, \
                s.get(self.url + path, allow_redirects=False, **kwargs) as r:
            return Response(r.status, r.headers, await r.read())

    async def admin(self, method: str, path: str, **kwargs: Any) -> Response:
        kwargs["headers"] = json_content(method, kwargs.get("headers"))
        async with aiohttp.ClientSession() as s, s.request(method, self.admin_url + path, **kwargs) as r:
            return Response(r.status, r.headers, await r.read())

    def send(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, wait: float = 30.0) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), wait)
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        """SIGKILL the whole process group (a supervisor and its workers)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        for pid in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


async def on_disk(proxy: ProxyProcess, url: str) -> None:
    """Until the disk tier has ``url`` (the supervisor writes fills behind them)."""
    for _ in range(100):
        variants = json.loads((await proxy.admin("GET", f"/cache?url={quote(url)}")).body)["variants"]
        if variants and "disk" in variants[0]["tiers"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never reached the disk")


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not reaped yet, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def write_config(directory: str, origin_url: str, cache: str, extra: str = "",
                 admin: str = "{listen: '127.0.0.1:0'}") -> str:
    text = (
        "listen: 127.0.0.1:0\n"
        f"upstreams: [{{url: '{origin_url}'}}]\n"
        f"admin: {admin}\n"
        "shutdown_grace: 2s\n"
        + textwrap.dedent(cache) + textwrap.dedent(extra)
    )
    path = os.path.join(directory, "cachegate.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def rss_bytes(pid: int) -> int:
    return status_bytes(pid, "VmRSS")


def status_bytes(pid: int, field: str) -> int:
    """A size in /proc/PID/status (``VmRSS``; ``RssAnon``: the heap, not the shared memory
    tier), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def disk_usage(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def breakdown(path: str) -> dict[str, int]:
    """Bytes on disk by kind: value files, databases, WAL and shared-memory files, spools."""
    out: dict[str, int] = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            kind = ("spool" if os.path.relpath(dirpath, path).startswith("tmp") else "val" if name.endswith(".val")
                    else name.split(".", 1)[-1])
            with contextlib.suppress(OSError):
                out[kind] = out.get(kind, 0) + os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return out
