"""A worker that does not acknowledge a purge: the supervisor's log says why it kills it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def test_a_worker_silent_through_a_purge_is_killed_with_the_reason_in_the_log(
        origin: Origin, tmp_path: Path) -> None:
    """A stopped worker answers no purge: after the acknowledgement's limit (10 s) the
    supervisor kills it, and its log line names the reason (a timeout's text is empty: the line
    said "did not acknowledge a purge ()")."""
    origin.route("/p", body=b"p", headers={"Cache-Control": "max-age=300"})
    # The ping's limit longer than the purge's, so that the purge is what finds it silent.
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE,
                                                     "worker_timeout: 120s\n"))
    await proxy.start("--workers", "2", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        assert (await proxy.get("/p")).status == 200
        stopped = proxy.workers[0]
        os.kill(stopped, signal.SIGSTOP)
        reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}/p"]})
        assert reply.status == 200, reply.body
        await proxy.wait_for(lambda: proxy.workers[0] != stopped, wait=30)
        line = next(x for x in proxy.lines if "did not acknowledge a purge" in x)
        assert "worker 0 did not acknowledge a purge (no answer within 10 s); killing it" in line, line
    finally:
        await proxy.stop(signal.SIGTERM)
