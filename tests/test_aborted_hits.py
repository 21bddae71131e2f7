"""A client that resets its connection in the middle of a hit leaves nothing behind: what the
response held (the request, the response, the body file, the chunk in hand) is freed when the
handler returns, by reference counting, not at the next full collection of the cyclic garbage
collector (a serving process runs those rarely: ``proxy.gctuning``). Checked with the
collector off, counting the live responses and body files."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from typing import Any

from proxy.storage.bodyfiles import BodyFile
from proxy.web.fastpath import ProxyRequestHandler
from proxy.web.heads import ReplyResponse
from tests.conftest import MakeProxy
from tests.harness import Origin

BIG = 5 << 20  # over memory_max_object (1 MB): a disk-only hit, sent from its file
ABORTS = 12


async def _reset_midway(url: str, path: str) -> None:
    """GET ``path``, read the first bytes, wait until the proxy waits on the full socket, then
    reset the connection (SO_LINGER 0: an RST, as a client killed mid-download sends)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await reader.readexactly(1000)
    await asyncio.sleep(0.05)  # the proxy fills the socket and waits for it to drain
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def _instances(kind: type) -> list[Any]:
    return [o for o in gc.get_objects() if isinstance(o, kind)]


def _alive(kind: type) -> int:
    return len(_instances(kind))


async def test_aborted_disk_hits_leave_no_garbage_for_the_collector(origin: Origin,
                                                                      make_proxy: MakeProxy) -> None:
    origin.route("/big", body=b"b" * BIG, headers={"Cache-Control": "max-age=600"})
    proxy = await make_proxy()
    assert (await proxy.get("/big")).x_cache == "MISS"
    hit = await proxy.get("/big")
    assert hit.x_cache == "HIT" and len(hit.body) == BIG
    gc.collect()
    gc.disable()
    try:
        before = _alive(ReplyResponse), _alive(BodyFile)
        for _ in range(ABORTS):
            await _reset_midway(proxy.url, "/big")
        for _ in range(200):  # until every reset connection is closed (the session's stays open)
            await asyncio.sleep(0.02)
            if sum(p.transport is not None for p in _instances(ProxyRequestHandler)) <= 1:
                break
        await asyncio.sleep(0.1)  # and its handler has returned
        after = _alive(ReplyResponse), _alive(BodyFile)
    finally:
        gc.enable()
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1, (before, after)
    assert (await proxy.get("/big")).x_cache == "HIT"
