"""Stampede protection across worker processes: ``cachegate run --workers 2`` as a real process tree.

Clients use fresh connections, so SO_REUSEPORT spreads them over both workers
(``X-Cachegate-Worker`` says which answered). The workers coalesce through the
supervisor's lease broker (proxy/leases.py): one origin fetch per key for the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, Response, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 64MB, disk: {path: cache, size: 256MB, shards: 2}}\n"
BODY = bytes(range(256)) * 1024  # 256 KiB


async def herd(url: str, path: str, n: int) -> list[Response | BaseException]:
    """``n`` concurrent GETs, each on its own new connection."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one() -> Response:
            async with session.get(url + path, headers={"Host": HOST}) as r:
                return Response(r.status, r.headers, await r.read())

        return list(await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True))


def answered(results: list[Response | BaseException]) -> list[Response]:
    return [r for r in results if isinstance(r, Response)]


@pytest.fixture
async def two_workers(tmp_path: Path, origin: Origin) -> AsyncIterator[ProxyProcess]:
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2")
    await proxy.wait_for(lambda: len(proxy.workers) == 2)
    yield proxy
    await proxy.stop()


async def test_500_concurrent_clients_over_two_workers_make_one_origin_request(
        origin: Origin, two_workers: ProxyProcess) -> None:
    origin.route("/cold", body=BODY, headers={"Cache-Control": "max-age=60"}, delay=0.2)
    results = answered(await herd(two_workers.url, "/cold", 500))
    assert len(results) == 500
    assert origin.count("/cold") == 1
    digest = hashlib.sha256(BODY).hexdigest()
    assert {(r.status, hashlib.sha256(r.body).hexdigest()) for r in results} == {(200, digest)}
    workers = Counter(r.worker for r in results)
    assert set(workers) == {"0", "1"}, workers  # both workers had clients
    statuses = Counter(r.x_cache for r in results)
    assert statuses == {"MISS": 1, "HIT": 499}
    metrics = (await two_workers.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_cross_worker_leases_total{event="granted"} 1.0' in metrics
    assert 'cachegate_cross_worker_leases_total{event="stored"} 1.0' in metrics
