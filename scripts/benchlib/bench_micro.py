"""Micro-measurements behind scripts/bench's table: what each piece of a request costs, in µs.

``python scripts/benchlib/bench_micro.py [hit] [client] [fill]``

- hit: cachegate's own pieces of a 1 KiB memory hit, in-process, without sockets: the whole
  ``Engine.handle``, each step inside it, the web layer's header/response building, and
  what a pre-serialised header block would cost instead.
- client: CPU per upstream request of aiohttp's ClientSession vs a minimal asyncio-protocol
  keep-alive client, both against the raw origin (the client's own process CPU time).
- fill: cache fills (stored misses) per second and CPU per stored miss: FILL_KEYS distinct
  1 KiB keys asked once each by 64 concurrent keep-alive clients, through cachegate with
  1 and 2 workers (disk tier on) and, when installed, nginx proxy_cache (2 workers) and
  Varnish; CPU is the system's processes' (all threads, user + system) per fill.

Every number is a median of several repeats of many iterations, in CPU time of this process
(``time.process_time``), so they hold up better on a busy machine than req/s do. These are
internals: when a piece moves (other work on engine/rules/storage), the script says what
it could not measure and goes on.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_procs import ROOT, Fleet, cpu_seconds

sys.path.insert(0, str(ROOT))


def per_call_us(fn: Callable[[], object], number: int = 20000, repeat: int = 5) -> float:
    """Median CPU time of this process per call (process_time: other load on the machine drops out)."""
    times = timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)
    return statistics.median(times) / number * 1e6


def per_call_async_us(loop: asyncio.AbstractEventLoop, make: Callable[[], Any], number: int = 20000,
                      repeat: int = 5) -> float:
    async def batch() -> None:
        for _ in range(number):
            await make()

    times = []
    for _ in range(repeat):
        t = time.process_time()
        loop.run_until_complete(batch())
        times.append(time.process_time() - t)
    return statistics.median(times) / number * 1e6


def row(label: str, us: float | None, note: str = "") -> None:
    value = "   n/a" if us is None else f"{us:7.2f}"
    print(f"  {value} µs  {label}{('  — ' + note) if note else ''}", flush=True)


# -- hit path --------------------------------------------------------------------------------------


def hit(fleet: Fleet) -> None:
    import uvloop
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    from proxy.config import Overrides, load_config
    from proxy.engine import ClientRequest
    from proxy.policy.cache_status import cache_status
    from proxy.policy.keys import cache_key
    from proxy.policy.messages import RequestHead
    from proxy.policy.reuse import decide_lookup
    from proxy.runtime import Runtime
    from proxy.web.frontend import Front
    from proxy.web.proxy_handler import client_head

    origin = fleet.start_app("origin", "origin", 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-micro-", dir=fleet.dir))
    config = tmp / "c.yaml"
    config.write_text(f"upstreams: ['http://127.0.0.1:{origin.port}']\n"
                      "cache: {disk: null, max_object: 1MB}\n"
                      f"admin: {{listen: null}}\nrules: ['{ROOT / 'rules' / 'default.yaml'}']\n")
    settings = load_config(str(config), Overrides())
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    runtime = loop.run_until_complete(Runtime.open(settings))
    engine = runtime.engine
    try:
        raw = (b"GET /obj/1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n")
        mocked = make_mocked_request("GET", "/obj/1k", headers={"Host": "127.0.0.1:8080"})
        front = Front(runtime).current()
        head = client_head(mocked, front, False)
        assert isinstance(head, RequestHead)
        req = ClientRequest(head, "127.0.0.1", None)

        async def drain() -> Any:
            reply = await engine.handle(req)
            body = reply.body
            if hasattr(body, "__anext__"):
                async for _ in body:  # type: ignore[union-attr]
                    pass
            return reply

        first = loop.run_until_complete(drain())
        loop.run_until_complete(asyncio.sleep(0.2))
        reply = loop.run_until_complete(drain())
        print(f"1 KiB hit, in-process (first answer {first.x_cache}, then {reply.x_cache}; "
              f"{len(reply.headers)} response header fields):")
        total = per_call_async_us(loop, lambda: engine.handle(req))
        row("Engine.handle (whole engine, memory hit)", total)
        fast_path(loop, runtime, raw)
        row("client_head(aiohttp request) in the web layer", per_call_us(
            lambda: client_head(mocked, front, False)))
        plan = engine.rules.plan(head)
        row("RuleSet.plan (the default rules; no rule matches /obj/1k)",
            per_call_us(lambda: engine.rules.plan(head)))
        row("cache_key", per_call_us(lambda: cache_key(head, plan.key)))
        row("MemoryTier lookup (storage.memory_get)", per_call_us(
            lambda: engine.storage.memory_get(cache_key(head, plan.key))))
        variants = engine.storage.memory_get(cache_key(head, plan.key)) or ()
        responses = [c.entry.response for c in variants]
        now = time.time()
        row("decide_lookup", per_call_us(lambda: decide_lookup(head, responses, now, plan.options)))
        row("cache_status(hit, ttl)", per_call_us(lambda: cache_status(hit=True, ttl=3600.2)))
        stored = responses[0]
        row("header list: copy stored headers without Age, append 3",
            per_call_us(lambda: [(k, v) for k, v in stored.headers if k.lower() != "age"]
                        + [("Age", "1"), ("Cache-Status", "x"), ("X-Cache-Status", "HIT")]))
        metrics = runtime.metrics
        row("prometheus requests.labels(..).inc()",
            per_call_us(lambda: metrics.requests.labels("HIT", "GET").inc()))
        row("prometheus response_bytes.labels(..).inc(n)",
            per_call_us(lambda: metrics.response_bytes.labels("memory").inc(1024)))
        print("web layer (per response):")
        hdrs = reply.headers
        body = reply.body
        row("CIMultiDict(reply.headers)", per_call_us(lambda: CIMultiDict(hdrs)))
        cim = CIMultiDict(hdrs)
        row("web.Response(status, reason, body, headers=CIMultiDict)",
            per_call_us(lambda: web.Response(status=200, reason="OK", body=body, headers=cim)))
        pre = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in hdrs
                       if k not in ("Age", "Cache-Status", "X-Cache-Status"))

        def serialised() -> bytes:
            return b"".join((b"HTTP/1.1 200 OK\r\n", pre, b"Age: ", b"1", b"\r\nCache-Status: ",
                             b"cachegate; hit; ttl=3600\r\nX-Cache-Status: HIT\r\nContent-Length: 1024"
                             b"\r\n\r\n"))

        row("pre-serialised head: stored block + Age/Cache-Status/Content-Length", per_call_us(serialised))
        row("(for scale) parse the raw request line and 2 fields by hand",
            per_call_us(lambda: raw.split(b"\r\n")))
    finally:
        loop.run_until_complete(runtime.close())
        loop.close()


def fast_path(loop: asyncio.AbstractEventLoop, runtime: Any, raw: bytes) -> None:
    """The fast hit path's pieces (proxy.web.fastpath): what a 1 KiB hit costs below aiohttp."""
    from aiohttp._http_parser import HttpRequestParser

    from proxy.policy.request import normalise_request
    from proxy.web.fastpath import FastPath
    from proxy.web.frontend import Front

    parser = HttpRequestParser(object(), loop, 2**16, max_line_size=8190, max_field_size=8190,
                               max_headers=128, max_msg_queue_size=32)

    def parse() -> Any:
        messages = parser.feed_data(raw)[0]
        parser.message_consumed()
        return messages[0][0]

    msg = parse()
    fast = FastPath(Front(runtime))
    if fast.answer(msg, "127.0.0.1", False, 0.0) is None:
        print("  fast path: this hit is not answered on the fast path")
        return
    listener = runtime.settings.client_listener
    head = normalise_request(msg, secure=False, trusted=False, listener=listener)
    print("fast path (a hit answered from aiohttp's data_received, below web.Response):")
    row("aiohttp's C parser: feed_data of the request", per_call_us(parse))
    row("FastPath.answer (all of it, up to the bytes to write)",
        per_call_us(lambda: fast.answer(msg, "127.0.0.1", False, 0.0)))
    row("  normalise_request (the one view of the request)", per_call_us(
        lambda: normalise_request(msg, secure=False, trusted=False, listener=listener)))
    row("  Engine.fresh_hit (rules, key, memory, plain_fresh_hit)",
        per_call_us(lambda: runtime.engine.fresh_hit(head)))


# -- upstream client -------------------------------------------------------------------------------


class _RawClient(asyncio.Protocol):
    """Keep-alive HTTP/1.1 client connection: one request at a time, Content-Length bodies only."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[tuple[bytes, bytes]] | None = None
        self.need = -1
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, self.buf = self.buf[:end], self.buf[end + 4:]
            i = self.head.lower().find(b"content-length:")
            self.need = int(self.head[i + 15:self.head.find(b"\r\n", i) if self.head.find(b"\r\n", i) > 0
                                      else None].strip())
        if len(self.buf) >= self.need and self.waiter is not None:
            body, self.buf = self.buf[:self.need], self.buf[self.need:]
            self.need = -1
            waiter, self.waiter = self.waiter, None
            waiter.set_result((self.head, body))

    async def get(self, request: bytes) -> tuple[bytes, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


def client(fleet: Fleet, total: int = 30000, concurrency: int = 64) -> None:
    import aiohttp
    import uvloop

    origin = fleet.systems.get("origin") or fleet.start_app("origin", "origin", 2)
    url = origin.url("/pass/1k")

    async def with_aiohttp() -> tuple[float, float]:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=256),
                                        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                                        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"))
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.get(url, headers=[("Host", "example"), ("Via", "1.1 x")]) as r:
                    await r.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm the pool
        left = total
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await session.close()
        return cpu / total * 1e6, total / wall

    async def with_raw() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        conns = [(await loop.create_connection(_RawClient, "127.0.0.1", origin.port))[1]
                 for _ in range(concurrency)]
        request = b"GET /pass/1k HTTP/1.1\r\nHost: example\r\nVia: 1.1 x\r\n\r\n"
        left = total

        async def worker(c: _RawClient) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await c.get(request)

        await asyncio.gather(*(worker(c) for c in conns))
        left = total
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        for c in conns:
            assert c.transport is not None
            c.transport.close()
        return cpu / total * 1e6, total / wall

    print(f"upstream client, {total} GETs of 1 KiB over {concurrency} keep-alive connections "
          "(client process CPU per request; req/s as seen by the client):")
    for label, fn in (("aiohttp ClientSession.get + read", with_aiohttp),
                      ("raw asyncio protocol client (Content-Length only)", with_raw)):
        results = []
        for _ in range(3):
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results.append(runner.run(fn()))
        cpu = statistics.median(r[0] for r in results)
        rps = statistics.median(r[1] for r in results)
        row(label, cpu, f"{rps:,.0f} req/s")


# -- cache fills ---------------------------------------------------------------------------------

FILL_KEYS = 20000


def fill(fleet: Fleet, keys: int = FILL_KEYS, concurrency: int = 64) -> None:
    import shutil

    import aiohttp

    origin = fleet.systems.get("origin") or fleet.start_app("origin", "origin", 2)

    async def prime(url: str) -> tuple[float, dict[str, int], list[float]]:
        statuses: dict[str, int] = {}
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            todo = iter(range(keys))

            async def filler() -> None:
                for i in todo:
                    started = time.perf_counter()
                    async with session.get(f"{url}/obj/1k/fill{i}") as r:
                        await r.read()
                        said = r.headers.get("X-Cache-Status", "?")
                        statuses[said] = statuses.get(said, 0) + 1
                    latencies.append(time.perf_counter() - started)

            wall = time.perf_counter()
            await asyncio.gather(*(filler() for _ in range(concurrency)))
            return time.perf_counter() - wall, statuses, latencies

    systems = [("cachegate 1 worker", lambda: fleet.start_cachegate("fill-cg1", origin, 1)),
               ("cachegate 2 workers", lambda: fleet.start_cachegate("fill-cg2", origin, 2))]
    if shutil.which("nginx"):
        systems.append(("nginx 2 workers", lambda: fleet.start_nginx("fill-nginx", origin, 2)))
    if shutil.which("varnishd"):
        systems.append(("varnish", lambda: fleet.start_varnish("fill-varnish", origin)))
    print(f"cache fills: {keys} distinct 1 KiB keys, each asked once, {concurrency} keep-alive clients "
          "(CPU: the system's processes, all threads):")
    for label, start in systems:
        system = start()
        time.sleep(1.0)
        pids = system.all_pids()
        before = cpu_seconds(pids)
        wall, statuses, latencies = asyncio.run(prime(system.url("")))
        time.sleep(1.0)  # disk writes that finish after the responses count too
        cpu = cpu_seconds(pids) - before
        latencies.sort()
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        row(f"{label}: {keys / wall:,.0f} fills/s, p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms",
            cpu / keys * 1e6, f"CPU per fill; answers {statuses}")
        fleet._stop_system(system)  # one at a time: they share the two CPUs
        fleet.systems.pop(system.name, None)


def main(argv: list[str]) -> int:
    parts = argv or ["hit", "client"]
    fleet = Fleet()
    try:
        for part in parts:
            try:
                {"hit": hit, "client": client, "fill": fill}[part](fleet)
            except (ImportError, AttributeError, TypeError) as exc:
                print(f"  {part}: could not measure ({type(exc).__name__}: {exc})")
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
