"""Running out of file descriptors is cachegate's own failure, never the origin's: this test
process (the proxy runs in it) has its open-files limit lowered so that no new descriptor can
be opened, as a flood of idle client connections does at ``ulimit -n``.

Before: each miss got 502 "the origin server could not be reached" (connect() failed with
EMFILE), three of them took the healthy upstream out ("marked down for 30s after 3 consecutive
failures"), and once the limit was gone every miss got 503 "no origin server is available"
for the cool-down; ``cachegate_upstream_errors_total{kind="connect"}`` and ``GET /upstreams``
counted the EMFILEs as the upstream's failures, an active check failing so took it out too, and
every miss logged its own "upstream failed" warning. Now: 503 "cachegate ran out of file
descriptors (too many open files)", nothing held against the upstream, counted in
``cachegate_out_of_resources_total``, one warning for the streak."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Iterator

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin
from tests.security.util import port_of

CONFIG = ("cache: {memory: 16MB}\n"
          "upstream: {retries: 2, passive: {failures: 3, cooldown: 30s}, "
          "health: {path: /healthz, interval: 200ms, timeout: 1s, healthy: 1, unhealthy: 2}}\n")


@contextlib.contextmanager
def no_new_descriptors() -> Iterator[None]:
    """No ``socket()`` or ``open()`` in this process succeeds meanwhile (EMFILE): the limit is
    0 (it bounds numbers, not counts; those open stay). Not the lowest free number: a
    descriptor closed meanwhile (a health check's, the origin's side of a ``Connection: close``)
    would free a slot under it, and one miss would reach the origin (seen in CI)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bytes]:
    """One GET on a keep-alive connection opened before the limit: its status and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (line.partition(": ") for line in lines[1:])
                  if k.lower() == "content-length")
    return int(lines[0].split(" ")[1]), await asyncio.wait_for(reader.readexactly(length), 10)


async def test_out_of_descriptors_is_a_503_of_cachegate_and_never_takes_the_upstream_out(
        make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    origin.route("/healthz", body=b"ok")
    origin.route("/page", body=b"page", headers={"Cache-Control": "no-store"})
    proxy = await make_proxy(config=CONFIG)
    pool = proxy.runtime.pool
    upstream = pool.upstreams[0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    caplog.set_level(logging.DEBUG, logger="cachegate")
    try:
        # Just after a check (its connection closed): none holds a descriptor it could free for
        # a miss while the limit is low; the next one comes in the window, and fails there.
        checks = upstream.check_successes
        for _ in range(200):
            if upstream.check_successes > checks:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        answers = []
        with no_new_descriptors():
            for i in range(6):
                answers.append(await ask(reader, writer, f"/page?during={i}"))
            await asyncio.sleep(0.5)  # active checks meet EMFILE too
        for status, body in answers:
            assert status == 503, answers
            assert body.startswith(b"503 Service Unavailable: cachegate ran out of file descriptors "
                                   b"(too many open files)"), body
        state = pool.snapshot()[0]
        assert state["available"] and state["state"] == "up", state
        assert state["failures"] == 0 and state["requests"] == 0, state
        assert state["passive"]["consecutive_failures"] == 0, state
        assert state["health_check"]["healthy"] and state["health_check"]["consecutive_failures"] == 0, state
        # Once descriptors are free again, a miss reaches the origin at once (no cool-down).
        assert await ask(reader, writer, "/page?after=1") == (200, b"page")
    finally:
        writer.close()
    registry = proxy.runtime.metrics.registry
    name = upstream.name
    assert registry.get_sample_value("cachegate_upstream_errors_total",
                                      {"upstream": name, "kind": "connect"}) == 0
    assert registry.get_sample_value("cachegate_out_of_resources_total", {"where": "upstream_connect"}) == 6
    assert registry.get_sample_value("cachegate_out_of_resources_total", {"where": "health_check"}) >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("marked down" in w or "taken out" in w or w.startswith("upstream failed")
                   for w in warnings), warnings
    streak = [w for w in warnings if w.startswith("opening a connection to an upstream failed")]
    assert len(streak) == 1, warnings
    assert "Too many open files" in streak[0] and "answered 503" in streak[0], streak
