"""The cyclic garbage collector in a serving process: what start-up built is frozen, and the
young generation is collected every ``THRESHOLD[0]`` net allocations instead of CPython's 700.

Why (measured: one worker of two under the ``fill`` load, 64 connections, ``gc.callbacks``
timing each collection; ``docs/performance.md``, "Garbage collection"): a fill's request lives
about 20 ms, longer than two young collections at 1,500 fills/s, so its objects reached the
oldest generation and died there, and full collections of the ~82,000 objects a worker holds
came every 1-2 s: 0.7-1.05 s of collection per 10 s of load, with pauses up to 136 ms, during
which every request in flight in that worker waits. Frozen and collected less often: 17-35 ms
per 10 s, pauses up to 11 ms. Requests leave almost no cycles behind (0.03 unreachable objects
per request, ``DEBUG_SAVEALL``), so collecting less often holds no memory to speak of.

Freezing is per process (a worker is a fresh interpreter, not a fork). Only the processes
that serve settle (``cachegate run`` and its workers and supervisor): the test suite's
in-process proxies leave the interpreter's collector as it is.
"""

from __future__ import annotations

import asyncio
import gc

THRESHOLD = (10_000, 20, 10)

_settled = False


def settle() -> None:
    """Once the process serves: collect, freeze what survived (modules, config, rules, tables
    sized at start), and collect the young generation less often."""
    global _settled
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLD)
    _settled = True


def resettle() -> None:
    """After a reload: the replaced config's objects were frozen with the rest, and those in
    cycles would never be collected; unfreeze, collect and freeze again (one full collection,
    a pause of the order of 0.1 s in a busy worker, once per reload). Nothing in a process that
    never settled."""
    if _settled:
        gc.unfreeze()
        settle()


def resettle_soon() -> None:
    """``resettle`` once the running event loop is done with what it does now (a reload): the
    reload is answered and logged first, and a worker answers the supervisor, which goes on to
    the next worker, before this process pauses for the collection."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        resettle()
        return
    loop.call_soon(resettle)


def frozen() -> int:
    """Objects the collector no longer looks at."""
    return gc.get_freeze_count()
