"""systemd's Type=notify (``proxy.sdnotify``): a real ``cachegate run`` tells a datagram socket
standing in for the service manager when it is ready, reloading, stopping, and pings its
watchdog; only the main process sends, and its workers do not inherit the variables."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.sdnotify import Notifier
from tests.harness import Origin, write_config


class Manager:
    """The service manager's end: a datagram socket that learns each sender's pid."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="notify-", dir="/tmp")  # sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.seen: list[tuple[int, dict[str, str]]] = []

    def receive(self, timeout: float) -> tuple[int, dict[str, str]] | None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", value[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append((pid, fields))
        return pid, fields

    def until(self, key: str, timeout: float = 30.0) -> tuple[int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.receive(max(0.01, deadline - time.monotonic()))
            if got is not None and key in got[1]:
                return got
        raise AssertionError(f"no {key} within {timeout}s; seen: {self.seen}")

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager()
    yield m
    m.close()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_reloading_stopping_and_the_watchdog_come_from_the_main_process_only(
        origin: Origin, manager: Manager, tmp_path: Path, workers: int) -> None:
    origin.route("/page", body=b"page", headers={"Cache-Control": "max-age=60"})
    config = write_config(str(tmp_path), origin.url)
    env = {**os.environ, "NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "400000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", config, "--workers", str(workers),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    output: list[bytes] = []

    async def drain() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            output.append(line)

    draining = asyncio.ensure_future(drain())
    try:
        pid, ready = await asyncio.to_thread(manager.until, "READY")
        assert pid == proc.pid
        # Ready means answering: the STATUS line names the port, and it answers at once.
        match = re.fullmatch(r"serving (http://127\.0\.0\.1:\d+)( with 2 workers)?", ready["STATUS"])
        assert match is not None and bool(match.group(2)) == (workers == 2), ready
        async with aiohttp.ClientSession() as session, session.get(match.group(1) + "/page") as r:
            assert await r.read() == b"page"
        # The watchdog: pinged every 0.2 s (half of WATCHDOG_USEC) by the main process.
        start = len(manager.seen)
        await asyncio.sleep(1.0)
        while await asyncio.to_thread(manager.receive, 0.05) is not None:
            pass
        pings = [p for p, f in manager.seen[start:] if "WATCHDOG" in f]
        assert len(pings) >= 3 and set(pings) == {proc.pid}, manager.seen[start:]
        if workers == 2:  # the workers' environment has none of the variables
            out = b"".join(output).decode()
            worker_pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", out)]
            assert len(worker_pids) == 2, out
            for wp in worker_pids:
                environ = (await asyncio.to_thread(Path(f"/proc/{wp}/environ").read_bytes)).split(b"\0")
                assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]

        # A reload: RELOADING=1 with the time it began, then READY=1 saying how it went.
        proc.send_signal(signal.SIGHUP)
        pid, reloading = await asyncio.to_thread(manager.until, "RELOADING")
        assert pid == proc.pid and int(reloading["MONOTONIC_USEC"]) > 0
        pid, again = await asyncio.to_thread(manager.until, "READY")
        assert pid == proc.pid and "configuration reloaded at" in again["STATUS"], again

        # A rejected reload: still serving, and the status says why.
        await asyncio.to_thread(_append, config, "shutdown_grace: soon\n")
        proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(manager.until, "RELOADING")
        pid, rejected = await asyncio.to_thread(manager.until, "READY")
        assert re.search(r"reload at \S+ rejected: \S*cachegate\.yaml:\d+: ", rejected["STATUS"]), rejected
        assert rejected["STATUS"].startswith(match.group(0))

        proc.send_signal(signal.SIGTERM)
        pid, _ = await asyncio.to_thread(manager.until, "STOPPING")
        assert pid == proc.pid
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(draining, 10)
    assert {p for p, _ in manager.seen} == {proc.pid}


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_without_a_manager_nothing_is_sent_and_the_variables_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier.take()
    assert not n.active and not n.ready("x") and n.watchdog_usec == 1_000_000
    assert "WATCHDOG_USEC" not in os.environ
    # Another process's watchdog (WATCHDOG_PID) is not this one's; vsock is not supported.
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    n = Notifier.take()
    assert not n.active and n.watchdog_usec is None
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)


def test_an_abstract_socket_is_reached_and_a_gone_manager_is_not_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cachegate-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier.take()
        assert n.ready("serving  http://x\n  (two lines)")
        s.settimeout(5)
        assert s.recv(4096) == b"READY=1\nSTATUS=serving http://x (two lines)"
    assert not n.send("WATCHDOG=1")  # nobody listens any more: False, logged once


@pytest.mark.slow
async def test_overlapping_reloads_say_ready_once_the_last_is_over(
        origin: Origin, manager: Manager, tmp_path: Path) -> None:
    """Three POST /reload at once: READY=1 came after the first reload's workers, while the
    others still ran (with Type=notify-reload, systemd took the reload for done)."""
    config = write_config(str(tmp_path), origin.url)
    env = {**os.environ, "NOTIFY_SOCKET": manager.path}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", config, "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    admin = None
    try:
        while admin is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "cachegate exited"
            if "admin listening on " in line:
                admin = line.split("admin listening on ", 1)[1].split()[0]
        await asyncio.to_thread(manager.until, "READY")
        async with aiohttp.ClientSession() as session:
            async def reload() -> int:
                async with session.post(admin + "/reload", headers={"Content-Type": "application/json"}) as r:
                    return r.status

            assert await asyncio.gather(*(reload() for _ in range(3))) == [200, 200, 200]
        # Each reload says READY (or not) before its answer goes: all were sent by now. Read
        # until the READY after the last RELOADING, then what else came (none should).
        def ready_after_the_reloads() -> bool:
            said = ["READY" in f for _, f in manager.seen if "READY" in f or "RELOADING" in f]
            return said.count(False) == 3 and said[-1]

        deadline = time.monotonic() + 30
        while not ready_after_the_reloads() and time.monotonic() < deadline:
            await asyncio.to_thread(manager.receive, 0.1)
        while await asyncio.to_thread(manager.receive, 0.5) is not None:
            pass
        states = [("READY" if "READY" in f else "RELOADING") for _, f in manager.seen
                  if "READY" in f or "RELOADING" in f]
        assert states == ["READY", "RELOADING", "RELOADING", "RELOADING", "READY"], manager.seen
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
