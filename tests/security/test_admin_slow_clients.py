"""Connections that never finish a request, on the admin listener and the client listener.

A request head sent a few bytes at a time or never finished (slowloris) is closed after
``client_header_timeout``; on the admin listener a body that does not come (the login is
public) is answered 408 after ``client_body_timeout``, and at most ``ADMIN_MAX_CONNECTIONS``
connections are open at once, the oldest idle one closed to make room: a few hundred idle
connections held as many file descriptors for an hour, until the client listener could accept
nothing. A connection whose client reads none of its replies is waiting for its client too
(it makes room; its replies are aborted after ``ADMIN_SEND_TIMEOUT``): 64 connections
pipelining the public console page and reading nothing locked the operator out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest

from proxy.config import Overrides
from proxy.web import headtimeout, server
from proxy.web.server import install_reloader
from tests.conftest import MakeProxy
from tests.harness import Proxy

TOKEN = "slow-clients-t0ken-of-some-length"
CONFIG = f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\nclient_header_timeout: 1s\nclient_body_timeout: 1s\n"


async def closed_after(host: str, port: int, first: bytes, trickle: bytes = b"", every: float = 0.25,
                       limit: float = 10.0) -> tuple[float, bytes]:
    """Send ``first`` (then ``trickle`` every ``every`` seconds): seconds until the server
    closed the connection, and what it answered."""
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(first)
    answer = b""
    try:
        while time.monotonic() - started < limit:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                if trickle:
                    writer.write(trickle)
                continue
            if not chunk:
                return time.monotonic() - started, answer
            answer += chunk
        raise AssertionError(f"still open after {limit}s: {answer!r}")
    except ConnectionResetError:
        return time.monotonic() - started, answer
    finally:
        writer.close()


@pytest.fixture
async def slow(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy(config=CONFIG)


async def test_an_admin_body_that_never_comes_is_answered_408_and_closed(slow: Proxy) -> None:
    host, port = slow.listeners.admin_addresses[0]
    took, answer = await closed_after(host, port, b"POST /console/api/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"did not arrive in time" in answer
    assert 0.8 < took < 4, took


async def test_an_admin_head_never_finished_or_trickled_is_closed(slow: Proxy) -> None:
    host, port = slow.listeners.admin_addresses[0]
    results = await asyncio.gather(
        closed_after(host, port, b"GET /console/api/session HTTP/1.1\r\nHost: 127.0"),
        closed_after(host, port, b"GET /console/api/session HTTP/1.1\r\n", trickle=b"X-A: b\r\n"),
        closed_after(host, port, b""))  # nothing at all
    for took, answer in results:
        assert answer == b"" and 0.8 < took < 4, (took, answer)


async def test_a_client_head_never_finished_or_trickled_is_closed(slow: Proxy) -> None:
    host, port = slow.listeners.proxy_addresses[0]
    results = await asyncio.gather(
        closed_after(host, port, b"GET / HTTP/1.1\r\nHost: a"),
        closed_after(host, port, b"GET / HTTP/1.1\r\n", trickle=b"X-A: b\r\n"),
        closed_after(host, port, b""))
    for took, answer in results:
        assert answer == b"" and 0.8 < took < 4, (took, answer)
    # A whole request is answered, and its connection stays open past the head timeout.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 ")
    await asyncio.sleep(1.5)
    assert not reader.at_eof()
    writer.close()


async def test_idle_admin_connections_are_capped_the_oldest_making_room(
        make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "ADMIN_MAX_CONNECTIONS", 8)
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    host, port = proxy.listeners.admin_addresses[0]
    # As many as an attacker likes (no token needed): unfinished heads, public logins whose body
    # never comes (their handler waits for it), idle connections after a refused request; opened
    # at once, so the listener accepts many before any closed one is gone.
    heads = (b"GET /stats HTTP/1.1\r\nHost: 127.0",
             b"POST /console/api/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
             b"\r\nContent-Length: 100\r\n\r\n{",
             b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    idle = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(45)))
    for i, (_, writer) in enumerate(idle):
        writer.write(heads[i % 3])
    await asyncio.sleep(0.5)
    conns = proxy.listeners.runners[-1].server.connections  # type: ignore[union-attr]
    assert len(conns) <= 8, len(conns)
    assert await idle[0][0].read() == b""  # the oldest were closed
    for _ in range(3):  # the operator still gets in, on a new connection each time
        async with aiohttp.ClientSession() as s, \
                s.get(proxy.admin_url + "/stats", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
    for _, writer in idle:
        writer.close()


@pytest.mark.parametrize("path", ["/purge", "/console/api/login", "/explain"])
async def test_an_admin_client_that_hangs_up_mid_body_is_not_an_error(
        slow: Proxy, caplog: pytest.LogCaptureFixture, path: str) -> None:
    caplog.set_level(logging.DEBUG)
    host, port = slow.listeners.admin_addresses[0]
    for reset in (False, True):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"all\"".encode())
        await writer.drain()
        await asyncio.sleep(0.1)
        if reset:
            writer.transport.abort()
        else:
            writer.close()
        await asyncio.sleep(0.2)
    records = [r for r in caplog.records if r.name.startswith(("cachegate", "aiohttp", "asyncio"))]
    assert not [r for r in records if r.levelno > logging.INFO or r.exc_info], \
        [(r.name, r.levelname, r.getMessage()) for r in records]
    assert any("went away" in r.getMessage() for r in records), [r.getMessage() for r in records]


def unread_pipeliner(host: str, port: int, path: str) -> socket.socket:
    """A connection with a small receive buffer that will pipeline ``GET path`` and read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.setblocking(False)
    return sock


def admin_connections(proxy: Proxy) -> list[Any]:
    """The admin listener's open connections (a copy, taken now)."""
    return list(proxy.listeners.runners[-1].server.connections)  # type: ignore[union-attr]


async def fill_unread(proxy: Proxy, socks: list[socket.socket], path: str) -> list[Any]:
    """Pipeline ``GET path`` on each of ``socks`` until the admin listener's connection for each
    is paused for writing (its client reads nothing): those connections."""
    for _ in range(200):
        if len(admin_connections(proxy)) >= len(socks):
            break
        await asyncio.sleep(0.01)
    for handler in admin_connections(proxy):  # small kernel buffers: a few replies fill them
        handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() * 40
    for sock in socks:
        sock.send(request)  # a couple of KiB: the kernel takes them whole
    for _ in range(500):
        conns = admin_connections(proxy)
        if len(conns) >= len(socks) and all(h.writing_paused for h in conns):
            return conns
        await asyncio.sleep(0.01)
    raise AssertionError("the listener did not stop writing to clients that read nothing")


async def test_clients_that_pipeline_and_never_read_do_not_lock_the_operator_out(
        make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every place taken by a connection pipelining the public console page and reading nothing:
    # a reply stuck writing, its client reading none of it for CAP_STALLED, waits for its
    # client, so the oldest makes room for the operator.
    monkeypatch.setattr(server, "ADMIN_MAX_CONNECTIONS", 8)
    monkeypatch.setattr(headtimeout, "CAP_STALLED", 0.3)
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    host, port = proxy.listeners.admin_addresses[0]
    socks = [unread_pipeliner(host, port, "/") for _ in range(8)]
    try:
        await fill_unread(proxy, socks, "/console/static/console.js")
        await asyncio.sleep(0.6)
        for _ in range(3):
            async with aiohttp.ClientSession() as s, \
                    s.get(proxy.admin_url + "/stats", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=aiohttp.ClientTimeout(total=5)) as r:
                assert r.status == 200
    finally:
        for sock in socks:
            sock.close()


async def test_a_reply_the_client_never_reads_is_aborted_after_the_send_timeout(
        make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "ADMIN_SEND_TIMEOUT", 0.5)
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    host, port = proxy.listeners.admin_addresses[0]
    socks = [unread_pipeliner(host, port, "/")]
    try:
        await fill_unread(proxy, socks, "/")
        for _ in range(300):  # gone (file descriptor and all), not just marked closed
            if not admin_connections(proxy):
                break
            await asyncio.sleep(0.01)
        assert not admin_connections(proxy), "a connection whose client reads nothing was kept"
    finally:
        socks[0].close()


def burst(host: str, port: int, requests: list[bytes], stagger: float) -> list[bytes]:
    """Each of ``requests`` whole on a connection of its own, one every ``stagger`` seconds, from
    threads (as clients elsewhere would: the listener's loop is not paused while they come): the
    status line each got, or ``b""`` if its connection was closed with nothing answered."""
    def one(i: int) -> bytes:
        time.sleep(i * stagger)
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(requests[i])
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
        return answer.split(b"\r\n", 1)[0]
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, range(len(requests))))


async def reloads(proxy: Proxy) -> float:
    async with aiohttp.ClientSession() as s, \
            s.get(proxy.admin_url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        text = await r.text()
    found = re.search(r'cachegate_config_reloads_total\{result="success"\} ([\d.]+)', text)
    return float(found.group(1)) if found else 0.0


async def test_a_whole_request_the_cap_closes_is_not_acted_on(
        make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    # A storm of reloads, each one whole on its own connection: more than the cap are open at
    # once, so some are closed unanswered. A request aiohttp had parsed and queued, its handler
    # not run yet, counted as idle: its connection was closed to make room, and its reload was
    # applied all the same, with no answer to say so.
    monkeypatch.setattr(server, "ADMIN_MAX_CONNECTIONS", 8)
    proxy = await make_proxy(config=f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n")
    install_reloader(proxy.runtime, proxy.config_path, Overrides())
    host, port = proxy.listeners.admin_addresses[0]
    request = (f"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
    for _ in range(3):  # (a race: a few storms, so that it is all but sure to be run into)
        before = await reloads(proxy)
        answers = await asyncio.to_thread(burst, host, port, [request] * 100, 0.001)
        for _ in range(100):  # (a reload applied late would still count)
            await asyncio.sleep(0.02)
        applied = await reloads(proxy) - before
        assert set(answers) <= {b"HTTP/1.1 200 OK", b""}, answers
        assert applied == answers.count(b"HTTP/1.1 200 OK"), (applied, answers.count(b""))
