"""A soft-purged page while the origin fails: served at once, then as any stale page (real
``cachegate run`` processes, a real origin).

A soft purge promises that the next request gets the old copy at once (``UPDATING``, detail
``SOFT-PURGED``) while one request revalidates it in the background. That refresh failing
(the origin answering 500, or gone) left the copy served ``UPDATING`` to every request, however
stale, for as long as the origin failed: `max-age=60`, no stale permission, no rules, still
UPDATING after 30 days, where the same page un-purged got the origin's 500. Once a refresh of
the soft-purged copy has failed, it is now an ordinary stale response: served stale only within
its own windows or the rules' (STALE on an origin error), else the origin's error. With two
workers each learns it from its own failed refresh.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import HOST, ProxyProcess, Response, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 1}}\n"
ADMIN = "{listen: '127.0.0.1:0', purge_from: [127.0.0.0/8]}"


class Page:
    """``/p``: ``max-age=60`` (or ``cc``) with an ETag and a version in its body, until told to fail."""

    def __init__(self, cc: str) -> None:
        self.cc, self.version, self.failing, self.served = cc, 1, False, 0

    async def __call__(self, request: web.Request) -> web.Response:
        self.served += 1
        if self.failing:
            return web.Response(status=500, text="origin is failing\n", headers={"Retry-After": "120"})
        return web.Response(text=f"version {self.version}\n", headers={
            "Cache-Control": self.cc, "ETag": f'"v{self.version}"'})


async def start(origin: Origin, tmp_path: Path, *args: str, rules: bool = False) -> ProxyProcess:
    extra = f"rules: [{ROOT / 'rules' / 'default.yaml'}]\n" if rules else ""
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, extra, admin=ADMIN))
    await proxy.start(*args)
    workers = 2 if "--workers" in args else 0
    await proxy.wait_for(lambda: bool(proxy.admin_url) and len(proxy.workers) >= workers)
    return proxy


async def soft_purge(proxy: ProxyProcess) -> None:
    reply = await proxy.admin("POST", "/purge", json={"urls": [f"http://{HOST}/p"], "soft": True})
    assert (reply.status, json.loads(reply.body)) == (200, {"purged": 1, "soft": True})


async def explained(proxy: ProxyProcess) -> dict[str, Any]:
    reply = await proxy.admin("GET", f"/explain?url={quote(f'http://{HOST}/p')}")
    assert reply.status == 200, reply.body
    decision: dict[str, Any] = json.loads(reply.body)["decision"]
    return decision


async def until_not_updating(proxy: ProxyProcess, wait: float = 20.0) -> tuple[list[Response], Response]:
    """GETs until one is not UPDATING (its background refresh has ended by then), for ``wait``
    seconds at most: those that were, and the first that was not."""
    updating: list[Response] = []
    deadline = asyncio.get_running_loop().time() + wait
    while asyncio.get_running_loop().time() < deadline:
        r = await proxy.get("/p")
        if r.x_cache != "UPDATING":
            return updating, r
        updating.append(r)
        await asyncio.sleep(0.02)
    raise AssertionError(f"still UPDATING after {len(updating)} requests: {updating[-1].headers.get('Cache-Status')}")


CASES = {
    # (response Cache-Control, the shipped rules, status after the failed refresh, X-Cache-Status)
    "no stale permission, no rules: the origin's 500": ("max-age=60", False, 500, "EXPIRED"),
    "the rules' stale_if_error: STALE, as a stale page": ("max-age=60", True, 200, "STALE"),
    "max-age=0: the rules' windows never apply": ("max-age=0", True, 500, "EXPIRED"),
    "its own stale-if-error: STALE": ("max-age=60, stale-if-error=600", False, 200, "STALE"),
}


@pytest.mark.parametrize(("cc", "rules", "status", "x_cache"), CASES.values(), ids=CASES.keys())
async def test_a_soft_purged_page_is_served_at_once_then_as_any_stale_page_while_the_origin_fails(
        origin: Origin, tmp_path: Path, cc: str, rules: bool, status: int, x_cache: str) -> None:
    page = Page(cc)
    origin.route("/p", page)
    proxy = await start(origin, tmp_path, rules=rules)
    try:
        assert (await proxy.get("/p")).x_cache == "MISS"
        await soft_purge(proxy)
        page.failing = True
        first = await proxy.get("/p")  # the purge's promise: the old copy at once, refreshed behind
        assert (first.status, first.x_cache, first.body) == (200, "UPDATING", b"version 1\n")
        assert "detail=SOFT-PURGED" in first.headers["Cache-Status"]
        _, after = await until_not_updating(proxy)
        assert (after.status, after.x_cache) == (status, x_cache), after.headers.get("Cache-Status")
        if status == 200:
            assert after.body == b"version 1\n" and "detail=ORIGIN-ERROR" in after.headers["Cache-Status"]
        else:
            assert after.body == b"origin is failing\n"
        # Each request now asks the origin, as for a stale page that was never purged.
        served = page.served
        again = await proxy.get("/p")
        assert (again.status, again.x_cache) == (status, x_cache)
        assert page.served == served + 1
        why = (await explained(proxy))["why"]
        assert "its background refresh failed" in why
        # (It said "(none applies)" beside the stale-if-error it serves STALE by.)
        assert ("(none applies)" in why) == (status != 200), why
        assert ("if the origin fails, the stored response is served (stale-if-error)" in why) == (status == 200)

        # The origin mended, the operator soft-purges again: the old copy at once, once more,
        # while one request refreshes it; then the new version.
        page.failing, page.version = False, 2
        await soft_purge(proxy)
        again = await proxy.get("/p")
        assert (again.x_cache, again.body) == ("UPDATING", b"version 1\n")
        _, fresh = await until_not_updating(proxy)
        assert (fresh.status, fresh.body) == (200, b"version 2\n")
    finally:
        await proxy.stop()


async def test_a_soft_purged_page_with_the_origin_gone_gets_a_502_once_its_refresh_failed(
        origin: Origin, tmp_path: Path) -> None:
    page = Page("max-age=60")
    origin.route("/p", page)
    proxy = await start(origin, tmp_path)
    try:
        await proxy.get("/p")
        await soft_purge(proxy)
        await origin.stop(hold_port=True)  # connections refused
        assert (await proxy.get("/p")).x_cache == "UPDATING"
        _, after = await until_not_updating(proxy)
        assert after.status == 502 and b"version" not in after.body, after.headers.get("Cache-Status")
    finally:
        await proxy.stop()


async def test_with_two_workers_each_serves_the_soft_purged_page_at_once_until_its_own_refresh_failed(
        origin: Origin, tmp_path: Path) -> None:
    """The memory of the failed refresh is each worker's (as the refresh's wait is): a worker
    that has not tried serves the old copy at once and refreshes it itself (or, while the other
    worker refreshes it, only serves it). Once its own refresh failed, the origin's error."""
    page = Page("max-age=60")
    origin.route("/p", page)
    proxy = await start(origin, tmp_path, "--workers", "2")
    try:
        await proxy.get("/p")
        await soft_purge(proxy)
        page.failing = True
        errored: set[str] = set()
        late: list[str] = []
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            r = await proxy.get("/p")  # a new connection each: either worker
            assert r.worker, "no X-Cachegate-Worker"
            if r.x_cache == "UPDATING":
                assert r.body == b"version 1\n"
                if r.worker in errored:
                    late.append(r.headers["Cache-Status"])
            else:
                assert (r.status, r.x_cache, r.body) == (500, "EXPIRED", b"origin is failing\n")
                errored.add(r.worker)
                if len(errored) == 2:
                    break
            await asyncio.sleep(0.01)
        assert len(errored) == 2, f"workers that gave the origin's error: {errored}"
        assert not late, f"UPDATING again after the origin's error in that worker: {late}"
    finally:
        await proxy.stop()


async def test_explain_of_a_soft_purged_page_whose_refresh_is_held_back_says_soft_purged(
        origin: Origin, tmp_path: Path) -> None:
    """Within its stale-while-revalidate after a failed refresh, GET /explain said "stale by
    -0s" of a soft-purged page that was still fresh."""
    page = Page("max-age=60, stale-while-revalidate=600")
    origin.route("/p", page)
    proxy = await start(origin, tmp_path)
    try:
        await proxy.get("/p")
        await soft_purge(proxy)
        page.failing = True  # its 500 says Retry-After: 120: the next refresh waits
        assert (await proxy.get("/p")).x_cache == "UPDATING"
        await proxy.wait_for(lambda: page.served == 2)
        decision: dict[str, Any] = {}

        async def held() -> bool:
            decision.update(await explained(proxy))
            return "refresh_held_back" in decision
        for _ in range(100):
            if await held():
                break
            await asyncio.sleep(0.05)
        assert decision["why"].startswith("soft-purged: served at once; no background request"), decision
        assert "-0s" not in decision["why"]
    finally:
        await proxy.stop()
