"""What the access log and the error log say about requests that did not end in an answer the
client read: an upload the client broke off, a client that left before its answer, a head that
never came whole. Real cachegate, real origin, raw sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

from proxy.errors import ClientGone
from proxy.web.bodyreader import BodyReader
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.ports import Ports
from tests.rules.util import settle


def records(proxy: Proxy, path: Path) -> list[dict[str, Any]]:
    assert proxy.runtime.access_log is not None
    proxy.runtime.access_log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def wait_for_records(proxy: Proxy, path: Path, count: int) -> list[dict[str, Any]]:
    for _ in range(200):
        got = records(proxy, path)
        if len(got) >= count:
            return got
        await asyncio.sleep(0.05)
    return records(proxy, path)


def port_of(proxy: Proxy) -> int:
    return int(proxy.listeners.proxy_addresses[0][1])


async def test_an_upload_the_client_broke_off_is_a_499_and_no_traceback(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A POST announcing 1,000 bytes, sending 3 and closing: aiohttp's "Connection lost" went to
    the handler's catch-all, one ERROR line with a traceback per abort and a logged 500. It is
    the client's failure: one DEBUG line, and the access log's 499 (nginx's "client closed
    request"), nothing written to the connection that is gone."""
    origin.route("/upload", body=b"ok")
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    caplog.set_level(logging.DEBUG, logger="cachegate")
    for i in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
        writer.write(b"POST /upload/%d HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1000\r\n\r\nabc" % i)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
    logged = await wait_for_records(proxy, log_file, 3)
    assert [(r["path"], r["status"], r["bytes"], r["cache"]) for r in logged] == [
        (f"/upload/{i}", 499, 0, "ERROR") for i in range(3)]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    assert not any(r.exc_info for r in caplog.records)
    assert origin.count("/upload/0") == 0  # nothing of a broken body reached the origin


async def test_a_client_that_left_before_its_miss_was_answered_is_a_499_and_the_fill_is_stored(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """The client resets its connection 0.2 s into a 1 s miss: logged "status":200 with the
    body's bytes as if it had been served. Now 499, as nginx logs it; the fill goes on and is
    stored for the next client, as before."""
    origin.route("/slow", body=b"s" * 40, headers={"Cache-Control": "max-age=300"}, delay=1.0)
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    writer.write(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # a reset: a plain close is a FIN, which may be a half-close
    (left,) = await wait_for_records(proxy, log_file, 1)
    assert (left["path"], left["status"], left["cache"]) == ("/slow", 499, "MISS")
    again = await proxy.get("/slow", headers={"Host": "example.test"})
    assert again.status == 200 and again.x_cache == "HIT"  # the fill was stored all the same
    assert origin.count("/slow") == 1
    assert records(proxy, log_file)[-1]["status"] == 200


async def test_a_client_that_reset_during_a_streamed_answer_is_a_499_with_the_bytes_sent(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """A client that reads nothing of a large answer and resets the connection: logged as a 200
    with every byte though most were never sent. Now 499 with the bytes handed to it."""
    size = 8 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(size), "Cache-Control": "no-store"})
        await resp.prepare(request)
        for _ in range(size // 65536):
            await resp.write(b"b" * 65536)
        return resp

    origin.route("/big", big)
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port_of(proxy)))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: example.test\r\n\r\n")
    await asyncio.sleep(0.5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset
    (left,) = await wait_for_records(proxy, log_file, 1)
    assert left["status"] == 499 and 0 <= left["bytes"] < size, left


def half_closed_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, shut the sending side (a FIN), read to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


async def test_a_half_closed_client_answered_in_full_is_logged_with_its_answer(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """An HTTP/1.0 client that sends its request and shuts its sending side, and three
    pipelined requests then a FIN: every answer was sent whole, yet the misses, hits and
    no-store answers were logged 499 (the fast path's hit 200). Now each is logged with the
    status it was answered with, whichever path answered it."""
    origin.route("/c", body=b"c" * 100, headers={"Cache-Control": "max-age=300"})
    origin.route("/ns", body=b"n" * 50, headers={"Cache-Control": "no-store"})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    port = port_of(proxy)
    for path in ("/c", "/c", "/ns"):  # a miss, a hit, a no-store pass
        got = await asyncio.to_thread(half_closed_exchange, port,
                                      b"GET %s HTTP/1.0\r\nHost: example.test\r\n\r\n" % path.encode())
        assert got.startswith(b"HTTP/1.0 200") or got.startswith(b"HTTP/1.1 200"), got[:40]
    pipelined = b"".join(b"GET %s HTTP/1.1\r\nHost: example.test\r\n\r\n" % p for p in (b"/ns", b"/c", b"/ns"))
    got = await asyncio.to_thread(half_closed_exchange, port, pipelined)
    assert got.count(b" 200 OK\r\n") == 3, got
    logged = await wait_for_records(proxy, log_file, 6)
    assert [(r["path"], r["status"], r["bytes"]) for r in logged] == [
        ("/c", 200, 100), ("/c", 200, 100), ("/ns", 200, 50), ("/ns", 200, 50), ("/c", 200, 100),
        ("/ns", 200, 50)], logged


async def test_an_upload_broken_off_while_its_answer_streams_is_a_499(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """A POST announcing 10 MB, to an origin that starts a streamed answer before reading the
    body; the client reads the head, then resets with 100 KB sent: logged 200 with the bytes
    streamed so far, as if it had been answered. Now 499."""

    async def early(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "no-store"})
        await resp.prepare(request)
        try:
            for _ in range(40):
                await resp.write(b"e" * 1000)
                await asyncio.sleep(0.05)
            await resp.write_eof()
        except ConnectionError:
            pass  # cachegate dropped the fetch its client left
        return resp

    origin.route("/early", early)
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    writer.write(b"POST /early HTTP/1.1\r\nHost: example.test\r\nContent-Length: 10000000\r\n\r\n"
                 + b"z" * 100_000)
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(0.3)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    (left,) = await wait_for_records(proxy, log_file, 1)
    assert (left["path"], left["status"]) == ("/early", 499), left
    assert 0 < left["bytes"] < 40_000, left


async def test_a_streamed_answer_cut_off_at_the_stop_has_its_line(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """A client stalls mid-body of a 20 MB miss and cachegate stops: at the stop's deadline the
    request was "cut off" and had no access-log line (its handler was left pending, or
    cancelled without writing one). Now one line: 499, the bytes handed to the connection."""
    size = 20 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(size), "Cache-Control": "max-age=60"})
        await resp.prepare(request)
        try:
            for _ in range(size // 65536):
                await resp.write(b"b" * 65536)
            await resp.write_eof()
        except ConnectionError:
            pass  # cachegate stopped
        return resp

    origin.route("/big", big)
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port_of(proxy)))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: example.test\r\n\r\n")
    got = await asyncio.to_thread(sock.recv, 65536)
    assert got.startswith(b"HTTP/1.1 200"), got[:40]
    await asyncio.sleep(0.5)  # the client reads nothing more
    proxy.runtime.state = "stopping"
    # A grace period aiohttp's cleanup outlasts (it waits it twice before cancelling a handler):
    # the stop's deadline, grace + STOP_MARGIN, cuts the handler off.
    await proxy.listeners.stop(2.0)
    try:
        (line,) = records(proxy, log_file)
        assert (line["path"], line["status"]) == ("/big", 499), line
        assert 0 < line["bytes"] < size, line
    finally:
        sock.close()


async def test_a_disk_hit_the_client_reset_is_a_499_with_the_bytes_sent_and_counted(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """A 20 MB hit sent from a disk file; the client reads about 200 KB and resets: logged 499
    with 0 bytes, and cachegate_response_bytes_total{tier="disk"} counted none, though hundreds
    of KB went out. Now the bytes handed to the connection before the write that failed."""
    from tests.admin.test_metrics import scrape, value

    size = 20 * 1024 * 1024
    origin.route("/file", body=b"f" * size, headers={"Cache-Control": "max-age=300"})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")  # 20 MB: disk only
    assert len((await proxy.get("/file", headers={"Host": "example.test"})).body) == size  # the fill
    await settle(proxy)  # on disk
    before = value(await scrape(proxy), "cachegate_response_bytes_total", tier="disk")

    def read_then_reset() -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", port_of(proxy)))
        sock.sendall(b"GET /file HTTP/1.1\r\nHost: example.test\r\n\r\n")
        got = 0
        while got < 200_000:
            got += len(sock.recv(65536))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        return got

    got = await asyncio.to_thread(read_then_reset)
    logged = await wait_for_records(proxy, log_file, 2)
    left = logged[-1]
    assert (left["path"], left["status"], left["cache"]) == ("/file", 499, "HIT"), logged
    assert got - 1000 <= left["bytes"] < size, (got, left)
    counted = value(await scrape(proxy), "cachegate_response_bytes_total", tier="disk") - before
    assert counted == left["bytes"], (counted, left)


async def test_a_head_not_whole_in_time_is_a_408_line_and_counted_but_an_idle_connection_is_not(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """client_header_timeout closed a connection whose head never came whole with no trace: no
    access-log line, no count. Now a 408 line without a request line (as nginx logs it) and
    ``cachegate_requests_total{cache_status="ERROR",method="-"}``; nothing is sent. A connection
    that sent nothing, fresh or kept alive after a request, is closed without a line."""
    from tests.admin.test_metrics import scrape, value

    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=60"})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\nclient_header_timeout: 1s\n")
    port = port_of(proxy)
    before = value(await scrape(proxy), "cachegate_requests_total", cache_status="ERROR", method="-")
    partial = []
    for i in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slowloris%d HTTP/1.1\r\nHost: exa" % i)
        partial.append((reader, writer))
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # never send a byte
    kept_reader, kept_writer = await asyncio.open_connection("127.0.0.1", port)
    kept_writer.write(b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
    await kept_reader.readuntil(b"\r\n\r\na")  # then idle between requests
    for reader, _ in partial:
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent
    for reader, _ in idle:
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the head timer too
    logged = records(proxy, log_file)
    assert [r["status"] for r in logged] == [200, 408, 408, 408], logged
    for r in logged[1:]:
        assert (r["method"], r["path"], r["bytes"], r["cache"], r["cache_status"]) == (None, None, 0, "ERROR", None)
        assert r["duration_us"] == 1_000_000
    after = value(await scrape(proxy), "cachegate_requests_total", cache_status="ERROR", method="-")
    assert after == before + 3
    for _, writer in [*partial, *idle, (kept_reader, kept_writer)]:
        writer.close()


async def test_empty_lines_between_requests_begin_no_head(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """A kept-alive connection that sent only a CRLF after its request (after a GET or a POST's
    body, in the request's write or one of its own) then stayed idle got a 408 line and
    ``requests_total{ERROR,"-"}``, and was closed after client_header_timeout. RFC 9112 §2.2:
    a server SHOULD ignore empty lines before a request line. Now they begin no head: no line,
    the connection stays open as any idle one, and its next request is answered. A fresh
    connection that sends only empty lines is closed at the timeout without a line."""
    from tests.admin.test_metrics import scrape, value

    origin.route("/a", body=b"a", headers={"Cache-Control": "max-age=60"})
    origin.route("/post", body=b"p", headers={"Cache-Control": "no-store"})
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\nclient_header_timeout: 1s\n")
    port = port_of(proxy)
    before = value(await scrape(proxy), "cachegate_requests_total", cache_status="ERROR", method="-")
    get = b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n"
    post = b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc"
    kept = []
    for first, crlf_apart in ((get, True), (get, False), (post, True), (post, False)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first if crlf_apart else first + b"\r\n")
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1)  # the 1-byte body
        if crlf_apart:
            writer.write(b"\r\n")
        kept.append((reader, writer))
    fresh_reader, fresh_writer = await asyncio.open_connection("127.0.0.1", port)
    fresh_writer.write(b"\r\n")
    assert await asyncio.wait_for(fresh_reader.read(), 10) == b""  # closed, nothing sent
    await asyncio.sleep(1.0)  # past the header timeout for the CRLFs
    for reader, writer in kept:
        writer.write(get)  # the connection is still open, and the CRLF was ignored
        await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(1) == b"a"
        writer.close()
    fresh_writer.close()
    logged = records(proxy, log_file)
    assert [r["status"] for r in logged] == [200] * 8, logged
    after = value(await scrape(proxy), "cachegate_requests_total", cache_status="ERROR", method="-")
    assert after == before


async def test_a_head_answered_with_cachegates_own_error_page_sends_and_counts_no_body(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy, ports: Ports
) -> None:
    """A HEAD while the origin is down is answered with cachegate's 502 page's head (its
    Content-Length says 56): it was logged "bytes":56 and added 56 to
    cachegate_response_bytes_total{tier="none"}, though no body byte went out. A HEAD's bytes
    are 0 (docs/logs.md); the GET beside it counts its page."""
    from tests.admin.test_metrics import scrape, value

    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\nupstream: {{retries: 0}}\n",
                             upstreams=[ports.url()])
    before = value(await scrape(proxy), "cachegate_response_bytes_total", tier="none")
    head = await proxy.request("HEAD", "/down/h", headers={"Host": "example.test"})
    assert head.status == 502 and head.body == b"" and int(head.headers["Content-Length"]) > 0
    after_head = value(await scrape(proxy), "cachegate_response_bytes_total", tier="none")
    got = await proxy.get("/down/g", headers={"Host": "example.test"})
    assert got.status == 502
    after_get = value(await scrape(proxy), "cachegate_response_bytes_total", tier="none")
    logged = await wait_for_records(proxy, log_file, 2)
    assert [(r["method"], r["status"], r["bytes"]) for r in logged] == [
        ("HEAD", 502, 0), ("GET", 502, len(got.body))], logged
    assert after_head - before == 0
    assert after_get - after_head == len(got.body)


async def test_an_answer_at_hand_for_a_client_already_gone_is_not_counted_as_sent(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy
) -> None:
    """A small miss answered after its client reset, and cachegate's 400 to an upload broken
    off: both logged 499 with 0 bytes, as nothing of them is written, yet their bodies were
    added to cachegate_response_bytes_total (tier "upstream", tier "none"). The counter now
    counts what the line says; an answer its client reads is counted in full."""
    from tests.admin.test_metrics import scrape, value

    origin.route("/slow", body=b"four", headers={"Cache-Control": "no-store"}, delay=0.3)
    origin.route("/up", body=b"ok")
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\n")

    async def sent() -> tuple[float, float]:
        samples = await scrape(proxy)
        return (value(samples, "cachegate_response_bytes_total", tier="upstream"),
                value(samples, "cachegate_response_bytes_total", tier="none"))

    def reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def miss_then_reset() -> None:
        sock = socket.create_connection(("127.0.0.1", port_of(proxy)))
        sock.sendall(b"GET /slow?gone HTTP/1.1\r\nHost: example.test\r\n\r\n")
        time.sleep(0.1)  # the request is in; the origin answers 0.2 s later
        reset(sock)

    def upload_then_reset() -> None:
        sock = socket.create_connection(("127.0.0.1", port_of(proxy)))
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.1)
        reset(sock)

    before = await sent()
    await asyncio.to_thread(miss_then_reset)
    await asyncio.to_thread(upload_then_reset)
    logged = await wait_for_records(proxy, log_file, 2)
    assert sorted((r["path"], r["status"], r["bytes"]) for r in logged) == [
        ("/slow?gone", 499, 0), ("/up", 499, 0)], logged
    after = await sent()
    assert (after[0] - before[0], after[1] - before[1]) == (0, 0)
    read = await proxy.get("/slow?read", headers={"Host": "example.test"})
    assert read.body == b"four"
    assert (await sent())[0] - after[0] == 4
    assert records(proxy, log_file)[-1]["bytes"] == 4


async def test_an_upload_whose_connection_the_cap_closed_before_its_handler_began_is_a_499(
    tmp_path: Path, origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """max_connections closes the oldest connection waiting for its client, a POST whose body
    is still coming among them. Closed after its head was parsed and before its handler began,
    aiohttp still runs the handler, whose first read of the body raised "Connection closed."
    (not a ``ConnectionError``): an ERROR "unhandled error for POST" with a traceback per
    request. Now a client gone, at DEBUG: 499.

    The window is one turn of the event loop (a Go client with 32 keep-alive connections met it
    a few times in 30 s): a new connection accepted in one turn and the POST's bytes read in
    the next put the cap's close between the two. The client sockets are blocking, so the test
    chooses the turn: the POST sent after ``turns`` turns of the loop (one of them meets it)."""
    origin.route("/p", body=b"ok")
    log_file = tmp_path / "access.log"
    proxy = await make_proxy(config=f"access_log: {{path: {log_file}}}\nmax_connections: 1\n")
    caplog.set_level(logging.DEBUG, logger="cachegate")
    port = port_of(proxy)
    for turns in range(4):
        with socket.create_connection(("127.0.0.1", port)) as upload:
            await asyncio.sleep(0.2)  # accepted, idle
            with socket.create_connection(("127.0.0.1", port)) as new:  # one over the cap
                for _ in range(turns):
                    await asyncio.sleep(0)
                upload.sendall(b"POST /p HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1000\r\n\r\nabc")
                new.sendall(b"GET /p HTTP/1.1\r\nHost: example.test\r\n\r\n")
                await asyncio.sleep(0.5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert not any(r.exc_info for r in caplog.records)
    gone = [r for r in caplog.records if "before the request's handling began" in r.getMessage()]
    assert gone and all(r.levelno == logging.DEBUG for r in gone)  # the window was met
    posts = [(r["status"], r["cache"]) for r in records(proxy, log_file) if r["method"] == "POST"]
    assert posts and set(posts) == {(499, "ERROR")}, posts


class _Gone(BaseProtocol):
    """A request's protocol whose connection has closed (no transport: ``connected`` is False)."""


@pytest.mark.parametrize(("message", "gone"), [
    ("Connection closed.", True),  # aiohttp's own, for a read on a connection already gone
    ("readany() called while another coroutine is already waiting for incoming data", False),
    ("Connection closed", False),  # (an aiohttp upgrade's other wording: not taken for it)
])
async def test_only_aiohttps_connection_closed_is_taken_for_a_client_gone(message: str, gone: bool) -> None:
    """The body read takes the ``RuntimeError`` aiohttp raises for a read on a closed connection
    for the client's going (499, DEBUG); any other ``RuntimeError`` is a fault and goes on (an
    ERROR with its traceback), also on a connection that has closed: matching on the connection
    alone, an aiohttp upgrade raising something else there would have been swallowed."""
    loop = asyncio.get_running_loop()
    protocol = _Gone(loop)

    class Stream(StreamReader):
        async def read(self, n: int = -1) -> bytes:
            if message == "Connection closed.":
                return await super().read(n)  # (aiohttp's real one raises it: no transport)
            raise RuntimeError(message)

    request = SimpleNamespace(content=Stream(protocol, 2**16, loop=loop), protocol=protocol)
    reader = BodyReader(request, 5.0, 0)  # type: ignore[arg-type]  # (only these two are read)
    with pytest.raises(ClientGone if gone else RuntimeError) as raised:
        await reader.read(1024)
    assert gone or str(raised.value) == message
