"""Stopping a supervisor whose worker hangs: only the hung worker is killed, and said to be."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def test_stopping_with_a_hung_worker_kills_it_alone_and_blames_no_healthy_worker(
        origin: Origin, tmp_path: Path) -> None:
    """Worker 0 hangs (SIGSTOP); worker 1 stops at once on SIGTERM. At the deadline only worker
    0 is killed and logged: worker 1, awaited after it, was blamed as well (a wait with no time
    left fails even on a process that has exited)."""
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        hung, healthy = proxy.workers[0], proxy.workers[1]
        os.kill(hung, signal.SIGSTOP)
    finally:
        code = await proxy.stop(signal.SIGTERM)
    blamed = [line for line in proxy.lines if "did not stop in time" in line]
    assert any(f"pid {hung} " in line for line in blamed), proxy.lines
    assert not any(f"pid {healthy} " in line for line in blamed), blamed
    assert code == 0, proxy.lines
