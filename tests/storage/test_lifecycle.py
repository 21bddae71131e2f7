"""A cachegate process tree through its life: signals during the start-up, restarts after a
reload, stuck and orphaned workers, the stop's deadline, what is left behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
# Shared libraries the process loads only once ``proxy.cli`` is being imported: after
# ``python -m proxy run`` has had the chance to hold its signals (``proxy.earlysignals``).
IMPORTED = re.compile(r"_yaml|multidict|_http_parser|uvloop|yarl")


def _caught(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _importing(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return bool(IMPORTED.search(f.read()))


async def _until(predicate: Callable[[], object], step: float = 0.002, wait: float = 30.0) -> None:
    """Poll ``predicate`` (a process's /proc files: nothing to await) until it holds."""
    for _ in range(int(wait / step)):
        if predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError("timed out")


async def _spawned(proxy: ProxyProcess) -> int:
    await _until(lambda: proxy.process is not None, 0.001)
    assert proxy.process is not None
    return proxy.process.pid


@pytest.mark.parametrize("workers", [("--workers", "2"), ()], ids=["workers", "single"])
async def test_sighup_during_the_start_up_neither_kills_the_process_nor_is_lost(
        origin: Origin, tmp_path: Path, workers: tuple[str, ...]) -> None:
    """SIGHUP (``systemctl reload``, logrotate) from the moment the program's imports begin until
    it listens: it keeps starting, then serves (systemd would not restart it: killed by SIGHUP
    is a clean exit for Restart=on-failure)."""
    origin.route("/s", body=b"s", headers={"Cache-Control": "max-age=300"})
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    sent = 0

    async def hup() -> None:
        nonlocal sent
        pid = await _spawned(proxy)
        await _until(lambda: _caught(pid, signal.SIGHUP) or _importing(pid))
        assert proxy.process is not None
        while not proxy.url and proxy.process.returncode is None:
            os.kill(pid, signal.SIGHUP)
            sent += 1
            await asyncio.sleep(0.02)

    sender = asyncio.ensure_future(hup())
    try:
        await proxy.start(*workers)
        await sender
        assert sent >= 5
        assert (await proxy.get("/s")).body == b"s"
    finally:
        sender.cancel()
        code = await proxy.stop()
    assert code == 0, "\n".join(proxy.lines)


async def test_sigterm_during_the_start_up_stops_the_process_once_started(
        origin: Origin, tmp_path: Path) -> None:
    """A SIGTERM before the loop's handlers is remembered: the process stops cleanly (exit 0),
    its workers with it, instead of dying where it was."""
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    start = asyncio.ensure_future(proxy.start("--workers", "2"))
    pid = await _spawned(proxy)
    await _until(lambda: _caught(pid, signal.SIGTERM) or _importing(pid))
    os.kill(pid, signal.SIGTERM)
    with pytest.raises(AssertionError):  # it exits without ever listening
        await start
    assert await proxy.stop() == 0
    assert "cachegate: stopped" in proxy.lines
