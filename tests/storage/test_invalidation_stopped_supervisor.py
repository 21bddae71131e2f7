"""An unsafe method through a worker while its supervisor is stopped (``SIGSTOP``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.cluster import HOLD_MAX
from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, write_config

pytestmark = pytest.mark.slow

CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n"


async def test_an_invalidation_answers_within_the_hold_while_the_supervisor_is_stopped(
        origin: Origin, tmp_path: Path) -> None:
    """The POST reaches the origin at once; its answer waited for the stopped supervisor's
    fan-out for as long as the supervisor was stopped (30-47 s measured), while a GET waits at
    most ``HOLD_MAX``. Now the worker waits that long, applies the invalidation to the disk and
    the shared memory itself (every worker reads them: the next GET is a miss), answers, and
    says so in its log and in ``cachegate_storage_errors_total{operation="invalidate"}``; the
    supervisor, when it runs again, makes the invalidation as before."""
    version = {"n": 1}

    async def page(request: web.Request) -> web.Response:
        if request.method == "POST":
            version["n"] += 1
            return web.Response(body=b"posted")
        return web.Response(body=b"v%d" % version["n"], headers={"Cache-Control": "max-age=300"})

    origin.route("/p", page)
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE))
    await proxy.start("--workers", "2", with_log=True)
    assert proxy.process is not None
    supervisor = proxy.process.pid
    stopped = False
    try:
        await proxy.wait_for(lambda: len(proxy.workers) == 2 and bool(proxy.admin_url))
        assert (await proxy.get("/p")).body == b"v1"
        for _ in range(50):
            if (await proxy.get("/p")).x_cache == "HIT":
                break
        else:
            raise AssertionError("/p never became a hit")

        os.kill(supervisor, signal.SIGSTOP)
        stopped = True

        async def post() -> tuple[int, bytes]:
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as s, \
                    s.post(proxy.url + "/p", data=b"x", headers={"Host": HOST}) as r:
                return r.status, await r.read()

        # The supervisor stays stopped three times the hold: the answer must come meanwhile.
        posted = asyncio.ensure_future(post())
        done, _ = await asyncio.wait({posted}, timeout=3 * HOLD_MAX)
        assert posted in done, "the POST was not answered while the supervisor was stopped"
        assert posted.result() == (200, b"posted")
        # Still stopped: no worker serves the invalidated v1 (the disk and shared memory lost it).
        for _ in range(4):
            r = await proxy.get("/p")
            assert r.body == b"v2", (r.body, r.x_cache, r.worker)

        os.kill(supervisor, signal.SIGCONT)
        stopped = False
        warning = "the supervisor did not answer an invalidation"
        await proxy.wait_for(lambda: any(warning in line for line in proxy.lines))
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert 'cachegate_storage_errors_total{operation="invalidate"} 1.0' in metrics, [
            x for x in metrics.splitlines() if "storage_errors" in x]
        # The supervisor made the queued invalidation too: a purge now answers as ever.
        reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}/p"]})
        assert reply.status == 200, reply.body
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGCONT)
        await proxy.stop(signal.SIGTERM)
