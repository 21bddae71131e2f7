"""A worker that dies (kill -9, the OOM killer) while a reload waits for its answer: the reload
used to answer 400 "not in every worker" and count a failure, though the supervisor restarts it
from the copy the reload committed, so it runs the new config. It is now the case of a worker
not running: nothing to report, as the worker restarted shows."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness import Origin, post_reload, spawn_cachegate, write_config


def _via(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.headers.get("Via", ""))




def _metrics(admin_url: str) -> str:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=30) as resp:
        return str(resp.read().decode())


@pytest.mark.slow
async def test_a_worker_killed_during_a_reload_restarts_with_it_and_fails_nothing(
        origin: Origin, tmp_path: Path) -> None:
    origin.route("/v", body=b"v", headers={"Cache-Control": "no-store"})
    config = Path(write_config(str(tmp_path), origin.url, "via: alpha\n"))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", str(config), "--workers", "2"])
    try:
        assert proc.admin_url is not None
        assert "alpha" in await asyncio.to_thread(_via, f"{proc.proxy_url}/v")
        pids = [int(m.group(1)) for line in list(proc.output)
                if (m := re.search(r"worker \d ready \(pid (\d+)\)", line))]
        assert len(pids) == 2, proc.text
        for pid in pids:  # stopped: the reload's call waits for them
            os.kill(pid, signal.SIGSTOP)
        config.write_text(config.read_text().replace("via: alpha", "via: beta"))  # noqa: ASYNC240
        reload = asyncio.create_task(asyncio.to_thread(post_reload, proc.admin_url))
        await asyncio.sleep(1.5)  # the supervisor has loaded the config and called the workers
        assert not reload.done()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        status, answer = await reload
        assert status == 200, answer
        assert answer.get("problems") in (None, []), answer
        for _ in range(300):
            if sum(" ready (pid" in line for line in proc.output) == 4:
                break
            await asyncio.sleep(0.1)
        assert sum(" ready (pid" in line for line in proc.output) == 4, proc.text
        # Only restarted workers run: they run the config the reload said it applied.
        for _ in range(6):
            assert "beta" in await asyncio.to_thread(_via, f"{proc.proxy_url}/v")
        totals = await asyncio.to_thread(_metrics, proc.admin_url)
        assert 'cachegate_config_reloads_total{result="success"} 1.0' in totals, totals
        assert not re.search(r'cachegate_config_reloads_total\{result="failure"\} [1-9]', totals), totals
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.text
