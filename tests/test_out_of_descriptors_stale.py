"""Out of file descriptors under stale-if-error is still cachegate's own failure, never told
as the origin's: the stale response says ``detail=PROXY-ERROR`` (not ``ORIGIN-UNREACHABLE``),
a stored response that may not be served stale (``must-revalidate``) is answered as a miss is
(503 "cachegate ran out of file descriptors", not 504 "origin unreachable"), and the log holds
the pool's one warning for the streak, not one "upstream failed, stale response served" per
request. The proxy runs in this test process, whose open-files limit is lowered meanwhile
(``tests.test_out_of_descriptors.no_new_descriptors``)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import MakeProxy, clocked
from tests.harness import Clock, Origin
from tests.security.util import port_of
from tests.test_out_of_descriptors import CONFIG, no_new_descriptors


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET on a keep-alive connection opened before the limit: status, fields, body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 10)
    return int(lines[0].split(" ")[1]), fields, body


async def test_out_of_descriptors_under_stale_if_error_is_cachegates_failure_not_the_origins(
        make_proxy: MakeProxy, origin: Origin, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    origin.route("/healthz", body=b"ok")
    origin.route("/sie", body=b"stored sie", headers={"Cache-Control": "max-age=1, stale-if-error=600", "Connection": "close"})
    origin.route("/mr", body=b"stored mr", headers={"Cache-Control": "max-age=1, must-revalidate", "Connection": "close"})
    proxy = await clocked(make_proxy, clock, config=CONFIG)
    upstream = proxy.runtime.pool.upstreams[0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    caplog.set_level(logging.DEBUG, logger="cachegate")
    try:
        for path in ("/sie", "/mr"):
            assert (await ask(reader, writer, path))[0] == 200
        clock.advance(10)  # both stale now
        checks = upstream.check_successes  # (as in test_out_of_descriptors: just after a check)
        for _ in range(200):
            if upstream.check_successes > checks:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        with no_new_descriptors():
            stale = [await ask(reader, writer, "/sie") for _ in range(4)]
            prohibited = [await ask(reader, writer, "/mr") for _ in range(2)]
    finally:
        writer.close()
    for status, fields, body in stale:
        assert (status, body) == (200, b"stored sie"), (status, fields, body)
        status_field = fields["cache-status"]
        assert "fwd=stale;" in status_field and status_field.endswith("; detail=PROXY-ERROR"), fields
    for status, fields, body in prohibited:
        assert status == 503, (status, fields, body)
        assert body.startswith(b"503 Service Unavailable: cachegate ran out of file descriptors"), body
        assert "detail=PROXY-ERROR" in fields["cache-status"], fields
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any(w.startswith("upstream failed") for w in warnings), warnings
    streak = [w for w in warnings if w.startswith("opening a connection to an upstream failed")]
    assert len(streak) == 1, warnings
