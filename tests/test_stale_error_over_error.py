"""Only a stored non-error response hides an origin error (real ``cachegate run``, the shipped
rules' ``stale_if_error: 1h``, a real origin, a real second of waiting).

A stored 503 with a lifetime, once stale, was served ``STALE`` (its old body, without the
origin's new ``Retry-After``) in place of the origin's new 503, for the rules' whole hour:
the lookup's stale-if-error lacked the stored-status test that keeping the stored response
over an error had (docs/caching.md: "a stale 503 is never preferred over the origin's new one").
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.harness import Origin
from tests.storage.procs import ProxyProcess, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CACHE = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 1}}\n"


async def started(origin: Origin, tmp_path: Path, page: Any) -> ProxyProcess:
    """A real ``cachegate run`` with the shipped rules in front of ``page`` at ``/p``."""
    origin.route("/p", page)
    rules = f"rules: [{ROOT / 'rules' / 'default.yaml'}]\n"
    proxy = ProxyProcess(str(tmp_path), write_config(str(tmp_path), origin.url, CACHE, rules))
    await proxy.start()
    return proxy


CASES = {
    # (first answer's status, the later answers' fields, the request's fields, what the client gets)
    "a stored 503, a new 503 without Cache-Control": (503, {"Retry-After": "7"}, {}, "new"),
    "a stored 503, a storable new 503 to a request with Authorization":
        (503, {"Retry-After": "7", "Cache-Control": "max-age=1"}, {"Authorization": "Bearer bob"}, "new"),
    "a stored 200 still hides the new 503": (200, {"Retry-After": "7"}, {}, "stale"),
}


@pytest.mark.parametrize(("first", "later", "request_fields", "expected"), CASES.values(), ids=CASES.keys())
async def test_a_stale_stored_error_is_never_served_in_place_of_the_origins_new_one(
        origin: Origin, tmp_path: Path, first: int, later: dict[str, str], request_fields: dict[str, str],
        expected: str) -> None:
    answers = 0

    async def page(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        if answers == 1:
            return web.Response(status=first, text="answer 1\n", headers={"Cache-Control": "max-age=1"})
        return web.Response(status=503, text=f"answer {answers}\n", headers=later)

    proxy = await started(origin, tmp_path, page)
    try:
        stored = await proxy.get("/p")
        assert (stored.status, stored.body) == (first, b"answer 1\n")
        assert stored.headers["Cache-Status"].endswith("; stored")
        await asyncio.sleep(1.2)  # max-age=1: stale now, within the rules' stale_if_error hour
        r = await proxy.get("/p", headers=request_fields)
        assert answers == 2
        if expected == "new":
            assert (r.status, r.body, r.headers.get("Retry-After")) == (503, b"answer 2\n", "7"), \
                r.headers.get("Cache-Status")
            assert r.x_cache != "STALE" and "detail=ORIGIN-ERROR" not in r.headers["Cache-Status"]
        else:
            assert (r.status, r.body, r.x_cache) == (200, b"answer 1\n", "STALE")
            assert r.headers["Cache-Status"].endswith("detail=ORIGIN-ERROR")
    finally:
        await proxy.stop()


async def test_a_stored_error_with_stale_while_revalidate_is_revalidated_first(
        origin: Origin, tmp_path: Path) -> None:
    """A stored 503 with the origin's stale-while-revalidate=600 was served ``UPDATING`` (its old
    body, no Retry-After) for ten minutes while the origin's new 503 said Retry-After: 77, and
    stood in for the 502 once the origin was down. Now every request gets the origin's answer."""
    answers = 0

    async def page(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        if answers == 1:
            return web.Response(status=503, text="answer 1\n",
                                headers={"Cache-Control": "max-age=1, stale-while-revalidate=600"})
        return web.Response(status=503, text=f"answer {answers}\n", headers={"Retry-After": "77"})

    proxy = await started(origin, tmp_path, page)
    try:
        stored = await proxy.get("/p")
        assert stored.headers["Cache-Status"].endswith("; stored")
        await asyncio.sleep(1.2)  # stale, within its stale-while-revalidate
        for n in (2, 3):
            r = await proxy.get("/p")
            assert (r.status, r.body, r.headers.get("Retry-After")) == (503, f"answer {n}\n".encode(), "77"), \
                (r.x_cache, r.headers.get("Cache-Status"))
            assert r.x_cache not in ("UPDATING", "STALE") and answers == n
        await origin.stop(hold_port=True)
        down = await proxy.get("/p")
        assert down.status == 502 and down.body != b"answer 1\n", (down.x_cache, down.headers.get("Cache-Status"))
    finally:
        await proxy.stop()
