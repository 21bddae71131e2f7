"""An origin that is down under load is a few lines in the error log, not one per failed
request: the first failure of each upstream, kind and message at once (with its request id),
the ones after it within a window counted, and one line per window saying how many there were
(``suppressed``, in a JSON line). Before, one warning per failed request: 1,195-4,368 lines for
an outage of a second at 20 connections, and journald's rate limit then dropped the rest.
Every failure is still in the metrics: the lines and their counts add up to them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import random
import re
import string
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import proxy.logs
from proxy.logs import LineFormatter
from tests.conftest import MakeProxy
from tests.harness import spawn_cachegate, write_config
from tests.ports import Ports
from tests.security.misbehaving import Conn, Serve, raw_origins

WINDOW = 1.0  # seconds: the in-process proxy's window, shorter than the default to keep the test short


class Lines(logging.Handler):
    """cachegate's error log lines as the JSON formatter writes them, formatted as they are
    logged (in the context of the request that logged them: its request id)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(LineFormatter(lambda: "0", as_json=True))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def about(self, url: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["message"].startswith(f"upstream failed: {url}:")]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("cachegate")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def failures(metrics: str, url: str) -> int:
    """``cachegate_upstream_errors_total`` of ``url``, all kinds."""
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
               if line.startswith("cachegate_upstream_errors_total{") and f'upstream="{url}"' in line)


def counted(lines: list[dict[str, Any]]) -> int:
    """The failures ``lines`` tell of: each line one (a summary none of its own), and its
    ``suppressed`` more."""
    return sum((0 if line.get("summary") else 1) + line.get("suppressed", 0) for line in lines)


async def test_an_outage_under_load_is_a_few_lines_per_upstream_that_add_up_to_the_metric(
        make_proxy: MakeProxy, lines: Lines, monkeypatch: pytest.MonkeyPatch, ports: Ports) -> None:
    monkeypatch.setattr(proxy.logs, "SUMMARY_WINDOW", WINDOW, raising=False)
    a, b = ports.url(), ports.url()
    # Each request one try (retries: 0) at one of the two (round robin), and both stay in the
    # pool (passive checks off): every request is one failure of one upstream.
    cg = await make_proxy(config="upstream: {retries: 0, passive: {failures: 0}}\n", upstreams=[a, b])
    ids: set[str] = set()
    started = time.monotonic()
    for batch in range(10):  # 200 requests in about a second, 20 at a time
        replies = await asyncio.gather(*(cg.get(f"/p{batch}-{i}") for i in range(20)))
        assert {r.status for r in replies} == {502}
        ids.update(r.headers["X-Request-Id"] for r in replies)
        await asyncio.sleep(0.1)
    took = time.monotonic() - started
    await asyncio.sleep(WINDOW + 0.3)  # the last window is over: its count is said
    metrics = (await cg.admin("GET", "/metrics")).body.decode()
    for url in (a, b):
        said = lines.about(url)
        # The first at once, as it was (its request's id, nothing counted), then a line per window.
        assert said[0]["request_id"] in ids and "suppressed" not in said[0], said
        assert 2 <= len(said) <= 2 + took / WINDOW, said
        assert all(line["level"] == "warning" for line in said)
        assert any(line.get("summary") and line["request_id"] is None
                   and re.search(r" \(\d+ more like it in the last \d+\.\ds, not logged one by one\)$",
                                 line["message"]) for line in said), said
        assert counted(said) == failures(metrics, url) > 0, said
    assert failures(metrics, a) + failures(metrics, b) == 200

    # Once a window has passed with nothing counted, a failure is logged at once again, by itself.
    await asyncio.sleep(WINDOW + 0.2)
    before = len(lines.lines)
    replies = await asyncio.gather(cg.get("/again-1"), cg.get("/again-2"))  # one to each
    new = lines.lines[before:]
    assert sorted(line["request_id"] for line in new) == sorted(r.headers["X-Request-Id"] for r in replies)
    assert all("suppressed" not in line and line["message"].startswith("upstream failed: ") for line in new)
    assert {url for url in (a, b) if any(url in line["message"] for line in new)} == {a, b}


@pytest.mark.slow
def test_cachegate_run_summarises_the_failures_of_a_down_origin_in_its_json_error_log(
        tmp_path: Path, ports: Ports) -> None:
    """The default window, in a real process, as an operator's journal gets it: JSON lines on
    standard error (the access log is JSON)."""
    url = ports.url()
    config = write_config(str(tmp_path), url, "access_log: {format: json, path: access.log}\n"
                                              "upstream: {retries: 0, passive: {failures: 0}}\n")
    cg = spawn_cachegate(["run", "--config", config])
    try:
        async def load() -> set[int]:
            async with aiohttp.ClientSession() as session:
                async def one(path: str) -> int:
                    async with session.get(cg.proxy_url + path) as resp:
                        await resp.read()
                        return resp.status

                statuses: set[int] = set()
                for batch in range(10):  # 200 requests in about a second, 20 at a time
                    statuses.update(await asyncio.gather(*(one(f"/p{batch}-{i}") for i in range(20))))
                    await asyncio.sleep(0.1)
                return statuses

        assert asyncio.run(load()) == {502}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and '"summary": true' not in cg.text:
            time.sleep(0.1)
        assert cg.admin_url is not None
        with urllib.request.urlopen(cg.admin_url + "/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
    finally:
        assert cg.stop() == 0, cg.text
    said = [json.loads(line) for line in cg.text.splitlines()
            if line.startswith("{") and "upstream failed: " in line]
    assert said and said[0]["request_id"] and "suppressed" not in said[0], cg.text
    assert len(said) <= 4, said  # about a second of failures: the first, then a line per 5 s
    assert said[-1]["summary"] is True and said[-1]["suppressed"] > 0, said
    assert counted(said) == failures(metrics, url) == 200, said


def test_the_kinds_held_are_bounded_and_a_kind_forgotten_says_its_count_first() -> None:
    """Hosts in errors may vary without end: at most ``KEPT`` kinds are held, and the oldest,
    when it goes, says what it counted (the lines still add up)."""
    now = [0.0]
    summarised = proxy.logs.Summarised(window=5.0, clock=lambda: now[0])
    summarised.KEPT = 3
    handler = Lines()
    logger = logging.getLogger("cachegate.test_failure_lines")
    logger.addHandler(handler)
    try:
        for host in range(10):
            for _ in range(4):  # each kind: one line and three counted
                summarised.warning(logger, host, "upstream failed: host %d", host)
                now[0] += 0.01
        assert len(summarised._kinds) <= 3
        summarised.close()
    finally:
        logger.removeHandler(handler)
    assert counted(handler.lines) == 40, handler.lines
    assert len(handler.lines) == 20  # per kind: its first line, and its count


class FailingOrigin:
    """A loopback origin that fails as told (``mode``): ``"short"``, a head and 10 bytes of a
    body whose Content-Length grows with each request (the same failure, with other numbers in
    its message); ``"close"``, the request read and the connection closed without an answer;
    ``stop()``, nothing listening any more (a connection is refused; its port held till the test
    ends, so that no other test's server is given it meanwhile)."""

    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self.mode = "short"
        self.served = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.served += 1
            if self.mode == "short":
                writer.write(b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (1000 + self.served, b"x" * 10))
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            port = self.server.sockets[0].getsockname()[1]
            self.server.close()
            await self.server.wait_closed()
            self.server = None
            self.ports.hold(port)


async def test_another_failure_of_the_same_upstream_and_kind_is_logged_at_once(
        make_proxy: MakeProxy, lines: Lines, monkeypatch: pytest.MonkeyPatch, ports: Ports) -> None:
    """Within one window, an origin that closes connections unanswered and then refuses them:
    both are ``connect`` failures of one upstream, and each is logged at once with its request
    id (summarised by message too, not by the format of the line alone: the refusal, the origin
    down, was only counted under the first one's line, and no line said it). Bodies cut short at
    ever other lengths are one failure, not one per length."""
    monkeypatch.setattr(proxy.logs, "SUMMARY_WINDOW", 60.0, raising=False)  # all in one window
    origin = FailingOrigin(ports)
    url = await origin.start()
    try:
        cg = await make_proxy(config="upstream: {retries: 0, passive: {failures: 0}}\n", upstreams=[url])

        async def fail(path: str) -> str:
            async with cg.session.get(cg.url + path) as resp:
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await resp.read()
                return resp.headers["X-Request-Id"]

        short = [await fail(f"/short-{i}") for i in range(3)]
        origin.mode = "close"
        closed = [await fail(f"/closed-{i}") for i in range(3)]
        await origin.stop()
        refused = [await fail(f"/refused-{i}") for i in range(3)]
    finally:
        await origin.stop()
    said = [line for line in lines.lines if url in line["message"]]
    assert all(line["level"] == "warning" for line in said)
    assert [(line["request_id"], "suppressed" in line) for line in said] == [
        (short[0], False), (closed[0], False), (refused[0], False)], said
    assert re.search(r"body broke off: .*received 10 of 1001 bytes", said[0]["message"]), said
    assert said[1]["message"] == f"upstream failed: {url}: closed the connection before answering", said
    assert said[2]["message"].startswith(f"upstream failed: {url}: cannot connect: "), said
    assert f"[Errno {errno.ECONNREFUSED}]" in said[2]["message"], said
    warnings = cg.runtime.engine.upstream_warnings
    assert len(warnings._kinds) == 3, list(warnings._kinds)  # the lengths made no kinds of their own
    warnings.close()  # the counts, said: each line's own failure's
    metrics = (await cg.admin("GET", "/metrics")).body.decode()
    said = [line for line in lines.lines if url in line["message"]]
    assert counted(said) == failures(metrics, url) == 9, said
    assert [line.get("suppressed") for line in said[3:]] == [2, 2, 2], said
    assert re.search(r"received 10 of 1003 bytes.* \(2 more like it", said[3]["message"]), said
    assert "closed the connection before answering (2 more like it" in said[4]["message"], said


async def test_a_count_is_said_when_its_window_ends_not_when_an_earlier_armed_timer_runs() -> None:
    """One timer says the counts of every kind: a count whose window ends before the one the
    timer is armed for arms it again, sooner (it waited for the other kind's timer: its count
    was said up to a window late)."""
    now = [0.0]
    summarised = proxy.logs.Summarised(window=1.0, clock=lambda: now[0])
    handler = Lines()
    logger = logging.getLogger("cachegate.test_failure_lines")
    logger.addHandler(handler)
    loop = asyncio.get_running_loop()

    def armed_for() -> float:
        """When the timer runs (``clock``'s time)."""
        assert summarised._timer is not None
        return now[0] + summarised._timer.when() - loop.time()

    def run_timer() -> None:
        """The timer's run, at ``now`` (not waited for)."""
        assert summarised._timer is not None
        summarised._timer.cancel()
        summarised.flush()

    try:
        summarised.warning(logger, "B", "B failed")  # B's window: 0 to 1
        now[0] = 0.5
        summarised.warning(logger, "A", "A failed")  # A's window: 0.5 to 1.5
        now[0] = 0.6
        summarised.warning(logger, "A", "A failed again")  # counted: the timer for 1.5
        assert armed_for() == pytest.approx(1.5, abs=0.05)
        now[0] = 0.7
        summarised.warning(logger, "B", "B failed again")  # counted: B's window ends sooner
        assert armed_for() == pytest.approx(1.0, abs=0.05)
        now[0] = 1.0  # the timer runs
        run_timer()
        assert [line["message"] for line in handler.lines[2:]] == [
            "B failed again (1 more like it in the last 1.0s, not logged one by one)"]
        assert armed_for() == pytest.approx(1.5, abs=0.05)  # then A's
        now[0] = 1.5
        run_timer()
        assert [line["message"] for line in handler.lines[3:]] == [
            "A failed again (1 more like it in the last 1.0s, not logged one by one)"]
        assert summarised._timer is None  # nothing counted any more
    finally:
        summarised.close()
        logger.removeHandler(handler)


def misbehaving() -> Serve:
    """An origin that gets one thing wrong in every answer, whatever the request: bytes after
    the whole answer to a POST (in the same write), a body after a 204, or a malformed field
    that echoes the request's target (``/badecho/...``)."""
    async def serve(conn: Conn) -> None:
        while True:
            request = await conn.request()
            if request.method == "POST":
                await conn.send(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreatedEXTRAEXTRA")
            elif request.target.startswith("/nothing"):
                await conn.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
            else:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad\x01: "
                                + request.target.encode() + b"\r\n\r\nok")

    return serve


@pytest.mark.parametrize(("method", "path", "status", "first"), [
    ("POST", "/stray/", 201, "10 or more bytes after the end of the 201 response to POST (RFC 9112 §6.3)"),
    ("GET", "/nothing/", 204, "5 or more bytes of body after a 204 response, which has none"),
    ("GET", "/badecho/", 502, "invalid response: Invalid header token: b'X-Bad\\x01: /badecho/"),
], ids=["after-a-post", "after-a-204", "echoed-in-a-malformed-field"])
async def test_an_origin_misbehaving_in_every_answer_is_a_line_and_a_count_not_a_line_per_request(
        make_proxy: MakeProxy, lines: Lines, monkeypatch: pytest.MonkeyPatch, method: str, path: str,
        status: int, first: str) -> None:
    """Its warnings were one line per request, however many (8,578 lines, 3.3 MB, in 10 s of
    POSTs): the warnings of bytes after an answer were logged as they came, and the parser's
    error quotes the line it failed in, which echoed each request's own path (a kind of failure
    per request, never summarised). Now, as for an origin that fails: the first line at once,
    with its request id, and the rest counted in one line; the echoed path cut short."""
    monkeypatch.setattr(proxy.logs, "SUMMARY_WINDOW", 60.0, raising=False)  # all in one window
    rounds = 12
    async with raw_origins() as start:
        origin = await start(misbehaving())
        url = origin.url
        cg = await make_proxy(config="upstream: {retries: 0, passive: {failures: 0}}\n", upstreams=[url])
        ids = []
        for _ in range(rounds):  # each a target of its own, as long as a client likes
            target = path + "".join(random.choices(string.ascii_letters, k=1000))
            reply = await cg.request(method, target, data=b"{}" if method == "POST" else None)
            assert reply.status == status, reply
            ids.append(reply.headers["X-Request-Id"])
        cg.runtime.engine.upstream_warnings.close()  # the count, said
    said = [line for line in lines.lines if url in line["message"]]
    assert len(said) == 2, [line["message"][:200] for line in said]
    assert (said[0]["request_id"], "suppressed" in said[0]) == (ids[0], False), said[0]
    assert first in said[0]["message"], said[0]
    assert (said[1].get("summary"), said[1].get("suppressed")) == (True, rounds - 1), said[1]
    assert all(len(line["message"]) < 600 for line in said), said  # the 1,000 letters echoed: cut short
