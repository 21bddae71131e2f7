"""What the supervisor of ``cachegate run --workers 2`` says when a worker's process ends without
its asking: a real supervisor, real workers, real signals."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def test_a_worker_stopped_by_a_sigterm_sent_to_it_is_a_warning_that_says_so_not_a_crash(
        origin: Origin, tmp_path: Path) -> None:
    """``kill -TERM <worker>`` (an operator, an OOM tool) stops the worker cleanly (status 0),
    and it is restarted: said at ERROR as "exited with 0; restarting", a crash it was not."""
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        pid = proxy.workers[1]
        os.kill(pid, signal.SIGTERM)
        await proxy.wait_for(lambda: proxy.workers[1] != pid)  # restarted
        said = [line for line in proxy.lines if f"(pid {pid})" in line]
        log_line = re.compile(rf"WARNING .*worker 1 \(pid {pid}\) was stopped by a SIGTERM sent to it "
                              r"\(not by the supervisor\); restarting in [\d.]+s")
        assert any(log_line.search(line) for line in said), said
        assert f"cachegate: worker 1 (pid {pid}) was stopped by a SIGTERM sent to it (not by the supervisor); " \
               "restarting" in said, said
        assert not any("ERROR" in line or "exited with" in line for line in said), said
    finally:
        assert await proxy.stop() == 0, proxy.lines
