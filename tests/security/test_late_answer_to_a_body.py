"""An origin that answers a request without reading its body, keeps the connection, then reads
that body as its next request and answers it later ("CL.0" desync): that late answer must never
be read as the response to another client's request, nor stored.

The request body here is itself a request (``GET /victim``), as an attacker would write it. The
origin answers the upload at once, then owes an answer to the smuggled GET, and sends it when the
next request arrives on the same connection: the worst moment, and a deterministic one. Its
answer (``POISON``) is cacheable: on a connection put back in the pool after the upload, it
answered the next client's ``GET /victim`` and was stored for everyone. A connection that
carried a request body is never reused (``proxy.http_client``, *Request bodies*); a request
without one (a GET, a POST of no bytes) keeps its connection.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import MakeProxy
from tests.harness import Proxy
from tests.security.misbehaving import Conn, raw_origins, response

POISON = response("200 OK", {"Cache-Control": "max-age=600"}, b"POISON")
VICTIM = response("200 OK", {"Cache-Control": "max-age=600"}, b"victim")
CREATED = response("201 Created", {}, b"created")
SMUGGLED = b"GET /victim HTTP/1.1\r\nHost: origin.test\r\n\r\n"
# More than ``SMALL_BODY`` (64 KB): streamed after the head rather than written with it.
LONG = b"GET /victim HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000


async def desyncs(conn: Conn) -> None:
    """Answers ``/upload`` at its head, its body unread; reads that body as its next request (it
    is recorded as one) and answers it (``POISON``) in place of the answer to the request that
    comes after it."""
    owed = False
    while True:
        req = await conn.request(read_body=False)
        if req.target == "/upload" and not owed:
            await conn.send(CREATED)
            await conn.request()  # the body, read as a request: answered after the next one
            owed = True
            continue
        if "content-length" in req.headers:
            await conn.reader.readexactly(int(req.headers["content-length"]))
        await conn.send(POISON if owed else VICTIM)
        owed = False


async def other_clients_get_the_victim(proxy: Proxy, path: str) -> None:
    """Other clients, each on a connection of its own, get the origin's own answer: first a
    fill, then a hit; POISON is never served nor stored."""
    first = await proxy.raw("GET", path)
    assert (first.status, first.body, first.x_cache) == (200, b"victim", "MISS")
    again = await proxy.raw("GET", path)
    assert (again.status, again.body, again.x_cache) == (200, b"victim", "HIT")


@pytest.mark.parametrize(("method", "body"), [("POST", SMUGGLED), ("PUT", SMUGGLED), ("PATCH", SMUGGLED),
                                              ("GET", SMUGGLED), ("POST", LONG)],
                         ids=["POST", "PUT", "PATCH", "GET with a body", "POST of 70 KB"])
async def test_a_late_answer_to_an_unread_body_never_answers_another_client(
    make_proxy: MakeProxy, method: str, body: bytes
) -> None:
    async with raw_origins() as start:
        origin = await start(desyncs)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        upload = await proxy.request(method, "/upload", data=body)
        assert (upload.status, upload.body) == (201, b"created")
        await other_clients_get_the_victim(proxy, "/victim")
        # The GET went on a new connection: the one that carried the body was closed after it.
        assert origin.targets() == [(0, method, "/upload"), (0, "GET", "/victim"), (1, "GET", "/victim")]
        for u in proxy.runtime.pool.upstreams:  # closing it is no failure of the upstream's
            assert (u.passive_failures, u.failures) == (0, 0)


async def test_a_pipelined_get_after_an_upload_gets_its_own_answer(make_proxy: MakeProxy) -> None:
    """One client's POST (whose body the origin does not read) and GET, pipelined on one
    connection; then another client's GET of the same URL."""
    async with raw_origins() as start:
        origin = await start(desyncs)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        address, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(address, int(port))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nContent-Length: %d\r\n\r\n%s"
                     b"GET /victimP HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"
                     % (len(SMUGGLED), SMUGGLED))
        answers = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert b"POISON" not in answers
        created, got = answers.split(b"HTTP/1.1 ")[1:]
        assert created.startswith(b"201 ") and created.endswith(b"\r\n\r\ncreated")
        assert got.startswith(b"200 ") and got.endswith(b"\r\n\r\nvictim")
        other = await proxy.raw("GET", "/victimP", host="shop.test")
        assert (other.body, other.x_cache) == (b"victim", "HIT")
        assert origin.connections == 2


async def test_bodies_the_origin_reads_are_answered_and_only_they_cost_a_connection(
    make_proxy: MakeProxy
) -> None:
    """A well-behaved origin: every answer is relayed; a request with a body is followed by a
    new connection, and requests without one (GETs, a POST of no bytes) reuse theirs."""

    async def serve(conn: Conn) -> None:
        while True:
            req = await conn.request()  # (reads the body)
            await conn.send(CREATED if req.method == "POST" else VICTIM)

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        for method, path, data, expected in [
            ("GET", "/a", None, b"victim"), ("GET", "/b", None, b"victim"),
            ("POST", "/form", b"x=1", b"created"),
            ("GET", "/c", None, b"victim"), ("POST", "/empty", None, b"created"),
            ("GET", "/d", None, b"victim"),
        ]:
            reply = await proxy.request(method, path, data=data)
            assert reply.body == expected
        assert origin.targets() == [
            (0, "GET", "/a"), (0, "GET", "/b"), (0, "POST", "/form"),
            (1, "GET", "/c"), (1, "POST", "/empty"), (1, "GET", "/d"),
        ]
        assert origin.connections == 2


def waiting_ports_toward(port: int) -> int:
    """This machine's connections in TIME_WAIT whose far end is ``port`` on loopback: the
    closing side's ports, unusable for 60 s (``/proc/net/tcp``; state 06)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[3] == "06" and int(row[2].split(":")[1], 16) == port)


async def test_a_connection_closed_after_a_body_leaves_no_port_waiting_on_this_side(
    make_proxy: MakeProxy
) -> None:
    """Closed gracefully by cachegate, each connection that carried a body left its local port in
    TIME_WAIT for 60 s: 470 POSTs a second to one origin address used up the 28,000 ports, and
    every request after was a 502 ("Cannot assign requested address"). The request says
    ``Connection: close`` and the connection is closed with a reset: no port waits here, even
    with an origin that ignores the ``close`` and keeps its end open (this one)."""
    seen: list[tuple[str, str | None]] = []

    async def serve(conn: Conn) -> None:
        while True:
            req = await conn.request()  # (reads the body)
            seen.append((req.method, req.headers.get("connection")))
            await conn.send(CREATED if req.method == "POST" else VICTIM)

    async with raw_origins() as start:
        origin = await start(serve)
        port = int(origin.url.rsplit(":", 1)[1].rstrip("/"))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        assert (await proxy.request("GET", "/a")).body == b"victim"
        before = waiting_ports_toward(port)
        for i in range(20):
            reply = await proxy.request("POST", f"/form{i}", data=b"x=1")
            assert reply.body == b"created"
        assert (await proxy.request("GET", "/b")).body == b"victim"
        assert waiting_ports_toward(port) == before  # (0 but for another test's, on a shared machine)
        assert seen == [("GET", None), *[("POST", "close")] * 20, ("GET", None)]
        assert origin.connections == 21  # (the first POST on the GET's connection)
