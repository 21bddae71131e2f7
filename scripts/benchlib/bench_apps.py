"""The benchmark's own servers: the origin, the bare aiohttp ceiling and the bare aiohttp pass-through.

Run one per process: ``python bench_apps.py origin|ceiling|passthrough --port P [--reuse-port]``.
Several processes on one port (``--reuse-port``, SO_REUSEPORT) make the 2-process variants.
Each prints ``ready`` once it is accepting.

URL space (the same on every server):

- ``/obj/<size>[/<anything>]``  cacheable: ``Cache-Control: public, max-age=86400``, with a
  strong ``ETag`` (``etag_of(size)``: every path of a size has the same bytes) and a fixed
  ``Last-Modified``, so that a cache can answer a client's ``If-None-Match`` with 304
- ``/pass/<size>[/<anything>]`` uncacheable: ``Cache-Control: private`` (what a cache forwards)
- ``/zipf/<size>/<anything>``   cacheable: ``Cache-Control: public, max-age=3600``, and a body
  of its own per path (``keyed_body``), so a check of the bytes tells keys apart

``<size>`` is ``1k``, ``100k``, ``1m`` or a byte count. The suffix makes distinct keys.

- origin: a raw ``asyncio.Protocol`` HTTP/1.1 server writing pre-built responses. It is
  deliberately not aiohttp, so that on the miss path the origin is cheaper than any of the
  proxies in front of it; driven directly, it is also the "raw transport write" reference for
  what aiohttp's ``web.Response`` machinery costs.
- ceiling: aiohttp's low-level ``web.Server`` (cachegate's own front end) answering
  ``web.Response(body=fixed bytes)``: the fastest our stack answers anything.
- passthrough: the same low-level server forwarding every request with one shared
  ``aiohttp.ClientSession`` (keep-alive pool): the cost of aiohttp's client per request.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import time
import zlib
from email.utils import formatdate

SIZES = {"1k": 1024, "100k": 100 * 1024, "1m": 1024 * 1024}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length"})  # fmt: skip


def parse_size(text: str) -> int | None:
    """``1k`` / ``100k`` / ``1m`` / a byte count -> bytes; None when it is none of these."""
    if text in SIZES:
        return SIZES[text]
    if text.isdigit() and int(text) <= 64 << 20:
        return int(text)
    return None


def route(path: str) -> tuple[str, int] | None:
    """``/obj/1k/7`` -> ("obj", 1024); None for anything outside the benchmark's URL space."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] not in ("obj", "pass", "zipf"):
        return None
    size = parse_size(parts[2])
    return None if size is None else (parts[1], size)


def body_of(size: int) -> bytes:
    """Deterministic, incompressible-looking bytes (the same on every server)."""
    pattern = bytes(range(33, 127))
    return (pattern * (size // len(pattern) + 1))[:size]


CACHE_CONTROL = {"obj": "public, max-age=86400", "pass": "private", "zipf": "public, max-age=3600"}
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"  # the bodies never change


def etag_of(size: int) -> str:
    """The strong ETag of ``/obj/<size>``'s body (``body_of(size)``, the same for every suffix)."""
    return f'"obj-{size}"'


def validators(kind: str, size: int) -> str:
    """The validator fields of an origin response: ``obj`` has both, the others none (the
    origin never answers a conditional itself: only a cache's 304 is one)."""
    return f"ETag: {etag_of(size)}\r\nLast-Modified: {LAST_MODIFIED}\r\n" if kind == "obj" else ""

# Bytes that keyed bodies are cut from: pseudo-random (fixed seed), 1 MiB to start from + 256 KiB.
_NOISE = random.Random(20261127).randbytes((1 << 20) + (256 << 10) + 4096)


def keyed_body(path: str, size: int) -> bytes:
    """The body of ``path`` (``size`` bytes): the path itself, then bytes cut from a fixed
    pseudo-random buffer at an offset the path decides. Two keys of the same size get
    different bytes, so a cache that answered one key with another's body is caught; the
    cost is one slice (the origin must never be the bottleneck)."""
    head = path.encode() + b"\n"
    if size <= len(head):
        return head[:size]
    start = zlib.crc32(head) % (1 << 20)
    return head + _NOISE[start:start + size - len(head)]


# -- origin: raw asyncio protocol --------------------------------------------------------------


class _DateCache:
    """The ``Date`` value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self.value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self.value = formatdate(second, usegmt=True)
        return self.value


_DATE = _DateCache()
_HEADS: dict[tuple[str, int, str], bytes] = {}
_BODIES: dict[int, bytes] = {}


def origin_response(kind: str, size: int, head_only: bool, path: str = "") -> list[bytes]:
    date = _DATE.now()
    key = (kind, size, date)
    head = _HEADS.get(key)
    if head is None:
        if len(_HEADS) > 20000:  # zipf keys come in thousands of sizes
            _HEADS.clear()
        head = (
            "HTTP/1.1 200 OK\r\n"
            f"Date: {date}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\n"
            f"Cache-Control: {CACHE_CONTROL[kind]}\r\n"
            f"{validators(kind, size)}"
            "\r\n"
        ).encode()
        _HEADS[key] = head
    if head_only:
        return [head]
    if kind == "zipf":
        return [head, keyed_body(path, size)]
    body = _BODIES.get(size)
    if body is None:
        body = _BODIES[size] = body_of(size)
    return [head, body]


# --record: the X-Bench field of every request that reached the origin ("RUN N": the N-th
# request of a wrk run), flushed to a file per process (see zipf.lua and ``read_records``).
_RECORDED: list[bytes] = []


def _note(lower_fields: bytes, fields: bytes) -> None:
    at = lower_fields.find(b"x-bench:")
    if at >= 0:
        end = fields.find(b"\r\n", at)
        _RECORDED.append(fields[at + 8:end if end >= 0 else len(fields)].strip())


async def _flush_records(path: str) -> None:
    while True:
        await asyncio.sleep(0.1)
        if _RECORDED:
            lines = b"\n".join(_RECORDED) + b"\n"
            _RECORDED.clear()
            with open(path, "ab") as f:  # noqa: ASYNC230  (a few KB: not worth a thread)
                f.write(lines)


def read_records(folder: str, run: str) -> list[int]:
    """The request numbers of run ``run`` that reached the origin (every origin process's file)."""
    import os

    out: list[int] = []
    prefix = run.encode() + b" "
    for name in os.listdir(folder):
        if name.startswith("origin-"):
            with open(os.path.join(folder, name), "rb") as f:
                for line in f:
                    if line.startswith(prefix):
                        out.append(int(line[len(prefix):]))
    return out


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nContent-Type: text/plain\r\n\r\nnot found\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class OriginProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive and pipelining for bodiless requests; enough for caches and wrk."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buf = buf[:end], buf[end + 4:]
            line, _, fields = head.partition(b"\r\n")
            parts = line.split(b" ")
            lower = fields.lower()
            if len(parts) != 3 or b"transfer-encoding:" in lower or b"content-length:" in lower:
                out.append(BAD)  # request bodies are not part of the benchmark
                close = True
                break
            method, target, version = parts
            path = target.decode("latin-1")
            if RECORD:
                _note(lower, fields)
            found = route(path)
            if found is None:
                out.append(NOT_FOUND)
            else:
                out.extend(origin_response(found[0], found[1], method == b"HEAD", path))
            if version == b"HTTP/1.0" or b"connection: close" in lower:
                close = True
                break
        self.buf = buf
        if out:
            self.transport.writelines(out)
        if close or len(self.buf) > 65536:
            self.transport.close()


RECORD = False
_FLUSHER: list[asyncio.Task[None]] = []


async def serve_origin(sock: socket.socket, record: str = "") -> None:
    global RECORD
    loop = asyncio.get_running_loop()
    if record:
        import os

        RECORD = True
        # Kept referenced: the loop holds tasks weakly.
        _FLUSHER.append(loop.create_task(_flush_records(os.path.join(record, f"origin-{os.getpid()}.log"))))
    server = await loop.create_server(OriginProtocol, sock=sock, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- ceiling and pass-through: aiohttp's low-level server ---------------------------------------


async def _serve_aiohttp(sock: socket.socket, handler: object, on_cleanup: object = None) -> None:
    from aiohttp import web

    server = web.Server(handler, access_log=None)  # type: ignore[arg-type]
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        if on_cleanup is not None:
            await on_cleanup()  # type: ignore[operator]
        await runner.cleanup()


async def serve_ceiling(sock: socket.socket) -> None:
    """A bare aiohttp answer: fixed bytes, the two headers a cache hit would carry at least."""
    from aiohttp import web

    bodies: dict[int, bytes] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        found = route(request.raw_path)
        if found is None:
            return web.Response(status=404, text="not found\n")
        size = found[1]
        body = bodies.get(size)
        if body is None:
            body = bodies[size] = body_of(size)
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={"Cache-Control": CACHE_CONTROL[found[0]]})

    await _serve_aiohttp(sock, handler)


async def serve_passthrough(sock: socket.socket, upstream: str) -> None:
    """A toy reverse proxy: one shared ClientSession, read the body, answer with web.Response."""
    import aiohttp
    from aiohttp import web
    from multidict import CIMultiDict

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=256),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
    )

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        async with session.request(request.method, upstream + request.raw_path, headers=headers,
                                   allow_redirects=False) as resp:
            body = await resp.read()
            out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP)
        return web.Response(status=resp.status, body=body, headers=out)

    await _serve_aiohttp(sock, handler, session.close)


# -- process entry -------------------------------------------------------------------------------


def listen_socket(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("app", choices=("origin", "ceiling", "passthrough"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--upstream", default="", help="origin URL, for passthrough")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--record", default="", help="origin: a folder for the X-Bench records")
    args = parser.parse_args(argv)
    sock = listen_socket(args.port, args.reuse_port)
    if args.app == "origin":
        coro = serve_origin(sock, args.record)
    elif args.app == "ceiling":
        coro = serve_ceiling(sock)
    else:
        if not args.upstream:
            parser.error("passthrough needs --upstream")
        coro = serve_passthrough(sock, args.upstream.rstrip("/"))
    try:
        if args.no_uvloop:
            asyncio.run(coro)
        else:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(coro)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
