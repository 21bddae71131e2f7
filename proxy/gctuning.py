"""The cyclic garbage collector in a serving process: what start-up built is frozen, and the
young generation is collected every ``YOUNG_EVERY`` seconds and every ``THRESHOLD[0]`` net
allocations instead of CPython's 700.

Why (measured: one worker of two under the ``fill`` load, 64 connections, ``gc.callbacks``
timing each collection; ``docs/performance.md``, "Garbage collection"): a fill's request lives
about 20 ms, longer than two young collections at 1,500 fills/s, so its objects reached the
oldest generation and died there, and full collections of the ~82,000 objects a worker holds
came every 1-2 s: 0.7-1.05 s of collection per 10 s of load, with pauses up to 136 ms, during
which every request in flight in that worker waits. Frozen and collected less often: 17-35 ms
per 10 s, pauses up to 11 ms. Requests leave almost no cycles behind (0.03 unreachable objects
per request, ``DEBUG_SAVEALL``), so collecting less often holds no memory to speak of.

The young generation is also collected by the event loop itself every ``YOUNG_EVERY`` seconds.
Why (measured the same way in the ``zipf`` load: ``docs/performance.md``, "Garbage
collection"): the threshold counts allocations *net of deallocations in every generation*, and
under a long tail the caches of decoded entries and of request heads churn: their old objects
die as fast as new ones are made, so the count crept up while the young generation grew to
30,000-65,000 objects, and each young collection paused the worker for 20-70 ms (100-900 ns an
object: each of them, and what it refers to, is a cache miss). Collected every 0.2 s, the young
generation holds what 0.2 s allocated: the longest collection 8-14 ms, and less collecting in
all (113-150 against 138-239 ms a worker per 20 s: objects that die young are never looked
at). The middle generation's threshold counts those collections (5 a second), so it is raised
with them: a middle collection every ~200 s, not every 4 s.

Freezing is per process (a worker is a fresh interpreter, not a fork). Only the processes
that serve settle (``cachegate run`` and its workers and supervisor): the test suite's
in-process proxies leave the interpreter's collector as it is.
"""

from __future__ import annotations

import asyncio
import gc

THRESHOLD = (10_000, 1_000, 10)
YOUNG_EVERY = 0.2  # seconds between the event loop's own young collections

_settled = False
_young_timer: asyncio.TimerHandle | None = None


def settle() -> None:
    """Once the process serves: collect, freeze what survived (modules, config, rules, tables
    sized at start), and collect the young generation every ``YOUNG_EVERY`` seconds from the
    running event loop (none without one) rather than by the allocation count alone."""
    global _settled, _young_timer
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLD)
    _settled = True
    if _young_timer is not None:
        _young_timer.cancel()  # a resettle: one timer per process
        _young_timer = None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    _young_timer = loop.call_later(YOUNG_EVERY, _collect_young, loop)


def _collect_young(loop: asyncio.AbstractEventLoop) -> None:
    """The young generation, and an older one when its turn has come: an explicit
    ``gc.collect(0)`` counts towards the middle generation's threshold but never collects it
    (only a collection the allocation count triggers would, and the timer keeps that count
    low), so the thresholds of the older generations are applied here, as CPython would."""
    global _young_timer
    _, middle, oldest = gc.get_count()
    generation = 0
    if middle >= THRESHOLD[1]:
        generation = 2 if oldest >= THRESHOLD[2] else 1
    gc.collect(generation)
    _young_timer = loop.call_later(YOUNG_EVERY, _collect_young, loop)


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
