"""An admin request whose body has a Content-Encoding is refused 415, as any other refusal.

The admin listener decoded gzip/deflate bodies (aiohttp's default): a body that did not decode
was a 500 "internal error" with a traceback in the log, from anyone who reached the listener
(the console's login is public), outside the refusal budget; ``br`` was a 400 "please install
Brotli" as HTTP/1.0. The listener now reads a body as sent and refuses one with a
Content-Encoding (a valid gzip of valid JSON too: the admin API takes plain JSON).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib

import pytest

from tests.admin.test_admin_answers import TOKEN, admin_lines
from tests.admin.util import js
from tests.conftest import MakeProxy
from tests.harness import Proxy

AUTH = {"Authorization": f"Bearer {TOKEN}"}
VALID_GZIP = gzip.compress(b'{"all": true}', mtime=0)


def refusal(coding: str) -> dict[str, str]:
    return {"error": f"the admin API takes no Content-Encoding: {coding}: send the body as it is "
                     "(JSON, no Content-Encoding field)"}


@pytest.fixture
async def locked(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")


def metric(text: str, reason: str) -> float:
    line = f'cachegate_admin_refused_total{{reason="{reason}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


@pytest.mark.parametrize(("path", "auth"), [
    ("/purge", True), ("/reload", True), ("/explain", True), ("/console/api/login", False),
])
async def test_an_encoded_admin_body_is_a_415_and_logged_as_a_refusal(
        locked: Proxy, caplog: pytest.LogCaptureFixture, path: str, auth: bool) -> None:
    caplog.set_level(logging.INFO, logger="cachegate")
    cases = [("gzip", b"not compressed"), ("deflate", b"not compressed"), ("br", b"not compressed"),
             ("gzip", VALID_GZIP), ("deflate", zlib.compress(b"{}")), ("identity, gzip", VALID_GZIP)]
    for coding, body in cases:
        reply = await locked.admin("POST", path, data=body,
                                   headers={"Content-Encoding": coding, **(AUTH if auth else {})})
        assert (reply.status, js(reply)) == (415, refusal(coding)), (coding, reply.body)
        # What the API takes instead (RFC 9110 §12.5.3: a 415 for a content coding says it).
        assert reply.headers.getall("Accept-Encoding", []) == ["identity"], (coding, reply.headers)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    lines = admin_lines(caplog)
    assert len(lines) == len(cases) and all(level == logging.WARNING for level, _ in lines), lines
    assert lines[0][1] == (f"admin POST {path} from 127.0.0.1 refused: 415 " + refusal("gzip")["error"])
    metrics = (await locked.admin("GET", "/metrics", headers=AUTH)).body.decode()
    assert metric(metrics, "content_encoding") == len(cases)
    assert "cachegate_admin_unauthorized_total 0.0" in metrics  # no token was compared and found wrong


async def test_identity_is_no_encoding(locked: Proxy) -> None:
    reply = await locked.admin("POST", "/reload", data=b"{}", headers={"Content-Encoding": "identity", **AUTH})
    assert reply.status in (200, 501), reply.body  # (501: a config given as text, not a file)
    reply = await locked.admin("POST", "/console/api/login", data=json.dumps({"token": TOKEN}),
                               headers={"Content-Encoding": "identity"})
    assert reply.status == 200, reply.body


async def test_wrong_tokens_with_an_encoded_body_are_still_counted_as_guesses(locked: Proxy) -> None:
    """The wrong-token limit applies before the body is looked at: encoded bodies are no way
    around it."""
    wrong = {"Authorization": "Bearer wrong-token-wrong-token", "Content-Encoding": "gzip"}
    statuses = [(await locked.admin("POST", "/purge", data=b"x", headers=wrong)).status for _ in range(12)]
    assert statuses[:10] == [415] * 10 and statuses[10:] == [429, 429], statuses
    reply = await locked.admin("POST", "/purge", data=b"x", headers={**AUTH, "Content-Encoding": "gzip"})
    assert reply.status == 429  # the right token waits too while the bucket is empty


async def test_without_a_token_an_encoded_body_is_a_415_too(
        proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cachegate")
    reply = await proxy.admin("POST", "/purge", data=b"garbage", headers={"Content-Encoding": "deflate"})
    assert (reply.status, js(reply)) == (415, refusal("deflate"))
    assert reply.headers.get("Accept-Encoding") == "identity"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_brotli_is_the_same_415(locked: Proxy) -> None:
    """It was a 400 "please install Brotli" from the parser, answered as HTTP/1.0 to HTTP/1.1."""
    host, port = locked.admin_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b"not compressed"
    writer.write(b"POST /console/api/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Encoding: br\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 415 "), head
    assert b"\r\naccept-encoding: identity\r\n" in head.lower(), head
    assert json.loads(answer) == refusal("br")
