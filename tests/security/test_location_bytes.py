"""An unsafe request's Location with a byte that is not UTF-8, or that is no URL (RFC 9111 §4.4): the
target URI is invalidated all the same, and the Location as a client follows it (the byte
percent-encoded).
A real origin writes the raw bytes; the proxy is the real one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import start_proxy
from tests.security.misbehaving import Conn, raw_origins, response

HOST = "h.test"


@pytest.mark.parametrize(("location", "followed"), [(b"/new\xff", "/new%FF"), (b"http://[x/new", None)])
async def test_a_location_that_is_not_utf8_or_no_url_neither_keeps_the_target_nor_itself_stored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, location: bytes, followed: str | None) -> None:
    served = [0]

    async def serve(conn: Conn) -> None:
        while True:
            req = await conn.request()
            if req.method == "POST":
                head = b"HTTP/1.1 201 Created\r\nLocation: " + location + b"\r\nContent-Length: 2\r\n\r\nok"
                await conn.send(head)
            else:
                served[0] += 1
                await conn.send(response("200 OK", {"Cache-Control": "max-age=300"}, f"v{served[0]}".encode()))

    async with raw_origins() as start:
        origin = await start(serve)
        proxy = await start_proxy(str(tmp_path), origin.url)
        try:
            paths = ["/item", *([followed] if followed else [])]
            for path in paths:
                await proxy.get(path, headers={"Host": HOST})
                assert (await proxy.get(path, headers={"Host": HOST})).x_cache == "HIT"
            async with proxy.session.post(proxy.url + "/item", data=b"x", headers={"Host": HOST},
                                          allow_redirects=False) as resp:
                assert resp.status == 201
            for path in paths:
                r = await proxy.get(path, headers={"Host": HOST})
                assert r.x_cache != "HIT", (path, r.x_cache)
            assert "invalidation of" not in caplog.text
        finally:
            await proxy.session.close()
            await proxy.close()
