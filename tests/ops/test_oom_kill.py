"""cachegate at the memory limit of its cgroup (a container's, a unit's MemoryMax=), in a real
memory cgroup: the kernel's OOM killer ends a worker, which the supervisor restarts and says why,
not the supervisor (it touches the memory tier's pages as much as a worker, and its death took
every worker with it: nothing logged, nothing restarted)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.settings import MB
from tests.harness import Origin
from tests.ops.memcg import memory_cgroup
from tests.storage.procs import HOST, ProxyProcess, write_config

pytestmark = pytest.mark.slow

BODY = 900 * 1024  # bodies as big as the memory tier stores (memory_max_object 1MB)
KEYS = 200  # 180 MB: far more than the 32 MB memory tier and the cgroup's room above it
OOM_LINE = re.compile(r"worker (\d) \(pid (\d+)\) exited with -9 \(SIGKILL: likely the kernel's OOM killer, its "
                      r"cgroup's count of OOM kills rose while it ran \(the memory limit of its cgroup: [\d.]+ MB; it needs cache\.memory 32 MB \+ 3 processes "
                      r"\(2 workers and the supervisor\) x 100 MB = 332 MB\)\); restarting")


async def fill(url: str, keys: range, until: object) -> None:
    """GET every key (8 at a time) until ``until()``; a worker killed meanwhile resets some."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as s:
        queue = list(keys)

        async def client() -> None:
            while queue and not until():  # type: ignore[operator]
                key = queue.pop(0)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with s.get(f"{url}/b{key}", headers={"Host": HOST}) as r:
                        await r.read()

        await asyncio.gather(*(client() for _ in range(8)))


async def test_at_the_memory_limit_the_oom_killer_ends_a_worker_which_is_restarted_not_the_supervisor(
        origin: Origin, tmp_path: Path) -> None:
    body = os.urandom(BODY)
    for key in range(KEYS):
        origin.route(f"/b{key}", body=body, headers={"Cache-Control": "max-age=3600"})
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 32MB, memory_max_object: 1MB, max_object: 1MB, "
                          "disk: {path: disk, size: 1GB}}\n")
    with memory_cgroup() as cgroup:
        proxy = ProxyProcess(str(tmp_path), config, program=(*cgroup.enter(), sys.executable, "-m", "proxy"))
        try:
            await proxy.start("--workers", "2", with_log=True)
            await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
            assert proxy.process is not None
            supervisor = proxy.process.pid  # (the shell exec'd it)
            first = dict(proxy.workers)
            assert sorted(cgroup.procs()) == sorted([supervisor, *first.values()])
            # A limit a little above what it needs at rest: the memory tier (32 MB, never given
            # back) does not fit, and the kernel's OOM killer has to end a process.
            cgroup.set_limit(cgroup.usage() + 24 * MB)
            await fill(proxy.url, range(KEYS), lambda: cgroup.oom_kills() > 0)
            assert cgroup.oom_kills() > 0, f"no OOM kill at {cgroup.usage()} bytes used"
            # The supervisor lives, and said which worker the OOM killer ended, and why.
            await proxy.wait_for(lambda: any(OOM_LINE.search(line) for line in proxy.lines))
            cgroup.set_limit(None)  # room again, as an operator gives it: the restarted worker stays
            assert proxy.process.returncode is None
            killed = next(m for line in proxy.lines if (m := OOM_LINE.search(line)))
            worker, pid = int(killed.group(1)), int(killed.group(2))
            assert first[worker] == pid
            # ... and restarted it: both workers serve, and /healthz says so.
            await proxy.wait_for(lambda: proxy.workers[worker] != pid)
            await proxy.wait_for(lambda: all(p in cgroup.procs() for p in proxy.workers.values()))

            for _ in range(300):
                health = await proxy.admin("GET", "/healthz")
                if health.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert health.status == 200, health.body
            for _ in range(4):  # either worker (SO_REUSEPORT picks one per connection)
                reply = await proxy.get("/b0")
                assert reply.status == 200 and reply.body == body
            assert await proxy.stop() == 0
        except TimeoutError:
            raise AssertionError("\n".join(proxy.lines)) from None
        finally:
            await proxy.kill()


# Another program of the cgroup: it makes itself the OOM killer's first choice, then takes memory
# until the kernel ends it.
HOG = ("open('/proc/self/oom_score_adj', 'w').write('1000')\n"
       "kept = []\n"
       "while True: kept.append(bytearray(1 << 20))")


async def test_a_kill_9_after_another_processes_oom_kill_is_a_plain_sigkill(origin: Origin, tmp_path: Path) -> None:
    """The OOM-kill counter is the cgroup's: the supervisor compared it with its value at the
    supervisor's start, so once any process of the cgroup had been OOM-killed (another program
    of the container), an operator's ``kill -9`` of a worker started after that was said to be
    the OOM killer's. A kill counted before the worker started is not its own."""
    config = write_config(str(tmp_path), origin.url, "cache: {memory: 16MB, disk: {path: disk, size: 64MB}}\n")
    with memory_cgroup() as cgroup:
        proxy = ProxyProcess(str(tmp_path), config, program=(*cgroup.enter(), sys.executable, "-m", "proxy"))
        try:
            await proxy.start("--workers", "2", with_log=True)
            await proxy.wait_for(lambda: len(proxy.workers) == 2)
            cgroup.set_limit(cgroup.usage() + 64 * MB)
            hog = await asyncio.create_subprocess_exec(*cgroup.enter(), sys.executable, "-c", HOG)
            assert await asyncio.wait_for(hog.wait(), 60) == -signal.SIGKILL
            cgroup.set_limit(None)
            assert cgroup.oom_kills() == 1
            assert all(p in cgroup.procs() for p in proxy.workers.values())  # the hog alone was ended
            # Worker 1 starts again after that kill (stopped by a SIGTERM sent to it) ...
            old = proxy.workers[1]
            os.kill(old, signal.SIGTERM)
            await proxy.wait_for(lambda: proxy.workers[1] != old and f"worker 1 ready (pid {proxy.workers[1]})"
                                 in "\n".join(proxy.lines))
            # ... and an operator's kill -9 of it is a plain SIGKILL.
            pid = proxy.workers[1]
            os.kill(pid, signal.SIGKILL)
            await proxy.wait_for(lambda: proxy.workers[1] != pid)
            said = [line for line in proxy.lines if f"(pid {pid}) exited" in line]
            assert said and all("exited with -9 (killed by SIGKILL); restarting" in line for line in said), said
            assert cgroup.oom_kills() == 1
            assert await proxy.stop() == 0
        except TimeoutError:
            raise AssertionError("\n".join(proxy.lines)) from None
        finally:
            await proxy.kill()
