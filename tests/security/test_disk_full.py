"""A full disk while a response is being received for the store (ENOSPC while spooling).

The store is abandoned, never the clients: every client of the fill gets the whole body,
the failure is counted (metrics, ``/stats``) and logged once per streak, and the next fill
stores again once there is room. Two disks: a spool file whose writes fail with ENOSPC past
the room left (the OS boundary the spool writes through: works everywhere), and a real tmpfs
of a few MiB (only where the test may mount one: root on Linux).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest

from proxy.storage.failures import SETTLE
from tests.conftest import MakeProxy
from tests.harness import Origin, Proxy
from tests.security.misbehaving import Conn, RawOrigin, Serve, flight_with, raw_origins, response
from tests.test_partial_content import NONE, Representation
from tests.tmpfs import mounted_tmpfs

BODY = os.urandom(4 * 1024 * 1024)  # spilled from memory to a spool file past 1 MiB
DIGEST = hashlib.sha256(BODY).hexdigest()
PIECE = 128 * 1024


class FullDisk:
    """A spool file on a disk with ``room`` bytes left: a write past it fails with ENOSPC,
    as the OS fails it; everything else is the real file's."""

    def __init__(self, real: IO[bytes], room: int) -> None:
        self._real = real
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def big_origin(go: asyncio.Event) -> Serve:
    async def serve(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(response("200 OK", {"Cache-Control": "max-age=600"}, length=False)[:-2]
                            + f"Content-Length: {len(BODY)}\r\n\r\n".encode())
            await go.wait()  # the body once both clients are on the flight
            for i in range(0, len(BODY), PIECE):
                await conn.send(BODY[i:i + PIECE])

    return serve


async def two_clients_on_one_fill(proxy: Proxy, origin: RawOrigin, go: asyncio.Event) -> list[str]:
    """Two clients on one fill of /big (the second joins before any body byte): their bodies' digests."""
    go.clear()
    leader = asyncio.ensure_future(proxy.get("/big"))
    await flight_with(proxy, followers=0)
    follower = asyncio.ensure_future(proxy.get("/big"))
    flight = await flight_with(proxy, followers=1)
    go.set()
    replies = await asyncio.wait_for(asyncio.gather(leader, follower), 20)  # nobody left hanging
    assert [r.status for r in replies] == [200, 200]
    await asyncio.wait_for(asyncio.shield(flight.result), 20)
    return [hashlib.sha256(r.body).hexdigest() for r in replies]


def storage_stats(text: bytes) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(text)["storage"]
    return stats


def spool_files(proxy: Proxy) -> list[str]:
    return [n for n in os.listdir(proxy.runtime.storage.spools.path) if n.startswith("spool-")]


async def test_disk_full_while_spooling_every_client_gets_the_whole_body_and_nothing_is_stored(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachegate")
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(big_origin(go))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        spools = proxy.runtime.storage.spools
        real_make_file = spools.make_file
        monkeypatch.setattr(spools, "make_file", lambda: FullDisk(real_make_file(), room=1024 * 1024))

        assert await two_clients_on_one_fill(proxy, origin, go) == [DIGEST, DIGEST]
        stats = storage_stats((await proxy.admin("GET", "/stats")).body)
        assert stats["write_errors"] == {"spool": 1} and stats["failing"]
        assert "No space left on device" in stats["last_error"]
        assert spool_files(proxy) == []  # the abandoned spool file is gone (and its space)
        # Still full: the next fill is passed on whole too; the failure is counted, not logged again.
        assert await two_clients_on_one_fill(proxy, origin, go) == [DIGEST, DIGEST]
        metrics = (await proxy.admin("GET", "/metrics")).body.decode()
        assert 'cachegate_storage_errors_total{operation="spool"} 2.0' in metrics
        assert 'cachegate_not_stored_total{reason="STORE-FAILED"} 2.0' in metrics
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "storage write failed" in warnings[0].getMessage(), warnings
        assert warnings[0].exc_info is None  # a full disk is no bug: no traceback

        monkeypatch.setattr(spools, "make_file", real_make_file)  # room again
        assert await two_clients_on_one_fill(proxy, origin, go) == [DIGEST, DIGEST]
        hit = await proxy.get("/big")
        assert (hit.x_cache, hashlib.sha256(hit.body).hexdigest()) == ("HIT", DIGEST)
        assert len(origin.requests) == 3
        # The streak is over once no write failed for SETTLE seconds (on a full disk, small writes
        # that fit succeed between big ones that fail): until then it is still failing, unsaid.
        stats = storage_stats((await proxy.admin("GET", "/stats")).body)
        assert stats["write_errors"] == {"spool": 2} and stats["failing"]
        assert not any("succeed again" in r.getMessage() for r in caplog.records)
        failures = proxy.runtime.engine.write_failures
        failures.failed_monotonic -= SETTLE  # as if that long had passed since
        failures.succeeded()  # the next write that succeeds
        stats = storage_stats((await proxy.admin("GET", "/stats")).body)
        assert stats["write_errors"] == {"spool": 2} and not stats["failing"]
        assert [r.getMessage() for r in caplog.records].count("storage writes succeed again, after 2 failed") == 1


async def test_a_flight_that_ends_mid_body_aborts_its_clients(make_proxy: MakeProxy) -> None:
    """Every way out of a flight ends its body: here a cancellation (as at shutdown, past the
    grace) of a fill whose origin stalls mid-body. Its client sees an aborted response at once."""
    async def stall(conn: Conn) -> None:
        await conn.request()
        await conn.send(response("200 OK", {"Cache-Control": "max-age=600"}, length=False)[:-2]
                        + f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:PIECE])
        await asyncio.sleep(3600)

    async with raw_origins() as start:
        origin = await start(stall)
        proxy = await make_proxy(config="upstream: {retries: 0, timeouts: {read: 1h}}\n", upstreams=[origin.url])
        async with proxy.session.get(proxy.url + "/big") as resp:
            assert await resp.content.readexactly(PIECE) == BODY[:PIECE]
            await proxy.runtime.engine.coalescer.close(grace=0)
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.read(), 10)


async def test_a_purge_while_a_fill_is_in_flight_ends_its_body_whole_and_stores_nothing(
    make_proxy: MakeProxy
) -> None:
    """Another way out of a flight: purged while its body arrives. Its clients get the whole
    body; what it carries is not stored (it was purged)."""
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(big_origin(go))
        proxy = await make_proxy(config="upstream: {retries: 0}\n", upstreams=[origin.url])
        leader = asyncio.ensure_future(proxy.get("/big"))
        await flight_with(proxy, followers=0)
        follower = asyncio.ensure_future(proxy.get("/big"))
        flight = await flight_with(proxy, followers=1)
        purged = await proxy.admin("POST", "/purge", json={"urls": [proxy.url + "/big"]})
        assert purged.status == 200
        go.set()
        replies = await asyncio.wait_for(asyncio.gather(leader, follower), 20)
        assert [hashlib.sha256(r.body).hexdigest() for r in replies] == [DIGEST, DIGEST]
        assert not (await asyncio.wait_for(asyncio.shield(flight.result), 20)).stored
        assert (await proxy.get("/big")).x_cache == "MISS"


async def test_disk_full_while_spooling_a_range_part_its_client_gets_the_whole_206(
    origin: Origin, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range miss streams the origin's 206 to its client while spooling it as a part: a full
    disk gives up the part's store, counted as a fill's is, never the client's answer."""
    origin.route("/r", Representation(BODY))
    proxy = await make_proxy(config=NONE)
    spools = proxy.runtime.storage.spools
    real_make_file = spools.make_file
    monkeypatch.setattr(spools, "make_file", lambda: FullDisk(real_make_file(), room=1024 * 1024))

    wanted = 3 * 1024 * 1024
    reply = await proxy.get("/r", headers={"Range": f"bytes=0-{wanted - 1}"})
    assert (reply.status, reply.headers.get("Content-Range")) == (206, f"bytes 0-{wanted - 1}/{len(BODY)}")
    assert reply.body == BODY[:wanted]
    stats = storage_stats((await proxy.admin("GET", "/stats")).body)
    assert stats["write_errors"] == {"spool": 1} and "No space left on device" in stats["last_error"]
    assert spool_files(proxy) == []
    metrics = (await proxy.admin("GET", "/metrics")).body.decode()
    assert 'cachegate_not_stored_total{reason="STORE-FAILED"} 1.0' in metrics
    # Nothing stored: the same range goes to the origin again.
    assert (await proxy.get("/r", headers={"Range": "bytes=0-9"})).x_cache == "MISS"


# -- a real full filesystem -------------------------------------------------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (root on Linux only), lazily unmounted after."""
    yield from mounted_tmpfs(tmp_path / "tiny", "2m")


@pytest.mark.slow
async def test_a_real_full_disk_while_spooling_every_client_gets_the_whole_body(
    make_proxy: MakeProxy, tiny_tmpfs: Path
) -> None:
    go = asyncio.Event()
    async with raw_origins() as start:
        origin = await start(big_origin(go))
        config = (f"upstream: {{retries: 0}}\ncache: {{memory: 64MB, disk: {{path: {str(tiny_tmpfs)!r}, "
                  "size: 1GB, shards: 2}}\n")
        proxy = await make_proxy(config=config, upstreams=[origin.url])
        free_before = shutil.disk_usage(tiny_tmpfs).free
        assert free_before < len(BODY)  # the spool file cannot fit
        assert await two_clients_on_one_fill(proxy, origin, go) == [DIGEST, DIGEST]
        stats = storage_stats((await proxy.admin("GET", "/stats")).body)
        assert stats["write_errors"].get("spool") == 1 and "No space left" in stats["last_error"]
        assert spool_files(proxy) == []
        assert shutil.disk_usage(tiny_tmpfs).free >= free_before - 64 * 1024  # its space is back
        again = await proxy.get("/big")  # and again: fetched, passed on whole
        assert hashlib.sha256(again.body).hexdigest() == DIGEST
        assert len(origin.requests) == 2
