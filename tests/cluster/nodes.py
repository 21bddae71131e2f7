"""cachegate nodes of a cluster as real ``cachegate run`` subprocesses (tests/storage/procs.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.storage.procs import ProxyProcess, Response, write_config

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


class Nodes:
    """Nodes of one cluster (a namespace of their own in Redis), each in its own folder."""

    def __init__(self, base: str, origin_url: str, redis_url: str, top: str = "", cache: str = CACHE,
                 **cluster: Any) -> None:
        self.base = base
        self.top = top  # top-level config lines of every node
        self.cache = cache  # their cache: line
        self.origin_url = origin_url
        self.redis_url = redis_url
        self.namespace = f"t{uuid.uuid4().hex[:8]}"
        self.cluster = {"ack_timeout": "3s", "heartbeat": "0.3s", **cluster}
        self.procs: dict[str, ProxyProcess] = {}

    def config(self, name: str, **overrides: Any) -> str:
        directory = os.path.join(self.base, name)
        os.makedirs(directory, exist_ok=True)
        cluster = {"redis": self.redis_url, "node": name, "namespace": self.namespace, **self.cluster,
                   **overrides}
        return write_config(directory, self.origin_url, self.cache, f"cluster: {json.dumps(cluster)}\n" + self.top)

    async def start(self, name: str, *args: str, with_log: bool = False, **overrides: Any) -> ProxyProcess:
        """``with_log``: its error log among its ``lines`` too (``ProxyProcess.start``)."""
        proc = ProxyProcess(os.path.join(self.base, name), self.config(name, **overrides))
        self.procs[name] = proc
        await proc.start(*args, with_log=with_log)
        await proc.wait_for(lambda: bool(proc.admin_url))
        return proc

    async def refused(self, name: str, **overrides: Any) -> str:
        """Run node ``name``, which must not start (``cachegate run`` exits 1): its standard error."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", self.config(name, **overrides),
            cwd=os.path.join(self.base, name), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ))
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1, err.decode()
        return err.decode()

    def __getitem__(self, name: str) -> ProxyProcess:
        return self.procs[name]

    async def stop_all(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs.values() if p.process is not None
                               and p.process.returncode is None), return_exceptions=True)


async def admin_json(proc: ProxyProcess, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    r: Response = await proc.admin(method, path, **kwargs)
    return r.status, json.loads(r.body)


async def purge(proc: ProxyProcess, **spec: Any) -> tuple[int, Any]:
    return await admin_json(proc, "POST", "/purge", json=spec)


async def metrics(proc: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await proc.admin("GET", "/metrics")).body.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def wait_until(check: Any, wait: float = 15.0, every: float = 0.05) -> None:
    """Poll ``await check()`` until it is true (AssertionError after ``wait`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    last: Any = None
    while loop.time() < deadline:
        last = await check()
        if last:
            return
        await asyncio.sleep(every)
    raise AssertionError(f"not true within {wait}s (last: {last!r})")


async def cluster_view(proc: ProxyProcess) -> Any:
    return (await admin_json(proc, "GET", "/cluster"))[1]
