"""The engine driven alone: a fake store, a scripted origin, a clock moved by hand (``fakes``).

Each test names the engine's behaviour it holds to; the end-to-end tests beside it
(tests/test_*.py) check the same through real sockets and a real disk."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.replies import Planned
from tests.engine.fakes import ORIGIN, answer, make_rig, read, upstream_error

CACHEABLE = {"Cache-Control": "max-age=60"}


async def test_a_miss_is_fetched_stored_and_then_served_from_the_store(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"hello", headers=CACHEABLE))
    first = await rig.get("/a")
    assert (first.status, first.x_cache, await read(first)) == (200, "MISS", b"hello")
    assert "stored" in dict(first.headers)["Cache-Status"]
    await rig.settled(filled=1)
    assert [e.url for e in rig.store.puts] == ["http://site.test/a"]
    rig.clock.advance(30)
    second = await rig.get("/a")
    assert (second.status, second.x_cache, await read(second)) == (200, "HIT", b"hello")
    assert dict(second.headers)["Age"] == "30"
    assert rig.origin.count("/a") == 1
    await rig.engine.close()


async def test_the_origin_gets_the_request_without_the_clients_hop_by_hop_fields(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"x", headers=CACHEABLE))
    await rig.get("/a", {"Connection": "X-Secret", "X-Secret": "1", "Accept": "text/plain"})
    sent = rig.origin.sent[0]
    assert (sent.method, sent.target) == ("GET", "/a")
    assert "X-Secret" not in sent.headers and sent.headers["Accept"] == "text/plain"
    assert sent.headers["Via"] == "1.1 cachegate"
    await rig.engine.close()


async def test_two_concurrent_misses_make_one_origin_request_and_both_get_the_body(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    gate = asyncio.Event()
    rig.origin.route("/a", answer(body=b"shared body", headers=CACHEABLE, gate=gate))
    leader = asyncio.create_task(rig.get("/a"))
    await rig.origin.arrived.wait()
    follower = asyncio.create_task(rig.get("/a"))
    await asyncio.sleep(0)  # the follower joins the leader's flight
    gate.set()
    a, b = await leader, await follower
    assert (a.x_cache, await read(a)) == ("MISS", b"shared body")
    assert (b.x_cache, await read(b)) == ("HIT", b"shared body")
    assert "collapsed" in dict(b.headers)["Cache-Status"]
    assert rig.origin.count("/a") == 1
    await rig.settled(filled=1)
    await rig.engine.close()


@pytest.mark.parametrize(("error", "status", "detail"), [
    (upstream_error(), 502, "UPSTREAM-UNREACHABLE"),
    (UpstreamTimeout(f"{ORIGIN}: read timeout"), 504, "UPSTREAM-TIMEOUT"),
])
async def test_an_unreachable_origin_is_a_gateway_error_naming_why(
        tmp_path: Path, error: Exception, status: int, detail: str) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(error=error))
    reply = await rig.get("/a")
    assert reply.status == status
    assert f"detail={detail}" in dict(reply.headers)["Cache-Status"]
    assert ORIGIN not in (await read(reply)).decode()  # the address is for the operator's log only
    await rig.settled(unreachable=1)
    assert rig.store.variants == {}
    await rig.engine.close()


async def test_stale_if_error_serves_the_stored_response_when_the_origin_is_unreachable(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"kept", headers={"Cache-Control": "max-age=10, stale-if-error=600"}),
                     answer(error=upstream_error()))
    assert await read(await rig.get("/a")) == b"kept"
    rig.clock.advance(60)  # stale now
    reply = await rig.get("/a")
    assert (reply.status, reply.x_cache, await read(reply)) == (200, "STALE", b"kept")
    assert "detail=ORIGIN-UNREACHABLE" in dict(reply.headers)["Cache-Status"]
    await rig.settled(filled=1, unreachable=1)
    await rig.engine.close()


async def test_stale_if_error_serves_the_stored_response_for_an_origin_5xx(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"kept", headers={"Cache-Control": "max-age=10, stale-if-error=600"}),
                     answer(503, b"down"))
    await read(await rig.get("/a"))
    rig.clock.advance(60)
    reply = await rig.get("/a")
    assert (reply.status, reply.x_cache, await read(reply)) == (200, "STALE", b"kept")
    assert "fwd-status=503" in dict(reply.headers)["Cache-Status"]
    assert [c.entry.response.status for c in rig.store.variants[next(iter(rig.store.variants))]] == [200]
    await rig.engine.close()


async def test_a_stale_response_that_must_revalidate_is_a_504_when_the_origin_is_unreachable(
        tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"kept", headers={"Cache-Control": "max-age=10, must-revalidate",
                                                          "ETag": '"v1"'}),
                     answer(error=upstream_error()))
    await read(await rig.get("/a"))
    rig.clock.advance(60)
    reply = await rig.get("/a")
    assert reply.status == 504
    assert "detail=STALE-NOT-ALLOWED" in dict(reply.headers)["Cache-Status"]
    await rig.engine.close()


async def test_a_304_to_a_revalidation_freshens_the_stored_response_and_keeps_its_body(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"v1 body", headers={"Cache-Control": "max-age=10", "ETag": '"v1"',
                                                             "X-Version": "1"}),
                     answer(304, headers={"Cache-Control": "max-age=100", "ETag": '"v1"', "X-Version": "2"},
                            reason="Not Modified"))
    await read(await rig.get("/a"))
    rig.clock.advance(20)
    reply = await rig.get("/a")
    assert (reply.status, reply.x_cache, await read(reply)) == (200, "REVALIDATED", b"v1 body")
    assert rig.origin.sent[1].headers["If-None-Match"] == '"v1"'
    assert dict(reply.headers)["X-Version"] == "2"
    await rig.settled(filled=1, freshened=1)
    assert len(rig.store.updates) == 1 and len(rig.store.puts) == 1  # headers updated, body not rewritten
    rig.clock.advance(50)  # fresh for 100 s from the 304
    hit = await rig.get("/a")
    assert (hit.x_cache, await read(hit)) == ("HIT", b"v1 body")
    assert rig.origin.count("/a") == 2
    await rig.engine.close()


async def test_a_200_to_a_revalidation_replaces_the_stored_response(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"old", headers={"Cache-Control": "max-age=10", "ETag": '"v1"'}),
                     answer(body=b"new", headers={"Cache-Control": "max-age=10", "ETag": '"v2"'}))
    await read(await rig.get("/a"))
    rig.clock.advance(20)
    reply = await rig.get("/a")
    assert (reply.x_cache, await read(reply)) == ("EXPIRED", b"new")
    await rig.settled(filled=2)
    assert rig.store.bodies() == [b"new"]
    await rig.engine.close()


@pytest.mark.parametrize(("headers", "detail"), [
    ({"Cache-Control": "no-store"}, "NO-STORE"),
    ({"Cache-Control": "private, max-age=60"}, "PRIVATE"),
    ({"Cache-Control": "max-age=60", "Set-Cookie": "session=abc"}, "SET-COOKIE"),
])
async def test_what_no_store_private_or_set_cookie_forbid_is_never_stored(
        tmp_path: Path, headers: dict[str, str], detail: str) -> None:
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"yours", headers=headers))
    for _ in range(2):
        reply = await rig.get("/a")
        assert (reply.status, reply.x_cache, await read(reply)) == (200, "MISS", b"yours")
        assert f"detail={detail}" in dict(reply.headers)["Cache-Status"]
    assert rig.store.variants == {} and rig.store.puts == []
    assert rig.origin.count("/a") == 2
    await rig.engine.close()


async def test_a_follower_of_a_private_response_fetches_its_own(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    gate = asyncio.Event()
    rig.origin.route("/a", answer(body=b"for the leader", headers={"Cache-Control": "private"}, gate=gate),
                     answer(body=b"for the follower", headers={"Cache-Control": "private"}))
    leader = asyncio.create_task(rig.get("/a"))
    await rig.origin.arrived.wait()
    follower = asyncio.create_task(rig.get("/a"))
    await asyncio.sleep(0)
    gate.set()
    assert await read(await leader) == b"for the leader"
    assert await read(await follower) == b"for the follower"
    assert rig.origin.count("/a") == 2
    await rig.engine.close()


async def test_an_origin_body_that_breaks_off_stores_nothing_and_fails_every_client(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    gate = asyncio.Event()
    body = b"x" * 300_000  # streamed to the leader and the follower, not sent whole
    rig.origin.route("/a", answer(body=body, headers=CACHEABLE, chunk=100_000, break_after=2, gate=gate))
    leader = asyncio.create_task(rig.get("/a"))
    await rig.origin.arrived.wait()
    follower = asyncio.create_task(rig.get("/a"))
    await asyncio.sleep(0)
    gate.set()
    for reply in (await leader, await follower):
        assert reply.length == len(body)  # a truncated body is never ended as if complete
        with pytest.raises(UpstreamError):
            await read(reply)
    await rig.settled(broke_off=1)
    assert rig.store.variants == {} and rig.store.puts == []
    await rig.engine.close()


async def test_a_small_body_that_breaks_off_is_a_gateway_error_for_the_leader_too(tmp_path: Path) -> None:
    # Sent whole, its head with it: nothing of the 200 went out, so the client gets the error
    # (never the 200 ended as if complete, nor a 200 that claims it was stored, then cut off).
    rig = make_rig(tmp_path)
    rig.origin.route("/a", answer(body=b"0123456789", headers=CACHEABLE, chunk=5, break_after=1))
    reply = await rig.get("/a")
    assert reply.status == 502 and "stored" not in dict(reply.headers)["Cache-Status"]
    await rig.settled(broke_off=1)
    assert rig.store.variants == {}
    await rig.engine.close()


async def test_a_full_disk_passes_the_response_on_unstored(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.store.full = True
    rig.origin.route("/a", answer(body=b"hello", headers=CACHEABLE))
    reply = await rig.get("/a")
    assert (reply.status, await read(reply)) == (200, b"hello")
    await rig.settled(passed=1)
    assert rig.store.variants == {}
    assert rig.engine.write_failures.streak == 1
    await rig.engine.close()


async def test_a_plan_the_fast_path_made_is_taken_only_under_the_rules_it_was_made_with(tmp_path: Path) -> None:
    """A request the fast path left brings its rule plan and cache key (``ClientRequest.planned``):
    the engine takes them while its rules are those, and plans again after a reload."""
    rig = make_rig(tmp_path)
    for path in ("/a", "/b"):
        rig.origin.route(path, answer(body=b"x", headers=CACHEABLE))
    request = rig.request("/a")
    plan, key = rig.engine.planned(request.head) or (None, "")
    assert plan is not None
    # A key the rules would not give, to see which one the engine used.
    await rig.engine.handle(replace(request, planned=Planned(rig.engine.rules, plan, key + "#planned")))
    await rig.settled(filled=1)
    assert rig.store.puts[-1].key == key + "#planned"
    request = rig.request("/b")
    plan, key = rig.engine.planned(request.head) or (None, "")
    assert plan is not None
    reloaded = copy.copy(rig.engine.rules)  # what a reload leaves behind: another rule set
    await rig.engine.handle(replace(request, planned=Planned(reloaded, plan, key + "#planned")))
    await rig.settled(filled=2)
    assert rig.store.puts[-1].key == key
    await rig.engine.close()
