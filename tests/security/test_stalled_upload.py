"""A client that stalls mid-upload does not hold an upstream connection for as long as it likes.

A request body goes upstream as it arrives, on a pooled connection, and the upstream's read
timeout is put off while the body is still being sent (the upstream is not the silent one).
Without a limit on the client's silence, a POST announcing a big body and then sending nothing
held its connection forever, and pool_size of them made every other client's miss a 504.
``client_body_timeout`` bounds the silence between two reads of the body: then the client gets
a 408 and its connection is closed, the upstream connection is dropped (never reused half-sent),
and nothing is counted against the upstream. A body trickled a byte at a time never falls that
silent: its start (``client_body_buffer``) is read before an upstream connection is taken, and
it must average ``client_body_min_rate``.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.misbehaving import Conn, raw_origins, response

ANNOUNCED = 100_000


async def stalled_upload(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST that announces ANNOUNCED body bytes, sends one, and then nothing."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {ANNOUNCED}\r\n\r\nx"
                 .encode())
    await writer.drain()
    return reader, writer


class UploadOrigin:
    """A raw origin that reads ANNOUNCED body bytes of each POST and answers 200: ``heads``, the
    upstream connections that got a POST head; ``ended``, those cachegate dropped while the body
    was being sent on them."""

    def __init__(self) -> None:
        self.heads: list[int] = []
        self.ended: list[int] = []

    async def serve(self, conn: Conn) -> None:
        ok = response("200 OK", {"Cache-Control": "no-store"}, b"fine")
        while True:
            head = await conn.reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                self.heads.append(conn.index)
                try:
                    await conn.reader.readexactly(ANNOUNCED)
                except asyncio.IncompleteReadError:
                    self.ended.append(conn.index)
                    return
            await conn.send(ok)


async def test_stalled_uploads_are_cut_off_and_free_the_pool_for_other_clients(make_proxy: MakeProxy) -> None:
    uploads_origin = UploadOrigin()
    heads, ended, serve = uploads_origin.heads, uploads_origin.ended, uploads_origin.serve

    async with raw_origins() as start:
        origin = await start(serve)
        # Each body goes upstream from its first byte: the case of a body bigger than
        # client_body_buffer, whose start was read before the connection was taken.
        proxy = await make_proxy(config="upstream: {pool_size: 2, retries: 0}\nclient_body_timeout: 1s\n"
                                        "client_body_buffer: 0\nclient_body_min_rate: 0\n",
                                 upstreams=[origin.url])
        uploads = [await stalled_upload(proxy) for _ in range(2)]
        for _ in range(500):  # both bodies are going upstream: the pool is taken
            if len(heads) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(heads) == 2
        try:
            for reader, _ in uploads:
                # A 408 to a client that still listens, then the connection half-closed at once
                # (its close lingers, dropping what the client still sends): not after aiohttp's
                # read of the rest of the body through its parser (10 s), nor a 400 saying the
                # body "broke off" (it timed out). Without the limit no answer ever comes.
                answer = await asyncio.wait_for(reader.read(), 8)
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert b"the request body did not arrive in time" in answer
        finally:
            for _, writer in uploads:
                writer.close()
        for _ in range(500):  # the upstream connections the bodies were going to were dropped
            if len(ended) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(ended) == sorted(heads)
        # Another client's miss gets an upstream connection.
        after = await proxy.get("/miss", headers={"Host": "shop.example"})
        assert (after.status, after.body) == (200, b"fine")
        for u in proxy.runtime.pool.upstreams:
            assert (u.passive_failures, u.failures) == (0, 0)


async def trickle(proxy: Proxy, stop: asyncio.Event, *, first: bytes = b"x", every: float = 0.2
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
    """A POST that announces ANNOUNCED body bytes, sends ``first``, then a byte every ``every``
    seconds: never silent for long, never done."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {ANNOUNCED}\r\n\r\n"
                 .encode() + first)
    await writer.drain()

    async def drip() -> None:
        while not stop.is_set() and not writer.is_closing():
            await asyncio.sleep(every)
            writer.write(b"x")

    return reader, writer, asyncio.create_task(drip())


async def test_trickling_uploads_do_not_take_the_pool_from_other_clients_misses(make_proxy: MakeProxy) -> None:
    # pool_size + 1 uploads trickling a byte every 0.2 s (never silent for client_body_timeout)
    # held every pooled connection: every other client's miss waited, then got a 504.
    posts: list[int] = []
    ok = response("200 OK", {"Cache-Control": "no-store"}, b"fine")

    async def serve(conn: Conn) -> None:
        while True:
            head = await conn.reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST"):
                posts.append(conn.index)
                await conn.reader.readexactly(ANNOUNCED)
            await conn.send(ok)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {pool_size: 2, retries: 0}\nclient_body_timeout: 5s\n",
                                 upstreams=[origin.url])
        stop = asyncio.Event()
        uploads = [await trickle(proxy, stop) for _ in range(3)]
        try:
            await asyncio.sleep(1.0)
            miss = await asyncio.wait_for(proxy.get("/miss", headers={"Host": "shop.example"}), 5)
            assert (miss.status, miss.body) == (200, b"fine")
            assert posts == []  # the bodies' starts are still being read: no upstream connection yet
        finally:
            stop.set()
            for _, writer, task in uploads:
                writer.close()
                await task


async def test_an_upload_slower_than_the_minimum_rate_is_cut_off_and_a_fast_one_is_not(
        make_proxy: MakeProxy) -> None:
    # Past client_body_buffer the body streams on a pooled connection: a client trickling it
    # there held the connection for as long as it liked. It must now average client_body_min_rate.
    uploads_origin = UploadOrigin()
    heads, ended, serve = uploads_origin.heads, uploads_origin.ended, uploads_origin.serve

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {pool_size: 2, retries: 0}\nclient_body_timeout: 1s\n"
                                        "client_body_buffer: 1KB\nclient_body_min_rate: 1KB\n",
                                 upstreams=[origin.url])
        stop = asyncio.Event()
        reader, writer, task = await trickle(proxy, stop, first=b"x" * 2048)  # 1 s + 2 KB at 1 KB/s: 3 s
        try:
            # Read whole although the client drips on after it: the close lingers, reading and
            # dropping what it still sends (a closed socket's reset could discard the 408 here
            # before this read: tests/security/test_lingering_close.py).
            answer = await asyncio.wait_for(reader.read(), 30)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
            assert b"the request body did not arrive in time" in answer
        finally:
            stop.set()
            writer.close()
            await task
        assert len(heads) == 1  # it had gone upstream, and that connection was dropped
        for _ in range(500):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended == heads
        # A body sent at 100 KB/s goes through.
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /upload HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {ANNOUNCED}\r\n"
                     "Connection: close\r\n\r\n".encode())
        for _ in range(ANNOUNCED // 10_000):
            writer.write(b"y" * 10_000)
            await writer.drain()
            await asyncio.sleep(0.1)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"fine")


async def test_time_cachegate_takes_before_it_reads_a_body_is_not_blamed_on_the_client(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """An ``Expect: 100-continue`` client sends its body only after the origin's 100 when
    cachegate reads none of it first (``client_body_buffer: 0``), which comes only once a pooled
    connection is free: waiting for one is not the client being slow (its upload was cut off
    with a 400 when the pool was busy for client_body_timeout)."""
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=b"got " + await request.read(), headers={"Cache-Control": "no-store"})

    origin.route("/slow", body=b"slow", delay=2.5, headers={"Cache-Control": "no-store"})
    origin.route("/up", echo)
    proxy = await make_proxy(config="upstream: {pool_size: 1, retries: 0}\nclient_body_timeout: 1s\n"
                                    "client_body_buffer: 0\n")
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)

    async def upload() -> bytes:
        await asyncio.sleep(0.2)  # the one pooled connection is busy with /slow by now
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /up HTTP/1.1\r\nHost: shop.example\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\nConnection: close\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert first.startswith(b"HTTP/1.1 100"), first
        writer.write(b"hello")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    slow, answer = await asyncio.gather(proxy.get("/slow"), upload())
    assert slow.body == b"slow"
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"got hello"), answer


async def test_expect_100_continue_uploads_that_send_nothing_do_not_take_the_pool(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """An ``Expect: 100-continue`` upload pays what any other does before it holds a pooled
    connection: cachegate sends its own 100 and reads the start of the body first. Holders that
    got their 100 and send nothing held every pooled connection, and each other miss waited for
    one, then got a 504."""
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=b"got " + await request.read(), headers={"Cache-Control": "no-store"})

    origin.route("/up", echo)
    origin.route("/page", body=b"page", headers={"Cache-Control": "max-age=60"})
    proxy = await make_proxy(config="upstream: {pool_size: 2, retries: 0, timeouts: {connect: 2s}}\n"
                                    "client_body_timeout: 30s\n")
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    holders = []
    try:
        for _ in range(4):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /up HTTP/1.1\r\nHost: shop.example\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 100000\r\n\r\n")
            holders.append(writer)
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert first == b"HTTP/1.1 100 Continue\r\n\r\n", first  # then it sends nothing
        miss = await proxy.get("/page")
        assert (miss.status, miss.x_cache, miss.body) == (200, "MISS", b"page")
        assert origin.count("/up") == 0  # none of them reached the origin
        # One that sends its body gets the origin's answer, and one 100 (cachegate's) before it.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /up HTTP/1.1\r\nHost: shop.example\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\nConnection: close\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"got hello"), answer
        assert b" 100 " not in answer
    finally:
        for writer in holders:
            writer.close()
