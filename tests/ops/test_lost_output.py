"""Standard output's reader gone (a log shipper that died, a pipe to nobody): the lines for the
operator are lost, nothing else. ``say`` raised BrokenPipeError into what came after its line:
the supervisor's task that restarts a dead worker, its watchdog (right before the kill: the hung
worker kept its share of the port), and the stop (exit 1 with a traceback)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
READY = re.compile(r"worker (\d+) ready \(pid (\d+)\)")


class Run:
    """``cachegate run`` with standard output on a pipe this test reads, then closes."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.err_path = tmp_path / "stderr.log"
        self.out = ""
        self.read_end = -1
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, config: str, *args: str) -> None:
        self.read_end, write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        with open(self.err_path, "wb") as err:  # noqa: ASYNC230 (a file the child writes)
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "run", "--config", config, "--log-level", "warning", *args,
                stdout=write_end, stderr=err, cwd=str(self.tmp_path))
        os.close(write_end)

    async def read_until(self, text: str, wait: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while text not in self.out:
            assert loop.time() < deadline, self.out
            try:
                data = os.read(self.read_end, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.05)
                continue
            assert data, f"standard output ended:\n{self.out}\n{self.err_path.read_text()}"
            self.out += data.decode(errors="replace")

    def lose_reader(self) -> None:
        os.close(self.read_end)

    def children(self) -> set[int]:
        assert self.process is not None
        pid = self.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}

    async def wait_children(self, predicate: object, wait: float = 30.0) -> set[int]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            kids = self.children()
            if predicate(kids):  # type: ignore[operator]
                return kids
            assert loop.time() < deadline, (kids, self.err_path.read_text())
            await asyncio.sleep(0.1)

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            for pid in (*self.children(), self.process.pid):
                os.kill(pid, signal.SIGKILL)


async def test_with_standard_output_gone_a_dead_worker_and_a_hung_one_are_still_replaced_and_the_stop_exits_0(
        origin: Origin, tmp_path: Path) -> None:
    config = write_config(str(tmp_path), origin.url, CACHE, "worker_timeout: 2s\n")
    run = Run(tmp_path)
    await run.start(config, "--workers", "2")
    try:
        await run.read_until("started")
        await run.read_until("worker 1 ready")
        await run.read_until("worker 0 ready")
        pids = {int(w): int(p) for w, p in READY.findall(run.out)}
        run.lose_reader()
        os.kill(pids[0], signal.SIGKILL)  # its exit's line fails to be written: it is restarted all the same
        kids = await run.wait_children(lambda k: len(k) == 2 and pids[0] not in k)
        os.kill(pids[1], signal.SIGSTOP)  # the watchdog's line fails too: it is killed and replaced all the same
        await run.wait_children(lambda k: len(k) == 2 and pids[1] not in k and kids - {pids[1]} <= k)
    finally:
        code = await run.stop()
        run.kill()
    err = run.err_path.read_text()
    assert code == 0, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    assert "did not answer a ping" in err  # (the hung worker was killed by the watchdog, not by the stop)
    assert err.count("writing to standard output (lines dropped meanwhile) failed") == 1, err


async def test_a_single_process_whose_standard_output_is_gone_stops_with_status_0(
        origin: Origin, tmp_path: Path) -> None:
    run = Run(tmp_path)
    await run.start(write_config(str(tmp_path), origin.url, CACHE))
    try:
        await run.read_until("started")
        run.lose_reader()
    finally:
        code = await run.stop()
        run.kill()
    err = run.err_path.read_text()
    assert code == 0, err
    assert "Traceback" not in err, err
