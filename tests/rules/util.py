"""Helpers for the rules tests: settle background work, move the proxy's clock, read Cache-Status."""

from __future__ import annotations

import asyncio
import re
import time

from tests.harness import Proxy, Reply


async def settle(proxy: Proxy) -> None:
    """Wait until the proxy's fills (including their disk writes) and refreshes are done."""
    coalescer = proxy.runtime.engine.coalescer
    for _ in range(100):
        tasks = list(coalescer._tasks)
        if not tasks:
            break
        await asyncio.gather(*tasks, return_exceptions=True)
    await proxy.runtime.storage.flush()  # what write-behind would commit moments later


def shift_clock(proxy: Proxy, seconds: float) -> None:
    """Move the proxy's clock forward (freshness is computed from it), instead of sleeping."""
    engine = proxy.runtime.engine
    current = engine.clock
    engine.clock = lambda: current() + seconds


def ttl(reply: Reply) -> int:
    """The ``ttl=`` of a Cache-Status hit."""
    m = re.search(r"ttl=(-?\d+)", reply.cache_status)
    assert m is not None, reply.cache_status
    return int(m.group(1))


def now() -> float:
    return time.time()
