"""A SIGHUP (or SIGTERM) that comes as a stop ends is ignored, as docs/deploy.md says: exit 0.

Closing the event loop gave SIGHUP, SIGTERM and SIGINT their default action back (the loop's
handlers removed) before ``cmd_run`` held them again: a SIGHUP in that window (logrotate's
postrotate, ``systemctl reload`` racing a stop) killed the stopped process with status 129,
about 3 stops in 11 with a SIGHUP 0.05-0.1 s after the SIGTERM; and the interpreter's finalization
gives a signal with a Python handler its default action back too. Now a closing loop hands its
signals to the held handlers (``earlysignals.held_at_end``), and the exiting process ignores them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness import Origin, spawn_cachegate, write_config

pytestmark = pytest.mark.slow


def _stop_under_sighups(config: str, workers: str) -> tuple[int, str]:
    """SIGTERM, then a SIGHUP every millisecond from the moment the stop says it is done until
    the process is gone: one of them lands while the loop closes."""
    proc = spawn_cachegate(["run", "--config", config, "--workers", workers, "--log-level", "info"])
    pid = proc.proc.pid
    proc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while "stopped" not in proc.text and proc.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    while proc.proc.poll() is None and time.monotonic() < deadline:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            break
        time.sleep(0.001)
    return proc.wait(), proc.text


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighups_while_a_stop_ends_leave_exit_status_0(origin: Origin, tmp_path: Path, workers: str) -> None:
    config = write_config(str(tmp_path), origin.url)
    for _ in range(3):
        code, text = await asyncio.to_thread(_stop_under_sighups, config, workers)
        assert code == 0, text[-2000:]
