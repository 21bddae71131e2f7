"""How a client connection ends, on both paths (the fast hit path, and a listener without it),
with raw sockets against a running cachegate: a head left unfinished behind pipelined requests
is timed (``client_header_timeout``), a client that half-closes its side gets every answer
before the close, and a request aiohttp's parser refuses is answered after the requests before
it, in order, framed in the client's version and without echoing its bytes."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.test_fastpath import Pair, pair, req

# Every read below is bounded only so that a test fails rather than hangs; none measures speed.
HANG = 20.0  # well above client_header_timeout (1 s here), well below the keep-alive timeout (75 s)


def answers(data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """The responses in ``data`` (answers to GETs and POSTs: framed by Content-Length), in order;
    bytes that are not a whole response fail the test."""
    out = []
    rest = data
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        length = int(fields["content-length"])
        assert len(rest) >= length, data
        out.append((lines[0], fields, rest[:length]))
        rest = rest[length:]
    return out


async def until_eof(port: int, data: bytes, half_close: bool = False) -> bytes:
    """Send ``data`` (then shut the sending side, ``half_close``); every byte the server sends,
    up to its close (the test fails if it does not close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()  # shutdown(SHUT_WR)
        return await asyncio.wait_for(reader.read(), HANG)
    finally:
        writer.close()


async def proxies(origin: Origin, make_proxy: MakeProxy, config: str = "") -> Pair:
    cc = {"Cache-Control": "max-age=300"}
    origin.route("/hit", body=b"h" * 100, headers=cc)
    origin.route("/a", body=b"a", headers=cc)
    origin.route("/b", body=b"b", headers=cc)
    origin.route("/m", body=b"m", headers=cc)  # a miss for each query

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=b"got " + await request.read())

    origin.route("/post", echo)
    p = await pair(make_proxy, config=config)
    for path in ("/hit", "/a", "/b"):
        got = answers(await until_eof(p.general_port, req("GET", path, "Connection: close")))
        assert [a[0] for a in got] == ["HTTP/1.1 200 OK"]
    await asyncio.sleep(0.1)
    await p.proxy.runtime.storage.flush()
    return p


PARTIAL = b"GET /hit HTTP/1.1\r\nHost: example.test\r\nX-Slow: "  # a head never finished


async def test_a_head_begun_behind_pipelined_requests_is_timed(origin: Origin, make_proxy: MakeProxy) -> None:
    """With ``client_header_timeout``, the start of a head that came in the same read as a whole
    request (a hit, a miss, a miss whose fill outlasts the timeout) closes the connection once
    the requests before it are answered and the head is still not whole; before, only the
    keep-alive timer (75 s) ended it."""
    origin.route("/slow", body=b"s", headers={"Cache-Control": "max-age=300"}, delay=2.0)  # > 1 s
    p = await proxies(origin, make_proxy, "client_header_timeout: 1s\n")
    answered_before = p.fast.answered

    async def case(port: int, first: bytes, body: bytes) -> None:
        got = answers(await until_eof(port, first + PARTIAL))  # (the server must close it)
        assert [(a[0], a[1].get("connection"), a[2]) for a in got] == [("HTTP/1.1 200 OK", None, body)], \
            (port, first)

    # Each case on its own connection, all at once: each waits out its own timer.
    await asyncio.gather(*(case(port, first, body) for port in (p.fast_port, p.general_port)
                           for first, body in ((req("GET", "/hit"), b"h" * 100), (req("GET", f"/m?{port}"), b"m"),
                                               (req("GET", f"/slow?{port}"), b"s"))))
    assert p.fast.answered == answered_before + 1  # the hit on the fast listener, on the fast path
    assert origin.count("/slow") == 2


async def test_a_kept_alive_connection_is_not_closed_by_the_head_timer(origin: Origin,
                                                                      make_proxy: MakeProxy) -> None:
    """The head timer is for heads: a connection that only waits between requests (after a
    hit, a miss, a POST whose body came in several reads) is the keep-alive timer's."""
    p = await proxies(origin, make_proxy, "client_header_timeout: 1s\n")
    post = b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 4\r\n\r\nab"

    async def one_connection(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for pieces, body in (([req("GET", "/hit")], b"h" * 100), ([req("GET", f"/m?ka{port}")], b"m"),
                                 ([post, b"c", b"d"], b"got abcd")):
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.1)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG)
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert await asyncio.wait_for(reader.readexactly(length), HANG) == body
                await asyncio.sleep(2.5)  # more than client_header_timeout: the connection stays open
                assert not reader.at_eof(), (port, pieces)
        finally:
            writer.close()

    # The two listeners' connections at once (each still waits after each of its requests).
    await asyncio.gather(one_connection(p.fast_port), one_connection(p.general_port))


async def test_a_half_closed_client_gets_every_answer_then_the_close(origin: Origin,
                                                                    make_proxy: MakeProxy) -> None:
    """A client that sends its requests and shuts its sending side (RFC 9112 §9.6: a half-close
    is not a close) is answered, misses too, in order, and then the connection closes; before,
    only a fast hit was (a miss was fetched and stored, its answer dropped)."""
    origin.route("/fill", body=b"f", headers={"Cache-Control": "max-age=300"}, delay=1.0)
    p = await proxies(origin, make_proxy)
    hit, ok, ok10 = b"h" * 100, "HTTP/1.1 200 OK", "HTTP/1.0 200 OK"
    post = b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nab"
    for port in (p.fast_port, p.general_port):
        cases = [
            (req("GET", "/hit"), [(ok, hit)]),
            (req("GET", f"/m?1-{port}"), [(ok, b"m")]),
            (req("GET", f"/m?2-{port}", "Connection: close"), [(ok, b"m")]),
            (req("GET", f"/m?3-{port}", version="1.0"), [(ok10, b"m")]),
            (req("GET", f"/m?4-{port}") + req("GET", "/hit"), [(ok, b"m"), (ok, hit)]),
            (req("GET", "/hit") + req("GET", f"/m?5-{port}"), [(ok, hit), (ok, b"m")]),
            (req("GET", f"/fill?{port}"), [(ok, b"f")]),  # half-closed while the origin is asked
            (post + req("GET", "/a"), [(ok, b"got ab"), (ok, b"a")]),
        ]
        for request, want in cases:
            got = answers(await until_eof(port, request, half_close=True))  # (to the close)
            assert [(a[0], a[2]) for a in got] == want, (port, request)
        # nothing to answer (a head never finished, or nothing at all): closed at once
        assert await until_eof(port, PARTIAL, half_close=True) == b""
        assert await until_eof(port, b"", half_close=True) == b""
        # a request whose body can never come whole now: closed at once too, not held open
        # (CLOSE-WAIT) until client_body_timeout (60 s, past HANG)
        never = b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 10\r\n\r\n"
        for _ in range(5):  # (the half-close lands at one moment or another of the request's start)
            assert b"200 OK" not in await until_eof(port, never, half_close=True)
    assert origin.count("/fill") == 2 and origin.count("/post") == 2
    assert origin.count("/m") == 10


# (requests before the refused one, their bodies, the refused request, the reason in the 400;
# what the log line adds: the field's name, or the request line's method and path)
REFUSED = {
    "duplicate Host behind two hits": (
        req("GET", "/a") + req("GET", "/b"), [b"a", b"b"],
        b"GET /x HTTP/1.1\r\nHost: example.test\r\nHost: other.test\r\n\r\n", b"duplicate Host header", ""),
    "obs-fold behind a miss": (
        req("GET", "/m?fold"), [b"m"], b"GET /x HTTP/1.1\r\nHost: example.test\r\nX: a\r\n b\r\n\r\n",
        b"folded header line", ""),
    "a bad field name behind a POST": (
        b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nab", [b"got ab"],
        b"GET /x HTTP/1.1\r\nHo st: x\r\n\r\n", b"invalid character in a header field name", ""),
    "a method that is not a token, behind a hit": (
        req("GET", "/a"), [b"a"], b"P@ST /y?tok=SECRET2 HTTP/1.1\r\nHost: example.test\r\nCookie: c=SECRET3\r\n\r\n",
        b"invalid request line", " (P@ST /y)"),
    "a method that is not a token, alone": (
        b"", [], b"G@T /account?session=SECRET123 HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"invalid request line", " (G@T /account)"),
    "a control character in a Cookie, alone": (
        b"", [], b"GET /x HTTP/1.1\r\nHost: example.test\r\nCookie: session=SECRET123\x01\r\n\r\n",
        b"invalid character in a header field value", " (in the Cookie field)"),
    "a bare CR in an Authorization, behind a hit": (
        req("GET", "/a"), [b"a"], b"GET /x HTTP/1.1\r\nHost: example.test\r\nAuthorization: Bearer SECRET4\rx\r\n\r\n",
        b"bad line ending", " (in the Authorization field)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_request_the_parser_refuses_is_answered_after_the_ones_before_it(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture, case: str) -> None:
    """RFC 9112 §9.3.2: responses come in the order of the requests. aiohttp's parser refused the
    whole read, and a lone 400 went out (which the client takes for the first request's answer),
    labelled HTTP/1.0 and quoting the refused line (a Cookie's value, say). The log line says what
    was wrong and where (a field's name, a request line's method and path), never a value: it
    quoted the parser's message, a Cookie's value or a query's token with it."""
    caplog.set_level(logging.DEBUG)
    before, bodies, refused, reason, where = REFUSED[case]
    p = await proxies(origin, make_proxy)
    for port in (p.fast_port, p.general_port):
        data = await until_eof(port, before + refused)
        got = answers(data)
        assert [a[0] for a in got] == ["HTTP/1.1 200 OK"] * len(bodies) + ["HTTP/1.1 400 Bad Request"], (port, data)
        assert [a[2] for a in got[:-1]] == bodies
        _, fields, body = got[-1]
        assert fields["connection"] == "close"
        assert body.startswith(b"400 Bad Request: malformed request: " + reason)
        assert b"SECRET" not in data and b"example.test" not in body
    logged = [r.getMessage() for r in caplog.records]
    assert not [line for line in logged if "SECRET" in line]
    said = [line for line in logged if f"malformed request: {reason.decode()}" in line]
    assert said and all(line.endswith(where) for line in said), logged
    assert origin.count("/post") == (2 if "POST" in case else 0)


async def test_a_refusal_after_answers_of_the_general_path_is_still_answered_in_order(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The read is parsed again when the connection's parser stands between two requests, also
    after requests the general path answered (a miss: only a connection's first read, or one
    after fast hits, were), and after a POST whose body came whole with its head: the GET before
    the refused request is answered, then the 400."""
    p = await proxies(origin, make_proxy)
    bad = b"GET /x HTTP/1.1\r\nHost: example.test\r\nHost: other.test\r\n\r\n"
    post = b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nab"
    for port in (p.fast_port, p.general_port):
        # a miss; a POST whose body came whole in its head's read, then a hit
        for firsts in ([(req("GET", f"/m?general-{port}"), b"m")], [(post, b"got ab"), (req("GET", "/hit"), b"h" * 100)]):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                for first, body in firsts:
                    writer.write(first)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG)
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    assert await asyncio.wait_for(reader.readexactly(length), HANG) == body
                    await asyncio.sleep(0.1)  # (the connection idle again, between two requests)
                writer.write(req("GET", "/a") + bad)
                data = await asyncio.wait_for(reader.read(), HANG)
            finally:
                writer.close()
            got = answers(data)
            assert [(a[0], a[2][:3]) for a in got] == [("HTTP/1.1 200 OK", b"a"),
                                                       ("HTTP/1.1 400 Bad Request", b"400")], (port, data)


async def test_a_refusal_to_a_1_0_client_is_in_1_0(origin: Origin, make_proxy: MakeProxy) -> None:
    p = await proxies(origin, make_proxy)
    for port in (p.fast_port, p.general_port):
        data = await until_eof(port, req("GET", "/a", "Connection: keep-alive", version="1.0")
                               + b"GET /x HTTP/1.0\r\nHost: example.test\r\nCookie: s=SECRET\x01\r\n\r\n")
        got = answers(data)
        assert [a[0] for a in got] == ["HTTP/1.0 200 OK", "HTTP/1.0 400 Bad Request"], (port, data)
        assert got[0][2] == b"a" and b"SECRET" not in data


@pytest.mark.parametrize("connection", ["keep-alive, close", "close, keep-alive", "Keep-Alive, CLOSE"])
async def test_a_1_0_request_asking_to_close_beside_keep_alive_ends_the_connection(
        origin: Origin, make_proxy: MakeProxy, connection: str) -> None:
    """``close`` wins over ``keep-alive`` (RFC 9112 §9.3), for HTTP/1.0 too: llhttp reads
    ``close`` for HTTP/1.1 only, and what was pipelined behind such a request was answered (a
    hit on the fast path, a miss or a POST on the general path)."""
    p = await proxies(origin, make_proxy)
    for port in (p.fast_port, p.general_port):
        for path in ("/hit", "/m?1" if port == p.fast_port else "/m?2"):
            data = await until_eof(port, req("GET", path, f"Connection: {connection}", version="1.0")
                                   + req("GET", "/a", "Connection: keep-alive", version="1.0"))
            got = answers(data)
            assert [a[0] for a in got] == ["HTTP/1.0 200 OK"], (port, path, data)
            assert got[0][1].get("connection", "close").lower() != "keep-alive", (port, path, data)


async def test_more_pipelined_requests_than_aiohttp_queues_then_a_half_close_or_a_partial_head(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """aiohttp's parser stops after 32 queued requests and reading pauses: the EOF of a half-close
    is seen once reading resumes, and every request is still answered before the close; an
    unfinished head behind them is timed once they are answered."""
    p = await proxies(origin, make_proxy, "client_header_timeout: 1s\n")
    n = 40
    for port in (p.fast_port, p.general_port):
        batch = b"".join(req("GET", f"/m?{port}-{i}") if i % 3 else req("GET", "/hit") for i in range(n))
        got = answers(await until_eof(port, batch, half_close=True))
        assert [a[2] for a in got] == [b"m" if i % 3 else b"h" * 100 for i in range(n)], port
        batch = b"".join(req("GET", f"/m?{port}-{i}") for i in range(n))
        got = answers(await until_eof(port, batch + PARTIAL))
        assert [a[2] for a in got] == [b"m"] * n, port


async def until_eof_in_pieces(port: int, pieces: tuple[bytes, ...]) -> bytes:
    """``until_eof`` with ``pieces`` written a moment apart (each in a read of its own)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.15)
            writer.write(piece)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), HANG)
    finally:
        writer.close()


SIMPLE = b"GET /a\r\n"  # HTTP/0.9: the line, then the client waits
# (the reads, the bodies of the answers before the 400)
SIMPLE_REQUESTS = {
    "alone": ((SIMPLE,), []),
    "in pieces, after an empty line": ((b"\r\nGE", b"T /", b"a\r", b"\n"), []),
    "behind a hit, in its read": ((req("GET", "/a") + SIMPLE,), [b"a"]),
    "behind a hit, in a read of its own": ((req("GET", "/a"), SIMPLE), [b"a"]),
    "behind a miss": ((req("GET", "/m?h09-{port}"), SIMPLE), [b"m"]),
    "behind a POST and a hit": ((b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nab",
                                 req("GET", "/a"), SIMPLE), [b"got ab", b"a"]),
}


@pytest.mark.parametrize("case", list(SIMPLE_REQUESTS))
async def test_an_http_0_9_request_is_refused_at_the_end_of_its_line(
        origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    """An HTTP/0.9 client sends its request line alone and waits: the parser took it for a head
    still to come, and the client got nothing until client_header_timeout (60 s, past HANG)
    closed the connection. Now the 400 comes once the line has ended, after the answers to the
    requests before it, and the connection closes."""
    pieces, bodies = SIMPLE_REQUESTS[case]
    p = await proxies(origin, make_proxy)
    for port in (p.fast_port, p.general_port):
        data = await until_eof_in_pieces(port, tuple(x.replace(b"{port}", str(port).encode()) for x in pieces))
        got = answers(data)
        assert [a[0] for a in got] == ["HTTP/1.1 200 OK"] * len(bodies) + ["HTTP/1.1 400 Bad Request"], (port, data)
        assert [a[2] for a in got[:-1]] == bodies
        assert got[-1][1]["connection"] == "close"
        assert got[-1][2] == b"400 Bad Request: malformed request: HTTP/0.9 request (a request line without a version)\n"


SLOW_HEADS = {
    "the version in the next read": ((b"GET /a HT", b"TP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"),
                                     [b"a"]),
    "the space before it in the next read": ((b"GET /a", b" HTTP/1.1\r\nHost: example.test\r\n" + b"Connection: close\r\n\r\n"),
                                             [b"a"]),
    # a field's value that looks like a simple request line, read after a POST's body
    "a field split after a POST's body": (
        (b"POST /post HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nab" + b"GET /a HTTP/1.1\r\nX-A: ",
         b"bc d\r\nHost: example.test\r\nConnection: close\r\n\r\n"), [b"got ab", b"a"]),
    "a field split after a hit": ((req("GET", "/a") + b"GET /a HTTP/1.1\r\nX-A: ",
                                   b"bc d\r\nHost: example.test\r\nConnection: close\r\n\r\n"), [b"a", b"a"]),
}


@pytest.mark.parametrize("case", list(SLOW_HEADS))
async def test_a_head_in_pieces_with_a_version_is_answered(origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    """What the HTTP/0.9 check must leave alone: a request line whose version comes in a later
    read, and field lines read on their own."""
    pieces, bodies = SLOW_HEADS[case]
    p = await proxies(origin, make_proxy)
    for port in (p.fast_port, p.general_port):
        got = answers(await until_eof_in_pieces(port, pieces))
        assert [(a[0], a[2]) for a in got] == [("HTTP/1.1 200 OK", b) for b in bodies], port


async def test_a_request_the_admin_parser_refuses_is_logged_without_its_values(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """The admin listener's line about a request its parser refused quoted the refused line: the
    admin token of a malformed Authorization (at DEBUG). Now the field's name, not its value."""
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy()
    port = proxy.listeners.admin_addresses[0][1]
    data = await until_eof(port, b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"Authorization: Bearer SECRET5\x01\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data
    logged = [r.getMessage() for r in caplog.records]
    assert not [line for line in logged if "SECRET" in line]
    assert [line for line in logged if line.endswith(
        "malformed request: invalid character in a header field value (in the Authorization field)")], logged


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
ADMIN_SIMPLE = b"GET /stats\r\n"
# (the reads, how many answers come before the 400; None: no 400, the head is whole in the end)
ADMIN_HEADS = {
    "alone": ((ADMIN_SIMPLE,), 0),
    "in pieces, after an empty line": ((b"\r\nGE", b"T /st", b"ats\r", b"\n"), 0),
    "behind a request, in its read": ((HEALTHZ + ADMIN_SIMPLE,), 1),
    "behind a request, in a read of its own": ((HEALTHZ, ADMIN_SIMPLE), 1),
    "the version in the next read": ((b"GET /healthz HT", b"TP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
                                     None),
    "a field split after a request": ((HEALTHZ + b"GET /healthz HTTP/1.1\r\nX-A: ",
                                       b"bc d\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), None),
}


@pytest.mark.parametrize("case", list(ADMIN_HEADS))
async def test_the_admin_listener_refuses_an_http_0_9_request_at_the_end_of_its_line(
        origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    """The admin listener held ``GET /stats`` CRLF (an HTTP/0.9 request, whose client then waits)
    until client_header_timeout (60 s) with nothing sent; the client listener answers 400 at
    once. Now the same check (``HeadTimedHandler.first_line``) on the admin listener: the 400
    after the answers before it, and the connection closes. A head merely slow to arrive is
    still answered."""
    proxy = await make_proxy()
    port = proxy.listeners.admin_addresses[0][1]
    pieces, before = ADMIN_HEADS[case]
    data = await until_eof_in_pieces(port, pieces)
    got = answers(data)
    if before is None:
        assert [a[0] for a in got] == ["HTTP/1.1 200 OK"] * (len(got)), data
        assert len(got) == 1 + (b"X-A" in pieces[0])
        return
    assert [a[0] for a in got] == ["HTTP/1.1 200 OK"] * before + ["HTTP/1.1 400 Bad Request"], data
    assert got[-1][1]["connection"] == "close"
    assert b"HTTP/0.9" in got[-1][2]
