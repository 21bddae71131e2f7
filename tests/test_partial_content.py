"""Partial content through the proxy: 206 parts stored and reused, combined into a complete
response under one strong validator, never across two; a range miss answered at once.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from aiohttp import web

from tests.admin.test_metrics import scrape, value
from tests.conftest import MakeProxy
from tests.harness import Clock, Origin, Proxy, directory_ready
from tests.test_conditional_fills import flights_over

BODY = bytes(range(48, 58))  # b"0123456789"
NONE = "cache: {memory: 64MB, range_fill: none, disk: {path: cache, size: 512MB, shards: 2}}\n"


class Representation:
    """An origin resource that honours single byte ranges, with a strong ETag it can change."""

    def __init__(self, body: bytes = BODY, etag: str | None = '"v1"') -> None:
        self.body, self.etag = body, etag
        self.ranges: list[str | None] = []  # the Range of each request received

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.ranges.append(rng)
        headers = {"Cache-Control": "max-age=3600", "Content-Type": "application/octet-stream"}
        if self.etag is not None:
            headers["ETag"] = self.etag
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if m is None:
            return web.Response(body=self.body, headers=headers)
        size = len(self.body)
        if m.group(1) == "":
            first, last = max(0, size - int(m.group(2))), size - 1
        else:
            first, last = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return web.Response(status=206, body=self.body[first:last + 1], headers=headers)


async def get(proxy: Proxy, rng: str | None = None) -> tuple[int, str, str | None, bytes]:
    reply = await proxy.get("/r", headers={"Range": rng} if rng else {})
    return reply.status, reply.x_cache, reply.headers.get("Content-Range"), reply.body


async def test_a_stored_part_answers_the_ranges_it_covers(origin: Origin, make_proxy: MakeProxy) -> None:
    rep = Representation()
    origin.route("/r", rep)
    proxy = await make_proxy(config=NONE)
    assert await get(proxy, "bytes=2-6") == (206, "MISS", "bytes 2-6/10", b"23456")
    assert rep.ranges == ["bytes=2-6"]  # the range went to the origin, not a whole fetch
    assert await get(proxy, "bytes=3-5") == (206, "HIT", "bytes 3-5/10", b"345")
    assert await get(proxy, "bytes=2-6") == (206, "HIT", "bytes 2-6/10", b"23456")
    assert len(rep.ranges) == 1
    assert (await get(proxy, "bytes=0-3"))[1] == "MISS"  # reaches before the part


async def test_parts_with_one_strong_etag_combine_into_the_complete_response(
        origin: Origin, make_proxy: MakeProxy) -> None:
    rep = Representation()
    origin.route("/r", rep)
    proxy = await make_proxy(config=NONE)
    await get(proxy, "bytes=0-4")
    assert await get(proxy, "bytes=5-") == (206, "MISS", "bytes 5-9/10", b"56789")
    await asyncio.sleep(0.1)  # the combined response is stored as the client's answer ends
    assert await get(proxy) == (200, "HIT", None, BODY)  # complete: no origin request
    assert await get(proxy, "bytes=-3") == (206, "HIT", "bytes 7-9/10", b"789")
    assert rep.ranges == ["bytes=0-4", "bytes=5-"]


async def test_each_part_stored_is_a_fill_as_a_whole_response_stored_is(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A 206 stored (its Cache-Status says ``stored``, the next request for its range is a HIT)
    is counted in cachegate_fills_total, alone or combined with a part held before: an
    object stored is a fill, whatever its status (it moved no counter at all)."""
    rep = Representation()
    origin.route("/r", rep)
    proxy = await make_proxy(config=NONE)
    before = await scrape(proxy)
    first = await proxy.get("/r", headers={"Range": "bytes=0-4"})
    assert first.status == 206 and "stored" in first.headers["Cache-Status"].split("; ")
    assert await get(proxy, "bytes=0-4") == (206, "HIT", "bytes 0-4/10", b"01234")
    middle = await scrape(proxy)
    assert value(middle, "cachegate_fills_total") - value(before, "cachegate_fills_total") == 1
    await get(proxy, "bytes=5-")  # combined with the first: the complete response is stored
    await asyncio.sleep(0.1)  # (stored as the client's answer ends)
    assert await get(proxy) == (200, "HIT", None, BODY)
    after = await scrape(proxy)
    assert value(after, "cachegate_fills_total") - value(before, "cachegate_fills_total") == 2
    assert value(after, "cachegate_flights_total", outcome="filled") \
        == value(before, "cachegate_flights_total", outcome="filled")  # no flight: no flight counted


async def test_parts_combined_under_a_hit_for_pass_key_are_served_by_the_general_path_too(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """The key was passed as private by a request that found nothing stored (hit-for-pass: its
    plain requests skip the lookup), then turned public and was stored as two parts that add up
    to the complete response, without a flight. The fast path serves that; so does the general
    path (a request with ``Connection: close``, which the fast path leaves to it), and the mark
    is gone."""
    rep = Representation()
    private = True

    async def page(request: web.Request) -> web.StreamResponse:
        if private:
            return web.Response(body=b"private", headers={"Cache-Control": "private, max-age=100"})
        return await rep(request)

    origin.route("/r", page)
    proxy = await make_proxy(config=NONE.replace("range_fill: none,", "range_fill: none, hit_for_pass: 30s,"))
    await directory_ready(proxy)  # "found nothing" needs it
    assert await get(proxy) == (200, "MISS", None, b"private")
    host = proxy.url.removeprefix("http://")
    coalescer = proxy.runtime.engine.coalescer
    assert coalescer.passes_unlooked(f"http://{host}/r")
    private = False
    await get(proxy, "bytes=0-4")
    assert await get(proxy, "bytes=5-") == (206, "MISS", "bytes 5-9/10", b"56789")
    for _ in range(100):  # the combined response is stored as the client's answer ends
        if not coalescer.passes_unlooked(f"http://{host}/r"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the hit-for-pass mark outlived the complete response stored")
    general = await proxy.get("/r", headers={"Connection": "close"})
    assert (general.status, general.x_cache, general.body) == (200, "HIT", BODY)
    assert await get(proxy) == (200, "HIT", None, BODY)
    assert rep.ranges == ["bytes=0-4", "bytes=5-"]


async def test_parts_of_two_etags_are_never_combined(origin: Origin, make_proxy: MakeProxy) -> None:
    rep = Representation()
    origin.route("/r", rep)
    proxy = await make_proxy(config=NONE)
    await get(proxy, "bytes=0-4")
    rep.body, rep.etag = b"ABCDEFGHIJ", '"v2"'  # the representation changed in between
    assert await get(proxy, "bytes=5-9") == (206, "MISS", "bytes 5-9/10", b"FGHIJ")
    await asyncio.sleep(0.1)
    status, x_cache, _, body = await get(proxy)
    assert (status, x_cache, body) == (200, "MISS", b"ABCDEFGHIJ")  # never b"01234FGHIJ"


async def test_a_part_without_a_validator_is_reused_within_itself(origin: Origin, make_proxy: MakeProxy) -> None:
    rep = Representation(etag=None)
    origin.route("/r", rep)
    proxy = await make_proxy(config=NONE)
    assert await get(proxy, "bytes=-5") == (206, "MISS", "bytes 5-9/10", b"56789")
    assert await get(proxy, "bytes=6-8") == (206, "HIT", "bytes 6-8/10", b"678")
    assert await get(proxy, "bytes=-1") == (206, "HIT", "bytes 9-9/10", b"9")


@pytest.mark.parametrize("body", [b"567", b"56789XYZ"], ids=["short", "long"])
async def test_a_part_whose_body_disagrees_with_its_range_is_neither_stored_nor_combined(
        origin: Origin, make_proxy: MakeProxy, body: bytes) -> None:
    """The origin frames the 206 by its own Content-Length (the client gets it as sent), but
    its body is not the 5 bytes its Content-Range says: combined with the part held, it would
    make a "complete" 200 with every byte after it shifted."""
    rep = Representation()

    async def lying(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range") == "bytes=5-9":
            rep.ranges.append("bytes=5-9")
            return web.Response(status=206, body=body, headers={
                "Cache-Control": "max-age=3600", "ETag": '"v1"', "Content-Range": "bytes 5-9/10",
                "Content-Type": "application/octet-stream"})
        return await rep(request)

    origin.route("/r", lying)
    proxy = await make_proxy(config=NONE)
    assert await get(proxy, "bytes=0-4") == (206, "MISS", "bytes 0-4/10", b"01234")
    bad = await proxy.get("/r", headers={"Range": "bytes=5-9"})
    assert (bad.status, bad.x_cache, bad.headers.get("Content-Range"), bad.body) == (206, "MISS", "bytes 5-9/10", body)
    # Its Content-Length says it before its body: the head does not claim it is stored.
    assert bad.cache_status == "cachegate; fwd=uri-miss; fwd-status=206; detail=LENGTH-MISMATCH"
    await asyncio.sleep(0.1)  # as long as a good part takes to be combined and stored
    assert await get(proxy, "bytes=1-3") == (206, "HIT", "bytes 1-3/10", b"123")  # the good one stays
    assert await get(proxy, "bytes=6-8") == (206, "MISS", "bytes 6-8/10", b"678")  # the bad one is not
    assert await get(proxy) == (200, "MISS", None, BODY)  # nor anything complete
    assert rep.ranges == ["bytes=0-4", "bytes=5-9", "bytes=6-8", None]


async def test_a_range_miss_is_answered_before_the_whole_object_arrives(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """range_fill: whole. The whole object's body is held back by the origin until the client
    has its range: were the range answered from the whole fill, this would never finish."""
    size = 256 * 1024
    data = bytes(i % 251 for i in range(size))
    answered = asyncio.Event()
    rep = Representation(data)

    async def resource(request: web.Request) -> web.StreamResponse:
        if "Range" in request.headers:
            return await rep(request)
        rep.ranges.append(None)
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=3600", "ETag": '"v1"',
                                           "Content-Length": str(size)})
        await resp.prepare(request)
        await resp.write(data[: size // 2])
        await asyncio.wait_for(answered.wait(), 10)
        await resp.write(data[size // 2:])
        await resp.write_eof()
        return resp

    origin.route("/r", resource)
    proxy = await make_proxy()
    status, x_cache, content_range, body = await asyncio.wait_for(get(proxy, "bytes=200000-200009"), 5)
    answered.set()
    assert (status, x_cache, content_range, body) == (206, "MISS", f"bytes 200000-200009/{size}",
                                                      data[200000:200010])
    for _ in range(100):  # the whole object, fetched in the background, is stored
        await asyncio.sleep(0.05)
        reply = await proxy.get("/r", headers={"Range": "bytes=0-9"})
        if reply.x_cache == "HIT":
            break
    assert (reply.status, reply.x_cache, reply.body) == (206, "HIT", data[:10])
    full = await proxy.get("/r")
    assert (full.status, full.x_cache, full.body) == (200, "HIT", data)
    assert sorted(map(str, rep.ranges)) == ["None", "bytes=200000-200009"]  # the range, then the whole


async def test_a_purge_of_the_url_removes_its_parts(origin: Origin, make_proxy: MakeProxy) -> None:
    rep = Representation()
    origin.route("/r", rep)
    proxy = await make_proxy(config=NONE)
    await get(proxy, "bytes=2-6")
    assert (await get(proxy, "bytes=3-4"))[1] == "HIT"
    reply = await proxy.admin("POST", "/purge", json={"urls": [proxy.url + "/r"]})
    assert reply.status == 200, reply.body
    assert (await get(proxy, "bytes=3-4"))[1] == "MISS"


def test_range_fill_is_whole_or_none(tmp_path: object) -> None:
    from pathlib import Path

    import pytest

    from proxy.config import load_config
    from proxy.errors import ConfigError

    config = Path(str(tmp_path)) / "c.yaml"
    config.write_text("upstreams: [{url: 'http://127.0.0.1:9'}]\ncache: {range_fill: none}\n")
    assert load_config(str(config)).cache.range_fill == "none"
    config.write_text("upstreams: [{url: 'http://127.0.0.1:9'}]\ncache:\n  range_fill: slice\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(config))
    assert f"{config}:3: cache.range_fill: must be one of whole, none, got 'slice'" in err.value.problems


async def test_a_part_stored_under_allow_set_cookie_never_replays_the_cookie(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """A 206 is stored as its complete response would be: without the Set-Cookie that was for
    the client whose range caused the fill, alone or combined into the complete response."""
    rep = Representation()

    async def with_cookie(request: web.Request) -> web.StreamResponse:
        resp = await rep(request)
        resp.headers["Set-Cookie"] = "session=for-the-first-client"
        return resp

    origin.route("/r", with_cookie)
    proxy = await make_proxy(config=NONE, rules="""
        rules:
          - {name: cookies are harmless here, match: {path: /r}, allow_set_cookie: true}
    """)
    first = await proxy.get("/r", headers={"Range": "bytes=0-4"})
    assert (first.status, first.x_cache) == (206, "MISS")
    assert first.headers.get("Set-Cookie") == "session=for-the-first-client"  # its own cookie
    again = await proxy.get("/r", headers={"Range": "bytes=1-3"})
    assert (again.status, again.x_cache, again.body) == (206, "HIT", b"123")
    assert "Set-Cookie" not in again.headers
    await proxy.get("/r", headers={"Range": "bytes=5-"})
    await asyncio.sleep(0.1)  # the combined response is stored as the client's answer ends
    whole = await proxy.get("/r")
    assert (whole.status, whole.x_cache, whole.body) == (200, "HIT", BODY)
    assert "Set-Cookie" not in whole.headers


async def test_a_heads_range_is_ignored_rfc_9110_section_14_2(origin: Origin, make_proxy: MakeProxy) -> None:
    # GET is the only method range handling is defined for: a HEAD with Range is answered
    # as a HEAD without it (the stored 200's head), never a 206.
    origin.route("/r", Representation())
    proxy = await make_proxy(config=NONE)
    assert (await get(proxy))[:2] == (200, "MISS")
    head = await proxy.request("HEAD", "/r", headers={"Range": "bytes=2-5"})
    assert (head.status, head.x_cache, head.headers.get("Content-Range")) == (200, "HIT", None)
    assert head.headers["Content-Length"] == str(len(BODY))


async def test_a_206_to_a_request_without_range_is_an_invalid_response(
    origin: Origin, make_proxy: MakeProxy, clock: Clock
) -> None:
    """A fill sends no Range: a 206 to it is the origin's fault (RFC 9110 §15.3.7), a 502 for
    every client of the fetch (or the stored response under stale-if-error), as Varnish fails
    such a fetch; never relayed as if it were the whole response. Ranges cachegate asks for
    itself are answered by 206s as before."""
    partial = {"on": False}

    async def handler(request: web.Request) -> web.Response:
        rng = request.headers.get("Range")
        if rng is not None:  # a range asked for: the right answer is a 206
            first, last = (int(n) for n in rng.removeprefix("bytes=").split("-"))
            return web.Response(status=206, body=BODY[first:last + 1], headers={
                "Content-Range": f"bytes {first}-{last}/{len(BODY)}", "Cache-Control": "max-age=60"})
        if partial["on"]:
            await asyncio.sleep(0.1)  # the clients of one key meanwhile join its fetch
            return web.Response(status=206, body=b"PARTIAL", headers={
                "Content-Range": "bytes 0-6/100", "Cache-Control": "max-age=300"})
        return web.Response(body=b"whole", headers={"Cache-Control": "max-age=10, stale-if-error=60"})

    for path in ("/p", "/s", "/r"):
        origin.route(path, handler)
    proxy = await make_proxy(config=NONE)
    proxy.runtime.engine.clock = clock
    assert (await proxy.get("/s")).body == b"whole"
    partial["on"] = True
    replies = await asyncio.gather(*[proxy.get("/p") for _ in range(3)])
    assert [r.status for r in replies] == [502] * 3 and b"PARTIAL" not in b"".join(r.body for r in replies)
    # The leader's fetch, then one for the two that had joined it (docs/upstreams.md): an
    # invalid response may be what the leader's request caused.
    assert origin.count("/p") == 2
    assert (await proxy.get("/p")).status == 502 and origin.count("/p") == 3  # nothing stored
    clock.advance(30)  # /s is stale, within stale-if-error
    stale = await proxy.get("/s")
    assert (stale.status, stale.body, stale.x_cache) == (200, b"whole", "STALE")
    ranged = await proxy.get("/r", headers={"Range": "bytes=2-5"})
    assert (ranged.status, ranged.body, ranged.headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")


async def test_a_suffix_range_of_an_empty_representation_gets_the_empty_200(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """RFC 9110 §14.1.1: on an empty representation a suffix range is the one satisfiable form,
    and no 206 can state it: the 200 answers it (nginx too), on the miss and on the hit. It was
    a 416 with ``Content-Range: bytes */0``; ``bytes=0-`` stays 416."""
    origin.route("/r", body=b"", headers={"Cache-Control": "max-age=3600", "ETag": '"e"'})
    proxy = await make_proxy()
    assert await get(proxy, "bytes=-5") == (200, "MISS", None, b"")
    assert await get(proxy, "bytes=-5") == (200, "HIT", None, b"")
    assert await get(proxy, "bytes=0-") == (416, "HIT", "bytes */0", b"")


async def test_a_whole_fetch_an_origin_answers_with_a_206_is_said_counted_and_not_tried_again(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """range_fill: whole, an origin that answers 206 to every request, one without Range too. Each
    range miss's storable 206 sent the whole fetch behind it, which failed (a 206 to a request
    without Range is an invalid response) with no client to tell: nothing in the error log,
    and the next range miss started one again. The failure is one warning, counted as the
    invalid response it is, and the key is hit-for-pass for ``cache.hit_for_pass``: the next
    ranges go to the origin alone, never behind another whole fetch."""
    seen: list[str | None] = []

    async def always_206(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Range"))
        return web.Response(status=206, body=bytes(100), headers={
            "Cache-Control": "max-age=3600", "ETag": '"v1"', "Content-Range": "bytes 0-99/1000"})

    origin.route("/a", always_206)
    proxy = await make_proxy(config="cache: {memory: 64MB, range_fill: whole, hit_for_pass: 1h, "
                                    "disk: {path: cache, size: 512MB, shards: 2}}\n"
                                    "upstream: {retries: 0}\n")
    before = await scrape(proxy)
    with caplog.at_level(logging.WARNING, logger="cachegate"):
        for i in range(3):
            reply = await proxy.get("/a", headers={"Range": f"bytes={200 + i}-{200 + i}"})
            assert (reply.status, reply.headers["Content-Range"]) == (206, "bytes 0-99/1000")
            await flights_over(proxy)
    assert seen == ["bytes=200-200", None, "bytes=201-201", "bytes=202-202"], seen
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "206 Partial Content to a request without Range" in warnings[0], warnings
    assert "/a" in warnings[0], warnings
    after = await scrape(proxy)
    grew = value(after, "cachegate_upstream_errors_total", upstream=origin.url, kind="protocol") \
        - value(before, "cachegate_upstream_errors_total", upstream=origin.url, kind="protocol")
    assert grew == 1


@pytest.mark.parametrize("sent", [150, 50], ids=["longer", "shorter"])
async def test_a_chunked_part_whose_body_disagrees_with_its_content_range_is_counted_not_stored(
        origin: Origin, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture, sent: int) -> None:
    """A chunked 206 (no Content-Length) says ``bytes 0-99/1000`` and sends another length. Its
    head went out saying ``stored`` (its length is known only once its body has ended, as a
    fill's with no Content-Length: a documented limit); it was then dropped with no count. It
    is counted in cachegate_not_stored_total (LENGTH-MISMATCH, as one whose Content-Length
    disagrees up front) and the debug log says it was not kept; nothing is stored."""
    seen: list[str | None] = []

    async def chunked_206(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Range"))
        resp = web.StreamResponse(status=206, headers={
            "Cache-Control": "max-age=3600", "ETag": '"v1"', "Content-Range": "bytes 0-99/1000"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"x" * sent)
        await resp.write_eof()
        return resp

    origin.route("/c", chunked_206)
    proxy = await make_proxy(config=NONE)
    before = await scrape(proxy)
    with caplog.at_level(logging.DEBUG, logger="cachegate"):
        reply = await proxy.get("/c", headers={"Range": "bytes=0-99"})
        await flights_over(proxy)
    assert (reply.status, reply.body) == (206, b"x" * sent)  # relayed as the origin framed it
    assert "stored" in reply.headers["Cache-Status"].split("; ")  # said before its body came
    after = await scrape(proxy)
    assert value(after, "cachegate_not_stored_total", reason="LENGTH-MISMATCH") \
        - value(before, "cachegate_not_stored_total", reason="LENGTH-MISMATCH") == 1
    assert value(after, "cachegate_fills_total") == value(before, "cachegate_fills_total")
    said = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert len(said) == 1 and "/c" in said[0] and "LENGTH-MISMATCH" in said[0], said
    again = await proxy.get("/c", headers={"Range": "bytes=0-99"})
    assert again.x_cache == "MISS"
    assert seen == ["bytes=0-99", "bytes=0-99"]


async def test_ranges_that_joined_a_whole_fetch_an_origin_answers_with_a_206_ask_their_own(
        origin: Origin, make_proxy: MakeProxy) -> None:
    """range_fill: whole, an origin that answers each Range with its 206 and a request without
    Range with a 206 too. Ranges of a cold key at once: the first leads (its range, then the
    whole fetch behind it); the others joined that whole fetch, and got its error, a 502
    UPSTREAM-INVALID, where the origin serves their ranges: each asks for its own now."""
    body = bytes(i % 251 for i in range(1000))
    seen: list[str | None] = []

    async def ranges_only(request: web.Request) -> web.Response:
        rng = request.headers.get("Range")
        seen.append(rng)
        await asyncio.sleep(0.2)  # (the herd arrives meanwhile)
        first, last = (int(x) for x in (rng or "bytes=0-99").removeprefix("bytes=").split("-"))
        return web.Response(status=206, body=body[first:last + 1], headers={
            "Cache-Control": "max-age=3600", "ETag": '"v1"', "Content-Range": f"bytes {first}-{last}/1000"})

    origin.route("/a", ranges_only)
    proxy = await make_proxy(config="cache: {memory: 64MB, range_fill: whole, hit_for_pass: 1h}\n"
                                    "upstream: {retries: 0}\n")
    lead = asyncio.ensure_future(proxy.get("/a", headers={"Range": "bytes=0-9"}))
    for _ in range(500):
        if seen:
            break
        await asyncio.sleep(0.01)
    herd = await asyncio.gather(*(proxy.get("/a", headers={"Range": f"bytes={i * 10}-{i * 10 + 9}"})
                                  for i in range(1, 6)))
    assert ((await lead).status, (await lead).body) == (206, body[:10])
    assert [(r.status, r.body) for r in herd] == [(206, body[i * 10:i * 10 + 10]) for i in range(1, 6)]
    assert seen.count(None) == 1 and len(seen) == 7, seen  # one whole fetch; each range asked once
