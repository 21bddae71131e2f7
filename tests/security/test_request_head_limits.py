"""What a request head may be, checked against the bytes as they arrive, on both paths (the fast
hit path, and a listener without it), over raw sockets.

- A host that yarl cannot decode (an IDNA label such as ``xn--``: the reg-name grammar admits
  it) is 400 and the connection closes, in an absolute-form target as in the Host field. Such a
  target used to make aiohttp's request factory raise where nothing caught it: no answer,
  nothing logged, the connection left open for good (client_header_timeout and keep-alive no
  longer applied) and the requests pipelined behind it never answered.
- ``max_request_head`` bounds the raw bytes of one head as they arrive, as nginx's header
  buffers do: a head that passes it is refused with 431 before it is whole (it used to be
  buffered up to the parser's own limits, about 1 MB a connection, and checked only once
  whole), whitespace the parser strips included (a head padded with it used to be answered);
  heads pipelined in one read are counted one by one, and a body is not head bytes.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.test_fastpath import Pair, pair, req

HOST = "example.test"


async def stored(origin: Origin, make_proxy: MakeProxy, config: str = "") -> Pair:
    """Both listeners, with /p stored (so that the fast path would answer it)."""
    origin.route("/p", body=b"page", headers={"Cache-Control": "max-age=300"})
    p = await pair(make_proxy, config=config) if config else await pair(make_proxy)
    got = await until_close(p.fast_port, req("GET", "/p", "Connection: close"))
    assert got.startswith(b"HTTP/1.1 200 "), got
    assert origin.count("/p") == 1
    return p


async def until_close(port: int, *pieces: bytes, pause: float = 0.0) -> bytes:
    """Send ``pieces`` on a new connection, then read every byte the server sends up to its close
    (the test fails if it does not close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def statuses(data: bytes) -> list[bytes]:
    """The status lines of the answers in ``data`` (bodies here never hold one)."""
    return re.findall(rb"HTTP/1\.[01] [0-9]{3} [^\r]*", data)


BAD_TARGETS = {
    "xn--": req("GET", "http://xn--/p"),
    "xn--a": req("GET", "http://xn--a/p"),
    "a.xn--": req("GET", "http://a.xn--/p"),
    "xn--zz-": req("GET", "http://xn--zz-/p"),
    "Host: xn--": req("GET", "/p", host="xn--"),
    "Host: a.xn--:80": req("GET", "/p", host="a.xn--:80"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
async def test_a_host_that_does_not_decode_is_400_and_the_connection_closes(
        origin: Origin, make_proxy: MakeProxy, case: str) -> None:
    p = await stored(origin, make_proxy)
    for port in (p.fast_port, p.general_port):
        # a stored page's request pipelined behind it: never answered (the connection closes)
        got = await until_close(port, BAD_TARGETS[case] + req("GET", "/p"))
        assert statuses(got) == [b"HTTP/1.0 400 Bad Request"] or statuses(got) == [
            b"HTTP/1.1 400 Bad Request"], (port, got)
    assert origin.count("/p") == 1  # nothing forwarded
