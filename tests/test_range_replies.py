"""Replies to ranges and parts through the proxy, against a real origin: the fields a 206 or a
416 carries (RFC 9110 §14.4), a 304 nobody asked for, only-if-cached answered by a part."""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import quote

import pytest
from aiohttp import web

from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy, Reply

BODY = bytes(i % 251 for i in range(1000))


def ranges(reply: Reply) -> list[str]:
    return list(reply.headers.getall("Content-Range", ()))


async def test_a_206_or_416_cut_from_a_200_with_a_stray_content_range_carries_only_this_cache_s_own(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """An origin's 200 carrying ``Content-Range: bytes 0-9/1000`` (meaningless on a 200, RFC
    9110 §14.4): every 206 and 416 cut from it carried that one first, then cachegate's; a
    client reading the first placed ``bytes=5-9`` at offset 0. The 200 itself is relayed and
    served as the origin sent it (RFC 9111 §3.1 stores every field)."""
    stray = {"Cache-Control": "max-age=3600", "ETag": '"v1"', "Content-Range": "bytes 0-9/1000"}
    origin.route("/cr", body=BODY, headers=stray)
    origin.route("/cr-cold", body=BODY, headers=stray)
    proxy: Proxy = await make_proxy()
    fill = await proxy.get("/cr")
    assert (fill.status, fill.x_cache, ranges(fill), fill.body) == (200, "MISS", ["bytes 0-9/1000"], BODY)
    await asyncio.sleep(0.1)  # stored as the fill's answer ends
    hit = await proxy.get("/cr")
    assert (hit.status, hit.x_cache, ranges(hit)) == (200, "HIT", ["bytes 0-9/1000"])
    part = await proxy.get("/cr", headers={"Range": "bytes=5-9"})
    assert (part.status, part.x_cache, ranges(part), part.body) == (206, "HIT", ["bytes 5-9/1000"], BODY[5:10])
    beyond = await proxy.get("/cr", headers={"Range": "bytes=5000-"})
    assert (beyond.status, ranges(beyond)) == (416, ["bytes */1000"])
    cold = await proxy.get("/cr-cold", headers={"Range": "bytes=100-"})  # cut from the fill as it arrives
    assert (cold.status, ranges(cold), cold.body) == (206, ["bytes 100-999/1000"], BODY[100:])


@pytest.mark.parametrize("range_fill", ["whole", "none"])
async def test_an_origin_304_to_a_range_request_without_conditions_is_a_502_as_to_a_fill(
        origin: Origin, make_proxy: MakeProxy, range_fill: str) -> None:
    """cachegate's own Range request (a part's fetch) carries no validators: a 304 to it is
    the origin's fault, as one to a fill is (RFC 9110 §15.4.5), and was relayed to a client
    that sent no conditional."""
    origin.route("/unasked", status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
    proxy: Proxy = await make_proxy(config=f"cache: {{range_fill: {range_fill}}}\n")
    whole = await proxy.get("/unasked")
    part = await proxy.get("/unasked", headers={"Range": "bytes=5-9"})
    assert "Range" in origin.seen[-1].headers  # the range went to the origin alone
    assert (part.status, part.cache_status) == (whole.status, whole.cache_status) == (
        502, "cachegate; fwd=uri-miss; detail=UPSTREAM-INVALID"), (part, whole)


async def ranged(request: web.Request) -> web.Response:
    """``BODY``, fresh for an hour, a single range ``bytes=first-last`` of it as a 206."""
    headers = {"Cache-Control": "max-age=3600", "ETag": '"v1"'}
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
    if m is None:
        return web.Response(body=BODY, headers=headers)
    first, last = int(m.group(1)), min(int(m.group(2)), len(BODY) - 1)
    return web.Response(status=206, body=BODY[first:last + 1],
                        headers={**headers, "Content-Range": f"bytes {first}-{last}/{len(BODY)}"})


async def test_only_if_cached_is_answered_by_a_fresh_stored_part_that_holds_the_range(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """RFC 9111 §5.2.1.7: only-if-cached asks for a stored response, and a fresh part holding
    the range is one (without only-if-cached the range is a HIT from it): it got a 504."""
    origin.route("/oic", ranged)
    proxy: Proxy = await make_proxy(config="cache: {range_fill: none}\n")
    assert (await proxy.get("/oic", headers={"Range": "bytes=0-99"})).status == 206
    await asyncio.sleep(0.1)  # stored as the answer ends
    only = {"Cache-Control": "only-if-cached"}
    hit = await proxy.get("/oic", headers={"Range": "bytes=5-9", **only})
    assert (hit.status, hit.x_cache, ranges(hit), hit.body) == (206, "HIT", ["bytes 5-9/1000"], BODY[5:10])
    beyond = await proxy.get("/oic", headers={"Range": "bytes=200-209", **only})
    assert (beyond.status, beyond.cache_status) == (504, "cachegate; detail=ONLY-IF-CACHED")
    assert origin.count("/oic") == 1
    query = f"url={quote(proxy.url + '/oic')}&headers={quote(json.dumps({'Range': 'bytes=5-9', **only}))}"
    explained = json.loads((await proxy.admin("GET", "/explain?" + query)).body)["decision"]
    assert (explained["action"], explained["status"], explained["x_cache_status"]) == ("serve", 206, "HIT")


async def test_a_206_cut_from_a_stored_200_that_said_accept_ranges_none_says_bytes(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The origin's ``Accept-Ranges: none`` kept on the 206 cachegate made contradicted it."""
    origin.route("/ar", body=BODY, headers={"Cache-Control": "max-age=3600", "Accept-Ranges": "none"})
    proxy: Proxy = await make_proxy()
    assert (await proxy.get("/ar")).headers.getall("Accept-Ranges") == ["none"]  # the 200, as sent
    await asyncio.sleep(0.1)
    part = await proxy.get("/ar", headers={"Range": "bytes=5-9"})
    assert (part.status, part.x_cache, part.headers.getall("Accept-Ranges")) == (206, "HIT", ["bytes"])
    cold = await proxy.get("/ar?cold", headers={"Range": "bytes=5-9"})  # cut from the fill as it arrives
    assert (cold.status, cold.headers.getall("Accept-Ranges")) == (206, ["bytes"])
