"""``cachegate check`` in a real memory cgroup: a limit above ``cache.memory`` but below what the
processes need besides (100 MB each: ``proxy.config.memory_needed``) is a warning with the figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import MB
from tests.ops.memcg import memory_cgroup
from tests.storage.procs import write_config

pytestmark = pytest.mark.slow


def check(config: str, cgroup_enter: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cgroup_enter, sys.executable, "-m", "proxy", "check", "--config", config],
                          capture_output=True, text=True, timeout=60)


def test_check_warns_of_a_cgroup_limit_that_leaves_too_little_beside_cache_memory(tmp_path: Path) -> None:
    """More than cache.memory, less than cache.memory and 100 MB for each process: a warning at
    cache.memory's line, with the limit needed; nothing refused. With that limit, no warning."""
    config = write_config(str(tmp_path), "http://127.0.0.1:9", "cache: {memory: 32MB, disk: null}\n",
                          "workers: 2\n")
    with memory_cgroup(200 * MB) as cgroup:
        done = check(config, cgroup.enter())
        assert done.returncode == 0, done.stdout + done.stderr
        assert (f"{config}:5: warning: the memory limit of this process's cgroup (200 MB: a container's, a "
                "unit's MemoryMax=) is less than cachegate needs: cache.memory 32 MB + 3 processes (2 workers "
                "and the supervisor) x 100 MB = 332 MB; under load the kernel's OOM killer would end a worker: "
                "raise the limit to 332 MB or more, or set cache.memory or workers lower (what clients that "
                "stop reading hold, up to max_unsent x 2 a worker, and open TLS connections, up to about "
                "650 KB each, come on top: a bound under attack, not counted here)") \
            in done.stdout + done.stderr
        cgroup.set_limit(332 * MB)
        done = check(config, cgroup.enter())
        assert done.returncode == 0 and "warning" not in done.stdout + done.stderr, done.stdout + done.stderr
