"""The lean upstream HTTP/1.1 client (proxy.http_client) through the running proxy: framing,
strict parsing, connection reuse, what is sent upstream, and the pool's idle connections.

The upstreams here are raw asyncio servers that answer with exactly the bytes a test gives,
so that malformed and unusual responses can be sent; they record each connection and the
raw request heads they received.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from yarl import URL

from proxy.errors import ClientBodyError, UpstreamError, UpstreamProtocolError
from proxy.http_client import KEEPALIVE_IDLE, HostPool, reason_phrase, request_head
from tests.conftest import MakeProxy
from tests.harness import Clock, Origin, Proxy
from tests.security.misbehaving import Conn, RawOrigin, raw_origins

Answer = Callable[[bytes], bytes | list[bytes]]  # request head -> response bytes (or packets)


@dataclass
class RawUpstream:
    """An upstream that answers each request with the bytes ``answer`` gives for its head."""

    answer: Answer
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    close_after: bool = False  # close each connection after one response
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _read_body(reader, head)
                self.heads.append(head)
                self.bodies.append(body)
                out = self.answer(head)
                for packet in out if isinstance(out, list) else [out]:
                    writer.write(packet)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if self.close_after:
                    break
        writer.close()
        self.writers.discard(writer)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lines = head.decode("latin-1").lower().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    if "content-length" in fields:
        return await reader.readexactly(int(fields["content-length"]))
    if fields.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += chunk[:-2]
    return b""


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Answer], Awaitable[RawUpstream]]]:
    servers: list[RawUpstream] = []

    async def start(answer: Answer) -> RawUpstream:
        up = RawUpstream(answer)
        up.server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
        servers.append(up)
        return up

    yield start
    for up in servers:
        await up.stop()


def fixed(response: bytes | list[bytes]) -> Answer:
    return lambda head: response


NO_STORE = "upstream: {retries: 0}\n"


# -- framing -------------------------------------------------------------------------------

async def test_more_body_than_content_length_is_a_502_and_the_connection_is_not_reused(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    up = await raw_upstream(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    reply = await proxy.get("/a")
    assert reply.status == 502 and "UPSTREAM" in reply.cache_status
    up.answer = fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert (await proxy.get("/b")).body == b"ok"
    assert up.connections == 2


async def test_a_second_response_to_one_request_is_a_502(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    smuggled = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    up = await raw_upstream(fixed(smuggled))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    assert (await proxy.get("/a")).status == 502
    up.answer = fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
    reply = await proxy.get("/b")
    assert (reply.status, reply.body) == (200, b"good")  # never the queued "evil"


async def test_bytes_after_a_complete_response_close_its_connection(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    late = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\nContent-Len"]
    up = await raw_upstream(fixed(late))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    assert (await proxy.get("/a")).body == b"ok"  # answered before the stray bytes came
    await asyncio.sleep(0.1)
    up.answer = fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
    assert (await proxy.get("/b")).body == b"next"
    assert up.connections == 2  # the connection that got stray bytes was dropped


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",  # control character
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
], ids=["bare-lf", "control-char", "cl-and-te", "two-cl"])  # (a malformed body: test_malformed_bodies)
async def test_malformed_responses_are_refused_strictly(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy, response: bytes
) -> None:
    up = await raw_upstream(fixed(response))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    reply = await proxy.get("/m")
    assert reply.status == 502
    assert b"invalid response" in reply.body


async def test_chunked_close_framed_and_interim_responses_arrive_whole(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    answers = {
        b"/chunked": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                      b"4\r\ndefg\r\n0\r\n\r\n"],
        b"/eof": [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil", b" the end"],
        b"/hints": [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"],
    }

    def answer(head: bytes) -> list[bytes]:
        return answers[head.split(b" ")[1]]

    up = await raw_upstream(answer)
    up.close_after = True  # the close-framed response ends with the connection
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    chunked = await proxy.get("/chunked")
    assert (chunked.status, chunked.body) == (200, b"abcdefg")
    assert (await proxy.get("/eof")).body == b"until the end"
    hints = await proxy.get("/hints")
    assert (hints.status, hints.body) == (200, b"final")


async def test_204_and_304_have_no_body_and_keep_the_connection(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    def answer(head: bytes) -> bytes:
        if b"/nc" in head:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"

    up = await raw_upstream(answer)
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    assert (await proxy.request("DELETE", "/nc")).status == 204
    assert (await proxy.request("POST", "/nm")).status == 304
    assert (await proxy.request("DELETE", "/nc")).status == 204
    assert up.connections == 1


async def test_content_encoding_and_bytes_pass_through_unchanged(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    packed = gzip.compress(b"hello " * 100)
    up = await raw_upstream(fixed(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: "
                                  + str(len(packed)).encode() + b"\r\n\r\n" + packed))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    reply = await proxy.get("/z", headers={"Accept-Encoding": "gzip"})
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.body == packed


# -- what goes upstream ----------------------------------------------------------------------

async def test_only_the_clients_fields_and_the_forwarding_fields_go_upstream(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    up = await raw_upstream(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    raw = (b"GET /f?q=1 HTTP/1.1\r\nHost: shop.example\r\nX-Mine: 1\r\n\r\n")
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    lines = up.heads[-1].decode().split("\r\n")
    assert lines[0] == "GET /f?q=1 HTTP/1.1"
    names = [line.split(":", 1)[0] for line in lines[1:] if line]
    assert sorted(names) == sorted(["Host", "X-Mine", "X-Forwarded-For", "X-Forwarded-Proto",
                                    "X-Forwarded-Host", "Via", "Surrogate-Capability", "X-Request-Id"])


async def test_request_bodies_are_framed_by_what_is_really_sent(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    up = await raw_upstream(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    assert (await proxy.request("POST", "/len", data=b"payload")).status == 200
    assert b"Content-Length: 7" in up.heads[-1] and up.bodies[-1] == b"payload"
    # A chunked body read whole (within client_body_buffer) goes with its length, as nginx
    # sends a buffered one; a longer one is streamed, chunked.
    assert (await proxy.request("POST", "/chunked", data=chunks())).status == 200
    assert b"Content-Length: 6" in up.heads[-1] and up.bodies[-1] == b"abcdef"

    async def long_chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 40_000

    assert (await proxy.request("POST", "/chunked", data=long_chunks())).status == 200
    assert b"Transfer-Encoding: chunked" in up.heads[-1] and up.bodies[-1] == b"x" * 120_000
    # A GET with a body is passed through with it; one with an empty body is filled without
    # one: no Content-Length may go with no body.
    assert (await proxy.request("GET", "/get", data=b"passed")).status == 200
    assert b"Content-Length: 6" in up.heads[-1] and up.bodies[-1] == b"passed"
    assert (await proxy.request("GET", "/get", data=b"", headers={"Content-Length": "0"})).status == 200
    assert b"Content-Length" not in up.heads[-1]
    assert (await proxy.request("POST", "/empty")).status == 200
    assert b"Content-Length: 0" in up.heads[-1]
    # Every exchange ended cleanly; each of the four with a body closed its connection after its
    # answer (the origin might answer that body later: ``proxy.http_client``, *Request bodies*),
    # and the two without one shared the fifth.
    assert up.connections == 5


def test_a_request_head_with_cr_or_lf_inside_a_field_is_refused() -> None:
    head, chunked, expected = request_head("GET", "/x", [("X-A", "1")], "h:1", None)
    assert head == b"GET /x HTTP/1.1\r\nHost: h:1\r\nX-A: 1\r\n\r\n" and not chunked and expected is None
    for headers in ([("X-A", "1\r\nX-Injected: 1")], [("X-A", "1\nX-B: 2")], [("X-A\r", "1")]):
        with pytest.raises(UpstreamProtocolError):
            request_head("GET", "/x", headers, "h:1", None)
    with pytest.raises(UpstreamProtocolError):
        request_head("GET", "/x HTTP/1.1\r\nX: y", [], "h:1", None)


# -- the pool ----------------------------------------------------------------------------------

async def test_a_response_not_read_to_the_end_never_carries_another_request(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    big = b"x" * (4 << 20)
    up = await raw_upstream(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(big)).encode()
                                  + b"\r\n\r\n" + big))
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    async with proxy.session.get(proxy.url + "/big") as resp:
        await resp.content.readexactly(1024)  # then the client goes away
    up.answer = fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await asyncio.sleep(0.1)
    assert (await proxy.get("/next")).body == b"ok"
    assert up.connections == 2


async def _close_all(pool: HostPool, server: asyncio.Server, accepted: list[asyncio.StreamWriter]) -> None:
    """The pool, the test origin and the connections it accepted."""
    await pool.close()
    server.close()
    for writer in accepted:
        writer.close()
    await server.wait_closed()


async def test_idle_connections_are_reused_and_closed_before_the_origin_would() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
                             + (b"" if head.startswith(b"HEAD") else b"ok"))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    now = [0.0]
    pool = HostPool(URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"), 4, None, 1.0,
                    clock=lambda: now[0])

    async def exchange() -> None:
        conn = await pool.acquire()
        head, _, _ = request_head("GET", "/", [], pool.host_header, None)
        resp = await conn.request(head, None, False, None, head_method=False, read_timeout=5.0)
        assert resp.complete_body() == b"ok"

    try:
        await exchange()
        now[0] += KEEPALIVE_IDLE / 2
        await exchange()  # reused
        assert len(accepted) == 1 and pool.idle == 1
        now[0] += KEEPALIVE_IDLE
        await exchange()  # the idle one was too old: closed, a new one made
        assert len(accepted) == 2 and pool.size == 1
        # A HEAD response announces the GET's length and has no body: its end is inferred,
        # so its connection is closed (late bytes must never answer the next request).
        conn = await pool.acquire()
        head, _, _ = request_head("HEAD", "/", [], pool.host_header, None)
        resp = await conn.request(head, None, False, None, head_method=True, read_timeout=5.0)
        assert (resp.headers["Content-Length"], resp.complete_body()) == ("2", b"")
        await exchange()
        assert len(accepted) == 3 and pool.size == 1
    finally:
        await _close_all(pool, server, accepted)


async def test_a_client_body_that_breaks_off_is_told_apart_from_the_upstream_failing() -> None:
    """The client's body failing (reading it raised, or it ended short of its Content-Length) is a
    ``ClientBodyError``, not an upstream error, and the half-used connection is dropped; the
    upstream's connection failing while the body is being sent is still an upstream error."""
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if b"/reset" in head:
                writer.transport.abort()
                return
            await reader.read()  # the rest of the body, until cachegate drops the connection
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = HostPool(URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"), 4, None, 1.0)

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await asyncio.sleep(0.05)
        raise ConnectionResetError("Connection lost")  # what aiohttp raises for a client gone

    async def short() -> AsyncIterator[bytes]:
        yield b"x" * 10

    async def slow() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 10
            await asyncio.sleep(0.02)

    async def post(target: str, body: AsyncIterator[bytes]) -> None:
        conn = await pool.acquire()
        head, chunked, expected = request_head("POST", target, [("Content-Length", "1000")],
                                               pool.host_header, body)
        await conn.request(head, body, chunked, expected, head_method=False, read_timeout=5.0)

    try:
        for body in (broken(), short()):
            with pytest.raises(ClientBodyError):
                await post("/form", body)
            await asyncio.sleep(0.05)
            assert pool.size == 0  # dropped, never reused half-sent
        with pytest.raises(UpstreamError):
            await post("/reset", slow())
        assert len(accepted) == 3
    finally:
        await _close_all(pool, server, accepted)


@pytest.mark.parametrize("closes", [False, True], ids=["keeps the connection", "closes it"])
async def test_a_body_still_going_out_when_the_response_ended_is_cut_and_its_connection_dropped(
        closes: bool) -> None:
    """An origin that answers a POST at its head, without reading the body, and keeps the
    connection: the rest of the body (the client's bytes) must not be sent after the answer, and
    the connection must not carry another request (the origin would read that body as the start
    of it: RFC 9112 §9.5). Without the cut, the origin received ``SMUGGLED`` and then the next
    request on the same connection. An answer that closes the connection cuts the body too: no
    more of it is read once the answer is whole (the client's connection may be reading it then,
    to its end: two readers of one stream). Its reading went on until the connection was gone."""
    received: list[bytes] = []
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n%s\r\nearly"  # body unread
                         % (b"Connection: close\r\n" if closes else b""))
            while chunk := await reader.read(65536):
                received.append(chunk)
            received.append(b"<closed>")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = HostPool(URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"), 4, None, 1.0)
    answered = asyncio.Event()
    asked_after: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await answered.wait()  # the rest comes after the origin's answer
        asked_after.append(True)
        yield b"SMUGGLED"

    try:
        conn = await pool.acquire()
        head, chunked, expected = request_head("POST", "/early", [("Content-Length", "13")],
                                               pool.host_header, None)
        resp = await conn.request(head, body(), chunked, expected, head_method=False, read_timeout=5.0)
        assert resp.complete_body() == b"early"
        answered.set()
        await asyncio.sleep(0.2)
        assert b"SMUGGLED" not in b"".join(received) and received[-1:] == [b"<closed>"]
        assert not asked_after  # the body's task was cancelled with the answer whole
        assert pool.size == 0 and pool.idle == 0
    finally:
        await _close_all(pool, server, accepted)


async def test_a_slow_upload_is_not_a_read_timeout(origin: Origin, make_proxy: MakeProxy) -> None:
    async def echo_size(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    origin.route("/up", echo_size)
    proxy = await make_proxy(config="upstream: {timeouts: {read: 300ms}, retries: 0}\n")

    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(5):  # 750 ms in all, while the upstream waits for the rest of it
            await asyncio.sleep(0.15)
            yield b"x" * 1000

    reply = await proxy.request("POST", "/up", data=slowly())
    assert (reply.status, reply.body) == (200, b"5000")


async def test_interim_responses_reach_the_hook_in_order_and_stay_out_of_the_response(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]]
) -> None:
    """In one packet or several: 100, 102 and 103 before the 200, each with its own fields;
    the connection stays reusable."""
    interims = (b"HTTP/1.1 100 Continue\r\n\r\n" b"HTTP/1.1 102 Processing\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nLink: </b.js>; rel=preload\r\n\r\n")
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    up = await raw_upstream(fixed(interims + final))
    pool = HostPool(URL(up.url), 2, None, 1.0)
    try:
        for answer in (fixed(interims + final), fixed([interims, final])):
            up.answer = answer
            seen: list[tuple[int, str, list[str]]] = []
            conn = await pool.acquire()
            head, _, _ = request_head("GET", "/", [], pool.host_header, None)
            resp = await conn.request(
                head, None, False, None, head_method=False, read_timeout=5.0,
                on_interim=lambda s, r, h, out=seen: out.append((s, r, h.getall("Link", []))))
            assert seen == [(100, "Continue", []), (102, "Processing", []),
                            (103, "Early Hints", ["</a.css>; rel=preload", "</b.js>; rel=preload"])]
            assert (resp.status, "Link" in resp.headers, resp.complete_body()) == (200, False, b"ok")
        assert up.connections == 1
    finally:
        await pool.close()


@pytest.mark.parametrize(("status", "reason", "relayed"), [
    (200, "OK", "OK"), (200, "All Good", "All Good"), (200, "caf\xe9\tok", "caf\xe9\tok"),
    (200, "O\x01K", "OK"), (404, "gone\x7f", "Not Found"), (599, "odd\x1b", ""),
])
def test_a_reason_phrase_with_a_control_character_is_replaced_by_the_standard_one(
        status: int, reason: str, relayed: str) -> None:
    # RFC 9112 §4: HTAB, SP, VCHAR and obs-text only; a strict client would refuse the response.
    assert reason_phrase(status, reason) == relayed


async def test_an_origins_reason_phrase_with_a_control_character_never_reaches_a_client(
        make_proxy: MakeProxy) -> None:
    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 O\x01K\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nhi")

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(upstreams=[origin.url])
        for _ in range(2):  # the miss, then the stored response
            host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /r HTTP/1.1\r\nHost: site.example\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert line == b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
async def test_a_status_code_outside_100_to_599_is_an_invalid_response(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy, clock: Clock,
    status: bytes
) -> None:
    """RFC 9110 §15: a 502, never relayed nor stored; a stored response stays and is served
    under stale-if-error."""
    weird = b"HTTP/1.1 " + status + b" Weird\r\nCache-Control: max-age=300\r\nContent-Length: 2\r\n\r\nhi"
    good = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=10, stale-if-error=60\r\nContent-Length: 4\r\n\r\ngood"
    up = await raw_upstream(lambda head: weird if head.startswith(b"GET /w ") else good)
    proxy = await make_proxy(config=NO_STORE, upstreams=[up.url])
    proxy.runtime.engine.clock = clock
    for _ in range(2):  # nothing stored: both go upstream
        reply = await proxy.get("/w")
        assert reply.status == 502 and b"invalid response" in reply.body, reply
    assert sum(h.startswith(b"GET /w ") for h in up.heads) == 2
    assert (await proxy.get("/s")).body == b"good"
    clock.advance(30)  # stale, within stale-if-error
    up.answer = fixed(weird)
    for _ in range(2):  # served stale, and the stored copy is never replaced
        stale = await proxy.get("/s")
        assert (stale.status, stale.body, stale.x_cache) == (200, b"good", "STALE")


# -- a response to HEAD ends at its head -----------------------------------------------------

NAIVE_HEAD = b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 10\r\nX-Origin: naive\r\n\r\n"
NAIVE_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"  # looks like a response, on purpose
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
FRESH = b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 5\r\n\r\nfresh"


def naive(head_answer: bytes | list[bytes]) -> Answer:
    """An origin that answers HEAD with ``head_answer`` (its head and the GET's body, as
    hand-written servers do) and GET with ``FRESH``."""
    return lambda head: head_answer if head.startswith(b"HEAD ") else FRESH


@pytest.mark.parametrize("packets", [
    [NAIVE_HEAD + NAIVE_BODY],  # the body in the same read as the head
    [NAIVE_HEAD, NAIVE_BODY],  # the body a moment later
    [NAIVE_HEAD[:-3], NAIVE_HEAD[-3:] + NAIVE_BODY],  # the head's end split across reads
    [NAIVE_HEAD[:-1], NAIVE_HEAD[-1:] + NAIVE_BODY],
    [EARLY_HINTS + NAIVE_HEAD + NAIVE_BODY],  # an interim response before the final head
    [EARLY_HINTS[:-2], EARLY_HINTS[-2:] + NAIVE_HEAD[:5], NAIVE_HEAD[5:] + NAIVE_BODY],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + b"x" * 5000],  # more than Content-Length says
    [b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\nxy"],  # less
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
], ids=["one-read", "two-reads", "split-crlf-3", "split-crlf-1", "early-hints", "early-hints-split",
        "longer-than-cl", "shorter-than-cl", "chunked"])
async def test_the_bytes_after_a_head_responses_head_are_dropped_and_its_connection_closed(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], packets: list[bytes]
) -> None:
    """RFC 9112 §6.3: a response to HEAD has no body, whatever its fields say. What a naive
    origin writes after the head is never parsed (it was a second, invalid response: a 502),
    and the connection is closed: the next request gets its own answer on a new one."""
    up = await raw_upstream(naive(packets))
    pool = HostPool(URL(up.url), 2, None, 1.0)
    try:
        conn = await pool.acquire()
        seen: list[int] = []
        head, _, _ = request_head("HEAD", "/h", [], pool.host_header, None)
        resp = await conn.request(head, None, False, None, head_method=True, read_timeout=5.0,
                                  on_interim=lambda s, r, h: seen.append(s))
        assert (resp.status, resp.complete_body()) == (200, b"")
        assert seen == ([103] if packets[0].startswith(EARLY_HINTS[:12]) else [])
        if b"naive" in b"".join(packets):
            assert (resp.headers["X-Origin"], resp.headers["Content-Length"]) == ("naive", "10")
        assert pool.size == 0  # closed at once, never back in the pool
        await asyncio.sleep(0.05)  # any late bytes arrive
        conn = await pool.acquire()
        head, _, _ = request_head("GET", "/g", [], pool.host_header, None)
        resp = await conn.request(head, None, False, None, head_method=False, read_timeout=5.0)
        assert (resp.status, resp.complete_body()) == (200, b"fresh")
        assert up.connections == 2
    finally:
        await pool.close()


async def test_a_naive_origins_head_answers_through_cachegate(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], make_proxy: MakeProxy
) -> None:
    """A no-store key's HEADs (hit-for-pass: HEAD upstream) and a bypassed HEAD get the origin's
    head and no body, not a 502; the next request never reads the bytes that followed."""
    up = await raw_upstream(naive(NAIVE_HEAD + NAIVE_BODY))
    rules = "rules:\n  - {name: b, match: {path: /bypassed}, bypass: true}\n"
    proxy = await make_proxy(config=NO_STORE, rules=rules, upstreams=[up.url])
    for method in ("GET", "GET", "HEAD", "HEAD", "GET"):
        reply = await proxy.request(method, "/k")
        if method == "GET":
            assert (reply.status, reply.body) == (200, b"fresh"), reply
        else:
            assert (reply.status, reply.body, reply.headers["X-Origin"]) == (200, b"", "naive"), reply
            assert reply.headers["Content-Length"] == "10"
    assert [h.split(b" ", 1)[0] for h in up.heads] == [b"GET", b"GET", b"HEAD", b"HEAD", b"GET"]
    # Each HEAD's connection closed after it: the GETs' (taken by the first HEAD), the second
    # HEAD's, and the last GET's (taken by the bypassed HEAD below).
    assert up.connections == 3
    reply = await proxy.request("HEAD", "/bypassed")
    assert (reply.status, reply.body, reply.headers["X-Origin"]) == (200, b"", "naive"), reply
    assert "RULE-BYPASS" in reply.cache_status
    reply = await proxy.get("/bypassed")
    assert (reply.status, reply.body) == (200, b"fresh"), reply
    assert up.connections == 4


# -- a 204 or 304 ends at its head ------------------------------------------------------------

STRAY = b"<p>rendered</p>"  # a body a sloppy origin writes after a 204 or 304
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nX-Origin: sloppy\r\n\r\n"
NO_CONTENT_CL = b"HTTP/1.1 204 No Content\r\nX-Origin: sloppy\r\nContent-Length: 15\r\n\r\n"
NO_CONTENT_TE = b"HTTP/1.1 204 No Content\r\nX-Origin: sloppy\r\nTransfer-Encoding: chunked\r\n\r\n"
NOT_MODIFIED = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-Origin: sloppy\r\n\r\n'
PASSIVE = "upstream: {passive: {failures: 1, cooldown: 30s}, retries: 0}\n"


def stray_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "cachegate.upstream" and r.levelno == logging.WARNING and "which has none" in r.getMessage()]


@pytest.mark.parametrize(("packets", "status", "stray"), [
    ([NO_CONTENT + STRAY], 204, STRAY),
    ([NO_CONTENT_CL + STRAY], 204, STRAY),
    ([NO_CONTENT_TE + b"f\r\n" + STRAY + b"\r\n0\r\n\r\n"], 204, b"f\r\n" + STRAY + b"\r\n0\r\n\r\n"),
    ([NOT_MODIFIED + STRAY], 304, STRAY),
    ([NOT_MODIFIED + NAIVE_BODY], 304, NAIVE_BODY),  # a whole response: never the next request's
    ([NO_CONTENT[:5], NO_CONTENT[5:] + STRAY], 204, STRAY),  # the status line not whole at first
    ([NO_CONTENT[:-1], NO_CONTENT[-1:] + STRAY], 204, STRAY),  # the head's end split across reads
    ([EARLY_HINTS + NOT_MODIFIED + STRAY], 304, STRAY),  # an interim response first
], ids=["204", "204-content-length", "204-chunked", "304", "304-then-a-response", "split-status-line",
        "split-crlf", "early-hints"])
async def test_a_body_after_a_204_or_304_is_dropped_and_its_connection_closed(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], packets: list[bytes], status: int, stray: bytes
) -> None:
    """RFC 9112 §6.3: a 204 or 304 ends at its head. A body written after it in the same read was
    parsed as a second response: an invalid response (a 502, a passive failure). Now the status
    is the answer, the rest is dropped unread (counted in ``stray``: the engine warns, naming the
    upstream), and the connection is closed: the next request goes on a new one and gets its
    own answer."""
    up = await raw_upstream(lambda head: packets if head.startswith(b"GET /b ") else FRESH)
    pool = HostPool(URL(up.url), 2, None, 1.0)
    try:
        conn = await pool.acquire()
        head, _, _ = request_head("GET", "/b", [], pool.host_header, None)
        resp = await conn.request(head, None, False, None, head_method=False, read_timeout=5.0)
        assert (resp.status, resp.headers["X-Origin"], resp.complete_body()) == (status, "sloppy", b"")
        assert resp.stray == len(stray)
        assert pool.size == 0  # closed at once, never back in the pool
        await asyncio.sleep(0.05)
        conn = await pool.acquire()
        head, _, _ = request_head("GET", "/g", [], pool.host_header, None)
        resp = await conn.request(head, None, False, None, head_method=False, read_timeout=5.0)
        assert (resp.status, resp.complete_body(), resp.stray) == (200, b"fresh", 0)
        assert up.connections == 2
    finally:
        await pool.close()


@pytest.mark.parametrize("packets", [
    [EARLY_HINTS + FRESH],  # an interim response, then the final one and its body in one read
    [FRESH[:5], FRESH[5:]],  # the status line not whole in the first read
    [FRESH[:-7], FRESH[-7:]],  # the head's end split across reads, the body after it
    [FRESH[:-5], FRESH[-5:-2], FRESH[-2:]],  # the body in pieces
], ids=["early-hints", "split-status-line", "split-crlf", "split-body"])
async def test_other_responses_searched_for_their_heads_end_keep_their_body_and_connection(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], caplog: pytest.LogCaptureFixture,
    packets: list[bytes]
) -> None:
    """A response whose first read does not show its final status is fed up to its head's end
    first (it may be a 204 or 304): the body of any other is read on as before, and the
    connection reused."""
    caplog.set_level(logging.WARNING, logger="cachegate.upstream")
    up = await raw_upstream(lambda head: packets)
    pool = HostPool(URL(up.url), 2, None, 1.0)
    try:
        for _ in range(2):
            conn = await pool.acquire()
            head, _, _ = request_head("GET", "/g", [], pool.host_header, None)
            resp = await conn.request(head, None, False, None, head_method=False, read_timeout=5.0)
            body = b""
            while chunk := await resp.read_chunk():
                body += chunk
            assert (resp.status, body) == (200, b"fresh")
            await asyncio.sleep(0.02)
        assert up.connections == 1 and not stray_warnings(caplog)
    finally:
        await pool.close()


async def both_still_serve(proxy: Proxy, failures: int) -> None:
    """Other clients get their answers (from both upstreams, in turn), and neither upstream is
    out nor holds a passive failure; each counted ``failures`` errors."""
    others = await asyncio.gather(*[proxy.get(f"/ok?{i}") for i in range(6)])
    assert [(r.status, r.body) for r in others] == [(200, b"fresh")] * 6
    pool = proxy.runtime.pool
    assert [(u.available(time.monotonic()), u.passive_failures, u.failures) for u in pool.upstreams] == [
        (True, 0, failures)] * 2


def never_reused(origin: RawOrigin, first: int) -> None:
    """The connections of the origin's ``first`` requests carried no later one; later ones came."""
    served = origin.requests
    assert any(r.target.startswith("/ok") for _, r in served[first:]), served
    for k, (conn, _) in enumerate(served[:first]):
        assert conn not in [i for i, _ in served[k + 1:]], served


async def test_a_body_after_a_204_or_304_takes_no_upstream_out_and_no_other_client_sees_it(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Through cachegate, with two upstreams and passive health that takes one out at its first
    failure: each gets passed-through requests it answers 204 or 304 with a body. Each client
    gets its status, head only; nothing is held against either upstream (a 502 and a passive
    failure, before: one client could take an upstream out for everybody); the next request to
    each goes on a new connection, and other clients get their answers from both."""
    answers = {"/nc": NO_CONTENT + STRAY, "/nm": NOT_MODIFIED + STRAY}

    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            await conn.send(answers.get(request.target.split("?")[0], FRESH))

    caplog.set_level(logging.WARNING, logger="cachegate.upstream")
    rules = "rules:\n  - {name: passed, match: {path: /n*}, bypass: true}\n"
    async with raw_origins() as start:
        a, b = await start(serve), await start(serve)
        proxy = await make_proxy(config=PASSIVE, rules=rules, upstreams=[a.url, b.url])
        for path, status in (("/nc", 204), ("/nc", 204), ("/nm", 304), ("/nm", 304)):
            reply = await proxy.get(path)
            assert (reply.status, reply.body, reply.headers["X-Origin"]) == (status, b"", "sloppy"), reply
        await both_still_serve(proxy, failures=0)
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        counted = re.findall(r"^cachegate_upstream_errors_total\{.*\} (\S+)$", metrics, re.M)
        assert counted and set(counted) == {"0.0"}, counted  # each kind exported, at 0 (KNOWN_LABELS)
        for origin in (a, b):
            served = origin.requests
            assert [r.target for _, r in served[:2]] == ["/nc", "/nm"]  # round robin: both to each
            never_reused(origin, 2)
        warned = stray_warnings(caplog)
        assert len(warned) == 4 and sum(a.url in w for w in warned) == 2 and sum(b.url in w for w in warned) == 2


async def test_a_304_with_a_body_to_a_revalidation_still_freshens_the_stored_response(
    make_proxy: MakeProxy, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The 304 is the answer to the revalidation, as from any origin: the stored response is
    served and freshened (no 502, no passive failure), and the connection is not reused."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if "if-none-match" in request.headers:
                await conn.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=60\r\n'
                                b"X-Origin: sloppy\r\nContent-Length: 15\r\n\r\n" + STRAY)
            else:
                await conn.send(b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nCache-Control: max-age=10\r\n'
                                b"X-Origin: first\r\nContent-Length: 6\r\n\r\nstored")

    caplog.set_level(logging.WARNING, logger="cachegate.upstream")
    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config=PASSIVE, upstreams=[origin.url])
        proxy.runtime.engine.clock = clock
        first = await proxy.get("/page")
        assert (first.status, first.body, first.x_cache) == (200, b"stored", "MISS")
        clock.advance(30)  # stale
        again = await proxy.get("/page")
        assert (again.status, again.body, again.x_cache) == (200, b"stored", "REVALIDATED"), again
        assert again.headers["X-Origin"] == "sloppy"  # the 304's fields freshen the stored ones
        clock.advance(30)  # within the 304's max-age=60: fresh, not asked again
        hit = await proxy.get("/page")
        assert (hit.status, hit.body, hit.x_cache, hit.headers["X-Origin"]) == (200, b"stored", "HIT", "sloppy")
        assert (await proxy.get("/other")).status == 200
        connections = [i for i, _ in origin.requests]
        assert len(connections) == 3 and connections[2] != connections[1]
        u = proxy.runtime.pool.upstreams[0]
        assert (u.available(time.monotonic()), u.passive_failures, u.failures) == (True, 0, 0)
        assert len(stray_warnings(caplog)) == 1


# -- bytes after a whole response, in its read -------------------------------------------------

CREATED = b"HTTP/1.1 201 Created\r\nLocation: /items/42\r\nContent-Length: 7\r\n\r\ncreated"
CREATED_CHUNKED = (b"HTTP/1.1 201 Created\r\nLocation: /items/42\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"7\r\ncreated\r\n0\r\n\r\n")
# What an origin that answered a POST without reading its body may write next: the answer to
# the body, read as its next request. Cacheable, on purpose.
SECOND = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 6\r\n\r\nPOISON"
LISTED = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 4\r\n\r\nlist"


def overrun_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cachegate.upstream"
            and r.levelno == logging.WARNING and "after the end of the" in r.getMessage()]


def serving(answers: dict[tuple[str, str], list[bytes]]) -> Callable[[Conn], Awaitable[None]]:
    """An origin that writes each request's packets, each in one write: (method, path) -> packets;
    ``FRESH`` to any other request."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            for packet in answers.get((request.method, request.target.split("?")[0]), [FRESH]):
                await conn.send(packet)
                await asyncio.sleep(0.01)

    return serve


@pytest.mark.parametrize(("method", "packets", "stray"), [
    ("POST", [CREATED + b"XYZ"], 3),  # bytes the parser refuses (as a status line)
    ("POST", [CREATED + SECOND], len(SECOND)),  # a whole second response
    ("POST", [CREATED + SECOND[:20]], 20),  # the start of one
    ("PATCH", [CREATED_CHUNKED + b"XYZ"], 3),  # after the last chunk
    ("POST", [EARLY_HINTS + CREATED + b"XYZ"], 3),  # an interim response first
    ("POST", [CREATED[:30], CREATED[30:] + SECOND], len(SECOND)),  # the head split across reads
], ids=["garbage", "second-response", "start-of-one", "chunked-patch", "early-hints", "split-head"])
async def test_the_answer_to_a_post_followed_by_stray_bytes_is_relayed_and_its_connection_closed(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture, method: str, packets: list[bytes], stray: int
) -> None:
    """RFC 9112 §6.3: bytes after a whole response must not be taken for a response; they may
    be dropped. The origin has acted on the POST: refused with a 502 (as before), its client
    would likely send it again, and each such answer was a passive failure (two upstreams, one
    failure taking one out: the first took it out for everyone). Now the 201 is relayed whole,
    the bytes are dropped with a WARNING naming the upstream and how many came, the connection
    is never reused, nothing is stored, and nothing is held against either upstream."""
    caplog.set_level(logging.WARNING, logger="cachegate.upstream")
    serve = serving({(method, "/items"): packets, ("GET", "/items"): [LISTED]})
    async with raw_origins() as start:
        a, b = await start(serve), await start(serve)
        proxy = await make_proxy(config=PASSIVE, upstreams=[a.url, b.url])
        for _ in range(2):  # round robin: one to each upstream
            reply = await proxy.request(method, "/items", data=b'{"name": "x"}')
            assert (reply.status, reply.body, reply.headers.get("Location")) == (201, b"created", "/items/42")
        await both_still_serve(proxy, failures=0)
        listed = await proxy.get("/items")  # neither the 201 nor the bytes after it were stored
        assert (listed.status, listed.body, listed.x_cache) == (200, b"list", "MISS")
        for origin in (a, b):
            assert origin.requests[0][1].method == method
            never_reused(origin, 1)
        assert sorted(overrun_warnings(caplog)) == sorted(
            f"upstream {origin.url}: {stray} or more bytes after the end of the 201 response to {method} "
            f"(RFC 9112 §6.3): dropped, the 201 answered (the {method} may have been acted on: not refused, "
            "which the client might repeat), the connection closed" for origin in (a, b))


@pytest.mark.parametrize(("method", "packets"), [
    ("GET", [SECOND[:-2] + b"XYZ"]),  # a Content-Length too small: the body cut short
    ("GET", [LISTED + SECOND]),  # a second response
    ("DELETE", [LISTED + b"XYZ"]),
], ids=["get-cut-short", "get-second-response", "delete"])
async def test_the_answer_to_a_get_followed_by_stray_bytes_is_a_502_that_takes_no_upstream_out(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture, method: str, packets: list[bytes]
) -> None:
    """An idempotent request's answer followed by stray bytes stays a 502: it may be stored and
    shared, its body perhaps cut short by a ``Content-Length`` too small, and the client may ask
    again. But it is one handler's framing, not the upstream's state (it answered, at once and
    whole): no passive failure. Counted as one (two upstreams, one failure taking one out), one
    URL took an upstream out for every other URL; now both keep serving. Nothing is stored, the
    connection is not reused, and the error is counted (``failures``, ``kind="protocol"``)."""
    caplog.set_level(logging.WARNING, logger="cachegate.upstream")
    serve = serving({(method, "/broken"): packets})
    async with raw_origins() as start:
        a, b = await start(serve), await start(serve)
        proxy = await make_proxy(config=PASSIVE, upstreams=[a.url, b.url])
        for _ in range(4):  # two to each upstream
            reply = await proxy.request(method, "/broken")
            assert (reply.status, "UPSTREAM-INVALID" in reply.cache_status) == (502, True), reply
        await both_still_serve(proxy, failures=2)
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        protocol = re.findall(r'^cachegate_upstream_errors_total\{.*kind="protocol".*\} (\S+)$', metrics, re.M)
        assert protocol == ["2.0", "2.0"], protocol
        for origin in (a, b):  # each asked twice: nothing was stored
            assert [r.target for _, r in origin.requests[:2]] == ["/broken"] * 2
            never_reused(origin, 2)
        assert not overrun_warnings(caplog)


async def test_a_read_timer_run_as_a_plain_handle_still_times_the_read_out() -> None:
    """uvloop arms a deadline under half a millisecond away with ``call_soon``: a plain Handle,
    no ``when``. The late-timer check asked it for ``when``: AttributeError in the callback, no
    timer left, and the exchange waited for an origin that never answered (a herd of 30 got the
    origin's answer 30 s later instead of the 0.3 s read timeout's 504). Here the Handle is
    made as uvloop makes it, on the loop the tests run."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.readuntil(b"\r\n\r\n")  # and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    pool = HostPool(URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"), 4, None, 1.0)
    loop = asyncio.get_running_loop()
    try:
        conn = await pool.acquire()
        head, _, _ = request_head("GET", "/", [], pool.host_header, None)
        exchange = asyncio.ensure_future(conn.request(head, None, False, None, head_method=False,
                                                      read_timeout=0.2))
        await asyncio.sleep(0)  # the request is out, its read timer armed
        timer = conn._read_timer
        assert timer is not None
        timer.cancel()  # (in its place: the Handle uvloop makes for a deadline due now)
        await asyncio.sleep(0.25)
        conn._read_timer = loop.call_soon(conn._check_read)
        with pytest.raises(UpstreamError, match="read timed out"):
            await asyncio.wait_for(exchange, 2)
    finally:
        await _close_all(pool, server, accepted)
