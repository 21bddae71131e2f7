"""Retrying a request that has a body: a body read whole before going upstream
(``client_body_buffer``) is sent anew on each try; a streamed one only while no try has read
any of it, never twice (docs/upstreams.md, *Retries*). A PUT with a 1-byte body sent to a
refusing upstream was a 502 where a GET was retried."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.ports import Ports
from tests.security.misbehaving import Conn, raw_origins, response

BIG = bytes(range(256)) * 1200  # 300 KB: more than client_body_buffer (64 KB), streamed


def bodies(origin: Origin, path: str) -> list[bytes]:
    return [s.body for s in origin.seen if s.path.split("?")[0] == path]


async def test_a_put_with_a_body_sent_to_a_refusing_upstream_is_retried_and_arrives_once(
    origin: Origin, make_proxy: MakeProxy, ports: Ports
) -> None:
    origin.route("/put", body=b"done")
    proxy = await make_proxy(config="upstream: {retries: 1, passive: {failures: 0}}\n",
                             upstreams=[ports.url(), origin.url])
    for i in range(4):  # round robin: two of them go to the refusing upstream first
        reply = await proxy.request("PUT", f"/put?{i}", data=b"x" * i + b"!")
        assert (reply.status, reply.body) == (200, b"done")
    assert bodies(origin, "/put") == [b"x" * i + b"!" for i in range(4)]  # each once, whole


async def test_a_post_with_a_body_is_retried_only_with_retry_non_idempotent(
    origin: Origin, make_proxy: MakeProxy, tmp_path: Path, ports: Ports
) -> None:
    origin.route("/post", body=b"done")
    dead = ports.url()
    for configured in (False, True):
        origin.seen.clear()
        proxy = await make_proxy(
            config=f"upstream: {{retries: 1, retry_non_idempotent: {str(configured).lower()}, "
                   "passive: {failures: 0}}\n",
            upstreams=[dead, origin.url], directory=tmp_path / str(configured))
        statuses = [(await proxy.request("POST", f"/post?{i}", data=b"payload%d" % i)).status
                    for i in range(4)]
        if configured:
            assert statuses == [200] * 4
            assert sorted(bodies(origin, "/post")) == [b"payload%d" % i for i in range(4)]
        else:  # as documented: a POST is never retried unless configured
            assert sorted(statuses) == [200, 200, 502, 502]
            assert len(bodies(origin, "/post")) == 2


async def test_a_small_body_on_a_keep_alive_connection_dropped_as_it_left_is_sent_again(
    make_proxy: MakeProxy,
) -> None:
    """The upstream's idle timeout closes the pooled connection as the PUT arrives: one more
    try, on a new connection, with the whole body (it was a 502). A body of exactly
    client_body_buffer bytes is one read whole too."""
    answered: list[bytes] = []

    async def drop_a_put_on_reuse(conn: Conn) -> None:
        for n in range(2):
            head = await conn.reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = await conn.reader.readexactly(length)
            if n == 1 and head.startswith(b"PUT"):
                return  # closed with nothing sent
            answered.append(body)
            await conn.send(response("200 OK", {"Cache-Control": "no-store"}, b"ok"))

    async with raw_origins() as start:
        lone = await start(drop_a_put_on_reuse)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[lone.url])
        assert (await proxy.get("/warm")).status == 200  # connection 0, pooled
        reply = await proxy.request("PUT", "/put", data=b"small body")  # 0 dropped, then 1
        assert (reply.status, reply.body) == (200, b"ok")
        exact = bytes(range(256)) * 256  # 64 KB: client_body_buffer
        reply = await proxy.request("PUT", "/put", data=exact)  # 1 dropped, then 2
        assert (reply.status, reply.body) == (200, b"ok")
        assert answered == [b"", b"small body", exact]
        assert lone.connections == 3


async def test_a_streamed_body_whose_connection_was_refused_is_retried_whole(
    origin: Origin, make_proxy: MakeProxy, ports: Ports
) -> None:
    """Nothing of a streamed body is read before the connection is up and the head written:
    a refused try read none of it, so the next try sends all of it."""
    origin.route("/big", body=b"done")
    proxy = await make_proxy(config="upstream: {retries: 1, passive: {failures: 0}}\n",
                             upstreams=[ports.url(), origin.url])
    for i in range(2):  # one goes to the refusing upstream first
        reply = await proxy.request("PUT", f"/big?{i}", data=BIG)
        assert (reply.status, reply.body) == (200, b"done")
    assert bodies(origin, "/big") == [BIG, BIG]


async def test_a_streamed_body_partly_sent_is_never_sent_twice(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """An upstream that reads part of a streamed body and resets: that try was the last (the
    part read is gone), the client gets a 502 and no other upstream sees the request."""
    origin.route("/big", body=b"done")
    reset: list[str] = []

    async def read_part_then_reset(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        await conn.reader.readexactly(10_000)
        reset.append(head.split(b" ")[1].decode())
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.writer.transport.abort()

    async with raw_origins() as start:
        partial = await start(read_part_then_reset)
        proxy = await make_proxy(config="upstream: {retries: 1, passive: {failures: 0}}\n",
                                 upstreams=[partial.url, origin.url])
        statuses = {}
        for i in range(2):
            with contextlib.suppress(Exception):  # (the client may see its upload cut short)
                statuses[f"/big?{i}"] = (await proxy.request("PUT", f"/big?{i}", data=BIG)).status
        await asyncio.sleep(0.1)
        assert len(reset) == 1
        sent_twice = reset[0]
        assert statuses.get(sent_twice, 502) == 502
        assert sent_twice not in [s.path for s in origin.seen]  # never sent twice
        assert bodies(origin, "/big") == [BIG]  # the other went to the good upstream first
