"""A stale-if-error fill whose stored response is purged while the origin is asked: the
client gets the origin's own error, as a cache without the stored response would answer.

Before: the flight chose the stored response over the origin's 500 when the head came, found
it purged, and answered 502 ``detail=ORIGIN-ERROR``, neither the stored response nor the
origin's."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import MakeProxy
from tests.harness import Origin


@pytest.mark.parametrize(("disk", "ask"), [(False, "GET"), (True, "GET"), (True, "HEAD"), (True, "If-None-Match")],
                         ids=["memory", "disk", "disk-HEAD", "disk-conditional"])
async def test_a_stale_response_purged_while_the_origin_fails_gives_the_origins_own_error(
        origin: Origin, make_proxy: MakeProxy, disk: bool, ask: str) -> None:
    """A HEAD or a conditional request opens no body: they were answered from the purged
    response (a 304 told the client its copy of purged content was still good)."""
    origin.route("/s", body=b"stored copy", headers={"Cache-Control": "max-age=1, stale-if-error=600",
                                                     "ETag": '"v1"'})
    config = "cache: {memory: 16MB, disk: {path: cache, size: 64MB, shards: 2}}\n" if disk else \
        "cache: {memory: 16MB, disk: null}\n"
    proxy = await make_proxy(config=config)
    assert (await proxy.get("/s")).x_cache == "MISS"
    # Stored: a HIT, or EXPIRED when a loaded machine took over a second (stored again then).
    assert (await proxy.get("/s")).x_cache in ("HIT", "EXPIRED")
    await asyncio.sleep(1.2)  # stale now
    asked_before = origin.count("/s")
    origin.route("/s", status=500, body=b"the origin's own error", delay=0.5,
                 headers={"Content-Type": "text/plain"})
    if ask == "HEAD":
        asked = asyncio.create_task(proxy.request("HEAD", "/s"))
    else:
        asked = asyncio.create_task(proxy.get("/s", headers={"If-None-Match": '"v1"'} if ask != "GET" else None))
    for _ in range(100):
        if origin.count("/s") == asked_before + 1:
            break
        await asyncio.sleep(0.01)
    purged = await proxy.admin("POST", "/purge", json={"urls": [proxy.url + "/s"]})
    assert purged.status == 200, purged.body
    r = await asked
    own = b"" if ask == "HEAD" else b"the origin's own error"
    assert (r.status, r.body) == (500, own), (r.status, r.body, r.headers.get("Cache-Status"))
    again = await proxy.get("/s")
    assert (again.status, again.body) == (500, b"the origin's own error")
