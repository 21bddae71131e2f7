"""A client that pipelines bodiless requests and never reads must not grow the worker's memory.

Every reply goes into the connection's transport; while the client reads nothing, the kernel's
buffers fill and the transport is paused for writing. A reply with a body waits for the
transport to drain as it writes the body; a reply without one (HEAD, a 304) has nothing to
write after its head, so it used to wait for nothing, and aiohttp took the next pipelined
request at once: the replies piled up in the transport's buffer without limit (300,000 HEADs
on one connection: +268 MB). Now each waits for the drain (``ProxyRequestHandler
.finish_response``), aiohttp's queue fills, it stops reading, and the fast path, which
leaves a connection paused for writing to aiohttp, answers nothing meanwhile.

What is measured is the transport's write buffer, in-process: that is where the replies piled
up. Its bound is the transport's high-water mark (where it pauses) plus one reply (the last
one written before the pause was noticed) and room to spare: 128 KiB over the mark. Without
the wait the buffer holds every reply of the run (REQUESTS of them, some 300 bytes each:
about 3 MB), far past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.web.fastpath import ProxyRequestHandler
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.misbehaving import unread_connection

REQUESTS = 10_000
SLACK = 128 * 1024


def connection(proxy: Proxy, sock: socket.socket) -> ProxyRequestHandler | None:
    """The proxy's handler of the client connection ``sock``, once it has it."""
    server: Any = proxy.listeners.runners[0].server
    for handler in server.connections:
        if isinstance(handler, ProxyRequestHandler) and handler.peername == sock.getsockname():
            return handler
    return None


async def pipeline_unread(proxy: Proxy, request: bytes) -> tuple[socket.socket, ProxyRequestHandler, int, int]:
    """Send up to REQUESTS pipelined copies of ``request`` on a connection that reads nothing,
    until the proxy has either answered them all or stopped reading (waiting for the client to
    read what it was sent); the connection, its handler, the most its write buffer held, and
    how many whole requests were sent."""
    sock = unread_connection(proxy.url)
    for _ in range(1000):
        handler = connection(proxy, sock)
        if handler is not None and handler.transport is not None:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the proxy did not take the connection")
    # A small send buffer on the proxy's side too: the kernel's buffers (megabytes on loopback)
    # would otherwise take every reply of the run before the transport ever pauses.
    handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = request * REQUESTS
    sent = peak = 0
    for _ in range(100_000):
        try:
            sent += sock.send(data[sent:sent + 65536]) if sent < len(data) else 0
        except BlockingIOError:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        if handler.transport is None:
            break
        peak = max(peak, handler.transport.get_write_buffer_size())
        waiting_to_write = (handler.writing_paused and handler._drain_waiter is not None
                            and not handler.transport.is_reading())
        all_answered = (handler._request_count == REQUESTS and handler._waiter is not None
                        and not handler._messages)
        if waiting_to_write or all_answered:
            return sock, handler, peak, sent // len(request)
    sock.close()
    raise AssertionError("the proxy neither answered every request nor stopped reading")


async def read_replies(sock: socket.socket, status: bytes, expected: int) -> int:
    """Read the replies the proxy sends on ``sock`` (bodiless, each a head starting with
    ``status``) until ``expected`` of them have come; how many came."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    data = bytearray()
    while data.count(status) < expected:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 20)
        if not chunk:
            break
        data += chunk
    return data.count(status)


@pytest.mark.slow
@pytest.mark.parametrize(("request_fields", "status"), [
    ("HEAD /obj HTTP/1.1\r\nHost: shop.example\r\n\r\n", b"HTTP/1.1 200 "),
    ('GET /obj HTTP/1.1\r\nHost: shop.example\r\nIf-None-Match: "v1"\r\n\r\n', b"HTTP/1.1 304 "),
], ids=["HEAD", "304"])
async def test_pipelined_bodiless_replies_to_a_client_that_never_reads_stay_bounded(
    make_proxy: MakeProxy, origin: Origin, request_fields: str, status: bytes
) -> None:
    origin.route("/obj", body=os.urandom(100_000),
                 headers={"Cache-Control": "max-age=3600", "ETag": '"v1"'})
    proxy = await make_proxy()
    for _ in range(2):
        assert (await proxy.get("/obj", headers={"Host": "shop.example"})).status == 200
    sock, handler, peak, sent = await pipeline_unread(proxy, request_fields.encode())
    try:
        transport = handler.transport
        assert transport is not None
        high = transport.get_write_buffer_limits()[1]
        assert peak <= high + SLACK, f"write buffer reached {peak} bytes (high-water mark {high})"
        # The proxy waits for the client: paused for writing, and reading paused with it (the
        # rest of the requests left in the kernel's buffers, not read into the worker).
        assert handler.writing_paused and not transport.is_reading()
        assert handler._request_count < sent
        # Once the client reads, every request it sent is answered.
        assert await read_replies(sock, status, sent) == sent
    finally:
        sock.close()
    assert origin.count("/obj") == 1


@pytest.mark.slow
async def test_pipelined_heads_over_tls_to_a_client_that_never_reads_stay_bounded(
    make_proxy: MakeProxy, origin: Origin, tmp_path: Path
) -> None:
    """The same over TLS, where the writes pause only for what the TLS layer holds itself: the
    replies wait in its outgoing buffer once the TCP transport under it is paused, and its own
    mark was 512 KB (a plain transport's: 64 KB). It is a plain transport's now
    (``proxy.web.tlsslices``): what the connection holds in the worker, the TLS layer's and the
    TCP transport's buffers together, stays within the two marks and a reply."""
    from tests.ops.test_tls import Certs, client_context, tls_config

    certs = Certs(tmp_path)
    origin.route("/obj", body=os.urandom(100_000), headers={"Cache-Control": "max-age=3600"})
    proxy = await make_proxy(config=tls_config(certs))
    tls_url = proxy.listeners.proxy_urls[1]
    assert (await proxy.get("/obj", headers={"Host": "shop.example"})).status == 200
    host, port = tls_url.removeprefix("https://").rsplit(":", 1)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect((host, int(port)))
    sock = await asyncio.to_thread(client_context().wrap_socket, raw, server_hostname="a.test")
    server: Any = proxy.listeners.runners[1].server
    handler = next(h for h in server.connections if h.peername == sock.getsockname())
    handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    request = b"HEAD /obj HTTP/1.1\r\nHost: shop.example\r\n\r\n"

    def send() -> None:
        with contextlib.suppress(OSError):  # (closed below once the worker stopped reading)
            sock.sendall(request * REQUESTS)

    sending = asyncio.ensure_future(asyncio.to_thread(send))
    peak = 0
    try:
        for _ in range(20_000):
            await asyncio.sleep(0.0005)
            peak = max(peak, handler.buffered())
            if handler.writing_paused and handler._drain_waiter is not None and not handler.transport.is_reading():
                break
        else:
            raise AssertionError(f"never paused: the worker held {peak} bytes of replies")
        assert peak <= 2 * 65536 + SLACK, f"the worker held {peak} bytes of replies"
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        await sending
        sock.close()
