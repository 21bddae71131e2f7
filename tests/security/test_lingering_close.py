"""A client still sending when cachegate answers and closes its connection reads the whole answer
(a lingering close, as nginx's ``lingering_close on``: ``proxy.web.lingering``).

cachegate answers some requests while their client is still sending: a body that came too slowly
(408), a body the parser refused mid-upload (400), a head over ``max_request_head`` (431), the
admin API's body over 1 MiB (413). It closed the connection at once: the client's next bytes met
a closed socket, whose kernel answered with a reset, so the client's send failed (curl: "Send
failure: Connection reset by peer") and the answer that said why could be lost with it. Now the
connection is half-closed after the answer and what the client still sends is read and dropped
until it closes, goes silent for ``lingering_timeout`` or ``lingering_time`` passes; such a
connection counts against ``max_connections`` and a stop does not wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from pathlib import Path

import pytest
from aiohttp import web

from proxy.web.fastpath import ProxyServer
from proxy.web.headtimeout import CappedServer, LimitedHandler
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.ops.test_tls import Certs, client_context, tls_config
from tests.security.test_client_connection_limits import closed_count, until
from tests.storage.procs import ProxyProcess, write_config

MORE = 2 * 1024 * 1024  # what the client still sends after cachegate answered: 2 MB
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # (linux/tcp_states.h)

# What makes cachegate answer and close while the client is still sending, on the client listener.
CLIENT_CASES = {
    # 100 MB announced, 10 bytes sent, then silence for client_body_timeout (1 s): 408.
    "408 slow body": (b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 100000000\r\n\r\n"
                      + b"x" * 10, b"HTTP/1.1 408 "),
    # A chunk, then a chunk-size line that is not one: 400 at once.
    "400 malformed chunk": (b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5\r\nhello\r\nZZZ\r\n", b"HTTP/1.1 400 "),
    # A head growing past max_request_head (32 KB): 431 before it ends.
    "431 head too large": (b"GET / HTTP/1.1\r\nHost: shop.example\r\nX-Big: " + b"a" * 100_000, b"HTTP/1.1 431 "),
}


def _fin_came(sock: socket.socket) -> bool:
    """The server's FIN has arrived (the socket is in CLOSE_WAIT): it answered, then closed the
    connection or half-closed it."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_CLOSE_WAIT


def keeps_sending(address: tuple[str, int], first: bytes, *, after_fin: bool) -> tuple[str | None, bytes]:
    """A raw client: ``first`` (what makes cachegate answer and close), then MORE bytes as fast
    as the socket takes them (once cachegate's FIN came, when ``after_fin``: its answer is
    written and it closed, so the race goes against the client every time), then everything it
    can read, to the end: the error it met (None: none) and what it read."""
    error = None
    data = b""
    with socket.create_connection(address, timeout=20) as sock:
        try:
            sock.sendall(first)
            if after_fin:
                deadline = time.monotonic() + 20
                while not _fin_came(sock):
                    assert time.monotonic() < deadline, "no answer and FIN from cachegate"
                    time.sleep(0.01)
            sock.sendall(b"y" * MORE)
        except OSError as exc:
            error = f"sending: {exc!r}"
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            error = (error or "") + f" reading: {exc!r}"
    return error, data


def whole(reply: bytes) -> bool:
    """A whole reply: its head, and as much body as its Content-Length says."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in
              (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    return bool(sep) and int(fields.get(b"content-length", b"-1")) == len(body)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def lingering(proxy: Proxy) -> int:
    """Connections of the client listeners (a TLS one's too) in their lingering close."""
    servers = [r.server for r in proxy.listeners.runners if isinstance(r.server, ProxyServer)]
    assert servers, "no client listener"
    return sum(1 for server in servers for c in server._connections
               if isinstance(c, LimitedHandler) and c._lingering is not None)


@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
async def test_a_client_still_sending_after_cachegate_answered_and_closed_reads_the_whole_answer(
        make_proxy: MakeProxy, case: str) -> None:
    # Deterministic: the client sends on only once cachegate has answered and closed. Its bytes
    # then met a closed socket, reset: "Broken pipe" on the send. Now they are read and dropped.
    first, status = CLIENT_CASES[case]
    proxy = await make_proxy(config="client_body_timeout: 1s\nclient_body_min_rate: 0\n")
    for _ in range(3):
        error, reply = await asyncio.to_thread(keeps_sending, address(proxy.url), first, after_fin=True)
        assert error is None, (case, error, reply[:80])
        assert reply.startswith(status) and whole(reply), reply[:200]
    assert await until(lambda: lingering(proxy) == 0, 10)  # each ended with its client's close


async def test_the_admin_apis_413_431_and_408_reach_a_client_still_sending(make_proxy: MakeProxy) -> None:
    """The admin listener closes the same way: a body over its 1 MiB limit sent as fast as the
    client can, 20 times, gets the whole 413 each time; a head over its field limit gets its 431
    and a body that stalls its 408, although the client sends on after each."""
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nclient_body_timeout: 1s\n"
                                    "client_body_min_rate: 0\n")
    host, port = address(proxy.admin_url)
    head = (f"POST /purge HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MORE + 100}\r\nConnection: close\r\n\r\n").encode()
    for _ in range(20):
        error, reply = await asyncio.to_thread(keeps_sending, (host, port), head + b"[" * 100, after_fin=False)
        assert error is None, (error, reply[:80])
        assert reply.startswith(b"HTTP/1.1 413 ") and whole(reply), reply[:200]
    # A head over the admin listener's field limit (8 KB), refused by aiohttp's parser: 431.
    big = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: ".encode() + b"a" * 100_000
    error, reply = await asyncio.to_thread(keeps_sending, (host, port), big, after_fin=True)
    assert error is None, (error, reply[:80])
    assert reply.startswith(b"HTTP/1.1 431 ") and whole(reply), reply[:200]  # (not the placeholder 1.0)
    stalled = head.replace(f"{MORE + 100}".encode(), b"1000000") + b"[" * 10  # (under the limit)
    error, reply = await asyncio.to_thread(keeps_sending, (host, port), stalled, after_fin=True)
    assert error is None, (error, reply[:80])
    assert reply.startswith(b"HTTP/1.1 408 ") and whole(reply), reply[:200]


async def test_a_refused_upload_sent_as_fast_as_the_client_can_gets_its_whole_answer_every_time(
        make_proxy: MakeProxy) -> None:
    """No waiting for the answer: the malformed chunk and 2 MB behind it in one go, then the
    read, 20 times (without the lingering close the send failed whenever the answer and the
    close came before the client was done)."""
    proxy = await make_proxy()
    first, status = CLIENT_CASES["400 malformed chunk"]
    for _ in range(20):
        error, reply = await asyncio.to_thread(keeps_sending, address(proxy.url), first, after_fin=False)
        assert error is None, (error, reply[:80])
        assert reply.startswith(status) and whole(reply), reply[:200]


def tls_client(address: tuple[str, int], first: bytes, *, send_more: bool) -> tuple[str | None, bytes]:
    """A TLS client: ``first``, then its answer read (by its Content-Length: TLS has no
    half-close to wait for), then (``send_more``) MORE bytes, then everything up to the end of
    the connection, which must be a clean one (cachegate's close_notify: an end without it is an
    error here, "EOF occurred in violation of protocol"): the error it met (None: none) and what
    it read."""
    error = None
    context = client_context()
    with socket.create_connection(address, timeout=10) as raw, \
            context.wrap_socket(raw, suppress_ragged_eofs=False) as sock:
        sock.sendall(first)
        data = b""
        while not whole(data):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        try:
            if send_more:
                sock.sendall(b"y" * MORE)
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            error = repr(exc)
    return error, data


def tls_address(url: str) -> tuple[str, int]:
    return address(url.replace("https://", "http://"))


@pytest.mark.parametrize("send_more", [True, False], ids=["sending on", "reading to the end"])
async def test_over_tls_a_lingering_close_says_close_notify_and_a_client_still_sending_meets_no_error(
        make_proxy: MakeProxy, tmp_path: Path, send_more: bool) -> None:
    """A TLS connection lingers too, without the half-close (asyncio's TLS transports have none):
    once its answer is out it says close_notify, as nginx does before it lingers, then reads and
    drops what the client still sends. A client that sends on after reading its answer meets no
    error, and one that reads to the end of the connection has a clean end at once, not after
    lingering_timeout (30 s here). The connection used to be aborted when its lingering close
    ended, with no close_notify ("EOF occurred in violation of protocol" after lingering_timeout);
    before the lingering close, its close sent close_notify and the bytes the client sent on met
    a closed connection (the same error on its send)."""
    proxy = await make_proxy(config=tls_config(Certs(tmp_path)) + "lingering_timeout: 30s\n")
    first, status = CLIENT_CASES["400 malformed chunk"]
    tls = tls_address(proxy.listeners.proxy_urls[1])
    for _ in range(3):
        error, reply = await asyncio.to_thread(tls_client, tls, first, send_more=send_more)
        assert error is None, (error, reply[:80])
        assert reply.startswith(status) and whole(reply), reply[:200]
    assert await until(lambda: lingering(proxy) == 0, 10)  # each ended with its client's close


async def test_over_tls_a_silent_client_is_closed_after_lingering_timeout(
        make_proxy: MakeProxy, tmp_path: Path) -> None:
    """After its close_notify the TLS layer reads what the client sends: the silence is the
    kernel's to tell. A client that reads its answer and the close_notify, then neither sends
    nor closes, is closed after lingering_timeout (1 s), not lingering_time (60 s)."""
    proxy = await make_proxy(config=tls_config(Certs(tmp_path)) + "lingering_timeout: 1s\nlingering_time: 60s\n")
    first, status = CLIENT_CASES["400 malformed chunk"]
    tls = tls_address(proxy.listeners.proxy_urls[1])

    def read_to_the_end() -> tuple[ssl.SSLSocket, bytes]:
        sock = client_context().wrap_socket(socket.create_connection(tls, timeout=10))
        sock.sendall(first)
        data = b""
        while chunk := sock.recv(65536):  # to its close_notify
            data += chunk
        return sock, data  # (kept open)

    sock, reply = await asyncio.to_thread(read_to_the_end)
    try:
        assert reply.startswith(status) and whole(reply), reply[:200]
        assert lingering(proxy) == 1
        assert await until(lambda: lingering(proxy) == 0, 10)
    finally:
        sock.close()


@pytest.mark.slow
async def test_over_tls_on_uvloop_a_lingering_close_says_close_notify_and_drops_what_comes(
        origin: Origin, tmp_path: Path) -> None:
    """The same on a real ``cachegate run`` (uvloop's TLS, in C)."""
    from tests.harness import spawn_cachegate
    from tests.harness import write_config as harness_config

    config = harness_config(str(tmp_path), origin.url, tls_config(Certs(tmp_path)) + "lingering_timeout: 30s\n")
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])
    try:
        urls: list[str] = []
        for _ in range(100):
            urls = [line.split("proxy listening on ", 1)[1].split()[0] for line in proc.output
                    if "proxy listening on https://" in line]
            if urls:
                break
            await asyncio.sleep(0.05)
        first, status = CLIENT_CASES["400 malformed chunk"]
        for send_more in (True, False):
            error, reply = await asyncio.to_thread(tls_client, tls_address(urls[0]), first, send_more=send_more)
            assert error is None, (send_more, error, reply[:80])
            assert reply.startswith(status) and whole(reply), reply[:200]
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text


async def test_a_lingering_close_ends_after_lingering_timeout_of_silence_or_lingering_time(
        make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config="lingering_time: 3s\nlingering_timeout: 1s\n")
    first, status = CLIENT_CASES["400 malformed chunk"]
    host, port = address(proxy.url)
    # A client that got its answer (and cachegate's FIN) and sends nothing more, nor closes.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(first)
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(status)
    assert lingering(proxy) == 1
    assert await until(lambda: lingering(proxy) == 0, 10)  # closed after lingering_timeout
    writer.close()
    # One that drips a byte every 0.1 s: never silent for lingering_timeout, so it lingers on
    # past it, until lingering_time.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(first)
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(status)
    started = asyncio.get_running_loop().time()

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(b"x")
                await asyncio.sleep(0.1)

    dripping = asyncio.ensure_future(drip())
    try:
        await asyncio.sleep(2.0)  # twice lingering_timeout
        assert lingering(proxy) == 1
        assert await until(lambda: lingering(proxy) == 0, 10)  # lingering_time ended it
        assert asyncio.get_running_loop().time() - started >= 2.5
    finally:
        writer.close()
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping


async def test_a_lingering_close_is_off_with_a_lingering_time_of_0(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config="lingering_time: 0\n")
    first, status = CLIENT_CASES["400 malformed chunk"]
    reader, writer = await asyncio.open_connection(*address(proxy.url))
    writer.write(first)
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(status)
    assert lingering(proxy) == 0
    writer.close()


async def test_lingering_connections_count_against_max_connections_and_make_room_first(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    """The cap closes a lingering connection first, and says so at INFO, as what it is: nothing
    failed (its line said "admitting client connections failed", at WARNING). The idle one it
    closes next is a WARNING: a client that may ask again lost its connection."""
    caplog.set_level(logging.INFO, "cachegate.proxy")
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nmax_connections: 3\n"
                                    "lingering_time: 60s\nlingering_timeout: 60s\n")
    origin.route("/page", body=b"page", headers={"Cache-Control": "max-age=600"})
    first, status = CLIENT_CASES["400 malformed chunk"]
    host, port = address(proxy.url)
    idle = await asyncio.open_connection(host, port)  # the oldest: idle, never asked anything
    conns = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(first)
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(status)
        conns.append((reader, writer))
    assert lingering(proxy) == 2
    try:
        # A fourth connection: over the cap, which closes a lingering one (the older), not the
        # idle one older still (an idle client may ask again; a lingering one's exchange is over).
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /page HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"page"), answer
        assert lingering(proxy) == 1
        assert await closed_count(proxy, "cap_oldest") == 1
        assert not idle[0].at_eof()
        idle[1].write(b"GET /page HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(idle[0].read(), 10)).endswith(b"page")
        lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "cachegate.proxy"]
        assert lines == [("INFO", "max_connections (3) reached in this worker: connections in their "
                                  "lingering close (reply sent, dropping what their client still sends) are "
                                  "closed to make room for new ones")], lines
        # Four more (the idle one's answer closed it): the third closes the other lingering one
        # (said within the minute: no line more), the fourth the oldest idle one, the first
        # (another kind: said at once).
        more = []
        for _ in range(4):
            more.append(await asyncio.open_connection(host, port))
            await asyncio.sleep(0.1)
        assert lingering(proxy) == 0
        assert await asyncio.wait_for(more[0][0].read(), 10) == b""  # (idle: closed, unanswered)
        for _, w in more:
            w.close()
        lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "cachegate.proxy"]
        assert lines[1:] == [("WARNING", "max_connections (3) reached in this worker: connections waiting "
                                         "for their client (idle, a request or TLS handshake unfinished, a "
                                         "reply unread, a close unanswered) are closed to make room for new "
                                         "ones")], lines
        assert not any("failed" in text for _, text in lines)
    finally:
        idle[1].close()
        for _, w in conns:
            w.close()


def _with_grace(config: str, grace: str) -> None:
    """``config`` (written by ``write_config``, with shutdown_grace 2 s) with ``grace``."""
    path = Path(config)
    path.write_text(path.read_text().replace("shutdown_grace: 2s", f"shutdown_grace: {grace}"))


async def test_a_stop_does_not_wait_for_a_lingering_close(origin: Origin, tmp_path: Path) -> None:
    """SIGTERM to a real ``cachegate run`` while a connection lingers (its client dripping a byte
    every 0.1 s, lingering_time and lingering_timeout 60 s, shutdown_grace 30 s): the process
    closes it and exits at once, as it does with idle connections."""
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 16MB}\n",
                          "lingering_time: 60s\nlingering_timeout: 60s\n")
    _with_grace(config, "30s")
    proxy = ProxyProcess(str(tmp_path), config)
    await proxy.start(with_log=True)
    first, status = CLIENT_CASES["400 malformed chunk"]
    reader, writer = await asyncio.open_connection(*address(proxy.url))

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(b"x")
                await asyncio.sleep(0.1)

    dripping = None
    try:
        writer.write(first)
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(status)  # answered, half-closed
        dripping = asyncio.ensure_future(drip())
        await asyncio.sleep(0.5)
        assert not writer.is_closing()  # still read (closed, the drips would have met a reset)
        code = await proxy.stop(wait=15)  # neither lingering_time nor shutdown_grace waited for
    finally:
        writer.close()
        if dripping is not None:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
        await proxy.kill()
    assert code == 0, proxy.lines


async def test_a_body_aiohttp_gave_up_reading_to_keep_the_connection_ends_in_a_lingering_close(
        make_proxy: MakeProxy) -> None:
    """The admin listener answers a request without reading its body (``/healthz`` with 100 MB
    announced): the answer keeps the connection, and aiohttp reads the rest of the body through
    its parser for its own lingering_time (10 s; 1 s here) so that the next request can be
    parsed. A body still coming then was closed on at once, and the client's next bytes were
    reset; now that close lingers too. (The client listener's answer closes the connection
    instead while a body is still coming:
    ``test_an_upload_the_origin_answers_before_reading_it_gets_that_answer_and_no_reset``.)"""
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nlingering_time: 3s\nlingering_timeout: 3s\n")
    admin = [r.server for r in proxy.listeners.runners if isinstance(r.server, CappedServer)]
    assert len(admin) == 1
    admin[0]._kwargs["lingering_time"] = 1.0  # aiohttp's own (10 s by default)
    host, port = address(proxy.admin_url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 100000000\r\n\r\n".encode()
                 + b"x" * 100_000)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head, head
    try:
        for _ in range(20):  # 2 s of drips: past aiohttp's 1 s, within lingering_time
            writer.write(b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.1)
        assert sum(1 for c in admin[0]._connections if c._lingering is not None) == 1
        await asyncio.wait_for(reader.read(), 10)  # (the answer's body, then the half-close)
    finally:
        writer.close()


BIG = 3 * 1024 * 1024  # a reply longer than the kernel's send queue holds for a slow reader


def reads_slowly(address: tuple[str, int], request: bytes) -> tuple[str | None, bytes]:
    """A raw client with a small receive window: ``request``, then 32 KB every 0.02 s to the
    end of the connection: the error it met (None: none) and what it read."""
    error = None
    data = b""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(20)
        sock.connect(address)
        sock.sendall(request)
        try:
            while chunk := sock.recv(32768):
                data += chunk
                time.sleep(0.02)
        except OSError as exc:
            error = repr(exc)
    return error, data


def stops_reading(address: tuple[str, int], request: bytes, after: int) -> int:
    """A raw client with a small receive window: ``request``, then reads ``after`` bytes and no
    more, until its connection ends: the TCP state it ends in (TCP_CLOSE: reset)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(20)
        sock.connect(address)
        sock.sendall(request)
        read = 0
        while read < after:
            read += len(sock.recv(min(32768, after - read)))
        deadline = time.monotonic() + 20
        while (state := sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]) not in (
                TCP_CLOSE, TCP_CLOSE_WAIT) and time.monotonic() < deadline:
            time.sleep(0.05)
        return state


async def test_a_slowly_read_reply_gets_every_byte_before_its_lingering_close_ends(
        make_proxy: MakeProxy, origin: Origin) -> None:
    """A reply that closes the connection with requests queued behind it (so its close lingers),
    read slowly: the lingering timers start once the reply has left the kernel's send queue.
    They started when the reply was handed to the transport, with megabytes of it still queued:
    its client, reading and sending nothing, was reset after lingering_timeout (or
    lingering_time), the end of its reply lost."""
    proxy = await make_proxy(config="lingering_time: 0.5s\nlingering_timeout: 0.3s\n")
    origin.route("/big", body=b"b" * BIG, headers={"Cache-Control": "max-age=600"})
    origin.route("/small", body=b"small", headers={"Cache-Control": "max-age=600"})
    async with proxy.session.get(proxy.url + "/big") as r:  # stored: the reply is a hit
        assert len(await r.read()) == BIG
    request = (b"GET /big HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"
               b"GET /small HTTP/1.1\r\nHost: shop.example\r\n\r\n")  # (queued behind: never answered)
    error, reply = await asyncio.to_thread(reads_slowly, address(proxy.url), request)
    assert error is None, (error, len(reply))
    assert reply.startswith(b"HTTP/1.1 200 ") and whole(reply), (reply[:200], len(reply))
    assert await until(lambda: lingering(proxy) == 0, 10)  # its client closed: the close ended


async def test_a_reply_its_client_stopped_reading_is_reset_after_send_timeout_though_its_close_lingers(
        make_proxy: MakeProxy, origin: Origin) -> None:
    """A lingering close waits for its reply to be out, not for ever: a client that stops
    reading it is reset after send_timeout (1 s here), as any reply it stops reading, whatever
    lingering_time and lingering_timeout (60 s here)."""
    proxy = await make_proxy(config="admin: {listen: '127.0.0.1:0'}\nsend_timeout: 1s\n"
                                    "lingering_time: 60s\nlingering_timeout: 60s\n")
    origin.route("/big", body=b"b" * BIG, headers={"Cache-Control": "max-age=600"})
    async with proxy.session.get(proxy.url + "/big") as r:
        assert len(await r.read()) == BIG
    request = (b"GET /big HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"
               b"GET /big HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    state = await asyncio.to_thread(stops_reading, address(proxy.url), request, 256 * 1024)
    assert state == TCP_CLOSE, state  # reset
    assert loop.time() - started < 15
    assert lingering(proxy) == 0
    assert await closed_count(proxy, "send_timeout") == 1


def uploads_after_an_early_answer(address: tuple[str, int], size: int) -> tuple[str | None, bytes, bytes]:
    """A raw client uploading ``size`` bytes: its head and the first 100 KB, then the answer
    read (whole, by its Content-Length), then the rest of the body sent, then everything up to
    the end of the connection. The error it met (None: none), the answer, and what came after."""
    error = None
    first = 100_000
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: %d\r\n\r\n" % size
                     + b"x" * first)
        answer = b""
        while not whole(answer):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        after = b""
        try:
            sent = first
            while sent < size:
                sent += sock.send(b"x" * min(1 << 20, size - sent))
            while chunk := sock.recv(65536):
                after += chunk
        except OSError as exc:
            error = repr(exc)
    return error, answer, after


@pytest.mark.parametrize("origin_closes", [True, False], ids=["origin closes", "origin keeps alive"])
async def test_an_upload_the_origin_answers_before_reading_it_gets_that_answer_and_no_reset(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture, origin_closes: bool) -> None:
    """The origin answers an upload at once (403) without reading its body. The body's upload to
    it stops when its answer is whole, and the answer closes the client's connection (the rest
    of the body is not worth reading: nginx closes too when it answers while still reading a
    body) by a lingering close, which drops what the client still sends. The client reads the
    403, sends the rest of its 20 MB and meets no error, and nothing is logged at ERROR. Before,
    the answer said keep-alive, and aiohttp's own read of the rest of the body met the upload's
    read of it still going ("readany() called while another coroutine is already waiting":
    "Unhandled exception" at ERROR, per request, which any client could cause), then the
    connection was closed at once: the client's sends met a reset (BrokenPipeError)."""
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, body=b"no thanks",
                            headers={"Connection": "close"} if origin_closes else {})

    origin.route("/upload", refuse)
    proxy = await make_proxy()
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        error, answer, after = await asyncio.to_thread(uploads_after_an_early_answer, address(proxy.url),
                                                       20_000_000)
        assert error is None, (error, answer[:200])
        assert answer.startswith(b"HTTP/1.1 403 ") and answer.endswith(b"no thanks"), answer
        assert b"\r\nConnection: close\r\n" in answer, answer
        assert after == b""
    assert await until(lambda: lingering(proxy) == 0, 10)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage()) for r in errors]
