"""SIGTERM while a purge waits for a shard's write lock that another process holds.

Before: the supervisor said "stopped" but lived on until the lock was let go (up to
BUSY_PATIENCE, 60 s); the purge then ran on the shared memory already closed and answered 500
("Bad file descriptor"). Now the wait ends when the stop begins: the purge answers 503 (purge
again), and the supervisor exits within its grace and a few seconds, with no traceback."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import HOST
from tests.storage.test_shard_damage_running import fill, purge, routes, rows, started

pytestmark = pytest.mark.slow

HOLD = 60.0  # seconds the other process holds the lock: longer than the test waits for the exit

HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


async def test_sigterm_ends_a_purge_waiting_for_a_held_shard_lock(origin: Origin, tmp_path: Path) -> None:
    routes(origin, 4)
    proxy = await started(origin, tmp_path, shards=1)
    cache = tmp_path / "cache"
    holder = None
    try:
        await fill(proxy, range(4))
        await proxy.wait_for(lambda: rows(cache) >= 4)
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER, str(cache / "000" / "cache.db"), str(HOLD),
            stdout=asyncio.subprocess.PIPE)
        assert holder.stdout is not None and (await holder.stdout.readline()).strip() == b"locked"
        purging = asyncio.ensure_future(purge(proxy, {"urls": [f"http://{HOST}/k1"]}, wait=HOLD))
        await asyncio.sleep(1.5)  # (the purge waits for the lock)
        assert not purging.done()
        began = time.monotonic()
        proxy.send(signal.SIGTERM)
        assert proxy.process is not None
        try:
            code = await asyncio.wait_for(proxy.process.wait(), 30)  # (grace 10 s by default)
        except TimeoutError:
            raise AssertionError(f"still running {time.monotonic() - began:.0f} s after SIGTERM:\n"
                                 + "\n".join(proxy.lines[-20:])) from None
        assert code == 0
        status, body = await asyncio.wait_for(purging, 5)
        assert status in (0, 503), body  # (503: purge again; 0: cut off by the stop)
        await asyncio.sleep(0.2)
        assert not [line for line in proxy.lines if "Traceback" in line or "ERROR" in line], \
            "\n".join(proxy.lines[-30:])
    finally:
        if holder is not None:
            holder.kill()
            await holder.wait()
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.kill()
