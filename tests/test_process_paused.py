"""A cachegate process paused (SIGSTOP, a VM paused) for longer than a timeout, then resumed:
what came in the meantime is served, not failed by the timer that fires first. The loop runs
its timers before it reads its sockets, so the upstream read timer failed a miss whose answer
had come before the pause (504), and the keep-alive timer closed a connection whose next
request came during it. Such a timer, late by more than ``PAUSE_LATE``, waits one short grace
first (``proxy.paused``). A real ``cachegate run`` (with uvloop, as deployed), stopped and
continued by signals."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp

from tests.harness import Origin, ProxyProcess, spawn_cachegate, write_config
from tests.test_fastpath import read_response

PAUSE = 2.5  # longer than either timeout below, by more than PAUSE_LATE


async def paused_proxy(tmp_path: Path, origin: Origin) -> ProxyProcess:
    origin.route("/slow", body=b"slow", delay=0.3, headers={"Cache-Control": "no-store"})
    origin.route("/page", body=b"page", headers={"Cache-Control": "no-store"})
    config = write_config(str(tmp_path), origin.url, "keepalive_timeout: 1s\n"
                                                     "upstream: {timeouts: {read: 1s}}\n")
    return await asyncio.to_thread(spawn_cachegate, ["run", "--config", config])


async def pause(proc: ProxyProcess) -> None:
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE)
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)


async def test_a_miss_answered_during_a_pause_longer_than_the_read_timeout_is_served(
        tmp_path: Path, origin: Origin) -> None:
    proc = await paused_proxy(tmp_path, origin)
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(session.get(proc.proxy_url + "/slow"))
            for _ in range(200):  # the request is with the origin (it answers 0.3 s later)
                if origin.count("/slow"):
                    break
                await asyncio.sleep(0.01)
            await pause(proc)  # the answer came 0.3 s in, the read timeout (1 s) is long past
            resp = await pending
            assert (resp.status, await resp.read()) == (200, b"slow"), resp.headers
    finally:
        proc.stop()


async def test_a_request_on_a_kept_alive_connection_sent_during_a_pause_is_answered(
        tmp_path: Path, origin: Origin) -> None:
    """A raw connection (an HTTP client library would send the request again on a new one)."""
    proc = await paused_proxy(tmp_path, origin)
    port = int(proc.proxy_url.rsplit(":", 1)[1])
    request = b"GET /page HTTP/1.1\r\nHost: example.test\r\n\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            first = await read_response(reader, "GET")
            assert (first.status_line, first.body) == ("HTTP/1.1 200 OK", b"page")
            os.kill(proc.proc.pid, signal.SIGSTOP)
            try:
                # Sent on the kept-alive connection while the process does not run: the
                # keep-alive timeout (1 s) passes before it is read.
                writer.write(request)
                await writer.drain()
                await asyncio.sleep(PAUSE)
            finally:
                os.kill(proc.proc.pid, signal.SIGCONT)
            second = await read_response(reader, "GET")
            assert (second.status_line, second.body) == ("HTTP/1.1 200 OK", b"page")
        finally:
            writer.close()
        assert origin.count("/page") == 2
    finally:
        proc.stop()


async def test_timers_late_again_and_again_still_end_what_they_time_out(
        tmp_path: Path, origin: Origin) -> None:
    """A loop held up past a second again and again (stopped 3 s, run 0.05 s, as a loop busy
    with long callbacks): the grace was given anew each time its own timer was late, so an idle
    kept-alive connection stayed open, and a silent upstream was waited for, for as long as the
    loop stayed late (20 s of it: 20.6 s). One grace per deadline: both end while it goes on.
    Both deadlines (1 s) fall in the first stop, late by 2 s: each gets its grace, whose timer
    falls in the next stop, late again."""
    origin.route("/hang", body=b"never", delay=60, headers={"Cache-Control": "no-store"})
    proc = await paused_proxy(tmp_path, origin)
    port = int(proc.proxy_url.rsplit(":", 1)[1])
    stop_cycling = asyncio.Event()

    async def cycle() -> None:
        try:
            while not stop_cycling.is_set():
                os.kill(proc.proc.pid, signal.SIGSTOP)
                await asyncio.sleep(3.0)
                os.kill(proc.proc.pid, signal.SIGCONT)
                await asyncio.sleep(0.05)
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as session:
            hung = asyncio.ensure_future(session.get(proc.proxy_url + "/hang"))
            writer.write(b"GET /page HTTP/1.1\r\nHost: example.test\r\n\r\n")
            first = await read_response(reader, "GET")
            assert first.body == b"page"
            for _ in range(200):
                if origin.count("/hang"):
                    break
                await asyncio.sleep(0.005)
            cycling = asyncio.ensure_future(cycle())
            closed = asyncio.ensure_future(reader.read())  # b"" once cachegate closes it
            # (with one grace each: closed at the second resume, about 6 s in)
            done, _ = await asyncio.wait({closed, hung}, timeout=15)
            still_cycling = not cycling.done()
            stop_cycling.set()
            await cycling
            assert closed in done and hung in done, (closed, hung)
            assert still_cycling
            assert closed.result() == b""
            assert hung.result().status == 504
    finally:
        stop_cycling.set()
        writer.close()
        proc.stop()
