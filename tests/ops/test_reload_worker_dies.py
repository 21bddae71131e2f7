"""A worker that dies (kill -9, the OOM killer) while a reload waits for its answer: the reload
used to answer 400 "not in every worker" and count a failure, though the supervisor restarts it
from the copy the reload committed, so it runs the new config. It is now the case of a worker
not running: nothing to report, as the worker restarted shows."""

from __future__ import annotations

import asyncio
import contextlib
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




def _ready_pids(output: list[str]) -> dict[int, int]:
    """Each worker's pid, by worker id, as its first "ready" line says."""
    pids: dict[int, int] = {}
    for line in list(output):
        if m := re.search(r"worker (\d) ready \(pid (\d+)\)", line):
            pids.setdefault(int(m.group(1)), int(m.group(2)))
    return pids


def _metrics(admin_url: str) -> str:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=30) as resp:
        return str(resp.read().decode())


@pytest.mark.slow
async def test_a_worker_killed_during_a_reload_restarts_with_it_and_fails_nothing(
        origin: Origin, tmp_path: Path) -> None:
    origin.route("/v", body=b"v", headers={"Cache-Control": "no-store"})
    config = Path(write_config(str(tmp_path), origin.url, "via: alpha\n"))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", str(config), "--workers", "2",
                                                     "--log-level", "info"])
    try:
        assert proc.admin_url is not None
        assert "alpha" in await asyncio.to_thread(_via, f"{proc.proxy_url}/v")
        pids_by_id = _ready_pids(proc.output)
        pids = list(pids_by_id.values())
        assert len(pids) == 2, proc.text
        for pid in pids:  # stopped: the reload's call waits for them
            os.kill(pid, signal.SIGSTOP)
        config.write_text(config.read_text().replace("via: alpha", "via: beta"))  # noqa: ASYNC240
        reload = asyncio.create_task(asyncio.to_thread(post_reload, proc.admin_url))
        # The supervisor has loaded the config (it says so, then calls the workers at once).
        for _ in range(300):
            if any("worker=supervisor" in line and "config reloaded from" in line for line in proc.output):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the supervisor did not load the config:\n{proc.text}")
        await asyncio.sleep(0.3)  # (its calls to the workers are on their way)
        assert not reload.done()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        status, answer = await reload
        assert status == 200, answer
        assert answer.get("problems") in (None, []), answer
        # Named, though: neither confirmed the reload; their replacements start with it.
        replaced = answer["replaced_workers"]
        assert [(r["worker"], r["pid"], r["cause"], r["exit_status"]) for r in replaced] == [
            (0, pids_by_id[0], "exited", -9), (1, pids_by_id[1], "exited", -9)], answer
        assert replaced[0]["detail"] == (f"worker 0 (pid {pids_by_id[0]}) was killed by SIGKILL during "
                                         "the reload; its replacement starts with the new config"), answer
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


@pytest.mark.slow
async def test_a_hung_worker_the_watchdog_replaces_during_a_reload_is_named_in_its_answer(
        origin: Origin, tmp_path: Path) -> None:
    """A worker hung (SIGSTOP) when a reload comes, and killed by the watchdog (worker_timeout)
    while the reload waits for it: the reload answered a bare 200, as if every worker had
    confirmed it, and only a log line said one was replaced. The answer stays a success (its
    replacement starts with the new config, and every worker then runs it) and names it."""
    origin.route("/v", body=b"v", headers={"Cache-Control": "no-store"})
    config = Path(write_config(str(tmp_path), origin.url, "via: alpha\nworker_timeout: 1s\n"))
    proc = await asyncio.to_thread(spawn_cachegate, ["run", "--config", str(config), "--workers", "2"])
    hung = None
    try:
        assert proc.admin_url is not None
        pids = _ready_pids(proc.output)
        assert sorted(pids) == [0, 1], proc.text
        hung = pids[1]
        config.write_text(config.read_text().replace("via: alpha", "via: beta"))  # noqa: ASYNC240
        os.kill(hung, signal.SIGSTOP)
        status, answer = await asyncio.to_thread(post_reload, proc.admin_url)
        assert status == 200, answer
        assert answer["reloaded"] is True, answer
        assert answer["replaced_workers"] == [{
            "worker": 1, "pid": hung, "cause": "watchdog", "exit_status": -9,
            "detail": f"worker 1 (pid {hung}) was killed by the watchdog (no answer to the supervisor's "
                      "pings for 1 s) during the reload; its replacement starts with the new config"}], answer
        for _ in range(300):
            if sum(" ready (pid" in line for line in proc.output) == 3:
                break
            await asyncio.sleep(0.1)
        assert sum(" ready (pid" in line for line in proc.output) == 3, proc.text
        for _ in range(6):  # both workers, the replacement among them, run the new config
            assert "beta" in await asyncio.to_thread(_via, f"{proc.proxy_url}/v")
        assert "200: applied: 0 rules; replaced worker 1" in proc.text, proc.text
    finally:
        if hung is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert await asyncio.to_thread(proc.stop) == 0, proc.text
