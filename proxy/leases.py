"""Coalescing across worker processes: one origin fetch per key per machine.

Within a process the coalescer already makes one fetch per key. With
``--workers N`` every worker would still make its own, so the supervisor brokers
*leases* over the control channel (``proxy.control``):

- A worker about to fetch key K for its local flight asks ``lease_acquire``.
  The first to ask is granted the lease and fetches; the others are told who
  holds it and wait (at most ``cache.lock_timeout``, counted from the start of
  their flight, as nginx's ``proxy_cache_lock_timeout``).
- When the holder has the response head it says ``lease_head``: a response that
  is not shareable (private, Set-Cookie, ...) sends the waiters upstream at once,
  with hit-for-pass when the reason calls for it; later askers are told the same.
- When its fetch is over the holder says ``lease_release`` with the outcome:
  ``stored`` (the waiters read it from the shared disk tier and answer their
  clients from it), ``error`` (the origin failed: the waiters answer as the
  holder's own followers do, with stale-if-error or the error), or ``failed``
  (not stored: the waiters fetch for themselves).
- A holder that dies releases its leases (the supervisor sees its channel close):
  the waiters are told ``gone`` and ask again, so one of them takes the lease on.

The waiters' clients are served from the store once the body is complete, not
streamed as it arrives (a body in another process's memory cannot be joined):
for the bodies a herd usually asks for, the disk commit and one local read add
about a millisecond. Past ``lock_timeout`` a waiter fetches on its own.

A stale-while-revalidate refresh asks without waiting (``block=False``): when
another worker is already refreshing the key, it simply does not.

Why a broker and not a lock file in the cache directory (flock): an flock
costs ~2 µs against ~70 µs for a control-channel round trip (measured), but a
worker that finds the lock taken must then block a thread on it or poll, cannot
give up after ``lock_timeout`` without leaving a thread behind, and learns
nothing before the lock is released (not that the response turned out private).
The broker wakes waiters with one message, passes hit-for-pass on at the
response head, and knows at once when a worker dies. Its cost is paid only on a
miss or a revalidation in multi-worker mode: hits and hit-for-pass keys never
ask, and a single process has no broker at all.

Waiting is safe against every interleaving because a holder checks the store
again before fetching (``recent`` says whether that key was stored through a
lease lately): a worker that missed the store just before another worker stored
the key and released the lease is granted the next lease and finds the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.control import Channel

log = logging.getLogger("cachegate.leases")

RECENT_FOR = 60.0  # seconds a stored-through-a-lease key makes the next holder check the store first
RECENT_MAX = 100_000
LEASE_MAX_AGE = 600.0  # a lease never released (a bug, a wedged worker) is taken over after this
ACQUIRE_WAIT = 2.0  # seconds a worker waits for the broker's answer before fetching on its own

Notify = Callable[[int, dict[str, Any]], None]  # (worker id, event) -> None, fire and forget


@dataclass
class _Lease:
    holder: int
    token: int
    started: float
    waiters: set[int] = field(default_factory=set)
    head: dict[str, bool] | None = None  # {"shareable": ..., "pass": ...} once the holder has it


class LeaseBroker:
    """The supervisor's side: who fetches which key, and telling the others how it went."""

    def __init__(self, notify: Notify, clock: Callable[[], float] = time.monotonic) -> None:
        self._notify = notify
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._recent: dict[str, float] = {}  # key -> when it was stored through a lease
        self._next_token = 0
        self.counts: dict[str, int] = dict.fromkeys(
            ("granted", "waited", "busy", "pass", "stored", "error", "failed", "holder_gone"), 0)

    def calls(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """The named calls workers make (the supervisor adds ``worker_id``)."""
        return {"lease_acquire": self.acquire, "lease_head": self.head, "lease_release": self.release}

    @property
    def held(self) -> int:
        return len(self._leases)

    async def acquire(self, worker_id: int, key: str, block: bool = True) -> dict[str, Any]:
        now = self._clock()
        lease = self._leases.get(key)
        if lease is not None and now - lease.started > LEASE_MAX_AGE:
            log.error("lease on %s held by worker %d for %.0fs: taken over", key, lease.holder,
                      now - lease.started)
            self._end(key, lease, {"outcome": "gone"})
            lease = None
        if lease is None:
            self._next_token += 1
            self._leases[key] = _Lease(worker_id, self._next_token, now)
            self.counts["granted"] += 1
            recent = key in self._recent and now - self._recent[key] < RECENT_FOR
            return {"granted": True, "token": self._next_token, "recent": recent}
        answer: dict[str, Any] = {"granted": False, "token": lease.token, "holder": lease.holder}
        if lease.head is not None and not lease.head["shareable"]:
            answer["head"] = lease.head
            self.counts["pass"] += 1
        elif block:
            lease.waiters.add(worker_id)
            self.counts["waited"] += 1
        else:
            self.counts["busy"] += 1
        return answer

    async def head(self, worker_id: int, key: str, token: int, shareable: bool, pass_: bool) -> None:
        lease = self._leases.get(key)
        if lease is None or lease.token != token:
            return
        lease.head = {"shareable": shareable, "pass": pass_}
        if not shareable:
            # Nobody may be given this response: the waiters go upstream now.
            for w in lease.waiters:
                self._notify(w, {"key": key, "token": token, "outcome": "pass" if pass_ else "unshareable"})
            lease.waiters.clear()

    async def release(self, worker_id: int, key: str, token: int, outcome: str, status: int = 0,
                      message: str = "") -> None:
        lease = self._leases.get(key)
        if lease is None or lease.token != token:
            return
        if outcome == "stored":
            self._recent.pop(key, None)
            self._recent[key] = self._clock()
            self._trim_recent()
        self.counts[outcome if outcome in self.counts else "failed"] += 1
        self._end(key, lease, {"outcome": outcome, "status": status, "message": message})

    def worker_gone(self, worker_id: int) -> None:
        """A worker died: its leases end (the waiters fetch for themselves)."""
        for key, lease in list(self._leases.items()):
            lease.waiters.discard(worker_id)
            if lease.holder == worker_id:
                self.counts["holder_gone"] += 1
                self._end(key, lease, {"outcome": "gone"})

    def _end(self, key: str, lease: _Lease, event: dict[str, Any]) -> None:
        if self._leases.get(key) is lease:
            del self._leases[key]
        for w in lease.waiters:
            self._notify(w, {"key": key, "token": lease.token, **event})

    def _trim_recent(self) -> None:
        horizon = self._clock() - RECENT_FOR
        while self._recent:
            oldest, at = next(iter(self._recent.items()))
            if at >= horizon and len(self._recent) <= RECENT_MAX:
                break
            del self._recent[oldest]

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("cachegate_cross_worker_leases",
                                "Cross-worker coalescing: lease grants, waits and how fetches ended",
                                labels=["event"])
        for event, n in self.counts.items():
            c.add_metric([event], n)
        yield c
        g = GaugeMetricFamily("cachegate_cross_worker_leases_held", "Keys being fetched under a lease now")
        g.add_metric([], len(self._leases))
        yield g


@dataclass(frozen=True, slots=True)
class Granted:
    """This worker fetches; ``recent``: the key was stored through a lease lately (look first)."""

    token: int
    recent: bool


@dataclass(frozen=True, slots=True)
class Busy:
    """Another worker is fetching (a refresh that does not wait gets this)."""


@dataclass(slots=True)
class Waiting:
    """Another worker is fetching; ``outcome`` resolves with how it went (see ``LeaseBroker``)."""

    token: int
    outcome: asyncio.Future[dict[str, Any]]


class LeaseClient:
    """A worker's side: ask for leases, report heads and outcomes, hear about others' fetches."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._waits: dict[str, Waiting] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        channel.handlers["lease_event"] = self._event

    async def acquire(self, key: str, wait: bool = True) -> Granted | Waiting | Busy | None:
        """The lease on ``key``; None when the broker cannot be asked (fetch without one)."""
        existing = self._waits.get(key)
        if existing is not None and wait:
            return existing  # this worker already waits on that holder
        try:
            answer = await self._channel.call("lease_acquire", wait=ACQUIRE_WAIT, key=key, block=wait)
        except Exception as exc:  # the supervisor is gone or slow: the per-worker floor remains
            log.debug("lease for %s not available: %s", key, exc)
            return None
        if answer["granted"]:
            return Granted(int(answer["token"]), bool(answer.get("recent")))
        head = answer.get("head")
        if head is not None:  # the holder's response is not shareable
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            fut.set_result({"outcome": "pass" if head.get("pass") else "unshareable"})
            return Waiting(int(answer["token"]), fut)
        if not wait:
            return Busy()
        waiting = self._waits.get(key)
        if waiting is None or waiting.token != answer["token"]:
            waiting = Waiting(int(answer["token"]), asyncio.get_running_loop().create_future())
            self._waits[key] = waiting
        return waiting

    def forget(self, key: str, waiting: Waiting) -> None:
        if self._waits.get(key) is waiting:
            del self._waits[key]

    def head(self, key: str, lease: Granted, shareable: bool, pass_: bool) -> None:
        self._later("lease_head", key=key, token=lease.token, shareable=shareable, pass_=pass_)

    def release(self, key: str, lease: Granted, outcome: str, status: int = 0, message: str = "") -> None:
        self._later("lease_release", key=key, token=lease.token, outcome=outcome, status=status,
                    message=message)

    def _later(self, name: str, **args: Any) -> None:
        """Send without waiting for the answer; calls leave in the order they are made."""
        async def send() -> None:
            with contextlib.suppress(Exception):
                await self._channel.call(name, wait=30.0, **args)

        task = asyncio.ensure_future(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _event(self, key: str, token: int, outcome: str, status: int = 0, message: str = "") -> None:
        waiting = self._waits.get(key)
        if waiting is None or waiting.token != token:
            return  # a wait that already gave up
        del self._waits[key]
        if not waiting.outcome.done():
            waiting.outcome.set_result({"outcome": outcome, "status": status, "message": message})
