"""A reload of ``cachegate run --workers 2`` logs the config's warnings once (real processes)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

# max_object (100 MB by default) more than half a disk shard: a config warning on every load.
CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"
WARNED = "more than the store can keep"


async def test_a_reload_says_each_config_warning_once_not_once_per_process(
        origin: Origin, tmp_path: Path) -> None:
    """With two workers each reload said each warning three times: the supervisor, which
    checks the file, and each worker as it applied it."""
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2", "--log-level", "info", with_log=True)
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2)
        proxy.send(signal.SIGHUP)
        await proxy.wait_for(lambda: sum("config reloaded" in line for line in proxy.lines) >= 3)
    finally:
        await proxy.stop()
    said = [line for line in proxy.lines if "reload: " in line and WARNED in line]
    assert len(said) == 1, said
