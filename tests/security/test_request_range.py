"""No request carries ``Request-Range`` to the origin: passed through, it took an upstream out.

``Request-Range`` is the pre-standard spelling of ``Range`` (Netscape's) that Apache httpd's
byterange filter still honours. A fill dropped it, but a request passed through (a rule's
``bypass``, another method) forwarded it: such an origin answered ``206`` to what was, for
cachegate (which reads only ``Range``, as nginx and Varnish do), a request without ``Range``,
an invalid response: a 502 for the client and a passive failure of the upstream, which every
client shares. With two upstreams and ``passive.failures: 1`` one such request took one of
them out for the cool-down. Dropped, the client gets the whole 200. The origins are raw
asyncio servers that read ranges as Apache does.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import MakeProxy
from tests.security.misbehaving import Conn, raw_origins, response

BODY = bytes(range(256)) * 8
RULES = "rules:\n  - {name: passed, match: {path: /passed/**}, bypass: true}\n"
PASSIVE = "upstream: {passive: {failures: 1, cooldown: 30s}, retries: 0}\n"


async def apache(conn: Conn) -> None:
    """``Range``, or else ``Request-Range``, answered with a 206 as Apache's byterange filter does."""
    while True:
        request = await conn.request()
        asked = request.headers.get("range") or request.headers.get("request-range")
        if asked is not None and asked.startswith("bytes="):
            first, _, last = asked[6:].partition("-")
            end = int(last) if last else len(BODY) - 1
            await conn.send(response("206 Partial Content", {
                "Content-Range": f"bytes {first}-{end}/{len(BODY)}", "Cache-Control": "no-store"},
                BODY[int(first):end + 1]))
        else:
            await conn.send(response("200 OK", {"Cache-Control": "no-store", "Accept-Ranges": "bytes"}, BODY))


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_passed_request_never_forwards_request_range(make_proxy: MakeProxy, method: str) -> None:
    async with raw_origins() as start:
        a, b = await start(apache), await start(apache)
        proxy = await make_proxy(config=PASSIVE, rules=RULES, upstreams=[a.url, b.url])
        for i in range(2):  # one to each upstream (round robin)
            reply = await proxy.request(method, f"/passed/file.bin?{i}", headers={"Request-Range": "bytes=0-0"})
            assert (reply.status, reply.body) == (200, BODY), reply
        seen = [r for origin in (a, b) for _, r in origin.requests]
        assert len(seen) == 2 and not any("request-range" in r.headers for r in seen)
        pool = proxy.runtime.pool
        assert [(u.available(time.monotonic()), u.passive_failures) for u in pool.upstreams] == [(True, 0)] * 2
        # Every other client is answered by both upstreams, as before; Range itself still passes.
        replies = [await proxy.get(f"/passed/other?{i}") for i in range(4)]
        assert [r.status for r in replies] == [200] * 4
        assert all(any(r.target.startswith("/passed/other") for _, r in o.requests) for o in (a, b))
        ranged = await proxy.get("/passed/file.bin", headers={"Range": "bytes=2-5"})
        assert (ranged.status, ranged.body) == (206, BODY[2:6])
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        protocol = [line for line in metrics.splitlines() if 'kind="protocol"' in line and not line.startswith("#")]
        assert protocol and all(line.endswith(" 0.0") for line in protocol), protocol  # (exported at 0)
